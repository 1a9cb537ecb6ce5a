"""Regress: re-check recorded incidents on a new checkpoint and classify each by mechanism.

After a retrain the question is not only "does the bad output come back?" but "is it the same
mechanism?". For each incident ``regress``:

1. measures the behaviour on the new model with one forward pass: P(bad) under ``fixed_below``
   (0.2) means ``fixed``, and nothing is traced. A case with variants is judged on its held-out
   variants instead (batched, ``evaluate_many``): ``fixed`` where P(bad) is under
   ``fixed_below`` on at least ``HOLD_SHARE`` (90%) of them, as a fix must hold, and the share
   on which it is back is recorded;
2. where it persists, re-traces and re-confirms it (``rca.investigate`` without remedies) and
   compares the mechanism with the *reference run*, the latest recorded investigation of the
   incident on another model (investigated first, on the case's own model or
   ``baseline_model``, when the store has none): the Jaccard overlap of the confirmed cause
   sets, of the top-k components by attribution, and the Spearman correlation of all head and
   MLP scores. Component ids name the same components in checkpoints of one training run;
3. classifies: ``fixed``; ``reappeared`` (the latest earlier regression run of the incident
   said ``fixed``, and it is back); ``persists_same_mechanism`` (cause-set Jaccard >=
   ``same_jaccard``, 0.5; where either run has no confirmed set, top-k Jaccard >= 0.5 and
   Spearman >= 0.7 instead); otherwise ``persists_new_mechanism``;
4. with ``baseline_model`` (the previous checkpoint), attributes the incident to each
   component's *weight change*: first order, the gradient of the metric with respect to the
   component's weights on the new model times W_new - W_old; then exactly, for the strongest
   ``weight_top``, the metric drop when that component's weights are reverted to the old ones;
5. records a run of kind ``regress`` per incident, linked to the reference run
   (``parent_run_id``), in one transaction each.

``--workers N`` runs the per-incident work on Ray workers (``pip install rca[ray]``); the
driver alone writes the store, and every worker uses the driver's torch thread count, so the
numbers equal a serial run's.

One module over 500 lines: re-running, classifying and attributing a regression share the
recorded run they start from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rca.ingest.case_file import loads_case, parse_case_data
from rca.ingest.incident import Incident, IncidentError
from rca.investigate import InvestigateConfig, investigate
from rca.model.adapter import as_out_in, weight_of
from rca.model.metric import Target, evaluate, evaluate_many, logits_kwargs
from rca.model.subject import Subject, load_subject
from rca.remedy import HOLD_SHARE
from rca.stats import spearman

__all__ = [
    "CLASSES",
    "RegressConfig",
    "RegressError",
    "RegressResult",
    "Mechanism",
    "classify",
    "jaccard",
    "regress",
    "regress_case",
    "weight_change",
    "component_masks",
    "held_out_check",
]

CLASSES = ("fixed", "persists_same_mechanism", "persists_new_mechanism", "reappeared")
Say = Callable[[str], None]


class RegressError(ValueError):
    """A regression check that cannot run as asked."""


@dataclass(frozen=True)
class RegressConfig:
    """Thresholds of the classification; recorded with every regression run."""

    fixed_below: float = 0.2  # P(bad) on the new model under this: fixed
    same_jaccard: float = 0.5  # cause-set overlap for "same mechanism"
    top_k: int = 5  # components compared by attribution rank
    top_jaccard: float = 0.5  # fallback rule, when a run has no confirmed cause set
    min_spearman: float = 0.7
    weight_top: int = 8  # components verified exactly by reverting their weights
    investigate: InvestigateConfig = field(
        default_factory=lambda: InvestigateConfig(remedy=False, device="cpu")
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


@dataclass(frozen=True)
class Mechanism:
    """What one run says about how the incident works."""

    run_id: str | None
    model_fingerprint: str
    verdict: str
    cause_set: tuple[str, ...]
    scores: dict[str, float]  # head and MLP attribution scores

    def top(self, k: int) -> list[str]:
        return [c for c, _ in sorted(self.scores.items(), key=lambda t: (-abs(t[1]), t[0]))][:k]

    @classmethod
    def from_stored(cls, run: dict[str, Any]) -> Mechanism:
        s = run.get("summary") or {}
        scores = {
            n["node_id"]: float(n["score"])
            for n in run.get("nodes", [])
            if n.get("kind") in ("head", "mlp")
        }
        return cls(
            run_id=run["run_id"],
            model_fingerprint=run["model_fingerprint"],
            verdict=str(s.get("verdict")),
            cause_set=tuple(s.get("cause_set") or ()),
            scores=scores,
        )

    @classmethod
    def from_case_run(cls, run: Any) -> Mechanism:
        comps = run.attribution.components
        scores = {
            c: float(v)
            for c, v in zip(comps.nodes, comps.scores.tolist(), strict=True)
            if c != "EMB"
        }
        return cls(
            run_id=run.run_id,
            model_fingerprint=run.subject.fingerprint,
            verdict=run.verdict.verdict,
            cause_set=tuple(run.verdict.cause_set.components),
            scores=scores,
        )


def compare(ref: Mechanism, new: Mechanism, cfg: RegressConfig) -> dict[str, Any]:
    """The overlap of two mechanisms and whether they are the same by ``cfg``'s rule."""
    common = sorted(set(ref.scores) & set(new.scores))
    rho: float | None = (
        spearman([ref.scores[c] for c in common], [new.scores[c] for c in common])
        if len(common) >= 3
        else None
    )
    if rho is not None and not math.isfinite(rho):
        rho = None  # constant scores: no ranking to correlate (and JSON has no NaN)
    jc = jaccard(ref.cause_set, new.cause_set)
    jt = jaccard(ref.top(cfg.top_k), new.top(cfg.top_k))
    both = ref.verdict == "confirmed" and new.verdict == "confirmed"
    if both:
        same = jc >= cfg.same_jaccard
        rule = f"cause-set Jaccard {jc:.2f} {'>=' if same else '<'} {cfg.same_jaccard}"
    else:
        same = jt >= cfg.top_jaccard and rho is not None and rho >= cfg.min_spearman
        rs = "n/a" if rho is None else f"{rho:.2f}"
        rule = (
            f"a run has no confirmed cause set: top-{cfg.top_k} Jaccard {jt:.2f} "
            f"(>= {cfg.top_jaccard}?) and Spearman {rs} (>= {cfg.min_spearman}?)"
        )
    return {
        "jaccard_cause_set": jc,
        "jaccard_top_k": jt,
        "spearman": rho,
        "same_mechanism": same,
        "rule": rule,
    }


