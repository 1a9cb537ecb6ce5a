"""Hostile paths, files and texts on the command line.

Every path a command takes is checked before any work starts: a name over 255 bytes, a parent
that is a file, a missing output directory, a directory where a file is written, a FIFO or a
device where a file is read. Case texts and notes refuse control, bidirectional and zero-width
characters; an id with a trailing newline is not an id; an empty case directory is not a pass;
integer options refuse values that mean nothing. Each is one ``error:`` line naming the flag or
key, exit code 2, and (where the command loads a model) before the model loads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error as one_line_error
from tests.helpers import rca_cli as rca
from tests.helpers import save_model_dir, tiny_model, words

N_CTX = 32
PROMPT = words(1, 2, 3, 4, 5, 6, 7, 8)
LONG = "a" * 300  # one name over NAME_MAX (255 bytes)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile") / "m"
    return save_model_dir(d, tiny_model("gpt2", seed=3, n_positions=N_CTX))


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding one run of case ``case-1``: (database, run id)."""
    from rca.store import IncidentRecord, ModelRecord, RunRecord, Store

    path = tmp_path_factory.mktemp("hostile_db") / "rca.duckdb"
    rid = Store(path).record_run(
        RunRecord(
            incident=IncidentRecord.from_fields({"id": "case-1", "title": "t"}),
            model=ModelRecord("a" * 64),
            nodes=[{"node_id": "L0.H0", "score": 1.0}],
        )
    )
    return path, rid


