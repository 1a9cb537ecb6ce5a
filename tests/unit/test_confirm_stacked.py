"""Ablations of several targets in one pass change no target's metrics: ``run_stacked`` gives
each ablator what its own ``run`` gives, for targets of different lengths and continuations,
patched from their counterfactuals or to reference means and resamples, heads, MLPs, neuron
groups, single positions and direct-effect variants (the layers above held clean), on GPT-2
and Llama, in one pass or many."""

from __future__ import annotations

import pytest
import torch

from rca.confirm.engine import Ablator, Variant, run_stacked
from rca.model.metric import Target
from rca.model.subject import Subject
from tests.helpers import tiny_model, word_tokenizer

REFS = [" ".join(f"w{i}" for i in range(k, k + 6)) for k in range(0, 30, 6)]


def _ablators(s: Subject, *, memo: bool) -> list[Ablator]:
    out = []
    for k in range(5):
        n = 4 + 3 * k  # prompts of 4 to 16 tokens
        prompt = tuple(5 + (3 * k + j) % 40 for j in range(n))
        bad = (7 + k,) if k % 2 else (7 + k, 9, 11)
        good = None if k == 3 else (30 + k,)
        t = Target(prompt, bad, good)
        if k % 2:
            other = (*prompt[:2], 47, *prompt[3:])
            ab = Ablator(s, t, baseline=t.with_prompt(other), reference=REFS, memo=memo)
        else:
            ab = Ablator(s, t, reference=REFS, memo=memo)
        ab.record_neurons([0, s.adapter.n_layers - 1])
        out.append(ab)
    return out


def _runs(ab: Ablator) -> list[Variant]:
    src = "baseline" if ab.base is not None else "mean"
    top = ab.adapter.n_layers - 1
    runs: list[Variant] = [{c: src} for c in ab.components]
    runs += [
        {"L0.H1": "zero", f"L{top}.MLP": src},
        {"L0.N3+5+9": src},
        {f"L{top}.N1+2": "resample"},
        {"L1.H0@2": src},
        {"L0.H0": "resample", "L1.H1": "resample"},
        # a direct effect: the layers above the patched head are held clean
        {"L0.H1": src, **{c: "clean" for layer in ab.layer_components[1:] for c in layer}},
        {},
    ]
    return runs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [3, 64])
def test_stacked_ablations_equal_each_target_s_own(arch: str, batch_size: int) -> None:
    s = Subject.from_model(tiny_model(arch, seed=5), word_tokenizer())
    own = _ablators(s, memo=False)
    want = [ab.run(_runs(ab), index_offset=100 * j) for j, ab in enumerate(own)]
    stacked = _ablators(s, memo=False)
    got = run_stacked(
        [(ab, _runs(ab)) for ab in stacked],
        index_offsets=[100 * j for j in range(len(stacked))],
        batch_size=batch_size,
    )
    for ab, w, g in zip(stacked, want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        # the experiments do something: most variants move the metric
        moved = (w - ab.metric_clean).abs() > 1e-4
        assert moved.float().mean() > 0.5
        assert g[-1] == pytest.approx(ab.metric_clean, abs=1e-5)  # the empty variant


def test_stacked_runs_share_passes_and_keep_each_memo() -> None:
    s = Subject.from_model(tiny_model("gpt2", seed=5), word_tokenizer())
    abs_ = _ablators(s, memo=True)
    runs = [[{c: "zero"} for c in ab.components[:6]] for ab in abs_]
    n_rows = sum(ab.target.rows * len(r) for ab, r in zip(abs_, runs, strict=True))
    first = run_stacked(list(zip(abs_, runs, strict=True)), batch_size=64)
    assert sum(ab.n_forward_rows for ab in abs_) == n_rows
    again = [ab.run(r) for ab, r in zip(abs_, runs, strict=True)]  # answered by each memo
    assert sum(ab.n_forward_rows for ab in abs_) == n_rows
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
