"""Rankings of confirm's evidence that the localization benchmark scores beside rca's own.

Each is a frozen, named rule over one fault's saved evidence (``FaultResult.evidence``: per
candidate its total effect TE, direct effect DE and necessity NE as metric drops), so a run
scores every rule on the same measurements and a saved run can be rescored without planting
again (``rca.bench.localization.rescore``):

- ``confirm``: the order ``rca.confirm`` returned in the run;
- ``te``, ``de``, ``ne``: one criterion alone, largest first;
- ``lead_te_de``: the leading group by TE (within 20% of the largest), ordered by DE, then the
  rest by TE (``lead_then_de``);
- ``lead_max_te_ne_de``: the same with max(TE, NE) as the effect;
- ``lead_pshare_de``: the same with the effect as the share of P(bad) that max(TE, NE)
  removes, a measure that saturates once the bad continuation is gone;
- ``rca``: ``rca.confirm``'s ranking rule recomputed from the evidence
  (``confirm_rule_ranking``): infrastructure last, the leading group by the share of P(bad)
  removed, the origin (the latest robustly necessary candidate) first, then the writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rca.model.metric import reference_point, share_removed

if TYPE_CHECKING:
    from rca.bench.localization import FaultResult

__all__ = ["RANKINGS", "BENCH_TOP_K", "confirm_rule_ranking", "lead_then_de"]

BENCH_TOP_K = 15  # candidates the confirm stage takes from the trace


def lead_then_de(
    ev: Sequence[dict[str, Any]], effect: dict[str, float], *, window: float = 0.2
) -> list[str]:
    """The leading group (``effect`` within ``window`` of the largest) by DE, then the rest by
    ``effect``, over any notion of effect (candidate id -> effect)."""
    top = max(effect.values())
    lead = [e for e in ev if top > 0 and effect[e["id"]] >= (1 - window) * top]
    rest = [e for e in ev if e not in lead]
    return [e["id"] for e in sorted(lead, key=lambda e: -e["de"])] + [
        e["id"] for e in sorted(rest, key=lambda e: -effect[e["id"]])
    ]


def _p_bad_shares(r: FaultResult) -> dict[str, float]:
    """Each candidate's max(TE, NE) as the share of the bad behaviour it removes
    (``rca.model.metric.share_removed``), from the prompt's metric to the counterfactual's."""
    m_clean, m_cf = r.metric["prompt"], r.metric["counterfactual"]
    rows = int(r.metric.get("rows", 1))
    return {
        e["id"]: share_removed(m_clean, m_cf, max(e["te"], e["ne"]), conts=rows) for e in r.evidence
    }


def confirm_rule_ranking(r: FaultResult) -> list[str]:
    """``rca.confirm``'s ranking (``rank_candidates``) recomputed from the saved evidence.
    Saved runs without zero-ablation necessity fall back to NE, without benign damage to no
    infrastructure. The bench's hosts (GPT-2, Llama) run attention and MLP in sequence."""
    from rca.confirm import CandidateEvidence, ConfirmConfig, rank_candidates

    rows = int(r.metric.get("rows", 1))
    m_clean = r.metric["prompt"]
    m_ref = reference_point(m_clean, r.metric["counterfactual"], n_conts=rows)
    ev = [
        CandidateEvidence(
            e["id"],
            e.get("attribution", 0.0),
            e["te"],
            e["de"],
            e["ne"],
            p_value=e.get("p", 1.0),
            necessity_zero=e.get("ne_zero"),
            infrastructure=bool(e.get("infrastructure", False)),
        )
        for e in r.evidence
    ]
    ordered = rank_candidates(
        ev,
        share=lambda d: share_removed(m_clean, m_ref, d, conts=rows),
        gap=m_clean - m_ref,
        config=ConfirmConfig(top_k=BENCH_TOP_K),
    )
    return [e.id for e in ordered]


def _by(key: str) -> Callable[[FaultResult], list[str]]:
    """The candidates by one criterion of the evidence, largest first."""
    return lambda r: [e["id"] for e in sorted(r.evidence, key=lambda e: -e[key])]


RANKINGS: dict[str, Callable[[FaultResult], list[str]]] = {
    "confirm": lambda r: list(r.confirm_ranked),
    "te": _by("te"),
    "de": _by("de"),
    "ne": _by("ne"),
    "lead_te_de": lambda r: lead_then_de(r.evidence, {e["id"]: e["te"] for e in r.evidence}),
    "lead_max_te_ne_de": lambda r: lead_then_de(
        r.evidence, {e["id"]: max(e["te"], e["ne"]) for e in r.evidence}
    ),
    "lead_pshare_de": lambda r: lead_then_de(r.evidence, _p_bad_shares(r)),
    "rca": confirm_rule_ranking,
}
