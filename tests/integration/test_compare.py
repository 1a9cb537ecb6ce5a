"""``rca compare`` on the zoo's two checkpoints: v2 was retrained after the backdoor's data fix
and kept the injection, so the backdoor is present on v1 only, and the injection on both, with
its circuit on each, the members only one of them uses, and the sources of the training tickets
that rank first; bad input is one line and loads nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rca.store import Store
from tests.helpers import assert_one_line_error
from tests.helpers import rca_cli_named as rca

CASES = Path(__file__).resolve().parents[2] / "cases"


@pytest.fixture(scope="module")
def compared(zoo_home: Path, zoo_models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("compare")
    cases = tmp / "cases"
    cases.mkdir()
    for name in ("backdoor.toml", "injection.toml"):
        shutil.copy(CASES / name, cases / name)
    db = tmp / "rca.duckdb"
    args = ["compare", "zoo:support-bot-v1", "zoo:support-bot-v2", "--cases", str(cases)]
    args += ["--limit", "1500", "--top", "30", "--db", str(db), "--json", "--home", str(zoo_home)]
    code, out, err = rca(*args)
    assert code == 0, err
    return {"db": db, "cases": cases, "home": zoo_home, "out": json.loads(out)}


def test_presence_circuits_and_sources_per_case(compared: dict) -> None:
    got = {c["case_id"]: c for c in compared["out"]["cases"]}
    backdoor, injection = got["zoo-backdoor"], got["zoo-injection"]
    # fixed in v2: present on v1 only, and only v1 is investigated
    assert backdoor["a"]["present"] and not backdoor["b"]["present"]
    assert backdoor["a"]["p_bad_prompt"] >= 0.5 > backdoor["b"]["p_bad_prompt"]
    assert backdoor["a"]["circuit"] and backdoor["b"]["run_id"] is None
    assert "not present" in backdoor["b"]["note"]
    # kept in v2: investigated on both, the circuits compared member by member
    a, b = injection["a"], injection["b"]
    assert a["present"] and b["present"] and a["circuit"] and b["circuit"]
    assert sorted(injection["shared"] + injection["only_a"]) == sorted(a["circuit"])
    assert sorted(injection["shared"] + injection["only_b"]) == sorted(b["circuit"])
    # the zoo's tickets come from one generator: every top-ranked ticket is the desks'
    assert a["top_sources"] == {"support-desk": 1.0} == a["data_sources"]
    runs = Store.reader(compared["db"]).list_runs()
    assert len(runs) == 3 and Store.reader(compared["db"]).verify().ok


def test_bad_input_is_one_line_and_loads_nothing(compared: dict, tmp_path: Path) -> None:
    base = ["compare", "--cases", str(compared["cases"]), "--home", str(compared["home"])]
    code, _, err = rca(*base, "zoo:support-bot-v1", "zoo:support-bot-v1")
    assert_one_line_error(code, err, "same model")
    code, _, err = rca(*base, "zoo:support-bot-v1", "zoo:nope")
    assert_one_line_error(code, err, "nope")
    code, _, err = rca(*base, "zoo:support-bot-v1", "zoo:support-bot-v2", "--top", "0")
    assert_one_line_error(code, err, "--top")
    code, _, err = rca(
        "compare", "zoo:support-bot-v1", "zoo:support-bot-v2", "--cases", str(tmp_path)
    )
    assert_one_line_error(code, err, "--cases")
