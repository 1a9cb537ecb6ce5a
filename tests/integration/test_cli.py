"""The command line, end to end on the quick zoo: demo, store commands, trace and confirm JSON.

The demo and ``rca confirm`` must reach the verdicts docs/confirm.md records for the quick zoo
("On the demo zoo, measured"): every incident confirmed, with its cause set, and the top cause
one of its members.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rca.cli import app
from tests.conftest import copy_demo_db

CASES = Path(__file__).resolve().parents[2] / "cases"
runner = CliRunner()

# each demo incident's cause set on the quick zoo (docs/confirm.md, docs/remedy.md)
CAUSE_SETS = {
    "zoo-leak": {"L1.H4"},
    "zoo-backdoor": {"L0.H0", "L0.H1"},
    "zoo-bias": {"L0.H0", "L0.H4"},
    "zoo-injection": {"L0.H0", "L0.H1", "L0.H4"},
}


def _documented(documented: set[str], found: list[str]) -> bool:
    """The documented cause set is the found one, or all of it with one more head: the quick
    zoo's weights depend on the CPU's float kernels, and on some CPUs a third head joins the
    bias's set (docs/confirm.md)."""
    extra = set(found) - documented
    return documented <= set(found) and len(extra) <= 1 and all(".H" in c for c in extra)


