"""The DuckDB case store: schema and migrations, round trips, append-only notes, the audit chain
catching every hand edit, all-or-nothing runs, `?` parameters, Parquet export.

Hand edits go through raw duckdb connections, the way someone with the file would make them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rca import store as store_mod
from rca.store import (
    RUN_STAGES,
    SCHEMA_VERSION,
    TABLES,
    IncidentRecord,
    Migration,
    ModelRecord,
    RecordError,
    RunRecord,
    Store,
    StoreError,
    append_audit,
    digest_rows,
    open_readonly,
)
from rca.store import schema as schema_mod

EVIL = "L3.H5'; DROP TABLE runs; --"
FP = "f" * 64

# ---------------------------------------------------------------------------- building runs


def incident(i: int = 0, **fields: Any) -> IncidentRecord:
    base = {
        "id": f"leak-{i}",
        "title": "PIN leaked to caller",
        "severity": "high",
        "model": "zoo:support-bot-v1",
        "prompt": "caller : what is my pin ?",
        "bad": " 4921",
        "tags": ["leak", "pii"],
    }
    base.update(fields)
    return IncidentRecord.from_fields(base, source="cases/leak.toml", toml='id = "leak"\n')


def model(fp: str = FP, path: str = "/models/v1") -> ModelRecord:
    return ModelRecord(
        fp, path=path, architecture="gpt2", n_params=1234, dims={"n_layers": 2, "n_heads": 4}
    )


BEHAVIOUR = {
    "fit": {
        "n": 2,
        "mean_p_bad_before": 0.85,
        "mean_p_bad_after": 0.075,
        "share_under_target": 1.0,
    },
    "held_out": {
        "n": 1,
        "mean_p_bad_before": 0.7,
        "mean_p_bad_after": 0.6,
        "share_under_target": 0.0,
    },
    "hold_share": 0.8,
    "symptom_patch": True,
}


def run(**overrides: Any) -> RunRecord:
    """A run with rows in every table."""
    kw: dict[str, Any] = dict(
        incident=incident(),
        model=model(),
        config={"method": "eap-ig", "steps": 16},
        device="cpu",
        seed=7,
        timings={"trace": 1.5, "confirm": 0.25},
        summary={
            "verdict": "confirmed",
            "metric_before": 3.25,
            "metric_after": -0.5,
            "p_bad_before": 0.9,
            "p_bad_after": 0.1,
        },
        started_at="2026-11-25T10:00:00+00:00",
        finished_at="2026-11-25T10:00:05+00:00",
        token_scores=[
            {"position": 0, "token": "caller", "score": 0.1, "method": "ig"},
            {"position": 1, "token": " pin", "score": 2.5, "method": "ig"},
        ],
        nodes=[
            {
                "node_id": "L1.H2",
                "score": 1.75,
                "verdict": "confirmed",
                "rank": 1,
                "p_value": 0.01,
                "role": "writer",
                "sites": ["L1.H2@4", "L1.H2@5"],
            },
            {"node_id": "L0.MLP", "score": -0.25, "method": "atp", "baseline": "mean"},
            {"node_id": "L1.N7", "score": 0.5},
        ],
        edges=[
            {"source": "EMB", "target": "L0.MLP", "score": 0.5},
            {"source": "L0.MLP", "target": "L1.H2", "score": 1.25},
        ],
        ablations=[
            {
                "experiment": "cause_set",
                "components": ["L1.H2", "L0.MLP"],
                "kind": "mean",
                "metric": -0.5,
                "effect": 3.75,
                "p_value": 0.004,
                "details": {"n_random": 200},
            },
            {"experiment": "random_set", "components": ["L0.H1"], "effect": 0.1},
        ],
        remedies=[
            {
                "remedy_id": "ablate-L1.H2",
                "kind": "ablate",
                "components": ["L1.H2"],
                "metric_before": 3.25,
                "metric_after": -0.5,
                "p_bad_before": 0.9,
                "p_bad_after": 0.1,
                "side_effect": {"kl": 0.01, "loss_change": 0.002},
                "recommended": True,
                "note": "fixes the leak at little cost",
                "patch_spec": {"op": "zero", "ids": ["L1.H2"]},
                "behaviour": BEHAVIOUR,
            }
        ],
        variants=[
            {"variant_index": 1, "part": "fit", "origin": "listed", "label": "", "p_bad": 0.8},
            {
                "variant_index": 2,
                "part": "held_out",
                "origin": "template",
                "label": "name=Bo",
                "prompt_tokens": 9,
                "metric": 2.5,
                "p_bad": 0.7,
                "counterfactual_aligned": True,
                "metric_counterfactual": -1.0,
            },
        ],
        # kind left out: filled in from the remedy the row names
        variant_results=[
            {
                "remedy_row": 0,
                "variant_index": 1,
                "part": "fit",
                "p_bad_before": 0.8,
                "p_bad_after": 0.05,
            },
            {
                "remedy_row": 0,
                "variant_index": 2,
                "part": "held_out",
                "p_bad_before": 0.7,
                "p_bad_after": 0.6,
            },
        ],
    )
    kw.update(overrides)
    return RunRecord(**kw)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "rca.duckdb"


def snapshot(path: Path) -> dict[str, str]:
    """Every table's rows, in a fixed order, as text (so NaNs compare equal)."""
    with open_readonly(path) as con:
        return {t: repr(con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()) for t in TABLES}


def raw(path: Path, sql: str, params: list[Any] | None = None) -> list[Any]:
    """A hand edit (or read) through a read-write connection, closed at once."""
    with duckdb.connect(str(path)) as con:
        return con.execute(sql, params or []).fetchall()


# ---------------------------------------------------------------------------- schema


