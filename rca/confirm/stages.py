"""``confirm``: the stage that verifies a trace's candidates with batched interventions.

For an incident and the trace's ranking, ``confirm`` runs its experiments in order, one
function each:

1. **singles**: every head and MLP ablated alone, as sets are: the component p-values' null;
2. **candidates**: each candidate's total effect TE (patched to the baseline), direct effect DE
   (patched with every later component frozen at its clean value, so only its direct path to
   the logits changes), necessity NE (ablated) and NE under zero ablation, NE0;
3. **specificity**: each candidate's benign damage, the LM-loss change and KL on ordinary text
   when it is mean-ablated (``rca.specificity``); a component that ordinary text needs as well
   is *infrastructure*: reported, never blamed;
4. **neurons**: an infrastructure MLP resolved to the few neurons that carry its effect
   (``rca.confirm.neurons``);
5. **ranking** (``rca.confirm.ranking``), with each candidate's p-value;
6. **cause set** and **random sets** (``rca.confirm.sets``): the minimal set of specific
   candidates that removes ``set_fraction`` of the gap, its necessity and sufficiency, and its
   empirical p-value against random sets of the same size and kind;
7. **verdicts**: each candidate's word and reason (``rca.verdicts``);
8. **circuit** (``rca.confirm.circuit``).

The resample ablation's draws differ between experiments by the ``OFFSET_*`` constants of
``rca.confirm.engine``. The module is one thing, ``confirm`` and its stages over one shared
``_Setup``, and ``check_gap``, which measures the gap as ``confirm`` does; that is why it is over
500 lines.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rca.benign import benign_prompts
from rca.confirm.circuit import Circuit, build_circuit, forward_position
from rca.confirm.engine import (
    OFFSET_CAUSE_SET,
    OFFSET_LEAVE_ONE_OUT,
    OFFSET_RANDOM_SETS,
    OFFSET_SINGLES,
    Ablator,
    Variant,
)
from rca.confirm.evidence import (
    CandidateEvidence,
    ConfirmConfig,
    ConfirmError,
    SetEvidence,
    Verdict,
)
from rca.confirm.neurons import NeuronGroup, group_damage, specific_neurons
from rca.confirm.ranking import component_verdict, rank_candidates, set_verdict
from rca.confirm.sets import cause_set_search, empirical_p_value, kind_of, random_sets
from rca.model.ids import neuron_group, parse_id
from rca.model.metric import Target, evaluate, reference_point, share_removed
from rca.model.subject import Subject
from rca.specificity import BenignError, BenignRun, Damage, benign_damage, encoded

if TYPE_CHECKING:
    from rca.trace.components import ComponentScores

__all__ = ["check_gap", "confirm"]


def check_gap(
    subject: Subject,
    target: Target,
    *,
    baseline: Target | None,
    reference: Sequence[str] | Sequence[Sequence[int]] = (),
    config: ConfirmConfig | None = None,
    metrics: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The prompt's metric and the baseline's, as ``confirm`` will measure them, from the
    fewest forward passes; ConfirmError where confirm would refuse them (the prompt's metric
    not above the reference point). ``metrics``: the prompt's and the counterfactual's where
    the caller has them.

    With a counterfactual ``baseline`` that is its metric; without, the metric with every head
    and MLP ablated as confirm's set ablations are (mean over ``reference``, else zero)."""
    cfg = config or ConfirmConfig()
    if baseline is not None:
        if metrics is None:
            metrics = (
                evaluate(subject.model, target).metric,
                evaluate(subject.model, baseline).metric,
            )
        m_clean, m_base = metrics
        what = "the counterfactual's"
    else:
        ablator = Ablator(subject, target, reference=reference, batch_size=cfg.batch_size)
        ablation = _necessity_source(ablator, cfg)
        m_clean = ablator.metric_clean
        m_base = _all_ablated(ablator, ablation)
        what = f"the baseline's (every head and MLP {ablation}-ablated)"
    _checked_reference(m_clean, m_base, target, what=what, sep=", so ")
    return m_clean, m_base


def _necessity_source(ablator: Ablator, cfg: ConfirmConfig) -> str:
    """How a candidate's necessity ablates it: the configured ablation (zero, mean or
    resample), else mean where there are reference prompts, else zero."""
    if cfg.kind in ("zero", "mean", "resample"):
        return cfg.kind
    return "mean" if ablator.refs else "zero"


