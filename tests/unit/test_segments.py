"""Segment ablation must report what replacing a segment really does to the metric.

Each segment's score is checked against the metric of the prompt run with that segment's
tokens replaced by the neutral token, computed here by a full forward pass of its own, without
captum or a cache; batching the ablated prompts (``batch``) and reusing the clean prompt's
key/value cache for the positions before a batch's first segment must not change a score, on
every architecture (Gemma-2's sliding-window cache takes the full-forward path).
"""

from __future__ import annotations

import pytest
import torch

from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.tokens import neutral_token_id, prompt_cache, segment_ablation
from tests.helpers import ARCHS, tiny_model, word_tokenizer

PROMPT = (5, 6, 7, 8, 9, 10, 11)
BAD = (12, 13)
GOODS = {"one row": (14,), "two rows": (14, 15)}  # good read from bad's row, or its own
SEGMENTS = [(0, 2), (2, 3), (3, 6), (6, 7)]


def _metric(s: Subject, t: Target, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(t.metric(s.model(input_ids=ids).logits)[0])


@pytest.mark.parametrize("rows", list(GOODS))
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_segment_scores_are_the_metric_drop_of_replacing_the_segment(
    model_type: str, rows: str
) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=3), word_tokenizer())
    tgt = Target(PROMPT, BAD, GOODS[rows])
    assert tgt.rows == (1 if rows == "one row" else 2)
    neutral = neutral_token_id(s.tokenizer)
    clean = _metric(s, tgt, tgt.input_ids())
    real = []
    for a, b in SEGMENTS:
        ids = tgt.input_ids().clone()
        ids[:, a:b] = neutral  # every row: the continuations follow the same prompt
        real.append(clean - _metric(s, tgt, ids))
    assert max(abs(r) for r in real) > 1e-3  # the test is not vacuous
    with torch.no_grad():
        cached = prompt_cache(s, tgt) is not None
    assert cached == (model_type != "gemma2")  # the cached path is the one tested elsewhere
    for batch in (1, 3, 8):
        for prefix_cache in (True, False):
            seg = segment_ablation(
                s, tgt, segments=SEGMENTS, batch=batch, prefix_cache=prefix_cache
            )
            torch.testing.assert_close(
                torch.tensor(seg.scores), torch.tensor(real), atol=1e-5, rtol=1e-4
            )
            assert seg.metric == pytest.approx(clean, abs=1e-5)
