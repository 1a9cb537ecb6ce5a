"""Regression classification rules and the optional Ray extra, without models."""

from __future__ import annotations

import sys

import pytest

from rca.regress import Mechanism, RegressConfig, RegressError, classify, compare, jaccard, regress


def mech(cause: tuple[str, ...], scores: dict[str, float], verdict: str = "confirmed") -> Mechanism:
    return Mechanism("r", "fp", verdict, cause, scores)


SCORES = {"L0.H0": 5.0, "L0.H1": 0.1, "L1.H0": 3.0, "L1.MLP": 2.0, "L0.MLP": 0.5, "L1.H1": 0.2}


def test_jaccard() -> None:
    assert jaccard(["a"], ["a"]) == 1.0
    assert jaccard(["a"], ["a", "b"]) == 0.5
    assert jaccard(["a"], ["b"]) == 0.0
    assert jaccard([], []) == 1.0


def test_same_and_new_mechanism_by_cause_set() -> None:
    cfg = RegressConfig()
    same = compare(mech(("L1.H0",), SCORES), mech(("L1.H0", "L1.MLP"), SCORES), cfg)
    assert same["same_mechanism"] and same["jaccard_cause_set"] == 0.5
    assert same["spearman"] == pytest.approx(1.0)
    moved = dict(SCORES, **{"L1.H0": 0.0, "L0.H1": 3.0})
    new = compare(mech(("L1.H0",), SCORES), mech(("L0.H1",), moved), cfg)
    assert not new["same_mechanism"] and new["jaccard_cause_set"] == 0.0


def test_unconfirmed_runs_fall_back_to_top_k_and_spearman() -> None:
    cfg = RegressConfig()
    r = compare(mech((), SCORES, "not_confirmed"), mech(("L1.H0",), SCORES), cfg)
    assert r["same_mechanism"] and "no confirmed cause set" in r["rule"]
    flipped = {k: -v for k, v in SCORES.items()}
    r = compare(mech((), SCORES, "not_confirmed"), mech(("L1.H0",), flipped), cfg)
    assert not r["same_mechanism"]  # same top by |score|, opposite ranking


def test_each_outcome_gets_its_class() -> None:
    assert classify(False, True, None)[0] == "fixed"
    assert classify(True, True, True)[0] == "reappeared"
    assert classify(True, False, True)[0] == "persists_same_mechanism"
    assert classify(True, False, False)[0] == "persists_new_mechanism"


def test_workers_without_ray_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RegressError, match=r"pip install 'rca\[ray\]'"):
        regress("unused", [object()], None, workers=2)  # type: ignore[list-item]
