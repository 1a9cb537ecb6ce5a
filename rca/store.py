"""Record: the DuckDB case store, one file, one writer at a time, every write in a hash chain.

    models         one row per model fingerprint                     key: fingerprint
    incidents      the case as ingested (fields as JSON, raw TOML)   key: incident_id @ sha256
    runs           one row per investigation / regression run        key: run_id (a uuid)
    token_scores   the evidence of one run, in bulk                  key: run_id
    nodes          (Arrow in, never executemany; each row keeps its
    edges          position in the run as row_no)
    ablations
    remedies
    notes          append-only free text on a run or an incident     key: note_id
    audit          the hash chain over every write                   key: seq
    schema_version one row per applied migration                     key: version

A run is written in one transaction at its end, or not at all: ``Store.record_run`` opens the
file, writes every row and one audit record per table and entity, commits and closes. Readers
open the file read-only per call and retry while a writer holds it (DuckDB allows one
read-write process or many read-only ones, never both). No connection lets DuckDB install or
load an extension, and a file that is not a DuckDB database is refused before DuckDB opens it.

The audit chain: each audit record holds ``content_hash``, a digest of the rows of one entity
(``digest_rows``), and ``hash = sha256(prev_hash + canonical JSON of the record)``. ``verify``
recomputes every digest from the tables as they are now, so changing, adding or deleting any
row by hand breaks it, and it names the first broken link. The full schema, the digest format
and example SQL are in docs/store.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import getpass
import hashlib
import json
import math
import numbers
import os
import random
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "TABLES",
    "AuditRecord",
    "Broken",
    "IncidentRecord",
    "ModelRecord",
    "ReadOnlyStore",
    "RecordError",
    "RunRecord",
    "Store",
    "StoreError",
    "VerifyResult",
    "append_audit",
    "chain_hash",
    "digest_rows",
    "library_versions",
    "open_readonly",
]

GENESIS = "0" * 64  # prev_hash of the first audit record
RUN_STATUSES = ("ok", "partial", "failed")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class StoreError(RuntimeError):
    """A store operation that failed; the one-line message names the database and the fix."""


class RecordError(StoreError, ValueError):
    """A run, model or incident record that cannot be stored as given; the message says why."""


# --------------------------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One schema step. ``statements`` run in order inside the opening transaction; entities of
    ``rehash`` tables whose rows the step changes get a 'migrate' audit record."""

    version: int
    note: str
    statements: tuple[str, ...]
    rehash: tuple[str, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE schema_version (
                version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL,
                note VARCHAR NOT NULL)""",
            """CREATE TABLE models (
                fingerprint VARCHAR PRIMARY KEY, path VARCHAR, architecture VARCHAR,
                n_params BIGINT, dims JSON, first_seen TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE incidents (
                incident_id VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, title VARCHAR,
                severity VARCHAR, tags VARCHAR[], source VARCHAR, case_data JSON NOT NULL,
                case_toml VARCHAR, ingested_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (incident_id, sha256))""",
            """CREATE TABLE runs (
                run_id VARCHAR PRIMARY KEY, incident_id VARCHAR NOT NULL,
                incident_sha256 VARCHAR NOT NULL, model_fingerprint VARCHAR NOT NULL,
                status VARCHAR NOT NULL, device VARCHAR, seed BIGINT, config JSON,
                versions JSON, timings JSON, summary JSON, started_at TIMESTAMPTZ,
                finished_at TIMESTAMPTZ, recorded_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE token_scores (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, "position" INTEGER NOT NULL,
                token VARCHAR, score DOUBLE, method VARCHAR)""",
            """CREATE TABLE nodes (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, node_id VARCHAR NOT NULL,
                kind VARCHAR, layer INTEGER, score DOUBLE, method VARCHAR, baseline VARCHAR,
                total_effect DOUBLE, direct_effect DOUBLE, necessity DOUBLE, p_value DOUBLE,
                verdict VARCHAR, reason VARCHAR, rank INTEGER)""",
            """CREATE TABLE edges (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, source VARCHAR NOT NULL,
                target VARCHAR NOT NULL, score DOUBLE)""",
            """CREATE TABLE ablations (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, experiment VARCHAR NOT NULL,
                components VARCHAR[], kind VARCHAR, metric DOUBLE, effect DOUBLE,
                p_value DOUBLE, details JSON)""",
            """CREATE TABLE remedies (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, remedy_id VARCHAR NOT NULL,
                kind VARCHAR, components VARCHAR[], metric_before DOUBLE, metric_after DOUBLE,
                p_bad_before DOUBLE, p_bad_after DOUBLE, side_effect JSON,
                recommended BOOLEAN NOT NULL, note VARCHAR)""",
            """CREATE TABLE notes (
                note_id BIGINT PRIMARY KEY, run_id VARCHAR, incident_id VARCHAR,
                author VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL, text VARCHAR NOT NULL)""",
            """CREATE TABLE audit (
                seq BIGINT PRIMARY KEY, written_at TIMESTAMPTZ NOT NULL, actor VARCHAR NOT NULL,
                action VARCHAR NOT NULL, table_name VARCHAR NOT NULL, entity VARCHAR NOT NULL,
                content_hash VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL,
                hash VARCHAR NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "runs.kind and runs.parent_run_id (regression runs link to earlier runs); "
        "remedies.patch_spec",
        (
            "ALTER TABLE runs ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'investigate'",
            "ALTER TABLE runs ADD COLUMN parent_run_id VARCHAR",
            "ALTER TABLE remedies ADD COLUMN patch_spec JSON",
        ),
        rehash=("runs", "remedies"),
    ),
    Migration(
        3,
        "nodes.benign_loss_pct and nodes.benign_kl: what mean-ablating a component does to "
        "ordinary text (its benign damage); nodes.role: its role in the circuit",
        (
            "ALTER TABLE nodes ADD COLUMN benign_loss_pct DOUBLE",
            "ALTER TABLE nodes ADD COLUMN benign_kl DOUBLE",
            "ALTER TABLE nodes ADD COLUMN role VARCHAR",
        ),
        rehash=("nodes",),
    ),
    Migration(
        4,
        "nodes.sites: a circuit member's ids at the positions where it acts (L3.H2@7)",
        ("ALTER TABLE nodes ADD COLUMN sites VARCHAR[]",),
        rehash=("nodes",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

# Every audited table, with the SQL expression of its entity: the unit one audit record covers.
ENTITY_SQL: dict[str, str] = {
    "schema_version": "CAST(version AS VARCHAR)",
    "models": "fingerprint",
    "incidents": "incident_id || '@' || sha256",
    "runs": "run_id",
    "token_scores": "run_id",
    "nodes": "run_id",
    "edges": "run_id",
    "ablations": "run_id",
    "remedies": "run_id",
    "notes": "CAST(note_id AS VARCHAR)",
}
TABLES: tuple[str, ...] = (*ENTITY_SQL, "audit")
CHILD_TABLES = ("token_scores", "nodes", "edges", "ablations", "remedies")
# natural reading order of each table's rows (readers and export)
_ORDER: dict[str, str] = {
    "schema_version": "version",
    "models": "first_seen, fingerprint",
    "incidents": "ingested_at, incident_id, sha256",
    "runs": "recorded_at, run_id",
    "token_scores": 'run_id, "position", method',
    "nodes": "run_id, rank NULLS LAST, abs(score) DESC NULLS LAST, node_id, method",
    "edges": "run_id, abs(score) DESC NULLS LAST, source, target",
    "ablations": "run_id, experiment, components",
    "remedies": "run_id, remedy_id",
    "notes": "note_id",
    "audit": "seq",
}
_JSON_COLUMNS = frozenset(
    {"dims", "case_data", "config", "versions", "timings", "summary", "details", "side_effect"}
    | {"patch_spec"}
)


# --------------------------------------------------------------------------------------------
# Canonical forms: JSON, time, the row digest, the chain hash
# --------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, dt.datetime):
        return _iso(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | frozenset):
        return sorted(o, key=repr)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # numpy arrays and scalars, torch tensors
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept; NaN/Infinity as JS literals."""
    return json.dumps(
        obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default
    )


def _json_text(value: Any, *, what: str) -> str | None:
    """A JSON column's stored text. A str is taken as JSON text and must parse."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RecordError(
                f"{what}: {value[:40]!r} is not JSON text; pass a dict or list instead"
            ) from e
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{what}: cannot be stored as JSON: {e}") from e


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime | str | None, *, what: str) -> dt.datetime | None:
    """An aware UTC datetime. Naive datetimes and ISO strings without an offset are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as e:
            raise RecordError(f"{what}: {value!r} is not an ISO-8601 time") from e
    if not isinstance(value, dt.datetime):
        raise RecordError(f"{what}: expected a datetime or ISO string, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _iso(t: dt.datetime) -> str:
    """UTC ISO-8601 with microseconds and a Z: the form hashed and returned by readers."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DIGEST_TAG = b"rca-digest-v1\0"


def _is_string_view(t: pa.DataType) -> bool:
    check = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return bool(check and check(t))


def _column_payload(arr: pa.Array) -> tuple[str, list[Any]]:
    """(type class, buffers) of one column in a form independent of Arrow's physical layout.

    Floats hash as little-endian float64 with -0.0 as 0.0 and one NaN; integers and booleans as
    int64; timestamps as int64 microseconds UTC; strings as int64 byte lengths then UTF-8 bytes;
    anything else (lists) as canonical JSON. Nulls are hashed by a validity bitmap, their slots
    as 0 / "".
    """
    if isinstance(arr, pa.ExtensionArray):  # e.g. a JSON type over its string storage
        arr = arr.storage
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        v = np.array(arr.cast(pa.float64()).fill_null(0.0), dtype="<f8") + 0.0
        v[np.isnan(v)] = np.nan
        return "f", [v.tobytes()]
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "i", [np.asarray(arr.cast(pa.int64()).fill_null(0), dtype="<i8").tobytes()]
    if pa.types.is_timestamp(t):
        us = arr.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).fill_null(0)
        return "t", [np.asarray(us, dtype="<i8").tobytes()]
    if pa.types.is_string(t) or pa.types.is_large_string(t) or _is_string_view(t):
        s = arr.cast(pa.large_string()).fill_null("")
        bufs = s.buffers()
        offs = np.frombuffer(bufs[1], dtype="<i8", count=len(s) + 1, offset=s.offset * 8)
        lengths = np.diff(offs).astype("<i8").tobytes()
        data = bufs[2]
        body = data[int(offs[0]) : int(offs[-1])] if data is not None and len(s) else b""
        return "s", [lengths, body]
    return "j", [canonical_json(arr.to_pylist()).encode()]


def digest_rows(table: pa.Table) -> str:
    """sha256 of a set of rows, given in a fixed order (the store reads them ``ORDER BY ALL``).

    Columns are hashed by name in sorted order; a column that is NULL in every row is left out,
    so adding a nullable column to the schema does not change the digest of existing rows.
    """
    h = hashlib.sha256(_DIGEST_TAG)
    h.update(struct.pack("<q", table.num_rows))
    for name in sorted(table.column_names):
        col = table.column(name)
        if col.null_count == len(col):
            continue
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        kind, payload = _column_payload(arr)
        h.update(f"{name}\0{kind}\0".encode())
        if arr.null_count:
            h.update(b"v" + np.packbits(np.asarray(arr.is_valid(), dtype=bool)).tobytes())
        for part in payload:
            h.update(part)
    return h.hexdigest()


EMPTY_DIGEST = digest_rows(pa.table({}))


@dataclass(frozen=True)
class AuditRecord:
    """One link of the chain. ``hash = sha256(prev_hash + canonical JSON of the other fields
    without prev_hash and hash)``."""

    seq: int
    at: str  # UTC ISO, as _iso writes it
    actor: str
    action: str  # insert | update | migrate | note
    table: str
    entity: str
    content_hash: str
    prev_hash: str
    hash: str

    def link(self) -> dict[str, Any]:
        """The fields the chain hash covers: all but prev_hash and hash."""
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "table": self.table,
            "entity": self.entity,
            "content_hash": self.content_hash,
        }


def chain_hash(prev_hash: str, link: Mapping[str, Any]) -> str:
    """The hash of one audit record: sha256(prev_hash + canonical JSON of ``link``)."""
    return hashlib.sha256((prev_hash + canonical_json(dict(link))).encode()).hexdigest()


def _entity_rows(con: duckdb.DuckDBPyConnection, table: str, entity: str | None) -> pa.Table:
    """Rows of one entity in digest order (or of the whole table, with its entity in a first
    column ``__entity``). A bulk table's rows are ordered by row_no and hashed without run_id,
    which is their entity; other tables' rows ``ORDER BY ALL``."""
    expr = ENTITY_SQL[table]
    bulk = table in CHILD_TABLES
    cols = "* EXCLUDE (run_id)" if bulk else "*"
    order = "__entity, row_no" if bulk else "ALL"
    sql = f"SELECT {expr} AS __entity, {cols} FROM {table}"
    if entity is None:
        return con.sql(f"{sql} ORDER BY {order}").to_arrow_table()
    rows = con.sql(f"{sql} WHERE {expr} = ? ORDER BY {order}", params=[entity]).to_arrow_table()
    return rows.drop_columns(["__entity"])


def _entity_digest(con: duckdb.DuckDBPyConnection, table: str, entity: str) -> str:
    return digest_rows(_entity_rows(con, table, entity))


def _table_digests(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, tuple[str, int]]:
    """entity -> (digest, row count) for every entity present in ``table``."""
    rows = _entity_rows(con, table, None)
    out: dict[str, tuple[str, int]] = {}
    if rows.num_rows == 0:
        return out
    enc = rows.column(0).combine_chunks().dictionary_encode()
    idx = np.asarray(enc.indices)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(idx)]
    body = rows.drop_columns(["__entity"])
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        out[enc.dictionary[int(idx[s])].as_py()] = (digest_rows(body.slice(s, e - s)), e - s)
    return out


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first row of a query, or None. Always fetches every row: an unfinished result
    would block the connection's next statement (DuckDB 2.0)."""
    rows = con.execute(sql, list(params)).fetchall()
    return rows[0] if rows else None


