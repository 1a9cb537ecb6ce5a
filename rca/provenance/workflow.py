"""``rca provenance`` against a store: rank a recorded run's training examples by their
influence on its incident, and record the top of the ranking.

Everything that can fail cheaply is checked before the model loads: the run, its incident
and circuit, and every record of the training data. The store is written in one transaction
at the end; the features are written to their cache directory first, complete or not at all.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rca.model.metric import Target
from rca.model.subject import Subject, load_subject
from rca.provenance.data import TrainingData, load_training_data
from rca.provenance.influence import (
    Features,
    InfluenceConfig,
    InfluenceError,
    circuit_parameters,
    featurize,
    query_scores,
)
from rca.provenance.unlearn import UnlearnConfig

__all__ = ["ProvenanceResult", "circuit_of", "incident_targets", "provenance_for_run"]

CACHE_DIR = "influence"  # under the rca home: one directory per features' cache key
TEXT_CHARS = 2000  # the text kept per recorded example


@dataclass
class ProvenanceResult:
    query_id: str
    run_id: str
    incident_id: str
    method: str  # as recorded: ``method_name``
    circuit: list[str]
    features: Features
    scores: np.ndarray  # every example's, in data order
    top: list[dict[str, Any]]  # index, score, text, fields; best first
    queries: dict[str, Any]
    summary: dict[str, Any]
    seconds: float


def circuit_of(summary: dict[str, Any]) -> list[str]:
    """The components whose parameters the influence is taken over: the circuit's specific
    members, else the cause set (the behaviour's where it was chosen on the fit set and holds
    there), as a monitor reads them (``rca.monitor.build.monitor_sites``)."""
    from rca.monitor.artifact import MonitorError
    from rca.monitor.build import monitor_sites

    try:
        return list(dict.fromkeys(s.id for s in monitor_sites(summary, 0)))
    except MonitorError:
        raise InfluenceError(
            "the run names no circuit and no cause set: give --scope full, or investigate the "
            "case until a mechanism is confirmed"
        ) from None


def incident_targets(subject: Subject, incident: Any) -> tuple[list[Target], dict[str, Any]]:
    """The prompts an influence query averages over: the incident's own and its fit variants
    (never a held-out one: retraining without the ranked examples is judged on those)."""
    from rca.ingest.preflight import check_variants

    own = incident.for_model(subject.tokenizer).encode(subject)
    fit: list[Target] = []
    indices: list[int] = []
    if incident.all_variants():
        for c in check_variants(subject, incident):
            if c.part == "fit":
                fit.append(c.target)
                indices.append(c.index)
    return [own, *fit], {"prompt": True, "fit_variants": indices, "n": 1 + len(fit)}


def _summary(data: TrainingData, top: list[dict[str, Any]], scores: np.ndarray) -> dict[str, Any]:
    """What the ranking says in aggregate: the share of the top examples from each value of the
    data's ``source`` field (where it has one), and the scores' spread."""
    out: dict[str, Any] = {
        "n_examples": len(data),
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()),
        "top_score_min": float(top[-1]["score"]) if top else None,
    }
    if "source" in data.fields and top:
        counts = Counter(str(data.fields["source"][e["index"]]) for e in top)
        overall = Counter(str(v) for v in data.fields["source"])
        out["top_sources"] = {k: v / len(top) for k, v in counts.most_common()}
        out["data_sources"] = {k: v / len(data) for k, v in overall.most_common()}
    return out


def _unlearning(
    subject: Subject,
    incident: Any,
    params: list[str],
    data: TrainingData,
    top: list[dict[str, Any]],
    cfg: UnlearnConfig,
) -> dict[str, Any]:
    """The unlearning check of the top examples against random ones, on the incident's own
    benign prompts (those its investigation measured side effects on)."""
    from rca.ingest.preflight import reference_prompts
    from rca.model.metric import encode_text
    from rca.provenance.unlearn import unlearning_check

    tok = subject.tokenizer
    inc = incident.for_model(tok)
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    benign, _ = reference_prompts(inc, cfg.n_benign, seed=1, tokenizer=tok, n_ctx=n_ctx)
    benign = [b for b in benign if len(encode_text(tok, b)) >= 2]
    return unlearning_check(
        subject, incident, params, data.texts, [e["index"] for e in top], benign, cfg
    )


def method_name(scope: str, ensemble: str | None) -> str:
    """The recorded method: ``trak-<scope>``, with ``-<rule>-ensemble`` over checkpoints, or
    ``tracin-<scope>-checkpoints`` for TracIn over them."""
    if ensemble == "tracin":
        return f"tracin-{scope}-checkpoints"
    return f"trak-{scope}" + (f"-{ensemble}-ensemble" if ensemble else "")


def _mean_p_bad(subject: Subject, targets: list[Target]) -> float:
    from rca.model.metric import evaluate_many

    return float(np.mean([v.p_bad for v in evaluate_many(subject.model, targets)]))


def _load_checkpoint(path: Path, subject: Subject, device: str) -> Subject:
    """A checkpoint of ``subject``'s model, refused where its tokenizer is another."""
    subj = load_subject(path, device=device)
    if subj.tokenizer.get_vocab() != subject.tokenizer.get_vocab():
        raise InfluenceError(
            f"checkpoint {path} has another tokenizer than the run's model; its "
            "checkpoints must share the model's tokenizer"
        )
    return subj


