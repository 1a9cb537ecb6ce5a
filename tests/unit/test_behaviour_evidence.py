"""The verdict measured on a behaviour's fit variants: every per-variant number is what
patching the component from that variant's own counterfactual really does, and the summaries
(mean, 95% interval, consistency, the circuit kept) follow from those numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rca.confirm import ConfirmConfig
from rca.confirm.behaviour import FitVariant, behaviour_evidence
from rca.model.hooks import capture, patch
from rca.model.metric import Target, evaluate, reference_point, share_removed
from rca.model.subject import Subject
from rca.stats import t_quantile
from tests.helpers import tiny_model, word_tokenizer

CAUSE = ["L1.H2", "L0.MLP"]
REFS = [" ".join(f"w{i}" for i in range(k, k + 6)) for k in range(0, 48, 6)]


def pair(s: Subject, k: int, extra: int = 0) -> tuple[Target, Target]:
    """A prompt (``extra`` tokens longer than 7) and its counterfactual (the token before the
    last four replaced), the bad continuation the token the model likes most after the prompt
    and the good one the token it likes least: the prompt's metric is above its
    counterfactual's (the two swapped where needed)."""
    prompt = (1, *range(30, 30 + extra), 5 + k, 6, 20, 8 + k, 9, 10)
    other = (*prompt[:-4], 21, *prompt[-3:])
    with torch.no_grad():
        logits = s.model(input_ids=torch.tensor([prompt])).logits[0, -1, 4:]
    bad, good = (int(logits.argmax()) + 4,), (int(logits.argmin()) + 4,)
    t, cf = Target(prompt, bad, good), Target(other, bad, good)
    if evaluate(s.model, cf).metric > evaluate(s.model, t).metric:
        t, cf = cf, t
    return t, cf


@pytest.fixture(scope="module")
def subject() -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=5), word_tokenizer())


def patched_share(s: Subject, t: Target, cf: Target, ids: list[str]) -> float:
    """The share of the gap removed by patching ``ids`` from ``cf``, computed with the hooks."""
    with torch.no_grad(), capture(s, ids) as acts:
        s.model(input_ids=cf.input_ids())
    values = {c: acts[c].clone() for c in ids}
    m_clean = evaluate(s.model, t).metric
    with torch.no_grad(), patch(s, values):
        m = evaluate(s.model, t).metric
    m_ref = reference_point(m_clean, evaluate(s.model, cf).metric, n_conts=t.n_conts)
    return share_removed(m_clean, m_ref, m_clean - m, conts=t.n_conts)


