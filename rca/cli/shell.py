"""What every command shares: the Typer apps, the consoles, ``friendly`` (a user's error
as one line on stderr and exit code 2), and the printing of circuits, runs and regression
rows that more than one command shows."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rca import __version__
from rca.cli_options import CliError
from rca.paths import PathError

app = typer.Typer(
    name="rca",
    help="Incident root-cause analysis for language models: trace, confirm, remedy, record.",
    no_args_is_help=True,
    add_completion=False,
)
zoo_app = typer.Typer(help="The demo models with planted incidents.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

# Nothing printed is markup unless a call asks for it (``markup=True``) and escapes what it
# interpolates: case titles, prompts, paths and training texts are the user's, and a "[/]" in
# one would otherwise be a rich MarkupError after the work is done.
out = Console(markup=False)
err = Console(stderr=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors() -> tuple[type[BaseException], ...]:
    from rca.confirm import ConfirmError
    from rca.ingest.incident import IncidentError
    from rca.model.hooks import HookError
    from rca.model.ids import IdError
    from rca.model.metric import MetricError
    from rca.model.subject import SubjectError
    from rca.monitor import MonitorError
    from rca.provenance import DataError, InfluenceError
    from rca.regress import RegressError
    from rca.remedy import RemedyError
    from rca.store import StoreError
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
        MonitorError,
        DataError,
        InfluenceError,
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


def warn_tokens(completeness: Any) -> None:
    """The token attributions' completeness warning (``rca.report.token_warning``) as one
    line on stderr, where they miss their tolerance."""
    from rca.report import token_warning

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
        except user_errors() as e:
            # a path or text from the user is not markup, and its line breaks stay on the line
            text = escape(str(e).translate(_LINE_BREAKS))
            err.print(f"[red]error:[/red] {text}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


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


bench_app = typer.Typer(help="Benchmarks with known answers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


cases_app = typer.Typer(help="Recorded cases (runs) in the store.", no_args_is_help=True)
notes_app = typer.Typer(help="Append-only notes on runs.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
app.add_typer(notes_app, name="notes")


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def print_circuit(circuit: dict[str, Any] | None) -> None:
    """The circuit in words (``rca.report.circuit_lines``), where the run has one."""
    if not circuit:
        return
    from rca.report import circuit_lines

    first, *roles = circuit_lines(circuit)
    out.print(f"  circuit: {first}", highlight=False)
    for line in roles:
        out.print(f"    {line}", highlight=False)


def print_regression(rows: list[dict[str, Any]]) -> None:
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


def print_run_summary(r: dict[str, Any]) -> None:
    out.print(
        f"[bold]{escape(str(r['case_id']))}[/bold] run {r['run_id']}: {r['verdict'].upper()}, "
        f"cause set {escape(', '.join(r['cause_set']))}",
        markup=True,
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
            pct(c.get("benign_loss_pct")),
            c["verdict"],
        )
    out.print(t)
    print_circuit(r.get("circuit"))
    for rem in r["remedies"]:
        out.print(
            ("[green]* [/green]" if rem["recommended"] else "  ") + escape(str(rem["note"])),
            markup=True,
            highlight=False,
        )


class ProgressLines:
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
def progress(show: bool):
    """Progress fed by the library's (stage, fraction) callback: a rich progress bar on a
    terminal, plain lines where stderr is a log (whether or not ``show``: a long run must not
    be silent in a log file), nothing on a terminal without ``show``."""
    if not err.is_terminal:
        yield ProgressLines()
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
