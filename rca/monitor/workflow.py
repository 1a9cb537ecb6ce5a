"""The monitor's steps against a store, as the command line runs them: build one from a
recorded run, judge it on its held-out prompts, run a batch of prompts through it, and
re-validate every stored monitor on another checkpoint.

Each checks what it can before a model loads, and writes the store in one transaction at its
end (an artifact is written beside it first, and recorded only once it is complete).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rca.ingest.incident import Incident
from rca.model.metric import encode_text
from rca.model.subject import Subject
from rca.monitor.artifact import JSON_NAME, Monitor, MonitorError, load_monitor, save_monitor
from rca.monitor.build import (
    MonitorConfig,
    _features,
    _scores,
    build_monitor,
    evaluate_monitor,
    monitor_prompts,
    prompt_sha256,
    rebuild_config,
)
from rca.monitor.guard import attach

__all__ = [
    "MAX_PROMPT_LINES",
    "STALE_RECALL",
    "build_and_record",
    "evaluate_and_record",
    "read_prompts",
    "revalidate",
    "run_prompts",
    "run_subject",
    "stored_incident",
]

MAX_PROMPT_LINES = 100_000
MAX_PROMPTS_BYTES = 256 << 20
# a monitor is stale on another checkpoint where, of the held-out variants that still show the
# incident there, it flags fewer than this share at its own threshold
STALE_RECALL = 0.8


def stored_incident(run: dict[str, Any]) -> Incident:
    from rca.regress import _stored_incident

    if run.get("incident") is None:
        raise MonitorError(f"run {run['run_id']}: its incident is not in the store")
    return _stored_incident(run["incident"])


def run_subject(
    incident: Incident, *, model: str | None, device: str, home: Path | None
) -> Subject:
    """The model a stored run's incident names (or ``model``, where given), loaded."""
    # imported here, at call time, like every loader the command line reaches
    from rca.model.subject import load_subject, resolve_model_ref

    if model is not None:
        path = resolve_model_ref(model, home=home)
    else:
        path = incident.model_path(home=home)
    return load_subject(path, device=device, home=home)


def build_and_record(
    store: Any,
    run_id: str,
    *,
    out: Path | None,
    cfg: MonitorConfig,
    device: str = "cpu",
    home: Path | None = None,
    model: str | None = None,
) -> tuple[Monitor, Path]:
    """Build the monitor of a recorded run, write its artifact (``out``, default
    ``monitors/<case>-<id>``) and record it in ``store``."""
    cfg.check()
    run = store.get_run(run_id)
    incident = stored_incident(run)
    subject = run_subject(incident, model=model, device=device, home=home)
    monitor, _ = build_monitor(run, incident, subject, cfg)
    d = out or Path("monitors") / f"{incident.id}-{monitor.monitor_id[:8]}"
    path = save_monitor(monitor, d)
    meta = json.loads(path.read_text())
    store.record_monitor(
        monitor.describe(),
        artifact_path=str(path.parent.resolve()),
        weights_sha256=meta["weights_sha256"],
    )
    return monitor, path.parent


def artifact_for(store: Any, ref: str) -> Monitor:
    """A monitor by artifact path (its directory or monitor.json), or by its id (or a case id)
    in ``store``."""
    from rca.paths import PathError, input_path

    try:
        p = input_path(ref, what="monitor", kind="any", must_exist=False)
    except PathError:
        p = None  # not a usable path: an id
    if p is not None and p.exists():
        return load_monitor(p)
    row = store.get_monitor(ref)
    path = row.get("artifact_path")
    if not path or not (Path(path) / JSON_NAME).is_file():
        raise MonitorError(
            f"monitor {row['monitor_id']}: its artifact {path} is missing; give the artifact's "
            "directory instead"
        )
    monitor = load_monitor(path)
    if monitor.monitor_id != row["monitor_id"]:
        raise MonitorError(f"{path} holds monitor {monitor.monitor_id}, not {row['monitor_id']}")
    return monitor


