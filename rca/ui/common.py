"""What the workbench pages share: the database, escaping, and stored rows made presentable.

Nothing here draws: the functions take the dicts ``ReadOnlyStore`` returns and give back rows
for ``st.dataframe``, escaped text for the widgets that interpret Markdown, or HTML whose every
string from a case, a prompt or a model went through ``html.escape``. The pages test cleanly
against them, and the escaping lives in one place (``rca.textsafe``).

Escaping rule of the app: ``st.text``, ``st.code``, ``st.dataframe`` cells and option labels
show case strings through ``plain`` (as they are, but control, bidirectional and invisible
characters shown as escapes, ``\\x1b``, ``\\u202e``; ``cell_rows`` does it for a table);
every widget that renders Markdown (``st.markdown``, ``st.caption``, titles, headers, alerts,
expander and status labels) gets them through ``md``; HTML is built here, escaped by
construction (``heat_strip``, ``graph_html``), and is the only thing shown with
``unsafe_allow_html``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rca.ingest.incident import SEVERITIES
from rca.report import case_fields, graph_svg, turns
from rca.report.stored import behaviour_of
from rca.report.stored import json_column as _json
from rca.report.stored import number as fmt
from rca.report.stored import summary_of as summary
from rca.store import ReadOnlyStore, Store, StoreError
from rca.textsafe import html_text, streamlit_markdown, visible

__all__ = [
    "PAGES",
    "ablation_evidence",
    "alert_rows",
    "alerts_per_day",
    "cases_dir",
    "db_path",
    "decoding_rows",
    "eval_status",
    "figure_cells",
    "fmt",
    "graph_html",
    "heat_strip",
    "held_out_rows",
    "incident_fields",
    "md",
    "model_labels",
    "monitor_label",
    "monitor_rows",
    "node_edges",
    "node_options",
    "plain",
    "reader",
    "regress_rows",
    "remedy_rows",
    "run_label",
    "run_rows",
    "behaviour_rows",
    "runs_and_models",
    "runs_or_error",
    "filter_rows",
    "search_text",
    "site_text",
    "summary",
]

DEFAULT_DB = "rca.duckdb"
# page scripts, relative to app.py (st.Page and st.switch_page resolve them from there)
PAGES = {
    "cases": "rca/ui/cases.py",
    "case": "rca/ui/case_detail.py",
    "new": "rca/ui/new_investigation.py",
    "regression": "rca/ui/regression.py",
    "monitors": "rca/ui/monitors.py",
    "audit": "rca/ui/audit.py",
    "empty": "rca/ui/empty.py",
}
POSITIVE, NEGATIVE = "192,57,43", "46,111,186"  # red: toward the bad continuation; blue: against


def db_path() -> Path:
    """The database the app shows: ``$RCA_DB``, else ``./rca.duckdb`` (the CLI's default)."""
    return Path(os.environ.get("RCA_DB") or DEFAULT_DB)


def cases_dir() -> Path:
    """Where the New investigation page looks for case files: ``$RCA_CASES``, else ``./cases``."""
    return Path(os.environ.get("RCA_CASES") or "cases")


def rca_home() -> Path | None:
    """``$RCA_HOME`` (where zoo models live), or None for rca's default."""
    env = os.environ.get("RCA_HOME")
    return Path(env) if env else None


def reader() -> ReadOnlyStore:
    """Read-only access for one page run: every call opens the file read-only and closes it,
    retrying while the CLI (or another session) writes."""
    return Store.reader(db_path())


# ---------------------------------------------------------------------------------------------
# text


def md(value: Any, *, one_line: bool = True) -> str:
    """A case string for a widget that renders Markdown: shown as typed, never as markup
    (``rca.textsafe.streamlit_markdown``: HTML escaped, Markdown and Streamlit syntax
    backslash-escaped, URLs defanged, hidden characters shown as escapes; with ``one_line``
    newlines become spaces, so a value cannot start a new block)."""
    return streamlit_markdown(value, one_line=one_line)


def plain(value: Any) -> str:
    """A case string for a widget that shows text as it is (``st.text``, ``st.code``, a table
    cell, an option label): control, bidirectional and invisible characters shown as escapes
    (``\\x1b``, ``\\u202e``), so what is shown is what is there (``rca.textsafe.visible``)."""
    return visible(value)


def _cell(value: Any) -> Any:
    """A value for a dataframe cell of mixed type: numbers stay, text is ``plain``, a list is
    joined, the rest is JSON."""
    if value is None or isinstance(value, bool | int | float | dt.datetime):
        return value
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, list | tuple):
        return plain(", ".join(str(v) for v in value))
    return plain(json.dumps(value, default=str, sort_keys=True))


