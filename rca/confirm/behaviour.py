"""Behaviour-level evidence: the verdict found on the incident prompt, measured on the fit set.

A case with variants states a behaviour. Confirm finds the cause set and the circuit on the
incident prompt; ``behaviour_evidence`` then asks whether they carry the incident on every fit
variant too. On each fit variant (never a held-out one) it patches, from that variant's own
counterfactual where one lines up with it (else the mean over the reference prompts):

- each measured component alone: the share of the variant's gap it removes (its total effect,
  in probability: ``rca.model.metric.share_removed``, as confirm reads shares of the gap);
- the cause set: the share of the gap it removes, and the set without each member (how much
  that member carries within the set: its necessity on the variant);
- the circuit's specific members together: its faithfulness on the variant.

Per component that gives a mean and a 95% interval over the variants (Student's t), and two
shares of the variants: on how many it *holds*, removing at least ``component_fraction`` of the
gap patched alone, and on how many it is *necessary* (its consistency), carrying at least that
share within the set, as confirm requires of a member (for a component outside the set, the
same as holding). A circuit member is kept in the behaviour's circuit where it holds on at
least ``variant_share`` of the fit variants: a member's role is what it carries, and the
members of a redundant circuit (several heads that each copy the answer) hold everywhere while
none of them alone is necessary.

**The behaviour's cause set.** Where the prompt's cause set holds (removes ``set_fraction`` of
the gap) on at least ``variant_share`` of the fit variants that show the incident, it is the
behaviour's. Where it does not, the set is chosen on the fit set: the measured components that
ordinary text does not need (benign damage, as confirm measures it), in order of their mean
share over the fit variants, and the shortest prefix of that order that holds on
``variant_share`` of them (at most ``max_set`` members). Where no prefix holds, the one that
holds on the most variants is reported, marked as not holding. Every choice reads fit variants
only.

Each variant has an ``Ablator`` of its own, without reference recordings: the mean values,
which do not depend on the prompt, are recorded once over the reference prompts, and only where
a variant has no counterfactual that lines up. The variants' experiments run together
(``rca.confirm.engine.run_stacked``): the variants share forward passes, right-padded to the
longest, as many variants' recordings at once as ``RECORDINGS_BUDGET`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rca.benign import benign_prompts
from rca.confirm.engine import Ablator, Variant, run_stacked
from rca.confirm.evidence import ConfirmConfig, ConfirmError, Verdict
from rca.model.ids import parse_id
from rca.model.metric import Target, reference_point, share_removed
from rca.model.subject import Subject
from rca.specificity import benign_damage
from rca.stats import t_quantile

__all__ = [
    "BehaviourCauseSet",
    "BehaviourEvidence",
    "ComponentOnVariants",
    "FitVariant",
    "behaviour_evidence",
]

NEURON_KINDS = ("neuron", "neurons")  # one MLP neuron (L3.N5), a group of them (L3.N5+17)
# the variants' clean and counterfactual recordings held at once while their experiments share
# passes; a variant's are about 2 * layers * positions * 3 d_model floats (25 MB for SmolLM2-135M
# at 60 tokens)
RECORDINGS_BUDGET = 512 << 20


@dataclass(frozen=True)
class FitVariant:
    """A fit variant: its index, its target, and its counterfactual where it lines up."""

    index: int
    target: Target
    counterfactual: Target | None = None


@dataclass
class ComponentOnVariants:
    """One component over the fit variants: the share of each variant's gap it removes patched
    alone (``effects``), and, for a cause-set member, the share the set loses without it
    (``necessities``); their mean and 95% interval; its consistency."""

    id: str
    in_set: bool
    effects: list[float]
    necessities: list[float] | None
    mean: float
    ci: tuple[float, float]
    consistency: float  # share of variants on which it is necessary
    holds: float  # share of variants on which it removes component_fraction of the gap alone


@dataclass
class BehaviourCauseSet:
    """The behaviour's cause set: taken from the prompt's verdict or chosen on the fit set
    (``source``: ``prompt`` or ``fit set``); per shown fit variant, the share of its gap it
    removes (``shares``, in ``indices`` order); the share of them on which it holds; whether
    that reaches ``variant_share``; and the prefixes tried, with the share each holds on."""

    components: list[str]
    source: str
    indices: list[int]
    shares: list[float]
    holds: float
    holds_on_fit_set: bool
    tried: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # infrastructure: never in the set


@dataclass
class BehaviourEvidence:
    """The verdict on the fit set (``to_json`` for the run's summary)."""

    n_fit: int
    indices: list[int]  # the fit variants' indices, in the order of every list below
    patch: list[str]  # per variant: "counterfactual" or "mean"
    gaps: list[float]  # per variant: its metric minus its reference point
    set_shares: list[float]  # per variant: the share of its gap the cause set removes
    set_holds: float  # share of variants where the set removes set_fraction of the gap
    circuit_shares: list[float] | None  # the circuit's specific members, patched together
    components: list[ComponentOnVariants] = field(default_factory=list)
    circuit_kept: list[str] = field(default_factory=list)
    circuit_dropped: list[str] = field(default_factory=list)
    variant_share: float = 0.8
    forward_equiv: float = 0.0
    cause_set: BehaviourCauseSet | None = None
    # the trace over the fit set (rca.trace.fitset.FitSetScores.to_json), where one ran
    attribution: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _interval(xs: Sequence[float]) -> tuple[float, float]:
    """The 95% interval of the mean of ``xs`` (Student's t); the mean twice for one value."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def behaviour_evidence(
    subject: Subject,
    verdict: Verdict,
    variants: Sequence[FitVariant],
    *,
    reference: Sequence[str] = (),
    config: ConfirmConfig | None = None,
    measured: Sequence[str] = (),
) -> BehaviourEvidence:
    """The verdict's components measured on each fit variant; see the module docstring.

    ``measured``: the components to measure beside the cause set and the circuit's members
    (the leading candidates); ``reference``: the reference prompts whose means a variant
    without a counterfactual that lines up is ablated to."""
    cfg = config or verdict.config
    if not variants:
        raise ConfirmError("behaviour evidence needs at least one fit variant")
    cause = list(verdict.cause_set.components)
    circuit = [] if verdict.circuit is None else verdict.circuit.specific
    ids = [
        c
        for c in dict.fromkeys([*cause, *circuit, *measured])
        if parse_id(c).kind in ("head", "mlp", *NEURON_KINDS) and parse_id(c).pos is None
    ]
    neuron_layers = {parse_id(c).layer for c in ids if parse_id(c).kind in NEURON_KINDS}
    means: dict[str, torch.Tensor] | None = None
    if any(v.counterfactual is None for v in variants):
        if not reference:
            raise ConfirmError(
                "a variant has no counterfactual that lines up, and there are no reference "
                "prompts to ablate to their means"
            )
        ref = Ablator(subject, variants[0].target, reference=reference, batch_size=cfg.batch_size)
        ref.record_neurons(x for x in neuron_layers if x is not None)
        assert ref.means is not None
        means = ref.means
    effects: dict[str, list[float]] = {c: [] for c in ids}
    necessities: dict[str, list[float]] = {c: [] for c in cause}
    out = BehaviourEvidence(
        n_fit=len(variants),
        indices=[],
        patch=[],
        gaps=[],
        set_shares=[],
        set_holds=0.0,
        circuit_shares=[] if circuit else None,
        variant_share=cfg.variant_share,
    )
    runs: list[Variant] = [{c: ""} for c in ids]  # each variant patches from its own source
    runs.append(dict.fromkeys(cause, ""))
    runs += [{c: "" for c in cause if c != m} for m in cause]
    if circuit:
        runs.append(dict.fromkeys(circuit, ""))
    for v, m in zip(
        variants, _measured(subject, variants, cfg, means, neuron_layers, runs), strict=True
    ):
        gap = m.clean - m.ref
        out.indices.append(v.index)
        out.patch.append("counterfactual" if m.source == "baseline" else "mean")
        out.gaps.append(gap)
        share = [
            share_removed(m.clean, m.ref, m.clean - x, conts=v.target.n_conts) if gap > 0 else 0.0
            for x in m.values
        ]
        for c, sh in zip(ids, share, strict=False):
            effects[c].append(sh)
        k = len(ids)
        set_share = share[k] if cause else 0.0
        out.set_shares.append(set_share)
        for j, c in enumerate(cause):
            necessities[c].append(set_share - share[k + 1 + j])
        if circuit:
            assert out.circuit_shares is not None
            out.circuit_shares.append(share[-1])
        out.forward_equiv += m.forward_equiv
    n = len(variants)
    out.set_holds = _holds(out.set_shares, cfg)
    for c in ids:
        nec = necessities.get(c)
        carried = nec if nec is not None else effects[c]
        out.components.append(
            ComponentOnVariants(
                id=c,
                in_set=c in cause,
                effects=effects[c],
                necessities=nec,
                mean=sum(effects[c]) / n,
                ci=_interval(effects[c]),
                consistency=sum(x >= cfg.component_fraction for x in carried) / n,
                holds=sum(x >= cfg.component_fraction for x in effects[c]) / n,
            )
        )
    by_id = {x.id: x for x in out.components}
    out.circuit_kept = [c for c in circuit if by_id[c].holds >= cfg.variant_share]
    out.circuit_dropped = [c for c in circuit if c not in out.circuit_kept]
    out.cause_set = _cause_set(
        subject, verdict, variants, out, cfg, means, neuron_layers, reference=reference
    )
    return out


@dataclass
class _Measured:
    """One variant's experiments: what it patches from (``baseline``: its counterfactual, or
    ``mean``), its metric and reference point, the metric under each run, and their cost."""

    source: str
    clean: float
    ref: float
    values: list[float]
    forward_equiv: float


def _ablator(
    subject: Subject,
    v: FitVariant,
    cfg: ConfirmConfig,
    means: dict[str, torch.Tensor] | None,
    neuron_layers: set[int | None],
) -> Ablator:
    ab = Ablator(subject, v.target, baseline=v.counterfactual, batch_size=cfg.batch_size)
    ab.record_neurons(x for x in neuron_layers if x is not None)
    if v.counterfactual is None:
        assert means is not None
        ab.means = dict(means)
    return ab


def _recorded_bytes(ab: Ablator) -> int:
    tensors = [*ab.clean.values(), *ab.layer_out, *(ab.base or {}).values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _measured(
    subject: Subject,
    variants: Sequence[FitVariant],
    cfg: ConfirmConfig,
    means: dict[str, torch.Tensor] | None,
    neuron_layers: set[int | None],
    runs: Sequence[Variant],
) -> list[_Measured]:
    """``runs`` (their components; the source is each variant's) on every variant, the
    variants' experiments sharing passes: as many variants at a time as ``RECORDINGS_BUDGET``
    holds the recordings of."""
    out: list[_Measured] = []
    todo = list(variants)
    while todo:
        group = [_ablator(subject, todo[0], cfg, means, neuron_layers)]
        fits = max(1, RECORDINGS_BUDGET // max(1, _recorded_bytes(group[0])))
        group += [_ablator(subject, v, cfg, means, neuron_layers) for v in todo[1:fits]]
        jobs: list[tuple[Ablator, list[Variant]]] = []
        for v, ab in zip(todo, group, strict=False):
            src = "baseline" if v.counterfactual is not None else "mean"
            own = [dict.fromkeys(r, src) for r in runs]
            if v.counterfactual is None:  # its reference point: every component at its mean
                own.insert(0, dict.fromkeys(ab.components, "mean"))
            jobs.append((ab, own))
        got = run_stacked(jobs, batch_size=cfg.batch_size)
        for v, ab, vals in zip(todo, group, got, strict=False):
            values = vals.tolist()
            if v.counterfactual is not None:
                assert ab.metric_baseline is not None
                ref = reference_point(ab.metric_clean, ab.metric_baseline, n_conts=v.target.n_conts)
                out.append(_Measured("baseline", ab.metric_clean, ref, values, ab.forward_equiv))
            else:
                out.append(
                    _Measured("mean", ab.metric_clean, values[0], values[1:], ab.forward_equiv)
                )
        todo = todo[len(group) :]
    return out


def _holds(shares: Sequence[float], cfg: ConfirmConfig) -> float:
    return sum(x >= cfg.set_fraction for x in shares) / len(shares) if shares else 0.0


def _cause_set(
    subject: Subject,
    verdict: Verdict,
    variants: Sequence[FitVariant],
    ev: BehaviourEvidence,
    cfg: ConfirmConfig,
    means: dict[str, torch.Tensor] | None,
    neuron_layers: set[int | None],
    *,
    reference: Sequence[str],
) -> BehaviourCauseSet:
    """The behaviour's cause set; see the module docstring."""
    shown = [j for j, g in enumerate(ev.gaps) if g > 0]
    idx = [ev.indices[j] for j in shown]
    cause = list(verdict.cause_set.components)
    prompt_shares = [ev.set_shares[j] for j in shown]
    prompt_holds = _holds(prompt_shares, cfg)
    tried: list[dict[str, Any]] = [{"components": cause, "holds": prompt_holds}] if cause else []
    if cause and prompt_holds >= cfg.variant_share:
        return BehaviourCauseSet(cause, "prompt", idx, prompt_shares, prompt_holds, True, tried)
    # what ordinary text needs is never in the set: confirm's measurement where it made one
    infra = {c.id: c.infrastructure for c in getattr(verdict, "candidates", ())}
    ids = [c.id for c in ev.components]
    unknown = [c for c in ids if c not in infra]
    if unknown:
        texts = list(reference)[: cfg.benign_prompts] or benign_prompts(
            cfg.benign_prompts, seed=cfg.seed
        )
        infra |= {c: d.infrastructure for c, d in benign_damage(subject, unknown, texts).items()}
    excluded = [c for c in ids if infra.get(c, False)]
    by_id = {x.id: x for x in ev.components}
    order = sorted(
        (c for c in ids if c not in excluded and by_id[c].mean > 0), key=lambda c: -by_id[c].mean
    )[: cfg.max_set]
    prefixes = [order[:k] for k in range(1, len(order) + 1)]
    if not prefixes or not shown:
        return BehaviourCauseSet([], "fit set", idx, [], 0.0, False, tried, excluded)
    per: list[list[float]] = [[] for _ in prefixes]
    pv = [variants[j] for j in shown]
    runs = [dict.fromkeys(p, "") for p in prefixes]
    for v, m in zip(pv, _measured(subject, pv, cfg, means, neuron_layers, runs), strict=True):
        for k, x in enumerate(m.values):
            per[k].append(share_removed(m.clean, m.ref, m.clean - x, conts=v.target.n_conts))
        ev.forward_equiv += m.forward_equiv
    holds = [_holds(x, cfg) for x in per]
    tried += [{"components": p, "holds": h} for p, h in zip(prefixes, holds, strict=True)]
    best = next((k for k, h in enumerate(holds) if h >= cfg.variant_share), None)
    ok = best is not None
    if best is None:
        best = max(range(len(holds)), key=lambda k: (holds[k], -k))
    return BehaviourCauseSet(
        prefixes[best], "fit set", idx, per[best], holds[best], ok, tried, excluded
    )
