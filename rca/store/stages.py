"""The stages of writing a run: ``RUN_STAGES`` maps each stage's name to the function that
writes its rows and its audit record, in the order ``Store.record_run`` runs them inside its
one transaction: the model, the incident, the run row, then each bulk table (``CHILD_TABLES``:
token_scores, nodes, edges, ablations, remedies, variants, variant_results), each stage named
after its table.

Every writer takes ``(con, run, *, actor, now, db)``: the open connection inside the
transaction, the ``RunRecord``, who signs the audit records, the time the run is recorded and
the database's path (for error messages). Wrapping an entry of ``RUN_STAGES`` observes or
interrupts a write at that stage.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .audit import append_audit, canonical_json
from .errors import StoreError
from .records import RunRecord
from .tables import CHILD_TABLES, first_row

__all__ = ["RUN_STAGES", "StageWriter"]

StageWriter = Callable[..., None]  # (con, run, *, actor: str, now: datetime, db: Path) -> None


def _write_model(
    con: duckdb.DuckDBPyConnection, run: RunRecord, *, actor: str, now: dt.datetime, db: Path
) -> None:
    """The model, inserted when new; seen again at a new path, its row is updated."""
    m = run.model
    row = first_row(
        con,
        "SELECT path, architecture, n_params, CAST(dims AS VARCHAR) FROM models "
        "WHERE fingerprint = ?",
        [m.fingerprint],
    )
    new: tuple[Any, ...] = (m.path, m.architecture, m.n_params, canonical_json(dict(m.dims)))
    if row is None:
        con.execute(
            "INSERT INTO models (fingerprint, path, architecture, n_params, dims, first_seen) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [m.fingerprint, *new, now],
        )
    else:
        # the same weights seen again: keep first_seen and what this record leaves out
        new = tuple(old if v is None or v == "{}" else v for v, old in zip(new, row, strict=True))
        if new == tuple(row):
            return
        con.execute(
            "UPDATE models SET path = ?, architecture = ?, n_params = ?, dims = ? "
            "WHERE fingerprint = ?",
            [*new, m.fingerprint],
        )
    append_audit(
        con,
        actor=actor,
        action="insert" if row is None else "update",
        table="models",
        entity=m.fingerprint,
        at=now,
    )


def _write_incident(
    con: duckdb.DuckDBPyConnection, run: RunRecord, *, actor: str, now: dt.datetime, db: Path
) -> None:
    """The incident, inserted when its id and content are new."""
    inc = run.incident
    if first_row(
        con,
        "SELECT 1 FROM incidents WHERE incident_id = ? AND sha256 = ?",
        [inc.id, inc.sha256],
    ):
        return  # same id and content: the case as first ingested stays
    tags = inc.fields.get("tags") or []
    tags = [tags] if isinstance(tags, str) else tags
    con.execute(
        "INSERT INTO incidents (incident_id, sha256, title, severity, tags, source, "
        "case_data, case_toml, ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            inc.id,
            inc.sha256,
            _opt_str(inc.fields.get("title")),
            _opt_str(inc.fields.get("severity")),
            [str(t) for t in tags],
            inc.source,
            canonical_json(dict(inc.fields)),
            inc.toml,
            now,
        ],
    )
    append_audit(con, actor=actor, action="insert", table="incidents", entity=inc.key, at=now)


def _write_run(
    con: duckdb.DuckDBPyConnection, run: RunRecord, *, actor: str, now: dt.datetime, db: Path
) -> None:
    """The run row; refuses a run id already recorded and a parent run that is not."""
    if first_row(con, "SELECT 1 FROM runs WHERE run_id = ?", [run.run_id]):
        raise StoreError(
            f"database {db}: run {run.run_id} is already recorded; give the new run a new run_id"
        )
    if run.parent_run_id is not None and not first_row(
        con, "SELECT 1 FROM runs WHERE run_id = ?", [run.parent_run_id]
    ):
        raise StoreError(
            f"database {db}: parent run {run.parent_run_id} is not recorded; "
            "record it first or leave parent_run_id out"
        )
    finished = run.finished_at or now
    started = run.started_at or finished
    con.execute(
        "INSERT INTO runs (run_id, incident_id, incident_sha256, model_fingerprint, "
        "status, device, seed, config, versions, timings, summary, started_at, "
        "finished_at, recorded_at, kind, parent_run_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            run.run_id,
            run.incident.id,
            run.incident.sha256,
            run.model.fingerprint,
            run.status,
            run.device,
            run.seed,
            canonical_json(dict(run.config)),
            canonical_json(dict(run.versions)),
            canonical_json(dict(run.timings)),
            canonical_json(dict(run.summary)),
            started,
            finished,
            now,
            run.kind,
            run.parent_run_id,
        ],
    )
    append_audit(con, actor=actor, action="insert", table="runs", entity=run.run_id, at=now)


def _write_bulk(
    con: duckdb.DuckDBPyConnection,
    run: RunRecord,
    *,
    actor: str,
    now: dt.datetime,
    db: Path,
    table: str,
) -> None:
    """One bulk table's rows (there may be none) and its audit record."""
    rows = run.tables[table]
    if rows.num_rows:
        _insert_arrow(con, table, rows)
    append_audit(con, actor=actor, action="insert", table=table, entity=run.run_id, at=now)


RUN_STAGES: dict[str, StageWriter] = {
    "model": _write_model,
    "incident": _write_incident,
    "run": _write_run,
    **{t: functools.partial(_write_bulk, table=t) for t in CHILD_TABLES},
}


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Bulk insert through a registered Arrow table (DuckDB scans it zero-copy)."""
    name = f"__rca_in_{table}"
    cols = ", ".join(f'"{c}"' for c in rows.column_names)
    con.register(name, rows)
    try:
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
    finally:
        con.unregister(name)
