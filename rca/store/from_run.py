"""The ``RunRecord`` of a finished investigation: ``to_run_record`` turns an
``rca.investigate.CaseRun`` into the store's plain data (a summary and seven bulk tables:
the variants and each fix's per-variant results are empty for a single-prompt case).

The one module of ``rca.store`` that knows the pipeline's objects; the package's
``__init__`` does not import it, so that the store itself never imports torch.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rca.model.ids import IdError, parse_id
from rca.verdicts import definitions

from .records import IncidentRecord, ModelRecord, RunRecord

if TYPE_CHECKING:
    from rca.confirm import CandidateEvidence, CircuitMember

__all__ = ["remedy_rows", "to_run_record", "variant_result_rows", "variant_rows"]

# the counterfactual's fields the run summary keeps
CF_SUMMARY = ("text", "generated", "drop", "replaced", "text_exact")
# the fields of VariantCheck.to_json a variants row keeps under their own names (index is
# variant_index)
VARIANT_FIELDS = (
    "part",
    "origin",
    "label",
    "prompt_tokens",
    "metric",
    "p_bad",
    "counterfactual_aligned",
    "metric_counterfactual",
)


def _layer(cid: str) -> int | None:
    """The layer an id names (``rca.model.ids``); None for one without a layer, or a node that
    is not a component (a prompt token)."""
    try:
        return parse_id(cid).layer
    except IdError:
        return None


def _circuit_ablations(circuit: Any, metric_clean: float, kind: str) -> list[dict[str, Any]]:
    """The circuit's own experiments: each member patched at its positions alone, the
    specific members together (faithfulness), and each edge's path patched alone."""
    out: list[dict[str, Any]] = [
        {
            "experiment": "position_patch",
            "components": m.sites,
            "kind": kind,
            "metric": metric_clean - m.position_effect,
            "effect": m.position_effect,
            "details": {"role": m.role, "total_effect": m.total_effect},
        }
        for m in circuit.members
        if m.positions and m.position_effect is not None
    ]
    out.append(
        {
            "experiment": "circuit",
            "components": [
                x for m in circuit.members if m.role != "infrastructure" for x in m.sites
            ],
            "kind": kind,
            "effect": circuit.faithfulness,
            "details": {"what": "specific members patched alone; effect = share of the gap"},
        }
    )
    out += [
        {
            "experiment": "path_patch",
            "components": [e.source, e.target],
            "kind": kind,
            "metric": metric_clean - e.effect,
            "effect": e.effect,
            "details": {"share": e.share, "verified": e.verified, "trace_score": e.score},
        }
        for e in circuit.edges
        if e.target != "LOGITS"
    ]
    return out


