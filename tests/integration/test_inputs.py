"""Hostile and broken incident texts, from a case file or from command-line flags.

Each must end as one line on stderr, exit code 2, naming the field and the fix: empty texts,
texts longer than the model's context, invalid UTF-8 (in a file and in argv), control
characters, continuations the tokenizer cannot encode, and memory budgets nothing fits.
The flags path must otherwise give the same analysis as a case file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rca.ingest.incident import IncidentError, incident_from_flags
from rca.model.subject import load_subject
from tests.helpers import assert_one_line_error as one_line_error
from tests.helpers import rca_cli as rca
from tests.helpers import save_model_dir, tiny_model, words

N_CTX = 32
PROMPT = words(1, 2, 3, 4, 5, 6, 7, 8)
CF = words(1, 2, 3, 40, 5, 6, 7, 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inputs") / "m"
    return save_model_dir(d, tiny_model("gpt2", seed=3, n_positions=N_CTX))


def flags(model_dir: Path, **over: str) -> list[str]:
    base = {"--model": str(model_dir), "--prompt": PROMPT, "--bad": " w9", "--good": " w10"}
    base.update(over)
    out: list[str] = []
    for k, v in base.items():
        out += [k, v]
    return out


def test_flags_give_the_same_trace_as_a_case_file(model_dir: Path, tmp_path: Path) -> None:
    case = tmp_path / "c.toml"
    case.write_text(
        f'id = "c"\ntitle = "t"\nseverity = "low"\nmodel = "{model_dir}"\nprompt = "{PROMPT}"\n'
        f'bad = " w9"\ngood = " w10"\ncounterfactual = "{CF}"\n'
    )
    code, out, err = rca("trace", str(case), "--json", "--graph", str(tmp_path / "a.json"))
    assert code == 0, err
    from_file = json.loads(out)
    args = flags(model_dir, **{"--counterfactual": CF})
    code, out, err = rca("trace", *args, "--json", "--graph", str(tmp_path / "b.json"))
    assert code == 0, err
    from_flags = json.loads(out)
    assert from_flags["case_id"].startswith("adhoc-")
    assert from_flags["components"] == from_file["components"]
    assert from_flags["metric"] == from_file["metric"]
    # the same flags name the same case: a re-run lands on the same case id in the store
    code, out, _ = rca("trace", *args, "--json", "--graph", str(tmp_path / "c.json"))
    assert json.loads(out)["case_id"] == from_flags["case_id"]


def test_prompt_file_reads_utf8(model_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "prompt.txt"
    p.write_text(PROMPT)
    args = flags(model_dir)
    i = args.index("--prompt")
    args[i : i + 2] = ["--prompt-file", str(p)]
    code, out, err = rca("trace", *args, "--json", "--graph", str(tmp_path / "g.json"))
    assert code == 0, err
    assert json.loads(out)["tokens"][1]["token"] == "w1"


@pytest.mark.parametrize(
    ("over", "needles"),
    [
        ({"--prompt": ""}, ["'prompt'", "must not be empty"]),
        ({"--prompt": "   \n "}, ["'prompt'", "must not be empty"]),
        ({"--bad": ""}, ["'bad'", "must not be empty"]),
        ({"--prompt": PROMPT + " \x07"}, ["'prompt'", "control character U+0007"]),
        ({"--good": " w9\x1b[2J"}, ["'good'", "control character U+001B"]),
        ({"--bad": " \u0085w9"}, ["'bad'", "control character U+0085"]),
        ({"--prompt": PROMPT + " \udcff"}, ["'prompt'", "not valid UTF-8 (byte 0xFF"]),
        ({"--bad": " zebra"}, ["'bad'", "cannot encode"]),
        ({"--good": " w9"}, ["'good'", "same text as bad"]),
        ({"--prompt": words(*range(40))}, ["'prompt'", f"the model's context is {N_CTX}"]),
        (
            {"--counterfactual": words(*range(40))},
            ["'counterfactual'", f"the model's context is {N_CTX}"],
        ),
        (
            {"--reference": words(*range(33))},
            ["'reference_prompts'", "item 0 is", f"context is {N_CTX}"],
        ),
        ({"--max-memory": "1M"}, ["needs about", "--max-memory"]),
        ({"--max-memory": "banana"}, ["--max-memory", "e.g. 4G"]),
    ],
)
def test_bad_texts_are_one_line_errors(
    model_dir: Path, tmp_path: Path, over: dict[str, str], needles: list[str]
) -> None:
    code, _, err = rca("trace", *flags(model_dir, **over), "--graph", str(tmp_path / "g.json"))
    one_line_error(code, err, *needles)


def test_invalid_utf8_in_argv_from_a_real_shell(model_dir: Path) -> None:
    """Bytes that are not UTF-8 reach Python as lone surrogates; they are named, not crashed on."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rca",
            "trace",
            "--model",
            str(model_dir),
            "--prompt",
            b"w1 w2 \xff\xfe w3",
            "--bad",
            " w9",
        ],
        capture_output=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
    )
    err = r.stderr.decode("utf-8", "replace")
    one_line_error(r.returncode, err, "'prompt'", "not valid UTF-8 (byte 0xFF")


