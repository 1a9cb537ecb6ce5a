"""The ablation's cost (``m_ablation``): 256 single-component ablation sets through
``rca.confirm.Ablator`` (batched, reusing the layers below the first ablated one) against
sequential hook-based runs."""

from __future__ import annotations

from typing import Any

from rca.bench.cost.common import median_time, peaks, random_subject, random_targets, timed

__all__ = ["m_ablation"]


def m_ablation(cfg: str, length: int, device: str = "cpu") -> dict[str, Any]:
    import random

    import torch

    from rca.confirm import Ablator
    from rca.model.hooks import capture, patch

    s = random_subject(cfg, device)
    tgt, cf = random_targets(length)
    ids = tgt.input_ids(device=s.device)

    def forward() -> None:
        with torch.no_grad():
            s.model(input_ids=ids, use_cache=False)

    fwd = median_time(forward, device=device)
    # the default batch for the device (confirm.auto_batch_size); every set runs, the repeats
    # among the 256 draws too: the memo would answer those for nothing, which is not what this
    # measures
    ab = Ablator(s, tgt, baseline=cf, memo=False)
    rng = random.Random(0)
    sets = [{c: "baseline"} for c in rng.choices(ab.components, k=256)]
    before = ab.forward_equiv
    batched = timed(lambda: ab.run(sets), device)
    fe = ab.forward_equiv - before
    # sequential: one hooked forward per set, through rca.model.hooks.patch
    with torch.no_grad():
        with capture(s, ab.components) as acts:
            s.model(input_ids=cf.input_ids(device=s.device), use_cache=False)
        cf_acts = {c: acts[c].clone() for c in ab.components}

    def sequential() -> None:
        for v in sets[:64]:
            (c,) = v
            with torch.no_grad(), patch(s, {c: cf_acts[c]}):
                s.model(input_ids=ids, use_cache=False)

    seq = timed(sequential, device) / 64 * 256
    return {
        "config": cfg,
        "length": length,
        "device": device,
        "sets": 256,
        "batch_size": ab.batch_size,
        "forward_s": fwd,
        "batched_s": batched,
        "sequential_s_extrapolated_from_64": seq,
        "batched_per_set_over_forward": batched / 256 / fwd,
        "batched_over_forward": batched / fwd,  # all 256 sets: the GPU target's measure
        "batched_forward_equiv_per_set": fe / 256,
        "speedup_vs_sequential": seq / batched,
        **peaks(device),
    }