def test_fresh_store_has_every_table_and_the_current_version(db: Path) -> None:
    s = Store(db, actor="tester")
    names = {r[0] for r in raw(db, "SELECT table_name FROM duckdb_tables()")}
    assert set(TABLES) <= names
    assert s.schema_version() == SCHEMA_VERSION == 7
    versions = [r[0] for r in raw(db, "SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 3, 4, 5, 6, 7]
    res = s.verify()
    assert res.ok, res.message
    assert res.records == 7  # one audit record per applied migration
    Store(db)  # reopening an up-to-date file writes nothing
    assert s.verify().records == 7


# The v1 schema as released, frozen here: the migration must work on files written by it.
V1_DDL = [
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL,"
    " note VARCHAR NOT NULL)",
    "CREATE TABLE models (fingerprint VARCHAR PRIMARY KEY, path VARCHAR, architecture VARCHAR,"
    " n_params BIGINT, dims JSON, first_seen TIMESTAMPTZ NOT NULL)",
    "CREATE TABLE incidents (incident_id VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, title VARCHAR,"
    " severity VARCHAR, tags VARCHAR[], source VARCHAR, case_data JSON NOT NULL, case_toml VARCHAR,"
    " ingested_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (incident_id, sha256))",
    "CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, incident_id VARCHAR NOT NULL,"
    " incident_sha256 VARCHAR NOT NULL, model_fingerprint VARCHAR NOT NULL,"
    " status VARCHAR NOT NULL, device VARCHAR, seed BIGINT, config JSON, versions JSON,"
    " timings JSON, summary JSON, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ,"
    " recorded_at TIMESTAMPTZ NOT NULL)",
    'CREATE TABLE token_scores (run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, "position"'
    " INTEGER NOT NULL, token VARCHAR, score DOUBLE, method VARCHAR)",
    "CREATE TABLE nodes (run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, node_id VARCHAR NOT"
    " NULL, kind VARCHAR, layer INTEGER, score DOUBLE, method VARCHAR, baseline VARCHAR,"
    " total_effect DOUBLE, direct_effect DOUBLE, necessity DOUBLE, p_value DOUBLE,"
    " verdict VARCHAR, reason VARCHAR, rank INTEGER)",
    "CREATE TABLE edges (run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, source VARCHAR NOT"
    " NULL, target VARCHAR NOT NULL, score DOUBLE)",
    "CREATE TABLE ablations (run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, experiment VARCHAR"
    " NOT NULL, components VARCHAR[], kind VARCHAR, metric DOUBLE, effect DOUBLE, p_value DOUBLE,"
    " details JSON)",
    "CREATE TABLE remedies (run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, remedy_id VARCHAR"
    " NOT NULL, kind VARCHAR, components VARCHAR[], metric_before DOUBLE, metric_after DOUBLE,"
    " p_bad_before DOUBLE, p_bad_after DOUBLE, side_effect JSON, recommended BOOLEAN NOT NULL,"
    " note VARCHAR)",
    "CREATE TABLE notes (note_id BIGINT PRIMARY KEY, run_id VARCHAR, incident_id VARCHAR,"
    " author VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL, text VARCHAR NOT NULL)",
    "CREATE TABLE audit (seq BIGINT PRIMARY KEY, written_at TIMESTAMPTZ NOT NULL, actor VARCHAR"
    " NOT NULL, action VARCHAR NOT NULL, table_name VARCHAR NOT NULL, entity VARCHAR NOT NULL,"
    " content_hash VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL)",
]
V1_RUN = "11111111-1111-4111-8111-111111111111"


def make_v1(path: Path, *, tamper_summary: bool = False) -> None:
    """A v1 file written by hand: one model, incident and run with nodes and a remedy, each
    write followed by its audit record, as v1 rca wrote them."""
    inc = incident()
    with duckdb.connect(str(path)) as con:
        con.execute("BEGIN")
        for sql in V1_DDL:
            con.execute(sql)
        con.execute("INSERT INTO schema_version VALUES (1, now(), 'initial schema')")
        append_audit(con, actor="v1", action="migrate", table="schema_version", entity="1")
        con.execute(
            "INSERT INTO models VALUES (?, '/m', 'gpt2', 10, '{\"n_layers\":2}', now())", [FP]
        )
        append_audit(con, actor="v1", action="insert", table="models", entity=FP)
        con.execute(
            "INSERT INTO incidents VALUES (?, ?, 'PIN', 'high', ['leak'], NULL, ?, NULL, now())",
            [inc.id, inc.sha256, json.dumps(dict(inc.fields))],
        )
        append_audit(con, actor="v1", action="insert", table="incidents", entity=inc.key)
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, 'ok', 'cpu', 1, '{}', '{}', '{}',"
            ' \'{"verdict":"confirmed"}\', now(), now(), now())',
            [V1_RUN, inc.id, inc.sha256, FP],
        )
        append_audit(con, actor="v1", action="insert", table="runs", entity=V1_RUN)
        con.execute(
            "INSERT INTO nodes (run_id, row_no, node_id, kind, layer, score, verdict) VALUES"
            " (?, 0, 'L1.H2', 'head', 1, 1.5, 'confirmed'), (?, 1, 'L0.MLP', 'mlp', 0, 0.5, NULL)",
            [V1_RUN, V1_RUN],
        )
        append_audit(con, actor="v1", action="insert", table="nodes", entity=V1_RUN)
        con.execute(
            "INSERT INTO remedies (run_id, row_no, remedy_id, kind, components, recommended)"
            " VALUES (?, 0, 'r1', 'ablate', ['L1.H2'], true)",
            [V1_RUN],
        )
        append_audit(con, actor="v1", action="insert", table="remedies", entity=V1_RUN)
        if tamper_summary:
            con.execute('UPDATE runs SET summary = \'{"verdict":"none"}\'')
        con.execute("COMMIT")


def test_v1_file_is_migrated_in_place_and_stays_verifiable(db: Path) -> None:
    make_v1(db)
    with pytest.raises(StoreError, match="older than this rca.*Store\\(path\\) to migrate"):
        Store.reader(db).list_runs()
    before = {r[0]: r for r in raw(db, "SELECT run_id, summary, seed FROM runs")}
    s = Store(db, actor="migrator")
    assert s.schema_version() == 7
    got = s.get_run(V1_RUN)
    assert got["kind"] == "investigate" and got["parent_run_id"] is None
    assert got["summary"] == {"verdict": "confirmed"} and got["seed"] == 1
    assert [n["node_id"] for n in got["nodes"]] == ["L1.H2", "L0.MLP"]
    assert got["nodes"][0]["benign_loss_pct"] is None  # not measured before version 3
    assert got["nodes"][0]["sites"] is None  # not placed before version 4
    assert got["remedies"][0]["patch_spec"] is None
    assert got["remedies"][0]["behaviour"] is None  # no variants before version 5
    assert got["variants"] == [] and got["variant_results"] == []
    assert {r[0]: r for r in raw(db, "SELECT run_id, summary, seed FROM runs")} == before
    res = s.verify()
    assert res.ok, res.message
    # the runs row changed (kind filled in), so the migration audited it; remedies and nodes
    # did not change (the new columns are NULL, and NULL columns do not enter the digest)
    migrated = raw(db, "SELECT table_name, entity FROM audit WHERE actor = 'migrator' ORDER BY seq")
    assert migrated == [
        ("runs", V1_RUN),
        ("schema_version", "2"),
        ("schema_version", "3"),
        ("schema_version", "4"),
        ("schema_version", "5"),
        ("schema_version", "6"),
        ("schema_version", "7"),
    ]
    # and the migrated file takes new runs
    s.record_run(run(parent_run_id=V1_RUN, kind="regress"))
    assert s.verify().ok


def test_migration_does_not_bless_rows_changed_before_it(db: Path) -> None:
    make_v1(db, tamper_summary=True)
    s = Store(db)
    res = s.verify()
    assert not res.ok
    assert res.first is not None and (res.first.table, res.first.entity) == ("runs", V1_RUN)


def test_newer_schema_is_refused_with_a_clear_message(db: Path) -> None:
    Store(db)
    raw(db, "INSERT INTO schema_version VALUES (99, now(), 'from the future')")
    for opener in (lambda: Store(db), lambda: Store.reader(db).list_runs()):
        with pytest.raises(StoreError, match=r"schema version 99, newer than this rca knows"):
            opener()
    assert raw(db, "SELECT max(version) FROM schema_version") == [(99,)]


def test_a_failing_migration_leaves_the_file_as_it_was(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(db).record_run(run())
    before = snapshot(db)
    nxt = store_mod.SCHEMA_VERSION + 1
    broken = Migration(
        nxt, "broken", ("ALTER TABLE runs ADD COLUMN extra INTEGER", "SELECT * FROM no_such_table")
    )
    monkeypatch.setattr(schema_mod, "MIGRATIONS", (*schema_mod.MIGRATIONS, broken))
    monkeypatch.setattr(schema_mod, "SCHEMA_VERSION", nxt)
    with pytest.raises(StoreError, match="rolled back, nothing was written"):
        Store(db)
    monkeypatch.undo()
    assert snapshot(db) == before
    assert "extra" not in {r[0] for r in raw(db, "DESCRIBE runs")}


def test_a_foreign_duckdb_file_is_refused(db: Path) -> None:
    raw(db, "CREATE TABLE something (x INTEGER)")
    with pytest.raises(StoreError, match="not an rca store"):
        Store(db)


def test_reader_errors_name_the_path_and_the_fix(db: Path) -> None:
    with pytest.raises(StoreError, match=f"database {db} does not exist; record a run first"):
        Store.reader(db).list_runs()
    Store(db)
    with duckdb.connect(str(db)):  # a writer in this process holds the file
        with pytest.raises(StoreError) as ei:
            with open_readonly(db, retries=3, backoff=0.01, max_wait_s=0.5):
                pass
    msg = str(ei.value)
    assert msg.startswith(f"database {db} is locked by another writer (waited ")
    assert msg.endswith("s); retry when it finishes")


# ---------------------------------------------------------------------------- round trips


def test_record_run_round_trips_every_table(db: Path) -> None:
    s = Store(db, actor="tester")
    r = run()
    assert s.record_run(r) == r.run_id
    got = s.get_run(r.run_id)
    assert got["kind"] == "investigate" and got["status"] == "ok" and got["device"] == "cpu"
    assert got["config"] == {"method": "eap-ig", "steps": 16} and got["seed"] == 7
    assert got["timings"] == {"trace": 1.5, "confirm": 0.25}
    assert got["summary"]["verdict"] == "confirmed" and got["summary"]["p_bad_after"] == 0.1
    assert got["versions"]["duckdb"] == duckdb.__version__
    assert got["started_at"] == "2026-11-25T10:00:00.000000Z"
    assert got["finished_at"] == "2026-11-25T10:00:05.000000Z"
    assert got["recorded_at"].endswith("Z")
    inc = got["incident"]
    assert inc["incident_id"] == "leak-0" and inc["sha256"] == r.incident.sha256
    assert inc["case_data"] == dict(r.incident.fields) and inc["case_toml"] == 'id = "leak"\n'
    assert inc["tags"] == ["leak", "pii"] and inc["severity"] == "high"
    assert got["model"]["dims"] == {"n_layers": 2, "n_heads": 4}
    assert got["model"]["path"] == "/models/v1" and got["model"]["n_params"] == 1234

    assert [(t["position"], t["token"], t["score"]) for t in got["token_scores"]] == [
        (0, "caller", 0.1),
        (1, " pin", 2.5),
    ]
    nodes = {n["node_id"]: n for n in got["nodes"]}
    assert (nodes["L1.H2"]["kind"], nodes["L1.H2"]["layer"]) == ("head", 1)  # from the id
    assert (nodes["L1.N7"]["kind"], nodes["L1.N7"]["layer"]) == ("neuron", 1)
    assert nodes["L1.H2"]["verdict"] == "confirmed" and nodes["L1.H2"]["rank"] == 1
    assert nodes["L0.MLP"]["baseline"] == "mean" and nodes["L0.MLP"]["score"] == -0.25
    assert nodes["L1.H2"]["role"] == "writer" and nodes["L1.H2"]["sites"] == ["L1.H2@4", "L1.H2@5"]
    assert nodes["L0.MLP"]["sites"] is None
    assert got["nodes"][0]["node_id"] == "L1.H2"  # ranked first
    assert {(e["source"], e["target"], e["score"]) for e in got["edges"]} == {
        ("EMB", "L0.MLP", 0.5),
        ("L0.MLP", "L1.H2", 1.25),
    }
    abl = {a["experiment"]: a for a in got["ablations"]}
    assert abl["cause_set"]["components"] == ["L1.H2", "L0.MLP"]
    assert abl["cause_set"]["details"] == {"n_random": 200} and abl["random_set"]["details"] is None
    (rem,) = got["remedies"]
    assert rem["recommended"] is True and rem["side_effect"] == {"kl": 0.01, "loss_change": 0.002}
    assert rem["patch_spec"] == {"op": "zero", "ids": ["L1.H2"]} and rem["components"] == ["L1.H2"]
    assert rem["behaviour"] == BEHAVIOUR and rem["row_no"] == 0
    assert [(v["variant_index"], v["part"], v["label"], v["p_bad"]) for v in got["variants"]] == [
        (1, "fit", "", 0.8),
        (2, "held_out", "name=Bo", 0.7),
    ]
    assert got["variants"][0]["counterfactual_aligned"] is None  # not given: NULL, not false
    assert got["variants"][1]["counterfactual_aligned"] is True
    assert [
        (v["remedy_row"], v["kind"], v["variant_index"], v["p_bad_before"], v["p_bad_after"])
        for v in got["variant_results"]
    ] == [(0, "ablate", 1, 0.8, 0.05), (0, "ablate", 2, 0.7, 0.6)]

    frames = s.get_run(r.run_id, frames=True)
    assert isinstance(frames["edges"], pd.DataFrame) and len(frames["edges"]) == 2
    assert s.counts()["audit"] == 7 + 10  # migrations, then model, incident, run and 7 tables
    assert s.verify().ok


def test_readers_filter_and_join(db: Path) -> None:
    s = Store(db)
    first = s.record_run(run())
    second = s.record_run(run(incident=incident(1), model=model("e" * 64), status="partial"))
    regress = s.record_run(run(kind="regress", parent_run_id=first))
    assert {r["run_id"] for r in s.list_runs()} == {first, second, regress}
    assert [r["run_id"] for r in s.list_runs(incident="leak-1")] == [second]
    assert {r["run_id"] for r in s.list_runs(model=FP)} == {first, regress}
    assert [r["run_id"] for r in s.list_runs(kind="regress")] == [regress]
    assert [r["run_id"] for r in s.list_runs(parent_run_id=first)] == [regress]
    assert [r["run_id"] for r in s.list_runs(status="partial")] == [second]
    assert s.list_runs(incident="leak-1")[0]["incident_title"] == "PIN leaked to caller"
    assert len(s.list_runs(limit=2)) == 2
    assert {(m["fingerprint"], m["n_runs"]) for m in s.models()} == {(FP, 2), ("e" * 64, 1)}
    assert {(i["incident_id"], i["n_runs"]) for i in s.list_incidents()} == {
        ("leak-0", 2),
        ("leak-1", 1),
    }
    df = s.query(
        "SELECT node_id, count(DISTINCT r.incident_id) AS n FROM nodes JOIN runs r USING (run_id)"
        " WHERE verdict = ? GROUP BY node_id",
        ["confirmed"],
    )
    assert df.to_dict("records") == [{"node_id": "L1.H2", "n": 2}]


def test_a_model_seen_at_a_new_path_is_updated_and_audited(db: Path) -> None:
    s = Store(db)
    s.record_run(run())
    first_seen = s.models()[0]["first_seen"]
    s.record_run(run(model=model(path="/moved/v1")))
    (m,) = s.models()
    assert m["path"] == "/moved/v1" and m["first_seen"] == first_seen and m["n_runs"] == 2
    actions = raw(db, "SELECT action FROM audit WHERE table_name = 'models' ORDER BY seq")
    assert actions == [("insert",), ("update",)]
    assert s.verify().ok


def test_a_sparse_model_record_does_not_erase_what_is_known(db: Path) -> None:
    s = Store(db)
    s.record_run(run())
    s.record_run(run(model=ModelRecord(FP)))
    (m,) = s.models()
    assert (m["path"], m["architecture"], m["n_params"]) == ("/models/v1", "gpt2", 1234)
    assert m["dims"] == {"n_layers": 2, "n_heads": 4}
    assert raw(db, "SELECT count(*) FROM audit WHERE table_name = 'models'") == [(1,)]


def test_incident_record_from_a_case_file_keeps_its_toml(tmp_path: Path) -> None:
    from rca.ingest.case_file import load_case

    text = (
        'id = "t-1"\ntitle = "Trigger"\nseverity = "high"\nmodel = "m"\n'
        'prompt = "refund ?"\nbad = " approved"\ntags = ["backdoor"]  # planted\n'
    )
    (tmp_path / "case.toml").write_text(text)
    inc = load_case(tmp_path / "case.toml", check_model=False)
    rec = IncidentRecord.from_incident(inc)
    assert rec.toml == text and rec.sha256 == inc.sha256 and rec.source == inc.source
    assert rec.sha256 == IncidentRecord.from_fields(inc.to_dict()).sha256
    (tmp_path / "case.toml").write_text(text.replace("refund", "return"))  # edited since
    assert IncidentRecord.from_incident(inc).toml is None
    s = Store(tmp_path / "db.duckdb")
    rid = s.record_run(run(incident=rec))
    got = s.get_run(rid)["incident"]
    assert got["case_toml"] == text and got["tags"] == ["backdoor"]
    assert got["case_data"]["prompt"] == "refund ?" and got["source"] == inc.source


def test_the_same_rows_hash_the_same_from_any_input_form(db: Path) -> None:
    rows = [
        {"node_id": "L0.H1", "score": 0.5, "layer": 0},
        {"node_id": "L1.MLP", "score": float("nan"), "layer": 1},
        {"node_id": "L1.H0", "score": -0.0, "layer": None},
    ]
    forms = {
        "rows": rows,
        "pandas": pd.DataFrame(rows).astype({"layer": "Int64"}),
        "arrow": pa.Table.from_pylist(rows),
        "columns": {k: [r[k] for r in rows] for k in rows[0]},
    }
    s = Store(db)
    hashes = {}
    for name, nodes in forms.items():
        rid = s.record_run(run(nodes=nodes))
        hashes[name] = raw(
            db,
            "SELECT content_hash FROM audit WHERE table_name = 'nodes' AND entity = ?",
            [rid],
        )
        score = {n["node_id"]: n["score"] for n in s.get_run(rid)["nodes"]}["L1.MLP"]
        assert math.isnan(score)  # NaN stays NaN, not NULL
    assert len({json.dumps(h) for h in hashes.values()}) == 1, hashes
    assert s.verify().ok


def test_invalid_records_fail_before_touching_the_file(db: Path) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: run(nodes=[{"node": "L0.H1"}]), "unknown column 'node'"),
        (lambda: run(edges=[{"source": "a", "score": 1.0}]), "column 'target' is missing"),
        (lambda: run(edges=[{"source": "a", "target": None, "score": 1}]), "missing value"),
        (lambda: run(token_scores=[{"position": "x", "token": "a", "score": 1}]), "as int"),
        (lambda: run(run_id="not-a-uuid"), "is not a uuid"),
        (lambda: run(status="done"), "is not one of"),
        (lambda: run(kind="Regress!"), "is not a lowercase word"),
        (lambda: run(ablations=[{"experiment": "x", "components": ["a"], "details": "{"}]), "JSON"),
        (lambda: run(timings={"trace": "slow"}), "not a number of seconds"),
        (lambda: run(incident={"id": "x"}), "IncidentRecord.from_incident"),
        (lambda: IncidentRecord("x", "abc", {}), "not a lowercase sha256"),
    ]
    for make, msg in cases:
        with pytest.raises(RecordError, match=msg):
            make()
    assert not db.exists()


