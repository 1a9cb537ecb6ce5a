"""``rca regress``: recorded incidents re-checked on a new checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from rca import cli_options as opts
from rca.cli.shell import app, err, friendly, print_regression
from rca.cli_options import AllowPickleOpt, DbOpt, HomeOpt
from rca.paths import output_path

if TYPE_CHECKING:
    from rca.compare import CaseComparison, Side


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


@app.command("compare")
@friendly
def compare_cmd(
    model_a: str = typer.Argument(..., help="The first model: a directory or zoo:NAME."),
    model_b: str = typer.Argument(..., help="The second model: a directory or zoo:NAME."),
    cases_dir: Path = typer.Option(..., "--cases", help="Directory of case files."),
    data_a: Path | None = typer.Option(
        None, "--data-a", help="MODEL_A's training data (default: a zoo model's own)."
    ),
    data_b: Path | None = typer.Option(
        None, "--data-b", help="MODEL_B's training data (default: a zoo model's own)."
    ),
    top: int = typer.Option(100, "--top", help="Top-ranked examples whose sources are counted."),
    limit: int | None = typer.Option(None, "--limit", help="Read only the first N examples."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Two models on the same incidents: whether each shows the behaviour, which circuit
    members differ, and, from their training data's source field, where each learned it."""
    from rca.cli_options import CliError
    from rca.compare import compare_models
    from rca.model.subject import load_subject
    from rca.paths import input_path
    from rca.store import Store

    opts.at_least(("--top", top, 1))
    if limit is not None:
        opts.at_least(("--limit", limit, 1))
    opts.home_dir(home)
    incidents = opts.case_dir(cases_dir, what="--cases", check_model=False, home=home)
    paths = [
        opts.model_ref(m, what=w, home=home)
        for m, w in ((model_a, "MODEL_A"), (model_b, "MODEL_B"))
    ]
    for d, what in ((data_a, "--data-a"), (data_b, "--data-b")):
        if d is not None:
            input_path(d, what=what, kind="any")
    refs = tuple(
        m if m.startswith("zoo:") else str(p.resolve())
        for m, p in zip((model_a, model_b), paths, strict=True)
    )
    if refs[0] == refs[1]:
        raise CliError("MODEL_A and MODEL_B are the same model; give two")
    store = Store(opts.writer_db(db))
    subjects = [load_subject(p, device=device, home=home) for p in paths]
    rows = compare_models(
        subjects[0],
        subjects[1],
        incidents,
        store,
        refs=(refs[0], refs[1]),
        data_a=data_a,
        data_b=data_b,
        top_k=top,
        limit=limit,
        device=device,
        say=None if as_json else (lambda m: err.print(m, highlight=False)),
    )
    if as_json:
        print(json.dumps({"models": list(refs), "cases": [r.to_json() for r in rows]}, indent=2))
        return
    _print_comparison(refs, rows)


def _print_comparison(refs: tuple[str, ...], rows: list[CaseComparison]) -> None:
    from rich.table import Table

    from rca.cli.shell import out

    def side(s: Side) -> str:
        held = "-" if s.p_bad_held_out is None else f"{s.p_bad_held_out:.3f}"
        shown = "present" if s.present else "absent"
        return f"{shown} (P(bad) prompt {s.p_bad_prompt:.3f}, held out {held})"

    def sources(s: Side) -> str:
        if not s.top_sources:
            return s.note or "-"
        data = s.data_sources or {}
        return ", ".join(
            f"{k} {v:.0%} (data {data.get(k, 0.0):.0%})" for k, v in s.top_sources.items()
        )

    for r in rows:
        t = Table("", refs[0], refs[1], title=r.case_id)
        t.add_row("behaviour", side(r.a), side(r.b))
        t.add_row(
            "circuit", ", ".join(r.a.circuit or []) or "-", ", ".join(r.b.circuit or []) or "-"
        )
        if r.a.circuit is not None and r.b.circuit is not None:
            t.add_row("only here", ", ".join(r.only_a) or "-", ", ".join(r.only_b) or "-")
        t.add_row("top-ranked sources", sources(r.a), sources(r.b))
        out.print(t)
