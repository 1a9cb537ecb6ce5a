"""Influence over a model's training checkpoints (TRAK's ensemble): which checkpoints, and how
their scores combine.

One checkpoint's TRAK ranking is noisy: two trainings of the same recipe, or two checkpoints
of one training, rank the same incident's tickets very differently
(docs/decisions/2026-12-07-provenance-levers.md). TRAK's remedy is an ensemble: the scores
of several checkpoints, each with its own features and its own query gradient, summed.

- ``sum`` (TRAK's rule): the checkpoints' scores added as they are. A checkpoint
  whose curvature is small (late in training, where the gradients are) weighs more.
- ``learning``: each checkpoint's scores divided by their standard deviation over the
  examples, then weighted by how much the incident's probability rose over the training
  that followed that checkpoint (to the next one): the mean P(bad) over the query prompts at
  the next checkpoint less that at this one, where positive; the last checkpoint (the model
  itself) has no training after it and weighs 0. A gradient at a checkpoint is what the
  following steps applied, so the ranking comes from the stretch of training in which the
  incident was learned, whatever the scale of the scores there.
- ``tracin``: TracIn over the checkpoints (Pruthi et al. 2020, "TracInCP"): at each
  checkpoint the plain dot product of the example's projected gradient and the query's (no
  curvature), weighted by the learning rate summed over the steps from that checkpoint to the
  next (``tracin_weights``). The sum approximates how much the steps on the example, over the
  whole training, moved the incident metric. It adds up over examples, so a group of tickets
  that teach one rule together scores as a group; an influence function taken at one point,
  which the other rules combine, gives each member of a redundant group only its small share
  of what removing the whole group would do.
- ``auto`` (the default): ``tracin`` where the model has checkpoints (``resolve_rule``); where
  it has none, the final weights' TRAK scores alone.

A model's checkpoints are found (``find_checkpoints``) in the zoo's manifest (``zoo.json``,
``checkpoints``), else as ``checkpoints/step-N`` or ``checkpoint-N`` directories (Hugging
Face's Trainer) inside the model's directory, ordered by N; or given as a list of model
directories, in training order. The model itself is always the last member.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
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
    "no_checkpoints_error",
    "no_rise_error",
    "resolve_rule",
    "tracin_weights",
    "training_schedule",
]

ENSEMBLE_RULES = ("auto", "sum", "learning", "tracin")
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
    order. A listed directory that is missing, or a list whose numbered directories
    (``step-N``, ``checkpoint-N``) go back in N, is an ``InfluenceError`` naming it."""
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
    steps = [c.step for c in out if c.step is not None]
    if any(b < a for a, b in zip(steps, steps[1:], strict=False)):
        raise InfluenceError(
            f"--checkpoints: their steps {steps} are not in training order; list them from "
            "the earliest"
        )
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


def tracin_weights(
    steps: Sequence[int | None], final_step: int | None, lr: Callable[[int], float] | None
) -> tuple[np.ndarray, str]:
    """The ``tracin`` rule's weight of each checkpoint (``steps``, in training order, the model
    itself last, at ``final_step``) and where they came from: the learning rate ``lr(step)``
    summed over the steps from each checkpoint to the next, where the schedule and every step
    are known; the number of steps to the next (a constant learning rate) where only the steps
    are; else 1 for every checkpoint. The model itself weighs 0: no training follows it.
    Normalized to sum to 1."""
    n = len(steps)
    w = np.zeros(n)
    known = [*steps[:-1], final_step]
    if n > 1 and all(s is not None for s in known):
        at = [int(s) for s in known]  # type: ignore[arg-type]
        if any(b < a for a, b in zip(at, at[1:], strict=False)):
            raise InfluenceError(
                f"--ensemble tracin: the checkpoints' steps {at} are not in training order; "
                "list them from the earliest"
            )
        if lr is not None:
            w[:-1] = [sum(lr(t) for t in range(a, b)) for a, b in zip(at, at[1:], strict=False)]
            source = "learning rate"
        else:
            w[:-1] = np.diff(at)
            source = "steps"
    else:
        w[:-1] = 1.0
        source = "equal"
    total = w.sum()
    return (w / total if total > 0 else w), source


def training_schedule(model_path: Path | None) -> tuple[int | None, Callable[[int], float] | None]:
    """The step the model itself was saved at, and its learning rate by step, where its
    directory says: a zoo model's manifest (``zoo.json``: its recipe, ``rca.zoo.train.lr_at``),
    else a Hugging Face Trainer's ``trainer_state.json`` (its ``global_step`` only). (None,
    None) where neither is there."""
    if model_path is None or not model_path.is_dir():
        return None, None
    manifest = model_path / "zoo.json"
    if manifest.is_file():
        from rca.provenance.verify import recipe
        from rca.zoo.train import lr_at

        cfg = recipe(json.loads(manifest.read_text()))
        if cfg is not None:
            return cfg.steps, lambda step: lr_at(step, cfg)
    state = model_path / "trainer_state.json"
    if state.is_file():
        step = json.loads(state.read_text()).get("global_step")
        return (int(step) if isinstance(step, int) else None), None
    return None, None


def resolve_rule(rule: str, has_checkpoints: bool) -> str:
    """The rule ``rule`` stands for: ``auto`` is ``tracin`` where there are checkpoints, else
    ``sum`` (which, over the model alone, is its TRAK scores as they are)."""
    check_rule(rule)
    if rule == "auto":
        return "tracin" if has_checkpoints else "sum"
    return rule


def no_checkpoints_error() -> InfluenceError:
    return InfluenceError(
        "--ensemble tracin sums over training checkpoints and this model has none; give "
        "--checkpoints DIR,DIR,... or another --ensemble"
    )


def check_rule(rule: str) -> None:
    """An ``InfluenceError`` naming ``--ensemble`` unless ``rule`` is one of ``ENSEMBLE_RULES``."""
    if rule not in ENSEMBLE_RULES:
        raise InfluenceError(f"--ensemble must be one of {', '.join(ENSEMBLE_RULES)}, got {rule!r}")


def no_rise_error() -> InfluenceError:
    return InfluenceError(
        "--ensemble learning: the incident's P(bad) never rose from one checkpoint to the "
        "next, so no stretch of training taught it; give earlier checkpoints, or --ensemble sum"
    )


def combine(
    scores: Sequence[np.ndarray],
    p_bad: Sequence[float],
    rule: str,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The ensemble's scores from each checkpoint's (in training order, the model last) and the
    mean P(bad) over the query prompts at each; under ``tracin`` each checkpoint's scores are
    its gradient dot products and ``weights`` are ``tracin_weights``."""
    check_rule(rule)
    if len(scores) != len(p_bad) or not scores:
        raise InfluenceError("each checkpoint needs its scores and its P(bad)")
    if rule == "sum":
        return np.sum(np.stack(scores), axis=0)
    if rule == "tracin":
        if weights is None or len(weights) != len(scores):
            raise InfluenceError("--ensemble tracin needs a weight for each checkpoint")
        return np.sum(np.stack(scores) * np.asarray(weights, dtype=np.float64)[:, None], axis=0)
    w = learning_weights(p_bad)
    if not w.any():
        raise no_rise_error()
    out = np.zeros_like(scores[0], dtype=np.float64)
    for wi, s in zip(w, scores, strict=True):
        if wi > 0:
            sd = float(np.std(s))
            out += wi * (s / sd if sd > 0 else s)
    return out
