"""Capture, patch and ablate components through hooks on the real HF modules.

Every context manager here registers its hooks on entry and removes them in ``finally``: no
hook survives a normal exit, a bad component id (validated before anything is registered), or a
forward pass that raises. Where each id lives:

    EMB            output of the token embedding                     (batch, pos, d_model)
    L.H<h>         input of the attention output projection, head h  (batch, pos, d_head)
    L.ATTN         output of the attention output projection         (batch, pos, d_model)
    L.MLP          output of the MLP block                           (batch, pos, d_model)
    L.N<n>         input of the MLP down projection, neuron n        (batch, pos)
    L.RESID_PRE    input of decoder layer L                          (batch, pos, d_model)
    L.RESID_POST   output of decoder layer L                         (batch, pos, d_model)
    LOGITS         the model's output logits (capture only)          (batch, pos, vocab)

An id with ``@p`` restricts a capture to position p (the position axis is dropped) and an edit
to that position. ``positions=`` on ``patch``/``ablate`` restricts every id without its own.

One module, over 500 lines, because all of it is one thing: a ``with`` block that reads or
changes the model's forward pass (hooks on its modules, or decoder layers replaced by stubs)
and restores the model on every exit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rca.model.adapter import Adapter
from rca.model.ids import ComponentId, format_id, parse_id
from rca.model.metric import encode_text
from rca.model.subject import Subject

__all__ = [
    "HookError",
    "Site",
    "site_of",
    "hooked",
    "capture",
    "patch",
    "ablate",
    "mean_activations",
    "Capture",
    "padded_batch",
    "layers_skipped",
    "layers_frozen",
    "top_mlp_trimmed",
    "MeanAccumulator",
    "stop_after",
    "run_until",
]

Index = slice | int | list[int]


class HookError(ValueError):
    """A component id that does not exist in this model, or an edit that cannot apply."""


@dataclass(frozen=True)
class Site:
    """Where a component lives: a module, whether its input (pre) or output, and a slice of
    the last axis (a slice for heads, an int for one neuron, ``slice(None)`` for whole)."""

    module: nn.Module
    pre: bool
    index: Index

    @property
    def key(self) -> tuple[int, bool]:
        return (id(self.module), self.pre)


def _as_cid(c: ComponentId | str) -> ComponentId:
    return c if isinstance(c, ComponentId) else parse_id(c)


def site_of(adapter: Adapter, cid: ComponentId | str) -> Site:
    """The hook site of a component, after checking it exists in this model."""
    c = _as_cid(cid)
    if c.layer is not None and not 0 <= c.layer < adapter.n_layers:
        raise HookError(
            f"{format_id(c)}: layer {c.layer} out of range; this model has layers "
            f"0..{adapter.n_layers - 1}"
        )
    full = slice(None)
    if c.kind == "emb":
        return Site(adapter.embed, False, full)
    if c.kind == "logits":
        # the model's own output, after any final soft-capping (Gemma2) the unembed lacks
        return Site(adapter.model, False, full)
    assert c.layer is not None
    if c.kind == "head":
        assert c.index is not None
        if c.index >= adapter.n_heads:
            raise HookError(
                f"{format_id(c)}: head {c.index} out of range; layer {c.layer} has heads "
                f"0..{adapter.n_heads - 1}"
            )
        d = adapter.d_head
        return Site(adapter.attn_out(c.layer), True, slice(c.index * d, (c.index + 1) * d))
    if c.kind == "attn":
        return Site(adapter.attn_out(c.layer), False, full)
    if c.kind == "mlp":
        return Site(adapter.mlp(c.layer), False, full)
    if c.kind == "neuron":
        assert c.index is not None
        if c.index >= adapter.d_mlp:
            raise HookError(
                f"{format_id(c)}: neuron {c.index} out of range; layer {c.layer} has neurons "
                f"0..{adapter.d_mlp - 1}"
            )
        return Site(adapter.mlp_down(c.layer), True, c.index)
    if c.kind == "neurons":
        if c.indices[-1] >= adapter.d_mlp:
            raise HookError(
                f"{format_id(c)}: neuron {c.indices[-1]} out of range; layer {c.layer} has "
                f"neurons 0..{adapter.d_mlp - 1}"
            )
        return Site(adapter.mlp_down(c.layer), True, list(c.indices))
    if c.kind == "resid_pre":
        return Site(adapter.layer(c.layer), True, full)
    if c.kind == "resid_post":
        return Site(adapter.layer(c.layer), False, full)
    raise HookError(f"no hook site for {format_id(c)}")  # pragma: no cover


# Editing functions get the selected activation (batch, n_pos, ...) and return its new value.
EditFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Edit:
    index: Index
    positions: Sequence[int] | None
    fn: EditFn


def _get_tensor(pre: bool, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    if pre:
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        raise HookError("module called without a tensor input")
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "logits", output)


def _set_tensor(
    pre: bool, args: tuple, kwargs: dict, output: Any, new: torch.Tensor
) -> tuple[tuple, dict] | Any:
    if pre:
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


def _apply_edits(x: torch.Tensor, edits: list[_Edit]) -> torch.Tensor:
    x = x.clone()  # never write into a tensor autograd or the caller may still need
    for e in edits:
        pos: Any = slice(None) if e.positions is None else list(e.positions)
        if isinstance(e.index, list) and isinstance(pos, list):
            # two index lists would pair up; a column of positions crosses them instead
            pos = torch.tensor(pos, device=x.device).unsqueeze(-1)
        new = e.fn(x[:, pos, e.index])
        x[:, pos, e.index] = new.to(x.dtype)
    return x


@contextlib.contextmanager
def hooked(
    sites: Sequence[tuple[Site, Callable[[torch.Tensor], torch.Tensor | None]]],
) -> Iterator[None]:
    """Register one hook per (module, pre/post) that runs each site's callback in order.

    A callback returns a new tensor (an edit) or None (a read). Hooks are removed in finally.
    """
    groups: dict[tuple[int, bool], tuple[Site, list]] = {}
    for site, cb in sites:
        groups.setdefault(site.key, (site, []))[1].append(cb)
    handles: list[Any] = []
    try:
        for site, cbs in groups.values():
            if site.pre:

                def pre_hook(mod, args, kwargs, _cbs=cbs):
                    x = _get_tensor(True, args, kwargs, None)
                    changed = False
                    for cb in _cbs:
                        y = cb(x)
                        if y is not None:
                            x, changed = y, True
                    return _set_tensor(True, args, kwargs, None, x) if changed else None

                handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def fwd_hook(mod, args, output, _cbs=cbs):
                    x = _get_tensor(False, args, {}, output)
                    changed = False
                    for cb in _cbs:
                        y = cb(x)
                        if y is not None:
                            x, changed = y, True
                    return _set_tensor(False, args, {}, output, x) if changed else None

                handles.append(site.module.register_forward_hook(fwd_hook))
        yield
    finally:
        for h in handles:
            h.remove()


class Capture(Mapping[str, torch.Tensor]):
    """Activations recorded by ``capture``, keyed by canonical id string.

    ``keep_graph=True`` keeps the module tensors in the autograd graph; ``site_tensor(id)``
    returns the whole module tensor, which is what to differentiate against (a slice taken
    after the fact is not on the graph's path).
    """

    def __init__(self, adapter: Adapter, ids: list[ComponentId], keep_graph: bool) -> None:
        self._adapter = adapter
        self._ids = ids
        self._keep = keep_graph
        self._site_vals: dict[tuple[int, bool], torch.Tensor] = {}
        self._sites = {format_id(c): site_of(adapter, c) for c in ids}
        self._by_str = {format_id(c): c for c in ids}

    def _record(self, key: tuple[int, bool]) -> Callable[[torch.Tensor], None]:
        def cb(x: torch.Tensor) -> None:
            self._site_vals[key] = x if self._keep else x.detach()

        return cb

    def site_tensor(self, cid: ComponentId | str) -> torch.Tensor:
        s = format_id(_as_cid(cid))
        return self._site_vals[self._sites[s].key]

    def __getitem__(self, key: str | ComponentId) -> torch.Tensor:  # type: ignore[override]
        s = format_id(_as_cid(key))
        if s not in self._sites:
            raise KeyError(f"{s} was not captured; captured: {', '.join(self._sites)}")
        site = self._sites[s]
        if site.key not in self._site_vals:
            raise KeyError(f"{s} was not reached by the forward pass")
        x = self._site_vals[site.key]
        c = self._by_str[s]
        out = x[..., site.index]
        if c.pos is not None:
            out = out[:, c.pos]
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def _subject_adapter(subject: Subject | Adapter) -> Adapter:
    return subject.adapter if isinstance(subject, Subject) else subject


@contextlib.contextmanager
def capture(
    subject: Subject | Adapter,
    ids: Iterable[ComponentId | str],
    *,
    keep_graph: bool = False,
) -> Iterator[Capture]:
    """Record the activations of ``ids`` during the forward passes inside the block.

    >>> with capture(subject, ["L1.H0", "L1.MLP"]) as acts:
    ...     subject.model(input_ids)
    >>> acts["L1.H0"].shape  # (batch, pos, d_head)
    """
    adapter = _subject_adapter(subject)
    cids = [_as_cid(c) for c in ids]
    cap = Capture(adapter, cids, keep_graph)  # validates every id before any hook exists
    sites = []
    seen: set[tuple[int, bool]] = set()
    for c in cids:
        site = site_of(adapter, c)
        if site.key not in seen:
            seen.add(site.key)
            sites.append((site, cap._record(site.key)))
    with hooked(sites):
        yield cap


def _edits_for(
    adapter: Adapter,
    items: Iterable[tuple[ComponentId, EditFn]],
    positions: Sequence[int] | None,
) -> list[tuple[Site, Callable[[torch.Tensor], torch.Tensor]]]:
    out: list[tuple[Site, Callable[[torch.Tensor], torch.Tensor]]] = []
    for c, fn in items:
        if c.kind == "logits":
            raise HookError("LOGITS can be captured but not patched or ablated")
        site = site_of(adapter, c)
        pos = [c.pos] if c.pos is not None else positions
        out.append((site, functools.partial(_apply_edits, edits=[_Edit(site.index, pos, fn)])))
    return out


def _value_fn(value: torch.Tensor | float) -> EditFn:
    def fn(cur: torch.Tensor) -> torch.Tensor:
        v = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        return v.to(device=cur.device, dtype=cur.dtype).expand_as(cur)

    return fn


@contextlib.contextmanager
def patch(
    subject: Subject | Adapter,
    values: Mapping[ComponentId | str, torch.Tensor | float],
    *,
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Set components to given values during the block.

    Each value broadcasts to the component's selected activation: (batch, n_pos, width) for
    heads and blocks, (batch, n_pos) for a neuron, where n_pos is the number of positions
    selected (all, ``positions``, or the id's own ``@p``).
    """
    adapter = _subject_adapter(subject)
    items = [(_as_cid(k), _value_fn(v)) for k, v in values.items()]
    sites = _edits_for(adapter, items, positions)
    with hooked(sites):
        yield


def _mean_fn(mean: torch.Tensor, positions: Sequence[int] | None, pos: int | None) -> EditFn:
    """A mean of shape (width,) broadcasts; one of shape (pos, width) is indexed by position."""

    def fn(cur: torch.Tensor) -> torch.Tensor:
        m = mean.to(device=cur.device, dtype=cur.dtype)
        per_pos_dims = 2 if cur.dim() == 3 else 1
        if m.dim() == per_pos_dims:  # per-position mean
            sel = [pos] if pos is not None else positions
            m = m[: cur.shape[1]] if sel is None else m[list(sel)]
        return m.expand_as(cur)

    return fn


@contextlib.contextmanager
def ablate(
    subject: Subject | Adapter,
    ids: Iterable[ComponentId | str],
    *,
    kind: str = "zero",
    means: Mapping[str, torch.Tensor] | None = None,
    values: Mapping[str, torch.Tensor] | None = None,
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Ablate components during the block.

    ``kind``: ``zero``; ``mean`` (``means[id]`` from ``mean_activations``, per position or
    position-averaged); ``values`` (``values[id]``, e.g. a resampled activation).
    """
    adapter = _subject_adapter(subject)
    cids = [_as_cid(c) for c in ids]
    items: list[tuple[ComponentId, EditFn]] = []
    for c in cids:
        key = format_id(c.base)
        if kind == "zero":
            items.append((c, _value_fn(0.0)))
        elif kind == "mean":
            if means is None or key not in means:
                raise HookError(
                    f"mean ablation of {key} needs means[{key!r}]; see mean_activations"
                )
            items.append((c, _mean_fn(means[key], positions, c.pos)))
        elif kind == "values":
            if values is None or key not in values:
                raise HookError(f"ablation by values of {key} needs values[{key!r}]")
            items.append((c, _value_fn(values[key])))
        else:
            raise HookError(f"unknown ablation kind {kind!r}; use zero, mean or values")
    sites = _edits_for(adapter, items, positions)
    with hooked(sites):
        yield


class _StubLayer(nn.Module):
    """Stands in for a decoder layer for one forward pass; attributes the model reads off the
    layer (an attention type, a layer index) come from the real one."""

    def __init__(self, orig: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", orig)  # not a submodule: no double registration

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)


class _CachedLayer(_StubLayer):
    """Stands in for a decoder layer below the first changed one (``layers_skipped``)."""

    def __init__(self, orig: nn.Module, out: torch.Tensor | None) -> None:
        super().__init__(orig)
        self._out = out

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._out is None:  # below another stub: what it gets is thrown away by the next
            return hidden_states
        reps = hidden_states.shape[0] // self._out.shape[0]
        return self._out.repeat(reps, 1, 1)  # a copy: a layer above may work in place


class _FrozenLayer(_StubLayer):
    """Stands in for a decoder layer whose every head and MLP is held at its clean value
    (``layers_frozen``): it adds what the layer wrote into the residual stream on the clean
    run."""

    def __init__(self, orig: nn.Module, delta: torch.Tensor) -> None:
        super().__init__(orig)
        self._delta = delta

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        reps = hidden_states.shape[0] // self._delta.shape[0]
        return hidden_states + self._delta.repeat(reps, 1, 1)


@contextlib.contextmanager
def _layers_replaced(
    subject: Subject, make: Callable[[int, nn.Module], nn.Module | None]
) -> Iterator[None]:
    """Each decoder layer i for which ``make(i, layer)`` gives a stub is replaced by it; every
    layer is put back on exit."""
    from rca.model.adapter import module_at

    layers = module_at(subject.model, subject.adapter.spec.layers)
    assert isinstance(layers, nn.ModuleList)
    originals = list(layers)
    try:
        for i, orig in enumerate(originals):
            stub = make(i, orig)
            if stub is not None:
                layers[i] = stub
        yield
    finally:
        for i, orig in enumerate(originals):
            layers[i] = orig


@contextlib.contextmanager
def layers_skipped(subject: Subject, first: int, out: torch.Tensor | None) -> Iterator[None]:
    """Run the decoder layers from ``first`` up only: the layers below are replaced by stubs,
    the top one returning ``out``, the recorded output of layer ``first - 1`` (repeated along
    the batch to fit), the ones under it passing their input through (the next stub throws it
    away). For a forward in which nothing below ``first`` changes, the layers above then
    compute what the whole model would. ``first`` 0 replaces none. The KV cache must be off:
    the stubs would leave holes in it. The layers are put back on exit."""
    if first <= 0:
        yield
        return
    if out is None:
        raise HookError("layers_skipped needs the output of the layer below the first one run")

    def make(i: int, orig: nn.Module) -> nn.Module | None:
        return _CachedLayer(orig, out if i == first - 1 else None) if i < first else None

    with _layers_replaced(subject, make):
        yield


@contextlib.contextmanager
def layers_frozen(subject: Subject, last: int, outs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run no decoder layer above ``last``: each is replaced by a stub that adds its clean
    write, ``outs[k] - outs[k - 1]`` from the clean run's recorded layer outputs ``outs``.

    A layer's output is its input plus what its attention and MLP write (after their own norms,
    where the architecture has them), so a layer whose every head and MLP is held at its clean
    activation adds exactly its clean write, whatever its input: a direct-effect experiment,
    which freezes everything after the patched component, computes only up to that component's
    layer. ``last`` at the top layer or above replaces none; the layers are put back on exit.
    """
    if last >= subject.adapter.n_layers - 1:
        yield
        return
    if last < 0:
        raise HookError("layers_frozen needs a layer below the frozen ones to run")

    def make(i: int, orig: nn.Module) -> nn.Module | None:
        return _FrozenLayer(orig, outs[i] - outs[i - 1]) if i > last else None

    with _layers_replaced(subject, make):
        yield


@contextlib.contextmanager
def top_mlp_trimmed(subject: Subject, keep: int) -> Iterator[None]:
    """The last decoder layer's MLP computes only the last ``keep`` positions; it writes zeros
    at the others.

    After the last layer nothing mixes positions: each one goes through the final norm to its
    own logits. A forward whose metric reads only the last ``keep`` positions' logits (a
    ``Target``'s ``keep``, with or without ``logits_to_keep``) gets the same numbers, and its
    gradients too, while the MLP, most of the layer's work, skips the prompt. Every other
    position of that layer's output is wrong, so only metric passes use this, with nothing
    recorded inside that MLP. A hook already on the MLP's output (an ablation of that MLP)
    sees the full-length output: the padding runs first. ``keep`` 0, or at least the input's
    length, trims nothing.
    """
    if keep <= 0:
        yield
        return
    mlp = subject.adapter.mlp(subject.adapter.n_layers - 1)
    lengths: list[int] = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] <= keep:
            lengths.append(0)
            return None
        lengths.append(x.shape[1])
        x = x[:, -keep:].contiguous()  # a view would break modules that .view() it
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def post(mod: nn.Module, args: tuple, out: Any) -> Any:
        n = lengths.pop()
        if not n:
            return None
        y = out[0] if isinstance(out, tuple) else out
        pad = y.new_zeros(y.shape[0], n - y.shape[1], *y.shape[2:])
        y = torch.cat([pad, y], dim=1)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handles = [
        mlp.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
        mlp.register_forward_hook(post, prepend=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def padded_batch(
    seqs: Sequence[Sequence[int]], pad: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists right-padded to one width, with their attention mask."""
    width = max(len(q) for q in seqs)
    ids = torch.tensor([list(q) + [pad] * (width - len(q)) for q in seqs], device=device)
    mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=device)
    return ids, mask


class MeanAccumulator:
    """Running means of captured components over padded batches of prompts.

    ``add(acts, lengths)`` takes a ``Capture`` of a right-padded batch and each row's own
    length; only those positions count. ``result()`` gives each id's mean: position-averaged
    (width,) by default, or (max_len, width) with ``per_position``, each position averaged over
    the prompts long enough to have it.
    """

    def __init__(self, keys: Sequence[str], *, per_position: bool = False) -> None:
        self.keys = list(keys)
        self.per_position = per_position
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, acts: Mapping[str, torch.Tensor], lengths: Sequence[int]) -> None:
        for k in self.keys:
            x = acts[k]
            for r, n_pos in enumerate(lengths):
                self._add_one(k, x[r, :n_pos].float())  # (pos, width) or (pos,)

    def _add_one(self, k: str, a: torch.Tensor) -> None:
        if not self.per_position:
            a, n = a.sum(0), torch.tensor(a.shape[0], dtype=torch.float32, device=a.device)
        else:
            n = torch.ones(a.shape[0], device=a.device)
        sums, counts = self.sums, self.counts
        if k in sums and self.per_position and sums[k].shape[0] < a.shape[0]:
            extra = a.shape[0] - sums[k].shape[0]
            sums[k] = torch.cat([sums[k], torch.zeros_like(a[:extra])])
            counts[k] = torch.cat([counts[k], torch.zeros(extra, device=a.device)])
        if k not in sums:
            sums[k], counts[k] = torch.zeros_like(a), torch.zeros_like(n)
        if self.per_position:
            sums[k][: a.shape[0]] += a
            counts[k][: a.shape[0]] += n
        else:
            sums[k] += a
            counts[k] += n

    def result(self) -> dict[str, torch.Tensor]:
        if not self.sums:
            raise HookError("mean_activations needs at least one reference prompt")
        out = {}
        for k in self.keys:
            c = self.counts[k].clamp(min=1)
            s = self.sums[k]
            out[k] = s / (c.unsqueeze(-1) if s.dim() > c.dim() else c)
        return out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it records is recorded."""


@contextlib.contextmanager
def stop_after(subject: Subject, layer: int) -> Iterator[None]:
    """End every forward pass inside the block once decoder layer ``layer`` has run: what
    hooks at or below it record is complete, and nothing above it is computed. The forward
    returns None. A layer past the last one stops nothing."""
    layers = subject.adapter.layers
    if layer >= len(layers) - 1:
        yield
        return

    def stop(m: nn.Module, args: Any, out: Any) -> None:
        raise _Stop

    handle = layers[layer].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def run_until(subject: Subject, layer: int, **inputs: Any) -> Any:
    """The model's forward on ``inputs``, ended after decoder layer ``layer`` (``stop_after``):
    the output where the model ran to the end, else None."""
    with stop_after(subject, layer):
        try:
            return subject.model(**inputs)
        except _Stop:
            return None


@torch.inference_mode()
def mean_activations(
    subject: Subject,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    ids: Iterable[ComponentId | str],
    *,
    per_position: bool = False,
    batch: int = 16,
) -> dict[str, torch.Tensor]:
    """Mean activation of each component over reference prompts.

    Position-averaged (width,) by default; ``per_position=True`` gives (max_len, width), each
    position averaged over the prompts long enough to have it. Prompts run ``batch`` at a time,
    right-padded with an attention mask; only each prompt's own positions are counted. Each
    forward ends at the deepest layer that holds one of ``ids``.
    """
    cids = [_as_cid(c).base for c in ids]
    acc = MeanAccumulator([format_id(c) for c in cids], per_position=per_position)
    dev = subject.device
    seqs = [encode_text(subject.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    seqs = [q for q in seqs if q]
    pad = int(getattr(subject.tokenizer, "pad_token_id", None) or 0)
    # EMB (no layer) is below layer 0; LOGITS needs the whole model
    deepest = max(
        (subject.adapter.n_layers if c.kind == "logits" else (c.layer or 0) for c in cids),
        default=0,
    )
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        ids_t, mask = padded_batch(chunk, pad, dev)
        with capture(subject, cids) as acts:
            run_until(subject, deepest, input_ids=ids_t, attention_mask=mask, use_cache=False)
            acc.add(acts, [len(q) for q in chunk])
    return acc.result()
