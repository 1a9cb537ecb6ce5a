"""The automatic counterfactual: the incident prompt with its most responsible segment removed.

Incidents rarely come with a clean/corrupted pair, and patching needs one. The strategy:

1. Rank the prompt's segments (words) by segment ablation (``rca.trace.tokens``): the metric
   drop when the segment is replaced by neutral tokens. Template segments, those most
   reference prompts also contain (``agent:``), rank last: removing them breaks the task's
   format rather than the incident's cause.
2. Take the top segment. Try each replacement candidate, token for token so that positions
   still line up with the prompt: the neutral token (pad/unk/eos), and the tokens that the
   reference prompts have at the same positions (a word the model has seen in that slot).
   Keep the candidate that lowers the metric most.
3. Check the drop: ``(metric(prompt) - metric(cf)) / |metric(prompt)| >= min_drop`` (default
   0.8). If it falls short, add the next segment and repeat, up to ``max_segments``.
4. Record what was replaced, with what, and the metric before and after. When no combination
   reaches ``min_drop`` the best one is returned with ``ok=False``; the caller decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.model.metric import Target, encode_text, encode_text_offsets, logits_kwargs
from rca.model.subject import Subject
from rca.trace.tokens import SegmentScores, neutral_token_id, segment_ablation

__all__ = ["Counterfactual", "auto_counterfactual", "drop_fraction"]


def drop_fraction(before: float, after: float) -> float:
    """How much of the metric a change removed: 1.0 means all of it (or more)."""
    return (before - after) / max(abs(before), 1e-9)


@dataclass
class Counterfactual:
    """A counterfactual prompt, aligned token for token with the incident prompt."""

    prompt_ids: tuple[int, ...]
    text: str
    generated: bool
    strategy: str
    replaced: list[dict] = field(default_factory=list)
    metric_prompt: float = float("nan")
    metric_counterfactual: float = float("nan")
    ok: bool = True
    text_exact: bool = True  # ``text`` encodes back to ``prompt_ids`` (it can be pasted back)

    @property
    def drop(self) -> float:
        return drop_fraction(self.metric_prompt, self.metric_counterfactual)

    def target(self, target: Target) -> Target:
        """The incident's target with this prompt in place of the incident prompt."""
        return target.with_prompt(self.prompt_ids)

    def to_json(self) -> dict[str, Any]:
        """Every field but the token ids, and ``drop``: what the trace's JSON states."""
        return {
            "text": self.text,
            "generated": self.generated,
            "strategy": self.strategy,
            "replaced": self.replaced,
            "metric_prompt": self.metric_prompt,
            "metric_counterfactual": self.metric_counterfactual,
            "drop": self.drop,
            "ok": self.ok,
            "text_exact": self.text_exact,
        }


def counterfactual_text(
    tokenizer: Any, prompt: str | None, prompt_ids: Sequence[int], ids: Sequence[int]
) -> str:
    """A text that encodes to ``ids``, the prompt's tokens with some replaced, written as the
    prompt with each replaced span of characters rewritten, so that it can be pasted into a
    case file as ``counterfactual``.

    The replacement's text is tried as decoded (with and without a leading space, and, for
    special tokens such as the neutral pad token, as their literal text); the first spelling
    that encodes back to ``ids`` (``rca.model.metric.encode_text``) is taken. Where none does, or
    the tokenizer gives no character offsets, the decoded tokens without special tokens are the
    best readable approximation.
    """
    ids, base = list(ids), list(prompt_ids)
    fallback = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if prompt is None or len(ids) != len(base):
        return fallback
    got, offs = encode_text_offsets(tokenizer, prompt, offsets=True)
    if offs is None or got != base:
        return fallback
    runs: list[tuple[int, int]] = []  # maximal runs of replaced positions
    for i, (a, b) in enumerate(zip(base, ids, strict=True)):
        if a != b:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    text = prompt
    for s, e in reversed(runs):
        spans = [o for o in offs[s:e] if o != (0, 0)]  # special tokens have no characters
        if not spans:
            return fallback
        lo, hi = min(o[0] for o in spans), max(o[1] for o in spans)
        chunk = ids[s:e]
        spellings = []
        for skip in (True, False):
            d = tokenizer.decode(chunk, skip_special_tokens=skip)
            spellings += [d, d.strip(), " " + d.strip()]
        spellings.append("".join(tokenizer.convert_ids_to_tokens(chunk)))
        for sp in dict.fromkeys(spellings):
            cand = text[:lo] + sp + text[hi:]
            if encode_text(tokenizer, cand)[s:e] == chunk:
                text = cand
                break
        else:
            return fallback
    return text if encode_text(tokenizer, text) == ids else fallback


