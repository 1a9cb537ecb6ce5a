"""Fixtures of the workbench tests: a database filled by the demo, and a hostile one.

``demo_db`` runs ``rca demo --quick`` once per session on the quick zoo (``zoo_home``; about two
minutes on 2 cores, after the zoo). ``xss_db`` is a run recorded by hand, without a model, whose
every case string carries HTML and Markdown payloads: the app must show them as text.
``xss_chat_db`` is the same for a chat case: turns, the text the model saw, the focus and the
greedy-decoding check.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from rca.store import IncidentRecord, ModelRecord, RunRecord, Store

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
CASES = ROOT / "cases"

SCRIPT = "<script>window.__rca_xss = 1</script>"
IMG = '<img src="x" onerror="window.__rca_xss = 2">'
LINK = "[click](javascript:alert(1)) ![img](http://example.invalid/x.png) $x^2$"
PAYLOAD = f"{SCRIPT} {IMG}"
XSS_CASE = "xss-case"


@pytest.fixture(scope="session")
def demo_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database filled by ``rca demo --quick``: 4 investigations and 4 regression runs, a
    private copy of the session's demo run (tests/conftest.py ``demo_output``).

    Set RCA_TEST_DEMO_DB to a database an earlier ``rca demo --quick`` filled to test against
    a copy of it instead, without running the demo (the tests add notes and runs to theirs)."""
    db = tmp_path_factory.mktemp("app_demo") / "rca.duckdb"
    prebuilt = os.environ.get("RCA_TEST_DEMO_DB")
    if prebuilt:
        shutil.copyfile(prebuilt, db)
        return db
    shutil.copyfile(request.getfixturevalue("demo_output")["db"], db)
    kinds = sorted(str(run["kind"]) for run in Store.reader(db).list_runs())
    assert kinds == ["investigate"] * 4 + ["regress"] * 4, kinds
    return db


def _xss_run(fields: dict[str, Any], **summary: Any) -> RunRecord:
    """A run of the case ``fields`` whose every other string is a payload too."""
    return RunRecord(
        incident=IncidentRecord.from_fields(fields, source="cases/xss.toml"),
        model=ModelRecord("e" * 64, path="/models/<img src=x onerror=alert(1)>", n_params=1),
        summary={
            "verdict": "confirmed",
            "cause_set": ["L1.H2"],
            "top_cause": "L1.H2",
            "p_bad_before": 0.9,
            "p_bad_after": 0.1,
            "set_reason": f"reason {PAYLOAD}",
            **summary,
        },
        token_scores=[
            {"position": 0, "token": "prompt", "score": 0.1, "method": "ig"},
            {"position": 1, "token": SCRIPT, "score": 2.0, "method": "ig"},
            {"position": 2, "token": IMG, "score": -1.0, "method": "ig"},
        ],
        nodes=[
            {
                "node_id": "L1.H2",
                "kind": "head",
                "layer": 1,
                "score": 1.5,
                "rank": 1,
                "verdict": "confirmed",
                "reason": f"node {PAYLOAD}",
            },
            {"node_id": "L0.MLP", "kind": "mlp", "layer": 0, "score": -0.5},
        ],  # fmt: skip
        edges=[
            {"source": "EMB@1", "target": "L0.MLP", "score": 0.5},
            {"source": "L0.MLP", "target": "L1.H2", "score": 1.0},
            {"source": "L1.H2", "target": "LOGITS", "score": 1.5},
        ],
        ablations=[
            {"experiment": "necessity", "components": ["L1.H2"], "effect": 2.0, "p_value": 0.01},
            {
                "experiment": "cause_set",
                "components": ["L1.H2"],
                "kind": "mean",
                "effect": 2.0,
                "p_value": 0.01,
            },
            *({"experiment": "random_set", "components": [], "effect": 0.1 * k} for k in range(5)),
        ],  # fmt: skip
        remedies=[
            {
                "remedy_id": "r1",
                "kind": "ablate",
                "components": ["L1.H2"],
                "p_bad_before": 0.9,
                "p_bad_after": 0.1,
                "side_effect": {"kl_mean": 0.01, "loss_change_pct": 0.5},
                "recommended": True,
                "note": f"remedy {PAYLOAD}",
            },
        ],  # fmt: skip
    )


