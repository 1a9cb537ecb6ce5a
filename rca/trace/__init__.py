"""Trace: where the bad continuation comes from.

``trace(subject, incident)`` runs, in order:

1. segment ablation over the prompt's words;
2. the baseline: the case's counterfactual when it lines up with the prompt token for token,
   else an automatic counterfactual (``counterfactual.py``), else mean activations over the
   reference prompts; a caller's ``check_baseline`` sees it here, before the costly steps, so
   that a run that cannot succeed stops within seconds;
3. token attribution (integrated gradients over the embeddings, from the counterfactual prompt
   where the baseline is one, else from neutral tokens);
4. component and edge scores (``components.py``: AtP or EAP-IG);
5. the attribution graph, pruned, with its top paths (``graph.py``).

The result's ``to_json()`` is the stable shape that ``rca trace --json`` prints
(docs/methods.md lists its keys).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from rca.ingest.incident import Incident
from rca.model.ids import parse_id
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.components import (
    Baseline,
    ComponentScores,
    TraceError,
    score_components,
    site_means,
)
from rca.trace.counterfactual import Counterfactual, auto_counterfactual, drop_fraction
from rca.trace.graph import build_graph, edge_table, prune_graph, top_paths, write_graph
from rca.trace.memory import MemoryPlan, plan_for_target, plan_trace
from rca.trace.tokens import SegmentScores, TokenScores, integrated_gradients, segment_ablation

__all__ = [
    "Attribution",
    "Baseline",
    "ComponentScores",
    "Counterfactual",
    "TraceError",
    "trace",
    "score_components",
    "integrated_gradients",
    "segment_ablation",
    "auto_counterfactual",
    "build_graph",
    "prune_graph",
    "top_paths",
    "write_graph",
    "site_means",
    "MemoryPlan",
    "plan_for_target",
    "plan_trace",
]

Progress = Callable[[str, float], None]

# ablated prompts per forward in segment ablation (within the memory plan's inference batch),
# by whether the device is a GPU: on 2 CPU cores, a 12 x 768 GPT-2 at 128 tokens ablated its
# 128 words 1.6-1.9x faster 8 at a time than one at a time, with the same scores
SEGMENT_BATCH = {False: 8, True: 64}


@dataclass
class Attribution:
    """Everything the trace stage found for one incident on one model."""

    incident_id: str
    method: str
    target: Target
    tokens: TokenScores
    segments: SegmentScores
    counterfactual: Counterfactual | None
    baseline: Baseline
    components: ComponentScores
    graph: nx.DiGraph
    pruned: nx.DiGraph
    paths: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    memory: MemoryPlan | None = None

    def to_json(self, *, top_k: int = 20) -> dict[str, Any]:
        comps = self.components
        n_layers = max((d["layer"] for _, d in self.graph.nodes(data=True)), default=0)
        ranked = []
        for cid, score in comps.ranked():
            c = parse_id(cid)
            ranked.append(
                {
                    "id": cid,
                    "kind": c.kind if c.kind in ("head", "mlp") else "emb",
                    "layer": -1 if c.layer is None else c.layer,
                    "score": score,
                }
            )
        cf = self.counterfactual
        return {
            "case_id": self.incident_id,
            "method": self.method,
            "baseline": comps.baseline,
            "metric": {"prompt": comps.metric_clean, "baseline": comps.metric_baseline},
            "tokens": [
                {"position": i, "token": t, "score": s}
                for i, (t, s) in enumerate(zip(self.tokens.tokens, self.tokens.scores, strict=True))
            ],
            "token_baseline": self.tokens.baseline,
            "token_completeness": self.tokens.completeness,
            "segments": [
                {"start": s, "end": e, "text": t, "score": v, "template": tm}
                for (s, e), t, v, tm in zip(
                    self.segments.segments,
                    self.segments.texts,
                    self.segments.scores,
                    self.segments.template or [False] * len(self.segments.scores),
                    strict=True,
                )
            ],
            "components": ranked,
            "neurons": [
                {"id": k, "score": v}
                for k, v in sorted(comps.neurons.items(), key=lambda kv: -abs(kv[1]))[:top_k]
            ],
            "edges": edge_table(comps, k=top_k),
            "counterfactual": None if cf is None else cf.to_json(),
            "graph": {
                "n_layers": n_layers,
                "nodes": self.graph.number_of_nodes(),
                "edges": self.graph.number_of_edges(),
                "pruned_nodes": self.pruned.number_of_nodes(),
                "pruned_edges": self.pruned.number_of_edges(),
                "top_paths": self.paths,
            },
            "cost": {
                **comps.cost,
                "timings": self.timings,
                "memory": None if self.memory is None else self.memory.to_json(),
            },
        }


def given_counterfactual(subject: Subject, incident: Incident, target: Target) -> Counterfactual:
    """The case's own counterfactual (rendered, for a chat incident), with its metric; ``ok``
    where it lines up with the prompt token for token."""
    assert incident.counterfactual is not None
    from rca.model.metric import encode_text, evaluate

    ids = tuple(encode_text(subject.tokenizer, incident.counterfactual))
    cf = Counterfactual(
        prompt_ids=ids,
        text=incident.counterfactual,
        generated=False,
        strategy="given in the case file",
    )
    cf.metric_prompt = evaluate(subject.model, target).metric
    cf.metric_counterfactual = evaluate(subject.model, cf.target(target)).metric
    cf.ok = len(ids) == target.n_prompt
    return cf


CheckBaseline = Callable[["Baseline", "Counterfactual | None"], None]


def trace(
    subject: Subject,
    incident: Incident,
    *,
    method: str = "eap-ig",
    steps: int = 8,
    baseline: str = "auto",
    reference_prompts: Sequence[str] | None = None,
    neurons: bool = False,
    ig_steps: int = 32,
    ig_min_steps: int = 8,
    ig_tolerance: float = 0.05,
    min_drop: float = 0.8,
    max_memory: int | str | None = "auto",
    progress: Progress | None = None,
    check_baseline: CheckBaseline | None = None,
    plan: MemoryPlan | None = None,
) -> Attribution:
    """Trace an incident on a loaded model.

    ``baseline``: ``auto`` (the case's counterfactual if it lines up, else an automatic one,
    else the mean), ``counterfactual`` (the case's or an automatic one; an error if neither
    works), or ``mean`` (mean activations over ``reference_prompts``, default the case's).

    ``ig_steps``: the most integrated-gradients points; they start at ``ig_min_steps`` and
    double until the attributions are complete within ``ig_tolerance`` (relative). The token
    path starts at the counterfactual prompt with a counterfactual baseline, else at neutral
    tokens (``TokenScores.baseline``).

    ``max_memory``: a byte count or a size such as ``"4G"``; ``"auto"`` (default) is what the
    device has free; ``None`` turns the check off. The peak is estimated before anything runs
    and the work is chunked to fit, or refused with the estimate (``rca.trace.memory``).

    ``check_baseline(baseline, counterfactual)``: called once the baseline is chosen, before
    integrated gradients and the component scores; it raises to stop a run that cannot succeed
    (``rca.investigate`` checks there that the metric is above the baseline's).

    ``plan``: the memory plan where the caller has made it already (``rca.ingest.preflight``,
    with the same method, steps, neurons and budget); else it is made here.
    """
    if baseline not in ("auto", "counterfactual", "mean"):
        raise TraceError(f"baseline must be auto, counterfactual or mean, got {baseline!r}")
    say = progress or (lambda stage, frac: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    incident = incident.for_model(subject.tokenizer)
    assert incident.prompt is not None
    target = incident.encode(subject)
    refs = list(reference_prompts if reference_prompts is not None else incident.reference_prompts)
    plan = plan or plan_for_target(
        subject,
        target,
        method=method,
        steps=steps,
        neurons=neurons,
        max_memory=max_memory,
    )

    say("segments", 0.0)
    segments = segment_ablation(
        subject,
        target,
        prompt=incident.prompt,
        reference_prompts=refs,
        batch=min(plan.confirm_batch, SEGMENT_BATCH[subject.device.type == "cuda"]),
    )
    timings["segments"] = time.perf_counter() - t

    say("baseline", 0.1)
    t = time.perf_counter()
    cf: Counterfactual | None = None
    base: Baseline | None = None
    if baseline in ("auto", "counterfactual"):
        if incident.counterfactual is not None:
            cf = given_counterfactual(subject, incident, target)
        if cf is None or not cf.ok:
            auto = auto_counterfactual(
                subject,
                target,
                prompt=incident.prompt,
                reference_prompts=refs,
                segments=segments,
                min_drop=min_drop,
                batch=plan.confirm_batch,
            )
            if auto.ok or cf is None:
                cf = auto
        if cf.ok:
            base = Baseline(
                "counterfactual",
                f"counterfactual ({'generated' if cf.generated else 'given'}): {cf.text}",
                target=cf.target(target),
            )
        elif baseline == "counterfactual":
            raise TraceError(
                f"no usable counterfactual: the best one removes {cf.drop:.0%} of the metric "
                f"(needs {min_drop:.0%}) or does not line up with the prompt; give one in the "
                "case file or use the mean baseline"
            )
    if base is None:
        if not refs:
            raise TraceError(
                "the mean baseline needs reference prompts; add reference_prompts to the case"
            )
        base = Baseline(
            "mean",
            f"mean over {len(refs)} reference prompts",
            means=site_means(subject, refs, neurons=neurons),
        )
    if check_baseline is not None:
        check_baseline(base, cf)
    timings["baseline"] = time.perf_counter() - t

    say("tokens", 0.2)
    t = time.perf_counter()
    tokens = integrated_gradients(
        subject,
        target,
        n_steps=ig_steps,
        internal_batch_size=plan.ig_batch,
        # from the counterfactual, so that the scores split metric(prompt) - metric(cf) over
        # the tokens it changes; the mean baseline has no prompt to start from
        counterfactual=base.target if base.kind == "counterfactual" else None,
        min_steps=ig_min_steps,
        tolerance=ig_tolerance,
    )
    timings["tokens"] = time.perf_counter() - t

    say("components", 0.5)
    t = time.perf_counter()
    comps = score_components(
        subject,
        target,
        base,
        method=method,
        steps=steps,
        neurons=neurons,
        step_chunk=plan.step_chunk,
        head_chunk=plan.head_chunk,
    )
    timings["components"] = time.perf_counter() - t

    say("graph", 0.85)
    t = time.perf_counter()
    g = build_graph(
        comps, n_layers=subject.adapter.n_layers, tokens=tokens.tokens, token_scores=tokens.scores
    )
    pruned = prune_graph(g)
    paths = top_paths(pruned)
    timings["graph"] = time.perf_counter() - t
    say("done", 1.0)
    return Attribution(
        incident_id=incident.id,
        method=method,
        target=target,
        tokens=tokens,
        segments=segments,
        counterfactual=cf,
        baseline=base,
        components=comps,
        graph=g,
        pruned=pruned,
        paths=paths,
        timings=timings,
        memory=plan,
    )


__all__ += ["drop_fraction", "given_counterfactual", "CheckBaseline"]
