"""Token attribution from the counterfactual, and the warning for incomplete attributions.

Integrated gradients from an aligned counterfactual move only the positions where the
counterfactual has another token: every other position scores exactly 0, and the scores sum to
the real change ``metric(prompt) - metric(counterfactual)``, measured here by two forwards. A
mean baseline has no prompt to start from, so the path starts at neutral tokens. Attributions
that miss their tolerance carry a warning in the case file, the terminal report, the CLI and
the workbench.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rca.ingest.incident import incident_from_flags
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.report import render_html, render_markdown, render_terminal, token_warning
from rca.store import IncidentRecord, ModelRecord, RunRecord, Store
from rca.trace import trace
from rca.trace.tokens import integrated_gradients, neutral_token_id
from tests.helpers import rca_cli, save_model_dir, tiny_model, word_tokenizer, words

PROMPT = (5, 6, 7, 8, 9, 10)
BAD, GOOD = (11, 12), (13,)
CF_TWO = (5, 6, 20, 8, 9, 21)  # differs at positions 2 and 5
CF_ONE = (5, 6, 7, 8, 22, 10)  # differs at position 4


def subject_of(model_type: str) -> Subject:
    return Subject.from_model(tiny_model(model_type, seed=3).double().eval(), word_tokenizer())


def metric(s: Subject, t: Target) -> float:
    with torch.no_grad():
        return float(t.metric(s.model(input_ids=t.input_ids()).logits)[0])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_only_the_changed_positions_score_and_they_sum_to_the_real_change(
    model_type: str,
) -> None:
    s = subject_of(model_type)
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF_TWO, BAD, GOOD)
    gap = metric(s, tgt) - metric(s, cf)
    assert abs(gap) > 1e-2  # the counterfactual moves the metric: the test is not vacuous
    ts = integrated_gradients(s, tgt, counterfactual=cf, n_steps=32)
    changed = {2, 5}
    for p, v in enumerate(ts.scores):
        if p in changed:
            assert abs(v) > 1e-6, (p, ts.scores)
        else:
            assert v == 0.0, (p, ts.scores)  # the path does not move it
    c = ts.completeness
    assert c["metric_baseline"] == pytest.approx(metric(s, cf), abs=1e-9)
    assert sum(ts.scores) == pytest.approx(gap, rel=1e-3)
    assert c["relative_error"] < 1e-3 and c["tolerance"] == 0.05
    assert ts.baseline == c["baseline"] == "counterfactual"
    assert ts.baseline_ids == list(CF_TWO)


def test_one_changed_token_takes_the_whole_change() -> None:
    """With one position changed, its score is the metric's change on replacing that token,
    a real intervention, to the integration's accuracy."""
    s = subject_of("gpt2")
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF_ONE, BAD, GOOD)
    gap = metric(s, tgt) - metric(s, cf)
    ts = integrated_gradients(s, tgt, counterfactual=cf, n_steps=16)
    assert [p for p, v in enumerate(ts.scores) if v != 0.0] == [4]
    assert ts.scores[4] == pytest.approx(gap, rel=1e-3)


def test_the_sum_approaches_the_change_as_points_grow() -> None:
    s = subject_of("gpt2")
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF_TWO, BAD, GOOD)
    rel = {
        n: integrated_gradients(s, tgt, counterfactual=cf, n_steps=n).completeness["relative_error"]
        for n in (1, 32)
    }
    assert rel[32] < 1e-3 and rel[32] < rel[1]
    # the adaptive doubling applies to the counterfactual start too
    ts = integrated_gradients(s, tgt, counterfactual=cf, n_steps=32, min_steps=1, tolerance=1e-4)
    assert ts.completeness["tries"][0] == 1 and ts.completeness["relative_error"] <= 1e-4


def test_a_counterfactual_that_does_not_line_up_is_refused() -> None:
    s = subject_of("gpt2")
    tgt = Target(PROMPT, BAD, GOOD)
    with pytest.raises(ValueError, match="does not line up"):
        integrated_gradients(s, tgt, counterfactual=Target(PROMPT[:-1], BAD, GOOD))
    with pytest.raises(ValueError, match="does not line up"):
        integrated_gradients(s, tgt, counterfactual=Target(CF_TWO, BAD, (14,)))


