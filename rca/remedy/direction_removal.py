"""Direction removal: a contrastive direction projected out of the residual stream.

The direction is the difference of mean residual streams between the prompt and the
counterfactual after a causal layer (``residual_directions``). It is projected out of every
write into the residual stream up to that layer, at every position, so that the residual stream
there carries none of it. The residual stream is the sum of these writes, which is why baking
the projection into the writers' weights is exact; Gemma2 normalises each write before the add,
so neither is done there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rca.model.adapter import out_in_weight, weight_of
from rca.model.hooks import capture
from rca.model.ids import ComponentId, format_id
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.remedy.fix import Fix, RemedyError, register

__all__ = ["DirectionRemoval", "residual_directions", "residual_writers"]


def residual_writers(subject: Subject, layer: int) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream, up to ``layer``."""
    a = subject.adapter
    if a.model_type == "gemma2":
        raise RemedyError("direction removal is not supported on Gemma2 (norms after blocks)")
    writers: list[torch.nn.Module] = [a.embed]
    pos = getattr(getattr(subject.model, "transformer", None), "wpe", None)
    if pos is not None:  # GPT-2's learned positions are a write too
        writers.append(pos)
    for i in range(layer + 1):
        writers += [a.attn_out(i), a.mlp_down(i)]
    return writers


@contextlib.contextmanager
def _direction_removed(subject: Subject, layer: int, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every write into the residual stream up to ``layer``."""
    d = direction.float() / direction.float().norm()

    def hook(m, args, out):
        dd = d.to(out.device, out.dtype)
        return out - (out @ dd).unsqueeze(-1) * dd

    handles = [w.register_forward_hook(hook) for w in residual_writers(subject, layer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@register
@dataclass(frozen=True, kw_only=True)
class DirectionRemoval(Fix):
    """``direction`` (d_model,) projected out of every residual write up to ``layer``;
    ``components`` is that layer's ``RESID_POST``."""

    kind = "direction_removal"
    tensor_fields = ("direction",)

    layer: int
    direction: list[float]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise RemedyError(f"a {self.kind} patch spec needs 'layer' as a non-negative int")
        if not isinstance(self.direction, list):
            raise RemedyError(f"a {self.kind} patch spec needs 'direction' as a list of floats")

    def context(self, subject: Subject) -> contextlib.AbstractContextManager[None]:
        return _direction_removed(subject, self.layer, torch.tensor(self.direction))

    @property
    def first_layer(self) -> int:
        return 0  # the embedding is one of the writes it projects

    def describe(self) -> str:
        return f"Removing the prompt-vs-counterfactual direction up to layer {self.layer}"

    @torch.no_grad()
    def bake(self, subject: Subject) -> None:
        a = subject.adapter
        if a.model_type == "gemma2":
            raise RemedyError("direction removal cannot be baked into Gemma2 (norms after blocks)")
        d = torch.tensor(self.direction, dtype=torch.float32)
        d = d / d.norm()
        P = torch.eye(d.numel()) - torch.outer(d, d)  # (d_model, d_model), symmetric
        writers = residual_writers(subject, int(self.layer))
        un = a.unembed
        if weight_of(un) is weight_of(a.embed):
            # tied embeddings: the fix changes what is written, not how logits are read
            un.weight = torch.nn.Parameter(weight_of(a.embed).detach().clone())
            subject.model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        for mod in writers:
            w = out_in_weight(mod)  # (d_model, in): each column a written vector
            Pw = P.to(w.dtype)
            w.copy_(Pw @ w)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_(b @ Pw)


@torch.inference_mode()
def residual_directions(
    subject: Subject, pairs: Sequence[tuple[Target, Target]], layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Per layer: the mean residual stream after it on the prompt minus on the counterfactual,
    averaged over ``pairs`` (prompt, aligned counterfactual), (d_model,) on the CPU; a layer
    where the two are equal is left out."""
    dev = subject.device
    rids = [format_id(ComponentId("resid_post", layer)) for layer in layers]
    total: dict[int, torch.Tensor] = {}
    for prompt, counterfactual in pairs:
        with capture(subject, rids) as a:
            subject.model(input_ids=torch.tensor([list(prompt.prompt_ids)], device=dev))
        with capture(subject, rids) as b:
            subject.model(input_ids=torch.tensor([list(counterfactual.prompt_ids)], device=dev))
        for layer, rid in zip(layers, rids, strict=True):
            d = (a[rid][0].float().mean(0) - b[rid][0].float().mean(0)).cpu() / len(pairs)
            total[layer] = total[layer] + d if layer in total else d
    return {layer: d for layer, d in total.items() if float(d.norm()) > 0}
