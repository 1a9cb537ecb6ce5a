"""Specific neurons: an infrastructure MLP resolved to the few neurons that carry its effect on
the incident (docs/confirm.md, "Specific neurons").

An MLP that ordinary text needs is never blamed; where a small group of its neurons carries its
effect on the incident both ways (patched alone, and ablated alone) and ordinary text does not
need that group, the group stands in for it as a candidate of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rca.confirm.engine import OFFSET_NEURONS, Ablator
from rca.confirm.evidence import CandidateEvidence, ConfirmConfig
from rca.model.ids import neuron_group, parse_id
from rca.model.subject import Subject
from rca.specificity import BenignRun, Damage, benign_damage

__all__ = ["NeuronGroup", "group_damage", "specific_neurons"]


@dataclass(frozen=True)
class NeuronGroup:
    """An infrastructure MLP's neurons that carry its effect on the incident."""

    parent: str  # the MLP, infrastructure as a whole
    attribution: float  # the neurons' summed attribution in the trace
    effect: float  # metric drop when they alone are patched as the MLP was for its TE
    damage: Damage  # what mean-ablating them alone does to ordinary text

    def describe(self, share: Callable[[float], float], parent: CandidateEvidence) -> str:
        return (
            f"neurons of {self.parent}, which is infrastructure as a whole (benign loss "
            f"{parent.benign_loss_pct or 0.0:+.0f}%); patched alone they remove "
            f"{share(self.effect):.0%} of the bad behaviour, the whole MLP "
            f"{share(parent.total_effect):.0%}, and mean-ablating them changes the benign loss "
            f"by {self.damage.loss_change_pct:+.1f}%"
        )


def group_damage(
    subject: Subject,
    groups: Sequence[str],
    texts: Any,
    run: BenignRun,
    whole: Mapping[int, str],
) -> dict[str, Damage]:
    """The benign damage of MLP neuron groups, from ``run``'s means of their MLPs' neurons
    (``whole``: layer -> the id of all its neurons)."""
    for g in groups:
        c = parse_id(g)
        assert c.layer is not None
        run.means[g] = run.means[whole[c.layer]][list(c.neurons)]
    return benign_damage(subject, list(groups), texts, run=run)


def specific_neurons(
    ab: Ablator,
    evidence: Sequence[CandidateEvidence],
    neuron_scores: Mapping[str, float],
    *,
    src: str,
    ablation: str,
    m_clean: float,
    share: Callable[[float], float],
    cfg: ConfirmConfig,
    damage_of: Callable[[list[str]], Mapping[str, Damage]],
) -> dict[str, NeuronGroup]:
    """The neuron groups that stand in for infrastructure MLPs (docs/confirm.md, "Specific
    neurons"), by group id.

    For each infrastructure MLP whose patch (to ``src``) removes at least
    ``component_fraction`` of the bad behaviour: its neurons by their positive attribution in
    the trace (``neuron_scores``), best first; the smallest group of the first 1, 2, 4, ...
    ``max_neurons`` that carries the MLP's effect both ways: patched alone, it removes at least
    ``neuron_fraction`` of the share the whole MLP's patch removes, and ablated alone (by
    ``ablation`` and by zero, the smaller), at least ``neuron_fraction`` of its own patch's
    (a part that others back up is not the mechanism). The group stands in for the MLP where
    mean-ablating it alone on ordinary text does not make it infrastructure."""
    sizes = [1 << i for i in range(cfg.max_neurons.bit_length()) if 1 << i <= cfg.max_neurons]
    tried: list[tuple[CandidateEvidence, str, float]] = []
    for e in evidence:
        c = parse_id(e.id)
        if (
            not e.infrastructure
            or c.kind != "mlp"
            or share(e.total_effect) < cfg.component_fraction
        ):
            continue
        assert c.layer is not None
        best = sorted(
            (
                (v, n.neurons[0])
                for k, v in neuron_scores.items()
                if v > 0 and (n := parse_id(k)).kind == "neuron" and n.layer == c.layer
            ),
            key=lambda t: (-t[0], t[1]),
        )[: cfg.max_neurons]
        for k in sizes:
            if k <= len(best):
                top = best[:k]
                tried.append(
                    (e, neuron_group(c.layer, [n for _, n in top]), sum(v for v, _ in top))
                )
    if not tried:
        return {}
    ab.record_neurons({parse_id(g).layer or 0 for _, g, _ in tried})
    ways = [src, ablation, "zero"]
    vals = ab.run([{g: w} for _, g, _ in tried for w in ways], index_offset=OFFSET_NEURONS)
    chosen: dict[str, tuple[str, float, float]] = {}  # MLP -> (group, attribution, effect)
    for i, (e, g, a) in enumerate(tried):
        drop, ne, ne0 = (m_clean - float(v) for v in vals[3 * i : 3 * i + 3])
        carries = share(drop) >= cfg.neuron_fraction * share(e.total_effect)
        needed = share(min(ne, ne0)) >= cfg.neuron_fraction * share(drop)
        if e.id not in chosen and carries and needed:
            chosen[e.id] = (g, a, drop)
    if not chosen:
        return {}
    damage = damage_of([g for g, _, _ in chosen.values()])
    return {
        g: NeuronGroup(mlp, a, drop, damage[g])
        for mlp, (g, a, drop) in chosen.items()
        if not damage[g].infrastructure
    }