def _all_ablated(ablator: Ablator, source: str) -> float:
    """The metric with every head and MLP ablated by ``source``."""
    return float(ablator.run([dict.fromkeys(ablator.components, source)])[0])


def _checked_reference(
    m_clean: float, m_base: float, target: Target, *, what: str, sep: str
) -> float:
    """The point that removing all of the metric reaches (``reference_point``); ConfirmError,
    naming the baseline as ``what``, where the prompt's metric is not above it."""
    m_ref = reference_point(m_clean, m_base, n_conts=target.n_conts)
    if m_clean - m_ref <= 0:
        raise ConfirmError(
            f"the metric on the prompt ({m_clean:+.3f}) is not above {what} ({m_base:+.3f})"
            f"{sep}there is no incident behaviour to explain"
        )
    return m_ref


@dataclass(frozen=True)
class _Setup:
    """What every stage of one confirmation reads: the engine, the metric's end points, and the
    value each kind of experiment sets a component to."""

    ablator: Ablator
    target: Target
    config: ConfirmConfig
    # how a candidate's necessity ablates it: the configured ablation, else mean where there
    # are reference prompts, else zero
    necessity_source: str
    set_source: str  # how the singles, the cause set and the random sets are ablated
    patch_source: str  # what TE, DE and the circuit patch to: the counterfactual, else the ablation
    m_clean: float  # the prompt's metric
    m_base: float  # the baseline's
    m_ref: float  # the point that "100% of the metric removed" reaches
    baseline_desc: str

    @property
    def gap(self) -> float:
        return self.m_clean - self.m_ref

    @property
    def tol(self) -> float:
        """Float noise between batch rows: ties within it count against an observation."""
        return 1e-5 * max(1.0, abs(self.gap))

    def share(self, drop: float) -> float:
        """The share of the bad behaviour a metric drop removes."""
        return share_removed(self.m_clean, self.m_ref, drop, conts=self.target.n_conts)


@dataclass
class _Benign:
    """The specificity stage's measurements, which the neurons stage extends."""

    texts: list[str] | list[list[int]]  # the ordinary text
    run: BenignRun  # the unablated run over it, with the means of candidate MLPs' neurons
    mlp_neurons: dict[int, str]  # layer -> the id of all neurons of a candidate MLP there
    damage: dict[str, Damage]  # candidate -> its benign damage
    forward_equiv: float
    seconds: float


def _setup(
    ablator: Ablator, target: Target, *, baseline: Target | None, cfg: ConfirmConfig
) -> _Setup:
    """The value sources of each experiment and the metric's end points; ConfirmError where the
    configuration cannot run or there is no incident behaviour to explain."""
    if cfg.kind in ("mean", "resample") and not ablator.refs:
        raise ConfirmError(f"{cfg.kind} ablation needs reference prompts")
    if cfg.kind == "patch" and baseline is None:
        raise ConfirmError("patch ablation needs a counterfactual baseline")
    necessity_source = _necessity_source(ablator, cfg)  # an ablation, whatever the sets use
    if cfg.kind == "patch" or (cfg.kind == "auto" and not ablator.refs and baseline is not None):
        set_source = "baseline"
    else:
        set_source = necessity_source
    patch_source = "baseline" if baseline is not None else necessity_source
    m_clean = ablator.metric_clean
    if ablator.metric_baseline is not None:
        m_base = ablator.metric_baseline
        baseline_desc = "counterfactual"
    else:
        m_base = _all_ablated(ablator, necessity_source)
        baseline_desc = f"all heads and MLPs {necessity_source}-ablated"
    m_ref = _checked_reference(m_clean, m_base, target, what="the baseline's", sep="; ")
    return _Setup(
        ablator,
        target,
        cfg,
        necessity_source,
        set_source,
        patch_source,
        m_clean,
        m_base,
        m_ref,
        baseline_desc,
    )


def _singles(setup: _Setup) -> dict[str, float]:
    """Every head and MLP alone, ablated as sets are: the metric drop of each. They are the
    component p-values' null and, where sets are ablated as necessity is, each candidate's
    necessity as well."""
    ablator = setup.ablator
    metrics = ablator.run(
        [{c: setup.set_source} for c in ablator.components], index_offset=OFFSET_SINGLES
    )
    return {c: setup.m_clean - float(m) for c, m in zip(ablator.components, metrics, strict=True)}


