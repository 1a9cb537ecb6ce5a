"""Memory: the trace's peak is estimated before it runs, chunked to fit a budget, or refused.

Chunking must not change a score (beyond float summation order); the estimate must bound the
peak that a real run reaches (measured as peak RSS in a fresh process); and a run planned under
a budget must stay under it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rca.ingest.incident import Incident
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace import trace
from rca.trace.components import Baseline, TraceError, score_components
from rca.trace.memory import format_bytes, parse_size, plan_trace
from tests.helpers import tiny_model, word_tokenizer, words

PROMPT = (5, 6, 7, 8, 9, 10, 14, 15)
CF = (5, 6, 20, 8, 9, 10, 14, 15)
BAD, GOOD = (11, 12), (13,)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    assert float((a - b).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("method", ["eap-ig", "atp"])
def test_chunked_scores_equal_unchunked(model_type: str, method: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=2).eval())
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    base = Baseline("counterfactual", "cf", target=cf)
    whole = score_components(s, tgt, base, method=method, steps=6, neurons=True)
    for step_chunk, head_chunk in ((1, 1), (4, 3), (5, None)):
        part = score_components(
            s,
            tgt,
            base,
            method=method,
            steps=6,
            neurons=True,
            step_chunk=step_chunk,
            head_chunk=head_chunk,
        )
        if method == "eap-ig":
            assert part.cost["gradient_passes"] == -(-6 // step_chunk)
        _close(part.scores, whole.scores)
        assert part.edges is not None and whole.edges is not None
        _close(part.edges, whole.edges)
        assert part.emb_edges is not None and whole.emb_edges is not None
        _close(part.emb_edges, whole.emb_edges)
        assert part.neurons.keys() == whole.neurons.keys()
        _close(
            torch.tensor(list(part.neurons.values())), torch.tensor(list(whole.neurons.values()))
        )


def _subject(T: int = 64) -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=0, n_positions=max(64, T)).eval())


def test_a_smaller_budget_chooses_smaller_chunks_and_fits() -> None:
    s = _subject()
    free = plan_trace(s, length=64, rows=2, max_memory=None)
    assert not free.chunked and free.step_chunk == 8
    tight = plan_trace(s, length=64, rows=2, max_memory=free.full - 1)
    assert tight.chunked
    assert tight.estimate <= free.full - 1 < tight.full
    chunks = ("step_chunk", "head_chunk", "ig_batch", "confirm_batch")
    smaller = [c for c in chunks if getattr(tight, c) < getattr(free, c)]
    assert smaller and all(getattr(tight, c) <= getattr(free, c) for c in chunks)


def test_a_budget_nothing_fits_is_refused_with_the_estimate() -> None:
    s = _subject()
    least = plan_trace(s, length=64, rows=2, max_memory=None)
    with pytest.raises(TraceError) as e:
        plan_trace(s, length=64, rows=2, max_memory="1M")
    msg = str(e.value)
    assert "needs about" in msg and "--max-memory" in msg and "1.0 MiB" in msg
    assert "\n" not in msg
    # the figure it names is the smallest-chunk estimate, not the unchunked one
    assert format_bytes(least.full) not in msg


@pytest.mark.parametrize(
    ("text", "size"), [("4G", 4 << 30), ("512MiB", 512 << 20), ("1.5GB", 3 << 29), ("2m", 2 << 20)]
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["banana", "-1G", "10", "4 G B", ""])
def test_bad_sizes_name_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="e.g. 4G"):
        parse_size(text)


def test_trace_under_a_budget_gives_the_same_answer(tmp_path: Path) -> None:
    s = _subject()
    s.tokenizer = word_tokenizer()
    inc = Incident(
        id="mem",
        title="t",
        severity="low",
        model="m",
        prompt=words(1, 2, 3, 4, 5, 6, 7, 8),
        bad=" " + words(9),
        good=" " + words(10),
        counterfactual=words(1, 2, 3, 11, 5, 6, 7, 8),
    )
    free = trace(s, inc, max_memory=None, ig_steps=8)
    assert free.memory is not None
    tight = trace(s, inc, max_memory=free.memory.full - 1, ig_steps=8)
    assert tight.memory is not None and tight.memory.chunked
    _close(tight.components.scores, free.components.scores)
    assert tight.components.edges is not None and free.components.edges is not None
    _close(tight.components.edges, free.components.edges)
    j = tight.to_json()
    assert j["cost"]["memory"]["step_chunk"] == tight.memory.step_chunk


# ---------------------------------------------------------------------------------------------
# the estimate against a real peak, in a fresh process (peak RSS counts every allocation)

CHILD = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from rca.model.subject import Subject
from rca.model.metric import Target
from rca.trace.components import Baseline, score_components
from rca.trace.memory import plan_trace

arch, L, d, H, T, budget = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
V = 1000
if arch == "gpt2":
    cfg = GPT2Config(n_layer=L, n_embd=d, n_head=H, vocab_size=V, n_positions=T + 8)
    model = GPT2LMHeadModel(cfg)
else:
    cfg = LlamaConfig(num_hidden_layers=L, hidden_size=d, num_attention_heads=H,
                      intermediate_size=d * 3, vocab_size=V, max_position_embeddings=T + 8)
    model = LlamaForCausalLM(cfg)
model.config._attn_implementation = "eager"
s = Subject.from_model(model.eval())
g = torch.Generator().manual_seed(1)
# two-token continuations that cannot share a row: two rows, so the trace, not the fixed
# overhead, dominates the peak even under the budget test's three quarters
tgt = Target(tuple(torch.randint(0, V, (T - 2,), generator=g).tolist()), (5, 6), (7, 8))
cf = Target(tuple(torch.randint(0, V, (T - 2,), generator=g).tolist()), (5, 6), (7, 8))
assert tgt.rows == 2
with torch.no_grad():
    model(input_ids=tgt.input_ids())
# start autograd's machinery on a short input, so that its one-time allocations are not
# counted as the trace's (their own peak stays far below the trace's)
model(input_ids=tgt.input_ids()[:, :8]).logits.sum().backward()
model.zero_grad(set_to_none=True)
budget = None if budget == "none" else int(budget)
plan = plan_trace(s, length=tgt.length, rows=tgt.rows, keep=tgt.keep, max_memory=budget)
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
# the peak of the trace alone: reset the kernel's high-water mark of this process's RSS, so that
# no transient from before (imports, the warm-up) counts as the trace's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
score_components(s, tgt, Baseline("counterfactual", "cf", target=cf), method="eap-ig", steps=8,
                 step_chunk=plan.step_chunk, head_chunk=plan.head_chunk)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"measured": peak - before, "estimate": plan.stages["components"],
                  "full": plan.full, "step_chunk": plan.step_chunk, "head_chunk": plan.head_chunk}))
"""


def _measure(arch: str, L: int, d: int, H: int, T: int, budget: str = "none") -> dict[str, int]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, arch, str(L), str(d), str(H), str(T), budget],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("arch", "L", "d", "H", "T"), [("gpt2", 2, 128, 8, 256), ("llama", 2, 128, 4, 256)]
)
def test_the_estimate_bounds_the_measured_peak(arch: str, L: int, d: int, H: int, T: int) -> None:
    r = _measure(arch, L, d, H, T)
    assert r["measured"] > 100 << 20  # the trace dominates what is measured
    assert r["measured"] <= r["estimate"] <= 2.5 * r["measured"], r


def test_a_run_planned_under_a_budget_stays_under_it() -> None:
    full = _measure("gpt2", 2, 128, 8, 256)
    # three quarters of what the unchunked run really takes: above the smallest chunks' estimate
    # (one point, one head), below the whole run
    budget = full["measured"] * 3 // 4
    r = _measure("gpt2", 2, 128, 8, 256, str(budget))
    assert (r["step_chunk"], r["head_chunk"]) < (8, 8)
    assert r["measured"] <= budget, r
