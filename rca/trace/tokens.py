"""Which prompt tokens drive the incident: integrated gradients and segment ablation (captum).

Both attribute the incident metric (``rca.model.metric``) to the *prompt* positions; the
continuation tokens stay fixed. captum attributes one example at a time, and our metric reads two
rows (``prompt + bad`` and ``prompt + good``), so an example here is the flattened ``(1, rows * T)``
id tensor; the forward function folds it back into rows. Per-row attributions of the same prompt
position are summed.

- ``integrated_gradients``: ``LayerIntegratedGradients`` on the token embedding, from the
  counterfactual prompt where one lines up with the incident's (only the positions where the
  two differ move along the path, so every other position scores exactly 0), else from a
  prompt of neutral tokens; ``n_steps`` Gauss-Legendre points, ``internal_batch_size`` points
  per forward. Completeness is reported: the sum of the attributions against
  ``metric(x) - metric(baseline)``, with the tolerance it was held to.
- ``segment_ablation``: each prompt segment (whitespace-delimited words by default) replaced by
  neutral tokens, ``batch`` ablated prompts per forward. Positions before a segment are the
  same as in the clean prompt, so by default the clean run's key/value cache stands in for
  them: a batch of consecutive segments recomputes only from its first segment onward, about
  half the positions on average. Models whose cache cannot be cut back (sliding-window
  layers, caches without ``crop``) take captum's ``FeatureAblation`` over full forwards; both
  give the same scores (``tests/unit/test_segments.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.model.hooks import top_mlp_trimmed
from rca.model.metric import Target, encode_text, encode_text_offsets, logits_kwargs
from rca.model.subject import Subject

__all__ = [
    "TokenScores",
    "SegmentScores",
    "integrated_gradients",
    "segment_ablation",
    "word_segments",
    "neutral_token_id",
    "prompt_cache",
    "DEFAULT_TOLERANCE",
]

# the relative completeness error integrated gradients are held to by default
DEFAULT_TOLERANCE = 0.05


@dataclass
class TokenScores:
    """Per prompt position: token text and attribution (positive pushes toward bad).

    ``baseline``: where the attribution path starts, ``"counterfactual"`` (the counterfactual
    prompt's tokens, ``baseline_ids``) or ``"neutral"`` (the neutral token at every prompt
    position). ``baseline_token``: the neutral token's text, or the counterfactual prompt's.
    ``completeness`` (integrated gradients): ``sum_attributions``, ``metric_input``,
    ``metric_baseline``, ``delta``, ``relative_error``, ``tolerance``, ``baseline``, ``tries``.
    """

    ids: list[int]
    tokens: list[str]
    scores: list[float]
    method: str
    baseline_token: str
    n_steps: int
    completeness: dict[str, Any] = field(default_factory=dict)
    baseline: str = "neutral"
    baseline_ids: list[int] = field(default_factory=list)


@dataclass
class SegmentScores:
    """Per segment (a [start, end) span of prompt positions): the metric drop on ablating it."""

    segments: list[tuple[int, int]]
    texts: list[str]
    scores: list[float]
    baseline_token: str
    metric: float
    # segments that most reference prompts also contain (the task's template, e.g. "agent:"):
    # removing them breaks the format rather than the cause, so they are not cause candidates
    template: list[bool] = field(default_factory=list)

    def top(self) -> int:
        """The highest-scoring segment that is not template."""
        cands = [i for i in range(len(self.scores)) if not (self.template and self.template[i])]
        return max(cands or range(len(self.scores)), key=lambda i: self.scores[i])

    def ranked(self) -> list[int]:
        """Segment indices, non-template first, each group by decreasing score."""
        tmpl = self.template or [False] * len(self.scores)
        return sorted(range(len(self.scores)), key=lambda i: (tmpl[i], -self.scores[i]))


def neutral_token_id(tokenizer) -> int:
    """The token that stands for 'nothing here': pad, else unk, else eos, else 0."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def _token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _flat_forward(subject: Subject, target: Target):
    """A forward function over flattened (N, rows * T) ids giving the metric per example; the
    top MLP computes only the positions the metric reads (``rca.model.hooks.top_mlp_trimmed``)."""

    def f(model, flat: torch.Tensor) -> torch.Tensor:
        n = flat.shape[0]
        ids = flat.reshape(n * target.rows, target.length)
        with top_mlp_trimmed(subject, target.keep):
            logits = model(input_ids=ids, **logits_kwargs(model, target)).logits
        # rows of one example are adjacent, so Target.metric's variant layout applies
        return target.metric(logits)

    return f


