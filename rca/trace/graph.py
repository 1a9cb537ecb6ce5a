"""The attribution graph: networkx, pruned by cumulative influence, with top paths and export.

Nodes carry ``id`` (the component id grammar; input tokens are ``EMB@p``), ``kind`` (token,
head, mlp, logits), ``layer`` (-1 for tokens, n_layers for LOGITS), ``score``, and for tokens
``token``. Edges carry ``weight``: the edge score (``rca.trace.components``).

Pruning follows circuit-tracer (2025): normalise absolute edge weights so that each node's
inputs sum to one, propagate influence back from LOGITS through every path, keep the smallest
node set covering ``node_threshold`` (0.8) of the total influence, then the smallest edge set
among the kept nodes covering ``edge_threshold`` (0.98) of the edge influence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from rca.model.ids import ComponentId, format_id, parse_id
from rca.trace.components import ComponentScores

__all__ = ["build_graph", "prune_graph", "top_paths", "write_graph", "influence"]


def _kind(cid: ComponentId) -> str:
    """The node kind: token (``EMB@p``), head, logits, or mlp for any other component."""
    if cid.kind == "emb":
        return "token"
    return cid.kind if cid.kind in ("head", "logits") else "mlp"


def build_graph(
    comps: ComponentScores,
    *,
    n_layers: int,
    tokens: Sequence[str] | None = None,
    token_scores: Sequence[float] | None = None,
) -> nx.DiGraph:
    """The full graph: token nodes ``EMB@p`` (one per prompt position), heads, MLPs, LOGITS."""
    if comps.edges is None or comps.emb_edges is None:
        raise ValueError("build_graph needs component scores computed with edges=True")
    g = nx.DiGraph()
    idx = {cid: i for i, cid in enumerate(comps.nodes)}
    n_prompt = comps.emb_edges.shape[0]
    tok = [format_id(ComponentId("emb", pos=p)) for p in range(n_prompt)]  # EMB@p
    for p in range(n_prompt):
        score = (
            float(token_scores[p]) if token_scores is not None else float(comps.per_position[0, p])
        )
        g.add_node(
            tok[p],
            id=tok[p],
            kind="token",
            layer=-1,
            score=score,
            token=tokens[p] if tokens is not None else "",
        )
    for cid in comps.nodes[1:]:
        c = parse_id(cid)
        g.add_node(
            cid,
            id=cid,
            kind=_kind(c),
            layer=c.depth(n_layers),
            score=float(comps.scores[idx[cid]]),
        )
    g.add_node(
        "LOGITS",
        id="LOGITS",
        kind="logits",
        layer=n_layers,
        score=comps.metric_clean - comps.metric_baseline,
    )
    E = comps.edges.double().T.tolist()  # (down, up), as Python floats
    emb = comps.emb_edges.double().T.tolist()  # (down, prompt positions)
    for j, v in enumerate(comps.down):
        for u, w in zip(comps.up, E[j], strict=True):
            if u != "EMB" and w != 0.0:
                g.add_edge(u, v, weight=w)
        for p, w in enumerate(emb[j][:n_prompt]):
            if w != 0.0:
                g.add_edge(tok[p], v, weight=w)
    return g


def influence(g: nx.DiGraph, sink: str = "LOGITS") -> dict[str, float]:
    """Each node's total influence on ``sink`` through all paths, by normalised |weights|."""
    order = list(nx.topological_sort(g))
    infl = dict.fromkeys(g.nodes, 0.0)
    infl[sink] = 1.0
    for v in reversed(order):
        if infl[v] == 0.0:
            continue
        preds = list(g.predecessors(v))
        total = sum(abs(g[u][v]["weight"]) for u in preds)
        if total == 0:
            continue
        for u in preds:
            infl[u] += infl[v] * abs(g[u][v]["weight"]) / total
    return infl


def _smallest_cover(items: list[tuple[Any, float]], fraction: float) -> list[Any]:
    items = sorted(items, key=lambda kv: -kv[1])
    total = sum(v for _, v in items)
    if total <= 0:
        return []
    out, acc = [], 0.0
    for k, v in items:
        out.append(k)
        acc += v
        if acc >= fraction * total:
            break
    return out


