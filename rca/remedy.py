"""Remedy: fixes tried on the model at run time, their effect, their side effect, and notes.

For a confirmed cause set the fixes are:

- ``mean_ablation``: every component of the set held at its mean over the reference prompts;
- ``mean_ablation_top``: only the top-ranked cause held at its mean;
- ``targeted_ablation``: the set's heads, and of its MLPs only the neurons that push hardest
  toward the bad continuation (by attribution), the fewest of 2, 4, 8, 16 or 32 that bring
  P(bad) under the target, held at their means: the smallest change that works;
- ``direction_removal``: the contrastive direction, the difference of mean residual streams
  between the prompt and the counterfactual after a causal layer (each layer of the set is
  tried), projected out of every write into the residual stream up to that layer, at every
  position, so that the residual stream there carries none of it;
- ``write_direction_removal``: narrower, per component of the set: the difference between what
  the component writes at the answer position on the prompt and on the counterfactual is
  projected out of that component's writes only (its slice of the output projection for a
  head, its down projection for an MLP). Everything else the component writes, and every other
  component, is untouched, which is why it usually costs the least.

Each is measured on the incident (metric and P(bad) before and after) and on the reference
(benign) prompts: the mean KL divergence of the next-token distributions, original against
fixed, and the change of the mean language-model loss. Of the fixes that bring P(bad) under
``p_bad_target`` while raising the benign loss by under ``max_loss_pct``, the cheapest is marked
``recommended``; when none does both, the best trade-off is, and its note says so. A fix that
does not lower P(bad) is never recommended (``recommend``).

A fix also has a patch spec (JSON) that ``apply_patch`` bakes into the weights of a model
directory, so the fixed model can ship without rca's hooks (see ``apply_patch``).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rca.hooks import ablate, capture, padded_batch
from rca.ids import parse_id
from rca.metric import MetricValue, Target, evaluate, logits_kwargs
from rca.paths import PathError, read_bounded_json
from rca.specificity import BenignError, BenignRun, encoded, within
from rca.subject import Subject, load_subject, weight_of

__all__ = [
    "RemedyError",
    "Remedy",
    "try_remedies",
    "benign_side_effect",
    "apply_patch",
    "PATCH_FORMAT",
]

PATCH_FORMAT = "rca-patch-v1"

MAX_SPEC_BYTES = 64 << 20  # a patch spec: directions and means of one model, as JSON


class RemedyError(ValueError):
    """A fix that cannot be tried or applied as asked."""


@dataclass
class Remedy:
    kind: str
    components: list[str]
    metric_before: float
    metric_after: float
    p_bad_before: float
    p_bad_after: float
    side_effect: dict[str, float]
    patch_spec: dict[str, Any]
    recommended: bool = False
    note: str = ""
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# fixes as context managers over the live model


def _residual_writers(subject: Subject, layer: int) -> list[torch.nn.Module]:
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
    """Project ``direction`` out of every write into the residual stream up to ``layer``.

    The residual stream is the sum of these writes, so after ``layer`` it carries none of the
    direction, and this is exactly what ``apply_patch`` bakes into the weights.
    """
    d = direction.float() / direction.float().norm()

    def hook(m, args, out):
        dd = d.to(out.device, out.dtype)
        return out - (out @ dd).unsqueeze(-1) * dd

    handles = [w.register_forward_hook(hook) for w in _residual_writers(subject, layer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _unit(v: Sequence[float] | torch.Tensor) -> torch.Tensor:
    d = torch.as_tensor(v, dtype=torch.float32)
    return d / d.norm()


# An edit of one component's write: (its input, the module's output) -> the new output. A
# head's input is its slice of the output projection's input; an MLP's is its neurons.
WriteEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _on_writes(subject: Subject, edits: dict[str, WriteEdit], what: str) -> Iterator[None]:
    """Hook each component's write: a head's on the attention output projection (called with
    the head's own input slice), an MLP's on its down projection. Removed on exit."""
    a = subject.adapter
    handles = []
    try:
        for cid, edit in edits.items():
            c = parse_id(cid)
            assert c.layer is not None
            if c.kind == "head":
                assert c.index is not None
                sl = slice(c.index * a.d_head, (c.index + 1) * a.d_head)
                mod = a.attn_out(c.layer)
            elif c.kind == "mlp":
                sl, mod = slice(None), a.mlp_down(c.layer)
            else:
                raise RemedyError(f"{what} needs heads or MLPs, got {cid}")
            handles.append(
                mod.register_forward_hook(
                    lambda m, args, out, _sl=sl, _e=edit: _e(args[0][..., _sl], out)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


def _writes_projected(subject: Subject, directions: dict[str, Any]):
    """Project each component's own direction out of that component's writes only.

    A head's write is its slice of the output projection applied to its own input slice (the
    shared bias is not its write); an MLP's is its down projection's output. This is exactly
    what ``apply_patch`` bakes: P W_h for the head's slice, P W and P b for the MLP.
    """
    a = subject.adapter

    def project(cid: str, d: torch.Tensor) -> WriteEdit:
        c = parse_id(cid)

        def edit(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            dd = d.to(out.device, out.dtype)
            write = out if c.kind == "mlp" else a.head_result(c.layer, c.index, x)  # type: ignore[arg-type]
            return out - (write @ dd).unsqueeze(-1) * dd

        return edit

    edits = {cid: project(cid, _unit(v)) for cid, v in directions.items()}
    return _on_writes(subject, edits, "write direction removal")


@torch.inference_mode()
def _write_directions(
    subject: Subject, target: Target, counterfactual: Target, comps: Sequence[str]
) -> dict[str, list[float]]:
    """Per component: its write at the last prompt position, prompt minus counterfactual."""
    a, dev = subject.adapter, subject.device
    writes = []
    for t in (target, counterfactual):
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
        writes.append(w)
    out = {}
    for cid in comps:
        d = writes[0][cid] - writes[1][cid]
        if float(d.norm()) > 1e-8 * max(1.0, float(writes[0][cid].norm())):
            out[cid] = d.tolist()
    return out


def _pack(t: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as JSON: shape and little-endian bytes in base64."""
    x = t.detach().to("cpu", torch.float32).contiguous()
    return {"shape": list(x.shape), "f32le": base64.b64encode(x.numpy().tobytes()).decode()}


