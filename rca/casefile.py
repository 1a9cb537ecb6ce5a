"""The case file: a stored run as Markdown or as one self-contained HTML page.

Input is the dict ``ReadOnlyStore.get_run`` returns, so a report is always of what was
recorded. The HTML has no external asset (no script, no stylesheet link, no font), draws the
attribution graph as inline SVG (layers left to right), and escapes every string that came from
a prompt, a model or a case file: such strings are data, never markup.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_markdown", "render_html", "graph_svg"]


def _j(v: Any) -> Any:
    """A JSON column as Python data (the store may hand back text)."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _md(v: Any) -> str:
    """Text for a Markdown table cell: HTML-escaped, pipes and newlines neutralised."""
    return _e(v).replace("|", "&#124;").replace("\n", " ").replace("`", "&#96;")


def _fence(text: str) -> str:
    """A fenced block longer than any backtick run in ``text``, so it cannot be closed early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text}\n{f}"


def _f(v: Any, spec: str = "+.3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _incident(run: Mapping[str, Any]) -> dict[str, Any]:
    inc = run.get("incident") or {}
    fields = _j(inc.get("fields")) or {}
    return {**inc, **(fields if isinstance(fields, dict) else {})}


def _causes(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    ranked = [n for n in run.get("nodes", []) if n.get("rank") is not None]
    return sorted(ranked, key=lambda n: n["rank"])


# ---------------------------------------------------------------------------------------------
# the graph


def graph_svg(
    nodes: Sequence[Mapping[str, Any]],
    edges: Sequence[Mapping[str, Any]],
    *,
    max_edges: int = 60,
    width: int = 900,
    height: int = 420,
) -> str:
    """Inline SVG of the strongest edges: layers left to right, tokens first, LOGITS last.

    Edge width follows |score|; red pushes toward the bad continuation, blue against it.
    """
    top = sorted(edges, key=lambda e: -abs(float(e["score"])))[:max_edges]
    used = {e["source"] for e in top} | {e["target"] for e in top}
    scores = {n["node_id"]: float(n.get("score") or 0.0) for n in nodes}

    def layer(nid: str) -> float:
        if nid.startswith("EMB"):
            return -1
        if nid == "LOGITS":
            return 1e9
        return int(nid[1:].split(".")[0]) + (0.5 if nid.endswith("MLP") else 0.0)

    def order(nid: str) -> tuple[float, int]:
        m = re.search(r"[@H](\d+)$", nid)
        return (layer(nid), int(m.group(1)) if m else 0)

    cols: dict[float, list[str]] = {}
    for nid in sorted(used, key=order):
        cols.setdefault(layer(nid), []).append(nid)
    xs = sorted(cols)
    pos: dict[str, tuple[float, float]] = {}
    for i, col in enumerate(xs):
        x = 40 + (width - 80) * (i / max(1, len(xs) - 1))
        members = cols[col]
        for j, nid in enumerate(members):
            y = 30 + (height - 60) * ((j + 0.5) / len(members))
            pos[nid] = (x, y)
    wmax = max((abs(float(e["score"])) for e in top), default=1.0) or 1.0
    smax = max((abs(v) for v in scores.values()), default=1.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="attribution graph">',
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>',
    ]
    for e in top:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        s = float(e["score"])
        color = "#c0392b" if s > 0 else "#2e6fba"
        w = 0.5 + 5 * abs(s) / wmax
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
            f'stroke-width="{w:.2f}" stroke-opacity="0.55"><title>{_e(e["source"])} &#8594; '
            f"{_e(e['target'])}: {s:+.4f}</title></line>"
        )
    for nid, (x, y) in pos.items():
        s = scores.get(nid, 0.0)
        a = min(1.0, abs(s) / smax)
        fill = f"rgba(192,57,43,{a:.2f})" if s > 0 else f"rgba(46,111,186,{a:.2f})"
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="{fill}" stroke="#333">'
            f"<title>{_e(nid)}: {s:+.4f}</title></circle>"
        )
        parts.append(
            f'<text x="{x:.1f}" y="{y - 12:.1f}" font-size="10" text-anchor="middle" '
            f'font-family="sans-serif">{_e(nid)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------


def render_markdown(run: Mapping[str, Any]) -> str:
    inc = _incident(run)
    model = run.get("model") or {}
    summary = _j(run.get("summary")) or {}
    versions = _j(run.get("versions")) or {}
    lines = [
        f"# Case {_md(inc.get('id') or run.get('incident_id'))}: {_md(inc.get('title'))}",
        "",
        f"- run `{_md(run.get('run_id'))}` ({_md(run.get('kind'))}, "
        f"status {_md(run.get('status'))}),"
        f" recorded {_md(run.get('recorded_at') or run.get('finished_at'))}",
        f"- severity **{_md(inc.get('severity'))}**; verdict **{_md(summary.get('verdict'))}**",
        "",
        "## Incident",
        "",
        "Prompt:",
        "",
        _fence(str(inc.get("prompt", ""))),
        "",
        "Bad continuation:",
        "",
        _fence(str(inc.get("bad", ""))),
    ]
    if inc.get("good"):
        lines += ["", "Good continuation:", "", _fence(str(inc["good"]))]
    cf = summary.get("counterfactual") or {}
    if cf:
        lines += [
            "",
            f"Counterfactual ({'generated' if cf.get('generated') else 'given'}, removes "
            f"{_f(cf.get('drop'), '.0%')} of the metric):",
            "",
            _fence(str(cf.get("text", ""))),
        ]
    lines += [
        "",
        "## Model and environment",
        "",
        f"- fingerprint `{_md(model.get('fingerprint') or run.get('model_fingerprint'))}`",
        f"- architecture {_md(model.get('architecture'))}, {_md(model.get('n_params'))} parameters,"
        f" path `{_md(model.get('path'))}`",
        f"- device {_md(run.get('device'))}, seed {_md(run.get('seed'))}",
        "- versions: " + ", ".join(f"{_md(k)} {_md(v)}" for k, v in sorted(versions.items())),
        "",
        "## Token attribution",
        "",
        "| position | token | score |",
        "|---:|---|---:|",
    ]
    for t in run.get("token_scores", []):
        lines.append(f"| {t['position']} | `{_md(t['token'])}` | {_f(t['score'])} |")
    lines += [
        "",
        "## Causes",
        "",
        f"Cause set: **{_md(', '.join(summary.get('cause_set') or []))}**. "
        f"{_md(summary.get('set_reason'))}",
        "",
        "| rank | component | attribution | total effect | direct effect | necessity | p "
        "| verdict |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in _causes(run):
        lines.append(
            f"| {c['rank']} | {_md(c['node_id'])} | {_f(c.get('score'))} | "
            f"{_f(c.get('total_effect'))} | {_f(c.get('direct_effect'))} | "
            f"{_f(c.get('necessity'))} | {_f(c.get('p_value'), '.3f')} | {_md(c.get('verdict'))} |"
        )
    lines += ["", "## Remediation", ""]
    for r in run.get("remedies", []):
        mark = " (recommended)" if r.get("recommended") else ""
        lines.append(f"- **{_md(r['kind'])}**{mark}: {_md(r.get('note'))}")
    lines += ["", "## Notes", ""]
    notes = run.get("notes", [])
    if not notes:
        lines.append("No notes yet (`rca notes add RUN --author A --text T`).")
    for n in notes:
        lines.append(f"- {_md(n.get('created_at'))}, {_md(n.get('author'))}: {_md(n.get('text'))}")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap;word-break:break-word}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em}
.tok{display:inline-block;padding:.1em .25em;margin:1px;border-radius:3px;font-family:monospace}
.verdict{font-weight:bold}.rec{background:#e8f6e8}
"""


