"""``rca monitor build|eval|run|list|show``: confirmed runs compiled into run-time detectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rca import cli_options as opts
from rca.cli.shell import app, err, friendly, out
from rca.cli_options import DbOpt, HomeOpt
from rca.paths import input_path, output_path

monitor_app = typer.Typer(
    help="Monitors: a confirmed run compiled into a detector on its circuit's activations.",
    no_args_is_help=True,
)
app.add_typer(monitor_app, name="monitor")

DeviceOpt = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N.")
MonitorModelOpt = typer.Option(
    None, "--model", help="The run's model, where the case's model reference no longer finds it."
)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _rate(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _figure_row(name: str, f: dict[str, Any]) -> list[str]:
    return [
        name,
        _num(f.get("precision")),
        _num(f.get("recall")),
        _rate(f.get("fpr")),
        _num(f.get("auroc")),
        _rate(f.get("fpr_at_tpr95")),
        f"{f.get('n_positive', 0)}/{f.get('n_negative', 0)}",
    ]


def _print_figures(rows: list[list[str]], title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("detector", "precision", "recall", "FPR", "AUROC", "FPR@TPR95", "pos/neg"):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    out.print(t)


@monitor_app.command("build")
@friendly
def monitor_build(
    ref: str = typer.Argument(..., help="Run id (or prefix) or case id (its latest run)."),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Artifact directory (default monitors/CASE-ID8)."
    ),
    fpr: float = typer.Option(
        0.01, "--fpr", help="False-positive rate the threshold is set for, on fit negatives."
    ),
    benign: int = typer.Option(1000, "--benign", help="Benign prompts per half (fit, held-out)."),
    benign_tokens: int = typer.Option(
        24, "--benign-tokens", help="Read each benign prompt through this many generated tokens."
    ),
    seed: int = typer.Option(0, "--seed", help="Draws and splits the benign prompts."),
    model: str | None = MonitorModelOpt,
    device: str = DeviceOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compile a confirmed run into a monitor: a logistic probe on its circuit members'
    activations, fit on the fit variants against benign prompts and the counterfactuals."""
    from rca.cli.records import _resolve_run
    from rca.monitor import MonitorConfig
    from rca.monitor.workflow import build_and_record
    from rca.store import Store

    cfg = MonitorConfig(target_fpr=fpr, benign=benign, benign_tokens=benign_tokens, seed=seed)
    cfg.check()
    opts.home_dir(home)
    if out_dir is not None:
        output_path(out_dir, what="--out", kind="dir", overwrite=True, parent_must_exist=False)
    run_id = _resolve_run(opts.reader(db), ref)
    if model is not None:
        opts.model_ref(model, what="--model", home=home)
    store = Store(opts.writer_db(db))
    monitor, path = build_and_record(
        store, run_id, out=out_dir, cfg=cfg, device=device, home=home, model=model
    )
    if as_json:
        print(json.dumps(monitor.describe() | {"artifact": str(path)}, indent=2, default=str))
        return
    sites = ", ".join(f"{s.id} ({s.role}, {s.rule})" for s in monitor.sites)
    out.print(f"monitor {monitor.monitor_id} for {monitor.case_id}: {sites}")
    _print_figures([_figure_row("monitor", monitor.fit)], "on the fit prompts")
    if caution := monitor.caution():
        out.print(f"caution: {caution}")
    out.print(f"artifact {path}; judge it with `rca monitor eval {monitor.monitor_id[:8]}`")


