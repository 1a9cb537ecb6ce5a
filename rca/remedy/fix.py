"""The fix interface, the registry of fix kinds, and what several kinds share.

A fix is a frozen dataclass, one class per kind, registered in ``FIX_KINDS`` by its ``kind``
string. Each one applies itself to the live model as a context manager (``context``), says the
lowest layer it changes (``first_layer``) and what it does in words (``describe``), writes itself
into the weights (``bake``), and is the JSON patch spec ``to_spec`` gives and ``from_spec`` reads:

    {"format": "rca-patch-v1", "model_fingerprint": ..., "kind": ..., "components": [...],
     ...the kind's own fields, in the order the class declares them}

A kind's own fields keep the JSON values as they are (lists of floats, packed tensors), so
``Fix.from_spec(spec).to_spec()`` is ``spec`` for every spec rca writes, and the conversion to
tensors happens where a fix is applied.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from rca.model.ids import IdError, parse_id
from rca.model.subject import Subject

__all__ = [
    "FIX_KINDS",
    "PATCH_FORMAT",
    "Fix",
    "RemedyError",
    "WriteEdit",
    "bias_of",
    "first_layer",
    "fix_context",
    "fix_from_spec",
    "names",
    "on_writes",
    "pack",
    "register",
    "unit",
    "unpack",
]

PATCH_FORMAT = "rca-patch-v1"


class RemedyError(ValueError):
    """A fix that cannot be tried or applied as asked."""


@dataclass(frozen=True, kw_only=True)
class Fix:
    """One fix of a cause set: the components it changes and the model it was made for.

    Subclasses add their own fields (the spec's keys, JSON values) and set ``kind``.
    """

    kind: ClassVar[str]
    # the spec fields that hold tensors, left out of the copy of the spec a patched model keeps
    tensor_fields: ClassVar[tuple[str, ...]] = ()

    components: tuple[str, ...]
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.components, str) or not all(isinstance(c, str) for c in self.components):
            raise RemedyError(f"a {self.kind} patch spec needs 'components' as a list of ids")
        object.__setattr__(self, "components", tuple(self.components))
        for c in self.components:
            try:
                parse_id(c)
            except IdError as e:
                raise RemedyError(f"a {self.kind} patch spec names {c!r}: {e}") from None

    def context(self, subject: Subject) -> AbstractContextManager[None]:
        """The fix applied to ``subject``'s live model during the block, removed on exit."""
        raise NotImplementedError

    @property
    def first_layer(self) -> int:
        """The lowest decoder layer the fix changes anything in; 0 where it changes the
        embedding."""
        return min(parse_id(c).layer or 0 for c in self.components)

    def describe(self) -> str:
        """What the fix does, as the start of a sentence."""
        raise NotImplementedError

    def bake(self, subject: Subject) -> None:
        """Write the fix into ``subject``'s weights, so that the model computes without hooks
        what ``context`` computes with them."""
        raise NotImplementedError

    def to_spec(self) -> dict[str, Any]:
        """The JSON patch spec (``PATCH_FORMAT``); fields left at None are left out."""
        spec: dict[str, Any] = {
            "format": PATCH_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "kind": self.kind,
            "components": list(self.components),
        }
        for f in _own_fields(type(self)):
            v = getattr(self, f.name)
            if v is not None:  # a fresh container: the spec never aliases the fix
                spec[f.name] = copy.copy(v)
        return spec

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Fix:
        """The fix a patch spec describes, of the class its ``kind`` names; keys a kind does not
        know are ignored. A RemedyError where the kind is unknown or a field is missing."""
        if not isinstance(spec, Mapping):
            raise RemedyError(f"a patch spec is a JSON object, got {type(spec).__name__}")
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in FIX_KINDS:
            raise RemedyError(f"unknown fix kind {kind!r}; known: {', '.join(sorted(FIX_KINDS))}")
        fix_cls = FIX_KINDS[kind]
        if cls is not Fix and not issubclass(fix_cls, cls):
            raise RemedyError(f"a {kind} patch spec is not a {cls.__name__}")
        kw: dict[str, Any] = {"model_fingerprint": spec.get("model_fingerprint")}
        if "components" not in spec or not isinstance(spec["components"], list):
            raise RemedyError(f"a {kind} patch spec needs 'components' as a list of ids")
        kw["components"] = tuple(spec["components"])
        for f in _own_fields(fix_cls):
            if f.name in spec:
                kw[f.name] = spec[f.name]
            elif f.default is dataclasses.MISSING:
                raise RemedyError(f"a {kind} patch spec needs {f.name!r}")
        return fix_cls(**kw)


def _own_fields(cls: type[Fix]) -> list[dataclasses.Field[Any]]:
    """A kind's own spec fields, in declaration order (the base's come first in the spec)."""
    return [f for f in dataclasses.fields(cls) if f.name not in ("components", "model_fingerprint")]


# the fix kinds by their spec's ``kind`` string; a kind's module registers it on import
FIX_KINDS: dict[str, type[Fix]] = {}

F = TypeVar("F", bound=type[Fix])


def register(cls: F) -> F:
    """Register a fix class under its ``kind``: the class decorator every kind uses."""
    if cls.kind in FIX_KINDS:
        raise ValueError(f"fix kind {cls.kind!r} is registered twice")
    FIX_KINDS[cls.kind] = cls
    return cls


def fix_from_spec(spec: Mapping[str, Any]) -> Fix:
    """The fix a patch spec describes (``Fix.from_spec``)."""
    return Fix.from_spec(spec)


def fix_context(subject: Subject, spec: Mapping[str, Any]) -> AbstractContextManager[None]:
    """The fix a patch spec describes, applied to ``subject``'s live model during the block."""
    return fix_from_spec(spec).context(subject)


def first_layer(spec: Mapping[str, Any]) -> int:
    """The lowest decoder layer the fix a patch spec describes changes anything in."""
    return fix_from_spec(spec).first_layer


def names(components: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(components) > 1:
        return " and ".join([", ".join(components[:-1]), components[-1]])
    return " and ".join(components)


# ---------------------------------------------------------------------------------------------
# tensors in a spec


def pack(t: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as JSON: shape and little-endian bytes in base64."""
    x = t.detach().to("cpu", torch.float32).contiguous()
    return {"shape": list(x.shape), "f32le": base64.b64encode(x.numpy().tobytes()).decode()}


def unpack(d: Mapping[str, Any]) -> torch.Tensor:
    """The tensor ``pack`` wrote."""
    import numpy as np

    buf = np.frombuffer(base64.b64decode(d["f32le"]), dtype="<f4").copy()
    return torch.from_numpy(buf).reshape(d["shape"])


def unit(v: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``v`` as a float32 unit vector."""
    d = torch.as_tensor(v, dtype=torch.float32)
    return d / d.norm()


# ---------------------------------------------------------------------------------------------
# a component's writes


# An edit of one component's write: (its input, the module's output) -> the new output. A
# head's input is its slice of the output projection's input; an MLP's is its neurons.
WriteEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def on_writes(subject: Subject, edits: Mapping[str, WriteEdit], what: str) -> Iterator[None]:
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


def bias_of(mod: torch.nn.Module, what: str) -> torch.Tensor:
    """The bias that holds a constant write when a mean ablation is baked."""
    b = getattr(mod, "bias", None)
    if not isinstance(b, torch.Tensor):
        raise RemedyError(
            f"{what} has no bias to hold the mean, so mean ablation cannot be baked into this "
            "architecture's weights; use the direction_removal fix, or apply the fix at run time"
        )
    return b