@pytest.fixture
def nothing_heavy_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every loader and long stage by one that records the call and fails: an error
    that comes after any of them came too late."""
    called: list[str] = []

    def boom(name: str) -> Callable[..., None]:
        def f(*a: object, **k: object) -> None:
            called.append(name)
            raise AssertionError(f"{name} ran before the error")

        return f

    for target in (
        "rca.model.subject.load_subject",
        "rca.remedy.apply_patch",
        "rca.regress.regress",
        "rca.bench.localization.run_localization",
        "rca.bench.localization.rescore",
        "rca.zoo.build",
    ):
        monkeypatch.setattr(target, boom(target))
    return called


def flags(model_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--prompt", PROMPT, "--bad", " w9", *extra]


def case_text(model: str, **over: str) -> str:
    fields = {
        "id": "c",
        "title": "t",
        "severity": "low",
        "model": model,
        "prompt": PROMPT,
        "bad": " w9",
        **over,
    }
    return "".join(f"{k} = {v if v.startswith('[') else _toml(v)}\n" for k, v in fields.items())


def _toml(s: str) -> str:
    out = ['"']
    for c in s:
        out.append(f"\\u{ord(c):04X}" if ord(c) < 0x20 or c in '"\\' or ord(c) > 0x7E else c)
    return "".join(out) + '"'


@contextlib.contextmanager
def fifo_writer(fifo: Path, text: str) -> Iterator[None]:
    """A writer that feeds ``text`` into ``fifo`` if a reader ever opens it, so that a reader
    that should have refused the FIFO reads a valid file instead of hanging the test."""
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                    return
                stop.wait(0.02)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


# ---------------------------------------------------------------------------- paths

# each row: (the command line, with {tmp} {model} {db} {run} {file} filled in; the needles)
PATH_ROWS = [
    (["check", "{tmp}/" + LONG + ".toml"], ["case file", "305 bytes", "at most 255"]),
    (["verify", "--db", "{tmp}/" + LONG], ["--db", "300 bytes"]),
    (["cases", "list", "--db", "{tmp}/" + LONG], ["--db", "300 bytes"]),
    (["cases", "show", "x", "--db", "{tmp}/" + LONG], ["--db", "300 bytes"]),
    (["inspect", "{tmp}/" + LONG], ["MODEL", "300 bytes"]),
    (["trace", "--model", "{tmp}/" + LONG, "--prompt", PROMPT, "--bad", " w9"], ["--model"]),
    (["trace", "{tmp}/" + LONG + ".toml"], ["305 bytes"]),
    (
        ["trace", "--model", "{model}", "--prompt-file", "{tmp}/" + LONG, "--bad", " w9"],
        ["key 'prompt'", "300 bytes"],
    ),  # fmt: skip
    (
        ["report", "{run}", "-o", "{tmp}/no/r.html", "--db", "{db}"],
        ["-o", "its directory", "does not exist"],
    ),  # fmt: skip
    (["report", "{run}", "-o", "{tmp}", "--db", "{db}"], ["-o", "is a directory"]),
    (["export", "{file}", "--db", "{db}"], ["DIRECTORY", "is a file, not a directory"]),
    (["export", "{tmp}/" + LONG, "--db", "{db}"], ["DIRECTORY", "300 bytes"]),
    (
        ["investigate", *flags(Path("{model}")), "--db", "{file}/x.duckdb"],
        ["--db", "is a file, not a directory"],
    ),  # fmt: skip
    (
        ["investigate", *flags(Path("{model}")), "--db", "{tmp}/" + LONG],
        ["--db", "300 bytes"],
    ),  # fmt: skip
    (
        ["trace", *flags(Path("{model}")), "--graph", "{tmp}/no/g.json"],
        ["--graph", "its directory", "does not exist"],
    ),  # fmt: skip
    (["trace", *flags(Path("{model}")), "--graph", "{file}/g.json"], ["--graph", "is a file"]),
    (["trace", *flags(Path("{model}")), "--graph", "{tmp}/g.txt"], ["--graph", ".graphml"]),
    (["trace", *flags(Path("{model}")), "--gguf-file", LONG + ".gguf"], ["--gguf-file"]),
    (["inspect", "{model}", "--home", "{file}"], ["--home", "not a directory"]),
    (
        ["regress", "--model", "{tmp}/" + LONG, "--from-db", "--db", "{tmp}/new.duckdb"],
        ["--model", "300 bytes"],
    ),  # fmt: skip
    (["cases", "list", "--db", "{tmp}/[/x]"], ["database", "[/x]", "does not exist"]),
    (["cases", "list", "--db", "{tmp}/[bold]x"], ["[bold]x"]),
    (
        ["regress", "--model", "{model}", "--from-db", "--db", "{db}", "--report", "{tmp}"],
        ["--report", "is a directory"],
    ),  # fmt: skip
    (["regress", "--model", "{model}", "--cases", "{file}"], ["--cases", "not a directory"]),
    (["apply-patch", "{tmp}/" + LONG, "--model", "{model}", "--out", "{tmp}/p"], ["SPEC"]),
    (
        ["apply-patch", "{file}", "--model", "{model}", "--out", "{file}"],
        ["--out", "not a directory"],
    ),  # fmt: skip
    (["bench", "localization", "--out", "{tmp}/no/b.json"], ["--out", "does not exist"]),
    (["bench", "localization", "--rescore", "{tmp}"], ["--rescore", "not a regular file"]),
    (["zoo", "fetch", "smollm2-135m", "--wheel", "{tmp}/" + LONG], ["--wheel", "300 bytes"]),
]


@pytest.mark.parametrize(("argv", "needles"), PATH_ROWS, ids=lambda x: None)
def test_a_path_that_cannot_work_is_one_line_before_anything_loads(
    argv: list[str],
    needles: list[str],
    model_dir: Path,
    db: tuple[Path, str],
    tmp_path: Path,
    nothing_heavy_runs: list[str],
) -> None:
    file = tmp_path / "plain"
    file.write_text("{}")
    fill = dict(tmp=str(tmp_path), model=str(model_dir), db=str(db[0]), run=db[1], file=str(file))
    code, _, err = rca(*(a.format(**fill) for a in argv))
    one_line_error(code, err, *needles)
    assert nothing_heavy_runs == []


def test_a_case_files_model_with_a_long_name_is_one_line(
    tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    case = tmp_path / "c.toml"
    case.write_text(case_text(str(tmp_path / LONG)))
    for argv in (["check", str(case)], ["trace", str(case)], ["check", str(case), "--load"]):
        code, _, err = rca(*argv)
        one_line_error(code, err, str(case), "key 'model'", "300 bytes", "at most 255")
    assert nothing_heavy_runs == []


def test_checked_paths_still_work(model_dir: Path, db: tuple[Path, str], tmp_path: Path) -> None:
    """The checks refuse what cannot work, and nothing else: report overwrites its -o, export
    writes into an existing directory, a new --db's directories are made."""
    out = tmp_path / "r.md"
    out.write_text("old")
    code, _, err = rca("report", db[1], "--format", "md", "-o", str(out), "--db", str(db[0]))
    assert code == 0, err
    assert out.read_text().startswith("# Case")
    code, stdout, err = rca("export", str(tmp_path), "--db", str(db[0]))
    assert code == 0 and "runs.parquet" in stdout, err
    code, _, err = rca("trace", *flags(model_dir), "--graph", str(tmp_path / "g.graphml"))
    assert code == 0, err
    assert (tmp_path / "g.graphml").is_file()


# ---------------------------------------------------------------------------- reads


