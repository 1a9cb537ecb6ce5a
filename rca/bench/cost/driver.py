"""The cost benchmarks' driver: ``python -m rca.bench.cost`` (``make bench``), ``--smoke`` for
CI, ``--only SECTION`` for one section.

Each measurement runs in its own subprocess (``--one KEY``), so its peak RSS is its own. Writes
``results.json``, PNG plots and ``summary.md`` to ``--out``; the exit code is 1 where a
measurement failed (its row holds the error), 2 for ``--device cuda`` without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rca.bench.cost.ablation import m_ablation
from rca.bench.cost.behaviour import m_behaviour, m_real_behaviour
from rca.bench.cost.common import CONFIGS, LENGTHS, MAX_MEMORY_GB, SMOKE_CONFIGS, SMOKE_LENGTHS
from rca.bench.cost.investigation import m_investigation
from rca.bench.cost.real import (
    NATURAL_MAX_SECONDS,
    NATURAL_N,
    REAL_CASES,
    m_natural,
    m_real,
    real_fetched,
)
from rca.bench.cost.report import plots, summary
from rca.bench.cost.store import m_store
from rca.bench.cost.trace import m_alternatives, m_trace
from rca.zoo.cases import BEHAVIOUR_VARIANTS

__all__ = ["MEASURES", "machine", "main"]

MAX_SECONDS = 900

MEASURES: dict[str, Callable[[str, int, str], dict[str, Any]]] = {
    "trace": m_trace,
    "alternatives": m_alternatives,
    "ablation": m_ablation,
    "investigation": m_investigation,
    "store": m_store,
    "real": m_real,
    "natural": m_natural,
    "behaviour": m_behaviour,
    "real_behaviour": m_real_behaviour,
}


def _one(
    kind: str, cfg: str, n: int, device: str = "cpu", *, timeout: float = MAX_SECONDS
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (its own peak RSS)."""
    cmd = [sys.executable, "-m", "rca.bench.cost", "--one", kind, cfg, str(n), "--device", device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    failed = {"config": cfg, "n": n, "device": device}
    t = time.perf_counter()
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**failed, "error": [f"over {timeout:.0f} s; not measured"]}
    if r.returncode != 0:
        return {**failed, "error": r.stderr.strip().splitlines()[-1:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["subprocess_s"] = time.perf_counter() - t
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    import rca.bench.cost

    p = argparse.ArgumentParser(description=(rca.bench.cost.__doc__ or "").splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="benchmarks/results; with --only natural, benchmarks/results-natural",
    )
    p.add_argument("--smoke", action="store_true", help="the smallest size only (CI)")
    p.add_argument("--accuracy", type=Path, default=None, help="a localization --out JSON")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU, and CUDA too where a GPU is present",
    )
    p.add_argument("--only", choices=tuple(MEASURES), default=None, help="measure one section only")
    p.add_argument("--one", nargs=3, metavar=("KIND", "CONFIG", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(
            "benchmarks/results-natural" if args.only == "natural" else "benchmarks/results"
        )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    if args.one:
        kind, cfg, n = args.one
        device = "cpu" if args.device == "auto" else args.device
        if device == "cpu":
            # a measurement that needs more memory than this fails with an error (recorded in
            # the results) instead of waking the kernel's OOM killer. Not on CUDA: its runtime
            # reserves far more address space than it uses
            limit = int(MAX_MEMORY_GB * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(MEASURES[kind](cfg, int(n), device)))
        return 0
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    configs = SMOKE_CONFIGS if args.smoke else tuple(CONFIGS)
    lengths = SMOKE_LENGTHS if args.smoke else LENGTHS
    big = configs[-1]
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "devices": devices}
    want = (lambda k: k == args.only) if args.only else (lambda k: True)
    alt_points = [(c, 16) for c in configs] + ([] if args.smoke else [(big, 128)])
    for key in MEASURES:
        res[key] = []
    if want("trace"):
        res["trace"] = [_one("trace", c, n, d) for d in devices for c in configs for n in lengths]
    if want("alternatives"):
        res["alternatives"] = [
            _one("alternatives", c, n, d) for d in devices for c, n in alt_points
        ]
    if want("ablation"):
        res["ablation"] = [
            _one("ablation", c, 128 if not args.smoke else 16, d) for d in devices for c in configs
        ]
    n_inv = 16 if args.smoke else 128
    if want("investigation"):
        res["investigation"] = [_one("investigation", big, n_inv, d) for d in devices]
    if want("store"):
        res["store"] = [_one("store", "-", 10_000 if args.smoke else 1_000_000)]
    if want("behaviour") and not args.smoke:
        res["behaviour"] = [_one("behaviour", k, 0, devices[0]) for k in BEHAVIOUR_VARIANTS]
    # asked for by name only: each real case is investigated twice
    if args.only == "real_behaviour" and real_fetched():
        res["real_behaviour"] = [
            _one("real_behaviour", p.stem, 0, devices[0], timeout=2 * MAX_SECONDS)
            for p in sorted(REAL_CASES.glob("*.toml"))
        ]
    if want("real") and not args.smoke and real_fetched():
        res["real"] = [
            _one("real", p.stem, 0, d) for d in devices for p in sorted(REAL_CASES.glob("*.toml"))
        ]
    # asked for by name only: twelve investigations and the benign table take long on a CPU
    if args.only == "natural" and not args.smoke:
        if real_fetched():
            # once, on the last device listed (CUDA where there is one): an accuracy figure
            res["natural"] = [
                _one(
                    "natural",
                    str(args.out),
                    NATURAL_N,
                    devices[-1],
                    timeout=NATURAL_MAX_SECONDS,
                )
            ]
        else:
            print(
                "natural: skipped, SmolLM2-135M-Instruct is not fetched; run "
                "`rca zoo fetch smollm2-135m` first",
                file=sys.stderr,
            )
    if args.accuracy and args.accuracy.is_file():
        res["accuracy"] = {
            k: v for k, v in json.loads(args.accuracy.read_text()).items() if k != "faults"
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    res["plots"] = plots(res, args.out)
    (args.out / "summary.md").write_text(summary(res))
    print(summary(res))
    errors = [r for k in MEASURES for r in res.get(k, []) if "error" in r]
    return 1 if errors else 0
