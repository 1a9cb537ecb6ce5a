"""The detector's arithmetic: a class-balanced, L2-regularized logistic regression on
standardized features, the threshold for a stated false-positive rate, and the figures a
detector is judged by (precision, recall, AUROC, FPR at a TPR).

The same regression on token counts is the prompt-text baseline (``TokenCounts``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Probe",
    "TokenCounts",
    "auroc",
    "figures",
    "fit_probe",
    "fpr_at_tpr",
    "threshold_for_fpr",
]


@dataclass
class Probe:
    """score(x) = sigmoid(w · (x − mean) / scale + bias), a probability in [0, 1]."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.mean) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean.float().contiguous(),
            "scale": self.scale.float().contiguous(),
            "weight": self.weight.float().contiguous(),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Probe:
        missing = {"mean", "scale", "weight", "bias"} - set(t)
        if missing:
            raise ValueError(f"probe tensors lack {sorted(missing)}")
        width = t["weight"].shape[0]
        if t["mean"].shape != (width,) or t["scale"].shape != (width,):
            raise ValueError("probe tensors disagree on the feature width")
        return cls(t["mean"].float(), t["scale"].float(), t["weight"].float(), float(t["bias"][0]))


def fit_probe(
    x: torch.Tensor,
    y: Sequence[int] | torch.Tensor,
    *,
    l2: float = 1e-2,
    steps: int = 200,
    weights: Sequence[float] | None = None,
) -> Probe:
    """Logistic regression of ``y`` (1 positive, 0 negative) on ``x`` (n, width).

    Features are standardized on ``x``. Each row weighs ``weights[i]`` in the loss; by
    default each class weighs half, whatever its size (a few dozen incident prompts against a
    thousand benign ones). The weights get an L2 penalty ``l2``. Solved with L-BFGS in
    float64, deterministic for the same data."""
    x = x.detach().double().cpu()
    yt = torch.as_tensor(y, dtype=torch.float64).cpu()
    if x.dim() != 2 or x.shape[0] != yt.shape[0]:
        raise ValueError(f"x is {tuple(x.shape)} and y has {yt.shape[0]} labels")
    n_pos = int(yt.sum())
    if n_pos == 0 or n_pos == len(yt):
        raise ValueError("the probe needs both positives and negatives")
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / scale
    if weights is None:
        sample_w = torch.where(yt > 0, 0.5 / n_pos, 0.5 / (len(yt) - n_pos))
    else:
        sample_w = torch.as_tensor(list(weights), dtype=torch.float64)
        if sample_w.shape != yt.shape or bool((sample_w < 0).any()):
            raise ValueError("weights: one non-negative weight per row")
        sample_w = sample_w / sample_w.sum()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = z @ w + b
        loss = (sample_w * torch.nn.functional.softplus(-(2 * yt - 1) * logit)).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(mean.float(), scale.float(), w.detach().float(), float(b.detach()[0]))


def threshold_for_fpr(
    negatives: Sequence[float], fpr: float, positives: Sequence[float] = ()
) -> float:
    """The threshold (a score flags when it is >= it) that keeps the false-positive rate on
    ``negatives`` at most ``fpr`` and, among those, flags the most ``positives``, then the
    fewest negatives; it lies midway (in log-odds) between the highest score it leaves
    unflagged and the lowest it flags, so that it has a margin on both sides."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    neg = sorted(negatives, reverse=True)
    if not neg:
        raise ValueError("no negatives to set a threshold on")
    allowed = math.floor(fpr * len(neg))  # this many negatives may flag
    # the lowest threshold that flags at most ``allowed`` negatives flags everything above
    # the (allowed+1)-th highest negative
    floor = neg[allowed]
    flagged_pos = [p for p in positives if p > floor]
    if not flagged_pos:
        return math.nextafter(floor, math.inf)
    hi = min(flagged_pos)  # raising the threshold up to here loses no positive
    lo = max(n for n in neg if n < hi)  # the highest negative it then leaves unflagged
    return _between(lo, hi)


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _between(lo: float, hi: float) -> float:
    """A value strictly above ``lo`` and at most ``hi``: their midpoint in log-odds for
    probabilities, else their arithmetic midpoint."""
    if 0.0 <= lo < hi <= 1.0:
        mid = 1 / (1 + math.exp(-(_logit(lo) + _logit(hi)) / 2))
    else:
        mid = (lo + hi) / 2
    return mid if lo < mid <= hi else hi


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U)."""
    if not positives or not negatives:
        return float("nan")
    pos = torch.tensor(list(positives), dtype=torch.float64)
    neg = torch.tensor(list(negatives), dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def fpr_at_tpr(positives: Sequence[float], negatives: Sequence[float], tpr: float) -> float:
    """The false-positive rate at the highest threshold that still flags ``tpr`` of the
    positives."""
    if not positives or not negatives:
        return float("nan")
    pos = sorted(positives, reverse=True)
    k = math.ceil(tpr * len(pos))  # flag at least this many positives
    t = pos[max(k, 1) - 1]
    return sum(1 for s in negatives if s >= t) / len(negatives)


def positives_needed(recall: float = 0.95) -> int:
    """The fewest fit positives n for which a new positive from the same distribution falls
    below all of them with probability 1/(n+1) of at most ``1 - recall``."""
    return math.ceil(round(1 / (1 - recall), 9)) - 1


def few_positives_caution(n: int, recall: float = 0.95) -> str | None:
    """What a threshold fit on ``n`` positives cannot promise, or None where ``n`` suffices.

    Whatever the rule, a threshold that flags every fit positive lies at or below the lowest
    of them, and a new variant scores below all ``n`` with probability 1/(n+1): only the
    margin under the lowest one catches it. Below ``positives_needed(recall)`` that chance
    alone exceeds the misses the recall allows."""
    need = positives_needed(recall)
    if n >= need:
        return None
    return (
        f"only {n} fit positives: a new variant scores below all of them with probability "
        f"1/{n + 1} ({100 / (n + 1):.1f}%), so recall on new variants may fall under "
        f"{100 * recall:.0f}%; give the case more variants (at least {need} fit positives)"
    )


def figures(
    positives: Sequence[float], negatives: Sequence[float], threshold: float
) -> dict[str, Any]:
    """Precision, recall and FPR at ``threshold``; AUROC; FPR at TPR 95%; the counts."""
    tp = sum(1 for s in positives if s >= threshold)
    fp = sum(1 for s in negatives if s >= threshold)
    return {
        "n_positive": len(positives),
        "n_negative": len(negatives),
        "threshold": threshold,
        "true_positives": tp,
        "false_positives": fp,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / len(positives) if positives else None,
        "fpr": fp / len(negatives) if negatives else None,
        "auroc": auroc(positives, negatives),
        "fpr_at_tpr95": fpr_at_tpr(positives, negatives, 0.95),
    }


class TokenCounts:
    """Bag-of-tokens features: each prompt's count of every token id the fit prompts hold
    (ids they never hold are dropped: the classifier has no weight for them)."""

    def __init__(self, fit_ids: Sequence[Sequence[int]]) -> None:
        vocab = sorted({t for ids in fit_ids for t in ids})
        self.index = {t: i for i, t in enumerate(vocab)}

    def __call__(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        x = torch.zeros(len(token_ids), len(self.index))
        for r, ids in enumerate(token_ids):
            for t in ids:
                j = self.index.get(t)
                if j is not None:
                    x[r, j] += 1
        return x
