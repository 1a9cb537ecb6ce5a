"""The store's record of a case's variants and of each fix's results on them (schema version 5):
the ``variants`` and ``variant_results`` tables and ``remedies.behaviour``, their round trip,
their audit, their validation, the rows ``rca.store.from_run`` builds, and a version-4 file
migrated to version 5.

Hand edits go through raw duckdb connections, the way someone with the file would make them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import pytest

from rca.ingest.incident import Incident
from rca.ingest.preflight import VariantCheck
from rca.model.metric import Target
from rca.remedy.search import Remedy
from rca.store import (
    EMPTY_DIGEST,
    MIGRATIONS,
    RUN_STAGES,
    SCHEMA_VERSION,
    RecordError,
    RunRecord,
    Store,
    StoreError,
    append_audit,
)
from rca.store.from_run import remedy_rows, variant_result_rows, variant_rows
from tests.unit.test_store import BEHAVIOUR, FP, incident, run

# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "rca.duckdb"


def raw(path: Path, sql: str, params: list[Any] | None = None) -> list[Any]:
    """A hand edit (or read) through a read-write connection, closed at once."""
    with duckdb.connect(str(path)) as con:
        return con.execute(sql, params or []).fetchall()


def single_prompt_run(**overrides: Any) -> RunRecord:
    """A run of a case without variants: a fix with no behaviour, no variant rows."""
    rem = {"remedy_id": "ablate-L1.H2", "kind": "ablate", "p_bad_before": 0.9, "p_bad_after": 0.1}
    return run(remedies=[rem], variants=None, variant_results=None, **overrides)


# ---------------------------------------------------------------------------- round trip


def test_variants_and_each_fixs_results_round_trip(db: Path) -> None:
    s = Store(db)
    held = {
        "fit": {
            "n": 2,
            "mean_p_bad_before": 0.8,
            "mean_p_bad_after": 0.5,
            "share_under_target": 0.5,
        },
        "held_out": {
            "n": 2,
            "mean_p_bad_before": 0.65,
            "mean_p_bad_after": 0.3,
            "share_under_target": 0.5,
        },
        "hold_share": 0.8,
        "symptom_patch": False,
    }
    r = run(
        remedies=[
            {"remedy_id": "a", "kind": "ablate", "behaviour": BEHAVIOUR},
            {"remedy_id": "b", "kind": "steer", "behaviour": held},
        ],
        variants=[
            {"variant_index": 3, "part": "held_out", "p_bad": 0.6, "label": "x=1"},
            {"variant_index": 1, "part": "fit", "p_bad": 0.8, "counterfactual_aligned": False},
            {"variant_index": 2, "part": "held_out", "p_bad": 0.7},
        ],
        variant_results=[
            {
                "remedy_row": 0,
                "variant_index": 3,
                "part": "held_out",
                "p_bad_before": 0.6,
                "p_bad_after": 0.55,
            },
            {
                "remedy_row": 0,
                "variant_index": 1,
                "part": "fit",
                "p_bad_before": 0.8,
                "p_bad_after": 0.1,
            },
            {
                "remedy_row": 1,
                "kind": "steer",
                "variant_index": 3,
                "part": "held_out",
                "p_bad_before": 0.6,
                "p_bad_after": 0.2,
            },
            {
                "remedy_row": 1,
                "variant_index": 2,
                "part": "held_out",
                "p_bad_before": 0.7,
                "p_bad_after": 0.4,
            },
        ],
    )
    s.record_run(r)
    s.record_run(single_prompt_run())  # another run's rows do not mix in
    got = s.get_run(r.run_id)
    # in the order given (row_no), not sorted by index
    assert [(v["row_no"], v["variant_index"], v["part"], v["p_bad"]) for v in got["variants"]] == [
        (0, 3, "held_out", 0.6),
        (1, 1, "fit", 0.8),
        (2, 2, "held_out", 0.7),
    ]
    assert [v["label"] for v in got["variants"]] == ["x=1", None, None]
    assert [v["counterfactual_aligned"] for v in got["variants"]] == [None, False, None]
    assert [
        (
            v["remedy_row"],
            v["kind"],
            v["variant_index"],
            v["part"],
            v["p_bad_before"],
            v["p_bad_after"],
        )
        for v in got["variant_results"]
    ] == [
        (0, "ablate", 3, "held_out", 0.6, 0.55),
        (0, "ablate", 1, "fit", 0.8, 0.1),
        (1, "steer", 3, "held_out", 0.6, 0.2),
        (1, "steer", 2, "held_out", 0.7, 0.4),
    ]
    assert [(m["row_no"], m["behaviour"]) for m in got["remedies"]] == [(0, BEHAVIOUR), (1, held)]
    frames = s.get_run(r.run_id, frames=True)
    assert list(frames["variant_results"]["p_bad_after"]) == [0.55, 0.1, 0.2, 0.4]
    res = s.verify()
    assert res.ok, res.message


def test_a_run_without_variants_writes_no_rows_and_null_behaviour(db: Path) -> None:
    s = Store(db)
    with_variants = s.record_run(run())
    rid = s.record_run(single_prompt_run())
    for table in ("variants", "variant_results"):
        assert raw(db, f"SELECT count(*) FROM {table} WHERE run_id = ?", [rid]) == [(0,)]
        assert raw(db, f"SELECT count(*) FROM {table} WHERE run_id = ?", [with_variants])[0][0] == 2
        # the empty table is audited like any other: a later row for this run is caught
        assert raw(
            db, "SELECT content_hash FROM audit WHERE table_name = ? AND entity = ?", [table, rid]
        ) == [(EMPTY_DIGEST,)]
    assert raw(db, "SELECT behaviour FROM remedies WHERE run_id = ?", [rid]) == [(None,)]
    got = s.get_run(rid)
    assert got["variants"] == [] and got["variant_results"] == []
    assert got["remedies"][0]["behaviour"] is None
    assert s.verify().ok
    raw(
        db,
        "INSERT INTO variants (run_id, row_no, variant_index, part) VALUES (?, 0, 1, 'fit')",
        [rid],
    )
    res = s.verify()
    assert not res.ok and res.first is not None
    assert (res.first.table, res.first.entity) == ("variants", rid), res.message
    assert "1 row(s) differ from what was written" in res.message


# ---------------------------------------------------------------------------- audit


@pytest.mark.parametrize(
    ("table", "sql"),
    [
        ("variant_results", "UPDATE variant_results SET p_bad_after = 0.5 WHERE row_no = 0"),
        ("variant_results", "UPDATE variant_results SET remedy_row = 1 WHERE row_no = 1"),
        ("variants", "UPDATE variants SET counterfactual_aligned = false WHERE variant_index = 2"),
        ("variants", "UPDATE variants SET label = 'name=Al' WHERE variant_index = 2"),
        ("remedies", "UPDATE remedies SET behaviour = json_object('symptom_patch', false)"),
    ],
)
def test_a_changed_variant_row_breaks_verify_and_is_named(db: Path, table: str, sql: str) -> None:
    s = Store(db)
    rid = s.record_run(run())
    s.add_note(run_id=rid, author="ana", text="after the run")  # the edited link is not the last
    assert s.verify().ok
    raw(db, sql)
    res = s.verify()
    assert not res.ok and res.first is not None
    (seq,) = raw(
        db, "SELECT max(seq) FROM audit WHERE table_name = ? AND entity = ?", [table, rid]
    )[0]
    assert (res.first.seq, res.first.table, res.first.entity) == (seq, table, rid), res.message
    assert f"audit seq {seq}, table {table}, entity '{rid}'" in res.message
    assert "row(s) differ from what was written" in res.message


def test_a_crash_after_each_new_stage_leaves_no_variant_rows(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new tables are stages of the one transaction: a crash right after either wrote its
    rows leaves neither rows nor audit records (test_store covers every stage and COMMIT)."""
    s = Store(db)
    assert list(RUN_STAGES)[-2:] == ["variants", "variant_results"]
    for stage in ("variants", "variant_results"):
        write = RUN_STAGES[stage]

        def then_fail(*args: Any, _write: Any = write, **kwargs: Any) -> None:
            _write(*args, **kwargs)
            assert raw_count(args[0], "variants") == 2  # written inside the transaction
            raise RuntimeError("crash")

        monkeypatch.setitem(RUN_STAGES, stage, then_fail)
        with pytest.raises(RuntimeError, match="crash"):
            s.record_run(run())
        monkeypatch.undo()
        assert raw(db, "SELECT count(*) FROM variants") == [(0,)]
        assert raw(db, "SELECT count(*) FROM variant_results") == [(0,)]
        assert raw(db, "SELECT count(*) FROM runs") == [(0,)]
        assert s.verify().ok
    s.record_run(run())
    assert raw(db, "SELECT count(*) FROM variant_results") == [(2,)]


