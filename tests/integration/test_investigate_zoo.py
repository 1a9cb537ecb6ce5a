"""End to end on the demo zoo: investigate each planted incident, record it, report it.

- each zoo incident gets a confirmed minimal cause set (p < 0.05 against random sets), and a
  recommended remedy that brings P(bad) under 0.2 at under 5% loss increase on the benign set;
- the store holds every run, its audit chain verifies, and re-running a case on the CPU
  reproduces every stored number exactly;
- the case files render, with prompt text escaped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rca.casefile import render_html, render_markdown
from rca.incident import load_cases
from rca.investigate import InvestigateConfig, investigate
from rca.store import Store
from rca.subject import load_subject

CASES = Path(__file__).resolve().parents[2] / "cases"


@pytest.fixture(scope="module")
def runs(zoo_home: Path, tmp_path_factory: pytest.TempPathFactory):
    incidents = load_cases(CASES, home=zoo_home)
    subject = load_subject(incidents[0].model_path(home=zoo_home), device="cpu")
    store = Store(tmp_path_factory.mktemp("db") / "rca.duckdb")
    cfg = InvestigateConfig(device="cpu")
    out = {
        inc.id: investigate(inc, subject=subject, store=store, config=cfg) for inc in incidents
    }
    return store, subject, incidents, out


def test_four_cases_recorded_and_chain_verifies(runs) -> None:
    store, _, incidents, out = runs
    assert len(incidents) == 4
    assert store.counts()["runs"] == 4
    assert all(r.run_id for r in out.values())
    assert store.verify().ok


@pytest.mark.parametrize("case", ["zoo-leak", "zoo-backdoor", "zoo-bias", "zoo-injection"])
def test_each_incident_has_a_confirmed_cause_and_a_fix(runs, case: str) -> None:
    _, _, _, out = runs
    run = out[case]
    cs = run.verdict.cause_set
    assert cs.verdict == "confirmed", cs.reason
    assert cs.p_value < 0.05
    assert any(c.verdict == "confirmed" for c in run.verdict.candidates)
    rec = run.recommended
    assert rec is not None
    assert rec.p_bad_before >= 0.8
    assert rec.p_bad_after < 0.2, rec.note
    assert rec.side_effect["loss_change_pct"] < 5.0, rec.note


def test_rerun_reproduces_every_stored_number(runs) -> None:
    store, subject, incidents, out = runs
    inc = incidents[0]
    again = investigate(inc, subject=subject, store=store, config=InvestigateConfig(device="cpu"))
    a, b = store.get_run(out[inc.id].run_id), store.get_run(again.run_id)
    for table in ("token_scores", "nodes", "edges", "ablations"):
        assert len(a[table]) == len(b[table]) > 0
        for ra, rb in zip(a[table], b[table], strict=True):
            assert ra == rb, table
    strip = ("remedy_id",)
    for ra, rb in zip(a["remedies"], b["remedies"], strict=True):
        assert {k: v for k, v in ra.items() if k not in strip} == {
            k: v for k, v in rb.items() if k not in strip
        }


def test_case_files_render_escaped(runs) -> None:
    store, _, _, out = runs
    run = store.get_run(out["zoo-injection"].run_id)
    md, page = render_markdown(run), render_html(run)
    assert "zoo-injection" in md and "Remediation" in md
    assert "<svg" in page and "<script" not in page.lower()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