def test_a_fifo_case_file_is_refused_without_blocking(
    model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    fifo = tmp_path / "case.toml"
    os.mkfifo(fifo)
    with fifo_writer(fifo, case_text(str(model_dir))):
        code, _, err = rca("check", str(fifo))
    one_line_error(code, err, "case file", "is a FIFO")
    # inside a directory of cases too
    with fifo_writer(fifo, case_text(str(model_dir))):
        code, _, err = rca("check", str(tmp_path))
    one_line_error(code, err, str(fifo), "is a FIFO")


@pytest.mark.parametrize("flag", ["--prompt-file", "--messages"])
def test_a_fifo_prompt_or_messages_file_is_refused_without_blocking(
    flag: str, model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    argv = ["trace", "--model", str(model_dir), "--bad", " w9", flag, str(fifo)]
    with fifo_writer(fifo, PROMPT if flag == "--prompt-file" else '[{"role": "user"}]'):
        code, _, err = rca(*argv)
    one_line_error(code, err, str(fifo), "is a FIFO")
    assert nothing_heavy_runs == []


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "/dev/null"],
        ["trace", "--model", "{model}", "--prompt-file", "/dev/null", "--bad", " w9"],
        ["trace", "--model", "{model}", "--messages", "/dev/null", "--bad", " w9"],
    ],
)
def test_a_device_is_not_a_file(
    argv: list[str], model_dir: Path, nothing_heavy_runs: list[str]
) -> None:
    """/dev/null: a device read as a file today gives an empty text; /dev/zero (the same
    check, tests/unit/test_paths.py) never ends."""
    code, _, err = rca(*(a.format(model=model_dir) for a in argv))
    one_line_error(code, err, "/dev/null", "character device")


