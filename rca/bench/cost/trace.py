"""The trace's cost (``m_trace``) and the alternatives it replaces (``m_alternatives``).

- trace: node + edge scoring (AtP and EAP-IG, 8 steps) as a ratio to one forward+backward of the
  same model and prompt;
- alternatives: exhaustive node patching (one forward per head and MLP, measured), exhaustive
  edge patching (one forward per edge: a measured forward times the edge count, extrapolated),
  captum LayerIntegratedGradients looped per layer (a sample of layers measured, extrapolated
  to all), each against rca's trace.
"""

from __future__ import annotations

from typing import Any

from rca.bench.cost.common import (
    MAX_MEMORY_GB,
    median_time,
    peaks,
    random_subject,
    random_targets,
    rss_now,
    timed,
)
from rca.model.ids import parse_id

__all__ = ["m_alternatives", "m_trace"]


def m_trace(cfg: str, length: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    from rca.trace.components import Baseline, score_components
    from rca.trace.memory import plan_for_target

    s = random_subject(cfg, device)
    tgt, cf = random_targets(length)
    base = Baseline("counterfactual", "bench", target=cf)
    ids = tgt.input_ids(device=s.device)
    # the chunks rca itself would pick under this measurement's memory cap, less what is
    # resident already (model, interpreter); on CUDA what the device has free (rca's default)
    budget: int | None = int(MAX_MEMORY_GB * 2**30 * 0.8 - rss_now())
    if device == "cuda":
        budget = None

    def fwd_bwd() -> None:
        s.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            tgt.metric(s.model(input_ids=ids, use_cache=False).logits)[0].backward()

    def fwd() -> None:
        with torch.no_grad():
            s.model(input_ids=ids, use_cache=False)

    out: dict[str, Any] = {"config": cfg, "length": length, "device": device}
    out["forward_s"] = median_time(fwd, device=device)
    out["forward_backward_s"] = median_time(fwd_bwd, device=device)
    for method in ("atp", "eap-ig"):
        for edges in (False, True):
            key = f"{method}{'_edges' if edges else '_nodes'}"
            holder: dict[str, Any] = {}

            plan = plan_for_target(
                s,
                tgt,
                method=method,
                steps=8,
                edges=edges,
                max_memory=budget,
            )
            out[f"{key}_chunks"] = [plan.step_chunk, plan.head_chunk]

            def run(
                method: str = method, edges: bool = edges, holder: dict = holder, plan=plan
            ) -> None:
                holder["s"] = score_components(
                    s,
                    tgt,
                    base,
                    method=method,
                    steps=8,
                    edges=edges,
                    step_chunk=plan.step_chunk,
                    head_chunk=plan.head_chunk,
                )

            # medians of 3, but for EAP-IG on the large configs: one timed run after the
            # warm-up, as each takes seconds to tens of seconds (the 2-core machine's budget)
            repeats = 3 if cfg in ("2x64", "4x128") or method == "atp" or device == "cuda" else 1
            t = median_time(run, repeats=repeats, device=device)
            out[f"{key}_s"] = t
            out[f"{key}_ratio"] = t / out["forward_backward_s"]
            out[f"{key}_forward_equiv"] = float(holder["s"].cost["forward_equiv"])
    n_comp = s.adapter.n_layers * (s.adapter.n_heads + 1)
    out["components"] = n_comp
    out.update(peaks(device))
    return out


def m_alternatives(cfg: str, length: int, device: str = "cpu") -> dict[str, Any]:
    """Exhaustive node patching (measured), exhaustive edge patching (extrapolated) and captum
    LayerIntegratedGradients looped over layers (a sample measured, extrapolated)."""
    import torch
    from captum.attr import LayerIntegratedGradients

    from rca.confirm import Ablator
    from rca.trace.components import Baseline, score_components

    s = random_subject(cfg, device)
    tgt, cf = random_targets(length)
    base = Baseline("counterfactual", "bench", target=cf)
    a = s.adapter
    out: dict[str, Any] = {"config": cfg, "length": length, "device": device}
    out["rca_atp_edges_s"] = median_time(
        lambda: score_components(s, tgt, base, method="atp", edges=True), repeats=1, device=device
    )
    out["rca_atp_nodes_s"] = median_time(
        lambda: score_components(s, tgt, base, method="atp", edges=False), repeats=1, device=device
    )
    ab = Ablator(s, tgt, baseline=cf, batch_size=1, reuse=False)
    comps = ab.components
    out["exhaustive_nodes_s"] = timed(lambda: ab.run([{c: "baseline"} for c in comps]), device)
    out["exhaustive_nodes_forwards"] = len(comps)
    # edges: heads and MLPs upstream of each head and MLP, plus the logits
    layers = [parse_id(c).layer for c in comps]
    n_edges = 0
    for i, up in enumerate(layers):
        n_edges += sum(1 for down in layers[i + 1 :] if down != up)
        n_edges += 1  # -> logits
    per_forward = out["exhaustive_nodes_s"] / len(comps)
    out["exhaustive_edges_count"] = n_edges
    out["exhaustive_edges_s_extrapolated"] = per_forward * n_edges
    out["speedup_nodes_vs_atp_nodes"] = out["exhaustive_nodes_s"] / out["rca_atp_nodes_s"]
    out["speedup_edges_vs_atp_edges"] = (
        out["exhaustive_edges_s_extrapolated"] / out["rca_atp_edges_s"]
    )
    # captum LIG over each attention output and MLP, 8 steps, a sample of layers
    ids = tgt.input_ids(device=s.device)[:1]
    bids = cf.input_ids(device=s.device)[:1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = s.model(input_ids=x, use_cache=False).logits
        return torch.log_softmax(logits[:, tgt.n_prompt - 1], -1)[:, tgt.bad_ids[0]]

    sample = sorted({0, a.n_layers - 1})

    def lig_loop() -> None:
        for layer in sample:
            for mod in (a.attn_out(layer), a.mlp(layer)):
                lig = LayerIntegratedGradients(forward, mod)
                lig.attribute(ids, baselines=bids, n_steps=8, internal_batch_size=8)

    lig_s = timed(lig_loop, device)
    out["captum_lig_layers_measured"] = len(sample)
    out["captum_lig_s_extrapolated"] = lig_s / len(sample) * a.n_layers
    out["speedup_vs_captum_lig"] = out["captum_lig_s_extrapolated"] / out["rca_atp_nodes_s"]
    out.update(peaks(device))
    return out
