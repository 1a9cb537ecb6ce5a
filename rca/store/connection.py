"""Opening the database file: refusing a file that is not a DuckDB database before DuckDB
reads it, DuckDB's errors as one-line ``StoreError``s, connections that retry on a lock,
read-only access for readers, the waiting marker that makes a writer yield to them, and the
per-file lock that takes a process's threads through the writer one at a time.

DuckDB allows one read-write process or many read-only ones, never both; its lock has no
queue, so readers retry with jittered backoff and a writer lets a waiting reader in first.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from .errors import StoreError

__all__ = [
    "MAGIC",
    "db_error",
    "is_corrupt",
    "is_lock_error",
    "open_connection",
    "open_readonly",
    "process_lock",
    "yield_to_readers",
]

# Every connection the store makes: DuckDB never installs or loads an extension on its own, so
# a file it could read only through one (a SQLite file: sqlite_scanner) fails here instead of
# downloading code from the network.
_DUCKDB_CONFIG: dict[str, Any] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
MAGIC = b"DUCK"  # at offset 8 of every DuckDB database file, after the header's checksum
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
    if head and head[8:12] != MAGIC:
        raise StoreError(
            f"database {path}: not a DuckDB database ({_looks_like(head)}); "
            "pass a database rca created"
        )


def is_corrupt(e: duckdb.Error) -> bool:
    """DuckDB's error says the file is damaged: a block whose checksum fails, or catalog bytes
    that no longer deserialize."""
    return "Corrupt database file" in str(e) or isinstance(e, duckdb.SerializationException)


def db_error(path: Path, e: duckdb.Error, doing: str) -> StoreError:
    """DuckDB's error as the store's one line: a corrupt file says so, anything else names
    what failed."""
    first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
    if is_corrupt(e):
        return StoreError(
            f"database {path} is corrupt ({first}); the file was damaged outside rca: "
            "restore it from a backup"
        )
    return StoreError(f"database {path}: {doing} failed: {first}")


def is_lock_error(e: Exception) -> bool:
    """The error of an open refused by a lock: another process holds the file, or this process
    holds it in the other mode."""
    msg = str(e)
    return "Could not set lock" in msg or "Conflicting lock" in msg or "different config" in msg


def open_connection(
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
    before it writes (``yield_to_readers``): DuckDB's lock has no queue, and a writer
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
            if is_corrupt(e):
                raise db_error(path, e, "opening") from e
            if not is_lock_error(e):
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


def yield_to_readers(path: Path) -> None:
    """A writer about to open ``path`` waits a moment when a reader is waiting for it."""
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
    con = open_connection(
        p, read_only=True, retries=retries, backoff=backoff, max_wait_s=max_wait_s
    )
    try:
        yield con
    except duckdb.Error as e:
        raise db_error(p, e, "reading") from e
    finally:
        con.close()


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def process_lock(path: Path) -> threading.Lock:
    """One lock per database file and process: threads of one process (a Streamlit app) would
    otherwise share DuckDB's in-process instance and race on the audit chain's next seq."""
    key = str(path.resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())
