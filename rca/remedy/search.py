"""The search for a fix: every fix kind tried on a cause set, measured, and one recommended.

Each fix is measured on the incident (metric and P(bad) before and after) and on the reference
(benign) prompts: the mean KL divergence of the next-token distributions, original against
fixed, and the change of the mean language-model loss. Of the fixes that bring P(bad) under
``p_bad_target`` while raising the benign loss by under ``max_loss_pct``, the cheapest is marked
``recommended``; when none does both, the best trade-off is, and its note says so. A fix that
does not lower P(bad) is never recommended (``recommend``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rca.model.ids import ComponentId, format_id, parse_id
from rca.model.metric import MetricValue, Target, evaluate
from rca.model.subject import Subject
from rca.remedy.ablation import MeanAblation, MeanAblationTop, TargetedAblation
from rca.remedy.direction_removal import DirectionRemoval, residual_directions
from rca.remedy.edit import WeightEdit, weight_edit, weight_edit_prompts
from rca.remedy.fix import Fix, RemedyError, fix_from_spec, pack
from rca.remedy.write_direction_removal import WriteDirectionRemoval, write_directions
from rca.specificity import BenignError, BenignRun

__all__ = ["Remedy", "benign_side_effect", "recommend", "try_remedies"]


@dataclass
class Remedy:
    """One fix tried on an incident: its effect, its side effect, its patch spec and note."""

    kind: str
    components: list[str]
    metric_before: float
    metric_after: float
    p_bad_before: float
    p_bad_after: float
    side_effect: dict[str, float]
    patch_spec: dict[str, Any]
    recommended: bool = False
    note: str = ""
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def benign_side_effect(
    subject: Subject, prompts: Sequence[str], spec: Mapping[str, Any], *, batch: int = 32
) -> dict[str, float]:
    """Mean KL(original || fixed) per next-token position, and the loss change, on ``prompts``."""
    fix = fix_from_spec(spec)
    bench = BenignRun(subject, prompts, batch=batch, keep=[fix.first_layer])
    return bench.side_effect(lambda: fix.context(subject), fix.first_layer)


def evaluate_with(subject: Subject, target: Target, fix: Fix) -> MetricValue:
    """The incident's metric and P(bad) with ``fix`` applied."""
    with fix.context(subject):
        return evaluate(subject.model, target)


