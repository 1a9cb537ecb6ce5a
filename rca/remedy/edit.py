"""Weight edit: deltas to the cause set's write weights, trained against P(bad).

The deltas are added to each component's write weights: a head's slice of the attention output
projection, (d_head, d_model), an MLP's down projection, (d_mlp, d_model), both in "input times
delta" orientation. They are trained with Adam (``weight_edit``) to minimise
-log(1 - P(bad)) + kl_weight * KL(original || edited) on benign prompts held apart from the
side-effect set. Baked, the same deltas are added to the weights, so the baked model computes
exactly what the run-time fix does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from rca.model.adapter import out_in_weight
from rca.model.hooks import padded_batch
from rca.model.ids import parse_id
from rca.model.metric import Stacked, Target, logits_kwargs
from rca.model.subject import Subject
from rca.remedy.fix import (
    Fix,
    RemedyError,
    WriteEdit,
    names,
    on_writes,
    pack,
    register,
    unpack,
)
from rca.specificity import encoded, within

__all__ = [
    "EDIT_BYTES",
    "EDIT_CHUNK_BYTES",
    "WeightEdit",
    "weight_edit",
    "weight_edit_prompts",
    "weights_edited",
]

# the weight edit's kept distributions, and its logits per forward (see weight_edit)
EDIT_BYTES = 128 * 1024 * 1024
EDIT_CHUNK_BYTES = 32 * 1024 * 1024


def weights_edited(
    subject: Subject, deltas: dict[str, torch.Tensor]
) -> AbstractContextManager[None]:
    """Add a delta to each component's write weights at run time (see the module docstring)."""

    def add(d: torch.Tensor) -> WriteEdit:
        return lambda x, out: out + x @ d.to(out.device, out.dtype)

    return on_writes(subject, {cid: add(d) for cid, d in deltas.items()}, "a weight edit")


@register
@dataclass(frozen=True, kw_only=True)
class WeightEdit(Fix):
    """``deltas[id]``: the packed (``rca.remedy.fix.pack``) delta to component ``id``'s write
    weights; ``edit_prompts``: how many prompts the edit was trained on; ``scale``: the
    fraction of the trained deltas that ``deltas`` holds, where the edit was scaled back to
    fit the benign budget (None: as trained)."""

    kind = "weight_edit"
    tensor_fields = ("deltas",)

    deltas: dict[str, dict[str, Any]]
    edit_prompts: int | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None and (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, int | float)
            or not 0.0 < self.scale <= 1.0
        ):
            raise RemedyError(f"a {self.kind} patch spec's 'scale' must be in (0, 1]")
        if not isinstance(self.deltas, dict) or not self.deltas:
            raise RemedyError(f"a {self.kind} patch spec needs 'deltas' as an object")
        for cid, v in self.deltas.items():
            if not isinstance(v, dict) or not {"shape", "f32le"} <= v.keys():
                raise RemedyError(
                    f"a {self.kind} patch spec's delta for {cid} needs 'shape' and 'f32le'"
                )

    def context(self, subject: Subject) -> AbstractContextManager[None]:
        return weights_edited(subject, {k: unpack(v) for k, v in self.deltas.items()})

    @property
    def first_layer(self) -> int:
        return min(parse_id(c).layer or 0 for c in self.deltas)

    def describe(self) -> str:
        scaled = "" if self.scale is None else f", scaled to {self.scale:.0%} of the trained edit"
        return (
            f"Editing the write weights of {names(self.components)} "
            f"(trained against P(bad), KL-bounded{scaled})"
        )

    def scaled(self, factor: float) -> WeightEdit:
        """The same edit at ``factor`` of its trained strength."""
        return WeightEdit(
            components=self.components,
            model_fingerprint=self.model_fingerprint,
            deltas={k: pack(unpack(v) * factor) for k, v in self.deltas.items()},
            edit_prompts=self.edit_prompts,
            scale=factor * (self.scale or 1.0),
        )

    @torch.no_grad()
    def bake(self, subject: Subject) -> None:
        a = subject.adapter
        for cid, v in self.deltas.items():
            c = parse_id(cid)
            assert c.layer is not None
            delta = unpack(v)  # (in, d_model)
            if c.kind == "head":
                assert c.index is not None
                w_h = a.head_out_weight(c.layer, c.index)  # (d_head, d_model), a view
                w_h += delta.to(w_h.dtype)
            elif c.kind == "mlp":
                w = out_in_weight(a.mlp_down(c.layer)).T  # (d_mlp, d_model), a view
                w += delta.to(w.dtype)
            else:
                raise RemedyError(f"cannot bake a weight edit of {cid}")