def raw_count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"variants": [{"variant_index": 1, "part": "train"}]},
            r"RunRecord.variants: row 0 has part 'train'",
        ),
        ({"variants": [{"part": "fit"}]}, r"column 'variant_index' is missing"),
        (
            {"variants": [{"variant_index": 1, "part": "fit", "counterfactual_aligned": "yes"}]},
            r"column 'counterfactual_aligned' cannot be read as bool",
        ),
        (
            {"variant_results": [{"remedy_row": 1, "variant_index": 1, "part": "fit"}]},
            r"row 0 names remedy_row 1, but the run has 1 remedies",
        ),
        (
            {"variant_results": [{"remedy_row": -1, "variant_index": 1, "part": "fit"}]},
            r"names remedy_row -1",
        ),
        (
            {
                "variant_results": [
                    {"remedy_row": 0, "kind": "steer", "variant_index": 1, "part": "fit"}
                ]
            },
            r"row 0 has kind 'steer', but remedy 0 is 'ablate'",
        ),
        (
            {"variant_results": [{"remedy_row": 0, "variant_index": 7, "part": "fit"}]},
            r"row 0 is variant 7 in 'fit', but it is not among RunRecord.variants",
        ),
        (
            {"variant_results": [{"remedy_row": 0, "variant_index": 2, "part": "fit"}]},
            r"row 0 is variant 2 in 'fit', but it is in 'held_out'",
        ),
        (
            {
                "remedies": [
                    {
                        "remedy_id": "a",
                        "kind": "ablate",
                        "behaviour": {**BEHAVIOUR, "per_variant": []},
                    }
                ]
            },
            r"behaviour holds per_variant; give those as RunRecord.variant_results",
        ),
        (
            {"remedies": [{"remedy_id": "a", "kind": "ablate", "behaviour": [1, 2]}]},
            r"has behaviour '\[1,2\]'; expected a mapping",
        ),
    ],
)
def test_invalid_variant_records_fail_before_touching_the_file(
    db: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecordError, match=message):
        run(**overrides)
    assert not db.exists()


