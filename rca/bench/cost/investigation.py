"""A whole investigation's cost (``m_investigation``): the pipeline (trace, confirm, remedy,
record) on a random model, wall time by stage and peak memory."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from rca.bench.cost.common import VOCAB, peaks, random_subject, rss_now, sync

__all__ = ["INVESTIGATION_RSS_GB", "m_investigation"]

INVESTIGATION_RSS_GB = 3.0  # the peak-memory target of a full investigation


def m_investigation(cfg: str, length: int, device: str = "cpu") -> dict[str, Any]:
    import random

    import torch

    from rca.ingest.incident import Incident
    from rca.investigate import InvestigateConfig, investigate
    from rca.store import Store

    s = random_subject(cfg, device)
    s.fingerprint = f"bench-random-gpt2-{cfg}"  # an in-memory model: a stable label for the store
    rng = random.Random(1)
    words = [f"w{rng.randrange(VOCAB - 4)}" for _ in range(length)]
    cf = list(words)
    cf[length // 2] = "w7"
    refs = tuple(" ".join(rng.choice(words) for _ in range(24)) for _ in range(64))
    # a random model has no incident: "bad" is the token the prompt favours most over the
    # counterfactual, "good" one the counterfactual prefers to it and the prompt does not, so
    # the counterfactual removes the whole metric
    with torch.no_grad():
        lp = [
            torch.log_softmax(
                s.model(**s.tokenizer(" ".join(t), return_tensors="pt").to(s.device)).logits, -1
            ).cpu()
            for t in (words, cf)
        ]
    p_lp, c_lp = lp[0][0, -1, 4:], lp[1][0, -1, 4:]
    d = p_lp - c_lp
    b = int(d.argmax())
    margin = c_lp - c_lp[b]
    ok = (margin >= 0) & (d[b] - d > margin) & (torch.arange(d.numel()) != b)
    g = int(torch.where(ok, margin, torch.full_like(margin, float("inf"))).argmin())
    inc = Incident(
        id="bench",
        title="benchmark incident",
        severity="low",
        model="bench-model",
        prompt=" ".join(words),
        bad=f" w{b}",
        good=f" w{g}",
        counterfactual=" ".join(cf),
        reference_prompts=refs,
        tags=(),
        notes="",
        source="<bench>",
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "rca.duckdb")
        # the target is a 3 GB peak: the trace plans its chunks within what is left of it; on
        # CUDA within what the device has free
        budget = int(INVESTIGATION_RSS_GB * 2**30 - rss_now() - (256 << 20))
        cfg_inv = InvestigateConfig(device=device, max_memory=budget if device == "cpu" else None)
        sync(device)
        t = time.perf_counter()
        run = investigate(inc, subject=s, store=store, config=cfg_inv)
        sync(device)
        wall = time.perf_counter() - t
        rows = sum(store.counts().values())
    timings = run.timings
    return {
        "config": cfg,
        "length": length,
        "device": device,
        "wall_s": wall,
        "stages_s": timings,
        "trace_stages_s": dict(run.attribution.timings),  # tokens, baseline, components, graph
        "record_share": timings.get("record", 0.0) / wall,
        "rows_written": rows,
        "memory_budget_mb": budget / 2**20,
        "memory_plan": run.attribution.memory.to_json() if run.attribution.memory else None,
        **peaks(device),
    }
