"""The component id grammar. This module is the only code that knows it.

    EMB                 token embeddings (output of the input embedding module)
    L3.H5               attention head 5 of layer 3 (its slice of the output projection's input)
    L3.ATTN             the whole attention block output of layer 3 (output projection's output)
    L3.MLP              the MLP block output of layer 3
    L3.N1021            MLP neuron 1021 of layer 3 (input of the down projection)
    L3.N5+17+230        MLP neurons 5, 17 and 230 of layer 3, as one component (ascending)
    L3.RESID_PRE        residual stream entering layer 3
    L3.RESID_POST       residual stream leaving layer 3
    LOGITS              the model's output logits

Any id may carry a position, ``L3.H5@7``: the component at sequence position 7 only.
Layers, heads, neurons and positions are non-negative integers without leading zeros.
DuckDB stores these strings; ``format_id(parse_id(s)) == s`` for every valid ``s``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ComponentId", "IdError", "KINDS", "parse_id", "format_id", "neuron_group", "with_pos"]

# kind -> does it live in a layer and does it take an index
KINDS: dict[str, tuple[bool, bool]] = {
    "emb": (False, False),
    "logits": (False, False),
    "head": (True, True),
    "attn": (True, False),
    "mlp": (True, False),
    "neuron": (True, True),
    "neurons": (True, False),  # a group: ``indices``, two or more, ascending
    "resid_pre": (True, False),
    "resid_post": (True, False),
}

_INT = r"(0|[1-9][0-9]*)"
_RE = re.compile(
    rf"(?:(?P<glob>EMB|LOGITS)|L(?P<layer>{_INT})\."
    rf"(?:H(?P<head>{_INT})|N(?P<neuron>{_INT}(?:\+{_INT})*)"
    rf"|(?P<named>ATTN|MLP|RESID_PRE|RESID_POST)))"
    rf"(?:@(?P<pos>{_INT}))?"
)
_NAMED = {"ATTN": "attn", "MLP": "mlp", "RESID_PRE": "resid_pre", "RESID_POST": "resid_post"}
_NAMED_INV = {v: k for k, v in _NAMED.items()}


class IdError(ValueError):
    """A component id that does not follow the grammar; the message says what would."""


@dataclass(frozen=True)
class ComponentId:
    """A parsed component id. ``index`` is the head or neuron number, ``indices`` a neuron
    group's numbers, ``pos`` the position."""

    kind: str
    layer: int | None = None
    index: int | None = None
    pos: int | None = None
    indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IdError(f"unknown component kind {self.kind!r}; expected one of {sorted(KINDS)}")
        in_layer, indexed = KINDS[self.kind]
        if in_layer != (self.layer is not None):
            raise IdError(f"kind {self.kind!r} {'needs' if in_layer else 'takes no'} layer")
        if indexed != (self.index is not None):
            raise IdError(f"kind {self.kind!r} {'needs' if indexed else 'takes no'} index")
        for name, v in [("layer", self.layer), ("index", self.index), ("pos", self.pos)] + [
            ("indices", i) for i in self.indices
        ]:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise IdError(f"{name} must be a non-negative int, got {v!r}")
        if (self.kind == "neurons") != bool(self.indices):
            raise IdError(
                f"kind {self.kind!r} {'needs' if self.indices == () else 'takes no'} indices"
            )
        if self.kind == "neurons" and (
            len(self.indices) < 2 or list(self.indices) != sorted(set(self.indices))
        ):
            raise IdError(
                f"a neuron group needs two or more distinct neurons in ascending order, got "
                f"{list(self.indices)}"
            )

    def __str__(self) -> str:
        return format_id(self)

    @property
    def sort_key(self) -> tuple[int, int, int, int, int]:
        """Model order: EMB, then by layer (heads, ATTN, MLP, neurons, residuals), LOGITS."""
        rank = ["emb", "resid_pre", "head", "attn", "mlp", "neuron", "neurons", "resid_post"]
        rank.append("logits")
        first = self.indices[0] if self.indices else self.index
        return (
            self.depth(),
            rank.index(self.kind),
            -1 if first is None else first,
            -1 if self.pos is None else self.pos,
            0,
        )

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ComponentId):
            return NotImplemented
        return self.sort_key < other.sort_key

    def depth(self, n_layers: int | None = None) -> int:
        """Where it sits in the forward pass: -1 for EMB, its layer for a component inside a
        layer, and for LOGITS ``n_layers`` (without it, a number above every layer)."""
        if self.kind == "emb":
            return -1
        if self.layer is not None:
            return self.layer
        return 1 << 30 if n_layers is None else n_layers

    @property
    def is_head(self) -> bool:
        """Whether it is an attention head (``L3.H5``, at a position or not)."""
        return self.kind == "head"

    @property
    def base(self) -> ComponentId:
        """The same component without a position."""
        return ComponentId(self.kind, self.layer, self.index, None, self.indices)

    @property
    def neurons(self) -> tuple[int, ...]:
        """The MLP neurons it names: one for a neuron, the group's for a group, else none."""
        if self.kind == "neuron":
            assert self.index is not None
            return (self.index,)
        return self.indices


