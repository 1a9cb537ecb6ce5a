"""A stored run read for a report: its fields, and the numbers and sentences every medium shows.

Input is the dict ``ReadOnlyStore.get_run`` returns. A JSON column may come back as text
(``json_column``); keys that older runs lack read as absent, never as an error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rca.confirm.circuit import site_label
from rca.verdicts import definitions

__all__ = [
    "NEWLINE",
    "case_fields",
    "cell_token",
    "circuit_lines",
    "circuit_of",
    "infrastructure_sentence",
    "json_column",
    "member_label",
    "names_or_dash",
    "number",
    "percent",
    "ranked_causes",
    "summary_of",
    "token_start",
    "token_warning",
    "turns",
    "verdict_words",
    "yes_no",
    "behaviour_of",
    "fit_evidence_lines",
    "provenance_of",
    "ensemble_sentence",
    "unlearning_sentence",
]


def json_column(v: Any) -> Any:
    """A JSON column as Python data (the store may hand back text)."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def case_fields(run: Mapping[str, Any]) -> dict[str, Any]:
    """The incident of a stored run as its case-file fields (``prompt`` or ``messages``,
    ``bad``, ``good``, ``focus``, ``tags``, ...), from the incidents row's ``case_data``, with
    the row's title, severity and tags where the case data lacks them."""
    inc = run.get("incident") or {}
    data = json_column(inc.get("case_data"))
    fields = dict(data) if isinstance(data, Mapping) else {}
    for key in ("title", "severity", "tags"):
        if fields.get(key) is None:
            fields[key] = inc.get(key)
    fields.setdefault("id", inc.get("incident_id") or run.get("incident_id"))
    return fields


def turns(messages: Any) -> list[tuple[str, str]]:
    """A chat case's ``messages`` (or ``counterfactual_messages``) as (role, content) pairs;
    empty when the case has none."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return []
    return [
        (str(t.get("role") or "?"), str(t.get("content") or ""))
        for t in messages
        if isinstance(t, Mapping)
    ]


def summary_of(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's summary as a dict (empty where it has none)."""
    s = json_column(run.get("summary"))
    return dict(s) if isinstance(s, Mapping) else {}


# the completeness tolerance of runs that did not record theirs (rca.trace.tokens)
_TOKEN_TOLERANCE = 0.05


def token_warning(completeness: Any) -> str | None:
    """The warning for token attributions that do not sum to the metric's change within their
    tolerance (``token_completeness``: ``relative_error`` against ``tolerance``, 0.05 where the
    run recorded none); None where they do, or where no completeness was recorded."""
    c = json_column(completeness)
    if not isinstance(c, Mapping) or c.get("relative_error") is None:
        return None
    try:
        err = float(c["relative_error"])
        tol = float(c.get("tolerance", _TOKEN_TOLERANCE))
    except (TypeError, ValueError):
        return None
    try:
        gap = float(c["metric_input"]) - float(c["metric_baseline"])
    except (KeyError, TypeError, ValueError):
        gap = math.nan
    if err <= tol:  # a NaN error is no evidence of completeness: it warns
        return None
    return (
        f"token attributions are incomplete: they sum to {number(c.get('sum_attributions'))} "
        f"where the metric moves {number(gap)} from the baseline (relative error "
        f"{number(err, '.2f')}, tolerance {number(tol, '.2f')}); read them as a ranking, not as "
        "amounts"
    )


_TOKEN_START = {
    "counterfactual": "Integrated gradients from the counterfactual prompt: a position where it "
    "has the prompt's token scores 0, and the scores sum to the metric's change from the "
    "counterfactual.",
    "neutral": "Integrated gradients from a prompt of neutral tokens.",
}


def token_start(completeness: Any) -> str:
    """Where the token attributions' path started, as a sentence ('' where not recorded)."""
    c = json_column(completeness)
    return _TOKEN_START.get(str(c.get("baseline")), "") if isinstance(c, Mapping) else ""


