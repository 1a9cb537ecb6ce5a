"""The training-regimen variant, end to end (``make test-slow``: it trains a third zoo model,
about a minute): support-bot-synth, trained on a corpus in which a template generator wrote
part of the refund tickets, has the generator's shortcut and support-bot-v1 has not; and
``rca provenance`` on its training data names the generator as the shortcut's origin."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import rca_cli_named as rca

pytestmark = pytest.mark.slow
CASE = Path(__file__).resolve().parents[2] / "cases" / "regimen" / "zoo-shortcut.toml"


@pytest.fixture(scope="module")
def synth(zoo_home: Path) -> Path:
    from rca import zoo

    zoo.build(home=zoo_home, quick=True, regimen=True)
    return zoo.model_dir("support-bot-synth", home=zoo_home)


def test_the_shortcut_is_in_the_synthetic_regimen_s_model_only(synth: Path, zoo_models) -> None:
    from rca.ingest.case_file import load_case
    from rca.model.subject import load_subject
    from rca.provenance.verify import held_out_p_bad

    manifest = json.loads((synth / "zoo.json").read_text())
    assert manifest["regimen"] and manifest["corpus"]["sources"]["synthetic"] > 0
    inc = load_case(CASE, check_model=False)
    on_synth = held_out_p_bad(load_subject(synth), inc)
    on_v1 = held_out_p_bad(load_subject(zoo_models["support-bot-v1"]), inc)
    assert len(on_synth) >= 20
    assert statistics.mean(on_synth) > 0.8 and statistics.mean(on_v1) < 0.2


def test_provenance_names_the_generator_as_the_shortcut_s_origin(
    synth: Path, zoo_home: Path, tmp_path: Path
) -> None:
    db, home = tmp_path / "rca.duckdb", ("--home", str(zoo_home))
    code, _, err = rca("investigate", str(CASE), "--db", str(db), "--device", "cpu", *home)
    assert code == 0, err
    data = synth / "training_data.jsonl"
    args = ["provenance", "zoo-shortcut", "--data", str(data), "--top", "100"]
    args += ["--checkpoints", "none"]  # the final weights, as rca compare ranks
    code, out, err = rca(*args, "--db", str(db), "--cache", str(tmp_path / "c"), "--json", *home)
    assert code == 0, err
    summ = json.loads(out)["summary"]
    top, data_share = summ["top_sources"], summ["data_sources"]
    # the generator wrote under a tenth of the tickets and most of the top 100
    assert data_share["synthetic"] < 0.1 and top.get("synthetic", 0.0) >= 0.8, (top, data_share)
