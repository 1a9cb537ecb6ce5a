"""Unlearning: the approximation of retraining without examples, for a model that cannot be
retrained here.

Retraining without the top-ranked examples (``rca.provenance.verify``) is the check that
counts, and only the zoo's models can have it. For any other model rca makes the examples'
training undone approximately, in memory: a few steps of gradient *ascent* on the examples'
training loss (descent on their mean per-token log-likelihood), restricted to the parameters
the ranking was taken over (the circuit's), each step kept only while the model's next-token
distributions on benign prompts stay within a KL bound of the original's. Then the incident is
measured again (the case's held-out variants, else its prompt), and the weights are put back.

The same is done with as many examples drawn at random, with the same settings: the control.
An incident that falls after unlearning the top examples and not after unlearning random ones
says that the examples' gradients run through what produces it; it does not show that the
model learned it from them. Ascent drives the examples' likelihood below what a model that
never saw them would give, and with it whatever they share with the incident: on the zoo,
unlearning the leak's top-ranked tickets (mostly clean requests of the same form) removes the
leak, which retraining without them leaves (docs/provenance.md has the table). Every figure is
labelled an approximation for that reason.

**The step.** The objective is the examples' mean per-token log-likelihood plus
``kl_weight`` times the mean KL(original || now) per next-token position on half of the benign
prompts (the *retain* half): the examples' training is undone while ordinary text keeps its
distributions, the objective rca's weight edit uses against P(bad) (``rca.remedy.edit``, the
same weight). Each step moves the parameters against the objective's gradient by ``step_size``
times the norm of the parameters (a step of fixed length, whatever the gradient's scale).
Where the step takes the mean KL on the other half (the *bound* half, never optimized) over
``kl_bound``, it is undone and tried again at half the length, up to ``MAX_HALVINGS`` times
in all; then the steps stop. The benign prompts are the incident's (``rca.ingest.preflight``'s),
each half run once without a change to keep its distributions (``rca.specificity.BenignRun``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rca.model.subject import Subject
from rca.provenance.influence import InfluenceError

__all__ = ["UnlearnConfig", "forget_loglik", "unlearned", "unlearning_check"]

MAX_HALVINGS = 6  # a step that breaks the KL bound is halved at most this often in all
LABEL = (
    "an approximation, not a retrain: gradient ascent on the examples' training loss within a "
    "benign KL bound, which can remove an incident the examples did not teach"
)


@dataclass(frozen=True)
class UnlearnConfig:
    steps: int = 10
    step_size: float = 0.02  # a step's length, as a share of the parameters' norm
    kl_bound: float = 0.05  # mean KL(original || unlearned) per benign next-token position, nats
    kl_weight: float = 4.0  # the retain half's KL in the objective (rca.remedy.edit's weight)
    n_benign: int = 64  # benign prompts the bound is measured on
    max_tokens: int = 256  # tokens kept per example
    batch: int = 16  # examples per forward and backward
    seed: int = 0  # draws the random control's examples

    def check(self) -> None:
        if self.steps < 1:
            raise InfluenceError(f"--unlearn-steps must be at least 1, got {self.steps}")
        if not 0.0 < self.step_size <= 1.0:
            raise InfluenceError(
                f"the unlearning step size must be in (0, 1], got {self.step_size}"
            )
        if not (self.kl_bound > 0.0 and math.isfinite(self.kl_bound)):
            raise InfluenceError(f"--unlearn-kl must be a positive number, got {self.kl_bound}")
        if self.kl_weight < 0.0 or not math.isfinite(self.kl_weight):
            raise InfluenceError(f"kl_weight must be a non-negative number, got {self.kl_weight}")
        if self.n_benign < 2 or self.max_tokens < 2 or self.batch < 1:
            raise InfluenceError("n_benign must be at least 2, batch 1, max_tokens 2")


def _encoded(subject: Subject, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    tok = subject.tokenizer
    rows = [list(tok(t)["input_ids"])[:max_tokens] for t in texts]
    return [r for r in rows if len(r) >= 2]


def _loglik_sum(subject: Subject, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
    """The sum of the rows' next-token log-probabilities (with its graph where grad is on), and
    how many tokens it sums: the rows right-padded, each read over its own positions."""
    dev = subject.device
    width = max(len(r) for r in rows)
    pad = subject.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=dev)
    lengths = torch.tensor([len(r) for r in rows], device=dev)
    mask = (torch.arange(width, device=dev)[None, :] < lengths[:, None]).long()
    logits = subject.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = mask[:, 1:].float()
    return (tok_lp * valid).sum(), int(valid.sum())


@torch.no_grad()
def forget_loglik(subject: Subject, texts: Sequence[str], *, max_tokens: int = 256) -> float:
    """The texts' mean next-token log-likelihood under the model as it is."""
    rows = _encoded(subject, texts, max_tokens)
    if not rows:
        raise InfluenceError("the examples to unlearn encode to fewer than two tokens each")
    total, n = 0.0, 0
    for i in range(0, len(rows), 16):
        s, k = _loglik_sum(subject, rows[i : i + 16])
        total, n = total + float(s), n + k
    return total / n


