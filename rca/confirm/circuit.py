"""The circuit: the verdict as a small subgraph of components at positions, with roles and
edges checked by path patching (``docs/confirm.md``, "The circuit").

``build_circuit`` works on the measurements ``rca.confirm.confirm`` has made (each candidate's
total and direct effect, its benign damage, the rank order) and on the trace's position-resolved
attribution and edge scores. In order:

1. **Members.** The specific writers (``writer_ids``: a direct effect of at least
   ``writer_fraction`` of the gap and ``writer_share`` of the largest one), then the other
   specific candidates in rank order, until patching them alone to the baseline removes
   ``faithful_fraction`` of the gap; then each member that the rest does without is dropped,
   but for the writers and the top cause.
2. **The entry.** Where the prompt and its counterfactual differ in some tokens, every
   candidate is patched at those positions alone. The specific ones that move the metric by
   ``component_fraction`` of the gap there are the circuit's members at the entry; the
   earliest of them is *the* entry. Infrastructure there is shown beside them.
3. **Positions.** Each member is resolved to the positions where its position-resolved
   attribution is (the fewest, at most three, that hold ``position_fraction`` of its positive
   attribution), then checked: patched at those positions alone, it must keep
   ``position_fraction`` of its total effect. A member that fails acts at several positions
   and is shown without one.
4. **Faithfulness** of the specific members patched at their positions, and a curve against
   the attribution ranking's top k (with and without the infrastructure it ranks).
5. **Edges.** Between members (upstream first, positions causal), each path is patched
   alone (``rca.confirm.engine.Ablator.path_effects``); an edge is verified where that removes
   ``component_fraction`` of the gap. Writers have an edge to the logits: their direct
   effect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rca.confirm.engine import OFFSET_CIRCUIT
from rca.model.ids import format_id, parse_id, with_pos

if TYPE_CHECKING:
    from rca.confirm.engine import Ablator
    from rca.confirm.evidence import CandidateEvidence, ConfirmConfig

__all__ = [
    "ROLES",
    "Circuit",
    "CircuitEdge",
    "CircuitMember",
    "attributed_positions",
    "build_circuit",
    "circuit_from_json",
    "forward_position",
    "site_at",
    "site_label",
    "writer_ids",
]

ROLES = ("entry", "route", "writer", "infrastructure")
MAX_POSITIONS = 3  # the most positions a member is resolved to


def forward_position(cid: str, *, parallel: bool) -> tuple[int, int]:
    """Where a head or MLP (or MLP neurons) computes in the forward pass: (layer, 0 for
    attention, 1 for the MLP after it); in parallel blocks (GPT-NeoX, Phi) both read the same
    input: (layer, 0)."""
    c = parse_id(cid)
    assert c.layer is not None
    mlp = c.kind in ("mlp", "neuron", "neurons")
    return (c.layer, 1 if mlp and not parallel else 0)


def site_at(cid: str, pos: int) -> str:
    """The id of component ``cid`` at position ``pos`` (``L3.H2`` at 7: ``L3.H2@7``)."""
    return format_id(with_pos(cid, pos))


def site_label(cid: str, positions: Sequence[int]) -> str:
    """``L3.H2`` at no position, ``L3.H2@7`` at one, ``L3.H2@{5,7}`` at several (a label for
    reports, not an id)."""
    if not positions:
        return cid
    if len(positions) == 1:
        return site_at(cid, positions[0])
    return f"{cid}@{{{','.join(str(p) for p in positions)}}}"


@dataclass
class CircuitMember:
    id: str
    role: str  # entry | route | writer | infrastructure (ROLES)
    total_effect: float
    direct_effect: float
    benign_loss_pct: float | None = None
    # where it acts: the positions it was resolved to and checked at; empty where it acts at
    # several positions that no three of them hold
    positions: list[int] = field(default_factory=list)
    position_effect: float | None = None  # metric drop when patched at ``positions`` alone

    @property
    def sites(self) -> list[str]:
        """Its ids at its positions (the id alone where it has none)."""
        return [site_at(self.id, p) for p in self.positions] or [self.id]

    @property
    def label(self) -> str:
        return site_label(self.id, self.positions)


@dataclass
class CircuitEdge:
    source: str  # a member's label
    target: str  # a member's label, or LOGITS for a writer's direct effect
    score: float | None  # the trace's edge score (position-free); None where not traced
    effect: float  # metric drop when only this path is patched to the baseline
    share: float  # ... as a share of the gap
    verified: bool  # the share reaches ``component_fraction``


@dataclass
class Circuit:
    """The verdict as a small subgraph: the specific components that carry the incident, at
    their positions, each with its role; the infrastructure beside them; the edges between
    them, each patched alone."""

    members: list[CircuitMember]
    # the share of the gap removed when only the specific members are patched to the baseline
    # (the counterfactual; the set ablation where there is none), each at its positions
    faithfulness: float
    patch: str  # "counterfactual" or the ablation kind
    # faithfulness of the first k components, in the circuit's order and in the attribution
    # ranking's (EAP-IG's top k; with the infrastructure it ranks, and without):
    # [{"k", "circuit", "attribution", "attribution_specific"}]
    curve: list[dict[str, float | None]]
    reason: str
    edges: list[CircuitEdge] = field(default_factory=list)
    # the positions where the prompt differs from its counterfactual: where the incident enters
    entry_positions: list[int] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)  # position -> its token, for those named
    # the same members patched at every position (before they were resolved to positions)
    faithfulness_components: float | None = None

    def ids(self, role: str | None = None) -> list[str]:
        return [m.id for m in self.members if role is None or m.role == role]

    @property
    def specific(self) -> list[str]:
        return [m.id for m in self.members if m.role != "infrastructure"]


def attributed_positions(
    per_position: Sequence[float], *, fraction: float, most: int = MAX_POSITIONS
) -> list[int]:
    """The fewest positions (at most ``most``), largest first, whose positive attribution holds
    ``fraction`` of the component's positive attribution; [] where it has none."""
    pos = sorted((p for p, v in enumerate(per_position) if v > 0), key=lambda p: -per_position[p])
    total = sum(per_position[p] for p in pos)
    out: list[int] = []
    held = 0.0
    for p in pos[:most]:
        out.append(p)
        held += per_position[p]
        if held >= fraction * total:
            break
    return sorted(out)


