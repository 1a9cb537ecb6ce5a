"""Grouping logged incidents by the mechanism a quick trace finds (``rca ingest`` without
``--group-by``).

Each record is traced on its own: attribution patching of every head and MLP (nodes only, one
forward and backward and one baseline forward), patched to the mean over reference prompts
(the first record's, as an investigation picks them: ``reference_prompts``), each record's
scores divided by its own gap. A component is a candidate for a record where it is among its
``2 * top`` strongest pushes toward the bad output. What ordinary text needs is left out: the
candidates' benign damage is measured once (``rca.specificity``, as confirm measures it), and
infrastructure never names a group. A record's **signature** is its ``top`` strongest
remaining components pushing toward the bad output.

Records are grouped greedily in file order: a record joins the first group whose first
record's signature shares at least ``same`` of the two signatures' union (Jaccard), else it
starts a group. The group's label is its first record's signature, in node order
(``L1.H0+L2.H3``); a record with no signature (nothing specific pushes toward its output)
gets ``unattributed``. This is a first-order grouping, to be confirmed: each group becomes a
case, and ``rca investigate`` confirms its mechanism on every fit variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rca.ingest.incident import Incident
from rca.model.subject import Subject

__all__ = ["CircuitGroups", "circuit_groups"]

TOP = 3
SAME = 0.5
UNATTRIBUTED = "unattributed"


@dataclass(frozen=True)
class CircuitGroups:
    """Per record (in order): its signature and its group's label; the components left out
    as infrastructure."""

    signatures: list[tuple[str, ...]]
    labels: list[str]
    infrastructure: list[str]


def _jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def circuit_groups(
    subject: Subject,
    incidents: Sequence[Incident],
    *,
    top: int = TOP,
    same: float = SAME,
    n_reference: int = 32,
) -> CircuitGroups:
    """The group of each incident (one per logged record); see the module docstring."""
    from rca.ingest.preflight import reference_prompts
    from rca.specificity import benign_damage
    from rca.trace.components import Baseline, score_components, site_means

    if not incidents:
        return CircuitGroups([], [], [])
    rendered = [inc.for_model(subject.tokenizer) for inc in incidents]
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    refs, _ = reference_prompts(rendered[0], n_reference, tokenizer=subject.tokenizer, n_ctx=n_ctx)
    base = Baseline("mean", "mean over the reference prompts", means=site_means(subject, refs))
    pushes: list[list[tuple[str, float]]] = []
    for inc in rendered:
        sc = score_components(subject, inc.encode(subject), base, method="atp", edges=False)
        gap = sc.metric_clean - sc.metric_baseline
        share = sc.scores.double() / gap if gap > 0 else sc.scores.double()
        ranked = sorted(
            ((n, float(s)) for n, s in zip(sc.nodes, share.tolist(), strict=True) if n != "EMB"),
            key=lambda p: -p[1],
        )
        pushes.append([p for p in ranked if p[1] > 0][: 2 * top])
    order = {n: i for i, n in enumerate(sc.nodes)}
    candidates = sorted({n for p in pushes for n, _ in p}, key=order.__getitem__)
    damage = benign_damage(subject, candidates, [r for r in refs if isinstance(r, str)][:16])
    infra = [c for c in candidates if damage[c].infrastructure]
    signatures = [
        tuple(sorted([n for n, _ in p if n not in infra][:top], key=order.__getitem__))
        for p in pushes
    ]
    heads: list[tuple[str, ...]] = []
    labels = []
    for sig in signatures:
        if not sig:
            labels.append(UNATTRIBUTED)
            continue
        home = next((h for h in heads if _jaccard(h, sig) >= same), None)
        if home is None:
            heads.append(sig)
            home = sig
        labels.append("+".join(home))
    return CircuitGroups(signatures, labels, infra)
