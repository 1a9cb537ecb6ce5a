"""Runs that cannot succeed stop before the expensive stages, in one line.

Every error a later stage would hit for a reason knowable at the start (a counterfactual that
does not remove the behaviour, a baseline above the prompt, the memory plan, a missing chat
template, the context) must come from the preflight checks or from the trace's baseline
check, before integrated gradients, the component scores, confirm or the remedies run. The
expensive stages are replaced here by functions that fail the test if they are called.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rca.ingest.incident import IncidentError, incident_from_flags
from rca.investigate import InvestigateConfig, investigate
from rca.model.metric import encode_target, evaluate
from rca.model.subject import load_subject
from rca.trace import trace
from tests.helpers import (
    assert_one_line_error,
    rca_cli,
    save_model_dir,
    tiny_model,
    word_tokenizer,
    words,
)

REFS = [words(30, 31, 32, 33), words(40, 41, 42), words(50, 51, 52, 53, 54)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("gpt2", seed=4, n_inner=32)  # every neuron kept by the trace
    return save_model_dir(path, model, word_tokenizer(chat=True))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "plain"
    return save_model_dir(path, tiny_model("gpt2", seed=4), word_tokenizer())


@pytest.fixture
def no_expensive_stage(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the expensive stages by functions that record the call and fail."""
    called: list[str] = []

    def boom(name: str):
        def f(*a, **k):
            called.append(name)
            raise AssertionError(f"{name} ran before the error")

        return f

    for target in (
        "rca.trace.integrated_gradients",
        "rca.trace.score_components",
        "rca.investigate.confirm",
        "rca.investigate.try_remedies",
    ):
        monkeypatch.setattr(target, boom(target))
    return called


def _metric(model_dir: Path, prompt: str, bad: str, good: str) -> float:
    s = load_subject(model_dir, device="cpu")
    return evaluate(s.model, encode_target(s.tokenizer, prompt, bad, good)).metric


def _flags(model_dir: Path, *extra: str) -> list[str]:
    out = ["investigate", "--model", str(model_dir), "--device", "cpu", "--json"]
    for r in REFS:
        out += ["--reference", r]
    return out + list(extra)


def test_a_counterfactual_that_does_not_remove_the_behaviour_stops_at_once(
    model_dir: Path, tmp_path: Path, no_expensive_stage: list[str]
) -> None:
    a, b = words(1, 2, 3, 4), words(1, 9, 3, 4)
    bad, good = " " + words(5), " " + words(6)
    # the prompt is whichever of the two the model finds less bad: the other cannot explain it
    less_bad = _metric(model_dir, a, bad, good) < _metric(model_dir, b, bad, good)
    prompt, cf = (a, b) if less_bad else (b, a)
    db = str(tmp_path / "x.duckdb")
    args = ["--prompt", prompt, "--bad", bad, "--good", good, "--counterfactual", cf, "--db", db]
    code, _, err = rca_cli(*_flags(model_dir, *args))
    assert_one_line_error(code, err, "key 'counterfactual'", "is not above")
    assert no_expensive_stage == []
    from rca.store import Store

    assert Store.reader(tmp_path / "x.duckdb").list_runs() == []  # nothing recorded
    # rca check --load says the same, without running anything else
    case = tmp_path / "case.toml"
    case.write_text(
        f'id = "c"\ntitle = "t"\nseverity = "low"\nmodel = "{model_dir}"\n'
        f'prompt = "{prompt}"\nbad = "{bad}"\ngood = "{good}"\ncounterfactual = "{cf}"\n'
        f"reference_prompts = {json.dumps(REFS)}\n"
    )
    code, _, err = rca_cli("check", str(case), "--load", "--device", "cpu")
    assert_one_line_error(code, err, "key 'counterfactual'", "is not above")


def test_a_mean_baseline_above_the_prompt_stops_before_the_trace_runs(
    model_dir: Path, no_expensive_stage: list[str]
) -> None:
    s = load_subject(model_dir, device="cpu")
    prompt = words(1, 2, 3, 4)
    with torch.no_grad():
        ids = torch.tensor([encode_target(s.tokenizer, prompt, " w5").prompt_ids])
        logits = s.model(input_ids=ids).logits[0, -1]
    # bad: the token the model finds least likely, good: the most likely, among the words
    word_ids = list(range(4, 100))
    lo = min(word_ids, key=lambda i: float(logits[i]))
    hi = max(word_ids, key=lambda i: float(logits[i]))
    inc = incident_from_flags(
        model=str(model_dir),
        prompt=prompt,
        bad=" " + s.tokenizer.decode([lo]),
        good=" " + s.tokenizer.decode([hi]),
        reference_prompts=REFS,
    )
    with pytest.raises(IncidentError) as e:
        investigate(inc, subject=s, config=InvestigateConfig(device="cpu", baseline="mean"))
    assert "is not above" in str(e.value) and "give a counterfactual" in str(e.value)
    assert no_expensive_stage == []


