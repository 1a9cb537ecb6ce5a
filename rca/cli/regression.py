"""``rca regress``: recorded incidents re-checked on a new checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rca import cli_options as opts
from rca.cli.shell import app, err, friendly, print_regression
from rca.cli_options import AllowPickleOpt, DbOpt, HomeOpt
from rca.paths import output_path


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

    Every stored monitor of these cases is re-checked on the new checkpoint too.

    Exit code 0 when every incident is fixed, 1 when any persists or reappeared or a monitor
    went stale, 2 on errors.
    """
    from rca.investigate import InvestigateConfig
    from rca.regress import RegressConfig, RegressError, incidents_from_store, regress
    from rca.store import Store

    if (cases_dir is None) == (not from_db):
        raise RegressError("give exactly one of --cases DIR and --from-db")
    opts.at_least(("--workers", workers, 0))
    opts.home_dir(home)
    if report is not None:
        output_path(report, what="--report", overwrite=True, parent_must_exist=False)
    db_path = opts.writer_db(db)
    incidents = None if cases_dir is None else opts.case_dir(cases_dir, what="--cases", home=home)
    store = Store(db_path)
    if incidents is None:
        incidents = incidents_from_store(store)
    # the incidents first (a stored one that cannot be rebuilt is named), then the models
    opts.model_ref(model, what="--model", home=home)
    if baseline_model is not None:
        opts.model_ref(baseline_model, what="--baseline-model", home=home)
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
    monitors = _revalidate_monitors(
        store, model, {i.id for i in incidents}, device=device, home=home, quiet=as_json
    )
    if report is not None:
        from rca.report import render_regression_html, render_regression_markdown

        render = render_regression_html if report.suffix == ".html" else render_regression_markdown
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render(rows, model=fingerprint))
    failing = [r for r in results if r.persists] + [m for m in monitors if m.get("stale")]
    if as_json:
        doc = {"model": fingerprint, "ok": not failing, "incidents": rows, "monitors": monitors}
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_regression(rows)
        for m in monitors:
            err.print(
                f"monitor {m['monitor_id'][:8]} ({m.get('case_id')}): {m['status']}: "
                f"{m.get('reason')}",
                highlight=False,
            )
    raise typer.Exit(1 if failing else 0)


def _revalidate_monitors(
    store: object, model: str, case_ids: set[str], *, device: str, home: Path | None, quiet: bool
) -> list[dict]:
    """Every stored monitor of the regressed cases, re-checked on the new checkpoint (none:
    the model is not loaded again)."""
    from rca.model.subject import load_subject
    from rca.monitor.workflow import revalidate

    if not any(m["incident_id"] in case_ids for m in store.list_monitors()):  # type: ignore[attr-defined]
        return []
    subject = load_subject(
        opts.model_ref(model, what="--model", home=home), device=device, home=home
    )
    return revalidate(store, subject, case_ids=case_ids)