# ---------------------------------------------------------------------------- from a run


def _check(index: int, part: str, p_bad: float, *, cf: bool) -> VariantCheck:
    inc = Incident(
        id="v",
        title="t",
        severity="low",
        model="m",
        prompt=f"prompt {index}",
        bad=" 4921",
        counterfactual=f"other {index}" if cf else None,
    )
    target = Target(tuple(range(1, 5 + index)), (7,))
    return VariantCheck(
        index=index,
        part=part,
        origin="template" if index % 2 else "listed",
        label=f"slot={index}" if index % 2 else "",
        incident=inc,
        target=target,
        metric=2.0 + index,
        p_bad=p_bad,
        counterfactual=target.with_prompt((9, 9, 9)) if cf and index == 1 else None,
        metric_counterfactual=-1.5 if cf and index == 1 else None,
    )


def _remedy(kind: str, behaviour: dict[str, Any] | None) -> Remedy:
    return Remedy(
        kind=kind,
        components=["L1.H2"],
        metric_before=3.0,
        metric_after=-1.0,
        p_bad_before=0.9,
        p_bad_after=0.1,
        side_effect={"kl_mean": 0.01},
        patch_spec={"op": kind},
        note="n",
        behaviour=behaviour,
    )


def test_the_rows_from_run_builds_store_what_the_preflight_and_the_fixes_measured(
    db: Path,
) -> None:
    checks = [
        _check(1, "fit", 0.8, cf=True),
        _check(2, "fit", 0.75, cf=False),
        _check(3, "held_out", 0.6, cf=True),
    ]
    per = [
        [(1, "fit", 0.8, 0.1), (2, "fit", 0.75, 0.2), (3, "held_out", 0.6, 0.5)],
        [(1, "fit", 0.8, 0.4), (2, "fit", 0.75, 0.3), (3, "held_out", 0.6, 0.05)],
    ]
    remedies = [
        _remedy(
            kind,
            {
                **BEHAVIOUR,
                "per_variant": [
                    {"index": i, "part": p, "p_bad_before": b, "p_bad_after": a}
                    for i, p, b, a in rows
                ],
            },
        )
        for kind, rows in zip(("ablate", "steer"), per, strict=True)
    ]
    r = run(
        remedies=remedy_rows(remedies),
        variants=variant_rows(checks),
        variant_results=variant_result_rows(remedies),
    )
    s = Store(db)
    s.record_run(r)
    got = s.get_run(r.run_id)
    stored = [{k: v for k, v in row.items() if k != "row_no"} for row in got["variants"]]
    want = []
    for c in checks:
        j = c.to_json()
        j["variant_index"] = j.pop("index")
        want.append(j)
    assert stored == want
    assert [v["counterfactual_aligned"] for v in got["variants"]] == [True, None, False]
    assert [v["prompt_tokens"] for v in got["variants"]] == [5, 6, 7]
    assert [
        (
            v["remedy_row"],
            v["kind"],
            v["variant_index"],
            v["part"],
            v["p_bad_before"],
            v["p_bad_after"],
        )
        for v in got["variant_results"]
    ] == [(0, "ablate", *row) for row in per[0]] + [(1, "steer", *row) for row in per[1]]
    for m, rem in zip(got["remedies"], remedies, strict=True):
        assert m["kind"] == rem.kind and m["behaviour"] == BEHAVIOUR  # without per_variant
    assert remedies[0].behaviour is not None and "per_variant" in remedies[0].behaviour
    assert s.verify().ok

    # a single-prompt case: no rows, NULL behaviour
    single = [_remedy("ablate", None)]
    assert variant_rows([]) == [] and variant_result_rows(single) == []
    assert remedy_rows(single)[0]["behaviour"] is None


