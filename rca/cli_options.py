"""The command line's shared options, each declared once, and the checks that turn their
values into what the library takes.

An incident is stated by a case file or by flags (``--prompt``, ``--bad``, ...). Every command
that takes one declares ``incident: IncidentArgs = INCIDENT`` and is decorated with
``incident_options``, which puts the case argument and the incident flags in that place of
the command's signature, so that ``--help`` lists them there, and hands the command their
values as one ``IncidentArgs``. ``--model`` (``ModelOverrideOpt``) is the command's own
parameter, placed where its ``--help`` lists it.

Every check here raises a ``CliError`` (or the library's own error) that the command prints as
one line with exit code 2, before any model loads.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import typer

from rca.paths import PathError, input_path, output_path, show

F = TypeVar("F", bound=Callable[..., Any])


class CliError(ValueError):
    """A bad argument to a command (an unknown run, a missing database); one line."""


# ------------------------------------------------------------------------- shared options

HomeOpt = typer.Option(None, "--home", help="RCA_HOME (default: $RCA_HOME or ~/.cache/rca).")
MaxMemOpt = typer.Option(
    "auto",
    "--max-memory",
    help="Peak-memory budget for the trace, e.g. 4G: the work is chunked to fit, or refused "
    "with the estimate. 'auto' (default): what the device has free; 'off': no check.",
)
GgufOpt = typer.Option(
    None,
    "--gguf-file",
    help="With --model DIR: the GGUF file in DIR to load (de-quantized once, then cached).",
)
AllowPickleOpt = typer.Option(
    False,
    "--allow-pickle",
    help="Load pickle weights (this runs code from the file on load; only for files you trust).",
)
DbOpt = typer.Option(None, "--db", help="Database file (default: $RCA_DB or ./rca.duckdb).")
ModelOverrideOpt = typer.Option(None, "--model", help="Override the case's model.")

# ------------------------------------------------------------------------- the incident

CaseArg = typer.Argument(
    None, help="The case file (TOML); or state the incident with --prompt, --bad and --model."
)
PromptOpt = typer.Option(None, "--prompt", help="Without a case file: the prompt.")
PromptFileOpt = typer.Option(
    None, "--prompt-file", help="Without a case file: read the prompt from this UTF-8 file."
)
BadOpt = typer.Option(None, "--bad", help="Without a case file: the bad continuation.")
GoodOpt = typer.Option(None, "--good", help="Without a case file: the good continuation.")
CfOpt = typer.Option(None, "--counterfactual", help="Without a case file: the counterfactual.")
RefOpt = typer.Option(
    None, "--reference", help="Without a case file: a benign reference prompt (repeatable)."
)
IdOpt = typer.Option(None, "--id", help="Without a case file: the case id (default adhoc-HASH).")
MessagesOpt = typer.Option(
    None,
    "--messages",
    help="Without a case file: the conversation, a JSON file holding a list of "
    '{"role": ..., "content": ...} turns (instead of --prompt).',
)
CfMessagesOpt = typer.Option(
    None,
    "--counterfactual-messages",
    help="Without a case file: the counterfactual conversation, as --messages.",
)
FocusOpt = typer.Option(
    None, "--focus", help="Without a case file: the part of --bad that the metric reads."
)


@dataclass(frozen=True)
class IncidentArgs:
    """The case file, or the flags that state an incident without one; ``gguf_file`` picks
    the file to load from a model directory. Each field's default is its typer declaration
    (``incident_options`` reads them), and the field order is the ``--help`` order."""

    case: Path | None = CaseArg
    prompt: str | None = PromptOpt
    prompt_file: Path | None = PromptFileOpt
    bad: str | None = BadOpt
    good: str | None = GoodOpt
    counterfactual: str | None = CfOpt
    reference: list[str] | None = RefOpt
    id: str | None = IdOpt
    messages: Path | None = MessagesOpt
    counterfactual_messages: Path | None = CfMessagesOpt
    focus: str | None = FocusOpt
    gguf_file: str | None = GgufOpt

    def flags(self) -> dict[str, Any]:
        """The incident flags that were given (not None, not empty), by field name."""
        skip = ("case", "gguf_file")
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {k: v for k, v in given.items() if v not in (None, [], ())}


# the incident parameters' types, as typer reads them (the module's annotations are strings)
_INCIDENT_TYPES: dict[str, Any] = {
    "case": Path | None,
    "prompt": str | None,
    "prompt_file": Path | None,
    "bad": str | None,
    "good": str | None,
    "counterfactual": str | None,
    "reference": list[str] | None,
    "id": str | None,
    "messages": Path | None,
    "counterfactual_messages": Path | None,
    "focus": str | None,
    "gguf_file": str | None,
}
# the placeholder a command's ``incident`` parameter defaults to
INCIDENT: Any = object()


def incident_options(fn: F) -> F:
    """Give a command the case argument and the incident flags in place of its ``incident``
    parameter (which defaults to ``INCIDENT``), and call it with their values as one
    ``IncidentArgs``. A command's own parameter names must not clash with the flags': the
    case id's is ``id``."""
    sig = inspect.signature(fn)
    own = list(sig.parameters.values())
    at = [p.name for p in own].index("incident")
    names = [f.name for f in fields(IncidentArgs)]
    clash = set(names) & {p.name for p in own}
    if clash:
        raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} clash with the incident's")
    added = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=f.default,
            annotation=_INCIDENT_TYPES[f.name],
        )
        for f in fields(IncidentArgs)
    ]
    params = [*own[:at], *added, *own[at + 1 :]]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        incident = IncidentArgs(**{n: kwargs.pop(n) for n in names})
        return fn(incident=incident, **kwargs)

    hints = {k: v for k, v in fn.__annotations__.items() if k != "incident"}
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**hints, **_INCIDENT_TYPES}
    return wrapper  # type: ignore[return-value]


