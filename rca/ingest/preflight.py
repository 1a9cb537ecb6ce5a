"""Preflight: everything a run's later stages need, checked before its expensive stages start.

An investigation that dies after minutes of tracing for a reason that one forward pass knew
at the start wastes the investigator's time. ``preflight(subject, incident)`` runs, in about
the time of a few forward passes:

1. the chat template (a chat incident is rendered with the model's own template);
2. the encoding: prompt, continuations and ``focus``, the counterfactual and the reference
   prompts against the model's context;
3. the reference text: the case's ``reference_prompts`` first, then ordinary text
   (``reference_prompts`` below), so that mean ablations, the automatic counterfactual and the
   side effects of fixes always have some;
4. the trace's memory plan (``rca.trace.memory``), refused with its estimate when nothing fits;
5. the metric itself, on the prompt and on a given counterfactual that lines up with it:
   confirm needs the prompt's metric above the counterfactual's (``rca.confirm.check_gap``);
6. greedy decoding from the prompt: does the model really produce the bad continuation, and
   each bad token's teacher-forced probability (``Decoding``);
7. every variant of the case (``rca.ingest.variants``): rendered, encoded against the
   context, and its metric and P(bad) measured (``VariantCheck``), so that a variant that
   cannot run fails here, named by its index.

``rca check --load`` prints the same checks; ``rca investigate`` runs them first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.ingest.incident import Incident, IncidentError
from rca.model.metric import Target, as_probability, encode_text, evaluate, evaluate_many
from rca.model.subject import Subject

__all__ = [
    "Decoding",
    "Preflight",
    "SHOWS",
    "VariantCheck",
    "check_variants",
    "decode_greedy",
    "gap_error",
    "preflight",
    "reference_prompts",
]


def reference_prompts(
    incident: Incident,
    n: int,
    *,
    seed: int = 0,
    tokenizer: Any = None,
    n_ctx: int | None = None,
) -> tuple[list[str], str]:
    """Up to ``n`` ordinary texts for an incident, and where they came from.

    The case's own ``reference_prompts`` come first. The rest are drawn (by ``seed``) from the
    zoo's benign support-desk prompts for a zoo demo model, else from the benign corpus that
    ships with rca (``rca.benign``). They take the incident's form: a chat incident's are
    rendered as conversations with the model's chat template (``tokenizer``), a plain prompt's
    are plain text. Drawn texts longer than ``n_ctx`` tokens are left out.
    """
    refs = list(incident.reference_prompts)[:n]
    sources = [f"{len(refs)} from the case"] if refs else []
    if len(refs) < n:
        need = n - len(refs)
        if incident.model.startswith("zoo:") and _is_demo_zoo(incident.model[4:]):
            from rca import zoo

            drawn = zoo.benign_prompts(need, seed=seed)  # type: ignore[attr-defined]
            what = "the zoo's benign prompts"
        else:
            from rca.benign import CORPUS_VERSION, benign_prompts

            chat = _ChatRenderer(tokenizer, incident) if incident.is_chat else None
            drawn = benign_prompts(need + need // 4 + 8, seed=seed, tokenizer=chat)
            what = f"rca's benign corpus ({CORPUS_VERSION}{', as chats' if chat else ''})"
        if n_ctx is not None and tokenizer is not None:
            drawn = [t for t in drawn if len(encode_text(tokenizer, t)) <= n_ctx]
        drawn = drawn[:need]
        refs += drawn
        if drawn:
            sources.append(f"{len(drawn)} from {what}")
    return refs, "; ".join(sources) or "none"


class _ChatRenderer:
    """A tokenizer's chat template for rca's benign conversations. A template that refuses a
    system turn (Gemma's) gets the system text merged into the first user turn; one that
    refuses the conversation even so is a one-line error naming ``reference_prompts``."""

    def __init__(self, tokenizer: Any, incident: Incident) -> None:
        self.tokenizer, self.incident = tokenizer, incident
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        try:
            return self.tokenizer.apply_chat_template(messages, **kw)
        except Exception:
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                first = dict(messages[1])
                first["content"] = messages[0]["content"] + "\n\n" + first["content"]
                try:
                    return self.tokenizer.apply_chat_template([first, *messages[2:]], **kw)
                except Exception:
                    pass
            raise IncidentError(
                self.incident.source,
                "reference_prompts",
                "the model's chat template refuses rca's benign conversations; give "
                "reference_prompts as rendered text",
            ) from None


def _is_demo_zoo(name: str) -> bool:
    from rca import zoo

    return name in zoo.DEMO_MODELS


@dataclass(frozen=True)
class Decoding:
    """What the model does with the prompt under greedy decoding, beside the teacher-forced
    probabilities the metric reads.

    ``tokens``: one entry per bad-continuation token: its text, its teacher-forced probability
    ``p`` (given the prompt and the bad tokens before it), whether it is in the focus, and the
    model's top token at that step (``greedy_token``, ``greedy_p``) given the same prefix.
    ``reproduces``: free-running greedy decoding emits the bad continuation's tokens exactly;
    ``reproduces_focus``: its text contains the focus (None without a focus).
    """

    greedy_text: str
    reproduces: bool
    reproduces_focus: bool | None
    max_new_tokens: int
    tokens: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "greedy_text": self.greedy_text,
            "reproduces": self.reproduces,
            "reproduces_focus": self.reproduces_focus,
            "max_new_tokens": self.max_new_tokens,
            "tokens": self.tokens,
        }


@torch.inference_mode()
def decode_greedy(
    subject: Subject, target: Target, *, focus: str | None = None, extra: int = 8
) -> Decoding:
    """Greedy decoding of ``len(bad) + extra`` tokens from the prompt, and the bad tokens'
    teacher-forced probabilities (one forward pass each)."""
    from transformers import GenerationConfig

    tok, model, dev = subject.tokenizer, subject.model, subject.device
    n_bad = len(target.bad_ids)
    row = target.bad_row
    ids = target.input_ids(device=dev)[row : row + 1]
    logits = model(input_ids=ids).logits  # (1, length, vocab)
    start = target.n_prompt - 1
    probs = torch.softmax(logits[0, start : start + n_bad].float(), dim=-1)  # (n_bad, vocab)
    span = target.focus or (0, n_bad)
    rows = []
    for j, t in enumerate(target.bad_ids):
        top = int(probs[j].argmax())
        rows.append(
            {
                "token": tok.decode([t]),
                "p": float(probs[j, t]),
                "in_focus": span[0] <= j < span[1],
                "greedy_token": tok.decode([top]),
                "greedy_p": float(probs[j, top]),
            }
        )
    prompt = torch.tensor([target.prompt_ids], device=dev)
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=n_bad + extra,
        pad_token_id=pad if pad is not None else eos,
        eos_token_id=eos,
    )
    generate: Any = model.generate  # transformers' GenerationMixin
    out = generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg
    )
    new = [int(x) for x in out[0, target.n_prompt :]]
    text = tok.decode(new, skip_special_tokens=True)
    return Decoding(
        greedy_text=text,
        reproduces=tuple(new[:n_bad]) == tuple(target.bad_ids),
        reproduces_focus=None if focus is None else focus in text,
        max_new_tokens=n_bad + extra,
        tokens=rows,
    )


def gap_error(incident: Incident, problem: str, *, given: bool) -> IncidentError:
    """The one-line error for a metric that is not above the baseline's: it names the key to
    change (the given counterfactual, or none when rca chose the baseline)."""
    if given:
        key = "counterfactual_messages" if incident.counterfactual_messages else "counterfactual"
        fix = (
            "; the counterfactual does not remove the incident behaviour: give one without its "
            "cause, name the part of bad that matters with focus, or give another good"
        )
    else:
        key = None
        fix = (
            "; with no counterfactual that removes the behaviour, rca compares with every head "
            "and MLP mean-ablated, which does not remove it either: give a counterfactual "
            "(the prompt with the suspected cause removed) or name the part of bad that matters "
            "with focus"
        )
    return IncidentError(incident.source, key, problem + fix)


# a variant shows the incident where the model prefers the bad continuation: P(bad beats good)
# at least this with a good one, P(bad) without (rca.model.metric.as_probability)
SHOWS = 0.5


@dataclass(frozen=True)
class VariantCheck:
    """One variant as the model sees it: its set, its target, its metric and P(bad)."""

    index: int  # in ``Incident.all_variants()``
    part: str  # fit | held_out
    origin: str  # listed | template
    label: str  # the template's slot values, or "" for a listed variant
    incident: Incident  # rendered for the model
    target: Target
    metric: float
    p_bad: float
    # its counterfactual's target where it lines up with the prompt token for token, and metric
    counterfactual: Target | None = None
    metric_counterfactual: float | None = None

    @property
    def shows(self) -> bool:
        """Whether the model shows the incident on it: it prefers the bad continuation to the
        good one (without a good one, P(bad) is at least ``SHOWS``)."""
        return as_probability(self.metric, self.target.n_conts) >= SHOWS

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "part": self.part,
            "origin": self.origin,
            "label": self.label,
            "prompt_tokens": self.target.n_prompt,
            "metric": self.metric,
            "p_bad": self.p_bad,
            "counterfactual_aligned": None
            if self.incident.counterfactual is None
            else self.counterfactual is not None,
            "metric_counterfactual": self.metric_counterfactual,
        }


def check_variants(subject: Subject, incident: Incident) -> list[VariantCheck]:
    """Every variant of ``incident`` rendered, encoded and measured, in ``all_variants`` order.

    Raises IncidentError naming the variant (``variants`` and its item, or ``template`` and its
    slot values) where one cannot be rendered or does not fit the model's context."""
    members = incident.behaviour().members[1:]
    encoded = []
    for m in members:
        try:
            inc = m.incident.for_model(subject.tokenizer)
            encoded.append((inc, inc.encode(subject)))
        except IncidentError as e:
            raise m.error(e) from None
    values = evaluate_many(subject.model, [t for _, t in encoded])
    # the counterfactuals that line up with their prompts, and their metrics
    cfs: list[Target | None] = []
    for inc, target in encoded:
        ids = (
            None
            if inc.counterfactual is None
            else encode_text(subject.tokenizer, inc.counterfactual)
        )
        cfs.append(target.with_prompt(tuple(ids)) if ids and len(ids) == target.n_prompt else None)
    cf_values = iter(evaluate_many(subject.model, [c for c in cfs if c is not None]))
    out = []
    for m, (inc, target), value, cf in zip(members, encoded, values, cfs, strict=True):
        assert m.index is not None and m.variant is not None
        if not math.isfinite(value.metric):
            raise m.error(
                IncidentError(inc.source, "bad", f"the metric is {value.metric}; it must be finite")
            )
        out.append(
            VariantCheck(
                m.index,
                m.part,
                m.variant.origin,
                m.variant.label(),
                inc,
                target,
                value.metric,
                value.p_bad,
                cf,
                None if cf is None else next(cf_values).metric,
            )
        )
    return out


@dataclass
class Preflight:
    """What the checks found; the later stages take the rendered incident and texts from it."""

    incident: Incident  # rendered for the model (a chat incident's prompt is the template's)
    target: Target
    references: list[str]  # reference prompts: mean and resample ablations, the counterfactual
    benign: list[str]  # ordinary text for the side effects of fixes
    reference_source: str
    metric_clean: float
    p_bad: float
    metric_counterfactual: float | None  # a given counterfactual that lines up; else None
    counterfactual_aligned: bool | None  # None: no counterfactual given
    decoding: Decoding
    plan: Any  # rca.trace.memory.MemoryPlan
    seconds: float = 0.0
    variants: list[VariantCheck] = field(default_factory=list)
    # generated variants (rca.ingest.generate): how many were drawn and kept, or None
    generated: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.target.n_prompt,
            "bad_tokens": len(self.target.bad_ids),
            "focus_span": None if self.target.focus is None else list(self.target.focus),
            "metric": self.metric_clean,
            "p_bad": self.p_bad,
            "metric_counterfactual": self.metric_counterfactual,
            "counterfactual_aligned": self.counterfactual_aligned,
            "reference_prompts": len(self.references),
            "benign_prompts": len(self.benign),
            "reference_source": self.reference_source,
            "decoding": self.decoding.to_json(),
            "memory": self.plan.to_json(),
            "seconds": self.seconds,
            **({"variants": self.variants_json()} if self.variants else {}),
            **({"generated": self.generated} if self.generated is not None else {}),
        }

    def variants_json(self) -> dict[str, Any]:
        """The variants' counts, split and measurements."""
        from rca.ingest.variants import Split

        return {
            "n": len(self.variants),
            "fit": sum(v.part == "fit" for v in self.variants),
            "held_out": sum(v.part == "held_out" for v in self.variants),
            "split": (self.incident.split or Split()).to_dict(),
            "shows_at": SHOWS,
            "shown": sum(v.shows for v in self.variants),
            "items": [v.to_json() for v in self.variants],
        }