def test_without_a_counterfactual_the_path_starts_at_neutral_tokens() -> None:
    s = subject_of("gpt2")
    tgt = Target(PROMPT, BAD, GOOD)
    ts = integrated_gradients(s, tgt, n_steps=8)
    neutral = neutral_token_id(s.tokenizer)
    assert ts.baseline == ts.completeness["baseline"] == "neutral"
    assert ts.baseline_ids == [neutral] * len(PROMPT)
    assert ts.baseline_token == s.tokenizer.decode([neutral])
    neutral_tgt = Target((neutral,) * len(PROMPT), BAD, GOOD)
    assert ts.completeness["metric_baseline"] == pytest.approx(metric(s, neutral_tgt), abs=1e-9)
    assert all(v != 0.0 for v in ts.scores)  # every position moves


# ----------------------------------------------------------------------------- through trace

REFS = [words(30, 31, 32, 33), words(40, 41, 42), words(50, 51, 52, 53, 54)]


@pytest.fixture(scope="module")
def tiny() -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=4).eval(), word_tokenizer())


def test_trace_starts_from_its_counterfactual(tiny: Subject) -> None:
    inc = incident_from_flags(
        model="tiny",
        prompt=words(1, 2, 3, 4),
        bad=" w5",
        good=" w6",
        counterfactual=words(1, 9, 3, 4),
        reference_prompts=REFS,
    )
    att = trace(tiny, inc, baseline="counterfactual", method="atp", ig_steps=16)
    assert att.baseline.kind == "counterfactual" and att.baseline.target is not None
    cf_ids = list(att.baseline.target.prompt_ids)
    assert att.tokens.baseline == "counterfactual" and att.tokens.baseline_ids == cf_ids
    differ = [
        p for p, (a, b) in enumerate(zip(att.target.prompt_ids, cf_ids, strict=True)) if a != b
    ]
    assert len(differ) == 1
    assert [p for p, v in enumerate(att.tokens.scores) if v != 0.0] == differ
    c = att.tokens.completeness
    assert c["metric_baseline"] == pytest.approx(metric(tiny, att.baseline.target), abs=1e-5)
    out = att.to_json()
    assert out["token_baseline"] == "counterfactual"
    assert out["token_completeness"]["tolerance"] == 0.05


def test_trace_with_a_mean_baseline_starts_from_neutral_tokens(tiny: Subject) -> None:
    inc = incident_from_flags(
        model="tiny",
        prompt=words(1, 2, 3, 4),
        bad=" w5",
        good=" w6",
        counterfactual=words(1, 9, 3, 4),  # present, but the mean baseline does not use it
        reference_prompts=REFS,
    )
    att = trace(tiny, inc, baseline="mean", method="atp", reference_prompts=REFS, ig_steps=16)
    assert att.baseline.kind == "mean"
    neutral = neutral_token_id(tiny.tokenizer)
    assert att.tokens.baseline == "neutral"
    assert att.tokens.baseline_ids == [neutral] * att.target.n_prompt
    ref = integrated_gradients(tiny, att.target, n_steps=16, min_steps=8)
    assert att.tokens.scores == pytest.approx(ref.scores, abs=1e-6)
    assert att.to_json()["token_baseline"] == "neutral"


# ------------------------------------------------------------------------------- the warning

COMPLETE = {
    "sum_attributions": 0.98,
    "metric_input": 1.5,
    "metric_baseline": 0.5,
    "delta": -0.02,
    "relative_error": 0.02,
    "tolerance": 0.05,
    "baseline": "counterfactual",
}
INCOMPLETE = {
    "sum_attributions": 9.431,
    "metric_input": 1.810,
    "metric_baseline": 0.645,
    "delta": 8.266,
    "relative_error": 7.09,
    "tolerance": 0.05,
    "baseline": "neutral",
}


def test_the_warning_says_how_far_off_the_sum_is() -> None:
    text = token_warning(INCOMPLETE)
    assert text is not None
    assert "+9.431" in text and "+1.165" in text and "7.09" in text and "0.05" in text
    assert "ranking" in text
    assert token_warning(COMPLETE) is None
    assert token_warning(None) is None and token_warning({}) is None
    # the run's own tolerance decides; runs that recorded none are held to 0.05
    assert token_warning({**COMPLETE, "tolerance": 0.01}) is not None
    old = {k: v for k, v in COMPLETE.items() if k not in ("tolerance", "baseline")}
    assert token_warning(old) is None
    assert token_warning({**old, "relative_error": 0.06}) is not None
    assert token_warning({**COMPLETE, "relative_error": float("nan")}) is not None


