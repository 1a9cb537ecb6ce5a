"""The store's write throughput (``m_store``): one run's edge rows recorded at once."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rca.bench.cost.common import peak_rss_mb

__all__ = ["m_store"]


def m_store(_: str, n: int, device: str = "cpu") -> dict[str, Any]:
    import pyarrow as pa

    from rca.store import IncidentRecord, ModelRecord, RunRecord, Store

    inc = IncidentRecord.from_fields(
        {
            "id": "bench-store",
            "title": "store throughput",
            "severity": "low",
            "model": "m",
            "prompt": "p",
            "bad": " b",
        },
        source="<bench>",
    )
    model = ModelRecord(fingerprint="0" * 64, path="m", architecture="gpt2", n_params=1)
    edges = pa.table(
        {
            "source": pa.array([f"L{i % 12}.H{i % 12}" for i in range(n)]),
            "target": pa.array([f"L{(i + 1) % 12}.MLP" for i in range(n)]),
            "score": pa.array([float(i) for i in range(n)]),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "rca.duckdb")
        rec = RunRecord(incident=inc, model=model, edges=edges)
        t = time.perf_counter()
        store.record_run(rec)
        wall = time.perf_counter() - t
    return {"rows": n, "seconds": wall, "rows_per_s": n / wall, "peak_rss_mb": peak_rss_mb()}
