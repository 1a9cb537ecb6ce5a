"""Mean ablations: components held at their mean over the reference prompts.

Three kinds share this class and differ only in which components they hold and why:

- ``mean_ablation``: every component of the cause set;
- ``mean_ablation_top``: only the top-ranked cause;
- ``targeted_ablation``: the set's heads, and of its MLPs only the neurons that push hardest
  toward the bad continuation, the fewest of 2, 4, 8, 16 or 32 that bring P(bad) under the
  target (chosen by ``rca.remedy.search.try_remedies``).

Baked, a constant write moves into the projection's bias and the weights that wrote it become
zero, so a mean ablation needs a bias to hold the mean (GPT-2 style).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rca.model.adapter import out_in_weight, weight_of
from rca.model.hooks import ablate
from rca.model.ids import parse_id
from rca.model.subject import Subject
from rca.remedy.fix import Fix, RemedyError, bias_of, names, register

__all__ = ["MeanAblation", "MeanAblationTop", "TargetedAblation"]


@register
@dataclass(frozen=True, kw_only=True)
class MeanAblation(Fix):
    """Every component of ``components`` held at its mean: ``values[id]``, (d,) per id."""

    kind = "mean_ablation"

    values: dict[str, list[float]]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.values, dict):
            raise RemedyError(f"a {self.kind} patch spec needs 'values' as an object")
        missing = [c for c in self.components if c not in self.values]
        if missing:
            raise RemedyError(f"a {self.kind} patch spec has no value for {', '.join(missing)}")

    def context(self, subject: Subject) -> AbstractContextManager[None]:
        means = {k: torch.tensor(v) for k, v in self.values.items()}
        return ablate(subject, list(self.components), kind="mean", means=means)

    def describe(self) -> str:
        return f"Mean-ablating {names(self.components)}"

    @torch.no_grad()
    def bake(self, subject: Subject) -> None:
        a = subject.adapter
        for cid in self.components:
            c = parse_id(cid)
            mean = torch.tensor(self.values[cid])
            assert c.layer is not None
            if c.kind == "head":
                assert c.index is not None
                proj = a.attn_out(c.layer)
                w_h = a.head_out_weight(c.layer, c.index)  # (d_head, d_model), a view
                # a constant head output z: its write W_h z moves into the bias, W_h becomes 0
                const = a.head_result(c.layer, c.index, mean.to(w_h.dtype))
                bias = bias_of(proj, f"{cid}'s output projection")
                w_h.zero_()
                bias += const.to(bias.dtype)
            elif c.kind == "mlp":
                down = a.mlp_down(c.layer)
                bias = bias_of(down, f"{cid}'s down projection")
                weight_of(down).zero_()
                bias.copy_(mean.to(bias.dtype))
            elif c.kind == "neuron":
                assert c.index is not None
                down = a.mlp_down(c.layer)
                bias = bias_of(down, f"{cid}'s down projection")
                w = out_in_weight(down)  # (d_model, d_mlp)
                # a constant activation: its write moves into the bias, its weights become 0
                bias += mean.to(w.dtype) * w[:, c.index]
                w[:, c.index] = 0
            else:
                raise RemedyError(f"cannot bake a mean ablation of {cid}")


@register
@dataclass(frozen=True, kw_only=True)
class MeanAblationTop(MeanAblation):
    """The top-ranked cause alone held at its mean."""

    kind = "mean_ablation_top"


@register
@dataclass(frozen=True, kw_only=True)
class TargetedAblation(MeanAblation):
    """The set's heads and a few of its MLPs' neurons held at their means."""

    kind = "targeted_ablation"

    def describe(self) -> str:
        kinds = [parse_id(c).kind for c in self.components]
        n_neurons = kinds.count("neuron")
        heads = [c for c, k in zip(self.components, kinds, strict=True) if k == "head"]
        what = f"{n_neurons} MLP neurons" + (f" and {', '.join(heads)}" if heads else "")
        return f"Mean-ablating {what}"