def _baseline_ids(target: Target, neutral: int, positions: Sequence[int] | None = None):
    ids = target.input_ids().clone()
    pos = range(target.n_prompt) if positions is None else positions
    for p in pos:
        ids[:, p] = neutral
    return ids


def _lines_up(target: Target, other: Target) -> bool:
    """Whether ``other`` is ``target`` with another prompt of the same length: the same
    continuations and focus, so that its input rows match position for position."""
    return (
        other.n_prompt == target.n_prompt
        and other.conts == target.conts
        and other.focus == target.focus
        and other.pad_id == target.pad_id
    )


def integrated_gradients(
    subject: Subject,
    target: Target,
    *,
    n_steps: int = 32,
    internal_batch_size: int | None = 16,
    baseline_id: int | None = None,
    counterfactual: Target | None = None,
    min_steps: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> TokenScores:
    """Token attribution by layer integrated gradients over the embeddings.

    The path starts at ``counterfactual`` where given (the incident's target with the
    counterfactual prompt, ``Counterfactual.target``; it must line up with ``target``): a
    position where the two prompts hold the same token does not move and scores exactly 0,
    and the scores sum to ``metric(prompt) - metric(counterfactual)``. Without one it starts at
    the prompt with every token replaced by ``baseline_id`` (default ``neutral_token_id``).

    With ``min_steps``, the points start there and double up to ``n_steps`` until the
    attributions are complete within ``tolerance`` (their sum against the metric's change from
    the baseline, relative): a smooth path needs few Gauss-Legendre points, a sharp one gets
    ``n_steps``. ``completeness["tries"]`` lists the point counts run; ``n_steps`` in the
    result is the one kept; ``completeness["tolerance"]`` is ``tolerance``, which the kept
    count may still miss (``rca.report.token_warning`` says so).
    """
    if counterfactual is not None and not _lines_up(target, counterfactual):
        raise ValueError(
            f"the counterfactual ({counterfactual.n_prompt} prompt tokens) does not line up "
            f"with the incident ({target.n_prompt} prompt tokens, the same continuations)"
        )
    steps = n_steps if min_steps is None else max(1, min(min_steps, n_steps))
    tries: list[int] = []
    ends: dict[str, float] = {}  # the metric at the input and at the baseline, run once
    while True:
        out = _integrated_gradients(
            subject,
            target,
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            baseline_id=baseline_id,
            counterfactual=counterfactual,
            ends=ends,
        )
        tries.append(steps)
        if steps >= n_steps or out.completeness["relative_error"] <= tolerance:
            out.completeness["tolerance"] = tolerance
            out.completeness["tries"] = tries
            return out
        steps = min(2 * steps, n_steps)


def _integrated_gradients(
    subject: Subject,
    target: Target,
    *,
    n_steps: int,
    internal_batch_size: int | None,
    baseline_id: int | None,
    counterfactual: Target | None,
    ends: dict[str, float],
) -> TokenScores:
    from captum.attr import LayerIntegratedGradients

    model = subject.model
    dev = subject.device
    fwd = _flat_forward(subject, target)
    x = target.input_ids(device=dev).reshape(1, -1)
    if counterfactual is not None:
        kind = "counterfactual"
        start = list(counterfactual.prompt_ids)
        b = counterfactual.input_ids(device=dev).reshape(1, -1)
        start_text = subject.tokenizer.decode(start)
    else:
        kind = "neutral"
        neutral = neutral_token_id(subject.tokenizer) if baseline_id is None else baseline_id
        start = [neutral] * target.n_prompt
        b = _baseline_ids(target, neutral).to(dev).reshape(1, -1)
        start_text = subject.tokenizer.decode([neutral])
    lig = LayerIntegratedGradients(lambda ids: fwd(model, ids), subject.adapter.embed)
    # captum's own convergence delta assumes one attribution row per example; ours has
    # ``rows`` per example, so completeness is computed below from the two end points
    attr = lig.attribute(x, baselines=b, n_steps=n_steps, internal_batch_size=internal_batch_size)
    # attr: (rows, T, d_model), the embedding layer's output shape for the flattened example
    per_pos = attr.reshape(target.rows, target.length, -1).sum(-1).sum(0)[: target.n_prompt]
    if not ends:  # the same for every try: one forward each
        with torch.inference_mode():
            ends["input"] = float(fwd(model, x)[0])
            ends["baseline"] = float(fwd(model, b)[0])
    fx, fb = ends["input"], ends["baseline"]
    total = float(per_pos.sum())
    gap = fx - fb
    ids = list(target.prompt_ids)
    return TokenScores(
        ids=ids,
        tokens=_token_texts(subject.tokenizer, ids),
        scores=[float(v) for v in per_pos.detach().cpu()],
        method="integrated-gradients",
        baseline_token=start_text,
        n_steps=n_steps,
        completeness={
            "sum_attributions": total,
            "metric_input": fx,
            "metric_baseline": fb,
            "delta": total - gap,
            "relative_error": abs(total - gap) / max(abs(gap), 1e-9),
            "baseline": kind,
        },
        baseline=kind,
        baseline_ids=start,
    )


def word_segments(tokenizer, prompt: str, prompt_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Group prompt positions into whitespace-delimited words, by the tokenizer's offsets.

    Falls back to one segment per token when the tokenizer gives no offsets (slow tokenizers)
    or when its tokens do not line up with the prompt (added special tokens are their own).
    """
    ids, offsets = encode_text_offsets(tokenizer, prompt, offsets=True)
    if offsets is None or ids != list(prompt_ids):
        return [(i, i + 1) for i in range(len(prompt_ids))]
    segments: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids):
            segments.append((start, i))
            break
        prev_end = offsets[i - 1][1]
        cur_start = offsets[i][0]
        special = offsets[i] == (0, 0) or offsets[i - 1] == (0, 0)
        # a new word starts where whitespace (or a special token) separates it from the previous
        if special or cur_start > prev_end or prompt[cur_start : cur_start + 1].isspace():
            segments.append((start, i))
            start = i
    return segments


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward's key/value cache argument: ``cache`` (transformers >= 5.2x), else
    ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def prompt_cache(subject: Subject, target: Target) -> object | None:
    """The clean prompt's key/value cache, where it can be cut back to a prefix; else None."""
    out = subject.model(
        input_ids=torch.tensor([target.prompt_ids], device=subject.device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before the rename
        cache = getattr(out, "past_key_values", None)
    if cache is None or not all(
        callable(getattr(cache, m, None))
        for m in ("crop", "batch_repeat_interleave", "get_seq_length")
    ):
        return None
    sliding = getattr(cache, "is_sliding", False)
    if not getattr(cache, "is_croppable", True) or (
        any(sliding) if isinstance(sliding, (list, tuple)) else bool(sliding)
    ):
        return None  # sliding-window layers keep no full prefix to cut back to
    if cache.get_seq_length() != target.n_prompt:
        return None
    return cache


def _cached_segment_metrics(
    subject: Subject,
    target: Target,
    segments: Sequence[tuple[int, int]],
    neutral: int,
    batch: int,
) -> list[float] | None:
    """The metric with each segment neutralised, each batch of consecutive segments run from
    its first segment's start on a copy of the clean prompt's cache cut back to that start.
    None where the model's cache does not allow it."""
    if not logits_kwargs(subject.model, target):
        return None
    try:
        cache = prompt_cache(subject, target)
    except (TypeError, ValueError, NotImplementedError):
        return None
    if cache is None:
        return None
    ids = target.input_ids(device=subject.device)  # (rows, T)
    rows = target.rows
    ckw = _cache_kw(subject.model)
    order = sorted(range(len(segments)), key=lambda k: segments[k][0])
    out = [0.0] * len(segments)
    for c0 in range(0, len(order), batch):
        chunk = order[c0 : c0 + batch]
        s0 = segments[chunk[0]][0]
        x = ids.repeat(len(chunk), 1)
        for j, k in enumerate(chunk):
            a, b = segments[k]
            x[j * rows : (j + 1) * rows, a:b] = neutral
        kw: dict[str, object] = {"use_cache": False}
        if s0 > 0:
            past = copy.deepcopy(cache)
            # a negative length removes that many positions, in every transformers version
            past.crop(s0 - target.n_prompt)  # type: ignore[attr-defined]
            past.batch_repeat_interleave(len(chunk) * rows)  # type: ignore[attr-defined]
            kw = {"use_cache": True, ckw: past}
        with top_mlp_trimmed(subject, target.keep):
            logits = subject.model(
                input_ids=x[:, s0:], **kw, **logits_kwargs(subject.model, target)
            ).logits
        for j, v in zip(chunk, target.metric(logits).tolist(), strict=True):
            out[j] = float(v)
    return out


def segment_ablation(
    subject: Subject,
    target: Target,
    *,
    segments: Sequence[tuple[int, int]] | None = None,
    prompt: str | None = None,
    baseline_id: int | None = None,
    reference_prompts: Sequence[str] = (),
    template_share: float = 0.5,
    batch: int = 1,
    prefix_cache: bool = True,
    metric: float | None = None,
) -> SegmentScores:
    """Metric drop when each prompt segment is replaced by neutral tokens.

    Segments default to the prompt's words (``prompt`` needed for the offsets), else tokens.
    ``batch``: ablated prompts per forward (captum's ``perturbations_per_eval``); the scores
    do not depend on it. ``prefix_cache``: reuse the clean prompt's key/value cache for the
    positions before each batch's first segment where the model's cache allows it.
    With ``reference_prompts``, a segment whose tokens occur in at least ``template_share`` of
    them is marked template (see ``SegmentScores.template``). ``metric``: the clean prompt's
    metric where the caller has it already (``TokenScores.completeness["metric_input"]``).
    """
    from captum.attr import FeatureAblation

    tok = subject.tokenizer
    model = subject.model
    dev = subject.device
    if segments is None:
        segments = (
            word_segments(tok, prompt, target.prompt_ids)
            if prompt is not None
            else [(i, i + 1) for i in range(target.n_prompt)]
        )
    neutral = neutral_token_id(tok) if baseline_id is None else baseline_id
    fwd = _flat_forward(subject, target)
    x = target.input_ids(device=dev).reshape(1, -1)
    with torch.inference_mode():
        if metric is None:
            metric = float(fwd(model, x)[0])
        cached = (
            _cached_segment_metrics(subject, target, segments, neutral, max(1, batch))
            if prefix_cache
            else None
        )
    if cached is not None:
        scores = [metric - m for m in cached]
    else:
        mask = torch.full((target.rows, target.length), len(segments), dtype=torch.long)
        for k, (s, e) in enumerate(segments):
            mask[:, s:e] = k
        fa = FeatureAblation(lambda ids: fwd(model, ids))
        with torch.inference_mode():
            attr = fa.attribute(
                x,
                baselines=neutral,
                feature_mask=mask.reshape(1, -1).to(dev),
                perturbations_per_eval=max(1, batch),
            )
        attr = attr.reshape(target.rows, target.length)[0]
        scores = [float(attr[s]) for s, _ in segments]
    texts = [tok.decode(list(target.prompt_ids[s:e])) for s, e in segments]
    template = [False] * len(segments)
    if reference_prompts:
        refs = [encode_text(tok, p) for p in reference_prompts]
        special = set(getattr(tok, "all_special_ids", []) or [])

        def contains(seq: list[int], sub: list[int]) -> bool:
            n = len(sub)
            return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))

        for k, (s, e) in enumerate(segments):
            sub = list(target.prompt_ids[s:e])
            if set(sub) <= special:
                template[k] = True
                continue
            share = sum(contains(r, sub) for r in refs) / len(refs)
            template[k] = share >= template_share
    return SegmentScores(
        segments=list(segments),
        texts=texts,
        scores=scores,
        baseline_token=tok.decode([neutral]),
        metric=metric,
        template=template,
    )