def _learning_p_bad(
    subject: Subject, members: list[Any], targets: list[Target], device: str
) -> list[float]:
    """The mean P(bad) over the query prompts at each checkpoint, then at the model itself:
    the learning rule's weights need them all before any checkpoint is scored."""
    out = [_mean_p_bad(_load_checkpoint(c.path, subject, device), targets) for c in members]
    return [*out, _mean_p_bad(subject, targets)]


def _tracin_weights(members: list[Any], model_path: Path | None) -> tuple[np.ndarray, str]:
    """The ``tracin`` rule's weights of ``members`` and the model itself (last), from the
    schedule in ``model_path``'s directory (``tracin_weights``), and where they came from."""
    from rca.provenance.ensemble import tracin_weights, training_schedule

    final_step, lr = training_schedule(model_path)
    return tracin_weights([*(c.step for c in members), None], final_step, lr)


def _ensemble(
    subject: Subject,
    members: list[Any],
    targets: list[Target],
    scored: Any,
    final: tuple[Features, np.ndarray],
    rule: str,
    device: str,
    learned: list[float] | None,
    traced: tuple[np.ndarray, str] | None = None,
) -> dict[str, Any]:
    """The scores of each checkpoint in ``members`` beside the model's own (``final``),
    combined by ``rule``, and what each contributed, for the summary. Each checkpoint is loaded
    once more: under ``sum`` and ``tracin`` its P(bad) is measured as it is scored; under
    ``learning`` every P(bad) was measured first (``learned``, from ``_learning_p_bad``). A
    checkpoint of weight 0 is not scored (its scores would be multiplied by 0). Under
    ``tracin`` the weights and where they came from are ``traced`` (``_tracin_weights``)."""
    from rca.provenance.ensemble import Checkpoint, combine, learning_weights

    everyone = [*members, Checkpoint(Path("."), None, final=True)]
    p_bad: list[float | None] = [None] * len(everyone)
    weights = np.ones(len(everyone))
    weights_from = None
    if rule == "learning":
        assert learned is not None and len(learned) == len(everyone)
        p_bad = list(learned)
        weights = learning_weights(learned)
    elif rule == "tracin":
        assert traced is not None and len(traced[0]) == len(everyone)
        weights, weights_from = traced
    rows: list[dict[str, Any]] = []
    scores: list[np.ndarray] = []
    for i, (c, w) in enumerate(zip(everyone, weights, strict=True)):
        row: dict[str, Any] = {
            "checkpoint": c.label(),
            "step": c.step,
            "path": None if c.final else str(c.path),
            "weight": float(w),
        }
        rows.append(row)
        if w == 0:
            scores.append(np.zeros_like(final[1]))
            if p_bad[i] is None:  # shown beside the others
                subj = subject if c.final else _load_checkpoint(c.path, subject, device)
                p_bad[i] = _mean_p_bad(subj, targets)
        else:
            subj = subject if c.final else _load_checkpoint(c.path, subject, device)
            if p_bad[i] is None:
                p_bad[i] = _mean_p_bad(subj, targets)
            feats, sc, q_s = final[0], final[1], 0.0
            if not c.final:
                feats, sc, q_s = scored(subj, c.path)
            del subj
            scores.append(sc)
            row |= {
                "features_key": feats.key,
                "features_cached": feats.cached,
                "features_seconds": feats.seconds,
                "query_seconds": q_s,
                "score_std": float(np.std(sc)),
            }
        row["p_bad"] = p_bad[i]
    measured = [float(p) for p in p_bad if p is not None]
    assert len(measured) == len(everyone)  # every member measured, scored or weighed
    out = {"rule": rule, "members": rows, "scores": combine(scores, measured, rule, weights)}
    if weights_from is not None:
        out["weights_from"] = weights_from
    return out