def _text(value: Any) -> str:
    """A value as text, for a column that mixes types (``-`` for missing)."""
    return "-" if value is None else str(_cell(value))


# ---------------------------------------------------------------------------------------------
# runs


def incident_fields(run: Mapping[str, Any]) -> dict[str, Any]:
    """The incident of a stored run as its case-file fields (prompt or messages, bad, good,
    focus, tags, ...): ``rca.report.case_fields``, which the reports read too."""
    return case_fields(run)


def search_text(case_data: Any) -> str | None:
    """The text of a case that the Cases search reads besides its id, title and tags: the
    prompt, or every message of a chat case."""
    data = _json(case_data)
    if not isinstance(data, Mapping):
        return None
    chat = turns(data.get("messages"))
    if chat:
        return "\n".join(content for _, content in chat)
    prompt = data.get("prompt")
    return None if prompt is None else str(prompt)


def model_labels(models: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """fingerprint -> a short readable name: the model directory's name and the fingerprint's
    first characters, e.g. ``support-bot-v1 (3fa2c1d0)``."""
    out: dict[str, str] = {}
    for m in models:
        fp = str(m["fingerprint"])
        name = Path(str(m["path"])).name if m.get("path") else "model"
        out[fp] = f"{name} ({fp[:8]})"
    return out


def runs_and_models(store: ReadOnlyStore) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every run in ``store``, newest first, and its models' labels (``model_labels``)."""
    return store.list_runs(), model_labels(store.models())


def runs_or_error(
    store: ReadOnlyStore,
) -> tuple[list[dict[str, Any]], dict[str, str], str | None]:
    """``runs_and_models`` and no error; or, when the store cannot be read, none and the error as
    Markdown for the page to show."""
    try:
        runs, models = runs_and_models(store)
    except StoreError as e:
        return [], {}, md(e)
    return runs, models, None


def run_label(run: Mapping[str, Any], models: Mapping[str, str] | None = None) -> str:
    """One line naming a run in a selectbox: case, kind, model, time and the id's start."""
    fp = str(run.get("model_fingerprint") or "")
    model = (models or {}).get(fp, fp[:8])
    when = run.get("recorded_at")
    if isinstance(when, dt.datetime):
        when_s = when.strftime("%Y-%m-%d %H:%M")
    else:  # ISO text, as the store decodes it
        when_s = str(when or "")[:16].replace("T", " ")
    rid = str(run["run_id"])[:8]
    return plain(f"{run.get('incident_id')} · {run.get('kind')} · {model} · {when_s} · {rid}")


def run_rows(
    runs: Sequence[Mapping[str, Any]],
    incidents: Sequence[Mapping[str, Any]],
    models: Mapping[str, str],
) -> list[dict[str, Any]]:
    """One row per run for the Cases table, with its incident's tags and prompt (for search;
    a chat case's messages, one per line)."""
    by_key = {(i["incident_id"], i["sha256"]): i for i in incidents}
    rows = []
    for r in runs:
        inc = by_key.get((r["incident_id"], r.get("incident_sha256")), {})
        s = summary(r)
        rows.append(
            {
                "case": r["incident_id"],
                "title": r.get("incident_title") or inc.get("title"),
                "severity": r.get("severity") or inc.get("severity"),
                "kind": r.get("kind"),
                "status": r.get("status"),
                "verdict": s.get("verdict"),
                "classification": s.get("classification"),
                "model": models.get(str(r["model_fingerprint"]), str(r["model_fingerprint"])[:8]),
                "tags": list(inc.get("tags") or []),
                "p_bad": s.get("p_bad_before"),
                "p_bad_after_fix": s.get("p_bad_after"),
                "recorded": r.get("recorded_at"),
                "run_id": r["run_id"],
                "prompt": search_text(inc.get("case_data")),
            }
        )
    return rows


def filter_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    severity: Sequence[str] = (),
    status: Sequence[str] = (),
    model: Sequence[str] = (),
    tag: Sequence[str] = (),
    kind: Sequence[str] = (),
    search: str = "",
) -> list[Mapping[str, Any]]:
    """The rows that pass every filter: an empty filter passes all; ``tag`` keeps rows with
    any of the tags; ``search`` is a case-insensitive substring of the case id, title, tags,
    verdict, model, run id or prompt."""
    needle = search.strip().lower()
    out = []
    for r in rows:
        if severity and r["severity"] not in severity:
            continue
        if status and r["status"] not in status:
            continue
        if model and r["model"] not in model:
            continue
        if kind and r["kind"] not in kind:
            continue
        if tag and not set(tag) & set(r["tags"]):
            continue
        if needle:
            hay = " ".join(
                str(r.get(k) or "")
                for k in ("case", "title", "verdict", "classification", "model", "run_id", "prompt")
            )
            hay += " " + " ".join(r["tags"])
            if needle not in hay.lower():
                continue
        out.append(r)
    return out


