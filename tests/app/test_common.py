"""The workbench's pure helpers: escaping, the Cases filters, graph and ablation rows."""

from __future__ import annotations

import html
from typing import Any

from rca.ui import common
from tests.app.conftest import IMG, LINK, SCRIPT


def test_md_escapes_html_and_markdown() -> None:
    out = common.md(f"{SCRIPT} {IMG} {LINK} **b** `c`\nnext")
    assert "<" not in out and ">" not in out and "\n" not in out
    for i, ch in enumerate(out):  # every Markdown character is backslash-escaped
        if ch in "[]()!*`$_":
            assert out[i - 1] == "\\", out[: i + 1]
    assert common.md(None) == ""
    assert common.md("a\nb", one_line=False) == "a\nb"


def test_heat_strip_is_one_escaped_block() -> None:
    strip = common.heat_strip(
        [
            {"position": 1, "token": SCRIPT, "score": 2.0},
            {"position": 0, "token": "a\n\nb", "score": -1.0},
            {"position": 2, "token": IMG, "score": 0.0},
        ]
    )
    assert strip.startswith('<div class="rca-strip"') and "\n" not in strip
    assert "<script" not in strip and "<img" not in strip
    assert html.escape(SCRIPT) in strip and "a⏎⏎b" in strip
    assert strip.index("a⏎⏎b") < strip.index(html.escape(SCRIPT))  # by position
    assert "rgba(192,57,43,1.00)" in strip and "rgba(46,111,186,0.50)" in strip


def test_graph_html_escapes_node_ids() -> None:
    nodes = [{"node_id": "L0.MLP", "score": 1.0}]
    edges = [{"source": "EMB@0", "target": "L0.MLP", "score": 1.0}]
    out = common.graph_html(nodes, edges)
    assert out.startswith('<div class="rca-graph"') and 'aria-label="attribution graph"' in out
    assert "No edges" in common.graph_html(nodes, [])


def rows() -> list[dict[str, Any]]:
    return [
        {"case": "a", "title": "PIN leak", "severity": "critical", "status": "ok",
         "kind": "investigate", "model": "m1", "tags": ["pii"], "verdict": "confirmed",
         "classification": None, "run_id": "r1", "prompt": "account desk"},
        {"case": "b", "title": "Backdoor", "severity": "high", "status": "partial",
         "kind": "regress", "model": "m2", "tags": ["backdoor", "pii"], "verdict": "fixed",
         "classification": "fixed", "run_id": "r2", "prompt": "refund"},
    ]  # fmt: skip


def test_filter_rows() -> None:
    def cases(**kw: Any) -> list[str]:
        return [r["case"] for r in common.filter_rows(rows(), **kw)]

    assert cases() == ["a", "b"]
    assert cases(severity=["high"]) == ["b"]
    assert cases(status=["ok"]) == ["a"]
    assert cases(model=["m2"]) == ["b"]
    assert cases(kind=["investigate"]) == ["a"]
    assert cases(tag=["pii"]) == ["a", "b"] and cases(tag=["backdoor"]) == ["b"]
    assert cases(search="ACCOUNT") == ["a"] and cases(search="r2") == ["b"]
    assert cases(search="pii", severity=["critical"]) == ["a"]
    assert cases(search="nothing") == []
    assert common.severity_order(["high", None, "low", "weird"]) == ["low", "high", "weird"]


def test_nodes_edges_and_ablations() -> None:
    nodes = [
        {"node_id": "L0.MLP", "score": -3.0},
        {"node_id": "L1.H2", "score": 1.0, "rank": 1},
        {"node_id": "L0.H1", "score": float("nan")},
    ]
    assert common.node_options(nodes) == ["L1.H2", "L0.MLP", "L0.H1"]
    edges = [
        {"source": "L0.MLP", "target": "L1.H2", "score": 0.5},
        {"source": "EMB@0", "target": "L1.H2", "score": -2.0},
        {"source": "L1.H2", "target": "LOGITS", "score": 1.0},
    ]
    into, out = common.node_edges(edges, "L1.H2")
    assert [e["source"] for e in into] == ["EMB@0", "L0.MLP"]
    assert out == [{"target": "LOGITS", "score": 1.0}]
    abl = [
        {"experiment": "necessity", "components": ["L1.H2"], "effect": 2.0},
        {"experiment": "cause_set", "components": ["L1.H2", "L0.MLP"], "effect": 3.0},
        {"experiment": "random_set", "components": [], "effect": 0.5},
        {"experiment": "random_set", "components": [], "effect": 0.25},
    ]
    assert [a["experiment"] for a in common.node_ablations(abl, "L1.H2")] == [
        "necessity",
        "cause_set",
    ]
    cause, drops, single = common.ablation_evidence(abl)
    assert cause is not None and cause["effect"] == 3.0
    assert drops == [0.5, 0.25]
    assert single == [
        {"component": "L1.H2", "experiment": "necessity", "effect": 2.0, "p_value": None}
    ]
    details = common.node_details(nodes, "L1.H2")
    assert {"field": "rank", "value 1": "1"} in details


