"""The store across processes: a writer killed mid-run, a reader beside a writer, two writers.

Each actor is a real Python process using ``rca.store``. The children load ``rca.store`` without
``rca/__init__`` (which imports torch): the store is headless, and that keeps each child's start
near 0.3 s instead of 2 s.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rca import store as store_mod
from rca.store import (
    RUN_STAGES,
    TABLES,
    IncidentRecord,
    ModelRecord,
    RunRecord,
    Store,
    open_readonly,
)

RCA_DIR = str(Path(store_mod.__file__).parents[1])

CHILD = f"""
import json, os, sys, time, types
pkg = types.ModuleType("rca"); pkg.__path__ = [{RCA_DIR!r}]; sys.modules["rca"] = pkg
import numpy as np, pyarrow as pa
from rca.store import RUN_STAGES, IncidentRecord, ModelRecord, RunRecord, Store, StoreError

# With "stage:seconds", sit that long inside record_run's transaction, after touching the file
# $HOLD_SIGNAL names: right after that stage of RUN_STAGES, or at the COMMIT statement
# ("commit") with every row written.
def hold_at(spec):
    if not spec:
        return
    stage, _, seconds = spec.partition(":")

    def hold():
        open(os.environ["HOLD_SIGNAL"], "w").write(str(os.getpid()))
        time.sleep(float(seconds))

    if stage == "commit":
        import duckdb
        real_connect = duckdb.connect

        class Holding:  # a connection that holds before it runs COMMIT
            def __init__(self, con):
                self.con = con
            def __getattr__(self, name):
                return getattr(self.con, name)
            def execute(self, sql, *args, **kwargs):
                if sql == "COMMIT":
                    hold()
                return self.con.execute(sql, *args, **kwargs)

        duckdb.connect = lambda *a, **k: Holding(real_connect(*a, **k))
    else:
        write = RUN_STAGES[stage]

        def then_hold(*args, **kwargs):
            write(*args, **kwargs)
            hold()

        RUN_STAGES[stage] = then_hold

def big_run(i, n_nodes, n_edges, tag):
    rng = np.random.default_rng(i)
    ids = [f"L{{k % 12}}.N{{k}}" for k in range(n_nodes)]
    return RunRecord(
        incident=IncidentRecord.from_fields({{"id": f"{{tag}}-{{i}}", "title": "t"}}),
        model=ModelRecord(f"{{i % 3:064x}}"),
        summary={{"n_nodes": n_nodes, "n_edges": n_edges}},
        nodes=pa.table({{"node_id": ids, "score": rng.normal(size=n_nodes)}}),
        edges=pa.table({{
            "source": pa.array(ids).take(rng.integers(0, n_nodes, n_edges)),
            "target": pa.array(ids).take(rng.integers(0, n_nodes, n_edges)),
            "score": rng.normal(size=n_edges),
        }}),
        remedies=[{{"remedy_id": "r", "kind": "ablate", "behaviour": {{"hold_share": 0.8}}}}],
        variants=[{{"variant_index": k, "part": "fit" if k < 3 else "held_out", "p_bad": 0.5}}
                  for k in range(1, 5)],
        variant_results=[{{"remedy_row": 0, "variant_index": k,
                           "part": "fit" if k < 3 else "held_out", "p_bad_after": 0.1}}
                         for k in range(1, 5)],
    )

mode, db = sys.argv[1], sys.argv[2]
if mode == "write":  # write N runs, then touch the done file
    n, n_nodes, n_edges, tag, done = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), \\
        sys.argv[6], sys.argv[7]
    s = Store(db, actor=tag)
    hold_at(os.environ.get("HOLD_AT"))  # the next transaction is the first run's
    for i in range(n):
        rid = s.record_run(big_run(i, n_nodes + 7 * i, n_edges, tag))
        s.add_note(run_id=rid, author=tag, text=f"run {{i}}")
    open(done, "w").write("done")
