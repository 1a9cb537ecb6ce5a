"""Write direction removal: per component, its own contrastive write projected out of its writes.

For each component of the cause set, the difference between what it writes at the answer
position on the prompt and on the counterfactual (``write_directions``) is projected out of
that component's writes only: its slice of the output projection for a head, its down
projection for an MLP. Everything else the component writes, and every other component, is
untouched, which is why it usually costs the least. Baked, that is P W_h for a head's slice and
P W, P b for an MLP's down projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rca.model.adapter import out_in_weight
from rca.model.hooks import capture
from rca.model.ids import parse_id
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.remedy.fix import Fix, RemedyError, WriteEdit, names, on_writes, register, unit

__all__ = ["WriteDirectionRemoval", "write_directions"]


@register
@dataclass(frozen=True, kw_only=True)
class WriteDirectionRemoval(Fix):
    """``directions[id]`` (d_model,) projected out of what component ``id`` writes."""

    kind = "write_direction_removal"
    tensor_fields = ("directions",)

    directions: dict[str, list[float]]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.directions, dict) or not self.directions:
            raise RemedyError(f"a {self.kind} patch spec needs 'directions' as an object")

    def context(self, subject: Subject) -> AbstractContextManager[None]:
        """A head's write is its slice of the output projection applied to its own input slice
        (the shared bias is not its write); an MLP's is its down projection's output."""
        a = subject.adapter

        def project(cid: str, d: torch.Tensor) -> WriteEdit:
            c = parse_id(cid)

            def edit(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                dd = d.to(out.device, out.dtype)
                write = out if c.kind == "mlp" else a.head_result(c.layer, c.index, x)  # type: ignore[arg-type]
                return out - (write @ dd).unsqueeze(-1) * dd

            return edit

        edits = {cid: project(cid, unit(v)) for cid, v in self.directions.items()}
        return on_writes(subject, edits, "write direction removal")

    @property
    def first_layer(self) -> int:
        return min(parse_id(c).layer or 0 for c in self.directions)

    def describe(self) -> str:
        who = names(self.components)
        return f"Removing the prompt-vs-counterfactual direction from what {who} write"

    @torch.no_grad()
    def bake(self, subject: Subject) -> None:
        a = subject.adapter
        for cid, v in self.directions.items():
            c = parse_id(cid)
            assert c.layer is not None
            d = unit(v)
            P = torch.eye(d.numel()) - torch.outer(d, d)
            if c.kind == "head":
                assert c.index is not None
                w_h = a.head_out_weight(c.layer, c.index)  # (d_head, d_model), a view
                w_h.copy_(w_h @ P.to(w_h.dtype))
            elif c.kind == "mlp":
                down = a.mlp_down(c.layer)
                w = out_in_weight(down)  # (d_model, d_mlp)
                w.copy_(P.to(w.dtype) @ w)
                b = getattr(down, "bias", None)
                if isinstance(b, torch.Tensor):
                    b.copy_(b @ P.to(b.dtype))
            else:
                raise RemedyError(f"cannot bake a write direction removal of {cid}")


@torch.inference_mode()
def write_directions(
    subject: Subject, pairs: Sequence[tuple[Target, Target]], comps: Sequence[str]
) -> dict[str, list[float]]:
    """Per component: its write at the last prompt position, prompt minus counterfactual,
    averaged over ``pairs`` (prompt, aligned counterfactual); a component that writes the same
    on both is left out."""
    a, dev = subject.adapter, subject.device

    def writes(t: Target) -> dict[str, torch.Tensor]:
        with capture(subject, comps) as acts:
            subject.model(input_ids=torch.tensor([list(t.prompt_ids)], device=dev))
        w = {}
        for cid in comps:
            c = parse_id(cid)
            x = acts[cid][0, -1].float()
            if c.kind == "head":
                assert c.layer is not None and c.index is not None
                x = a.head_result(c.layer, c.index, x)
            w[cid] = x.cpu()
        return w

    diff: dict[str, torch.Tensor] = {}
    scale: dict[str, float] = {}
    for prompt, counterfactual in pairs:
        on, off = writes(prompt), writes(counterfactual)
        for cid in comps:
            diff[cid] = diff.get(cid, 0) + (on[cid] - off[cid]) / len(pairs)
            scale[cid] = max(scale.get(cid, 1.0), float(on[cid].norm()))
    return {
        cid: diff[cid].tolist()
        for cid in comps
        if cid in diff and float(diff[cid].norm()) > 1e-8 * scale[cid]
    }
