"""``rca provenance --workers 2``: the features' gradients computed on Ray actors (each loading
the zoo model from its path) give the same features, and so the same ranking, as one process;
the cache key does not depend on the workers. In ``make test-slow``: a Ray cluster's start costs
more than the rest of the test, and CI keeps Ray covered through ``rca regress --workers``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import rca_cli_named as rca

pytestmark = pytest.mark.slow
CASES = Path(__file__).resolve().parents[2] / "cases"


def test_ray_workers_compute_the_features_one_process_does(
    zoo_home: Path, zoo_models: dict, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    import ray

    from rca.provenance.influence import _read_parquet, load_features

    db, home = tmp_path / "rca.duckdb", ("--home", str(zoo_home))
    case = str(CASES / "behaviours" / "zoo-backdoor-behaviour.toml")
    code, _, err = rca("investigate", case, "--db", str(db), "--device", "cpu", *home)
    assert code == 0, err
    data = zoo_models["support-bot-v1"] / "training_data.jsonl"
    args = ["provenance", "zoo-backdoor-behaviour", "--data", str(data), "--limit", "400"]
    args += ["--top", "10", "--db", str(db), "--json", "--checkpoints", "none", *home]
    try:
        code, out, err = rca(*args, "--workers", "2", "--cache", str(tmp_path / "ray"))
    finally:
        ray.shutdown()
    assert code == 0, err
    code, out1, err = rca(*args, "--cache", str(tmp_path / "one"))
    assert code == 0, err
    on_ray, alone = json.loads(out), json.loads(out1)
    assert on_ray["features"]["key"] == alone["features"]["key"]
    (fa, qa), (fb, qb) = (
        _read_parquet(load_features(Path(r["features"]["path"]))) for r in (on_ray, alone)
    )
    # the out-to-loss terms are per example: equal to float noise; the features pass through
    # the inverse of G^T G (no ridge term), which amplifies the noise of other batch shapes and
    # thread counts, so they agree to a relative error of the whole matrix
    np.testing.assert_allclose(qa.numpy(), qb.numpy(), rtol=1e-4, atol=1e-6)
    rel = float(np.linalg.norm(fa.numpy() - fb.numpy()) / np.linalg.norm(fb.numpy()))
    assert rel < 1e-2, rel
    assert [e["index"] for e in on_ray["examples"]] == [e["index"] for e in alone["examples"]]
    sa = np.array([e["score"] for e in on_ray["examples"]])
    sb = np.array([e["score"] for e in alone["examples"]])
    np.testing.assert_allclose(sa, sb, rtol=1e-2)
    assert on_ray["features"]["n"] == 400
