"""``rca provenance``: the training examples that taught a recorded run's incident."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rca import cli_options as opts
from rca.cli.shell import app, friendly, out
from rca.cli_options import CliError, DbOpt, HomeOpt
from rca.paths import input_path, output_path


def _line(text: str, width: int = 90) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= width else one[: width - 1] + "…"


def _print(row: dict[str, Any], examples: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from rca.report.stored import ensemble_sentence, unlearning_sentence

    summ = row.get("summary") or {}
    circuit = ", ".join(row.get("circuit") or []) or "every parameter"
    out.print(
        f"provenance {str(row.get('query_id'))[:8]} of run {str(row['run_id'])[:8]} "
        f"({row['incident_id']}): {row['method']} over {circuit}; "
        f"{summ.get('n_examples')} examples"
    )
    if summ.get("top_sources"):
        shares = ", ".join(f"{k} {v:.0%}" for k, v in summ["top_sources"].items())
        data = ", ".join(f"{k} {v:.0%}" for k, v in (summ.get("data_sources") or {}).items())
        out.print(f"sources of the top {len(examples)}: {shares} (in the data: {data})")
    if summ.get("ensemble"):
        out.print(ensemble_sentence(summ["ensemble"]))
    if summ.get("unlearning"):
        out.print(unlearning_sentence(summ["unlearning"]))
    t = Table(title=f"the top {len(examples)} by influence on the incident metric")
    for col in ("rank", "example", "score", "text"):
        t.add_column(col, overflow="fold")
    for r, e in enumerate(examples, 1):
        idx = e.get("index", e.get("example_index"))
        t.add_row(str(r), str(idx), f"{e['score']:.4g}", _line(e.get("text") or ""))
    out.print(t)


@app.command("provenance")
@friendly
def provenance_cmd(
    ref: str = typer.Argument(..., help="Run id (or prefix) or case id (its latest run)."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Training data: JSONL, .txt, Parquet or a saved datasets directory. Without it, "
        "show the run's recorded rankings.",
    ),
    text_field: str = typer.Option("text", "--text-field", help="The field holding the text."),
    top: int = typer.Option(20, "--top", help="Examples to record and show."),
    scope: str = typer.Option(
        "circuit", "--scope", help="circuit (the verdict's parameters) or full (every one)."
    ),
    proj_dim: int = typer.Option(
        256, "--proj-dim", help="Dimensions the per-example gradients are projected to."
    ),
    lambda_reg: float = typer.Option(0.0, "--lambda", help="Ridge term added to G^T G."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens kept per example."),
    limit: int | None = typer.Option(None, "--limit", help="Read only the first N examples."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Features cache directory (default RCA_HOME/influence)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="The run's model, where the case's reference no longer finds it."
    ),
    unlearn: bool = typer.Option(
        False,
        "--unlearn",
        help="Also unlearn the top examples, and as many random ones, by a few steps of "
        "gradient ascent over the same parameters within a benign KL bound, and measure the "
        "incident after each: the approximation of retraining without them.",
    ),
    unlearn_steps: int = typer.Option(10, "--unlearn-steps", help="Unlearning steps."),
    unlearn_kl: float = typer.Option(
        0.05, "--unlearn-kl", help="Benign KL bound per next-token position, in nats."
    ),
    workers: int = typer.Option(
        0,
        "--workers",
        help="Compute the features' gradients on N Ray workers, each loading the model "
        "(pip install 'rca[ray]'); 0: in this process.",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="A running Ray cluster to use (default: start one)."
    ),
    checkpoints: str = typer.Option(
        "auto",
        "--checkpoints",
        help="Training checkpoints to take the influence over as well, their scores combined "
        "by --ensemble: auto (the model's own: a zoo model's, or checkpoints/step-N and "
        "checkpoint-N directories in its directory), none, or model directories separated by "
        "commas, in training order.",
    ),
    ensemble: str = typer.Option(
        "auto",
        "--ensemble",
        help="How the checkpoints' scores combine: auto (tracin where the model has "
        "checkpoints, else its final weights' TRAK scores), tracin (TracIn: each checkpoint's "
        "gradient dot products weighted by the learning rate over the training after it; "
        "needs checkpoints), sum (TRAK's rule) or learning (each checkpoint's standardized "
        "scores weighted by the rise of the incident's P(bad) over the training after it).",
    ),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    db: Path | None = DbOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Rank the training examples by their influence on a recorded run's incident (over its
    circuit's parameters, averaged over the case's prompt and fit variants: TracIn over the
    model's checkpoints, or TRAK where it has none) and record the top ones; without --data,
    show the run's recorded rankings."""
    from rca.cli.records import _resolve_run
    from rca.provenance.influence import InfluenceConfig
    from rca.provenance.unlearn import UnlearnConfig

    cfg = InfluenceConfig(
        scope=scope, proj_dim=proj_dim, lambda_reg=lambda_reg, max_tokens=max_tokens
    )
    cfg.check()
    ucfg = UnlearnConfig(steps=unlearn_steps, kl_bound=unlearn_kl, max_tokens=max_tokens)
    ucfg.check()
    if workers < 0:
        raise CliError(f"--workers must be 0 or more, got {workers}")
    from rca.provenance.ensemble import check_rule, find_checkpoints, no_checkpoints_error

    check_rule(ensemble)
    if ensemble == "tracin" and checkpoints.strip() == "none":
        raise no_checkpoints_error()
    if checkpoints.strip() not in ("auto", "none"):  # auto is resolved with the run's model
        find_checkpoints(None, checkpoints)  # a list of directories: each must be one
    if unlearn and data is None:
        raise CliError("--unlearn needs --data: the examples to unlearn are read from it")
    if top < 1:
        raise CliError(f"--top must be at least 1, got {top}")
    if limit is not None and limit < 1:
        raise CliError(f"--limit must be at least 1, got {limit}")
    opts.home_dir(home)
    if data is not None:
        input_path(data, what="--data", kind="any")
    reader = opts.reader(db)
    run_id = _resolve_run(reader, ref)
    if data is None:
        rows = reader.list_provenance(run_id)
        if not rows:
            raise CliError(
                f"run {run_id[:8]} has no recorded provenance; give --data with its training data"
            )
        full = reader.get_provenance(rows[0]["query_id"])
        if as_json:
            print(json.dumps({"rankings": rows, "latest": full}, indent=2, default=str))
            return
        _print(full, full["examples"][:top])
        return
    if cache is not None:
        output_path(cache, what="--cache", kind="dir", overwrite=True, parent_must_exist=False)
    if model is not None:
        opts.model_ref(model, what="--model", home=home)
    from rca.provenance.workflow import provenance_for_run
    from rca.store import Store

    store = Store(opts.writer_db(db))
    res = provenance_for_run(
        store,
        run_id,
        data,
        cfg=cfg,
        top_k=top,
        text_field=text_field,
        limit=limit,
        model=model,
        device=device,
        home=home,
        cache_root=cache,
        unlearn=ucfg if unlearn else None,
        workers=workers,
        ray_address=ray_address,
        checkpoints=checkpoints,
        ensemble=ensemble,
    )
    row = {
        "query_id": res.query_id,
        "run_id": res.run_id,
        "incident_id": res.incident_id,
        "method": res.method,
        "circuit": res.circuit,
        "queries": res.queries,
        "summary": res.summary,
        "features": res.features.meta() | {"path": str(res.features.path)},
        "seconds": res.seconds,
    }
    if as_json:
        print(json.dumps(row | {"examples": res.top}, indent=2, default=str))
        return
    _print(row, res.top)
    f = res.features
    how = "read from the cache" if f.cached else f"computed in {f.seconds:.1f} s"
    out.print(f"features of {f.n} examples over {f.n_params:,} parameters {how} ({f.path})")