def test_prompt_file_that_is_not_utf8(model_dir: Path, tmp_path: Path) -> None:
    p = tmp_path / "latin1.txt"
    p.write_bytes("w1 w2 café".encode("latin-1"))
    code, _, err = rca("trace", "--model", str(model_dir), "--prompt-file", str(p), "--bad", " w9")
    one_line_error(code, err, str(p), "not valid UTF-8 at byte 9", "save the file as UTF-8")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt", PROMPT, "--bad", " w9"], "no --model"),
        (["--model", "M", "--bad", " w9"], "no --prompt"),
        (["--model", "M", "--prompt", PROMPT], "no --bad"),
    ],
)
def test_missing_flags_say_what_to_give(args: list[str], needle: str) -> None:
    code, _, err = rca("trace", *args)
    one_line_error(code, err, needle, "give a case file")


def test_a_case_file_and_flags_together_are_refused(tmp_path: Path) -> None:
    code, _, err = rca("trace", str(tmp_path / "x.toml"), "--prompt", PROMPT)
    one_line_error(code, err, "not both")


def test_library_checks_match_the_cli(model_dir: Path) -> None:
    s = load_subject(model_dir, device="cpu")
    assert s.adapter.n_ctx == N_CTX
    inc = incident_from_flags(model=str(model_dir), prompt=PROMPT, bad=" w9")
    assert inc.encode(s).n_prompt == 9  # <bos> and 8 words
    long = dataclasses.replace(inc, prompt=words(*range(31)))
    with pytest.raises(IncidentError, match="33 tokens; the model's context is 32"):
        long.encode(s)
    # at the limit exactly: 1 <bos> + 30 words + 1 continuation token = 32
    dataclasses.replace(inc, prompt=words(*range(30))).encode(s)


@pytest.mark.parametrize("payload", ["x' OR '1'='1", "'; DROP TABLE runs; --", 'a"b\\c'])
def test_quote_heavy_references_and_notes_on_the_command_line(tmp_path: Path, payload: str) -> None:
    from rca.store import IncidentRecord, ModelRecord, RunRecord, Store

    db = tmp_path / "rca.duckdb"
    s = Store(db)
    rid = s.record_run(
        RunRecord(
            incident=IncidentRecord.from_fields({"id": "case-1", "title": "t"}),
            model=ModelRecord("a" * 64),
            nodes=[{"node_id": "L0.H0", "score": 1.0}],
        )
    )
    code, _, err = rca("cases", "show", payload, "--db", str(db))
    one_line_error(code, err, "no run or case")
    code, out, err = rca(
        "notes", "add", rid, "--author", payload, "--text", payload, "--db", str(db)
    )
    assert code == 0, err
    code, out, err = rca("cases", "show", rid, "--db", str(db), "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert [(n["author"], n["text"]) for n in notes] == [(payload, payload)]
    assert rca("verify", "--db", str(db))[0] == 0
    assert Store.reader(db).counts()["runs"] == 1
