"""The stores: ``ReadOnlyStore`` (every query, read-only, one open of the file per call) and
``Store``, the writer (migrations on opening, ``record_run`` in one transaction through the
stages of ``rca.store.stages``, append-only notes)."""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

from .audit import VerifyResult, append_audit, iso_utc, now_utc, verify_chain
from .connection import (
    db_error,
    is_corrupt,
    open_connection,
    open_readonly,
    process_lock,
    yield_to_readers,
)
from .errors import RecordError, StoreError
from .provenance import ProvenanceReads, ProvenanceWrites
from .records import RunRecord
from .schema import migrate, read_version, require_current
from .stages import RUN_STAGES
from .tables import CHILD_TABLES, JSON_COLUMNS, ORDER, TABLES, first_row

__all__ = ["ReadOnlyStore", "Store"]


def _decode(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in zip(columns, row, strict=True):
        if isinstance(v, dt.datetime):
            v = iso_utc(v)
        elif name in JSON_COLUMNS and isinstance(v, str):
            v = json.loads(v)
        out[name] = v
    return out


def _rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [_decode(names, r) for r in cur.fetchall()]


class ReadOnlyStore(ProvenanceReads):
    """Read access to a store. Every call opens the file read-only, reads and closes, retrying
    while a writer holds it (see ``open_readonly``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        retries: int = 100,
        backoff: float = 0.05,
        max_wait_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.retries, self.backoff, self.max_wait_s = retries, backoff, max_wait_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @contextlib.contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with open_readonly(
            self.path, retries=self.retries, backoff=self.backoff, max_wait_s=self.max_wait_s
        ) as con:
            require_current(con, self.path)
            yield con

    def schema_version(self) -> int:
        """The file's schema version (readable even when it is older than this rca's)."""
        with open_readonly(
            self.path, retries=self.retries, backoff=self.backoff, max_wait_s=self.max_wait_s
        ) as con:
            return read_version(con, self.path)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """A read-only SQL query as a pandas DataFrame; pass user values as ``?`` params."""
        with self._read() as con:
            return con.execute(sql, list(params or ())).df()

    def list_runs(
        self,
        *,
        incident: str | None = None,
        model: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        parent_run_id: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Runs, newest first, with their incident's title and severity. ``incident`` is an
        incident id, ``model`` a fingerprint."""
        where: list[str] = []
        params: list[Any] = []
        for col, v in (
            ("r.incident_id", incident),
            ("r.model_fingerprint", model),
            ("r.kind", kind),
            ("r.status", status),
            ("r.parent_run_id", parent_run_id),
        ):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        sql = (
            "SELECT r.*, i.title AS incident_title, i.severity FROM runs r "
            "LEFT JOIN incidents i ON i.incident_id = r.incident_id "
            "AND i.sha256 = r.incident_sha256"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY r.recorded_at DESC, r.run_id"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as con:
            return _rows(con, sql, params)

    def get_run(self, run_id: str, *, frames: bool = False) -> dict[str, Any]:
        """One run with every row it wrote, read in one snapshot: the run's columns plus
        ``incident``, ``model``, ``notes``, the bulk tables (lists of row dicts, or pandas
        DataFrames with ``frames``) and ``provenance`` (its latest influence query with its
        ``examples``, or None)."""
        with self._read() as con:
            runs = _rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])
            if not runs:
                raise StoreError(
                    f"run {run_id!r} is not in database {self.path}; list runs with list_runs()"
                )
            run = runs[0]
            inc = _rows(
                con,
                "SELECT * FROM incidents WHERE incident_id = ? AND sha256 = ?",
                [run["incident_id"], run["incident_sha256"]],
            )
            run["incident"] = inc[0] if inc else None
            mod = _rows(
                con, "SELECT * FROM models WHERE fingerprint = ?", [run["model_fingerprint"]]
            )
            run["model"] = mod[0] if mod else None
            for t in CHILD_TABLES:
                sql = f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ? ORDER BY {ORDER[t]}"
                if frames:
                    run[t] = con.execute(sql, [run_id]).df()
                else:
                    run[t] = _rows(con, sql, [run_id])
            run["notes"] = _rows(
                con, "SELECT * FROM notes WHERE run_id = ? ORDER BY note_id", [run_id]
            )
            prov = _rows(
                con,
                "SELECT * FROM provenance WHERE run_id = ? ORDER BY created_at DESC, query_id "
                "LIMIT 1",
                [run_id],
            )
            if prov:
                prov[0]["examples"] = _rows(
                    con,
                    "SELECT * FROM provenance_examples WHERE query_id = ? ORDER BY rank",
                    [prov[0]["query_id"]],
                )
            run["provenance"] = prov[0] if prov else None
            return run

    def list_incidents(self) -> list[dict[str, Any]]:
        """Every incident version, with how many runs it has and when the last was recorded."""
        with self._read() as con:
            return _rows(
                con,
                "SELECT i.*, count(r.run_id) AS n_runs, max(r.recorded_at) AS last_run_at "
                "FROM incidents i LEFT JOIN runs r ON r.incident_id = i.incident_id "
                "AND r.incident_sha256 = i.sha256 GROUP BY ALL "
                "ORDER BY i.ingested_at, i.incident_id",
            )

    def notes_for(
        self,
        *,
        run_id: str | None = None,
        incident: str | None = None,
        author: str | None = None,
    ) -> list[dict[str, Any]]:
        """Notes in the order written. ``incident`` matches notes on the incident and on its
        runs; with no filter, every note."""
        where: list[str] = []
        params: list[Any] = []
        if run_id is not None:
            where.append("n.run_id = ?")
            params.append(run_id)
        if incident is not None:
            where.append(
                "(n.incident_id = ? OR n.run_id IN (SELECT run_id FROM runs WHERE incident_id = ?))"
            )
            params += [incident, incident]
        if author is not None:
            where.append("n.author = ?")
            params.append(author)
        sql = "SELECT n.* FROM notes n" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read() as con:
            return _rows(con, sql + " ORDER BY n.note_id", params)

    def list_monitors(
        self, *, incident: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        """Every recorded monitor, newest first, with its latest evaluation's figures
        (``latest_eval``) and its number of alerts."""
        where, params = [], []
        for col, v in (("m.incident_id", incident), ("m.model_fingerprint", model)):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        sql = (
            "SELECT m.*, (SELECT count(*) FROM monitor_alerts a WHERE a.monitor_id = "
            "m.monitor_id) AS n_alerts FROM monitors m"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY m.created_at DESC, m.monitor_id"
        )
        with self._read() as con:
            rows = _rows(con, sql, params)
            for r in rows:
                evals = _rows(
                    con,
                    "SELECT * FROM monitor_evals WHERE monitor_id = ? ORDER BY eval_id DESC "
                    "LIMIT 1",
                    [r["monitor_id"]],
                )
                r["latest_eval"] = evals[0] if evals else None
            return rows

    def get_monitor(self, ref: str) -> dict[str, Any]:
        """One monitor (its id or a unique prefix, or a case id: that case's newest monitor),
        with every evaluation."""
        with self._read() as con:
            rows = _rows(
                con,
                "SELECT * FROM monitors WHERE monitor_id = ? OR starts_with(monitor_id, ?) "
                "OR incident_id = ? ORDER BY (monitor_id = ?) DESC, created_at DESC",
                [ref, ref, ref, ref],
            )
            exact = [r for r in rows if r["monitor_id"] == ref]
            prefixed = [r for r in rows if r["monitor_id"].startswith(ref)]
            if exact:
                row = exact[0]
            elif len(prefixed) == 1:
                row = prefixed[0]
            elif len(prefixed) > 1:
                raise StoreError(f"monitor prefix {ref!r} is ambiguous in {self.path}; give more")
            elif rows:
                row = rows[0]
            else:
                raise StoreError(
                    f"no monitor or case {ref!r} with a monitor in {self.path}; see "
                    "`rca monitor list`"
                )
            row["evals"] = _rows(
                con,
                "SELECT * FROM monitor_evals WHERE monitor_id = ? ORDER BY eval_id",
                [row["monitor_id"]],
            )
            return row

    def monitor_alerts(self, monitor_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts, oldest first (one monitor's, or every monitor's)."""
        sql = "SELECT * FROM monitor_alerts"
        params: list[Any] = []
        if monitor_id is not None:
            sql += " WHERE monitor_id = ?"
            params.append(monitor_id)
        with self._read() as con:
            return _rows(con, sql + " ORDER BY alerted_at, batch_id, row_no", params)

    def models(self) -> list[dict[str, Any]]:
        """Every model seen, with its number of runs."""
        with self._read() as con:
            return _rows(
                con,
                "SELECT m.*, count(r.run_id) AS n_runs FROM models m "
                "LEFT JOIN runs r ON r.model_fingerprint = m.fingerprint GROUP BY ALL "
                "ORDER BY m.first_seen, m.fingerprint",
            )

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._read() as con:
            return {t: int(first_row(con, f"SELECT count(*) FROM {t}")[0]) for t in TABLES}

    def verify(self) -> VerifyResult:
        """Recompute every audit record's hash and every entity's digest from the tables as
        they are now; ``ok`` is False at the first disagreement, which ``first`` names."""
        with self._read() as con:
            return verify_chain(con, str(self.path))

    def export(self, directory: str | Path) -> list[Path]:
        """One Parquet file per table (``<table>.parquet``) in ``directory``, read from one
        snapshot; returns the paths."""
        import pyarrow.parquet as pq

        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        with self._read() as con:
            for t in TABLES:
                order = "run_id, row_no" if t in CHILD_TABLES else ORDER[t]  # cheap, stable
                rows = con.sql(f"SELECT * FROM {t} ORDER BY {order}").to_arrow_table()
                path = out_dir / f"{t}.parquet"
                tmp = path.with_name(path.name + ".tmp")
                pq.write_table(rows, tmp)
                tmp.replace(path)
                paths.append(path)
        return paths


class Store(ProvenanceWrites, ReadOnlyStore):
    """The writer. Creates or migrates the file on construction; each write opens the file,
    runs one transaction and closes it, so readers get in between writes.

    ``actor`` names who writes in the audit chain (default: $RCA_ACTOR or the login name);
    ``max_wait_s`` bounds how long a write waits for the file lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        actor: str | None = None,
        max_wait_s: float = 30.0,
        backoff: float = 0.01,
    ) -> None:
        super().__init__(path, retries=1_000_000, backoff=backoff, max_wait_s=max_wait_s)
        self.actor = actor or os.environ.get("RCA_ACTOR") or _login()
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"database {self.path} is a directory; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @classmethod
    def reader(
        cls,
        path: str | Path,
        *,
        retries: int = 100,
        backoff: float = 0.05,
        max_wait_s: float = 10.0,
    ) -> ReadOnlyStore:
        """Read-only access that never takes the write lock."""
        return ReadOnlyStore(path, retries=retries, backoff=backoff, max_wait_s=max_wait_s)

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        with process_lock(self.path):
            with self._transaction_unlocked(what) as con:
                yield con

    @contextlib.contextmanager
    def _transaction_unlocked(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        yield_to_readers(self.path)
        con = open_connection(
            self.path,
            read_only=False,
            retries=None,
            backoff=self.backoff,
            max_wait_s=self.max_wait_s,
        )
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        except duckdb.Error as e:
            if is_corrupt(e):
                raise db_error(self.path, e, what) from e
            raise StoreError(
                f"database {self.path}: {what} failed and was rolled back, nothing was written: "
                f"{str(e).splitlines()[0]}"
            ) from e
        finally:
            con.close()

    def _migrate(self) -> None:
        with self._transaction("opening") as con:
            migrate(con, self.path, actor=self.actor)

    def record_run(self, run: RunRecord) -> str:
        """Write a run and everything it produced in one transaction: the model and incident
        (inserted when new), the run row, its bulk tables and one audit record per table: each
        stage of ``RUN_STAGES`` in order. All or nothing: on any error the database is as
        before. Returns the run id."""
        if not isinstance(run, RunRecord):
            raise RecordError(f"record_run: expected a RunRecord, got {type(run).__name__}")
        now = now_utc()
        with self._transaction(f"recording run {run.run_id}") as con:
            for write in RUN_STAGES.values():
                write(con, run, actor=self.actor, now=now, db=self.path)
        return run.run_id

    def add_note(
        self,
        *,
        run_id: str | None = None,
        incident: str | None = None,
        author: str,
        text: str,
    ) -> int:
        """Append a note to a run and/or an incident (by id). Notes are never changed or
        deleted: correct one by adding another. Returns the note id."""
        if run_id is None and incident is None:
            raise RecordError("add_note: give run_id or incident")
        for key, v in (("author", author), ("text", text)):
            if not isinstance(v, str) or not v.strip():
                raise RecordError(f"add_note: {key} must be a non-empty string")
        now = now_utc()
        with self._transaction("adding a note") as con:
            if run_id is not None and not first_row(
                con, "SELECT 1 FROM runs WHERE run_id = ?", [run_id]
            ):
                raise StoreError(f"database {self.path}: run {run_id!r} is not recorded")
            if incident is not None and not first_row(
                con, "SELECT 1 FROM incidents WHERE incident_id = ?", [incident]
            ):
                raise StoreError(f"database {self.path}: incident {incident!r} is not recorded")
            row = first_row(con, "SELECT coalesce(max(note_id), 0) + 1 FROM notes")
            note_id = int(row[0])  # type: ignore[index]
            con.execute(
                "INSERT INTO notes (note_id, run_id, incident_id, author, created_at, text) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [note_id, run_id, incident, author, now, text],
            )
            append_audit(
                con, actor=self.actor, action="note", table="notes", entity=str(note_id), at=now
            )
        return note_id

    def record_monitor(
        self, describe: dict[str, Any], *, artifact_path: str, weights_sha256: str
    ) -> str:
        """Record a built monitor (``Monitor.describe()``); its run must be recorded."""
        now = now_utc()
        mid = describe["monitor_id"]
        with self._transaction(f"recording monitor {mid}") as con:
            if not first_row(con, "SELECT 1 FROM runs WHERE run_id = ?", [describe["run_id"]]):
                raise StoreError(
                    f"database {self.path}: run {describe['run_id']!r} is not recorded; a "
                    "monitor is recorded in the store that holds its run"
                )
            if first_row(con, "SELECT 1 FROM monitors WHERE monitor_id = ?", [mid]):
                raise StoreError(f"database {self.path}: monitor {mid!r} is already recorded")
            con.execute(
                "INSERT INTO monitors (monitor_id, run_id, incident_id, model_fingerprint, "
                "artifact_path, weights_sha256, site_specs, threshold, target_fpr, fit, data, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    mid,
                    describe["run_id"],
                    describe["case_id"],
                    describe["model_fingerprint"],
                    artifact_path,
                    weights_sha256,
                    json.dumps(describe["sites"]),
                    float(describe["threshold"]),
                    float(describe["target_fpr"]),
                    json.dumps(describe["fit"], default=str),
                    json.dumps(describe["data"], default=str),
                    now,
                ],
            )
            append_audit(
                con, actor=self.actor, action="insert", table="monitors", entity=mid, at=now
            )
        return mid

    def record_monitor_eval(
        self,
        monitor_id: str,
        *,
        model_fingerprint: str,
        kind: str,
        figures: dict[str, Any],
        baselines: dict[str, Any] | None = None,
        stale: bool | None = None,
        reason: str | None = None,
    ) -> int:
        """Append one evaluation of a recorded monitor; returns its id."""
        now = now_utc()
        with self._transaction(f"recording an evaluation of monitor {monitor_id}") as con:
            if not first_row(con, "SELECT 1 FROM monitors WHERE monitor_id = ?", [monitor_id]):
                raise StoreError(f"database {self.path}: monitor {monitor_id!r} is not recorded")
            row = first_row(con, "SELECT coalesce(max(eval_id), 0) + 1 FROM monitor_evals")
            eval_id = int(row[0])  # type: ignore[index]
            con.execute(
                "INSERT INTO monitor_evals (eval_id, monitor_id, model_fingerprint, kind, "
                "figures, baselines, stale, reason, evaluated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    eval_id,
                    monitor_id,
                    model_fingerprint,
                    kind,
                    json.dumps(figures, default=str),
                    None if baselines is None else json.dumps(baselines, default=str),
                    stale,
                    reason,
                    now,
                ],
            )
            append_audit(
                con,
                actor=self.actor,
                action="insert",
                table="monitor_evals",
                entity=str(eval_id),
                at=now,
            )
        return eval_id

    def record_alerts(
        self, monitor_id: str, *, model_fingerprint: str, alerts: Sequence[dict[str, Any]]
    ) -> str:
        """Append one batch of alerts (each: ``prompt_sha256``, ``score``, ``step``,
        ``sites``, ``text`` or None, ``at``) in one transaction; returns the batch id."""
        import uuid

        batch_id = str(uuid.uuid4())
        now = now_utc()
        with self._transaction(f"recording alerts of monitor {monitor_id}") as con:
            if not first_row(con, "SELECT 1 FROM monitors WHERE monitor_id = ?", [monitor_id]):
                raise StoreError(f"database {self.path}: monitor {monitor_id!r} is not recorded")
            if not alerts:
                return batch_id
            import pyarrow as pa

            from .stages import _insert_arrow

            rows = pa.table(
                {
                    "batch_id": pa.array([batch_id] * len(alerts), pa.string()),
                    "row_no": pa.array(range(len(alerts)), pa.int32()),
                    "monitor_id": pa.array([monitor_id] * len(alerts), pa.string()),
                    "model_fingerprint": pa.array([model_fingerprint] * len(alerts), pa.string()),
                    "alerted_at": pa.array(
                        [a.get("at") or now for a in alerts], pa.timestamp("us", tz="UTC")
                    ),
                    "prompt_sha256": pa.array([a["prompt_sha256"] for a in alerts], pa.string()),
                    "score": pa.array([float(a["score"]) for a in alerts], pa.float64()),
                    "step": pa.array([a.get("step") for a in alerts], pa.int32()),
                    "sites": pa.array(
                        [list(a.get("sites") or []) for a in alerts], pa.list_(pa.string())
                    ),
                    "text": pa.array([a.get("text") for a in alerts], pa.string()),
                }
            )
            _insert_arrow(con, "monitor_alerts", rows)
            append_audit(
                con,
                actor=self.actor,
                action="insert",
                table="monitor_alerts",
                entity=batch_id,
                at=now,
            )
        return batch_id


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"
