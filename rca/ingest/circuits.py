"""Grouping logged incidents by the mechanism a quick trace finds (``rca ingest`` without
``--group-by``).

Each record is traced on its own: attribution patching of every head and MLP (nodes only, one
forward and backward and one baseline forward), patched to the mean over reference prompts
(the first record's, as an investigation picks them: ``reference_prompts``), each record's
scores divided by its own gap. Its **pushes** are those shares where they push toward the bad
output (negative ones set to 0), over the heads and MLPs that ordinary text does not need: the
candidates (every record's ``2 * top`` strongest pushes) have their benign damage measured once
(``rca.specificity``, as confirm measures it), and infrastructure is left out.

Records are grouped greedily in file order by the direction of their pushes: a record joins
the group whose summed (unit) pushes it is most similar to (cosine), where that similarity is
at least ``same``, else it starts a group. A group's label is the ``top`` strongest components
of its summed pushes, in node order (``L1.H0+L2.H3``); a record that pushes through nothing
specific is ``unattributed``. Each record's own ``signature`` (its ``top`` strongest pushes)
is reported beside. This is a first-order grouping, to be confirmed: each group becomes a
case, and ``rca investigate`` confirms its mechanism on every fit variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rca.ingest.incident import Incident
from rca.model.subject import Subject

__all__ = ["CircuitGroups", "circuit_groups"]

TOP = 3
SAME = 0.5
UNATTRIBUTED = "unattributed"


@dataclass(frozen=True)
class CircuitGroups:
    """Per record (in order): its own signature and its group's label; the components left
    out as infrastructure."""

    signatures: list[tuple[str, ...]]
    labels: list[str]
    infrastructure: list[str]


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
    from rca.trace.components import Baseline, site_means
    from rca.trace.fitset import gap_shares, node_scores

    if not incidents:
        return CircuitGroups([], [], [])
    rendered = [inc.for_model(subject.tokenizer) for inc in incidents]
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    refs, _ = reference_prompts(rendered[0], n_reference, tokenizer=subject.tokenizer, n_ctx=n_ctx)
    base = Baseline("mean", "mean over the reference prompts", means=site_means(subject, refs))
    rows = []
    for inc in rendered:
        sc = node_scores(subject, inc.encode(subject), base)
        share = gap_shares(sc)
        rows.append(share if share is not None else sc.scores.double())
    nodes = list(sc.nodes)
    shares = torch.stack(rows)
    # every record's strongest pushes toward its output are the candidates
    leading = shares.argsort(dim=1, descending=True)[:, : 2 * top]
    candidates = sorted(
        {nodes[j] for j in leading.flatten().tolist() if nodes[j] != "EMB"}, key=nodes.index
    )
    damage = benign_damage(subject, candidates, [r for r in refs if isinstance(r, str)][:16])
    infra = [c for c in candidates if damage[c].infrastructure]
    keep = [j for j, n in enumerate(nodes) if n != "EMB" and n not in infra]
    pushes = shares[:, keep].clamp(min=0)
    norms = pushes.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, pushes / norms.clamp(min=1e-12), pushes)
    kept_nodes = [nodes[j] for j in keep]

    def signature(v: torch.Tensor) -> tuple[str, ...]:
        idx = [j for j in v.argsort(descending=True)[:top].tolist() if float(v[j]) > 0]
        return tuple(sorted((kept_nodes[j] for j in idx), key=nodes.index))

    sums: list[torch.Tensor] = []
    members: list[int] = []  # per record: its group, or -1
    for u in units:
        if float(u.norm()) == 0.0:
            members.append(-1)
            continue
        sims = [float(u @ (g / g.norm())) for g in sums]
        best = max(range(len(sims)), key=sims.__getitem__, default=None)
        if best is None or sims[best] < same:
            sums.append(u.clone())
            members.append(len(sums) - 1)
        else:
            sums[best] += u
            members.append(best)
    labels = ["+".join(signature(sums[g])) if g >= 0 else UNATTRIBUTED for g in members]
    return CircuitGroups([signature(u) for u in units], labels, infra)