def _gradient(
    subject: Subject,
    params: Sequence[torch.nn.Parameter],
    rows: Sequence[Sequence[int]],
    retain: Any,
    cfg: UnlearnConfig,
) -> list[torch.Tensor]:
    """The gradient, with respect to ``params``, of the rows' mean per-token log-likelihood
    plus ``kl_weight`` times the mean KL(original || now) per position on ``retain`` (a
    ``BenignRun`` of the original model)."""
    n_tokens = sum(len(r) - 1 for r in rows)
    grads = [torch.zeros_like(p) for p in params]

    def add(value: torch.Tensor) -> None:
        got = torch.autograd.grad(value, list(params), allow_unused=True)
        for acc, g in zip(grads, got, strict=True):
            if g is not None:
                acc += g

    with torch.enable_grad():
        for i in range(0, len(rows), cfg.batch):
            s, _ = _loglik_sum(subject, rows[i : i + cfg.batch])
            add(s / n_tokens)
        if retain is None or cfg.kl_weight == 0.0:
            return grads
        done = 0
        for chunk, ids, mask in retain.chunks:
            logits = subject.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            kl = logits.new_zeros(())
            for row, q in enumerate(chunk):
                ref = retain.logps[done + row].clone()  # not an inference tensor
                now = torch.log_softmax(logits[row, : len(q) - 1].float(), -1)
                kl = kl + (ref.exp() * (ref - now)).sum()
            done += len(chunk)
            add(cfg.kl_weight * kl / retain.n_scored)
    return grads