def render_html(run: Mapping[str, Any]) -> str:
    """One self-contained HTML page: inline CSS and SVG only, every string escaped."""
    inc = _incident(run)
    model = run.get("model") or {}
    summary = _j(run.get("summary")) or {}
    toks = run.get("token_scores", [])
    tmax = max((abs(float(t["score"])) for t in toks), default=1.0) or 1.0
    strip = "".join(
        f'<span class="tok" title="{_e(t["position"])}: {float(t["score"]):+.4f}" '
        f'style="background:rgba({"192,57,43" if float(t["score"]) > 0 else "46,111,186"},'
        f'{min(1.0, abs(float(t["score"])) / tmax):.2f})">{_e(t["token"])}</span>'
        for t in toks
    )
    causes = "".join(
        f"<tr><td>{c['rank']}</td><td>{_e(c['node_id'])}</td><td>{_f(c.get('score'))}</td>"
        f"<td>{_f(c.get('total_effect'))}</td><td>{_f(c.get('direct_effect'))}</td>"
        f"<td>{_f(c.get('necessity'))}</td><td>{_f(c.get('p_value'), '.3f')}</td>"
        f"<td>{_e(c.get('verdict'))}</td><td>{_e(c.get('reason'))}</td></tr>"
        for c in _causes(run)
    )
    rems = "".join(
        f'<tr class="{"rec" if r.get("recommended") else ""}"><td>{_e(r["kind"])}</td>'
        f"<td>{_e(', '.join(_j(r.get('components')) or []))}</td>"
        f"<td>{_f(r.get('p_bad_before'), '.3f')} &#8594; {_f(r.get('p_bad_after'), '.3f')}</td>"
        f"<td>{_f((_j(r.get('side_effect')) or {}).get('loss_change_pct'), '+.2f')}%</td>"
        f"<td>{_e(r.get('note'))}</td></tr>"
        for r in run.get("remedies", [])
    )
    notes = (
        "".join(
            f"<li>{_e(n.get('created_at'))}, <b>{_e(n.get('author'))}</b>: {_e(n.get('text'))}</li>"
            for n in run.get("notes", [])
        )
        or "<li>No notes yet.</li>"
    )
    cf = summary.get("counterfactual") or {}
    good = f"<h3>Good continuation</h3><pre>{_e(inc.get('good'))}</pre>" if inc.get("good") else ""
    cf_html = (
        f"<h3>Counterfactual ({'generated' if cf.get('generated') else 'given'})</h3>"
        f"<pre>{_e(cf.get('text'))}</pre>"
        if cf
        else ""
    )
    svg = graph_svg(run.get("nodes", []), run.get("edges", []))
    title = f"Case {inc.get('id') or run.get('incident_id')}: {inc.get('title')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{_e(title)}</title><style>{_CSS}</style></head><body>
