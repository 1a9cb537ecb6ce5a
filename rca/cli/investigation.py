"""The investigation commands: ``trace``, ``confirm``, ``investigate`` (every stage, recorded)
and ``demo`` (the zoo's cases end to end)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from rca import cli_options as opts
from rca.cli.shell import (
    app,
    err,
    friendly,
    out,
    pct,
    print_circuit,
    print_regression,
    print_run_summary,
    progress,
    warn_tokens,
)
from rca.cli_options import (
    INCIDENT,
    AllowPickleOpt,
    CliError,
    DbOpt,
    HomeOpt,
    IncidentArgs,
    MaxMemOpt,
    ModelOverrideOpt,
    incident_options,
)
from rca.paths import output_path, show


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
    with progress(not as_json) as say:
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
    warn_tokens(result["token_completeness"])
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(
        f"[bold]{escape(inc.id)}[/bold]: {escape(str(inc.title))}  (method {method}, "
        f"baseline: {escape(str(result['baseline']))})",
        markup=True,
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
    with progress(not as_json) as say:
        done = trace_and_confirm(inc, subject=subject, config=cfg, progress=say)
        say("done", 1.0)
    att, v = done.attribution, done.verdict
    result = {"case_id": inc.id, "trace_baseline": att.baseline.description, **v.to_json()}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    cs = v.cause_set
    out.print(
        f"[bold]{escape(inc.id)}[/bold]: {v.verdict.upper()}  cause set "
        f"{escape(', '.join(cs.components))}",
        markup=True,
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
            pct(c.benign_loss_pct),
            c.verdict,
        )
    out.print(t)
    print_circuit(result.get("circuit"))


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
    generate_variants: int = typer.Option(
        0,
        "--generate-variants",
        metavar="N",
        help="A case with no variants: generate up to N from its reference prompts and keep "
        "those the model shows the incident on (0: the one prompt).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Trace, confirm, remedy and record one incident."""
    import dataclasses

    from rca.investigate import investigate
    from rca.store import Store

    opts.at_least(("--seed", seed, 0), ("--generate-variants", generate_variants, 0))
    if generate_variants > 1000:
        raise opts.CliError(f"--generate-variants must be at most 1000, got {generate_variants}")
    db_path = opts.writer_db(db)
    inc, subject = opts.load_incident_subject(
        incident, model, device=device, home=home, allow_pickle=allow_pickle
    )
    cfg = _investigate_config(method, seed, device, max_memory, allow_pickle)
    if generate_variants and inc.all_variants():
        raise opts.CliError(
            f"--generate-variants: case {inc.id!r} has variants of its own; leave the flag out"
        )
    cfg = dataclasses.replace(cfg, generate_variants=generate_variants)
    with progress(not as_json) as say:
        run = investigate(inc, subject=subject, store=Store(db_path), config=cfg, progress=say)
    warn_tokens(run.attribution.tokens.completeness)
    result = run.to_json()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print_run_summary(result)


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
        None, "--reports", help="Where the reports go (default reports/, or reports/real/)."
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
        progress=lambda: progress(not as_json),
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
        print_regression(reg)
    out.print(f"reports in {reports}/; browse with `streamlit run app.py`")