def parse_id(text: str) -> ComponentId:
    """Parse ``"L3.H5@7"`` and friends; raise IdError with the grammar on anything else."""
    if not isinstance(text, str):
        raise IdError(f"component id must be a string, got {type(text).__name__}")
    m = _RE.fullmatch(text)
    if m is None:
        raise IdError(
            f"bad component id {text!r}: expected EMB, LOGITS, or L<layer>. followed by "
            "H<head>, N<neuron>, N<neuron>+<neuron>..., ATTN, MLP, RESID_PRE or RESID_POST, "
            "optionally @<position> (e.g. 'L3.H5', 'L0.MLP@7', 'L2.N5+17')"
        )
    pos = int(m["pos"]) if m["pos"] is not None else None
    if m["glob"]:
        return ComponentId(m["glob"].lower(), pos=pos)
    layer = int(m["layer"])
    if m["head"] is not None:
        return ComponentId("head", layer, int(m["head"]), pos)
    if m["neuron"] is not None:
        ns = [int(x) for x in m["neuron"].split("+")]
        if len(ns) == 1:
            return ComponentId("neuron", layer, ns[0], pos)
        try:
            return ComponentId("neurons", layer, None, pos, tuple(ns))
        except IdError as e:
            raise IdError(f"bad component id {text!r}: {e}") from None
    return ComponentId(_NAMED[m["named"]], layer, None, pos)


def format_id(cid: ComponentId) -> str:
    """The canonical string of a component id."""
    if cid.kind in ("emb", "logits"):
        s = cid.kind.upper()
    elif cid.kind == "head":
        s = f"L{cid.layer}.H{cid.index}"
    elif cid.kind == "neuron":
        s = f"L{cid.layer}.N{cid.index}"
    elif cid.kind == "neurons":
        s = f"L{cid.layer}.N" + "+".join(str(i) for i in cid.indices)
    else:
        s = f"L{cid.layer}.{_NAMED_INV[cid.kind]}"
    return s if cid.pos is None else f"{s}@{cid.pos}"


def with_pos(cid: ComponentId | str, pos: int | None) -> ComponentId:
    """``cid`` at position ``pos`` (``None`` drops the position)."""
    c = parse_id(cid) if isinstance(cid, str) else cid
    return ComponentId(c.kind, c.layer, c.index, pos, c.indices)


def neuron_group(layer: int, neurons: Sequence[int]) -> str:
    """The id of MLP neurons of ``layer`` taken together: ``L3.N5`` for one, ``L3.N5+17`` for
    several (ascending, whatever order they come in)."""
    ns = sorted(set(neurons))
    if not ns:
        raise IdError("a neuron group needs at least one neuron")
    if len(ns) == 1:
        return format_id(ComponentId("neuron", layer, ns[0]))
    return format_id(ComponentId("neurons", layer, None, None, tuple(ns)))
