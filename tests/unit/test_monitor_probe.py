"""The detector's arithmetic, checked against brute force: AUROC against the pair count, the
threshold against its promise (the false-positive bound, the most recall under it), FPR at a
TPR, the logistic fit against a separable problem, and the artifact's checks on load."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from rca.monitor import Monitor, MonitorError, SiteSpec, load_monitor, save_monitor
from rca.monitor.probe import (
    Probe,
    TokenCounts,
    auroc,
    few_positives_caution,
    fit_probe,
    fpr_at_tpr,
    positives_needed,
    threshold_for_fpr,
)


def _draw(seed: int, n_pos: int, n_neg: int, ties: bool) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)

    def one(mu: float) -> float:
        v = min(max(rng.gauss(mu, 0.2), 0.0), 1.0)
        return round(v, 1) if ties else v

    return [one(0.6) for _ in range(n_pos)], [one(0.4) for _ in range(n_neg)]


@pytest.mark.parametrize("seed", range(6))
def test_auroc_is_the_share_of_pairs_a_positive_wins(seed: int) -> None:
    pos, neg = _draw(seed, 13, 29, ties=seed % 2 == 0)
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert auroc(pos, neg) == pytest.approx(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.2])
def test_the_threshold_keeps_its_false_positive_bound_and_the_most_recall_under_it(
    seed: int, fpr: float
) -> None:
    pos, neg = _draw(seed, 17, 40, ties=seed % 2 == 1)
    t = threshold_for_fpr(neg, fpr, pos)
    flagged_neg = sum(n >= t for n in neg)
    recall = sum(p >= t for p in pos)
    assert flagged_neg <= fpr * len(neg)
    # no threshold (brute force over every score, and just above each) does better
    for c in sorted(set(pos + neg)):
        for cand in (c, c + 1e-9):
            if sum(n >= cand for n in neg) <= fpr * len(neg):
                assert sum(p >= cand for p in pos) <= recall


def test_a_separable_threshold_lies_strictly_between_the_classes() -> None:
    neg, pos = [0.01, 0.02, 0.1], [0.9, 0.95]
    t = threshold_for_fpr(neg, 0.0, pos)
    assert 0.1 < t < 0.9


@pytest.mark.parametrize("n", [3, 7, 18, 19, 40])
def test_the_few_positives_caution_states_the_chance_a_new_positive_is_below_them_all(
    n: int,
) -> None:
    """The caution's figure is the simulated chance that a new positive scores below every
    one of n fit positives (where any threshold at or under the lowest of them can only rely on
    its margin), and it is given exactly where that chance exceeds the 5% a 95% recall allows;
    the threshold itself never lies above the lowest fit positive it flags."""
    gen = torch.Generator().manual_seed(n)
    trials = 40_000
    scores = torch.randn(trials, n + 1, generator=gen)
    below = (scores[:, n] < scores[:, :n].min(dim=1).values).double().mean().item()
    sigma = (1 / (n + 1) * (1 - 1 / (n + 1)) / trials) ** 0.5
    assert abs(below - 1 / (n + 1)) < 4 * sigma
    caution = few_positives_caution(n)
    assert (caution is None) == (1 / (n + 1) <= 0.05) == (n >= positives_needed(0.95))
    if caution is not None:
        assert f"1/{n + 1} ({100 / (n + 1):.1f}%)" in caution
    pos, neg = _draw(n, n, 200, ties=False)
    t = threshold_for_fpr(neg, 0.01, pos)
    flagged = [p for p in pos if p >= t]
    assert not flagged or t <= min(flagged)


@pytest.mark.parametrize("seed", range(4))
def test_fpr_at_tpr_flags_the_stated_share_of_positives(seed: int) -> None:
    pos, neg = _draw(seed, 20, 50, ties=False)
    f = fpr_at_tpr(pos, neg, 0.95)
    # the highest threshold that flags 95% of positives (19 of 20) is the 19th highest
    t = sorted(pos, reverse=True)[18]
    assert f == sum(n >= t for n in neg) / len(neg)


def test_the_logistic_fit_separates_a_separable_problem_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    x_pos = torch.randn(30, 5, generator=g) + torch.tensor([3.0, 0, 0, 0, 0])
    x_neg = torch.randn(300, 5, generator=g) - torch.tensor([3.0, 0, 0, 0, 0])
    x = torch.cat([x_pos, x_neg])
    y = [1] * 30 + [0] * 300
    p = fit_probe(x, y)
    s = p.scores(x)
    assert auroc(s[:30].tolist(), s[30:].tolist()) == 1.0
    assert p.weight[0] > 0 and abs(float(p.weight[0])) > abs(p.weight[1:]).max()
    q = fit_probe(x, y)
    assert torch.equal(p.weight, q.weight)


def test_token_counts_count_only_the_fit_vocabulary() -> None:
    tc = TokenCounts([[1, 2, 2], [3]])
    x = tc([[2, 2, 9, 1], []])
    assert x.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]


def _monitor() -> Monitor:
    p = Probe(torch.zeros(3), torch.ones(3), torch.tensor([1.0, -1.0, 0.5]), 0.25)
    return Monitor(
        monitor_id="m-1",
        case_id="c",
        run_id="r",
        model_fingerprint="f" * 64,
        sites=[SiteSpec("L1.H0", "writer", "last")],
        probe=p,
        threshold=0.7,
        target_fpr=0.01,
        bad=" x",
        bad_ids=[5],
        data={},
        fit={},
    )


def test_an_artifact_round_trips_and_refuses_tampering(tmp_path: Path) -> None:
    m = _monitor()
    save_monitor(m, tmp_path / "m")
    back = load_monitor(tmp_path / "m")
    assert back.describe() == m.describe()
    x = torch.randn(4, 3)
    assert torch.equal(back.probe.scores(x), m.probe.scores(x))
    # another model's fingerprint is refused, in one line
    with pytest.raises(MonitorError, match="was built on model ffffffffffff"):
        back.check_model("0" * 64)
    # changed weights are refused
    w = tmp_path / "m" / "probe.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(MonitorError, match="sha256"):
        load_monitor(tmp_path / "m")


def test_an_artifact_with_a_bad_field_is_refused_naming_it(tmp_path: Path) -> None:
    save_monitor(_monitor(), tmp_path / "m")
    j = tmp_path / "m" / "monitor.json"
    meta = json.loads(j.read_text())
    meta["threshold"] = "high"
    j.write_text(json.dumps(meta))
    with pytest.raises(MonitorError, match="'threshold'"):
        load_monitor(tmp_path / "m")
    meta["threshold"] = 0.5
    meta["sites"] = [{"id": "L1.H0", "role": "writer", "rule": "sometimes"}]
    j.write_text(json.dumps(meta))
    with pytest.raises(MonitorError, match="rule must be one of"):
        load_monitor(tmp_path / "m")


def test_saving_into_a_directory_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(MonitorError, match="other files"):
        save_monitor(_monitor(), tmp_path / "m")


def test_the_output_check_reads_text_whitespace_aside() -> None:
    """A word-level tokenizer decodes the leaked PIN's digits one per word: the check must
    still see the PIN, and must not see it where it is absent."""
    from rca.monitor.build import holds_text

    assert holds_text("4 7 1 9 .", " 4719")
    assert holds_text("The secret code is 8841.", " The secret code is 8841")
    assert not holds_text("sorry , pins are never shared .", " 4719")
    assert not holds_text("4 7 1 8 .", " 4719")
    assert not holds_text("anything", "   ")