@monitor_app.command("eval")
@friendly
def monitor_eval(
    ref: str = typer.Argument(..., help="Monitor id (or prefix), case id, or artifact directory."),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="Also score the two baselines."
    ),
    model: str | None = MonitorModelOpt,
    device: str = DeviceOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Judge a monitor on its held-out prompts, beside the output check and a prompt-text
    classifier on the same split; the figures are recorded."""
    from rca.monitor.workflow import artifact_for, evaluate_and_record
    from rca.store import Store

    opts.home_dir(home)
    monitor = artifact_for(opts.reader(db), ref)
    if model is not None:
        opts.model_ref(model, what="--model", home=home)
    store = Store(opts.writer_db(db))
    result = evaluate_and_record(
        store, monitor, device=device, home=home, model=model, baselines=baselines
    )
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    rows = [_figure_row("monitor", result["monitor"])]
    for name, f in (result.get("baselines") or {}).items():
        rows.append(_figure_row(name.replace("_", " "), f))
    _print_figures(rows, f"monitor {monitor.monitor_id[:8]} on held-out prompts")


@monitor_app.command("run")
@friendly
def monitor_run(
    monitor_ref: str = typer.Option(
        ..., "--monitor", help="Monitor id (or prefix), case id, or artifact directory."
    ),
    model: str = typer.Option(..., "--model", help="The model: a directory or zoo:NAME."),
    prompts: Path = typer.Option(
        ..., "--prompts", help='JSONL: one {"prompt": ...} or {"messages": [...]} per line.'
    ),
    max_new_tokens: int = typer.Option(
        0, "--max-new-tokens", help="Also generate this many tokens (greedy), each one scored."
    ),
    keep_text: bool = typer.Option(
        False, "--store-text", help="Record each alert's prompt text (default: its hash only)."
    ),
    device: str = DeviceOpt,
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run a batch of prompts through a monitor and record the ones it flags as alerts."""
    from rca.model.files import fingerprint
    from rca.monitor.workflow import artifact_for, read_prompts, run_prompts
    from rca.store import Store

    opts.home_dir(home)
    opts.at_least(("--max-new-tokens", max_new_tokens, 0))
    if max_new_tokens > 4096:
        raise opts.CliError(f"--max-new-tokens must be at most 4096, got {max_new_tokens}")
    input_path(prompts, what="--prompts", kind="file")
    lines = read_prompts(prompts)
    monitor = artifact_for(opts.reader(db), monitor_ref)
    path = opts.model_ref(model, what="--model", home=home)
    monitor.check_model(fingerprint(path))  # before the model loads
    store = Store(opts.writer_db(db))
    subject = opts.load_model(path, device=device, home=home)
    result = run_prompts(
        store,
        monitor,
        subject,
        lines,
        source=prompts,
        max_new_tokens=max_new_tokens,
        keep_text=keep_text,
    )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(
        f"monitor {monitor.monitor_id[:8]}: {result['alerts']} of {result['prompts']} prompts "
        f"flagged; alerts recorded as batch {result['batch_id']}"
    )


@monitor_app.command("list")
@friendly
def monitor_list(db: Path | None = DbOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every recorded monitor, newest first, with its latest figures."""
    rows = opts.reader(db).list_monitors()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        err.print("no monitors recorded; build one with `rca monitor build RUN`")
        return
    from rich.table import Table

    t = Table()
    for col in ("monitor", "case", "sites", "threshold", "latest", "recall", "AUROC", "alerts"):
        t.add_column(col)
    for r in rows:
        ev = r.get("latest_eval") or {}
        f = ev.get("figures") or {}
        latest = ev.get("kind", "-") + (" (stale)" if ev.get("stale") else "")
        t.add_row(
            r["monitor_id"][:8],
            r["incident_id"],
            ", ".join(s["id"] for s in r["site_specs"]),
            f"{r['threshold']:.3g}",
            latest,
            _num(f.get("recall")),
            _num(f.get("auroc")),
            str(r["n_alerts"]),
        )
    out.print(t)


@monitor_app.command("show")
@friendly
def monitor_show(
    ref: str = typer.Argument(..., help="Monitor id (or prefix) or case id."),
    db: Path | None = DbOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One monitor: its sites, threshold and every evaluation."""
    from rca.monitor.probe import few_positives_caution

    row = opts.reader(db).get_monitor(ref)
    if as_json:
        print(json.dumps(row, indent=2, default=str))
        return
    out.print(f"monitor {row['monitor_id']} for {row['incident_id']} (run {row['run_id'][:8]})")
    out.print(f"artifact {row['artifact_path']}; threshold {row['threshold']:.4g}")
    rows = [_figure_row("fit", row.get("fit") or {})]
    for ev in row["evals"]:
        name = f"{ev['kind']} {ev['model_fingerprint'][:8]}"
        if ev.get("stale"):
            name += " stale"
        rows.append(_figure_row(name, ev.get("figures") or {}))
        for b, f in (ev.get("baselines") or {}).items():
            rows.append(_figure_row(f"  {b.replace('_', ' ')}", f))
    _print_figures(rows, "figures")
    n_fit = (row.get("fit") or {}).get("n_positive")
    if n_fit is not None and (caution := few_positives_caution(int(n_fit))):
        out.print(f"caution: {caution}")
