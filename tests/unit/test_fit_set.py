"""A behaviour's fit set chooses as well as tests: the attribution over the fit variants
predicts what patching does on them, and where the prompt's cause set does not hold on them,
the set chosen there is the shortest prefix (by measured effect) that does, with every number
what patching from each variant's own counterfactual really does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rca.confirm import ConfirmConfig
from rca.confirm.behaviour import FitVariant, behaviour_evidence
from rca.model.metric import evaluate
from rca.model.subject import Subject
from rca.specificity import benign_damage
from rca.trace.components import Baseline, score_components
from rca.trace.fitset import fit_set_scores
from tests.helpers import tiny_model, word_tokenizer
from tests.unit.test_behaviour_evidence import REFS, pair, patched_share

IDS = [f"L{x}.H{h}" for x in range(2) for h in range(4)] + ["L0.MLP", "L1.MLP"]


@pytest.fixture(scope="module")
def subject() -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=5), word_tokenizer())


@pytest.fixture(scope="module")
def variants(subject) -> list[FitVariant]:
    return [FitVariant(i, *pair(subject, i)) for i in range(8)]


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> torch.Tensor:
        return torch.tensor(v).argsort().argsort().double()

    a, b = ranks(xs), ranks(ys)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_the_fit_set_attribution_predicts_what_patching_does(subject, variants) -> None:
    fs = fit_set_scores(subject, [(v.index, v.target, v.counterfactual) for v in variants])
    assert fs.indices == [v.index for v in variants] and not fs.skipped
    # each variant weighs the same: its scores as shares of its own gap, then the mean
    rows = []
    for v in variants:
        assert v.counterfactual is not None
        sc = score_components(
            subject, v.target, Baseline("counterfactual", "", target=v.counterfactual), edges=False
        )
        rows.append(sc.scores.double() / (sc.metric_clean - sc.metric_baseline))
    # the variants share a batched pass: its metrics differ from one-at-a-time ones by float
    # noise (1e-6), which shares of gaps as small as 0.04 make 1e-5 relative
    assert fs.mean == pytest.approx(torch.stack(rows).mean(0).tolist(), rel=1e-4, abs=1e-7)
    assert fs.passes == 1
    # first order, it predicts the interventions: the exact mean share patched alone
    att = dict(fs.ranked())
    exact = {
        c: sum(patched_share(subject, v.target, v.counterfactual, [c]) for v in variants)  # type: ignore[arg-type]
        / len(variants)
        for c in IDS
    }
    lead = [c for c, _ in fs.ranked()[:6]]
    assert all((att[c] > 0) == (exact[c] > 0) for c in lead), [(c, att[c], exact[c]) for c in lead]
    assert _spearman([att[c] for c in IDS], [exact[c] for c in IDS]) > 0.5


def test_a_variant_that_does_not_show_the_incident_is_skipped(subject, variants) -> None:
    v = variants[0]
    assert v.counterfactual is not None
    swapped = (9, v.counterfactual, v.target)  # its metric is below its "counterfactual"'s
    assert (
        evaluate(subject.model, v.counterfactual).metric < evaluate(subject.model, v.target).metric
    )
    fs = fit_set_scores(subject, [(v.index, v.target, v.counterfactual), swapped])
    assert fs.indices == [v.index] and fs.skipped == [9]


def test_where_the_prompt_s_set_does_not_hold_the_fit_set_chooses_one(subject, variants) -> None:
    cfg = ConfirmConfig()
    v0 = variants[0]
    assert v0.counterfactual is not None
    weak = min(IDS, key=lambda c: abs(patched_share(subject, v0.target, v0.counterfactual, [c])))
    verdict = SimpleNamespace(
        cause_set=SimpleNamespace(components=[weak]), circuit=None, config=cfg, candidates=[]
    )
    ev = behaviour_evidence(subject, verdict, variants, reference=REFS, measured=IDS)
    cs = ev.cause_set
    assert cs is not None and cs.source == "fit set"
    assert cs.tried[0] == {"components": [weak], "holds": pytest.approx(ev.set_holds)}
    assert ev.set_holds < cfg.variant_share
    # what ordinary text needs never enters it (benign damage on the reference prompts)
    damage = benign_damage(subject, IDS, REFS[: cfg.benign_prompts])
    assert cs.excluded == [c for c in IDS if damage[c].infrastructure]
    means = {c.id: c.mean for c in ev.components}
    order = sorted(
        (c for c in IDS if c not in cs.excluded and means[c] > 0), key=lambda c: -means[c]
    )[: cfg.max_set]
    holds = []
    for k in range(1, len(order) + 1):
        shares = [patched_share(subject, v.target, v.counterfactual, order[:k]) for v in variants]  # type: ignore[arg-type]
        holds.append(sum(x >= cfg.set_fraction for x in shares) / len(variants))
        assert cs.tried[k]["components"] == order[:k]
        assert cs.tried[k]["holds"] == pytest.approx(holds[-1])
    first = next((k for k, h in enumerate(holds) if h >= cfg.variant_share), None)
    assert cs.holds_on_fit_set == (first is not None)
    best = first if first is not None else max(range(len(holds)), key=lambda k: (holds[k], -k))
    assert cs.components == order[: best + 1] and cs.holds == pytest.approx(holds[best])
    want = [patched_share(subject, v.target, v.counterfactual, cs.components) for v in variants]  # type: ignore[arg-type]
    assert cs.shares == pytest.approx(want, abs=1e-4)


def test_where_the_prompt_s_set_holds_it_is_the_behaviour_s(subject, variants) -> None:
    strong = IDS  # every component patched: the whole gap, on every variant
    verdict = SimpleNamespace(
        cause_set=SimpleNamespace(components=strong), circuit=None, config=ConfirmConfig()
    )
    ev = behaviour_evidence(subject, verdict, variants)
    assert ev.cause_set is not None and ev.cause_set.source == "prompt"
    assert ev.cause_set.components == strong and ev.cause_set.holds == 1.0
