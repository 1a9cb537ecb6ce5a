"""The one path through the code: ingest -> trace -> confirm -> remedy -> record.

``investigate(incident)`` runs the stages in order, reports progress through one callback
``(stage, fraction)`` (the CLI draws a progress bar from it, the app a status widget), and
writes the whole run to the store in one transaction at the end, or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rca.confirm import ConfirmConfig, Verdict, auto_batch_size, confirm
from rca.incident import Incident
from rca.remedy import Remedy, try_remedies
from rca.subject import Subject, load_subject
from rca.trace import Attribution, trace

__all__ = ["InvestigateConfig", "CaseRun", "investigate", "reference_prompts"]

Progress = Callable[[str, float], None]
STAGES = ("ingest", "trace", "confirm", "remedy", "record")


@dataclass(frozen=True)
class InvestigateConfig:
    """Everything that shapes a run; stored with it."""

    method: str = "eap-ig"
    steps: int = 8
    baseline: str = "auto"
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    n_reference: int = 64  # reference prompts for mean/resample ablation
    n_benign: int = 200  # benign prompts for the side effects of fixes
    p_bad_target: float = 0.2
    remedy: bool = True  # try fixes (a regression re-check skips them)
    seed: int = 0
    device: str = "auto"
    max_memory: int | str | None = "auto"  # a size ("4G"), "auto" (what is free) or None
    allow_pickle: bool = False  # load pickle weights (runs code from the file; trusted only)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CaseRun:
    """The result of one investigation."""

    run_id: str | None
    incident: Incident
    subject: Subject
    attribution: Attribution
    verdict: Verdict
    remedies: list[Remedy]
    config: InvestigateConfig
    timings: dict[str, float]
    started_at: dt.datetime
    finished_at: dt.datetime

    @property
    def recommended(self) -> Remedy | None:
        return next((r for r in self.remedies if r.recommended), None)

    def to_json(self) -> dict[str, Any]:
        rec = self.recommended
        before = self.verdict.metric_clean
        p_bad_before = self.remedies[0].p_bad_before if self.remedies else None
        return {
            "case_id": self.incident.id,
            "run_id": self.run_id,
            "model_fingerprint": self.subject.fingerprint,
            "metric": {"before": before, "after_fix": rec.metric_after if rec else None},
            "p_bad": {"before": p_bad_before, "after_fix": rec.p_bad_after if rec else None},
            "verdict": self.verdict.verdict,
            "cause_set": self.verdict.cause_set.components,
            "causes": [
                {
                    "id": c.id,
                    "total_effect": c.total_effect,
                    "direct_effect": c.direct_effect,
                    "necessity": c.necessity,
                    "p_value": c.p_value,
                    "verdict": c.verdict,
                    "reason": c.reason,
                }
                for c in self.verdict.ranked()
            ],
            "remedies": [
                {
                    "kind": r.kind,
                    "components": r.components,
                    "p_bad_after": r.p_bad_after,
                    "metric_after": r.metric_after,
                    "side_effect": r.side_effect,
                    "recommended": r.recommended,
                    "note": r.note,
                }
                for r in self.remedies
            ],
            "timings": self.timings,
        }


def reference_prompts(incident: Incident, n: int, *, seed: int = 0) -> list[str]:
    """The case's reference prompts, then the zoo's benign set for a zoo model, up to ``n``."""
    refs = list(incident.reference_prompts)
    if incident.model.startswith("zoo:") and len(refs) < n:
        from rca import zoo

        refs += zoo.benign_prompts(n - len(refs), seed=seed)  # type: ignore[attr-defined]
    return refs[:n] if len(refs) > n else refs


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def investigate(
    incident: Incident,
    *,
    subject: Subject | None = None,
    store: Any = None,
    config: InvestigateConfig | None = None,
    progress: Progress | None = None,
    home: Path | None = None,
    kind: str = "investigate",
    parent_run_id: str | None = None,
    summary_extra: dict[str, Any] | None = None,
) -> CaseRun:
    """Investigate one incident end to end; record it in ``store`` when one is given.

    ``subject``: an already loaded model (reused across cases); by default the incident's.
    ``store``: an ``rca.store.Store``; the run is written in one transaction at the end.
    """
    cfg = config or InvestigateConfig()
    say = progress or (lambda stage, frac: None)
    started = dt.datetime.now(dt.UTC)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    say("ingest", 0.0)
    if subject is None:
        subject = load_subject(
            incident.model_path(home=home), device=cfg.device, allow_pickle=cfg.allow_pickle
        )
    _seed_everything(cfg.seed)
    refs = reference_prompts(incident, cfg.n_reference, seed=cfg.seed)
    benign = reference_prompts(incident, cfg.n_benign, seed=cfg.seed + 1)
    timings["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    say("trace", 0.05)
    att = trace(
        subject,
        incident,
        method=cfg.method,
        steps=cfg.steps,
        baseline=cfg.baseline,
        reference_prompts=refs,
        neurons=True,
        max_memory=cfg.max_memory,
        progress=lambda s, f: say("trace", 0.05 + 0.35 * f),
    )
    timings["trace"] = time.perf_counter() - t

    t = time.perf_counter()
    say("confirm", 0.4)
    base_target = att.baseline.target if att.baseline.kind == "counterfactual" else None
    confirm_cfg = cfg.confirm
    batch = confirm_cfg.batch_size or auto_batch_size(subject.device)
    if att.memory is not None and att.memory.confirm_batch < batch:
        # fewer variants per forward: the same numbers, within the memory budget
        confirm_cfg = dataclasses.replace(confirm_cfg, batch_size=att.memory.confirm_batch)
    verdict = confirm(
        subject,
        att.target,
        att.components.ranked(),
        baseline=base_target,
        reference=refs,
        config=confirm_cfg,
        progress=lambda s, f: say("confirm", 0.4 + 0.35 * f),
    )
    timings["confirm"] = time.perf_counter() - t

    t = time.perf_counter()
    say("remedy", 0.75)
    ranked = verdict.ranked()
    remedies = (
        []
        if not cfg.remedy
        else try_remedies(
            subject,
            att.target,
            verdict.cause_set.components,
            counterfactual=base_target,
            reference=benign,
            top_cause=ranked[0].id if ranked else None,
            p_bad_target=cfg.p_bad_target,
            bad_text=incident.bad,
            neuron_scores=att.components.neurons,
            edit_prompts=refs,
            batch=att.memory.confirm_batch if att.memory is not None else 32,
            grad_batch=att.memory.ig_batch * att.target.rows if att.memory is not None else 32,
        )
    )
    timings["remedy"] = time.perf_counter() - t

    run = CaseRun(
        run_id=None,
        incident=incident,
        subject=subject,
        attribution=att,
        verdict=verdict,
        remedies=remedies,
        config=cfg,
        timings=timings,
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
    )
    if store is not None:
        t = time.perf_counter()
        say("record", 0.95)
        from rca.record import to_run_record

        record = to_run_record(
            run, kind=kind, parent_run_id=parent_run_id, summary_extra=summary_extra
        )
        run.run_id = store.record_run(record)
        timings["record"] = time.perf_counter() - t
    say("done", 1.0)
    return run