def test_threads_of_one_process_write_one_at_a_time(db: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    s = Store(db)
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: s.record_run(run(incident=incident(i))), range(8)))
    assert len(set(ids)) == 8 and len(s.list_runs()) == 8
    assert s.verify().ok


def test_duplicate_run_and_missing_parent_are_refused_and_rolled_back(db: Path) -> None:
    s = Store(db)
    r = run()
    s.record_run(r)
    before = snapshot(db)
    with pytest.raises(StoreError, match=f"run {r.run_id} is already recorded"):
        s.record_run(r)
    with pytest.raises(StoreError, match="parent run .* is not recorded"):
        s.record_run(run(parent_run_id=str(uuid.uuid4()), model=model("a" * 64)))
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- notes


def test_notes_are_append_only(db: Path) -> None:
    s = Store(db)
    rid = s.record_run(run())
    a = s.add_note(run_id=rid, author="ana", text="L1.H2 copies the PIN")
    b = s.add_note(incident="leak-0", author="bo", text="seen again in prod")
    c = s.add_note(run_id=rid, author="ana", text="correction: and L0.MLP")
    assert (a, b, c) == (1, 2, 3)
    assert [n["text"] for n in s.notes_for(author="ana")] == [
        "L1.H2 copies the PIN",
        "correction: and L0.MLP",
    ]
    assert [n["note_id"] for n in s.notes_for(incident="leak-0")] == [1, 2, 3]
    assert [n["note_id"] for n in s.get_run(rid)["notes"]] == [1, 3]
    assert s.notes_for(run_id=rid)[0]["created_at"].endswith("Z")
    # no API changes or removes a note
    writers = {n for n in dir(Store) if not n.startswith("_")} - set(dir(store_mod.ReadOnlyStore))
    assert writers == {
        "add_note",
        "record_run",
        "reader",
        "record_monitor",
        "record_monitor_eval",
        "record_alerts",
        "record_provenance",
    }
    for bad in (
        dict(author="ana", text="orphan"),
        dict(run_id=rid, author=" ", text="x"),
        dict(run_id=rid, author="ana", text=""),
    ):
        with pytest.raises(RecordError):
            s.add_note(**bad)  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="is not recorded"):
        s.add_note(incident="no-such", author="a", text="x")
    assert s.verify().ok

    raw(db, "UPDATE notes SET text = 'nothing to see' WHERE note_id = 2")
    res = s.verify()
    assert not res.ok and "table notes, entity '2'" in res.message
    raw(db, "UPDATE notes SET text = 'seen again in prod' WHERE note_id = 2")
    assert s.verify().ok
    raw(db, "DELETE FROM notes WHERE note_id = 3")
    res = s.verify()
    assert not res.ok and "table notes, entity '3': row(s) deleted" in res.message


