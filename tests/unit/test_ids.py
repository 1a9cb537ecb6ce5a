"""The component id grammar: ``format_id(parse_id(s)) == s`` for every valid ``s``, and anything
else is an ``IdError`` whose one-line message names the bad id."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rca.model.ids import KINDS, ComponentId, IdError, format_id, neuron_group, parse_id, with_pos

NAT = st.integers(min_value=0, max_value=10**6)
OPT_POS = st.none() | NAT


@st.composite
def component_ids(draw: st.DrawFn) -> ComponentId:
    kind = draw(st.sampled_from(sorted(KINDS)))
    in_layer, indexed = KINDS[kind]
    group = sorted(draw(st.sets(NAT, min_size=2, max_size=5))) if kind == "neurons" else []
    return ComponentId(
        kind,
        draw(NAT) if in_layer else None,
        draw(NAT) if indexed else None,
        draw(OPT_POS),
        tuple(group),
    )


@st.composite
def id_texts(draw: st.DrawFn) -> tuple[str, ComponentId]:
    """A valid id string written from the grammar, with the id it must parse to."""
    layer, index, pos = draw(NAT), draw(NAT), draw(OPT_POS)
    form = draw(
        st.sampled_from(["EMB", "LOGITS", "H", "N", "N+", "ATTN", "MLP", "RESID_PRE", "RESID_POST"])
    )
    if form == "N+":  # a neuron group: two or more, ascending
        group = sorted(draw(st.sets(NAT, min_size=2, max_size=5)))
        text = f"L{layer}.N" + "+".join(map(str, group))
        cid = ComponentId("neurons", layer, None, pos, tuple(group))
    elif form in ("EMB", "LOGITS"):
        text, cid = form, ComponentId(form.lower(), pos=pos)
    elif form in ("H", "N"):
        text = f"L{layer}.{form}{index}"
        cid = ComponentId("head" if form == "H" else "neuron", layer, index, pos)
    else:
        text, cid = f"L{layer}.{form}", ComponentId(form.lower(), layer, None, pos)
    return (text if pos is None else f"{text}@{pos}"), cid


@given(id_texts())
def test_valid_text_parses_to_its_id_and_formats_back(case: tuple[str, ComponentId]) -> None:
    text, cid = case
    assert parse_id(text) == cid
    assert format_id(parse_id(text)) == text
    assert str(cid) == text


@given(component_ids())
def test_every_id_formats_to_text_that_parses_back(cid: ComponentId) -> None:
    assert parse_id(format_id(cid)) == cid
    assert parse_id(format_id(cid)).base == cid.base
    assert cid.base.pos is None


@given(component_ids(), OPT_POS)
def test_with_pos_sets_or_drops_the_position(cid: ComponentId, pos: int | None) -> None:
    moved = with_pos(format_id(cid), pos)
    assert moved.pos == pos and moved.base == cid.base
    assert with_pos(cid, pos) == moved


@given(st.lists(component_ids(), max_size=6))
def test_ids_sort(cids: list[ComponentId]) -> None:
    """ComponentId declares order=True: any list of ids must sort (a total order)."""
    out = sorted(cids)
    assert all(not (b < a) for a, b in zip(out, out[1:], strict=False))


# Strings near the grammar: its own alphabet plus near misses, and valid ids with junk around.
JUNK = st.text(alphabet=" \t\n\r0L.@x-", max_size=2)
NEAR = st.one_of(
    st.text(alphabet="LHN.@0123456789-+ _lhnEMBLOGITSATRSPUEODx\n\t", max_size=14),
    st.tuples(JUNK, id_texts(), JUNK).map(lambda t: t[0] + t[1][0] + t[2]),
)


@given(NEAR)
def test_every_accepted_string_is_canonical(text: str) -> None:
    """Whatever parse_id accepts formats back to exactly the same string (DuckDB keys on it)."""
    try:
        cid = parse_id(text)
    except IdError as e:
        assert "\n" not in str(e) and repr(text) in str(e)
        return
    assert format_id(cid) == text


BAD_TEXTS = [
    "",
    "L03.H1",  # leading zero in the layer
    "L3.H05",  # ... in the head
    "L3.N007",
    "L3.H5@07",  # ... in the position
    "L-1.H2",  # negative
    "L3.H-5",
    "L3.H5@-1",
    "l3.h5",  # lowercase
    "L3.mlp",
    "emb",
    "Logits",
    "L3",  # missing parts
    "L3.",
    "L.H5",
    "L3.H",
    "L3.N",
    "H5",
    "3.H5",
    "L3H5",
    "L3.H5@",
    "@3",
    "L3.H5x",  # trailing junk
    "L3.H5@7@8",
    "L3.H5.MLP",
    "EMB.H1",
    "LOGITS1",
    "L3.ATTN5",
    "L3.RESID",
    "L3.H5 ",  # whitespace is not part of the grammar
    " L3.H5",
    "L3.H5\n",
    "L 3.H5",
    "L3.H５",  # a full-width digit
    "L3.H٣",  # an Arabic-Indic digit
    "L3.N5+5",  # a neuron group: distinct, ascending, no leading zeros, no empty member
    "L3.N7+5",
    "L3.N5+",
    "L3.N+5",
    "L3.N5+05",
    "L3.N5++6",
    "L3.H1+2",  # heads do not group
]


@pytest.mark.parametrize("text", BAD_TEXTS, ids=[repr(t) for t in BAD_TEXTS])
def test_malformed_text_raises_a_one_line_error_naming_it(text: str) -> None:
    with pytest.raises(IdError) as info:
        parse_id(text)
    msg = str(info.value)
    assert repr(text) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", [3, None, 3.0, b"L3.H5", ComponentId("mlp", 3), ["L3.H5"]])
def test_non_strings_raise_id_error_naming_the_type(value: object) -> None:
    with pytest.raises(IdError) as info:
        parse_id(value)  # type: ignore[arg-type]
    msg = str(info.value)
    assert type(value).__name__ in msg and "\n" not in msg


def test_id_error_is_a_value_error() -> None:
    assert issubclass(IdError, ValueError)


INVALID_FIELDS = [
    (("bogus",), {}, "bogus"),
    (("HEAD", 1, 2), {}, "HEAD"),
    (("head",), {}, "needs layer"),  # missing layer
    (("head", 1), {}, "needs index"),  # missing index
    (("emb", 0), {}, "takes no layer"),
    (("logits", None, 0), {}, "takes no index"),
    (("mlp", 1, 0), {}, "takes no index"),
    (("neuron", 1), {}, "needs index"),
    (("head", -1, 0), {}, "layer"),
    (("head", 1, -2), {}, "index"),
    (("mlp", 1), {"pos": -1}, "pos"),
    (("head", True, 0), {}, "layer"),  # bool is not an int here
    (("head", 1, 0), {"pos": False}, "pos"),
    (("head", 1.0, 0), {}, "layer"),
    (("neuron", 1, "5"), {}, "index"),
    (("neurons", 1), {}, "needs indices"),
    (("neurons", 1, None, None, (5,)), {}, "two or more"),
    (("neurons", 1, None, None, (7, 5)), {}, "ascending"),
    (("mlp", 1, None, None, (1, 2)), {}, "takes no indices"),
]


@pytest.mark.parametrize(("args", "kwargs", "needle"), INVALID_FIELDS)
def test_component_id_validates_its_fields(args: tuple, kwargs: dict, needle: str) -> None:
    with pytest.raises(IdError) as info:
        ComponentId(*args, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_component_ids_are_frozen_and_hashable() -> None:
    cid = parse_id("L3.H5@7")
    with pytest.raises(AttributeError):
        cid.layer = 4  # type: ignore[misc]
    assert {cid: 1}[parse_id("L3.H5@7")] == 1
    assert cid != parse_id("L3.H5") and cid.base == parse_id("L3.H5")


def test_a_neuron_group_is_named_by_its_members_in_ascending_order() -> None:
    assert neuron_group(3, [230, 5, 17, 5]) == "L3.N5+17+230"
    assert neuron_group(3, [9]) == "L3.N9"  # one neuron is a neuron
    assert parse_id("L3.N5+17+230@4").neurons == (5, 17, 230)
    assert parse_id("L3.N9").neurons == (9,) and parse_id("L3.MLP").neurons == ()
    with pytest.raises(IdError):
        neuron_group(3, [])


@pytest.mark.parametrize(
    ("text", "depth", "depth_in_4_layers"),
    [
        ("EMB", -1, -1),
        ("EMB@3", -1, -1),
        ("L0.H2", 0, 0),
        ("L3.MLP@1", 3, 3),
        ("L2.N5+17", 2, 2),
        ("L1.RESID_POST", 1, 1),
        ("LOGITS", 1 << 30, 4),
    ],
)
def test_depth_is_the_layer_with_emb_below_and_logits_above(
    text: str, depth: int, depth_in_4_layers: int
) -> None:
    cid = parse_id(text)
    assert cid.depth() == depth and cid.depth(4) == depth_in_4_layers


@given(component_ids(), component_ids())
def test_depth_orders_ids_as_they_sort(a: ComponentId, b: ComponentId) -> None:
    if a.depth() < b.depth():
        assert a < b


@given(component_ids())
def test_is_head_holds_for_heads_only(cid: ComponentId) -> None:
    assert cid.is_head == (cid.kind == "head") == format_id(cid.base).split(".")[-1].startswith("H")