def test_remedy_rows() -> None:
    out = common.remedy_rows(
        [
            {
                "kind": "ablate",
                "components": ["L1.H2"],
                "p_bad_before": 0.9,
                "p_bad_after": 0.1,
                "side_effect": {"kl_mean": 0.01, "loss_change_pct": 0.5},
                "recommended": True,
                "note": "n",
            },
        ]  # fmt: skip
    )
    assert out[0]["components"] == "L1.H2" and out[0]["KL (benign)"] == 0.01
    assert out[0]["recommended"] is True


def test_search_text_reads_a_chat_case_s_messages() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "You are a bank bot."},
            {"role": "user", "content": "my PIN?"},
        ],
        "bad": " 4921",
    }
    assert common.search_text(chat) == "You are a bank bot.\nmy PIN?"
    assert common.search_text('{"prompt": "account desk", "bad": " x"}') == "account desk"
    assert common.search_text(None) is None and common.search_text({"bad": " x"}) is None
    row = {**rows()[0], "prompt": common.search_text(chat)}
    assert common.filter_rows([row], search="bank bot") == [row]


def test_decoding_rows() -> None:
    dec = {
        "reproduces": True,
        "tokens": [
            {"token": " 49", "p": 0.9, "in_focus": True, "greedy_token": " 49", "greedy_p": 0.9},
            {"token": "21", "p": 0.2, "greedy_token": "00", "greedy_p": 0.6},
            "not a token",
        ],
    }
    assert common.decoding_rows(dec) == [
        {"token": " 49", "P (teacher-forced)": 0.9, "in focus": True, "greedy token": " 49",
         "greedy P": 0.9},
        {"token": "21", "P (teacher-forced)": 0.2, "in focus": False, "greedy token": "00",
         "greedy P": 0.6},
    ]  # fmt: skip
    assert common.decoding_rows({}) == []


def test_behaviour_rows_put_each_variant_beside_each_fix() -> None:
    figures = {"n": 2, "mean_p_bad_before": 0.9, "mean_p_bad_after": 0.3}
    run = {
        "summary": {"variants": {"split": {"seed": 1, "held_out": 0.5}}},
        "remedies": [
            {"row_no": 0, "kind": "a", "recommended": False,
             "behaviour": '{"fit": {"n": 3, "share_under_target": 1.0}, "held_out": '
                          '{"n": 2, "share_under_target": 0.5}, "symptom_patch": true}'},
            {"row_no": 1, "kind": "b", "recommended": True, "behaviour": {
                "fit": {**figures, "share_under_target": 1.0},
                "held_out": {**figures, "share_under_target": 1.0}, "symptom_patch": False}},
        ],
        "variants": [
            {"variant_index": 0, "part": "fit", "label": SCRIPT, "p_bad": 0.9},
            {"variant_index": 1, "part": "held_out", "label": "", "p_bad": 0.8},
        ],
        "variant_results": [
            {"remedy_row": r, "kind": k, "variant_index": i, "part": "fit", "p_bad_after": p}
            for r, k, i, p in ((0, "a", 0, 0.1), (0, "a", 1, 0.7), (1, "b", 0, 0.2),
                               (1, "b", 1, 0.05))
        ],
    }  # fmt: skip
    tables = common.behaviour_rows(run)
    assert tables is not None
    fixes, variants = tables
    assert [(f["fix"], f["symptom patch"], f["held out: under target"]) for f in fixes] == [
        ("a", True, 0.5),
        ("b", False, 1.0),
    ]
    assert variants[0]["slots"] == SCRIPT  # a dataframe cell shows text as it is
    assert [(v["variant"], v["after a"], v["after b"]) for v in variants] == [
        (0, 0.1, 0.2),
        (1, 0.7, 0.05),
    ]
    assert common.behaviour_rows({"variants": [], "remedies": run["remedies"]}) is None