def _last_link(con: duckdb.DuckDBPyConnection) -> tuple[int, str]:
    row = _one(con, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


def append_audit(
    con: duckdb.DuckDBPyConnection,
    *,
    actor: str,
    action: str,
    table: str,
    entity: str,
    at: dt.datetime | None = None,
) -> AuditRecord:
    """Append the audit record of ``table``/``entity`` as its rows are now, on ``con`` (inside
    the caller's transaction). The Store calls this after each write; tools that build a store
    by other means (a migration, a test fixture) use it to keep the chain whole."""
    if table not in ENTITY_SQL:
        raise ValueError(f"{table!r} is not an audited table; expected one of {list(ENTITY_SQL)}")
    seq, prev = _last_link(con)
    when = _iso(at or _now())
    content = _entity_digest(con, table, entity)
    draft = AuditRecord(seq + 1, when, actor, action, table, entity, content, prev, "")
    rec = dataclasses.replace(draft, hash=chain_hash(prev, draft.link()))
    con.execute(
        "INSERT INTO audit (seq, written_at, actor, action, table_name, entity, content_hash, "
        "prev_hash, hash) VALUES (?, CAST(? AS TIMESTAMPTZ), ?, ?, ?, ?, ?, ?, ?)",
        [
            rec.seq,
            rec.at,
            rec.actor,
            rec.action,
            rec.table,
            rec.entity,
            rec.content_hash,
            rec.prev_hash,
            rec.hash,
        ],
    )
    return rec


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """One place where the store and its audit chain disagree. ``seq`` is the audit record
    concerned (None for rows that no audit record covers)."""

    seq: int | None
    table: str
    entity: str
    what: str

    def __str__(self) -> str:
        at = f"audit seq {self.seq}" if self.seq is not None else "no audit record"
        return f"{at}, table {self.table}, entity {self.entity!r}: {self.what}"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``: ``ok``, the chain's length and head hash, and every problem
    found, first broken link first."""

    path: str
    ok: bool
    records: int
    head: str
    entities: int
    problems: tuple[Broken, ...] = ()

    @property
    def first(self) -> Broken | None:
        return self.problems[0] if self.problems else None

    @property
    def message(self) -> str:
        if self.ok:
            return (
                f"{self.path}: audit chain ok: {self.records} records, {self.entities} entities "
                f"match; head {self.head[:16]}"
            )
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.path}: audit chain broken at {self.first}{more}"

    def __str__(self) -> str:
        return self.message


def _verify(con: duckdb.DuckDBPyConnection, path: str) -> VerifyResult:
    problems: list[Broken] = []
    latest: dict[tuple[str, str], AuditRecord] = {}
    prev = GENESIS
    rows = con.execute(
        "SELECT seq, written_at, actor, action, table_name, entity, content_hash, prev_hash, hash "
        "FROM audit ORDER BY seq"
    ).fetchall()
    for i, r in enumerate(rows, start=1):
        rec = AuditRecord(int(r[0]), _iso(r[1]), *(str(x) for x in r[2:]))
        if rec.seq != i:
            problems.append(
                Broken(rec.seq, rec.table, rec.entity, f"expected seq {i}: an audit record is gone")
            )
        elif rec.prev_hash != prev:
            problems.append(
                Broken(
                    rec.seq, rec.table, rec.entity, "prev_hash does not match the record before it"
                )
            )
        elif chain_hash(rec.prev_hash, rec.link()) != rec.hash:
            problems.append(
                Broken(rec.seq, rec.table, rec.entity, "the audit record was edited after writing")
            )
        prev = rec.hash
        latest[(rec.table, rec.entity)] = rec
    n_entities = 0
    for table in ENTITY_SQL:
        present = _table_digests(con, table)
        recorded = {e: rec for (t, e), rec in latest.items() if t == table}
        for entity in sorted(set(present) | set(recorded)):
            n_entities += 1
            digest, n = present.get(entity, (EMPTY_DIGEST, 0))
            last = recorded.get(entity)
            if last is None:
                problems.append(
                    Broken(None, table, entity, f"{n} row(s) that no audit record covers")
                )
            elif digest != last.content_hash:
                what = (
                    "row(s) deleted since they were written"
                    if n == 0
                    else f"{n} row(s) differ from what was written"
                )
                problems.append(Broken(last.seq, table, entity, what))
    problems.sort(key=lambda b: (b.seq is None, b.seq or 0, b.table, b.entity))
    return VerifyResult(path, not problems, len(rows), prev, n_entities, tuple(problems))


# --------------------------------------------------------------------------------------------
# Connections: one writer, retrying readers
# --------------------------------------------------------------------------------------------


# Every connection the store makes: DuckDB never installs or loads an extension on its own, so
# a file it could read only through one (a SQLite file: sqlite_scanner) fails here instead of
# downloading code from the network.
_DUCKDB_CONFIG: dict[str, Any] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
_MAGIC = b"DUCK"  # at offset 8 of every DuckDB database file, after the header's checksum
_LOOKS_LIKE: tuple[tuple[bytes, str], ...] = (
    (b"SQLite format 3\x00", "a SQLite file"),
    (b"PAR1", "a Parquet file"),
    (b"ARROW1", "an Arrow file"),
    (b"PK\x03\x04", "a zip file"),
    (b"\x1f\x8b", "a gzip file"),
)


def _looks_like(head: bytes) -> str:
    for magic, what in _LOOKS_LIKE:
        if head.startswith(magic):
            return f"it starts like {what}"
    text = head.decode("utf-8", "ignore")  # the last character may be cut off
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c.isspace() for c in text):
        return "it starts like a text file"
    return f"it starts with the bytes {head[:8].hex()}"


def _check_header(path: Path) -> None:
    """Refuse an existing, non-empty file that is not a DuckDB database, before DuckDB opens
    it: DuckDB would read some (a SQLite file) through an extension rather than refuse them."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:  # a new store (the writer creates it), or one locked against reads on
        return  # some systems: DuckDB's own open answers for those
    if head and head[8:12] != _MAGIC:
        raise StoreError(
            f"database {path}: not a DuckDB database ({_looks_like(head)}); "
            "pass a database rca created"
        )


def _is_corrupt(e: duckdb.Error) -> bool:
    # a block whose checksum fails, or catalog bytes that no longer deserialize
    return "Corrupt database file" in str(e) or isinstance(e, duckdb.SerializationException)


def _db_error(path: Path, e: duckdb.Error, doing: str) -> StoreError:
    """DuckDB's error as the store's one line: a corrupt file says so, anything else names
    what failed."""
    first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
    if _is_corrupt(e):
        return StoreError(
            f"database {path} is corrupt ({first}); the file was damaged outside rca: "
            "restore it from a backup"
        )
    return StoreError(f"database {path}: {doing} failed: {first}")


def _is_lock_error(e: Exception) -> bool:
    # another process holds the file; or this process holds it in the other mode
    msg = str(e)
    return "Could not set lock" in msg or "Conflicting lock" in msg or "different config" in msg


def _connect(
    path: Path,
    *,
    read_only: bool,
    retries: int | None,
    backoff: float,
    max_wait_s: float,
) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying with jittered exponential backoff while another process (or
    another connection of this one, with the other mode) holds it.

    A waiting reader touches ``<db>.waiting``; a writer that sees it fresh lets readers in
    before it writes (``_yield_to_readers``): DuckDB's lock has no queue, and a writer
    recording runs back to back would otherwise keep a polling UI out."""
    _check_header(path)
    t0 = time.monotonic()
    delay = max(backoff, 0.001)
    attempt = 0
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=_DUCKDB_CONFIG)
            break
        except duckdb.Error as e:
            if _is_corrupt(e):
                raise _db_error(path, e, "opening") from e
            if not _is_lock_error(e):
                raise StoreError(
                    f"cannot open database {path}: {str(e).splitlines()[0]}; check that it is "
                    "an rca store (a DuckDB file) and readable"
                ) from e
            waited = time.monotonic() - t0
            if (retries is not None and attempt >= retries) or waited + delay > max_wait_s:
                who = "another writer" if read_only else "another process (a reader or writer)"
                raise StoreError(
                    f"database {path} is locked by {who} (waited {waited:.1f} s); "
                    "retry when it finishes"
                ) from e
            if read_only:
                with contextlib.suppress(OSError):
                    _waiting_marker(path).touch()
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)
            attempt += 1
    with contextlib.suppress(duckdb.Error):  # display only; the data is stored in UTC
        con.execute("SET TimeZone = 'UTC'")
    return con


def _waiting_marker(path: Path) -> Path:
    return path.with_name(path.name + ".waiting")


_READER_FRESH_S = 0.5  # a marker touched this recently means a reader is waiting now
_YIELD_S = 0.15  # longer than a waiting reader's backoff (at most 0.1 s x 1.5)


def _yield_to_readers(path: Path) -> None:
    with contextlib.suppress(OSError):
        if time.time() - _waiting_marker(path).stat().st_mtime < _READER_FRESH_S:
            time.sleep(_YIELD_S)


@contextlib.contextmanager
def open_readonly(
    path: str | Path, *, retries: int = 100, backoff: float = 0.05, max_wait_s: float = 10.0
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the store at ``path``, closed on exit.

    Retries while a writer holds the file, with jittered backoff from ``backoff`` seconds,
    doubling to 0.1 s; after ``retries`` tries or ``max_wait_s`` seconds, whichever comes
    first, raises StoreError "database <path> is locked by
    another writer (waited N s); retry when it finishes". A DuckDB error inside the block
    (a corrupt block, a bad query) leaves it as a one-line StoreError naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise StoreError(
            f"database {p} does not exist; record a run first (Store(path) creates it)"
        )
    con = _connect(p, read_only=True, retries=retries, backoff=backoff, max_wait_s=max_wait_s)
    try:
        yield con
    except duckdb.Error as e:
        raise _db_error(p, e, "reading") from e
    finally:
        con.close()


def _table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def _require_tables(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Every table of the schema is there; one dropped by hand is named, not met later as a
    query error."""
    tables = _table_names(con)
    missing = [t for t in TABLES if t not in tables]
    if missing:
        names = ", ".join(repr(t) for t in missing)
        what = f"the table {names} is" if len(missing) == 1 else f"the tables {names} are"
        raise StoreError(
            f"database {path}: {what} missing; the database was damaged outside rca: "
            "restore it from a backup"
        )


def _version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version of an open store; 0 for an empty file."""
    tables = _table_names(con)
    if "schema_version" not in tables:
        if len(tables & set(TABLES)) >= len(TABLES) // 2:  # a store that lost its version table
            _require_tables(con, path)
        if tables:
            raise StoreError(
                f"database {path} has tables but no schema_version: it is not an rca store; "
                "give a new path"
            )
        return 0
    row = _one(con, "SELECT max(version) FROM schema_version")
    v = int(row[0]) if row and row[0] is not None else 0
    if v > SCHEMA_VERSION:
        raise StoreError(
            f"database {path} has schema version {v}, newer than this rca knows "
            f"({SCHEMA_VERSION}); upgrade rca to open it"
        )
    return v


# --------------------------------------------------------------------------------------------
# Records: what a run writes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRecord:
    """A model as the store keeps it; ``fingerprint`` (``rca.subject.fingerprint``) is its key."""

    fingerprint: str
    path: str | None = None
    architecture: str | None = None
    n_params: int | None = None
    dims: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint.strip():
            raise RecordError("model.fingerprint: must be a non-empty string")
        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        if self.n_params is not None and (
            not isinstance(self.n_params, int) or isinstance(self.n_params, bool)
        ):
            raise RecordError(f"model.n_params: expected an int, got {self.n_params!r}")
        if not isinstance(self.dims, Mapping):
            raise RecordError(f"model.dims: expected a mapping, got {type(self.dims).__name__}")

    @classmethod
    def from_subject(cls, subject: Any) -> ModelRecord:
        """From a loaded ``rca.Subject`` (duck-typed: the store does not import torch)."""
        if not subject.fingerprint:
            raise RecordError("model: the subject has no fingerprint; load it with load_subject")
        return cls(
            fingerprint=subject.fingerprint,
            path=None if subject.path is None else str(subject.path),
            architecture=subject.architecture,
            n_params=int(subject.n_params),
            dims=dict(subject.adapter.dims()),
        )


def _fields_sha256(fields: Mapping[str, Any]) -> str:
    # the same recipe as rca.incident.Incident.sha256
    blob = json.dumps(dict(fields), sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class IncidentRecord:
    """An incident as ingested: every field, the content hash that keys it with its id, where
    it came from and the raw TOML text when there was a file."""

    id: str
    sha256: str
    fields: Mapping[str, Any]
    source: str | None = None
    toml: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise RecordError("incident.id: must be a non-empty string")
        if not isinstance(self.sha256, str) or not _SHA_RE.fullmatch(self.sha256):
            raise RecordError(f"incident.sha256: {self.sha256!r} is not a lowercase sha256 hex")
        if not isinstance(self.fields, Mapping):
            raise RecordError("incident.fields: expected a mapping of the case's fields")
        if "id" in self.fields and self.fields["id"] != self.id:
            raise RecordError(f"incident.fields: id {self.fields['id']!r} is not {self.id!r}")
        _json_text(dict(self.fields), what="incident.fields")
        for key in ("source", "toml"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise RecordError(f"incident.{key}: expected a string, got {type(v).__name__}")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, source: str | None = None, toml: str | None = None
    ) -> IncidentRecord:
        """From a mapping with at least ``id``; the hash is computed as ``Incident.sha256``."""
        if "id" not in fields:
            raise RecordError("incident.fields: needs an 'id'")
        return cls(str(fields["id"]), _fields_sha256(fields), dict(fields), source, toml)

    @classmethod
    def from_incident(cls, incident: Any, *, toml: str | None = None) -> IncidentRecord:
        """From an ``rca.Incident``. Without ``toml``, the case file is read from its source
        when it still parses to the same incident (the text as ingested)."""
        source = getattr(incident, "source", None)
        if toml is None and source and source != "<flags>" and Path(source).is_file():
            with contextlib.suppress(Exception):
                from rca.incident import load_case

                if load_case(source, check_model=False).sha256 == incident.sha256:
                    toml = Path(source).read_text(encoding="utf-8")
        return cls(incident.id, incident.sha256, incident.to_dict(), source, toml)

    @property
    def key(self) -> str:
        return f"{self.id}@{self.sha256}"


# column name -> (type, required); every bulk table also has run_id, filled by the store
_T = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
BULK_COLUMNS: dict[str, dict[str, tuple[str, bool]]] = {
    "token_scores": {
        "position": ("int", True),
        "token": ("str", True),
        "score": ("float", True),
        "method": ("str", False),
    },
    "nodes": {
        "node_id": ("str", True),
        "kind": ("str", False),
        "layer": ("int", False),
        "score": ("float", False),
        "method": ("str", False),
        "baseline": ("str", False),
        "total_effect": ("float", False),
        "direct_effect": ("float", False),
        "necessity": ("float", False),
        "p_value": ("float", False),
        "verdict": ("str", False),
        "reason": ("str", False),
        "rank": ("int", False),
        "benign_loss_pct": ("float", False),
        "benign_kl": ("float", False),
        "role": ("str", False),
        "sites": ("list", False),
    },
    "edges": {"source": ("str", True), "target": ("str", True), "score": ("float", True)},
    "ablations": {
        "experiment": ("str", True),
        "components": ("list", True),
        "kind": ("str", False),
        "metric": ("float", False),
        "effect": ("float", False),
        "p_value": ("float", False),
        "details": ("json", False),
    },
    "remedies": {
        "remedy_id": ("str", True),
        "kind": ("str", True),
        "components": ("list", False),
        "metric_before": ("float", False),
        "metric_after": ("float", False),
        "p_bad_before": ("float", False),
        "p_bad_after": ("float", False),
        "side_effect": ("json", False),
        "recommended": ("bool", False),
        "note": ("str", False),
        "patch_spec": ("json", False),
    },
}


def _arrow_type(kind: str) -> pa.DataType:
    if kind == "list":
        return pa.list_(pa.string())
    return _T.get(kind, pa.string())  # json is stored as its text


TableLike = Any  # pyarrow.Table | pandas.DataFrame | Mapping[str, Sequence] | Sequence[Mapping]


def _source_columns(data: TableLike, what: str) -> tuple[dict[str, Any], int]:
    """name -> column values (Arrow ChunkedArray, pandas Series, or sequence), row count."""
    if isinstance(data, pa.Table):
        return {n: data.column(n) for n in data.column_names}, data.num_rows
    if hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame
        return {str(c): data[c] for c in data.columns}, len(data)
    if isinstance(data, Mapping):
        cols = dict(data)
        try:
            lengths = {len(v) for v in cols.values()}
        except TypeError:
            raise RecordError(f"{what}: a dict of columns needs a sequence per column") from None
        if len(lengths) > 1:
            raise RecordError(f"{what}: columns have different lengths {sorted(lengths)}")
        return cols, lengths.pop() if lengths else 0
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        keys: dict[str, None] = {}
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise RecordError(f"{what}: row {i} is {type(row).__name__}, not a mapping")
            keys.update(dict.fromkeys(row))
        return {k: [row.get(k) for row in data] for k in keys}, len(data)
    raise RecordError(
        f"{what}: expected a pyarrow Table, pandas DataFrame, dict of columns or list of rows, "
        f"got {type(data).__name__}"
    )


def _pylist(values: Any) -> list[Any]:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.to_pylist()
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


def _components(v: Any, what: str) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, list | tuple) or not all(isinstance(c, str) for c in v):
        raise RecordError(f"{what}: expected a list of component ids, got {v!r:.60}")
    return list(v)


def _bulk_table(table: str, data: TableLike, run_id: str) -> pa.Table:
    """The rows of one bulk table as Arrow in the store's column order, run_id first."""
    spec = BULK_COLUMNS[table]
    what = f"RunRecord.{table}"
    cols, n = ({}, 0) if data is None else _source_columns(data, what)
    if "run_id" in cols:
        ids = set(_pylist(cols.pop("run_id")))
        if ids - {run_id}:
            raise RecordError(f"{what}: column run_id holds other runs' ids; leave it out")
    unknown = sorted(set(cols) - set(spec))
    if unknown:
        raise RecordError(f"{what}: unknown column {unknown[0]!r}; expected some of {list(spec)}")
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "row_no": pa.array(np.arange(n, dtype=np.int32)),
    }
    for name, (kind, required) in spec.items():
        if name not in cols:
            if required and n:
                raise RecordError(f"{what}: column {name!r} is missing")
            if kind == "bool":
                arrays[name] = pa.array([False] * n, pa.bool_())
            else:
                arrays[name] = pa.nulls(n, _arrow_type(kind))
            continue
        values = cols[name]
        try:
            if kind == "json":
                arr = pa.array(
                    [_json_text(v, what=f"{what}.{name}") for v in _pylist(values)], pa.string()
                )
            elif kind == "list":
                arr = pa.array(
                    [_components(v, f"{what}.{name}") for v in _pylist(values)],
                    pa.list_(pa.string()),
                )
            elif isinstance(values, pa.ChunkedArray | pa.Array):
                arr = values.cast(_T[kind])
            elif hasattr(values, "iloc"):  # pandas: NaN means missing except in float columns
                arr = pa.array(values, type=_T[kind], from_pandas=kind != "float")
            else:
                arr = pa.array(list(values) if not hasattr(values, "dtype") else values, _T[kind])
        except RecordError:
            raise
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise RecordError(
                f"{what}: column {name!r} cannot be read as {kind}: {str(e).splitlines()[0]}"
            ) from e
        if kind == "bool":
            arr = arr.fill_null(False)
        if required and arr.null_count:
            raise RecordError(f"{what}: column {name!r} has {arr.null_count} missing value(s)")
        arrays[name] = arr
    out = pa.table(arrays)
    if table == "nodes" and n:
        out = _fill_node_kinds(out)
    return out


