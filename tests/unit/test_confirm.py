"""The confirm engine: batched ablation equals sequential hooks; p-values exact where known."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rca.confirm import (
    Ablator,
    CandidateEvidence,
    ConfirmConfig,
    ConfirmError,
    confirm,
    empirical_p_value,
    rank_candidates,
)
from rca.model.hooks import patch
from rca.model.ids import parse_id
from rca.model.metric import Target, share_removed
from rca.model.subject import Subject
from tests.helpers import tiny_model

TGT = Target((5, 6, 7, 8, 9, 10), (11, 12), (13,))
CF = Target((5, 6, 20, 8, 9, 10), (11, 12), (13,))
REFS = [(20, 21, 22, 23, 24), (30, 31, 32), (40, 41, 42, 43, 44, 45, 46, 47)]


def sequential(s: Subject, ab: Ablator, variants) -> torch.Tensor:
    """The same variants, one forward pass each, through rca.model.hooks.patch on the full model."""
    out = []
    for i, v in enumerate(variants):
        values = {}
        for cid, src in v.items():
            key, sl, _ = ab.site(cid)
            values[cid] = ab.value(key, src, i)[..., sl]
        with patch(s, values), torch.no_grad():
            out.append(float(TGT.metric(s.model(input_ids=TGT.input_ids()).logits)[0]))
    return torch.tensor(out)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2", "phi", "gpt_neox"])
@pytest.mark.parametrize("source", ["zero", "mean", "resample", "baseline"])
def test_batched_ablation_equals_sequential_hooks(model_type: str, source: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=1).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=3)
    variants = [
        {"L1.H2": source},
        {"L0.MLP": source, "L1.H0": source},
        {"L1.MLP": source},
        {"L0.H1": source, "L1.H3": source, "L1.MLP": "clean"},
        {"L0.H0": source, "L0.H1": source, "L0.H2": source},
        {},
    ]
    got = ab.run(variants)
    want = sequential(s, ab, variants)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[:-1] - ab.metric_clean).abs().max() > 1e-4  # the ablations did something
    # reuse: variants that start at layer 1 recompute only half of a 2-layer model
    assert ab.forward_equiv < len(variants)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2", "phi", "gpt_neox"])
def test_layers_held_clean_above_a_direct_effect_are_not_run(model_type: str) -> None:
    """A direct-effect variant holds every head and MLP after its component clean: those
    layers add their clean writes without running, and the metric is the full forward's."""
    s = Subject.from_model(tiny_model(model_type, seed=4, num_hidden_layers=3).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=2)
    assert ab.adapter.n_layers == 3

    def held(*layers: int) -> dict[str, str]:
        return {c: "clean" for c in ab.components if parse_id(c).layer in layers}

    variants = [
        {"L0.H1": "baseline", "L0.MLP": "clean", **held(1, 2)},  # runs layer 0 only
        {"L1.MLP": "zero", **held(2)},  # layer 1 only
        {"L0.H2": "mean", **held(2)},  # layers 0 and 1
        {"L1.H0": "resample", "L2.H1": "clean"},  # layer 2 partly held: runs
    ]
    ran: list[int] = []
    hooks = [
        s.adapter.layer(k).register_forward_hook(lambda m, a, o, _k=k: ran.append(_k))
        for k in range(3)
    ]
    try:
        got = ab.run(variants)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(ran)) == [0, 1, 2] and ran.count(2) == 1  # layer 2 ran for one only
    assert [ab.last_layer(v) for v in variants] == [0, 1, 1, 2]
    torch.testing.assert_close(got, sequential(s, ab, variants), atol=1e-5, rtol=0)
    assert (got - ab.metric_clean).abs().min() > 1e-5  # each variant did something
    assert ab.forward_equiv == pytest.approx((1 + 1 + 2 + 2) / 3)


def test_reuse_changes_nothing_but_cost() -> None:
    s = Subject.from_model(tiny_model("llama", seed=2).eval())
    variants = [{"L1.H1": "mean"}, {"L1.MLP": "zero"}, {"L0.H0": "resample"}]
    a = Ablator(s, TGT, reference=REFS, reuse=True)
    b = Ablator(s, TGT, reference=REFS, reuse=False)
    torch.testing.assert_close(a.run(variants), b.run(variants), atol=1e-6, rtol=0)
    assert a.forward_equiv == pytest.approx(2 * 0.5 + 1.0)
    assert b.forward_equiv == pytest.approx(3.0)