def _candidates(
    setup: _Setup,
    ids: Sequence[str],
    *,
    attribution: Mapping[str, float],
    single_drop: Mapping[str, float],
    shared: bool,
) -> tuple[list[CandidateEvidence], float]:
    """Each candidate's TE, DE, NE and NE0 from one batched run, and the zero ablations' share of
    its cost in forward passes. ``shared``: NE is read from ``single_drop``."""
    ablator = setup.ablator
    parallel = ablator.adapter.parallel
    # NE0, the zero-ablation necessity, is NE itself where NE is a zero ablation
    zero_run = setup.necessity_source != "zero"
    extra = ([] if shared else [setup.necessity_source]) + (["zero"] if zero_run else [])
    per = 2 + len(extra)  # variants per candidate: TE, DE, then the extra ablations
    variants: list[Variant] = []
    for c in ids:
        variants.append({c: setup.patch_source})
        # DE: every component that computes after it is held at its clean value
        direct: Variant = {c: setup.patch_source}
        here = forward_position(c, parallel=parallel)
        for other in ablator.components:
            if forward_position(other, parallel=parallel) > here:
                direct[other] = "clean"
        variants.append(direct)
        variants += [{c: src} for src in extra]
    metrics = ablator.run(variants)
    # the zero ablations' share of that run: each recomputes from its layer up
    n_layers = ablator.adapter.n_layers
    zero_cost = sum((n_layers - ablator.site(c).layer) / n_layers for c in ids) if zero_run else 0.0
    out: list[CandidateEvidence] = []
    for i, c in enumerate(ids):
        drops = [setup.m_clean - float(metrics[per * i + j]) for j in range(per)]
        te, de = drops[0], drops[1]
        ne = single_drop[c] if shared else drops[2]
        if zero_run:
            ne0: float | None = drops[-1]
        else:
            ne0 = ne if setup.necessity_source == "zero" else None
        out.append(
            CandidateEvidence(
                c, attribution.get(c, 0.0), te, de, ne, p_value=1.0, necessity_zero=ne0
            )
        )
    return out, zero_cost


def _specificity(
    subject: Subject,
    setup: _Setup,
    evidence: Sequence[CandidateEvidence],
    *,
    reference: Sequence[str] | Sequence[Sequence[int]],
) -> _Benign:
    """What mean-ablating each candidate does to ordinary text, written into its evidence."""
    started = time.perf_counter()
    ablator, cfg = setup.ablator, setup.config
    ids = [e.id for e in evidence]
    texts = _benign_texts(reference, cfg)
    # one unablated run over the benign text serves every candidate, and every group of MLP
    # neurons tried later: it keeps the mean of each candidate MLP's neurons too
    mlp_neurons = {
        c.layer: neuron_group(c.layer, range(ablator.adapter.d_mlp))
        for c in map(parse_id, ids)
        if c.kind == "mlp" and c.layer is not None and ablator.adapter.d_mlp > 1
    }
    try:
        unablated = BenignRun(
            subject,
            texts,
            batch=max(16, ablator.batch_size),
            sites=[*ids, *mlp_neurons.values()],
            keep={parse_id(c).layer or 0 for c in ids},
        )
        damage = benign_damage(subject, ids, texts, run=unablated)
    except BenignError as err:
        raise ConfirmError(
            f"benign damage: {err}; give reference prompts of 2 tokens or more"
        ) from None
    forward_equiv = _benign_forward_equiv(subject, texts, ids, setup.target.length)
    for e in evidence:
        d = damage[e.id]
        e.benign_loss_pct, e.benign_kl, e.infrastructure = (
            d.loss_change_pct,
            d.kl_mean,
            d.infrastructure,
        )
    return _Benign(
        texts,
        unablated,
        mlp_neurons,
        damage,
        forward_equiv,
        time.perf_counter() - started,
    )


