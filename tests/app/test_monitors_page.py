"""The Monitors page under ``streamlit.testing.v1.AppTest``, on a small store written through
the store's own API (two runs, two monitors, their evaluations and alerts; no model), and the
helpers of ``rca.ui.common`` that turn monitors into table rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from rca.store import IncidentRecord, ModelRecord, RunRecord, Store
from rca.ui import common
from tests.app.conftest import APP, CASES, IMG, SCRIPT
from tests.app.test_pages import TIMEOUT, goto, table, texts

V1, V2 = "a" * 64, "b" * 64
LEAK, BIAS = "mon-leak", "mon-bias"
STALE_REASON = "flags 40% of the 5 held-out variants that show the incident on this model"
TEXT = f"stored prompt {SCRIPT} {IMG}"


def figures(recall: float, fpr: float, auroc: float, **extra: Any) -> dict[str, Any]:
    """A figures dict as ``rca.monitor.probe.figures`` writes it, with the two splits."""
    base = {
        "n_positive": 10,
        "n_negative": 100,
        "threshold": 0.5,
        "true_positives": round(10 * recall),
        "false_positives": round(100 * fpr),
        "precision": 0.9,
        "recall": recall,
        "fpr": fpr,
        "auroc": auroc,
        "fpr_at_tpr95": 0.05,
    }
    split = {"against_counterfactuals": {**base, "auroc": auroc - 0.1},
             "against_benign": {**base, "auroc": auroc + 0.01}}  # fmt: skip
    return {**base, **split, **extra}


def _run(case: str, fp: str, name: str) -> RunRecord:
    fields = {"id": case, "title": f"{case} title", "prompt": "p", "bad": " b", "good": " g"}
    return RunRecord(
        incident=IncidentRecord.from_fields(fields, source=f"cases/{case}.toml"),
        model=ModelRecord(fp, path=f"/models/{name}", n_params=1),
        summary={"verdict": "confirmed", "p_bad_before": 0.9, "p_bad_after": 0.1},
    )


def _describe(mid: str, run_id: str, case: str, sites: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "monitor_id": mid,
        "run_id": run_id,
        "case_id": case,
        "model_fingerprint": V1,
        "sites": sites,
        "threshold": 0.625,
        "target_fpr": 0.01,
        "fit": figures(0.875, 0.01, 0.97),
        "data": {"l2": 0.01},
    }


@pytest.fixture(scope="module")
def monitor_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(database, leak monitor id, bias monitor id). The leak monitor (built first) has a
    held-out evaluation with both baselines, a stale check on a second model, and three alerts
    over two days (one with its prompt text kept); the bias monitor has neither."""
    db = tmp_path_factory.mktemp("app_monitors") / "rca.duckdb"
    store = Store(db, actor="tester")
    leak_run = store.record_run(_run(LEAK, V1, "support-bot-v1"))
    bias_run = store.record_run(_run(BIAS, V1, "support-bot-v1"))
    store.record_run(_run(LEAK, V2, "support-bot-v2"))  # the second model, with its name
    leak = "11111111-0000-4000-8000-000000000001"
    bias = "22222222-0000-4000-8000-000000000002"
    store.record_monitor(
        _describe(leak, leak_run, LEAK, [{"id": "L1.H0", "role": "writer", "rule": "last"},
                                         {"id": "L0.MLP", "role": "entry", "rule": "max"}]),
        artifact_path=f"monitors/{SCRIPT}",
        weights_sha256="c" * 64,
    )  # fmt: skip
    store.record_monitor_eval(
        leak,
        model_fingerprint=V1,
        kind="held_out",
        figures=figures(0.8125, 0.02, 0.95, counts={"fit": {"positives": 10}}),
        baselines={
            "output_check": figures(0.3, 0.0, 0.65),
            "prompt_text": figures(0.6, 0.05, 0.8),
        },
        stale=False,
    )
    store.record_monitor_eval(
        leak, model_fingerprint=V2, kind="regress", figures=figures(0.4, 0.01, 0.7),
        stale=True, reason=STALE_REASON,
    )  # fmt: skip
    day = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
    alert = {"score": 0.9, "step": None, "sites": ["L1.H0"], "text": None}
    store.record_alerts(
        leak,
        model_fingerprint=V1,
        alerts=[
            {**alert, "prompt_sha256": "ab" * 32, "at": day},
            {**alert, "prompt_sha256": "cd" * 32, "score": 1.25, "step": 3, "at": day},
        ],
    )
    store.record_alerts(
        leak,
        model_fingerprint=V1,
        alerts=[
            {**alert, "prompt_sha256": "ef" * 32, "text": TEXT, "at": day + dt.timedelta(days=1)}
        ],
    )
    store.record_monitor(
        _describe(bias, bias_run, BIAS, [{"id": "L2.H1", "role": "writer", "rule": "last"}]),
        artifact_path="monitors/bias",
        weights_sha256="d" * 64,
    )
    return db, leak, bias


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``app(db)``: an AppTest of app.py on ``db``, run once (on the Cases page)."""

    def make(db: Path) -> AppTest:
        monkeypatch.setenv("RCA_DB", str(db))
        monkeypatch.setenv("RCA_CASES", str(CASES))
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def no_markup(at: AppTest) -> None:
    for kind in ("title", "subheader", "markdown", "caption", "success", "info", "warning",
                 "error"):  # fmt: skip
        for el in getattr(at, kind):
            low = str(el.value).lower()
            assert "<script" not in low and "<img" not in low, (kind, el.value)


def test_no_monitors_says_how_to_build_one(app: Any, xss_db: tuple[Path, str]) -> None:
    at = goto(app(xss_db[0]), "monitors")
    assert at.title[0].value == "Monitors"
    assert at.info and "rca monitor build RUN" in at.info[0].value
    assert not at.dataframe and not at.selectbox and charts(at) == 0


def test_monitors_table_and_a_stale_monitor(app: Any, monitor_db: tuple[Path, str, str]) -> None:
    db, leak, bias = monitor_db
    at = goto(app(db), "monitors")
    no_markup(at)
    rows = table(at.dataframe[0])
    assert [r["case"] for r in rows] == [BIAS, LEAK]  # newest first
    by_case = {r["case"]: r for r in rows}
    row = by_case[LEAK]
    assert row["sites"] == "L1.H0 (writer, last), L0.MLP (entry, max)"
    assert row["threshold"] == 0.625 and row["fit recall"] == 0.875
    # the latest evaluation is the stale check on the second model: marked, with its reason
    assert (row["latest"], row["status"], row["reason"]) == ("regress", common.STALE, STALE_REASON)
    assert row["latest recall"] == 0.4 and row["alerts"] == 3
    assert by_case[BIAS]["status"] == "not evaluated" and by_case[BIAS]["alerts"] == 0
    assert any("2 monitors, newest first; 1 stale" in c.value for c in at.caption)
    assert len(at.warning) == 1
    warning = at.warning[0].value.replace("\\", "")
    assert warning.startswith("**Stale**: " + LEAK) and STALE_REASON in warning
    assert "support-bot-v2" in warning

    # the newest monitor is shown first: nothing evaluated, no alerts, no plot
    assert at.selectbox(key="mon_pick").value == bias
    assert any("Not judged on its held-out prompts yet" in i.value for i in at.info)
    assert any("no alerts" in i.value for i in at.info)
    assert charts(at) == 0


def test_one_monitor_evaluations_and_alerts(app: Any, monitor_db: tuple[Path, str, str]) -> None:
    db, leak, _ = monitor_db
    at = goto(app(db), "monitors")
    at.selectbox(key="mon_pick").set_value(leak).run()
    assert not at.exception, at.exception
    assert at.query_params["monitor"] == leak  # linkable
    no_markup(at)
    page = texts(at)
    assert "&lt;script&gt;" in page  # the artifact path, escaped
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["alerts"] == "3" and metrics["batches"] == "2"
    assert metrics["evaluations"] == "2" and metrics["threshold"] == "0.625"
    sites = next(table(df) for df in at.dataframe if "position rule" in df.value.columns)
    assert [(s["site"], s["role"], s["position rule"]) for s in sites] == [
        ("L1.H0", "writer", "last"),
        ("L0.MLP", "entry", "max"),
    ]
    # held out: the monitor beside the two baselines, one row per figure
    held = [table(df) for df in at.dataframe if "output check" in df.value.columns]
    assert len(held) == 1
    by_figure = {r["figure"]: r for r in held[0]}
    assert (by_figure["recall"]["monitor"], by_figure["recall"]["output check"],
            by_figure["recall"]["prompt text"]) == (0.8125, 0.3, 0.6)  # fmt: skip
    assert by_figure["AUROC vs counterfactuals"]["monitor"] == pytest.approx(0.85)
    assert by_figure["positives"]["monitor"] == 10
    # on other checkpoints: the stale check, by model, with its reason
    regress = next(table(df) for df in at.dataframe if "fingerprint" in df.value.columns)
    assert len(regress) == 1
    assert regress[0]["model"] == f"support-bot-v2 ({V2[:8]})"
    assert (regress[0]["status"], regress[0]["recall"]) == (common.STALE, 0.4)
    assert regress[0]["reason"] == STALE_REASON
    # alerts over time: per day and each score, then the table; text only where kept
    assert charts(at) == 2
    alerts = next(table(df) for df in at.dataframe if "prompt sha256" in df.value.columns)
    assert [a["prompt sha256"] for a in alerts] == ["ab" * 32, "cd" * 32, "ef" * 32]
    assert [a["score"] for a in alerts] == [0.9, 1.25, 0.9]
    assert alerts[1]["step"] == 3 and alerts[0]["sites"] == "L1.H0"
    kept = [a["text"] if isinstance(a["text"], str) else None for a in alerts]  # None: NaN
    assert kept == [None, None, TEXT]  # as stored, as text
    assert "the prompt's text for the 1 alerts" in page


def test_a_link_opens_a_monitor_by_prefix(app: Any, monitor_db: tuple[Path, str, str]) -> None:
    db, leak, _ = monitor_db
    at = goto(app(db), "monitors", monitor=leak[:6])
    assert at.selectbox(key="mon_pick").value == leak and charts(at) == 2
    at = goto(app(db), "monitors", monitor="not-a-monitor")
    assert any("not in this database; showing the newest" in w.value for w in at.warning)
    assert at.selectbox(key="mon_pick").value != leak


def test_monitor_rows_helpers() -> None:
    alert = {"alerted_at": "2026-03-01T09:00:00.000000Z", "score": 1.0, "step": None,
             "sites": ["L1.H0"], "prompt_sha256": "ab" * 32, "model_fingerprint": V1,
             "batch_id": "b" * 36, "text": None}  # fmt: skip
    later = {**alert, "alerted_at": "2026-03-03T00:00:00.000000Z"}
    assert "text" not in common.alert_rows([alert], {})[0]  # no text kept: no column
    assert common.alerts_per_day([alert, alert, later]) == [
        {"day": "2026-03-01", "alerts": 2},
        {"day": "2026-03-03", "alerts": 1},
    ]
    assert common.eval_status(None) == "not evaluated"
    assert common.eval_status({"kind": "regress", "stale": None}) == "incident gone"
    assert common.eval_status({"kind": "regress", "stale": False}) == "fires"
    assert common.eval_status({"kind": "held_out", "stale": False}) == "ok"
    # no baselines: the monitor's column alone; a figure nobody has is left out
    rows = common.held_out_rows({"figures": {"recall": 0.5, "n_positive": 4}})
    assert rows == [{"figure": "positives", "monitor": 4}, {"figure": "recall", "monitor": 0.5}]
