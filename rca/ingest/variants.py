"""Variants: more prompts that show the same incident, and their fit / held-out split.

One prompt is a symptom; a behaviour is what the model does on every prompt with the same
cause. A case states its behaviour in one of two ways:

- ``variants``: a list of prompts (or ``messages``), each a table with the incident's own keys
  (``prompt`` or ``messages``; optional ``bad``, ``good``, ``focus``, ``counterfactual`` or
  ``counterfactual_messages``). ``bad``, ``good`` and ``focus`` not given are the case's own.
  A counterfactual is not inherited: it is the variant's prompt with the cause removed, token
  for token, so the case's own would not line up with another prompt. A variant without one
  gets the automatic counterfactual, as a case without one does.
- ``template``: a text (``prompt``, or ``messages`` whose contents hold the placeholders) with
  ``{slot}`` placeholders, the values of each slot (``slots``), the slot that carries the
  incident (``trigger``), and the values that replace it in each variant's matched
  counterfactual (``counterfactual``). ``bad``, ``good`` and ``focus`` may use the slots too.
  Every combination of values is a variant, up to ``limit`` (default 200), drawn by the split's
  seed where there are more. ``{{`` and ``}}`` are literal braces.

``split`` (``seed``, ``held_out``) divides the variants into a fit set and a held-out set. The
case's own prompt is always in the fit set. Nothing that chooses a cause, a threshold or a fix
may see the held-out set; it only scores what the fit set chose.

Every problem is one ``IncidentError`` line that names ``variants`` and the item's index, or
``template`` and the variant's slot values, or ``split``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from rca.ingest.incident import (
    MAX_PROMPT_CHARS,
    Incident,
    IncidentError,
    Turn,
    check_text,
    check_turns,
    short_repr,
)

__all__ = [
    "Behaviour",
    "DEFAULT_LIMIT",
    "MAX_SLOT_VALUES",
    "MAX_SLOTS",
    "MAX_VARIANTS",
    "SPLIT_KEYS",
    "Split",
    "TEMPLATE_KEYS",
    "Template",
    "VARIANT_KEYS",
    "Member",
    "Variant",
    "behaviour_of",
    "check_behaviour",
    "fill",
    "variant_error",
]

MAX_VARIANTS = 1000  # listed variants, and a template's limit
MAX_SLOTS = 16
MAX_SLOT_VALUES = 1000
DEFAULT_LIMIT = 200
VARIANT_KEYS = (
    "prompt",
    "messages",
    "bad",
    "good",
    "focus",
    "counterfactual",
    "counterfactual_messages",
)
TEMPLATE_KEYS = (
    "prompt",
    "messages",
    "slots",
    "trigger",
    "counterfactual",
    "bad",
    "good",
    "focus",
    "limit",
)
SPLIT_KEYS = ("seed", "held_out")
_SLOT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


@dataclass(frozen=True)
class Variant:
    """One more prompt that shows the incident. ``None`` fields are the case's own (but the
    counterfactual, which belongs to its prompt). ``origin``: ``listed`` (the case file's
    ``variants``) or ``template`` (expanded, with the slot values in ``slots``)."""

    prompt: str | None = None
    messages: tuple[Turn, ...] | None = None
    bad: str | None = None
    good: str | None = None
    focus: str | None = None
    counterfactual: str | None = None
    counterfactual_messages: tuple[Turn, ...] | None = None
    origin: str = "listed"
    slots: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The keys given, as a case file's ``variants`` item holds them."""
        out: dict[str, Any] = {}
        for key in VARIANT_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            out[key] = [t.to_dict() for t in value] if key.endswith("messages") else value
        return out

    def label(self) -> str:
        """How the variant reads in a message: its slot values (each cut at 40 characters, all
        at 200), or nothing for a listed one."""
        text = ", ".join(f"{k}={v if len(v) <= 40 else v[:40] + '...'}" for k, v in self.slots)
        return text if len(text) <= 200 else text[:200] + "..."