<h1>{_e(title)}</h1>
<p>Run <code>{_e(run.get("run_id"))}</code>, severity <b>{_e(inc.get("severity"))}</b>,
verdict <span class="verdict">{_e(summary.get("verdict"))}</span>.
P(bad) {_f(summary.get("p_bad_before"), ".3f")} &#8594; {_f(summary.get("p_bad_after"), ".3f")}
after the recommended fix.</p>
<h2>Incident</h2><h3>Prompt</h3><pre>{_e(inc.get("prompt"))}</pre>
<h3>Bad continuation</h3><pre>{_e(inc.get("bad"))}</pre>{good}{cf_html}
<h2>Model and environment</h2>
<table><tr><th>fingerprint</th><td><code>{_e(model.get("fingerprint"))}</code></td></tr>
<tr><th>architecture</th><td>{_e(model.get("architecture"))}</td></tr>
<tr><th>parameters</th><td>{_e(model.get("n_params"))}</td></tr>
<tr><th>path</th><td>{_e(model.get("path"))}</td></tr>
<tr><th>device, seed</th><td>{_e(run.get("device"))}, {_e(run.get("seed"))}</td></tr>
<tr><th>versions</th><td>{_e(json.dumps(_j(run.get("versions")) or {}, sort_keys=True))}</td></tr>
</table>
<h2>Token attribution</h2><p>{strip}</p>
<h2>Attribution graph</h2>{svg}
<h2>Causes</h2><p>Cause set: <b>{_e(", ".join(summary.get("cause_set") or []))}</b>.
{_e(summary.get("set_reason"))}</p>
<table><tr><th>rank</th><th>component</th><th>attribution</th><th>TE</th><th>DE</th>
<th>necessity</th><th>p</th><th>verdict</th><th>reason</th></tr>{causes}</table>
<h2>Remediation</h2>
<table><tr><th>fix</th><th>components</th><th>P(bad)</th><th>benign loss</th><th>note</th></tr>
{rems}</table>
<h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# the regression report