def _neurons(
    subject: Subject,
    setup: _Setup,
    evidence: list[CandidateEvidence],
    benign: _Benign,
    *,
    neuron_scores: Mapping[str, float],
    single_drop: Mapping[str, float],
) -> tuple[dict[str, NeuronGroup], float, float]:
    """Specific neurons: an infrastructure MLP whose effect on the incident a few of its neurons
    carry, and that ordinary text does not need, is resolved to them, a candidate of its own
    appended to ``evidence``. Returns the groups by id, their zero ablations' cost and the
    stage's cost, both in forward passes; their benign damage's cost is added to ``benign``."""
    ablator = setup.ablator
    before = ablator.forward_equiv
    groups = specific_neurons(
        ablator,
        evidence,
        neuron_scores,
        src=setup.patch_source,
        ablation=setup.necessity_source,
        m_clean=setup.m_clean,
        share=setup.share,
        cfg=setup.config,
        damage_of=lambda ids: group_damage(
            subject, ids, benign.texts, benign.run, benign.mlp_neurons
        ),
    )
    zero_cost = 0.0
    if groups:
        found, zero_cost = _candidates(
            setup, list(groups), attribution={}, single_drop=single_drop, shared=False
        )
        for e in found:
            g = groups[e.id]
            e.attribution = g.attribution
            e.benign_loss_pct, e.benign_kl = g.damage.loss_change_pct, g.damage.kl_mean
        evidence += found
        # their side effects only: the unablated run is the candidates'
        benign.forward_equiv += _benign_forward_equiv(
            subject, benign.texts, list(groups), setup.target.length
        ) - _benign_forward_equiv(subject, benign.texts, [], setup.target.length)
    return groups, zero_cost, ablator.forward_equiv - before


def _component_p_values(
    setup: _Setup,
    evidence: Sequence[CandidateEvidence],
    *,
    single_drop: Mapping[str, float],
    groups: Mapping[str, NeuronGroup],
) -> None:
    """Each candidate's p-value against every other component of its kind, ablated alike (a
    neuron group's against every MLP but its own)."""
    for e in evidence:
        own_id = groups[e.id].parent if e.id in groups else e.id
        null = [d for c, d in single_drop.items() if c != own_id and kind_of(c) == kind_of(e.id)]
        own = e.total_effect if setup.set_source == "baseline" else e.necessity
        e.p_value = empirical_p_value(own, null, tol=setup.tol)


def _ranking(setup: _Setup, evidence: Sequence[CandidateEvidence]) -> list[CandidateEvidence]:
    """The candidates in rank order (docs/confirm.md): the leading group by the share of the bad
    behaviour removed, the origin first, then the writer, the rest by effect; infrastructure
    never first. Each one's ``rank`` is set."""
    ordered = rank_candidates(
        evidence,
        share=setup.share,
        gap=setup.gap,
        config=setup.config,
        parallel=setup.ablator.adapter.parallel,
    )
    for r, e in enumerate(ordered):
        e.rank = r + 1
    return ordered


def _cause_set(
    setup: _Setup, ordered: Sequence[CandidateEvidence]
) -> tuple[list[str], float, float, float]:
    """The minimal cause set, of specific candidates only, and the metric with the set ablated,
    with everything but the set ablated, and with everything ablated."""
    ablator, cfg = setup.ablator, setup.config
    members = cause_set_search(
        ablator,
        [e.id for e in ordered if not e.infrastructure],
        source=setup.set_source,
        m_clean=setup.m_clean,
        need=cfg.set_fraction * setup.gap,
        max_set=cfg.max_set,
    )
    metrics = ablator.run(
        [
            dict.fromkeys(members, setup.set_source),
            {c: setup.set_source for c in ablator.components if c not in members},
            dict.fromkeys(ablator.components, setup.set_source),
        ],
        index_offset=OFFSET_CAUSE_SET,
    )
    m_set, m_rest, m_all = (float(m) for m in metrics)
    return members, m_set, m_rest, m_all


def _random_comparison(setup: _Setup, members: list[str]) -> tuple[list[float], str]:
    """The metric drop of each random set of the cause set's size and kind, and their scope."""
    ablator, cfg = setup.ablator, setup.config
    rng = random.Random(cfg.seed)
    sets, scope = random_sets(ablator.components, members, cfg.n_random, rng)
    metrics = ablator.run(
        [dict.fromkeys(s, setup.set_source) for s in sets], index_offset=OFFSET_RANDOM_SETS
    )
    return [setup.m_clean - float(m) for m in metrics], scope


