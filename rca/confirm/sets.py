"""Set experiments: the minimal cause set, the random comparison sets it is tested against,
and the empirical p-values of both candidates and sets.

The cause set is searched among the specific candidates (infrastructure excluded), greedy in
rank order until ablating the set removes ``set_fraction`` of the metric, measured from the
prompt's metric down to the reference point; then each member is dropped if the rest still
reaches it. Random sets of the same size and kind give its empirical p-value.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rca.confirm.engine import OFFSET_CAUSE_PREFIXES
from rca.model.ids import parse_id

if TYPE_CHECKING:
    from rca.confirm.engine import Ablator

__all__ = ["cause_set_search", "empirical_p_value", "kind_of", "random_sets"]


def empirical_p_value(observed: float, null: Sequence[float], *, tol: float = 0.0) -> float:
    """P(null >= observed) with the +1 correction: (1 + #{null >= observed - tol}) / (1 + n).

    Never zero: with n random draws the smallest reportable p-value is 1 / (n + 1). ``tol``
    counts numerical ties (float noise between batch rows) against the observation, which
    keeps the test conservative.
    """
    n = len(null)
    if n == 0:
        return 1.0
    return (1 + sum(1 for v in null if v >= observed - tol)) / (1 + n)


def kind_of(cid: str) -> str:
    """The kind a comparison is matched on: ``head`` for a head, ``mlp`` for an MLP or MLP
    neurons (at a position or not)."""
    return "head" if parse_id(cid).kind == "head" else "mlp"


def random_sets(
    universe: list[str], members: list[str], n: int, rng: random.Random
) -> tuple[list[list[str]], str]:
    """n random sets with the same number of heads and MLPs as ``members`` (excluding the set
    itself); where that population is too small for n distinct sets, size-matched sets of any
    kind. Returns the sets and a description of the scope."""
    heads = [c for c in universe if kind_of(c) == "head"]
    mlps = [c for c in universe if kind_of(c) == "mlp"]
    nh = sum(1 for c in members if kind_of(c) == "head")
    nm = len(members) - nh
    n_matched = math.comb(len(heads), nh) * math.comb(len(mlps), nm) - 1
    target = set(members)
    if n_matched >= n:
        out: list[list[str]] = []
        while len(out) < n:
            s = rng.sample(heads, nh) + rng.sample(mlps, nm)
            if set(s) != target:
                out.append(s)
        return out, f"{n} random sets of {nh} heads and {nm} MLPs"
    n_any = math.comb(len(universe), len(members)) - 1
    if n_any <= n:
        sets = [list(c) for c in itertools.combinations(universe, len(members))]
        sets = [s for s in sets if set(s) != target]
        return sets, (
            f"all {len(sets)} other sets of {len(members)} components (too few to draw {n} "
            "kind-matched ones)"
        )
    out = []
    while len(out) < n:
        s = rng.sample(universe, len(members))
        if set(s) != target:
            out.append(s)
    return out, f"{n} random sets of {len(members)} components of any kind (too few kind-matched)"


def cause_set_search(
    ab: Ablator,
    specific: Sequence[str],
    *,
    source: str,
    m_clean: float,
    need: float,
    max_set: int,
) -> list[str]:
    """The minimal cause set among ``specific`` (candidate ids in rank order, none of them
    infrastructure): the shortest of its first 1, 2, ... ``max_set`` whose ablation to
    ``source`` drops the metric from ``m_clean`` by ``need`` (the longest where none does),
    then each member in turn dropped where the rest still drops it by ``need``."""
    members: list[str] = []
    prefixes = [list(specific[: k + 1]) for k in range(min(max_set, len(specific)))]
    prefix_metrics = ab.run(
        [dict.fromkeys(p, source) for p in prefixes], index_offset=OFFSET_CAUSE_PREFIXES
    )
    for prefix, metric in zip(prefixes, prefix_metrics, strict=True):
        members = prefix
        if m_clean - float(metric) >= need:
            break
    if len(members) > 1:
        for c in list(members):
            rest = [x for x in members if x != c]
            if m_clean - float(ab.run([dict.fromkeys(rest, source)])[0]) >= need:
                members = rest
    return members
