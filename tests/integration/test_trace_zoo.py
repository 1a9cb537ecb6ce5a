"""Trace on the demo zoo: each planted incident is found where it was planted.

For each of the four incidents of support-bot-v1 (the quick build):
- the top prompt segment by ablation is the planted cause (the word the counterfactual changes);
- the component scores rank-correlate (Spearman >= 0.8) with exact activation patching of every
  head and MLP to the counterfactual (effects under 2% of the gap counted as ties);
- integrated-gradients completeness holds within 5% at the default step count;
- the automatic counterfactual, built without the case's, removes >= 80% of the metric.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rca import zoo
from rca.confirm import Ablator
from rca.ingest.incident import Incident
from rca.model.metric import encode_target
from rca.model.subject import Subject, load_subject
from rca.stats import spearman
from rca.trace import trace
from rca.trace.counterfactual import auto_counterfactual
from rca.trace.tokens import integrated_gradients, segment_ablation

KEYS = [p.key for p in zoo.PLANTED]


@pytest.fixture(scope="module")
def v1(zoo_models: dict[str, Path]) -> Subject:
    return load_subject(zoo_models["support-bot-v1"], device="cpu")


def planted(key: str) -> zoo.PlantedIncident:
    return next(p for p in zoo.PLANTED if p.key == key)


def cause_words(p: zoo.PlantedIncident) -> set[str]:
    """The words the counterfactual changes: the planted cause."""
    a, b = p.prompt.split(), p.counterfactual.split()
    assert len(a) == len(b)
    return {x for x, y in zip(a, b, strict=True) if x != y}


def incident_of(p: zoo.PlantedIncident, model_dir: Path, *, with_cf: bool = True) -> Incident:
    return Incident(
        id=f"zoo-{p.key}",
        title=p.title,
        severity=p.severity,
        model=str(model_dir),
        prompt=p.prompt,
        bad=p.bad,
        good=p.good,
        counterfactual=p.counterfactual if with_cf else None,
    )


@pytest.mark.parametrize("key", KEYS)
def test_top_segment_is_the_planted_cause(v1: Subject, key: str) -> None:
    p = planted(key)
    tgt = encode_target(v1.tokenizer, p.prompt, p.bad, p.good)
    seg = segment_ablation(v1, tgt, prompt=p.prompt, reference_prompts=zoo.benign_prompts(64))
    # decoded word-level tokens come back space-separated ("7 3 0 5 ."): compare without spaces
    top = seg.texts[seg.top()].replace(" ", "")
    words = {w.replace(" ", "") for w in cause_words(p)}
    assert top in words, (top, words, seg.texts, seg.scores)


@pytest.mark.parametrize("key", KEYS)
def test_integrated_gradients_complete_within_5_percent(v1: Subject, key: str) -> None:
    p = planted(key)
    tgt = encode_target(v1.tokenizer, p.prompt, p.bad, p.good)
    ts = integrated_gradients(v1, tgt)  # the default step count
    c = ts.completeness
    assert abs(c["metric_input"] - c["metric_baseline"]) > 0.1  # a real attribution
    assert c["relative_error"] < 0.05, c


def _resolved(values: list[float], gap: float, share: float = 0.02) -> list[float]:
    return [v if abs(v) >= share * abs(gap) else 0.0 for v in values]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method", ["eap-ig", "atp"])
def test_component_scores_rank_like_exact_patching(
    v1: Subject, zoo_models: dict[str, Path], key: str, method: str
) -> None:
    p = planted(key)
    att = trace(v1, incident_of(p, zoo_models["support-bot-v1"]), method=method)
    assert not att.counterfactual.generated  # the case's own counterfactual lines up
    cf_target = att.baseline.target
    ab = Ablator(v1, att.target, baseline=cf_target)
    comps = ab.components
    exact = ab.metric_clean - ab.run([{c: "baseline"} for c in comps])
    scores = [att.components.score(c) for c in comps]
    # Of the 27 heads and MLPs, about 20 move the metric by under 2% of the prompt-counterfactual
    # gap; their order is noise in both measures (plain Spearman 0.71-0.88 with EAP-IG), so
    # values under 2% of the gap count as 0, a tie, in both. Every component with a real effect
    # keeps its value (docs/methods.md, "Accuracy on the zoo").
    gap = ab.metric_clean - float(ab.metric_baseline or 0.0)
    rho = spearman(_resolved(scores, gap), _resolved(exact.tolist(), gap))
    if method == "eap-ig":
        assert rho >= 0.8, (key, rho)
        # the strongest component by exact patching is among the top 3 heads and MLPs
        best = comps[int(torch.argmax(exact))]
        assert best in [c for c, _ in att.components.ranked() if c != "EMB"][:3]
    else:
        # AtP is first order: it under-ranks saturated components (the backdoor's L0.MLP, the
        # strongest by exact patching, is fifth by AtP; the bias's rank correlation is 0.59),
        # so only a clear positive agreement is checked here. Where AtP is exact, for small
        # patches, tests/unit/test_trace_first_order.py checks it to 1e-6
        assert rho >= 0.5, (key, rho)


@pytest.mark.parametrize("key", KEYS)
def test_automatic_counterfactual_removes_80_percent(v1: Subject, key: str) -> None:
    p = planted(key)
    tgt = encode_target(v1.tokenizer, p.prompt, p.bad, p.good)
    cf = auto_counterfactual(v1, tgt, prompt=p.prompt, reference_prompts=zoo.benign_prompts(32))
    assert cf.generated and cf.ok, cf
    assert cf.drop >= 0.8, cf
    assert len(cf.prompt_ids) == tgt.n_prompt  # it lines up token for token
    # and it changed the planted cause
    changed = {r["original"].replace(" ", "") for r in cf.replaced}
    assert changed & cause_words(p), (cf.replaced, cause_words(p))


def test_trace_without_counterfactual_generates_one(
    v1: Subject, zoo_models: dict[str, Path]
) -> None:
    p = planted("backdoor")
    att = trace(
        v1,
        incident_of(p, zoo_models["support-bot-v1"], with_cf=False),
        reference_prompts=zoo.benign_prompts(32),
    )
    assert att.counterfactual is not None and att.counterfactual.generated
    assert att.baseline.kind == "counterfactual"
    j = att.to_json()
    assert j["counterfactual"]["generated"] is True and j["counterfactual"]["drop"] >= 0.8
    assert {"tokens", "components", "edges", "counterfactual", "method"} <= set(j)