def test_a_variant_asked_for_again_is_answered_without_a_forward() -> None:
    """Confirm's stages repeat variants (a random set of one is a single); the repeat costs
    nothing and gives what a forward would, and resampling, whose values depend on the
    variant's index, is always run."""
    s = Subject.from_model(tiny_model("gpt2", seed=3).eval())
    first = [{"L1.H2": "mean"}, {"L0.MLP": "zero", "L1.H0": "mean"}]
    ab = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=2)
    got_first = ab.run(first)
    rows, equiv = ab.n_forward_rows, ab.forward_equiv
    # the same two (one in another key order), a repeat within the call, and a new one
    again = [
        {"L1.H0": "mean", "L0.MLP": "zero"},
        {"L1.MLP": "baseline"},
        {"L1.H2": "mean"},
        {"L1.MLP": "baseline"},
    ]
    got = ab.run(again)
    assert ab.n_forward_rows == rows + TGT.rows  # only the new variant ran, once
    assert ab.forward_equiv == pytest.approx(equiv + 0.5)
    assert ab.n_reused == 3
    fresh = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=1)
    torch.testing.assert_close(got, fresh.run(again), atol=1e-6, rtol=0)
    assert float(got[0]) == float(got_first[1]) and float(got[2]) == float(got_first[0])
    # resample: run every time, under its own index
    rows = ab.n_forward_rows
    ab.run([{"L0.H0": "resample"}, {"L0.H0": "resample"}])
    assert ab.n_forward_rows == rows + 2 * TGT.rows
    # without the memo (the benchmark's ablation table), every variant runs, repeats too
    plain = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=2, memo=False)
    torch.testing.assert_close(plain.run(again), got, atol=1e-6, rtol=0)
    assert plain.n_forward_rows == len(again) * TGT.rows and plain.n_reused == 0


def test_empirical_p_value_formula() -> None:
    assert empirical_p_value(5.0, list(range(10))) == pytest.approx((1 + 5) / 11)
    assert empirical_p_value(100.0, [1.0] * 99) == pytest.approx(1 / 100)
    assert empirical_p_value(0.0, [0.0] * 9) == 1.0
    assert empirical_p_value(1.0, []) == 1.0


def one_head_model() -> Subject:
    """A GPT-2 whose output depends on L1.H2 alone: every other head writes nothing (its slice
    of the output projection is zero) and both MLPs output exactly zero."""
    m = tiny_model("gpt2", seed=4).eval()
    a = Subject.from_model(m).adapter
    with torch.no_grad():
        for layer in range(a.n_layers):
            proj = a.attn_out(layer)
            for h in range(a.n_heads):
                if (layer, h) != (1, 2):
                    proj.weight[h * a.d_head : (h + 1) * a.d_head, :] = 0
            down = a.mlp_down(layer)
            down.weight.zero_()
            down.bias.zero_()
    return Subject.from_model(m)


def test_p_values_exact_on_a_model_with_one_causal_head() -> None:
    s = one_head_model()
    # resampling from the counterfactual alone is patching to it: L1.H2 carries the whole gap
    cfg = ConfirmConfig(kind="resample", n_random=50, top_k=3)
    ranking = [("L1.H2", 1.0), ("L0.H0", 0.5), ("L1.MLP", 0.1)]
    with torch.no_grad():
        m = [float(t.metric(s.model(input_ids=t.input_ids()).logits)[0]) for t in (TGT, CF)]
    prompt, base = (TGT, CF) if m[0] > m[1] else (CF, TGT)  # the incident is the higher one
    # the reference is the baseline's prompt + bad row: aligned at every position the metric reads
    ref = [tuple(base.input_ids()[0].tolist())]
    v = confirm(s, prompt, ranking, baseline=base, reference=ref, config=cfg)
    ev = {c.id: c for c in v.candidates}
    gap = v.metric_clean - v.metric_baseline
    assert gap > 0.01
    assert ev["L1.H2"].necessity == pytest.approx(gap, rel=1e-4)
    # every other component's ablation changes nothing (to float noise)
    assert abs(ev["L0.H0"].necessity) < 1e-5 and abs(ev["L1.MLP"].necessity) < 1e-5
    # L1.H2 against the 7 other heads, all with drop 0: p = 1 / (1 + 7)
    assert ev["L1.H2"].p_value == pytest.approx(1 / 8)
    # a useless head ties with all 6 other useless heads and loses to L1.H2: p = (1 + 7) / 8
    assert ev["L0.H0"].p_value == pytest.approx(1.0)
    # the cause set is {L1.H2}; its comparison sets are the 9 other single components
    assert v.cause_set.components == ["L1.H2"]
    assert v.cause_set.p_value == pytest.approx(1 / 10)
    assert len(v.cause_set.random_drops) == 9
    assert max(abs(d) for d in v.cause_set.random_drops) < 1e-5
    # with 9 comparison sets p can never go below 0.05: the set is inconclusive, and says why
    assert v.cause_set.verdict == "inconclusive" and "no p-value below" in v.cause_set.reason
    # sufficiency: with everything but L1.H2 ablated (all of it inert) the metric survives, to
    # float32 noise (5e-5 on a CPU whose kernels sum in another order)
    assert v.cause_set.sufficiency_fraction == pytest.approx(1.0, abs=1e-4)


