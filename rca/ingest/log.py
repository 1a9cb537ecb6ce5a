"""Case files from a production log: ``rca ingest LOG.jsonl --model M --group-by FIELD``.

A log is JSON Lines, one record per conversation the model answered::

    {"messages": [{"role": "user", "content": "..."}], "output": "...", "good": "...",
     "id": "conv-17", "metadata": {"tenant": "acme"}}

- ``messages`` (a list of ``{role, content}`` turns whose last turn is the user's) or
  ``prompt`` (a plain text): what the model was given; one of them;
- ``output``: the model's reply, the incident's ``bad`` continuation; required;
- ``good`` (optional): what it should have produced;
- ``id`` (optional): the record's own id, named in the case's notes;
- ``metadata`` (optional): an object; ``--group-by FIELD`` names one of its keys.

``null`` for ``good``, ``id`` or ``metadata`` is the same as leaving the key out. Any other key
is an error, as in a case file: a typo must not silently drop evidence.

``read_log`` reads and checks every record before anything is built, and groups the records by
the value of ``metadata[FIELD]`` (a string, an integer or a boolean): the first record of a
group, in file order, is the case's own prompt (its ``output`` the case's ``bad``), the others
its listed ``variants`` in file order. ``rca.ingest.case_writer.write_cases`` writes one case
file per incident, all or none. Every problem is one ``IncidentError`` line naming the file,
the line and the key, and saying how many records were read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rca.ingest.case_file import MAX_JSON_DEPTH, turns_from_data
from rca.ingest.incident import (
    MAX_PROMPT_CHARS,
    SEVERITIES,
    Incident,
    IncidentError,
    Turn,
    check_text,
    short_repr,
    text_problem,
)
from rca.ingest.variants import MAX_VARIANTS, Split, Variant
from rca.paths import PathError, json_depth, read_bounded_text

__all__ = [
    "DEFAULT_ID_PREFIX",
    "LOG_KEYS",
    "LogError",
    "MAX_GROUP_RECORDS",
    "MAX_LOG_BYTES",
    "MAX_LOG_RECORDS",
    "MAX_RECORD_ID_CHARS",
    "case_model",
    "read_log",
]

MAX_LOG_BYTES = 64_000_000  # a log file
MAX_LOG_RECORDS = 10_000  # records (non-blank lines) in a log
MAX_GROUP_RECORDS = MAX_VARIANTS + 1  # a case: its own prompt and at most MAX_VARIANTS variants
MAX_RECORD_ID_CHARS = 128
MAX_FIELD_CHARS = 128  # --group-by
MAX_PREFIX_CHARS = 64  # --id-prefix
DEFAULT_ID_PREFIX = "log-"
LOG_KEYS = ("messages", "prompt", "output", "good", "id", "metadata")
_PREFIX_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*)?")
_NOT_SLUG_RE = re.compile(r"[^a-z0-9._-]+")
_SHOWN_VALUE_CHARS = 200  # a group value in a title
_NOTES_CHARS = 18_000  # the record list in a case's notes, before "and N more"
_FIX = {
    "messages": 'give "messages" as a list of {"role": ..., "content": ...} objects that ends '
    "with the user's turn",
    "prompt": 'give "prompt" as the text the model was given, or "messages" for a chat',
    "output": 'give "output", the model\'s reply, as a non-empty string',
    "good": 'give "good" as a string other than "output", or leave it out',
    "id": 'give "id" as a one-line string, or leave it out',
    "metadata": 'give "metadata" as an object, e.g. {"tenant": "acme"}',
}


class LogError(IncidentError):
    """A log record (or the log) that cannot become a case: one line naming the file and the
    line, the key, the fix and how many records were read (``tail``)."""

    def __init__(
        self,
        source: str,
        key: str | None,
        problem: str,
        *,
        fix: str | None = None,
        tail: str = "",
    ) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: " + (f"key {short_repr(key)}: " if key else "")
        fix = fix if fix is not None else _FIX.get(key or "")
        self.fix = fix
        text = where + problem + (f"; fix: {fix}" if fix else "") + (f" ({tail})" if tail else "")
        ValueError.__init__(self, text.replace("\n", " "))


@dataclass(frozen=True)
class _Record:
    line: int
    prompt: str | None
    messages: tuple[Turn, ...] | None
    output: str
    good: str | None
    rid: str | None
    group: tuple[str, Any]  # (kind, value): 1, "1" and true are three groups


def _group_key(source: str, field: str, record: dict[str, Any]) -> tuple[str, Any]:
    key = f"metadata.{field}"
    fix = f'give every record a "metadata" object with {json.dumps(field)} set to a string, an '
    fix += "integer or a boolean"
    meta = record.get("metadata")
    if meta is None or field not in meta:
        raise LogError(source, key, "is missing; every record needs it to be grouped", fix=fix)
    value = meta[field]
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return "int", value
    if isinstance(value, str):
        if not value.strip():
            raise LogError(source, key, "is empty or only whitespace", fix=fix)
        problem = text_problem(value)
        if problem:
            raise LogError(source, key, problem, fix=fix)
        return "str", value
    what = {float: "a number with a fraction", list: "a list", dict: "an object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
    raise LogError(
        source,
        key,
        f"is {what}; group by a field whose values are strings, integers or booleans",
        fix=fix,
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise LogError("", k, "appears twice in one object")
        out[k] = v
    return out


def _record(source: str, line: int, text: str, *, model: str, group_by: str | None) -> _Record:
    """One line of the log as a checked record. Raises LogError naming ``source``."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise LogError(
            source,
            None,
            f"nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}",
            fix="give one flat JSON object per line",
        )
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except LogError as e:
        raise LogError(source, e.key, e.problem, fix="give each key once") from None
    except json.JSONDecodeError as e:
        raise LogError(
            source,
            None,
            f"invalid JSON: {e.msg} at column {e.colno}",
            fix="give one JSON object per line (JSON Lines)",
        ) from None
    except (ValueError, RecursionError):  # an integer of more than 4300 digits
        raise LogError(
            source, None, "invalid JSON: a number has too many digits", fix="check the line"
        ) from None
    if not isinstance(data, dict):
        raise LogError(
            source,
            None,
            f"is a JSON {type(data).__name__}, not an object",
            fix='give one object per line, e.g. {"prompt": "...", "output": "..."}',
        )
    unknown = sorted(set(data) - set(LOG_KEYS))
    if unknown:
        raise LogError(
            source, unknown[0], "unknown key", fix=f"allowed keys are {', '.join(LOG_KEYS)}"
        )
    data = {k: v for k, v in data.items() if not (v is None and k in ("good", "id", "metadata"))}
    if "prompt" in data and "messages" in data:
        raise LogError(source, "messages", "give prompt or messages, not both")
    if "prompt" not in data and "messages" not in data:
        raise LogError(source, "prompt", "is missing; give prompt, or messages for a chat")
    if "output" not in data:
        raise LogError(source, "output", "is missing")
    try:
        messages = None
        if "messages" in data:
            messages = turns_from_data(source, "messages", data["messages"])
        for key in ("prompt", "output", "good"):
            if key in data:
                check_text(source, key, data[key], max_chars=MAX_PROMPT_CHARS)
        if "id" in data:
            check_text(source, "id", data["id"], max_chars=MAX_RECORD_ID_CHARS)
    except IncidentError as e:
        raise LogError(source, e.key, e.problem) from None
    if "id" in data and not _one_line(data["id"]):
        raise LogError(source, "id", "is more than one line")
    if data.get("good") is not None and data["good"] == data["output"]:
        raise LogError(source, "good", "is the same text as output")
    if "metadata" in data and not isinstance(data["metadata"], dict):
        raise LogError(
            source, "metadata", f"expected an object, got {type(data['metadata']).__name__}"
        )
    record = _Record(
        line=line,
        prompt=data.get("prompt"),
        messages=messages,
        output=data["output"],
        good=data.get("good"),
        rid=data.get("id"),
        # without a field, each record is its own until the circuits group them
        group=_group_key(source, group_by, data) if group_by is not None else ("line", line),
    )
    try:  # every check a case makes on its own prompt (the model, the lengths, the last turn)
        _record_incident(record, model, source=source)
    except IncidentError as e:
        raise LogError(source, "output" if e.key == "bad" else e.key, e.problem) from None
    return record