def writer_ids(specific: Sequence[CandidateEvidence], gap: float, cfg: ConfirmConfig) -> list[str]:
    """The writers among ``specific`` (candidates that are not infrastructure), in their order:
    those whose direct effect reaches ``writer_fraction`` of the gap and ``writer_share`` of
    the largest direct effect among them. The first bound asks that a writer put a real share
    of the incident on the logits; the second that it write on the scale of the main writer,
    so that components writing a fraction of what it writes are not named beside it."""
    top = max((e.direct_effect for e in specific), default=0.0)
    need = max(cfg.writer_fraction * gap, cfg.writer_share * top)
    return [e.id for e in specific if e.direct_effect >= need]


def build_circuit(
    ab: Ablator,
    ordered: Sequence[CandidateEvidence],
    attribution: Sequence[str],
    *,
    src: str,
    m_clean: float,
    gap: float,
    cfg: ConfirmConfig,
    per_position: Mapping[str, Sequence[float]] | None = None,
    edge_score: Callable[[str, str], float | None] | None = None,
    differing: Sequence[int] = (),
    token_text: Callable[[int], str] | None = None,
) -> Circuit:
    """The circuit of an incident from confirm's measurements (module docstring).

    ``ordered``: the candidates in rank order; ``attribution``: heads and MLPs by the trace's
    ranking; ``src``: the value members are patched to (``baseline``: the counterfactual);
    ``per_position``: component -> its attribution at each position; ``edge_score``: the
    trace's score of an edge (upstream, downstream); ``differing``: the positions where the
    prompt and its counterfactual differ; ``token_text``: the token at a position."""
    parallel = ab.adapter.parallel
    specific = [e for e in ordered if not e.infrastructure]
    infra = [e for e in ordered if e.infrastructure]
    by_id = {e.id: e for e in ordered}
    # the positions whose logits the metric reads
    read = list(range(ab.target.n_prompt - 1, ab.target.length - 1))

    def removed(sets: Sequence[Sequence[str]]) -> list[float]:
        """The share of the gap each set of sites removes, patched to ``src`` alone."""
        if not sets:
            return []
        vals = ab.run([dict.fromkeys(x, src) for x in sets], index_offset=OFFSET_CIRCUIT)
        return [(m_clean - float(v)) / gap for v in vals]

    def fpos(c: str) -> tuple[int, int]:
        return forward_position(c, parallel=parallel)

    # 1. members: the writers first (a circuit without them is not one), then rank order
    writers = writer_ids(specific, gap, cfg)[: cfg.max_circuit]
    order = (writers + [e.id for e in specific if e.id not in writers])[: cfg.max_circuit]
    start = max(1, len(writers))
    prefixes = [order[:k] for k in range(start, len(order) + 1)]
    fr = removed(prefixes)
    members: list[str] = []
    for p, f in zip(prefixes, fr, strict=True):
        members = p
        if f >= cfg.faithful_fraction:
            break
    # the writers and the top cause (the verdict's first rank) stay: a circuit without the
    # cause the verdict names would contradict it
    kept = set(writers) | ({specific[0].id} if specific else set())
    if len(members) > 1 and max(fr, default=0.0) >= cfg.faithful_fraction:
        for c in [x for x in members if x not in kept]:
            rest = [x for x in members if x != c]
            if removed([rest])[0] >= cfg.faithful_fraction:
                members = rest

    # 2. the entry: every candidate patched where the prompt differs from its counterfactual
    at_entry: dict[str, float] = {}
    if differing:
        ids = [e.id for e in ordered]
        drops = removed([[site_at(c, p) for p in differing] for c in ids])
        at_entry = dict(zip(ids, drops, strict=True))
    entering = sorted(
        (
            e.id
            for e in specific
            if e.id not in writers and at_entry.get(e.id, 0.0) >= cfg.component_fraction
        ),
        key=fpos,
    )
    for c in entering:
        if c not in members and len(members) < cfg.max_circuit:
            members.append(c)
    faith_components = removed([members])[0] if members else 0.0

    # 3. positions: from the position-resolved attribution, checked by patching there alone
    shown = members + [e.id for e in infra]
    candidates: dict[str, list[int]] = {}
    for c in shown:
        pp = (per_position or {}).get(c)
        if pp is not None:
            candidates[c] = attributed_positions(pp, fraction=cfg.position_fraction)
        elif at_entry.get(c, 0.0) >= cfg.position_fraction * max(by_id[c].total_effect / gap, 1e-9):
            candidates[c] = list(differing)
        else:
            candidates[c] = read
    tried = [c for c in shown if candidates[c]]
    at = removed([[site_at(c, p) for p in candidates[c]] for c in tried])
    positions: dict[str, list[int]] = {}
    position_effect: dict[str, float] = {}
    for c, share in zip(tried, at, strict=True):
        te = by_id[c].total_effect / gap
        position_effect[c] = share * gap
        if te > 0 and share >= cfg.position_fraction * te:
            positions[c] = candidates[c]

    def sites(c: str) -> list[str]:
        return [site_at(c, p) for p in positions.get(c, [])] or [c]

    # 4. faithfulness at the members' positions, and the curve against the attribution ranking
    faith = removed([[s for c in members for s in sites(c)]])[0] if members else 0.0
    infra_ids = {e.id for e in infra}
    top = list(attribution)[: cfg.max_circuit]
    top_specific = [c for c in attribution if c not in infra_ids][: cfg.max_circuit]
    ks = range(1, max(len(order), len(top)) + 1)
    ours = removed([order[:k] for k in ks if k <= len(order)])
    theirs = removed([top[:k] for k in ks if k <= len(top)])
    theirs_specific = removed([top_specific[:k] for k in ks if k <= len(top_specific)])
    curve: list[dict[str, float | None]] = [
        {
            "k": k,
            "circuit": ours[k - 1] if k <= len(ours) else None,
            "attribution": theirs[k - 1] if k <= len(theirs) else None,
            "attribution_specific": (theirs_specific[k - 1] if k <= len(theirs_specific) else None),
        }
        for k in ks
    ]

    # roles: writers; the entry is the earliest other member at the differing tokens, else
    # the earliest other member; the rest route
    def at_differing(c: str) -> bool:
        return bool(positions.get(c)) and set(positions[c]) <= set(differing)

    others = sorted((c for c in members if c not in writers), key=fpos)
    entry = next((c for c in others if at_differing(c)), others[0] if others else None)
    out: list[CircuitMember] = []
    for c in sorted(members, key=fpos):
        e = by_id[c]
        role = "writer" if c in writers else ("entry" if c == entry else "route")
        out.append(
            CircuitMember(
                c,
                role,
                e.total_effect,
                e.direct_effect,
                e.benign_loss_pct,
                positions.get(c, []),
                position_effect.get(c),
            )
        )
    for e in infra:
        out.append(
            CircuitMember(
                e.id,
                "infrastructure",
                e.total_effect,
                e.direct_effect,
                e.benign_loss_pct,
                positions.get(e.id, []),
                position_effect.get(e.id),
            )
        )

    # 5. edges: every causal pair of specific members, the path patched alone
    member_of = {m.id: m for m in out}
    pairs = [
        (u, d)
        for u in sorted(members, key=fpos)
        for d in sorted(members, key=fpos)
        if fpos(u) < fpos(d)
        and (not positions.get(u) or not positions.get(d) or min(positions[u]) <= max(positions[d]))
    ]
    effects = ab.path_effects([(sites(u), sites(d)) for u, d in pairs], src)
    edges: list[CircuitEdge] = []
    for (u, d), eff in zip(pairs, effects, strict=True):
        share = eff / gap
        edges.append(
            CircuitEdge(
                member_of[u].label,
                member_of[d].label,
                edge_score(u, d) if edge_score is not None else None,
                eff,
                share,
                share >= cfg.component_fraction,
            )
        )
    for c in writers:
        if c in members:
            de = by_id[c].direct_effect
            edges.append(
                CircuitEdge(
                    member_of[c].label,
                    "LOGITS",
                    None,
                    de,
                    de / gap,
                    de >= cfg.writer_fraction * gap,
                )
            )

    named = sorted(set(differing) | {p for c in positions for p in positions[c]})
    tokens = {str(p): token_text(p) for p in named} if token_text is not None else {}
    how = "patched to the counterfactual" if src == "baseline" else f"{src}-ablated"
    if not members:
        reason = "no candidate is specific to the incident"
    elif faith >= cfg.faithful_fraction:
        reason = (
            f"its {len(members)} specific members, {how} alone at their positions, remove "
            f"{faith:.0%} of the gap (>= {cfg.faithful_fraction:.0%})"
        )
    else:
        reason = (
            f"its {len(members)} specific members, {how} alone at their positions, remove "
            f"{faith:.0%} of the gap, under the {cfg.faithful_fraction:.0%} a faithful circuit "
            "needs"
        )
    return Circuit(
        out,
        faith,
        "counterfactual" if src == "baseline" else src,
        curve,
        reason,
        edges,
        list(differing),
        tokens,
        faith_components,
    )


def circuit_from_json(data: Mapping[str, Any]) -> Circuit:
    """A ``Circuit`` back from its ``asdict`` form (as stored), older forms included."""
    members = [
        CircuitMember(
            m["id"],
            m["role"],
            m.get("total_effect", 0.0),
            m.get("direct_effect", 0.0),
            m.get("benign_loss_pct"),
            list(m.get("positions") or []),
            m.get("position_effect"),
        )
        for m in data.get("members", [])
    ]
    edges = [CircuitEdge(**e) for e in data.get("edges", [])]
    return Circuit(
        members,
        data.get("faithfulness", 0.0),
        data.get("patch", "counterfactual"),
        list(data.get("curve", [])),
        data.get("reason", ""),
        edges,
        list(data.get("entry_positions") or []),
        dict(data.get("tokens") or {}),
        data.get("faithfulness_components"),
    )