def test_random_sets_are_kind_matched_and_exclude_the_set() -> None:
    import random

    from rca.confirm import random_sets

    universe = [f"L{layer}.H{h}" for layer in range(4) for h in range(8)] + [
        f"L{layer}.MLP" for layer in range(4)
    ]
    members = ["L2.H3", "L3.MLP"]
    sets, scope = random_sets(universe, members, 100, random.Random(0))  # 127 exist
    assert len(sets) == 100 and "1 heads and 1 MLPs" in scope
    for st in sets:
        assert sorted(parse_id(c).kind == "head" for c in st) == [False, True]
        assert set(st) != set(members)
    # too few kind-matched sets: fall back to every other size-matched set, exhaustively
    small, scope = random_sets(
        universe[:5] + universe[-1:], ["L0.H0", "L3.MLP"], 50, random.Random(0)
    )
    assert len(small) == math.comb(6, 2) - 1 and "all 14 other sets" in scope


def test_config_is_validated() -> None:
    with pytest.raises(ConfirmError, match="n_random"):
        ConfirmConfig(n_random=10)
    with pytest.raises(ConfirmError, match="kind"):
        ConfirmConfig(kind="gaussian")
    with pytest.raises(ConfirmError, match="necessary_fraction"):
        ConfirmConfig(necessary_fraction=1.5)


def _evidence(cid: str, te: float, de: float, ne: float, ne0: float) -> CandidateEvidence:
    return CandidateEvidence(cid, 0.0, te, de, ne, p_value=1.0, necessity_zero=ne0)


def test_robust_necessity_prefers_the_component_necessary_under_both_ablations() -> None:
    # one-continuation metric: log P(bad) from about 0 on the prompt to -16.8 on the reference
    m_clean, m_ref = -0.001, -16.8
    gap = m_clean - m_ref

    def share(drop: float) -> float:
        return share_removed(m_clean, m_ref, drop, conts=1)

    # a carrier of the trigger's identity removes the behaviour when patched or mean-ablated,
    # and more of it in log space than the origin does, but not when zero-ablated; the origin
    # removes it under both ablations; a clean late MLP has a direct effect that ablation does
    # not confirm. All three remove > 99% of P(bad): one leading group.
    carrier = _evidence("L0.MLP", te=15.7, de=0.0, ne=12.5, ne0=0.6)
    origin = _evidence("L2.H1", te=9.7, de=0.07, ne=8.1, ne0=8.3)
    writer = _evidence("L4.MLP", te=6.5, de=1.8, ne=0.7, ne0=0.03)
    ev = [carrier, writer, origin]
    assert min(share(max(e.total_effect, e.necessity)) for e in ev) > 0.99
    cfg = ConfirmConfig()

    def ranked(xs: list[CandidateEvidence]) -> list[str]:
        return [e.id for e in rank_candidates(xs, share=share, gap=gap, config=cfg)]

    # min(NE, NE0): the carrier is not necessary whatever replaces it; the origin is
    assert ranked(ev) == [origin.id, carrier.id, writer.id]
    # without zero-ablation evidence both are necessary, and the origin computes later
    assert ranked([replace(e, necessity_zero=None) for e in ev])[0] == origin.id
    # a direct effect of the whole gap makes a writer, second, even where zero-ablating the
    # whole MLP removes little (planted last-layer MLPs on the bench)
    late = _evidence("L5.MLP", te=16.0, de=16.0, ne=1.6, ne0=0.04)
    assert ranked([*ev, late])[:2] == [origin.id, late.id]