def to_run_record(
    run: Any,
    *,
    kind: str = "investigate",
    parent_run_id: str | None = None,
    summary_extra: dict[str, Any] | None = None,
) -> RunRecord:
    """The ``RunRecord`` of an ``rca.investigate.CaseRun``."""
    att, v, s = run.attribution, run.verdict, run.subject
    comps = att.components
    method, baseline = comps.method, comps.baseline
    tokens = [
        {"position": i, "token": t, "score": float(sc), "method": att.tokens.method}
        for i, (t, sc) in enumerate(zip(att.tokens.tokens, att.tokens.scores, strict=True))
    ]
    evidence = {c.id: c for c in v.candidates}
    members = {m.id: m for m in v.circuit.members} if v.circuit is not None else {}
    nodes = []
    for cid, score in zip(comps.nodes, comps.scores.tolist(), strict=True):
        e = evidence.get(cid)
        nodes.append(
            {
                "node_id": cid,
                "kind": "emb" if cid == "EMB" else ("head" if ".H" in cid else "mlp"),
                "layer": _layer(cid),
                "score": float(score),
                "method": method,
                "baseline": baseline,
                **_evidence(e, members.get(cid)),
            }
        )
    listed = {n["node_id"] for n in nodes}
    for cid, score in comps.neurons.items():
        nodes.append(
            {
                "node_id": cid,
                "kind": "neuron",
                "layer": _layer(cid),
                "score": score,
                "method": method,
                "baseline": baseline,
                **_evidence(evidence.get(cid), members.get(cid)),
            }
        )
        listed.add(cid)
    # candidates the trace did not score as nodes: an infrastructure MLP's neurons as a group
    for e in v.candidates:
        if e.id not in listed:
            nodes.append(
                {
                    "node_id": e.id,
                    "kind": parse_id(e.id).kind,
                    "layer": _layer(e.id),
                    "score": e.attribution,
                    "method": method,
                    "baseline": baseline,
                    **_evidence(e, members.get(e.id)),
                }
            )
    edges = []
    if comps.edges is not None:
        E = comps.edges
        nz = (E != 0).nonzero().tolist()
        for i, j in nz:
            if comps.up[i] == "EMB":
                continue
            edges.append({"source": comps.up[i], "target": comps.down[j], "score": float(E[i, j])})
        if comps.emb_edges is not None:
            for p, j in (comps.emb_edges != 0).nonzero().tolist():
                edges.append(
                    {
                        "source": f"EMB@{p}",
                        "target": comps.down[j],
                        "score": float(comps.emb_edges[p, j]),
                    }
                )
    cs = v.cause_set
    kind_ = str(v.cost.get("set_kind", v.config.kind))
    nec_kind = str(v.cost.get("necessity_kind", v.config.kind))
    ablations: list[dict[str, Any]] = []
    for c in v.candidates:
        ablations += [
            {
                "experiment": "total_effect",
                "components": [c.id],
                "kind": "patch-to-baseline",
                "metric": v.metric_clean - c.total_effect,
                "effect": c.total_effect,
            },
            {
                "experiment": "direct_effect",
                "components": [c.id],
                "kind": "patch-to-baseline, downstream frozen",
                "metric": v.metric_clean - c.direct_effect,
                "effect": c.direct_effect,
            },
            {
                "experiment": "necessity",
                "components": [c.id],
                "kind": nec_kind,
                "metric": v.metric_clean - c.necessity,
                "effect": c.necessity,
                "p_value": c.p_value,
            },
        ]
    ablations.append(
        {
            "experiment": "cause_set",
            "components": cs.components,
            "kind": kind_,
            "metric": cs.metric_ablated,
            "effect": cs.necessity,
            "p_value": cs.p_value,
            "details": {
                "fraction": cs.necessity_fraction,
                "verdict": cs.verdict,
                "reason": cs.reason,
                "random_scope": cs.random_scope,
            },
        }
    )
    ablations.append(
        {
            "experiment": "sufficiency",
            "components": cs.components,
            "kind": kind_,
            "metric": cs.sufficiency_metric,
            "effect": cs.sufficiency_fraction,
            "details": {
                "what": "everything but the set ablated; effect = share of the metric kept"
            },
        }
    )
    for k, d in enumerate(cs.random_drops):
        ablations.append(
            {
                "experiment": "random_set",
                "components": [],
                "kind": kind_,
                "metric": v.metric_clean - d,
                "effect": d,
                "details": {"index": k, "scope": cs.random_scope},
            }
        )
    if v.circuit is not None:
        ablations += _circuit_ablations(v.circuit, v.metric_clean, kind_)
    rec = run.recommended
    cf_json = None if att.counterfactual is None else att.counterfactual.to_json()
    pre = getattr(run, "preflight", None)
    variants = [] if pre is None else variant_rows(pre.variants)
    inc = run.incident
    said: dict[str, Any] = {}
    if pre is not None:
        said = {
            "decoding": pre.decoding.to_json(),
            "reference_source": pre.reference_source,
            "p_bad_prompt": pre.p_bad,
            "focus_span": None if pre.target.focus is None else list(pre.target.focus),
        }
        if pre.variants:  # the counts and the split; each variant is a row of ``variants``
            said["variants"] = {k: v for k, v in pre.variants_json().items() if k != "items"}
        if pre.generated is not None:  # what variant generation had to work with, and kept
            said["generated"] = pre.generated
    behaviour = getattr(run, "behaviour", None)
    if behaviour is not None:  # the verdict on the fit variants
        said["behaviour"] = behaviour.to_json()
    if inc.messages is not None:  # the text the model saw, from its own chat template
        said["prompt_text"] = inc.prompt
    if inc.counterfactual_messages is not None:
        said["counterfactual_text"] = inc.counterfactual
    summary = {
        "verdict": v.verdict,
        "cause_set": cs.components,
        "top_cause": v.ranked()[0].id if v.candidates else None,
        "metric_before": v.metric_clean,
        "metric_baseline": v.metric_baseline,
        "metric_after": rec.metric_after if rec else None,
        "p_bad_before": run.remedies[0].p_bad_before
        if run.remedies
        else (pre.p_bad if pre is not None else None),
        "p_bad_after": rec.p_bad_after if rec else None,
        "baseline": baseline,
        "counterfactual": None if cf_json is None else {k: cf_json[k] for k in CF_SUMMARY},
        "token_completeness": att.tokens.completeness,
        "graph_paths": att.paths,
        "set_reason": cs.reason,
        "set_p_value": cs.p_value,
        "circuit": None if v.circuit is None else asdict(v.circuit),
        "definitions": definitions(asdict(v.config)),
        "infrastructure": [
            {"id": c.id, "benign_loss_pct": c.benign_loss_pct, "benign_kl": c.benign_kl}
            for c in v.ranked()
            if c.infrastructure
        ],
        "confirm_cost": v.cost,
        "trace_cost": {k: v2 for k, v2 in comps.cost.items()},
        **said,
        **(summary_extra or {}),
    }
    return RunRecord(
        incident=IncidentRecord.from_incident(run.incident),
        model=ModelRecord.from_subject(s),
        kind=kind,
        parent_run_id=parent_run_id,
        status="ok",
        config=run.config.to_json(),
        device=str(s.device),
        seed=run.config.seed,
        timings=run.timings,
        summary=summary,
        started_at=run.started_at,
        finished_at=run.finished_at,
        token_scores=tokens,
        nodes=nodes,
        edges=edges,
        ablations=ablations,
        remedies=remedy_rows(run.remedies),
        variants=variants,
        variant_results=variant_result_rows(run.remedies),
    )