def test_each_number_is_what_patching_from_the_variant_s_counterfactual_does(subject) -> None:
    verdict = SimpleNamespace(
        cause_set=SimpleNamespace(components=CAUSE),
        circuit=SimpleNamespace(specific=["L1.H2"]),
        config=ConfirmConfig(),
    )
    variants = [FitVariant(i, *pair(subject, i)) for i in range(5)]
    ev = behaviour_evidence(subject, verdict, variants, measured=["L0.H1", "L1.N3+7"])
    assert ev.indices == list(range(5)) and ev.patch == ["counterfactual"] * 5
    by_id = {c.id: c for c in ev.components}
    assert set(by_id) == {"L1.H2", "L0.MLP", "L0.H1", "L1.N3+7"}
    cfg = ConfirmConfig()
    for j, v in enumerate(variants):
        assert v.counterfactual is not None
        assert evaluate(subject.model, v.target).metric > 0  # a gap to remove
        for c in by_id:
            want = patched_share(subject, v.target, v.counterfactual, [c])
            assert by_id[c].effects[j] == pytest.approx(want, abs=1e-4)
        whole = patched_share(subject, v.target, v.counterfactual, CAUSE)
        assert ev.set_shares[j] == pytest.approx(whole, abs=1e-4)
        for m in CAUSE:  # necessity: what the set loses without the member
            rest = patched_share(subject, v.target, v.counterfactual, [x for x in CAUSE if x != m])
            assert by_id[m].necessities[j] == pytest.approx(whole - rest, abs=1e-4)
    for c in ev.components:
        xs = c.effects
        mean = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        half = t_quantile(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
        assert c.mean == pytest.approx(mean) and c.ci == pytest.approx((mean - half, mean + half))
        carried = c.necessities if c.in_set else c.effects
        assert c.consistency == sum(x >= cfg.component_fraction for x in carried) / 5
        assert c.holds == sum(x >= cfg.component_fraction for x in xs) / 5
    assert ev.set_holds == sum(x >= cfg.set_fraction for x in ev.set_shares) / 5
    keep = by_id["L1.H2"].holds >= cfg.variant_share
    assert ev.circuit_kept == (["L1.H2"] if keep else [])


def test_a_variant_without_a_counterfactual_is_ablated_to_the_reference_means(subject) -> None:
    from rca.model.hooks import ablate, mean_activations

    verdict = SimpleNamespace(
        cause_set=SimpleNamespace(components=["L1.H2"]), circuit=None, config=ConfirmConfig()
    )
    t, _ = pair(subject, 2)
    ev = behaviour_evidence(subject, verdict, [FitVariant(7, t, None)], reference=REFS)
    assert ev.patch == ["mean"]
    means = mean_activations(subject, REFS, ["L1.H2"])
    m_clean = evaluate(subject.model, t).metric
    with torch.no_grad(), ablate(subject, ["L1.H2"], kind="mean", means=means):
        m = evaluate(subject.model, t).metric
    everything = [f"L{x}.H{h}" for x in range(2) for h in range(4)] + ["L0.MLP", "L1.MLP"]
    with torch.no_grad(), ablate(subject, everything, kind="mean", means=mean_activations(
            subject, REFS, everything)):  # fmt: skip
        m_all = evaluate(subject.model, t).metric
    want = share_removed(m_clean, m_all, m_clean - m, conts=t.n_conts)
    assert ev.components[0].effects[0] == pytest.approx(want, abs=1e-4)
    with pytest.raises(Exception, match="reference"):
        behaviour_evidence(subject, verdict, [FitVariant(7, t, None)])


def test_variants_of_different_lengths_sharing_passes_measure_what_each_alone_does(
    subject, monkeypatch
) -> None:
    """The variants' experiments share forward passes, right-padded to the longest: the
    evidence is what each variant measured on its own gives, and what the hooks give."""
    import rca.confirm.behaviour as behaviour

    verdict = SimpleNamespace(
        cause_set=SimpleNamespace(components=CAUSE), circuit=None, config=ConfirmConfig()
    )
    variants = []
    for k in range(4):
        t, cf = pair(subject, k, extra=3 * k)
        variants.append(FitVariant(k, t, cf if k != 2 else None))
    kw = {"reference": REFS, "measured": ["L0.H1"]}
    shared = behaviour_evidence(subject, verdict, variants, **kw)
    monkeypatch.setattr(behaviour, "RECORDINGS_BUDGET", 1)  # one variant at a time
    alone = behaviour_evidence(subject, verdict, variants, **kw)
    assert shared.patch == ["counterfactual", "counterfactual", "mean", "counterfactual"]
    assert all(g > 0 for g in shared.gaps)  # every variant shows the incident
    for a, b in zip(shared.components, alone.components, strict=True):
        assert a.effects == pytest.approx(b.effects, abs=1e-5)
    assert shared.set_shares == pytest.approx(alone.set_shares, abs=1e-5)
    for j in (0, 3):  # the shortest and the longest, by the hooks
        v = variants[j]
        assert v.counterfactual is not None
        want = patched_share(subject, v.target, v.counterfactual, CAUSE)
        assert shared.set_shares[j] == pytest.approx(want, abs=1e-4)