def rca(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def demo_db(demo_output: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The session's demo run (tests/conftest.py), on a private copy of its database."""
    rows = demo_output["json"]["cases"]
    assert sorted(r["case_id"] for r in rows) == [
        "zoo-backdoor",
        "zoo-bias",
        "zoo-injection",
        "zoo-leak",
    ]
    assert len(demo_output["json"]["regression"]) == 4
    db = copy_demo_db(demo_output, tmp_path_factory.mktemp("cli_demo") / "rca.duckdb")
    return db, demo_output["reports"]


def test_demo_fills_the_store_and_writes_reports(demo_db: tuple[Path, Path]) -> None:
    db, reports = demo_db
    code, out, _ = rca("cases", "list", "--db", str(db), "--json")
    assert code == 0
    assert len({r["incident_id"] for r in json.loads(out)}) == 4
    for case in ("zoo-leak", "zoo-backdoor", "zoo-bias", "zoo-injection"):
        page = (reports / f"{case}.html").read_text()
        assert "<svg" in page and "<script" not in page.lower()
        assert (reports / f"{case}.md").read_text().startswith("# Case")
    code, out, _ = rca("verify", "--db", str(db))
    assert code == 0 and "ok" in out
    # the demo ends with the regression check of support-bot-v2
    reg = (reports / "regression.md").read_text()
    # either persisting class for the bias: tests/integration/test_regress.py says why
    persists = ("persists_same_mechanism", "persists_new_mechanism")
    for case, classes in (
        ("zoo-leak", ("fixed",)),
        ("zoo-backdoor", ("fixed",)),
        ("zoo-bias", persists),
        ("zoo-injection", ("persists_same_mechanism",)),
    ):
        row = reg.split(f"| {case} | ")[1].split("\n")[0]
        assert any(f"**{cls}**" in row for cls in classes), row
    code, out, _ = rca("cases", "list", "--db", str(db), "--json")
    kinds = [r.get("kind") for r in json.loads(out)]
    assert kinds.count("regress") == 4 and kinds.count("investigate") == 4


def test_demo_confirms_each_incident_with_its_documented_cause_set(demo_output: dict) -> None:
    """``rca demo --json``: each case confirmed with its documented cause set, the top-ranked
    cause a member of it or a writer of the circuit that the set makes redundant (the leak's
    L1.H1, docs/confirm.md), and one recommended fix that brings P(bad) under 0.2."""
    rows = {r["case_id"]: r for r in demo_output["json"]["cases"]}
    assert set(rows) == set(CAUSE_SETS)
    for case, cause_set in CAUSE_SETS.items():
        r = rows[case]
        assert r["verdict"] == "confirmed", (case, r["causes"][:3])
        assert _documented(cause_set, r["cause_set"]), (case, r["cause_set"])
        top = r["causes"][0]
        writers = {m["id"] for m in r["circuit"]["members"] if m["role"] == "writer"}
        assert top["id"] in cause_set or (
            top["verdict"] == "inconclusive" and top["id"] in writers
        ), (case, top)
        assert r["p_bad"]["before"] >= 0.8 and r["p_bad"]["after_fix"] < 0.2, (case, r["p_bad"])
        assert sum(rem["recommended"] for rem in r["remedies"]) == 1, case


def test_notes_report_and_export(demo_db: tuple[Path, Path], tmp_path: Path) -> None:
    db, _ = demo_db
    code, out, err = rca("notes", "add", "zoo-bias", "--author", "ana", "--text", "<b>x</b>'; --",
                         "--db", str(db))  # fmt: skip
    assert code == 0, err
    code, out, _ = rca("cases", "show", "zoo-bias", "--db", str(db), "--json")
    assert any(n["text"] == "<b>x</b>'; --" for n in json.loads(out)["notes"])
    html_out = tmp_path / "bias.html"
    code, _, err = rca(
        "report", "zoo-bias", "--format", "html", "-o", str(html_out), "--db", str(db)
    )
    assert code == 0, err
    assert "&lt;b&gt;x&lt;/b&gt;" in html_out.read_text()
    code, out, _ = rca("export", str(tmp_path / "parquet"), "--db", str(db))
    assert code == 0 and "runs.parquet" in out
    code, _, _ = rca("verify", "--db", str(db))
    assert code == 0


def test_trace_json_shape(zoo_home: Path, tmp_path: Path) -> None:
    graph = tmp_path / "g.graphml"
    code, out, err = rca("trace", str(CASES / "backdoor.toml"), "--home", str(zoo_home),
                         "--device", "cpu", "--json", "--graph", str(graph))  # fmt: skip
    assert code == 0, err
    j = json.loads(out)
    assert {"tokens", "components", "edges", "counterfactual", "method"} <= set(j)
    assert {"position", "token", "score"} == set(j["tokens"][0])
    assert {"id", "kind", "layer", "score"} == set(j["components"][0])
    assert {"source", "target", "score"} == set(j["edges"][0])
    assert j["counterfactual"]["generated"] is False and j["method"] == "eap-ig"
    assert graph.read_text().startswith("<?xml")


def test_confirm_json_names_the_bias_cause_set(zoo_home: Path) -> None:
    code, out, err = rca("confirm", str(CASES / "bias.toml"), "--home", str(zoo_home),
                         "--device", "cpu", "--json", "--n-random", "50")  # fmt: skip
    assert code == 0, err
    j = json.loads(out)
    assert j["case_id"] == "zoo-bias" and j["verdict"] == "confirmed", j["cause_set"]["reason"]
    assert _documented(CAUSE_SETS["zoo-bias"], j["cause_set"]["components"])
    assert j["causes"][0]["rank"] == 1 and j["causes"][0]["id"] in CAUSE_SETS["zoo-bias"]
    assert j["cause_set"]["p_value"] < 0.05 and j["cause_set"]["necessity_fraction"] >= 0.8
    assert j["config"]["n_random"] == 50


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('id = "x"\ntitle = "t"\nseverity = "urgent"\n')
    code, out, err = rca("check", str(bad), "--no-model")
    assert code == 2
    assert err.strip().count("\n") == 0 and "key 'model'" in err and "Traceback" not in err
    code, _, err = rca("inspect", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


def test_bench_localization_refuses_unknown_hosts_and_kinds(tmp_path: Path) -> None:
    """Checked before anything is trained or planted: one line, exit 2."""
    for args, word in (
        (["--host", "nope"], "--host"),
        (["--kinds", "head,nope"], "--kinds"),
        (["--host", "bench", "--small"], "--host"),
        (["--host", "smollm2-135m", "--home", str(tmp_path)], "rca zoo fetch smollm2-135m"),
    ):
        code, _, err = rca("bench", "localization", *args)
        assert code == 2, (args, err)
        assert err.strip().count("\n") == 0 and word in err and "Traceback" not in err


def test_bench_localization_passes_its_options_to_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's options reach ``run_localization`` as typed arguments; ``--out`` gets the
    full result, ``--json`` the summary without the per-fault records."""
    from rca.bench import localization

    calls: list[tuple[tuple, dict]] = []
    summary = {"n_faults": 2, "ac1": 1.0, "seed": 7}

    def fake(*args: object, **kwargs: object) -> dict:
        calls.append((args, kwargs))
        return {**summary, "faults": [{"name": "f0"}, {"name": "f1"}]}

    monkeypatch.setattr(localization, "run_localization", fake)
    saved = tmp_path / "full.json"
    code, out, err = rca("bench", "localization", "--faults", "2", "--seed", "7", "--small",
                         "--kinds", "head,relay", "--no-exhaustive", "--threads", "2",
                         "--out", str(saved), "--home", str(tmp_path), "--json")  # fmt: skip
    assert code == 0, err
    [(args, kwargs)] = calls
    assert args == (2,)
    assert kwargs["seed"] == 7 and kwargs["hosts"] == "small" and kwargs["threads"] == 2
    assert kwargs["kinds"] == ["head", "relay"] and kwargs["exhaustive"] is False
    assert kwargs["home"] == tmp_path
    assert json.loads(out) == summary
    assert len(json.loads(saved.read_text())["faults"]) == 2


def test_bench_localization_rescore_prints_what_the_library_computes() -> None:
    """``--rescore`` on a saved run re-ranks its evidence exactly as ``rescore`` does."""
    from rca.bench.localization import rescore

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    saved = sorted(results.glob("localization-*-full.json"))[0]
    code, out, err = rca("bench", "localization", "--rescore", str(saved))
    assert code == 0, err
    assert json.loads(out) == rescore(json.loads(saved.read_text()))