def _fill_node_kinds(nodes: pa.Table) -> pa.Table:
    """kind and layer from the id grammar where the caller left them out and the id parses."""
    from rca.ids import IdError, parse_id

    kinds = nodes.column("kind").to_pylist()
    layers = nodes.column("layer").to_pylist()
    if all(k is not None for k in kinds) and all(x is not None for x in layers):
        return nodes
    for i, node_id in enumerate(nodes.column("node_id").to_pylist()):
        if kinds[i] is not None and layers[i] is not None:
            continue
        try:
            cid = parse_id(node_id)
        except IdError:
            continue
        kinds[i] = kinds[i] if kinds[i] is not None else cid.kind
        layers[i] = layers[i] if layers[i] is not None else cid.layer
    nodes = nodes.set_column(nodes.column_names.index("kind"), "kind", pa.array(kinds, pa.string()))
    return nodes.set_column(
        nodes.column_names.index("layer"), "layer", pa.array(layers, pa.int64())
    )


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on, without importing them."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    import platform
    from importlib import metadata

    out = [("python", platform.python_version())]
    for name in ("rca", "torch", "transformers", "captum", "duckdb", "numpy", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append((name, metadata.version(name)))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything one run writes, as plain Python data; validated on construction.

    The bulk tables (``token_scores``, ``nodes``, ``edges``, ``ablations``, ``remedies``) take a
    pyarrow Table, a pandas DataFrame, a dict of columns or a list of row dicts, with the
    columns of ``BULK_COLUMNS`` (run_id is filled in). ``summary`` holds the verdict and the
    metric and P(bad) before and after, e.g. ``{"verdict": "confirmed", "metric_before": 3.1,
    "metric_after": -0.4, "p_bad_before": 0.91, "p_bad_after": 0.08}``.
    """

    incident: IncidentRecord
    model: ModelRecord
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kind: str = "investigate"  # investigate | regress | confirm | ...
    parent_run_id: str | None = None  # the earlier run a regression run re-checks
    status: str = "ok"  # one of RUN_STATUSES
    config: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=library_versions)
    device: str | None = None
    seed: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds
    summary: Mapping[str, Any] = field(default_factory=dict)
    started_at: dt.datetime | str | None = None  # UTC; naive times are taken as UTC
    finished_at: dt.datetime | str | None = None  # None: the time it is recorded
    token_scores: TableLike = None
    nodes: TableLike = None
    edges: TableLike = None
    ablations: TableLike = None
    remedies: TableLike = None
    # the bulk tables converted to Arrow, in the store's column order
    tables: Mapping[str, pa.Table] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.incident, IncidentRecord):
            raise RecordError("RunRecord.incident: use IncidentRecord.from_incident(incident)")
        if not isinstance(self.model, ModelRecord):
            raise RecordError("RunRecord.model: use ModelRecord.from_subject(subject)")
        for key in ("run_id", "parent_run_id"):
            v = getattr(self, key)
            if v is None and key == "parent_run_id":
                continue
            try:
                object.__setattr__(self, key, str(uuid.UUID(str(v))))
            except ValueError as e:
                raise RecordError(f"RunRecord.{key}: {v!r} is not a uuid") from e
        if self.parent_run_id == self.run_id:
            raise RecordError("RunRecord.parent_run_id: a run cannot be its own parent")
        if not isinstance(self.kind, str) or not _KIND_RE.fullmatch(self.kind):
            raise RecordError(f"RunRecord.kind: {self.kind!r} is not a lowercase word")
        if self.status not in RUN_STATUSES:
            raise RecordError(f"RunRecord.status: {self.status!r} is not one of {RUN_STATUSES}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise RecordError(f"RunRecord.seed: expected an int, got {self.seed!r}")
        for key in ("config", "versions", "timings", "summary"):
            v = getattr(self, key)
            if not isinstance(v, Mapping):
                raise RecordError(f"RunRecord.{key}: expected a mapping, got {type(v).__name__}")
            _json_text(dict(v), what=f"RunRecord.{key}")
        for key, v in self.timings.items():
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise RecordError(f"RunRecord.timings: {key!r} = {v!r} is not a number of seconds")
        for key in ("started_at", "finished_at"):
            object.__setattr__(self, key, _utc(getattr(self, key), what=f"RunRecord.{key}"))
        tables = {t: _bulk_table(t, getattr(self, t), self.run_id) for t in CHILD_TABLES}
        object.__setattr__(self, "tables", tables)


# --------------------------------------------------------------------------------------------
# The stores
# --------------------------------------------------------------------------------------------


def _test_hook(stage: str) -> None:
    """Tests only: with RCA_STORE_TEST_PAUSE="stage:seconds", sleep at that stage inside the
    write transaction (after touching the file RCA_STORE_TEST_SIGNAL names), so a test can kill
    the writer mid-run. Unit tests monkeypatch this to raise."""
    spec = os.environ.get("RCA_STORE_TEST_PAUSE")
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if at != stage:
        return
    signal = os.environ.get("RCA_STORE_TEST_SIGNAL")
    if signal:
        Path(signal).write_text(str(os.getpid()))
    time.sleep(float(seconds or 60))


def _decode(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in zip(columns, row, strict=True):
        if isinstance(v, dt.datetime):
            v = _iso(v)
        elif name in _JSON_COLUMNS and isinstance(v, str):
            v = json.loads(v)
        out[name] = v
    return out


def _rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [_decode(names, r) for r in cur.fetchall()]


class ReadOnlyStore:
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
            v = _version(con, self.path)
            if v < SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {v}, older than this rca "
                    f"({SCHEMA_VERSION}); open it once with rca.store.Store(path) to migrate it"
                )
            _require_tables(con, self.path)
            yield con

    def schema_version(self) -> int:
        """The file's schema version (readable even when it is older than this rca's)."""
        with open_readonly(
            self.path, retries=self.retries, backoff=self.backoff, max_wait_s=self.max_wait_s
        ) as con:
            return _version(con, self.path)

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
        ``incident``, ``model``, ``notes`` and the bulk tables (lists of row dicts, or pandas
        DataFrames with ``frames``)."""
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
                sql = f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ? ORDER BY {_ORDER[t]}"
                if frames:
                    run[t] = con.execute(sql, [run_id]).df()
                else:
                    run[t] = _rows(con, sql, [run_id])
            run["notes"] = _rows(
                con, "SELECT * FROM notes WHERE run_id = ? ORDER BY note_id", [run_id]
            )
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
            return {t: int(_one(con, f"SELECT count(*) FROM {t}")[0]) for t in TABLES}

    def verify(self) -> VerifyResult:
        """Recompute every audit record's hash and every entity's digest from the tables as
        they are now; ``ok`` is False at the first disagreement, which ``first`` names."""
        with self._read() as con:
            return _verify(con, str(self.path))

    def export(self, directory: str | Path) -> list[Path]:
        """One Parquet file per table (``<table>.parquet``) in ``directory``, read from one
        snapshot; returns the paths."""
        import pyarrow.parquet as pq

        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        with self._read() as con:
            for t in TABLES:
                order = "run_id, row_no" if t in CHILD_TABLES else _ORDER[t]  # cheap, stable
                rows = con.sql(f"SELECT * FROM {t} ORDER BY {order}").to_arrow_table()
                path = out_dir / f"{t}.parquet"
                tmp = path.with_name(path.name + ".tmp")
                pq.write_table(rows, tmp)
                tmp.replace(path)
                paths.append(path)
        return paths


