"""The store facing files it did not write, or that were damaged after it wrote them.

Through the command line (`rca verify`, `rca cases list`), each case must end in one
``error:`` line that names the file and what is wrong with it, exit code 2: a table dropped by
hand, a file with corrupt blocks, a SQLite or text file passed as ``--db``. None of them may
reach the network: every connection the store makes has DuckDB's extension autoinstall and
autoload off, and a file that is not a DuckDB database is refused before DuckDB opens it.
"""

from __future__ import annotations

import random
import shutil
import socket
import sqlite3
from pathlib import Path
from typing import Any

import duckdb
import pytest

from rca import store as store_mod
from rca.store import IncidentRecord, ModelRecord, RunRecord, Store, StoreError
from rca.store.connection import MAGIC
from tests.helpers import assert_one_line_error, rca_cli

COMMANDS = (("verify",), ("cases", "list"))
BLOCK = 256 * 1024  # DuckDB's block size
CORRUPT_FROM = 300_000  # past the file header and the first block's start


def _run(i: int) -> RunRecord:
    return RunRecord(
        incident=IncidentRecord.from_fields({"id": f"case-{i}", "title": "PIN leaked"}),
        model=ModelRecord("e" * 64, architecture="gpt2"),
        nodes=[{"node_id": f"L{j % 2}.N{j}", "score": float(j)} for j in range(2000)],
        edges=[{"source": "EMB", "target": f"L0.N{j}", "score": 0.5} for j in range(500)],
        ablations=[{"experiment": "cause_set", "components": ["L0.N1"], "effect": 1.0}],
    )


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding three runs and a note, written by the Store; tests copy it."""
    db = tmp_path_factory.mktemp("hostile") / "rca.duckdb"
    s = Store(db, actor="tester")
    run_ids = [s.record_run(_run(i)) for i in range(3)]
    s.add_note(run_id=run_ids[0], author="ana", text="looked at it")
    return db


@pytest.fixture
def db(store_file: Path, tmp_path: Path) -> Path:
    """A private copy of ``store_file`` that verifies and lists its runs."""
    dest = tmp_path / "rca.duckdb"
    shutil.copyfile(store_file, dest)
    code, out, err = rca_cli("verify", "--db", str(dest))
    assert code == 0 and "audit chain ok" in out, err
    return dest


def _connects(monkeypatch: pytest.MonkeyPatch, *, allow: bool) -> list[dict[str, Any]]:
    """Record every duckdb.connect the store makes (and fail it unless ``allow``); a socket
    connect from this process fails the test."""
    calls: list[dict[str, Any]] = []
    real = duckdb.connect

    def connect(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        calls.append(kwargs)
        if not allow:
            raise AssertionError(f"the store opened {args} with DuckDB")
        return real(*args, **kwargs)

    def no_network(self: socket.socket, *args: Any) -> None:
        raise AssertionError(f"network connect to {args}")

    monkeypatch.setattr(duckdb, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return calls


# ---------------------------------------------------------------------------- damage


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("table", ["notes", "audit", "schema_version"])
def test_a_dropped_table_is_named_in_one_line(db: Path, table: str, command: tuple) -> None:
    with duckdb.connect(str(db)) as con:
        con.execute(f"DROP TABLE {table}")
    code, _, err = rca_cli(*command, "--db", str(db))
    assert_one_line_error(code, err, str(db), f"the table '{table}' is missing", "damaged")
    assert "CatalogException" not in err and "not an rca store" not in err


def test_a_table_dropped_while_the_writer_is_closed_stops_the_next_write(db: Path) -> None:
    with duckdb.connect(str(db)) as con:
        con.execute("DROP TABLE audit")
    with pytest.raises(StoreError, match=r"the table 'audit' is missing; the database was damaged"):
        Store(db).record_run(_run(9))


def _corrupt(path: Path) -> int:
    """Write 64 random bytes every 256 KiB past offset 300000; returns how many landed."""
    rng = random.Random(19)
    size = path.stat().st_size
    landed = 0
    with path.open("r+b") as f:
        for offset in range(CORRUPT_FROM, size - 64, BLOCK):
            f.seek(offset)
            f.write(rng.randbytes(64))
            landed += 1
    return landed


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_file_with_corrupt_blocks_is_named_corrupt_in_one_line(db: Path, command: tuple) -> None:
    with duckdb.connect(str(db), read_only=True) as con:
        used_blocks = con.execute("SELECT used_blocks FROM pragma_database_size()").fetchone()
    assert used_blocks is not None and used_blocks[0] >= 8  # the writes land on live blocks
    assert _corrupt(db) >= 8
    code, _, err = rca_cli(*command, "--db", str(db))
    assert_one_line_error(code, err, str(db), "is corrupt", "restore it from a backup")


def test_store_errors_from_duckdb_are_one_line_naming_the_file(db: Path) -> None:
    with pytest.raises(StoreError) as ei:
        Store.reader(db).query("SELECT * FROM no_such_table")
    msg = str(ei.value)
    assert msg.startswith(f"database {db}: reading failed: Catalog Error: "), msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------- foreign files


def _sqlite(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE runs (run_id TEXT)")
    con.commit()
    con.close()


FOREIGN = {
    "sqlite": (_sqlite, "it starts like a SQLite file"),
    "text": (lambda p: p.write_text("run_id,verdict\nabc,confirmed\n"), "a text file"),
}


def test_a_duckdb_file_carries_the_magic_bytes_the_store_checks(db: Path) -> None:
    assert db.read_bytes()[8:12] == MAGIC == b"DUCK"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_file_is_refused_before_duckdb_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, command: tuple
) -> None:
    make, looks = FOREIGN[kind]
    path = tmp_path / f"cases.{kind}"
    make(path)
    before = path.read_bytes()
    calls = _connects(monkeypatch, allow=False)
    code, _, err = rca_cli(*command, "--db", str(path))
    assert_one_line_error(
        code, err, str(path), "not a DuckDB database", looks, "pass a database rca created"
    )
    assert calls == []
    assert path.read_bytes() == before
    with pytest.raises(StoreError, match="not a DuckDB database"):
        Store(path)  # the writer refuses it too, and leaves it as it was
    assert path.read_bytes() == before


def test_every_store_connection_has_extension_autoinstall_and_autoload_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _connects(monkeypatch, allow=True)
    db = tmp_path / "rca.duckdb"
    Store(db).record_run(_run(0))
    for command in COMMANDS:
        code, _, err = rca_cli(*command, "--db", str(db))
        assert code == 0, err
    assert len(calls) >= 4  # the writer's opening and run, a read per command
    off = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    assert all(c.get("config") == off for c in calls), calls
    with store_mod.open_readonly(db) as con:
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() "
                "WHERE name IN ('autoinstall_known_extensions', 'autoload_known_extensions')"
            ).fetchall()
        )
    assert settings == {
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
    }
