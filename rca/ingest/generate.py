"""Variants a case does not list: made from the incident prompt and its reference prompts.

A case with neither ``variants`` nor a ``template`` states one prompt. ``generate_variants``
makes candidate variants from it:

1. **The kept span.** The words where the prompt and its counterfactual differ (the case's
   counterfactual, or the one the trace found) are the cause; a variant keeps them.
2. **Slots.** Each reference prompt is aligned with the prompt word by word
   (``difflib.SequenceMatcher``; a word is a run of letters and digits or one other
   character). A stretch of the prompt that a reference replaces with other words is a slot,
   and the reference's words there are one of its values. Slots that overlap the kept span,
   and stretches a reference only inserts or deletes, are left alone. Slots may overlap each
   other (one reference replaces "card", another "card failed"); a candidate refills at most
   one of any overlapping ones.
3. **Candidates.** Each candidate refills one or more slots with values drawn by ``seed``;
   its counterfactual is the prompt's counterfactual refilled the same way, so it still
   differs from the candidate in the kept span alone.

``generated_behaviour`` then keeps the candidates on which the model really produces the bad
continuation (P(bad) >= ``rca.ingest.preflight.SHOWS``, 0.5: stricter than "shows", which
asks only that it prefer the bad continuation to the good one, and which both can pass while
the model says something else) and whose counterfactual does not show it: the kept span, not
the new values, makes the difference. Each kept variant records how it
was made (``origin`` ``generated``; ``slots``: the words replaced and their new values). The
variants take the case's bad and good continuations: where a refilled slot changes what the
good answer is, the counterfactual check is what drops the variant.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rca.ingest.variants import Split, Variant
from rca.model.metric import as_probability

if TYPE_CHECKING:
    from rca.ingest.incident import Incident
    from rca.ingest.preflight import VariantCheck
    from rca.model.subject import Subject

__all__ = [
    "SAME_TEMPLATE",
    "Generated",
    "Slot",
    "generated_behaviour",
    "generated_slots",
    "generate_variants",
    "kept_span",
]

_WORD = re.compile(r"\w+|[^\w\s]")
MAX_TRIES = 20  # draws per candidate wanted before giving up on new combinations
# a reference prompt gives slot values where it holds at least this share of the prompt's
# words in order, punctuation left out: the same template, other values; an unrelated text
# (another desk's ticket, a line of the benign corpus) gives none
SAME_TEMPLATE = 0.5
CANDIDATES = 4  # candidates drawn per variant wanted (the model check drops some)


@dataclass(frozen=True)
class Slot:
    """A stretch of the prompt (characters ``start:end``) and the texts references hold there."""

    start: int
    end: int
    text: str  # the prompt's own
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.start}:{self.end}"


def _words(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


def _same_template(a: Sequence[re.Match[str]], b: Sequence[re.Match[str]]) -> float:
    """The share of the prompt's words (``a``; punctuation left out) that the reference
    (``b``) holds in the same order: 1 for a reference that only adds words (its answer)."""
    wa = [m.group() for m in a if m.group()[0].isalnum() or m.group()[0] == "_"]
    wb = [m.group() for m in b if m.group()[0].isalnum() or m.group()[0] == "_"]
    if not wa:
        return 0.0
    blocks = difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_matching_blocks()
    return sum(blk.size for blk in blocks) / len(wa)


def kept_span(prompt: str, counterfactual: str) -> tuple[int, int] | None:
    """The characters of ``prompt`` where it differs from ``counterfactual`` (from the first
    differing word to the last); None where they do not differ."""
    a, b = _words(prompt), _words(counterfactual)
    ops = difflib.SequenceMatcher(
        a=[m.group() for m in a], b=[m.group() for m in b], autojunk=False
    ).get_opcodes()
    spans = [(i1, i2) for tag, i1, i2, _, _ in ops if tag != "equal"]
    if not spans:
        return None
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    start = a[lo].start() if lo < len(a) else len(prompt)
    end = a[hi - 1].end() if hi > lo else start
    return start, end


def generated_slots(
    prompt: str, references: Sequence[str], keep: tuple[int, int] | None
) -> list[Slot]:
    """The prompt's slots and their values from ``references``; see the module docstring."""
    a = _words(prompt)
    found: dict[tuple[int, int], list[str]] = {}
    for ref in references:
        b = _words(ref)
        if _same_template(a, b) < SAME_TEMPLATE:
            continue
        matcher = difflib.SequenceMatcher(
            a=[m.group() for m in a], b=[m.group() for m in b], autojunk=False
        )
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "replace":
                continue
            start, end = a[i1].start(), a[i2 - 1].end()
            if keep is not None and start < keep[1] and keep[0] < end:
                continue
            value = ref[b[j1].start() : b[j2 - 1].end()]
            if value != prompt[start:end]:
                values = found.setdefault((start, end), [])
                if value not in values:
                    values.append(value)
    return [Slot(s, e, prompt[s:e], tuple(v)) for (s, e), v in sorted(found.items())]


