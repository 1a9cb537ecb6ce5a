"""The incident metric: log P(bad) - log P(good), teacher-forced over every continuation token.

When no good continuation is given the metric is log P(bad) alone. A ``Target`` holds the
token ids. Its input rows are ``prompt + continuation``, right-padded, and a batch of ``k``
variants stacks ``k`` such groups. Right padding never changes what a causal model computes at
the positions the metric reads.

Continuations share rows where they can: the logits that score a continuation are those after
the prompt and all but its last token, so a continuation whose tokens but the last are a prefix
of another one's row is read from that row. Single-token bad and good continuations, the usual
incident, need one row, not two: every forward pass of the trace, confirm and remedy stages
runs on half the rows, with the same metric (``tests/unit/test_metric.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

__all__ = ["MetricError", "Target", "MetricValue", "encode_target", "evaluate", "logits_kwargs"]


class MetricError(ValueError):
    """A prompt or continuation that cannot be scored (empty, or not encodable)."""


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if special and eos is not None and ids and ids[-1] == eos:
        # a tokenizer that appends EOS would end every prompt there; the model saw no EOS
        raw = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not raw or raw[-1] != eos:
            ids = ids[:-1]
    return ids


def _continuation_ids(tokenizer: Any, prompt_ids: list[int], prompt: str, cont: str) -> list[int]:
    """Token ids of ``cont`` as the model would see them after ``prompt``.

    Tokenizing ``prompt + cont`` and keeping the suffix respects merges and leading-space
    conventions (BPE's 'Ġ'); when the prompt's own tokens are not a prefix of that, we fall
    back to tokenizing the continuation alone.
    """
    full = _encode(tokenizer, prompt + cont, special=True)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :]
    return _encode(tokenizer, cont, special=False)


@dataclass(frozen=True)
class Target:
    """Token ids of an incident: the prompt and the bad (and optional good) continuation."""

    prompt_ids: tuple[int, ...]
    bad_ids: tuple[int, ...]
    good_ids: tuple[int, ...] | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise MetricError("prompt encodes to no tokens")
        if not self.bad_ids:
            raise MetricError("bad continuation encodes to no tokens")
        if self.good_ids is not None and not self.good_ids:
            raise MetricError("good continuation encodes to no tokens")

    @property
    def conts(self) -> list[tuple[int, ...]]:
        return [self.bad_ids] if self.good_ids is None else [self.bad_ids, self.good_ids]

    @property
    def n_conts(self) -> int:
        """Continuations scored: 2 with a good continuation (a log-ratio metric), else 1."""
        return len(self.conts)

    @cached_property
    def _layout(self) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """The input rows' continuation tokens, and the row each continuation is read from."""
        rows: list[tuple[int, ...]] = []
        row_of = [0] * len(self.conts)
        # longest first, so that a shorter continuation finds the row that contains it
        for j in sorted(range(len(self.conts)), key=lambda j: -len(self.conts[j])):
            c = self.conts[j]
            need = c[:-1]  # the inputs its logits depend on, after the prompt
            for r, seq in enumerate(rows):
                if seq[: len(need)] == need:
                    row_of[j] = r
                    break
            else:
                rows.append(c)
                row_of[j] = len(rows) - 1
        return tuple(rows), tuple(row_of)

    @property
    def rows(self) -> int:
        """Input rows per variant: 1, or 2 where neither continuation's row can score the other
        (see the module docstring)."""
        return len(self._layout[0])

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def length(self) -> int:
        return self.n_prompt + max(len(c) for c in self.conts)

    @property
    def keep(self) -> int:
        """How many final positions' logits the metric reads (``logits_to_keep``).

        The logit at position t predicts token t + 1, so the metric needs positions
        ``n_prompt - 1`` to ``length - 2``; the last ``length - n_prompt + 1`` cover them.
        Computing only those skips the unembedding (often the largest matrix of a small model)
        and the vocabulary-wide log-softmax at every prompt position.
        """
        return self.length - self.n_prompt + 1

    def input_ids(self, n_variants: int = 1, *, device: Any = None) -> torch.Tensor:
        """(n_variants * rows, length) token ids, right-padded."""
        rows = []
        for c in self._layout[0]:
            seq = list(self.prompt_ids) + list(c)
            rows.append(seq + [self.pad_id] * (self.length - len(seq)))
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        return ids.repeat(n_variants, 1)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each continuation: (n_variants, n_conts).

        ``logits`` is (n_variants * rows, positions, vocab) from ``input_ids(n_variants)``:
        every position, or only the last ``keep`` or more (``logits_to_keep``).
        """
        if logits.shape[1] < self.keep:
            raise MetricError(
                f"logits cover {logits.shape[1]} positions; the metric needs the last {self.keep}"
            )
        start = self.n_prompt - 1 - (self.length - logits.shape[1])
        logits = logits[:, start:]  # only the positions the metric reads
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # half precision loses small log-probabilities
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        row_of = self._layout[1]
        for j, c in enumerate(self.conts):
            n, r = len(c), row_of[j]
            # the logit at position t predicts token t + 1
            pred = logp[r :: self.rows, :n, :]
            idx = torch.tensor(c, device=logits.device).expand(pred.shape[0], n)
            out.append(pred.gather(-1, idx.unsqueeze(-1)).squeeze(-1).sum(-1))
        return torch.stack(out, dim=-1)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The incident metric per variant: (n_variants,)."""
        lp = self.logprobs(logits)
        return lp[:, 0] - lp[:, 1] if self.n_conts == 2 else lp[:, 0]


@dataclass(frozen=True)
class MetricValue:
    metric: float
    logp_bad: float
    logp_good: float | None

    @property
    def p_bad(self) -> float:
        return float(torch.tensor(self.logp_bad).exp())

    @property
    def p_good(self) -> float | None:
        return None if self.logp_good is None else float(torch.tensor(self.logp_good).exp())


def encode_target(tokenizer: Any, prompt: str, bad: str, good: str | None = None) -> Target:
    """Encode an incident's texts. Raises MetricError naming the text that does not encode."""
    if not prompt:
        raise MetricError("prompt is empty")
    prompt_ids = _encode(tokenizer, prompt, special=True)
    if not prompt_ids:
        raise MetricError("prompt encodes to no tokens")
    if not bad:
        raise MetricError("bad continuation is empty")
    bad_ids = _continuation_ids(tokenizer, prompt_ids, prompt, bad)
    good_ids = None
    if good is not None:
        if not good:
            raise MetricError("good continuation is empty")
        good_ids = _continuation_ids(tokenizer, prompt_ids, prompt, good)
        if tuple(good_ids) == tuple(bad_ids):
            raise MetricError("good and bad continuations encode to the same tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    for name, ids in (("bad", bad_ids), ("good", good_ids or [])):
        if unk is not None and unk in ids:
            raise MetricError(f"{name} continuation contains tokens the tokenizer cannot encode")
    pad = getattr(tokenizer, "pad_token_id", None)
    return Target(
        tuple(prompt_ids),
        tuple(bad_ids),
        None if good_ids is None else tuple(good_ids),
        pad_id=int(pad) if pad is not None else 0,
    )


_KEEPS: dict[type, bool] = {}


def logits_kwargs(model: torch.nn.Module, target: Target) -> dict[str, int]:
    """``{"logits_to_keep": target.keep}`` when the model's forward takes it, else ``{}``.

    Every architecture rca knows takes it in transformers >= 4.50; a model that does not
    computes all positions and ``Target.logprobs`` reads the ones it needs.
    """
    cls = type(model)
    if cls not in _KEEPS:
        import inspect

        try:
            _KEEPS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            _KEEPS[cls] = False
    return {"logits_to_keep": target.keep} if _KEEPS[cls] else {}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, target: Target) -> MetricValue:
    """Run the model once on the target and return the metric and its parts."""
    device = next(model.parameters()).device
    logits = model(input_ids=target.input_ids(device=device), **logits_kwargs(model, target)).logits
    lp = target.logprobs(logits)[0]
    m = target.metric(logits)[0]
    return MetricValue(
        metric=float(m),
        logp_bad=float(lp[0]),
        logp_good=float(lp[1]) if target.n_conts == 2 else None,
    )