def test_patching_does_not_veto_an_enabler() -> None:
    """An enabler's output is the same on the counterfactual, so patching it there changes
    little (small TE), yet ablating it removes the behaviour: robust necessity, min(NE, NE0),
    keeps it in the necessary group. The numbers are a bench fault that a rule taking
    min(TE, NE, NE0) misses: a GPT-2 head -> MLP circuit, its planted head L1.H1 (seed 2)."""
    m_clean, m_ref = -0.023, -14.32
    gap = m_clean - m_ref

    def share(drop: float) -> float:
        return share_removed(m_clean, m_ref, drop, conts=1)

    enabler = _evidence("L1.H1", te=0.82, de=0.0, ne=9.71, ne0=2.86)
    carriers = [
        _evidence("L2.MLP", te=4.64, de=0.18, ne=2.07, ne0=2.56),
        _evidence("L1.MLP", te=11.12, de=0.5, ne=1.98, ne0=2.12),
        _evidence("L0.MLP", te=12.9, de=0.05, ne=1.45, ne0=7.24),
    ]
    ev = [*carriers, enabler]
    assert all(min(e.direct_effect, e.necessity) < 0.05 * gap for e in ev)

    got = [e.id for e in rank_candidates(ev, share=share, gap=gap, config=ConfirmConfig())]
    # a later carrier leads (the circuit's writer, L5.MLP, is not among these), and the enabler
    # stays in the necessary group, which a rule taking its small TE would drop to the end
    assert got.index(enabler.id) == 2


def _bench_order(m_clean: float, m_ref: float, ev: list[CandidateEvidence]) -> list[str]:
    def share(drop: float) -> float:
        return share_removed(m_clean, m_ref, drop, conts=1)

    cfg = ConfirmConfig()
    return [e.id for e in rank_candidates(ev, share=share, gap=m_clean - m_ref, config=cfg)]


def test_the_origin_is_the_latest_robustly_necessary_candidate() -> None:
    """Enablers that every prompt needs, and carriers of the trigger's identity, are necessary
    too, but compute before the origin, which reads them. The numbers are two bench faults
    (Llama host) that a ranking by direct effect gets wrong: a planted L0.MLP behind two layer-0
    heads that zero- and mean-ablation both expose (seed 1), a planted L3.MLP behind the layer-0
    head that carries the trigger word (seed 3)."""
    enablers = [
        _evidence("L0.MLP", te=16.32, de=0.00, ne=9.46, ne0=9.13),  # planted
        _evidence("L0.H6", te=2.75, de=-0.00, ne=16.20, ne0=15.42),
        _evidence("L4.MLP", te=3.40, de=0.56, ne=2.74, ne0=0.00),
        _evidence("L3.MLP", te=4.04, de=0.07, ne=2.31, ne0=0.67),
        _evidence("L2.MLP", te=1.24, de=0.00, ne=2.28, ne0=0.60),
        _evidence("L3.H5", te=1.24, de=0.00, ne=6.72, ne0=1.32),
        _evidence("L1.MLP", te=0.07, de=0.00, ne=3.39, ne0=0.02),
        _evidence("L0.H4", te=0.01, de=-0.00, ne=14.45, ne0=15.78),
    ]
    assert _bench_order(-0.0027, -16.27, enablers)[0] == "L0.MLP"
    carrier = [
        _evidence("L0.H0", te=16.32, de=0.00, ne=11.72, ne0=11.38),
        _evidence("L3.MLP", te=4.64, de=0.06, ne=5.99, ne0=6.75),  # planted
        _evidence("L0.H4", te=-0.00, de=-0.00, ne=7.21, ne0=1.46),
        _evidence("L0.MLP", te=16.10, de=0.00, ne=4.57, ne0=0.43),
    ]
    assert _bench_order(-0.0014, -17.32, carrier)[0] == "L3.MLP"
    # under the necessary group's bar (0.4 of the largest) the latest candidate does not lead
    low = [*carrier[:1], replace(carrier[1], necessity=4.0, necessity_zero=4.0), *carrier[2:]]
    assert _bench_order(-0.0014, -17.32, low)[0] == "L0.H0"


def test_amplifiers_with_direct_effects_do_not_outrank_the_planted_head() -> None:
    """Clean later MLPs turn a planted head's feature into the bad token, so they have the
    direct effect, but ablating them removes little of it: a ranking by direct effect puts one
    first (seed 2, Llama, a planted L3.H3). The rule puts the head first and the strongest
    writer second."""
    ev = [
        _evidence("L4.MLP", te=11.90, de=4.21, ne=4.17, ne0=0.09),
        _evidence("L3.H3", te=17.01, de=0.03, ne=18.51, ne0=17.31),  # planted
        _evidence("L0.MLP", te=17.22, de=0.00, ne=0.03, ne0=9.92),
        _evidence("L5.MLP", te=8.85, de=8.85, ne=0.84, ne0=0.01),
        _evidence("L3.MLP", te=13.63, de=0.98, ne=0.01, ne0=0.00),
    ]
    assert _bench_order(-0.0005, -18.24, ev)[:2] == ["L3.H3", "L5.MLP"]