def recorded(db: Path, completeness: dict[str, Any] | None) -> dict[str, Any]:
    """A run recorded through the store with ``completeness`` as its token completeness, as
    ``get_run`` reads it back."""
    summary: dict[str, Any] = {"verdict": "confirmed", "cause_set": ["L1.H2"]}
    if completeness is not None:
        summary["token_completeness"] = completeness
    run = RunRecord(
        incident=IncidentRecord.from_fields(
            {
                "id": "t",
                "title": "t",
                "severity": "low",
                "model": "m",
                "prompt": "p q",
                "bad": " b",
            },
            source="cases/t.toml",
        ),
        model=ModelRecord("a" * 64, path="/models/m", architecture="gpt2", n_params=10),
        summary=summary,
        token_scores=[
            {"position": 0, "token": "p", "score": 0.0, "method": "integrated-gradients"},
            {"position": 1, "token": " q", "score": 0.98, "method": "integrated-gradients"},
        ],
        nodes=[{"node_id": "L1.H2", "score": 1.0, "rank": 1, "verdict": "confirmed"}],
    )
    return Store.reader(db).get_run(Store(db, actor="tester").record_run(run))


def token_section(text: str) -> str:
    return text.split("## Token attribution", 1)[1].split("## Causes", 1)[0]


def test_the_report_warns_where_the_attributions_are_incomplete(tmp_path: Path) -> None:
    bad = recorded(tmp_path / "bad.duckdb", INCOMPLETE)
    good = recorded(tmp_path / "good.duckdb", COMPLETE)
    old = recorded(tmp_path / "old.duckdb", None)
    for render in (render_markdown, render_terminal):
        assert "incomplete" in token_section(render(bad))
        assert "relative error 7.09, tolerance 0.05" in token_section(render(bad))
        assert "incomplete" not in render(good) and "incomplete" not in render(old)
    assert "from the counterfactual prompt" in token_section(render_markdown(good))
    assert "neutral tokens" in token_section(render_markdown(bad))
    html_bad = render_html(bad)
    tok = html_bad.split("<h2>Token attribution</h2>", 1)[1].split("<h2>", 1)[0]
    assert "incomplete" in tok and 'class="warn"' in tok
    assert "incomplete" not in render_html(good)


@pytest.mark.parametrize("tolerance", [0.0, float("inf")])
def test_the_cli_warns_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: float
) -> None:
    """``rca trace`` says on stderr when the token attributions miss their tolerance (held
    here to 0: any error, or to infinity: none), and stdout stays one JSON object."""
    import json

    import rca.trace

    def held(*args: Any, **kwargs: Any):
        return integrated_gradients(*args, **{**kwargs, "n_steps": 2, "tolerance": tolerance})

    monkeypatch.setattr(rca.trace, "integrated_gradients", held)
    path = save_model_dir(tmp_path / "m", tiny_model("gpt2", seed=4), word_tokenizer())
    code, out, err = rca_cli(
        "trace", "--model", str(path), "--prompt", words(1, 2, 3, 4), "--bad", " w5",
        "--good", " w6", "--baseline", "mean", "--method", "atp", "--device", "cpu",
        "--graph", str(tmp_path / "g.json"), "--json",
        *[a for r in REFS for a in ("--reference", r)],
    )  # fmt: skip
    assert code == 0, err
    c = json.loads(out)["token_completeness"]
    assert c["tolerance"] == tolerance and c["relative_error"] > 0
    warned = [x for x in err.splitlines() if x.startswith("warning: token attributions")]
    if tolerance == 0.0:
        assert len(warned) == 1, err
        assert f"relative error {c['relative_error']:.2f}, tolerance 0.00" in warned[0]
    else:
        assert not warned, err


def test_the_workbench_warns_where_the_attributions_are_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[2]
    shown = {}
    for name, completeness in (("bad", INCOMPLETE), ("good", COMPLETE)):
        db = tmp_path / f"{name}.duckdb"
        run_id = recorded(db, completeness)["run_id"]
        monkeypatch.setenv("RCA_DB", str(db))
        monkeypatch.setenv("RCA_CASES", str(root / "cases"))
        at = AppTest.from_file(str(root / "app.py"), default_timeout=60)
        at.run()
        at.query_params.update({"run": run_id})
        at.switch_page("rca/ui/case_detail.py").run()
        assert not at.exception, at.exception
        # the text is Markdown-escaped (``common.md``): compare it without the escapes
        shown[name] = [str(w.value).replace("\\", "") for w in at.warning]
    assert any("incomplete" in w and "tolerance 0.05" in w for w in shown["bad"]), shown
    assert not any("incomplete" in w for w in shown["good"]), shown
