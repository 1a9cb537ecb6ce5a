"""rca's cost benchmarks: `make bench` (or `python benchmarks/run.py`), `--smoke` for CI.

Each measurement runs in its own subprocess (`--one KEY`), so its peak RSS is its own. Writes
`results.json`, PNG plots and `summary.md` (the tables docs/benchmarks.md carries) to `--out`.
The driver is ``driver``, the tables and plots ``report``, the random models and the clocks
``common``; each section is measured by the module named in brackets:

- trace (``trace``): node + edge scoring (AtP and EAP-IG, 8 steps) as a ratio to one
  forward+backward of the same model and prompt, GPT-2-style random models from 2 x 64 to
  12 x 768, prompts of 16 to 512 tokens;
- alternatives (``trace``): exhaustive node patching (one forward per head and MLP, measured),
  exhaustive edge patching (one forward per edge: a measured forward times the edge count,
  extrapolated), captum LayerIntegratedGradients looped per layer (a sample of layers
  measured, extrapolated to all), each against rca's trace;
- ablation (``ablation``): 256 single-component ablation sets through rca.confirm.Ablator
  (batched, reusing the layers below the first ablated one) against sequential hook-based runs;
- investigation (``investigation``): the whole pipeline (trace, confirm, remedy, record) on the
  12 x 768 model at 128 tokens, wall time and peak RSS;
- store (``store``): write throughput in rows/s, and the share of an investigation's wall time
  spent outside the model;
- real (``real``): a full investigation of each real case (cases/real/, SmolLM2-135M-Instruct,
  fetched with `rca zoo fetch smollm2-135m`), split by stage, with peak RSS (target: <= 90 s
  and <= 2 GB for an incident of <= 64 tokens); skipped where the model is not fetched;
- accuracy: the localization figures, read from a saved `rca bench localization --out` file;
- natural (``real``; `--only natural` only; default `--out benchmarks/results-natural`):
  indirect-object identification incidents on SmolLM2-135M-Instruct, each head's and MLP's
  exact direct effect against rca's verdict (`rca.bench.natural`: `natural.json`,
  `natural.md`); skipped with a message where the model is not fetched.

Devices (`--device`): `auto` measures the trace, the alternatives, the ablation and the
investigation on the CPU and, where a GPU is present, again on CUDA (each row has its
`device`; CUDA rows add the peak memory allocated on the device and wait for its queued work
before every clock read); `cpu` or `cuda` measures on one.

Timings are medians of 3 runs after a warm-up (one run after the warm-up for the 6 x 256 and
12 x 768 EAP-IG traces on a CPU), on `torch.get_num_threads()` threads. Nothing
here asserts a time: the targets are reported beside the measured values.
"""

from __future__ import annotations

from rca.bench.cost.driver import MEASURES, machine, main
from rca.bench.cost.report import plots, summary

__all__ = ["MEASURES", "machine", "main", "plots", "summary"]