def test_the_memory_plan_refuses_before_any_stage(
    model_dir: Path, no_expensive_stage: list[str]
) -> None:
    args = ["--prompt", words(1, 2), "--bad", " w3", "--max-memory", "1M"]
    code, _, err = rca_cli(*_flags(model_dir, *args))
    assert_one_line_error(code, err, "max-memory")
    assert no_expensive_stage == []


def test_a_conversation_for_a_model_without_a_chat_template_stops_in_one_line(
    plain_dir: Path, tmp_path: Path, no_expensive_stage: list[str]
) -> None:
    msgs = tmp_path / "chat.json"
    msgs.write_text(json.dumps([{"role": "user", "content": words(1, 2)}]))
    code, _, err = rca_cli(*_flags(plain_dir, "--messages", str(msgs), "--bad", " w3"))
    assert_one_line_error(code, err, "key 'messages'", "no chat template")
    assert no_expensive_stage == []


def test_a_prompt_over_the_context_stops_in_one_line(
    model_dir: Path, no_expensive_stage: list[str]
) -> None:
    long = words(*([1, 2, 3] * 30))  # 90 words; the tiny model's context is 64
    code, _, err = rca_cli(*_flags(model_dir, "--prompt", long, "--bad", " w3"))
    assert_one_line_error(code, err, "key 'prompt'", "context")
    assert no_expensive_stage == []


def test_a_bad_messages_file_names_the_file_and_the_item(model_dir: Path, tmp_path: Path) -> None:
    msgs = tmp_path / "chat.json"
    msgs.write_text(json.dumps({"messages": [{"role": "robot", "content": "w1"}]}))
    code, _, err = rca_cli(*_flags(model_dir, "--messages", str(msgs), "--bad", " w3"))
    assert_one_line_error(code, err, str(msgs), "item 0", "unknown role")
    msgs.write_text("[{")
    code, _, err = rca_cli(*_flags(model_dir, "--messages", str(msgs), "--bad", " w3"))
    assert_one_line_error(code, err, "not valid JSON")


def test_a_chat_investigation_records_the_conversation_and_the_decoding(
    model_dir: Path, tmp_path: Path
) -> None:
    from rca.store import Store

    msgs, cf = tmp_path / "chat.json", tmp_path / "cf.json"
    user = {"role": "user", "content": words(4, 5)}
    msgs.write_text(json.dumps([{"role": "system", "content": words(1, 2, 3)}, user]))
    cf.write_text(json.dumps([{"role": "system", "content": words(1, 9, 3)}, user]))
    db = tmp_path / "r.duckdb"
    args = ["--messages", str(msgs), "--counterfactual-messages", str(cf)]
    args += ["--bad", " w6 w7", "--focus", "w7", "--db", str(db)]
    code, out, err = rca_cli(*_flags(model_dir, *args))
    assert code == 0, err
    # stderr is not a terminal here: plain progress lines, stage and fraction and time
    assert any(x.startswith("progress: trace ") and x.endswith(" s") for x in err.splitlines())
    run = Store.reader(db).get_run(json.loads(out)["run_id"])
    summary = run["summary"] if isinstance(run["summary"], dict) else json.loads(run["summary"])
    assert summary["prompt_text"] == "w90 w1 w2 w3 w91 w4 w5 w92"
    assert summary["counterfactual_text"] == "w90 w1 w9 w3 w91 w4 w5 w92"
    dec = summary["decoding"]
    assert [t["in_focus"] for t in dec["tokens"]] == [False, True]
    # the recorded probabilities are the model's: recompute the focus token's by hand
    s = load_subject(model_dir, device="cpu")
    t = encode_target(s.tokenizer, summary["prompt_text"], " w6 w7", focus="w7")
    ids = torch.tensor([list(t.prompt_ids) + list(t.bad_ids)])
    with torch.no_grad():
        p = torch.softmax(s.model(input_ids=ids).logits[0, t.n_prompt], -1)[t.bad_ids[1]]
    assert dec["tokens"][1]["p"] == pytest.approx(float(p), rel=1e-4)
    assert summary["p_bad_prompt"] == pytest.approx(float(p), rel=1e-4)
    case = run["incident"]["case_data"]
    case = case if isinstance(case, dict) else json.loads(case)
    assert "prompt" not in case and case["messages"][1] == {"role": "user", "content": "w4 w5"}


def test_a_mean_baseline_with_neurons_scores_every_neuron(model_dir: Path) -> None:
    """The mean baseline records the neurons' means too: with every neuron kept, a layer's
    neuron scores add up to its MLP's (the down projection is linear)."""
    s = load_subject(model_dir, device="cpu")
    inc = incident_from_flags(
        model=str(model_dir), prompt=words(1, 2, 3), bad=" w4", good=" w5", reference_prompts=REFS
    )
    att = trace(s, inc, baseline="mean", neurons=True, method="atp", reference_prompts=REFS)
    assert att.baseline.kind == "mean"
    d_mlp = s.adapter.d_mlp
    for layer in range(s.adapter.n_layers):
        scores = [v for k, v in att.components.neurons.items() if k.startswith(f"L{layer}.N")]
        if d_mlp <= 50:  # every neuron kept (the trace keeps the top 50 of each layer)
            assert sum(scores) == pytest.approx(att.components.score(f"L{layer}.MLP"), abs=1e-4)
        else:
            assert len(scores) == 50


