"""The search for a fix: every fix kind tried on a cause set, measured, and one recommended.

Each fix is measured on the incident (metric and P(bad) before and after) and on the reference
(benign) prompts: the mean KL divergence of the next-token distributions, original against
fixed, and the change of the mean language-model loss. Of the fixes that bring P(bad) under
``p_bad_target`` while raising the benign loss by under ``max_loss_pct``, the cheapest is marked
``recommended``; when none does both, the best trade-off is, and its note says so. A fix that
does not lower P(bad) is never recommended (``recommend``).

A case with variants (``rca.ingest.variants``) is a behaviour, and its fixes are fit and chosen
on the fit set: the incident prompt and the fit variants (``VariantTarget``). The directions
are averaged over its prompt and counterfactual pairs, the targeted ablation takes the fewest
neurons that work on it, and the weight edit is trained on all of it. A weight edit whose
side effect reaches ``max_loss_pct`` is also tried scaled back: the largest fraction of its
trained deltas whose side effect stays under it (``_within_budget``), a fix of its own. A
fix "brings P(bad) under the target" where it does so on at least ``hold_share`` of the fit
set. Every fix is
then scored on the held-out variants, which choose nothing: a fix that meets the target on
the fit set and not on the held-out set is a **symptom patch**, and a symptom patch is never
recommended. Where the fit set's choice is one, no fix is recommended.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rca.model.ids import ComponentId, format_id, parse_id
from rca.model.metric import MetricValue, Target, evaluate, evaluate_many
from rca.model.subject import Subject
from rca.remedy.ablation import MeanAblation, MeanAblationTop, TargetedAblation
from rca.remedy.direction_removal import DirectionRemoval, residual_directions
from rca.remedy.edit import WeightEdit, weight_edit, weight_edit_prompts
from rca.remedy.fix import Fix, RemedyError, fix_from_spec, pack
from rca.remedy.write_direction_removal import WriteDirectionRemoval, write_directions
from rca.specificity import BenignError, BenignRun

# halvings of the interval when a weight edit is scaled back to the benign budget: the scale is
# found to 1/2**EDIT_SCALE_STEPS of the trained edit
EDIT_SCALE_STEPS = 7

__all__ = [
    "EDIT_TARGETS",
    "HOLD_SHARE",
    "Remedy",
    "VariantTarget",
    "benign_side_effect",
    "recommend",
    "try_remedies",
]

HOLD_SHARE = 0.9  # a fix holds on a set of prompts where P(bad) is under the target on this share
# the weight edit trains on the incident prompt and at most this many fit prompts in all: each
# step runs them beside the benign KL term, and more cost time without telling it more
EDIT_TARGETS = 8


@dataclass(frozen=True)
class VariantTarget:
    """A variant as the remedies see it: its index and set (``fit`` or ``held_out``), its
    target, and its counterfactual where one lines up with it token for token."""

    index: int
    part: str
    target: Target
    counterfactual: Target | None = None


def _share_under(values: Sequence[MetricValue], p_bad_target: float) -> float:
    return sum(v.p_bad < p_bad_target for v in values) / max(1, len(values))


def _set_figures(
    before: Sequence[MetricValue], after: Sequence[MetricValue], p_bad_target: float
) -> dict[str, float]:
    n = max(1, len(before))
    return {
        "n": len(before),
        "mean_p_bad_before": sum(v.p_bad for v in before) / n,
        "mean_p_bad_after": sum(v.p_bad for v in after) / n,
        "share_under_target": _share_under(after, p_bad_target),
    }


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
    # a behaviour's figures: per set (fit, held_out) the number of prompts, the mean P(bad)
    # before and after, and the share under the target; per variant P(bad) before and after
    behaviour: dict[str, Any] | None = None

    @property
    def symptom_patch(self) -> bool:
        """Meets the target on the fit set and not on the held-out variants."""
        b = self.behaviour
        return bool(b and b.get("symptom_patch"))

    def holds_on_fit(self, p_bad_target: float, hold_share: float = HOLD_SHARE) -> bool:
        """P(bad) under the target on at least ``hold_share`` of the fit set (the incident
        prompt alone, for a single prompt)."""
        if self.behaviour is None:
            return self.p_bad_after < p_bad_target
        return self.behaviour["fit"]["share_under_target"] >= hold_share

    def lowers(self) -> bool:
        """Lowers P(bad): on the incident prompt, or on average over the fit set."""
        if self.behaviour is None:
            return self.p_bad_after < self.p_bad_before
        fit = self.behaviour["fit"]
        return fit["mean_p_bad_after"] < fit["mean_p_bad_before"]

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


def evaluate_many_with(
    subject: Subject, targets: Sequence[Target], fix: Fix | None, *, batch: int = 16
) -> list[MetricValue]:
    """Each target's metric and P(bad) with ``fix`` applied (none: the model as it is)."""
    if fix is None:
        return evaluate_many(subject.model, targets, batch=batch)
    with fix.context(subject):
        return evaluate_many(subject.model, targets, batch=batch)


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
    variants: Sequence[VariantTarget] = (),
    hold_share: float = HOLD_SHARE,
) -> list[Remedy]:
    """Try each fix for ``cause_set`` and rank them; see the module docstring.

    ``variants``: the case's variants, each in the fit or the held-out set; the fixes are fit
    on the incident prompt and the fit ones, and scored on both sets.
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
    fit_variants = [v for v in variants if v.part == "fit"]
    fit_targets = [target, *(v.target for v in fit_variants)]
    pairs = [(target, counterfactual)] if counterfactual is not None else []
    pairs += [(v.target, v.counterfactual) for v in fit_variants if v.counterfactual is not None]

    def works(fix: Fix) -> bool:
        """P(bad) under the target on the fit set (on ``hold_share`` of it)."""
        if not fit_variants:
            return evaluate_with(subject, target, fix).p_bad < p_bad_target
        after = evaluate_many_with(subject, fit_targets, fix, batch=batch)
        return _share_under(after, p_bad_target) >= hold_share

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
        weight_edit(
            subject,
            fit_targets[:EDIT_TARGETS] if fit_variants else target,
            comps,
            held[:64],
            p_bad_target=p_bad_target,
            batch=grad_batch,
        )
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
            if works(trial):
                break
            if len(chosen) == len(ranked_neurons):
                break
        fixes.append(trial)
    if pairs and subject.adapter.model_type != "gemma2":
        wd = write_directions(subject, pairs, comps)
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
        for layer, direction in residual_directions(subject, pairs, layers).items():
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
    scored = [target, *(v.target for v in variants)]
    base = evaluate_many_with(subject, scored, None, batch=batch) if variants else []
    out: list[Remedy] = []
    for fix in fixes:
        spec = fix.to_spec()
        # on a behaviour one batched pass scores the incident prompt (first) and every variant
        fixed = evaluate_many_with(subject, scored, fix, batch=batch) if variants else []
        after = fixed[0] if fixed else evaluate_with(subject, target, fix)
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
        if variants:
            r.behaviour = _behaviour_figures(
                variants, base, fixed, p_bad_target=p_bad_target, hold_share=hold_share
            )
        bad = bad_text or "the bad continuation"
        moves = "rises" if side["loss_change_pct"] >= 0 else "falls"
        r.note = (
            f"{fix.describe()} {'lowers' if r.p_bad_after < r.p_bad_before else 'changes'} "
            f"P({bad!r}) from {r.p_bad_before:.2f} to {r.p_bad_after:.2f}; loss on "
            f"{int(side['n_prompts'])} benign prompts {moves} "
            f"{abs(side['loss_change_pct']):.1f}% (mean KL {side['kl_mean']:.4f} nats per token)."
        )
        if r.behaviour is not None:
            r.note += " " + _behaviour_note(r.behaviour, p_bad_target)
        out.append(r)
        if (
            isinstance(fix, WeightEdit)
            and fix.scale is None
            and side["loss_change_pct"] >= max_loss_pct
        ):
            # the trained edit overshoots the benign budget: the strongest fraction of it that
            # stays within the budget is tried too, a fix of its own (the loop reaches it)
            scale = _within_budget(fix, bench, subject, max_loss_pct)
            if scale > 0:
                fixes.append(fix.scaled(scale))
    recommend(out, p_bad_target=p_bad_target, max_loss_pct=max_loss_pct, hold_share=hold_share)
    return out


def _within_budget(
    fix: WeightEdit, bench: BenignRun, subject: Subject, max_loss_pct: float
) -> float:
    """The largest fraction of ``fix`` (to ``EDIT_SCALE_STEPS`` halvings) whose benign loss
    change stays under ``max_loss_pct``: a bisection on the side effect alone, which rises
    with the edit's strength. 0.0 where even the smallest fraction tried does not."""
    lo, hi = 0.0, 1.0
    for _ in range(EDIT_SCALE_STEPS):
        mid = (lo + hi) / 2
        trial = fix.scaled(mid)
        side = bench.side_effect(functools.partial(trial.context, subject), trial.first_layer)
        if side["loss_change_pct"] < max_loss_pct:
            lo = mid
        else:
            hi = mid
    return lo


