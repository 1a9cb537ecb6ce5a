"""Specificity: what a component's ablation costs ordinary text.

In a real model many components are necessary for everything: the layer-0 MLP, attention sinks,
heads that every prompt uses. Ablating one removes any behaviour, the incident's included, so
its necessity for the incident says nothing about the incident. ``benign_damage`` measures,
for each component, what mean-ablating it does to benign text (the case's reference prompts,
else the packaged corpus, ``rca.benign``): the relative change of the language-model loss and
the mean KL divergence of the next-token distributions, original against ablated, over every
next-token position. A component whose loss change reaches ``INFRASTRUCTURE_LOSS_PCT`` is
*infrastructure* (``is_infrastructure``): confirm reports and draws it, but never ranks it first
and never blames it alone (docs/confirm.md, "Specificity").

``BenignRun`` is the one run over the benign prompts that these measurements and the
remedies' side effects share: it keeps the unablated next-token distributions, the component
means and the residual stream below each layer a change starts at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from rca.model.hooks import MeanAccumulator, ablate, capture, layers_skipped, padded_batch
from rca.model.ids import parse_id
from rca.model.metric import encode_text
from rca.model.subject import Subject
from rca.verdicts import INFRASTRUCTURE_LOSS_PCT

__all__ = [
    "BENIGN_BYTES",
    "BENIGN_CHUNK_BYTES",
    "INFRASTRUCTURE_LOSS_PCT",
    "BenignError",
    "BenignRun",
    "Damage",
    "benign_damage",
    "encoded",
    "is_infrastructure",
    "within",
]


Prompts = Sequence[str] | Sequence[Sequence[int]]  # texts, or token ids


class BenignError(ValueError):
    """Benign text that cannot be measured (no prompt of two tokens or more)."""


def within(seqs: list[list[int]], per_position: int, max_bytes: int) -> list[list[int]]:
    """The first sequences (at least one) whose scored positions times ``per_position`` bytes
    stay within ``max_bytes``."""
    kept: list[list[int]] = []
    used = 0
    for q in seqs:
        if kept and used + (len(q) - 1) * per_position > max_bytes:
            break
        kept.append(q)
        used += (len(q) - 1) * per_position
    return kept


def encoded(subject: Subject, prompts: Prompts) -> tuple[list[list[int]], int]:
    """The prompts' token ids (those of at least two tokens), and the pad id; a prompt given as
    token ids is taken as it is."""
    seqs = [
        s
        for s in (
            encode_text(subject.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts
        )
        if len(s) >= 2
    ]
    return seqs, int(getattr(subject.tokenizer, "pad_token_id", None) or 0)


# the benign run's kept next-token distributions, and its logits per forward (see BenignRun)
BENIGN_BYTES = 256 * 1024 * 1024
BENIGN_CHUNK_BYTES = 64 * 1024 * 1024


# a batch of benign prompts stops growing where padding would add this share of its tokens
PAD_SHARE = 0.25


def _padded_little(seqs: list[list[int]], share: float) -> list[list[int]]:
    """The first of ``seqs`` (sorted by length; at least one) that pad to at most ``1 + share``
    times their own tokens: every forward computes the padded positions too."""
    out = seqs[:1]
    real = len(seqs[0]) if seqs else 0
    for q in seqs[1:]:
        if (len(out) + 1) * len(q) > (1 + share) * (real + len(q)):
            break
        out.append(q)
        real += len(q)
    return out


class BenignRun:
    """The benign prompts of the side-effect measurement, run once without a fix.

    That run gives each prompt's next-token log-probabilities and the mean loss, the means of
    ``sites`` over the prompts' own positions (for the mean ablations), and, for each layer in
    ``keep``, the residual stream leaving the layer below it. A fix that changes nothing below
    layer L then runs from L up (``rca.model.hooks.layers_skipped``), and measures what a full
    forward would (tests/unit/test_remedy.py). Prompts run in batches, right-padded
    with an attention mask: the real positions' logits are those of the prompt alone.

    The KL needs every scored position's whole next-token distribution, kept from the run
    without a fix: positions times vocabulary floats. Prompts are taken in order while that
    stays within ``max_bytes`` (at least one prompt), and run shortest first, at most ``batch``,
    ``BENIGN_CHUNK_BYTES`` of logits and ``PAD_SHARE`` of padding per forward; a small
    vocabulary (the zoo's) reaches neither byte bound, a real one (49,152 tokens) keeps about
    1,300 positions in 256 MiB. The number of prompts used is reported with every side effect
    (``n_prompts``).
    """

    @torch.inference_mode()
    def __init__(
        self,
        subject: Subject,
        prompts: Prompts,
        *,
        batch: int = 32,
        sites: Sequence[str] = (),
        keep: Iterable[int] = (),
        max_bytes: int = BENIGN_BYTES,
    ) -> None:
        self.s = subject
        seqs, pad = encoded(subject, prompts)
        if not seqs:
            raise BenignError("the reference prompts encode to fewer than two tokens each")
        per_position = 4 * subject.adapter.vocab_size
        # the prompts kept, shortest first, so that a padded batch holds prompts of about one
        # length (the sums and means below do not depend on the order)
        seqs = sorted(within(seqs, per_position, max_bytes), key=len)
        self.n_prompts = len(seqs)
        dev = subject.device
        self.chunks = []
        i = 0
        while i < len(seqs):
            chunk = _padded_little(
                within(seqs[i : i + batch], per_position, BENIGN_CHUNK_BYTES), PAD_SHARE
            )
            self.chunks.append((chunk, *padded_batch(chunk, pad, dev)))
            i += len(chunk)
        layers = sorted({x for x in keep if 0 < x < subject.adapter.n_layers})
        below = [f"L{x - 1}.RESID_POST" for x in layers]
        acc = MeanAccumulator(list(sites))
        self.below: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
        self.logps: list[torch.Tensor] = []
        self.n_scored = sum(len(q) - 1 for q in seqs)  # next-token positions the loss averages
        total = 0.0
        for chunk, ids, mask in self.chunks:
            with capture(subject, [*sites, *below]) as acts:
                logits = subject.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            if sites:
                acc.add(acts, [len(q) for q in chunk])
            for x, rid in zip(layers, below, strict=True):
                self.below[x].append(acts[rid].clone())
            lp, t = self._scored(chunk, ids, logits)
            self.logps += lp
            total += t
        self.loss = total / self.n_scored
        self.means = acc.result() if sites else {}

    @staticmethod
    def _scored(chunk, ids, logits) -> tuple[list[torch.Tensor], float]:
        """Each row's next-token log-probabilities over its own positions, and their loss sum."""
        lps, total = [], 0.0
        for row, q in enumerate(chunk):
            n = len(q)
            lp = torch.log_softmax(logits[row, : n - 1].float(), -1)
            lps.append(lp)
            total += float(-lp.gather(-1, ids[row, 1:n].unsqueeze(-1)).sum())
        return lps, total

    @torch.inference_mode()
    def side_effect(self, ctx: Callable[[], Any], first: int = 0) -> dict[str, float]:
        """Mean KL(original || fixed) per next-token position, and the loss change, with the
        fix ``ctx()`` on; ``first``: the lowest layer it changes (the fix's ``first_layer``)."""
        start = first if first in self.below else 0
        kl: list[float] = []
        total = 0.0
        for c, (chunk, ids, mask) in enumerate(self.chunks):
            out = self.below[start][c] if start else None
            with ctx(), layers_skipped(self.s, start, out):
                logits = self.s.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            lps, t = self._scored(chunk, ids, logits)
            before = self.logps[len(kl) : len(kl) + len(chunk)]
            kl += [
                float((a.exp() * (a - b)).sum(-1).mean()) for a, b in zip(before, lps, strict=True)
            ]
            total += t
        loss = total / self.n_scored
        return {
            "n_prompts": float(self.n_prompts),
            "kl_mean": sum(kl) / len(kl),
            "kl_max": max(kl),
            "loss_before": self.loss,
            "loss_after": loss,
            "loss_change_pct": 100.0 * (loss - self.loss) / self.loss,
        }


@dataclass(frozen=True)
class Damage:
    """What mean-ablating one component does to ordinary text."""

    loss_change_pct: float  # relative change of the mean next-token loss, in percent
    kl_mean: float  # mean KL(original || ablated) per next-token position, in nats
    n_prompts: int

    @property
    def infrastructure(self) -> bool:
        return is_infrastructure(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"infrastructure": self.infrastructure}


def is_infrastructure(damage: Damage | Mapping[str, Any] | None) -> bool:
    """Whether a component's benign damage puts it among the parts every prompt needs."""
    if damage is None:
        return False
    pct = damage.loss_change_pct if isinstance(damage, Damage) else damage["loss_change_pct"]
    return float(pct) >= INFRASTRUCTURE_LOSS_PCT


def benign_damage(
    subject: Subject,
    components: Sequence[str],
    prompts: Prompts,
    *,
    batch: int = 32,
    run: BenignRun | None = None,
) -> dict[str, Damage]:
    """Each head's, MLP's or MLP neuron group's benign damage: mean-ablated at every position of
    every prompt, a whole batch of prompts per forward, each from its own layer up (the layers
    below are the unablated run's). ``run``: a ``BenignRun`` over ``prompts`` with the
    components' means and layers, where the caller has one."""
    comps = [
        c
        for c in dict.fromkeys(components)
        if parse_id(c).kind in ("head", "mlp", "neuron", "neurons")
    ]
    if not comps:
        return {}
    layers = {parse_id(c).layer or 0 for c in comps}
    if run is None or any(c not in run.means for c in comps):
        run = BenignRun(subject, prompts, batch=batch, sites=comps, keep=layers)
    out: dict[str, Damage] = {}
    for c in comps:
        means = {c: run.means[c]}
        side = run.side_effect(
            lambda _m=means, _c=c: ablate(subject, [_c], kind="mean", means=_m),  # type: ignore[misc]
            parse_id(c).layer or 0,
        )
        out[c] = Damage(side["loss_change_pct"], side["kl_mean"], int(side["n_prompts"]))
    return out
