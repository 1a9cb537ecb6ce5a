"""The case file: a stored run as Markdown, as text for a terminal, or as one HTML page.

Input is the dict ``ReadOnlyStore.get_run`` returns, so a report is always of what was
recorded. Sections that need keys older runs lack (a chat case's ``messages``, ``focus``, the
summary's ``prompt_text`` and ``decoding``) are left out for them.

Every string that came from a prompt, a model, a case file or a note is data, never markup,
and is escaped for the medium it lands in (``rca.textsafe``); in every medium, control,
bidirectional and invisible characters are shown as their escapes (``\\x1b``, ``\\u202e``):

- Markdown: backslash escapes for the characters that open inline markup or end a table cell,
  newlines folded to spaces, a URL or e-mail address a renderer would link in a code span,
  code spans and fenced blocks delimited by a backtick run longer than any inside. What a
  CommonMark or GFM renderer makes of it holds no element from the data.
- terminal: the text as it is otherwise, so a payload cannot move the cursor, clear the
  screen, change colours or make a hyperlink.
- HTML: ``html.escape``. The page has no external asset (no script, no stylesheet link, no
  font) and draws the attribution graph as inline SVG (layers left to right).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rca.circuit import site_label
from rca.textsafe import code_span as _md_code
from rca.textsafe import fence
from rca.textsafe import html_text as _e
from rca.textsafe import markdown_line as _md_line
from rca.textsafe import markdown_text as _md
from rca.textsafe import visible as _visible
from rca.verdicts import definitions

__all__ = [
    "case_fields",
    "graph_svg",
    "render_html",
    "render_markdown",
    "render_regression_html",
    "render_regression_markdown",
    "render_terminal",
    "token_warning",
    "turns",
]

# ---------------------------------------------------------------------------------------------
# reading a stored run


def _j(v: Any) -> Any:
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
    data = _j(inc.get("case_data"))
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


def _summary(run: Mapping[str, Any]) -> dict[str, Any]:
    s = _j(run.get("summary"))
    return dict(s) if isinstance(s, Mapping) else {}


# the completeness tolerance of runs that did not record theirs (rca.trace.tokens)
_TOKEN_TOLERANCE = 0.05


def token_warning(completeness: Any) -> str | None:
    """The warning for token attributions that do not sum to the metric's change within their
    tolerance (``token_completeness``: ``relative_error`` against ``tolerance``, 0.05 where the
    run recorded none); None where they do, or where no completeness was recorded."""
    c = _j(completeness)
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
        f"token attributions are incomplete: they sum to {_f(c.get('sum_attributions'))} where "
        f"the metric moves {_f(gap)} from the baseline (relative error {_f(err, '.2f')}, "
        f"tolerance {_f(tol, '.2f')}); read them as a ranking, not as amounts"
    )


_TOKEN_START = {
    "counterfactual": "Integrated gradients from the counterfactual prompt: a position where it "
    "has the prompt's token scores 0, and the scores sum to the metric's change from the "
    "counterfactual.",
    "neutral": "Integrated gradients from a prompt of neutral tokens.",
}


def _token_start(completeness: Any) -> str:
    """Where the token attributions' path started, as a sentence ('' where not recorded)."""
    c = _j(completeness)
    return _TOKEN_START.get(str(c.get("baseline")), "") if isinstance(c, Mapping) else ""