# ---------------------------------------------------------------------------------------------
# weight change


_QKV: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj"),
    "phi": ("q_proj", "k_proj", "v_proj"),
}


def _out_rows(mod: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """A mask over ``mod``'s weight that marks the output units ``idx``."""
    m = torch.zeros_like(weight_of(mod), dtype=torch.bool)
    as_out_in(mod, m)[idx] = True
    return m


def component_masks(subject: Subject) -> dict[str, dict[str, torch.Tensor]]:
    """Which parameter entries each head and MLP owns: component -> {parameter name: mask}.

    A head owns its slice of the attention output projection and its query rows, and its key
    and value rows where it has its own (no grouped-query sharing); GPT-2's fused ``c_attn``
    columns likewise. An MLP owns every parameter of its MLP module. Norms, embeddings and
    shared k/v rows belong to no component (``weight_change`` reports their share as other).
    """
    a = subject.adapter
    names = {id(p): n for n, p in subject.model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    dh = a.d_head
    for layer in range(a.n_layers):
        o = a.attn_out(layer)
        ow = weight_of(o)
        attn = getattr(a.layer(layer), "attn", None) or getattr(a.layer(layer), "self_attn", None)
        for h in range(a.n_heads):
            unit = torch.arange(h * dh, (h + 1) * dh)
            m: dict[str, torch.Tensor] = {}
            om = torch.zeros_like(ow, dtype=torch.bool)
            as_out_in(o, om)[:, unit] = True
            m[names[id(ow)]] = om
            if a.model_type == "gpt2" and attn is not None:
                d = a.n_heads * dh
                fused = attn.c_attn
                idx = torch.cat([unit, unit + d, unit + 2 * d])
                m[names[id(fused.weight)]] = _out_rows(fused, idx)
                if fused.bias is not None:
                    bm = torch.zeros_like(fused.bias, dtype=torch.bool)
                    bm[idx] = True
                    m[names[id(fused.bias)]] = bm
            elif a.model_type in _QKV and attn is not None:
                own_kv = a.n_kv_heads == a.n_heads
                for proj in _QKV[a.model_type]:
                    if proj != "q_proj" and not own_kv:
                        continue
                    mod = getattr(attn, proj, None)
                    if mod is None:
                        continue
                    m[names[id(mod.weight)]] = _out_rows(mod, unit)
                    if getattr(mod, "bias", None) is not None:
                        bm = torch.zeros_like(mod.bias, dtype=torch.bool)
                        bm[unit] = True
                        m[names[id(mod.bias)]] = bm
            out[f"L{layer}.H{h}"] = m
        out[f"L{layer}.MLP"] = {
            names[id(p)]: torch.ones_like(p, dtype=torch.bool) for p in a.mlp(layer).parameters()
        }
    return out


def weight_change(
    new: Subject,
    old: Subject,
    target: Target,
    *,
    top: int = 8,
) -> dict[str, Any]:
    """Attribute the incident metric on ``new`` to each component's weight change from ``old``.

    First order: sum over the component's entries of dmetric/dW (at the new weights) times
    (W_new - W_old). Exact, for the ``top`` components by |first order|: the metric drop when
    that component's entries alone are reverted to the old values. Ranked by the exact drop.
    """
    if new.adapter.model_type != old.adapter.model_type or new.adapter.dims() != old.adapter.dims():
        raise RegressError(
            "the baseline model has another architecture or size; weight changes compare "
            "checkpoints of one model"
        )
    new_p = dict(new.model.named_parameters())
    old_p = {n: p.detach().to(new.device) for n, p in old.model.named_parameters()}
    if set(new_p) != set(old_p):
        raise RegressError("the two checkpoints have different parameter names")
    masks = component_masks(new)
    # first order
    new.model.zero_grad(set_to_none=True)
    frozen = [p for p in new_p.values() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            ids = target.input_ids(device=new.device)
            kw = logits_kwargs(new.model, target)
            metric = target.metric(new.model(input_ids=ids, use_cache=False, **kw).logits)[0]
            metric.backward()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    contrib = {
        n: (p.grad.float() * (p.detach().float() - old_p[n].float()))
        if p.grad is not None
        else torch.zeros_like(p, dtype=torch.float32)
        for n, p in new_p.items()
    }
    new.model.zero_grad(set_to_none=True)
    total = float(sum(float(c.sum()) for c in contrib.values()))
    first = {
        comp: float(sum(float(contrib[n][m].sum()) for n, m in ms.items()))
        for comp, ms in masks.items()
    }
    covered = sum(first.values())
    m_new = evaluate(new.model, target).metric
    order = sorted(first, key=lambda c: (-abs(first[c]), c))[:top]
    exact: dict[str, float] = {}
    with torch.no_grad():
        for comp in order:
            saved = {n: new_p[n].detach().clone() for n in masks[comp]}
            try:
                for n, m in masks[comp].items():
                    new_p[n].data[m] = old_p[n][m].to(new_p[n].dtype)
                exact[comp] = m_new - evaluate(new.model, target).metric
            finally:
                for n, v in saved.items():
                    new_p[n].data.copy_(v)
    ranked = sorted(exact, key=lambda c: (-exact[c], c))
    return {
        "metric_new": m_new,
        "first_order_total": total,
        "first_order_other": total - covered,
        "components": [
            {"id": c, "first_order": first[c], "revert_drop": exact[c], "rank": i + 1}
            for i, c in enumerate(ranked)
        ],
        "ranked": ranked,
    }


# ---------------------------------------------------------------------------------------------
# one incident


@dataclass
class RegressResult:
    case_id: str
    title: str
    severity: str
    classification: str
    reason: str
    new_model: str
    p_bad_new: float
    metric_new: float
    reference_run_id: str | None
    reference_model: str | None
    p_bad_reference: float | None
    cause_set_reference: list[str]
    cause_set_new: list[str]
    top_reference: list[str]
    top_new: list[str]
    comparison: dict[str, Any] | None
    weight_change: dict[str, Any] | None = None
    run_id: str | None = None
    seconds: float = 0.0
    # a case with variants: the held-out variants it is judged on (n, how many and which share
    # are back, and each one's P(bad) on the new model); None for a single prompt
    held_out: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def persists(self) -> bool:
        return self.classification != "fixed"


def classify(persists: bool, was_fixed: bool, same: bool | None) -> tuple[str, str]:
    """An incident's class (one of ``CLASSES``) and the reason, from whether the behaviour
    persists, whether the last regression check found it fixed, and whether it runs through
    the reference run's mechanism (``compare``; None where it was not compared)."""
    if not persists:
        return "fixed", "P(bad) on the new model is under the threshold"
    if was_fixed:
        return "reappeared", "the last regression check found it fixed; it is back"
    if same:
        return "persists_same_mechanism", "the behaviour persists through the same components"
    return "persists_new_mechanism", "the behaviour persists through other components"


def regress_case(
    incident: Incident,
    subject: Subject,
    reference: Mechanism,
    *,
    was_fixed: bool,
    config: RegressConfig,
    baseline: Subject | None = None,
    p_bad_reference: float | None = None,
) -> tuple[RegressResult, Any]:
    """Classify one incident on ``subject`` against the ``reference`` run; no store access
    (so it can run on a worker). Returns the result and the new ``CaseRun`` (None when fixed)."""
    t0 = time.perf_counter()
    target = incident.encode(subject)
    now = evaluate(subject.model, target)
    persists = now.p_bad >= config.fixed_below
    held = held_out_check(incident, subject, fixed_below=config.fixed_below)
    if held is not None:
        persists = 1.0 - held["share_back"] < HOLD_SHARE
    case_run = None
    comparison = None
    cause_new: list[str] = []
    top_new: list[str] = []
    if persists:
        case_run = investigate(incident, subject=subject, config=config.investigate)
        mech = Mechanism.from_case_run(case_run)
        comparison = compare(reference, mech, config)
        cause_new, top_new = list(mech.cause_set), mech.top(config.top_k)
    cls, why = classify(persists, was_fixed, comparison["same_mechanism"] if comparison else None)
    if comparison:
        why += f" ({comparison['rule']})"
    wc = None
    if baseline is not None and persists:
        wc = weight_change(subject, baseline, target, top=config.weight_top)
    said = f"P(bad) = {now.p_bad:.3f} (threshold {config.fixed_below})"
    if held is not None:
        said = (
            f"back on {held['back']} of {held['n']} held-out variants ({held['share_back']:.0%}; "
            f"fixed where P(bad) is under {config.fixed_below} on at least {HOLD_SHARE:.0%}); "
            f"on the case's prompt {said}"
        )
    result = RegressResult(
        case_id=incident.id,
        title=incident.title,
        severity=incident.severity,
        classification=cls,
        reason=f"{why}; {said}",
        new_model=str(subject.fingerprint),
        p_bad_new=now.p_bad,
        metric_new=now.metric,
        reference_run_id=reference.run_id,
        reference_model=reference.model_fingerprint,
        p_bad_reference=p_bad_reference,
        cause_set_reference=list(reference.cause_set),
        cause_set_new=cause_new,
        top_reference=reference.top(config.top_k),
        top_new=top_new,
        comparison=comparison,
        weight_change=wc,
        seconds=time.perf_counter() - t0,
        held_out=held,
    )
    return result, case_run


def held_out_check(
    incident: Incident, subject: Subject, *, fixed_below: float
) -> dict[str, Any] | None:
    """The incident on its held-out variants: how many there are, on how many (and which
    share) P(bad) is at or above ``fixed_below``, and each one's P(bad). None for a case
    without variants. Raises IncidentError naming a variant that cannot be encoded."""
    members = incident.behaviour().held_out
    if not members:
        return None
    targets = []
    for m in members:
        try:
            targets.append(m.incident.for_model(subject.tokenizer).encode(subject))
        except IncidentError as e:
            raise m.error(e) from None
    values = evaluate_many(subject.model, targets)
    back = [v.p_bad >= fixed_below for v in values]
    return {
        "n": len(values),
        "back": sum(back),
        "share_back": sum(back) / len(values),
        "per_variant": [
            {"index": m.index, "p_bad": v.p_bad} for m, v in zip(members, values, strict=True)
        ],
    }


# ---------------------------------------------------------------------------------------------
# many incidents, against the store


def _reference_run(store: Any, incident_id: str, new_fp: str) -> dict[str, Any] | None:
    for r in store.list_runs(incident=incident_id, kind="investigate", status="ok"):
        if r["model_fingerprint"] != new_fp:
            return store.get_run(r["run_id"])
    return None


def _was_fixed(store: Any, incident_id: str, new_fp: str) -> bool:
    for r in store.list_runs(incident=incident_id, kind="regress", status="ok"):
        if r["model_fingerprint"] == new_fp:
            continue  # a re-check of this same model says nothing about an earlier fix
        return (r.get("summary") or {}).get("classification") == "fixed"
    return False


def _stored_source(source: Any) -> str:
    """The source a rebuilt incident gets: a case file's absolute path stays (its directory
    resolves a relative ``model``); anything else becomes a label, so that a relative model is
    refused rather than resolved against the directory ``regress`` happens to run in (a source
    recorded as a relative path, or ``<flags>``, names no directory that can be found again)."""
    if isinstance(source, str) and source and Path(source).is_absolute():
        return source
    if isinstance(source, str) and source and not source.startswith("<"):
        return f"<store: {source}>"
    return "<store>"


def _stored_incident(row: dict[str, Any]) -> Incident:
    """One stored incident version, rebuilt: from its TOML where it came from a case file, else
    from its stored fields (an incident stated with flags, or recorded from a mapping)."""
    source = _stored_source(row.get("source"))
    text = row.get("case_toml")
    if isinstance(text, str):
        return loads_case(text, source=source)
    data = row.get("case_data")
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict):
        raise TypeError(f"its stored fields are {type(data).__name__}, not a mapping")
    # to_dict() keeps absent optional fields as null; a case file leaves them out
    return parse_case_data({k: v for k, v in data.items() if v is not None}, source=source)


def incidents_from_store(store: Any) -> list[Incident]:
    """The latest version of every incident the store holds: parsed from its stored TOML, or
    rebuilt from its stored fields where it has none (an incident recorded from flags).

    Raises RegressError (one line, naming the incident) when a stored incident cannot be
    rebuilt."""
    latest: dict[str, dict[str, Any]] = {}
    for row in store.list_incidents():  # oldest first: the last version of an id wins
        latest[row["incident_id"]] = row
    out = []
    for incident_id, row in latest.items():
        try:
            out.append(_stored_incident(row))
        except (IncidentError, TypeError, ValueError) as e:
            raise RegressError(
                f"stored incident {incident_id!r} cannot be rebuilt from the store: {e}"
            ) from None
    return out


def remote_case(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The per-incident work on a Ray worker: load, classify, return plain data."""
    from rca.store.from_run import to_run_record

    torch.set_num_threads(payload["threads"])
    cfg: RegressConfig = payload["config"]
    inv = cfg.investigate
    subject = load_subject(payload["model"], device=inv.device, allow_pickle=inv.allow_pickle)
    baseline = (
        load_subject(payload["baseline"], device=inv.device, allow_pickle=inv.allow_pickle)
        if payload["baseline"]
        else None
    )
    res, case_run = regress_case(
        payload["incident"],
        subject,
        payload["reference"],
        was_fixed=payload["was_fixed"],
        config=cfg,
        baseline=baseline,
        p_bad_reference=payload["p_bad_reference"],
    )
    rec = None
    if case_run is not None:
        rec = to_run_record(case_run, kind="regress", parent_run_id=res.reference_run_id)
    return res.to_json(), None if rec is None else {"record": rec}


def regress(
    model: str | Path,
    incidents: Sequence[Incident],
    store: Any,
    *,
    baseline_model: str | Path | None = None,
    config: RegressConfig | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    home: Path | None = None,
    say: Say | None = None,
) -> list[RegressResult]:
    """Re-check ``incidents`` on ``model`` against their reference runs in ``store``.

    A reference run is the latest recorded investigation of the incident on another model; an
    incident without one is first investigated on ``baseline_model`` (else its own model) and
    recorded. One loaded model serves every incident. Each result is recorded as a run of kind
    ``regress`` linked to its reference run.
    """
    from rca.model.subject import resolve_model_ref
    from rca.store import IncidentRecord, ModelRecord, RunRecord
    from rca.store.from_run import to_run_record

    cfg = config or RegressConfig()
    log = say or (lambda m: None)
    if not incidents:
        raise RegressError("no incidents to check; give --cases DIR or record some first")
    if workers and workers > 0:
        from rca.ray_pool import import_ray

        ray = import_ray(RegressError)
    inv = cfg.investigate
    new_path = resolve_model_ref(str(model), home=home)
    subject = load_subject(new_path, device=inv.device, allow_pickle=inv.allow_pickle)
    base_path = resolve_model_ref(str(baseline_model), home=home) if baseline_model else None
    baseline = (
        load_subject(base_path, device=inv.device, allow_pickle=inv.allow_pickle)
        if base_path
        else None
    )
    own_models: dict[Path, Subject] = {}

    # references, in the driver (it alone writes the store)
    plan = []
    for inc in incidents:
        ref_run = _reference_run(store, inc.id, str(subject.fingerprint))
        if ref_run is None:
            if baseline is not None:
                ref_subject = baseline
            else:
                try:
                    p = inc.model_path(home=home)
                except IncidentError as e:
                    raise RegressError(
                        f"{inc.id}: no recorded run on another model, and its own model cannot "
                        f"be found ({e}); give --baseline-model OLD"
                    ) from None
                if p not in own_models:
                    own_models[p] = load_subject(
                        p, device=inv.device, allow_pickle=inv.allow_pickle
                    )
                ref_subject = own_models[p]
            if ref_subject.fingerprint == subject.fingerprint:
                raise RegressError(
                    f"{inc.id}: no recorded run on another model, and its own model is the new "
                    "one; give --baseline-model OLD"
                )
            log(f"{inc.id}: no reference run; investigating it on the reference model first")
            ref_cfg = replace(cfg.investigate, remedy=True)
            run = investigate(inc, subject=ref_subject, store=store, config=ref_cfg)
            ref_run = store.get_run(run.run_id)
        mech = Mechanism.from_stored(ref_run)
        p_ref = (ref_run.get("summary") or {}).get("p_bad_before")
        plan.append((inc, mech, _was_fixed(store, inc.id, str(subject.fingerprint)), p_ref))

    results: list[RegressResult] = []
    records: list[Any] = []
    if workers and workers > 0:
        from rca.ray_pool import start_ray

        start_ray(ray, workers, ray_address)
        remote = ray.remote(num_cpus=1)(remote_case)
        threads = torch.get_num_threads()
        futures = [
            remote.remote(
                {
                    "incident": inc,
                    "reference": mech,
                    "was_fixed": was_fixed,
                    "p_bad_reference": p_ref,
                    "config": cfg,
                    "model": str(new_path),
                    "baseline": str(base_path) if base_path else None,
                    "threads": threads,
                }
            )
            for inc, mech, was_fixed, p_ref in plan
        ]
        for res_json, rec in ray.get(futures):
            results.append(RegressResult(**res_json))
            records.append(rec["record"] if rec else None)
    else:
        for inc, mech, was_fixed, p_ref in plan:
            log(f"{inc.id}: checking")
            res, case_run = regress_case(
                inc,
                subject,
                mech,
                was_fixed=was_fixed,
                config=cfg,
                baseline=baseline,
                p_bad_reference=p_ref,
            )
            results.append(res)
            records.append(
                None
                if case_run is None
                else to_run_record(case_run, kind="regress", parent_run_id=res.reference_run_id)
            )

    for inc, res, rec in zip([p[0] for p in plan], results, records, strict=True):
        extra = {
            "classification": res.classification,
            "regress": res.to_json(),
            "regress_config": cfg.to_json(),
        }
        if rec is None:
            rec = RunRecord(
                incident=IncidentRecord.from_incident(inc),
                model=ModelRecord.from_subject(subject),
                kind="regress",
                parent_run_id=res.reference_run_id,
                config={"regress": cfg.to_json()},
                device=str(subject.device),
                seed=cfg.investigate.seed,
                timings={"measure": res.seconds},
                summary={
                    "verdict": "fixed",
                    "p_bad_before": res.p_bad_new,
                    "metric_before": res.metric_new,
                    **extra,
                },
            )
        else:
            rec = replace(rec, summary={**rec.summary, "p_bad_before": res.p_bad_new, **extra})
        res.run_id = store.record_run(rec)
        log(f"{inc.id}: {res.classification}")
    return results
