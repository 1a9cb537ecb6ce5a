"""``rca.paths``: every path the user names is checked up front, and every file read as content
is bounded. Each refusal is one ``PathError`` line naming the flag, the path and the fix."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from rca import paths
from rca.paths import (
    PathError,
    input_path,
    json_depth,
    output_path,
    read_bounded,
    read_bounded_json,
    read_bounded_text,
)
from tests.helpers import assert_one_line_error, rca_cli

LONG = "a" * 300  # one name over NAME_MAX (255 bytes)


def refused(fn, *needles: str) -> PathError:
    with pytest.raises(PathError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 500, msg
    for n in needles:
        assert n in msg, (n, msg)
    return ei.value


# ---------------------------------------------------------------------------- input paths


def test_a_name_over_255_bytes_is_refused_before_any_lookup(tmp_path: Path) -> None:
    e = refused(lambda: input_path(tmp_path / LONG, what="--db"), "--db:", "300 bytes", "255")
    assert not e.missing
    # bytes, not characters: 128 two-byte characters are 256 bytes
    refused(lambda: input_path(tmp_path / ("é" * 128), what="--db"), "256 bytes")
    # a path over PATH_MAX made of short names
    refused(lambda: input_path("/".join(["d" * 200] * 21), what="-o"), "a path is under 4096")


def test_a_path_nested_past_256_levels_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    """Short names, under PATH_MAX, nested 2,000 deep: creating the missing directories would
    recurse once per level (a RecursionError past Python's limit), so it is refused first."""
    deep = tmp_path / "/".join(["x"] * 2000)
    refused(lambda: output_path(deep, what="DIRECTORY", kind="dir", overwrite=True,
                                parent_must_exist=False), "nests", "at most 256")  # fmt: skip
    code, _, err = rca_cli("export", str(deep), "--db", str(tmp_path / "rca.duckdb"))
    assert_one_line_error(code, err, "at most 256 levels")
    ok = tmp_path / "/".join(["y"] * 200)  # a deep but ordinary tree is created
    assert output_path(ok, what="x", kind="dir", overwrite=True, parent_must_exist=False) == ok


def test_input_path_kinds(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert input_path(f, what="x") == f
    assert input_path(tmp_path, what="x", kind="dir") == tmp_path
    assert input_path(tmp_path, what="x", kind="any") == tmp_path
    refused(lambda: input_path(tmp_path, what="--prompt-file"), "is a directory", "give a file")
    refused(lambda: input_path(f, what="--cases", kind="dir"), "--cases", "not a directory")
    e = refused(lambda: input_path(tmp_path / "nope", what="--db"), "does not exist")
    assert e.missing
    assert input_path(tmp_path / "nope", what="--home", kind="dir", must_exist=False)


def test_a_parent_that_is_a_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("x")
    for fn in (
        lambda: input_path(f / "x.duckdb", what="--db"),
        lambda: input_path(f / "x.duckdb", what="--db", must_exist=False),
        lambda: output_path(f / "x.duckdb", what="--db", overwrite=True, parent_must_exist=False),
        lambda: output_path(f / "a" / "b.json", what="--graph", overwrite=True),
    ):
        refused(fn, str(f), "is a file, not a directory")


def test_a_symbolic_link_loop_is_named(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused(lambda: input_path(loop, what="MODEL", kind="any"), "MODEL", "symbolic-link loop")
    refused(lambda: output_path(loop / "x", what="-o", overwrite=True), "symbolic-link loop")


def test_permission_problems_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the suite runs as root, which may read and write everything."""
    f = tmp_path / "f.txt"
    f.write_text("x")
    monkeypatch.setattr(paths.os, "access", lambda *a, **k: False)
    refused(lambda: input_path(f, what="--messages"), "permission denied")
    refused(lambda: output_path(f, what="-o", overwrite=True), "permission denied")
    refused(lambda: output_path(tmp_path / "new", what="-o", overwrite=True), "permission denied")
    monkeypatch.undo()

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(paths.os, "stat", denied)
    refused(lambda: input_path(f, what="--db"), "--db", "permission denied")


# ---------------------------------------------------------------------------- output paths


def test_output_paths(tmp_path: Path) -> None:
    existing = tmp_path / "r.html"
    existing.write_text("old")
    assert output_path(existing, what="-o", overwrite=True) == existing
    refused(lambda: output_path(existing, what="-o", overwrite=False), "already exists")
    refused(lambda: output_path(tmp_path, what="-o", overwrite=True), "-o", "is a directory")
    refused(
        lambda: output_path(tmp_path / "no" / "r.html", what="-o", overwrite=True),
        "its directory",
        "does not exist; create it first",
    )
    # the command creates missing directories itself: only the nearest existing one matters
    deep = tmp_path / "no" / "such" / "x.duckdb"
    assert output_path(deep, what="--db", overwrite=True, parent_must_exist=False) == deep
    # a directory to write into: an existing one is fine, a file is not
    assert output_path(tmp_path, what="DIRECTORY", kind="dir", overwrite=True) == tmp_path
    refused(
        lambda: output_path(existing, what="DIRECTORY", kind="dir", overwrite=True),
        "DIRECTORY",
        "is a file, not a directory",
    )


# ---------------------------------------------------------------------------- bounded reads


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "case.toml"
    os.mkfifo(fifo)
    refused(lambda: read_bounded(fifo, what="case file", max_bytes=100), "is a FIFO")


def test_a_fifo_swapped_in_after_the_check_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open itself does not block (O_NONBLOCK), and the open file's type is checked."""
    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    monkeypatch.setattr(paths, "input_path", lambda p, **k: Path(p))  # the check is raced
    done = threading.Event()
    t = threading.Thread(
        target=lambda: (
            pytest.raises(PathError, read_bounded, fifo, what="--prompt-file", max_bytes=9),
            done.set(),
        ),
        daemon=True,
    )
    t.start()
    assert done.wait(10), "reading a FIFO blocked"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_are_refused(device: str) -> None:
    refused(lambda: read_bounded(device, what="--prompt-file", max_bytes=10), "character device")


def test_the_size_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big.txt"
    f.write_bytes(b"x" * 101)
    refused(lambda: read_bounded(f, what="--prompt-file", max_bytes=100), "101 bytes", "100")
    f.write_bytes(b"x" * 100)
    assert read_bounded(f, what="--prompt-file", max_bytes=100) == b"x" * 100
    # a file whose size says 0 (as /proc files do) is still read no further than the bound
    f.write_bytes(b"x" * 5000)
    real_fstat = os.fstat

    class Zero:
        def __init__(self, st: os.stat_result) -> None:
            self.st_mode, self.st_size = st.st_mode, 0

    monkeypatch.setattr(paths.os, "fstat", lambda fd: Zero(real_fstat(fd)))
    refused(lambda: read_bounded(f, what="--messages", max_bytes=100), "over 100 bytes")


def test_text_files_are_utf8_and_drop_a_leading_bom(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfw1 w2")
    assert read_bounded_text(f, what="--prompt-file", max_bytes=100) == "w1 w2"
    f.write_bytes(b"\xef\xbb\xbfw1 \xff")
    refused(
        lambda: read_bounded_text(f, what="--prompt-file", max_bytes=100),
        "not valid UTF-8 at byte 6",  # counted in the file, the mark included
    )


# ---------------------------------------------------------------------------- bounded JSON


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth("{}") == 1
    assert json_depth('[{"a": [1]}]') == 3
    assert json_depth('["[[[[", "\\"]]]]"]') == 1
    assert json_depth("42") == 0


def test_deep_json_is_refused_by_the_scan_not_a_recursion_error(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    refused(
        lambda: read_bounded_json(f, what="config.json", max_bytes=1 << 20, max_depth=64),
        "config.json",
        "nests 100000 levels deep; the limit is 64",
    )
    f.write_text(json.dumps({"model_type": "gpt2", "n_layer": [[1]]}))
    assert read_bounded_json(f, what="config.json", max_bytes=1000, max_depth=3)["n_layer"] == [[1]]


def test_invalid_json_names_the_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "chat.json"
    f.write_text('[\n  {"role": "user",}\n]')
    refused(
        lambda: read_bounded_json(f, what="--messages", max_bytes=1000),
        "--messages",
        "not valid JSON",
        "line 2 column",
    )
