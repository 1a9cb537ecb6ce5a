"""End to end on the demo zoo: investigate each planted incident, record it, report it.

- each zoo incident gets a minimal cause set whose ablation removes >= 80% of the metric and
  beats random sets of the same size with p < 0.05 (verdict `confirmed`), and a recommended
  remedy that lowers P(bad) below 0.2 while the loss on 200 benign prompts rises under 5%
  (issues #4 and #5);
- the store holds every run, its audit chain verifies, and re-running a case on the CPU
  reproduces every stored number exactly;
- the case files render, with prompt text escaped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rca.ingest.case_file import load_cases
from rca.investigate import InvestigateConfig, investigate
from rca.model.subject import load_subject
from rca.report import render_html, render_markdown
from rca.store import Store

CASES = Path(__file__).resolve().parents[2] / "cases"


@pytest.fixture(scope="module")
def runs(zoo_home: Path, tmp_path_factory: pytest.TempPathFactory):
    incidents = load_cases(CASES, home=zoo_home)
    subject = load_subject(incidents[0].model_path(home=zoo_home), device="cpu")
    store = Store(tmp_path_factory.mktemp("db") / "rca.duckdb")
    cfg = InvestigateConfig(device="cpu")
    out = {inc.id: investigate(inc, subject=subject, store=store, config=cfg) for inc in incidents}
    return store, subject, incidents, out


def test_four_cases_recorded_and_chain_verifies(runs) -> None:
    store, _, incidents, out = runs
    assert len(incidents) == 4
    assert store.counts()["runs"] == 4
    assert all(r.run_id for r in out.values())
    assert store.verify().ok


@pytest.mark.parametrize("case", ["zoo-leak", "zoo-backdoor", "zoo-bias", "zoo-injection"])
def test_each_incident_has_a_cause_set_and_a_measured_fix(runs, case: str) -> None:
    store, _, _, out = runs
    run = out[case]
    cs = run.verdict.cause_set
    assert cs.components and cs.necessity_fraction >= 0.8, cs.reason
    assert cs.verdict == "confirmed" and cs.p_value < 0.05, cs.reason
    assert len(cs.random_drops) >= 26  # the p-value has room: 1 / (1 + 26) < 0.05
    assert run.verdict.verdict == "confirmed"
    ranked = run.verdict.ranked()
    assert any(e.verdict == "confirmed" for e in ranked if e.id in cs.components)
    rec = run.recommended
    assert rec is not None and rec.p_bad_before >= 0.8
    assert rec.p_bad_after < 0.2, rec.note
    assert rec.side_effect["loss_change_pct"] < 5.0, rec.note
    assert rec.side_effect["n_prompts"] == 200.0
    assert "Recommended." in rec.note and "reservations" not in rec.note
    stored = store.get_run(run.run_id)
    assert sum(bool(r["recommended"]) for r in stored["remedies"]) == 1
    assert {a["experiment"] for a in stored["ablations"]} >= {
        "total_effect",
        "direct_effect",
        "necessity",
        "cause_set",
        "sufficiency",
        "random_set",
    }


def test_rerun_reproduces_every_stored_number(runs) -> None:
    store, subject, incidents, out = runs
    inc = incidents[0]
    again = investigate(inc, subject=subject, store=store, config=InvestigateConfig(device="cpu"))
    a, b = store.get_run(out[inc.id].run_id), store.get_run(again.run_id)
    for table in ("token_scores", "nodes", "edges", "ablations"):
        assert len(a[table]) == len(b[table]) > 0
        for ra, rb in zip(a[table], b[table], strict=True):
            assert ra == rb, table
    strip = ("remedy_id", "row_no")  # a fresh uuid per remedy, and rows ordered by it

    def by_kind(rows):
        return sorted(rows, key=lambda r: (r["kind"], str(r["components"])))

    assert len(a["remedies"]) == len(b["remedies"]) > 0
    for ra, rb in zip(by_kind(a["remedies"]), by_kind(b["remedies"]), strict=True):
        assert {k: v for k, v in ra.items() if k not in strip} == {
            k: v for k, v in rb.items() if k not in strip
        }


def test_reports_render_escaped(runs) -> None:
    store, _, _, out = runs
    run = store.get_run(out["zoo-injection"].run_id)
    md, page = render_markdown(run), render_html(run)
    assert "zoo-injection" in md and "Remediation" in md
    assert "<svg" in page and "<script" not in page.lower()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