def try_remedies(
    subject: Subject,
    target: Target,
    cause_set: Sequence[str],
    *,
    counterfactual: Target | None,
    reference: Sequence[str],
    top_cause: str | None = None,
    p_bad_target: float = 0.2,
    bad_text: str = "",
    neuron_scores: dict[str, float] | None = None,
    max_loss_pct: float = 5.0,
    edit_prompts: Sequence[str] = (),
    batch: int = 32,
    grad_batch: int = 32,
) -> list[Remedy]:
    """Try each fix for ``cause_set`` and rank them; see the module docstring.

    Memory bounds: ``batch`` benign prompts per forward when measuring side effects,
    ``grad_batch`` edit prompts per forward and backward in the weight edit.
    """
    if not cause_set:
        raise RemedyError("no cause set to remedy")
    if not reference:
        raise RemedyError("side effects need reference prompts")
    # an MLP's neurons in the cause set (an infrastructure MLP resolved to them) are fixed
    # through their MLP, and first of all by ablating those neurons alone
    parsed = [parse_id(c) for c in cause_set]
    group = [format_id(ComponentId("neuron", c.layer, n)) for c in parsed for n in c.neurons]
    comps = list(
        dict.fromkeys(
            cid if c.kind in ("head", "mlp") else format_id(ComponentId("mlp", c.layer))
            for cid, c in zip(cause_set, parsed, strict=True)
            if c.kind in ("head", "mlp") or c.neurons
        )
    )
    if not comps:
        raise RemedyError("the cause set holds no heads, MLPs or MLP neurons")
    before = evaluate(subject.model, target)
    top = top_cause if top_cause in comps else comps[0]
    mlp_layers = {parse_id(c).layer for c in comps if parse_id(c).kind == "mlp"}
    heads = [c for c in comps if parse_id(c).kind == "head"]
    # the neurons that push hardest toward the bad continuation; a targeted ablation takes at
    # most the first 32
    ranked_neurons = list(
        dict.fromkeys(
            group
            + sorted(
                (
                    n
                    for n, v in (neuron_scores or {}).items()
                    if parse_id(n).layer in mlp_layers and v > 0
                ),
                key=lambda n: -(neuron_scores or {})[n],
            )
        )
    )[:32]
    # the weight edit first: its memory is freed before the benign run keeps its own
    held = [p for p in edit_prompts if p not in set(reference)]
    deltas = (
        weight_edit(subject, target, comps, held[:64], p_bad_target=p_bad_target, batch=grad_batch)
        if held
        else None
    )
    # one run over the benign prompts without a fix: the means the ablations hold sites at,
    # and the residual stream below each layer a fix may start at
    try:
        bench = BenignRun(
            subject,
            reference,
            batch=batch,
            sites=[*comps, *ranked_neurons],
            keep={parse_id(c).layer or 0 for c in comps},  # every fix below starts at one
        )
    except BenignError as e:
        raise RemedyError(str(e)) from None
    made_for = subject.fingerprint
    means = {c: bench.means[c] for c in comps}
    fixes: list[Fix] = [
        MeanAblation(
            components=tuple(comps),
            model_fingerprint=made_for,
            values={k: v.tolist() for k, v in means.items()},
        )
    ]
    if len(comps) > 1:
        fixes.append(
            MeanAblationTop(
                components=(top,), model_fingerprint=made_for, values={top: means[top].tolist()}
            )
        )
    if ranked_neurons:
        n_means = {n: bench.means[n] for n in ranked_neurons}
        for k in (2, 4, 8, 16, 32):
            chosen = ranked_neurons[:k]
            trial = TargetedAblation(
                components=(*heads, *chosen),
                model_fingerprint=made_for,
                values={
                    **{h: means[h].tolist() for h in heads},
                    **{n: n_means[n].tolist() for n in chosen},
                },
            )
            if evaluate_with(subject, target, trial).p_bad < p_bad_target:
                break
            if len(chosen) == len(ranked_neurons):
                break
        fixes.append(trial)
    if counterfactual is not None and subject.adapter.model_type != "gemma2":
        wd = write_directions(subject, target, counterfactual, comps)
        if wd:
            fixes.append(
                WriteDirectionRemoval(
                    components=tuple(wd), model_fingerprint=made_for, directions=wd
                )
            )
        # every layer up to the deepest of the set (the direction may be cleanest below it),
        # at most 8: the set's own layers first, then the lowest ones
        deepest = max(parse_id(c).layer or 0 for c in comps)
        own = sorted({parse_id(c).layer or 0 for c in comps})
        layers = sorted(
            {*own, *[x for x in range(deepest + 1) if x not in own][: max(0, 8 - len(own))]}
        )
        for layer, direction in residual_directions(
            subject, target, counterfactual, layers
        ).items():
            fixes.append(
                DirectionRemoval(
                    components=(format_id(ComponentId("resid_post", layer)),),
                    model_fingerprint=made_for,
                    layer=layer,
                    direction=direction.tolist(),
                )
            )
    if deltas is not None:
        fixes.append(
            WeightEdit(
                components=tuple(comps),
                model_fingerprint=made_for,
                deltas={k: pack(v) for k, v in deltas.items()},
                edit_prompts=weight_edit_prompts(subject, held[:64]),
            )
        )
    out: list[Remedy] = []
    for fix in fixes:
        spec = fix.to_spec()
        after = evaluate_with(subject, target, fix)
        side = bench.side_effect(functools.partial(fix.context, subject), fix.first_layer)
        r = Remedy(
            kind=fix.kind,
            components=list(fix.components),
            metric_before=before.metric,
            metric_after=after.metric,
            p_bad_before=before.p_bad,
            p_bad_after=after.p_bad,
            side_effect=side,
            patch_spec=spec,
            layer=spec.get("layer"),
        )
        bad = bad_text or "the bad continuation"
        moves = "rises" if side["loss_change_pct"] >= 0 else "falls"
        r.note = (
            f"{fix.describe()} {'lowers' if r.p_bad_after < r.p_bad_before else 'changes'} "
            f"P({bad!r}) from {r.p_bad_before:.2f} to {r.p_bad_after:.2f}; loss on "
            f"{int(side['n_prompts'])} benign prompts {moves} "
            f"{abs(side['loss_change_pct']):.1f}% (mean KL {side['kl_mean']:.4f} nats per token)."
        )
        out.append(r)
    recommend(out, p_bad_target=p_bad_target, max_loss_pct=max_loss_pct)
    return out


def recommend(
    remedies: Sequence[Remedy], *, p_bad_target: float = 0.2, max_loss_pct: float = 5.0
) -> Remedy | None:
    """Mark the fix to recommend, and say why in its note; None when no fix lowers P(bad).

    Under the P(bad) target at a tolerable cost: the cheapest. Else the best trade-off among
    those that lower P(bad), with the note saying which bound it misses. A fix that does not
    lower P(bad) is never recommended, whatever its cost.
    """
    lowers = [r for r in remedies if r.p_bad_after < r.p_bad_before]
    if not lowers:
        if remedies:
            remedies[0].note += " No fix lowers P(bad): none is recommended."
        return None
    ok = [
        r
        for r in lowers
        if r.p_bad_after < p_bad_target and r.side_effect["loss_change_pct"] < max_loss_pct
    ]
    if ok:
        best = min(ok, key=lambda r: r.side_effect["loss_change_pct"])
        best.note += " Recommended."
    else:
        cheap = [r for r in lowers if r.side_effect["loss_change_pct"] < max_loss_pct]
        best = min(cheap or lowers, key=lambda r: r.p_bad_after)
        best.note += (
            f" Recommended with reservations: no fix brought P(bad) under {p_bad_target} "
            f"while raising the benign loss by less than {max_loss_pct:g}%."
        )
    best.recommended = True
    return best
