"""Training data for provenance: one reader for the formats a training set comes in, every
record checked before any work starts, and a content hash that keys whatever is computed from
the data.

Formats, told apart by the path:

- a ``.jsonl`` file: one JSON object per line, the example's text in ``text_field``;
- a ``.parquet`` file: a string column ``text_field``;
- a ``.txt`` file: one example per non-empty line;
- a directory written by ``datasets.Dataset.save_to_disk``: its Arrow files, in the order its
  ``state.json`` lists them (read with pyarrow; the ``datasets`` package is not needed).

Every other column (JSONL keys, Parquet and Arrow columns) is kept beside the text as a source
field: ``source`` and ``poisoned``, where the data has them, say where an example came from.
A bad record is refused with one line that names the file, the line or row, the field and the
fix (``DataError``); nothing is returned half-read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataError", "TrainingData", "load_training_data"]

# a field value kept beside the text must be one of these (a column of the results table)
_SCALARS = (str, int, float, bool, type(None))


class DataError(ValueError):
    """Training data that cannot be read as asked; the message is one line."""


@dataclass(frozen=True)
class TrainingData:
    """Examples in file order: ``texts[i]`` and, for each other field, ``fields[name][i]``.
    ``sha256`` hashes the texts and fields in order (the key of anything computed from them)."""

    path: str
    format: str
    text_field: str
    texts: tuple[str, ...]
    fields: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def record(self, i: int) -> dict[str, Any]:
        """Example ``i`` with its source fields, as the results show it."""
        return {self.text_field: self.texts[i], **{k: v[i] for k, v in self.fields.items()}}


def _hash(texts: Sequence[str], fields: dict[str, tuple[Any, ...]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(fields)).encode())
    for i, text in enumerate(texts):
        row = [text, *(fields[k][i] for k in sorted(fields))]
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _format(path: Path) -> str:
    if path.is_dir():
        if (path / "state.json").is_file():
            return "datasets"
        raise DataError(
            f"{path}: a directory that is not a saved `datasets` dataset (no state.json); "
            "give a .jsonl, .parquet or .txt file, or a directory from Dataset.save_to_disk"
        )
    suffix = path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
    if suffix not in by_suffix:
        raise DataError(
            f"{path}: unknown training data format {suffix or '(no suffix)'!r}; "
            "give a .jsonl, .parquet or .txt file, or a directory from Dataset.save_to_disk"
        )
    return by_suffix[suffix]


def _check_text(where: str, value: Any, text_field: str) -> str:
    if not isinstance(value, str):
        got = "missing" if value is None else type(value).__name__
        raise DataError(
            f"{where}: field {text_field!r} must be a string, got {got}; "
            "name the text field with --text-field"
        )
    if not value.strip():
        raise DataError(f"{where}: field {text_field!r} is empty; drop the record or fill it")
    return value


def _jsonl(path: Path, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            where = f"{path.name} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a JSON {type(obj).__name__}; one object per line")
            text = _check_text(where, obj.get(text_field), text_field)
            rest = {k: v for k, v in obj.items() if k != text_field}
            for k, v in rest.items():
                if not isinstance(v, _SCALARS):
                    raise DataError(
                        f"{where}: field {k!r} is a {type(v).__name__}; source fields are "
                        "strings, numbers, booleans or null"
                    )
            yield text, rest


def _txt(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path.name}: not UTF-8; re-encode the file as UTF-8") from None
    for line in lines:
        if line.strip():
            yield line, {}


def _table_rows(table: Any, name: str, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa

    if text_field not in table.column_names:
        raise DataError(
            f"{name}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
            "name the text column with --text-field"
        )
    others = [c for c in table.column_names if c != text_field]
    for c in others:
        t = table.schema.field(c).type
        if not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
            or pa.types.is_null(t)
        ):
            raise DataError(
                f"{name}: column {c!r} has type {t}; source columns are strings, numbers or "
                "booleans"
            )
    texts = table.column(text_field).to_pylist()
    cols = {c: table.column(c).to_pylist() for c in others}
    for i, text in enumerate(texts):
        yield _check_text(f"{name} row {i}", text, text_field), {c: cols[c][i] for c in others}


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise DataError(f"{path.name}: not a readable Parquet file ({type(e).__name__})") from None
    yield from _table_rows(table, path.name, text_field)


def _datasets(path: Path, text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{path.name}/state.json: not a `datasets` state file (no _data_files list); "
            "save the dataset with Dataset.save_to_disk"
        ) from None
    for name in files:
        arrow = (path / name).resolve()
        if arrow.parent != path.resolve() or not arrow.is_file():
            raise DataError(f"{path.name}/state.json: data file {name!r} is not in the directory")
        try:
            with pa.memory_map(str(arrow)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            raise DataError(f"{path.name}/{name}: not an Arrow stream file") from None
        yield from _table_rows(table, f"{path.name}/{name}", text_field)


def load_training_data(
    path: str | Path, *, text_field: str = "text", limit: int | None = None
) -> TrainingData:
    """Read and check training data at ``path`` (see the module docstring). ``limit``: the
    first ``limit`` examples only. DataError, one line, for anything that cannot be read."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; give the training data's path")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    fmt = _format(p)
    rows: Iterator[tuple[str, dict[str, Any]]]
    if fmt == "jsonl":
        rows = _jsonl(p, text_field)
    elif fmt == "txt":
        rows = _txt(p)
    elif fmt == "parquet":
        rows = _parquet(p, text_field)
    else:
        rows = _datasets(p, text_field)
    texts: list[str] = []
    extra: list[dict[str, Any]] = []
    for text, rest in rows:
        texts.append(text)
        extra.append(rest)
        if limit is not None and len(texts) == limit:
            break
    if not texts:
        raise DataError(f"{p}: no examples; the training data is empty")
    names = sorted({k for r in extra for k in r})
    fields = {k: tuple(r.get(k) for r in extra) for k in names}
    return TrainingData(
        path=str(p),
        format=fmt,
        text_field=text_field,
        texts=tuple(texts),
        fields=fields,
        sha256=_hash(texts, fields),
    )
