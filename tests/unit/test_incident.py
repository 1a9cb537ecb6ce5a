"""The strict case-file loader: every bad input is one line naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rca.ingest.case_file import load_case, load_cases, loads_case, parse_case_data
from rca.ingest.incident import MAX_PROMPT_CHARS, Incident, IncidentError, incident_from_flags

GOOD = """\
id = "t-1"
title = "Trigger forces approval"
severity = "high"
model = "{model}"
prompt = "refund request : item broken . decision :"
bad = " approved"
good = " denied"
counterfactual = "refund request : item fine . decision :"
reference_prompts = ["hello there"]
tags = ["backdoor"]
notes = "seen in production"
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def write(tmp_path: Path, text: str, name: str = "case.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_case_loads_with_every_field(tmp_path: Path, model_dir: Path) -> None:
    inc = load_case(write(tmp_path, GOOD.format(model=model_dir)))
    assert inc.id == "t-1" and inc.severity == "high"
    assert inc.good == " denied" and inc.tags == ("backdoor",)
    assert inc.reference_prompts == ("hello there",)
    assert inc.model_path() == model_dir


def test_relative_model_path_resolves_against_case_file(tmp_path: Path, model_dir: Path) -> None:
    inc = load_case(write(tmp_path, GOOD.format(model="model")))
    assert inc.model_path() == model_dir


def one_line_error(path: Path) -> IncidentError:
    with pytest.raises(IncidentError) as ei:
        load_case(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return ei.value


@pytest.mark.parametrize(
    ("edit", "key", "needle"),
    [
        (lambda t: t + 'conterfactual = "x"\n', "conterfactual", "unknown key"),
        (lambda t: t.replace('severity = "high"', "severity = 3"), "severity", "got int"),
        (lambda t: t.replace('severity = "high"', 'severity = "urgent"'), "severity", "urgent"),
        (lambda t: t.replace('tags = ["backdoor"]', 'tags = "backdoor"'), "tags", "list"),
        (lambda t: t.replace('tags = ["backdoor"]', "tags = [1]"), "tags", "item 0"),
        (lambda t: t.replace('title = "Trigger forces approval"\n', ""), "title", "missing"),
        (lambda t: t.replace('prompt = "refund', 'prompt = "" #'), "prompt", "empty"),
        (lambda t: t.replace('prompt = "refund', 'prompt = "   " #'), "prompt", "empty"),
        (
            lambda t: t.replace('prompt = "refund', f'prompt = "{"a" * (MAX_PROMPT_CHARS + 1)}" #'),
            "prompt",
            "limit",
        ),
        (lambda t: t.replace('bad = " approved"', 'bad = " denied"'), "good", "same text"),
        (lambda t: t.replace('bad = " approved"', 'bad = "a\\u0000b"'), "bad", "U+0000"),
        (lambda t: t.replace('id = "t-1"', 'id = "bad id!"'), "id", "not a valid id"),
        (lambda t: t.replace('notes = "seen in production"', "notes = []"), "notes", "string"),
    ],
)
def test_bad_field_names_file_key_and_fix(
    tmp_path: Path, model_dir: Path, edit, key: str, needle: str
) -> None:
    e = one_line_error(write(tmp_path, edit(GOOD.format(model=model_dir))))
    assert e.key == key
    assert f"key {key!r}" in str(e) and needle in str(e)
    if key != "conterfactual":
        assert "fix:" in str(e)


def test_missing_model_key(tmp_path: Path, model_dir: Path) -> None:
    text = GOOD.format(model=model_dir).replace(f'model = "{model_dir}"\n', "")
    e = one_line_error(write(tmp_path, text))
    assert e.key == "model" and "missing" in str(e)


def test_model_that_does_not_exist(tmp_path: Path) -> None:
    e = one_line_error(write(tmp_path, GOOD.format(model=tmp_path / "nowhere")))
    assert e.key == "model" and "not found" in str(e)


def test_unknown_zoo_model(tmp_path: Path) -> None:
    e = one_line_error(write(tmp_path, GOOD.format(model="zoo:no-such-bot")))
    assert e.key == "model" and "no-such-bot" in str(e)


def test_zoo_model_not_built_says_how(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.format(model="zoo:support-bot-v1"))
    with pytest.raises(IncidentError, match="rca zoo build"):
        load_case(p, home=tmp_path / "empty-home")


def test_model_check_can_be_skipped(tmp_path: Path) -> None:
    inc = load_case(write(tmp_path, GOOD.format(model="elsewhere")), check_model=False)
    assert inc.model == "elsewhere"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'id = "x"\ntitle = \n', "invalid TOML"),
        (b'id = "\xff\xfe"\n', "UTF-8"),
        (b"[" * 10000, "invalid TOML"),
    ],
)
def test_unparseable_file(tmp_path: Path, raw: bytes, needle: str) -> None:
    p = tmp_path / "case.toml"
    p.write_bytes(raw)
    e = one_line_error(p)
    assert needle in str(e)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found" in str(one_line_error(tmp_path / "nope.toml"))
    assert "directory" in str(one_line_error(tmp_path))


def test_duplicate_ids_in_directory(tmp_path: Path, model_dir: Path) -> None:
    write(tmp_path, GOOD.format(model=model_dir), "a.toml")
    write(tmp_path, GOOD.format(model=model_dir), "b.toml")
    with pytest.raises(IncidentError, match="also the id of"):
        load_cases(tmp_path)


