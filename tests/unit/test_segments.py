"""Segment ablation must report what replacing a segment really does to the metric.

Each segment's score is checked against the metric of the prompt run with that segment's
tokens replaced by the neutral token, computed here without captum; batching the ablated
prompts (``batch``) must not change a score.
"""

from __future__ import annotations

import pytest
import torch

from rca.metric import Target
from rca.subject import Subject
from rca.trace.tokens import neutral_token_id, segment_ablation
from tests.helpers import tiny_model, word_tokenizer

PROMPT = (5, 6, 7, 8, 9, 10, 11)
BAD, GOOD = (12, 13), (14,)
SEGMENTS = [(0, 2), (2, 3), (3, 6), (6, 7)]


def _metric(s: Subject, t: Target, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(t.metric(s.model(input_ids=ids).logits)[0])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_segment_scores_are_the_metric_drop_of_replacing_the_segment(model_type: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=3), word_tokenizer())
    tgt = Target(PROMPT, BAD, GOOD)
    neutral = neutral_token_id(s.tokenizer)
    clean = _metric(s, tgt, tgt.input_ids())
    real = []
    for a, b in SEGMENTS:
        ids = tgt.input_ids().clone()
        ids[:, a:b] = neutral  # every row: the continuations follow the same prompt
        real.append(clean - _metric(s, tgt, ids))
    assert max(abs(r) for r in real) > 1e-3  # the test is not vacuous
    for batch in (1, 3, 8):
        seg = segment_ablation(s, tgt, segments=SEGMENTS, batch=batch)
        torch.testing.assert_close(
            torch.tensor(seg.scores), torch.tensor(real), atol=1e-5, rtol=1e-4
        )
        assert seg.metric == pytest.approx(clean, abs=1e-6)
