"""Training on the support-desk corpus: the demo zoo's GPT-2 models and the benchmark hosts.

One loop (``train_model``) trains every model rca builds: AdamW, a linear warmup then cosine
decay, a fixed seed for the weights and the data order. The loss covers every token of a
ticket (the model learns the templates, so a loss over benign texts is a meaningful
side-effect measure), with the answer tokens weighted up so the desks' rules and the planted
exceptions are learned within the time budget. ``ModelSpec`` picks the architecture (GPT-2 or
Llama) and the MLP width; ``TrainConfig`` holds the other sizes and the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .corpus import Example

__all__ = [
    "TrainConfig",
    "QUICK",
    "FULL",
    "ModelSpec",
    "GPT2",
    "TrainProgress",
    "TrainResult",
    "continuation",
    "encode_examples",
    "lr_at",
    "make_model",
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
class ModelSpec:
    """The architecture a recipe trains; the layer count, width and heads are the recipe's.
    A Llama host has as many key-value heads as heads, so that every head owns its keys and
    values, and untied embeddings."""

    arch: str = "gpt2"  # gpt2 | llama
    d_mlp: int | None = None  # MLP width; None: GPT-2's own default, 4 * n_embd

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be gpt2 or llama, got {self.arch!r}")
        if self.arch == "llama" and self.d_mlp is None:
            raise ValueError("a Llama model needs its MLP width (d_mlp)")


GPT2 = ModelSpec()  # the demo zoo's models


class TrainProgress(NamedTuple):
    """Where training stands after a step (``train_model``'s ``on_step`` sees one per step)."""

    step: int  # steps done
    steps: int  # steps in all
    loss: float  # mean weighted loss over the last 50 steps
    seconds: float  # since the first step began


@dataclass(frozen=True)
class TrainResult:
    model: PreTrainedModel
    steps: int
    seconds: float
    final_loss: float  # mean weighted loss over the last 50 steps
    # the weights after each of the steps asked for (``train_model``'s ``checkpoints``; step 0:
    # before the first), on the CPU
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): a linear warmup, then a cosine decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_model(
    tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig, spec: ModelSpec = GPT2
) -> PreTrainedModel:
    """A fresh model of ``spec``'s architecture sized by ``cfg``, whose special ids are the
    tokenizer's (not GPT-2's 50256)."""
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "llama":
        assert spec.d_mlp is not None  # ModelSpec checks it
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.n_embd,
                intermediate_size=spec.d_mlp,
                num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.n_head,
                max_position_embeddings=cfg.n_positions,
                tie_word_embeddings=False,
                **special,
            )
        )
    gpt2: dict[str, Any] = {} if spec.d_mlp is None else {"n_inner": spec.d_mlp}
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **gpt2,
        **special,
    )
    return GPT2LMHeadModel(config)


def train_model(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    spec: ModelSpec = GPT2,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
    init: PreTrainedModel | None = None,
    checkpoints: Sequence[int] = (),
) -> TrainResult:
    """Train a model of ``spec`` on ``examples``: from scratch, or on from a copy of ``init``
    (which is not modified). Same inputs and seed (``cfg.seed``: the initial weights and the
    data order), same weights.

    ``log`` gets a line every 250 steps; ``on_step`` gets each step's ``TrainProgress``.
    ``checkpoints``: the steps after which a copy of the weights is kept
    (``TrainResult.checkpoints``; 0 is the weights before the first step).

    Runs on ``cfg.threads`` CPU threads (restored afterwards): a fixed thread count keeps the
    float reductions, and so the weights, the same from run to run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(
            examples,
            tokenizer,
            cfg,
            spec=spec,
            log=log,
            on_step=on_step,
            init=init,
            checkpoints=frozenset(checkpoints),
        )
    finally:
        torch.set_num_threads(threads)


def _train(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    *,
    spec: ModelSpec,
    log: Callable[[str], None] | None,
    on_step: Callable[[TrainProgress], None] | None,
    init: PreTrainedModel | None,
    checkpoints: frozenset[int],
) -> TrainResult:
    bad = sorted(s for s in checkpoints if not 0 <= s < cfg.steps)
    if bad:
        raise ValueError(f"checkpoint step {bad[0]} is not in 0..{cfg.steps - 1}")
    torch.manual_seed(cfg.seed)
    ids, weights = encode_examples(tokenizer, examples, answer_weight=cfg.answer_weight)
    model = make_model(tokenizer, cfg, spec)
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
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def keep(step: int) -> None:
        if step in checkpoints:
            kept[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    keep(0)
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
            group["lr"] = lr_at(step, cfg)
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
        if on_step is not None:
            mean = sum(recent) / len(recent)
            on_step(TrainProgress(step + 1, cfg.steps, mean, time.perf_counter() - start))
        keep(step + 1)
    model.eval()
    return TrainResult(
        model=model,
        steps=cfg.steps,
        seconds=time.perf_counter() - start,
        final_loss=sum(recent) / len(recent),
        checkpoints=kept,
    )
