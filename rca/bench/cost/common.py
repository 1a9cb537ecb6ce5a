"""What every cost measurement shares: the random GPT-2 models and prompts it measures on, and
its clocks and memory readings.

The models are GPT-2-style with random weights over a word-level vocabulary of ``VOCAB`` tokens
``w0 w1 ...`` (``CONFIGS``: layers x width, heads); a prompt is ``length`` random tokens, its
counterfactual the same with the middle token changed. Timings wait for a device's queued work
before every clock read.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONFIGS",
    "LENGTHS",
    "MAX_MEMORY_GB",
    "SMOKE_CONFIGS",
    "SMOKE_LENGTHS",
    "VOCAB",
    "median_time",
    "peak_rss_mb",
    "peaks",
    "random_subject",
    "random_targets",
    "rss_now",
    "sync",
    "timed",
    "word_tokenizer",
]

CONFIGS = {"2x64": (2, 64, 4), "4x128": (4, 128, 4), "6x256": (6, 256, 8), "12x768": (12, 768, 12)}
LENGTHS = (16, 128, 512)
SMOKE_CONFIGS, SMOKE_LENGTHS = ("2x64",), (16,)
VOCAB = 2000
MAX_MEMORY_GB = 14.0  # address-space limit of each measurement's subprocess


def rss_now() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: str) -> None:
    """Wait for the device's queued work: a CUDA kernel launch returns before it runs."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """One run's wall time, the device's queued work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def median_time(fn: Callable[[], Any], *, repeats: int = 3, device: str = "cpu") -> float:
    """The median of ``repeats`` timed runs after one warm-up run."""
    timed(fn, device)  # warm-up
    return statistics.median(timed(fn, device) for _ in range(repeats))


def peaks(device: str) -> dict[str, float]:
    """Peak RSS of this process; on CUDA also the peak memory allocated on the device."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        import torch

        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=1024,
    )


def random_subject(name: str, device: str = "cpu") -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rca.model.subject import Subject

    n_layer, d, heads = CONFIGS[name]
    torch.manual_seed(0)
    cfg = GPT2Config(  # type: ignore[call-arg]  # attn_implementation: a PretrainedConfig kwarg
        vocab_size=VOCAB,
        n_positions=1024,
        n_embd=d,
        n_layer=n_layer,
        n_head=heads,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg).eval().to(device)
    return Subject.from_model(model, word_tokenizer())


def random_targets(length: int) -> tuple[Any, Any]:
    import random

    from rca.model.metric import Target

    rng = random.Random(length)
    prompt = [rng.randrange(4, VOCAB) for _ in range(length)]
    cf = list(prompt)
    cf[length // 2] = (cf[length // 2] + 1 - 4) % (VOCAB - 4) + 4
    return Target(tuple(prompt), (10,), (11,)), Target(tuple(cf), (10,), (11,))