def _case_with_variants(tmp_path: Path, model_dir: Path, variants: str) -> Path:
    case = tmp_path / "case.toml"
    case.write_text(
        f'id = "c"\ntitle = "t"\nseverity = "low"\nmodel = "{model_dir}"\n'
        f'prompt = "{words(1, 2, 3, 4)}"\nbad = " w5"\ngood = " w6"\n'
        f"reference_prompts = {json.dumps(REFS)}\n{variants}"
    )
    return case


def test_a_variant_that_does_not_fit_the_context_stops_before_any_stage_naming_it(
    model_dir: Path, tmp_path: Path, no_expensive_stage: list[str]
) -> None:
    long = words(*([1, 2, 3] * 30))  # 90 words; the tiny model's context is 64
    case = _case_with_variants(
        tmp_path,
        model_dir,
        f'[[variants]]\nprompt = "{words(7, 2, 3, 4)}"\n[[variants]]\nprompt = "{long}"\n',
    )
    db = str(tmp_path / "x.duckdb")
    code, _, err = rca_cli("investigate", str(case), "--device", "cpu", "--db", db)
    assert_one_line_error(code, err, "key 'variants': item 1: key 'prompt'", "context")
    assert no_expensive_stage == []
    code, _, err = rca_cli("check", str(case), "--load", "--device", "cpu")
    assert_one_line_error(code, err, "key 'variants': item 1: key 'prompt'", "context")


def test_check_load_measures_every_variant_as_the_model_scores_it(
    model_dir: Path, tmp_path: Path
) -> None:
    from rca.ingest.case_file import load_case
    from rca.ingest.preflight import check_variants

    template = (
        "[template]\n"
        'prompt = "w1 {a} w3 {t}"\ntrigger = "t"\ncounterfactual = ["w9"]\n'
        '[template.slots]\na = ["w2", "w12", "w22"]\nt = ["w4", "w14"]\n'
        "[split]\nseed = 2\nheld_out = 0.5\n"
    )
    case = _case_with_variants(tmp_path, model_dir, template)
    inc = load_case(case)
    s = load_subject(model_dir, device="cpu")
    checks = check_variants(s, inc)
    assert len(checks) == 6
    fit, held = inc.split.assign(6)
    assert [c.part for c in checks] == ["held_out" if i in held else "fit" for i in range(6)]
    for c, v in zip(checks, inc.all_variants(), strict=True):
        # each number is the model's on that variant's own prompt
        want = evaluate(s.model, encode_target(s.tokenizer, v.prompt, " w5", " w6"))
        assert c.metric == pytest.approx(want.metric, abs=1e-5)
        assert c.p_bad == pytest.approx(want.p_bad, abs=1e-6)
        assert c.label == ", ".join(f"{k}={x}" for k, x in v.slots)
    code, out, err = rca_cli("check", str(case), "--load", "--device", "cpu")
    assert code == 0, err
    assert "6 variants: 3 fit (and the case's prompt), 3 held out (split seed 2)" in out
    # shown: the model prefers the bad continuation (sigmoid of the log-ratio metric)
    shown_fit = sum(1 / (1 + math.exp(-c.metric)) >= 0.5 for c in checks if c.part == "fit")
    assert f"on {shown_fit} of 3 fit variants" in out


def test_an_investigation_records_its_variants_measurements(
    model_dir: Path, tmp_path: Path
) -> None:
    from rca.store import Store

    case = _case_with_variants(
        tmp_path,
        model_dir,
        "".join(f'[[variants]]\nprompt = "{words(w, 2, 3, 4)}"\n' for w in (7, 8)),
    )
    db = tmp_path / "r.duckdb"
    code, out, err = rca_cli("investigate", str(case), "--device", "cpu", "--db", str(db), "--json")
    assert code == 0, err
    run = Store.reader(db).get_run(json.loads(out)["run_id"])
    summary = run["summary"] if isinstance(run["summary"], dict) else json.loads(run["summary"])
    rec = summary["variants"]
    assert (rec["n"], rec["fit"], rec["held_out"]) == (2, 1, 1)
    s = load_subject(model_dir, device="cpu")
    for item, w in zip(run["variants"], (7, 8), strict=True):
        want = evaluate(s.model, encode_target(s.tokenizer, words(w, 2, 3, 4), " w5", " w6"))
        assert item["p_bad"] == pytest.approx(want.p_bad, abs=1e-6)