def _xss_fields(**fields: Any) -> dict[str, Any]:
    return {
        "id": XSS_CASE,
        "title": f"Title {PAYLOAD}",
        "severity": "high",
        "model": "zoo:support-bot-v1",
        "tags": ["<b>tag</b>", "xss"],
        "notes": f"reporter {PAYLOAD}",
        **fields,
    }


@pytest.fixture(scope="session")
def xss_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(database, run id) of one run whose case strings are script, img and Markdown payloads."""
    db = tmp_path_factory.mktemp("app_xss") / "rca.duckdb"
    fields = _xss_fields(
        prompt=f"prompt {PAYLOAD} {LINK}", bad=f" bad {IMG}", good=f" good {SCRIPT}"
    )
    store = Store(db, actor="tester")
    run_id = store.record_run(_xss_run(fields))
    store.add_note(run_id=run_id, author=f"author {IMG}", text=f"note {PAYLOAD}")
    # a training example is data too: its text and fields reach every medium
    features = {"key": "k" * 64, "data_sha256": "d" * 64, "scope": "circuit",
                "params": ["p"], "n_params": 1, "proj_dim": 256, "lambda_reg": 0.0, "seed": 0,
                "max_tokens": 256, "n": 2, "path": f"/tmp/{IMG}"}  # fmt: skip
    store.record_provenance(
        run_id=run_id,
        incident_id="xss",
        features=features,
        method="trak-circuit",
        circuit=[f"L0.H{SCRIPT}"],
        queries={"n": 1},
        examples=[
            {
                "index": 0,
                "score": 1.0,
                "text": f"ticket {PAYLOAD} {LINK}",
                "fields": {"source": f"src {IMG}"},
            }
        ],  # fmt: skip
        seconds=1.0,
        summary={
            "n_examples": 2,
            "top_sources": {f"src {IMG}": 1.0},
            "data_sources": {f"src {IMG}": 1.0},
            "unlearning": {
                "label": f"approximation {SCRIPT}",
                "measured_on": f"variants {LINK}",
                "p_bad_before": [0.9],
                "top": {
                    "n_examples": 1,
                    "steps_taken": 3,
                    "benign_loss_change_pct": 1.0,
                    "p_bad_after": [0.5],
                },
                "random": {
                    "n_examples": 1,
                    "steps_taken": 3,
                    "benign_loss_change_pct": 1.0,
                    "p_bad_after": [0.9],
                },
            },
        },  # fmt: skip
    )
    return db, run_id


# a chat case's turns, the text the model saw and the greedy-decoding check, all payloads
CHAT_SYSTEM = f"system {SCRIPT} {LINK}"
CHAT_USER = f"user {IMG} wombat"  # the Cases search finds the case by "wombat"
CHAT_CF_USER = f"counterfactual user {SCRIPT}"
CHAT_SEEN = f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\n{CHAT_USER}"
CHAT_BAD, CHAT_FOCUS = f" bad {IMG} tail", IMG
CHAT_DECODING = {
    "greedy_text": f" greedy {SCRIPT}",
    "reproduces": False,
    "reproduces_focus": True,
    "max_new_tokens": 8,
    "tokens": [
        {"token": " bad", "p": 0.9, "in_focus": False, "greedy_token": " greedy", "greedy_p": 0.8},
        {"token": IMG, "p": 0.4, "in_focus": True, "greedy_token": SCRIPT, "greedy_p": 0.3},
    ],
}


@pytest.fixture(scope="session")
def xss_chat_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(database, run id) of a chat case (messages, counterfactual messages, focus) whose
    turns, rendered prompt and greedy decoding carry script, img and Markdown payloads."""
    db = tmp_path_factory.mktemp("app_xss_chat") / "rca.duckdb"
    system = {"role": "system", "content": CHAT_SYSTEM}
    fields = _xss_fields(
        messages=[system, {"role": "user", "content": CHAT_USER}],
        counterfactual_messages=[system, {"role": "user", "content": CHAT_CF_USER}],
        bad=CHAT_BAD,
        focus=CHAT_FOCUS,
    )
    cf_seen = CHAT_SEEN.replace(CHAT_USER, CHAT_CF_USER)
    run = _xss_run(
        fields,
        prompt_text=CHAT_SEEN,
        counterfactual_text=cf_seen,
        counterfactual={"text": cf_seen, "generated": False, "drop": 0.5},
        decoding=CHAT_DECODING,
    )
    return db, Store(db, actor="tester").record_run(run)
