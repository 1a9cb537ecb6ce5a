"""The checkpoint ensemble's parts (``rca.provenance.ensemble``): which checkpoints a model has,
in training order, and how the rules combine their scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rca.provenance.ensemble import (
    combine,
    find_checkpoints,
    learning_weights,
    resolve_rule,
    tracin_weights,
    training_schedule,
)
from rca.provenance.influence import InfluenceError


def _dirs(root: Path, *names: str) -> None:
    for n in names:
        (root / n).mkdir(parents=True)


def test_numbered_checkpoints_are_in_step_order_not_name_order(tmp_path: Path) -> None:
    # Hugging Face's Trainer: checkpoint-N; by name, checkpoint-1000 would come before -500
    _dirs(tmp_path, "checkpoint-500", "checkpoint-1000", "checkpoint-1500", "logs")
    got = find_checkpoints(tmp_path, "auto")
    assert [c.step for c in got] == [500, 1000, 1500]
    assert [c.label() for c in got] == ["step 500", "step 1000", "step 1500"]
    assert find_checkpoints(tmp_path, "none") == []
    assert find_checkpoints(tmp_path / "nowhere", "auto") == []
    gguf = tmp_path / "model.gguf"  # a GGUF file's model has no checkpoints: its weights alone
    gguf.write_bytes(b"GGUF")
    assert find_checkpoints(gguf, "auto") == []
    assert find_checkpoints(None, "auto") == []  # an in-memory model's run


def test_a_zoo_manifest_lists_them_and_a_missing_one_is_named(tmp_path: Path) -> None:
    _dirs(tmp_path, "checkpoints/step-00000", "checkpoints/step-00025")
    listed = [{"step": 0, "path": "checkpoints/step-00000"}]
    listed.append({"step": 25, "path": "checkpoints/step-00025"})
    (tmp_path / "zoo.json").write_text(json.dumps({"checkpoints": listed}))
    assert [c.step for c in find_checkpoints(tmp_path, "auto")] == [0, 25]
    listed.append({"step": 50, "path": "checkpoints/step-00050"})
    (tmp_path / "zoo.json").write_text(json.dumps({"checkpoints": listed}))
    with pytest.raises(InfluenceError, match="step-00050.*rebuild the zoo"):
        find_checkpoints(tmp_path, "auto")


def test_a_given_list_keeps_its_order_and_names_a_missing_directory(tmp_path: Path) -> None:
    _dirs(tmp_path, "late", "early")
    got = find_checkpoints(tmp_path, f"{tmp_path / 'early'},{tmp_path / 'late'}")
    assert [c.path.name for c in got] == ["early", "late"] and got[0].label() == "early"
    with pytest.raises(InfluenceError, match="--checkpoints: .*gone.* is not a model directory"):
        find_checkpoints(tmp_path, f"{tmp_path / 'early'},{tmp_path / 'gone'}")
    # numbered directories say their order: a list that goes back in training is refused
    _dirs(tmp_path, "step-100", "checkpoint-25")
    backwards = f"{tmp_path / 'step-100'},{tmp_path / 'early'},{tmp_path / 'checkpoint-25'}"
    with pytest.raises(InfluenceError, match=r"--checkpoints: .*\[100, 25\].*training order"):
        find_checkpoints(tmp_path, backwards)
    forwards = f"{tmp_path / 'checkpoint-25'},{tmp_path / 'early'},{tmp_path / 'step-100'}"
    assert [c.step for c in find_checkpoints(tmp_path, forwards)] == [25, None, 100]


def test_learning_weights_follow_the_rise_of_the_incident() -> None:
    # P(bad) at each checkpoint, the model itself last: it rises, falls back, rises again
    w = learning_weights([0.0, 0.1, 0.6, 0.3, 0.9, 0.95])
    rises = np.array([0.1, 0.5, 0.0, 0.6, 0.05, 0.0])
    assert np.allclose(w, rises / rises.sum())
    assert w[2] == 0 and w[-1] == 0  # a fall, and the final weights (no training after them)
    assert not learning_weights([0.9, 0.9, 0.8]).any()


def test_learning_ignores_a_checkpoints_scale_and_the_sum_does_not() -> None:
    """The curvature's scale grows late in training; the sum follows it, the learning rule
    takes each checkpoint's ranking at the weight of the rise after it."""
    rng = np.random.default_rng(0)
    early, late, final = (rng.normal(size=500) for _ in range(3))
    p_bad = [0.0, 0.9, 0.95]  # the incident was learned after the first checkpoint
    base_sum = combine([early, late, final], p_bad, "sum")
    base_learning = combine([early, late, final], p_bad, "learning")
    loud = [early, 30 * late, final]
    assert np.allclose(combine(loud, p_bad, "learning"), base_learning)
    assert not np.allclose(combine(loud, p_bad, "sum"), base_sum)
    # almost all the weight is on the first checkpoint: its ranking is the ensemble's
    top = np.argsort(-base_learning)[:50]
    assert len(set(top) & set(np.argsort(-early)[:50])) >= 45
    assert np.allclose(base_sum, early + late + final)


