"""Paths and files the user names: checked before any work starts, read with a bound.

Every path a command takes (``--db``, ``-o``, ``--graph``, a case file's ``model``) goes
through ``input_path`` or ``output_path`` first, so a path that cannot work (a name over 255
bytes, a parent that is a file, a symbolic-link loop, no permission, a missing directory, a
directory, a FIFO or a device where a file is written) is one ``PathError`` line naming the
flag and the fix, not an ``OSError`` traceback (or a write that blocks) after the model has
loaded.

A file the user hands over as content (a case file, ``--prompt-file``, ``--messages``, a JSON
config) is read with ``read_bounded``: a regular file only (a FIFO would block the reader,
``/dev/zero`` never ends) and at most ``max_bytes``, checked on the open file's size and again
on what is read (``/proc`` files report size 0). ``read_bounded_json`` also bounds the nesting
depth by a scan before ``json.loads``, whose recursion a deep file would otherwise exhaust.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import stat
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "PathError",
    "input_path",
    "json_depth",
    "output_path",
    "read_bounded",
    "read_bounded_json",
    "read_bounded_text",
    "show",
]

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096  # bytes in a whole path (Linux)
MAX_PATH_DEPTH = 256  # directories a path may nest (far more than any real tree)

Kind = Literal["file", "dir", "any"]


def show(path: str | os.PathLike[str]) -> str:
    """A path quoted for a one-line message: a very long one keeps its start and its end."""
    text = str(path)
    if len(text) <= 100:
        return repr(text)
    return f"{text[:48]!r}...{text[-32:]!r} ({len(text)} chars)"


class PathError(ValueError):
    """A path or file the user gave that cannot be used. The one-line message names ``what``
    (the flag or key, e.g. ``--db``, ``-o``, ``model``), the path and the fix; ``problem`` is
    the message without them, for callers that name the place themselves. ``missing`` is True
    where the only problem is that the path does not exist."""

    def __init__(
        self, what: str, path: str | os.PathLike[str], problem: str, *, missing: bool = False
    ) -> None:
        self.what, self.path, self.problem, self.missing = what, Path(path), problem, missing
        super().__init__(f"{what}: {show(path)} {problem}".replace("\n", " "))


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` (from the root down) that exists and is not a
    directory: what makes a lookup fail with ENOTDIR."""
    for anc in reversed(path.absolute().parents):
        try:
            st = os.stat(anc)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return anc
    return None


def _os_problem(e: OSError, path: Path) -> str:
    """An OSError from looking up or opening ``path``, as the rest of a one-line message."""
    if e.errno == errno.ENAMETOOLONG:
        return "is too long for the file system; shorten it"
    if e.errno == errno.ENOTDIR:
        anc = _blocking_file(path)
        where = f"{show(anc)} is a file" if anc is not None else "a part of it is a file"
        return f"cannot exist: {where}, not a directory; check the path"
    if e.errno == errno.ELOOP:
        return "runs into a symbolic-link loop; check the links"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "cannot be reached: permission denied; check the permissions"
    return f"cannot be used: {e.strerror or type(e).__name__}; check the path"


def _check_names(path: Path, what: str) -> None:
    """Refuse what no file system takes, before asking one: a NUL byte, a name (one path
    component) over NAME_MAX bytes, a path over PATH_MAX bytes, text that is not a file name;
    and a name that is not UTF-8 (an undecodable byte in argv), which rca could not open with
    DuckDB or pyarrow, nor print."""
    text = str(path)
    if "\x00" in text:
        raise PathError(what, path, "contains a NUL byte; check the path")
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        raise PathError(what, path, "is not a valid file name; check the path") from None
    try:
        text.encode("utf-8")  # DuckDB, pyarrow and the terminal take UTF-8 only
    except UnicodeEncodeError:
        raise PathError(
            what, path, "has bytes that are not UTF-8 in its name; rename it in UTF-8"
        ) from None
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise PathError(
                what,
                path,
                f"has a name of {n} bytes (starting {part[:16]!r}); a file or directory name "
                f"is at most {NAME_MAX} bytes. Shorten it",
            )
    if len(raw) >= PATH_MAX:
        raise PathError(
            what, path, f"is {len(raw)} bytes long; a path is under {PATH_MAX} bytes. Shorten it"
        )
    if len(path.parts) > MAX_PATH_DEPTH:
        # creating the missing directories recurses once per level (pathlib, os.makedirs)
        raise PathError(
            what,
            path,
            f"nests {len(path.parts)} levels deep; rca takes paths of at most {MAX_PATH_DEPTH} "
            "levels. Shorten it",
        )