def _one_line(text: str) -> bool:
    """Whether ``text`` holds no line break (``str.splitlines``'s, U+2028 among them)."""
    return "".join(text.splitlines()) == text


def _slug(text: str) -> str:
    return _NOT_SLUG_RE.sub("-", text.lower()).strip("-._")


def _value_text(group: tuple[str, Any]) -> str:
    kind, value = group
    if kind == "bool":
        return "true" if value else "false"
    return str(value) if kind == "int" else value


def _digest(group: tuple[str, Any]) -> str:
    blob = json.dumps(list(group), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _ids(source: str, groups: Sequence[tuple[str, Any]], prefix: str, tail: str) -> list[str]:
    """A unique case id for each group value: ``prefix`` and the value's slug (lower-case
    letters, digits, ``.``, ``_``, ``-``). A value that is not its own slug (capitals, other
    characters, too long) gets 8 hex digits of its hash, so its id does not depend on what
    else is in the log; ids that still collide get 16 hex digits each."""
    room = 128 - len(prefix)

    def with_hash(slug: str, digest: str, n: int) -> str:
        s = slug[: room - n - 1].rstrip("-._")
        return f"{s}-{digest[:n]}" if s else digest[:n]

    bases = []
    for g in groups:
        text, slug = _value_text(g), _slug(_value_text(g))
        bases.append(slug if slug == text and len(slug) <= room else with_hash(slug, _digest(g), 8))
    count: dict[str, int] = {}
    for b in bases:
        count[b] = count.get(b, 0) + 1
    bases = [
        with_hash(_slug(_value_text(g)), _digest(g), 16) if count[b] > 1 else b
        for g, b in zip(groups, bases, strict=True)
    ]
    seen: dict[str, tuple[str, Any]] = {}
    for g, b in zip(groups, bases, strict=True):
        if b in seen:  # pragma: no cover - a 64-bit hash collision
            raise LogError(
                source,
                None,
                f"group values {short_repr(_value_text(seen[b]))} and "
                f"{short_repr(_value_text(g))} make the same case id {prefix + b!r}",
                fix="give another --id-prefix or rename one value",
                tail=tail,
            )
        seen[b] = g
    return [prefix + b for b in bases]


def _shown(text: str) -> str:
    """A group value as a title shows it: as it is, or JSON-quoted where it has line breaks;
    at most ``_SHOWN_VALUE_CHARS`` characters."""
    if not _one_line(text) or text != text.strip():
        text = json.dumps(text)  # escapes every line break
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[:_SHOWN_VALUE_CHARS] + "..."


def _notes(name: str, how: str, records: Sequence[_Record]) -> str:
    parts = [f"line {r.line}" + (f" (id {r.rid})" if r.rid is not None else "") for r in records]
    shown: list[str] = []
    size = 0
    for p in parts:
        if size + len(p) > _NOTES_CHARS:
            break
        shown.append(p)
        size += len(p) + 2
    more = len(parts) - len(shown)
    listed = ", ".join(shown) + (f", and {more} more" if more else "")
    return (
        f"Ingested by rca ingest from {name}, grouped by {how}; "
        f"{len(records)} record{'s' if len(records) != 1 else ''}: {listed}."
    )


def _source_name(path: Path) -> str:
    """The log's file name as a note shows it: escaped where it holds a control character."""
    name = path.name or str(path)
    if text_problem(name):
        return name.encode("unicode_escape", "backslashreplace").decode("ascii")
    return name


def check_options(*, model: str, group_by: str | None, id_prefix: str, severity: str) -> None:
    """The options every case gets, checked. Raises LogError naming the option."""
    if severity not in SEVERITIES:
        raise LogError(
            "<ingest>",
            "severity",
            f"got {short_repr(severity)}",
            fix=f"use one of {', '.join(SEVERITIES)}",
        )
    try:
        check_text("<ingest>", "model", model, max_chars=4096)
    except IncidentError as e:
        raise LogError("<ingest>", "model", e.problem, fix="give the model as --model") from None
    if group_by is not None and (
        not isinstance(group_by, str)
        or not group_by.strip()
        or len(group_by) > MAX_FIELD_CHARS
        or text_problem(group_by)
        or not _one_line(group_by)
    ):
        raise LogError(
            "<ingest>",
            "group_by",
            f"{short_repr(group_by)} is not a field name",
            fix=f"name a key of the records' metadata, one line of at most {MAX_FIELD_CHARS} "
            "characters",
        )
    if len(id_prefix) > MAX_PREFIX_CHARS or not _PREFIX_RE.fullmatch(id_prefix):
        raise LogError(
            "<ingest>",
            "id_prefix",
            f"{short_repr(id_prefix)} is not an id prefix",
            fix=f'give letters, digits, ".", "_" or "-", starting with a letter or digit, at most '
            f"{MAX_PREFIX_CHARS} characters (or nothing)",
        )


def read_log(
    path: str | Path,
    *,
    model: str,
    group_by: str | None,
    id_prefix: str = DEFAULT_ID_PREFIX,
    severity: str = "medium",
    by_circuit: Callable[[list[Incident]], list[str]] | None = None,
) -> list[Incident]:
    """The cases a JSONL log makes: one per value of ``metadata[group_by]``, in the order the
    values first appear. Each case has ``model`` as its model (as given: see ``case_model``
    for a relative path), ``severity``, the id ``id_prefix`` + the value's slug, the tag
    ``ingested``, notes naming the log and the records' lines and ids, and ``[split]`` with
    seed 0 and held_out 0.5.

    Without ``group_by``, ``by_circuit`` groups them: it takes every record as an incident
    (in file order) and gives each a group label (``rca.ingest.circuits``); it runs only once
    every record has been read and checked.

    Every record is read and checked first; the first problem is raised as one LogError line
    (an ``IncidentError``) naming ``path``, the line and the key, with how many records were
    read and how many of them are bad. Raises LogError naming the option for a bad option.
    """
    if group_by is None and by_circuit is None:
        raise ValueError("read_log needs group_by or by_circuit")
    check_options(model=model, group_by=group_by, id_prefix=id_prefix, severity=severity)
    path = Path(path)
    shown = str(path)
    try:
        text = read_bounded_text(path, what="log", max_bytes=MAX_LOG_BYTES)
    except PathError as e:
        problem = "file not found; check the path" if e.missing else e.problem
        raise LogError(shown, None, problem, fix="") from None
    records: list[_Record] = []
    first: LogError | None = None
    n_read = n_bad = 0
    # JSON Lines ends a line at "\n" only: a U+2028 inside a string is no line break
    for i, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        n_read += 1
        if n_read > MAX_LOG_RECORDS:
            raise LogError(
                f"{shown}:{i}",
                None,
                f"the log has more than {MAX_LOG_RECORDS} records, the limit",
                fix="split the log into smaller files",
                tail="nothing was written",
            )
        try:
            records.append(_record(f"{shown}:{i}", i, line, model=model, group_by=group_by))
        except LogError as e:
            n_bad += 1
            first = first or e
    read = f"{n_read} record{'s' if n_read != 1 else ''} read"
    if first is not None:
        which = "the only bad record" if n_bad == 1 else f"the first of {n_bad} bad records"
        raise LogError(
            first.source,
            first.key,
            first.problem,
            fix=first.fix or "",
            tail=f"{which}; {read}; nothing was written",
        )
    tail = f"{read}; nothing was written"
    if not records:
        raise LogError(shown, None, "has no records", fix="give one JSON object per line")
    how = f"metadata.{group_by}"
    if group_by is None:
        assert by_circuit is not None
        labels = by_circuit([_record_incident(r, model) for r in records])
        records = [
            dataclasses.replace(r, group=("circuit", g))
            for r, g in zip(records, labels, strict=True)
        ]
        how = "the circuit a quick trace found (rca.ingest.circuits)"
    groups: dict[tuple[str, Any], list[_Record]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    keys = list(groups)
    ids = _ids(shown, keys, id_prefix, tail)
    name = _source_name(path)
    out = []
    for key, case_id in zip(keys, ids, strict=True):
        members = groups[key]
        head, rest = members[0], members[1:]
        where = f"{shown}:{head.line}"
        if len(members) > MAX_GROUP_RECORDS:
            raise LogError(
                where,
                f"metadata.{group_by}" if group_by is not None else None,
                f"the group {short_repr(_value_text(key))} has {len(members)} records; a case "
                f"holds at most {MAX_GROUP_RECORDS} (its prompt and {MAX_VARIANTS} variants)",
                fix="group by a finer field, or split the log"
                if group_by is not None
                else "group by a metadata field (--group-by), or split the log",
                tail=tail,
            )
        for r in rest:
            if r.good is None and head.good is not None and head.good == r.output:
                raise LogError(
                    f"{shown}:{r.line}",
                    "good",
                    f"is not given, so the case's good (line {head.line}) applies to this "
                    "record, and it is the same text as this record's output",
                    fix='give this record its own "good"',
                    tail=tail,
                )
        n = len(members)
        what = group_by if group_by is not None else "circuit"
        title = f"{what} = {_shown(_value_text(key))}: {n} conversation{'s' if n != 1 else ''}"
        try:
            incident = Incident(
                id=case_id,
                title=title,
                severity=severity,
                model=model,
                prompt=head.prompt,
                messages=head.messages,
                bad=head.output,
                good=head.good,
                tags=("ingested",),
                notes=_notes(name, how, members),
                variants=tuple(
                    Variant(prompt=r.prompt, messages=r.messages, bad=r.output, good=r.good)
                    for r in rest
                ),
                split=Split(seed=0, held_out=0.5),
                source="<ingest>",
            )
        except IncidentError as e:  # pragma: no cover - every record was checked above
            raise LogError(where, e.key, e.problem, tail=tail) from None
        out.append(incident)
    return out


def _record_incident(r: _Record, model: str, *, source: str | None = None) -> Incident:
    """One record as an incident of its own (its prompt or messages, output and good)."""
    return Incident(
        id=f"line-{r.line}",
        title=f"line {r.line}",
        severity="medium",
        model=model,
        prompt=r.prompt,
        messages=r.messages,
        bad=r.output,
        good=r.good,
        source=source or f"<log line {r.line}>",
    )


def case_model(model: str, out_dir: str | Path) -> str:
    """``model`` as a case file in ``out_dir`` must name it: a relative path (taken against the
    working directory, as every command's ``--model`` is) made relative to ``out_dir``, since a
    case file's relative ``model`` resolves against the file's directory. ``zoo:NAME``, an
    absolute path and ``~/...`` stay as they are."""
    if model.startswith("zoo:") or model.startswith("~") or Path(model).is_absolute():
        return model
    rel = os.path.relpath(os.path.abspath(model), os.path.abspath(out_dir))
    return Path(rel).as_posix()