def _unpack(d: dict[str, Any]) -> torch.Tensor:
    import numpy as np

    buf = np.frombuffer(base64.b64decode(d["f32le"]), dtype="<f4").copy()
    return torch.from_numpy(buf).reshape(d["shape"])


def _weights_edited(subject: Subject, deltas: dict[str, torch.Tensor]):
    """Add a delta to each component's write weights at run time: a head's slice of the
    output projection, (d_head, d_model), or an MLP's down projection, (d_mlp, d_model), both
    in "input times delta" orientation. ``apply_patch`` adds the same deltas to the weights."""

    def add(d: torch.Tensor) -> WriteEdit:
        return lambda x, out: out + x @ d.to(out.device, out.dtype)

    return _on_writes(subject, {cid: add(d) for cid, d in deltas.items()}, "a weight edit")


# the weight edit's kept distributions, and its logits per forward (see weight_edit)
EDIT_BYTES = 128 * 1024 * 1024
EDIT_CHUNK_BYTES = 32 * 1024 * 1024


def weight_edit_prompts(subject: Subject, prompts: Sequence[str]) -> int:
    """How many of ``prompts`` the weight edit's KL term uses (``EDIT_BYTES``)."""
    seqs, _ = encoded(subject, prompts)
    return len(within(seqs, 4 * subject.adapter.vocab_size, EDIT_BYTES))


