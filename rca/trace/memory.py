"""Peak-memory estimates for a trace, and the chunking that keeps it under a budget.

``plan_trace`` (``plan_for_target`` for an encoded target) estimates, before anything runs,
the peak memory the trace stages add on top of the loaded model, and picks the largest chunks
that fit a budget:

- ``step_chunk``: EAP-IG interpolation points per forward+backward (the autograd graph of
  ``step_chunk * rows`` sequences is alive at once);
- ``head_chunk``: heads per batched local VJP in the edge step (on grouped-query layers the
  attention backward is replicated once per head in the batch:
  ``head_chunk * rows * step_chunk * n_heads * T^2``; elsewhere only the norm's backward is);
- ``ig_batch``: integrated-gradients points per forward+backward in token attribution;
- ``confirm_batch``: ablation variants per forward in confirm (inference only).

None of them changes a score beyond float summation order (tested). The budget is
``--max-memory`` when given, else what the device has free now (``MemAvailable`` on a CPU,
at most ``CPU_AUTO_BUDGET``; the free CUDA memory on a GPU). When even one point, one head
and one variant at a time do not fit, ``plan_trace`` refuses with the estimate and what to
change: never an out-of-memory crash.

The model of the peak is a sum of terms, each ``floats * bytes``, with per-layer constants
measured on GPT-2 and Llama (eager attention, fp32) and a safety factor; the estimate is checked
against the measured peak RSS in ``tests/integration/test_memory.py``. Terms, for ``R``
sequences alive in a gradient pass of length ``T`` over ``L`` layers:

- autograd graph: ``R * L * T * (12 d + 4 d_mlp + 2 H T)`` (saved activations, attention
  probabilities included);
- logits: ``3 R K V`` (logits, log-softmax and its gradient, in fp32) for the ``K`` positions
  the metric reads (``Target.keep``: the model computes no others);
- the edge step's batched VJP: ``3.5 * head_chunk * R * H * T^2`` through the attention
  (grouped-query layers), or ``5 * head_chunk * R * T * d`` through the norm alone where each
  head reads its own q/k/v features (``Adapter.head_reads``), plus the accumulated gradients
  ``(L (H + 1) + 1) * rows * T * d``;
- the recorded site tensors (clean, baseline, difference, mean gradient).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "MemoryPlan",
    "available_memory",
    "estimate_trace",
    "format_bytes",
    "memory_budget",
    "parse_size",
    "plan_for_target",
    "plan_trace",
]

SAFETY = 1.5  # the terms above are fitted; this covers allocator slack and what they miss
# "auto" on a CPU: at most this much above the model. Larger batches no longer save time on
# a CPU (SmolLM2-135M on 2 cores: the trace took 15.9 s within it, 15.1 s with 21 GB) and the
# memory is the machine's other work's (docs/decisions/2026-12-06-real-models.md)
CPU_AUTO_BUDGET = 1536 << 20
OVERHEAD = 160 << 20  # fixed cost of a stage: allocator slack and scratch, measured 30-130 MB
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512MiB"``, ``"1.5GB"`` or a byte count -> bytes (powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"memory size {text!r} is not a size; write e.g. 4G, 512M or 1.5GB")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < 1 << 20:
        raise ValueError(f"memory size {text!r} is under 1 MiB; write e.g. 4G or 512M")
    return int(n)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes the device can still give: free CUDA memory, or MemAvailable (cgroup-capped)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            used_path = path.replace("memory.max", "memory.current").replace(
                "limit_in_bytes", "usage_in_bytes"
            )
            try:
                used = int(open(used_path).read().strip())
            except (OSError, ValueError):
                used = 0
            cg = int(raw) - used
            avail = cg if avail is None else min(avail, cg)
    return avail


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen chunks and the estimated peak (bytes above the loaded model) of each stage."""

    step_chunk: int
    head_chunk: int
    ig_batch: int
    confirm_batch: int
    budget: int | None
    estimate: int  # the largest stage estimate: the trace's peak
    stages: dict[str, int]
    full: int  # the estimate with no chunking at all

    @property
    def chunked(self) -> bool:
        return self.estimate < self.full

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _dims(subject: Any) -> dict[str, int]:
    a = subject.adapter
    return {
        "L": a.n_layers,
        "H": a.n_heads,
        "d": a.d_model,
        "dm": a.d_mlp,
        "V": a.vocab_size,
        "s": torch.tensor([], dtype=subject.dtype).element_size(),
    }


def _graph(dm: dict[str, int], R: int, T: int, keep: int) -> float:
    """Bytes of an autograd graph (saved activations) plus logits, for R sequences."""
    L, H, d, m, s = dm["L"], dm["H"], dm["d"], dm["dm"], dm["s"]
    return R * L * T * (12 * d + 4 * m + 2 * H * T) * s + 3 * R * keep * dm["V"] * 4


def _inference(dm: dict[str, int], R: int, T: int, keep: int) -> float:
    """Bytes of one no-grad forward of R sequences: two layers' transients and the logits."""
    H, d, m, s = dm["H"], dm["d"], dm["dm"], dm["s"]
    return 2 * R * T * (8 * d + 2 * m + 3 * H * T) * s + 2 * R * keep * dm["V"] * 4