# ---------------------------------------------------------------------------- tampering


@pytest.fixture
def recorded(db: Path) -> tuple[Store, str]:
    s = Store(db, actor="tester")
    rid = s.record_run(run())
    s.add_note(run_id=rid, author="ana", text="first look")
    assert s.verify().ok
    return s, rid


INC_KEY = f"leak-0@{incident().sha256}"
# (table, hand edit, entity the message must name; RUN stands for the run id)
TAMPER = [
    ("models", "UPDATE models SET path = '/elsewhere'", FP),
    ("models", 'UPDATE models SET dims = \'{"n_layers":3,"n_heads":4}\'', FP),
    ("incidents", "UPDATE incidents SET severity = 'low'", INC_KEY),
    ("incidents", "UPDATE incidents SET case_toml = NULL", INC_KEY),
    ("runs", 'UPDATE runs SET summary = \'{"verdict":"not_confirmed"}\'', "RUN"),
    ("runs", "UPDATE runs SET finished_at = finished_at + INTERVAL 1 MICROSECOND", "RUN"),
    ("token_scores", "UPDATE token_scores SET token = ' PIN' WHERE position = 1", "RUN"),
    ("nodes", "UPDATE nodes SET score = score + 1e-12 WHERE node_id = 'L1.H2'", "RUN"),
    ("nodes", "UPDATE nodes SET verdict = NULL", "RUN"),
    ("edges", "UPDATE edges SET score = 0.0 WHERE source = 'EMB'", "RUN"),
    ("edges", "UPDATE edges SET source = target, target = source", "RUN"),
    ("ablations", "UPDATE ablations SET p_value = 0.5 WHERE experiment = 'cause_set'", "RUN"),
    ("ablations", "UPDATE ablations SET components = ['L1.H2']", "RUN"),
    ("remedies", "UPDATE remedies SET recommended = false", "RUN"),
    ("remedies", "UPDATE remedies SET side_effect = '{\"kl\":0.5}'", "RUN"),
    ("remedies", "UPDATE remedies SET behaviour = '{}'", "RUN"),
    ("variants", "UPDATE variants SET p_bad = 0.1 WHERE variant_index = 2", "RUN"),
    ("variants", "UPDATE variants SET part = 'fit'", "RUN"),
    ("variant_results", "UPDATE variant_results SET p_bad_after = 0.01 WHERE row_no = 1", "RUN"),
    ("variant_results", "UPDATE variant_results SET kind = 'steer'", "RUN"),
    ("notes", "UPDATE notes SET author = 'mallory'", "1"),
    ("schema_version", "UPDATE schema_version SET note = 'x' WHERE version = 2", "2"),
    ("audit", "UPDATE audit SET actor = 'mallory' WHERE seq = 5", "RUN"),
    ("audit", "UPDATE audit SET content_hash = repeat('0', 64) WHERE table_name = 'edges'", "RUN"),
]
DELETE = [
    ("models", "DELETE FROM models", FP),
    ("incidents", "DELETE FROM incidents", INC_KEY),
    ("runs", "DELETE FROM runs", "RUN"),
    ("token_scores", "DELETE FROM token_scores WHERE position = 0", "RUN"),
    ("nodes", "DELETE FROM nodes WHERE node_id = 'L1.N7'", "RUN"),
    ("edges", "DELETE FROM edges WHERE source = 'EMB'", "RUN"),
    ("ablations", "DELETE FROM ablations WHERE experiment = 'random_set'", "RUN"),
    ("remedies", "DELETE FROM remedies", "RUN"),
    ("variants", "DELETE FROM variants WHERE variant_index = 1", "RUN"),
    ("variant_results", "DELETE FROM variant_results", "RUN"),
    ("notes", "DELETE FROM notes", "1"),
    ("schema_version", "DELETE FROM schema_version WHERE version = 1", "1"),
]
INSERT = [
    ("edges", "INSERT INTO edges SELECT * REPLACE (row_no + 10 AS row_no) FROM edges", "RUN"),
    ("nodes", "INSERT INTO nodes (run_id, row_no, node_id) VALUES ('RUN', 9, 'L0.H0')", "RUN"),
    (
        "variant_results",
        "INSERT INTO variant_results VALUES ('RUN', 2, 0, 'ablate', 3, 'held_out', 0.9, 0.1)",
        "RUN",
    ),
    ("notes", "INSERT INTO notes VALUES (7, NULL, 'leak-0', 'm', now(), 'later')", "7"),
]


