"""The ``Incident`` record: what went wrong, as ingested, validated on construction.

An incident comes from a case file (``rca.ingest.case_file``), from the command line's flags
(``incident_from_flags``) or from the store; every field is checked the same way whatever the
source, by ``Incident.__post_init__``.

A chat incident (``messages``) is rendered with the model's own chat template
(``apply_chat_template(..., add_generation_prompt=True)``) once the model is known:
``Incident.for_model`` gives the incident with ``prompt`` (and ``counterfactual``) set to the
rendered text; the messages stay the record of what was ingested.

Every problem is one ``IncidentError`` line naming the source, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rca.ingest.variants import Behaviour, Split, Template, Variant

__all__ = [
    "Incident",
    "IncidentError",
    "MAX_PROMPT_CHARS",
    "ROLES",
    "SEVERITIES",
    "Turn",
    "check_text",
    "check_turns",
    "incident_from_flags",
    "is_label",
    "render_chat",
    "short_repr",
    "text_problem",
]

SEVERITIES = ("low", "medium", "high", "critical")
MAX_PROMPT_CHARS = 20_000  # a file-level bound; the model's context is checked at encode time
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: "$" takes a "\n"
# C0 controls other than tab and newline, DEL, and C1 controls: never legitimate in a prompt,
# and a way to hide content from a reviewer's terminal
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069, and the
# Arabic letter mark U+061C): they reorder how a text is shown, so a reviewer reads another
# text than the model got ("Trojan Source")
_BIDI_RE = re.compile("[\u061c\u202a-\u202e\u2066-\u2069]")
# zero-width and invisible characters (U+200B-U+200F, U+2060-U+2064, U+FEFF): they hide
# tokens from a reviewer. A file's leading byte-order mark is dropped when it is read.
_INVISIBLE_RE = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff]")
# lone surrogates: what Python makes of bytes that are not UTF-8 (command-line arguments decode
# with surrogateescape); no tokenizer can encode them
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
ROLES = ("system", "user", "assistant")
_FIX = {
    "id": 'give a short id of letters, digits, ".", "_" or "-", e.g. id = "leak-2026-03"',
    "title": 'give a one-line title, e.g. title = "PIN leaked to caller"',
    "severity": f"use one of {', '.join(SEVERITIES)}",
    "model": 'give a model directory or a zoo model, e.g. model = "zoo:support-bot-v1"',
    "prompt": "give the exact prompt the model saw, as a non-empty string (or give messages)",
    "messages": 'give the conversation as a list of turns, e.g. messages = [{role = "system", '
    'content = "..."}, {role = "user", content = "..."}], ending with the user\'s turn',
    "counterfactual_messages": "give the conversation with the suspected cause removed, as "
    "messages is given, or remove the key",
    "focus": 'give the part of bad that matters, copied from bad, e.g. focus = "8841"',
    "bad": "give the bad continuation the model produced, as a non-empty string",
    "good": "give what the model should have produced, or remove the key",
    "counterfactual": "give the prompt with the suspected cause removed, or remove the key",
    "reference_prompts": 'give a list of benign prompts, e.g. reference_prompts = ["..."]',
    "tags": 'give a list of strings, e.g. tags = ["leak"]',
    "notes": "give free text as a string",
    "variants": "give a list of tables with the incident's keys, e.g. variants = [{prompt = "
    '"..."}] (bad, good and focus default to the case\'s)',
    "template": "see docs/case-files.md, Variants: prompt (or messages) with {slot} "
    "placeholders, slots, trigger and counterfactual",
    "split": "give [split] with seed (an integer >= 0) and held_out (a share in (0, 1))",
}


def short_repr(value: Any, limit: int = 60) -> str:
    """A value from the input, quoted for a one-line message: at most ``limit`` characters of
    it, so that a huge value cannot turn the line into a page."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