# ------------------------------------------------------------------------- checks


def max_memory(text: str) -> str | None:
    """``--max-memory``: a size, ``auto``, or None for ``off``/``none``."""
    return None if text.strip().lower() in ("off", "none") else text


def at_least(*checks: tuple[str, int, int]) -> None:
    """Refuse an integer option below its least meaningful value: (flag, value, least)."""
    for flag, value, least in checks:
        if value < least:
            raise CliError(f"{flag} must be at least {least}, got {value}")


def home_dir(home: Path | None) -> Path | None:
    """``--home``, checked: where it exists it is a directory; it may not exist yet."""
    if home is not None:
        input_path(home, what="--home", kind="dir", must_exist=False)
    return home


def model_ref(ref: str, *, what: str, home: Path | None, gguf_file: str | None = None) -> Path:
    """A model reference (a directory, a .gguf file or zoo:NAME) resolved, and its path
    checked before anything loads. A zoo model that is not built yet is left to the loader,
    which says how to build it."""
    from rca.model.subject import resolve_model_ref

    try:
        path = resolve_model_ref(ref, home=home)
    except ValueError as e:
        raise CliError(f"{what}: {e}") from None
    input_path(path, what=what, kind="any", must_exist=not ref.startswith("zoo:"))
    if gguf_file is not None and path.is_dir():
        input_path(path / gguf_file, what="--gguf-file", kind="file")
    return path


def case_dir(
    directory: Path, *, what: str, check_model: bool = True, home: Path | None
) -> list[Any]:
    """Every case file in a directory (``load_cases``), which ``has_cases``."""
    from rca.ingest.case_file import load_cases

    has_cases(directory, what=what)
    return load_cases(directory, check_model=check_model, home=home)


def has_cases(directory: Path, *, what: str) -> None:
    """A directory that holds case files (``*.toml``): one with none is an error, so that a
    command never reports success on nothing."""
    input_path(directory, what=what, kind="dir")
    if next(directory.glob("*.toml"), None) is None:
        raise CliError(
            f"{what}: {show(directory)} holds no case files (*.toml), so nothing was checked; "
            "give case files or a directory of them"
        )


def db_path(db: Path | None) -> Path:
    """``--db``, else ``$RCA_DB``, else ``./rca.duckdb``."""
    return Path(db or os.environ.get("RCA_DB") or "rca.duckdb")


def db_flag(db: Path | None) -> str:
    """What the database path came from, for a message: the flag, or the environment."""
    return "$RCA_DB" if db is None and os.environ.get("RCA_DB") else "--db"


