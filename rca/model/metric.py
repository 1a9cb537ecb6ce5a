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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

__all__ = [
    "MetricError",
    "Target",
    "MetricValue",
    "encode_target",
    "encode_text",
    "encode_text_offsets",
    "evaluate",
    "evaluate_many",
    "Stacked",
    "logits_kwargs",
    "reference_point",
    "as_probability",
    "share_removed",
]


class MetricError(ValueError):
    """A prompt or continuation that cannot be scored (empty, or not encodable)."""


def _adds_specials(tokenizer: Any, text: str) -> bool:
    """Whether the tokenizer's special tokens (a BOS) go in front of ``text``: not where the
    text already begins with the BOS token's text, as a chat template writes it."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it. The one encoding rca uses for every prompt,
    counterfactual and reference text.

    The tokenizer's special tokens are added (a BOS where it adds one), except where the text
    already starts with the BOS token's text (a rendered chat template); an end-of-sequence
    token that the tokenizer appends is dropped: the model saw no EOS after a prompt.
    """
    return encode_text_offsets(tokenizer, text)[0]


def encode_text_offsets(
    tokenizer: Any, text: str, *, offsets: bool = False
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``encode_text`` with each token's character span in ``text`` where asked for and the
    tokenizer gives them (fast tokenizers); (0, 0) for added special tokens."""
    special = _adds_specials(tokenizer, text)
    kw: dict[str, Any] = {"add_special_tokens": special}
    spans: list[tuple[int, int]] | None = None
    if offsets:
        try:
            enc = tokenizer(text, return_offsets_mapping=True, **kw)
            spans = [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]
        except (ValueError, NotImplementedError, KeyError, TypeError):
            enc = tokenizer(text, **kw)
    else:
        enc = tokenizer(text, **kw)
    ids = list(enc["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if special and eos is not None and ids and ids[-1] == eos:
        raw = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not raw or raw[-1] != eos:
            ids = ids[:-1]
            spans = None if spans is None else spans[:-1]
    return ids, spans


def _continuation_ids(tokenizer: Any, prompt_ids: list[int], prompt: str, cont: str) -> list[int]:
    """Token ids of ``cont`` as the model would see them after ``prompt``.

    Tokenizing ``prompt + cont`` and keeping the suffix respects merges and leading-space
    conventions (BPE's 'Ġ'); when the prompt's own tokens are not a prefix of that, we fall
    back to tokenizing the continuation alone.
    """
    full = encode_text(tokenizer, prompt + cont)
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :]
    return list(tokenizer(cont, add_special_tokens=False)["input_ids"])


def _focus_span(
    tokenizer: Any, prompt: str, prompt_ids: list[int], bad: str, bad_ids: list[int], focus: str
) -> tuple[int, int]:
    """The [start, end) positions within ``bad_ids`` of the tokens that spell ``focus``.

    A token belongs to the span where its characters overlap the focus text's first occurrence
    in ``bad``. Character spans come from the tokenizer's offsets over ``prompt + bad``, else
    from decoding the continuation one token more at a time.
    """
    at = bad.find(focus)
    if not focus or at < 0:
        raise MetricError(f"focus {focus!r} is not part of the bad continuation {bad!r}")
    lo, hi = at, at + len(focus)
    spans: list[tuple[int, int]] | None = None
    ids, offs = encode_text_offsets(tokenizer, prompt + bad, offsets=True)
    n = len(prompt_ids)
    if offs is not None and ids[n:] == bad_ids and ids[:n] == prompt_ids:
        spans = [(a - len(prompt), b - len(prompt)) for a, b in offs[n:]]
    if spans is None or any(a == b == -len(prompt) for a, b in spans):
        spans, end = [], 0
        for j in range(len(bad_ids)):
            text = tokenizer.decode(bad_ids[: j + 1], skip_special_tokens=True)
            spans.append((end, max(end, len(text))))
            end = max(end, len(text))
    inside = [j for j, (a, b) in enumerate(spans) if a < hi and b > lo]
    if not inside:
        raise MetricError(f"focus {focus!r} covers no token of the bad continuation")
    return inside[0], inside[-1] + 1


@dataclass(frozen=True)
class Target:
    """Token ids of an incident: the prompt and the bad (and optional good) continuation."""

    prompt_ids: tuple[int, ...]
    bad_ids: tuple[int, ...]
    good_ids: tuple[int, ...] | None = None
    pad_id: int = 0
    # [start, end) positions within bad_ids that the metric reads (a case's ``focus``); the
    # rest of the bad continuation is teacher-forced as context only. None: all of it
    focus: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise MetricError("prompt encodes to no tokens")
        if not self.bad_ids:
            raise MetricError("bad continuation encodes to no tokens")
        if self.good_ids is not None and not self.good_ids:
            raise MetricError("good continuation encodes to no tokens")
        if self.focus is not None:
            a, b = self.focus
            if not 0 <= a < b <= len(self.bad_ids):
                raise MetricError(
                    f"focus span {self.focus} is not within the {len(self.bad_ids)} bad tokens"
                )

    def with_prompt(self, prompt_ids: tuple[int, ...]) -> Target:
        """The same continuations (and focus) after another prompt: a counterfactual's."""
        return Target(
            tuple(prompt_ids), self.bad_ids, self.good_ids, pad_id=self.pad_id, focus=self.focus
        )

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
    def bad_row(self) -> int:
        """The input row (of one variant) that holds the bad continuation."""
        return self._layout[1][0]

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

    def differing(self, other: Target) -> list[int]:
        """The prompt positions where ``other`` (a counterfactual that lines up) has another
        token: where the two prompts differ."""
        if other.n_prompt != self.n_prompt:
            raise MetricError(
                f"the prompts do not line up: {self.n_prompt} and {other.n_prompt} tokens"
            )
        pairs = zip(self.prompt_ids, other.prompt_ids, strict=True)
        return [p for p, (a, b) in enumerate(pairs) if a != b]

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
            per_token = pred.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # (n_variants, n)
            if j == 0 and self.focus is not None:
                per_token = per_token[:, self.focus[0] : self.focus[1]]
            out.append(per_token.sum(-1))
        return torch.stack(out, dim=-1)

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each bad-continuation token's teacher-forced log-probability: (n_variants, n_bad).

        ``logits`` as for ``logprobs``."""
        start = self.n_prompt - 1 - (self.length - logits.shape[1])
        logp = torch.log_softmax(logits[:, start:].float(), dim=-1)
        n, r = len(self.bad_ids), self.bad_row
        pred = logp[r :: self.rows, :n, :]
        idx = torch.tensor(self.bad_ids, device=logits.device).expand(pred.shape[0], n)
        return pred.gather(-1, idx.unsqueeze(-1)).squeeze(-1)

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


def encode_target(
    tokenizer: Any,
    prompt: str,
    bad: str,
    good: str | None = None,
    *,
    focus: str | None = None,
) -> Target:
    """Encode an incident's texts. Raises MetricError naming the text that does not encode.

    ``focus``: a part of ``bad``; the metric then reads only the tokens that spell it, with the
    rest of ``bad`` teacher-forced as context.
    """
    if not prompt:
        raise MetricError("prompt is empty")
    prompt_ids = encode_text(tokenizer, prompt)
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
    span = (
        None
        if focus is None
        else _focus_span(tokenizer, prompt, prompt_ids, bad, list(bad_ids), focus)
    )
    pad = getattr(tokenizer, "pad_token_id", None)
    return Target(
        tuple(prompt_ids),
        tuple(bad_ids),
        None if good_ids is None else tuple(good_ids),
        pad_id=int(pad) if pad is not None else 0,
        focus=span,
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


class Stacked:
    """Targets of any lengths in one batch: each right-padded to the longest, which a causal
    model's earlier positions never see, and read back from its own rows and positions.

    ``ids`` and ``mask`` (the added padding masked; a target's own padding is as in
    ``evaluate``) are (sum of rows, width); ``kwargs(model)`` keeps only the logits from the
    first position any target reads."""

    def __init__(self, targets: Sequence[Target], *, device: Any = None) -> None:
        if not targets:
            raise ValueError("no targets to stack")
        self.targets = list(targets)
        self.width = max(t.length for t in targets)
        rows = [
            torch.nn.functional.pad(t.input_ids(), (0, self.width - t.length), value=t.pad_id)
            for t in targets
        ]
        self.ids = torch.cat(rows).to(device)
        self.mask = torch.cat(
            [
                (torch.arange(self.width) < t.length).long().expand(t.rows, self.width)
                for t in targets
            ]
        ).to(device)
        self.first = min(t.n_prompt - 1 for t in targets)

    def kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        """``attention_mask`` and, where the model takes it, ``logits_to_keep``."""
        keeps = bool(logits_kwargs(model, self.targets[0]))
        kw: dict[str, Any] = {"attention_mask": self.mask}
        if keeps:
            kw["logits_to_keep"] = self.width - self.first
        return kw

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Each target's own logits, as ``Target.logprobs`` and ``Target.metric`` take them."""
        skipped = self.width - logits.shape[1]  # positions the logits do not cover
        out, r = [], 0
        for t in self.targets:
            out.append(logits[r : r + t.rows, : t.length - skipped])
            r += t.rows
        return out


@torch.inference_mode()
def evaluate_many(
    model: torch.nn.Module, targets: Sequence[Target], *, batch: int = 16
) -> list[MetricValue]:
    """``evaluate`` of each target, ``batch`` targets per forward pass (``Stacked``), batched
    in order of length so that little is padded."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    device = next(model.parameters()).device
    out: list[MetricValue | None] = [None] * len(targets)
    order = sorted(range(len(targets)), key=lambda i: targets[i].length)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        stack = Stacked([targets[i] for i in idx], device=device)
        logits = model(input_ids=stack.ids, **stack.kwargs(model)).logits
        for i, t, own in zip(idx, stack.targets, stack.split(logits), strict=True):
            lp = t.logprobs(own)[0]
            out[i] = MetricValue(
                metric=float(t.metric(own)[0]),
                logp_bad=float(lp[0]),
                logp_good=float(lp[1]) if t.n_conts == 2 else None,
            )
    return [v for v in out if v is not None]


# ---------------------------------------------------------------------------------------------
# the gap: how much of the incident behaviour an intervention removes


def reference_point(m_clean: float, m_base: float, *, n_conts: int) -> float:
    """The metric that "all of the incident behaviour removed" reaches: the baseline's, or,
    for a log-ratio metric whose baseline prefers the good continuation, zero (the model
    indifferent between the two). Removing the bad behaviour is the goal, not making the good
    one as confident as on the counterfactual. Confirm needs ``m_clean`` above it."""
    return max(m_base, 0.0) if n_conts == 2 and m_clean > 0 else m_base


def as_probability(m: float, conts: int) -> float:
    """A metric value as a probability: P(bad) for log P(bad) (one continuation), P(bad beats
    good) for the log-ratio (two)."""
    return math.exp(min(m, 0.0)) if conts == 1 else 1.0 / (1.0 + math.exp(-m))


def share_removed(m_clean: float, m_ref: float, drop: float, *, conts: int) -> float:
    """The share of the bad behaviour a metric drop removes, in probability. Log-space drops
    beyond "the bad continuation is gone" differ only in how small P(bad) became: a carrier
    that drives P(bad) to 1e-8 and the origin that drives it to 1e-4 did the same thing."""
    p0, pr = as_probability(m_clean, conts), as_probability(m_ref, conts)
    return (p0 - as_probability(m_clean - drop, conts)) / max(p0 - pr, 1e-9)