def _set_evidence(
    setup: _Setup, ordered: Sequence[CandidateEvidence], *, say: Callable[[str, float], None]
) -> SetEvidence:
    """The cause set with its necessity, sufficiency, random comparison and verdict."""
    members, m_set, m_rest, m_all = _cause_set(setup, ordered)
    necessity = setup.m_clean - m_set
    say("random sets", 0.7)
    random_drops, scope = _random_comparison(setup, members)
    p = empirical_p_value(necessity, random_drops, tol=setup.tol)
    removed = necessity / setup.gap
    all_removed = setup.m_clean - m_all
    sufficiency = (m_rest - m_all) / all_removed if abs(all_removed) > 1e-9 else float("nan")
    word, reason = set_verdict(
        members,
        removed=removed,
        p=p,
        n_random=len(random_drops),
        scope=scope,
        infrastructure=[e.id for e in ordered if e.infrastructure],
        cfg=setup.config,
    )
    return SetEvidence(
        components=members,
        metric_ablated=m_set,
        necessity=necessity,
        necessity_fraction=removed,
        sufficiency_metric=m_rest,
        sufficiency_fraction=sufficiency,
        random_drops=random_drops,
        p_value=p,
        random_scope=scope,
        verdict=word,
        reason=reason,
    )


def _verdicts(
    setup: _Setup,
    evidence: Sequence[CandidateEvidence],
    cause: SetEvidence,
    groups: Mapping[str, NeuronGroup],
) -> None:
    """Each candidate's verdict word (``VERDICT_WORDS``) and reason: does the set need it, is it
    specific? A member's contribution is what the set loses without it."""
    members = cause.components
    without = setup.ablator.run(
        [dict.fromkeys([c for c in members if c != m], setup.set_source) for m in members],
        index_offset=OFFSET_LEAVE_ONE_OUT,
    )
    contribution = {
        m: float(v) - cause.metric_ablated for m, v in zip(members, without, strict=True)
    }
    by_id = {e.id: e for e in evidence}
    for e in evidence:
        e.in_set = e.id in members
        e.verdict, e.reason = component_verdict(
            e,
            share=max(e.total_effect, e.necessity) / setup.gap,
            contrib=contribution,
            set_verdict=cause.verdict,
            set_fraction=cause.necessity_fraction,
            gap=setup.gap,
            cfg=setup.config,
        )
    for e in evidence:
        if e.id in groups:
            e.reason += "; " + groups[e.id].describe(setup.share, by_id[groups[e.id].parent])


def _circuit(
    subject: Subject,
    setup: _Setup,
    ordered: Sequence[CandidateEvidence],
    ranking: Sequence[tuple[str, float]],
    *,
    baseline: Target | None,
    scores: ComponentScores | None,
) -> Circuit:
    """The circuit built from the stage's measurements (``rca.confirm.circuit``)."""
    ablator = setup.ablator
    per_position, edge_score = _trace_views(scores)
    differing = setup.target.differing(baseline) if baseline is not None else []
    ids = setup.target.input_ids(1)[0].tolist()
    return build_circuit(
        ablator,
        ordered,
        [c for c, _ in ranking if c in set(ablator.components)],
        src=setup.patch_source,
        m_clean=setup.m_clean,
        gap=setup.gap,
        cfg=setup.config,
        per_position=per_position,
        edge_score=edge_score,
        differing=differing,
        token_text=(
            (lambda p: str(subject.tokenizer.decode([ids[p]])))
            if subject.tokenizer is not None
            else None
        ),
    )


