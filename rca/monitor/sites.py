"""Where a monitor reads the model: its sites, the rule that picks each site's position, and
the reader that turns every forward pass into one feature vector per row.

A site is a circuit member (``L1.H0``: the head's input to the attention output projection;
``L2.MLP``: the MLP's output; ``L3.N5+17``: those neurons). Two position rules:

- ``last``: the activation at the last position of the input, the one that predicts the next
  token. A writer acts there, and so does every member the verdict resolved to the prompt's
  last position.
- ``max``: the element-wise maximum over every position of the context so far. An entry
  member acts where the incident's input arrives, which moves from prompt to prompt; the
  maximum finds it wherever it is, and can be kept up to date one token at a time.

The reader works the same on a right-padded batch of prompts (one forward each) and inside
``model.generate`` (a prompt's forward, then one forward per new token, left-padded): padded
positions never count, and a ``max`` site keeps its running maximum between the forwards of
one generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rca.model.hooks import capture, padded_batch
from rca.model.ids import format_id, parse_id
from rca.model.subject import Subject

__all__ = ["RULES", "FeatureReader", "SiteSpec", "prompt_features", "sequence_features"]

RULES = ("last", "max")


@dataclass(frozen=True)
class SiteSpec:
    """One site: a component id (no position), its role in the circuit, its position rule."""

    id: str
    role: str
    rule: str

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"site {self.id}: rule must be one of {RULES}, got {self.rule!r}")
        cid = parse_id(self.id)
        if cid.pos is not None:
            raise ValueError(f"site {self.id}: give the component without a position")
        if cid.kind in ("emb", "logits", "resid_pre", "resid_post"):
            raise ValueError(f"site {self.id}: a monitor reads heads, MLPs or neurons")
        object.__setattr__(self, "id", format_id(cid))

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "rule": self.rule}


def _attention_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _cached_length(kwargs: dict) -> int | None:
    """How many positions the pass's key/value cache already holds (None: no cache given).
    transformers passes it as ``cache`` (5.x) or ``past_key_values``."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        length = getattr(cache, "get_seq_length", None)
        if callable(length):
            return int(length())
        if isinstance(cache, tuple | list) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # the legacy tuple of (key, value) per layer
    return None


class FeatureReader:
    """Reads the sites on every forward pass of ``subject``'s model while ``reading()`` is
    open: ``features`` is then the last pass's (batch, width) matrix, the sites' vectors
    side by side in ``sites`` order, and ``on_features`` (when given) is called with it."""

    def __init__(
        self,
        subject: Subject,
        sites: Sequence[SiteSpec],
        *,
        on_features: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if not sites:
            raise ValueError("a monitor needs at least one site")
        self.subject = subject
        self.sites = list(sites)
        self.on_features = on_features
        self.features: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._cached: int | None = None
        self._running: dict[str, torch.Tensor] = {}
        self.new_context = True  # whether the last pass began a context (covered all of it)

    def reset(self) -> None:
        """Forget the running maxima (a new context begins)."""
        self._running = {}
        self.features = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[FeatureReader]:
        model = self.subject.adapter.model

        def pre(mod: Any, args: tuple, kwargs: dict) -> None:
            self._mask = _attention_mask(args, kwargs)
            self._cached = _cached_length(kwargs)

        handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
        try:
            with capture(self.subject, [s.id for s in self.sites]) as acts:

                def post(mod: Any, args: tuple, output: Any) -> None:
                    self._read(acts)

                handles.append(model.register_forward_hook(post))
                yield self
        finally:
            for h in handles:
                h.remove()
            self._mask = None

    def _read(self, acts: Any) -> None:
        parts = []
        mask = self._mask
        self.new_context = True
        for s in self.sites:
            x = acts[s.id].detach().float()  # (batch, seq, width) or (batch, seq)
            if x.dim() == 2:
                x = x.unsqueeze(-1)
            batch, seq = x.shape[:2]
            # whether the pass begins a context: nothing cached before it, or (without a cache)
            # a mask no longer than the pass
            if self._cached is not None:
                full = self._cached == 0
            else:
                full = mask is None or mask.shape[1] == seq
            self.new_context = full
            if mask is None or mask.shape[1] < seq:
                valid = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
            else:
                valid = mask[:, -seq:].to(x.device).bool()
            if s.rule == "last":
                pos = torch.arange(seq, device=x.device).expand(batch, seq)
                last = torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=1).values
                parts.append(x[torch.arange(batch, device=x.device), last.clamp(min=0)])
            else:
                neg = torch.finfo(x.dtype).min
                cur = x.masked_fill(~valid.unsqueeze(-1), neg).max(dim=1).values
                prev = self._running.get(s.id)
                if not full and prev is not None and prev.shape == cur.shape:
                    cur = torch.maximum(prev, cur)
                self._running[s.id] = cur
                parts.append(cur)
        self.features = torch.cat(parts, dim=-1)
        if self.on_features is not None:
            self.on_features(self.features)


def _positions(x: torch.Tensor, rule: str, valid: torch.Tensor) -> torch.Tensor:
    """A site's feature at every position of a right-padded batch: its value (``last``), or
    its running maximum over the positions so far (``max``); (batch, seq, width)."""
    if rule == "last":
        return x
    neg = torch.finfo(x.dtype).min
    return x.masked_fill(~valid.unsqueeze(-1), neg).cummax(dim=1).values


@torch.inference_mode()
def sequence_features(
    subject: Subject,
    sites: Sequence[SiteSpec],
    token_ids: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch: int,
) -> list[torch.Tensor]:
    """The feature vector at every position from ``starts[i]`` to the end of each sequence,
    as the guard would read it there one token at a time: (len_i - starts[i], width) each, on
    the CPU, float32. Sequences are batched by length and right-padded; padding is masked."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if len(starts) != len(token_ids):
        raise ValueError("one start per sequence")
    pad = int(getattr(subject.tokenizer, "pad_token_id", None) or 0)
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: dict[int, torch.Tensor] = {}
    with capture(subject, [s.id for s in sites]) as acts:
        for b0 in range(0, len(order), batch):
            idx = order[b0 : b0 + batch]
            ids, mask = padded_batch([token_ids[i] for i in idx], pad, subject.device)
            subject.model(input_ids=ids, attention_mask=mask)
            valid = mask.bool()
            parts = []
            for s in sites:
                x = acts[s.id].detach().float()
                if x.dim() == 2:
                    x = x.unsqueeze(-1)
                parts.append(_positions(x, s.rule, valid))
            feats = torch.cat(parts, dim=-1).cpu()
            for r, i in enumerate(idx):
                n = len(token_ids[i])
                if not 0 <= starts[i] < n:
                    raise ValueError(f"start {starts[i]} is outside a sequence of {n} tokens")
                out[i] = feats[r, starts[i] : n]
    return [out[i] for i in range(len(token_ids))]


def prompt_features(
    subject: Subject, sites: Sequence[SiteSpec], token_ids: Sequence[Sequence[int]], *, batch: int
) -> torch.Tensor:
    """Each sequence's feature vector at its last position: (n, width)."""
    feats = sequence_features(
        subject, sites, token_ids, [len(t) - 1 for t in token_ids], batch=batch
    )
    return torch.stack([f[-1] for f in feats])