def test_deep_messages_are_refused_by_the_scan(
    model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    msgs = tmp_path / "chat.json"
    msgs.write_text("[" * 20_000 + "]" * 20_000)
    code, _, err = rca("trace", "--model", str(model_dir), "--messages", str(msgs), "--bad", "x")
    one_line_error(code, err, str(msgs), "key 'messages'", "nests 20000 levels deep")


def test_a_case_file_with_a_byte_order_mark_is_read(model_dir: Path, tmp_path: Path) -> None:
    case = tmp_path / "c.toml"
    case.write_bytes(b"\xef\xbb\xbf" + case_text(str(model_dir)).encode())
    code, out, err = rca("check", str(case))
    assert code == 0, err
    assert out.split()[:2] == ["ok", "c"]


# ---------------------------------------------------------------------------- texts

TEXT_ROWS = [
    ({"id": "t1\n"}, ["key 'id'", "not a valid id"]),
    ({"id": "t1\r"}, ["key 'id'"]),
    ({"title": "refund \u202eeman"}, ["key 'title'", "bidirectional", "U+202E at 7"]),
    ({"prompt": PROMPT + " \u2066w9\u2069"}, ["key 'prompt'", "U+2066"]),
    ({"bad": " w9\u200b"}, ["key 'bad'", "zero-width character U+200B at 3"]),
    ({"good": " w\u200d10"}, ["key 'good'", "U+200D"]),
    ({"counterfactual": "\ufeff" + PROMPT}, ["key 'counterfactual'", "U+FEFF at 0"]),
    ({"notes": "see \u2060 here"}, ["key 'notes'", "U+2060"]),
    ({"tags": '["a\u202ab"]'}, ["key 'tags'", "U+202A"]),
    ({"reference_prompts": '["w1 \u200f"]'}, ["key 'reference_prompts'", "U+200F"]),
]


@pytest.mark.parametrize(("over", "needles"), TEXT_ROWS, ids=lambda x: None)
def test_hidden_characters_in_a_case_file_are_refused(
    over: dict[str, str], needles: list[str], tmp_path: Path
) -> None:
    case = tmp_path / "c.toml"
    case.write_text(case_text("zoo:support-bot-v1", **over), encoding="utf-8")
    code, _, err = rca("check", str(case), "--no-model")
    one_line_error(code, err, str(case), *needles)


def test_hidden_characters_in_messages_and_flags_are_refused(
    model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    msgs = tmp_path / "chat.json"
    msgs.write_text('[{"role": "user", "content": "w1 \\u202e w2"}]')
    code, _, err = rca("trace", "--model", str(model_dir), "--messages", str(msgs), "--bad", "x")
    one_line_error(code, err, "key 'messages'", "item 0 content", "U+202E")
    code, _, err = rca("trace", *flags(model_dir, "--good", " w1\u2067"))
    one_line_error(code, err, "key 'good'", "U+2067")
    code, _, err = rca("trace", *flags(model_dir, "--id", "t1\n"))
    one_line_error(code, err, "key 'id'")
    assert nothing_heavy_runs == []


@pytest.mark.parametrize(
    ("author", "text", "needles"),
    [
        ("ana", "ok \x1b]0;owned\x07", ["--text", "control character U+001B"]),
        ("ana", "ok \x1b[2J", ["--text", "U+001B"]),
        ("ana\x1b[31m", "ok", ["--author", "U+001B"]),
        ("ana\u202e", "ok", ["--author", "bidirectional", "U+202E"]),
        ("ana", "ok\u200b", ["--text", "zero-width"]),
        ("ana\nroot", "ok", ["--author", "one line"]),
        ("  ", "ok", ["--author", "empty"]),
    ],
)
def test_notes_refuse_hidden_characters(
    author: str, text: str, needles: list[str], db: tuple[Path, str]
) -> None:
    code, _, err = rca(
        "notes", "add", db[1], "--author", author, "--text", text, "--db", str(db[0])
    )
    one_line_error(code, err, *needles)
    code, out, _ = rca("cases", "show", db[1], "--db", str(db[0]), "--json")
    assert json.loads(out)["notes"] == []


# ---------------------------------------------------- empty case directories and integer options


@pytest.mark.parametrize("name", ["empty", "x.toml"])
def test_a_directory_without_case_files_is_not_a_pass(name: str, tmp_path: Path) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("not a case")
    code, _, err = rca("check", str(tmp_path / name), "--no-model")
    one_line_error(code, err, name, "no case files", "nothing was checked")


@pytest.mark.parametrize(
    "argv",
    [
        ["regress", "--model", "{model}", "--cases", "{tmp}", "--db", "{tmp}/r.duckdb"],
        ["demo", "--cases", "{tmp}", "--db", "{tmp}/r.duckdb", "--reports", "{tmp}/r"],
    ],
)
def test_regress_and_demo_refuse_an_empty_case_directory(
    argv: list[str], model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    code, _, err = rca(*(a.format(model=model_dir, tmp=tmp_path) for a in argv))
    one_line_error(code, err, "--cases", "nothing was checked")


INT_ROWS = [
    (["trace", "--top", "-5"], "--top must be at least 1, got -5"),
    (["trace", "--top", "0"], "--top must be at least 1"),
    (["trace", "--steps", "0"], "--steps must be at least 1"),
    (["confirm", "--top-k", "0"], "--top-k must be at least 1"),
    (["confirm", "--n-random", "10"], "--n-random must be at least 50"),
    (["confirm", "--seed", "-1"], "--seed must be at least 0"),
    (["investigate", "--seed", "-3"], "--seed must be at least 0"),
]


@pytest.mark.parametrize(("argv", "needle"), INT_ROWS, ids=lambda x: None)
def test_meaningless_numbers_are_refused_before_the_model_loads(
    argv: list[str], needle: str, model_dir: Path, tmp_path: Path, nothing_heavy_runs: list[str]
) -> None:
    extra = ["--db", str(tmp_path / "x.duckdb")] if argv[0] == "investigate" else []
    code, _, err = rca(*argv, *flags(model_dir), *extra)
    one_line_error(code, err, needle)
    assert nothing_heavy_runs == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "localization", "--faults", "0"], "--faults must be at least 1"),
        (["bench", "localization", "--threads", "0"], "--threads must be at least 1"),
        (["bench", "localization", "--seed", "-1"], "--seed must be at least 0"),
        (["regress", "--model", "{model}", "--from-db", "--workers", "-2"], "--workers"),
    ],
)
def test_meaningless_numbers_are_refused_before_the_work(
    argv: list[str], needle: str, model_dir: Path, nothing_heavy_runs: list[str]
) -> None:
    code, _, err = rca(*(a.format(model=model_dir) for a in argv))
    one_line_error(code, err, needle)
    assert nothing_heavy_runs == []


def test_a_bad_continuation_over_the_context_names_bad(model_dir: Path, tmp_path: Path) -> None:
    long_bad = " " + words(*range(40))
    code, _, err = rca(
        "trace", *flags(model_dir)[:-2], "--bad", long_bad, "--graph", str(tmp_path / "g.json")
    )
    one_line_error(code, err, "key 'bad'", "bad is 40 tokens", f"the model's context is {N_CTX}")
    assert "key 'prompt'" not in err
    # a long good continuation is named as good
    code, _, err = rca(
        "trace", *flags(model_dir), "--good", long_bad, "--graph", str(tmp_path / "g.json")
    )
    one_line_error(code, err, "key 'good'", "good is 40 tokens")
    # a long prompt is still the prompt's fault
    code, _, err = rca("trace", *flags(model_dir, "--prompt", words(*range(40))))
    one_line_error(code, err, "key 'prompt'", f"the model's context is {N_CTX}")
