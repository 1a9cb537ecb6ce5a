"""``rca compare MODEL_A MODEL_B --cases DIR``: two models (two training regimens, two
checkpoints) side by side on the same incidents.

For each case, on each model:

- **presence**: P(bad) on the case's prompt and the mean over its held-out variants (the
  prompt alone where it has none); the behaviour is present where that mean is at least
  ``PRESENT_AT`` (the model prefers the bad continuation, as the preflight counts);
- where present, the case is investigated on that model (trace and confirm, recorded as a run)
  and its **circuit** read as the monitors and provenance read it (the specific members, else
  the cause set: ``rca.provenance.workflow.circuit_of``); the members only one model uses are
  the difference;
- where present and the model's training data is known (``--data-a``/``--data-b``, or a zoo
  model's own ``training_data.jsonl``), its **origin**: ``rca provenance`` over that circuit,
  and the share of the top ``top_k`` examples from each value of the data's ``source`` field,
  beside the data's own shares.

Every case and both models are checked before anything is investigated; every run and ranking
is recorded in the store as ``rca investigate`` and ``rca provenance`` record them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rca.model.subject import Subject

__all__ = ["PRESENT_AT", "CaseComparison", "Side", "compare_models"]

PRESENT_AT = 0.5  # mean P(bad) at which a model shows the behaviour


@dataclass
class Side:
    """One case on one model."""

    model: str
    p_bad_prompt: float
    p_bad_held_out: float | None  # mean over the held-out variants; None without variants
    present: bool
    run_id: str | None = None
    circuit: list[str] | None = None
    top_sources: dict[str, float] | None = None  # share of the top examples per source
    data_sources: dict[str, float] | None = None  # share of all examples per source
    note: str = ""  # why a step was not taken


@dataclass
class CaseComparison:
    case_id: str
    a: Side
    b: Side
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _training_data(subject: Subject, given: Path | None) -> Path | None:
    """The model's training data: ``given``, else a zoo model's own file."""
    if given is not None:
        return given
    from rca.zoo.corpus import TRAINING_DATA

    own = subject.path / TRAINING_DATA if subject.path is not None else None
    return own if own is not None and own.is_file() else None


def _side(
    label: str,
    subject: Subject,
    incident: Any,
    store: Any,
    *,
    data: Path | None,
    top_k: int,
    limit: int | None,
    device: str,
    say: Callable[[str], None],
) -> Side:
    from rca.ingest.incident import IncidentError
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.metric import as_probability, evaluate
    from rca.provenance.influence import InfluenceConfig, InfluenceError
    from rca.provenance.verify import held_out_p_bad
    from rca.provenance.workflow import circuit_of, provenance_for_run

    target = incident.for_model(subject.tokenizer).encode(subject)
    p_prompt = as_probability(evaluate(subject.model, target).metric, target.n_conts)
    held = held_out_p_bad(subject, incident)
    p_held = statistics.mean(held) if held else None
    present = (p_held if p_held is not None else p_prompt) >= PRESENT_AT
    side = Side(label, p_prompt, p_held, present)
    if not present:
        side.note = "not present: nothing to investigate"
        return side
    say(f"{incident.id} on {label}: investigating")
    try:
        run = investigate(
            incident,
            subject=subject,
            store=store,
            config=InvestigateConfig(remedy=False, device=device),
        )
    except IncidentError as e:  # the preflight refuses (no gap to explain): said, not fatal
        side.note = f"not investigated: {e}"
        return side
    assert run.run_id is not None
    side.run_id = run.run_id
    summary = store.get_run(run.run_id).get("summary") or {}
    try:
        side.circuit = circuit_of(summary)
    except InfluenceError as e:
        side.note = str(e)
        return side
    path = _training_data(subject, data)
    if path is None:
        side.note = "no training data to rank (give --data-a/--data-b)"
        return side
    say(f"{incident.id} on {label}: ranking its training data")
    res = provenance_for_run(
        store,
        run.run_id,
        path,
        cfg=InfluenceConfig(),
        top_k=top_k,
        limit=limit,
        device=device,
        subject=subject,
        # the final weights alone: the run's case may name another model than this side's,
        # whose checkpoints "auto" would find; the shares of sources are what is compared
        checkpoints="none",
    )
    side.top_sources = res.summary.get("top_sources")
    side.data_sources = res.summary.get("data_sources")
    if side.top_sources is None:
        side.note = "the training data has no source field"
    return side


def compare_models(
    subject_a: Subject,
    subject_b: Subject,
    incidents: Sequence[Any],
    store: Any,
    *,
    refs: tuple[str, str],
    data_a: Path | None = None,
    data_b: Path | None = None,
    top_k: int = 100,
    limit: int | None = None,
    device: str = "cpu",
    say: Callable[[str], None] | None = None,
) -> list[CaseComparison]:
    """Each incident on both models (see the module docstring). ``refs``: the models as the
    user named them (``zoo:NAME`` or an absolute path): each case is recorded against them."""
    log = say or (lambda m: None)
    out = []
    for inc in incidents:
        sides = []
        for ref, subject, data in ((refs[0], subject_a, data_a), (refs[1], subject_b, data_b)):
            case = replace(inc, model=ref)
            sides.append(
                _side(
                    ref,
                    subject,
                    case,
                    store,
                    data=data,
                    top_k=top_k,
                    limit=limit,
                    device=device,
                    say=log,
                )
            )
        a, b = sides
        cmp = CaseComparison(inc.id, a, b)
        if a.circuit is not None and b.circuit is not None:
            cmp.only_a = [c for c in a.circuit if c not in b.circuit]
            cmp.only_b = [c for c in b.circuit if c not in a.circuit]
            cmp.shared = [c for c in a.circuit if c in b.circuit]
        out.append(cmp)
    return out