def evaluate_and_record(
    store: Any,
    monitor: Monitor,
    *,
    device: str = "cpu",
    home: Path | None = None,
    model: str | None = None,
    baselines: bool = True,
    batch: int = 32,
) -> dict[str, Any]:
    """Judge ``monitor`` on its held-out prompts (with the baselines) and record the figures."""
    run = store.get_run(monitor.run_id)
    incident = stored_incident(run)
    subject = run_subject(incident, model=model, device=device, home=home)
    monitor.check_model(subject.fingerprint)
    result = evaluate_monitor(monitor, incident, subject, baselines=baselines, batch=batch)
    store.record_monitor_eval(
        monitor.monitor_id,
        model_fingerprint=str(subject.fingerprint),
        kind="held_out",
        figures=result["monitor"] | {"counts": result["counts"]},
        baselines=result.get("baselines"),
        stale=False,
    )
    return result


@dataclass(frozen=True)
class PromptLine:
    line: int
    prompt: str | None
    messages: list[dict[str, str]] | None


def read_prompts(path: Path) -> list[PromptLine]:
    """A JSONL file of prompts: one object per line with ``prompt`` (text) or ``messages``
    (chat turns). Every line is checked; the first bad one is a MonitorError naming it."""
    from rca.paths import read_bounded_text

    out: list[PromptLine] = []
    text = read_bounded_text(path, what="--prompts", max_bytes=MAX_PROMPTS_BYTES)
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts {path}: line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MonitorError(f"{where}: not JSON ({e.msg})") from None
        except RecursionError:
            raise MonitorError(f"{where}: nested too deeply to be a prompt") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise MonitorError(f"{where}: give an object with exactly one of prompt or messages")
        if "prompt" in obj:
            p = obj["prompt"]
            if not isinstance(p, str) or not p.strip():
                raise MonitorError(f"{where}: prompt must be a non-empty string")
            out.append(PromptLine(no, p, None))
        else:
            m = obj["messages"]
            ok = (
                isinstance(m, list)
                and m
                and all(
                    isinstance(t, dict)
                    and set(t) == {"role", "content"}
                    and t["role"] in ("system", "user", "assistant")
                    and isinstance(t["content"], str)
                    for t in m
                )
            )
            if not ok:
                raise MonitorError(
                    f"{where}: messages must be a non-empty list of {{role, content}} turns "
                    "(role system, user or assistant)"
                )
            out.append(PromptLine(no, None, list(m)))
        if len(out) > MAX_PROMPT_LINES:
            raise MonitorError(f"--prompts {path}: more than {MAX_PROMPT_LINES} prompts; split it")
    if not out:
        raise MonitorError(f"--prompts {path}: no prompts in it")
    return out


def _render(subject: Subject, p: PromptLine, path: Path) -> str:
    if p.prompt is not None:
        return p.prompt
    tok = subject.tokenizer
    if not getattr(tok, "chat_template", None):
        raise MonitorError(
            f"--prompts {path}: line {p.line}: the model has no chat template; give prompt text"
        )
    try:
        return str(tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True))
    except Exception as e:
        raise MonitorError(
            f"--prompts {path}: line {p.line}: the chat template refuses it ({e})"
        ) from None