def preflight(
    subject: Subject,
    incident: Incident,
    *,
    n_reference: int = 64,
    n_benign: int = 200,
    seed: int = 0,
    method: str = "eap-ig",
    steps: int = 8,
    neurons: bool = True,
    max_memory: int | str | None = "auto",
    confirm_config: Any = None,
) -> Preflight:
    """Run the checks of the module docstring; raise the first failure as a one-line
    ``IncidentError`` (or ``TraceError`` for the memory plan)."""
    from rca.confirm import ConfirmConfig, ConfirmError, check_gap
    from rca.trace import given_counterfactual
    from rca.trace.memory import plan_for_target

    t0 = time.perf_counter()
    tok = subject.tokenizer
    inc = incident.for_model(tok)
    target = inc.encode(subject)
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    refs, source = reference_prompts(inc, n_reference, seed=seed, tokenizer=tok, n_ctx=n_ctx)
    benign, _ = reference_prompts(inc, n_benign, seed=seed + 1, tokenizer=tok, n_ctx=n_ctx)
    benign = [b for b in benign if len(encode_text(tok, b)) >= 2]
    if not refs or not benign:
        raise IncidentError(
            inc.source,
            "reference_prompts",
            "no reference text of at least two tokens that fits the model's context",
        )
    plan = plan_for_target(
        subject,
        target,
        method=method,
        steps=steps,
        neurons=neurons,
        max_memory=max_memory,
    )
    clean = evaluate(subject.model, target)
    if not math.isfinite(clean.metric):
        raise IncidentError(
            inc.source, "bad", f"the metric on the prompt is {clean.metric}; it must be finite"
        )
    m_cf: float | None = None
    aligned: bool | None = None
    if inc.counterfactual is not None:
        cf = given_counterfactual(subject, inc, target)
        aligned = cf.ok
        if cf.ok:
            m_cf = cf.metric_counterfactual
            try:
                check_gap(
                    subject,
                    target,
                    baseline=cf.target(target),
                    reference=refs,
                    config=confirm_config or ConfirmConfig(),
                    metrics=(cf.metric_prompt, cf.metric_counterfactual),
                )
            except ConfirmError as e:
                raise gap_error(inc, str(e), given=True) from None
    decoding = decode_greedy(subject, target, focus=inc.focus)
    variants = check_variants(subject, incident)
    return Preflight(
        incident=inc,
        target=target,
        references=refs,
        benign=benign,
        reference_source=source,
        metric_clean=clean.metric,
        p_bad=clean.p_bad,
        metric_counterfactual=m_cf,
        counterfactual_aligned=aligned,
        decoding=decoding,
        plan=plan,
        seconds=time.perf_counter() - t0,
        variants=variants,
    )