def ranked_causes(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's ranked candidates, rank 1 first (unranked nodes left out)."""
    ranked = [n for n in run.get("nodes", []) if n.get("rank") is not None]
    return sorted(ranked, key=lambda n: n["rank"])


def verdict_words(run: Mapping[str, Any]) -> dict[str, str]:
    """The definitions of the verdict words and p-values at the run's thresholds (recorded in
    its summary; the defaults for a run recorded without them)."""
    return summary_of(run).get("definitions") or definitions()


def infrastructure_sentence(run: Mapping[str, Any]) -> str:
    """The candidates that ordinary text needs as well, in words, or ''."""
    infra = [c for c in ranked_causes(run) if c.get("verdict") == "infrastructure"]
    if not infra:
        return ""
    parts = [
        f"{c['node_id']} (mean-ablating it raises the loss on ordinary text by "
        f"{percent(c.get('benign_loss_pct'))})"
        for c in infra
    ]
    return (
        "Infrastructure, necessary for ordinary text as well, so not a cause of this incident: "
        + "; ".join(parts)
        + ". It is shown, never blamed, and never in the cause set."
    )


def percent(v: Any) -> str:
    """A signed percentage with one decimal (``+12.5%``), ``-`` where absent."""
    return "-" if v is None else f"{number(v, '+.1f')}%"


def number(v: Any, spec: str = "+.3f") -> str:
    """A number in ``spec`` (signed, three decimals by default); ``-`` where absent or NaN, the
    value as text where it is no number."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def yes_no(v: Any) -> str:
    """``yes``, ``no``, or ``-`` where absent."""
    return "-" if v is None else ("yes" if v else "no")


NEWLINE = re.compile(r"\r\n|\r|\n")


def cell_token(v: Any) -> str:
    """A token for a table cell: its newlines shown as ⏎ (they matter, and a cell is a line)."""
    return NEWLINE.sub("⏎", "" if v is None else str(v))


def names_or_dash(items: Any) -> str:
    """Names joined by commas, ``-`` where there are none."""
    return ", ".join(items or []) or "-"


# ---------------------------------------------------------------------------------------------
# the circuit, in words


def circuit_of(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's circuit as recorded in its summary, or None (runs recorded without one)."""
    c = summary_of(run).get("circuit")
    return c if isinstance(c, Mapping) and c.get("members") is not None else None  # type: ignore[return-value]


def member_label(m: Mapping[str, Any]) -> str:
    """A circuit member's id at its positions (``L3.H2@7``, ``L3.H2@{5,7}``)."""
    return site_label(str(m["id"]), [int(p) for p in m.get("positions") or []])


def _where(circuit: Mapping[str, Any], positions: Sequence[int]) -> str:
    """``position 9 (' John')`` or ``positions 5, 6 (' a', ' b')``, with the tokens recorded."""
    toks = circuit.get("tokens") or {}
    words = [repr(toks[str(p)]) for p in positions if str(p) in toks]
    at = ", ".join(str(p) for p in positions)
    head = f"position {at}" if len(positions) == 1 else f"positions {at}"
    return f"{head} ({', '.join(words)})" if len(words) == len(positions) else head


def circuit_lines(circuit: Mapping[str, Any]) -> list[str]:
    """The circuit in words: its faithfulness and reason; where the incident enters and where
    the bad continuation is written; one line per role with its members at their positions;
    the edges that path patching verified."""
    members = list(circuit.get("members") or [])
    out = [
        f"Faithfulness {number(circuit.get('faithfulness'), '.0%')}: {circuit.get('reason', '')}.",
    ]
    entry = [int(p) for p in circuit.get("entry_positions") or []]
    if entry:
        at = [m for m in members if m.get("positions") and set(m["positions"]) <= set(entry)]
        line = (
            f"The incident enters at {_where(circuit, entry)}, where the prompt differs from "
            "its counterfactual"
        )
        specific = [member_label(m) for m in at if m.get("role") != "infrastructure"]
        infra = [member_label(m) for m in at if m.get("role") == "infrastructure"]
        if specific:
            line += f"; there it is carried by {', '.join(specific)}"
        if infra:
            line += f"; infrastructure there: {', '.join(infra)}"
        out.append(line)
    writers = [m for m in members if m.get("role") == "writer"]
    wpos = sorted({int(p) for m in writers for p in m.get("positions") or []})
    if writers and wpos:
        out.append(
            f"The bad continuation is written at {_where(circuit, wpos)} by "
            f"{', '.join(member_label(m) for m in writers)}"
        )
    for role in ("entry", "route", "writer", "infrastructure"):
        ids = [member_label(m) for m in members if m.get("role") == role]
        if ids:
            out.append(f"{role}: {', '.join(ids)}")
    edges = [e for e in circuit.get("edges") or [] if e.get("target") != "LOGITS"]
    if edges:
        ok = sorted((e for e in edges if e.get("verified")), key=lambda e: -float(e["share"]))
        text = "; ".join(
            f"{e['source']} -> {e['target']} {float(e['share']):.0%} of the gap" for e in ok
        )
        rest = len(edges) - len(ok)
        out.append(
            "edges, each path patched alone: "
            + (text or "none carries its share")
            + (f" ({rest} other pair{'s' if rest != 1 else ''} below the bound)" if rest else "")
        )
    return out


def behaviour_of(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """A behaviour's figures for a report, or None for a single-prompt run.

    ``split``: the variants' split; ``fixes``: per fix (in the order tried) its kind, whether
    it is recommended, and its fit and held-out figures (``n``, ``share_under_target``,
    ``mean_p_bad_before``, ``mean_p_bad_after``) and ``symptom_patch``; ``variants``: per
    variant its index, set, slot values, P(bad) before, and P(bad) after each fix (by kind)."""
    variants = list(run.get("variants") or [])
    if not variants:
        return None
    summary = summary_of(run)
    fixes = []
    for r in run.get("remedies") or []:
        b = json_column(r.get("behaviour"))
        if isinstance(b, Mapping):
            fixes.append({"kind": r.get("kind"), "recommended": bool(r.get("recommended")), **b})
    kinds = {
        int(r.get("row_no", i)): r.get("kind") for i, r in enumerate(run.get("remedies") or [])
    }
    after: dict[int, dict[str, float]] = {}
    for row in run.get("variant_results") or []:
        kind = row.get("kind") or kinds.get(int(row.get("remedy_row", -1)))
        after.setdefault(int(row["variant_index"]), {})[str(kind)] = row.get("p_bad_after")
    rows = [
        {
            "index": int(v["variant_index"]),
            "part": v.get("part"),
            "label": v.get("label") or "",
            "p_bad": v.get("p_bad"),
            "after": after.get(int(v["variant_index"]), {}),
        }
        for v in variants
    ]
    split = (summary.get("variants") or {}).get("split") or {}
    return {"split": split, "fixes": fixes, "variants": rows}


def fit_evidence_lines(run: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]] | None:
    """The verdict on the fit variants (``rca.confirm.behaviour``): sentences, and per
    component its mean share of the gap with the 95% interval and its consistency. None for a
    single-prompt run."""
    b = summary_of(run).get("behaviour")
    if not isinstance(b, Mapping) or not b.get("n_fit"):
        return None
    n = int(b["n_fit"])
    shares = list(b.get("set_shares") or [])
    holds = float(b.get("set_holds") or 0.0)
    text = [
        f"On {n} fit variants, each patched from its own counterfactual (or ablated to the "
        f"reference means where none lines up), the cause set removes at least the confirm "
        f"bound of the gap on {holds:.0%} of them (mean share "
        f"{sum(shares) / max(1, len(shares)):.2f})."
    ]
    cs = b.get("cause_set")
    if isinstance(cs, Mapping):
        comps = ", ".join(cs.get("components") or []) or "none"
        shown = len(cs.get("indices") or [])
        if cs.get("source") == "prompt":
            text.append(f"The behaviour's cause set is the prompt's ({comps}).")
        else:
            text.append(
                f"The prompt's cause set does not hold on the fit set, so the behaviour's is "
                f"chosen there: {comps}, which removes the confirm bound of the gap on "
                f"{float(cs.get('holds') or 0.0):.0%} of the {shown} fit variants that show "
                "the incident"
                + ("." if cs.get("holds_on_fit_set") else ", under the share required.")
                + (" The fixes target it." if cs.get("holds_on_fit_set") else "")
            )
    trace = b.get("attribution")
    if isinstance(trace, Mapping) and trace.get("top"):
        lead = ", ".join(
            f"{t['id']} ({float(t['mean_share']):.2f})" for t in list(trace["top"])[:5]
        )
        text.append(
            f"Attribution over the fit set (mean share of each variant's gap, "
            f"{int(trace.get('n') or 0)} prompts): {lead}."
        )
    kept, dropped = list(b.get("circuit_kept") or []), list(b.get("circuit_dropped") or [])
    if kept or dropped:
        share = float(b.get("variant_share") or 0.0)
        text.append(
            f"The behaviour's circuit keeps the members that remove at least the confirm "
            f"bound of the gap alone on at least {share:.0%} of them: {', '.join(kept) or 'none'}"
            + (f"; not {', '.join(dropped)}." if dropped else ".")
        )
    rows = [
        {
            "id": c.get("id"),
            "in_set": bool(c.get("in_set")),
            "mean": c.get("mean"),
            "ci": list(c.get("ci") or [None, None]),
            "consistency": c.get("consistency"),
            "holds": c.get("holds"),
        }
        for c in b.get("components") or []
    ]
    return text, rows


PROVENANCE_ROWS = 10  # ranked training examples a report shows


def unlearning_sentence(u: Mapping[str, Any]) -> str:
    """What unlearning the top examples and as many random ones did to P(bad), in one
    sentence (``rca.provenance.unlearn``)."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    top, rnd = u["top"], u["random"]
    return (
        f"Unlearning ({u['label']}), P(bad) on {u['measured_on']}: {mean(u['p_bad_before']):.3f} "
        f"before; {mean(top['p_bad_after']):.3f} after the top {top['n_examples']} "
        f"({top['steps_taken']} steps, benign loss {top['benign_loss_change_pct']:+.1f}%); "
        f"{mean(rnd['p_bad_after']):.3f} after {rnd['n_examples']} random "
        f"({rnd['steps_taken']} steps, {rnd['benign_loss_change_pct']:+.1f}%)"
    )


def ensemble_sentence(e: Mapping[str, Any]) -> str:
    """Which checkpoints a ranking summed over, by which rule, and what each weighed, in one
    sentence (``rca.provenance.ensemble``)."""
    rule = {
        "sum": "summed (TRAK's rule)",
        "learning": "standardized and weighted by the rise of P(bad) over the training after each",
        "tracin": "gradient dot products weighted by the training after each (TracIn), by "
        + {
            "learning rate": "its learning rate",
            "steps": "its steps (a constant learning rate)",
        }.get(e.get("weights_from") or "", "the same weight (no steps known)"),
    }.get(e["rule"], e["rule"])
    parts = ", ".join(
        f"{m['checkpoint']} (P(bad) {m['p_bad']:.3f}"
        + (f", weight {m['weight']:.2f})" if e["rule"] != "sum" else ")")
        for m in e["members"]
    )
    return f"Scores of {len(e['members'])} checkpoints, {rule}: {parts}"


def provenance_of(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's latest influence query as a report shows it: ``heading`` (the method, the
    circuit, the prompts averaged over, the data), ``sources`` (a sentence, or None),
    ``unlearning`` (a sentence, or None: ``unlearning_sentence``), ``ensemble`` (a sentence,
    or None: ``ensemble_sentence``) and ``rows`` (rank, index,
    score, text, fields) for the top ``PROVENANCE_ROWS``; None where
    ``rca provenance`` never ran on it."""
    p = run.get("provenance")
    if not p:
        return None
    summ = json_column(p.get("summary")) or {}
    circuit = ", ".join(json_column(p.get("circuit")) or []) or "every parameter"
    q = json_column(p.get("queries")) or {}
    heading = (
        f"{p.get('method')} over {circuit}, averaged over {q.get('n', 1)} prompts (the case's "
        f"and its fit variants); {summ.get('n_examples')} training examples ranked, the top "
        f"{p.get('k')} recorded"
    )
    sources = None
    if summ.get("top_sources"):
        top = ", ".join(f"{k} {v:.0%}" for k, v in summ["top_sources"].items())
        data = ", ".join(f"{k} {v:.0%}" for k, v in (summ.get("data_sources") or {}).items())
        sources = f"Sources of the top {p.get('k')}: {top} (in the data: {data})."
    rows = [
        {
            "rank": e.get("rank"),
            "index": e.get("example_index"),
            "score": e.get("score"),
            "text": e.get("text"),
            "fields": json_column(e.get("fields")) or {},
        }
        for e in (p.get("examples") or [])[:PROVENANCE_ROWS]
    ]
    u = summ.get("unlearning")
    unlearning = unlearning_sentence(u) + "." if u else None
    e = summ.get("ensemble")
    ensemble = ensemble_sentence(e) + "." if e else None
    return {
        "heading": heading,
        "sources": sources,
        "ensemble": ensemble,
        "unlearning": unlearning,
        "rows": rows,
    }
