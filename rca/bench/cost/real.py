"""Measurements on SmolLM2-135M-Instruct (fetched with ``rca zoo fetch smollm2-135m``).

- ``m_real``: a full investigation of each real case (``cases/real/``), split by stage, with
  peak RSS (target: <= 90 s and <= 2 GB for an incident of <= 64 tokens);
- ``m_natural``: indirect-object identification incidents, each head's and MLP's exact direct
  effect against rca's verdict (``rca.bench.natural``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rca.bench.cost.common import peaks, sync

__all__ = [
    "NATURAL_N",
    "NATURAL_MAX_SECONDS",
    "NATURAL_SEED",
    "REAL_CASES",
    "REAL_TARGET_GB",
    "REAL_TARGET_S",
    "REAL_TARGET_TOKENS",
    "m_natural",
    "m_real",
    "one_prompt",
    "real_fetched",
]

NATURAL_N, NATURAL_MAX_SECONDS = 12, 3 * 3600  # the benign table alone is minutes on a CPU
REAL_CASES = Path(__file__).resolve().parents[3] / "cases" / "real"
REAL_TARGET_S, REAL_TARGET_GB, REAL_TARGET_TOKENS = 90.0, 2.0, 64
# the IOI draw scored (docs/decisions: which seeds were seen while choosing the rules)
NATURAL_SEED = 3


def real_fetched() -> bool:
    from rca.zoo.real import is_fetched

    return is_fetched("smollm2-135m")


def one_prompt(incident: Any) -> Any:
    """The incident without its variants: one prompt, as a case without them is."""
    import dataclasses

    return dataclasses.replace(incident, variants=(), template=None, split=None)


def m_real(case: str, _: int, device: str = "cpu") -> dict[str, Any]:
    """A full investigation of the prompt of ``cases/real/<case>.toml`` as ``rca investigate``
    runs it (the default configuration, the model loaded first), timed by stage. The case's
    variants are left out: a behaviour's cost is ``m_real_behaviour``'s."""
    from rca.ingest.case_file import load_case
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject
    from rca.store import Store

    inc = one_prompt(load_case(REAL_CASES / f"{case}.toml"))
    t = time.perf_counter()
    s = load_subject(inc.model_path(), device=device)
    load_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "rca.duckdb")
        sync(device)
        t = time.perf_counter()
        run = investigate(inc, subject=s, store=store, config=InvestigateConfig(device=device))
        sync(device)
        wall = time.perf_counter() - t
    v = run.verdict
    return {
        "config": case,
        "length": run.attribution.target.length,
        "device": device,
        "load_s": load_s,
        "wall_s": wall,
        "stages_s": run.timings,
        "trace_stages_s": dict(run.attribution.timings),
        "prompt_tokens": run.attribution.target.n_prompt,
        "confirm_forward_equiv": v.cost.get("forward_equiv"),
        "circuit_forward_equiv": v.cost.get("circuit_forward_equiv"),
        "circuit": None if v.circuit is None else [m.label for m in v.circuit.members],
        "verdict": v.verdict,
        "cause_set": v.cause_set.components,
        "baseline": run.attribution.baseline.description[:80],
        **peaks(device),
    }


def m_natural(out: str, n: int, device: str = "cpu") -> dict[str, Any]:
    """``rca.bench.natural`` on SmolLM2-135M-Instruct: ``n`` IOI incidents, written to ``out``
    (natural.json, natural.md, and the benign-damage cache that a rerun reuses)."""
    from rca.bench.natural import run_natural
    from rca.zoo.real import real_model_dir

    result = run_natural(real_model_dir("smollm2-135m"), out, n=n, seed=NATURAL_SEED, device=device)
    return {
        "config": out,
        "n": result["n"],
        "device": device,
        "wall_s": result["seconds"],
        "summary": result["summary"],
        "incidents": [
            {
                "prompt": r["prompt"],
                "exact_top3": [t["id"] for t in r["exact"]["top3"]],
                "cause_set": r["rca"].get("cause_set"),
                "writers": [w["id"] for w in r["rca"].get("writers", [])],
                "seconds": r["seconds"],
            }
            for r in result["incidents"]
        ],
        **peaks(device),
    }