def _fill(text: str, edits: Sequence[tuple[Slot, str]], shift: int = 0) -> str:
    """``text`` with each slot's characters replaced (``shift``: where ``text`` is the
    counterfactual, the slots after the kept span move by the difference in its length)."""
    out = text
    for slot, value in sorted(edits, key=lambda e: -e[0].start):
        out = out[: slot.start + shift] + value + out[slot.end + shift :]
    return out


def generate_variants(
    prompt: str,
    counterfactual: str | None,
    references: Sequence[str],
    *,
    n: int,
    seed: int = 0,
) -> list[Variant]:
    """Up to ``n`` distinct candidates, each with its counterfactual where the case has one;
    see the module docstring. Fewer where the slots do not make ``n`` combinations."""
    keep = kept_span(prompt, counterfactual) if counterfactual is not None else None
    return _candidates(
        prompt, counterfactual, keep, generated_slots(prompt, references, keep), n=n, seed=seed
    )


def _candidates(
    prompt: str,
    counterfactual: str | None,
    keep: tuple[int, int] | None,
    slots: Sequence[Slot],
    *,
    n: int,
    seed: int,
) -> list[Variant]:
    if not slots or n <= 0:
        return []
    rng = random.Random(f"generated-{seed}")
    seen: set[str] = {prompt}
    out: list[Variant] = []
    for _ in range(n * MAX_TRIES):
        if len(out) == n:
            break
        edits: list[tuple[Slot, str]] = []
        for s in rng.sample(slots, len(slots)):  # overlapping slots: the first drawn wins
            if rng.random() < 0.5 and not any(
                s.start < e.end and e.start < s.end for e, _ in edits
            ):
                edits.append((s, rng.choice(s.values)))
        if not edits:
            s = rng.choice(slots)
            edits = [(s, rng.choice(s.values))]
        text = _fill(prompt, edits)
        if text in seen:
            continue
        seen.add(text)
        cf = None
        if counterfactual is not None and keep is not None:
            grow = len(counterfactual) - len(prompt)  # the kept span's change in length
            before = [(s, v) for s, v in edits if s.end <= keep[0]]
            after = [(s, v) for s, v in edits if s.start >= keep[1]]
            cf = _fill(_fill(counterfactual, after, shift=grow), before)
        out.append(
            Variant(
                prompt=text,
                counterfactual=cf,
                origin="generated",
                slots=tuple((f"chars {s.name} ({s.text!r})", v) for s, v in edits),
            )
        )
    return out


@dataclass(frozen=True)
class Generated:
    """What generation made: the incident with its kept variants (None where none is kept),
    their checks (as ``check_variants`` gives them for that incident), and ``summary``: the
    kept span, the slots and their number of values, and how many variants were kept."""

    incident: Incident | None
    checks: list[VariantCheck]
    summary: dict[str, Any]


def generated_behaviour(
    subject: Subject,
    incident: Incident,
    counterfactual: str | None,
    references: Sequence[str],
    *,
    n: int,
    seed: int = 0,
    held_out: float = 0.5,
) -> Generated:
    """``incident`` (rendered for the model, no variants) with up to ``n`` generated variants
    the model shows the incident on, split by ``seed``. The candidates are measured once, in
    batches (``check_variants``); the kept ones' checks are re-indexed for the new incident."""
    from rca.ingest.preflight import SHOWS, check_variants

    assert incident.prompt is not None
    texts = [r for r in references if isinstance(r, str)]
    keep_span = kept_span(incident.prompt, counterfactual) if counterfactual is not None else None
    slots = generated_slots(incident.prompt, texts, keep_span)
    summary: dict[str, Any] = {
        "kept_span": None if keep_span is None else incident.prompt[keep_span[0] : keep_span[1]],
        "slots": [{"text": s.text, "chars": s.name, "values": len(s.values)} for s in slots],
        "kept": 0,
        "p_bad_at_least": SHOWS,
    }
    cands = _candidates(
        incident.prompt, counterfactual, keep_span, slots, n=CANDIDATES * n, seed=seed
    )
    if not cands:
        return Generated(None, [], summary)
    trial = dataclasses.replace(incident, variants=tuple(cands), template=None, split=Split(seed))
    kept: list[tuple[Variant, VariantCheck]] = []
    for c in check_variants(subject, trial):
        cf_shows = c.metric_counterfactual is not None and (
            as_probability(c.metric_counterfactual, c.target.n_conts) >= SHOWS
        )
        if c.p_bad >= SHOWS and not cf_shows:
            v = cands[c.index]
            # a counterfactual that does not line up token for token is not kept with it
            if c.counterfactual is None:
                v = dataclasses.replace(v, counterfactual=None)
            kept.append((v, c))
    kept = kept[:n]
    if not kept:
        return Generated(None, [], summary)
    made = dataclasses.replace(
        incident, variants=tuple(v for v, _ in kept), split=Split(seed=seed, held_out=held_out)
    )
    checks = []
    for (_, c), m in zip(kept, made.behaviour().members[1:], strict=True):
        assert m.index is not None
        rendered = m.incident.for_model(subject.tokenizer)
        checks.append(dataclasses.replace(c, index=m.index, part=m.part, incident=rendered))
    return Generated(made, checks, summary | {"kept": len(kept)})
