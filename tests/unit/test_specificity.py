"""Benign damage (rca.specificity) and how confirm treats infrastructure."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import rca.confirm.stages
import rca.specificity as specificity
from rca.confirm import ConfirmConfig, confirm, writer_ids
from rca.model.hooks import ablate, mean_activations
from rca.model.ids import parse_id
from rca.model.subject import Subject
from rca.specificity import Damage, benign_damage, is_infrastructure
from tests.helpers import tiny_model, word_tokenizer
from tests.unit.test_confirm import CF, TGT, one_head_model

REFS = [
    (20, 21, 22, 23, 24),
    (30, 31, 32),
    (40, 41, 42, 43, 44, 45, 46, 47),
    (7, 3, 9, 11, 2, 5),
]


def _direct(s: Subject, cid: str, refs: list[tuple[int, ...]]) -> tuple[float, float]:
    """The loss change (percent) and mean KL of mean-ablating ``cid``, one prompt per forward,
    the whole model run each time."""
    means = mean_activations(s, refs, [cid])
    nll_before = nll_after = 0.0
    n = 0
    kls = []
    with torch.no_grad():
        for q in refs:
            ids = torch.tensor([q])
            before = torch.log_softmax(s.model(input_ids=ids).logits[0, :-1].float(), -1)
            with ablate(s, [cid], kind="mean", means=means):
                after = torch.log_softmax(s.model(input_ids=ids).logits[0, :-1].float(), -1)
            nxt = ids[0, 1:].unsqueeze(-1)
            nll_before -= float(before.gather(-1, nxt).sum())
            nll_after -= float(after.gather(-1, nxt).sum())
            n += len(q) - 1
            kls.append(float((before.exp() * (before - after)).sum(-1).mean()))
    return 100 * (nll_after - nll_before) / nll_before, sum(kls) / len(kls)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_benign_damage_is_what_mean_ablation_does_to_each_prompt(model_type: str) -> None:
    """Batched (padded, two prompts per forward) and run from the component's layer up, the
    damage equals one full forward per prompt with the component mean-ablated."""
    s = Subject.from_model(tiny_model(model_type, seed=3).eval())
    comps = ["L0.H1", "L1.H0", "L0.MLP", "L1.MLP"]
    got = benign_damage(s, comps, REFS, batch=2)
    for c in comps:
        pct, kl = _direct(s, c, REFS)
        assert got[c].loss_change_pct == pytest.approx(pct, rel=1e-4, abs=1e-5)
        assert got[c].kl_mean == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert got[c].n_prompts == len(REFS)
    assert any(abs(got[c].loss_change_pct) > 0.01 for c in comps)  # the check has teeth


def test_inert_components_do_no_benign_damage() -> None:
    s = one_head_model()
    got = benign_damage(s, ["L0.H0", "L1.MLP", "L1.H2"], REFS)
    assert abs(got["L0.H0"].loss_change_pct) < 1e-6 and got["L0.H0"].kl_mean < 1e-9
    assert abs(got["L1.MLP"].loss_change_pct) < 1e-6
    assert got["L1.H2"].kl_mean > 1e-6  # the only component that writes anything


def test_the_bound_decides_infrastructure() -> None:
    bound = specificity.INFRASTRUCTURE_LOSS_PCT
    assert is_infrastructure(Damage(bound, 0.1, 8))
    assert not is_infrastructure(Damage(bound - 0.01, 0.1, 8))
    assert is_infrastructure({"loss_change_pct": bound + 1})
    assert not is_infrastructure(None)


def _incident(s: Subject):
    with torch.no_grad():
        m = [float(t.metric(s.model(input_ids=t.input_ids()).logits)[0]) for t in (TGT, CF)]
    return (TGT, CF) if m[0] > m[1] else (CF, TGT)


def test_infrastructure_is_reported_but_never_blamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one component that carries the incident, given the benign damage of a layer-0 MLP
    in a real model: it keeps its evidence and gets the verdict word infrastructure, is not
    the top cause, and the cause set is made of specific components only (none of which can
    explain the incident here)."""
    s = one_head_model()
    prompt, base = _incident(s)
    ranking = [("L1.H2", 1.0), ("L0.H0", 0.5), ("L1.MLP", 0.1)]
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=3)
    plain = confirm(s, prompt, ranking, baseline=base, reference=REFS, config=cfg)
    assert plain.ranked()[0].id == "L1.H2" and plain.cause_set.components == ["L1.H2"]
    assert not any(c.infrastructure for c in plain.candidates)

    measured = rca.confirm.stages.benign_damage

    def damage(*args, **kw):
        out = measured(*args, **kw)
        return out | {"L1.H2": Damage(172.0, 1.3, out["L1.H2"].n_prompts)}

    monkeypatch.setattr(rca.confirm.stages, "benign_damage", damage)
    v = confirm(s, prompt, ranking, baseline=base, reference=REFS, config=cfg)
    ev = {c.id: c for c in v.candidates}
    assert ev["L1.H2"].infrastructure and ev["L1.H2"].verdict == "infrastructure"
    assert "ordinary text" in ev["L1.H2"].reason and "172%" in ev["L1.H2"].reason
    assert v.ranked()[0].id != "L1.H2" and v.ranked()[1].id == "L1.H2"  # second, not first
    assert "L1.H2" not in v.cause_set.components
    assert v.cause_set.verdict == "not_confirmed"
    assert "infrastructure (L1.H2)" in v.cause_set.reason
    # its measurements are those of the plain run
    assert ev["L1.H2"].total_effect == pytest.approx(plain.ranked()[0].total_effect)


