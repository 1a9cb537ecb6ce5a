"""Commands on the store's records: ``cases list|show``, ``report``, ``notes add``,
``verify`` (the audit chain) and ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rca import cli_options as opts
from rca.cli.shell import app, cases_app, err, friendly, notes_app, out
from rca.cli_options import CliError, DbOpt
from rca.paths import output_path


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


@cases_app.command("list")
@friendly
def cases_list(db: Path | None = DbOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every recorded run, newest first."""
    runs = opts.reader(db).list_runs()
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
    from rca.report import render_terminal

    reader = opts.reader(db)
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
    """Write a run's report as Markdown or self-contained HTML."""
    from rca.report import render_html, render_markdown

    if fmt not in ("md", "html"):
        raise CliError("--format must be md or html")
    output_path(output, what="-o", overwrite=True)
    reader = opts.reader(db)
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
    from rca.ingest.incident import text_problem
    from rca.store import Store

    for flag, value in (("--author", author), ("--text", text)):
        if not value.strip():
            raise CliError(f"{flag} must not be empty or only whitespace")
        problem = text_problem(value)
        if problem:
            raise CliError(f"{flag} {problem}")
    if "\n" in author or "\t" in author:
        raise CliError("--author must be one line: a name, without tabs or line breaks")
    run_id = _resolve_run(opts.reader(db), ref)
    note_id = Store(opts.db_path(db)).add_note(run_id=run_id, author=author, text=text)
    out.print(f"note {note_id} added to run {run_id}")


@app.command("verify")
@friendly
def verify_cmd(db: Path | None = DbOpt) -> None:
    """Recompute the audit chain; exit 1 naming the first broken link."""
    res = opts.reader(db).verify()
    if res.ok:
        out.print(f"ok: {res.message}" if hasattr(res, "message") else "ok")
        return
    err.print(f"[red]audit chain broken:[/red] {escape(str(res))}", markup=True, highlight=False)
    raise typer.Exit(1)


@app.command("export")
@friendly
def export_cmd(directory: Path = typer.Argument(...), db: Path | None = DbOpt) -> None:
    """Write every table as Parquet into DIRECTORY."""
    output_path(directory, what="DIRECTORY", kind="dir", overwrite=True, parent_must_exist=False)
    for p in opts.reader(db).export(directory):
        print(p)  # one path per line, never wrapped (scripts read it)
