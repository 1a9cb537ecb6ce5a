"""Attribution over a behaviour's fit set: which heads and MLPs the incident runs through on
every fit variant, not on the incident prompt alone.

``fit_set_scores`` scores every head and MLP on each fit variant with attribution patching
(nodes only: a clean forward and backward and a baseline forward, the cost of 4 forwards per
variant; ``score_nodes_batched`` runs many variants in each pass, as many as the memory budget
allows), patched to the variant's own counterfactual where it lines up, else to the mean over
the reference prompts. A variant's scores are divided by its own gap (metric minus the
baseline's metric), so each is a share of that variant's effect and every variant weighs the
same; the fit set's score of a component is the mean of those shares, the incident prompt's
own trace counted as one more member. Confirm's candidates on a behaviour are the prompt's
leading components and the fit set's (``rca.confirm.behaviour``), so a component the prompt
under-ranks but the behaviour runs through is still measured exactly on every fit variant.

A variant on which the model does not show the incident (gap <= 0) has no effect to share out
and is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.components import (
    Baseline,
    ComponentScores,
    score_components,
    score_nodes_batched,
)

__all__ = ["NODE_FORWARD_EQUIV", "FitSetScores", "fit_set_scores", "gap_shares", "node_scores"]


@dataclass
class FitSetScores:
    """Per-component mean share of the gap over the fit set (``mean``, node order ``nodes``),
    the variants scored (``indices``; -1 is the incident prompt) and their gaps."""

    nodes: list[str]
    mean: list[float]
    indices: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # no gap: the model does not show it
    forward_equiv: float = 0.0
    passes: int = 0  # forward and backward passes: variants share them (``score_nodes_batched``)

    def ranked(self) -> list[tuple[str, float]]:
        """(id, mean share) by decreasing |mean share|, EMB left out."""
        pairs = [(n, s) for n, s in zip(self.nodes, self.mean, strict=True) if n != "EMB"]
        return sorted(pairs, key=lambda p: -abs(p[1]))

    def top(self, k: int) -> list[str]:
        return [n for n, _ in self.ranked()[:k]]

    def to_json(self, *, top_k: int = 20) -> dict[str, Any]:
        return {
            "n": len(self.indices),
            "skipped": self.skipped,
            "forward_equiv": self.forward_equiv,
            "passes": self.passes,
            "top": [{"id": n, "mean_share": s} for n, s in self.ranked()[:top_k]],
        }


def gap_shares(scores: ComponentScores) -> torch.Tensor | None:
    """Each node's score as a share of the prompt's gap (its metric minus the baseline's), or
    None where there is no gap to share out."""
    gap = scores.metric_clean - scores.metric_baseline
    return scores.scores.double() / gap if gap > 0 else None


def node_scores(subject: Subject, target: Target, baseline: Baseline) -> ComponentScores:
    """Every head's and MLP's attribution-patching score, nodes only: a clean forward and
    backward and the baseline's forward (``NODE_FORWARD_EQUIV``)."""
    return score_components(subject, target, baseline, method="atp", edges=False)


NODE_FORWARD_EQUIV = 4.0  # a forward and backward (3 forwards) and the baseline's forward


def fit_set_scores(
    subject: Subject,
    variants: Sequence[tuple[int, Target, Target | None]],
    *,
    means: dict[str, torch.Tensor] | None = None,
    prompt_scores: ComponentScores | None = None,
    max_memory: int | str | None = "auto",
) -> FitSetScores:
    """Score every head and MLP on each ``(index, target, counterfactual or None)`` fit
    variant; see the module docstring. ``means``: site means over the reference prompts
    (``site_means``), needed where a variant has no counterfactual that lines up;
    ``prompt_scores``: the incident prompt's own trace, counted as one member;
    ``max_memory``: the budget that sets how many variants share a pass."""
    rows: list[torch.Tensor] = []
    out = FitSetScores(nodes=[], mean=[])
    if prompt_scores is not None:
        share = gap_shares(prompt_scores)
        if share is not None:
            rows.append(share)
            out.nodes = list(prompt_scores.nodes)
            out.indices.append(-1)
            out.gaps.append(prompt_scores.metric_clean - prompt_scores.metric_baseline)
    items: list[tuple[Target, Baseline]] = []
    for index, target, cf in variants:
        if cf is not None:
            base = Baseline("counterfactual", "the variant's counterfactual", target=cf)
        elif means is not None:
            base = Baseline("mean", "mean over the reference prompts", means=means)
        else:
            raise ValueError(
                f"variant {index} has no counterfactual that lines up and no means were given"
            )
        items.append((target, base))
    batched = score_nodes_batched(subject, items, max_memory=max_memory) if items else []
    out.passes = len({sc.cost["pass"] for sc in batched})
    for (index, _, _), scores in zip(variants, batched, strict=True):
        out.forward_equiv += NODE_FORWARD_EQUIV
        share = gap_shares(scores)
        if share is None:
            out.skipped.append(index)
            continue
        if not out.nodes:
            out.nodes = list(scores.nodes)
        rows.append(share)
        out.indices.append(index)
        out.gaps.append(scores.metric_clean - scores.metric_baseline)
    if rows:
        out.mean = torch.stack(rows).mean(0).tolist()
    else:
        out.mean = [0.0] * len(out.nodes)
    return out