def _behaviour_figures(
    variants: Sequence[VariantTarget],
    before: Sequence[MetricValue],
    after: Sequence[MetricValue],
    *,
    p_bad_target: float,
    hold_share: float,
) -> dict[str, Any]:
    """A fix's figures on the behaviour. ``before`` and ``after`` hold the incident prompt
    first, then the variants in order."""
    parts = ["fit", *(v.part for v in variants)]
    sets = {
        part: _set_figures(
            [b for b, p in zip(before, parts, strict=True) if p == part],
            [a for a, p in zip(after, parts, strict=True) if p == part],
            p_bad_target,
        )
        for part in ("fit", "held_out")
    }
    held = sets["held_out"]
    fit_ok = sets["fit"]["share_under_target"] >= hold_share
    return {
        **sets,
        "p_bad_target": p_bad_target,
        "hold_share": hold_share,
        "symptom_patch": bool(fit_ok and held["n"] and held["share_under_target"] < hold_share),
        "per_variant": [
            {
                "index": v.index,
                "part": v.part,
                "p_bad_before": b.p_bad,
                "p_bad_after": a.p_bad,
            }
            for v, b, a in zip(variants, before[1:], after[1:], strict=True)
        ],
    }


def _behaviour_note(b: dict[str, Any], p_bad_target: float) -> str:
    fit, held = b["fit"], b["held_out"]
    text = (
        f"On the fit set ({fit['n']} prompts) P(bad) is under {p_bad_target:g} on "
        f"{fit['share_under_target']:.0%}"
    )
    if held["n"]:
        text += (
            f"; on {held['n']} held-out variants on {held['share_under_target']:.0%} (mean "
            f"P(bad) {held['mean_p_bad_before']:.2f} -> {held['mean_p_bad_after']:.2f})"
        )
    text += "."
    if b["symptom_patch"]:
        text += " A symptom patch: it holds on the fit set and not on the held-out variants."
    return text


