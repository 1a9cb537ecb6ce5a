"""The report as one self-contained HTML page, and the regression check as another.

Every string from a prompt, a model, a case file or a note is escaped (``html.escape``), with
control, bidirectional and invisible characters shown as their escapes. A page has no
external asset (no script, no stylesheet link, no font) and a Content-Security-Policy that
allows none; the attribution graph and the circuit are inline SVG (``rca.report.drawing``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rca.report.drawing import circuit_svg, graph_svg
from rca.report.stored import (
    behaviour_of,
    case_fields,
    circuit_lines,
    circuit_of,
    fit_evidence_lines,
    infrastructure_sentence,
    provenance_of,
    token_warning,
    turns,
    verdict_words,
)
from rca.report.stored import json_column as _j
from rca.report.stored import names_or_dash as _top
from rca.report.stored import number as _f
from rca.report.stored import percent as _pct
from rca.report.stored import ranked_causes as _causes
from rca.report.stored import summary_of as _summary
from rca.report.stored import token_start as _token_start
from rca.report.stored import yes_no as _yes
from rca.textsafe import html_text as _e

__all__ = ["render_html", "render_regression_html"]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap;word-break:break-word}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em}
.tok{display:inline-block;padding:.1em .25em;margin:1px;border-radius:3px;font-family:monospace}
.verdict{font-weight:bold}.rec{background:#e8f6e8}
.turn{border-left:4px solid #9aa5b1;margin:.5em 0;padding-left:.6em}
.turn .role{font-size:.8em;font-weight:bold;text-transform:uppercase;color:#555}
.turn.system{border-color:#b9770e;background:#fdf6e3}.turn.system pre{background:#f7ecd0}
.turn.assistant{border-color:#2e6fba}mark{background:#f5c6c0}
details{margin:.5em 0}summary{cursor:pointer;color:#555}td code{white-space:pre}
.warn{background:#fdf6e3;border-left:4px solid #b9770e;padding:.3em .6em}
"""
_ROLE_CLASS = {"system": "system", "user": "user", "assistant": "assistant"}


def _input_html(*, text: Any, messages: Any, seen: Any) -> str:
    """A prompt or counterfactual as given (its text, or a chat's turns, system turns set
    apart), then what the model saw, collapsed, when that is not the text as given."""
    chat = turns(messages)
    if chat:
        body = "".join(
            f'<div class="turn {_ROLE_CLASS.get(role, "other")}"><div class="role">{_e(role)}'
            f"</div><pre>{_e(content)}</pre></div>"
            for role, content in chat
        )
    else:
        body = f"<pre>{_e(text)}</pre>"
    if seen and (chat or seen != text):
        how = "the conversation in the model's chat template" if chat else "the exact text"
        body += (
            f"<details><summary>What the model saw ({how})</summary><pre>{_e(seen)}</pre></details>"
        )
    return body


def _bad_html(bad: Any, focus: Any) -> str:
    """The bad continuation with its focus (the part the metric reads) marked."""
    bad = "" if bad is None else str(bad)
    at = bad.find(focus) if focus else -1
    if at < 0:
        return f"<h3>Bad continuation</h3><pre>{_e(bad)}</pre>"
    end = at + len(focus)
    return (
        f"<h3>Bad continuation</h3><pre>{_e(bad[:at])}<mark>{_e(focus)}</mark>"
        f"{_e(bad[end:])}</pre><p>Focus (marked; the part the metric reads): "
        f"<code>{_e(focus)}</code></p>"
    )


