"""The run-time guard: a monitor attached to a model through hooks on its real modules.

>>> with attach(subject, "monitors/zoo-injection") as guard:       # doctest: +SKIP
...     out = guard.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
...     guard.alerts            # [{"row", "step", "score"}, ...]

Every forward pass is scored (``FeatureReader``): inside ``model.generate`` that is the
prompt's pass, then one per new token. With ``action="flag"`` the guard only records alerts.
With ``action="stop"``, its ``LogitsProcessor`` replaces the token that a flagged pass would
emit by the stop token (the model's end-of-sequence token), so the bad token is never emitted,
and its ``StoppingCriteria`` ends those rows. ``generate`` passes both; to use
``model.generate`` directly, pass ``guard.logits_processor()`` and
``guard.stopping_criteria()`` yourself.

The hooks are removed on leaving the ``with`` block, on an exception inside it, or by
``detach()``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rca.model.subject import Subject
from rca.monitor.artifact import Monitor, MonitorError, load_monitor
from rca.monitor.sites import FeatureReader

__all__ = ["ACTIONS", "Guard", "attach"]

ACTIONS = ("flag", "stop")


class _Stop(LogitsProcessor):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        fired = self.guard.fired
        if fired is None or not bool(fired.any()) or self.guard.action != "stop":
            return scores
        rows = fired.to(scores.device)
        if rows.shape[0] != scores.shape[0]:
            raise MonitorError(
                f"the guard scored {rows.shape[0]} rows but generate asks for {scores.shape[0]}"
            )
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.guard.stop_token_id] = 0.0
        return torch.where(rows.unsqueeze(-1), forced, scores)


class _Halt(StoppingCriteria):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> Any:
        flagged = self.guard.flagged
        if flagged is None or self.guard.action != "stop":
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return flagged.to(input_ids.device)


class Guard:
    """A monitor attached to a model (see the module's doc). ``scores``: the last pass's
    score per row; ``fired``: whether it reached the threshold; ``flagged``: whether any pass
    of the current context did; ``alerts``: every pass that fired since attaching."""

    def __init__(self, subject: Subject, monitor: Monitor, action: str) -> None:
        if action not in ACTIONS:
            raise MonitorError(f"action must be one of {ACTIONS}, got {action!r}")
        self.subject = subject
        self.monitor = monitor
        self.action = action
        self.stop_token_id = _stop_token(subject) if action == "stop" else None
        self.scores: torch.Tensor | None = None
        self.fired: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None
        self.alerts: list[dict[str, Any]] = []
        self.passes = 0
        self._step = 0
        self._reader = FeatureReader(subject, monitor.sites, on_features=self._score)
        self._stack = contextlib.ExitStack()
        self._attached = False

    def _attach(self) -> Guard:
        self._stack.enter_context(self._reader.reading())
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove the hooks (idempotent)."""
        self._stack.close()
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _score(self, features: torch.Tensor) -> None:
        s = self.monitor.probe.scores(features.cpu())
        fired = s >= self.monitor.threshold
        if self._reader.new_context or self.flagged is None or self.flagged.shape != fired.shape:
            self.flagged = torch.zeros_like(fired)
            self._step = 0
        else:
            self._step += 1
        self.scores, self.fired = s, fired
        self.flagged = self.flagged | fired
        self.passes += 1
        for row in fired.nonzero().flatten().tolist():
            self.alerts.append({"row": row, "step": self._step, "score": float(s[row])})

    def logits_processor(self) -> LogitsProcessor:
        return _Stop(self)

    def stopping_criteria(self) -> StoppingCriteria:
        return _Halt(self)

    def generate(self, **kwargs: Any) -> Any:
        """``model.generate`` with the guard's processor and criteria added."""
        if not self._attached:
            raise MonitorError("the guard is detached; attach the monitor again")
        procs = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        procs.append(self.logits_processor())
        crits = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        crits.append(self.stopping_criteria())
        return self.subject.model.generate(  # type: ignore[operator]
            logits_processor=procs, stopping_criteria=crits, **kwargs
        )


def _stop_token(subject: Subject) -> int:
    cfg = getattr(subject.model, "generation_config", None)
    for src in (cfg, getattr(subject.model, "config", None), subject.tokenizer):
        t = getattr(src, "eos_token_id", None)
        if isinstance(t, list | tuple):
            t = t[0] if t else None
        if isinstance(t, int):
            return t
    raise MonitorError("the model has no end-of-sequence token to stop with; use action='flag'")


def attach(
    model: Subject | nn.Module,
    artifact: Monitor | str | Path,
    *,
    action: str = "flag",
    tokenizer: Any = None,
    fingerprint: str | None = None,
) -> Guard:
    """Attach a monitor to ``model`` (a loaded ``Subject``, or a transformers model with the
    fingerprint of the files it came from) and return the ``Guard``; use it in a ``with``
    block, or call ``detach()``. Refused in one line when the model is not the one the
    monitor was built on."""
    monitor = artifact if isinstance(artifact, Monitor) else load_monitor(artifact)
    if isinstance(model, Subject):
        subject = model
        fp = fingerprint or model.fingerprint
    else:
        subject = Subject.from_model(model, tokenizer)
        fp = fingerprint
    monitor.check_model(fp)
    return Guard(subject, monitor, action)._attach()