def test_learning_refuses_an_incident_that_never_rose() -> None:
    s = [np.ones(4), np.ones(4)]
    with pytest.raises(InfluenceError, match="never rose.*--ensemble sum"):
        combine(s, [0.9, 0.9], "learning")
    with pytest.raises(InfluenceError, match="--ensemble must be one of auto, sum, learning"):
        combine(s, [0.1, 0.9], "max")


def test_auto_is_tracin_over_checkpoints_and_the_final_weights_without() -> None:
    assert resolve_rule("auto", True) == "tracin"
    assert resolve_rule("auto", False) == "sum"  # over the model alone: its TRAK scores
    assert [resolve_rule(r, True) for r in ("sum", "learning", "tracin")] == [
        "sum",
        "learning",
        "tracin",
    ]
    with pytest.raises(InfluenceError, match="--ensemble must be one of"):
        resolve_rule("tracincp", True)


def test_tracin_weighs_each_checkpoint_by_the_training_that_followed_it(tmp_path: Path) -> None:
    from rca.zoo.train import QUICK, lr_at

    steps = [0, 25, 100, None]  # the model itself last, saved at its final step
    w, source = tracin_weights(steps, 500, lambda t: lr_at(t, QUICK))
    raw = [sum(lr_at(t, QUICK) for t in range(a, b)) for a, b in [(0, 25), (25, 100), (100, 500)]]
    assert source == "learning rate" and w[-1] == 0
    assert np.allclose(w[:-1], np.array(raw) / sum(raw))
    # the warmup: 25 steps from initialization weigh less than 25 at the peak learning rate
    assert w[0] < 25 / 75 * w[1]
    w, source = tracin_weights(steps, 500, None)  # no schedule: a constant learning rate
    assert source == "steps" and np.allclose(w, [25 / 500, 75 / 500, 400 / 500, 0])
    w, source = tracin_weights([None, None, None], None, None)  # no steps: the same weight
    assert source == "equal" and np.allclose(w, [0.5, 0.5, 0])
    with pytest.raises(InfluenceError, match="training order"):
        tracin_weights([100, 25, None], 500, None)
    scores = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([5.0, 5.0])]
    got = combine(scores, [0.1, 0.5, 0.9], "tracin", [0.25, 0.75, 0.0])
    assert np.allclose(got, [0.25, 0.75])


def test_the_schedule_is_read_from_a_zoo_manifest_or_a_trainer_state(tmp_path: Path) -> None:
    from rca.zoo.train import QUICK, lr_at

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    config = {"steps": 500, "lr": 0.004, "warmup": 100, "vocab_size": 172}
    (zoo / "zoo.json").write_text(json.dumps({"config": config}))
    final, lr = training_schedule(zoo)
    assert final == 500 and lr is not None
    assert [lr(t) for t in (0, 99, 300, 499)] == [lr_at(t, QUICK) for t in (0, 99, 300, 499)]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 1500}))
    assert training_schedule(hf) == (1500, None)
    assert training_schedule(tmp_path / "nowhere") == (None, None)
    bare = tmp_path / "bare"  # a manifest without its recipe: the Trainer's state, if any
    bare.mkdir()
    (bare / "zoo.json").write_text(json.dumps({"name": "x"}))
    assert training_schedule(bare) == (None, None)