# ---------------------------------------------------------------------------- the doc's SQL


def test_the_symptom_patch_query_of_the_docs_runs(db: Path) -> None:
    s = Store(db)
    rid = s.record_run(run())
    s.record_run(single_prompt_run())
    text = (Path(__file__).parents[2] / "docs" / "store.md").read_text(encoding="utf-8")
    found = re.search(r"Symptom patches:.*?```sql\n(.*?)```", text, re.S)
    assert found is not None
    sql = found.group(1)
    rows = s.query(sql).to_dict("records")
    assert [(r["kind"], r["variant_index"], r["label"], r["p_bad_after"]) for r in rows] == [
        ("ablate", 2, "name=Bo", 0.6)
    ]
    assert s.get_run(rid)["remedies"][0]["behaviour"]["symptom_patch"] is True


# ---------------------------------------------------------------------------- version 4 files

V4_RUN = "44444444-4444-4444-8444-444444444444"


def make_v4(path: Path, *, tamper_remedy: bool = False) -> None:
    """A version-4 file: the first four migrations' statements as released, then a run with
    a remedy, each write followed by its audit record, as version-4 rca wrote them."""
    old = [m for m in MIGRATIONS if m.version <= 4]
    assert [m.version for m in old] == [1, 2, 3, 4]
    inc = incident()
    with duckdb.connect(str(path)) as con:
        con.execute("BEGIN")
        for m in old:
            for sql in m.statements:
                con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now(), ?)", [m.version, m.note])
            append_audit(
                con, actor="v4", action="migrate", table="schema_version", entity=str(m.version)
            )
        con.execute(
            "INSERT INTO models VALUES (?, '/m', 'gpt2', 10, '{\"n_layers\":2}', now())", [FP]
        )
        append_audit(con, actor="v4", action="insert", table="models", entity=FP)
        con.execute(
            "INSERT INTO incidents VALUES (?, ?, 'PIN', 'high', ['leak'], NULL, ?, NULL, now())",
            [inc.id, inc.sha256, json.dumps(dict(inc.fields))],
        )
        append_audit(con, actor="v4", action="insert", table="incidents", entity=inc.key)
        con.execute(
            "INSERT INTO runs (run_id, incident_id, incident_sha256, model_fingerprint, status,"
            " summary, recorded_at, kind) VALUES (?, ?, ?, ?, 'ok', '{\"verdict\":\"confirmed\"}',"
            " now(), 'investigate')",
            [V4_RUN, inc.id, inc.sha256, FP],
        )
        append_audit(con, actor="v4", action="insert", table="runs", entity=V4_RUN)
        con.execute(
            "INSERT INTO nodes (run_id, row_no, node_id, kind, layer, score, role, sites) VALUES"
            " (?, 0, 'L1.H2', 'head', 1, 1.5, 'writer', ['L1.H2@3'])",
            [V4_RUN],
        )
        append_audit(con, actor="v4", action="insert", table="nodes", entity=V4_RUN)
        con.execute(
            "INSERT INTO remedies (run_id, row_no, remedy_id, kind, components, p_bad_before,"
            " p_bad_after, recommended, patch_spec) VALUES"
            " (?, 0, 'r1', 'ablate', ['L1.H2'], 0.9, 0.1, true, '{\"op\":\"zero\"}')",
            [V4_RUN],
        )
        append_audit(con, actor="v4", action="insert", table="remedies", entity=V4_RUN)
        if tamper_remedy:  # a hand edit made before the migration, after the audit record
            con.execute("UPDATE remedies SET p_bad_after = 0.0")
        con.execute("COMMIT")