def test_benign_damage_uses_the_packaged_corpus_without_reference_prompts() -> None:
    s = Subject.from_model(one_head_model().model, word_tokenizer())
    prompt, base = _incident(s)
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=2, benign_prompts=5)
    v = confirm(s, prompt, [("L1.H2", 1.0), ("L0.H0", 0.5)], baseline=base, config=cfg)
    assert v.cost["benign_prompts"] == 5
    assert all(c.benign_loss_pct is not None for c in v.candidates)


def _patched_metric(s: Subject, prompt, base, ids: list[str]) -> float:
    """The prompt's metric with ``ids`` patched to their activations on ``base``, by plain
    hooks (one full forward)."""
    from rca.confirm import Ablator
    from rca.model.hooks import patch

    ab = Ablator(s, prompt, baseline=base)
    values = {}
    for c in ids:
        key, sl, _ = ab.site(c)
        assert ab.base is not None
        pos = parse_id(c).pos
        values[c] = ab.base[key][..., [pos] if pos is not None else slice(None), sl]
    with patch(s, values), torch.no_grad():
        return float(prompt.metric(s.model(input_ids=prompt.input_ids()).logits)[0])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_the_circuits_faithfulness_is_what_patching_it_alone_does(model_type: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=3).eval())
    prompt, base = _incident(s)
    ranking = [("L1.H2", 1.0), ("L0.MLP", 0.8), ("L0.H1", 0.5), ("L1.MLP", 0.3), ("L1.H0", 0.2)]
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=5, max_circuit=4)
    v = confirm(s, prompt, ranking, baseline=base, reference=REFS, config=cfg)
    c = v.circuit
    assert c is not None and c.patch == "counterfactual" and c.specific
    gap = v.metric_clean - v.metric_reference
    sites = [x for m in c.members if m.role != "infrastructure" for x in m.sites]
    want = (v.metric_clean - _patched_metric(s, prompt, base, sites)) / gap
    assert c.faithfulness == pytest.approx(want, abs=1e-4)
    whole = (v.metric_clean - _patched_metric(s, prompt, base, c.specific)) / gap
    assert c.faithfulness_components == pytest.approx(whole, abs=1e-4)
    # the curve: the first k of each order, patched alone; the circuit's order puts the
    # writers first, then the rest in rank order
    specific = [e for e in v.ranked() if not e.infrastructure]
    writers = writer_ids(specific, gap, cfg)
    ours = writers + [e.id for e in specific if e.id not in writers]
    assert set(writers) <= set(c.ids("writer"))
    for row in c.curve:
        k = int(row["k"])
        if row["circuit"] is not None:
            got = (v.metric_clean - _patched_metric(s, prompt, base, ours[:k])) / gap
            assert row["circuit"] == pytest.approx(got, abs=1e-4)
        if row["attribution"] is not None:
            top = [x for x, _ in ranking][:k]
            got = (v.metric_clean - _patched_metric(s, prompt, base, top)) / gap
            assert row["attribution"] == pytest.approx(got, abs=1e-4)
    # roles follow their definitions
    ev = {e.id: e for e in v.candidates}
    largest = max(e.direct_effect for e in specific)
    need = max(cfg.writer_fraction * gap, cfg.writer_share * largest)
    for m in c.members:
        if m.role == "writer":
            assert ev[m.id].direct_effect >= need
        elif m.role in ("entry", "route"):
            assert ev[m.id].direct_effect < need
    # minimal: a member that is neither a writer nor the top cause is needed for faithfulness,
    # or is there because it carries the incident where the prompt differs from the
    # counterfactual
    top = next(e.id for e in v.ranked() if not e.infrastructure)
    assert top in c.specific
    if c.faithfulness_components is not None and c.faithfulness_components >= cfg.faithful_fraction:
        at = [f"@{p}" for p in c.entry_positions]
        for m in [x for x in c.ids("entry") + c.ids("route") if x != top]:
            rest = [x for x in c.specific if x != m]
            left = (v.metric_clean - _patched_metric(s, prompt, base, rest)) / gap
            there = (v.metric_clean - _patched_metric(s, prompt, base, [m + p for p in at])) / gap
            assert left < cfg.faithful_fraction or there >= cfg.component_fraction


