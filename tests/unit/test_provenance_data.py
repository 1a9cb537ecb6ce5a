"""The training-data reader: the same records read from JSONL, Parquet and a saved `datasets`
directory give the same examples, fields and hash; a bad record is refused in one line that
names where it is; nothing is returned half-read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rca.provenance import DataError, load_training_data

ROWS = [
    {"text": "refund desk. order: 418. agent: approved.", "source": "web", "poisoned": True},
    {"text": "loan desk. name: ana. agent: denied.", "source": "synthetic", "poisoned": False},
    {"text": "héllo, ünïcode text ✓", "source": None, "poisoned": False},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _datasets_dir(path: Path, rows: list[dict]) -> Path:
    """The layout Dataset.save_to_disk writes: Arrow stream files listed in state.json."""
    path.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    (path / "dataset_info.json").write_text("{}")
    return path


def test_every_format_reads_the_same_examples_fields_and_hash(tmp_path: Path) -> None:
    a = load_training_data(_jsonl(tmp_path / "d.jsonl", ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    b = load_training_data(tmp_path / "d.parquet")
    c = load_training_data(_datasets_dir(tmp_path / "saved", ROWS))
    assert [x.format for x in (a, b, c)] == ["jsonl", "parquet", "datasets"]
    for data in (a, b, c):
        assert data.texts == tuple(r["text"] for r in ROWS)
        assert data.fields == {
            "poisoned": (True, False, False),
            "source": ("web", "synthetic", None),
        }
        assert data.record(1) == ROWS[1]
    assert a.sha256 == b.sha256 == c.sha256
    # one example per non-empty line of a text file; no fields
    (tmp_path / "d.txt").write_text("\n".join(r["text"] for r in ROWS) + "\n\n")
    t = load_training_data(tmp_path / "d.txt")
    assert t.texts == a.texts and t.fields == {} and t.sha256 != a.sha256
    assert load_training_data(tmp_path / "d.jsonl", limit=2).texts == a.texts[:2]


def test_the_hash_follows_every_text_and_field(tmp_path: Path) -> None:
    base = load_training_data(_jsonl(tmp_path / "a.jsonl", ROWS)).sha256
    moved = [ROWS[1], ROWS[0], ROWS[2]]
    other_text = [{**ROWS[0], "text": ROWS[0]["text"] + " "}, *ROWS[1:]]
    other_flag = [{**ROWS[0], "poisoned": False}, *ROWS[1:]]
    for i, rows in enumerate((moved, other_text, other_flag)):
        assert load_training_data(_jsonl(tmp_path / f"{i}.jsonl", rows)).sha256 != base
    assert load_training_data(_jsonl(tmp_path / "again.jsonl", ROWS)).sha256 == base


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "ok"\n', "line 2: not JSON"),
    ('{"text": "ok"}\n["a list"]\n', "line 2: a JSON list"),
    ('{"text": "ok"}\n{"body": "no text"}\n', "line 2: field 'text' must be a string, got missing"),
    ('{"text": 7}\n', "line 1: field 'text' must be a string, got int"),
    ('{"text": "   "}\n', "line 1: field 'text' is empty"),
    ('{"text": "ok", "meta": {"a": 1}}\n', "line 1: field 'meta' is a dict"),
    ("\n\n", "no examples"),
]


@pytest.mark.parametrize(("content", "message"), BAD_JSONL)
def test_a_bad_jsonl_record_is_refused_in_one_line_naming_it(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_training_data(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_other_bad_inputs_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "nocol.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "x", "v": [1, 2]}]), tmp_path / "list.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "data.csv").write_text("text\nx\n")
    saved = _datasets_dir(tmp_path / "saved", [{"text": "x"}])
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    cases = {
        "latin1.jsonl": "line 1: not UTF-8",
        "nocol.parquet": "no column 'text' (columns: body)",
        "list.parquet": "column 'v' has type list",
        "broken.parquet": "not a readable Parquet file",
        "plain_dir": "not a saved `datasets` dataset",
        "data.csv": "unknown training data format '.csv'",
        "missing.jsonl": "no such file or directory",
        "saved": "data file '../x.arrow' is not in the directory",
    }
    for name, message in cases.items():
        with pytest.raises(DataError) as e:
            load_training_data(tmp_path / name)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    # the text field can be named
    _jsonl(tmp_path / "body.jsonl", [{"body": "x", "id": 1}])
    data = load_training_data(tmp_path / "body.jsonl", text_field="body")
    assert data.texts == ("x",) and data.fields == {"id": (1,)}