def _decoding_html(dec: Any) -> str:
    if not isinstance(dec, Mapping):
        return ""
    limit = dec.get("max_new_tokens")
    focus = dec.get("reproduces_focus")
    rows = "".join(
        f"<tr><td>{i}</td><td><code>{_e(t.get('token'))}</code></td>"
        f"<td>{_f(t.get('p'), '.3g')}</td><td>{'yes' if t.get('in_focus') else ''}</td>"
        f"<td><code>{_e(t.get('greedy_token'))}</code></td>"
        f"<td>{_f(t.get('greedy_p'), '.3g')}</td></tr>"
        for i, t in enumerate(t for t in dec.get("tokens") or [] if isinstance(t, Mapping))
    )
    table = (
        "<p>Each token of the bad continuation with its teacher-forced probability, next to the "
        "token greedy decoding produced at that step.</p><table><tr><th>#</th><th>token</th>"
        "<th>P (teacher-forced)</th><th>in focus</th><th>greedy token</th><th>greedy P</th></tr>"
        f"{rows}</table>"
        if rows
        else ""
    )
    return (
        "<h2>Greedy decoding</h2><p>Greedy decoding from the prompt"
        + (f" ({int(limit)} new tokens at most)" if limit is not None else "")
        + f" reproduces the bad continuation: <b>{_yes(dec.get('reproduces'))}</b>"
        + (f"; the focus: <b>{_yes(focus)}</b>" if focus is not None else "")
        + f".</p><h3>Greedy text</h3><pre>{_e(dec.get('greedy_text'))}</pre>{table}"
    )


def _fit_evidence_html(run: Mapping[str, Any]) -> str:
    """The verdict measured on the fit variants (``rca.report.stored.fit_evidence_lines``)."""
    got = fit_evidence_lines(run)
    if got is None:
        return ""
    text, rows = got
    body = "".join(
        f"<tr><td>{_e(r['id'])}</td><td>{'yes' if r['in_set'] else 'no'}</td>"
        f"<td>{_f(r['mean'], '.2f')} ({_f(r['ci'][0], '.2f')} to {_f(r['ci'][1], '.2f')})</td>"
        f"<td>{'-' if r.get('holds') is None else format(float(r['holds']), '.0%')}</td>"
        f"<td>{'-' if r['consistency'] is None else format(float(r['consistency']), '.0%')}</td>"
        "</tr>"
        for r in rows
    )
    return (
        "<h2>On the fit variants</h2>"
        + "".join(f"<p>{_e(t)}</p>" for t in text)
        + "<table><tr><th>component</th><th>in the cause set</th>"
        "<th>share of the gap, mean (95% interval)</th><th>holds on</th><th>necessary on</th>"
        "</tr>" + body + "</table>"
    )


def _behaviour_html(run: Mapping[str, Any]) -> str:
    """The fixes on the case's variants (``rca.report.stored.behaviour_of``)."""
    b = behaviour_of(run)
    if b is None or not b["fixes"]:
        return ""
    first, split = b["fixes"][0], b["split"]

    def share(v: Any) -> str:
        return "-" if v is None else f"{float(v):.0%}"

    fixes = "".join(
        f'<tr class="{"rec" if f["recommended"] else ""}"><td>{_e(f["kind"])}</td>'
        f"<td>{share((f.get('fit') or {}).get('share_under_target'))} of "
        f"{_e((f.get('fit') or {}).get('n'))}</td>"
        f"<td>{share((f.get('held_out') or {}).get('share_under_target'))} of "
        f"{_e((f.get('held_out') or {}).get('n'))}</td>"
        f"<td>{_f((f.get('held_out') or {}).get('mean_p_bad_before'), '.3f')} &#8594; "
        f"{_f((f.get('held_out') or {}).get('mean_p_bad_after'), '.3f')}</td>"
        f"<td>{'yes' if f.get('symptom_patch') else 'no'}</td></tr>"
        for f in b["fixes"]
    )
    kinds = [str(f["kind"]) for f in b["fixes"]]
    rows = "".join(
        f"<tr><td>{v['index']}</td><td>{_e(v['part'])}</td><td>{_e(v['label'] or '-')}</td>"
        f"<td>{_f(v['p_bad'], '.3f')}</td>"
        + "".join(f"<td>{_f(v['after'].get(k), '.3f')}</td>" for k in kinds)
        + "</tr>"
        for v in b["variants"]
    )
    return (
        "<h3>On the variants</h3><p>"
        + _e(
            "Each fix was fit on the incident prompt and the fit variants and scored on the "
            f"held-out variants, which chose nothing (split seed {split.get('seed')}, held-out "
            f"share {split.get('held_out')}). A fix holds on a set where P(bad) is under "
            f"{first.get('p_bad_target')} on at least {share(first.get('hold_share'))} of it; "
            "one that holds on the fit set and not on the held-out variants is a symptom patch, "
            "never recommended."
        )
        + "</p><table><tr><th>fix</th><th>fit: under target</th><th>held out: under target</th>"
        "<th>held out: mean P(bad)</th><th>symptom patch</th></tr>"
        + fixes
        + "</table><p>P(bad) per variant, before and after each fix:</p><table><tr>"
        "<th>variant</th><th>set</th><th>slots</th><th>P(bad)</th>"
        + "".join(f"<th>{_e(k)}</th>" for k in kinds)
        + "</tr>"
        + rows
        + "</table>"
    )