@torch.inference_mode()
def _metrics(
    subject: Subject, target: Target, prompts: list[tuple[int, ...]], *, batch: int = 16
) -> list[float]:
    out: list[float] = []
    for b0 in range(0, len(prompts), batch):
        ids = torch.cat([target.with_prompt(p).input_ids() for p in prompts[b0 : b0 + batch]]).to(
            subject.device
        )
        logits = subject.model(input_ids=ids, **logits_kwargs(subject.model, target)).logits
        out += [float(v) for v in target.metric(logits)]
    return out


def auto_counterfactual(
    subject: Subject,
    target: Target,
    *,
    prompt: str | None = None,
    reference_prompts: Sequence[str] = (),
    segments: SegmentScores | None = None,
    min_drop: float = 0.8,
    max_segments: int = 3,
    max_candidates: int = 16,
    batch: int = 16,
) -> Counterfactual:
    """Build a counterfactual from the segment ranking; see the module docstring."""
    tok = subject.tokenizer
    seg = segments or segment_ablation(
        subject, target, prompt=prompt, reference_prompts=reference_prompts
    )
    order = seg.ranked()
    ref_ids = [encode_text(tok, p) for p in reference_prompts]
    neutral = neutral_token_id(tok)
    special = set(getattr(tok, "all_special_ids", []) or [])
    base = list(target.prompt_ids)
    metric_prompt = _metrics(subject, target, [tuple(base)])[0]
    current = list(base)
    replaced: list[dict] = []
    best_metric = metric_prompt
    for k in order[:max_segments]:
        s, e = seg.segments[k]
        # candidates: the neutral token throughout, or the reference prompts' tokens there
        cands: list[list[int]] = [[neutral] * (e - s)]
        for r in ref_ids:
            if len(r) >= e:
                c = r[s:e]
                if c != base[s:e] and not (set(c) & special) and c not in cands:
                    cands.append(c)
            if len(cands) >= max_candidates:
                break
        variants = [tuple(current[:s] + c + current[e:]) for c in cands]
        ms = _metrics(subject, target, variants, batch=batch)
        j = min(range(len(ms)), key=lambda i: ms[i])
        current = list(variants[j])
        best_metric = ms[j]
        replaced.append(
            {
                "positions": [s, e],
                "original": tok.decode(base[s:e]),
                "replacement": tok.decode(cands[j]),
                "segment_score": seg.scores[k],
                "candidates_tried": len(cands),
            }
        )
        if drop_fraction(metric_prompt, best_metric) >= min_drop:
            break
    text = counterfactual_text(tok, prompt, base, current)
    return Counterfactual(
        prompt_ids=tuple(current),
        text=text,
        text_exact=encode_text(tok, text) == current,
        generated=True,
        strategy=(
            "segment ablation ranked the prompt's words; the top ones were replaced token for "
            "token by the neutral token or a reference prompt's word at the same positions, "
            "whichever lowered the metric most"
        ),
        replaced=replaced,
        metric_prompt=metric_prompt,
        metric_counterfactual=best_metric,
        ok=drop_fraction(metric_prompt, best_metric) >= min_drop,
    )