def recommend(
    remedies: Sequence[Remedy],
    *,
    p_bad_target: float = 0.2,
    max_loss_pct: float = 5.0,
    hold_share: float = HOLD_SHARE,
) -> Remedy | None:
    """Mark the fix to recommend, and say why in its note; None when no fix lowers P(bad).

    Under the P(bad) target at a tolerable cost: the cheapest. Else the best trade-off among
    those that lower P(bad), with the note saying which bound it misses. A fix that does not
    lower P(bad) is never recommended, whatever its cost. On a behaviour every figure the
    choice reads is the fit set's (``Remedy.holds_on_fit``, ``Remedy.lowers``); where the fix
    it chooses is a symptom patch, none is recommended.
    """
    lowers = [r for r in remedies if r.lowers()]
    if not lowers:
        if remedies:
            remedies[0].note += " No fix lowers P(bad): none is recommended."
        return None
    ok = [
        r
        for r in lowers
        if r.holds_on_fit(p_bad_target, hold_share)
        and r.side_effect["loss_change_pct"] < max_loss_pct
    ]
    if ok:
        best = min(ok, key=lambda r: r.side_effect["loss_change_pct"])
        reserved = ""
    else:
        cheap = [r for r in lowers if r.side_effect["loss_change_pct"] < max_loss_pct]
        best = min(cheap or lowers, key=_fit_p_bad_after)
        reserved = (
            f" no fix brought P(bad) under {p_bad_target} while raising the benign loss by "
            f"less than {max_loss_pct:g}%."
        )
    if best.symptom_patch:
        best.note += (
            " Chosen on the fit set, but not recommended: it is a symptom patch. No fix is "
            "recommended."
        )
        return None
    best.note += " Recommended." if not reserved else " Recommended with reservations:" + reserved
    best.recommended = True
    return best


def _fit_p_bad_after(r: Remedy) -> float:
    return r.p_bad_after if r.behaviour is None else r.behaviour["fit"]["mean_p_bad_after"]