def _provenance_html(run: Mapping[str, Any]) -> str:
    p = provenance_of(run)
    if p is None:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r['rank'])}</td><td>{_e(r['index'])}</td><td>{_f(r['score'], '.4g')}</td>"
        f"<td><code>{_e(r['text'])}</code></td></tr>"
        for r in p["rows"]
    )
    sources = f"<p>{_e(p['sources'])}</p>" if p["sources"] else ""
    sources += f"<p>{_e(p['ensemble'])}</p>" if p["ensemble"] else ""
    sources += f"<p>{_e(p['unlearning'])}</p>" if p["unlearning"] else ""
    return (
        f"<h2>Training data</h2><p>{_e(p['heading'])}.</p>{sources}"
        "<table><tr><th>rank</th><th>example</th><th>score</th><th>text</th></tr>"
        f"{rows}</table>"
    )


def render_html(run: Mapping[str, Any]) -> str:
    """One self-contained HTML page: inline CSS and SVG only, every string escaped."""
    inc = case_fields(run)
    model = run.get("model") or {}
    summary = _summary(run)
    toks = run.get("token_scores", [])
    tmax = max((abs(float(t["score"])) for t in toks), default=1.0) or 1.0
    strip = "".join(
        f'<span class="tok" title="{_e(t["position"])}: {float(t["score"]):+.4f}" '
        f'style="background:rgba({"192,57,43" if float(t["score"]) > 0 else "46,111,186"},'
        f'{min(1.0, abs(float(t["score"])) / tmax):.2f})">{_e(t["token"])}</span>'
        for t in toks
    )
    warn = token_warning(summary.get("token_completeness"))
    start = _token_start(summary.get("token_completeness"))
    token_note = (f"<p>{_e(start)}</p>" if start else "") + (
        f'<p class="warn"><b>Warning:</b> {_e(warn)}.</p>' if warn else ""
    )
    causes = "".join(
        f"<tr><td>{c['rank']}</td><td>{_e(c['node_id'])}</td><td>{_f(c.get('score'))}</td>"
        f"<td>{_f(c.get('total_effect'))}</td><td>{_f(c.get('direct_effect'))}</td>"
        f"<td>{_f(c.get('necessity'))}</td><td>{_f(c.get('p_value'), '.3f')}</td>"
        f"<td>{_pct(c.get('benign_loss_pct'))}</td>"
        f"<td>{_e(c.get('verdict'))}</td><td>{_e(c.get('reason'))}</td></tr>"
        for c in _causes(run)
    )
    infra = infrastructure_sentence(run)
    infra_html = f"<p>{_e(infra)}</p>" if infra else ""
    circuit = circuit_of(run)
    circuit_html = ""
    if circuit is not None:
        text = circuit_lines(circuit)
        rows = "".join(
            f"<tr><td>{int(r['k'])}</td><td>{_f(r.get('circuit'), '.0%')}</td>"
            f"<td>{_f(r.get('attribution'), '.0%')}</td>"
            f"<td>{_f(r.get('attribution_specific'), '.0%')}</td></tr>"
            for r in circuit.get("curve") or []
        )
        circuit_html = (
            f"<h2>Circuit</h2><p>{_e(text[0])}</p>"
            + circuit_svg(circuit, run.get("edges", []))
            + "<ul>"
            + "".join(f"<li>{_e(t)}</li>" for t in text[1:])
            + "</ul><table><tr><th>k</th><th>circuit</th><th>attribution top-k</th>"
            + "<th>attribution top-k, infrastructure left out</th></tr>"
            + rows
            + "</table>"
        )
    words = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in verdict_words(run).items())
    rems = "".join(
        f'<tr class="{"rec" if r.get("recommended") else ""}"><td>{_e(r["kind"])}</td>'
        f"<td>{_e(', '.join(_j(r.get('components')) or []))}</td>"
        f"<td>{_f(r.get('p_bad_before'), '.3f')} &#8594; {_f(r.get('p_bad_after'), '.3f')}</td>"
        f"<td>{_f((_j(r.get('side_effect')) or {}).get('loss_change_pct'), '+.2f')}%</td>"
        f"<td>{_e(r.get('note'))}</td></tr>"
        for r in run.get("remedies", [])
    )
    behaviour_html = _behaviour_html(run)
    notes = (
        "".join(
            f"<li>{_e(n.get('created_at'))}, <b>{_e(n.get('author'))}</b>: {_e(n.get('text'))}</li>"
            for n in run.get("notes", [])
        )
        or "<li>No notes yet.</li>"
    )
    prompt = _input_html(
        text=inc.get("prompt"), messages=inc.get("messages"), seen=summary.get("prompt_text")
    )
    cf = summary.get("counterfactual") or {}
    good = f"<h3>Good continuation</h3><pre>{_e(inc.get('good'))}</pre>" if inc.get("good") else ""
    cf_html = ""
    if cf or inc.get("counterfactual_messages"):
        how = f" ({'generated' if cf.get('generated') else 'given'})" if cf else ""
        cf_html = f"<h3>Counterfactual{how}</h3>" + _input_html(
            text=cf.get("text"),
            messages=inc.get("counterfactual_messages"),
            seen=summary.get("counterfactual_text") or cf.get("text"),
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
<h2>Incident</h2><h3>Prompt</h3>{prompt}
{_bad_html(inc.get("bad"), inc.get("focus"))}{good}{cf_html}
{_decoding_html(summary.get("decoding"))}
<h2>Model and environment</h2>
<table><tr><th>fingerprint</th><td><code>{_e(model.get("fingerprint"))}</code></td></tr>
<tr><th>architecture</th><td>{_e(model.get("architecture"))}</td></tr>
<tr><th>parameters</th><td>{_e(model.get("n_params"))}</td></tr>
<tr><th>path</th><td>{_e(model.get("path"))}</td></tr>
<tr><th>device, seed</th><td>{_e(run.get("device"))}, {_e(run.get("seed"))}</td></tr>
<tr><th>versions</th><td>{_e(json.dumps(_j(run.get("versions")) or {}, sort_keys=True))}</td></tr>
</table>
<h2>Token attribution</h2>{token_note}<p>{strip}</p>
<h2>Attribution graph</h2>{svg}
<h2>Causes</h2><p>Cause set: <b>{_e(", ".join(summary.get("cause_set") or []))}</b>.
{_e(summary.get("set_reason"))}</p>{infra_html}
<table><tr><th>rank</th><th>component</th><th>attribution</th><th>TE</th><th>DE</th>
<th>necessity</th><th>component p</th><th>benign loss</th><th>verdict</th><th>reason</th></tr>
{causes}</table>
<h3>What the words mean</h3><dl>{words}</dl>
{circuit_html}
{_fit_evidence_html(run)}
<h2>Remediation</h2>
<table><tr><th>fix</th><th>components</th><th>P(bad)</th><th>benign loss</th><th>note</th></tr>
{rems}</table>
{behaviour_html}
{_provenance_html(run)}
<h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# the regression report


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