def _causes(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    ranked = [n for n in run.get("nodes", []) if n.get("rank") is not None]
    return sorted(ranked, key=lambda n: n["rank"])


def verdict_words(run: Mapping[str, Any]) -> dict[str, str]:
    """The definitions of the verdict words and p-values at the run's thresholds (recorded in
    its summary; the defaults for a run recorded without them)."""
    return _summary(run).get("definitions") or definitions()


def infrastructure_sentence(run: Mapping[str, Any]) -> str:
    """The candidates that ordinary text needs as well, in words, or ''."""
    infra = [c for c in _causes(run) if c.get("verdict") == "infrastructure"]
    if not infra:
        return ""
    parts = [
        f"{c['node_id']} (mean-ablating it raises the loss on ordinary text by "
        f"{_pct(c.get('benign_loss_pct'))})"
        for c in infra
    ]
    return (
        "Infrastructure, necessary for ordinary text as well, so not a cause of this incident: "
        + "; ".join(parts)
        + ". It is shown, never blamed, and never in the cause set."
    )


def _pct(v: Any) -> str:
    return "-" if v is None else f"{_f(v, '+.1f')}%"


def _f(v: Any, spec: str = "+.3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


_NEWLINE = re.compile(r"\r\n|\r|\n")


def _token(v: Any) -> str:
    """A token for a table cell: its newlines shown as ⏎ (they matter, and a cell is a line)."""
    return _NEWLINE.sub("⏎", "" if v is None else str(v))


# ---------------------------------------------------------------------------------------------
# escaping, one medium at a time (rca.textsafe)


class _Medium(Protocol):
    """How case strings are written into the case file's text, for one medium."""

    def text(self, v: Any) -> str:
        """Inline text within a line or a table cell."""
        ...

    def code(self, v: Any, *, cell: bool = False) -> str:
        """An inline code span (in a table ``cell``, or within a line)."""
        ...

    def block(self, v: Any) -> str:
        """A verbatim block: the text with its newlines and whitespace, fenced."""
        ...


class _Markdown:
    def text(self, v: Any) -> str:
        return _md(v)

    def code(self, v: Any, *, cell: bool = False) -> str:
        return _md_code(v, cell=cell)

    def block(self, v: Any) -> str:
        return fence(v)


class _Terminal:
    """Markdown's layout, the text as it is: a reader of a terminal sees what was typed."""

    def text(self, v: Any) -> str:
        return _NEWLINE.sub(" ", _visible(v))

    def code(self, v: Any, *, cell: bool = False) -> str:
        return f"`{self.text(v)}`"

    def block(self, v: Any) -> str:
        return fence(_visible(v))  # a carriage return shown, not read as a line break


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
        return int(nid[1:].split(".")[0]) + (0.0 if ".H" in nid else 0.5)

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


_ROLE_Y = {"entry": 0.2, "route": 0.45, "writer": 0.7, "infrastructure": 0.92}
_ROLE_FILL = {
    "entry": "#f5b041",
    "route": "#85c1e9",
    "writer": "#c0392b",
    "infrastructure": "#d5d8dc",
}


def circuit_of(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's circuit as recorded in its summary, or None (runs recorded without one)."""
    c = _summary(run).get("circuit")
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


def circuit_svg(
    circuit: Mapping[str, Any],
    edges: Sequence[Mapping[str, Any]] = (),
    *,
    width: int = 900,
    height: int = 260,
) -> str:
    """Inline SVG of the circuit alone: its members at their positions, left to right in
    forward order, one row per role (entry, route, writer; infrastructure greyed below), each
    with its position's token; its path-patched edges (verified ones drawn, width by the share
    of the gap, red toward the bad continuation, blue against) and the writers' edges to
    LOGITS. A circuit recorded without edges of its own draws ``edges`` (the trace's) between
    its members."""
    members = list(circuit.get("members") or [])
    toks = circuit.get("tokens") or {}

    def where(m: Mapping[str, Any]) -> tuple[int, float, int]:
        g = re.match(r"L(\d+)\.(H(\d+)|MLP|N)", str(m["id"]))  # MLP neurons draw as the MLP
        if not g:
            return (0, 0.0, 0)
        return (int(g.group(1)), 0.0 if g.group(3) else 0.5, int(g.group(3) or 0))

    ordered = sorted(members, key=where)
    n = max(1, len(ordered))
    pos: dict[str, tuple[float, float]] = {}
    for i, m in enumerate(ordered):
        x = 70 + (width - 220) * (i / max(1, n - 1)) if n > 1 else width / 2 - 70
        pos[member_label(m)] = (x, height * _ROLE_Y.get(str(m.get("role")), 0.45))
    by_id = {str(m["id"]): member_label(m) for m in ordered}
    logits = (width - 50.0, height * _ROLE_Y["writer"])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="circuit">',
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>',
    ]
    own = list(circuit.get("edges") or [])
    if own:
        lines = [
            (str(e["source"]), str(e["target"]), float(e["share"]), float(e["effect"]))
            for e in own
            if e.get("verified")
        ]
    else:  # the trace's edges between the members
        lines = [
            (by_id[str(e["source"])], by_id[str(e["target"])], float(e["score"]), float(e["score"]))
            for e in edges
            if e.get("source") in by_id and e.get("target") in by_id
        ]
        lines += [
            (member_label(m), "LOGITS", 1.0, 0.0) for m in ordered if m.get("role") == "writer"
        ]
    wmax = max((abs(w) for *_, w, _ in lines), default=1.0) or 1.0
    for src, dst, w, eff in lines:
        if src not in pos or (dst not in pos and dst != "LOGITS"):
            continue
        (x1, y1), (x2, y2) = pos[src], (logits if dst == "LOGITS" else pos[dst])
        tip = f"{src} -> {dst}" + (f": {w:.0%} of the gap ({eff:+.3f})" if own else f": {w:+.4f}")
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{"#c0392b" if w > 0 else "#2e6fba"}" '
            f'stroke-width="{0.8 + 4 * abs(w) / wmax:.2f}" stroke-opacity="0.55">'
            f"<title>{_e(tip)}</title></line>"
        )
    parts.append(
        f'<text x="{logits[0]:.1f}" y="{logits[1] + 4:.1f}" font-size="12" text-anchor="middle" '
        'font-family="sans-serif" font-weight="bold">LOGITS</text>'
    )
    for m in ordered:
        label = member_label(m)
        x, y = pos[label]
        role = str(m.get("role"))
        de = m.get("direct_effect")
        tip = f"{label} ({role}): TE {_f(m.get('total_effect'))}, DE {_f(de)}"
        if m.get("position_effect") is not None and m.get("positions"):
            tip += f", at its positions alone {_f(m.get('position_effect'))}"
        w = max(68, 7 * len(label) + 12)
        parts.append(
            f'<rect x="{x - w / 2:.1f}" y="{y - 11:.1f}" width="{w}" height="22" rx="5" '
            f'fill="{_ROLE_FILL.get(role, "#eee")}" stroke="#333"><title>{_e(tip)}</title></rect>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="11" text-anchor="middle" '
            f'font-family="sans-serif">{_e(label)}</text>'
        )
        words = [repr(toks[str(p)]) for p in m.get("positions") or [] if str(p) in toks]
        under = role + (f" · {' '.join(words)}" if words else "")
        parts.append(
            f'<text x="{x:.1f}" y="{y + 24:.1f}" font-size="9" text-anchor="middle" '
            f'font-family="sans-serif" fill="#555">{_e(under)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def circuit_lines(circuit: Mapping[str, Any]) -> list[str]:
    """The circuit in words: its faithfulness and reason; where the incident enters and where
    the bad continuation is written; one line per role with its members at their positions;
    the edges that path patching verified."""
    members = list(circuit.get("members") or [])
    out = [
        f"Faithfulness {_f(circuit.get('faithfulness'), '.0%')}: {circuit.get('reason', '')}.",
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


# ---------------------------------------------------------------------------------------------
# the case file as text: Markdown, or a terminal's


def _input_lines(m: _Medium, *, text: Any, messages: Any, seen: Any, what: str) -> list[str]:
    """A prompt or counterfactual as given (its text, or a chat's turns with system turns
    quoted), then what the model saw when that is not the text as given."""
    chat = turns(messages)
    if chat:
        n = len(chat)
        lines = [f"{what}, a conversation of {n} turn{'s' * (n != 1)}:"]
        for i, (role, content) in enumerate(chat, 1):
            block = m.block(content)
            if role == "system":  # instructions, not dialogue: quoted, so they stand apart
                block = "\n".join(f"> {row}" if row else ">" for row in _NEWLINE.split(block))
            lines += ["", f"**Turn {i} · {m.text(role)}**", "", block]
    else:
        lines = [f"{what}:", "", m.block(text)]
    if seen and (chat or seen != text):
        how = "the conversation in the model's chat template" if chat else "the exact text"
        lines += ["", f"What the model saw ({how}):", "", m.block(seen)]
    return lines


def _decoding_lines(m: _Medium, dec: Any) -> list[str]:
    """The greedy-decoding check: does the model say the bad continuation unprompted?"""
    if not isinstance(dec, Mapping):
        return []
    limit = dec.get("max_new_tokens")
    focus = dec.get("reproduces_focus")
    lines = [
        "",
        "## Greedy decoding",
        "",
        "Greedy decoding from the prompt"
        + (f" ({int(limit)} new tokens at most)" if limit is not None else "")
        + f" reproduces the bad continuation: **{_yes(dec.get('reproduces'))}**"
        + (f"; the focus: **{_yes(focus)}**" if focus is not None else "")
        + ".",
        "",
        "Greedy text:",
        "",
        m.block(dec.get("greedy_text")),
    ]
    toks = [t for t in dec.get("tokens") or [] if isinstance(t, Mapping)]
    if toks:
        lines += [
            "",
            "Each token of the bad continuation with its teacher-forced probability, next to "
            "the token greedy decoding produced at that step:",
            "",
            "| # | token | P (teacher-forced) | in focus | greedy token | greedy P |",
            "|---:|---|---:|---|---|---:|",
        ]
        lines += [
            f"| {i} | {m.code(_token(t.get('token')), cell=True)} | {_f(t.get('p'), '.3g')} | "
            f"{'yes' if t.get('in_focus') else ''} | "
            f"{m.code(_token(t.get('greedy_token')), cell=True)} | "
            f"{_f(t.get('greedy_p'), '.3g')} |"
            for i, t in enumerate(toks)
        ]
    return lines


def _case_lines(run: Mapping[str, Any], m: _Medium) -> list[str]:
    case = case_fields(run)
    model = run.get("model") or {}
    summary = _summary(run)
    versions = _j(run.get("versions")) or {}
    lines = [
        f"# Case {m.text(case.get('id'))}: {m.text(case.get('title'))}",
        "",
        f"- run {m.code(run.get('run_id'))} ({m.text(run.get('kind'))}, "
        f"status {m.text(run.get('status'))}),"
        f" recorded {m.text(run.get('recorded_at') or run.get('finished_at'))}",
        f"- severity **{m.text(case.get('severity'))}**; "
        f"verdict **{m.text(summary.get('verdict'))}**",
        "",
        "## Incident",
        "",
        *_input_lines(
            m,
            text=case.get("prompt"),
            messages=case.get("messages"),
            seen=summary.get("prompt_text"),
            what="Prompt",
        ),
        "",
        "Bad continuation:",
        "",
        m.block(case.get("bad")),
    ]
    if case.get("focus"):
        lines += ["", "Focus (the part of the bad continuation the metric reads):", ""]
        lines.append(m.block(case["focus"]))
    if case.get("good"):
        lines += ["", "Good continuation:", "", m.block(case["good"])]
    cf = summary.get("counterfactual") or {}
    if cf or case.get("counterfactual_messages"):
        what = "Counterfactual"
        if cf:
            what += (
                f" ({'generated' if cf.get('generated') else 'given'}, removes "
                f"{_f(cf.get('drop'), '.0%')} of the metric)"
            )
        lines += [""] + _input_lines(
            m,
            text=cf.get("text"),
            messages=case.get("counterfactual_messages"),
            seen=summary.get("counterfactual_text") or cf.get("text"),
            what=what,
        )
    lines += _decoding_lines(m, summary.get("decoding"))
    lines += [
        "",
        "## Model and environment",
        "",
        f"- fingerprint {m.code(model.get('fingerprint') or run.get('model_fingerprint'))}",
        f"- architecture {m.text(model.get('architecture'))}, "
        f"{m.text(model.get('n_params'))} parameters, path {m.code(model.get('path'))}",
        f"- device {m.text(run.get('device'))}, seed {m.text(run.get('seed'))}",
        "- versions: " + ", ".join(f"{m.text(k)} {m.text(v)}" for k, v in sorted(versions.items())),
        "",
        "## Token attribution",
        "",
    ]
    start = _token_start(summary.get("token_completeness"))
    if start:
        lines += [start, ""]
    warn = token_warning(summary.get("token_completeness"))
    if warn:
        lines += [f"**Warning:** {m.text(warn)}.", ""]
    lines += [
        "| position | token | score |",
        "|---:|---|---:|",
    ]
    for t in run.get("token_scores", []):
        lines.append(
            f"| {t['position']} | {m.code(_token(t['token']), cell=True)} | {_f(t['score'])} |"
        )
    lines += [
        "",
        "## Causes",
        "",
        f"Cause set: **{m.text(', '.join(summary.get('cause_set') or []) or '-')}**. "
        f"{m.text(summary.get('set_reason'))}",
        "",
    ]
    infra = infrastructure_sentence(run)
    if infra:
        lines += [m.text(infra), ""]
    lines += [
        "| rank | component | attribution | total effect | direct effect | necessity "
        "| component p | benign loss | verdict |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in _causes(run):
        lines.append(
            f"| {c['rank']} | {m.text(c['node_id'])} | {_f(c.get('score'))} | "
            f"{_f(c.get('total_effect'))} | {_f(c.get('direct_effect'))} | "
            f"{_f(c.get('necessity'))} | {_f(c.get('p_value'), '.3f')} | "
            f"{_pct(c.get('benign_loss_pct'))} | {m.text(c.get('verdict'))} |"
        )
    lines += ["", "What the words mean:", ""]
    lines += [f"- **{m.text(k)}**: {m.text(v)}" for k, v in verdict_words(run).items()]
    circuit = circuit_of(run)
    if circuit is not None:
        text = circuit_lines(circuit)
        lines += ["", "## Circuit", "", m.text(text[0]), ""]
        lines += [f"- {m.text(t)}" for t in text[1:]]
        curve = circuit.get("curve") or []
        if curve:
            lines += [
                "",
                "Faithfulness of the first k components (the circuit's order, and the trace's "
                "attribution ranking):",
                "",
                "| k | circuit | attribution top-k | attribution top-k, infrastructure left out |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {int(r['k'])} | {_f(r.get('circuit'), '.0%')} | "
                f"{_f(r.get('attribution'), '.0%')} | "
                f"{_f(r.get('attribution_specific'), '.0%')} |"
                for r in curve
            ]
    lines += ["", "## Remediation", ""]
    for r in run.get("remedies", []):
        mark = " (recommended)" if r.get("recommended") else ""
        lines.append(f"- **{m.text(r['kind'])}**{mark}: {m.text(r.get('note'))}")
    lines += ["", "## Notes", ""]
    notes = run.get("notes", [])
    if not notes:
        lines.append("No notes yet (`rca notes add RUN --author A --text T`).")
    for n in notes:
        lines.append(
            f"- {m.text(n.get('created_at'))}, {m.text(n.get('author'))}: {m.text(n.get('text'))}"
        )
    return lines


def render_markdown(run: Mapping[str, Any]) -> str:
    """The case file as Markdown: every case string shown as typed, none of it markup."""
    return "\n".join(_case_lines(run, _Markdown())) + "\n"


def render_terminal(run: Mapping[str, Any]) -> str:
    """The case file for a terminal: the Markdown case file's content with every string as it
    is, but control characters (C0 other than newline and tab, DEL, C1), bidirectional and
    invisible characters shown as escapes (``\\x1b``, ``\\u202e``), so nothing in it moves
    the cursor, clears the screen, changes colours or reorders what is shown."""
    return "\n".join(_case_lines(run, _Terminal())) + "\n"


# ---------------------------------------------------------------------------------------------
# the case file as HTML


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
        f"New model {_md_code(model)}." if model else "",
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
            _md_line(r["reason"]),
            "",
            "| | reference run | new model |",
            "|---|---|---|",
            f"| run | {_md_code(r.get('reference_run_id'), cell=True)} | "
            f"{_md_code(r.get('run_id'), cell=True)} |",
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