@contextlib.contextmanager
def unlearned(
    subject: Subject,
    param_names: Sequence[str],
    texts: Sequence[str],
    benign: Any,
    cfg: UnlearnConfig,
    retain: Any = None,
) -> Iterator[dict[str, Any]]:
    """The model with ``texts`` unlearned over ``param_names`` (see the module docstring) for
    the body of the ``with``; it yields what the steps did, and every parameter is put back on
    exit, an exception's too. ``benign`` (the bound's) and ``retain`` (the objective's KL term;
    None: none): ``BenignRun``s of the original model on different prompts."""
    cfg.check()
    named = dict(subject.model.named_parameters())
    missing = [n for n in param_names if n not in named]
    if missing:
        raise InfluenceError(f"the model has no parameter {missing[0]!r} to unlearn over")
    params = [named[n] for n in param_names]
    rows = _encoded(subject, texts, cfg.max_tokens)
    if not rows:
        raise InfluenceError("the examples to unlearn encode to fewer than two tokens each")
    original = [p.detach().clone() for p in params]
    flags = {n: p.requires_grad for n, p in named.items()}
    t0 = time.perf_counter()
    try:
        for n, p in named.items():
            p.requires_grad_(n in set(param_names))
        before = forget_loglik(subject, texts, max_tokens=cfg.max_tokens)
        p_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
        length = cfg.step_size
        taken = halvings = 0
        side: dict[str, float] = {"kl_mean": 0.0, "loss_change_pct": 0.0}
        for _ in range(cfg.steps):
            grads = _gradient(subject, params, rows, retain, cfg)
            g_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            if g_norm == 0.0 or halvings > MAX_HALVINGS:
                break
            prev = [p.detach().clone() for p in params]
            while True:
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.sub_(g, alpha=length * p_norm / g_norm)
                trial = benign.side_effect(contextlib.nullcontext)
                if trial["kl_mean"] <= cfg.kl_bound:
                    side, taken = trial, taken + 1
                    break
                with torch.no_grad():
                    for p, q in zip(params, prev, strict=True):
                        p.copy_(q)
                halvings += 1
                length /= 2
                if halvings > MAX_HALVINGS:
                    break
        report: dict[str, Any] = {
            "label": LABEL,
            "n_examples": len(texts),
            "n_params": sum(p.numel() for p in params),
            "steps_taken": taken,
            "halvings": halvings,
            "final_step_size": length,
            "loglik_before": before,
            "loglik_after": forget_loglik(subject, texts, max_tokens=cfg.max_tokens),
            "benign_kl_mean": side["kl_mean"],
            "benign_loss_change_pct": side["loss_change_pct"],
            "benign_prompts": int(getattr(benign, "n_prompts", 0)),
            "seconds": time.perf_counter() - t0,
            "config": asdict(cfg),
        }
        yield report
    finally:
        with torch.no_grad():
            for p, q in zip(params, original, strict=True):
                p.copy_(q)
        for n, p in named.items():
            p.requires_grad_(flags[n])


def _p_bad(subject: Subject, incident: Any) -> tuple[list[float], str]:
    """P(bad) on the case's held-out variants, else on its prompt."""
    from rca.model.metric import as_probability, evaluate
    from rca.provenance.verify import held_out_p_bad

    held = held_out_p_bad(subject, incident)
    if held:
        return held, "the case's held-out variants"
    t = incident.for_model(subject.tokenizer).encode(subject)
    return [as_probability(evaluate(subject.model, t).metric, t.n_conts)], "the incident prompt"


def unlearning_check(
    subject: Subject,
    incident: Any,
    param_names: Sequence[str],
    texts: Sequence[str],
    top: Sequence[int],
    benign_prompts: Sequence[str],
    cfg: UnlearnConfig,
) -> dict[str, Any]:
    """Unlearn the examples at ``top`` (indices into ``texts``), then as many drawn at random
    (seed ``cfg.seed``), each from the original weights, and measure P(bad) before and after
    each (see the module docstring)."""
    from rca.specificity import BenignRun

    cfg.check()
    if not top:
        raise InfluenceError("no examples to unlearn")
    before, where = _p_bad(subject, incident)
    prompts = list(benign_prompts)[: cfg.n_benign]
    if len(prompts) < 2:
        raise InfluenceError("the KL bound and the retain term need at least two benign prompts")
    half = len(prompts) // 2  # the retain half is optimized; the bound half only measured
    retain = BenignRun(subject, prompts[:half], batch=cfg.batch)
    bench = BenignRun(subject, prompts[half:], batch=cfg.batch)
    rng = random.Random(cfg.seed)
    control = rng.sample(range(len(texts)), min(len(top), len(texts)))
    out: dict[str, Any] = {"label": LABEL, "measured_on": where, "p_bad_before": before}
    for name, idx in (("top", list(top)), ("random", control)):
        chosen = [texts[i] for i in idx]
        with unlearned(subject, param_names, chosen, bench, cfg, retain=retain) as rep:
            after, _ = _p_bad(subject, incident)
        out[name] = rep | {"examples": idx, "p_bad_after": after}
    return out