def prune_graph(
    g: nx.DiGraph,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    sink: str = "LOGITS",
) -> nx.DiGraph:
    """The smallest node set covering ``node_threshold`` of the influence on ``sink``, then the
    smallest edge set among them covering ``edge_threshold`` of the edge influence."""
    infl = influence(g, sink)
    keep = set(_smallest_cover([(n, v) for n, v in infl.items() if n != sink], node_threshold))
    keep.add(sink)
    sub = g.subgraph(keep).copy()
    infl_sub = influence(sub, sink)
    into = {v: sum(abs(sub[x][v]["weight"]) for x in sub.predecessors(v)) for v in sub.nodes}
    edge_items = [
        ((u, v), infl_sub[v] * abs(d["weight"]) / into[v] if into[v] else 0.0)
        for u, v, d in sub.edges(data=True)
    ]
    keep_edges = set(_smallest_cover(edge_items, edge_threshold))
    sub.remove_edges_from([e for e in list(sub.edges) if e not in keep_edges])
    sub.remove_nodes_from([n for n in list(sub.nodes) if n != sink and sub.degree(n) == 0])
    for n in sub.nodes:
        sub.nodes[n]["influence"] = infl.get(n, 0.0)
    sub.graph.update(node_threshold=node_threshold, edge_threshold=edge_threshold)
    return sub


def top_paths(g: nx.DiGraph, *, k: int = 5, sink: str = "LOGITS") -> list[dict[str, Any]]:
    """The ``k`` strongest paths from an input token to ``sink``.

    A path's strength is the product of its edges' normalised |weights| (each edge's share of
    its target's input), found as the shortest paths under -log(share).
    """
    h = nx.DiGraph()
    for v in g.nodes:
        preds = list(g.predecessors(v))
        total = sum(abs(g[u][v]["weight"]) for u in preds)
        for u in preds:
            share = abs(g[u][v]["weight"]) / total if total else 0.0
            if share > 0:
                h.add_edge(u, v, cost=-math.log(share), share=share)
    if sink not in h:
        return []
    h.add_node("__src__")
    for n, d in g.nodes(data=True):
        if d.get("kind") == "token" and n in h:
            h.add_edge("__src__", n, cost=0.0, share=1.0)
    out: list[dict[str, Any]] = []
    try:
        for path in nx.shortest_simple_paths(h, "__src__", sink, weight="cost"):
            nodes = path[1:]
            strength = math.prod(h[a][b]["share"] for a, b in zip(nodes, nodes[1:], strict=False))
            out.append({"path": nodes, "strength": strength})
            if len(out) >= k:
                break
    except nx.NetworkXNoPath:
        pass
    return out


def graph_to_json(g: nx.DiGraph) -> dict[str, Any]:
    """Plain data: ``{"nodes": [...], "edges": [{"source", "target", "weight"}], "graph": {}}``."""
    return {
        "graph": dict(g.graph),
        "nodes": [dict(d) for _, d in g.nodes(data=True)],
        "edges": [
            {"source": u, "target": v, "weight": d["weight"]} for u, v, d in g.edges(data=True)
        ],
    }


def write_graph(g: nx.DiGraph, path: str | Path) -> Path:
    """Write ``.json`` (``graph_to_json``) or ``.graphml``, by the file's suffix."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(g, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(graph_to_json(g), indent=1))
    else:
        raise ValueError(f"graph file must end in .json or .graphml, got {path.name!r}")
    return path


def edge_table(comps: ComponentScores, *, k: int = 20) -> list[dict[str, Any]]:
    """The ``k`` largest edges by |score|, as ``{source, target, score}``."""
    if comps.edges is None:
        return []
    E = comps.edges
    flat = torch.argsort(E.abs().flatten(), descending=True)[:k]
    out = []
    for f in flat.tolist():
        i, j = divmod(f, E.shape[1])
        if E[i, j] == 0:
            break
        out.append({"source": comps.up[i], "target": comps.down[j], "score": float(E[i, j])})
    return out
