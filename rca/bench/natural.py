"""Natural incidents with a computable ground truth: indirect-object identification (IOI).

A planted fault has a known location; a real model's behaviour usually has none. IOI is the
exception: in "When Mary and John went to the store, John gave a drink to" a model names the
indirect object " Mary" rather than the repeated subject " John", and the counterfactual "...,
Mary gave a drink to" (the second subject changed) flips the answer with every token but one
in place. Which components *write* the answer can then be computed exactly, by brute force:

- ``ioi_incidents``: incidents from ``TEMPLATES`` and name pairs drawn by seed from ``NAMES``
  (those that are one token with a leading space in the model's tokenizer). Bad is the
  indirect object, good the subject; an incident is kept only where its counterfactual encodes
  to as many tokens as the prompt and differs from it at one position, the second subject.
- ``ground_truth``: every head's and MLP's exact direct effect DE, the metric drop when it is
  patched to its counterfactual activation with every component after it held at its clean
  value (``rca.confirm.Ablator``; the variants ``confirm`` builds for one candidate's DE, built
  here for all of them). With everything after it held clean, a component reaches the answer
  only through its own write at the answer position, so patching every position or the answer
  position alone gives the same DE (tests/unit/test_natural.py checks it against plain hooks).
- ``benign_table``: every head's and MLP's benign damage (``rca.specificity.benign_damage``),
  once per model, cached in the output directory under the model's fingerprint.
- ``evaluate_incident``: the ground truth beside rca's own verdict (``rca.investigate``, no
  remedies): rca's writers (``writers``), whether each is in the exact top 3 by DE, whether the
  cause set holds infrastructure by the brute-force benign damage, the cause set's necessity,
  and what each cost.
- ``run_natural``: all of it for ``n`` incidents the model does show (it names the indirect
  object: P(bad) > P(good)), written to ``natural.json`` and ``natural.md``.

``python -m rca.bench.natural --model DIR --out DIR [--n 12] [--seed 0]``;
``python -m rca.bench.cost --only natural`` runs it on SmolLM2-135M-Instruct.

One module over 500 lines: the incidents, their brute-force truth and the comparison with
rca's verdict are one benchmark, read top to bottom.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rca.confirm import Ablator, ConfirmConfig, Variant, Verdict, writer_ids
from rca.ingest.incident import Incident
from rca.model.ids import parse_id
from rca.model.metric import encode_text, evaluate, reference_point
from rca.model.subject import Subject
from rca.specificity import INFRASTRUCTURE_LOSS_PCT, Damage

# what a faithful circuit removes, patched alone (the confirm default it is scored against)
FAITHFUL = ConfirmConfig().faithful_fraction

__all__ = [
    "NAMES",
    "OBJECTS",
    "PLACES",
    "TEMPLATES",
    "GroundTruth",
    "benign_table",
    "components_of",
    "direct_effect_variants",
    "evaluate_incident",
    "ground_truth",
    "ioi_incidents",
    "main",
    "run_natural",
    "single_token_names",
    "writers",
]

Log = Callable[[str], None]

# Common first names; those that are not one token after a space are left out per tokenizer.
NAMES = (
    "Mary John Tom James Anna Paul Lisa Mark Sarah David Emma Kate Alice Bob Michael Daniel "
    "Laura Peter Susan Jack Linda Robert Karen Steve Maria Chris Jane Joe Ryan Adam Ben Sam Amy "
    "Tim Eric Kevin Jason Rachel Helen George Frank Henry Anne Max Alex Emily Grace Lucy Jim Dan"
).split()
PLACES = ("store", "park", "school", "office", "beach", "station", "garden", "library")
OBJECTS = ("drink", "book", "ring", "letter", "ball", "bag", "key", "gift")
# {A}: the indirect object, {B}: the subject, {S2}: the subject's second mention, which the
# counterfactual replaces with {A}
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S2} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {S2} said to",
    "After {A} and {B} went to the {place}, {S2} handed the {object} to",
    "While {A} and {B} were working at the {place}, {S2} passed the {object} to",
)


def single_token_names(tokenizer: Any, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are one token, not the unknown token, after a leading space."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for name in names:
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != unk:
            out.append(name)
    return out


def _aligned(tokenizer: Any, prompt: str, counterfactual: str) -> bool:
    """The two prompts encode to as many tokens and differ at exactly one position."""
    a, b = encode_text(tokenizer, prompt), encode_text(tokenizer, counterfactual)
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1


def ioi_incidents(
    tokenizer: Any,
    n: int = 12,
    seed: int = 0,
    *,
    model: str = "ioi",
    names: Sequence[str] = NAMES,
    templates: Sequence[str] = TEMPLATES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> list[Incident]:
    """``n`` IOI incidents, drawn by ``seed``: template ``i`` cycles through ``templates``, the
    names (two distinct ones of ``names`` that are single tokens), place and object come from
    one seeded stream. Bad is " {A}" (the indirect object), good " {B}" (the subject), the
    counterfactual the prompt with the second {B} replaced by {A}; draws whose counterfactual
    does not line up with the prompt token for token are skipped. The first ``k`` incidents do
    not depend on ``n``. ``model``: the model reference the incidents carry."""
    pool = single_token_names(tokenizer, names)
    if len(pool) < 2:
        raise ValueError("fewer than two names are single tokens in this tokenizer")
    rng = random.Random(seed)
    out: list[Incident] = []
    draws = 0
    while len(out) < n and draws < 50 * max(n, 1):
        k = draws % len(templates)
        template = templates[k]
        a, b = rng.sample(pool, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        draws += 1
        fields = {"A": a, "B": b, "place": place, "object": obj}
        prompt = template.format(S2=b, **fields)
        counterfactual = template.format(S2=a, **fields)
        if not _aligned(tokenizer, prompt, counterfactual):
            continue
        out.append(
            Incident(
                id=f"ioi-{seed}-{len(out):02d}",
                title=f"names the indirect object {a} rather than the subject {b}",
                severity="low",
                model=model,
                prompt=prompt,
                bad=" " + a,
                good=" " + b,
                counterfactual=counterfactual,
                tags=("ioi", "natural", f"template-{k}"),
                notes="indirect-object identification; the counterfactual changes the second "
                "mention of the subject, which flips the answer",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# ground truth


def components_of(subject: Subject) -> list[str]:
    """Every head and MLP, in forward order: ``L{l}.H{h}`` then ``L{l}.MLP``."""
    a = subject.adapter
    return [
        f"L{layer}.{c}"
        for layer in range(a.n_layers)
        for c in [f"H{h}" for h in range(a.n_heads)] + ["MLP"]
    ]


def direct_effect_variants(
    subject: Subject, components: Sequence[str], *, source: str = "baseline"
) -> list[Variant]:
    """For each component, the variant that measures its direct effect: it set to ``source``,
    every component after it ``clean``. After it: any component of a later layer, and its own
    layer's MLP where it is a head of a sequential block (in a parallel block, GPT-NeoX and Phi,
    attention and MLP read the same input)."""
    everything = components_of(subject)
    parallel = subject.adapter.parallel
    out: list[Variant] = []
    for c in components:
        cid = parse_id(c)
        variant: Variant = {c: source}
        for other in everything:
            oid = parse_id(other)
            assert oid.layer is not None and cid.layer is not None
            later = oid.layer > cid.layer or (
                oid.layer == cid.layer and oid.kind == "mlp" and cid.kind == "head" and not parallel
            )
            if later:
                variant[other] = "clean"
        out.append(variant)
    return out


@dataclass(frozen=True)
class GroundTruth:
    """An incident's exact direct effects; metrics are log P(bad) - log P(good)."""

    metric_clean: float
    metric_counterfactual: float
    metric_reference: float  # what "all of the behaviour removed" reaches (confirm's rule)
    p_bad: float  # P(bad) after the prompt
    p_good: float
    direct_effects: dict[str, float]  # every head and MLP: metric drop
    forward_equiv: float  # the ablations' cost, in forward passes of the incident
    seconds: float

    @property
    def gap(self) -> float:
        return self.metric_clean - self.metric_reference

    def top(self, k: int = 3, *, kind: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` largest direct effects (of heads or MLPs only, with ``kind``)."""
        items = [
            (c, d)
            for c, d in self.direct_effects.items()
            if kind is None or parse_id(c).kind == kind
        ]
        return sorted(items, key=lambda x: -x[1])[:k]

    def rank_of(self, component: str) -> int:
        """1 for the largest direct effect."""
        order = sorted(self.direct_effects, key=lambda c: -self.direct_effects[c])
        return order.index(component) + 1


def ground_truth(subject: Subject, incident: Incident, *, batch_size: int = 0) -> GroundTruth:
    """Every head's and MLP's exact direct effect on ``incident`` (which needs a good
    continuation and a counterfactual that lines up with the prompt)."""
    from rca.trace import given_counterfactual

    t0 = time.perf_counter()
    inc = incident.for_model(subject.tokenizer)
    if inc.counterfactual is None or inc.good is None:
        raise ValueError(
            f"{inc.id}: the ground truth needs a good continuation and a counterfactual"
        )
    target = inc.encode(subject)
    cf = given_counterfactual(subject, inc, target)
    if not cf.ok:
        raise ValueError(f"{inc.id}: the counterfactual does not line up with the prompt")
    ab = Ablator(subject, target, baseline=cf.target(target), batch_size=batch_size, memo=False)
    comps = components_of(subject)
    metrics = ab.run(direct_effect_variants(subject, comps))
    assert ab.metric_baseline is not None
    m_clean, m_cf = ab.metric_clean, ab.metric_baseline
    with torch.inference_mode():
        value = evaluate(subject.model, target)
    return GroundTruth(
        metric_clean=m_clean,
        metric_counterfactual=m_cf,
        metric_reference=reference_point(m_clean, m_cf, n_conts=target.n_conts),
        p_bad=value.p_bad,
        p_good=value.p_good or 0.0,
        direct_effects={c: m_clean - float(m) for c, m in zip(comps, metrics, strict=True)},
        forward_equiv=ab.forward_equiv + 2,  # and the two recordings
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# benign damage, once per model


def benign_table(
    subject: Subject,
    out_dir: Path | None,
    *,
    n_prompts: int = 16,
    seed: int = 0,
    log: Log | None = None,
) -> dict[str, Damage]:
    """Every head's and MLP's benign damage on ``benign_prompts(n_prompts, seed=seed)``.

    Cached as ``benign-damage-<fingerprint>.json`` in ``out_dir``, keyed by the model's
    fingerprint, the corpus version and the prompts drawn; a model without a fingerprint (one
    built in memory) is measured every time."""
    from rca.benign import CORPUS_VERSION, benign_prompts
    from rca.specificity import benign_damage

    say = log or (lambda msg: None)
    key = {
        "fingerprint": subject.fingerprint,
        "corpus": CORPUS_VERSION,
        "n_prompts": n_prompts,
        "seed": seed,
    }
    path = None
    if out_dir is not None and subject.fingerprint:
        path = Path(out_dir) / f"benign-damage-{subject.fingerprint[:16]}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                say(f"benign damage: cached in {path}")
                return {c: Damage(**d) for c, d in cached["damage"].items()}
    comps = components_of(subject)
    say(f"benign damage: {len(comps)} components on {n_prompts} benign prompts")
    t = time.perf_counter()
    damage = benign_damage(subject, comps, benign_prompts(n_prompts, seed=seed))
    seconds = time.perf_counter() - t
    say(f"benign damage: {seconds:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "key": key,
            "seconds": seconds,
            "damage": {c: asdict(d) for c, d in damage.items()},
        }
        path.write_text(json.dumps(data, indent=1))
    return damage


# ---------------------------------------------------------------------------------------------
# rca's answer beside the ground truth


def writers(verdict: Verdict) -> list[str]:
    """rca's writers of the bad answer, largest direct effect first: the circuit's members with
    the writer role, or, for a verdict without a circuit, the writers among the candidates that
    are not infrastructure, by the circuit's definition (``rca.confirm.circuit.writer_ids``)
    with the gap from the prompt's metric to the reference point."""
    by_id = {c.id: c for c in verdict.candidates}
    if verdict.circuit is not None:
        named = verdict.circuit.ids("writer")
        return sorted(named, key=lambda c: -by_id[c].direct_effect if c in by_id else 0.0)
    gap = verdict.metric_clean - verdict.metric_reference
    specific = [c for c in verdict.candidates if not c.infrastructure]
    picked = set(writer_ids(specific, gap, verdict.config))
    return [c.id for c in sorted(specific, key=lambda c: -c.direct_effect) if c.id in picked]


def _trace_forward_equiv(run: Any) -> float | None:
    cost = getattr(getattr(getattr(run, "attribution", None), "components", None), "cost", None)
    return None if not cost else cost.get("forward_equiv")


def evaluate_incident(
    subject: Subject,
    incident: Incident,
    *,
    damage: dict[str, Damage],
    config: Any = None,
) -> dict[str, Any]:
    """The exact direct effects of ``incident`` and rca's verdict on it, side by side (one row
    of ``natural.json``). ``config``: an ``InvestigateConfig`` (default: rca's, no remedies)."""
    from rca.investigate import InvestigateConfig, investigate

    gt = ground_truth(subject, incident)
    top3 = gt.top(3)
    top3_ids = {c for c, _ in top3}
    row: dict[str, Any] = {
        "id": incident.id,
        "prompt": incident.prompt,
        "counterfactual": incident.counterfactual,
        "bad": incident.bad,
        "good": incident.good,
        "p_bad": gt.p_bad,
        "p_good": gt.p_good,
        "metric": {
            "prompt": gt.metric_clean,
            "counterfactual": gt.metric_counterfactual,
            "reference": gt.metric_reference,
        },
        "gap": gt.gap,
        "exact": {
            "top3": [{"id": c, "de": d, "infrastructure": _infra(damage, c)} for c, d in top3],
            "top3_heads": [{"id": c, "de": d} for c, d in gt.top(3, kind="head")],
            "direct_effects": gt.direct_effects,
            "forward_equiv": gt.forward_equiv,
            "seconds": gt.seconds,
        },
    }
    cfg = config or InvestigateConfig(remedy=False)
    t = time.perf_counter()
    try:
        run = investigate(incident, subject=subject, config=cfg)
    except ValueError as e:  # IncidentError, ConfirmError: no incident behaviour to explain
        row["rca"] = {"error": str(e), "seconds": time.perf_counter() - t}
        return row
    seconds = time.perf_counter() - t
    v = run.verdict
    ev = {c.id: c for c in v.candidates}
    members = list(v.cause_set.components)
    infra_members = [c for c in members if _infra(damage, c)]
    circuit = v.circuit
    circuit_infra = [] if circuit is None else [c for c in circuit.specific if _infra(damage, c)]
    row["rca"] = {
        "verdict": v.verdict,
        "cause_set": members,
        "necessity_fraction": v.cause_set.necessity_fraction,
        "faithfulness": None if circuit is None else circuit.faithfulness,
        "circuit": None
        if circuit is None
        else {
            "members": [[m.id, m.role] for m in circuit.members],
            "sites": [m.label for m in circuit.members],
            # the entry member, and whether it sits where the prompt differs from its
            # counterfactual (the repeated name)
            "entry": next((m.label for m in circuit.members if m.role == "entry"), None),
            "entry_at_differing": any(
                m.role == "entry"
                and bool(m.positions)
                and set(m.positions) <= set(circuit.entry_positions)
                for m in circuit.members
            ),
            "entry_positions": circuit.entry_positions,
            "edges": [
                [e.source, e.target, e.share]
                for e in circuit.edges
                if e.verified and e.target != "LOGITS"
            ],
            "n_edges_tested": sum(e.target != "LOGITS" for e in circuit.edges),
            "curve": circuit.curve,
            "infra_members": circuit_infra,
        },
        "writers": [
            {
                "id": w,
                "de_rca": ev[w].direct_effect if w in ev else None,
                "de_exact": gt.direct_effects.get(w),
                "exact_rank": gt.rank_of(w) if w in gt.direct_effects else None,
                "in_top3": w in top3_ids,
            }
            for w in writers(v)
        ],
        "ranked": [c.id for c in v.ranked()],
        "infra_in_set": bool(infra_members),
        "infra_members": infra_members,
        "metric_prompt": v.metric_clean,
        "metric_reference": v.metric_reference,
        "seconds": seconds,
        "stages_s": dict(run.timings),
        "confirm_forward_equiv": v.cost.get("forward_equiv"),
        "circuit_forward_equiv": v.cost.get("circuit_forward_equiv"),
        "benign_forward_equiv": v.cost.get("benign_forward_equiv"),
        "trace_forward_equiv": _trace_forward_equiv(run),
    }
    return row


def _infra(damage: dict[str, Damage], component: str) -> bool:
    d = damage.get(component)
    return d is not None and d.infrastructure


# ---------------------------------------------------------------------------------------------
# the run


def _shown(incidents: list[Incident], subject: Subject, n: int) -> tuple[list[Incident], int]:
    """The first ``n`` incidents the model shows (P(bad) > P(good)), and how many it did not."""
    kept, skipped = [], 0
    for inc in incidents:
        with torch.inference_mode():
            m = evaluate(subject.model, inc.encode(subject)).metric
        if m > 0:
            kept.append(inc)
        else:
            skipped += 1
        if len(kept) == n:
            break
    return kept, skipped


def run_natural(
    model_path: str | Path,
    out_dir: str | Path,
    n: int = 12,
    seed: int = 0,
    *,
    device: str = "auto",
    log: Log | None = None,
) -> dict[str, Any]:
    """``n`` IOI incidents the model shows, each with its exact direct effects and rca's verdict;
    writes ``natural.json`` and ``natural.md`` to ``out_dir`` and returns what the JSON holds."""
    from rca.model.subject import load_subject

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_path).expanduser()
    t0 = time.perf_counter()
    subject = load_subject(model_path, device=device)
    drawn = ioi_incidents(subject.tokenizer, 4 * n, seed, model=str(model_path))
    incidents, skipped = _shown(drawn, subject, n)
    say(f"{len(incidents)} incidents the model shows ({skipped} drawn ones it does not)")
    damage = benign_table(subject, out, seed=0, log=say)
    rows = []
    for i, inc in enumerate(incidents):
        t = time.perf_counter()
        row = evaluate_incident(subject, inc, damage=damage)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        say(f"[{i + 1}/{len(incidents)}] {inc.id}: {row['seconds']:.0f} s")
    result = {
        "model": str(model_path),
        "fingerprint": subject.fingerprint,
        "device": str(subject.device),
        "threads": torch.get_num_threads(),
        "n": len(rows),
        "seed": seed,
        "skipped_not_shown": skipped,
        "infrastructure_loss_pct": INFRASTRUCTURE_LOSS_PCT,
        "n_infrastructure": sum(d.infrastructure for d in damage.values()),
        "summary": summarize(rows),
        "incidents": rows,
        "seconds": time.perf_counter() - t0,
    }
    (out / "natural.json").write_text(json.dumps(result, indent=1))
    (out / "natural.md").write_text(markdown(result))
    return result


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts over the incidents with a verdict (the issue's targets: writers in the exact
    top 3, no infrastructure in the cause set, faithful circuits) and the mean seconds over
    all."""
    ok = [r for r in rows if "error" not in r.get("rca", {})]
    if not ok:
        return {"n_verdicts": 0}
    first = [r["rca"]["writers"][0] for r in ok if r["rca"]["writers"]]
    return {
        "n_verdicts": len(ok),
        "with_writer": len(first),
        "top_writer_in_exact_top3": sum(w["in_top3"] for w in first),
        "top_writer_is_exact_top1": sum(w["exact_rank"] == 1 for w in first),
        "infra_in_set": sum(r["rca"]["infra_in_set"] for r in ok),
        "all_writers_in_top3": sum(
            bool(r["rca"]["writers"]) and all(w["in_top3"] for w in r["rca"]["writers"]) for r in ok
        ),
        "faithful": sum((r["rca"].get("faithfulness") or 0.0) >= FAITHFUL for r in ok),
        "infra_in_circuit": sum(
            bool((r["rca"].get("circuit") or {}).get("infra_members")) for r in ok
        ),
        "entry_at_differing": sum(
            bool((r["rca"].get("circuit") or {}).get("entry_at_differing")) for r in ok
        ),
        "mean_seconds": sum(r["seconds"] for r in rows) / len(rows),
    }


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any]) -> str:
    """``natural.md``: one row per incident."""
    s = result["summary"]
    lines = [
        f"# Natural incidents: IOI on {Path(result['model']).name}",
        "",
        f"{result['n']} incidents (seed {result['seed']}; {result['skipped_not_shown']} drawn ones "
        f"the model does not show were skipped), {result['device']}, {result['threads']} threads. "
        f"Exact DE: the metric drop (log P(bad) - log P(good)) with the component patched to the "
        f"counterfactual and everything after it held clean. {result['n_infrastructure']} "
        f"components are infrastructure (benign loss +{result['infrastructure_loss_pct']:.0f}% "
        "or more when mean-ablated).",
        "",
    ]
    if s.get("n_verdicts"):
        lines += [
            f"rca's top writer is in the exact top 3 in {s['top_writer_in_exact_top3']} of "
            f"{s['with_writer']} incidents with a writer (exact top 1: "
            f"{s['top_writer_is_exact_top1']}); the cause set holds infrastructure in "
            f"{s['infra_in_set']} of {s['n_verdicts']}; {s['mean_seconds']:.0f} s per incident.",
            f"Every writer is in the exact top 3 in {s.get('all_writers_in_top3', '-')} of "
            f"{s['n_verdicts']}; the circuit is faithful (patched alone, it removes >= "
            f"{FAITHFUL:.0%} of the gap) in {s.get('faithful', '-')} of {s['n_verdicts']} and "
            f"holds infrastructure in {s.get('infra_in_circuit', '-')}. Its entry sits at the "
            f"repeated name (the token where prompt and counterfactual differ) in "
            f"{s.get('entry_at_differing', '-')} of {s['n_verdicts']}.",
            "",
        ]
    lines += [
        "| prompt | P(bad) | gap | exact top-3 DE | rca writers | in top 3 | cause set "
        "| infra in set | faithfulness | s |",
        "|---|---:|---:|---|---|---|---|---|---:|---:|",
    ]
    for r in result["incidents"]:
        top = ", ".join(
            f"{t['id']} {t['de']:+.2f}" + (" (infra)" if t["infrastructure"] else "")
            for t in r["exact"]["top3"]
        )
        rca = r["rca"]
        head = (
            f"| {_md(r['prompt'])} → {_md(r['bad'])} | {r['p_bad']:.3f} | {r['gap']:.2f} | {top} "
        )
        if "error" in rca:
            lines.append(
                head + f"| error: {_md(rca['error'])[:120]} | | | | | {r['seconds']:.0f} |"
            )
            continue
        ws = rca["writers"]
        faith = rca["faithfulness"]
        lines.append(
            head
            + "| "
            + (", ".join(f"{w['id']} {w['de_rca']:+.2f}" for w in ws) or "none")
            + " | "
            + (", ".join("yes" if w["in_top3"] else "no" for w in ws) or "-")
            + f" | {', '.join(rca['cause_set']) or 'none'} ({rca['verdict']}, "
            f"{rca['necessity_fraction']:.0%}) | {'yes' if rca['infra_in_set'] else 'no'} | "
            + ("-" if faith is None else f"{faith:.2f}")
            + f" | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Circuits: the members at their positions with their roles; the edges path patching "
        "verified (share of the gap; of all member pairs tested); and the faithfulness of the "
        "first k components, k = 1, 2, 3, in the circuit's order / the trace's attribution "
        "ranking (EAP-IG) / that ranking with the infrastructure left out.",
        "",
        "| incident | circuit | verified edges | k=1 | k=2 | k=3 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["incidents"]:
        c = (r.get("rca") or {}).get("circuit")
        if not c:
            continue
        sites = c.get("sites") or [cid for cid, _ in c["members"]]
        members = ", ".join(
            f"{site} ({role})" for site, (_, role) in zip(sites, c["members"], strict=True)
        )
        edges = "; ".join(f"{a} → {b} {x:.0%}" for a, b, x in c.get("edges") or [])
        edges = (edges or "none") + f" (of {c.get('n_edges_tested', '-')})"
        cells = []
        for row in c["curve"][:3]:
            vals = [row.get("circuit"), row.get("attribution"), row.get("attribution_specific")]
            cells.append(" / ".join("-" if v is None else f"{v:.0%}" for v in vals))
        cells += ["-"] * (3 - len(cells))
        lines.append(f"| {r['id']} | {_md(members)} | {_md(edges)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--out", required=True, type=Path, help="directory for natural.json/.md")
    p.add_argument("--n", type=int, default=12, help="incidents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    result = run_natural(args.model, args.out, args.n, args.seed, device=args.device)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