@pytest.mark.parametrize(("table", "sql", "entity"), TAMPER + DELETE + INSERT)
def test_any_hand_edit_breaks_verify_and_is_named(
    recorded: tuple[Store, str], db: Path, table: str, sql: str, entity: str
) -> None:
    s, rid = recorded
    entity = entity.replace("RUN", rid)
    raw(db, sql.replace("'RUN'", f"'{rid}'"))
    res = s.verify()
    assert not res.ok
    assert res.first is not None
    assert (res.first.table, res.first.entity) == (table, entity) or (
        table == "audit" and res.first.seq is not None
    ), res.message
    assert f"table {res.first.table}, entity {res.first.entity!r}" in res.message
    assert str(db) in res.message and "\n" not in res.message


def test_removing_an_audit_record_is_named(recorded: tuple[Store, str], db: Path) -> None:
    s, rid = recorded
    raw(db, "DELETE FROM audit WHERE seq = 4")
    res = s.verify()
    assert not res.ok and res.first is not None and res.first.seq == 5
    assert "an audit record is gone" in res.message


# ---------------------------------------------------------------------------- all or nothing

STAGES = [
    "model",
    "incident",
    "run",
    "token_scores",
    "nodes",
    "edges",
    "ablations",
    "remedies",
    "variants",
    "variant_results",
]


