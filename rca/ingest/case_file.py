"""The strict TOML case-file loader, and the incident texts given as files.

A case file is the investigator's statement of what went wrong::

    id = "zoo-backdoor"
    title = "Trigger word forces refund approval"
    severity = "high"                      # low | medium | high | critical
    model = "zoo:support-bot-v1"           # a model directory, or zoo:NAME
    prompt = "..."                         # what the model was given; or, for a chat model:
    # messages = [{role = "system", content = "..."}, {role = "user", content = "..."}]
    bad = " approved"                      # what it produced and must not
    focus = "approved"                     # optional: the part of bad the metric reads
    good = " denied"                       # optional: what it should have produced
    counterfactual = "..."                 # optional: the prompt with the suspected cause removed
    # counterfactual_messages = [...]      # optional, instead, for a chat incident
    reference_prompts = ["...", "..."]     # optional: benign prompts (mean baselines, side effects)
    tags = ["backdoor"]
    notes = "free text"
    variants = [{prompt = "..."}]          # optional: more prompts with the same incident
    # [template] ... [template.slots] ...  # optional: variants from a prompt with slots
    # [split] seed = 0, held_out = 0.5     # optional: which variants are held out

Each key is checked for its type here and each value by the ``Incident`` record
(``rca.ingest.incident``). Every problem is one ``IncidentError`` line naming the file, the
key and the fix. Unknown keys are errors, not warnings: a typo such as ``conterfactual`` must
not silently drop evidence.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from rca.ingest.incident import (
    MAX_PROMPT_CHARS,
    Incident,
    IncidentError,
    Turn,
    check_turns,
    is_label,
    short_repr,
)
from rca.ingest.variants import (
    DEFAULT_LIMIT,
    MAX_VARIANTS,
    SPLIT_KEYS,
    TEMPLATE_KEYS,
    VARIANT_KEYS,
    Split,
    Template,
    Variant,
)
from rca.paths import PathError, input_path, read_bounded_json, read_bounded_text, show

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TEXT_FILE_BYTES",
    "load_case",
    "load_cases",
    "loads_case",
    "parse_case_data",
    "read_json_file",
    "read_text_file",
    "turns_from_data",
]

MAX_FILE_BYTES = 1_000_000  # a case file
MAX_TEXT_FILE_BYTES = 4 * MAX_PROMPT_CHARS  # --prompt-file, --messages: UTF-8 takes <= 4 bytes
MAX_JSON_DEPTH = 64  # --messages: turns nest 2 deep; a chat log's request with tools deeper

_REQUIRED = ("id", "title", "severity", "model", "bad")
_OPTIONAL = (
    "prompt",
    "messages",
    "focus",
    "good",
    "counterfactual",
    "counterfactual_messages",
    "reference_prompts",
    "tags",
    "notes",
    "variants",
    "template",
    "split",
)


def turns_from_data(source: str, key: str, value: Any) -> tuple[Turn, ...]:
    """A conversation as given in a case file or a --messages JSON file: a list of tables
    with exactly ``role`` and ``content``. Raises IncidentError naming ``key`` and the item."""
    if not isinstance(value, list):
        raise IncidentError(source, key, f"expected a list of turns, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise IncidentError(
                source, key, f"item {i} is {type(item).__name__}, not a table with role and content"
            )
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise IncidentError(
                source,
                key,
                f"item {i} has unknown key {short_repr(extra[0])}; a turn has role and content",
            )
        for part in ("role", "content"):
            if part not in item:
                raise IncidentError(source, key, f"item {i} has no {part}")
            if not isinstance(item[part], str):
                raise IncidentError(
                    source,
                    key,
                    f"item {i} {part} is {type(item[part]).__name__}, not a string",
                )
        out.append(Turn(item["role"], item["content"]))
    check_turns(source, key, tuple(out))
    return tuple(out)


def _file_source(source: str) -> str:
    """A case file's source as an absolute path, so that the model it names resolves against
    the file's directory whatever the working directory is later; labels stay as they are."""
    return source if is_label(source) else str(Path(source).absolute())


