"""``ingest``: case files from a production log (JSON Lines), grouped by a metadata field or by
the circuit a quick trace finds (``rca.ingest.log``, ``rca.ingest.circuits``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rca import cli_options as opts
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
        help="The metadata key whose value groups records into one case each. Without it, "
        "each record is traced on the model and records whose leading components match are "
        "grouped (rca.ingest.circuits).",
    ),
    out_dir: Path = typer.Option(
        Path("cases/ingested"), "--out", help="The directory the case files are written into."
    ),
    id_prefix: str = typer.Option("log-", "--id-prefix", help="What every case id starts with."),
    severity: str = typer.Option(
        "medium", "--severity", help="Every case's severity: low, medium, high or critical."
    ),
    force: bool = typer.Option(False, "--force", help="Replace case files that exist."),
    device: str = typer.Option(
        "auto", "--device", help="Without --group-by: where the records are traced."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of the written files and their case ids."
    ),
) -> None:
    """Turn a JSONL log of conversations into case files, one per group of records (a metadata
    field's value, or the mechanism a quick trace finds): the group's first record is the
    case's prompt, the others its variants. Every record is checked before the model is loaded
    or anything is written, and nothing is written half."""
    from rca.ingest.case_writer import write_cases
    from rca.ingest.log import LogError, case_model, check_options, read_log

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
    by_circuit = None
    if group_by is None:
        model_path = opts.model_ref(model, what="--model", home=None)

        def by_circuit(incidents: list[Any]) -> list[str]:
            """Every record traced on the model (after the log is checked), grouped."""
            from rca.ingest.circuits import circuit_groups
            from rca.model.subject import load_subject

            subject = load_subject(model_path, device=device)
            return circuit_groups(subject, incidents).labels

    incidents = read_log(
        log,
        model=case_model(model, out_dir),
        group_by=group_by,
        id_prefix=id_prefix,
        severity=severity,
        by_circuit=by_circuit,
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