def confirm(
    subject: Subject,
    target: Target,
    ranking: Sequence[tuple[str, float]],
    *,
    baseline: Target | None,
    reference: Sequence[str] | Sequence[Sequence[int]] = (),
    config: ConfirmConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
    scores: ComponentScores | None = None,
) -> Verdict:
    """Verify the ranked candidates of a trace and find a minimal confirmed cause set.

    ``ranking``: (component id, attribution score) from the trace, best first; ids other than
    heads and MLPs are skipped. ``baseline``: the counterfactual target the trace used (None for
    a mean baseline, when TE and DE use the mean too). ``scores``: the trace's scores, whose
    position-resolved attribution places the circuit's members and whose edge scores go with
    its edges (without them, members are placed by patching alone and edges carry no score).
    """
    cfg = config or ConfirmConfig()
    say = progress or (lambda stage, frac: None)
    started = time.perf_counter()
    ablator = Ablator(
        subject,
        target,
        baseline=baseline,
        reference=reference,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    setup = _setup(ablator, target, baseline=baseline, cfg=cfg)
    candidate_ids = [c for c, _ in ranking if c in set(ablator.components)][: cfg.top_k]
    if not candidate_ids:
        raise ConfirmError("the trace ranked no heads or MLPs")

    say("singles", 0.1)
    single_drop = _singles(setup)
    say("candidates", 0.3)
    evidence, zero_cost = _candidates(
        setup,
        candidate_ids,
        attribution=dict(ranking),
        single_drop=single_drop,
        # necessity is the singles' drop where sets are ablated as necessity is, deterministically
        shared=setup.set_source == setup.necessity_source
        and setup.necessity_source in ("mean", "zero"),
    )
    say("specificity", 0.4)
    benign = _specificity(subject, setup, evidence, reference=reference)
    say("neurons", 0.45)
    groups, groups_zero_cost, neurons_equiv = _neurons(
        subject,
        setup,
        evidence,
        benign,
        neuron_scores=scores.neurons if scores is not None else {},
        single_drop=single_drop,
    )
    zero_cost += groups_zero_cost
    _component_p_values(setup, evidence, single_drop=single_drop, groups=groups)
    ordered = _ranking(setup, evidence)
    say("cause set", 0.5)
    cause = _set_evidence(setup, ordered, say=say)
    say("verdicts", 0.9)
    _verdicts(setup, evidence, cause, groups)
    say("circuit", 0.95)
    circuit_equiv, circuit_started = ablator.forward_equiv, time.perf_counter()
    circuit = _circuit(subject, setup, ordered, ranking, baseline=baseline, scores=scores)
    circuit_equiv = ablator.forward_equiv - circuit_equiv
    circuit_seconds = time.perf_counter() - circuit_started
    say("done", 1.0)
    return Verdict(
        metric_clean=setup.m_clean,
        metric_baseline=setup.m_base,
        metric_reference=setup.m_ref,
        baseline=setup.baseline_desc,
        candidates=evidence,
        cause_set=cause,
        config=cfg,
        circuit=circuit,
        cost={
            "set_kind": "patch" if setup.set_source == "baseline" else setup.set_source,
            "necessity_kind": setup.necessity_source,
            "seconds": time.perf_counter() - started,
            "variants": ablator.n_forward_rows // target.rows,
            "variants_reused": ablator.n_reused,  # asked for again, answered from the first run
            "forward_equiv": ablator.forward_equiv + 2 + (1 if baseline is not None else 0),
            "zero_ablation_forward_equiv": zero_cost,  # of which the zero ablations (NE0)
            "benign_forward_equiv": benign.forward_equiv,  # the benign damage, not in forward_equiv
            "circuit_forward_equiv": circuit_equiv,  # of forward_equiv: the circuit's experiments
            "neurons_forward_equiv": neurons_equiv,  # of forward_equiv: resolving MLPs to neurons
            "circuit_seconds": circuit_seconds,
            "benign_seconds": benign.seconds,
            "benign_prompts": max((d.n_prompts for d in benign.damage.values()), default=0),
            "reference_prompts": len(ablator.refs),
        },
    )


def _benign_texts(
    reference: Sequence[str] | Sequence[Sequence[int]], cfg: ConfirmConfig
) -> list[str] | list[list[int]]:
    """The ordinary text benign damage is measured on: the reference prompts, else the packaged
    corpus (``rca.benign``)."""
    if reference:
        return [p if isinstance(p, str) else list(p) for p in reference][: cfg.benign_prompts]  # type: ignore[return-value]
    return benign_prompts(cfg.benign_prompts, seed=cfg.seed)


def _benign_forward_equiv(
    subject: Subject, texts: Sequence[Any], components: Sequence[str], length: int
) -> float:
    """The benign damage's cost in forward passes of the incident: one run over the prompts
    unablated, then each component's from its own layer up."""
    seqs, _ = encoded(subject, texts)
    tokens = sum(len(q) for q in seqs) / max(1, length)
    n = subject.adapter.n_layers
    return tokens * (1 + sum((n - (parse_id(c).layer or 0)) / n for c in components))


def _trace_views(
    scores: ComponentScores | None,
) -> tuple[dict[str, list[float]] | None, Callable[[str, str], float | None] | None]:
    """The trace's position-resolved attribution (component -> score per position) and its
    edge scores, where it has them."""
    if scores is None:
        return None, None
    per_position = {n: scores.per_position[i].tolist() for i, n in enumerate(scores.nodes)}
    if scores.edges is None:
        return per_position, None
    up = {n: i for i, n in enumerate(scores.up)}
    down = {n: j for j, n in enumerate(scores.down)}
    edges = scores.edges

    def edge_score(u: str, d: str) -> float | None:
        if u not in up or d not in down:
            return None
        return float(edges[up[u], down[d]])

    return per_position, edge_score
