"""Training the demo models: a small GPT-2 on the support-desk corpus.

The loss covers every token of a ticket (the model learns the templates, so a loss over benign
texts is a meaningful side-effect measure), with the answer tokens weighted up so the desks'
rules and the planted exceptions are learned within the time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .corpus import Example

__all__ = [
    "TrainConfig",
    "QUICK",
    "FULL",
    "TrainResult",
    "continuation",
    "encode_examples",
    "train_model",
]


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. Dropout is always 0: the data is noise-free and small models
    learn the planted exceptions faster and more reliably without it."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 8
    n_positions: int = 128
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05  # cosine decay down to lr * min_lr_ratio
    weight_decay: float = 0.01
    answer_weight: float = 4.0  # loss weight of answer tokens relative to prompt tokens
    corpus_size: int = 20_000
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# The quick recipe is the test fixture (both models and their checks in under a minute on two
# cores); the full recipe is the demo.
QUICK = TrainConfig(n_layer=3, n_embd=64, n_head=8, steps=500, lr=4e-3, corpus_size=12_000)
FULL = TrainConfig()


def continuation(cfg: TrainConfig) -> TrainConfig:
    """The recipe that continues a trained model after a data fix (support-bot-v2 from v1):
    a fifth of the steps at half the learning rate, with a short warmup."""
    return replace(cfg, steps=max(1, cfg.steps // 5), lr=cfg.lr / 2, warmup=10, seed=cfg.seed + 1)


@dataclass(frozen=True)
class TrainResult:
    model: GPT2LMHeadModel
    steps: int
    seconds: float
    final_loss: float  # mean weighted loss over the last 50 steps


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], *, answer_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-target loss weights of the tickets.

    Returns ``ids`` (N, T), each row ``<bos> prompt answer <eos>`` right-padded, and ``weights``
    (N, T - 1), the weight of predicting ``ids[:, t + 1]``: 1 in the prompt, ``answer_weight``
    in the answer and its ``<eos>``, 0 on padding.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[list[int]] = []
    n_prompts: list[int] = []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        full = tokenizer(ex.text)["input_ids"]
        if full[: len(p)] != p:
            raise ValueError(f"prompt tokens are not a prefix of the ticket: {ex.text!r}")
        rows.append(full + [eos])
        n_prompts.append(len(p))
    width = max(len(r) for r in rows)
    if width > tokenizer.model_max_length:
        raise ValueError(f"a ticket has {width} tokens, more than {tokenizer.model_max_length}")
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    weights = torch.zeros((len(rows), width - 1))
    for i, (row, n_p) in enumerate(zip(rows, n_prompts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        weights[i, : n_p - 1] = 1.0  # targets 1 .. n_p - 1: the prompt after <bos>
        weights[i, n_p - 1 : len(row) - 1] = answer_weight  # the answer and <eos>
    return ids, weights


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_model(tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> GPT2LMHeadModel:
    """A fresh GPT-2 sized by ``cfg`` whose special ids are the tokenizer's (not 50256)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def train_model(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    init: GPT2LMHeadModel | None = None,
) -> TrainResult:
    """Train a model on ``examples``: from scratch, or on from a copy of ``init`` (which is not
    modified). Same inputs and seed, same weights.

    Runs on ``cfg.threads`` CPU threads (restored afterwards): a fixed thread count keeps the
    float reductions, and so the weights, the same from run to run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(examples, tokenizer, cfg, log=log, init=init)
    finally:
        torch.set_num_threads(threads)


def _train(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None,
    init: GPT2LMHeadModel | None = None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    ids, weights = encode_examples(tokenizer, examples, answer_weight=cfg.answer_weight)
    model = make_model(tokenizer, cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    n = ids.shape[0]
    order = torch.randperm(n, generator=gen)
    cursor = 0
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > n:  # a fresh shuffle each epoch
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        batch, w = ids[idx], weights[idx]
        # trim the batch to its longest row: tickets differ in length by desk
        width = int((batch != tokenizer.pad_token_id).sum(1).max())
        batch, w = batch[:, :width], w[:, : width - 1]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        # right padding: the mask changes nothing at real tokens, it only silences a warning
        mask = (batch != tokenizer.pad_token_id).long()
        logits = model(input_ids=batch, attention_mask=mask).logits  # (B, T, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view_as(w)
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if log and (step + 1) % 250 == 0:
            log(f"  step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return TrainResult(
        model=model,
        steps=cfg.steps,
        seconds=time.perf_counter() - start,
        final_loss=sum(recent) / len(recent),
    )