def provenance_for_run(
    store: Any,
    run_id: str,
    data_path: Path,
    *,
    cfg: InfluenceConfig,
    top_k: int = 20,
    text_field: str = "text",
    limit: int | None = None,
    model: str | None = None,
    device: str = "cpu",
    home: Path | None = None,
    cache_root: Path | None = None,
    subject: Subject | None = None,
    unlearn: UnlearnConfig | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    checkpoints: str = "auto",
    ensemble: str = "auto",
) -> ProvenanceResult:
    """Rank the training examples at ``data_path`` by their influence on run ``run_id``'s
    incident, over its circuit's parameters (``cfg.scope``), and record the top ``top_k``.
    ``subject``: the run's model, already loaded (else it is loaded here). ``unlearn``: also
    unlearn the top ``top_k`` and as many random examples, and measure the incident after each
    (``rca.provenance.unlearn``: an approximation of retraining), recorded in the summary.
    ``workers``: the features' gradients on that many Ray actors, each loading the run's model
    from its path (``rca.provenance.distributed``). ``checkpoints``: the model's training
    checkpoints to take the influence over as well (``rca.provenance.ensemble``: ``auto``,
    ``none`` or directories), their scores combined by the rule ``ensemble`` (``auto``: TracIn
    where there are checkpoints, ``resolve_rule``)."""
    from rca.model.files import check_dir
    from rca.model.subject import resolve_model_ref
    from rca.monitor.workflow import run_subject, stored_incident
    from rca.provenance.ensemble import check_rule, find_checkpoints, resolve_rule
    from rca.zoo.build import zoo_home

    cfg.check()
    if unlearn is not None:
        unlearn.check()
    if workers < 0:
        raise InfluenceError(f"--workers must be 0 or more, got {workers}")
    if workers:
        from rca.provenance.distributed import require_ray

        require_ray()
    if top_k < 1:
        raise InfluenceError(f"--top must be at least 1, got {top_k}")
    check_rule(ensemble)
    run = store.get_run(run_id)
    incident = stored_incident(run)
    summary = run.get("summary") or {}
    circuit = circuit_of(summary) if cfg.scope == "circuit" else []
    model_path: Path | None = None
    # tracin (and auto, which may be it) reads its schedule from the model's directory
    if workers or checkpoints.strip() == "auto" or ensemble in ("auto", "tracin"):
        try:
            model_path = (
                resolve_model_ref(model, home=home) if model else incident.model_path(home=home)
            )
        except ValueError:  # an in-memory model's run (IncidentError is one): no directory
            if workers:
                raise
    members = find_checkpoints(model_path, checkpoints)
    if ensemble == "tracin" and not members:
        from rca.provenance.ensemble import no_checkpoints_error

        raise no_checkpoints_error()
    rule = resolve_rule(ensemble, bool(members))
    # the tracin weights may refuse (steps out of order): before anything loads
    traced = _tracin_weights(members, model_path) if members and rule == "tracin" else None
    for c in members:
        check_dir(c.path, allow_pickle=False)
    data = load_training_data(data_path, text_field=text_field, limit=limit)
    if len(data) == 0:
        raise InfluenceError(f"--data {data_path}: no examples")
    t0 = time.perf_counter()
    if subject is None:
        subject = run_subject(incident, model=model, device=device, home=home)
    params = (
        circuit_parameters(subject, circuit)
        if cfg.scope == "circuit"
        else [n for n, _ in subject.model.named_parameters()]
    )
    root = cache_root or zoo_home(home) / CACHE_DIR
    targets, queries = incident_targets(subject, incident)

    def scored(
        subj: Subject, path: Path | None, kind: str = "trak"
    ) -> tuple[Features, np.ndarray, float]:
        loader = partial(load_subject, path, device=device, home=home) if workers and path else None
        feats = featurize(
            subj,
            data.texts,
            data_sha256=data.sha256,
            params=params,
            cfg=cfg,
            cache_root=root,
            workers=workers,
            loader=loader,
            ray_address=ray_address,
        )
        t = time.perf_counter()
        return feats, query_scores(subj, feats, targets, kind=kind), time.perf_counter() - t

    learned = None
    if members and rule == "learning":  # its weights may refuse: before any features
        from rca.provenance.ensemble import learning_weights, no_rise_error

        learned = _learning_p_bad(subject, members, targets, device)
        if not learning_weights(learned).any():
            raise no_rise_error()
    features, scores, query_seconds = scored(subject, model_path)
    ens = None
    if members:
        final = (features, scores)
        by_kind = partial(scored, kind="tracin") if rule == "tracin" else scored
        ens = _ensemble(subject, members, targets, by_kind, final, rule, device, learned, traced)
        scores = ens.pop("scores")
    order = np.argsort(-scores, kind="stable")[: min(top_k, len(data))]
    top = [
        {
            "index": int(i),
            "score": float(scores[i]),
            "text": data.texts[i][:TEXT_CHARS],
            "fields": {k: v[i] for k, v in data.fields.items()},
        }
        for i in order
    ]
    summ = _summary(data, top, scores)
    summ["features_cached"] = features.cached
    summ["features_seconds"] = features.seconds
    summ["query_seconds"] = query_seconds
    if ens is not None:
        summ["ensemble"] = ens
    if unlearn is not None:
        summ["unlearning"] = _unlearning(subject, incident, params, data, top, unlearn)
    seconds = time.perf_counter() - t0
    method = method_name(cfg.scope, rule if members else None)
    query_id = store.record_provenance(
        run_id=run["run_id"],
        incident_id=incident.id,
        features=features.meta() | {"path": str(features.path), "data_path": str(data.path)},
        method=method,
        circuit=circuit,
        queries=queries,
        examples=top,
        seconds=seconds,
        summary=summ,
    )
    return ProvenanceResult(
        query_id=query_id,
        run_id=run["run_id"],
        incident_id=incident.id,
        method=method,
        circuit=circuit,
        features=features,
        scores=scores,
        top=top,
        queries=queries,
        summary=summ,
        seconds=seconds,
    )
