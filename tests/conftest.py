"""Shared fixtures. Tests never touch the network: the hub is off before transformers loads.

``make test`` runs the suite in two processes (pytest-xdist, a file per worker). The session
fixtures that cost minutes (the quick zoo, the demo) are built once for the whole run, under a
file lock in the workers' common temp directory, and each worker reads them from there.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per worker: two workers on two cores, not four threads fighting
    torch.set_num_threads(1)


def _shared(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory every worker of this run sees (the parent of a worker's temp root)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (the other workers wait for it), as ``zoo.build``
    does for the zoo."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; runs on the GPU machine (`make test-gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RCA_HOME holding the quick demo zoo, built once per session (about a minute on 2 cores).

    Set RCA_TEST_HOME to reuse a build across sessions; `build` skips models whose manifest
    matches the current corpus and code version.
    """
    from rca import zoo

    home = Path(os.environ.get("RCA_TEST_HOME") or _shared(tmp_path_factory, "rca_home"))
    zoo.build(home=home, quick=True)  # it locks the zoo: one worker builds, the others wait
    return home


@pytest.fixture(scope="session")
def zoo_models(zoo_home: Path) -> dict[str, Path]:
    from rca import zoo

    return {name: zoo.model_dir(name, home=zoo_home) for name in zoo.ZOO_MODELS}


@pytest.fixture(scope="session")
def demo_output(zoo_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``rca demo --quick --json`` run once per session (about two minutes on 2 cores): the
    database, the reports folder and the printed JSON. Consumers copy the database before they
    write to it (``copy_demo_db``), so each sees the demo's runs and only its own changes."""
    import json

    from typer.testing import CliRunner

    from rca.cli import app

    tmp = _shared(tmp_path_factory, "demo")
    db, reports, out = tmp / "rca.duckdb", tmp / "reports", tmp / "demo.json"
    with _locked(tmp / ".lock"):  # the first worker runs the demo, the others read its output
        if not out.exists():
            cases = Path(__file__).resolve().parents[1] / "cases"
            r = CliRunner().invoke(
                app,
                ["demo", "--quick", "--home", str(zoo_home), "--db", str(db), "--reports",
                 str(reports), "--device", "cpu", "--cases", str(cases), "--json"],
            )  # fmt: skip
            assert r.exit_code == 0, r.stderr
            out.write_text(r.stdout)
    return {"db": db, "reports": reports, "json": json.loads(out.read_text())}


def copy_demo_db(demo_output: dict, dest: Path) -> Path:
    """A private copy of the demo's database at ``dest``."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo_output["db"], dest)
    return dest