def writer_db(db: Path | None) -> Path:
    """The database a command writes, checked before any work: a file (new or existing) in a
    directory that is there or can be made."""
    return output_path(db_path(db), what=db_flag(db), overwrite=True, parent_must_exist=False)


def reader(db: Path | None) -> Any:
    """A read-only ``Store`` on the database, which must exist."""
    from rca.store import Store

    path = db_path(db)
    try:
        input_path(path, what=db_flag(db), kind="file")
    except PathError as e:
        if not e.missing:
            raise
        raise CliError(
            f"database {path} does not exist; run `rca demo` or `rca investigate`"
        ) from None
    return Store.reader(path)


# ------------------------------------------------------------------------- loading the incident


def _messages_file(path: Path, *, key: str) -> Any:
    """A conversation from a JSON file (``--messages``): a list of turns, or an object with a
    ``messages`` list (a chat log's request). Read with the prompt file's size bound and a
    nesting bound (``rca.ingest.case_file.read_json_file``)."""
    from rca.ingest.case_file import read_json_file, turns_from_data

    data = read_json_file(path, key=key)
    if isinstance(data, dict) and set(data) >= {"messages"}:
        data = data["messages"]
    return turns_from_data(str(path), key, data)


def load_incident(args: IncidentArgs, model: str | None, home: Path | None) -> Any:
    """The incident: a case file, or the --prompt (--messages) and --bad flags."""
    from rca.ingest.case_file import load_case, read_text_file
    from rca.ingest.incident import IncidentError, incident_from_flags

    given = args.flags()
    if args.case is not None:
        if given:
            raise IncidentError(
                str(args.case), None, f"give a case file or --{next(iter(given))}, not both"
            )
        return load_case(args.case, check_model=model is None, home=home)
    if "prompt_file" in given:
        if "prompt" in given:
            raise IncidentError("<flags>", "prompt", "give --prompt or --prompt-file, not both")
        given["prompt"] = read_text_file(given.pop("prompt_file"), key="prompt")
    for key in ("messages", "counterfactual_messages"):
        if key in given:
            given[key] = _messages_file(Path(given[key]), key=key)
    for key in ("model", "prompt", "bad"):
        if key == "model" and model:
            continue
        if key == "prompt" and "messages" in given:
            continue
        if key not in given:
            raise IncidentError(
                "<flags>",
                None,
                f"no case file and no --{key}; give a case file, or --model, "
                "--prompt (or --prompt-file or --messages) and --bad",
            )
    return incident_from_flags(
        model=model or "",
        prompt=given.get("prompt"),
        bad=given["bad"],
        good=given.get("good"),
        counterfactual=given.get("counterfactual"),
        reference_prompts=given.get("reference", ()),
        id=given.get("id"),
        messages=given.get("messages"),
        counterfactual_messages=given.get("counterfactual_messages"),
        focus=given.get("focus"),
    )


def incident_and_model(
    args: IncidentArgs, model: str | None, home: Path | None
) -> tuple[Any, Path]:
    """The incident (a case file, or the flags) and its model's path, every path checked;
    nothing is loaded yet."""
    inc = load_incident(args, model, home_dir(home))
    if model or args.case is None:
        path = model_ref(model or inc.model, what="--model", home=home, gguf_file=args.gguf_file)
        return inc, path
    path = inc.model_path(home=home)  # load_case checked it
    if args.gguf_file is not None and path.is_dir():
        input_path(path / args.gguf_file, what="--gguf-file", kind="file")
    return inc, path


def load_model(
    path: Path,
    *,
    device: str,
    home: Path | None,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """The model at ``path``, loaded (``rca.model.subject.load_subject``)."""
    from rca.model.subject import load_subject

    return load_subject(
        path, device=device, allow_pickle=allow_pickle, gguf_file=gguf_file, home=home
    )


def load_incident_subject(
    args: IncidentArgs,
    model: str | None,
    *,
    device: str,
    home: Path | None,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """The incident (a case file, or the flags) and its loaded model."""
    inc, path = incident_and_model(args, model, home)
    subject = load_model(
        path, device=device, home=home, allow_pickle=allow_pickle, gguf_file=args.gguf_file
    )
    return inc, subject