def _top(items: Any) -> str:
    return ", ".join(items or []) or "-"


def render_regression_markdown(results: Sequence[Mapping[str, Any]], *, model: str = "") -> str:
    """A table of incidents and classes, then each incident's two mechanisms side by side."""
    lines = [
        "# Regression check",
        "",
        f"New model `{_md(model)}`." if model else "",
        "",
        "| case | severity | class | P(bad) reference → new | cause-set Jaccard | Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.get("comparison") or {}
        lines.append(
            f"| {_md(r['case_id'])} | {_md(r['severity'])} | **{_md(r['classification'])}** | "
            f"{_f(r.get('p_bad_reference'), '.3f')} → {_f(r.get('p_bad_new'), '.3f')} | "
            f"{_f(c.get('jaccard_cause_set'), '.2f')} | {_f(c.get('spearman'), '.2f')} |"
        )
    for r in results:
        lines += [
            "",
            f"## {_md(r['case_id'])}: {_md(r['title'])}",
            "",
            _md(r["reason"]),
            "",
            "| | reference run | new model |",
            "|---|---|---|",
            f"| run | `{_md(r.get('reference_run_id'))}` | `{_md(r.get('run_id'))}` |",
            f"| cause set | {_md(_top(r.get('cause_set_reference')))} | "
            f"{_md(_top(r.get('cause_set_new')))} |",
            f"| top components | {_md(_top(r.get('top_reference')))} | "
            f"{_md(_top(r.get('top_new')))} |",
        ]
        wc = r.get("weight_change")
        if wc:
            lines += [
                "",
                "Weight change since the baseline checkpoint (revert drop: the metric lost when "
                "the component's weights are set back):",
                "",
                "| rank | component | first order | revert drop |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c['rank']} | {_md(c['id'])} | {_f(c['first_order'])} | "
                f"{_f(c['revert_drop'])} |"
                for c in wc["components"]
            ]
    return "\n".join(lines) + "\n"


def render_regression_html(results: Sequence[Mapping[str, Any]], *, model: str = "") -> str:
    """The regression report as one self-contained, escaped HTML page."""
    rows = "".join(
        f"<tr><td>{_e(r['case_id'])}</td><td>{_e(r['severity'])}</td>"
        f'<td class="verdict">{_e(r["classification"])}</td>'
        f"<td>{_f(r.get('p_bad_reference'), '.3f')} &#8594; {_f(r.get('p_bad_new'), '.3f')}</td>"
        f"<td>{_e(_top(r.get('cause_set_reference')))}</td>"
        f"<td>{_e(_top(r.get('cause_set_new')))}</td>"
        f"<td>{_f((r.get('comparison') or {}).get('jaccard_cause_set'), '.2f')}</td>"
        f"<td>{_e(r['reason'])}</td></tr>"
        for r in results
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>Regression check</title><style>{_CSS}</style></head><body>
<h1>Regression check</h1><p>New model <code>{_e(model)}</code></p>
<table><tr><th>case</th><th>severity</th><th>class</th><th>P(bad) reference &#8594; new</th>
<th>cause set (reference)</th><th>cause set (new)</th><th>Jaccard</th><th>why</th></tr>
{rows}</table></body></html>
"""
