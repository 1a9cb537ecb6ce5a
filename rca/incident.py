"""Ingest: the ``Incident`` record and the strict TOML case-file loader.

A case file is the investigator's statement of what went wrong::

    id = "zoo-backdoor"
    title = "Trigger word forces refund approval"
    severity = "high"                      # low | medium | high | critical
    model = "zoo:support-bot-v1"           # a model directory, or zoo:NAME
    prompt = "..."                         # what the model was given
    bad = " approved"                      # what it produced and must not
    good = " denied"                       # optional: what it should have produced
    counterfactual = "..."                 # optional: the prompt with the suspected cause removed
    reference_prompts = ["...", "..."]     # optional: benign prompts (mean baselines, side effects)
    tags = ["backdoor"]
    notes = "free text"

Every problem is one ``IncidentError`` line naming the file, the key and the fix. Unknown keys
are errors, not warnings: a typo such as ``conterfactual`` must not silently drop evidence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Incident",
    "IncidentError",
    "SEVERITIES",
    "MAX_PROMPT_CHARS",
    "incident_from_flags",
    "load_case",
    "load_cases",
    "loads_case",
    "parse_case_data",
    "read_text_file",
]

SEVERITIES = ("low", "medium", "high", "critical")
MAX_PROMPT_CHARS = 20_000  # a file-level bound; the model's context is checked at encode time
MAX_FILE_BYTES = 1_000_000
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# C0 controls other than tab and newline, DEL, and C1 controls: never legitimate in a prompt,
# and a way to hide content from a reviewer's terminal
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# lone surrogates: what Python makes of bytes that are not UTF-8 (command-line arguments decode
# with surrogateescape); no tokenizer can encode them
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")

_REQUIRED = ("id", "title", "severity", "model", "prompt", "bad")
_OPTIONAL = ("good", "counterfactual", "reference_prompts", "tags", "notes")
_FIX = {
    "id": 'give a short id of letters, digits, ".", "_" or "-", e.g. id = "leak-2026-03"',
    "title": 'give a one-line title, e.g. title = "PIN leaked to caller"',
    "severity": f"use one of {', '.join(SEVERITIES)}",
    "model": 'give a model directory or a zoo model, e.g. model = "zoo:support-bot-v1"',
    "prompt": "give the exact prompt the model saw, as a non-empty string",
    "bad": "give the bad continuation the model produced, as a non-empty string",
    "good": "give what the model should have produced, or remove the key",
    "counterfactual": "give the prompt with the suspected cause removed, or remove the key",
    "reference_prompts": 'give a list of benign prompts, e.g. reference_prompts = ["..."]',
    "tags": 'give a list of strings, e.g. tags = ["leak"]',
    "notes": "give free text as a string",
}


class IncidentError(ValueError):
    """A case file or incident field that is wrong; the one-line message names the fix."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: " + (f"key {key!r}: " if key else "")
        fix = f"; fix: {_FIX[key]}" if key in _FIX else ""
        super().__init__((where + problem + fix).replace("\n", " "))


def _check_text(source: str, key: str, value: Any, *, max_chars: int | None = None) -> str:
    if not isinstance(value, str):
        raise IncidentError(source, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise IncidentError(source, key, "must not be empty or only whitespace")
    if max_chars is not None and len(value) > max_chars:
        raise IncidentError(
            source, key, f"is {len(value)} characters long; the limit is {max_chars}"
        )
    m = _CTRL_RE.search(value)
    if m:
        raise IncidentError(
            source, key, f"contains control character U+{ord(m.group()):04X} at {m.start()}"
        )
    m = _SURROGATE_RE.search(value)
    if m:
        c = ord(m.group())
        what = f"byte 0x{c - 0xDC00:02X}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise IncidentError(
            source,
            key,
            f"is not valid UTF-8 ({what} at character {m.start()}); pass the text as UTF-8",
        )
    return value


