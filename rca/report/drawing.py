"""The report's pictures as inline SVG: the attribution graph, and the circuit alone.

Every label and tooltip is escaped (``rca.textsafe.html_text``); a drawing holds no script and
no external reference, so it can sit in the self-contained HTML page and in the app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rca.model.ids import IdError, parse_id
from rca.report.stored import member_label
from rca.report.stored import number as _f
from rca.textsafe import html_text as _e

__all__ = ["circuit_svg", "graph_svg"]


def _column(nid: str) -> float:
    """A graph node's column: EMB first, then per layer its heads and, half a step later, the
    rest of the layer; LOGITS last."""
    c = parse_id(nid)
    if c.kind == "emb":
        return -1
    if c.kind == "logits":
        return 1e9
    assert c.layer is not None
    return c.layer + (0.0 if c.kind == "head" else 0.5)


def _node_order(nid: str) -> tuple[float, int]:
    """Top to bottom within a column: by position where the node has one, else by head."""
    c = parse_id(nid)
    if c.pos is not None:
        within = c.pos
    else:
        within = c.index if c.kind == "head" and c.index is not None else 0
    return (_column(nid), within)


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

    cols: dict[float, list[str]] = {}
    for nid in sorted(used, key=_node_order):
        cols.setdefault(_column(nid), []).append(nid)
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


def _member_order(m: Mapping[str, Any]) -> tuple[int, float, int]:
    """Forward order of a circuit member: by layer, a layer's heads (by index) before its MLP
    and MLP neurons (drawn as the MLP); other ids first."""
    try:
        c = parse_id(str(m["id"]))
    except IdError:
        return (0, 0.0, 0)
    if c.layer is None:
        return (0, 0.0, 0)
    if c.kind == "head" and c.index is not None:
        return (c.layer, 0.0, c.index)
    if c.kind in ("mlp", "neuron", "neurons"):
        return (c.layer, 0.5, 0)
    return (0, 0.0, 0)


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
    ordered = sorted(members, key=_member_order)
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