@dataclass(frozen=True)
class Split:
    """Which variants are held out: a share ``held_out`` of them, drawn by ``seed``."""

    seed: int = 0
    held_out: float = 0.5

    def check(self, source: str) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise IncidentError(
                source, "split", f"seed must be an integer, got {short_repr(self.seed)}"
            )
        if not 0 <= self.seed < 2**63:
            raise IncidentError(source, "split", f"seed {self.seed} is not in [0, 2**63)")
        h = self.held_out
        if isinstance(h, bool) or not isinstance(h, int | float) or not 0.0 < h < 1.0:
            raise IncidentError(
                source, "split", f"held_out must be a share between 0 and 1, got {short_repr(h)}"
            )

    def assign(self, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(fit, held_out)``: the indices of ``n`` variants in each set, each in order.

        With two or more variants, at least one is in each set; a single variant is held out
        (the case's own prompt is always fit)."""
        if n <= 0:
            return (), ()
        k = 1 if n == 1 else min(n - 1, max(1, round(n * self.held_out)))
        order = list(range(n))
        random.Random(f"split-{self.seed}").shuffle(order)
        held = tuple(sorted(order[:k]))
        fit = tuple(i for i in range(n) if i not in set(held))
        return fit, held

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "held_out": self.held_out}


def fill(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``{slot}`` replaced by its value; ``{{`` and ``}}`` are braces.

    Raises KeyError naming a placeholder that is not a slot."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        return values[m.group(1)]

    return _PLACEHOLDER_RE.sub(one, text)


def placeholders(text: str) -> list[str]:
    """The slot names ``text`` uses, in order."""
    return [m.group(1) for m in _PLACEHOLDER_RE.finditer(text) if m.group(1) is not None]


@dataclass(frozen=True)
class Template:
    """A prompt with slots, expanded into variants and their matched counterfactuals."""

    slots: tuple[tuple[str, tuple[str, ...]], ...]
    trigger: str
    counterfactual: tuple[str, ...]
    prompt: str | None = None
    messages: tuple[Turn, ...] | None = None
    bad: str | None = None
    good: str | None = None
    focus: str | None = None
    limit: int = DEFAULT_LIMIT

    def texts(self) -> Iterator[tuple[str, str]]:
        """``(key, text)`` of every text with placeholders."""
        if self.prompt is not None:
            yield "prompt", self.prompt
        for i, t in enumerate(self.messages or ()):
            yield f"messages item {i}", t.content
        for key in ("bad", "good", "focus"):
            value = getattr(self, key)
            if value is not None:
                yield key, value

    def check(self, source: str) -> None:
        """Every rule but the texts of the expanded variants (``Incident`` checks those)."""

        def bad(problem: str) -> IncidentError:
            return IncidentError(source, "template", problem)

        if (self.prompt is None) == (self.messages is None):
            raise bad("give prompt or messages (with the placeholders), not both and not neither")
        if self.prompt is not None:
            check_text(source, "template", self.prompt, max_chars=MAX_PROMPT_CHARS)
        if self.messages is not None:
            check_turns(source, "template", self.messages)
        for key in ("bad", "good", "focus"):
            value = getattr(self, key)
            if value is not None:
                check_text(source, "template", value, max_chars=MAX_PROMPT_CHARS)
        if not self.slots:
            raise bad(
                'slots is empty; give each placeholder\'s values, e.g. slots = {note = ["a"]}'
            )
        if len(self.slots) > MAX_SLOTS:
            raise bad(f"has {len(self.slots)} slots; the limit is {MAX_SLOTS}")
        names = [name for name, _ in self.slots]
        for name, values in self.slots:
            if not _SLOT_RE.fullmatch(name):
                raise bad(f"slot name {short_repr(name)} is not a name (letters, digits, _)")
            if not values:
                raise bad(f"slot {name!r} has no values")
            if len(values) > MAX_SLOT_VALUES:
                raise bad(f"slot {name!r} has {len(values)} values; the limit is {MAX_SLOT_VALUES}")
            if len(set(values)) != len(values):
                raise bad(f"slot {name!r} lists a value twice")
            for v in values:
                check_text(source, "template", v, max_chars=MAX_PROMPT_CHARS)
        used: set[str] = set()
        for key, text in self.texts():
            for p in placeholders(text):
                if p not in names:
                    raise bad(
                        f"{key} has placeholder {{{p}}}, which is not a slot (slots: "
                        f"{', '.join(names)}); write {{{{ and }}}} for literal braces"
                    )
                used.add(p)
        prompt_slots = {
            p
            for key, text in self.texts()
            if key not in ("bad", "good", "focus")
            for p in placeholders(text)
        }
        unused = [n for n in names if n not in used]
        if unused:
            raise bad(f"slot {unused[0]!r} is used by no placeholder")
        if self.trigger not in names:
            raise bad(
                f"trigger {short_repr(self.trigger)} is not a slot (slots: {', '.join(names)})"
            )
        if self.trigger not in prompt_slots:
            raise bad(f"trigger slot {self.trigger!r} is not in the prompt")
        if not self.counterfactual:
            raise bad(
                "counterfactual is empty; give the values that replace the trigger slot in the "
                "matched counterfactuals"
            )
        for v in self.counterfactual:
            check_text(source, "template", v, max_chars=MAX_PROMPT_CHARS)
        triggers = dict(self.slots)[self.trigger]
        same = sorted(set(self.counterfactual) & set(triggers))
        if same:
            raise bad(f"counterfactual value {same[0]!r} is also a trigger value")
        if (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, int)
            or not 1 <= self.limit <= MAX_VARIANTS
        ):
            raise bad(
                f"limit must be an integer in [1, {MAX_VARIANTS}], got {short_repr(self.limit)}"
            )

    @property
    def size(self) -> int:
        """How many combinations the slots make."""
        return math.prod(len(values) for _, values in self.slots)

    def combinations(self, seed: int) -> list[tuple[int, ...]]:
        """The value indices of each variant: all combinations in order, or ``limit`` of them
        drawn by ``seed`` (in order) where there are more."""
        sizes = [len(values) for _, values in self.slots]
        total = self.size
        if total <= self.limit:
            return list(itertools.product(*(range(n) for n in sizes)))
        rng = random.Random(f"template-{seed}")
        if total <= 10**7:
            picks = sorted(rng.sample(range(total), self.limit))
        else:
            drawn: set[int] = set()
            while len(drawn) < self.limit:
                drawn.add(rng.randrange(total))
            picks = sorted(drawn)
        out = []
        for flat in picks:
            idx = []
            for n in reversed(sizes):
                flat, r = divmod(flat, n)
                idx.append(r)
            out.append(tuple(reversed(idx)))
        return out

    def expand(self, seed: int) -> tuple[Variant, ...]:
        """The variants, each with its matched counterfactual: the trigger slot's value
        replaced by the ``counterfactual`` values in turn."""
        names = [name for name, _ in self.slots]
        out = []
        for n, idx in enumerate(self.combinations(seed)):
            values = {
                name: self.slots[i][1][j]
                for i, (name, j) in enumerate(zip(names, idx, strict=True))
            }
            cf_values = {**values, self.trigger: self.counterfactual[n % len(self.counterfactual)]}
            prompt = cf = None
            messages = cf_messages = None
            if self.prompt is not None:
                prompt, cf = fill(self.prompt, values), fill(self.prompt, cf_values)
            else:
                assert self.messages is not None
                messages = tuple(Turn(t.role, fill(t.content, values)) for t in self.messages)
                cf_messages = tuple(Turn(t.role, fill(t.content, cf_values)) for t in self.messages)
            out.append(
                Variant(
                    prompt=prompt,
                    messages=messages,
                    bad=None if self.bad is None else fill(self.bad, values),
                    good=None if self.good is None else fill(self.good, values),
                    focus=None if self.focus is None else fill(self.focus, values),
                    counterfactual=cf,
                    counterfactual_messages=cf_messages,
                    origin="template",
                    slots=tuple((name, values[name]) for name in names),
                )
            )
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        """The template as a case file's ``template`` table holds it."""
        out: dict[str, Any] = {}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.messages is not None:
            out["messages"] = [t.to_dict() for t in self.messages]
        out["slots"] = {name: list(values) for name, values in self.slots}
        out["trigger"] = self.trigger
        out["counterfactual"] = list(self.counterfactual)
        for key in ("bad", "good", "focus"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.limit != DEFAULT_LIMIT:
            out["limit"] = self.limit
        return out


@dataclass(frozen=True)
class Member:
    """One prompt of a behaviour: the case's own (``index`` None) or a variant (its index in
    ``Incident.all_variants()``), as an incident, in the ``fit`` or the ``held_out`` set."""

    index: int | None
    variant: Variant | None
    incident: Incident
    part: str
    # where an error about it points: ("variants", "item 3") or ("template", "variant 0 (...)")
    where: tuple[str, str] = ("prompt", "the case's prompt")

    def error(self, e: IncidentError) -> IncidentError:
        """``e``, raised by this member's own incident, as an error that names the member."""
        if self.index is None:
            return e
        return variant_error(self.incident.source, *self.where, e)


@dataclass(frozen=True)
class Behaviour:
    """The case's prompt and its variants, split into a fit set and a held-out set."""

    members: tuple[Member, ...]
    split: Split

    @property
    def fit(self) -> list[Member]:
        return [m for m in self.members if m.part == "fit"]

    @property
    def held_out(self) -> list[Member]:
        return [m for m in self.members if m.part == "held_out"]


def behaviour_of(incident: Incident) -> Behaviour:
    """``incident``'s behaviour: its own prompt (always fit), then each variant in its set."""
    split = incident.split or Split()
    variants = incident.all_variants()
    _, held = split.assign(len(variants))
    n_listed = len(incident.variants)
    members = [Member(None, None, incident, "fit")]
    members += [
        Member(
            i,
            v,
            incident.variant_incident(v),
            "held_out" if i in held else "fit",
            ("variants", f"item {i}")
            if i < n_listed
            else ("template", f"variant {i - n_listed} ({v.label()})"),
        )
        for i, v in enumerate(variants)
    ]
    return Behaviour(tuple(members), split)


def variant_error(source: str, key: str, where: str, e: IncidentError) -> IncidentError:
    """``e``, raised by a variant's own incident, as a one-line error naming the variant."""
    inner = f"key {e.key!r}: {e.problem}" if e.key else e.problem
    return IncidentError(source, key, f"{where}: {inner}")


def check_behaviour(incident: Incident) -> None:
    """The checks of ``variants``, ``template`` and ``split`` (``Incident.__post_init__``): each
    variant, listed or made by the template, is a valid incident with the case's defaults."""
    src = incident.source
    if incident.split is not None:
        if not isinstance(incident.split, Split):
            raise IncidentError(
                src, "split", f"expected a Split, got {type(incident.split).__name__}"
            )
        incident.split.check(src)
    listed = incident.variants
    if not isinstance(listed, tuple):
        raise IncidentError(src, "variants", f"expected a list, got {type(listed).__name__}")
    if len(listed) > MAX_VARIANTS:
        raise IncidentError(
            src, "variants", f"has {len(listed)} items; the limit is {MAX_VARIANTS}"
        )
    for i, v in enumerate(listed):
        if not isinstance(v, Variant):
            raise IncidentError(src, "variants", f"item {i} is {type(v).__name__}, not a variant")
        if (v.prompt is None) == (v.messages is None):
            raise IncidentError(src, "variants", f"item {i}: give prompt or messages (one of them)")
        if v.counterfactual_messages is not None and v.messages is None:
            raise IncidentError(
                src,
                "variants",
                f"item {i}: key 'counterfactual_messages': needs messages; for a plain prompt "
                "give counterfactual",
            )
        try:
            incident.variant_incident(v)
        except IncidentError as e:
            raise variant_error(src, "variants", f"item {i}", e) from None
    template = incident.template
    if template is None:
        return
    if not isinstance(template, Template):
        raise IncidentError(src, "template", f"expected a Template, got {type(template).__name__}")
    template.check(src)
    for n, v in enumerate(template.expand((incident.split or Split()).seed)):
        try:
            incident.variant_incident(v)
        except IncidentError as e:
            raise variant_error(src, "template", f"variant {n} ({v.label()})", e) from None