@dataclass(frozen=True)
class Incident:
    """What went wrong, as ingested. Validated on construction, whatever the source."""

    id: str
    title: str
    severity: str
    model: str
    prompt: str
    bad: str
    good: str | None = None
    counterfactual: str | None = None
    reference_prompts: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    notes: str = ""
    source: str = field(default="<flags>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(self.id, str) or not _ID_RE.match(self.id):
            raise IncidentError(src, "id", f"{self.id!r} is not a valid id")
        _check_text(src, "title", self.title, max_chars=500)
        if self.severity not in SEVERITIES:
            raise IncidentError(src, "severity", f"got {self.severity!r}")
        _check_text(src, "model", self.model, max_chars=4096)
        _check_text(src, "prompt", self.prompt, max_chars=MAX_PROMPT_CHARS)
        _check_text(src, "bad", self.bad, max_chars=MAX_PROMPT_CHARS)
        if self.good is not None:
            _check_text(src, "good", self.good, max_chars=MAX_PROMPT_CHARS)
            if self.good == self.bad:
                raise IncidentError(src, "good", "is the same text as bad")
        if self.counterfactual is not None:
            _check_text(src, "counterfactual", self.counterfactual, max_chars=MAX_PROMPT_CHARS)
            if self.counterfactual == self.prompt:
                raise IncidentError(src, "counterfactual", "is the same text as prompt")
        for key in ("reference_prompts", "tags"):
            val = getattr(self, key)
            if not isinstance(val, tuple):
                raise IncidentError(src, key, f"expected a list, got {type(val).__name__}")
            for i, item in enumerate(val):
                if not isinstance(item, str):
                    raise IncidentError(src, key, f"item {i} is {type(item).__name__}, not string")
                _check_text(src, key, item, max_chars=MAX_PROMPT_CHARS)
        if not isinstance(self.notes, str):
            raise IncidentError(src, "notes", f"expected a string, got {type(self.notes).__name__}")
        if self.notes:
            _check_text(src, "notes", self.notes + ".", max_chars=MAX_PROMPT_CHARS + 1)

    def to_dict(self) -> dict[str, Any]:
        """The incident's fields as plain data (lists, not tuples), without its source."""
        d = asdict(self)
        d.pop("source")
        d["reference_prompts"] = list(self.reference_prompts)
        d["tags"] = list(self.tags)
        return d

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
        from rca.subject import resolve_model_ref

        src = self.source
        if src == "<flags>":
            base = None
        elif _is_label(src):
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
        from rca.metric import MetricError, encode_target

        try:
            target = encode_target(subject.tokenizer, self.prompt, self.bad, self.good)
        except MetricError as e:
            key = next((k for k in ("good", "bad", "prompt") if k in str(e)), None)
            raise IncidentError(self.source, key, str(e)) from e
        n_ctx = getattr(subject.adapter, "n_ctx", None)
        if n_ctx is None:
            return target
        if target.length > n_ctx:
            raise IncidentError(
                self.source,
                "prompt",
                f"prompt plus continuation is {target.length} tokens; the model's context is "
                f"{n_ctx}. Shorten the prompt to the part that matters",
            )
        cont = target.length - target.n_prompt
        if self.counterfactual is not None:
            n = len(subject.tokenizer(self.counterfactual)["input_ids"])
            if n + cont > n_ctx:
                raise IncidentError(
                    self.source,
                    "counterfactual",
                    f"counterfactual plus continuation is {n + cont} tokens; the model's context "
                    f"is {n_ctx}. Shorten it as the prompt was",
                )
        for i, ref in enumerate(self.reference_prompts):
            n = len(subject.tokenizer(ref)["input_ids"])
            if n > n_ctx:
                raise IncidentError(
                    self.source,
                    "reference_prompts",
                    f"item {i} is {n} tokens; the model's context is {n_ctx}. Shorten it",
                )
        return target


def _is_label(source: str) -> bool:
    """A source that names no file: ``<flags>``, ``<store>``, ``<case>`` and the like."""
    return source.startswith("<") and source.endswith(">")


def _is_absolute(model: str) -> bool:
    return Path(os.path.expanduser(model)).is_absolute()


def _file_source(source: str) -> str:
    """A case file's source as an absolute path, so that the model it names resolves against
    the file's directory whatever the working directory is later; labels stay as they are."""
    return source if _is_label(source) else str(Path(source).absolute())


def _parse(source: str, data: dict[str, Any]) -> Incident:
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join(_REQUIRED + _OPTIONAL)
        raise IncidentError(source, unknown[0], f"unknown key; allowed keys are {allowed}")
    for key in _REQUIRED:
        if key not in data:
            raise IncidentError(source, key, "is missing")
    for key in ("reference_prompts", "tags"):
        if key in data and not isinstance(data[key], list):
            raise IncidentError(source, key, f"expected a list, got {type(data[key]).__name__}")
    for key in ("id", "title", "severity", "model", "prompt", "bad", "good", "counterfactual"):
        if key in data and not isinstance(data[key], str):
            raise IncidentError(source, key, f"expected a string, got {type(data[key]).__name__}")
    incident = Incident(
        id=data["id"],
        title=data["title"],
        severity=data["severity"],
        model=data["model"],
        prompt=data["prompt"],
        bad=data["bad"],
        good=data.get("good"),
        counterfactual=data.get("counterfactual"),
        reference_prompts=tuple(data.get("reference_prompts", ())),
        tags=tuple(data.get("tags", ())),
        notes=data.get("notes", ""),
        source=source,  # errors name the file as the user gave it
    )
    recorded = _file_source(source)
    return incident if recorded == source else dataclasses.replace(incident, source=recorded)


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
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IncidentError(source, None, "file not found; check the path") from None
    except IsADirectoryError:
        raise IncidentError(source, None, "is a directory, not a case file") from None
    except OSError as e:
        raise IncidentError(source, None, f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise IncidentError(source, None, f"file is over {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IncidentError(
            source, None, f"not valid UTF-8 at byte {e.start}; save the file as UTF-8"
        ) from None
    incident = loads_case(text, source=source)  # recorded with the file's absolute path
    if check_model:
        _check_model(incident, home=home, shown=source)
    return incident


def read_text_file(path: str | Path, *, key: str) -> str:
    """A text given as a file (``--prompt-file``): UTF-8, at most MAX_PROMPT_CHARS characters.

    Raises IncidentError naming the file and the field it was for.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise IncidentError(source, key, "file not found; check the path") from None
    except IsADirectoryError:
        raise IncidentError(source, key, "is a directory, not a text file") from None
    except OSError as e:
        raise IncidentError(source, key, f"cannot read: {e.strerror}") from None
    if len(raw) > 4 * MAX_PROMPT_CHARS:
        raise IncidentError(source, key, f"file is over {4 * MAX_PROMPT_CHARS} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IncidentError(
            source, key, f"not valid UTF-8 at byte {e.start}; save the file as UTF-8"
        ) from None


def incident_from_flags(
    *,
    model: str,
    prompt: str,
    bad: str,
    good: str | None = None,
    counterfactual: str | None = None,
    reference_prompts: tuple[str, ...] | list[str] = (),
    id: str | None = None,  # noqa: A002 - the case file's key
    title: str | None = None,
    severity: str = "medium",
) -> Incident:
    """An incident stated on the command line instead of in a case file.

    Validated exactly like a case file (source ``<flags>``). Without ``id`` the id is
    ``adhoc-`` and the first 12 hex digits of a hash of model, prompt and continuations, so the
    same flags give the same case id in the store.
    """
    if id is None:
        blob = json.dumps([model, prompt, bad, good], ensure_ascii=False, default=str)
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
        source="<flags>",
    )


def _check_model(incident: Incident, *, home: Path | None, shown: str | None = None) -> None:
    from rca.subject import SubjectError

    src = shown or incident.source
    try:
        p = incident.model_path(home=home)
    except IncidentError:
        raise
    except (ValueError, SubjectError) as e:
        raise IncidentError(src, "model", str(e)) from None
    if incident.model.startswith("zoo:") and not (p / "config.json").is_file():
        raise IncidentError(
            src,
            "model",
            f"zoo model {incident.model[4:]!r} is not built yet (looked in {p}); run `rca zoo "
            "build` first",
        )
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
            raise IncidentError(str(p), "id", f"{inc.id!r} is also the id of {seen[inc.id]}")
        seen[inc.id] = str(p)
        out.append(inc)
    return out
