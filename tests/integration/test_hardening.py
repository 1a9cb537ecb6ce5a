"""Hardening behaviour the rest of the suite does not reach.

Pickle weights are refused on the command line, and loaded with ``--allow-pickle`` by every
command that loads a model (with a one-line warning); a second writer really meets the first
one's lock; ``--max-memory`` chunks and refuses through the CLI; ``regress --from-db`` rebuilds
incidents that have no stored TOML, and names one it cannot rebuild in one line; a relative
model path resolves against the case file, never the working directory, also after a trip
through the store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rca import store as store_mod
from rca.cli import app
from rca.ingest.case_file import load_case
from rca.ingest.incident import incident_from_flags
from rca.regress import RegressError
from rca.store import IncidentRecord, ModelRecord, RunRecord, Store
from tests.helpers import assert_one_line_error as one_line_error
from tests.helpers import rca_cli as rca
from tests.helpers import save_model_dir, tiny_model, words

runner = CliRunner()
N_CTX = 32
PROMPT = words(1, 2, 3, 4, 5, 6, 7, 8)
CF = words(1, 2, 3, 40, 5, 6, 7, 8)
RCA_DIR = str(Path(store_mod.__file__).parents[1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gaps") / "m"
    return save_model_dir(d, tiny_model("gpt2", seed=3, n_positions=N_CTX))


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory whose only weights are pickle (pytorch_model.bin)."""
    model = tiny_model("gpt2", seed=4)
    d = save_model_dir(tmp_path_factory.mktemp("pickle") / "m", model)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def flags(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--prompt", PROMPT, "--bad", " w9", "--good", " w10"]


# ---------------------------------------------------------------------------- model files


def test_pickle_is_refused_on_the_command_line_in_one_line(pickle_dir: Path) -> None:
    code, _, err = rca("inspect", str(pickle_dir), "--json")
    one_line_error(code, err, "pytorch_model.bin", "pickle", "--allow-pickle")


def test_allow_pickle_loads_pickle_weights_from_the_command_line_with_a_warning(
    pickle_dir: Path,
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, ["inspect", str(pickle_dir), "--json", "--allow-pickle"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["architecture"] == "gpt2"
    warned = [str(w.message) for w in caught] + r.stderr.splitlines()
    assert any("pickle" in w for w in warned), warned


@pytest.mark.parametrize(
    "command", ["inspect", "trace", "confirm", "investigate", "regress", "demo", "apply-patch"]
)
def test_every_command_that_loads_a_model_takes_allow_pickle(command: str) -> None:
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "--allow-pickle" in r.stdout


def test_the_allow_pickle_warning_is_one_line_on_stderr(pickle_dir: Path) -> None:
    r = runner.invoke(app, ["inspect", str(pickle_dir), "--json", "--allow-pickle"])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("warning: loading pickle weights from"), r.stderr
    assert ".py:" not in r.stderr and "UserWarning" not in r.stderr, r.stderr


def test_allow_pickle_traces_a_pickle_model_stated_with_flags(
    pickle_dir: Path, tmp_path: Path
) -> None:
    args = ["trace", *flags(pickle_dir), "--counterfactual", CF, "--method", "atp", "--json"]
    args += ["--graph", str(tmp_path / "g.json"), "--device", "cpu"]
    one_line_error(*rca(*args)[::2], "pickle", "--allow-pickle")
    code, out, err = rca(*args, "--allow-pickle")
    assert code == 0, err
    assert json.loads(out)["components"]
    assert any(x.startswith("warning:") and "pickle" in x for x in err.splitlines()), err


class _Loaded(Exception):
    """Raised by a spy once the model is loaded: the rest of the run is not under test."""


def _spy(calls: list[dict], *, stop: bool = True):
    def load_subject(path: object, **kw: object) -> object:
        calls.append({"path": str(path), **kw})
        if stop:
            raise _Loaded
        return types.SimpleNamespace(fingerprint=f"fp-{len(calls)}", device="cpu")

    return load_subject


def _stop(*args: object, **kwargs: object) -> None:
    raise _Loaded


def test_allow_pickle_reaches_every_load_in_the_library(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``InvestigateConfig.allow_pickle`` reaches investigate()'s own load, each of regress()'s
    (the new model, the baseline, an incident's own model) and a Ray worker's."""
    from rca import investigate as inv_mod
    from rca import regress as reg_mod
    from rca.investigate import InvestigateConfig, investigate
    from rca.regress import Mechanism, RegressConfig, regress

    inc = incident_from_flags(model=str(model_dir), prompt=PROMPT, bad=" w9")
    for allow in (False, True):
        cfg = InvestigateConfig(device="cpu", allow_pickle=allow)
        calls: list[dict] = []
        monkeypatch.setattr(inv_mod, "load_subject", _spy(calls))
        with pytest.raises(_Loaded):
            investigate(inc, config=cfg)
        assert [c["allow_pickle"] for c in calls] == [allow]

        rcfg = RegressConfig(investigate=replace(cfg, remedy=False))
        store = types.SimpleNamespace(list_runs=lambda **kw: [])
        calls = []
        monkeypatch.setattr(reg_mod, "load_subject", _spy(calls, stop=False))
        monkeypatch.setattr(reg_mod, "investigate", _stop)
        with pytest.raises(_Loaded):  # new model, then the incident's own (no reference run)
            regress(model_dir, [inc], store, config=rcfg)
        with pytest.raises(_Loaded):  # new model, then the baseline
            regress(model_dir, [inc], store, baseline_model=model_dir, config=rcfg)
        assert [c["allow_pickle"] for c in calls] == [allow] * 4

        calls = []
        monkeypatch.setattr(reg_mod, "load_subject", _spy(calls, stop=False))
        monkeypatch.setattr(reg_mod, "regress_case", _stop)
        payload = {
            "incident": inc,
            "reference": Mechanism(None, "fp", "confirmed", (), {}),
            "was_fixed": False,
            "p_bad_reference": None,
            "config": rcfg,
            "model": str(model_dir),
            "baseline": str(model_dir),
            "threads": torch.get_num_threads(),
        }
        with pytest.raises(_Loaded):
            reg_mod.remote_case(payload)
        assert [c["allow_pickle"] for c in calls] == [allow] * 2


# ---------------------------------------------------------------------------- memory


def test_max_memory_on_the_command_line_chunks_and_keeps_the_scores(
    model_dir: Path, tmp_path: Path
) -> None:
    def run(budget: str) -> dict:
        code, out, err = rca(
            "trace", *flags(model_dir), "--counterfactual", CF, "--max-memory", budget,
            "--json", "--graph", str(tmp_path / f"{budget}.json"),
        )  # fmt: skip
        assert code == 0, err
        return json.loads(out)

    free = run("off")
    full = free["cost"]["memory"]["full"]
    assert free["cost"]["memory"]["estimate"] == full  # nothing chunked without a budget
    tight = run(str(full - 1))
    mem = tight["cost"]["memory"]
    assert mem["budget"] == full - 1 and mem["estimate"] <= full - 1 < mem["full"]
    chunks = ("step_chunk", "head_chunk", "ig_batch", "confirm_batch")
    was = free["cost"]["memory"]
    assert all(mem[c] <= was[c] for c in chunks) and any(mem[c] < was[c] for c in chunks)
    a = {c["id"]: c["score"] for c in free["components"]}
    b = {c["id"]: c["score"] for c in tight["components"]}
    assert a.keys() == b.keys()
    scale = max(abs(v) for v in a.values()) or 1.0
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5 * scale


def test_an_investigation_refused_for_memory_records_nothing(
    model_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "rca.duckdb"
    code, _, err = rca("investigate", *flags(model_dir), "--max-memory", "1M", "--db", str(db))
    one_line_error(code, err, "needs about", "1.0 MiB", "--max-memory")
    if db.exists():
        s = Store.reader(db)
        assert s.counts()["runs"] == 0
        assert s.verify().ok


# ---------------------------------------------------------------------------- two writers

WRITER = f"""
import json, sys, types
pkg = types.ModuleType("rca"); pkg.__path__ = [{RCA_DIR!r}]; sys.modules["rca"] = pkg
import duckdb
from rca import store as st
from rca.store.connection import is_lock_error

conflicts = 0
_connect = duckdb.connect

def counting(*a, **k):  # count the times this writer found the file locked
    global conflicts
    try:
        return _connect(*a, **k)
    except duckdb.Error as e:
        conflicts += is_lock_error(e)
        raise

duckdb.connect = counting
db, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if len(sys.argv) > 4:  # hold 10 s with every row written, before COMMIT, after touching argv[4]
    import os, time
    last, write = list(st.RUN_STAGES.items())[-1]

    def then_hold(*args, **kwargs):
        write(*args, **kwargs)
        open(sys.argv[4], "w").write(str(os.getpid()))
        time.sleep(10)

    st.RUN_STAGES[last] = then_hold
s = st.Store(db, actor=tag)
rid = s.record_run(st.RunRecord(
    incident=st.IncidentRecord.from_fields({{"id": tag, "title": "t"}}),
    model=st.ModelRecord("b" * 64),
    nodes=[{{"node_id": f"L0.N{{i}}", "score": float(i)}} for i in range(n)],
))
print(json.dumps({{"run_id": rid, "conflicts": conflicts}}))
"""


def test_a_second_writer_waits_for_the_first_and_both_runs_are_kept(tmp_path: Path) -> None:
    """The first writer holds the lock inside its transaction (paused before COMMIT); a second
    writer started then meets the lock, retries, and writes after the first committed."""
    db = tmp_path / "rca.duckdb"
    Store(db)  # the schema exists before either writer starts
    sig = tmp_path / "first-inside"
    first = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), "first", "3000", str(sig)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not sig.exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.01)
        second = subprocess.run(
            [sys.executable, "-c", WRITER, str(db), "second", "2000"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = json.loads(out), json.loads(second.stdout)
    assert b["conflicts"] >= 1  # the second writer met the first one's lock and retried
    s = Store.reader(db)
    assert len(s.get_run(a["run_id"])["nodes"]) == 3000
    assert len(s.get_run(b["run_id"])["nodes"]) == 2000
    seq = {
        row["entity"]: row["seq"]
        for row in s.query(
            "SELECT entity, max(seq) AS seq FROM audit WHERE table_name = 'runs' GROUP BY entity"
        ).to_dict("records")
    }
    assert seq[a["run_id"]] < seq[b["run_id"]]  # written after the first committed
    res = s.verify()
    assert res.ok, res.message


def test_a_writer_that_waits_too_long_gives_up_in_one_line(tmp_path: Path) -> None:
    """The writer waits ``max_wait_s`` (30 s by default) for the lock, then says so in one
    line; the holder here is a read-only connection of this process (DuckDB's other mode)."""
    import duckdb

    db = tmp_path / "rca.duckdb"
    assert Store(db).max_wait_s == 30.0
    store = Store(db, max_wait_s=0.3)
    run = RunRecord(incident=IncidentRecord.from_fields({"id": "x"}), model=ModelRecord("c" * 64))
    t0 = time.monotonic()
    with duckdb.connect(str(db), read_only=True), pytest.raises(store_mod.StoreError) as ei:
        store.record_run(run)
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"database {db} is locked by another process"), msg
    assert msg.endswith("s); retry when it finishes"), msg
    assert store.record_run(run) and Store.reader(db).verify().ok  # free again: it writes


# ---------------------------------------------------------------------------- stored cases


def test_regress_from_db_with_an_ad_hoc_incident_is_not_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "rca.duckdb"
    inc = incident_from_flags(model=str(tmp_path / "m"), prompt=PROMPT, bad=" w9")
    Store(db).record_run(
        RunRecord(incident=IncidentRecord.from_incident(inc), model=ModelRecord("a" * 64))
    )
    r = runner.invoke(
        app, ["regress", "--from-db", "--model", str(tmp_path / "new"), "--db", str(db)]
    )
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    one_line_error(r.exit_code, r.stderr, "does not exist")  # the missing new model


# ---------------------------------------------------------------------------- paths

CASE = """\
id = "c"
title = "t"
severity = "low"
model = "m"
prompt = "w1 w2"
bad = " w3"
"""


@pytest.fixture
def two_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """proj/cases/{c.toml, m/} and other/cases/m/: the same relative layout twice; cwd proj."""
    for root in ("proj", "other"):
        (tmp_path / root / "cases" / "m").mkdir(parents=True)
        (tmp_path / root / "cases" / "m" / "config.json").write_text("{}")
    (tmp_path / "proj" / "cases" / "c.toml").write_text(CASE)
    monkeypatch.chdir(tmp_path / "proj")
    return tmp_path / "proj", tmp_path / "other"


def test_a_case_loaded_by_a_relative_path_keeps_its_model_when_the_cwd_changes(
    two_trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    proj, other = two_trees
    inc = load_case("cases/c.toml")
    assert inc.model_path().resolve() == (proj / "cases" / "m").resolve()
    monkeypatch.chdir(other)
    assert inc.model_path().resolve() == (proj / "cases" / "m").resolve()


def test_a_stored_case_resolves_its_model_against_its_case_file_not_the_cwd(
    two_trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rca.regress import incidents_from_store

    proj, other = two_trees
    db = proj / "rca.duckdb"
    inc = load_case("cases/c.toml")
    Store(db).record_run(
        RunRecord(incident=IncidentRecord.from_incident(inc), model=ModelRecord("a" * 64))
    )
    monkeypatch.chdir(other)
    (stored,) = incidents_from_store(Store(db))
    assert stored.model_path().resolve() == (proj / "cases" / "m").resolve()


def test_regress_from_db_names_a_stored_incident_it_cannot_rebuild(tmp_path: Path) -> None:
    db = tmp_path / "rca.duckdb"
    rec = IncidentRecord.from_fields({"id": "half-a-case", "title": "t"})  # no severity, ...
    Store(db).record_run(RunRecord(incident=rec, model=ModelRecord("a" * 64)))
    r = runner.invoke(
        app, ["regress", "--from-db", "--model", str(tmp_path / "new"), "--db", str(db)]
    )
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    one_line_error(r.exit_code, r.stderr, "'half-a-case'", "severity", "is missing")


def test_a_stored_ad_hoc_incident_is_rebuilt_from_its_fields(tmp_path: Path) -> None:
    """No TOML: the fields rebuild the same incident (same hash); the latest version of an id
    is the one rebuilt, once."""
    from rca.regress import incidents_from_store

    db = tmp_path / "rca.duckdb"
    store = Store(db)
    common = dict(model=str(tmp_path / "m"), prompt=PROMPT, id="adhoc-1")
    old = incident_from_flags(**common, bad=" w9", counterfactual=CF, reference_prompts=["w1"])
    new = incident_from_flags(**common, bad=" w8", good=" w9")
    for inc in (old, new):
        store.record_run(
            RunRecord(incident=IncidentRecord.from_incident(inc), model=ModelRecord("a" * 64))
        )
    (got,) = incidents_from_store(store)
    assert got == new and got.sha256 == new.sha256


def test_a_stored_relative_model_without_its_case_file_is_refused_not_resolved_in_the_cwd(
    two_trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative model with nothing to resolve it against (stated with flags, or recorded by an
    older rca with a relative source path) is a one-line error, not a guess from the cwd."""
    from rca import regress as reg_mod
    from rca.ingest.incident import IncidentError
    from rca.regress import RegressConfig, incidents_from_store, regress

    proj, other = two_trees
    db = proj / "rca.duckdb"
    store = Store(db)
    ad_hoc = incident_from_flags(model="cases/m", prompt=PROMPT, bad=" w9", id="ad-hoc")
    case = load_case("cases/c.toml")
    legacy = IncidentRecord(case.id, case.sha256, case.to_dict(), "cases/c.toml", CASE)
    for rec in (IncidentRecord.from_incident(ad_hoc), legacy):
        store.record_run(RunRecord(incident=rec, model=ModelRecord("a" * 64)))
    monkeypatch.chdir(other)  # holds cases/m too: the cwd must not decide
    stored = {i.id: i for i in incidents_from_store(Store(db))}
    assert stored["ad-hoc"] == ad_hoc and stored["c"] == case
    for inc in stored.values():
        with pytest.raises(IncidentError) as ei:
            inc.model_path()
        msg = str(ei.value)
        assert "\n" not in msg and "relative path" in msg and ei.value.key == "model", msg
    monkeypatch.setattr(reg_mod, "load_subject", _spy([], stop=False))
    no_runs = types.SimpleNamespace(list_runs=lambda **kw: [])
    with pytest.raises(RegressError) as er:  # regress needs the own model: one line, a hint
        regress(proj / "cases" / "m", [stored["c"]], no_runs, config=RegressConfig())
    assert "--baseline-model" in str(er.value) and "\n" not in str(er.value)
