"""The audit chain: canonical forms (JSON, UTC time), the row digest, the chain hash,
appending one audit record and verifying the whole chain against the tables.

Each audit record holds ``content_hash``, a digest of the rows of one entity (``digest_rows``),
and ``hash = sha256(prev_hash + canonical JSON of the record)``. ``verify_chain`` recomputes
every digest from the tables as they are now, so changing, adding or deleting any row by hand
breaks it, and it names the first broken link.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from .tables import CHILD_TABLES, ENTITY_SQL, first_row

__all__ = [
    "EMPTY_DIGEST",
    "GENESIS",
    "AuditRecord",
    "Broken",
    "VerifyResult",
    "append_audit",
    "canonical_json",
    "chain_hash",
    "digest_rows",
    "iso_utc",
    "json_default",
    "now_utc",
    "table_digests",
    "verify_chain",
]

GENESIS = "0" * 64  # prev_hash of the first audit record

# --------------------------------------------------------------------------------------------
# Canonical forms: JSON, time, the row digest, the chain hash
# --------------------------------------------------------------------------------------------


def json_default(o: Any) -> Any:
    """The JSON form of what ``json`` cannot write itself: times, paths, sets, dataclasses,
    numpy and torch values."""
    if isinstance(o, dt.datetime):
        return iso_utc(o)
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
        obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=json_default
    )


def now_utc() -> dt.datetime:
    """The current time, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def iso_utc(t: dt.datetime) -> str:
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
    at: str  # UTC ISO, as iso_utc writes it
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


def table_digests(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, tuple[str, int]]:
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


def _last_link(con: duckdb.DuckDBPyConnection) -> tuple[int, str]:
    row = first_row(con, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
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
    when = iso_utc(at or now_utc())
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


def verify_chain(con: duckdb.DuckDBPyConnection, path: str) -> VerifyResult:
    """Recompute every audit record's hash and every entity's digest on ``con``; ``path``
    names the database in the result."""
    problems: list[Broken] = []
    latest: dict[tuple[str, str], AuditRecord] = {}
    prev = GENESIS
    rows = con.execute(
        "SELECT seq, written_at, actor, action, table_name, entity, content_hash, prev_hash, hash "
        "FROM audit ORDER BY seq"
    ).fetchall()
    for i, r in enumerate(rows, start=1):
        rec = AuditRecord(int(r[0]), iso_utc(r[1]), *(str(x) for x in r[2:]))
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
        present = table_digests(con, table)
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