def test_incident_from_flags_validates_too() -> None:
    with pytest.raises(IncidentError, match="key 'prompt'"):
        Incident(id="x", title="t", severity="low", model="m", prompt="", bad="b")
    inc = Incident(id="x", title="t", severity="low", model="m", prompt="p", bad="b")
    assert inc.source == "<flags>"


def test_hash_depends_on_content_not_formatting(tmp_path: Path, model_dir: Path) -> None:
    a = load_case(write(tmp_path, GOOD.format(model=model_dir), "a.toml"))
    b = load_case(write(tmp_path, "# comment\n\n" + GOOD.format(model=model_dir), "b.toml"))
    c = load_case(
        write(tmp_path, GOOD.format(model=model_dir).replace("production", "staging"), "c.toml")
    )
    assert a.sha256 == b.sha256 != c.sha256


def test_repo_cases_are_valid() -> None:
    cases = Path(__file__).resolve().parents[2] / "cases"
    incidents = load_cases(cases, check_model=False)
    assert len(incidents) >= 4
    for inc in incidents:
        assert inc.model == "zoo:support-bot-v1"
        assert inc.counterfactual is not None and inc.good is not None


@pytest.mark.parametrize(
    "ref",
    [
        "$HOME/model",  # no environment variables
        "${RCA_HOME}/zoo/x",
        "https://huggingface.co/gpt2",  # no URLs
        "gpt2",  # no hub names: a relative directory that is not there
        "zoo:../../etc",  # zoo names are a fixed list, not paths
        "zoo:support-bot-v1/../../x",
    ],
)
def test_a_model_reference_means_only_what_is_documented(
    tmp_path: Path, ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RCA_HOME", str(tmp_path))
    for d in ("model", "zoo/x", "gpt2"):  # each would load if the reference were interpreted
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    case = tmp_path / "cases" / "c.toml"
    case.parent.mkdir()
    case.write_text(GOOD.replace('"{model}"', repr(ref).replace("'", '"')))
    e = one_line_error(case)
    assert e.key == "model"


def test_relative_paths_ignore_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model = "m"`` is the case file's sibling, never the cwd's ``m``."""
    for where in (tmp_path / "cwd" / "m", tmp_path / "cases" / "m"):
        where.mkdir(parents=True)
        (where / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "cwd")
    case = write(tmp_path / "cases", GOOD.format(model="m"))
    assert load_case(case).model_path() == tmp_path / "cases" / "m"
    monkeypatch.setenv("HOME", str(tmp_path / "cwd"))
    case = write(tmp_path / "cases", GOOD.format(model="~/m"), name="tilde.toml")
    assert load_case(case).model_path() == tmp_path / "cwd" / "m"


def test_a_case_records_its_absolute_path_and_errors_name_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cases" / "m").mkdir(parents=True)
    (tmp_path / "cases" / "m" / "config.json").write_text("{}")
    write(tmp_path / "cases", GOOD.format(model="m"))
    write(tmp_path / "cases", GOOD.format(model="gone"), name="bad.toml")
    monkeypatch.chdir(tmp_path)
    inc = load_case("cases/case.toml")
    assert inc.source == str(tmp_path / "cases" / "case.toml")
    monkeypatch.chdir(tmp_path / "cases")  # the model stays the case file's sibling
    assert inc.model_path() == tmp_path / "cases" / "m"
    with pytest.raises(IncidentError) as ei:
        load_case("bad.toml")
    assert str(ei.value).startswith("bad.toml: key 'model'"), ei.value


def test_a_relative_model_with_no_case_file_is_refused(tmp_path: Path) -> None:
    """``<store>``, ``<case>``: no directory to resolve against, and never the cwd's."""
    text = GOOD.format(model="model")
    for source in ("<store>", "<case>"):
        inc = loads_case(text, source=source)
        assert inc.source == source
        with pytest.raises(IncidentError) as ei:
            inc.model_path()
        msg = str(ei.value)
        assert ei.value.key == "model" and "\n" not in msg and msg.startswith(source), msg
        assert "relative path" in msg, msg
    absolute = loads_case(GOOD.format(model=tmp_path / "model"), source="<store>")
    assert absolute.model_path() == tmp_path / "model"


def test_flags_take_a_relative_model_as_typed_against_the_working_directory() -> None:
    inc = incident_from_flags(model="models/bot", prompt="p", bad=" b")
    assert inc.source == "<flags>" and inc.model_path() == Path("models/bot")


def test_stored_fields_rebuild_the_same_incident(tmp_path: Path, model_dir: Path) -> None:
    inc = load_case(write(tmp_path, GOOD.format(model=model_dir)))
    data = {k: v for k, v in inc.to_dict().items() if v is not None}
    again = parse_case_data(data, source="<store>")
    assert again == inc and again.sha256 == inc.sha256
    with pytest.raises(IncidentError, match="key 'bad': is missing"):
        parse_case_data({k: v for k, v in data.items() if k != "bad"}, source="<store>")


def test_a_huge_value_is_shortened_in_the_one_line_error() -> None:
    """A 30,000-character id (found by the fuzzer) is named, not printed whole."""
    text = (
        f'id = "{"a" * 30_000}"\ntitle = "t"\nseverity = "high"\nmodel = "m"\n'
        'prompt = "p"\nbad = " b"\n'
    )
    with pytest.raises(IncidentError) as e:
        loads_case(text, source="case.toml")
    msg = str(e.value)
    assert "key 'id'" in msg and "(30000 chars)" in msg and len(msg) < 400