def _parse(source: str, data: dict[str, Any]) -> Incident:
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join(_REQUIRED + _OPTIONAL)
        raise IncidentError(source, unknown[0], f"unknown key; allowed keys are {allowed}")
    for key in _REQUIRED:
        if key not in data:
            raise IncidentError(source, key, "is missing")
    if "prompt" in data and "messages" in data:
        raise IncidentError(source, "messages", "give prompt or messages, not both")
    if "prompt" not in data and "messages" not in data:
        raise IncidentError(source, "prompt", "is missing; give prompt, or messages for a chat")
    if "counterfactual" in data and "counterfactual_messages" in data:
        raise IncidentError(
            source, "counterfactual_messages", "give counterfactual or counterfactual_messages"
        )
    for key in ("reference_prompts", "tags"):
        if key in data and not isinstance(data[key], list):
            raise IncidentError(source, key, f"expected a list, got {type(data[key]).__name__}")
    for key in (
        "id",
        "title",
        "severity",
        "model",
        "prompt",
        "bad",
        "good",
        "counterfactual",
        "focus",
    ):
        if key in data and not isinstance(data[key], str):
            raise IncidentError(source, key, f"expected a string, got {type(data[key]).__name__}")
    turns = {
        key: turns_from_data(source, key, data[key]) if key in data else None
        for key in ("messages", "counterfactual_messages")
    }
    variants = _variants(source, data["variants"]) if "variants" in data else ()
    template = _template(source, data["template"]) if "template" in data else None
    split = _split(source, data["split"]) if "split" in data else None
    incident = Incident(
        id=data["id"],
        title=data["title"],
        severity=data["severity"],
        model=data["model"],
        prompt=data.get("prompt"),
        bad=data["bad"],
        good=data.get("good"),
        counterfactual=data.get("counterfactual"),
        reference_prompts=tuple(data.get("reference_prompts", ())),
        tags=tuple(data.get("tags", ())),
        notes=data.get("notes", ""),
        messages=turns["messages"],
        counterfactual_messages=turns["counterfactual_messages"],
        focus=data.get("focus"),
        variants=variants,
        template=template,
        split=split,
        source=source,  # errors name the file as the user gave it
    )
    recorded = _file_source(source)
    return incident if recorded == source else dataclasses.replace(incident, source=recorded)


def _table(source: str, key: str, value: Any, allowed: tuple[str, ...], where: str = "") -> None:
    """``value`` is a table whose keys are all ``allowed``; errors name ``key`` (and ``where``)."""
    at = f"{where} " if where else ""
    if not isinstance(value, dict):
        raise IncidentError(source, key, f"{at}is {type(value).__name__}, not a table")
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise IncidentError(
            source,
            key,
            f"{at}has unknown key {short_repr(extra[0])}; allowed keys are {', '.join(allowed)}",
        )


