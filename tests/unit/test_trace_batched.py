"""Scoring many prompts in one pass changes no prompt's scores: the batched node scores equal
each prompt's own trace, for prompts of different lengths and continuations, patched to their
counterfactuals or to the reference means, in one pass or split over several by the memory
budget, on a model whose embedding write is its first layer's input (Llama) and on one whose
is not (GPT-2)."""

from __future__ import annotations

import pytest
import torch

from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.components import Baseline, score_components, score_nodes_batched, site_means
from rca.trace.memory import estimate_trace
from tests.helpers import tiny_model, word_tokenizer


def _items(s: Subject) -> list[tuple[Target, Baseline]]:
    means = site_means(s, [" ".join(f"w{i}" for i in range(k, k + 6)) for k in range(0, 30, 6)])
    items = []
    for k in range(6):
        n = 4 + 2 * k  # prompts of 4 to 14 tokens
        prompt = tuple(5 + (3 * k + j) % 40 for j in range(n))
        other = (*prompt[:2], 47, *prompt[3:])
        # one or two continuation rows, of one to three tokens
        bad = (7 + k,) if k % 2 else (7 + k, 9, 11)
        good = None if k == 3 else (30 + k,)
        t = Target(prompt, bad, good)
        if k % 3 == 2:
            items.append((t, Baseline("mean", "reference means", means=means)))
        else:
            items.append((t, Baseline("counterfactual", "cf", target=t.with_prompt(other))))
    return items


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("budget", ["auto", "one"])
def test_batched_node_scores_equal_each_prompt_s_own(arch: str, budget: str) -> None:
    s = Subject.from_model(tiny_model(arch, seed=3), word_tokenizer())
    items = _items(s)
    if budget == "one":  # no room for two prompts' pass: every prompt alone
        limit = min(
            estimate_trace(s, length=t.length, rows=t.rows, keep=t.keep, method="atp", edges=False)[
                "components"
            ]
            for t, _ in items
        )
    else:
        limit = 1 << 34
    got = score_nodes_batched(s, items, max_memory=limit)
    passes = {sc.cost["pass"] for sc in got}
    assert len(passes) == (len(items) if budget == "one" else 2)  # one per baseline kind
    for (t, b), sc in zip(items, got, strict=True):
        want = score_components(s, t, b, method="atp", edges=False)
        assert sc.nodes == want.nodes
        assert sc.metric_clean == pytest.approx(want.metric_clean, rel=1e-5, abs=1e-6)
        assert sc.metric_baseline == pytest.approx(want.metric_baseline, rel=1e-5, abs=1e-6)
        assert sc.per_position.shape == want.per_position.shape
        # float summation order only: within 1e-5 of the largest score
        scale = float(want.per_position.abs().max())
        torch.testing.assert_close(sc.per_position, want.per_position, rtol=1e-4, atol=1e-5 * scale)