def test_a_circuits_writer_comes_second_though_ablation_barely_touches_it() -> None:
    """A head -> MLP circuit whose planted last-layer MLP writes the bad token (DE = the whole
    gap) but is not necessary (NE0 0.04): it is the writer, second behind the origin head,
    ahead of the robustly necessary carriers (seed 1, Llama, L2.H5 + L5.MLP)."""
    ev = [
        _evidence("L5.MLP", te=16.07, de=16.07, ne=1.56, ne0=0.04),  # planted
        _evidence("L1.MLP", te=20.93, de=0.00, ne=20.69, ne0=20.72),
        _evidence("L2.H5", te=20.94, de=0.03, ne=20.58, ne0=20.18),  # planted
        _evidence("L0.H1", te=20.88, de=0.00, ne=20.55, ne0=20.88),
        _evidence("L0.MLP", te=20.99, de=0.00, ne=13.45, ne0=12.61),
        _evidence("L0.H0", te=19.32, de=0.00, ne=0.63, ne0=17.68),
    ]
    got = _bench_order(-0.0002, -21.07, ev)
    assert got[:2] == ["L2.H5", "L5.MLP"]
    # later necessary members follow latest first: carriers then in forward order, backwards
    assert got[2:5] == ["L1.MLP", "L0.MLP", "L0.H1"]


def test_parallel_blocks_have_no_order_between_attention_and_mlp() -> None:
    """In a parallel block (GPT-NeoX, Phi) the MLP does not read the heads of its own layer, so
    "latest" does not separate them: the larger direct effect does."""
    ev = [
        _evidence("L1.H0", te=9.0, de=0.8, ne=8.0, ne0=8.0),
        _evidence("L1.MLP", te=9.0, de=0.1, ne=8.0, ne0=8.0),
    ]

    def share(drop: float) -> float:
        return share_removed(0.0, -10.0, drop, conts=1)

    cfg = ConfirmConfig()
    seq = rank_candidates(ev, share=share, gap=10.0, config=cfg)
    par = rank_candidates(ev, share=share, gap=10.0, config=cfg, parallel=True)
    assert [e.id for e in seq] == ["L1.MLP", "L1.H0"]
    assert [e.id for e in par] == ["L1.H0", "L1.MLP"]


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_zero_necessity_is_the_sequential_zero_ablation(kind: str) -> None:
    s = Subject.from_model(tiny_model("llama", seed=3).eval())
    with torch.no_grad():
        m = [float(t.metric(s.model(input_ids=t.input_ids()).logits)[0]) for t in (TGT, CF)]
    prompt, base = (TGT, CF) if m[0] > m[1] else (CF, TGT)
    ranking = [("L1.H2", 1.0), ("L0.MLP", 0.8), ("L0.H1", 0.5), ("L1.MLP", 0.3)]
    cfg = ConfirmConfig(kind=kind, n_random=50, top_k=4)
    v = confirm(s, prompt, ranking, baseline=base, reference=REFS, config=cfg)
    ab = Ablator(s, prompt)
    for e in v.candidates:
        key, sl, _ = ab.site(e.id)
        with patch(s, {e.id: torch.zeros_like(ab.clean[key][..., sl])}), torch.no_grad():
            want = ab.metric_clean - float(
                prompt.metric(s.model(input_ids=prompt.input_ids()).logits)[0]
            )
        assert e.necessity_zero == pytest.approx(want, abs=1e-5)
    if kind == "zero":  # NE is a zero ablation already: no extra variants
        assert all(e.necessity_zero == e.necessity for e in v.candidates)
        assert v.cost["zero_ablation_forward_equiv"] == 0.0
    else:  # one variant per candidate, from its layer up: L1 costs half of a 2-layer model
        assert v.cost["zero_ablation_forward_equiv"] == pytest.approx(0.5 + 1 + 1 + 0.5)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "gemma2", "phi"])
def test_reference_activations_batched_equal_one_prompt_per_forward(model_type: str) -> None:
    """The reference prompts are recorded a padded batch at a time; each prompt's activations
    (and so the mean and resample values) are those of a forward pass of its own."""
    s = Subject.from_model(tiny_model(model_type, seed=3).eval())
    refs = [*REFS, (50, 51), (60, 61, 62, 63, 64, 65, 66, 67, 68, 69)]
    ab = Ablator(s, TGT, reference=refs)
    assert [next(iter(r.values())).shape[0] for r in ab.refs] == [len(r) for r in refs]
    for r, rec in zip(refs, ab.refs, strict=True):
        alone, _ = ab.record(torch.tensor([r]))
        assert set(alone) == set(rec)
        for k, v in alone.items():
            torch.testing.assert_close(rec[k], v[0], atol=1e-5, rtol=1e-4)