class Store(ReadOnlyStore):
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
        with _process_lock(self.path):
            with self._transaction_unlocked(what) as con:
                yield con

    @contextlib.contextmanager
    def _transaction_unlocked(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        _yield_to_readers(self.path)
        con = _connect(
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
            if _is_corrupt(e):
                raise _db_error(self.path, e, what) from e
            raise StoreError(
                f"database {self.path}: {what} failed and was rolled back, nothing was written: "
                f"{str(e).splitlines()[0]}"
            ) from e
        finally:
            con.close()

    def _migrate(self) -> None:
        with self._transaction("opening") as con:
            v = _version(con, self.path)
            for m in MIGRATIONS:
                if m.version > v:
                    _apply(con, m, actor=self.actor)
            _require_tables(con, self.path)

    def record_run(self, run: RunRecord) -> str:
        """Write a run and everything it produced in one transaction: the model and incident
        (inserted when new), the run row, its bulk tables and one audit record per table.
        All or nothing: on any error the database is as before. Returns the run id."""
        if not isinstance(run, RunRecord):
            raise RecordError(f"record_run: expected a RunRecord, got {type(run).__name__}")
        now = _now()
        finished = run.finished_at or now
        started = run.started_at or finished
        with self._transaction(f"recording run {run.run_id}") as con:
            self._put_model(con, run.model, now)
            _test_hook("model")
            self._put_incident(con, run.incident, now)
            _test_hook("incident")
            if _one(con, "SELECT 1 FROM runs WHERE run_id = ?", [run.run_id]):
                raise StoreError(
                    f"database {self.path}: run {run.run_id} is already recorded; give the new "
                    "run a new run_id"
                )
            if run.parent_run_id is not None and not _one(
                con, "SELECT 1 FROM runs WHERE run_id = ?", [run.parent_run_id]
            ):
                raise StoreError(
                    f"database {self.path}: parent run {run.parent_run_id} is not recorded; "
                    "record it first or leave parent_run_id out"
                )
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
            append_audit(
                con, actor=self.actor, action="insert", table="runs", entity=run.run_id, at=now
            )
            _test_hook("run")
            for table in CHILD_TABLES:
                rows = run.tables[table]
                if rows.num_rows:
                    _insert_arrow(con, table, rows)
                append_audit(
                    con, actor=self.actor, action="insert", table=table, entity=run.run_id, at=now
                )
                _test_hook(table)
            _test_hook("commit")
        return run.run_id

    def _put_model(self, con: duckdb.DuckDBPyConnection, m: ModelRecord, now: dt.datetime) -> None:
        row = _one(
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
            new = tuple(
                old if v is None or v == "{}" else v for v, old in zip(new, row, strict=True)
            )
            if new == tuple(row):
                return
            con.execute(
                "UPDATE models SET path = ?, architecture = ?, n_params = ?, dims = ? "
                "WHERE fingerprint = ?",
                [*new, m.fingerprint],
            )
        append_audit(
            con,
            actor=self.actor,
            action="insert" if row is None else "update",
            table="models",
            entity=m.fingerprint,
            at=now,
        )

    def _put_incident(
        self, con: duckdb.DuckDBPyConnection, inc: IncidentRecord, now: dt.datetime
    ) -> None:
        if _one(
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
        append_audit(
            con, actor=self.actor, action="insert", table="incidents", entity=inc.key, at=now
        )

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
        now = _now()
        with self._transaction("adding a note") as con:
            if run_id is not None and not _one(
                con, "SELECT 1 FROM runs WHERE run_id = ?", [run_id]
            ):
                raise StoreError(f"database {self.path}: run {run_id!r} is not recorded")
            if incident is not None and not _one(
                con, "SELECT 1 FROM incidents WHERE incident_id = ?", [incident]
            ):
                raise StoreError(f"database {self.path}: incident {incident!r} is not recorded")
            row = _one(con, "SELECT coalesce(max(note_id), 0) + 1 FROM notes")
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


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    """One lock per database file and process: threads of one process (a Streamlit app) would
    otherwise share DuckDB's in-process instance and race on the audit chain's next seq."""
    key = str(path.resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Bulk insert through a registered Arrow table (DuckDB scans it zero-copy)."""
    name = f"__rca_in_{table}"
    cols = ", ".join(f'"{c}"' for c in rows.column_names)
    con.register(name, rows)
    try:
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {name}")
    finally:
        con.unregister(name)


def _apply(con: duckdb.DuckDBPyConnection, m: Migration, *, actor: str) -> None:
    """Apply one migration inside the caller's transaction, re-auditing the entities it changes
    (only those that matched their audit record before: a migration never blesses tampering)."""
    before: dict[str, dict[str, tuple[str, int]]] = {}
    latest: dict[tuple[str, str], str] = {}
    if m.rehash:
        for table, entity, content in con.execute(
            "SELECT table_name, entity, content_hash FROM audit ORDER BY seq"
        ).fetchall():
            latest[(table, entity)] = content
        before = {t: _table_digests(con, t) for t in m.rehash}
    for sql in m.statements:
        con.execute(sql)
    now = _now()
    for table in m.rehash:
        after = _table_digests(con, table)
        for entity, (digest, _) in sorted(before[table].items()):
            if latest.get((table, entity)) == digest and after[entity][0] != digest:
                append_audit(con, actor=actor, action="migrate", table=table, entity=entity, at=now)
    con.execute(
        "INSERT INTO schema_version (version, applied_at, note) VALUES (?, ?, ?)",
        [m.version, now, m.note],
    )
    append_audit(
        con, actor=actor, action="migrate", table="schema_version", entity=str(m.version), at=now
    )
