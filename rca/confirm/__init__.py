"""Confirm: causal verdicts from batched ablation experiments.

Attribution is a first-order estimate; a postmortem needs interventions it can defend. This
package runs them, many at once, and re-exports its public API flat:

- ``engine``: ``Ablator``, K variants (each a set of components with the value each is set to)
  in ceil(K / B) forward passes, reusing the clean run below the first ablated layer; path
  patching; the ``OFFSET_*`` constants that keep the resample draws of experiments apart.
- ``evidence``: ``ConfirmConfig`` and the records: ``CandidateEvidence`` (TE, DE, NE, NE0,
  benign damage, p-value, verdict), ``SetEvidence`` (the cause set), ``Verdict``.
- ``stages``: ``confirm`` itself, one function per experiment (singles, candidates,
  specificity, neurons, ranking, cause set, random sets, verdicts, circuit), and ``check_gap``.
- ``ranking``: ``rank_candidates`` (infrastructure never first; the origin, then the writer),
  each candidate's verdict word and the cause set's, ``verdict_definitions``.
- ``sets``: the cause-set search, the random comparison sets and the empirical p-values.
- ``neurons``: an infrastructure MLP resolved to the few neurons that carry its effect.
- ``circuit``: the verdict as a small subgraph of members at positions, with roles and
  path-patched edges.

The words and thresholds are defined in ``rca.verdicts``; docs/confirm.md describes the method.
"""

from __future__ import annotations

from rca.confirm.circuit import (
    ROLES,
    Circuit,
    CircuitEdge,
    CircuitMember,
    attributed_positions,
    build_circuit,
    circuit_from_json,
    forward_position,
    site_at,
    site_label,
    writer_ids,
)
from rca.confirm.engine import SOURCES, Ablator, Site, Variant, auto_batch_size
from rca.confirm.evidence import (
    CandidateEvidence,
    ConfirmConfig,
    ConfirmError,
    SetEvidence,
    Verdict,
)
from rca.confirm.neurons import NeuronGroup
from rca.confirm.ranking import rank_candidates, verdict_definitions
from rca.confirm.sets import empirical_p_value, kind_of, random_sets
from rca.confirm.stages import check_gap, confirm
from rca.model.metric import as_probability, reference_point, share_removed

__all__ = [
    "ROLES",
    "SOURCES",
    "Ablator",
    "CandidateEvidence",
    "Circuit",
    "CircuitEdge",
    "CircuitMember",
    "ConfirmConfig",
    "ConfirmError",
    "NeuronGroup",
    "SetEvidence",
    "Site",
    "Variant",
    "Verdict",
    "as_probability",
    "attributed_positions",
    "auto_batch_size",
    "build_circuit",
    "check_gap",
    "circuit_from_json",
    "confirm",
    "empirical_p_value",
    "forward_position",
    "kind_of",
    "random_sets",
    "rank_candidates",
    "reference_point",
    "share_removed",
    "site_at",
    "site_label",
    "verdict_definitions",
    "writer_ids",
]