@torch.inference_mode()
def run_prompts(
    store: Any,
    monitor: Monitor,
    subject: Subject,
    prompts: list[PromptLine],
    *,
    source: Path,
    max_new_tokens: int = 0,
    keep_text: bool = False,
) -> dict[str, Any]:
    """Score every prompt with the guard (flagging only; with ``max_new_tokens``, also every
    token of a greedy generation) and record the prompts that fired as one batch of alerts."""
    monitor.check_model(subject.fingerprint)
    texts = [_render(subject, p, source) for p in prompts]
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    ids = [encode_text(subject.tokenizer, t) for t in texts]
    for p, i in zip(prompts, ids, strict=True):
        if not i:
            raise MonitorError(f"--prompts {source}: line {p.line}: encodes to no tokens")
        if n_ctx is not None and len(i) + max_new_tokens > n_ctx:
            raise MonitorError(
                f"--prompts {source}: line {p.line}: {len(i)} tokens plus {max_new_tokens} new "
                f"exceed the model's context ({n_ctx})"
            )
    sites = [s.id for s in monitor.sites]
    alerts: list[dict[str, Any]] = []
    pad = getattr(subject.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(subject.tokenizer, "eos_token_id", None) or 0
    with attach(subject, monitor, action="flag") as guard:
        for text, row_ids in zip(texts, ids, strict=True):
            x = torch.tensor([row_ids], device=subject.device)
            mask = torch.ones_like(x)
            before = len(guard.alerts)
            if max_new_tokens:
                guard.generate(
                    input_ids=x,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            else:
                subject.model(input_ids=x, attention_mask=mask)
            fired = guard.alerts[before:]
            if fired:
                first = fired[0]
                alerts.append(
                    {
                        "at": dt.datetime.now(dt.UTC),
                        "prompt_sha256": prompt_sha256(text),
                        "score": max(a["score"] for a in fired),
                        "step": first["step"],
                        "sites": sites,
                        "text": text if keep_text else None,
                    }
                )
    batch_id = store.record_alerts(
        monitor.monitor_id, model_fingerprint=str(subject.fingerprint), alerts=alerts
    )
    return {"prompts": len(texts), "alerts": len(alerts), "batch_id": batch_id}


def revalidate(
    store: Any,
    subject: Subject,
    *,
    case_ids: set[str] | None = None,
    batch: int = 32,
    say: Any = None,
) -> list[dict[str, Any]]:
    """Every stored monitor re-checked on ``subject`` (another checkpoint): its own probe,
    sites and threshold, applied to the new model's activations on the case's held-out
    variants that still show the incident there. Stale where it flags fewer than
    ``STALE_RECALL`` of them (the mechanism moved, or its activations did); each check is
    recorded as an evaluation of kind ``regress``. ``case_ids``: only the monitors of these
    cases (those a regression re-checks)."""
    from rca.model.hooks import HookError
    from rca.monitor.build import _split_figures

    results = []
    for row in store.list_monitors():
        mid = row["monitor_id"]
        if case_ids is not None and row["incident_id"] not in case_ids:
            continue
        try:
            monitor = artifact_for(store, mid)
        except MonitorError as e:
            results.append({"monitor_id": mid, "status": "missing", "reason": str(e)})
            continue
        run = store.get_run(monitor.run_id)
        incident = stored_incident(run)
        cfg = rebuild_config(monitor, batch)
        try:
            prompts = monitor_prompts(incident, subject, cfg)
        except MonitorError as e:
            reason = f"the incident no longer shows on held-out variants here ({e})"
            out = {"monitor_id": mid, "case_id": monitor.case_id, "status": "gone", "stale": None}
            out["reason"] = reason
            store.record_monitor_eval(
                mid,
                model_fingerprint=str(subject.fingerprint),
                kind="regress",
                figures={},
                stale=None,
                reason=reason,
            )
            results.append(out)
            continue
        try:
            feats = _features(subject, monitor.sites, prompts.held_out, batch)
        except HookError as e:
            fig, recall, stale = {}, 0.0, True
            reason = f"its sites are not in this model ({e})"
        else:
            fig = _split_figures(_scores(monitor, feats), monitor.threshold)
            recall = fig["recall"] or 0.0
            stale = recall < STALE_RECALL
            reason = (
                f"flags {recall:.0%} of the {fig['n_positive']} held-out variants that show the "
                f"incident on this model (stale below {STALE_RECALL:.0%})"
            )
        store.record_monitor_eval(
            mid,
            model_fingerprint=str(subject.fingerprint),
            kind="regress",
            figures=fig,
            stale=stale,
            reason=reason,
        )
        out = {
            "monitor_id": mid,
            "case_id": monitor.case_id,
            "status": "stale" if stale else "fires",
            "stale": stale,
            "recall": recall,
            "auroc": fig.get("auroc"),
            "reason": reason,
        }
        if say is not None:
            say(f"monitor {mid[:8]} ({monitor.case_id}): {out['status']}: {reason}")
        results.append(out)
    return results