def _stat(path: Path, what: str) -> os.stat_result | None:
    """``os.stat(path)``, None where it does not exist; any other failure is a PathError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PathError(what, path, _os_problem(e, path)) from None


def input_path(
    p: str | os.PathLike[str], *, what: str, kind: Kind = "file", must_exist: bool = True
) -> Path:
    """A path the command reads: it exists (unless not ``must_exist``), is ``kind`` (a regular
    file, a directory, or either) and is readable. Raises PathError naming ``what``."""
    path = Path(p)
    _check_names(path, what)
    st = _stat(path, what)
    if st is None:
        if must_exist:
            raise PathError(what, path, "does not exist; check the path", missing=True)
        return path
    mode = st.st_mode
    if kind == "file" and not stat.S_ISREG(mode):
        raise PathError(what, path, f"is a {_file_type(mode)}, not a regular file; give a file")
    if kind == "dir" and not stat.S_ISDIR(mode):
        raise PathError(what, path, "is not a directory; give a directory")
    if kind == "any" and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise PathError(
            what, path, f"is a {_file_type(mode)}, not a file or a directory; check the path"
        )
    need = os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)
    if not os.access(path, need):
        raise PathError(what, path, "cannot be read: permission denied; check the permissions")
    return path


def output_path(
    p: str | os.PathLike[str],
    *,
    what: str,
    overwrite: bool,
    kind: Literal["file", "dir"] = "file",
    parent_must_exist: bool = True,
) -> Path:
    """A path the command writes: a file (or, with ``kind="dir"``, a directory it writes
    into). An existing one must be that kind (a file is a regular file: writing a FIFO
    blocks, and a device is no store) and writable, and is refused unless ``overwrite`` (for
    a directory: unless it may already exist). A new one needs its directory to exist (or,
    without ``parent_must_exist``, the nearest existing ancestor to be a directory, as the
    command creates the rest) and to be writable. Raises PathError naming ``what``."""
    path = Path(p)
    _check_names(path, what)
    st = _stat(path, what)
    if st is not None:
        is_dir = stat.S_ISDIR(st.st_mode)
        if kind == "file" and is_dir:
            raise PathError(what, path, "is a directory; give a file name")
        if kind == "file" and not stat.S_ISREG(st.st_mode):
            raise PathError(
                what, path, f"is a {_file_type(st.st_mode)}, not a regular file; give a file name"
            )
        if kind == "dir" and not is_dir:
            raise PathError(
                what, path, f"is a {_file_type(st.st_mode)}, not a directory; give a directory"
            )
        if not overwrite:
            raise PathError(what, path, "already exists; remove it or give a new name")
        if not os.access(path, os.W_OK | (os.X_OK if is_dir else 0)):
            raise PathError(what, path, "cannot be written: permission denied")
        return path
    parent = path.parent
    while True:
        pst = _stat(parent, what)
        if pst is not None:
            break
        if parent_must_exist:
            raise PathError(
                what,
                path,
                f"cannot be written: its directory {show(parent)} does not exist; create it first",
            )
        if parent == parent.parent:  # pragma: no cover - the root always exists
            break
        parent = parent.parent
    if pst is not None and not stat.S_ISDIR(pst.st_mode):
        raise PathError(
            what, path, f"cannot exist: {show(parent)} is a file, not a directory; check the path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(
            what, path, f"cannot be written: permission denied in directory {show(parent)}"
        )
    return path


def read_bounded(p: str | os.PathLike[str], *, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. The type is checked before the
    open, and the open does not block (a FIFO swapped in meanwhile is refused on its fstat);
    the size is checked on the open file and again on what is read, which is at most
    ``max_bytes + 1`` bytes. Raises PathError naming ``what``."""
    path = input_path(p, what=what, kind="file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise PathError(what, path, _os_problem(e, path)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PathError(
                what, path, f"is a {_file_type(st.st_mode)}, not a regular file; give a file"
            )
        if st.st_size > max_bytes:
            raise PathError(what, path, f"is {st.st_size} bytes; the limit is {max_bytes}")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise PathError(what, path, _os_problem(e, path)) from None
    if len(data) > max_bytes:
        raise PathError(what, path, f"is over {max_bytes} bytes, the limit")
    return data


def read_bounded_text(p: str | os.PathLike[str], *, what: str, max_bytes: int) -> str:
    """A UTF-8 text file read with ``read_bounded``; a leading byte-order mark is dropped.
    Raises PathError naming ``what`` and the first byte that is not UTF-8."""
    raw = read_bounded(p, what=what, max_bytes=max_bytes)
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise PathError(
            what, p, f"is not valid UTF-8 at byte {e.start + skip}; save the file as UTF-8"
        ) from None


# a JSON string, escapes included; possessive, so a long string costs no backtracking
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deeply JSON text nests arrays and objects, by a scan that parses nothing (brackets
    inside strings do not count), so that it is safe on input that ``json.loads`` would
    recurse on until RecursionError."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def read_bounded_json(
    p: str | os.PathLike[str], *, what: str, max_bytes: int, max_depth: int = 64
) -> Any:
    """A JSON file read with ``read_bounded_text``, its nesting depth checked (``json_depth``)
    before ``json.loads``. Raises PathError naming ``what``: too big, too deep, not UTF-8, not
    JSON (with the line and column)."""
    text = read_bounded_text(p, what=what, max_bytes=max_bytes)
    depth = json_depth(text)
    if depth > max_depth:
        raise PathError(
            what, p, f"nests {depth} levels deep; the limit is {max_depth}. Check the file"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PathError(
            what, p, f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:  # pragma: no cover - json_depth bounds the depth first
        raise PathError(what, p, "is not valid JSON: nested too deeply") from None
