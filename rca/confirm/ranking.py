"""The ranking of confirmed candidates and the verdict word of each (docs/confirm.md, "Ranking").

A candidate's effect is the share of P(bad) that max(TE, NE) removes
(``rca.model.metric.share_removed`` with the prompt's metric and the reference point); the leading
group is every candidate within ``window`` of the largest. Its robust necessity is min(NE, NE0), the
smaller drop of both ablations. The first rank goes to the origin, the robustly necessary member
that computes latest; the second to the writer, the member with the largest direct effect;
infrastructure is never first. Each candidate's verdict word (``rca.verdicts``) follows from the
ranking and the cause set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

from rca.confirm.circuit import forward_position
from rca.confirm.evidence import CandidateEvidence, ConfirmConfig
from rca.model.ids import parse_id
from rca.verdicts import definitions

__all__ = ["component_verdict", "rank_candidates", "set_verdict", "verdict_definitions"]


def rank_candidates(
    evidence: Sequence[CandidateEvidence],
    *,
    share: Callable[[float], float],
    gap: float,
    config: ConfirmConfig,
    parallel: bool = False,
) -> list[CandidateEvidence]:
    """The candidates in rank order (docs/confirm.md, "Ranking"); ``share`` maps a metric drop to
    the share of the bad behaviour it removes, ``gap`` is the prompt-to-reference metric gap,
    ``parallel``: the model's attention and MLP read the same input (GPT-NeoX, Phi).

    1. The leading group: effect share(max(TE, NE)) within ``window`` of the largest.
    2. Infrastructure (``CandidateEvidence.infrastructure``: necessary for ordinary text as
       well) is never the top cause: where the rule below puts it first, the rule is applied
       again to the specific candidates alone, and its first choice takes rank 1; the rest
       keep their order. (An infrastructure origin would otherwise hand rank 1 to the writer,
       though a specific origin exists.)
    3. Robust necessity, the smaller drop of the two ablations: min(NE, NE0). A cause should
       remove the behaviour whatever its output is ablated to.
    4. In the leading group:
       a. the necessary group: the candidates whose robust necessity is at least
          ``necessary_fraction`` of the group's largest;
       b. first, the origin: the necessary candidate latest in the forward pass (ties by DE).
          Carriers of the trigger's identity and enablers are necessary too, but they compute
          before the origin, which reads them; amplifiers after it are not robustly necessary
          (the behaviour reaches the logits by other paths when one is ablated);
       c. second, the writer: the leading candidate with the largest direct effect, where it
          reaches ``writer_fraction`` of the gap;
       d. the rest of the necessary group, latest first; then the rest of the leading group
          by robust necessity.
    5. The rest by effect.
    """
    ordered = _rule_order(evidence, share=share, gap=gap, config=config, parallel=parallel)
    specific = [e for e in evidence if not e.infrastructure]
    if specific and ordered[0].infrastructure:
        # the rule again, without the infrastructure: its first choice takes rank 1
        first = _rule_order(specific, share=share, gap=gap, config=config, parallel=parallel)[0]
        ordered = [first] + [e for e in ordered if e is not first]
    return ordered


def _rule_order(
    evidence: Sequence[CandidateEvidence],
    *,
    share: Callable[[float], float],
    gap: float,
    config: ConfirmConfig,
    parallel: bool,
) -> list[CandidateEvidence]:
    """Steps 1 and 3-5 of ``rank_candidates``, over every candidate."""
    effect = {e.id: share(max(e.total_effect, e.necessity)) for e in evidence}
    top = max(effect.values(), default=0.0)
    lead = [e for e in evidence if top > 0 and effect[e.id] >= (1 - config.window) * top]
    rest = sorted(
        (e for e in evidence if e not in lead),
        key=lambda e: (-effect[e.id], -max(e.total_effect, e.necessity)),
    )

    def robust(e: CandidateEvidence) -> float:
        return min(e.necessity, e.necessity_zero if e.necessity_zero is not None else e.necessity)

    most = max((robust(e) for e in lead), default=0.0)
    if most <= 0:
        return sorted(lead, key=lambda e: -robust(e)) + rest
    need = config.necessary_fraction * most
    group = sorted(
        (e for e in lead if robust(e) >= need),
        key=lambda e: (forward_position(e.id, parallel=parallel), e.direct_effect),
        reverse=True,
    )
    out = group[:1]
    writers = [e for e in lead if e not in out and e.direct_effect >= config.writer_fraction * gap]
    if writers:
        out.append(max(writers, key=lambda e: e.direct_effect))
    out += [e for e in group if e not in out]
    out += sorted((e for e in lead if e not in out), key=lambda e: -robust(e))
    return out + rest


def verdict_definitions(config: ConfirmConfig | None = None) -> dict[str, str]:
    """Each verdict word and p-value with its definition (``rca.verdicts``), at ``config``'s
    thresholds."""
    return definitions(asdict(config or ConfirmConfig()))


def component_verdict(
    e: CandidateEvidence,
    *,
    share: float,
    contrib: dict[str, float],
    set_verdict: str,
    set_fraction: float,
    gap: float,
    cfg: ConfirmConfig,
) -> tuple[str, str]:
    """One candidate's verdict word (``VERDICT_WORDS``) and the reason, which names the numbers
    it rests on and says why where the component p-value seems to disagree with the word."""
    kind = "head" if parse_id(e.id).kind == "head" else "MLP"
    alone = f"component p = {e.p_value:.3f}"
    if e.infrastructure:
        return "infrastructure", (
            f"necessary for ordinary text as well: mean-ablating it raises the loss on benign "
            f"text by {e.benign_loss_pct or 0.0:.0f}% (KL {e.benign_kl or 0.0:.2f} nats per "
            f"token); alone it moves the metric by {share:.0%} of the gap, as it would any "
            "prompt's"
        )
    if e.in_set:
        c_share = contrib[e.id] / gap
        if set_verdict == "confirmed" and c_share >= cfg.component_fraction:
            why = (
                f"in the confirmed set; without it the set removes {c_share:.0%} less of the gap; "
                f"alone: TE {e.total_effect:+.2f}, necessity {e.necessity:+.2f}, {alone}"
            )
            if e.p_value >= cfg.alpha:
                why += (
                    f": alone it does not stand out from the other {kind}s, it acts with the "
                    "rest of the set"
                )
            return "confirmed", why
        if set_verdict == "confirmed":
            return "inconclusive", (
                f"in the set, but the rest of the set does nearly as well without it "
                f"({c_share:.0%} of the gap; {alone})"
            )
        return "inconclusive", f"in a set that is {set_verdict.replace('_', ' ')} ({alone})"
    if share < cfg.component_fraction:
        return "not_confirmed", (
            f"patching or ablating it moves the metric by {share:.0%} of the gap, under "
            f"{cfg.component_fraction:.0%} ({alone})"
        )
    why = f"moves the metric by {share:.0%} of the gap alone ({alone})"
    if set_verdict == "confirmed":
        why += (
            f", but the cause set removes {set_fraction:.0%} of the gap without it: a carrier, "
            "an amplifier or redundant with a member"
        )
    else:
        why += f", and the cause set is {set_verdict.replace('_', ' ')}"
    return "inconclusive", why


def set_verdict(
    members: Sequence[str],
    *,
    removed: float,
    p: float,
    n_random: int,
    scope: str,
    infrastructure: Sequence[str],
    cfg: ConfirmConfig,
) -> tuple[str, str]:
    """The cause set's verdict word and its reason; ``removed``: the share of the gap the set's
    ablation removes, ``p``: its p-value against ``n_random`` random sets."""
    min_p = 1 / (1 + n_random)
    infra_note = (
        f"; infrastructure ({', '.join(infrastructure[:3])}"
        f"{', ...' if len(infrastructure) > 3 else ''}) is never a member"
        if infrastructure
        else ""
    )
    if not members:
        return (
            "not_confirmed",
            "no candidate is specific to the incident: every one is infrastructure, necessary "
            "for ordinary text as well",
        )
    if removed < cfg.set_fraction:
        return (
            "not_confirmed",
            f"ablating the {len(members)} leading specific candidates removes {removed:.0%} of "
            f"the gap, under the {cfg.set_fraction:.0%} required{infra_note}",
        )
    if p < cfg.alpha:
        return (
            "confirmed",
            f"ablating the set removes {removed:.0%} of the gap (>= {cfg.set_fraction:.0%}) and "
            f"beats {scope} with set p = {p:.3f} < {cfg.alpha}",
        )
    if min_p >= cfg.alpha:
        return (
            "inconclusive",
            f"the set removes {removed:.0%} of the gap, but only {n_random} comparison sets "
            f"exist, so no p-value below {cfg.alpha} is possible",
        )
    return (
        "not_confirmed",
        f"the set removes {removed:.0%} of the gap, but random sets do as well (set p = {p:.3f})",
    )
