"""The confirm engine: batched interventions on heads, MLPs and MLP neurons through hooks.

``Ablator`` runs K variants, each a set of components with the value each is set to, in
ceil(K / B) forward passes with one mask per batch element. Variants are grouped by their first
ablated layer, and the decoder layers below it are replaced for that pass by stubs that return
the clean run's cached outputs: un-ablated activations are reused, not recomputed. On a CPU,
where batching saves little, that reuse is where the saving is. ``run_stacked`` runs the
variants of several ablators (several targets of one model, a behaviour's fit variants) in
shared passes, each target right-padded to the longest and read from its own rows;
``Ablator.run`` is its one-ablator case.

Values a component can be set to (``SOURCES``): ``zero``; ``mean`` (its mean over the reference
prompts, averaged over positions); ``resample`` (its activation on a reference prompt drawn at
random per variant, position by position); ``baseline`` (its activation on the counterfactual:
exact activation patching); ``clean`` (its own clean activation, used to freeze components);
and named values registered by path patching (``Ablator.read_through``).

The engine is one class over one set of cached recordings (the clean run, the baseline, the
reference prompts) that every method reads; it is longer than 500 lines for that reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from rca.confirm.evidence import ConfirmError
from rca.model.hooks import layers_frozen, layers_skipped, padded_batch, run_until, top_mlp_trimmed
from rca.model.ids import ComponentId, format_id, parse_id
from rca.model.metric import Target, encode_text, logits_kwargs
from rca.model.subject import Subject

__all__ = [
    "OFFSET_CAUSE_PREFIXES",
    "OFFSET_CAUSE_SET",
    "OFFSET_CIRCUIT",
    "OFFSET_LEAVE_ONE_OUT",
    "OFFSET_NEURONS",
    "OFFSET_RANDOM_SETS",
    "OFFSET_SINGLES",
    "SOURCES",
    "Ablator",
    "Site",
    "Variant",
    "auto_batch_size",
    "run_stacked",
]

SOURCES = ("zero", "mean", "resample", "baseline", "clean")
Variant = dict[str, str]  # component id -> value source

# Where the resample ablation's reference prompts come from. Under ``resample``, variant i of a
# ``run(variants, index_offset=o)`` call is set to the activations of the reference prompt that
# ``random.Random(seed * 1_000_003 + o + i)`` draws (``Ablator.value``); every other source
# gives the same value whatever the index, and the memo never answers a resample variant. Two
# calls with the same offset therefore draw the same prompts for their i-th variants. Each
# experiment below has an offset of its own, 10,000 apart, so that, while a call runs fewer than
# 10,000 variants, no two experiments share a draw index. Calls without an offset (a candidate's
# TE, DE and necessity, the cause set's pruning of one member at a time, path patching,
# ``check_gap``) draw from index 0.
OFFSET_SINGLES = 10_000  # every head and MLP alone: the null of the component p-values
OFFSET_CAUSE_PREFIXES = 20_000  # the cause set's greedy prefixes
OFFSET_CAUSE_SET = 30_000  # the cause set, everything but it, and everything
OFFSET_RANDOM_SETS = 40_000  # the random comparison sets
OFFSET_LEAVE_ONE_OUT = 50_000  # the cause set without each member: component verdicts
OFFSET_CIRCUIT = 60_000  # every patch of the circuit (one offset for all of them)
OFFSET_NEURONS = 70_000  # MLP neuron groups patched and ablated: the specific neurons


class Site(NamedTuple):
    """Where a component's value lives in the Ablator's recordings."""

    # the recorded activation: z<layer> (the input of attention's output projection),
    # m<layer> (the MLP's output), n<layer> (the MLP neurons, the down projection's input)
    key: str
    columns: slice | list[int]  # its columns of the last axis: a head's d_head, the neurons
    layer: int


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
        self.subject, self.target = subject, target
        self.memo = memo  # False: every variant runs, repeats too (benchmarks/)
        self.adapter = subject.adapter
        self.batch_size = batch_size or auto_batch_size(subject.device)
        self.reuse = reuse
        self.seed = seed
        # each layer's heads, then its MLP: the components a variant can name without neurons
        self.layer_components = [
            [format_id(ComponentId("head", layer, h)) for h in range(self.adapter.n_heads)]
            + [format_id(ComponentId("mlp", layer))]
            for layer in range(self.adapter.n_layers)
        ]
        self.components = [c for layer in self.layer_components for c in layer]
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
        share = (top + 1) / self.adapter.n_layers
        acts: dict[str, torch.Tensor] = {}

        def run(passes: float = 1.0, **inputs: Any) -> dict[str, torch.Tensor]:
            acts.clear()
            handles = [
                self.adapter.mlp_down(x).register_forward_pre_hook(
                    lambda m, a, _k=f"n{x}": acts.__setitem__(_k, a[0].detach().clone())
                )
                for x in new
            ]
            try:
                run_until(self.subject, top, use_cache=False, **inputs)
            finally:
                for h in handles:
                    h.remove()
            self.forward_equiv += share * passes
            return dict(acts)

        self.clean |= run(input_ids=self.target.input_ids(device=self.subject.device))
        if self._baseline is not None and self.base is not None:
            self.base |= run(input_ids=self._baseline.input_ids(device=self.subject.device))
        if not self.refs:
            return
        pad = int(getattr(self.subject.tokenizer, "pad_token_id", None) or 0)
        batch = max(16, self.batch_size)
        for i in range(0, len(self._ref_seqs), batch):
            chunk = self._ref_seqs[i : i + batch]
            ids, mask = padded_batch(chunk, pad, self.subject.device)
            got = run(ids.numel() / self.target.length, input_ids=ids, attention_mask=mask)
            for r, q in enumerate(chunk):
                self.refs[i + r] |= {k: v[r, : len(q)].clone() for k, v in got.items()}
        assert self.means is not None
        self.means |= {f"n{x}": torch.cat([r[f"n{x}"] for r in self.refs]).mean(0) for x in new}

    # -- recording ---------------------------------------------------------------------------
    def _site_keys(self) -> list[tuple[str, nn.Module, bool]]:
        out = []
        for layer in range(self.adapter.n_layers):
            out.append((f"z{layer}", self.adapter.attn_out(layer), True))
            out.append((f"m{layer}", self.adapter.mlp(layer), False))
            if layer in self.neuron_layers:
                out.append((f"n{layer}", self.adapter.mlp_down(layer), True))
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
            for layer in self.adapter.layers:
                handles.append(
                    layer.register_forward_hook(
                        lambda m, a, o: outs.append(
                            (o[0] if isinstance(o, tuple) else o).detach().clone()
                        )
                    )
                )
            logits = self.subject.model(input_ids=ids, **kw).logits
        finally:
            for h in handles:
                h.remove()
        return acts, outs, logits

    def record(self, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Every site's activation (site key -> (batch, pos, width)) and every decoder layer's
        output for the prompts ``ids`` (batch, pos); their logits are not computed."""
        acts, outs, _ = self._recording(
            ids, **(_NO_LOGITS if logits_kwargs(self.subject.model, self.target) else {})
        )
        return acts, outs

    def _record_target(
        self, target: Target
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], float]:
        """A target's activations and its metric, from one forward pass."""
        ids = target.input_ids(device=self.subject.device)
        acts, outs, logits = self._recording(ids, **logits_kwargs(self.subject.model, target))
        return acts, outs, float(target.metric(logits)[0])

    @torch.inference_mode()
    def _record_refs(self, seqs: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """Each reference prompt's site activations, (pos, width), recorded a batch at a time:
        right-padded with an attention mask, so every real position sees only its own prompt
        (tests/unit/test_confirm.py checks them against one prompt per forward)."""
        out: list[dict[str, torch.Tensor]] = []
        pad = int(getattr(self.subject.tokenizer, "pad_token_id", None) or 0)
        batch = max(16, self.batch_size)
        acts: dict[str, torch.Tensor] = {}
        handles = self._site_hooks(acts, clone=False)  # each row is cloned when sliced
        try:
            kw = _NO_LOGITS if logits_kwargs(self.subject.model, self.target) else {}
            for i in range(0, len(seqs), batch):
                chunk = seqs[i : i + batch]
                ids, mask = padded_batch(chunk, pad, self.subject.device)
                acts.clear()
                self.subject.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
                out += [
                    {k: v[r, : len(q)].clone() for k, v in acts.items()}
                    for r, q in enumerate(chunk)
                ]
        finally:
            for h in handles:
                h.remove()
        return out

    # -- values ------------------------------------------------------------------------------
    def site(self, cid: str) -> Site:
        """Where component ``cid`` (a head, an MLP, MLP neurons; at a position or not) is
        recorded and edited; ConfirmError for anything else."""
        c = parse_id(cid)
        if c.pos is not None and c.pos >= self.target.length:
            raise ConfirmError(f"{cid}: position out of range 0..{self.target.length - 1}")
        if c.kind == "head":
            assert c.layer is not None and c.index is not None
            d = self.adapter.d_head
            return Site(f"z{c.layer}", slice(c.index * d, (c.index + 1) * d), c.layer)
        if c.kind == "mlp":
            assert c.layer is not None
            return Site(f"m{c.layer}", slice(None), c.layer)
        if c.kind in ("neuron", "neurons"):
            assert c.layer is not None
            if c.layer not in self.neuron_layers:
                raise ConfirmError(f"{cid}: record_neurons([{c.layer}]) first")
            if c.neurons[-1] >= self.adapter.d_mlp:
                raise ConfirmError(f"{cid}: neurons out of range 0..{self.adapter.d_mlp - 1}")
            return Site(f"n{c.layer}", list(c.neurons), c.layer)
        raise ConfirmError(f"{cid}: only heads, MLPs and MLP neurons can be ablated here")

    def value(self, key: str, source: str, variant_index: int) -> torch.Tensor:
        """The value site ``key`` is set to under ``source``, shaped to broadcast to (rows, pos,
        width); ``variant_index`` picks the reference prompt a ``resample`` draws (the
        ``OFFSET_*`` constants)."""
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
        """The shallowest layer a variant edits (n_layers for an empty one)."""
        return min((self.site(c).layer for c in variant), default=self.adapter.n_layers)

    def last_layer(self, variant: Variant) -> int:
        """The deepest layer a variant needs run: every layer above it has each head and its
        MLP held ``clean`` (a direct-effect variant), so it adds its clean write
        (``rca.model.hooks.layers_frozen``). Never below the first ablated layer."""
        top = self.adapter.n_layers - 1
        last, floor = top, min(self.first_layer(variant), top)
        while last > floor and all(variant.get(c) == "clean" for c in self.layer_components[last]):
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
        the first prefix of the cause set is its top candidate alone.

        ``index_offset``: variant i is run with index ``index_offset + i``, which picks the
        reference prompt a ``resample`` value draws (``OFFSET_*``)."""
        return run_stacked([(self, variants)], index_offsets=[index_offset])[0]

    def _plan(self, variants: Sequence[Variant]) -> _Plan:
        """Which of ``variants`` must run: the others are answered by the memo or repeat one
        of this call."""
        out = torch.empty(len(variants))
        todo: list[int] = []
        first_of: dict[tuple[tuple[str, str], ...], int] = {}
        copies: list[tuple[int, int]] = []
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
        return _Plan(out, todo, first_of, copies)

    def _finish(self, plan: _Plan, n: int) -> torch.Tensor:
        """Fill the memo and the repeats from what ran."""
        for key, i in plan.first_of.items():
            self._memo[key] = float(plan.out[i])
        for i, j in plan.copies:
            plan.out[i] = plan.out[j]
        self.n_reused += n - len(plan.todo)
        return plan.out

    def _edits(
        self, variants: Sequence[Variant], indices: Sequence[int]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per edited site: a mask and the values, both (len(variants) * rows, pos, width), in
        the row order of ``Target.input_ids(len(variants))``. An id with a position
        ("L3.H2@7") edits that position only."""
        K = len(variants)
        dev = self.subject.device
        edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, (variant, vidx) in enumerate(zip(variants, indices, strict=True)):
            for cid, source in variant.items():
                key, sl, _ = self.site(cid)
                pos = parse_id(cid).pos
                at = slice(None) if pos is None else slice(pos, pos + 1)
                clean = self.clean[key]  # (rows, pos, width)
                if key not in edits:
                    edits[key] = (
                        torch.zeros(K, *clean.shape, device=dev, dtype=clean.dtype),
                        torch.zeros(K, *clean.shape, device=dev, dtype=clean.dtype),
                    )
                mask, values = edits[key]
                # views first: an index list beside the batch index would move its axis
                mask[k][:, at][..., sl] = 1
                values[k][:, at][..., sl] = self.value(key, source, vidx)[:, at][..., sl]
        return {k: (m.flatten(0, 1), v.flatten(0, 1)) for k, (m, v) in edits.items()}

    def _edit_hooks(self, variants: list[Variant], indices: list[int]) -> list[Any]:
        """Hooks that set each batch element's sites to its variant's values; the caller
        removes them."""
        return _hooks(self.subject, self._site_keys(), self._edits(variants, indices))

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
        layer = self.site(sites[0]).layer
        variant: Variant = dict.fromkeys(sites, source)
        if c.kind == "head" and not self.adapter.parallel:
            variant[self.layer_components[layer][-1]] = "clean"
        out: list[torch.Tensor] = []
        handles = self._edit_hooks([variant], [0])
        handles.append(self.adapter.layer(layer).register_forward_hook(self._write_hook(out)))
        self._run_layer(layer, handles)
        return out[0] - self.layer_out[layer]

    def _run_layer(self, layer: int, handles: list[Any]) -> None:
        """One run of decoder layer ``layer`` alone on the incident (the layers below are the
        clean run's, none above is run) with ``handles`` on; they are removed after."""
        try:
            below = self.layer_out[layer - 1] if layer > 0 else None
            with layers_skipped(self.subject, layer, below):
                run_until(
                    self.subject,
                    layer,
                    input_ids=self.target.input_ids(1, device=self.subject.device),
                    use_cache=False,
                )
        finally:
            for h in handles:
                h.remove()
        self.forward_equiv += 1 / self.adapter.n_layers

    @torch.inference_mode()
    def read_through(self, sites: Sequence[str], delta: torch.Tensor, name: str) -> None:
        """Register, as the value source ``name``, what the component of ``sites`` computes when
        the residual stream it reads (the input of its attention or MLP norm) carries ``delta``
        on top of the clean run, everything else clean. Setting ``sites`` to ``name`` then
        patches the path from the writer of ``delta`` to this component alone: path patching."""
        c = parse_id(sites[0])
        key, _, layer = self.site(sites[0])
        norm = self.adapter.attn_norm(layer) if c.kind == "head" else self.adapter.mlp_norm(layer)

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


class _Plan(NamedTuple):
    """One ``run`` call's bookkeeping: the metrics (filled as they come), the variants that must
    run, each deterministic variant's first index, and the repeats of it."""

    out: torch.Tensor
    todo: list[int]
    first_of: dict[tuple[tuple[str, str], ...], int]
    copies: list[tuple[int, int]]  # (index, index of the same variant in this call)


def _hooks(
    subject: Subject,
    site_keys: Sequence[tuple[str, nn.Module, bool]],
    edits: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> list[Any]:
    """Hooks that blend each edited site with its values where its mask is set: the mask and
    values are (batch rows, pos, width) like the site's activation. The caller removes them."""
    handles = []
    for key, mod, pre in site_keys:
        if key not in edits:
            continue
        mask, values = edits[key]

        def apply(x: torch.Tensor, _m=mask, _v=values) -> torch.Tensor:
            return x * (1 - _m) + _v * _m

        if pre:
            handles.append(
                mod.register_forward_pre_hook(lambda mm, a, _f=apply: (_f(a[0]), *a[1:]))
            )
        else:
            handles.append(mod.register_forward_hook(lambda mm, a, o, _f=apply: _f(o)))
    return handles


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (rows, pos, ...) with zeros after its positions up to ``width``."""
    if x.shape[1] == width:
        return x
    pad = x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)


@torch.inference_mode()
def run_stacked(
    jobs: Sequence[tuple[Ablator, Sequence[Variant]]],
    *,
    index_offsets: Sequence[int] | None = None,
    batch_size: int = 0,
) -> list[torch.Tensor]:
    """``Ablator.run`` for several ablators of one subject at once: each job's variants on its
    own target, the variants of different targets sharing forward passes.

    Targets of different lengths are right-padded to the longest in the pass: a causal model's
    positions never read later ones, so the padding changes no metric (beyond float summation
    order), and each target's metric is read from its own rows. Variants are grouped by the
    layers they need run (first ablated, last not held clean) as in ``run``, and sorted by
    length within a group so that little is padded; ``batch_size`` (0: the first ablator's)
    variants share a pass. Each ablator keeps its own memo and counts its own share of the
    work in ``forward_equiv``: its rows times the layers run, times the padded width over its
    own length."""
    if not jobs:
        return []
    subject = jobs[0][0].subject
    if any(ab.subject is not subject for ab, _ in jobs):
        raise ConfirmError("run_stacked needs ablators of one subject")
    offsets = list(index_offsets) if index_offsets is not None else [0] * len(jobs)
    plans = [ab._plan(vs) for ab, vs in jobs]
    size = batch_size or jobs[0][0].batch_size
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # -> (job, variant index)
    for j, ((ab, vs), plan) in enumerate(zip(jobs, plans, strict=True)):
        for i in plan.todo:
            groups.setdefault((ab.first_layer(vs[i]), ab.last_layer(vs[i])), []).append((j, i))
    for _, items in sorted(groups.items()):
        items.sort(key=lambda x: (jobs[x[0]][0].target.length, x[0]))
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            vals = _run_stacked_chunk(jobs, chunk, offsets)
            for (j, i), v in zip(chunk, vals, strict=True):
                plans[j].out[i] = v
    return [ab._finish(plan, len(vs)) for (ab, vs), plan in zip(jobs, plans, strict=True)]


def _run_stacked_chunk(
    jobs: Sequence[tuple[Ablator, Sequence[Variant]]],
    chunk: Sequence[tuple[int, int]],
    offsets: Sequence[int],
) -> list[float]:
    """The metric under each (job, variant) of ``chunk`` from one batched forward pass; the
    chunk's variants of one job are contiguous."""
    blocks: list[tuple[Ablator, list[Variant], list[int]]] = []  # per job, in chunk order
    for j, i in chunk:
        ab, vs = jobs[j]
        if not blocks or blocks[-1][0] is not ab:
            blocks.append((ab, [], []))
        blocks[-1][1].append(vs[i])
        blocks[-1][2].append(offsets[j] + i)
    first_ab = blocks[0][0]
    subject, adapter = first_ab.subject, first_ab.adapter
    dev, top_layer = subject.device, adapter.n_layers - 1
    first = min(ab.first_layer(v) for ab, vs, _ in blocks for v in vs)
    first = min(first, adapter.n_layers) if first_ab.reuse else 0
    last = (
        max(ab.last_layer(v) for ab, vs, _ in blocks for v in vs) if first_ab.reuse else top_layer
    )
    width = max(ab.target.length for ab, _, _ in blocks)
    single = len(blocks) == 1
    # where each target reads its metric: the last keep positions of its own length
    start = min(ab.target.length - ab.target.keep for ab, _, _ in blocks)
    keep = width - start
    top_neurons = f"n{top_layer}"
    edits_top = any(  # the top MLP's neurons are edited: it computes every position
        ab.site(c).key == top_neurons for ab, vs, _ in blocks for v in vs for c in v
    )

    def layer_out(x: int) -> torch.Tensor:  # every row's clean output of layer x, padded
        return torch.cat(
            [_padded(ab.layer_out[x].repeat(len(vs), 1, 1), width) for ab, vs, _ in blocks]
        )

    edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    per_block_edits = [ab._edits(vs, idx) for ab, vs, idx in blocks]
    keys = {k for e in per_block_edits for k in e}
    for key in keys:
        masks, values = [], []
        for (ab, vs, _), e in zip(blocks, per_block_edits, strict=True):
            if key in e:
                m, v = e[key]
            else:
                c = ab.clean[key]
                m = c.new_zeros(len(vs) * c.shape[0], *c.shape[1:])
                v = m
            masks.append(_padded(m, width))
            values.append(_padded(v, width))
        edits[key] = (torch.cat(masks), torch.cat(values))
    site_keys: dict[str, tuple[str, nn.Module, bool]] = {}
    for ab, _, _ in blocks:
        site_keys |= {k[0]: k for k in ab._site_keys()}
    if single:
        below = first_ab.layer_out[first - 1] if first > 0 else None
        outs: Sequence[torch.Tensor] = first_ab.layer_out
    else:
        below = layer_out(first - 1) if first > 0 else None
        stacked = {x: layer_out(x) for x in range(max(last, 0), adapter.n_layers)}
        empty = torch.empty(0)
        outs = [stacked.get(x, empty) for x in range(adapter.n_layers)]
    ids = torch.cat(
        [
            torch.nn.functional.pad(
                ab.target.input_ids(len(vs), device=dev),
                (0, width - ab.target.length),
                value=ab.target.pad_id,
            )
            for ab, vs, _ in blocks
        ]
    )
    kw: dict[str, Any] = {}
    if logits_kwargs(subject.model, first_ab.target):
        kw["logits_to_keep"] = keep
    if not single:
        kw["attention_mask"] = torch.cat(
            [
                (torch.arange(width, device=dev) < ab.target.length)
                .long()
                .expand(len(vs) * ab.target.rows, width)
                for ab, vs, _ in blocks
            ]
        )
    handles: list[Any] = []
    try:
        handles = _hooks(subject, list(site_keys.values()), edits)
        # no KV cache: the stubs would leave holes in it, and nothing is generated; the top
        # MLP computes only the positions the metrics read, unless its neurons are edited
        with (
            layers_skipped(subject, first, below),
            layers_frozen(subject, last, outs),
            top_mlp_trimmed(subject, 0 if edits_top else keep),
        ):
            logits = subject.model(input_ids=ids, use_cache=False, **kw).logits
    finally:
        for h in handles:
            h.remove()
    computed = max(0, last + 1 - first) / adapter.n_layers
    skipped = width - logits.shape[1]
    got: list[float] = []
    r = 0
    for ab, vs, _ in blocks:
        t, n = ab.target, len(vs)
        own = logits[r : r + n * t.rows, : t.length - skipped]
        r += n * t.rows
        got += t.metric(own).float().cpu().tolist()
        ab.n_forward_rows += n * t.rows
        ab.forward_equiv += n * computed * width / t.length
    return got
