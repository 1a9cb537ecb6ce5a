"""The localization benchmark: plant faults with known locations, then find them.

``run_localization(n_faults, seed=...)`` trains (or loads from ``$RCA_HOME/bench/``) host models
of two architectures, plants ``n_faults`` seeded faults across kinds and layers
(``rca.zoo.faults``), and for each one runs the rca pipeline as a user would:

1. ``score_components`` (EAP-IG, 8 steps, counterfactual baseline) ranks every head and MLP;
2. ``rca.confirm.confirm`` verifies the top candidates with exact interventions and re-ranks
   them (``rca.confirm.rank_candidates``: the leading group by the share of P(bad) that
   max(TE, NE) removes, ordered by a confirmed direct effect, then by min(NE, NE0)).

It scores the confirm ranking against the planted components, and does the same for two
baselines computed on the same fault: attribution alone (rank by |EAP-IG score|) and exhaustive
activation patching (one forward per head and MLP patched to the counterfactual, ranked by the
metric drop, i.e. total effect). ``rankings`` also scores the frozen alternative rankings of
``rca.bench.baselines`` side by side on the same measurements, so a change to
``rca.confirm``'s ranking can be judged before it is made. The hosts (their specification, and
training through ``rca.zoo.train``) are ``rca.bench.hosts``.

AC@1: the rank-1 component is planted. AC@3: every planted component is within the top
``|planted| + 2``. Costs are forward-pass equivalents, as ``score_components`` and ``confirm``
count them (a backward is two forwards; a batched pass that reuses cached lower layers counts
the share of layers it recomputes).

One module for the benchmark from the fault plan to the summary and its command line: each
part reads the record the previous one writes (``FaultResult``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rca.bench.baselines import BENCH_TOP_K, RANKINGS, confirm_rule_ranking
from rca.bench.hosts import (
    BENCH_HOSTS,
    BENCH_VERSION,
    HOST_SETS,
    SMALL_HOSTS,
    HostSpec,
    build_host,
    host_names,
    real_host,
    real_plant_config,
)
from rca.model.ids import ComponentId, format_id, parse_id

__all__ = [
    "HostSpec",
    "BENCH_HOSTS",
    "SMALL_HOSTS",
    "FaultResult",
    "ac_hits",
    "build_host",
    "confirm_rule_ranking",
    "fault_plan",
    "host_names",
    "localize",
    "print_summary",
    "rescore",
    "run_localization",
    "summarize",
    "main",
]

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# the fault plan


def fault_plan(
    n_faults: int, *, seed: int, hosts: Sequence[HostSpec], kinds: Sequence[str] | None = None
) -> list[tuple[HostSpec, str, tuple[int, ...]]]:
    """(host, kind, layers) for each fault: hosts alternate, ``kinds`` (default
    ``rca.zoo.faults.KINDS``) cycle within a host, and each kind walks a shuffled order of that
    host's layers that starts at the LAST layer (the layer nearest the logits, where a planted
    component's direct effect is all of it). A relay's pairs are drawn apart from a circuit's,
    so adding the relay leaves the other kinds' layers as they were."""
    from rca.zoo.faults import ALL_KINDS, KINDS

    kinds = tuple(kinds or KINDS)
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise ValueError(f"fault kinds must be among {', '.join(ALL_KINDS)}, got {list(kinds)}")
    rng = random.Random(f"plan-{seed}")
    per_host: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    counters: dict[tuple[str, str], int] = {}
    plan: list[tuple[HostSpec, str, tuple[int, ...]]] = []
    for i in range(n_faults):
        host = hosts[i % len(hosts)]
        kind = kinds[(i // len(hosts)) % len(kinds)]
        L = host.n_layer
        if host.name not in per_host:
            singles = [L - 1] + rng.sample(range(L - 1), L - 1)
            pairs: list[tuple[int, ...]] = [(a, b) for a in range(L) for b in range(a + 1, L)]
            rng.shuffle(pairs)
            # the first circuit of a host ends at its last layer
            first = next(p for p in pairs if p[1] == L - 1)
            pairs = [first] + [p for p in pairs if p != first]
            relays = list(pairs)
            random.Random(f"plan-relay-{seed}-{host.name}").shuffle(relays)
            # the first relay's head is in the last layer
            first_relay = next(p for p in relays if p[1] == L - 1)
            per_host[host.name] = {
                "head": [(x,) for x in singles],
                "mlp": [(x,) for x in ([L - 1] + rng.sample(range(L - 1), L - 1))],
                "circuit": pairs,
                "relay": [first_relay] + [p for p in relays if p != first_relay],
            }
        options = per_host[host.name][kind]
        k = counters.get((host.name, kind), 0)
        counters[(host.name, kind)] = k + 1
        plan.append((host, kind, options[k % len(options)]))
    return plan


# ---------------------------------------------------------------------------------------------
# one fault


@dataclass(frozen=True)
class FaultResult:
    """The pipeline's answer on one planted fault, and the two baselines'."""

    host: str
    fault: dict[str, Any]  # Fault.summary()
    planted: tuple[str, ...]
    confirm_ranked: tuple[str, ...]  # rank order of the confirm stage
    attribution_ranked: tuple[str, ...]  # heads and MLPs by |EAP-IG score|
    exhaustive_ranked: tuple[str, ...]  # every head and MLP by exact patching effect (TE)
    evidence: tuple[dict[str, Any], ...]  # confirm's per-candidate TE / DE / NE
    exhaustive_te: dict[str, float]
    verdict: str
    cause_set: tuple[str, ...]
    cost: dict[str, float]  # forward equivalents: trace, confirm, pipeline, exhaustive
    seconds: dict[str, float]
    metric: dict[str, float]
    # the weight-change track (rca.regress.weight_change, the host as the baseline checkpoint)
    weight_change_ranked: tuple[str, ...] = ()
    # the planted components at the positions where their kind makes them act (a relay's MLP
    # at the trigger, its head at the final position); the ids alone for other kinds
    planted_sites: tuple[str, ...] = ()
    # confirm's circuit: [id, role, positions] per member, and where the prompt differs
    circuit: dict[str, Any] = field(default_factory=dict)

    def hits(self, ranked: Sequence[str]) -> tuple[bool, bool]:
        return ac_hits(ranked, self.planted)

    def placed(self) -> tuple[int, int]:
        """(planted sites with a position, those the circuit places there): a member with the
        planted component's id whose positions include the planted position."""
        where = {m[0]: set(m[2]) for m in self.circuit.get("members", [])}
        sites = [c for c in map(parse_id, self.planted_sites) if c.pos is not None]
        hit = sum(format_id(c.base) in where and c.pos in where[format_id(c.base)] for c in sites)
        return len(sites), hit

    def planted_infrastructure(self) -> bool:
        """Whether confirm measured every planted component as infrastructure (necessary for
        ordinary text as well): rca then never ranks one first, by design."""
        infra = {e["id"]: bool(e.get("infrastructure")) for e in self.evidence}
        return all(infra.get(p, False) for p in self.planted)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def component_of(cid: str) -> str:
    """The head or MLP an id belongs to: an MLP's neurons belong to the MLP."""
    c = parse_id(cid)
    return format_id(ComponentId("mlp", c.layer)) if c.neurons else cid


def ac_hits(ranked: Sequence[str], planted: Sequence[str]) -> tuple[bool, bool]:
    """(AC@1, AC@3): rank 1 is planted; every planted one is within the top |planted| + 2.
    An MLP's neurons (a candidate of their own where the MLP is infrastructure) count as the
    MLP, once."""
    ranked = list(dict.fromkeys(component_of(c) for c in ranked))
    top = list(ranked[: len(planted) + 2])
    return (bool(ranked) and ranked[0] in planted, all(p in top for p in planted))


def localize(
    subject: Any,
    fault: Any,
    *,
    confirm_config: Any = None,
    exhaustive: bool = True,
    host: Any = None,
) -> FaultResult:
    """Trace and confirm one planted fault on its faulted model, plus the two baselines, and
    with ``host`` (the model before the fault) the weight-change track."""
    from rca.confirm import Ablator, ConfirmConfig, confirm
    from rca.model.metric import encode_target
    from rca.regress import weight_change
    from rca.trace.components import Baseline, score_components

    # 15 of the 54 heads and MLPs of a bench host: EAP-IG put a planted component at rank 11
    # and 13 in two of 104 trial faults (attention saturation), outside the default 10
    cc = confirm_config or ConfirmConfig(top_k=BENCH_TOP_K)
    tok = subject.tokenizer
    target = encode_target(tok, fault.prompt, " " + fault.bad)
    cf = encode_target(tok, fault.counterfactual, " " + fault.bad)
    base = Baseline("counterfactual", f"counterfactual: {fault.counterfactual}", target=cf)
    t0 = time.perf_counter()
    scores = score_components(
        subject, target, base, method="eap-ig", steps=8, edges=False, neurons=True
    )
    t1 = time.perf_counter()
    verdict = confirm(
        subject,
        target,
        scores.ranked(),
        baseline=cf,
        reference=list(fault.reference),
        config=cc,
        scores=scores,
    )
    t2 = time.perf_counter()
    ranked = tuple(c.id for c in verdict.ranked())
    attr = tuple(c for c, _ in scores.ranked() if c != "EMB")
    ex_ranked: tuple[str, ...] = ()
    ex_te: dict[str, float] = {}
    ex_cost = 0.0
    if exhaustive:
        ab = Ablator(subject, target, baseline=cf, batch_size=cc.batch_size)
        ms = ab.run([{c: "baseline"} for c in ab.components])
        ex_te = {c: ab.metric_clean - float(m) for c, m in zip(ab.components, ms, strict=True)}
        ex_ranked = tuple(sorted(ex_te, key=lambda c: -ex_te[c]))
        ex_cost = ab.forward_equiv + 2  # + the clean and counterfactual runs
    t3 = time.perf_counter()
    # extra evidence for the ranking prototypes (not part of the pipeline's cost): each
    # candidate's sufficiency, the metric it restores when patched from the prompt into the
    # counterfactual run (denoising), and its necessity under zero ablation where confirm did
    # not measure it (where its necessity is a zero ablation already)
    cands = list(ranked)
    neuron_layers = {parse_id(c).layer or 0 for c in cands if parse_id(c).neurons}
    den = Ablator(subject, cf, baseline=target, batch_size=cc.batch_size)
    den.record_neurons(neuron_layers)
    suff = den.run([{c: "baseline"} for c in cands])
    extra_cost = den.forward_equiv + 2
    ne_zero = {c.id: c.necessity_zero for c in verdict.candidates}
    missing = [c for c in cands if ne_zero[c] is None]
    if missing:
        zab = Ablator(subject, target, batch_size=cc.batch_size)
        zab.record_neurons(neuron_layers)
        zero = zab.run([{c: "zero"} for c in missing])
        ne_zero |= {c: zab.metric_clean - float(z) for c, z in zip(missing, zero, strict=True)}
        extra_cost += zab.forward_equiv + 1
    extra = {
        c: {"suff": round(float(v) - den.metric_clean, 5), "ne_zero": round(ne_zero[c] or 0.0, 5)}
        for c, v in zip(cands, suff, strict=True)
    }
    t4 = time.perf_counter()
    wc_ranked: tuple[str, ...] = ()
    wc_cost = 0.0
    if host is not None:
        wc = weight_change(subject, host, target, top=8)
        wc_ranked = tuple(wc["ranked"])
        wc_cost = 3.0 + len(wc_ranked)  # forward + backward, the new metric, one per revert
    t5 = time.perf_counter()
    return FaultResult(
        host=subject.meta.get("name", ""),
        fault=fault.summary(),
        planted=tuple(fault.components),
        confirm_ranked=ranked,
        attribution_ranked=attr,
        exhaustive_ranked=ex_ranked,
        evidence=tuple(
            {
                "id": c.id,
                "rank": c.rank,
                "attribution": round(c.attribution, 5),
                "te": round(c.total_effect, 5),
                "de": round(c.direct_effect, 5),
                "ne": round(c.necessity, 5),
                "p": round(c.p_value, 4),
                "verdict": c.verdict,
                "benign_loss_pct": round(c.benign_loss_pct or 0.0, 3),
                "infrastructure": c.infrastructure,
                **extra[c.id],
            }
            for c in verdict.ranked()
        ),
        exhaustive_te={k: round(v, 5) for k, v in ex_te.items()},
        verdict=verdict.verdict,
        cause_set=tuple(verdict.cause_set.components),
        cost={
            "trace": float(scores.cost["forward_equiv"]),
            "confirm": float(verdict.cost["forward_equiv"]),
            "pipeline": float(scores.cost["forward_equiv"] + verdict.cost["forward_equiv"]),
            "exhaustive": float(ex_cost),
            "extra_evidence": float(extra_cost),
            "zero_ablation": float(verdict.cost.get("zero_ablation_forward_equiv", 0.0)),
            "benign_damage": float(verdict.cost.get("benign_forward_equiv", 0.0)),
            "weight_change": wc_cost,
        },
        seconds={
            "trace": t1 - t0,
            "confirm": t2 - t1,
            "exhaustive": t3 - t2,
            "extra_evidence": t4 - t3,
            "weight_change": t5 - t4,
        },
        metric={
            "prompt": verdict.metric_clean,
            "counterfactual": verdict.metric_baseline,
            "rows": target.n_conts,  # continuations scored
        },
        weight_change_ranked=wc_ranked,
        planted_sites=fault.spec.sites(next(iter(target.differing(cf)), -1), target.n_prompt - 1),
        circuit={}
        if verdict.circuit is None
        else {
            "members": [[m.id, m.role, m.positions] for m in verdict.circuit.members],
            "entry_positions": verdict.circuit.entry_positions,
            "faithfulness": verdict.circuit.faithfulness,
        },
    )


# ---------------------------------------------------------------------------------------------
# the benchmark


def _rate(xs: Sequence[bool]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def _mean(xs: Sequence[float], *, digits: int = 2) -> float:
    return round(sum(xs) / len(xs), digits) if xs else float("nan")


def summarize(results: Sequence[FaultResult]) -> dict[str, Any]:
    """AC@1, AC@3 and mean cost of the pipeline and both baselines over ``results``."""
    conf = [r.hits(r.confirm_ranked) for r in results]
    wc = [r for r in results if r.weight_change_ranked]
    attr = [r.hits(r.attribution_ranked) for r in results]
    exh = [r.hits(r.exhaustive_ranked) for r in results]
    specific = [r.hits(r.confirm_ranked) for r in results if not r.planted_infrastructure()]
    placed = [r.placed() for r in results]
    return {
        # planted sites with a position (a relay's), and how many the circuit placed there
        "positions": {
            "n_sites": sum(n for n, _ in placed),
            "placed": sum(h for _, h in placed),
        },
        "n_faults": len(results),
        "ac1": _rate([h[0] for h in conf]),
        "ac3": _rate([h[1] for h in conf]),
        # faults planted in components that ordinary text needs as well (infrastructure), and
        # AC@1 / AC@3 over the rest
        "n_planted_infrastructure": len(results) - len(specific),
        "ac1_specific": _rate([h[0] for h in specific]),
        "ac3_specific": _rate([h[1] for h in specific]),
        "cost_forward_equiv": _mean([r.cost["pipeline"] for r in results]),
        "attribution_only": {
            "ac1": _rate([h[0] for h in attr]),
            "ac3": _rate([h[1] for h in attr]),
            "cost_forward_equiv": _mean([r.cost["trace"] for r in results]),
        },
        "exhaustive": {
            "ac1": _rate([h[0] for h in exh]),
            "ac3": _rate([h[1] for h in exh]),
            "cost_forward_equiv": _mean([r.cost["exhaustive"] for r in results]),
        },
        "weight_change": {
            "ac1": _rate([r.hits(r.weight_change_ranked)[0] for r in wc]),
            "ac3": _rate([r.hits(r.weight_change_ranked)[1] for r in wc]),
            "n_faults": len(wc),
            "cost_forward_equiv": _mean([r.cost.get("weight_change", 0.0) for r in wc]),
        },
        "rankings": {
            name: {
                "ac1": _rate([r.hits(fn(r))[0] for r in results]),
                "ac3": _rate([r.hits(fn(r))[1] for r in results]),
            }
            for name, fn in RANKINGS.items()
        },
    }


def _failure(r: FaultResult) -> dict[str, Any]:
    ac1, ac3 = r.hits(r.confirm_ranked)
    return {
        "host": r.host,
        "name": r.fault["name"],
        "planted": list(r.planted),
        "planted_infrastructure": r.planted_infrastructure(),
        "ac1": ac1,
        "ac3": ac3,
        "top": list(r.confirm_ranked[: len(r.planted) + 2]),
        "evidence": [
            e for e in r.evidence if e["rank"] <= len(r.planted) + 3 or e["id"] in r.planted
        ],
        "attribution_rank": {p: _rank(r.attribution_ranked, p) for p in r.planted},
    }


def _rank(ranked: Sequence[str], cid: str) -> int | None:
    return ranked.index(cid) + 1 if cid in ranked else None


def _versions() -> dict[str, str]:
    import transformers

    from rca.zoo.corpus import CORPUS_VERSION

    return {
        "bench": BENCH_VERSION,
        "corpus": CORPUS_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
    }


def run_localization(
    n_faults: int = 40,
    *,
    seed: int = 0,
    hosts: Sequence[HostSpec] | str = "bench",
    home: str | Path | None = None,
    plant_config: Any = None,
    confirm_config: Any = None,
    exhaustive: bool = True,
    threads: int | None = 1,
    log: Log | None = None,
    on_result: Callable[[FaultResult], None] | None = None,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Plant ``n_faults`` seeded faults over ``hosts`` and localize each.

    Returns ``{ac1, ac3, n_faults, cost_forward_equiv, failures, attribution_only: {ac1, ac3,
    cost_forward_equiv}, exhaustive: {ac1, ac3, cost_forward_equiv}, per_host, per_kind,
    plant_failures, faults, seconds}``; ``on_result`` sees each fault's result as it comes.
    A fault whose plant misses its checks (P(bad), KL) is
    listed in ``plant_failures`` and replaced by the next seed, so every scored fault has a
    known location. ``threads=1`` by default: on a shared two-core machine, torch's second
    thread mostly waits on the other process.
    """
    from rca.model.subject import Subject
    from rca.zoo.faults import PlantConfig, draw_spec, inject

    if n_faults < 1:
        raise ValueError("n_faults must be at least 1")
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda m: None)
    t_start = time.perf_counter()
    subjects: dict[str, Any]
    if isinstance(hosts, str) and hosts not in HOST_SETS:
        if hosts not in host_names():
            raise ValueError(f"hosts must be one of {', '.join(host_names())}, got {hosts!r}")
        real, subject = real_host(hosts, home=home)
        hosts, subjects = [real], {real.name: subject}  # type: ignore[list-item]
        pc = plant_config or real_plant_config()
    else:
        if isinstance(hosts, str):
            hosts = HOST_SETS[hosts]
        pc = plant_config or PlantConfig()
        subjects = {h.name: build_host(h, home=home, log=log) for h in hosts}
    results: list[FaultResult] = []
    plant_failures: list[dict[str, Any]] = []
    plant_seconds: list[float] = []
    plan = fault_plan(n_faults, seed=seed, hosts=hosts, kinds=kinds)
    for i, (host, kind, layers) in enumerate(plan):
        s = subjects[host.name]
        a = s.adapter
        fault = faulted = None
        for attempt in range(3):
            spec = draw_spec(
                kind,  # type: ignore[arg-type]
                layers,
                n_heads=a.n_heads,
                d_mlp=a.d_mlp,
                tokenizer=s.tokenizer,
                seed=seed * 100_003 + i * 7 + attempt,
                n_neurons=pc.n_neurons,
            )
            fault, faulted = inject(s.model, s.tokenizer, spec, config=pc)
            plant_seconds.append(fault.seconds)
            if fault.ok:
                break
            plant_failures.append({"host": host.name, **fault.summary()})
            say(f"[{i + 1}/{n_faults}] plant missed its checks, redrawn: {fault.summary()}")
        assert fault is not None and faulted is not None
        if not fault.ok:
            continue
        fs = Subject.from_model(faulted, s.tokenizer)
        fs.meta = {"name": host.name}
        r = localize(fs, fault, confirm_config=confirm_config, exhaustive=exhaustive, host=s)
        results.append(r)
        if on_result is not None:
            on_result(r)
        c1, c3 = r.hits(r.confirm_ranked)
        a1, a3 = r.hits(r.attribution_ranked)
        e1, e3 = r.hits(r.exhaustive_ranked) if exhaustive else (False, False)
        w1, w3 = r.hits(r.weight_change_ranked)
        say(
            f"[{i + 1}/{n_faults}] {host.name} {fault.spec.name} trigger={fault.trigger} "
            f"bad={fault.bad} P={fault.p_bad_trigger:.3f}/{fault.p_bad_counterfactual_max:.4f} "
            f"KL={fault.benign_kl:.4f} | confirm {int(c1)}{int(c3)} attr {int(a1)}{int(a3)} "
            f"exh {int(e1)}{int(e3)} wc {int(w1)}{int(w3)} | top {list(r.confirm_ranked[:4])} | "
            f"{fault.seconds:.1f}s plant, {sum(r.seconds.values()):.1f}s localize"
        )
    out = _summary_with_breakdown(results, [h.name for h in hosts])
    out["plant_failures"] = plant_failures
    out["plant"] = {
        "mean_seconds": _mean(plant_seconds),
        "max_benign_kl": max((r.fault["benign_kl"] for r in results), default=float("nan")),
        "mean_benign_kl": _mean([r.fault["benign_kl"] for r in results], digits=5),
        "min_p_bad_trigger": min((r.fault["p_bad_trigger"] for r in results), default=float("nan")),
        "max_p_bad_counterfactual": max(
            (r.fault["p_bad_counterfactual_max"] for r in results), default=float("nan")
        ),
        "kl_bound": pc.kl_bound,
    }
    out["hosts"] = [asdict(h) for h in hosts]
    out["plant_config"] = asdict(pc)
    out["versions"] = _versions()
    out["seed"] = seed
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["faults"] = [r.to_json() for r in results]
    return out


def _summary_with_breakdown(results: Sequence[FaultResult], hosts: Sequence[str]) -> dict[str, Any]:
    """``summarize``, the failing faults, and the same summary per host and per kind."""
    out = summarize(results)
    out["failures"] = [_failure(r) for r in results if not all(r.hits(r.confirm_ranked))]
    out["per_host"] = {h: summarize([r for r in results if r.host == h]) for h in hosts}
    out["per_kind"] = {
        k: summarize([r for r in results if r.fault["kind"] == k])
        for k in dict.fromkeys(r.fault["kind"] for r in results)
    }
    return out


def rescore(saved: dict[str, Any]) -> dict[str, Any]:
    """The summary recomputed from a saved result (the JSON that ``--out`` writes), so a new
    ranking rule can be scored without planting again. The headline AC@1 / AC@3 and the
    failures are those of ``rca.confirm``'s ranking rule now (``confirm_rule_ranking``) on the
    saved evidence; ``rankings.saved`` is what the run itself returned, and every other
    ranking is recomputed as in a run."""
    fields = set(FaultResult.__dataclass_fields__)
    results = [FaultResult(**{k: v for k, v in f.items() if k in fields}) for f in saved["faults"]]
    ran = [r.hits(r.confirm_ranked) for r in results]
    results = [replace(r, confirm_ranked=tuple(confirm_rule_ranking(r))) for r in results]
    out = _summary_with_breakdown(results, list(dict.fromkeys(r.host for r in results)))
    out["rankings"]["saved"] = {
        "ac1": _rate([h[0] for h in ran]),
        "ac3": _rate([h[1] for h in ran]),
    }
    out["seed"] = saved.get("seed")
    out["rescored_from"] = {k: saved.get(k) for k in ("seconds", "versions")}
    return out


def print_summary(result: dict[str, Any], *, as_json: bool = False) -> None:
    """The result of ``run_localization`` on stdout: with ``as_json``, everything but the
    per-fault records as JSON; else the summary, one line per ranking, then each failure."""
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "faults"}, indent=2))
        return
    s = result
    print(
        f"localization over {s['n_faults']} faults: AC@1 {s['ac1']:.3f}  AC@3 {s['ac3']:.3f}"
        f"  cost {s['cost_forward_equiv']} fwd-eq\n"
        f"  planted in infrastructure: {s['n_planted_infrastructure']}; over the rest: "
        f"AC@1 {s['ac1_specific']:.3f}  AC@3 {s['ac3_specific']:.3f}\n"
        f"  attribution only: AC@1 {s['attribution_only']['ac1']:.3f}  "
        f"AC@3 {s['attribution_only']['ac3']:.3f}\n"
        f"  exhaustive patching: AC@1 {s['exhaustive']['ac1']:.3f}  "
        f"AC@3 {s['exhaustive']['ac3']:.3f}  cost {s['exhaustive']['cost_forward_equiv']}\n"
        f"  weight change (host as baseline): AC@1 {s['weight_change']['ac1']:.3f}  "
        f"AC@3 {s['weight_change']['ac3']:.3f}"
    )
    if s["positions"]["n_sites"]:
        print(
            f"  planted sites at a position placed there by the circuit: "
            f"{s['positions']['placed']} of {s['positions']['n_sites']}"
        )
    for f in s["failures"]:
        print(f"  FAIL {f['host']} {f['name']}: top {f['top']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rca.bench.localization --faults N --seed S [--json] [--small]``."""
    p = argparse.ArgumentParser(prog="rca bench localization", description=__doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--small", action="store_true", help="the small CI hosts (3 layers)")
    p.add_argument(
        "--host",
        default=None,
        help="bench (default), small, or a real model of the zoo's registry (smollm2-135m)",
    )
    p.add_argument("--home", type=Path, default=None, help="RCA_HOME (hosts cached in bench/)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-exhaustive", action="store_true")
    p.add_argument(
        "--kinds",
        default=None,
        help="fault kinds, comma-separated (default head,mlp,circuit; relay is position-specific)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the full JSON here")
    p.add_argument(
        "--rescore", type=Path, default=None, help="summarize a saved --out file; plant nothing"
    )
    args = p.parse_args(argv)
    if args.rescore is not None:
        print(json.dumps(rescore(json.loads(args.rescore.read_text())), indent=2))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    res = run_localization(
        args.faults,
        seed=args.seed,
        hosts=args.host or ("small" if args.small else "bench"),
        home=args.home,
        exhaustive=not args.no_exhaustive,
        threads=args.threads,
        log=log,
        kinds=args.kinds.split(",") if args.kinds else None,
    )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print_summary(res, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
