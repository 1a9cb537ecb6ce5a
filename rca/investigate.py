"""The one path through the code: ingest -> trace -> confirm -> remedy -> record.

``investigate(incident)`` runs the stages in order, reports progress through one callback
``(stage, fraction)`` (the CLI draws a progress bar from it, the app a status widget), and
writes the whole run to the store in one transaction at the end, or not at all.

Ingest ends with the preflight checks (``rca.ingest.preflight``): everything a later stage needs is
checked there, and the metric against the chosen baseline once the trace has chosen it, before
its costly steps, so that a run that cannot succeed stops within seconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rca.confirm import ConfirmConfig, ConfirmError, Verdict, auto_batch_size, check_gap, confirm
from rca.confirm.behaviour import BehaviourEvidence, FitVariant, behaviour_evidence
from rca.ingest.generate import generated_behaviour
from rca.ingest.incident import Incident
from rca.ingest.preflight import Preflight, gap_error, preflight, reference_prompts
from rca.model.metric import Target
from rca.model.subject import Subject, load_subject
from rca.remedy import Remedy, VariantTarget, try_remedies
from rca.trace import Attribution, Baseline, Counterfactual, trace
from rca.trace.components import site_means
from rca.trace.fitset import fit_set_scores

__all__ = [
    "InvestigateConfig",
    "CaseRun",
    "Confirmed",
    "investigate",
    "reference_prompts",
    "trace_and_confirm",
    "trace_incident",
]

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
    # a case with neither variants nor a template: up to this many generated variants
    # (rca.ingest.generate), half held out; 0 investigates the one prompt
    generate_variants: int = 0

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
    preflight: Preflight | None = None
    behaviour: BehaviourEvidence | None = None  # a case with variants: on the fit set

    @property
    def recommended(self) -> Remedy | None:
        return next((r for r in self.remedies if r.recommended), None)

    def to_json(self) -> dict[str, Any]:
        rec = self.recommended
        before = self.verdict.metric_clean
        p_bad_before = self.remedies[0].p_bad_before if self.remedies else None
        pre = self.preflight
        return {
            "case_id": self.incident.id,
            "run_id": self.run_id,
            "model_fingerprint": self.subject.fingerprint,
            "decoding": None if pre is None else pre.decoding.to_json(),
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
                    "benign_loss_pct": c.benign_loss_pct,
                    "infrastructure": c.infrastructure,
                }
                for c in self.verdict.ranked()
            ],
            "circuit": None if self.verdict.circuit is None else asdict(self.verdict.circuit),
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


def release_memory() -> None:
    """Hand the memory a finished stage freed back to the operating system.

    The C allocator keeps freed heap memory for reuse, so a process's resident size stays at
    its highest stage's level and the next stage's peak adds to it: on SmolLM2-135M the trace
    leaves 0.8 GB freed but resident. ``malloc_trim`` (glibc) returns it; elsewhere this does
    nothing but collect garbage.
    """
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trace_incident(
    incident: Incident,
    *,
    subject: Subject,
    method: str = "eap-ig",
    steps: int = 8,
    baseline: str = "auto",
    neurons: bool = False,
    n_reference: int = 64,
    max_memory: int | str | None = "auto",
    progress: Callable[[str, float], None] | None = None,
) -> tuple[Incident, Attribution]:
    """Trace one incident alone (no preflight, no confirm): the incident as the model sees it
    (a chat incident rendered with its template) and its attribution, against ``n_reference``
    reference prompts (``reference_prompts``, seed 0) for a mean baseline."""
    inc = incident.for_model(subject.tokenizer)
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    refs, _ = reference_prompts(inc, n_reference, tokenizer=subject.tokenizer, n_ctx=n_ctx)
    att = trace(
        subject,
        inc,
        method=method,
        steps=steps,
        baseline=baseline,
        reference_prompts=refs,
        neurons=neurons,
        max_memory=max_memory,
        progress=progress,
    )
    return inc, att


@dataclass
class Confirmed:
    """An incident traced and its leading candidates confirmed (``trace_and_confirm``)."""

    incident: Incident  # as the model sees it (a chat incident rendered with its template)
    subject: Subject
    preflight: Preflight
    attribution: Attribution
    verdict: Verdict
    timings: dict[str, float]  # seconds per stage: ingest, trace, confirm (and behaviour)
    # a case with variants: the verdict measured on the fit variants (rca.confirm.behaviour)
    behaviour: BehaviourEvidence | None = None

    @property
    def base_target(self) -> Target | None:
        """The counterfactual's target where the trace patched to it, else None."""
        att = self.attribution
        return att.baseline.target if att.baseline.kind == "counterfactual" else None


