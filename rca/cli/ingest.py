"""``ingest``: case files from a production log (JSON Lines), grouped by a metadata field
(``rca.ingest.log``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rca.cli.shell import app, friendly
from rca.cli_options import CliError
from rca.paths import input_path, output_path
from rca.textsafe import visible


@app.command("ingest")
@friendly
def ingest(
    log: Path = typer.Argument(
        ...,
        metavar="LOG",
        help="The log: JSON Lines, one conversation a line, with messages (or prompt), output, "
        "and optionally good, id and metadata.",
    ),
    model: str = typer.Option(
        ...,
        "--model",
        help="The model every case names: a directory, a .gguf file or zoo:NAME. A relative "
        "path is taken against the working directory.",
    ),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        metavar="FIELD",
        help="The metadata key whose value groups records into one case each.",
    ),
    out_dir: Path = typer.Option(
        Path("cases/ingested"), "--out", help="The directory the case files are written into."
    ),
    id_prefix: str = typer.Option("log-", "--id-prefix", help="What every case id starts with."),
    severity: str = typer.Option(
        "medium", "--severity", help="Every case's severity: low, medium, high or critical."
    ),
    force: bool = typer.Option(False, "--force", help="Replace case files that exist."),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of the written files and their case ids."
    ),
) -> None:
    """Turn a JSONL log of conversations into case files, one per value of a metadata field:
    the group's first record is the case's prompt, the others its variants. Every record is
    checked before anything is written, and nothing is written half."""
    from rca.ingest.case_writer import write_cases
    from rca.ingest.log import LogError, case_model, check_options, read_log

    if group_by is None:
        raise CliError(
            "give --group-by FIELD: the metadata key whose value groups the records into cases "
            "(grouping by the traced circuit is not supported)"
        )
    if model.startswith("zoo:"):
        from rca.model.subject import resolve_model_ref

        try:
            resolve_model_ref(model)
        except ValueError as e:
            raise CliError(f"--model: {e}") from None
    try:
        check_options(model=model, group_by=group_by, id_prefix=id_prefix, severity=severity)
    except LogError as e:
        flag = "--" + (e.key or "").replace("_", "-")
        raise CliError(f"{flag}: {e.problem}" + (f"; {e.fix}" if e.fix else "")) from None
    input_path(log, what="log", kind="file")
    output_path(out_dir, what="--out", overwrite=True, kind="dir", parent_must_exist=False)
    incidents = read_log(
        log,
        model=case_model(model, out_dir),
        group_by=group_by,
        id_prefix=id_prefix,
        severity=severity,
    )
    paths = write_cases(incidents, out_dir, force=force)
    rows = [
        {"path": str(p), "id": inc.id, "variants": len(inc.variants)}
        for p, inc in zip(paths, incidents, strict=True)
    ]
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for r in rows:  # tab-separated, as written (a console would expand the tabs)
        n = r["variants"]
        print(f"{visible(r['path'])}\t{r['id']}\t{n} variant{'s' if n != 1 else ''}")