def weight_edit(
    subject: Subject,
    target: Target,
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
    t_ids = target.input_ids(device=dev)
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    goal = math.log(p_bad_target / 2)
    params = [p for p in subject.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            opt.zero_grad()
            with _weights_edited(subject, deltas):
                kw = logits_kwargs(subject.model, target)
                logits = subject.model(input_ids=t_ids, use_cache=False, **kw).logits
                lp_bad = target.logprobs(logits)[0, 0]
                if float(lp_bad.detach()) < goal:
                    break
                (-torch.log1p(-lp_bad.clamp(max=-1e-6).exp())).backward()
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


def _fix_context(subject: Subject, spec: dict[str, Any]):
    if spec["kind"] in ("mean_ablation", "mean_ablation_top", "targeted_ablation"):
        means = {k: torch.tensor(v) for k, v in spec["values"].items()}
        return ablate(subject, spec["components"], kind="mean", means=means)
    if spec["kind"] == "direction_removal":
        return _direction_removed(subject, spec["layer"], torch.tensor(spec["direction"]))
    if spec["kind"] == "write_direction_removal":
        return _writes_projected(subject, spec["directions"])
    if spec["kind"] == "weight_edit":
        return _weights_edited(subject, {k: _unpack(v) for k, v in spec["deltas"].items()})
    raise RemedyError(f"unknown fix kind {spec['kind']!r}")


# ---------------------------------------------------------------------------------------------
# measurement


def _first_layer(spec: dict[str, Any]) -> int:
    """The lowest decoder layer a fix changes anything in; 0 where it changes the embedding."""
    if spec["kind"] == "direction_removal":
        return 0  # the embedding is one of the writes it projects
    keys = spec.get("directions") or spec.get("deltas") or spec["components"]
    return min(parse_id(c).layer or 0 for c in keys)


def benign_side_effect(
    subject: Subject, prompts: Sequence[str], spec: dict[str, Any], *, batch: int = 32
) -> dict[str, float]:
    """Mean KL(original || fixed) per next-token position, and the loss change, on ``prompts``."""
    bench = BenignRun(subject, prompts, batch=batch, keep=[_first_layer(spec)])
    return bench.side_effect(lambda: _fix_context(subject, spec), _first_layer(spec))


def _evaluate_with(subject: Subject, target: Target, spec: dict[str, Any]) -> MetricValue:
    with _fix_context(subject, spec):
        return evaluate(subject.model, target)


def _describe(kind: str, components: Sequence[str], layer: int | None) -> str:
    names = " and ".join(
        [", ".join(components[:-1]), components[-1]] if len(components) > 1 else components
    )
    if kind == "direction_removal":
        return f"Removing the prompt-vs-counterfactual direction up to layer {layer}"
    if kind == "weight_edit":
        return f"Editing the write weights of {names} (trained against P(bad), KL-bounded)"
    if kind == "write_direction_removal":
        return f"Removing the prompt-vs-counterfactual direction from what {names} write"
    if kind == "targeted_ablation":
        n_neurons = sum(1 for c in components if ".N" in c)
        heads = [c for c in components if ".H" in c]
        what = f"{n_neurons} MLP neurons" + (f" and {', '.join(heads)}" if heads else "")
        return f"Mean-ablating {what}"
    return f"Mean-ablating {names}"


def try_remedies(
    subject: Subject,
    target: Target,
    cause_set: Sequence[str],
    *,
    counterfactual: Target | None,
    reference: Sequence[str],
    top_cause: str | None = None,
    p_bad_target: float = 0.2,
    bad_text: str = "",
    neuron_scores: dict[str, float] | None = None,
    max_loss_pct: float = 5.0,
    edit_prompts: Sequence[str] = (),
    batch: int = 32,
    grad_batch: int = 32,
) -> list[Remedy]:
    """Try each fix for ``cause_set`` and rank them; see the module docstring.

    Memory bounds: ``batch`` benign prompts per forward when measuring side effects,
    ``grad_batch`` edit prompts per forward and backward in the weight edit.
    """
    if not cause_set:
        raise RemedyError("no cause set to remedy")
    if not reference:
        raise RemedyError("side effects need reference prompts")
    # an MLP's neurons in the cause set (an infrastructure MLP resolved to them) are fixed
    # through their MLP, and first of all by ablating those neurons alone
    group = [f"L{c.layer}.N{n}" for c in map(parse_id, cause_set) if c.neurons for n in c.neurons]
    comps = list(
        dict.fromkeys(
            c if parse_id(c).kind in ("head", "mlp") else f"L{parse_id(c).layer}.MLP"
            for c in cause_set
            if parse_id(c).kind in ("head", "mlp") or parse_id(c).neurons
        )
    )
    if not comps:
        raise RemedyError("the cause set holds no heads, MLPs or MLP neurons")
    before = evaluate(subject.model, target)
    top = top_cause if top_cause in comps else comps[0]
    mlp_layers = {parse_id(c).layer for c in comps if parse_id(c).kind == "mlp"}
    heads = [c for c in comps if parse_id(c).kind == "head"]
    # the neurons that push hardest toward the bad continuation; a targeted ablation takes at
    # most the first 32
    ranked_neurons = list(
        dict.fromkeys(
            group
            + sorted(
                (
                    n
                    for n, v in (neuron_scores or {}).items()
                    if parse_id(n).layer in mlp_layers and v > 0
                ),
                key=lambda n: -(neuron_scores or {})[n],
            )
        )
    )[:32]
    # the weight edit first: its memory is freed before the benign run keeps its own
    held = [p for p in edit_prompts if p not in set(reference)]
    deltas = (
        weight_edit(subject, target, comps, held[:64], p_bad_target=p_bad_target, batch=grad_batch)
        if held
        else None
    )
    # one run over the benign prompts without a fix: the means the ablations hold sites at,
    # and the residual stream below each layer a fix may start at
    try:
        bench = BenignRun(
            subject,
            reference,
            batch=batch,
            sites=[*comps, *ranked_neurons],
            keep={parse_id(c).layer or 0 for c in comps},  # every fix below starts at one
        )
    except BenignError as e:
        raise RemedyError(str(e)) from None
    means = {c: bench.means[c] for c in comps}
    specs: list[dict[str, Any]] = [
        {
            "kind": "mean_ablation",
            "components": comps,
            "values": {k: v.tolist() for k, v in means.items()},
        }
    ]
    if len(comps) > 1:
        specs.append(
            {
                "kind": "mean_ablation_top",
                "components": [top],
                "values": {top: means[top].tolist()},
            }
        )
    if ranked_neurons:
        n_means = {n: bench.means[n] for n in ranked_neurons}
        trial: dict[str, Any] = {}
        for k in (2, 4, 8, 16, 32):
            chosen = ranked_neurons[:k]
            trial = {
                "format": PATCH_FORMAT,
                "kind": "targeted_ablation",
                "components": heads + chosen,
                "values": {
                    **{h: means[h].tolist() for h in heads},
                    **{n: n_means[n].tolist() for n in chosen},
                },
            }
            if _evaluate_with(subject, target, trial).p_bad < p_bad_target:
                break
            if len(chosen) == len(ranked_neurons):
                break
        specs.append(trial)
    if counterfactual is not None and subject.adapter.model_type != "gemma2":
        dev = subject.device
        wd = _write_directions(subject, target, counterfactual, comps)
        if wd:
            specs.append(
                {"kind": "write_direction_removal", "components": list(wd), "directions": wd}
            )
        # every layer up to the deepest of the set (the direction may be cleanest below it),
        # at most 8: the set's own layers first, then the lowest ones
        deepest = max(parse_id(c).layer or 0 for c in comps)
        own = sorted({parse_id(c).layer or 0 for c in comps})
        layers = sorted(
            {*own, *[x for x in range(deepest + 1) if x not in own][: max(0, 8 - len(own))]}
        )
        rids = [f"L{layer}.RESID_POST" for layer in layers]
        with torch.inference_mode():
            with capture(subject, rids) as a:
                subject.model(input_ids=torch.tensor([list(target.prompt_ids)], device=dev))
            with capture(subject, rids) as b:
                subject.model(input_ids=torch.tensor([list(counterfactual.prompt_ids)], device=dev))
        for layer, rid in zip(layers, rids, strict=True):
            direction = (a[rid][0].float().mean(0) - b[rid][0].float().mean(0)).cpu()
            if float(direction.norm()) > 0:
                specs.append(
                    {
                        "kind": "direction_removal",
                        "components": [rid],
                        "layer": layer,
                        "direction": direction.tolist(),
                    }
                )
    if deltas is not None:
        specs.append(
            {
                "kind": "weight_edit",
                "components": comps,
                "deltas": {k: _pack(v) for k, v in deltas.items()},
                "edit_prompts": weight_edit_prompts(subject, held[:64]),
            }
        )
    out: list[Remedy] = []
    for spec in specs:
        spec = {"format": PATCH_FORMAT, "model_fingerprint": subject.fingerprint, **spec}
        after = _evaluate_with(subject, target, spec)
        side = bench.side_effect(functools.partial(_fix_context, subject, spec), _first_layer(spec))
        r = Remedy(
            kind=spec["kind"],
            components=list(spec["components"]),
            metric_before=before.metric,
            metric_after=after.metric,
            p_bad_before=before.p_bad,
            p_bad_after=after.p_bad,
            side_effect=side,
            patch_spec=spec,
            layer=spec.get("layer"),
        )
        what = _describe(r.kind, r.components, r.layer)
        bad = bad_text or "the bad continuation"
        moves = "rises" if side["loss_change_pct"] >= 0 else "falls"
        r.note = (
            f"{what} {'lowers' if r.p_bad_after < r.p_bad_before else 'changes'} "
            f"P({bad!r}) from {r.p_bad_before:.2f} to {r.p_bad_after:.2f}; loss on "
            f"{int(side['n_prompts'])} benign prompts {moves} "
            f"{abs(side['loss_change_pct']):.1f}% (mean KL {side['kl_mean']:.4f} nats per token)."
        )
        out.append(r)
    recommend(out, p_bad_target=p_bad_target, max_loss_pct=max_loss_pct)
    return out


def recommend(
    remedies: Sequence[Remedy], *, p_bad_target: float = 0.2, max_loss_pct: float = 5.0
) -> Remedy | None:
    """Mark the fix to recommend, and say why in its note; None when no fix lowers P(bad).

    Under the P(bad) target at a tolerable cost: the cheapest. Else the best trade-off among
    those that lower P(bad), with the note saying which bound it misses. A fix that does not
    lower P(bad) is never recommended, whatever its cost.
    """
    lowers = [r for r in remedies if r.p_bad_after < r.p_bad_before]
    if not lowers:
        if remedies:
            remedies[0].note += " No fix lowers P(bad): none is recommended."
        return None
    ok = [
        r
        for r in lowers
        if r.p_bad_after < p_bad_target and r.side_effect["loss_change_pct"] < max_loss_pct
    ]
    if ok:
        best = min(ok, key=lambda r: r.side_effect["loss_change_pct"])
        best.note += " Recommended."
    else:
        cheap = [r for r in lowers if r.side_effect["loss_change_pct"] < max_loss_pct]
        best = min(cheap or lowers, key=lambda r: r.p_bad_after)
        best.note += (
            f" Recommended with reservations: no fix brought P(bad) under {p_bad_target} "
            f"while raising the benign loss by less than {max_loss_pct:g}%."
        )
    best.recommended = True
    return best


# ---------------------------------------------------------------------------------------------
# baking a fix into the weights


def _bias_of(mod: torch.nn.Module, what: str) -> torch.Tensor:
    b = getattr(mod, "bias", None)
    if not isinstance(b, torch.Tensor):
        raise RemedyError(
            f"{what} has no bias to hold the mean, so mean ablation cannot be baked into this "
            "architecture's weights; use the direction_removal fix, or apply the fix at run time"
        )
    return b


@torch.no_grad()
def _bake(subject: Subject, spec: dict[str, Any]) -> None:
    a = subject.adapter
    if spec["kind"] in ("mean_ablation", "mean_ablation_top", "targeted_ablation"):
        for cid in spec["components"]:
            c = parse_id(cid)
            mean = torch.tensor(spec["values"][cid])
            assert c.layer is not None
            if c.kind == "head":
                proj = a.attn_out(c.layer)
                assert c.index is not None
                # a constant head output z: its write W_h z moves into the bias, W_h becomes 0
                w = weight_of(proj)
                const = a.head_result(c.layer, c.index, mean.to(w.dtype))
                bias = _bias_of(proj, f"{cid}'s output projection")
                sl = slice(c.index * a.d_head, (c.index + 1) * a.d_head)
                if type(proj).__name__ == "Conv1D":
                    w[sl, :] = 0
                else:
                    w[:, sl] = 0
                bias += const.to(bias.dtype)
            elif c.kind == "mlp":
                down = a.mlp_down(c.layer)
                bias = _bias_of(down, f"{cid}'s down projection")
                weight_of(down).zero_()
                bias.copy_(mean.to(bias.dtype))
            elif c.kind == "neuron":
                assert c.index is not None
                down = a.mlp_down(c.layer)
                bias = _bias_of(down, f"{cid}'s down projection")
                w = weight_of(down)
                # a constant activation: its write moves into the bias, its weights become 0
                if type(down).__name__ == "Conv1D":
                    bias += mean.to(w.dtype) * w[c.index, :]
                    w[c.index, :] = 0
                else:
                    bias += mean.to(w.dtype) * w[:, c.index]
                    w[:, c.index] = 0
            else:
                raise RemedyError(f"cannot bake a mean ablation of {cid}")
        return
    if spec["kind"] == "direction_removal":
        if a.model_type == "gemma2":
            raise RemedyError("direction removal cannot be baked into Gemma2 (norms after blocks)")
        d = torch.tensor(spec["direction"], dtype=torch.float32)
        d = d / d.norm()
        P = torch.eye(d.numel()) - torch.outer(d, d)  # (d_model, d_model), symmetric
        writers = _residual_writers(subject, int(spec["layer"]))
        un = a.unembed
        if weight_of(un) is weight_of(a.embed):
            # tied embeddings: the fix changes what is written, not how logits are read
            un.weight = torch.nn.Parameter(weight_of(a.embed).detach().clone())
            subject.model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        for mod in writers:
            w = weight_of(mod)
            Pw = P.to(w.dtype)
            if isinstance(mod, torch.nn.Embedding) or type(mod).__name__ == "Conv1D":
                w.copy_(w @ Pw)  # rows are written vectors: (n, d_model) or Conv1D (in, d_model)
            else:
                w.copy_(Pw @ w)  # nn.Linear (d_model, in)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_(b @ Pw)
        return
    if spec["kind"] == "weight_edit":
        for cid, v in spec["deltas"].items():
            c = parse_id(cid)
            assert c.layer is not None
            delta = _unpack(v)  # (in, d_model)
            if c.kind == "head":
                assert c.index is not None
                proj = a.attn_out(c.layer)
                w = weight_of(proj)
                sl = slice(c.index * a.d_head, (c.index + 1) * a.d_head)
                if type(proj).__name__ == "Conv1D":
                    w[sl, :] += delta.to(w.dtype)
                else:
                    w[:, sl] += delta.T.to(w.dtype)
            elif c.kind == "mlp":
                down = a.mlp_down(c.layer)
                w = weight_of(down)
                w += (delta if type(down).__name__ == "Conv1D" else delta.T).to(w.dtype)
            else:
                raise RemedyError(f"cannot bake a weight edit of {cid}")
        return
    if spec["kind"] == "write_direction_removal":
        for cid, v in spec["directions"].items():
            c = parse_id(cid)
            assert c.layer is not None
            d = _unit(v)
            P = torch.eye(d.numel()) - torch.outer(d, d)
            if c.kind == "head":
                assert c.index is not None
                proj = a.attn_out(c.layer)
                w = weight_of(proj)
                sl = slice(c.index * a.d_head, (c.index + 1) * a.d_head)
                if type(proj).__name__ == "Conv1D":
                    w[sl, :] = w[sl, :] @ P.to(w.dtype)  # (d_head, d_model)
                else:
                    w[:, sl] = P.to(w.dtype) @ w[:, sl]  # (d_model, d_head)
            elif c.kind == "mlp":
                down = a.mlp_down(c.layer)
                w = weight_of(down)
                if type(down).__name__ == "Conv1D":
                    w.copy_(w @ P.to(w.dtype))
                else:
                    w.copy_(P.to(w.dtype) @ w)
                b = getattr(down, "bias", None)
                if isinstance(b, torch.Tensor):
                    b.copy_(b @ P.to(b.dtype))
            else:
                raise RemedyError(f"cannot bake a write direction removal of {cid}")
        return
    raise RemedyError(f"unknown fix kind {spec['kind']!r}")


def apply_patch(
    spec_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    allow_pickle: bool = False,
) -> Path:
    """Bake a patch spec into a copy of ``model_dir`` at ``out_dir`` (safetensors).

    ``allow_pickle`` loads a model whose weights are pickle (this runs code from the file; only
    for files you trust); the patched copy is written as safetensors.

    The spec's model fingerprint must match the model's. Mean ablations need biases to hold
    the means (GPT-2 style); direction removal projects every write into the residual stream up
    to the causal layer, which is exact for architectures whose residual stream is a plain sum.
    """
    try:
        spec = read_bounded_json(spec_path, what="SPEC", max_bytes=MAX_SPEC_BYTES)
    except PathError as e:
        raise RemedyError(str(e)) from None
    if not isinstance(spec, dict) or spec.get("format") != PATCH_FORMAT:
        raise RemedyError(f"{str(spec_path)!r} is not an rca patch spec ({PATCH_FORMAT})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RemedyError(f"output directory {str(out)!r} is not empty; choose a new one")
    subject = load_subject(model_dir, device="cpu", allow_pickle=allow_pickle)
    if spec.get("model_fingerprint") and spec["model_fingerprint"] != subject.fingerprint:
        raise RemedyError(
            f"the patch was made for model {spec['model_fingerprint'][:12]}, but {str(model_dir)!r}"
            f" is {str(subject.fingerprint)[:12]}; apply it to the model it was made for"
        )
    _bake(subject, spec)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    subject.model.save_pretrained(tmp)  # type: ignore[operator]
    subject.tokenizer.save_pretrained(tmp)
    (tmp / "rca-patch.json").write_text(
        json.dumps(
            {k: v for k, v in spec.items() if k not in ("direction", "directions", "deltas")},
            indent=1,
        )
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
