"""Confirm: causal verdicts from batched ablation experiments.

Attribution is a first-order estimate; a postmortem needs interventions it can defend. This
module runs them, many at once:

- **The engine** (``Ablator``): K variants, each a set of components with the value each is set
  to, run in ceil(K / B) forward passes with one mask per batch element. Variants are grouped by
  their first ablated layer, and the decoder layers below it are replaced for that pass by stubs
  that return the clean run's cached outputs: un-ablated activations are reused, not
  recomputed. On a CPU, where batching saves little, that reuse is where the saving is.
- **Values** a component can be set to: ``zero``; ``mean`` (its mean over the reference prompts,
  averaged over positions); ``resample`` (its activation on a reference prompt drawn at random
  per variant, position by position); ``baseline`` (its activation on the counterfactual: exact
  activation patching); ``clean`` (its own clean activation, used to freeze components).
- **Per candidate**: total effect TE (patched to the baseline), direct effect DE (patched to the
  baseline with every later component frozen at its clean value, so only its direct path to the
  logits changes), necessity NE (ablated by the chosen kind) and, for robust necessity,
  necessity under zero ablation NE0.
- **Specificity**: each candidate's benign damage, the LM-loss change and KL on ordinary text
  when it is mean-ablated (``rca.specificity``); a component that ordinary text needs as well
  (``rca.verdicts.INFRASTRUCTURE_LOSS_PCT``) is *infrastructure*: reported, never blamed.
- **Ranking** (``rank_candidates``): infrastructure is never first; a candidate's effect is the
  share of P(bad) that max(TE, NE) removes, and the leading group is every candidate within
  ``window`` of the largest. Its robust necessity is min(NE, NE0), the smaller drop of both
  ablations. The first rank goes to the origin, the robustly necessary member (at least
  ``necessary_fraction`` of the largest) that computes latest: carriers of the trigger's
  identity and enablers are as necessary, but compute before it; amplifiers after it are not
  robustly necessary. The second goes to the writer, the member with the largest direct effect.
  The rest follow by robust necessity, then by effect (docs/confirm.md).
- **Minimal cause set**: specific candidates, greedy in rank order until ablating the set removes
  ``set_fraction`` of the metric, measured from the prompt's metric down to the reference point
  (the baseline's metric, or 0 for a log-ratio metric whose baseline is below 0: P(bad) =
  P(good)); then each member is dropped if the rest still reaches it.
- **Necessity and sufficiency** of the set, and **random sets** of the same size and kind for an
  empirical p-value. Verdicts carry their reasons and the thresholds used; the words are
  defined in ``rca.verdicts``.
- **The circuit** (``rca.circuit``): the specific candidates that, patched alone to the
  baseline, remove ``faithful_fraction`` of the gap, and those that carry the incident where the
  prompt differs from its counterfactual, each at its positions and with a role (entry, route,
  writer); the infrastructure beside them; the edges between members, each path-patched alone
  (``Ablator.path_effects``); the faithfulness and its curve against the attribution ranking.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rca.benign import benign_prompts
from rca.circuit import Circuit, CircuitMember, build_circuit, forward_position
from rca.hooks import layers_frozen, layers_skipped, padded_batch, run_until, top_mlp_trimmed
from rca.ids import neuron_group, parse_id
from rca.metric import (
    Target,
    encode_text,
    logits_kwargs,
    reference_point,
    share_removed,
)
from rca.specificity import BenignError, BenignRun, Damage, benign_damage, encoded
from rca.subject import Subject
from rca.verdicts import definitions

if TYPE_CHECKING:
    from rca.trace.components import ComponentScores

__all__ = [
    "Ablator",
    "ConfirmConfig",
    "ConfirmError",
    "CandidateEvidence",
    "Circuit",
    "CircuitMember",
    "SetEvidence",
    "Verdict",
    "confirm",
    "check_gap",
    "empirical_p_value",
    "reference_point",
    "auto_batch_size",
    "rank_candidates",
    "verdict_definitions",
]

SOURCES = ("zero", "mean", "resample", "baseline", "clean")
Variant = dict[str, str]  # component id -> value source


class ConfirmError(ValueError):
    """An experiment that cannot run as asked."""


def empirical_p_value(observed: float, null: Sequence[float], *, tol: float = 0.0) -> float:
    """P(null >= observed) with the +1 correction: (1 + #{null >= observed - tol}) / (1 + n).

    Never zero: with n random draws the smallest reportable p-value is 1 / (n + 1). ``tol``
    counts numerical ties (float noise between batch rows) against the observation, which
    keeps the test conservative.
    """
    n = len(null)
    if n == 0:
        return 1.0
    return (1 + sum(1 for v in null if v >= observed - tol)) / (1 + n)


def check_gap(
    subject: Subject,
    target: Target,
    *,
    baseline: Target | None,
    reference: Sequence[str] | Sequence[Sequence[int]] = (),
    config: ConfirmConfig | None = None,
    metrics: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The prompt's metric and the baseline's, as ``confirm`` will measure them, from the
    fewest forward passes; ConfirmError where confirm would refuse them (the prompt's metric
    not above the reference point). ``metrics``: the prompt's and the counterfactual's where
    the caller has them.

    With a counterfactual ``baseline`` that is its metric; without, the metric with every head
    and MLP ablated as confirm's set ablations are (mean over ``reference``, else zero)."""
    cfg = config or ConfirmConfig()
    if baseline is not None:
        if metrics is None:
            from rca.metric import evaluate

            metrics = (
                evaluate(subject.model, target).metric,
                evaluate(subject.model, baseline).metric,
            )
        m_clean, m_base = metrics
        what = "the counterfactual's"
    else:
        ab = Ablator(subject, target, reference=reference, batch_size=cfg.batch_size)
        ablation = cfg.kind if cfg.kind in ("zero", "mean", "resample") else None
        ablation = ablation or ("mean" if ab.refs else "zero")
        m_clean = ab.metric_clean
        m_base = float(ab.run([dict.fromkeys(ab.components, ablation)])[0])
        what = f"the baseline's (every head and MLP {ablation}-ablated)"
    m_ref = reference_point(m_clean, m_base, n_conts=target.n_conts)
    if m_clean - m_ref <= 0:
        raise ConfirmError(
            f"the metric on the prompt ({m_clean:+.3f}) is not above {what} ({m_base:+.3f}), so "
            "there is no incident behaviour to explain"
        )
    return m_clean, m_base


def auto_batch_size(device: torch.device | str) -> int:
    """Variants per batched forward when none is configured.

    On a CPU batching saves little and large batches lose to cache misses: 256 single-component
    variants of a 12 x 768 GPT-2 at 128 tokens cost 0.43 forward passes each in batches of 4,
    0.47 in batches of 32; 6 x 256: 0.48 against 0.82 (benchmarks/, docs/benchmarks.md). On a
    GPU a batch fills the device.
    """
    return 64 if torch.device(device).type == "cuda" else 4


_NO_LOGITS = {"logits_to_keep": 1}


class Ablator:
    """Batched ablation of heads and MLPs on one incident target.

    ``baseline``: the counterfactual target (positions aligned) for the ``baseline`` source;
    ``reference``: reference prompts (texts or id sequences) for ``mean`` and ``resample``.
    ``reuse``: run only from the first ablated layer up (and to the last one not held clean);
    ``memo``: answer a deterministic variant already run from that run. Neither changes a
    metric beyond float noise; both are on by default.
    """

    def __init__(
        self,
        subject: Subject,
        target: Target,
        *,
        baseline: Target | None = None,
        reference: Sequence[str] | Sequence[Sequence[int]] = (),
        batch_size: int = 0,
        reuse: bool = True,
        memo: bool = True,
        seed: int = 0,
    ) -> None:
        self.s, self.t = subject, target
        self.memo = memo  # False: every variant runs, repeats too (benchmarks/)
        self.a = subject.adapter
        self.batch_size = batch_size or auto_batch_size(subject.device)
        self.reuse = reuse
        self.seed = seed
        self.components = [
            f"L{layer}.{c}"
            for layer in range(self.a.n_layers)
            for c in [f"H{h}" for h in range(self.a.n_heads)] + ["MLP"]
        ]
        self.n_forward_rows = 0
        self.forward_equiv = 0.0
        self.n_reused = 0  # variants answered from an earlier run of the same variant
        self._memo: dict[tuple[tuple[str, str], ...], float] = {}
        # named values beyond SOURCES: source name -> site key -> (rows, pos, width)
        self.sources: dict[str, dict[str, torch.Tensor]] = {}
        # layers whose MLP neurons (the down projection's input) are sites too: record_neurons
        self.neuron_layers: set[int] = set()
        self.clean, self.layer_out, self.metric_clean = self._record_target(target)
        self.base: dict[str, torch.Tensor] | None = None
        self.metric_baseline: float | None = None
        self._baseline = baseline
        if baseline is not None:
            if baseline.n_prompt != target.n_prompt or baseline.conts != target.conts:
                raise ConfirmError("the baseline target must line up with the incident target")
            self.base, _, self.metric_baseline = self._record_target(baseline)
        seqs = [
            encode_text(subject.tokenizer, p) if isinstance(p, str) else list(p) for p in reference
        ]
        self._ref_seqs = [s for s in seqs if s]
        self.refs: list[dict[str, torch.Tensor]] = self._record_refs(self._ref_seqs)
        self.means: dict[str, torch.Tensor] | None = None
        if self.refs:
            self.means = {
                k: torch.cat([r[k] for r in self.refs]).mean(0) for k in self.refs[0]
            }  # (width,)

    @torch.inference_mode()
    def record_neurons(self, layers: Iterable[int]) -> None:
        """Make the MLP neurons of ``layers`` ablatable (``L3.N5``, ``L3.N5+17``): their
        values on the incident, the baseline and the reference prompts are recorded by forward
        passes that end at the deepest of ``layers`` (counted in ``forward_equiv``, the
        reference prompts by their padded tokens)."""
        new = sorted({x for x in layers if x not in self.neuron_layers})
        if not new:
            return
        self.neuron_layers |= set(new)
        top = new[-1]
        share = (top + 1) / self.a.n_layers
        acts: dict[str, torch.Tensor] = {}

        def run(passes: float = 1.0, **inputs: Any) -> dict[str, torch.Tensor]:
            acts.clear()
            handles = [
                self.a.mlp_down(x).register_forward_pre_hook(
                    lambda m, a, _k=f"n{x}": acts.__setitem__(_k, a[0].detach().clone())
                )
                for x in new
            ]
            try:
                run_until(self.s, top, use_cache=False, **inputs)
            finally:
                for h in handles:
                    h.remove()
            self.forward_equiv += share * passes
            return dict(acts)

        self.clean |= run(input_ids=self.t.input_ids(device=self.s.device))
        if self._baseline is not None and self.base is not None:
            self.base |= run(input_ids=self._baseline.input_ids(device=self.s.device))
        if not self.refs:
            return
        pad = int(getattr(self.s.tokenizer, "pad_token_id", None) or 0)
        batch = max(16, self.batch_size)
        for i in range(0, len(self._ref_seqs), batch):
            chunk = self._ref_seqs[i : i + batch]
            ids, mask = padded_batch(chunk, pad, self.s.device)
            got = run(ids.numel() / self.t.length, input_ids=ids, attention_mask=mask)
            for r, q in enumerate(chunk):
                self.refs[i + r] |= {k: v[r, : len(q)].clone() for k, v in got.items()}
        assert self.means is not None
        self.means |= {f"n{x}": torch.cat([r[f"n{x}"] for r in self.refs]).mean(0) for x in new}

    # -- recording ---------------------------------------------------------------------------
    def _site_keys(self) -> list[tuple[str, nn.Module, bool]]:
        out = []
        for layer in range(self.a.n_layers):
            out.append((f"z{layer}", self.a.attn_out(layer), True))
            out.append((f"m{layer}", self.a.mlp(layer), False))
            if layer in self.neuron_layers:
                out.append((f"n{layer}", self.a.mlp_down(layer), True))
        return out

    def _site_hooks(self, acts: dict[str, torch.Tensor], *, clone: bool) -> list[Any]:
        """Hooks that store every site's activation in ``acts`` (detached; copied with
        ``clone``); the caller removes them."""

        def keep(key: str, x: torch.Tensor) -> None:
            acts[key] = x.detach().clone() if clone else x.detach()

        handles = []
        for key, mod, pre in self._site_keys():
            if pre:
                handles.append(mod.register_forward_pre_hook(lambda m, a, _k=key: keep(_k, a[0])))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, o, _k=key: keep(_k, o)))
        return handles

    @torch.inference_mode()
    def _recording(
        self, ids: torch.Tensor, **kw: Any
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], Any]:
        """Every site's activation and every decoder layer's output from one forward pass of
        ``ids`` (keyword arguments go to the model), and that pass's logits."""
        acts: dict[str, torch.Tensor] = {}
        outs: list[torch.Tensor] = []
        handles = self._site_hooks(acts, clone=True)
        try:
            for layer in self.a.layers:
                handles.append(
                    layer.register_forward_hook(
                        lambda m, a, o: outs.append(
                            (o[0] if isinstance(o, tuple) else o).detach().clone()
                        )
                    )
                )
            logits = self.s.model(input_ids=ids, **kw).logits
        finally:
            for h in handles:
                h.remove()
        return acts, outs, logits

    def _record(self, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The activations of any prompt; its logits are not computed."""
        acts, outs, _ = self._recording(
            ids, **(_NO_LOGITS if logits_kwargs(self.s.model, self.t) else {})
        )
        return acts, outs

    def _record_target(
        self, target: Target
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], float]:
        """A target's activations and its metric, from one forward pass."""
        ids = target.input_ids(device=self.s.device)
        acts, outs, logits = self._recording(ids, **logits_kwargs(self.s.model, target))
        return acts, outs, float(target.metric(logits)[0])

    @torch.inference_mode()
    def _record_refs(self, seqs: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """Each reference prompt's site activations, (pos, width), recorded a batch at a time:
        right-padded with an attention mask, so every real position sees only its own prompt
        (tests/unit/test_confirm.py checks them against one prompt per forward)."""
        out: list[dict[str, torch.Tensor]] = []
        pad = int(getattr(self.s.tokenizer, "pad_token_id", None) or 0)
        batch = max(16, self.batch_size)
        acts: dict[str, torch.Tensor] = {}
        handles = self._site_hooks(acts, clone=False)  # each row is cloned when sliced
        try:
            kw = _NO_LOGITS if logits_kwargs(self.s.model, self.t) else {}
            for i in range(0, len(seqs), batch):
                chunk = seqs[i : i + batch]
                ids, mask = padded_batch(chunk, pad, self.s.device)
                acts.clear()
                self.s.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
                out += [
                    {k: v[r, : len(q)].clone() for k, v in acts.items()}
                    for r, q in enumerate(chunk)
                ]
        finally:
            for h in handles:
                h.remove()
        return out

    # -- values ------------------------------------------------------------------------------
    def _site(self, cid: str) -> tuple[str, slice | list[int], int]:
        c = parse_id(cid)
        if c.pos is not None and c.pos >= self.t.length:
            raise ConfirmError(f"{cid}: position out of range 0..{self.t.length - 1}")
        if c.kind == "head":
            assert c.layer is not None and c.index is not None
            d = self.a.d_head
            return f"z{c.layer}", slice(c.index * d, (c.index + 1) * d), c.layer
        if c.kind == "mlp":
            assert c.layer is not None
            return f"m{c.layer}", slice(None), c.layer
        if c.kind in ("neuron", "neurons"):
            assert c.layer is not None
            if c.layer not in self.neuron_layers:
                raise ConfirmError(f"{cid}: record_neurons([{c.layer}]) first")
            if c.neurons[-1] >= self.a.d_mlp:
                raise ConfirmError(f"{cid}: neurons out of range 0..{self.a.d_mlp - 1}")
            return f"n{c.layer}", list(c.neurons), c.layer
        raise ConfirmError(f"{cid}: only heads, MLPs and MLP neurons can be ablated here")

    def _value(self, key: str, source: str, variant_index: int) -> torch.Tensor:
        """The replacement for one site, shaped to broadcast to (rows, pos, width)."""
        clean = self.clean[key]
        if source in self.sources:
            return self.sources[source][key]
        if source == "zero":
            return torch.zeros_like(clean)
        if source == "clean":
            return clean
        if source == "baseline":
            if self.base is None:
                raise ConfirmError("the baseline source needs a counterfactual baseline")
            return self.base[key]
        if source == "mean":
            if self.means is None:
                raise ConfirmError("mean ablation needs reference prompts")
            return self.means[key].expand_as(clean)
        if source == "resample":
            if not self.refs:
                raise ConfirmError("resample ablation needs reference prompts")
            rng = random.Random(self.seed * 1_000_003 + variant_index)
            ref = self.refs[rng.randrange(len(self.refs))][key]  # (ref_pos, width)
            T = clean.shape[1]
            idx = torch.clamp(torch.arange(T, device=ref.device), max=ref.shape[0] - 1)
            return ref[idx].unsqueeze(0).expand_as(clean)
        raise ConfirmError(f"unknown value source {source!r}; use one of {', '.join(SOURCES)}")

    # -- running -----------------------------------------------------------------------------
    def first_layer(self, variant: Variant) -> int:
        return min((self._site(c)[2] for c in variant), default=self.a.n_layers)

    def last_layer(self, variant: Variant) -> int:
        """The deepest layer a variant needs run: every layer above it has each head and its
        MLP held ``clean`` (a direct-effect variant), so it adds its clean write
        (``rca.hooks.layers_frozen``). Never below the first ablated layer."""
        top = self.a.n_layers - 1
        last, floor = top, min(self.first_layer(variant), top)
        while last > floor and all(
            variant.get(c) == "clean"
            for c in [f"L{last}.H{h}" for h in range(self.a.n_heads)] + [f"L{last}.MLP"]
        ):
            last -= 1
        return last

    @staticmethod
    def _memo_key(variant: Variant) -> tuple[tuple[str, str], ...] | None:
        """A variant's key where its metric does not depend on its index (no resample)."""
        if any(src == "resample" for src in variant.values()):
            return None
        return tuple(sorted(variant.items()))

    @torch.inference_mode()
    def run(self, variants: Sequence[Variant], *, index_offset: int = 0) -> torch.Tensor:
        """The metric under each variant: (len(variants),). Order is preserved.

        A variant already run (by this Ablator, in this call or an earlier one) is not run
        again: a deterministic variant's metric is the same whichever batch it is in, within
        float noise. Confirm's stages share many: a random set of one component is a single,
        the first prefix of the cause set is its top candidate alone."""
        out = torch.empty(len(variants))
        todo: list[int] = []
        first_of: dict[tuple[tuple[str, str], ...], int] = {}
        copies: list[tuple[int, int]] = []  # (index, index of the same variant in this call)
        for i, v in enumerate(variants):
            key = self._memo_key(v) if self.memo else None
            if key is not None and key in self._memo:
                out[i] = self._memo[key]
            elif key is not None and key in first_of:
                copies.append((i, first_of[key]))
            else:
                if key is not None:
                    first_of[key] = i
                todo.append(i)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            v = variants[i]
            groups.setdefault((self.first_layer(v), self.last_layer(v)), []).append(i)
        # one group per first ablated layer (and last layer run), so that every pass reuses
        # all it can
        for _, idx in sorted(groups.items()):
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                vals = self._run_chunk(
                    [variants[i] for i in chunk], [index_offset + i for i in chunk]
                )
                out[chunk] = vals
        for key, i in first_of.items():
            self._memo[key] = float(out[i])
        for i, j in copies:
            out[i] = out[j]
        self.n_reused += len(variants) - len(todo)
        return out

    def _edit_hooks(self, variants: list[Variant], indices: list[int]) -> list[Any]:
        """Hooks that set each batch element's sites to its variant's values; the caller
        removes them."""
        K, rows = len(variants), self.t.rows
        dev = self.s.device
        # per site: mask (K, pos, width) and values (K, rows, pos, width); an id with a
        # position ("L3.H2@7") edits that position only
        edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, (variant, vidx) in enumerate(zip(variants, indices, strict=True)):
            for cid, source in variant.items():
                key, sl, _ = self._site(cid)
                pos = parse_id(cid).pos
                at = slice(None) if pos is None else slice(pos, pos + 1)
                clean = self.clean[key]
                if key not in edits:
                    edits[key] = (
                        torch.zeros(K, *clean.shape[1:], device=dev, dtype=clean.dtype),
                        torch.zeros(K, *clean.shape, device=dev, dtype=clean.dtype),
                    )
                mask, values = edits[key]
                # views first: an index list beside the batch index would move its axis
                mask[k][at][..., sl] = 1
                values[k][:, at][..., sl] = self._value(key, source, vidx)[:, at][..., sl]
        handles = []
        for key, mod, pre in self._site_keys():
            if key not in edits:
                continue
            mask, values = edits[key]

            def apply(x: torch.Tensor, _m=mask, _v=values) -> torch.Tensor:
                xv = x.view(K, rows, *x.shape[1:])
                m = _m.unsqueeze(1)  # (K, 1, pos, width)
                return (xv * (1 - m) + _v * m).view_as(x)

            if pre:
                handles.append(
                    mod.register_forward_pre_hook(lambda mm, a, _f=apply: (_f(a[0]), *a[1:]))
                )
            else:
                handles.append(mod.register_forward_hook(lambda mm, a, o, _f=apply: _f(o)))
        return handles

    def _run_chunk(self, variants: list[Variant], indices: list[int]) -> torch.Tensor:
        K, rows = len(variants), self.t.rows
        dev = self.s.device
        first = min((self.first_layer(v) for v in variants), default=self.a.n_layers)
        first = min(first, self.a.n_layers) if self.reuse else 0
        last = max(self.last_layer(v) for v in variants) if self.reuse else self.a.n_layers - 1
        handles = []
        try:
            handles = self._edit_hooks(variants, indices)
            ids = self.t.input_ids(K, device=dev)
            below = self.layer_out[first - 1] if first > 0 else None
            # no KV cache: the stubs would leave holes in it, and nothing is generated; the top
            # MLP computes only the positions the metric reads, unless its neurons are edited
            top = f"n{self.a.n_layers - 1}"
            edits_top = any(self._site(c)[0] == top for v in variants for c in v)
            with (
                layers_skipped(self.s, first, below),
                layers_frozen(self.s, last, self.layer_out),
                top_mlp_trimmed(self.s, 0 if edits_top else self.t.keep),
            ):
                logits = self.s.model(
                    input_ids=ids, use_cache=False, **logits_kwargs(self.s.model, self.t)
                ).logits
        finally:
            for h in handles:
                h.remove()
        self.n_forward_rows += K * rows
        computed = max(0, last + 1 - first) / self.a.n_layers
        self.forward_equiv += K * computed
        return self.t.metric(logits).float().cpu()

    # -- path patching -----------------------------------------------------------------------
    def _write_hook(self, out: list[torch.Tensor]) -> Callable[..., None]:
        def keep(m: nn.Module, a: Any, o: Any) -> None:
            out.append((o[0] if isinstance(o, tuple) else o).detach().clone())

        return keep

    @torch.inference_mode()
    def write_delta(self, sites: Sequence[str], source: str) -> torch.Tensor:
        """What one component writes into the residual stream when ``sites`` (its id, or its
        id at positions) are set to ``source``, minus what it writes on the clean run:
        (rows, pos, d_model). Only its own layer runs; a head's MLP in a sequential layer is
        held clean, so the difference is the head's write alone, after any norm the
        architecture applies to it before the add."""
        c = parse_id(sites[0])
        layer = self._site(sites[0])[2]
        variant: Variant = dict.fromkeys(sites, source)
        if c.kind == "head" and not self.a.parallel:
            variant[f"L{layer}.MLP"] = "clean"
        out: list[torch.Tensor] = []
        handles = self._edit_hooks([variant], [0])
        handles.append(self.a.layer(layer).register_forward_hook(self._write_hook(out)))
        self._run_layer(layer, handles)
        return out[0] - self.layer_out[layer]

    def _run_layer(self, layer: int, handles: list[Any]) -> None:
        """One run of decoder layer ``layer`` alone on the incident (the layers below are the
        clean run's, none above is run) with ``handles`` on; they are removed after."""
        try:
            below = self.layer_out[layer - 1] if layer > 0 else None
            with layers_skipped(self.s, layer, below):
                run_until(
                    self.s,
                    layer,
                    input_ids=self.t.input_ids(1, device=self.s.device),
                    use_cache=False,
                )
        finally:
            for h in handles:
                h.remove()
        self.forward_equiv += 1 / self.a.n_layers

    @torch.inference_mode()
    def read_through(self, sites: Sequence[str], delta: torch.Tensor, name: str) -> None:
        """Register, as the value source ``name``, what the component of ``sites`` computes when
        the residual stream it reads (the input of its attention or MLP norm) carries ``delta``
        on top of the clean run, everything else clean. Setting ``sites`` to ``name`` then
        patches the path from the writer of ``delta`` to this component alone: path patching."""
        c = parse_id(sites[0])
        key, _, layer = self._site(sites[0])
        norm = self.a.attn_norm(layer) if c.kind == "head" else self.a.mlp_norm(layer)

        def add(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
            x = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": x + delta.to(x.dtype)}

        acts: dict[str, torch.Tensor] = {}
        handles = [norm.register_forward_pre_hook(add, with_kwargs=True)]
        handles += self._site_hooks(acts, clone=True)
        self._run_layer(layer, handles)
        self.sources[name] = {key: acts[key]}

    def path_effects(
        self, pairs: Sequence[tuple[Sequence[str], Sequence[str]]], source: str
    ) -> list[float]:
        """The metric drop when only the path from each pair's first component to its second
        is patched: the first's sites set to ``source`` as the second reads them, nothing else
        changed. ``pairs``: (sites of the upstream component, sites of the downstream one), each
        a component id or that id at positions."""
        deltas: dict[tuple[str, ...], torch.Tensor] = {}
        variants: list[Variant] = []
        for up, down in pairs:
            u = tuple(up)
            if u not in deltas:
                deltas[u] = self.write_delta(u, source)
            name = f"path:{'+'.join(u)}>{'+'.join(down)}:{source}"
            self.read_through(down, deltas[u], name)
            variants.append(dict.fromkeys(down, name))
        vals = self.run(variants) if variants else torch.empty(0)
        return [self.metric_clean - float(v) for v in vals]


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfirmConfig:
    """Thresholds and budgets of a confirmation; recorded with every result."""

    top_k: int = 10  # candidates taken from the trace ranking
    # how sets and random sets are ablated: auto (mean over the reference prompts when there
    # are some, else patch to the counterfactual, else zero) | patch | zero | mean | resample.
    # Necessity of single candidates always uses an ablation (mean where reference prompts
    # exist, else zero), which catches enablers. Patching makes every carrier of the prompt's
    # difference as effective as the cause, so random sets that hold one are hard to beat.
    kind: str = "auto"
    set_fraction: float = 0.8  # a cause set must remove this share of the prompt-baseline gap
    component_fraction: float = 0.1  # a member must carry this share within the set
    window: float = 0.2  # leading group: effect within this share of the largest
    necessary_fraction: float = 0.4  # the necessary group's share of the most necessary
    writer_fraction: float = 0.2  # a writer's direct effect, as a share of the gap
    writer_share: float = 0.4  # and as a share of the largest writer's (the circuit's writers)
    alpha: float = 0.05  # p-value threshold against random sets
    n_random: int = 100  # random sets (>= 50)
    max_set: int = 6
    max_circuit: int = 8  # the most specific members a circuit grows to
    faithful_fraction: float = 0.8  # a circuit must remove this share of the gap, patched alone
    # an infrastructure MLP is resolved to at most this many of its neurons ("Specific
    # neurons"), where they keep this share of its effect on the incident
    max_neurons: int = 16
    neuron_fraction: float = 0.8
    # a member resolved to positions keeps this share of its total effect patched there alone
    position_fraction: float = 0.8
    benign_prompts: int = 16  # ordinary-text prompts each candidate's benign damage is measured on
    batch_size: int = 0  # variants per forward; 0: auto_batch_size (4 on a CPU, 64 on a GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "patch", "zero", "mean", "resample"):
            raise ConfirmError(
                f"kind must be auto, patch, zero, mean or resample, got {self.kind!r}"
            )
        if self.n_random < 50:
            raise ConfirmError("n_random must be at least 50")
        for name in (
            "set_fraction",
            "faithful_fraction",
            "position_fraction",
            "neuron_fraction",
            "component_fraction",
            "window",
            "alpha",
            "necessary_fraction",
            "writer_fraction",
            "writer_share",
        ):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ConfirmError(f"{name} must be between 0 and 1, got {v}")
        if self.benign_prompts < 1:
            raise ConfirmError(f"benign_prompts must be at least 1, got {self.benign_prompts}")
        if (
            min(self.top_k, self.max_set, self.max_circuit, self.max_neurons) < 1
            or self.batch_size < 0
        ):
            raise ConfirmError(
                "top_k, max_set, max_circuit and max_neurons must be positive, batch_size 0 "
                "(auto) or more"
            )


@dataclass
class CandidateEvidence:
    id: str
    attribution: float
    total_effect: float  # metric drop when patched to the baseline
    direct_effect: float  # ... with everything downstream frozen at clean
    necessity: float  # metric drop when ablated by the configured kind
    p_value: float  # against every other component of the same kind, ablated alike
    # metric drop when zero-ablated (robust necessity's second ablation); None where not run
    necessity_zero: float | None = None
    rank: int = 0
    in_set: bool = False
    verdict: str = "inconclusive"
    reason: str = ""
    # what mean-ablating it does to ordinary text (rca.specificity); None where not measured
    benign_loss_pct: float | None = None  # relative change of the benign LM loss, percent
    benign_kl: float | None = None  # mean KL(original || ablated) per benign position, nats
    infrastructure: bool = False  # necessary for ordinary text as well: never blamed


@dataclass
class SetEvidence:
    components: list[str]
    metric_ablated: float
    necessity: float  # metric drop when the set is ablated
    necessity_fraction: float  # ... as a share of the prompt-baseline gap
    sufficiency_metric: float  # metric with everything *but* the set ablated
    sufficiency_fraction: float  # share of the metric that survives that
    random_drops: list[float]
    p_value: float
    random_scope: str
    verdict: str = "inconclusive"
    reason: str = ""


@dataclass
class Verdict:
    """The confirm stage's answer for one incident."""

    metric_clean: float
    metric_baseline: float
    metric_reference: float  # the point that "100% of the metric removed" reaches
    baseline: str
    candidates: list[CandidateEvidence]
    cause_set: SetEvidence
    config: ConfirmConfig
    cost: dict[str, Any] = field(default_factory=dict)
    circuit: Circuit | None = None

    @property
    def verdict(self) -> str:
        return self.cause_set.verdict

    def ranked(self) -> list[CandidateEvidence]:
        return sorted(self.candidates, key=lambda c: c.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "metric": {
                "prompt": self.metric_clean,
                "baseline": self.metric_baseline,
                "reference": self.metric_reference,
            },
            "baseline": self.baseline,
            "causes": [asdict(c) for c in self.ranked()],
            "cause_set": {k: v for k, v in asdict(self.cause_set).items() if k != "random_drops"}
            | {"random_drops_summary": _summary(self.cause_set.random_drops)},
            "config": asdict(self.config),
            "cost": self.cost,
            "circuit": None if self.circuit is None else asdict(self.circuit),
        }


def _summary(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    return {
        "n": len(s),
        "mean": sum(s) / len(s),
        "median": s[len(s) // 2],
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
    }


def rank_candidates(
    evidence: Sequence[CandidateEvidence],
    *,
    share: Callable[[float], float],
    gap: float,
    config: ConfirmConfig,
    parallel: bool = False,
) -> list[CandidateEvidence]:
    """The candidates in rank order (docs/confirm.md, "Ranking"); ``share`` maps a metric drop to
    the share of the bad behaviour it removes, ``gap`` is the prompt-to-reference metric gap,
    ``parallel``: the model's attention and MLP read the same input (GPT-NeoX, Phi).

    1. The leading group: effect share(max(TE, NE)) within ``window`` of the largest.
    2. Infrastructure (``CandidateEvidence.infrastructure``: necessary for ordinary text as
       well) is never the top cause: where the rule below puts it first, the rule is applied
       again to the specific candidates alone, and its first choice takes rank 1; the rest
       keep their order. (An infrastructure origin would otherwise hand rank 1 to the writer,
       though a specific origin exists.)
    3. Robust necessity, the smaller drop of the two ablations: min(NE, NE0). A cause should
       remove the behaviour whatever its output is ablated to.
    4. In the leading group:
       a. the necessary group: the candidates whose robust necessity is at least
          ``necessary_fraction`` of the group's largest;
       b. first, the origin: the necessary candidate latest in the forward pass (ties by DE).
          Carriers of the trigger's identity and enablers are necessary too, but they compute
          before the origin, which reads them; amplifiers after it are not robustly necessary
          (the behaviour reaches the logits by other paths when one is ablated);
       c. second, the writer: the leading candidate with the largest direct effect, where it
          reaches ``writer_fraction`` of the gap;
       d. the rest of the necessary group, latest first; then the rest of the leading group
          by robust necessity.
    5. The rest by effect.
    """
    ordered = _rule_order(evidence, share=share, gap=gap, config=config, parallel=parallel)
    specific = [e for e in evidence if not e.infrastructure]
    if specific and ordered[0].infrastructure:
        # the rule again, without the infrastructure: its first choice takes rank 1
        first = _rule_order(specific, share=share, gap=gap, config=config, parallel=parallel)[0]
        ordered = [first] + [e for e in ordered if e is not first]
    return ordered


def _rule_order(
    evidence: Sequence[CandidateEvidence],
    *,
    share: Callable[[float], float],
    gap: float,
    config: ConfirmConfig,
    parallel: bool,
) -> list[CandidateEvidence]:
    """Steps 1 and 3-5 of ``rank_candidates``, over every candidate."""
    effect = {e.id: share(max(e.total_effect, e.necessity)) for e in evidence}
    top = max(effect.values(), default=0.0)
    lead = [e for e in evidence if top > 0 and effect[e.id] >= (1 - config.window) * top]
    rest = sorted(
        (e for e in evidence if e not in lead),
        key=lambda e: (-effect[e.id], -max(e.total_effect, e.necessity)),
    )

    def robust(e: CandidateEvidence) -> float:
        return min(e.necessity, e.necessity_zero if e.necessity_zero is not None else e.necessity)

    most = max((robust(e) for e in lead), default=0.0)
    if most <= 0:
        return sorted(lead, key=lambda e: -robust(e)) + rest
    need = config.necessary_fraction * most
    group = sorted(
        (e for e in lead if robust(e) >= need),
        key=lambda e: (forward_position(e.id, parallel=parallel), e.direct_effect),
        reverse=True,
    )
    out = group[:1]
    writers = [e for e in lead if e not in out and e.direct_effect >= config.writer_fraction * gap]
    if writers:
        out.append(max(writers, key=lambda e: e.direct_effect))
    out += [e for e in group if e not in out]
    out += sorted((e for e in lead if e not in out), key=lambda e: -robust(e))
    return out + rest


def verdict_definitions(config: ConfirmConfig | None = None) -> dict[str, str]:
    """Each verdict word and p-value with its definition (``rca.verdicts``), at ``config``'s
    thresholds."""
    return definitions(asdict(config or ConfirmConfig()))


def _component_verdict(
    e: CandidateEvidence,
    *,
    share: float,
    contrib: dict[str, float],
    set_verdict: str,
    set_fraction: float,
    gap: float,
    cfg: ConfirmConfig,
) -> tuple[str, str]:
    """One candidate's verdict word (``VERDICT_WORDS``) and the reason, which names the numbers
    it rests on and says why where the component p-value seems to disagree with the word."""
    kind = "head" if _kind_of(e.id) == "head" else "MLP"
    alone = f"component p = {e.p_value:.3f}"
    if e.infrastructure:
        return "infrastructure", (
            f"necessary for ordinary text as well: mean-ablating it raises the loss on benign "
            f"text by {e.benign_loss_pct or 0.0:.0f}% (KL {e.benign_kl or 0.0:.2f} nats per "
            f"token); alone it moves the metric by {share:.0%} of the gap, as it would any "
            "prompt's"
        )
    if e.in_set:
        c_share = contrib[e.id] / gap
        if set_verdict == "confirmed" and c_share >= cfg.component_fraction:
            why = (
                f"in the confirmed set; without it the set removes {c_share:.0%} less of the gap; "
                f"alone: TE {e.total_effect:+.2f}, necessity {e.necessity:+.2f}, {alone}"
            )
            if e.p_value >= cfg.alpha:
                why += (
                    f": alone it does not stand out from the other {kind}s, it acts with the "
                    "rest of the set"
                )
            return "confirmed", why
        if set_verdict == "confirmed":
            return "inconclusive", (
                f"in the set, but the rest of the set does nearly as well without it "
                f"({c_share:.0%} of the gap; {alone})"
            )
        return "inconclusive", f"in a set that is {set_verdict.replace('_', ' ')} ({alone})"
    if share < cfg.component_fraction:
        return "not_confirmed", (
            f"patching or ablating it moves the metric by {share:.0%} of the gap, under "
            f"{cfg.component_fraction:.0%} ({alone})"
        )
    why = f"moves the metric by {share:.0%} of the gap alone ({alone})"
    if set_verdict == "confirmed":
        why += (
            f", but the cause set removes {set_fraction:.0%} of the gap without it: a carrier, "
            "an amplifier or redundant with a member"
        )
    else:
        why += f", and the cause set is {set_verdict.replace('_', ' ')}"
    return "inconclusive", why


def _benign_texts(
    reference: Sequence[str] | Sequence[Sequence[int]], cfg: ConfirmConfig
) -> list[str] | list[list[int]]:
    """The ordinary text benign damage is measured on: the reference prompts, else the packaged
    corpus (``rca.benign``)."""
    if reference:
        return [p if isinstance(p, str) else list(p) for p in reference][: cfg.benign_prompts]  # type: ignore[return-value]
    return benign_prompts(cfg.benign_prompts, seed=cfg.seed)


def _benign_forward_equiv(
    subject: Subject, texts: Sequence[Any], components: Sequence[str], length: int
) -> float:
    """The benign damage's cost in forward passes of the incident: one run over the prompts
    unablated, then each component's from its own layer up."""
    seqs, _ = encoded(subject, texts)
    tokens = sum(len(q) for q in seqs) / max(1, length)
    n = subject.adapter.n_layers
    return tokens * (1 + sum((n - (parse_id(c).layer or 0)) / n for c in components))


def _trace_views(
    scores: ComponentScores | None,
) -> tuple[dict[str, list[float]] | None, Callable[[str, str], float | None] | None]:
    """The trace's position-resolved attribution (component -> score per position) and its
    edge scores, where it has them."""
    if scores is None:
        return None, None
    per_position = {n: scores.per_position[i].tolist() for i, n in enumerate(scores.nodes)}
    if scores.edges is None:
        return per_position, None
    up = {n: i for i, n in enumerate(scores.up)}
    down = {n: j for j, n in enumerate(scores.down)}
    edges = scores.edges

    def edge_score(u: str, d: str) -> float | None:
        if u not in up or d not in down:
            return None
        return float(edges[up[u], down[d]])

    return per_position, edge_score


def _kind_of(cid: str) -> str:
    return "head" if ".H" in cid else "mlp"


def _random_sets(
    universe: list[str], members: list[str], n: int, rng: random.Random
) -> tuple[list[list[str]], str]:
    """n random sets with the same number of heads and MLPs as ``members`` (excluding the set
    itself); where that population is too small for n distinct sets, size-matched sets of any
    kind. Returns the sets and a description of the scope."""
    heads = [c for c in universe if _kind_of(c) == "head"]
    mlps = [c for c in universe if _kind_of(c) == "mlp"]
    nh = sum(1 for c in members if _kind_of(c) == "head")
    nm = len(members) - nh
    n_matched = math.comb(len(heads), nh) * math.comb(len(mlps), nm) - 1
    target = set(members)
    if n_matched >= n:
        out: list[list[str]] = []
        while len(out) < n:
            s = rng.sample(heads, nh) + rng.sample(mlps, nm)
            if set(s) != target:
                out.append(s)
        return out, f"{n} random sets of {nh} heads and {nm} MLPs"
    n_any = math.comb(len(universe), len(members)) - 1
    if n_any <= n:
        sets = [list(c) for c in itertools.combinations(universe, len(members))]
        sets = [s for s in sets if set(s) != target]
        return sets, (
            f"all {len(sets)} other sets of {len(members)} components (too few to draw {n} "
            "kind-matched ones)"
        )
    out = []
    while len(out) < n:
        s = rng.sample(universe, len(members))
        if set(s) != target:
            out.append(s)
    return out, f"{n} random sets of {len(members)} components of any kind (too few kind-matched)"


@dataclass(frozen=True)
class NeuronGroup:
    """An infrastructure MLP's neurons that carry its effect on the incident."""

    parent: str  # the MLP, infrastructure as a whole
    attribution: float  # the neurons' summed attribution in the trace
    effect: float  # metric drop when they alone are patched as the MLP was for its TE
    damage: Damage  # what mean-ablating them alone does to ordinary text

    def describe(self, share: Callable[[float], float], parent: CandidateEvidence) -> str:
        return (
            f"neurons of {self.parent}, which is infrastructure as a whole (benign loss "
            f"{parent.benign_loss_pct or 0.0:+.0f}%); patched alone they remove "
            f"{share(self.effect):.0%} of the bad behaviour, the whole MLP "
            f"{share(parent.total_effect):.0%}, and mean-ablating them changes the benign loss "
            f"by {self.damage.loss_change_pct:+.1f}%"
        )


def _group_damage(
    subject: Subject,
    groups: Sequence[str],
    texts: Any,
    run: BenignRun,
    whole: Mapping[int, str],
) -> dict[str, Damage]:
    """The benign damage of MLP neuron groups, from ``run``'s means of their MLPs' neurons
    (``whole``: layer -> the id of all its neurons)."""
    for g in groups:
        c = parse_id(g)
        assert c.layer is not None
        run.means[g] = run.means[whole[c.layer]][list(c.neurons)]
    return benign_damage(subject, list(groups), texts, run=run)


def _specific_neurons(
    ab: Ablator,
    evidence: Sequence[CandidateEvidence],
    neuron_scores: Mapping[str, float],
    *,
    src: str,
    ablation: str,
    m_clean: float,
    share: Callable[[float], float],
    cfg: ConfirmConfig,
    damage_of: Callable[[list[str]], Mapping[str, Damage]],
) -> dict[str, NeuronGroup]:
    """The neuron groups that stand in for infrastructure MLPs (docs/confirm.md, "Specific
    neurons"), by group id.

    For each infrastructure MLP whose patch (to ``src``) removes at least
    ``component_fraction`` of the bad behaviour: its neurons by their positive attribution in
    the trace (``neuron_scores``), best first; the smallest group of the first 1, 2, 4, ...
    ``max_neurons`` that carries the MLP's effect both ways: patched alone, it removes at least
    ``neuron_fraction`` of the share the whole MLP's patch removes, and ablated alone (by
    ``ablation`` and by zero, the smaller), at least ``neuron_fraction`` of its own patch's
    (a part that others back up is not the mechanism). The group stands in for the MLP where
    mean-ablating it alone on ordinary text does not make it infrastructure."""
    sizes = [1 << i for i in range(cfg.max_neurons.bit_length()) if 1 << i <= cfg.max_neurons]
    tried: list[tuple[CandidateEvidence, str, float]] = []
    for e in evidence:
        c = parse_id(e.id)
        if (
            not e.infrastructure
            or c.kind != "mlp"
            or share(e.total_effect) < cfg.component_fraction
        ):
            continue
        assert c.layer is not None
        best = sorted(
            (
                (v, n.neurons[0])
                for k, v in neuron_scores.items()
                if v > 0 and (n := parse_id(k)).kind == "neuron" and n.layer == c.layer
            ),
            key=lambda t: (-t[0], t[1]),
        )[: cfg.max_neurons]
        for k in sizes:
            if k <= len(best):
                top = best[:k]
                tried.append(
                    (e, neuron_group(c.layer, [n for _, n in top]), sum(v for v, _ in top))
                )
    if not tried:
        return {}
    ab.record_neurons({parse_id(g).layer or 0 for _, g, _ in tried})
    ways = [src, ablation, "zero"]
    vals = ab.run([{g: w} for _, g, _ in tried for w in ways], index_offset=70_000)
    chosen: dict[str, tuple[str, float, float]] = {}  # MLP -> (group, attribution, effect)
    for i, (e, g, a) in enumerate(tried):
        drop, ne, ne0 = (m_clean - float(v) for v in vals[3 * i : 3 * i + 3])
        carries = share(drop) >= cfg.neuron_fraction * share(e.total_effect)
        needed = share(min(ne, ne0)) >= cfg.neuron_fraction * share(drop)
        if e.id not in chosen and carries and needed:
            chosen[e.id] = (g, a, drop)
    if not chosen:
        return {}
    damage = damage_of([g for g, _, _ in chosen.values()])
    return {
        g: NeuronGroup(mlp, a, drop, damage[g])
        for mlp, (g, a, drop) in chosen.items()
        if not damage[g].infrastructure
    }


def confirm(
    subject: Subject,
    target: Target,
    ranking: Sequence[tuple[str, float]],
    *,
    baseline: Target | None,
    reference: Sequence[str] | Sequence[Sequence[int]] = (),
    config: ConfirmConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
    scores: ComponentScores | None = None,
) -> Verdict:
    """Verify the ranked candidates of a trace and find a minimal confirmed cause set.

    ``ranking``: (component id, attribution score) from the trace, best first; ids other than
    heads and MLPs are skipped. ``baseline``: the counterfactual target the trace used (None for
    a mean baseline, when TE and DE use the mean too). ``scores``: the trace's scores, whose
    position-resolved attribution places the circuit's members and whose edge scores go with
    its edges (without them, members are placed by patching alone and edges carry no score).
    """
    cfg = config or ConfirmConfig()
    say = progress or (lambda stage, frac: None)
    t0 = time.perf_counter()
    ab = Ablator(
        subject,
        target,
        baseline=baseline,
        reference=reference,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    if cfg.kind in ("mean", "resample") and not ab.refs:
        raise ConfirmError(f"{cfg.kind} ablation needs reference prompts")
    if cfg.kind == "patch" and baseline is None:
        raise ConfirmError("patch ablation needs a counterfactual baseline")
    ablation = "mean" if ab.refs else "zero"  # for necessity: an ablation, whatever the set uses
    if cfg.kind in ("zero", "mean", "resample"):
        ablation = cfg.kind
    if cfg.kind == "patch" or (cfg.kind == "auto" and not ab.refs and baseline is not None):
        set_src = "baseline"
    else:
        set_src = ablation
    patch_src = "baseline" if baseline is not None else ablation
    m_clean = ab.metric_clean
    if ab.metric_baseline is not None:
        m_base = ab.metric_baseline
        base_desc = "counterfactual"
    else:
        m_base = float(ab.run([dict.fromkeys(ab.components, ablation)])[0])
        base_desc = f"all heads and MLPs {ablation}-ablated"
    m_ref = reference_point(m_clean, m_base, n_conts=target.n_conts)
    gap = m_clean - m_ref
    if gap <= 0:
        raise ConfirmError(
            f"the metric on the prompt ({m_clean:+.3f}) is not above the baseline's "
            f"({m_base:+.3f}); there is no incident behaviour to explain"
        )

    tol = 1e-5 * max(1.0, abs(gap))  # float noise between batch rows
    cands = [c for c, _ in ranking if c in set(ab.components)][: cfg.top_k]
    attr = dict(ranking)
    if not cands:
        raise ConfirmError("the trace ranked no heads or MLPs")

    # every component alone, ablated as sets are: the p-values' null, and, where sets are
    # ablated as necessity is (and deterministically), each candidate's NE as well
    say("singles", 0.1)
    others = [x for x in ab.components]
    single = ab.run([{x: set_src} for x in others], index_offset=10_000)
    single_drop = {x: m_clean - float(v) for x, v in zip(others, single, strict=True)}
    ne_shared = set_src == ablation and ablation in ("mean", "zero")

    # TE, DE and NE of every candidate (and NE0 for robust necessity), in one batched run
    say("candidates", 0.3)
    # zero-ablation necessity: where NE is a zero ablation already, it is NE
    zero_run = ablation != "zero"

    def measure(ids: Sequence[str], *, shared: bool) -> tuple[list[CandidateEvidence], float]:
        """Each id's evidence (TE, DE, NE, NE0) from one batched run, and the zero
        ablations' share of its cost; ``shared``: NE is read from the singles' run."""
        extra = ([] if shared else [ablation]) + (["zero"] if zero_run else [])
        per = 2 + len(extra)
        variants: list[Variant] = []
        for c in ids:
            variants.append({c: patch_src})
            _, _, layer = ab._site(c)
            frozen: Variant = {c: patch_src}
            for other in ab.components:
                _, _, lo = ab._site(other)
                later = lo > layer or (
                    lo == layer and other.endswith("MLP") and ".H" in c and not ab.a.parallel
                )
                if later:
                    frozen[other] = "clean"
            variants.append(frozen)
            variants += [{c: src} for src in extra]
        ms = ab.run(variants)
        # the zero ablations' share of that run: each recomputes from its layer up
        n_layers = ab.a.n_layers
        cost = sum((n_layers - ab._site(c)[2]) / n_layers for c in ids) if zero_run else 0.0
        out: list[CandidateEvidence] = []
        for i, c in enumerate(ids):
            drops = [m_clean - float(ms[per * i + j]) for j in range(per)]
            te, de = drops[0], drops[1]
            ne = single_drop[c] if shared else drops[2]
            if zero_run:
                ne0: float | None = drops[-1]
            else:
                ne0 = ne if ablation == "zero" else None
            out.append(
                CandidateEvidence(c, attr.get(c, 0.0), te, de, ne, p_value=1.0, necessity_zero=ne0)
            )
        return out, cost

    ev, zero_cost = measure(cands, shared=ne_shared)

    def share_of(drop: float) -> float:
        return share_removed(m_clean, m_ref, drop, conts=target.n_conts)

    # specificity: what mean-ablating each candidate does to ordinary text
    say("specificity", 0.4)
    t_benign = time.perf_counter()
    texts = _benign_texts(reference, cfg)
    # one unablated run over the benign text serves every candidate, and every group of MLP
    # neurons tried below: it keeps the mean of each candidate MLP's neurons too
    whole = {
        c.layer: neuron_group(c.layer, range(ab.a.d_mlp))
        for c in map(parse_id, cands)
        if c.kind == "mlp" and c.layer is not None and ab.a.d_mlp > 1
    }
    try:
        run0 = BenignRun(
            subject,
            texts,
            batch=max(16, ab.batch_size),
            sites=[*cands, *whole.values()],
            keep={parse_id(c).layer or 0 for c in cands},
        )
        damage = benign_damage(subject, cands, texts, run=run0)
    except BenignError as err:
        raise ConfirmError(
            f"benign damage: {err}; give reference prompts of 2 tokens or more"
        ) from None
    benign_equiv = _benign_forward_equiv(subject, texts, cands, target.length)
    for e in ev:
        d = damage[e.id]
        e.benign_loss_pct, e.benign_kl, e.infrastructure = (
            d.loss_change_pct,
            d.kl_mean,
            d.infrastructure,
        )
    t_benign = time.perf_counter() - t_benign

    # specific neurons: an infrastructure MLP whose effect on the incident a few of its neurons
    # carry, and that ordinary text does not need, is resolved to them (a candidate of its own)
    say("neurons", 0.45)
    fe_neurons = ab.forward_equiv
    groups = _specific_neurons(
        ab,
        ev,
        scores.neurons if scores is not None else {},
        src=patch_src,
        ablation=ablation,
        m_clean=m_clean,
        share=share_of,
        cfg=cfg,
        damage_of=lambda ids: _group_damage(subject, ids, texts, run0, whole),
    )
    if groups:
        more, more_zero = measure(list(groups), shared=False)
        zero_cost += more_zero
        for e in more:
            g = groups[e.id]
            e.attribution = g.attribution
            e.benign_loss_pct, e.benign_kl = g.damage.loss_change_pct, g.damage.kl_mean
        ev += more
        # their side effects only: the unablated run is the candidates'
        benign_equiv += _benign_forward_equiv(
            subject, texts, list(groups), target.length
        ) - _benign_forward_equiv(subject, texts, [], target.length)
    fe_neurons = ab.forward_equiv - fe_neurons

    # p-value of each candidate against every other component of its kind
    for e in ev:
        own_id = groups[e.id].parent if e.id in groups else e.id
        null = [d for x, d in single_drop.items() if x != own_id and _kind_of(x) == _kind_of(e.id)]
        own = e.total_effect if set_src == "baseline" else e.necessity
        e.p_value = empirical_p_value(own, null, tol=tol)

    # ranking (docs/confirm.md): the leading group by the share of the bad behaviour removed,
    # the origin first, then the writer, the rest by effect; infrastructure never first
    ordered = rank_candidates(ev, share=share_of, gap=gap, config=cfg, parallel=ab.a.parallel)
    for r, e in enumerate(ordered):
        e.rank = r + 1

    # the minimal cause set, of specific candidates only: greedy in rank order, then drop
    # members the rest does without
    say("cause set", 0.5)
    need = cfg.set_fraction * gap
    members: list[str] = []
    specific = [e for e in ordered if not e.infrastructure]
    prefixes = [[e.id for e in specific[: k + 1]] for k in range(min(cfg.max_set, len(specific)))]
    pm = ab.run([dict.fromkeys(p, set_src) for p in prefixes], index_offset=20_000)
    for prefix, v in zip(prefixes, pm, strict=True):
        members = prefix
        if m_clean - float(v) >= need:
            break
    if len(members) > 1:
        for c in list(members):
            rest_set = [x for x in members if x != c]
            if m_clean - float(ab.run([dict.fromkeys(rest_set, set_src)])[0]) >= need:
                members = rest_set
    set_vals = ab.run(
        [
            dict.fromkeys(members, set_src),
            {x: set_src for x in ab.components if x not in members},
            dict.fromkeys(ab.components, set_src),
        ],
        index_offset=30_000,
    )
    m_set, m_suff, m_all = (float(v) for v in set_vals)
    necessity = m_clean - m_set

    say("random sets", 0.7)
    rng = random.Random(cfg.seed)
    rsets, scope = _random_sets(ab.components, members, cfg.n_random, rng)
    rvals = ab.run([dict.fromkeys(s, set_src) for s in rsets], index_offset=40_000)
    rdrops = [m_clean - float(v) for v in rvals]
    p = empirical_p_value(necessity, rdrops, tol=tol)
    frac = necessity / gap
    suff_den = m_clean - m_all
    suff_frac = (m_suff - m_all) / suff_den if abs(suff_den) > 1e-9 else float("nan")
    min_p = 1 / (1 + len(rdrops))
    infra = [e.id for e in ordered if e.infrastructure]
    infra_note = (
        f"; infrastructure ({', '.join(infra[:3])}{', ...' if len(infra) > 3 else ''}) is "
        "never a member"
        if infra
        else ""
    )
    if not members:
        sv, why = (
            "not_confirmed",
            "no candidate is specific to the incident: every one is infrastructure, necessary "
            "for ordinary text as well",
        )
    elif frac < cfg.set_fraction:
        sv, why = (
            "not_confirmed",
            (
                f"ablating the {len(members)} leading specific candidates removes {frac:.0%} of "
                f"the gap, under the {cfg.set_fraction:.0%} required{infra_note}"
            ),
        )
    elif p < cfg.alpha:
        sv, why = (
            "confirmed",
            (
                f"ablating the set removes {frac:.0%} of the gap (>= {cfg.set_fraction:.0%}) and "
                f"beats {scope} with set p = {p:.3f} < {cfg.alpha}"
            ),
        )
    elif min_p >= cfg.alpha:
        sv, why = (
            "inconclusive",
            (
                f"the set removes {frac:.0%} of the gap, but only {len(rdrops)} comparison sets "
                f"exist, so no p-value below {cfg.alpha} is possible"
            ),
        )
    else:
        sv, why = (
            "not_confirmed",
            f"the set removes {frac:.0%} of the gap, but random sets do as well (set p = {p:.3f})",
        )
    cause = SetEvidence(
        components=members,
        metric_ablated=m_set,
        necessity=necessity,
        necessity_fraction=frac,
        sufficiency_metric=m_suff,
        sufficiency_fraction=suff_frac,
        random_drops=rdrops,
        p_value=p,
        random_scope=scope,
        verdict=sv,
        reason=why,
    )

    # per-component verdicts (VERDICT_WORDS): does the set need it, is it specific?
    say("verdicts", 0.9)
    loo = ab.run(
        [dict.fromkeys([x for x in members if x != c], set_src) for c in members],
        index_offset=50_000,
    )
    contrib = {c: float(v) - m_set for c, v in zip(members, loo, strict=True)}
    by_id = {e.id: e for e in ev}
    for e in ev:
        e.in_set = e.id in members
        e.verdict, e.reason = _component_verdict(
            e,
            share=max(e.total_effect, e.necessity) / gap,
            contrib=contrib,
            set_verdict=sv,
            set_fraction=frac,
            gap=gap,
            cfg=cfg,
        )
    for e in ev:
        if e.id in groups:
            e.reason += "; " + groups[e.id].describe(share_of, by_id[groups[e.id].parent])
    say("circuit", 0.95)
    fe_circuit, t_circuit = ab.forward_equiv, time.perf_counter()
    per_position, edge_score = _trace_views(scores)
    differing = target.differing(baseline) if baseline is not None else []
    ids = target.input_ids(1)[0].tolist()
    circuit = build_circuit(
        ab,
        ordered,
        [c for c, _ in ranking if c in set(ab.components)],
        src=patch_src,
        m_clean=m_clean,
        gap=gap,
        cfg=cfg,
        per_position=per_position,
        edge_score=edge_score,
        differing=differing,
        token_text=(
            (lambda p: str(subject.tokenizer.decode([ids[p]])))
            if subject.tokenizer is not None
            else None
        ),
    )
    fe_circuit, t_circuit = ab.forward_equiv - fe_circuit, time.perf_counter() - t_circuit
    say("done", 1.0)
    return Verdict(
        metric_clean=m_clean,
        metric_baseline=m_base,
        metric_reference=m_ref,
        baseline=base_desc,
        candidates=ev,
        cause_set=cause,
        config=cfg,
        circuit=circuit,
        cost={
            "set_kind": "patch" if set_src == "baseline" else set_src,
            "necessity_kind": ablation,
            "seconds": time.perf_counter() - t0,
            "variants": ab.n_forward_rows // target.rows,
            "variants_reused": ab.n_reused,  # asked for again, answered from the first run
            "forward_equiv": ab.forward_equiv + 2 + (1 if baseline is not None else 0),
            "zero_ablation_forward_equiv": zero_cost,  # of which the zero ablations (NE0)
            "benign_forward_equiv": benign_equiv,  # the benign damage, not in forward_equiv
            "circuit_forward_equiv": fe_circuit,  # of forward_equiv: the circuit's experiments
            "neurons_forward_equiv": fe_neurons,  # of forward_equiv: resolving MLPs to neurons
            "circuit_seconds": t_circuit,
            "benign_seconds": t_benign,
            "benign_prompts": max((d.n_prompts for d in damage.values()), default=0),
            "reference_prompts": len(ab.refs),
        },
    )
