"""The confirm stage's records: its configuration, the evidence for each candidate and for the
cause set, and the verdict that holds them (``Verdict.to_json`` is what the store keeps)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rca.confirm.circuit import Circuit

__all__ = [
    "CandidateEvidence",
    "ConfirmConfig",
    "ConfirmError",
    "SetEvidence",
    "Verdict",
]


class ConfirmError(ValueError):
    """An experiment that cannot run as asked."""


@dataclass(frozen=True)
class ConfirmConfig:
    """Thresholds and budgets of a confirmation; recorded with every result."""

    top_k: int = 10  # candidates taken from the trace ranking
    # how sets and random sets are ablated: auto (mean over the reference prompts when there
    # are some, else patch to the counterfactual, else zero) | patch | zero | mean | resample.
    # Necessity of single candidates always uses an ablation (mean where reference prompts
    # exist, else zero), which catches enablers. Patching makes every carrier of the prompt's
    # difference as effective as the cause, so random sets that hold one are hard to beat.
    kind: str = "auto"
    set_fraction: float = 0.8  # a cause set must remove this share of the prompt-baseline gap
    component_fraction: float = 0.1  # a member must carry this share within the set
    window: float = 0.2  # leading group: effect within this share of the largest
    necessary_fraction: float = 0.4  # the necessary group's share of the most necessary
    writer_fraction: float = 0.2  # a writer's direct effect, as a share of the gap
    writer_share: float = 0.4  # and as a share of the largest writer's (the circuit's writers)
    alpha: float = 0.05  # p-value threshold against random sets
    n_random: int = 100  # random sets (>= 50)
    max_set: int = 6
    max_circuit: int = 8  # the most specific members a circuit grows to
    faithful_fraction: float = 0.8  # a circuit must remove this share of the gap, patched alone
    # an infrastructure MLP is resolved to at most this many of its neurons ("Specific
    # neurons"), where they keep this share of its effect on the incident
    max_neurons: int = 16
    neuron_fraction: float = 0.8
    # a member resolved to positions keeps this share of its total effect patched there alone
    position_fraction: float = 0.8
    benign_prompts: int = 16  # ordinary-text prompts each candidate's benign damage is measured on
    # a behaviour (a case with variants): a circuit member is kept where it is necessary on at
    # least this share of the fit variants (rca.confirm.behaviour)
    variant_share: float = 0.8
    batch_size: int = 0  # variants per forward; 0: auto_batch_size (4 on a CPU, 64 on a GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "patch", "zero", "mean", "resample"):
            raise ConfirmError(
                f"kind must be auto, patch, zero, mean or resample, got {self.kind!r}"
            )
        if self.n_random < 50:
            raise ConfirmError("n_random must be at least 50")
        for name in (
            "set_fraction",
            "faithful_fraction",
            "position_fraction",
            "neuron_fraction",
            "component_fraction",
            "window",
            "alpha",
            "necessary_fraction",
            "writer_fraction",
            "writer_share",
            "variant_share",
        ):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ConfirmError(f"{name} must be between 0 and 1, got {v}")
        if self.benign_prompts < 1:
            raise ConfirmError(f"benign_prompts must be at least 1, got {self.benign_prompts}")
        if (
            min(self.top_k, self.max_set, self.max_circuit, self.max_neurons) < 1
            or self.batch_size < 0
        ):
            raise ConfirmError(
                "top_k, max_set, max_circuit and max_neurons must be positive, batch_size 0 "
                "(auto) or more"
            )


@dataclass
class CandidateEvidence:
    """What the experiments measured for one candidate, and the verdict they give it. Drops
    are in the metric's units: the prompt's metric minus the metric under the intervention."""

    id: str
    attribution: float
    total_effect: float  # metric drop when patched to the baseline
    direct_effect: float  # ... with everything downstream frozen at clean
    necessity: float  # metric drop when ablated by the configured kind
    p_value: float  # against every other component of the same kind, ablated alike
    # metric drop when zero-ablated (robust necessity's second ablation); None where not run
    necessity_zero: float | None = None
    rank: int = 0
    in_set: bool = False
    verdict: str = "inconclusive"
    reason: str = ""
    # what mean-ablating it does to ordinary text (rca.specificity); None where not measured
    benign_loss_pct: float | None = None  # relative change of the benign LM loss, percent
    benign_kl: float | None = None  # mean KL(original || ablated) per benign position, nats
    infrastructure: bool = False  # necessary for ordinary text as well: never blamed


@dataclass
class SetEvidence:
    """The minimal cause set, its necessity and sufficiency, and its test against random
    sets."""

    components: list[str]
    metric_ablated: float
    necessity: float  # metric drop when the set is ablated
    necessity_fraction: float  # ... as a share of the prompt-baseline gap
    sufficiency_metric: float  # metric with everything *but* the set ablated
    sufficiency_fraction: float  # share of the metric that survives that
    random_drops: list[float]
    p_value: float
    random_scope: str
    verdict: str = "inconclusive"
    reason: str = ""


@dataclass
class Verdict:
    """The confirm stage's answer for one incident."""

    metric_clean: float
    metric_baseline: float
    metric_reference: float  # the point that "100% of the metric removed" reaches
    baseline: str
    candidates: list[CandidateEvidence]
    cause_set: SetEvidence
    config: ConfirmConfig
    cost: dict[str, Any] = field(default_factory=dict)
    circuit: Circuit | None = None

    @property
    def verdict(self) -> str:
        return self.cause_set.verdict

    def ranked(self) -> list[CandidateEvidence]:
        return sorted(self.candidates, key=lambda c: c.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "metric": {
                "prompt": self.metric_clean,
                "baseline": self.metric_baseline,
                "reference": self.metric_reference,
            },
            "baseline": self.baseline,
            "causes": [asdict(c) for c in self.ranked()],
            "cause_set": {k: v for k, v in asdict(self.cause_set).items() if k != "random_drops"}
            | {"random_drops_summary": _summary(self.cause_set.random_drops)},
            "config": asdict(self.config),
            "cost": self.cost,
            "circuit": None if self.circuit is None else asdict(self.circuit),
        }


def _summary(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {
        "n": len(s),
        "mean": sum(s) / len(s),
        "median": s[len(s) // 2],
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
    }