def test_a_v4_file_migrates_to_v5_and_then_records_variants(db: Path) -> None:
    make_v4(db)
    assert SCHEMA_VERSION >= 5
    assert Store.reader(db).schema_version() == 4
    with pytest.raises(StoreError, match="schema version 4, older than this rca"):
        Store.reader(db).get_run(V4_RUN)
    audit_before = raw(db, "SELECT * FROM audit ORDER BY seq")
    s = Store(db, actor="migrator")
    assert s.schema_version() == SCHEMA_VERSION
    assert {"variants", "variant_results"} <= {
        r[0] for r in raw(db, "SELECT table_name FROM duckdb_tables()")
    }
    # the earlier chain is untouched, and the migration re-audited nothing but itself: the
    # remedies' new column is NULL in every old row, and the new tables start empty
    assert raw(db, "SELECT * FROM audit ORDER BY seq")[: len(audit_before)] == audit_before
    assert raw(db, "SELECT table_name, entity, action FROM audit WHERE actor = 'migrator'") == [
        ("schema_version", str(v), "migrate") for v in range(5, SCHEMA_VERSION + 1)
    ]
    res = s.verify()
    assert res.ok, res.message
    old = s.get_run(V4_RUN)
    assert old["variants"] == [] and old["variant_results"] == []
    (rem,) = old["remedies"]
    assert rem["behaviour"] is None and rem["patch_spec"] == {"op": "zero"}
    assert old["nodes"][0]["sites"] == ["L1.H2@3"]

    rid = s.record_run(run(kind="regress", parent_run_id=V4_RUN))
    got = s.get_run(rid)
    assert [(v["variant_index"], v["part"]) for v in got["variants"]] == [
        (1, "fit"),
        (2, "held_out"),
    ]
    assert [v["p_bad_after"] for v in got["variant_results"]] == [0.05, 0.6]
    assert got["remedies"][0]["behaviour"] == BEHAVIOUR
    n_records = s.verify().records
    assert s.verify().ok
    Store(db)  # reopening the migrated file writes nothing
    assert s.verify().records == n_records

    # rows added by hand for the old run, which has no audit record for either new table
    raw(
        db,
        "INSERT INTO variant_results VALUES (?, 0, 0, 'ablate', 1, 'fit', 0.9, 0.0)",
        [V4_RUN],
    )
    res = s.verify()
    assert not res.ok and res.first is not None
    assert (res.first.seq, res.first.table, res.first.entity) == (None, "variant_results", V4_RUN)
    assert "1 row(s) that no audit record covers" in res.message


def test_migrating_to_v5_does_not_bless_a_remedy_changed_before_it(db: Path) -> None:
    make_v4(db, tamper_remedy=True)
    s = Store(db, actor="migrator")
    # one audit record per migration applied (5 and later), and none for the changed remedy
    assert raw(db, "SELECT table_name FROM audit WHERE actor = 'migrator'") == [
        ("schema_version",)
    ] * (SCHEMA_VERSION - 4)
    res = s.verify()
    assert not res.ok and res.first is not None
    assert (res.first.table, res.first.entity) == ("remedies", V4_RUN), res.message


def test_a_file_newer_than_this_rca_is_refused(db: Path) -> None:
    Store(db).record_run(run())
    future = SCHEMA_VERSION + 1
    raw(db, f"INSERT INTO schema_version VALUES ({future}, now(), 'from the future')")
    want = rf"schema version {future}, newer than this rca knows \({SCHEMA_VERSION}\)"
    for opener in (lambda: Store(db), lambda: Store.reader(db).list_runs()):
        with pytest.raises(StoreError, match=want):
            opener()