def estimate_trace(
    subject: Any,
    *,
    length: int,
    rows: int,
    keep: int | None = None,
    method: str = "eap-ig",
    steps: int = 8,
    neurons: bool = False,
    edges: bool = True,
    step_chunk: int | None = None,
    head_chunk: int | None = None,
    ig_batch: int = 16,
    confirm_batch: int = 32,
) -> dict[str, int]:
    """Estimated peak bytes of each trace stage above the loaded model, safety factor included.

    ``keep``: logit positions computed (``Target.keep``; default all ``length``).
    """
    dm = _dims(subject)
    L, H, d, m, s = dm["L"], dm["H"], dm["d"], dm["dm"], dm["s"]
    T = length
    kp = length if keep is None else keep
    n_steps = 1 if method == "atp" else steps
    k = max(1, min(step_chunk or n_steps, n_steps))
    hc = max(1, min(head_chunk or H, H))
    R = k * rows
    site = T * (5 * d + (m if neurons else 0))  # floats per row per layer of recorded sites
    state = 4 * rows * L * site * s  # clean, baseline, difference, mean gradient
    comp = _graph(dm, R, T, kp) + R * L * site * s + state
    if edges:
        if subject.adapter.head_reads(0) is not None:
            # heads' input gradients from their q/k/v features: the split gradient and the
            # norm's batched backward, no attention backward
            comp += 5 * hc * R * T * d * s
        else:
            comp += 3.5 * hc * R * H * T * T * s + hc * R * T * H * d * s
        comp += (
            (L * (H + 1) + 1) * rows * T * d * 4 * 2
        )  # accumulated gradients; one layer's writes
    ig = _graph(dm, max(1, ig_batch) * rows, T, kp)
    conf = _inference(dm, max(1, confirm_batch) * rows, T, kp) + L * rows * T * d * s * 2
    return {
        name: int(SAFETY * v + OVERHEAD)
        for name, v in (("components", comp), ("tokens", ig), ("confirm", conf))
    }


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def memory_budget(device: torch.device, max_memory: int | str | None = "auto") -> int | None:
    """Bytes a stage may add above the loaded model: ``max_memory`` (bytes or a size such as
    ``2GiB``), or with ``auto`` 90% of what the device has free now, at most
    ``CPU_AUTO_BUDGET`` on a CPU. None: no limit known. Raises ``TraceError`` on a bad size."""
    from rca.trace.components import TraceError

    if max_memory != "auto":
        try:
            return parse_size(max_memory)
        except ValueError as e:
            raise TraceError(f"--max-memory: {e}") from None
    budget = available_memory(device)
    if budget is None:
        return None
    budget = int(budget * 0.9)
    return min(budget, CPU_AUTO_BUDGET) if device.type == "cpu" else budget


def plan_trace(
    subject: Any,
    *,
    length: int,
    rows: int,
    keep: int | None = None,
    method: str = "eap-ig",
    steps: int = 8,
    neurons: bool = False,
    edges: bool = True,
    max_memory: int | str | None = "auto",
    ig_batch: int = 16,
    confirm_batch: int = 32,
) -> MemoryPlan:
    """The largest chunks whose estimate fits ``max_memory`` (``auto``: what is free now).

    Raises ``TraceError`` with the estimate when nothing fits.
    """
    from rca.trace.components import TraceError

    budget = memory_budget(subject.device, max_memory)
    n_steps = 1 if method == "atp" else steps
    H = subject.adapter.n_heads
    kw: dict[str, Any] = dict(
        length=length,
        rows=rows,
        keep=keep,
        method=method,
        steps=steps,
        neurons=neurons,
        edges=edges,
    )

    def est(k: int, hc: int, ig: int, cb: int) -> dict[str, int]:
        return estimate_trace(
            subject, step_chunk=k, head_chunk=hc, ig_batch=ig, confirm_batch=cb, **kw
        )

    full_stages = est(n_steps, H, ig_batch, confirm_batch)
    full = max(full_stages.values())
    if budget is None:
        return MemoryPlan(n_steps, H, ig_batch, confirm_batch, None, full, full_stages, full)

    # each stage is chunked on its own; the components stage trades steps first, then heads
    comp_choice = None
    for k in _halvings(n_steps):
        for hc in _halvings(H):
            if est(k, hc, 1, 1)["components"] <= budget:
                comp_choice = (k, hc)
                break
        if comp_choice:
            break
    ig = next((b for b in _halvings(ig_batch) if est(1, 1, b, 1)["tokens"] <= budget), None)
    cb = next((b for b in _halvings(confirm_batch) if est(1, 1, 1, b)["confirm"] <= budget), None)
    if comp_choice is None or ig is None or cb is None:
        least = est(1, 1, 1, 1)
        worst = max(least, key=lambda n: least[n])
        raise TraceError(
            f"this trace needs about {format_bytes(least[worst])} ({worst} stage, "
            f"{length} tokens) even in its smallest chunks, and the memory budget is "
            f"{format_bytes(budget)}; shorten the prompt, or raise --max-memory"
        )
    stages = est(comp_choice[0], comp_choice[1], ig, cb)
    return MemoryPlan(
        comp_choice[0], comp_choice[1], ig, cb, budget, max(stages.values()), stages, full
    )


def plan_for_target(subject: Any, target: Any, **options: Any) -> MemoryPlan:
    """``plan_trace`` for an encoded ``Target``: its length, rows and kept logit positions.

    ``options``: ``plan_trace``'s keywords (method, steps, neurons, edges, max_memory, ...)."""
    return plan_trace(subject, length=target.length, rows=target.rows, keep=target.keep, **options)