class IncidentError(ValueError):
    """A case file or incident field that is wrong; the one-line message names the fix."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: " + (f"key {short_repr(key)}: " if key else "")
        fix = f"; fix: {_FIX[key]}" if key in _FIX else ""
        super().__init__((where + problem + fix).replace("\n", " "))


def text_problem(value: str) -> str | None:
    """What makes a text unfit to record or show, as the rest of a one-line message, or None:
    a control character (all but tab and newline), a bidirectional override or isolate, a
    zero-width character, a lone surrogate (bytes that were not UTF-8). Case-file texts, the
    command line's incident flags and ``rca notes add`` all check this one rule."""
    for pattern, what in (
        (_CTRL_RE, "control character"),
        (_BIDI_RE, "bidirectional control character"),
        (_INVISIBLE_RE, "zero-width character"),
    ):
        m = pattern.search(value)
        if m:
            return (
                f"contains {what} U+{ord(m.group()):04X} at {m.start()}; remove it (it can hide "
                "or reorder text on a reviewer's screen)"
            )
    m = _SURROGATE_RE.search(value)
    if m:
        c = ord(m.group())
        what = f"byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        return f"is not valid UTF-8 ({what} at character {m.start()}); pass the text as UTF-8"
    return None


def check_text(source: str, key: str, value: Any, *, max_chars: int | None = None) -> str:
    if not isinstance(value, str):
        raise IncidentError(source, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise IncidentError(source, key, "must not be empty or only whitespace")
    if max_chars is not None and len(value) > max_chars:
        raise IncidentError(
            source, key, f"is {len(value)} characters long; the limit is {max_chars}"
        )
    problem = text_problem(value)
    if problem:
        raise IncidentError(source, key, problem)
    return value


@dataclass(frozen=True)
class Turn:
    """One message of a chat incident."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def check_turns(source: str, key: str, turns: Any) -> None:
    if not isinstance(turns, tuple):
        raise IncidentError(source, key, f"expected a list, got {type(turns).__name__}")
    if not turns:
        raise IncidentError(source, key, "is an empty conversation")
    for i, t in enumerate(turns):
        if not isinstance(t, Turn):
            raise IncidentError(source, key, f"item {i} is {type(t).__name__}, not a turn")
        if t.role not in ROLES:
            raise IncidentError(
                source,
                key,
                f"item {i} has unknown role {short_repr(t.role)}; roles are {', '.join(ROLES)}",
            )
        try:
            check_text(source, key, t.content, max_chars=MAX_PROMPT_CHARS)
        except IncidentError as e:
            raise IncidentError(source, key, f"item {i} content {e.problem}") from None
    if turns[-1].role != "user":
        raise IncidentError(
            source,
            key,
            f"the last turn is the {turns[-1].role}'s; end with the user's turn (rca renders "
            "the assistant's reply as the generation prompt)",
        )


@dataclass(frozen=True)
class Incident:
    """What went wrong, as ingested. Validated on construction, whatever the source.

    ``prompt`` is None for a chat incident (``messages``) until ``for_model`` renders it.
    """

    id: str
    title: str
    severity: str
    model: str
    prompt: str | None
    bad: str
    good: str | None = None
    counterfactual: str | None = None
    reference_prompts: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    notes: str = ""
    messages: tuple[Turn, ...] | None = None
    counterfactual_messages: tuple[Turn, ...] | None = None
    focus: str | None = None
    variants: tuple[Variant, ...] = ()
    template: Template | None = None
    split: Split | None = None
    source: str = field(default="<flags>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise IncidentError(src, "id", f"{short_repr(self.id)} is not a valid id")
        check_text(src, "title", self.title, max_chars=500)
        if self.severity not in SEVERITIES:
            raise IncidentError(src, "severity", f"got {short_repr(self.severity)}")
        check_text(src, "model", self.model, max_chars=4096)
        if self.messages is not None:
            check_turns(src, "messages", self.messages)
        elif self.prompt is None:
            raise IncidentError(src, "prompt", "is missing; give prompt, or messages for a chat")
        if self.prompt is not None:
            # a rendered chat prompt holds the template's markers; its length is still bounded
            limit = MAX_PROMPT_CHARS * (4 if self.messages is not None else 1)
            check_text(src, "prompt", self.prompt, max_chars=limit)
        if self.counterfactual_messages is not None:
            if self.messages is None:
                raise IncidentError(
                    src,
                    "counterfactual_messages",
                    "needs messages; for a plain prompt give counterfactual",
                )
            check_turns(src, "counterfactual_messages", self.counterfactual_messages)
            if self.counterfactual_messages == self.messages:
                raise IncidentError(src, "counterfactual_messages", "is the same as messages")
        check_text(src, "bad", self.bad, max_chars=MAX_PROMPT_CHARS)
        if self.focus is not None:
            check_text(src, "focus", self.focus, max_chars=MAX_PROMPT_CHARS)
            if self.focus not in self.bad:
                raise IncidentError(
                    src,
                    "focus",
                    f"{short_repr(self.focus)} is not part of bad {short_repr(self.bad)}",
                )
        if self.good is not None:
            check_text(src, "good", self.good, max_chars=MAX_PROMPT_CHARS)
            if self.good == self.bad:
                raise IncidentError(src, "good", "is the same text as bad")
        if self.counterfactual is not None:
            limit = MAX_PROMPT_CHARS * (4 if self.counterfactual_messages is not None else 1)
            check_text(src, "counterfactual", self.counterfactual, max_chars=limit)
            if self.counterfactual == self.prompt:
                raise IncidentError(src, "counterfactual", "is the same text as prompt")
        for key in ("reference_prompts", "tags"):
            val = getattr(self, key)
            if not isinstance(val, tuple):
                raise IncidentError(src, key, f"expected a list, got {type(val).__name__}")
            for i, item in enumerate(val):
                if not isinstance(item, str):
                    raise IncidentError(src, key, f"item {i} is {type(item).__name__}, not string")
                check_text(src, key, item, max_chars=MAX_PROMPT_CHARS)
        if not isinstance(self.notes, str):
            raise IncidentError(src, "notes", f"expected a string, got {type(self.notes).__name__}")
        if self.notes:
            check_text(src, "notes", self.notes + ".", max_chars=MAX_PROMPT_CHARS + 1)
        if self.variants or self.template is not None or self.split is not None:
            from rca.ingest.variants import check_behaviour

            check_behaviour(self)

    def all_variants(self) -> tuple[Variant, ...]:
        """The listed variants, then the template's, expanded by the split's seed."""
        from rca.ingest.variants import Split

        made = () if self.template is None else self.template.expand((self.split or Split()).seed)
        return (*self.variants, *made)

    def variant_incident(self, variant: Variant) -> Incident:
        """``variant`` as an incident of its own: its prompt (or messages) and counterfactual,
        its continuations or else the case's, and no variants of its own."""
        return dataclasses.replace(
            self,
            prompt=variant.prompt,
            messages=variant.messages,
            bad=variant.bad if variant.bad is not None else self.bad,
            good=variant.good if variant.good is not None else self.good,
            focus=variant.focus if variant.focus is not None else self.focus,
            counterfactual=variant.counterfactual,
            counterfactual_messages=variant.counterfactual_messages,
            variants=(),
            template=None,
            split=None,
        )

    def variant_incidents(self) -> list[Incident]:
        """Every variant as an incident (``variant_incident``), in ``all_variants`` order."""
        return [self.variant_incident(v) for v in self.all_variants()]

    def behaviour(self) -> Behaviour:
        """The case's prompt and its variants, each in the fit or the held-out set."""
        from rca.ingest.variants import behaviour_of

        return behaviour_of(self)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def rendered(self) -> bool:
        """Whether ``prompt`` holds the text the model sees (always, but for a chat incident
        that ``for_model`` has not rendered yet)."""
        return self.prompt is not None and (
            self.counterfactual_messages is None or self.counterfactual is not None
        )

    def to_dict(self) -> dict[str, Any]:
        """The incident's fields as ingested, as plain data (lists, not tuples), without its
        source: a chat incident's rendered prompt and counterfactual are not among them (they
        depend on the model), and the chat and focus keys appear only where given, so a plain
        incident's fields (and hash) are what they always were."""
        d = asdict(self)
        d.pop("source")
        d["reference_prompts"] = list(self.reference_prompts)
        d["tags"] = list(self.tags)
        for key in ("messages", "counterfactual_messages"):
            turns = getattr(self, key)
            d[key] = None if turns is None else [t.to_dict() for t in turns]
        if self.messages is not None:
            d.pop("prompt")
        if self.counterfactual_messages is not None:
            d.pop("counterfactual")
        for key in ("messages", "counterfactual_messages", "focus"):
            if d.get(key, "") is None:
                d.pop(key)
        d.pop("variants")
        d.pop("template")
        d.pop("split")
        if self.variants:
            d["variants"] = [v.to_dict() for v in self.variants]
        if self.template is not None:
            d["template"] = self.template.to_dict()
        if self.split is not None:
            d["split"] = self.split.to_dict()
        return d

    def for_model(self, tokenizer: Any) -> Incident:
        """The incident as the model sees it: a chat incident's messages (and counterfactual
        messages) rendered with the tokenizer's own chat template and the generation prompt.
        A plain incident, or one already rendered, is returned as it is.

        Raises IncidentError naming ``messages`` when the model has no chat template or the
        template refuses the conversation.
        """
        if self.rendered:
            return self
        assert self.messages is not None
        prompt = render_chat(tokenizer, self.messages, source=self.source, key="messages")
        cf = self.counterfactual
        if self.counterfactual_messages is not None:
            cf = render_chat(
                tokenizer,
                self.counterfactual_messages,
                source=self.source,
                key="counterfactual_messages",
            )
        return dataclasses.replace(self, prompt=prompt, counterfactual=cf)

    @property
    def sha256(self) -> str:
        """A hash of the incident's content, independent of file formatting."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def model_path(self, *, home: Path | None = None) -> Path:
        """The model directory: a zoo model under RCA_HOME, or a path relative to the case file.

        A relative path resolves against the directory of the case file the incident was read
        from (``load_case`` records its absolute path as the source), never the working
        directory at call time. Only an incident stated on the command line (``<flags>``) takes
        a relative path as the user typed it, against the working directory. Any other
        incident without a case file (``<store>``, ``<case>``, ...) has nothing to resolve a
        relative path against: that is an IncidentError.
        """
        from rca.model.subject import resolve_model_ref

        src = self.source
        if src == "<flags>":
            base = None
        elif is_label(src):
            if not self.model.startswith("zoo:") and not _is_absolute(self.model):
                raise IncidentError(
                    src,
                    "model",
                    f"incident {self.id!r}: {self.model!r} is a relative path, and the incident "
                    "has no case file to resolve it against (rca never resolves it against the "
                    "working directory)",
                )
            base = None
        else:
            base = Path(src).parent
        return resolve_model_ref(self.model, base=base, home=home)

    def encode(self, subject: Any) -> Any:
        """The metric's ``Target`` for this incident on ``subject``, checked against its context.

        Raises IncidentError naming ``prompt``/``bad``/``good`` when a text does not fit.
        """
        from rca.model.metric import MetricError, encode_target, encode_text

        inc = self.for_model(subject.tokenizer)
        assert inc.prompt is not None
        try:
            target = encode_target(
                subject.tokenizer, inc.prompt, inc.bad, inc.good, focus=inc.focus
            )
        except MetricError as e:
            key = next((k for k in ("focus", "good", "bad", "prompt") if k in str(e)), None)
            if key == "prompt" and inc.is_chat:
                key = "messages"
            raise IncidentError(self.source, key, str(e)) from e
        n_ctx = getattr(subject.adapter, "n_ctx", None)
        if n_ctx is None:
            return target
        cont = target.length - target.n_prompt
        if target.length > n_ctx:
            prompt_key = "messages" if inc.is_chat else "prompt"
            if cont < target.n_prompt:
                raise IncidentError(
                    self.source,
                    prompt_key,
                    f"prompt plus continuation is {target.length} tokens; the model's context "
                    f"is {n_ctx}. Shorten the prompt to the part that matters",
                )
            # the continuation is the larger part: name the one that is longest
            longest = "good" if len(target.good_ids or ()) > len(target.bad_ids) else "bad"
            raise IncidentError(
                self.source,
                longest,
                f"{longest} is {cont} tokens; with the {prompt_key} ({target.n_prompt}) that is "
                f"{target.length}, and the model's context is {n_ctx}. Shorten {longest} to the "
                "tokens that matter",
            )
        if inc.counterfactual is not None:
            n = len(encode_text(subject.tokenizer, inc.counterfactual))
            if n + cont > n_ctx:
                raise IncidentError(
                    self.source,
                    "counterfactual_messages" if inc.counterfactual_messages else "counterfactual",
                    f"counterfactual plus continuation is {n + cont} tokens; the model's context "
                    f"is {n_ctx}. Shorten it as the prompt was",
                )
        for i, ref in enumerate(self.reference_prompts):
            n = len(encode_text(subject.tokenizer, ref))
            if n > n_ctx:
                raise IncidentError(
                    self.source,
                    "reference_prompts",
                    f"item {i} is {n} tokens; the model's context is {n_ctx}. Shorten it",
                )
        return target


def render_chat(tokenizer: Any, turns: tuple[Turn, ...], *, source: str, key: str) -> str:
    """A conversation as the model sees it: its own chat template, with the generation prompt
    (the opening of the assistant's turn) at the end. Raises IncidentError naming ``key``."""
    if not getattr(tokenizer, "chat_template", None):
        raise IncidentError(
            source,
            key,
            "the model's tokenizer has no chat template, so a conversation cannot be rendered; "
            "give the exact text the model saw as prompt instead",
        )
    try:
        text = tokenizer.apply_chat_template(
            [t.to_dict() for t in turns], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise IncidentError(
            source, key, f"the model's chat template refuses this conversation: {first}"
        ) from None
    if not isinstance(text, str) or not text.strip():
        raise IncidentError(source, key, "the model's chat template renders it as empty text")
    return text


def is_label(source: str) -> bool:
    """A source that names no file: ``<flags>``, ``<store>``, ``<case>`` and the like."""
    return source.startswith("<") and source.endswith(">")


def _is_absolute(model: str) -> bool:
    return Path(os.path.expanduser(model)).is_absolute()


def incident_from_flags(
    *,
    model: str,
    prompt: str | None,
    bad: str,
    good: str | None = None,
    counterfactual: str | None = None,
    reference_prompts: tuple[str, ...] | list[str] = (),
    id: str | None = None,  # noqa: A002 - the case file's key
    title: str | None = None,
    severity: str = "medium",
    messages: tuple[Turn, ...] | None = None,
    counterfactual_messages: tuple[Turn, ...] | None = None,
    focus: str | None = None,
) -> Incident:
    """An incident stated on the command line instead of in a case file.

    Validated exactly like a case file (source ``<flags>``). Without ``id`` the id is
    ``adhoc-`` and the first 12 hex digits of a hash of model, prompt and continuations, so the
    same flags give the same case id in the store.
    """
    if prompt is not None and messages is not None:
        raise IncidentError("<flags>", "messages", "give --prompt or --messages, not both")
    if counterfactual is not None and counterfactual_messages is not None:
        raise IncidentError(
            "<flags>",
            "counterfactual_messages",
            "give --counterfactual or --counterfactual-messages, not both",
        )
    if id is None:
        said = prompt if messages is None else [t.to_dict() for t in messages]
        blob = json.dumps([model, said, bad, good], ensure_ascii=False, default=str)
        id = "adhoc-" + hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    if title is None:
        shown = bad.strip()[:60] if isinstance(bad, str) else ""
        title = f"ad-hoc incident: {shown!r}" if shown else "ad-hoc incident"
    return Incident(
        id=id,
        title=title,
        severity=severity,
        model=model,
        prompt=prompt,
        bad=bad,
        good=good,
        counterfactual=counterfactual,
        reference_prompts=tuple(reference_prompts),
        messages=messages,
        counterfactual_messages=counterfactual_messages,
        focus=focus,
        source="<flags>",
    )