elif mode == "read":  # read until the done file appears; report what was seen
    done = sys.argv[3]
    r = Store.reader(db, max_wait_s=20)
    stats = {{"reads": 0, "half_runs": [], "seen": []}}
    sql = ("SELECT r.run_id, CAST(r.summary->>'n_nodes' AS INTEGER) AS want, "
           "(SELECT count(*) FROM nodes n WHERE n.run_id = r.run_id) AS got, "
           "(SELECT count(*) FROM edges e WHERE e.run_id = r.run_id) AS got_edges, "
           "CAST(r.summary->>'n_edges' AS INTEGER) AS want_edges FROM runs r "
           "WHERE r.summary->>'n_nodes' IS NOT NULL")
    while True:
        finished = os.path.exists(done)
        rows = r.query(sql).to_dict("records")
        stats["reads"] += 1
        stats["seen"].append(len(rows))
        stats["half_runs"] += [x["run_id"] for x in rows
                               if x["want"] != x["got"] or x["want_edges"] != x["got_edges"]]
        if finished:
            break
        time.sleep(0.02)  # a UI refreshing 50 times a second
    print(json.dumps(stats))
"""


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(p: subprocess.Popen[str], timeout: float = 45) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-2000:]
    return out


def snapshot(path: Path) -> dict[str, str]:
    with open_readonly(path) as con:
        return {t: repr(con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()) for t in TABLES}


def small_run(i: int) -> RunRecord:
    return RunRecord(
        incident=IncidentRecord.from_fields({"id": f"base-{i}", "title": "baseline"}),
        model=ModelRecord("a" * 64, path="/m"),
        nodes=[{"node_id": "L0.H0", "score": 1.0}],
        edges=[{"source": "EMB", "target": "L0.H0", "score": 0.5}],
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    s = Store(tmp_path / "rca.duckdb", actor="parent")
    rid = s.record_run(small_run(0))
    s.add_note(run_id=rid, author="parent", text="baseline")
    return s.path


def wait_for(path: Path, p: subprocess.Popen[str], timeout: float = 30) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if p.poll() is not None:
            raise AssertionError(f"child exited early: {p.communicate()[1][-2000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"child never reached {path.name}")
        time.sleep(0.01)


@pytest.mark.parametrize("stage", [*RUN_STAGES, "commit"])
def test_a_writer_killed_inside_record_run_leaves_the_db_as_before(
    db: Path, tmp_path: Path, stage: str
) -> None:
    """SIGKILL while the child sits inside the transaction: after each stage of the write (the
    model, the incident, the run row, each bulk table), and at COMMIT with every row written.
    Nothing of its run survives; the file opens, verifies, writes."""
    before = snapshot(db)
    sig = tmp_path / f"in-{stage}"
    p = spawn(
        "write",
        str(db),
        "1",
        "20000",
        "200000",
        "killed",
        str(tmp_path / "never"),
        env={"HOLD_AT": f"{stage}:60", "HOLD_SIGNAL": str(sig)},
    )
    try:
        wait_for(sig, p)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    assert snapshot(db) == before
    res = Store.reader(db).verify()
    assert res.ok, res.message
    s = Store(db)  # the writer lock is free again and the file takes a new run
    s.record_run(small_run(1))
    assert s.verify().ok and len(s.list_runs()) == 2


def test_a_writer_killed_at_random_times_leaves_all_or_nothing(db: Path, tmp_path: Path) -> None:
    """No hook: kill at a random moment of a ~1 s write (inside the transaction, in COMMIT or in
    the checkpoint after it). Each time the run is there whole or not at all."""
    rng = random.Random(5)
    for attempt in range(3):
        done = tmp_path / f"done-{attempt}"
        p = spawn("write", str(db), "1", "20000", "300000", f"rand{attempt}", str(done))
        # the child takes ~0.4 s to start and ~1 s to write: kill early, mid-way and late
        time.sleep(0.6 + 0.6 * attempt + rng.uniform(0, 0.5))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        s = Store.reader(db)
        res = s.verify()
        assert res.ok, res.message
        for r in s.list_runs():
            n_nodes = r["summary"].get("n_nodes")
            if n_nodes is not None:  # one of the killed child's runs: whole
                got = s.get_run(r["run_id"], frames=True)
                assert len(got["nodes"]) == n_nodes and len(got["edges"]) == 300000
                assert len(got["variants"]) == len(got["variant_results"]) == 4


def test_a_reader_beside_a_writer_never_sees_half_a_run(db: Path, tmp_path: Path) -> None:
    n = 8
    done = tmp_path / "writer-done"
    reader = spawn("read", str(db), str(done))
    time.sleep(0.3)
    writer = spawn("write", str(db), str(n), "2000", "30000", "w", str(done))
    finish(writer)
    stats = json.loads(finish(reader))
    assert stats["half_runs"] == []
    # the reader got in between the writes, not only before and after them (a waiting reader
    # makes the writer yield; without that it saw 2-3 of the 9 states)
    assert len(set(stats["seen"])) >= n // 2, stats["seen"]
    s = Store.reader(db)
    runs = s.list_runs()
    assert len(runs) == n + 1
    assert len(s.notes_for(author="w")) == n
    res = s.verify()
    assert res.ok, res.message


def test_two_writers_at_once_both_get_through(db: Path, tmp_path: Path) -> None:
    n = 6
    writers = [
        spawn("write", str(db), str(n), "2000", "20000", tag, str(tmp_path / f"done-{tag}"))
        for tag in ("a", "b")
    ]
    for w in writers:
        finish(w)
    s = Store.reader(db)
    assert len(s.list_runs()) == 2 * n + 1
    for tag in ("a", "b"):
        assert len(s.notes_for(author=tag)) == n
        assert {r["incident_id"] for r in s.list_runs()} >= {f"{tag}-{i}" for i in range(n)}
    assert s.counts()["nodes"] == 1 + 2 * sum(2000 + 7 * i for i in range(n))
    res = s.verify()
    assert res.ok, res.message


def test_twenty_writers_killed_at_random_points(db: Path, tmp_path: Path) -> None:
    """20 SIGKILLs, each at a uniformly random moment of a writer's life (start-up,
    inside a transaction, in COMMIT, in the checkpoint, between runs, in a note). After each
    the file opens, verifies, and every run in it is whole; the next writer gets through."""
    # how long a writer that is not killed lives: the kills are drawn over that span. The
    # shorter of two lives, since the first writer also pays for cold caches
    lives = []
    for tag in ("timing-a", "timing-b"):
        t0 = time.monotonic()
        finish(spawn("write", str(db), "3", "5000", "60000", tag, str(tmp_path / tag)), timeout=120)
        lives.append(time.monotonic() - t0)
    life = min(lives)
    rng = random.Random(9)
    killed_inside = 0
    for attempt in range(20):
        before = {r["run_id"] for r in Store.reader(db).list_runs()}
        p = spawn("write", str(db), "3", "5000", "60000", f"k{attempt}", str(tmp_path / "never"))
        time.sleep(rng.uniform(0.0, life))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        s = Store.reader(db)
        res = s.verify()
        assert res.ok, (attempt, res.message)
        runs = s.list_runs()
        for r in runs:
            n_nodes = r["summary"].get("n_nodes")
            if n_nodes is not None and r["run_id"] not in before:
                got = s.get_run(r["run_id"], frames=True)
                assert len(got["nodes"]) == n_nodes, (attempt, r["run_id"])
                assert len(got["edges"]) == r["summary"]["n_edges"], (attempt, r["run_id"])
        killed_inside += len(runs) - len(before) < 3
    # most kills landed before the writer finished (the draw covers its whole life)
    assert killed_inside >= 15
    # the file still takes writes, and the command-line verifier agrees
    Store(db).record_run(small_run(99))
    r = subprocess.run(
        [sys.executable, "-m", "rca", "verify", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_an_investigation_killed_at_random_points_leaves_the_db_whole(
    db: Path, tmp_path: Path
) -> None:
    """The real pipeline (`rca investigate`, model load to record), killed at random moments:
    either its run is there whole or nothing of it is."""
    from tests.helpers import save_model_dir, tiny_model

    model = save_model_dir(tmp_path / "m", tiny_model("gpt2", seed=3))
    cmd = [
        sys.executable, "-m", "rca", "investigate", "--model", str(model),
        "--prompt", "w1 w2 w3 w4 w5 w6", "--bad", " w9", "--good", " w10",
        "--counterfactual", "w1 w2 w30 w4 w5 w6", "--reference", "w7 w8 w9 w10",
        "--db", str(db), "--json",
    ]  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    life = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    whole = Store.reader(db).get_run(json.loads(r.stdout)["run_id"], frames=True)
    rng = random.Random(3)
    for _ in range(3):
        before = snapshot(db)
        ids_before = {x["run_id"] for x in Store.reader(db).list_runs()}
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3 * life, 1.0 * life))
        p.kill()
        p.wait(timeout=10)
        s = Store.reader(db)
        assert s.verify().ok
        new = [x for x in s.list_runs() if x["run_id"] not in ids_before]
        if not new:
            assert snapshot(db) == before
        for x in new:  # the same incident on the same model: the same rows
            got = s.get_run(x["run_id"], frames=True)
            assert len(got["nodes"]) == len(whole["nodes"])
            assert len(got["edges"]) == len(whole["edges"])
