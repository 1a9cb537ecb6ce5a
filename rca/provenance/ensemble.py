"""Influence over a model's training checkpoints (TRAK's ensemble): which checkpoints, and how
their scores combine.

One checkpoint's TRAK ranking is noisy: two trainings of the same recipe, or two checkpoints
of one training, rank the same incident's tickets very differently
(docs/decisions/2026-12-07-provenance-levers.md). TRAK's remedy is an ensemble: the scores
of several checkpoints, each with its own features and its own query gradient, summed.

- ``sum`` (the default, TRAK's rule): the checkpoints' scores added as they are. A checkpoint
  whose curvature is small (late in training, where the gradients are) weighs more.
- ``learning``: each checkpoint's scores divided by their standard deviation over the
  examples, then weighted by how much the incident's probability rose over the training
  that followed that checkpoint (to the next one): the mean P(bad) over the query prompts at
  the next checkpoint less that at this one, where positive; the last checkpoint (the model
  itself) has no training after it and weighs 0. A gradient at a checkpoint is what the
  following steps applied, so the ranking comes from the stretch of training in which the
  incident was learned, whatever the scale of the scores there.

A model's checkpoints are found (``find_checkpoints``) in the zoo's manifest (``zoo.json``,
``checkpoints``), else as ``checkpoints/step-N`` or ``checkpoint-N`` directories (Hugging
Face's Trainer) inside the model's directory, ordered by N; or given as a list of model
directories, in training order. The model itself is always the last member.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rca.provenance.influence import InfluenceError

__all__ = [
    "ENSEMBLE_RULES",
    "Checkpoint",
    "check_rule",
    "combine",
    "find_checkpoints",
    "learning_weights",
    "no_rise_error",
]

ENSEMBLE_RULES = ("sum", "learning")
_STEP = re.compile(r"^(?:step|checkpoint)-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """One member of the ensemble: a model directory and its training step, where known."""

    path: Path
    step: int | None
    final: bool = False  # the run's model itself

    def label(self) -> str:
        if self.final:
            return "final"
        return f"step {self.step}" if self.step is not None else self.path.name


def _numbered(root: Path) -> list[Checkpoint]:
    found = []
    for d in [root, root / "checkpoints"]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_dir():
                found.append(Checkpoint(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step or 0)


def find_checkpoints(model_path: Path | None, spec: str) -> list[Checkpoint]:
    """The checkpoints ``spec`` names, in training order, not counting the model itself.

    ``spec``: ``none``; ``auto`` (the model's own, where it has any: its zoo manifest's list,
    else numbered directories in it); or comma-separated model directories, in training
    order. A listed directory that is missing is an ``InfluenceError`` naming it."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "auto":
        if model_path is None or not model_path.is_dir():
            return []
        manifest = model_path / "zoo.json"
        if manifest.is_file():
            listed = json.loads(manifest.read_text()).get("checkpoints") or []
            out = [Checkpoint(model_path / c["path"], int(c["step"])) for c in listed]
            missing = [c.path for c in out if not c.path.is_dir()]
            if missing:
                raise InfluenceError(
                    f"--checkpoints auto: {missing[0]} is listed in {manifest} but missing; "
                    "rebuild the zoo (rca zoo build --force) or give --checkpoints none"
                )
            return out
        return _numbered(model_path)
    out = []
    for part in spec.split(","):
        p = Path(part.strip()).expanduser()
        if not p.is_dir():
            raise InfluenceError(
                f"--checkpoints: {str(p)!r} is not a model directory; give directories "
                "separated by commas, in training order, or auto or none"
            )
        m = _STEP.match(p.name)
        out.append(Checkpoint(p, int(m.group(1)) if m else None))
    return out


def learning_weights(p_bad: Sequence[float]) -> np.ndarray:
    """The ``learning`` rule's weight of each checkpoint, in training order (the model itself
    last): the rise of the mean P(bad) from it to the next, where positive, normalized to sum
    to 1. All zeros where the incident never rose from one checkpoint to the next."""
    p = np.asarray(p_bad, dtype=np.float64)
    w = np.zeros_like(p)
    if len(p) > 1:
        w[:-1] = np.clip(np.diff(p), 0.0, None)
    total = w.sum()
    return w / total if total > 0 else w


def check_rule(rule: str) -> None:
    """An ``InfluenceError`` naming ``--ensemble`` unless ``rule`` is one of ``ENSEMBLE_RULES``."""
    if rule not in ENSEMBLE_RULES:
        raise InfluenceError(f"--ensemble must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")


def no_rise_error() -> InfluenceError:
    return InfluenceError(
        "--ensemble learning: the incident's P(bad) never rose from one checkpoint to the "
        "next, so no stretch of training taught it; give earlier checkpoints, or --ensemble sum"
    )


def combine(scores: Sequence[np.ndarray], p_bad: Sequence[float], rule: str) -> np.ndarray:
    """The ensemble's scores from each checkpoint's (in training order, the model last) and the
    mean P(bad) over the query prompts at each."""
    check_rule(rule)
    if len(scores) != len(p_bad) or not scores:
        raise InfluenceError("each checkpoint needs its scores and its P(bad)")
    if rule == "sum":
        return np.sum(np.stack(scores), axis=0)
    w = learning_weights(p_bad)
    if not w.any():
        raise no_rise_error()
    out = np.zeros_like(scores[0], dtype=np.float64)
    for wi, s in zip(w, scores, strict=True):
        if wi > 0:
            sd = float(np.std(s))
            out += wi * (s / sd if sd > 0 else s)
    return out