def severity_order(values: Iterable[str | None]) -> list[str]:
    """The severities present, in the case-file order (low .. critical), unknown ones last."""
    present = {v for v in values if v}
    return [s for s in SEVERITIES if s in present] + sorted(present - set(SEVERITIES))


# ---------------------------------------------------------------------------------------------
# evidence


def heat_strip(token_scores: Sequence[Mapping[str, Any]]) -> str:
    """The prompt as a strip of tokens shaded by attribution (red toward the bad continuation,
    blue against), as HTML. Tokens are escaped; newlines show as ⏎ so the strip stays one
    HTML block that Markdown leaves alone, control and invisible characters as escapes."""
    toks = sorted(token_scores, key=lambda t: int(t["position"]))
    vmax = max((abs(float(t["score"] or 0.0)) for t in toks), default=1.0) or 1.0
    spans = []
    for t in toks:
        s = float(t["score"] or 0.0)
        alpha = min(1.0, abs(s) / vmax)
        text = html_text(re.sub(r"\r\n|\r|\n", "⏎", str(t["token"])))
        spans.append(
            f'<span class="rca-tok" title="{int(t["position"])}: {s:+.4f}" '
            f'style="background:rgba({POSITIVE if s > 0 else NEGATIVE},{alpha:.2f});'
            "white-space:pre;font-family:monospace;padding:2px 1px;margin:1px 0;"
            f'border-radius:3px;display:inline-block">{text}</span>'
        )
    return '<div class="rca-strip" style="line-height:2.1">' + "".join(spans) + "</div>"


def graph_html(nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]]) -> str:
    """The attribution graph as inline SVG (``rca.report.graph_svg``, escaped by
    construction) in one ``<div>`` block, layers left to right."""
    svg = graph_svg(nodes, edges) if edges else "<p>No edges were recorded for this run.</p>"
    return '<div class="rca-graph" style="overflow-x:auto">' + svg.replace("\n", " ") + "</div>"