def weight_edit_prompts(subject: Subject, prompts: Sequence[str]) -> int:
    """How many of ``prompts`` the weight edit's KL term uses (``EDIT_BYTES``)."""
    seqs, _ = encoded(subject, prompts)
    return len(within(seqs, 4 * subject.adapter.vocab_size, EDIT_BYTES))


def weight_edit(
    subject: Subject,
    target: Target | Sequence[Target],
    components: Sequence[str],
    prompts: Sequence[str],
    *,
    p_bad_target: float = 0.2,
    steps: int = 150,
    lr: float = 3e-3,
    kl_weight: float = 4.0,
    seed: int = 0,
    batch: int = 32,
) -> dict[str, torch.Tensor]:
    """Deltas to the write weights of ``components`` that lower P(bad) on the incident while
    keeping the next-token distributions on ``prompts`` (benign text, held apart from the
    side-effect set) close to the original: minimise -log(1 - P(bad)) + kl_weight * mean KL
    with Adam, stopping once P(bad) is under half the target. Deterministic for a seed on CPU.

    ``target`` may be several targets (a behaviour's fit set): the P(bad) term is then their
    mean, and the edit stops once every one is under half the target.

    The KL term keeps every edit position's original next-token distribution: prompts are
    taken in order while those fit ``EDIT_BYTES``, and run at most ``batch`` at a time and at
    most ``EDIT_CHUNK_BYTES`` of logits at a time (their log-softmax and gradient triple it).
    A small vocabulary never reaches either bound; a real one (49,152 tokens) keeps about 680
    positions. ``weight_edit_prompts`` gives the prompts the edit will use.
    """
    a = subject.adapter
    torch.manual_seed(seed)
    dev = subject.device
    deltas: dict[str, torch.Tensor] = {}
    for cid in components:
        c = parse_id(cid)
        assert c.layer is not None
        rows = a.d_head if c.kind == "head" else a.d_mlp
        deltas[cid] = torch.zeros(rows, a.d_model, device=dev, requires_grad=True)
    seqs, pad = encoded(subject, prompts)
    if not seqs:
        raise RemedyError("the edit prompts encode to fewer than two tokens each")
    seqs = within(seqs, 4 * a.vocab_size, EDIT_BYTES)
    # the KL term runs a chunk of prompts at a time, its gradients accumulated: the same
    # gradient as one batch, within the memory plan
    chunks = []
    i = 0
    while i < len(seqs):
        part = within(seqs[i : i + batch], 4 * a.vocab_size, EDIT_CHUNK_BYTES)
        chunks.append(padded_batch(part, pad, dev))
        i += len(part)
    with torch.inference_mode():
        refs = [
            torch.log_softmax(
                subject.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(),
                -1,
            )
            for ids, mask in chunks
        ]
    refs = [r.clone() for r in refs]
    n_valid = float(sum(int(mask.sum()) for _, mask in chunks))
    targets = [target] if isinstance(target, Target) else list(target)
    if not targets:
        raise RemedyError("the weight edit needs at least one target")
    # the targets, ``batch`` to a forward pass; one target alone runs as ``evaluate`` runs it
    stacks = [Stacked(targets[i : i + batch], device=dev) for i in range(0, len(targets), batch)]
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    goal = math.log(p_bad_target / 2)
    params = [p for p in subject.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            opt.zero_grad()
            with weights_edited(subject, deltas):
                done = True
                for stack in stacks:
                    if len(stack.targets) == 1:
                        t = stack.targets[0]
                        kw = logits_kwargs(subject.model, t)
                        ids = t.input_ids(device=dev)
                        parts = [subject.model(input_ids=ids, use_cache=False, **kw).logits]
                    else:
                        kw = stack.kwargs(subject.model)
                        logits = subject.model(input_ids=stack.ids, use_cache=False, **kw).logits
                        parts = stack.split(logits)
                    lp_bad = torch.stack(
                        [t.logprobs(x)[0, 0] for t, x in zip(stack.targets, parts, strict=True)]
                    )
                    above = lp_bad.detach() >= goal
                    if not bool(above.any()):
                        continue
                    done = False
                    term = -torch.log1p(-lp_bad[above].clamp(max=-1e-6).exp())
                    (term.sum() / len(targets)).backward()
                if done:
                    break
                for (ids, mask), ref in zip(chunks, refs, strict=True):
                    out = torch.log_softmax(
                        subject.model(
                            input_ids=ids, attention_mask=mask, use_cache=False
                        ).logits.float(),
                        -1,
                    )
                    kl = ((ref.exp() * (ref - out)).sum(-1) * mask).sum() / n_valid
                    (kl_weight * kl).backward()
            opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    return {k: v.detach() for k, v in deltas.items()}
