"""The CUDA path: the same scores and ablations on the GPU as on the CPU.

Marked ``gpu``: skipped where torch.cuda.is_available() is false (CI); `make test-gpu` runs them
on a machine with a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rca.confirm import Ablator
from rca.model.metric import Target
from rca.model.subject import Subject, load_subject
from rca.trace.components import Baseline, score_components
from rca.trace.tokens import integrated_gradients
from tests.helpers import save_model_dir, tiny_model, word_tokenizer

pytestmark = pytest.mark.gpu

TGT = Target((5, 6, 7, 8, 9, 10), (11, 12), (13,))
CF = Target((5, 6, 20, 8, 9, 10), (11, 12), (13,))


def test_auto_device_is_cuda(tmp_path: Path) -> None:
    d = save_model_dir(tmp_path / "m", tiny_model("llama", seed=1), word_tokenizer())
    s = load_subject(d, device="auto")
    assert s.device.type == "cuda" and s.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2"])
def test_trace_on_cuda_matches_cpu(model_type: str) -> None:
    cpu = Subject.from_model(tiny_model(model_type, seed=1).eval())
    gpu = Subject.from_model(tiny_model(model_type, seed=1).eval().cuda())
    base = Baseline("counterfactual", "cf", target=CF)
    for method in ("atp", "eap-ig"):
        a = score_components(cpu, TGT, base, method=method, steps=4)
        b = score_components(gpu, TGT, base, method=method, steps=4)
        assert a.edges is not None and b.edges is not None
        torch.testing.assert_close(b.scores, a.scores, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(b.edges, a.edges, atol=1e-4, rtol=1e-3)


def test_ablation_on_cuda_matches_cpu() -> None:
    refs = [(20, 21, 22, 23, 24), (30, 31, 32)]
    variants = [{"L1.H2": "mean"}, {"L0.MLP": "zero", "L1.H0": "resample"}, {"L0.H1": "baseline"}]
    out = []
    for dev in ("cpu", "cuda"):
        s = Subject.from_model(tiny_model("llama", seed=1).eval().to(dev))
        out.append(Ablator(s, TGT, baseline=CF, reference=refs, batch_size=2).run(variants))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)


def test_integrated_gradients_on_cuda(tmp_path: Path) -> None:
    d = save_model_dir(tmp_path / "m", tiny_model("gpt2", seed=3), word_tokenizer())
    ts_gpu = integrated_gradients(load_subject(d, device="cuda"), TGT, n_steps=32)
    ts_cpu = integrated_gradients(load_subject(d, device="cpu"), TGT, n_steps=32)
    torch.testing.assert_close(
        torch.tensor(ts_gpu.scores), torch.tensor(ts_cpu.scores), atol=1e-4, rtol=1e-3
    )
    assert ts_gpu.completeness["relative_error"] < 0.05


def test_mean_activations_and_remedies_on_cuda(tmp_path: Path) -> None:
    """Regression: mean_activations once mixed CPU counts with CUDA sums."""
    from rca.model.hooks import mean_activations
    from rca.remedy import try_remedies
    from tests.helpers import words

    d = save_model_dir(tmp_path / "m", tiny_model("gpt2", seed=5), word_tokenizer())
    refs = [words(*range(i, i + 6)) for i in range(0, 30, 6)]
    out = []
    for dev in ("cpu", "cuda"):
        s = load_subject(d, device=dev)
        m = mean_activations(s, refs, ["L1.H2", "L0.MLP", "L1.N3"])
        out.append({k: v.cpu() for k, v in m.items()})
        rs = try_remedies(s, TGT, ["L1.H2", "L0.MLP"], counterfactual=CF, reference=refs)
        assert sum(r.recommended for r in rs) == 1
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], atol=1e-5, rtol=1e-4)