def node_options(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Node ids for the picker: ranked causes first (by rank), then the rest by |score|."""

    def key(n: Mapping[str, Any]) -> tuple[int, float, str]:
        rank = n.get("rank")
        score = n.get("score")
        mag = abs(float(score)) if score is not None and not math.isnan(float(score)) else 0.0
        return (int(rank) if rank is not None else 10**9, -mag, str(n["node_id"]))

    seen: dict[str, None] = {}
    for n in sorted(nodes, key=key):
        seen.setdefault(str(n["node_id"]), None)
    return list(seen)


def node_details(nodes: Sequence[Mapping[str, Any]], node_id: str) -> list[dict[str, Any]]:
    """The node's stored fields as (field, value) rows; a node traced by several methods gives
    one value column per row of the store."""
    rows = [n for n in nodes if n["node_id"] == node_id]
    keys = [k for k in (rows[0] if rows else {}) if k not in ("row_no",)]
    return [
        {"field": k, **{f"value {i + 1}": _text(r.get(k)) for i, r in enumerate(rows)}}
        for k in keys
    ]


def node_edges(
    edges: Sequence[Mapping[str, Any]], node_id: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The edges into and out of a node, strongest first, as table rows."""

    def rows(which: str, other: str) -> list[dict[str, Any]]:
        picked = [e for e in edges if e[which] == node_id]
        picked.sort(key=lambda e: -abs(float(e["score"] or 0.0)))
        return [{other: e[other], "score": e["score"]} for e in picked]

    return rows("target", "source"), rows("source", "target")


def node_ablations(ablations: Sequence[Mapping[str, Any]], node_id: str) -> list[dict[str, Any]]:
    """Every ablation experiment whose components include the node (its own effects and the
    sets it belongs to)."""
    out = []
    for a in ablations:
        comps = list(a.get("components") or [])
        if node_id in comps:
            out.append(
                {
                    "experiment": a["experiment"],
                    "components": ", ".join(comps),
                    "kind": a.get("kind"),
                    "effect": a.get("effect"),
                    "metric": a.get("metric"),
                    "p_value": a.get("p_value"),
                }
            )
    return out


def ablation_evidence(
    ablations: Sequence[Mapping[str, Any]],
) -> tuple[Mapping[str, Any] | None, list[float], list[dict[str, Any]]]:
    """The cause set's row, the random-set drops, and one row per single-component experiment
    (component, experiment, effect) for the charts of the Ablations section."""
    cause = next((a for a in ablations if a["experiment"] == "cause_set"), None)
    random_drops = [
        float(a["effect"])
        for a in ablations
        if a["experiment"] == "random_set" and a.get("effect") is not None
    ]
    single = [
        {
            "component": a["components"][0],
            "experiment": a["experiment"],
            "effect": a.get("effect"),
            "p_value": a.get("p_value"),
        }
        for a in ablations
        if a["experiment"] in ("total_effect", "direct_effect", "necessity")
        and len(a.get("components") or []) == 1
    ]
    return cause, random_drops, single


def remedy_rows(remedies: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The remediation table: each fix tried, what it does to P(bad) and its side effects."""
    rows = []
    for r in remedies:
        side = _json(r.get("side_effect"))
        side = side if isinstance(side, Mapping) else {}
        rows.append(
            {
                "recommended": bool(r.get("recommended")),
                "fix": r.get("kind"),
                "components": ", ".join(_json(r.get("components")) or []),
                "P(bad) before": r.get("p_bad_before"),
                "P(bad) after": r.get("p_bad_after"),
                "KL (benign)": side.get("kl_mean"),
                "benign loss change %": side.get("loss_change_pct"),
                "note": r.get("note"),
            }
        )
    return rows


def behaviour_rows(
    run: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """A behaviour's two tables (``rca.report.stored.behaviour_of``): per fix its fit and
    held-out figures, and per variant P(bad) before and after each fix. None for a
    single-prompt run."""
    b = behaviour_of(run)
    if b is None or not b["fixes"]:
        return None
    fixes = [
        {
            "recommended": f["recommended"],
            "fix": f["kind"],
            "fit: under target": (f.get("fit") or {}).get("share_under_target"),
            "fit prompts": (f.get("fit") or {}).get("n"),
            "held out: under target": (f.get("held_out") or {}).get("share_under_target"),
            "held-out variants": (f.get("held_out") or {}).get("n"),
            "held out: P(bad) before": (f.get("held_out") or {}).get("mean_p_bad_before"),
            "held out: P(bad) after": (f.get("held_out") or {}).get("mean_p_bad_after"),
            "symptom patch": bool(f.get("symptom_patch")),
        }
        for f in b["fixes"]
    ]
    kinds = [str(f["kind"]) for f in b["fixes"]]
    variants = [
        {
            "variant": v["index"],
            "set": v["part"],
            "slots": v["label"],
            "P(bad)": v["p_bad"],
            **{f"after {k}": v["after"].get(k) for k in kinds},
        }
        for v in b["variants"]
    ]
    return fixes, variants


def decoding_rows(decoding: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The greedy-decoding check as table rows: each token of the bad continuation with its
    teacher-forced probability, next to what greedy decoding produced at that step."""
    return [
        {
            "token": t.get("token"),
            "P (teacher-forced)": t.get("p"),
            "in focus": bool(t.get("in_focus")),
            "greedy token": t.get("greedy_token"),
            "greedy P": t.get("greedy_p"),
        }
        for t in decoding.get("tokens") or []
        if isinstance(t, Mapping)
    ]


def cell_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every value made dataframe-safe (text ``plain``, lists joined, dicts as
    JSON)."""
    return [{k: _cell(v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------------------------------------
# monitors

# (column label, key of a figures dict): the figures a monitor's tables show
FIGURES = (
    ("precision", "precision"),
    ("recall", "recall"),
    ("FPR", "fpr"),
    ("AUROC", "auroc"),
    ("FPR@TPR95", "fpr_at_tpr95"),
)
STALE = "⚠ stale"


def _figures(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def figure_cells(
    figures: Any, prefix: str = "", labels: Sequence[str] = ("precision", "recall", "FPR", "AUROC")
) -> dict[str, Any]:
    """The figures dict's ``labels`` columns (of ``FIGURES``) as table cells, each named with
    ``prefix``; missing figures are None."""
    f = _figures(figures)
    return {f"{prefix}{label}": f.get(key) for label, key in FIGURES if label in labels}


def site_text(sites: Any) -> str:
    """A monitor's sites in one line, each with its role and position rule:
    ``L1.H0 (writer, last), L0.MLP (entry, max)``."""
    return ", ".join(
        f"{s.get('id')} ({s.get('role')}, {s.get('rule')})"
        for s in sites or []
        if isinstance(s, Mapping)
    )


def eval_status(ev: Mapping[str, Any] | None) -> str:
    """What an evaluation found, in a word: ``⚠ stale`` (the monitor no longer flags the
    incident), ``fires`` (a checkpoint where it still does), ``incident gone`` (a checkpoint
    where the incident no longer shows), ``ok`` (judged on its held-out prompts)."""
    if ev is None:
        return "not evaluated"
    if ev.get("stale"):
        return STALE
    if ev.get("kind") == "regress":
        return "incident gone" if ev.get("stale") is None else "fires"
    return "ok"


def monitor_label(m: Mapping[str, Any], models: Mapping[str, str] | None = None) -> str:
    """One line naming a monitor in a selectbox: case, model, sites, the id's start."""
    fp = str(m.get("model_fingerprint") or "")
    model = (models or {}).get(fp, fp[:8])
    sites = ", ".join(str(s.get("id")) for s in m.get("site_specs") or [] if isinstance(s, Mapping))
    return plain(f"{m.get('incident_id')} · {model} · {sites} · {str(m['monitor_id'])[:8]}")


def monitor_rows(
    monitors: Sequence[Mapping[str, Any]], models: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One row per monitor (``ReadOnlyStore.list_monitors``): its case, model, sites,
    threshold, figures on the fit prompts, its latest evaluation (kind, status, figures,
    reason) and its number of alerts."""
    rows = []
    for m in monitors:
        ev = m.get("latest_eval")
        fp = str(m.get("model_fingerprint") or "")
        rows.append(
            {
                "case": m.get("incident_id"),
                "model": models.get(fp, fp[:8]),
                "sites": site_text(m.get("site_specs")),
                "threshold": m.get("threshold"),
                "target FPR": m.get("target_fpr"),
                **figure_cells(m.get("fit"), "fit "),
                "latest": ev.get("kind") if ev else None,
                "status": eval_status(ev),
                **figure_cells(ev.get("figures") if ev else None, "latest "),
                "reason": ev.get("reason") if ev else None,
                "evaluated": ev.get("evaluated_at") if ev else None,
                "alerts": m.get("n_alerts"),
                "created": m.get("created_at"),
                "monitor_id": m.get("monitor_id"),
            }
        )
    return rows


def held_out_rows(ev: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A held-out evaluation with its baselines side by side: one row per figure, one column
    per detector (the monitor, then ``output check`` and ``prompt text`` where recorded); the
    false-positive figures also against the counterfactuals and the benign prompts alone."""
    detectors: dict[str, Mapping[str, Any]] = {"monitor": _figures(ev.get("figures"))}
    for name, f in _figures(ev.get("baselines")).items():
        detectors[str(name).replace("_", " ")] = _figures(f)
    figures = [
        ("positives", "", "n_positive"),
        ("negatives", "", "n_negative"),
        *((label, "", key) for label, key in FIGURES),
        *(
            (f"{label} vs {part}", f"against_{part}", key)
            for part in ("counterfactuals", "benign")
            for label, key in (("FPR", "fpr"), ("AUROC", "auroc"))
        ),
    ]
    rows = []
    for label, part, key in figures:
        cells = {
            name: (_figures(f.get(part)) if part else f).get(key) for name, f in detectors.items()
        }
        if any(v is not None for v in cells.values()):
            rows.append({"figure": label, **cells})
    return rows


def regress_rows(
    evals: Sequence[Mapping[str, Any]], models: Mapping[str, str]
) -> list[dict[str, Any]]:
    """A monitor's evaluations on other checkpoints (kind ``regress``, from ``rca regress``),
    grouped by model, oldest first within one: status, figures and the reason."""
    rows = []
    for ev in evals:
        if ev.get("kind") != "regress":
            continue
        fp = str(ev.get("model_fingerprint") or "")
        f = _figures(ev.get("figures"))
        rows.append(
            {
                "model": models.get(fp, fp[:8]),
                "evaluated": ev.get("evaluated_at"),
                "status": eval_status(ev),
                **figure_cells(f),
                "positives": f.get("n_positive"),
                "negatives": f.get("n_negative"),
                "reason": ev.get("reason"),
                "fingerprint": fp,
            }
        )
    rows.sort(key=lambda r: (str(r["model"]), str(r["evaluated"] or "")))
    return rows


def alert_rows(
    alerts: Sequence[Mapping[str, Any]], models: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One row per alert, oldest first: when, score, the generation step (None: the prompt
    itself), the sites read, the prompt's hash, the model and the batch; the prompt's text
    only where ``rca monitor run --store-text`` kept it (no column where no alert has it)."""
    keep = any(a.get("text") is not None for a in alerts)
    rows = []
    for a in alerts:
        fp = str(a.get("model_fingerprint") or "")
        row = {
            "alerted": a.get("alerted_at"),
            "score": a.get("score"),
            "step": a.get("step"),
            "sites": list(a.get("sites") or []),
            "prompt sha256": a.get("prompt_sha256"),
            "model": models.get(fp, fp[:8]),
            "batch": str(a.get("batch_id") or "")[:8],
        }
        if keep:
            row["text"] = a.get("text")
        rows.append(row)
    return rows


def alerts_per_day(alerts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alerts per UTC day (``YYYY-MM-DD``), in order, for the alerts chart."""
    days: dict[str, int] = {}
    for a in alerts:
        day = str(a.get("alerted_at") or "")[:10]
        days[day] = days.get(day, 0) + 1
    return [{"day": d, "alerts": n} for d, n in sorted(days.items())]