def remedy_rows(remedies: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``remedies`` rows of a run: one per fix, in the order tried; a fix's behaviour
    without ``per_variant`` (which ``variant_result_rows`` keeps)."""
    return [
        {
            "remedy_id": str(uuid.uuid4()),
            "kind": r.kind,
            "components": r.components,
            "metric_before": r.metric_before,
            "metric_after": r.metric_after,
            "p_bad_before": r.p_bad_before,
            "p_bad_after": r.p_bad_after,
            "side_effect": r.side_effect,
            "recommended": r.recommended,
            "note": r.note,
            "patch_spec": r.patch_spec,
            "behaviour": _behaviour_figures(r),
        }
        for r in remedies
    ]


def variant_rows(checks: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``variants`` rows of a run: one per ``rca.ingest.preflight.VariantCheck``, in order."""
    return [
        {"variant_index": j["index"], **{k: j[k] for k in VARIANT_FIELDS}}
        for j in (c.to_json() for c in checks)
    ]


def variant_result_rows(remedies: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``variant_results`` rows of a run: per fix (in the order tried, ``remedy_row`` its
    position) and per variant of its behaviour, P(bad) before and after."""
    return [
        {
            "remedy_row": i,
            "kind": r.kind,
            "variant_index": v["index"],
            "part": v["part"],
            "p_bad_before": v["p_bad_before"],
            "p_bad_after": v["p_bad_after"],
        }
        for i, r in enumerate(remedies)
        for v in (getattr(r, "behaviour", None) or {}).get("per_variant", [])
    ]


def _behaviour_figures(remedy: Any) -> dict[str, Any] | None:
    """A fix's behaviour as ``remedies.behaviour`` keeps it: without ``per_variant``, which
    goes to ``variant_results``; None for a single-prompt case."""
    b = getattr(remedy, "behaviour", None)
    return None if b is None else {k: v for k, v in b.items() if k != "per_variant"}


def _evidence(e: CandidateEvidence | None, member: CircuitMember | None) -> dict[str, Any]:
    """A node's confirm evidence and circuit role (None where confirm did not measure it)."""
    return {
        "total_effect": e.total_effect if e else None,
        "direct_effect": e.direct_effect if e else None,
        "necessity": e.necessity if e else None,
        "p_value": e.p_value if e else None,
        "verdict": e.verdict if e else None,
        "reason": e.reason if e else None,
        "rank": e.rank if e else None,
        "benign_loss_pct": e.benign_loss_pct if e else None,
        "benign_kl": e.benign_kl if e else None,
        "role": member.role if member else None,
        "sites": member.sites if member else None,
    }
