"""Case files fuzzed with hypothesis: whatever the bytes, only the loader's own error
comes out, as one line naming the file, never another exception or a traceback.

CI runs 3,200 generated inputs (four generators); the `slow` tier adds 8,000 more.
Four generators: raw bytes (invalid UTF-8 and TOML included), TOML-shaped text with the known
keys and wrong-typed or hostile values, valid-looking case files with one field broken, and
valid case files with hostile variants, templates and splits.
Accepted inputs must yield a valid incident (the loader never accepts what it should refuse).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rca.cli import app
from rca.ingest.case_file import load_case
from rca.ingest.incident import SEVERITIES, Incident, IncidentError
from rca.ingest.variants import SPLIT_KEYS, TEMPLATE_KEYS, VARIANT_KEYS

KEYS = ("id", "title", "severity", "model", "prompt", "bad", "good", "counterfactual",
        "reference_prompts", "tags", "notes")  # fmt: skip
HOSTILE = ["", " ", "\x00", "\u202e", "<script>alert(1)</script>", "'; DROP TABLE runs; --",
           "../../etc/passwd", "a" * 30_000, "\ud7ff", "line\nbreak", "critical"]  # fmt: skip

CI = settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
SLOW = settings(CI, max_examples=8000)


def _scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(HOSTILE),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
    )


def _toml_value(v: Any) -> str:
    """A TOML rendering of ``v``, or something close enough to be worth parsing."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(v), repr(v))
    if isinstance(v, str):
        # a TOML basic string for most inputs (characters outside the BMP as they are: TOML has
        # no surrogate-pair escapes); invalid ones must be refused
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
        )
    return json.dumps(str(v))


values = st.recursive(_scalar(), lambda inner: st.lists(inner, max_size=4), max_leaves=8)
tomlish = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10)), values, max_size=12
).map(lambda d: "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in d.items()))

VALID = {
    "id": "case-1",
    "title": "a title",
    "severity": "high",
    "model": "zoo:support-bot-v1",
    "prompt": "refund desk. agent:",
    "bad": " approved",
    "good": " denied",
    "reference_prompts": ["loan desk. agent:"],
    "tags": ["x"],
}
one_broken = st.tuples(st.sampled_from(KEYS + ("extra",)), values, st.booleans()).map(
    lambda t: "\n".join(
        f"{k} = {_toml_value(v)}"
        for k, v in (
            {**VALID, t[0]: t[1]} if t[2] else {x: y for x, y in VALID.items() if x != t[0]}
        ).items()  # noqa: E501
    )
)


def _table(keys: tuple[str, ...], leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[dict]:
    """A table of mostly known keys (``keys``), now and then an unknown one."""
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(min_size=1, max_size=6))
    return st.dictionaries(key, leaf, max_size=6)


# plausible texts (placeholders, literal braces, words); hostile and wrong-typed ones beside
_plain = st.sampled_from(["w1 w2", " w3", " w4", "w1 {a} w3 {t}", "{t}", "x {{y}}", "{b}", "w4"])
_text = st.one_of(_plain, values)
_words = st.lists(st.sampled_from(["w1", "w2", "w5", "x y", " w3"]), min_size=1, max_size=3)
_variant_ok = st.fixed_dictionaries({"prompt": _plain}, optional={"bad": _plain, "focus": _plain})
_template_ok = st.fixed_dictionaries(
    {
        "prompt": st.sampled_from(["w1 {a} w3 {t}", "{t} {a}", "w1 {t}", "{a}"]),
        "slots": st.fixed_dictionaries({"a": _words, "t": _words}),
        "trigger": st.sampled_from(["t", "t", "a", "b"]),
        "counterfactual": st.lists(st.sampled_from(["w8", "w9", "w1"]), max_size=2),
    },
    optional={"bad": _plain, "limit": st.one_of(st.integers(-2, 1200), values)},
)
_split_ok = st.fixed_dictionaries(
    {}, optional={"seed": st.integers(-3, 99), "held_out": st.floats(-1, 2)}
)
# the parts: mostly plausible (so that some cases are accepted with their variants), or tables
# with unknown keys and hostile values, or values of another type
_parts = st.tuples(
    st.one_of(
        st.none(), st.lists(st.one_of(_variant_ok, _table(VARIANT_KEYS, _text)), max_size=3), values
    ),
    st.one_of(st.none(), _template_ok, _table(TEMPLATE_KEYS, _text), values),
    st.one_of(st.none(), _split_ok, _table(SPLIT_KEYS, values), values),
)
_parts_ok = st.tuples(
    st.one_of(st.none(), st.lists(_variant_ok, max_size=3)),
    st.one_of(st.none(), _template_ok),
    st.one_of(st.none(), _split_ok),
)
behaviour_broken = st.one_of(_parts, _parts_ok).map(
    lambda t: "\n".join(
        [f"{k} = {_toml_value(v)}" for k, v in VALID.items()]
        + [
            f"{k} = {_toml_value(v)}"
            for k, v in zip(("variants", "template", "split"), t, strict=True)
            if v is not None
        ]
    )
)


def _check(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.toml"
        path.write_bytes(raw)
        try:
            inc = load_case(path, check_model=False)
        except IncidentError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(str(path)), msg
            assert len(msg) < 2_000
            return
        # accepted: a valid incident through and through
        assert isinstance(inc, Incident) and inc.severity in SEVERITIES
        assert inc.prompt.strip() and inc.bad.strip() and inc.good != inc.bad
        assert all(isinstance(p, str) and p.strip() for p in inc.reference_prompts)
        for v in inc.variant_incidents():  # every variant too
            assert (v.prompt or v.messages) and v.bad.strip() and v.good != v.bad
            assert v.focus is None or v.focus in v.bad


@CI
@given(st.binary(max_size=400))
def test_random_bytes(raw: bytes) -> None:
    _check(raw)


@CI
@given(tomlish)
def test_toml_shaped_text(text: str) -> None:
    _check(text.encode("utf-8", "surrogatepass"))


@CI
@given(one_broken)
def test_valid_case_with_one_field_broken(text: str) -> None:
    _check(text.encode("utf-8", "surrogatepass"))


@CI
@given(behaviour_broken)
def test_valid_case_with_hostile_variants(text: str) -> None:
    _check(text.encode("utf-8", "surrogatepass"))


@pytest.mark.slow
@SLOW
@given(
    st.one_of(
        st.binary(max_size=2000),
        tomlish.map(str.encode),
        one_broken.map(str.encode),
        behaviour_broken.map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
)
def test_many_more(raw: bytes) -> None:
    _check(raw)


@settings(CI, max_examples=60)
@given(st.one_of(tomlish, one_broken, behaviour_broken))
def test_cli_check_prints_one_line_and_no_traceback(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        r = CliRunner().invoke(app, ["check", str(path), "--no-model"])
        assert r.exit_code in (0, 2), r.output
        assert "Traceback" not in r.output
        if r.exit_code == 2:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert lines and lines[0].startswith("error:")