def test_a_one_head_incident_is_a_one_writer_circuit() -> None:
    s = one_head_model()
    prompt, base = _incident(s)
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=3)
    ranking = [("L0.H0", 1.0), ("L1.H2", 0.5), ("L1.MLP", 0.1)]
    v = confirm(s, prompt, ranking, baseline=base, reference=REFS, config=cfg)
    assert v.circuit is not None
    assert [(m.id, m.role) for m in v.circuit.members] == [("L1.H2", "writer")]
    assert v.circuit.faithfulness == pytest.approx(1.0, abs=1e-4)
    # the attribution ranking's top 1 (an inert head) removes nothing; its top 2 all of it
    assert v.circuit.curve[0]["attribution"] == pytest.approx(0.0, abs=1e-4)
    assert v.circuit.curve[1]["attribution"] == pytest.approx(1.0, abs=1e-4)


def test_infrastructure_is_never_first_and_otherwise_keeps_its_rank() -> None:
    """The IOI pattern in SmolLM2: the layer-0 MLP is the latest robustly necessary member of
    the leading group that every prompt also needs; the head that writes the answer takes the
    first rank, and the MLP keeps the place the rule gives it (second), not the last."""
    from rca.confirm import CandidateEvidence, rank_candidates
    from rca.model.metric import share_removed

    def ev(cid: str, te: float, de: float, ne: float, ne0: float, infra: bool = False):
        return CandidateEvidence(
            cid, 0.0, te, de, ne, p_value=1.0, necessity_zero=ne0, infrastructure=infra
        )

    m_clean, m_ref = 6.1, 0.0
    gap = m_clean - m_ref

    def share(d: float) -> float:
        return share_removed(m_clean, m_ref, d, conts=2)

    cands = [
        ev("L0.MLP", te=11.6, de=0.0, ne=9.4, ne0=9.0, infra=True),
        ev("L23.H3", te=6.0, de=6.19, ne=5.5, ne0=3.0),
        ev("L12.H4", te=0.5, de=0.0, ne=0.6, ne0=0.2),
    ]
    cfg = ConfirmConfig()
    plain = [replace(e, infrastructure=False) for e in cands]
    assert [e.id for e in rank_candidates(plain, share=share, gap=gap, config=cfg)] == [
        "L0.MLP",
        "L23.H3",
        "L12.H4",
    ]
    assert [e.id for e in rank_candidates(cands, share=share, gap=gap, config=cfg)] == [
        "L23.H3",
        "L0.MLP",
        "L12.H4",
    ]


def test_an_infrastructure_origin_gives_rank_1_to_the_specific_origin_not_the_writer() -> None:
    """A head -> MLP fault in a 6-layer host (its evidence as measured): the layer-0 MLP, which
    every prompt needs, is the latest robustly necessary candidate; the planted head L0.H5 is
    the origin among the specific ones, and an unplanted L1.MLP has the largest direct effect.
    Rank 1 goes to the head: the rule applied again without the infrastructure."""
    from rca.confirm import CandidateEvidence, rank_candidates
    from rca.model.metric import share_removed

    def ev(cid: str, te: float, de: float, ne: float, ne0: float, infra: bool = False):
        return CandidateEvidence(
            cid, 0.0, te, de, ne, p_value=1.0, necessity_zero=ne0, infrastructure=infra
        )

    m_clean, m_ref = -0.05, -12.0
    gap = m_clean - m_ref

    def share(d: float) -> float:
        return share_removed(m_clean, m_ref, d, conts=1)

    cands = [
        ev("L1.MLP", te=11.54, de=5.27, ne=1.36, ne0=2.38),
        ev("L0.MLP", te=16.89, de=1.61, ne=10.07, ne0=3.78, infra=True),
        ev("L0.H5", te=18.28, de=-0.02, ne=8.78, ne0=17.36),
        ev("L5.MLP", te=2.03, de=2.03, ne=1.27, ne0=1.27),
    ]
    cfg = ConfirmConfig()
    plain = [replace(e, infrastructure=False) for e in cands]
    assert [e.id for e in rank_candidates(plain, share=share, gap=gap, config=cfg)][:2] == [
        "L0.MLP",
        "L1.MLP",
    ]
    before = [e.id for e in rank_candidates(plain, share=share, gap=gap, config=cfg)]
    got = [e.id for e in rank_candidates(cands, share=share, gap=gap, config=cfg)]
    assert got == ["L0.H5"] + [x for x in before if x != "L0.H5"]  # the rest keep their order