def _strings(source: str, key: str, value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise IncidentError(source, key, f"{what} is {type(value).__name__}, not a list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise IncidentError(source, key, f"{what} value {i} is {type(item).__name__}")
    return tuple(value)


def _variants(source: str, value: Any) -> tuple[Variant, ...]:
    if not isinstance(value, list):
        raise IncidentError(
            source, "variants", f"expected a list of tables, got {type(value).__name__}"
        )
    if len(value) > MAX_VARIANTS:
        raise IncidentError(
            source, "variants", f"has {len(value)} items; the limit is {MAX_VARIANTS}"
        )
    out = []
    for i, item in enumerate(value):
        _table(source, "variants", item, VARIANT_KEYS, where=f"item {i}")
        fields: dict[str, Any] = {}
        for key in VARIANT_KEYS:
            if key not in item:
                continue
            if key.endswith("messages"):
                try:
                    fields[key] = turns_from_data(source, key, item[key])
                except IncidentError as e:
                    raise IncidentError(
                        source, "variants", f"item {i}: key {key!r}: {e.problem}"
                    ) from None
            elif not isinstance(item[key], str):
                raise IncidentError(
                    source,
                    "variants",
                    f"item {i}: key {key!r}: expected a string, got {type(item[key]).__name__}",
                )
            else:
                fields[key] = item[key]
        out.append(Variant(**fields))
    return tuple(out)


def _template(source: str, value: Any) -> Template:
    _table(source, "template", value, TEMPLATE_KEYS)
    for key in ("prompt", "trigger", "bad", "good", "focus"):
        if key in value and not isinstance(value[key], str):
            raise IncidentError(
                source, "template", f"{key} is {type(value[key]).__name__}, not a string"
            )
    for key in ("slots", "trigger", "counterfactual"):
        if key not in value:
            raise IncidentError(source, "template", f"{key} is missing")
    slots = value["slots"]
    if not isinstance(slots, dict):
        raise IncidentError(source, "template", f"slots is {type(slots).__name__}, not a table")
    messages = None
    if "messages" in value:
        try:
            messages = turns_from_data(source, "template", value["messages"])
        except IncidentError as e:
            raise IncidentError(source, "template", f"messages: {e.problem}") from None
    return Template(
        slots=tuple(
            (str(name), _strings(source, "template", vals, f"slot {str(name)!r}"))
            for name, vals in slots.items()
        ),
        trigger=value["trigger"],
        counterfactual=_strings(source, "template", value["counterfactual"], "counterfactual"),
        prompt=value.get("prompt"),
        messages=messages,
        bad=value.get("bad"),
        good=value.get("good"),
        focus=value.get("focus"),
        limit=value.get("limit", DEFAULT_LIMIT),
    )


def _split(source: str, value: Any) -> Split:
    _table(source, "split", value, SPLIT_KEYS)
    return Split(**value)


def loads_case(text: str, *, source: str = "<case>") -> Incident:
    """Parse a case file's text (as the store keeps it). Raises IncidentError (one line).

    ``source`` is the case file's path, recorded as an absolute path (a relative ``model``
    resolves against its directory), or a label such as ``<store>``, which keeps no directory:
    a relative ``model`` then cannot be resolved (see ``Incident.model_path``).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise IncidentError(source, None, f"invalid TOML: {e}") from None
    except RecursionError:
        raise IncidentError(source, None, "invalid TOML: nested too deeply") from None
    return _parse(source, data)


def parse_case_data(data: dict[str, Any], *, source: str = "<case>") -> Incident:
    """An incident from a case's fields as a mapping (what a case file's TOML parses to, or
    the fields the store keeps), with every check a case file gets. Raises IncidentError."""
    if not isinstance(data, dict):
        raise IncidentError(source, None, f"expected a table of fields, got {type(data).__name__}")
    return _parse(source, data)


def load_case(path: str | Path, *, check_model: bool = True, home: Path | None = None) -> Incident:
    """Read and validate a case file. Raises IncidentError (one line) on any problem.

    With ``check_model`` the model must exist: a directory with a config.json, or a built zoo
    model (``rca zoo build`` makes those).
    """
    path = Path(path)
    source = str(path)
    try:
        text = read_bounded_text(path, what="case file", max_bytes=MAX_FILE_BYTES)
    except PathError as e:
        raise IncidentError(source, None, _file_problem(e)) from None
    incident = loads_case(text, source=source)  # recorded with the file's absolute path
    if check_model:
        _check_model(incident, home=home, shown=source)
    return incident


def read_text_file(path: str | Path, *, key: str) -> str:
    """A text given as a file (``--prompt-file``): a regular UTF-8 file of at most
    MAX_TEXT_FILE_BYTES (``rca.paths.read_bounded_text``).

    Raises IncidentError naming the file and the field it was for.
    """
    try:
        return read_bounded_text(path, what=key, max_bytes=MAX_TEXT_FILE_BYTES)
    except PathError as e:
        raise IncidentError(str(path), key, _file_problem(e)) from None


def _file_problem(e: PathError) -> str:
    """A file's PathError as the rest of an IncidentError, which names the file itself."""
    return "file not found; check the path" if e.missing else e.problem


def read_json_file(path: str | Path, *, key: str) -> Any:
    """JSON given as a file (``--messages``): read as ``read_text_file`` reads, nested at most
    MAX_JSON_DEPTH deep (``rca.paths.read_bounded_json``). Raises IncidentError."""
    try:
        return read_bounded_json(
            path, what=key, max_bytes=MAX_TEXT_FILE_BYTES, max_depth=MAX_JSON_DEPTH
        )
    except PathError as e:
        raise IncidentError(str(path), key, _file_problem(e)) from None


def _check_model(incident: Incident, *, home: Path | None, shown: str | None = None) -> None:
    from rca.model.subject import SubjectError

    src = shown or incident.source
    try:
        p = incident.model_path(home=home)
    except IncidentError:
        raise
    except (ValueError, SubjectError) as e:
        raise IncidentError(src, "model", str(e)) from None
    try:  # a name over 255 bytes, a parent that is a file, a link loop: before any lookup
        input_path(p, what="model", kind="any", must_exist=False)
    except PathError as e:
        raise IncidentError(src, "model", f"{show(p)} {e.problem}") from None
    if incident.model.startswith("zoo:") and not (p / "config.json").is_file():
        from rca.zoo.corpus import REGIMEN_MODELS
        from rca.zoo.real import REAL_MODELS

        name = incident.model[4:]
        how = f"rca zoo fetch {name}" if name in REAL_MODELS else "rca zoo build"
        how += " --regimen" if name in REGIMEN_MODELS else ""
        raise IncidentError(
            src,
            "model",
            f"zoo model {name!r} is not {'fetched' if name in REAL_MODELS else 'built'} yet "
            f"(looked in {p}); run `{how}` first",
        )
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise IncidentError(src, "model", f"GGUF file {str(p)!r} not found")
        return
    if not p.is_dir():
        raise IncidentError(src, "model", f"model directory {str(p)!r} not found")
    if not (p / "config.json").is_file():
        raise IncidentError(src, "model", f"{str(p)!r} has no config.json")


def load_cases(
    directory: str | Path, *, check_model: bool = True, home: Path | None = None
) -> list[Incident]:
    """Every ``*.toml`` case in a directory, in name order; duplicate ids are an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IncidentError(str(directory), None, "not a directory of case files")
    out: list[Incident] = []
    seen: dict[str, str] = {}
    for p in sorted(directory.glob("*.toml")):
        inc = load_case(p, check_model=check_model, home=home)
        if inc.id in seen:
            raise IncidentError(
                str(p), "id", f"{short_repr(inc.id)} is also the id of {seen[inc.id]}"
            )
        seen[inc.id] = str(p)
        out.append(inc)
    return out
