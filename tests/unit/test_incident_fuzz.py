"""Case files fuzzed with hypothesis: whatever the bytes, only the loader's own error
comes out, as one line naming the file, never another exception or a traceback.

CI runs 2,400 generated inputs (three generators); the `slow` tier adds 8,000 more.
Three generators: raw bytes (invalid UTF-8 and TOML included), TOML-shaped text with the known
keys and wrong-typed or hostile values, and valid-looking case files with one field broken.
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
        return json.dumps(v)  # a TOML basic string for most inputs; invalid ones must be refused
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
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


@pytest.mark.slow
@SLOW
@given(st.one_of(st.binary(max_size=2000), tomlish.map(str.encode), one_broken.map(str.encode)))
def test_many_more(raw: bytes) -> None:
    _check(raw)


@settings(CI, max_examples=60)
@given(st.one_of(tomlish, one_broken))
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
