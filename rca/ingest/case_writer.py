"""Writing case files: ``case_toml`` (an incident as a case file's text, read back to check it)
and ``write_cases`` (one file per incident into a directory, all or none).

TOML is written here, without a dependency: every text an ``Incident`` accepts is a TOML basic
string as ``json.dumps`` writes it, with the characters that break or hide a line on a
reviewer's screen escaped.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rca.ingest.case_file import loads_case
from rca.ingest.incident import Incident
from rca.paths import PathError, output_path

__all__ = ["case_toml", "write_cases"]

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# characters a text may hold that break or hide a line on a reviewer's screen (line and
# paragraph separators, deprecated format characters, tag characters): written as escapes
_ESCAPED_RE = re.compile("[\u2028\u2029\u206a-\u206f\U000e0000-\U000e007f]")


def _escape(m: re.Match[str]) -> str:
    o = ord(m.group())
    return f"\\u{o:04X}" if o < 0x10000 else f"\\U{o:08X}"


_ORDER = (
    "id",
    "title",
    "severity",
    "model",
    "tags",
    "notes",
    "prompt",
    "messages",
    "bad",
    "focus",
    "good",
    "counterfactual",
    "counterfactual_messages",
    "reference_prompts",
)


def _key(k: str) -> str:
    return k if _BARE_KEY_RE.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    """A TOML value. A string is JSON-quoted: for a text without control characters (every
    text an Incident accepts), JSON's escapes are TOML's basic-string escapes."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} is not a TOML number rca writes")
        return repr(v)
    if isinstance(v, str):
        return _ESCAPED_RE.sub(_escape, json.dumps(v, ensure_ascii=False))
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        items = [_value(x) for x in v]
        inline = "[" + ", ".join(items) + "]"
        if len(inline) <= 80 and not any(isinstance(x, dict) for x in v):
            return inline
        return "[\n" + "".join(f"  {x},\n" for x in items) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _table(name: str, table: dict[str, Any], header: str) -> list[str]:
    lines = [header]
    subs = []
    for k, v in table.items():
        if isinstance(v, dict):
            subs.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in subs:
        lines += ["", *_table(f"{name}.{_key(k)}", v, f"[{name}.{_key(k)}]")]
    return lines


def case_toml(incident: Incident) -> str:
    """``incident`` as a case file's text, which ``loads_case`` reads back as an equal incident.

    Raises ValueError where it would not (an incident whose chat prompt is already rendered)."""
    data = {k: v for k, v in incident.to_dict().items() if v is not None}
    if not data.get("notes"):
        data.pop("notes", None)
    for key in ("tags", "reference_prompts"):
        if not data.get(key):
            data.pop(key, None)
    variants = data.pop("variants", [])
    tables = {k: data.pop(k) for k in ("split", "template") if k in data}
    ordered = [k for k in _ORDER if k in data] + [k for k in data if k not in _ORDER]
    lines = [f"{_key(k)} = {_value(data[k])}" for k in ordered]
    for name, table in tables.items():
        lines += ["", *_table(name, table, f"[{name}]")]
    for v in variants:
        lines += ["", *_table("variants", v, "[[variants]]")]
    text = "\n".join(lines) + "\n"
    back = loads_case(text, source="<ingest>")
    if back != incident:
        raise ValueError(f"case {incident.id!r} does not read back as written")
    return text


# --------------------------------------------------------------------------- writing files


def _missing_dirs(directory: Path) -> list[Path]:
    """The directories ``directory`` needs created, from the outermost in."""
    out = []
    d = directory.absolute()
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out[::-1]


def write_cases(
    incidents: Sequence[Incident], out_dir: str | Path, *, force: bool = False, what: str = "--out"
) -> list[Path]:
    """Write each incident to ``out_dir/<id>.toml``, all or none; the paths, in order.

    Every text is made (and read back) first; a file that exists is refused unless ``force``
    (``what`` names the option in the error). Each file is written under a temporary name in
    ``out_dir`` and the names are moved into place only once all are written: a failure
    before then removes the temporary files and any directory this call made. Without
    ``force`` a file is put in place by a hard link, which never replaces one that appeared
    meanwhile, and a failure then removes the files already placed. Raises PathError."""
    out = Path(out_dir)
    output_path(out, what=what, overwrite=True, kind="dir", parent_must_exist=False)
    ids = [inc.id for inc in incidents]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise ValueError(f"two cases have the id {dup!r}")
    texts = [case_toml(inc) for inc in incidents]
    targets = [out / f"{i}.toml" for i in ids]
    for t in targets:
        try:
            output_path(t, what=what, overwrite=force, parent_must_exist=False)
        except PathError as e:
            if "already exists" in e.problem:
                raise PathError(
                    what, t, "already exists; give --force to replace it, or another --out"
                ) from None
            raise
    made = _missing_dirs(out)
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for case_id, text in zip(ids, texts, strict=True):
            tmp = out / f".{case_id}.toml.{secrets.token_hex(4)}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, 0o666)
            temps.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in zip(temps, targets, strict=True):
            _place(tmp, target, force=force, what=what)
            placed.append(target)
    except BaseException as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if not force:
            for target in placed:  # new files: this call made them
                target.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, PathError):
            raise PathError(
                what,
                out,
                f"cannot be written: {e.strerror or type(e).__name__}; nothing was written",
            ) from None
        raise
    return targets


# what link(2) says on a file system without hard links (FAT: EPERM)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _place(tmp: Path, target: Path, *, force: bool, what: str) -> None:
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise PathError(
            what,
            target,
            "appeared while the cases were written; give --force to replace it; nothing was "
            "written",
        ) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS or os.path.lexists(target):
            raise
        # a file system without hard links: the check above is all there is
        os.replace(tmp, target)
        return
    tmp.unlink()