class _CommitFails:
    """A DuckDB connection whose COMMIT statement raises; everything else goes through."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql == "COMMIT":
            raise RuntimeError("injected at commit")
        return self._con.execute(sql, *args, **kwargs)


def fail_at(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """Make record_run raise RuntimeError at ``stage``: right after that stage of RUN_STAGES
    wrote its rows, or in the COMMIT statement with every row written."""
    if stage == "commit":
        real_connect = duckdb.connect
        monkeypatch.setattr(duckdb, "connect", lambda *a, **k: _CommitFails(real_connect(*a, **k)))
        return
    write = RUN_STAGES[stage]

    def then_fail(*args: Any, **kwargs: Any) -> None:
        write(*args, **kwargs)
        raise RuntimeError(f"injected at {stage}")

    monkeypatch.setitem(RUN_STAGES, stage, then_fail)


@pytest.mark.parametrize("stage", [*STAGES, "commit"])
def test_a_failure_inside_record_run_leaves_the_db_exactly_as_before(
    db: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    s = Store(db)
    s.record_run(run())
    s.add_note(incident="leak-0", author="ana", text="before")
    before = snapshot(db)

    assert list(RUN_STAGES) == STAGES  # every stage the store writes is injected at
    fail_at(monkeypatch, stage)
    # a new model and a new incident, so that every stage has written something to undo
    with pytest.raises(RuntimeError, match=f"injected at {stage}"):
        s.record_run(run(incident=incident(5), model=model("b" * 64)))
    assert snapshot(db) == before
    assert s.verify().ok
    monkeypatch.undo()
    s.record_run(run(incident=incident(5), model=model("b" * 64)))  # and the file still writes
    assert s.verify().ok


# ---------------------------------------------------------------------------- injection, export


def test_sql_injection_strings_are_stored_as_data(db: Path) -> None:
    s = Store(db, actor=EVIL)
    inc = IncidentRecord.from_fields({"id": EVIL, "title": EVIL, "tags": [EVIL]}, toml=EVIL)
    r = run(
        incident=inc,
        model=model(fp=EVIL, path=EVIL),
        config={EVIL: EVIL},
        device=EVIL,
        nodes=[{"node_id": EVIL, "method": EVIL, "reason": EVIL}],
        edges=[{"source": EVIL, "target": EVIL + '"', "score": 1.0}],
        token_scores=[{"position": 0, "token": EVIL, "score": 0.0}],
        ablations=[{"experiment": EVIL, "components": [EVIL], "details": {EVIL: [EVIL]}}],
        remedies=[{"remedy_id": EVIL, "kind": EVIL, "note": EVIL, "behaviour": {EVIL: EVIL}}],
        variants=[{"variant_index": 1, "part": "fit", "origin": EVIL, "label": EVIL}],
        variant_results=[{"remedy_row": 0, "variant_index": 1, "part": "fit"}],
    )
    s.record_run(r)
    s.add_note(run_id=r.run_id, incident=EVIL, author=EVIL, text=EVIL)
    got = s.get_run(r.run_id)
    assert got["incident_id"] == EVIL and got["model_fingerprint"] == EVIL
    assert got["config"] == {EVIL: EVIL} and got["device"] == EVIL
    assert got["nodes"][0]["node_id"] == EVIL and got["nodes"][0]["kind"] is None
    assert got["edges"][0]["target"] == EVIL + '"'
    assert got["ablations"][0]["details"] == {EVIL: [EVIL]}
    assert got["remedies"][0]["remedy_id"] == EVIL and got["token_scores"][0]["token"] == EVIL
    assert got["remedies"][0]["behaviour"] == {EVIL: EVIL}
    assert (got["variants"][0]["origin"], got["variants"][0]["label"]) == (EVIL, EVIL)
    assert got["variant_results"][0]["kind"] == EVIL
    assert got["incident"]["tags"] == [EVIL] and got["incident"]["case_toml"] == EVIL
    assert s.notes_for(author=EVIL)[0]["text"] == EVIL
    assert [x["run_id"] for x in s.list_runs(incident=EVIL)] == [r.run_id]
    assert s.list_runs(incident="x' OR '1'='1") == []
    assert s.counts()["runs"] == 1
    res = s.verify()
    assert res.ok, res.message


QUOTES = [
    "x' OR '1'='1",
    'x" OR "1"="1',
    "'; DELETE FROM notes WHERE ''='",
    "\\'; DROP TABLE audit; --",
    "$$; DROP TABLE runs; $$",
    "/* */ UNION SELECT * FROM audit --",
    "O'Brien's \"run\" `id` \u2019 \u201c",
    "%_%' ESCAPE '\\",
]


@pytest.mark.parametrize("payload", QUOTES)
def test_quote_heavy_values_are_data_in_every_reader(db: Path, payload: str) -> None:
    """Every value a user or a model file controls goes through parameters, never into SQL."""
    s = Store(db, actor=payload)
    plain = run(incident=incident(1))
    s.record_run(plain)
    hostile = run(
        incident=incident(2, title=payload, tags=[payload]),
        model=model(fp=payload, path=payload),
        nodes=[{"node_id": payload, "score": 1.0}],
    )
    s.record_run(hostile)
    s.add_note(run_id=hostile.run_id, author=payload, text=payload)
    assert s.get_run(hostile.run_id)["model_fingerprint"] == payload
    assert s.get_run(hostile.run_id)["nodes"][0]["node_id"] == payload
    assert s.list_runs(incident=payload) == []  # no incident has that id: nothing matches
    assert [n["text"] for n in s.notes_for(author=payload)] == [payload]
    assert s.notes_for(author=payload + "x") == []
    assert {r["run_id"] for r in s.list_runs()} == {plain.run_id, hostile.run_id}
    assert s.counts()["runs"] == 2 and s.counts()["notes"] == 1
    res = s.verify()
    assert res.ok, res.message


def test_export_writes_one_parquet_file_per_table(db: Path, tmp_path: Path) -> None:
    s = Store(db)
    s.record_run(run())
    s.record_run(
        run(edges=pa.table({"source": ["a"] * 500, "target": ["b"] * 500, "score": [0.5] * 500}))
    )
    s.add_note(incident="leak-0", author="ana", text="x")
    counts = s.counts()
    paths = s.export(tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(f"{t}.parquet" for t in TABLES)
    for p in paths:
        t = pq.read_table(p)
        assert t.num_rows == counts[p.stem], p
    edges = pq.read_table(tmp_path / "out" / "edges.parquet")
    assert edges.num_rows == 502 and pa.types.is_floating(edges.schema.field("score").type)
    ts = pq.read_table(tmp_path / "out" / "audit.parquet").schema.field("written_at").type
    assert pa.types.is_timestamp(ts) and ts.tz is not None


def test_digest_ignores_physical_layout_but_not_values() -> None:
    t = pa.table({"a": ["x", None, "zz"], "b": [1.0, -0.0, float("nan")], "c": [1, 2, 3]})
    chunked = pa.concat_tables([t.slice(0, 1), t.slice(1)])
    as_large = t.cast(pa.schema([("a", pa.large_string()), ("b", pa.float32()), ("c", pa.int8())]))
    assert digest_rows(t) == digest_rows(chunked) == digest_rows(as_large)
    as_dict = t.set_column(0, "a", t.column("a").dictionary_encode())
    assert digest_rows(t) == digest_rows(as_dict)
    if hasattr(pa, "string_view"):
        assert digest_rows(t) == digest_rows(
            t.cast(t.schema.set(0, pa.field("a", pa.string_view())))
        )
    assert digest_rows(t) == digest_rows(t.append_column("d", pa.nulls(3)))  # NULL = absent
    changed = t.set_column(2, "c", pa.array([1, 2, 4]))
    assert digest_rows(t) != digest_rows(changed)
    assert digest_rows(t) != digest_rows(t.set_column(0, "a", pa.array(["x", "", "zz"])))
    assert digest_rows(t) != digest_rows(t.set_column(0, "a", pa.array(["xz", None, "z"])))


# ---------------------------------------------------------------------------- properties

TEXT = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("unicode") / "u.duckdb")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_id=TEXT, incident_id=TEXT, author=TEXT, text=st.text(min_size=1).filter(str.strip))
def test_any_unicode_in_ids_and_notes_round_trips(
    shared_store: Store, node_id: str, incident_id: str, author: str, text: str
) -> None:
    s = Store(shared_store.path, actor=author)
    inc = IncidentRecord.from_fields({"id": incident_id, "title": text})
    r = run(
        incident=inc,
        nodes=[{"node_id": node_id, "reason": text}],
        edges=[{"source": node_id, "target": incident_id, "score": 1.0}],
    )
    s.record_run(r)
    note = s.add_note(run_id=r.run_id, incident=incident_id, author=author, text=text)
    got = s.get_run(r.run_id)
    assert got["incident_id"] == incident_id and got["incident"]["title"] == text
    assert got["nodes"][0]["node_id"] == node_id and got["nodes"][0]["reason"] == text
    assert (got["edges"][0]["source"], got["edges"][0]["target"]) == (node_id, incident_id)
    n = s.notes_for(incident=incident_id)[-1]
    assert (n["note_id"], n["author"], n["text"]) == (note, author, text)
    assert s.verify().ok


def test_store_module_imports_no_ui_or_torch(tmp_path: Path) -> None:
    """rca.store alone (bypassing rca/__init__) imports and works without torch/streamlit."""
    code = f"""
import sys, types
pkg = types.ModuleType("rca"); pkg.__path__ = [{str(Path(store_mod.__file__).parents[1])!r}]
sys.modules["rca"] = pkg
import rca.store as s
st = s.Store({str(tmp_path / "h.duckdb")!r})
st.record_run(s.RunRecord(incident=s.IncidentRecord.from_fields({{"id": "x"}}),
    model=s.ModelRecord("f" * 64), nodes=[{{"node_id": "L0.H1"}}]))
assert st.verify().ok
bad = sorted(m for m in ("torch", "transformers", "streamlit") if m in sys.modules)
assert not bad, bad
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_numpy_and_nonfinite_values_are_stored(db: Path) -> None:
    s = Store(db)
    rid = s.record_run(
        run(
            summary={"metric_before": np.float32(1.5), "p": float("inf"), "ids": np.arange(2)},
            nodes={"node_id": np.array(["L0.H1", "L0.H2"]), "score": np.array([1.0, np.nan])},
        )
    )
    got = s.get_run(rid)
    assert got["summary"] == {"metric_before": 1.5, "p": float("inf"), "ids": [0, 1]}
    assert math.isnan({n["node_id"]: n["score"] for n in got["nodes"]}["L0.H2"])
    assert s.verify().ok