def trace_and_confirm(
    incident: Incident,
    *,
    subject: Subject | None = None,
    config: InvestigateConfig | None = None,
    progress: Progress | None = None,
    home: Path | None = None,
) -> Confirmed:
    """Ingest (with the preflight checks), trace and confirm one incident: the first three
    stages of ``investigate``, with its progress fractions (0 to 0.75).

    The reference prompts are the preflight's; confirm runs with ``config.confirm``, its
    batch size lowered to the trace's memory plan where that is smaller (the same numbers,
    fewer variants per forward).
    """
    cfg = config or InvestigateConfig()
    say = progress or (lambda stage, frac: None)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    say("ingest", 0.0)
    if subject is None:
        subject = load_subject(
            incident.model_path(home=home), device=cfg.device, allow_pickle=cfg.allow_pickle
        )
    _seed_everything(cfg.seed)
    say("preflight", 0.01)
    pre = preflight(
        subject,
        incident,
        n_reference=cfg.n_reference,
        n_benign=cfg.n_benign,
        seed=cfg.seed,
        method=cfg.method,
        steps=cfg.steps,
        neurons=True,
        max_memory=cfg.max_memory,
        confirm_config=cfg.confirm,
    )
    incident = pre.incident  # rendered for the model (a chat incident's template)
    refs = pre.references
    timings["ingest"] = time.perf_counter() - t

    def check_baseline(base: Baseline, cf: Counterfactual | None) -> None:
        """Confirm's own gap check against the baseline the trace chose, before its costly
        steps (a given counterfactual that lines up was checked in preflight already)."""
        given = base.kind == "counterfactual" and cf is not None and not cf.generated
        if base.kind == "counterfactual" and cf is not None:
            metrics: tuple[float, float] | None = (cf.metric_prompt, cf.metric_counterfactual)
        else:
            metrics = None
        try:
            check_gap(
                subject,
                pre.target,
                baseline=base.target if base.kind == "counterfactual" else None,
                reference=refs,
                config=cfg.confirm,
                metrics=metrics,
            )
        except ConfirmError as e:
            raise gap_error(incident, str(e), given=given) from None

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
        check_baseline=check_baseline,
        plan=pre.plan,
    )
    release_memory()  # the stage's own cost: it frees what the stage left
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
        scores=att.components,
    )
    release_memory()  # the stage's own cost: it frees what the stage left
    timings["confirm"] = time.perf_counter() - t

    if cfg.generate_variants > 0 and not pre.variants:
        t = time.perf_counter()
        cf = att.counterfactual
        cf_text = cf.text if cf is not None and cf.ok else incident.counterfactual
        # the case's own reference prompts: its kind of prompt (the preflight adds others)
        sources = list(incident.reference_prompts) or refs
        made = generated_behaviour(
            subject, incident, cf_text, sources, n=cfg.generate_variants, seed=cfg.seed
        )
        pre = dataclasses.replace(pre, generated=made.summary)
        if made.incident is not None:
            incident = made.incident
            pre = dataclasses.replace(pre, incident=incident, variants=made.checks)
        timings["generate"] = time.perf_counter() - t

    behaviour = None
    fit = [v for v in pre.variants if v.part == "fit"]
    if fit:
        t = time.perf_counter()
        say("confirm", 0.75)
        # the trace over the fit set: its leading components are measured beside the prompt's
        means = None
        if any(v.counterfactual is None for v in fit):
            means = att.baseline.means if att.baseline.kind == "mean" else site_means(subject, refs)
        fit_scores = fit_set_scores(
            subject,
            [(v.index, v.target, v.counterfactual) for v in fit],
            means=means,
            prompt_scores=att.components,
            max_memory=cfg.max_memory,
        )
        timings["fit_trace"] = time.perf_counter() - t
        t = time.perf_counter()
        top = confirm_cfg.top_k
        behaviour = behaviour_evidence(
            subject,
            verdict,
            [FitVariant(v.index, v.target, v.counterfactual) for v in fit],
            reference=refs,
            config=confirm_cfg,
            measured=[*(c.id for c in verdict.ranked()[:top]), *fit_scores.top(top)],
        )
        behaviour.attribution = fit_scores.to_json(top_k=top)
        behaviour.forward_equiv += fit_scores.forward_equiv
        timings["behaviour"] = time.perf_counter() - t

    return Confirmed(
        incident=incident,
        subject=subject,
        preflight=pre,
        attribution=att,
        verdict=verdict,
        timings=timings,
        behaviour=behaviour,
    )


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
    done = trace_and_confirm(incident, subject=subject, config=cfg, progress=say, home=home)
    incident, subject, pre = done.incident, done.subject, done.preflight
    att, verdict, timings = done.attribution, done.verdict, done.timings
    refs, benign = pre.references, pre.benign
    base_target = done.base_target

    t = time.perf_counter()
    say("remedy", 0.75)
    ranked = verdict.ranked()
    # a cause set of no specific component (every candidate is infrastructure) has no fix to try
    # a behaviour whose prompt's cause set does not hold on the fit set is fixed through the
    # set chosen there (rca.confirm.behaviour)
    cause = list(verdict.cause_set.components)
    top_cause = ranked[0].id if ranked else None
    chosen = done.behaviour.cause_set if done.behaviour is not None else None
    if chosen is not None and chosen.source == "fit set" and chosen.holds_on_fit_set:
        cause, top_cause = list(chosen.components), chosen.components[0]
    remedies = (
        []
        if not cfg.remedy or not cause
        else try_remedies(
            subject,
            att.target,
            cause,
            counterfactual=base_target,
            reference=benign,
            top_cause=top_cause,
            p_bad_target=cfg.p_bad_target,
            bad_text=incident.bad,
            neuron_scores=att.components.neurons,
            edit_prompts=refs,
            batch=att.memory.confirm_batch if att.memory is not None else 32,
            grad_batch=att.memory.ig_batch * att.target.rows if att.memory is not None else 32,
            variants=[
                VariantTarget(v.index, v.part, v.target, v.counterfactual) for v in pre.variants
            ],
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
        preflight=pre,
        behaviour=done.behaviour,
    )
    if store is not None:
        t = time.perf_counter()
        say("record", 0.95)
        from rca.store.from_run import to_run_record

        record = to_run_record(
            run, kind=kind, parent_run_id=parent_run_id, summary_extra=summary_extra
        )
        run.run_id = store.record_run(record)
        timings["record"] = time.perf_counter() - t
    say("done", 1.0)
    return run
