"""``rca bench``: benchmarks with known answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from rca import cli_options as opts
from rca.cli.shell import bench_app, friendly
from rca.cli_options import CliError, HomeOpt
from rca.paths import input_path, output_path, show

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
