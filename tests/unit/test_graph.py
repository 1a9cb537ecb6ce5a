"""The attribution graph: influence, pruning and top paths on hand-built graphs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import pytest
import torch

from rca.trace.components import ComponentScores
from rca.trace.graph import build_graph, influence, prune_graph, top_paths, write_graph


def chain() -> nx.DiGraph:
    """EMB@0 -> L0.H0 -> LOGITS carries 0.9 of LOGITS' input, EMB@1 -> L0.MLP -> LOGITS 0.1."""
    g = nx.DiGraph()
    for n, kind, layer in [
        ("EMB@0", "token", -1),
        ("EMB@1", "token", -1),
        ("L0.H0", "head", 0),
        ("L0.MLP", "mlp", 0),
        ("LOGITS", "logits", 1),
    ]:
        g.add_node(n, id=n, kind=kind, layer=layer, score=0.0)
    g.add_edge("EMB@0", "L0.H0", weight=2.0)
    g.add_edge("EMB@1", "L0.MLP", weight=-1.0)
    g.add_edge("L0.H0", "LOGITS", weight=9.0)
    g.add_edge("L0.MLP", "LOGITS", weight=-1.0)
    return g


def test_influence_follows_normalised_paths() -> None:
    infl = influence(chain())
    assert infl["L0.H0"] == pytest.approx(0.9) and infl["L0.MLP"] == pytest.approx(0.1)
    # each token is the only input of its component, so it inherits that share
    assert infl["EMB@0"] == pytest.approx(0.9) and infl["EMB@1"] == pytest.approx(0.1)


def test_pruning_keeps_the_smallest_cover() -> None:
    p = prune_graph(chain(), node_threshold=0.5, edge_threshold=0.98)
    # by influence: EMB@0 0.9, L0.H0 0.9 cover 1.8 of 2.0 total (>= 50%) with two nodes
    assert set(p.nodes) == {"EMB@0", "L0.H0", "LOGITS"}
    assert set(p.edges) == {("EMB@0", "L0.H0"), ("L0.H0", "LOGITS")}
    full = prune_graph(chain(), node_threshold=0.99, edge_threshold=0.999)
    assert set(full.nodes) == set(chain().nodes)


def test_top_paths_rank_by_product_of_shares() -> None:
    paths = top_paths(chain(), k=5)
    assert [p["path"] for p in paths] == [
        ["EMB@0", "L0.H0", "LOGITS"],
        ["EMB@1", "L0.MLP", "LOGITS"],
    ]
    assert paths[0]["strength"] == pytest.approx(0.9) and paths[1]["strength"] == pytest.approx(0.1)


def test_build_graph_from_scores_and_export(tmp_path: Path) -> None:
    nodes = ["EMB", "L0.H0", "L0.MLP"]
    comps = ComponentScores(
        nodes=nodes,
        scores=torch.tensor([0.5, 2.0, -1.0]),
        per_position=torch.zeros(3, 2),
        method="atp",
        baseline="cf",
        metric_clean=3.0,
        metric_baseline=0.0,
        up=nodes,
        down=["L0.H0", "L0.MLP", "LOGITS"],
        edges=torch.tensor([[0.0, 0.0, 0.3], [0.0, 1.5, 2.0], [0.0, 0.0, -1.0]]),
        emb_edges=torch.tensor([[0.7, 0.0, 0.1], [0.0, 0.2, 0.2]]),
    )
    g = build_graph(comps, n_layers=1, tokens=["a", "b"], token_scores=[0.4, 0.1])
    assert g.nodes["LOGITS"]["score"] == 3.0 and g.nodes["EMB@0"]["token"] == "a"
    assert {n: (d["kind"], d["layer"]) for n, d in g.nodes(data=True)} == {
        "EMB@0": ("token", -1),
        "EMB@1": ("token", -1),
        "L0.H0": ("head", 0),
        "L0.MLP": ("mlp", 0),
        "LOGITS": ("logits", 1),
    }
    assert g["L0.H0"]["L0.MLP"]["weight"] == 1.5
    assert g["EMB@1"]["LOGITS"]["weight"] == pytest.approx(0.2)
    assert not g.has_edge("EMB", "LOGITS")  # EMB is split into its positions
    assert nx.is_directed_acyclic_graph(g)
    j = json.loads(write_graph(g, tmp_path / "g.json").read_text())
    assert {n["id"] for n in j["nodes"]} == set(g.nodes) and len(j["edges"]) == g.number_of_edges()
    back = nx.read_graphml(write_graph(g, tmp_path / "g.graphml"))
    assert set(back.nodes) == set(g.nodes)
    assert math.isclose(float(back["L0.H0"]["LOGITS"]["weight"]), 2.0)
    with pytest.raises(ValueError, match=".json or .graphml"):
        write_graph(g, tmp_path / "g.txt")
