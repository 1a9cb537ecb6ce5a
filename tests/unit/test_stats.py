from __future__ import annotations

import random

import pytest
import torch

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


@pytest.mark.parametrize(
    ("p", "df", "published"),
    [(0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 29, 2.045),
     (0.975, 120, 1.980), (0.95, 5, 2.015), (0.995, 8, 3.355)],
)  # fmt: skip
def test_t_quantile_matches_the_published_table(p: float, df: int, published: float) -> None:
    from rca.stats import t_quantile

    assert t_quantile(p, df) == pytest.approx(published, abs=1e-3)


def test_t_quantile_covers_95_percent_of_student_draws() -> None:
    """Of many draws from Student's t with 6 degrees of freedom, the share within
    +-t_quantile(0.975, 6) is 95%."""
    from rca.stats import t_quantile

    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(200_000, 6, generator=g, dtype=torch.float64) ** 2).sum(1)
    t = z / (chi2 / 6).sqrt()
    inside = float((t.abs() <= t_quantile(0.975, 6)).double().mean())
    assert inside == pytest.approx(0.95, abs=0.003)
