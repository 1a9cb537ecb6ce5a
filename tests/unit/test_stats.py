from __future__ import annotations

import random

import pytest

from rca.stats import ranks, spearman


def test_ranks_average_ties() -> None:
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]


def test_spearman_known_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # the textbook example: d^2 sums to 2 over 5 items -> 1 - 6*2/(5*24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [2, 1, 3, 4, 5]) == pytest.approx(0.9)


def test_spearman_is_invariant_to_monotone_maps() -> None:
    rng = random.Random(0)
    x = [rng.random() for _ in range(50)]
    y = [v + 0.3 * rng.random() for v in x]
    assert spearman(x, y) == pytest.approx(spearman([v**3 for v in x], [2 * v - 7 for v in y]))
