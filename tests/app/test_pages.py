"""Every workbench page under ``streamlit.testing.v1.AppTest``, against a database filled by the
demo: set the widgets, run, assert no exception and the expected content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from rca.store import Store
from tests.app.conftest import (
    APP,
    CASES,
    CHAT_CF_USER,
    CHAT_DECODING,
    CHAT_FOCUS,
    CHAT_SEEN,
    CHAT_SYSTEM,
    CHAT_USER,
    IMG,
    SCRIPT,
    XSS_CASE,
)

TIMEOUT = 120


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``app(db)``: an AppTest of app.py on ``db``, run once (on the Cases page)."""

    def make(db: Path) -> AppTest:
        monkeypatch.setenv("RCA_DB", str(db))
        monkeypatch.setenv("RCA_CASES", str(CASES))
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def goto(at: AppTest, page: str, **query: str) -> AppTest:
    at.query_params.update(query)
    at.switch_page(f"rca/ui/{page}.py").run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    """Everything the page wrote as text, one string (for `in` checks)."""
    parts: list[str] = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "text", "code",
                 "success", "info", "warning", "error", "metric"):  # fmt: skip
        for el in getattr(at, kind):
            parts.append(str(el.value))
            if kind == "metric":
                parts.append(str(el.label))
    return "\n".join(parts)


def table(el: Any) -> list[dict[str, Any]]:
    return el.value.to_dict("records")


def demo_run(db: Path, case: str, kind: str = "investigate") -> dict[str, Any]:
    return Store.reader(db).list_runs(incident=case, kind=kind)[0]


# ------------------------------------------------------------------------------------- empty


def test_no_database_shows_how_to_fill_one(app: Any, tmp_path: Path) -> None:
    at = app(tmp_path / "none.duckdb")
    assert at.title[0].value == "No case database yet"
    assert any("rca demo" in c.value for c in at.code)
    assert not (tmp_path / "none.duckdb").exists()  # reading never creates the file


# ------------------------------------------------------------------------------------- cases


def test_cases_table_filters_search_and_open(app: Any, demo_db: Path) -> None:
    at = app(demo_db)
    assert at.title[0].value == "Cases"
    rows = table(at.dataframe[0])
    assert len(rows) >= 8
    assert {r["case"] for r in rows} >= {"zoo-leak", "zoo-backdoor", "zoo-bias", "zoo-injection"}

    at.multiselect(key="cases_severity").set_value(["critical"]).run()
    rows = table(at.dataframe[0])
    assert rows and {r["severity"] for r in rows} == {"critical"}
    at.multiselect(key="cases_severity").set_value([])

    at.multiselect(key="cases_kind").set_value(["regress"]).run()
    rows = table(at.dataframe[0])
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"regress"}
    v2 = next(m for m in at.multiselect(key="cases_model").options if "support-bot-v2" in m)
    at.multiselect(key="cases_model").set_value([v2]).run()
    assert len(table(at.dataframe[0])) == 4
    at.multiselect(key="cases_kind").set_value([])
    at.multiselect(key="cases_model").set_value([])

    at.multiselect(key="cases_tag").set_value(["backdoor"]).run()
    assert {r["case"] for r in table(at.dataframe[0])} == {"zoo-backdoor"}
    at.multiselect(key="cases_tag").set_value([])
    at.multiselect(key="cases_status").set_value(["ok"]).run()
    assert {r["status"] for r in table(at.dataframe[0])} == {"ok"}

    at.text_input(key="cases_search").set_value("ZOO-BIAS").run()
    rows = table(at.dataframe[0])
    assert {r["case"] for r in rows} == {"zoo-bias"} and len(rows) == 2
    at.text_input(key="cases_search").set_value("PIN").run()  # the leak's prompt and title
    assert {r["case"] for r in table(at.dataframe[0])} == {"zoo-leak"}
    at.text_input(key="cases_search").set_value("no such thing").run()
    assert not at.exception and any(c.value.startswith("0 of") for c in at.caption)

    at.text_input(key="cases_search").set_value("zoo-bias").run()
    pick = at.selectbox(key="cases_open").value
    at.button(key="cases_open_button").click().run()
    assert not at.exception
    assert at.title[0].value.startswith("zoo\\-bias")
    assert at.selectbox(key="detail_run").value == pick


# ------------------------------------------------------------------------------- case detail


def test_case_detail_shows_the_evidence(app: Any, demo_db: Path) -> None:
    run = demo_run(demo_db, "zoo-leak")
    at = goto(app(demo_db), "case_detail", run=run["run_id"])
    page = texts(at)
    assert "Support bot reveals" in at.title[0].value
    for section in ("Incident", "Token attribution", "Circuit", "Ablations", "Remediation",
                    "Notes"):  # fmt: skip
        assert section in [h.value for h in at.subheader], section
    assert "account desk. request: pin. account: 7305. agent:" in page  # the prompt, as text
    html_blocks = [m.value for m in at.markdown if m.allow_html]
    assert any('class="rca-strip"' in b and "rca-tok" in b for b in html_blocks)
    # the circuit is drawn, with its roles; the full graph waits behind a toggle
    members = run["summary"]["circuit"]["members"]
    drawn = next(b for b in html_blocks if 'aria-label="circuit"' in b)
    assert all(m["id"] in drawn and m["role"] in drawn for m in members)
    # each at its positions, where it was resolved to some
    from rca.report import member_label

    assert all(member_label(m) in drawn for m in members)
    if run["summary"]["circuit"].get("entry_positions"):
        assert "The incident enters at position" in texts(at)
    assert not any('aria-label="attribution graph"' in b for b in html_blocks)
    at.toggle(key="full_graph").set_value(True).run()
    assert "Attribution graph" in [h.value for h in at.subheader]
    html_blocks = [m.value for m in at.markdown if m.allow_html]
    assert any('aria-label="attribution graph"' in b and "<circle" in b for b in html_blocks)

    # the node picker: ranked causes first; each node shows its edges and ablations
    nodes = at.selectbox(key="detail_node")
    cause = run["summary"]["cause_set"][0]
    assert cause in [o.split(" ")[0] for o in nodes.options[:5]]
    nodes.set_value(cause).run()
    page = texts(at)
    assert f"Ablation evidence for {cause}" in page.replace("\\", "")
    evidence = [r for df in at.dataframe for r in table(df) if r.get("experiment") == "necessity"]
    assert evidence and all(cause in r["components"] for r in evidence)
    assert len(at.get("vega_lite_chart")) >= 2  # random-set histogram, per candidate
    assert "random sets" in page

    remedies = next(table(df) for df in at.dataframe if "recommended" in df.value.columns)
    assert any(r["recommended"] for r in remedies)

    # notes: append-only, through the writer
    at.text_input(key="note_author").set_value("ana")
    at.text_area(key="note_text").set_value("PIN rotated <b>today</b>")
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert any("added" in s.value for s in at.success)
    assert at.text[-1].value == "PIN rotated <b>today</b>"  # listed, as text
    assert any("**ana**" in c.value for c in at.caption)
    notes = Store.reader(demo_db).get_run(run["run_id"])["notes"]
    assert (notes[-1]["author"], notes[-1]["text"]) == ("ana", "PIN rotated <b>today</b>")
    # an empty note is refused with a message, nothing written
    at.text_area(key="note_text").set_value("   ")
    at.form_submit_button[0].click().run()
    assert not at.exception and at.error and "non-empty" in at.error[0].value.replace("\\", "")
    assert len(Store.reader(demo_db).get_run(run["run_id"])["notes"]) == len(notes)


def test_case_detail_of_a_fixed_regression_run(app: Any, demo_db: Path) -> None:
    run = demo_run(demo_db, "zoo-leak", kind="regress")
    at = goto(app(demo_db), "case_detail", run=run["run_id"])
    assert "fixed" in [m.value for m in at.metric]
    assert "This run recorded no graph." in texts(at)


def test_case_detail_unknown_run_falls_back(app: Any, demo_db: Path) -> None:
    at = goto(app(demo_db), "case_detail", run="not-a-run")
    assert at.warning and "not in this database" in at.warning[0].value


# ------------------------------------------------------------------------------- regression


def test_regression_side_by_side(app: Any, demo_db: Path) -> None:
    at = goto(app(demo_db), "regression")
    case = at.selectbox(key="reg_case").value
    new = at.selectbox(key=f"reg_new_{case}").value
    ref = at.selectbox(key=f"reg_ref_{case}").value
    stored = Store.reader(demo_db).get_run(new)
    assert stored["kind"] == "regress" and stored["parent_run_id"] == ref
    assert stored["summary"]["classification"].startswith("persists")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["same mechanism"] == "yes"
    assert 0.0 <= float(metrics["cause-set Jaccard"]) <= 1.0
    assert [h.value for h in at.subheader][:2] == ["Reference", "New"]
    tops = [table(df) for df in at.dataframe if "rank" in df.value.columns]
    assert len(tops) == 2 and all(len(t) == 5 for t in tops)

    # a case the new model fixed: no mechanism to compare, still both sides shown
    at.selectbox(key="reg_case").set_value("zoo-leak").run()
    assert not at.exception
    assert any("cannot be compared" in i.value for i in at.info)
    assert "fixed" in [m.value for m in at.metric]
    # the same run twice
    same = at.selectbox(key="reg_ref_zoo-leak").value
    at.selectbox(key="reg_new_zoo-leak").set_value(same).run()
    assert any("two different runs" in i.value for i in at.info)


# ------------------------------------------------------------------------------------ audit


def test_audit_page(app: Any, demo_db: Path) -> None:
    at = goto(app(demo_db), "audit")
    assert at.success and "audit chain ok" in at.success[0].value
    models = table(at.dataframe[0])
    assert len(models) == 2 and all(len(m["fingerprint"]) == 64 for m in models)
    assert {Path(m["path"]).name for m in models} == {"support-bot-v1", "support-bot-v2"}


# --------------------------------------------------------------------------- new investigation


def test_new_investigation_records_a_run(
    app: Any, zoo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RCA_HOME", str(zoo_home))
    db = tmp_path / "rca.duckdb"
    at = goto(app(db), "new_investigation")  # no database yet: the page still opens
    at.selectbox(key="new_case_file").set_value(CASES / "bias.toml")
    at.selectbox(key="new_device").set_value("cpu")
    at.button(key="new_go").click().run(timeout=600)
    assert not at.exception, at.exception
    assert at.success and "Recorded run" in at.success[0].value
    runs = Store.reader(db).list_runs()
    assert [r["incident_id"] for r in runs] == ["zoo-bias"]
    assert runs[0]["device"] == "cpu"
    # the result appears under Cases
    at = app(db)
    assert at.title[0].value == "Cases"
    assert [r["case"] for r in table(at.dataframe[0])] == ["zoo-bias"]


def test_new_investigation_form_validates(app: Any, tmp_path: Path) -> None:
    at = goto(app(tmp_path / "rca.duckdb"), "new_investigation")
    at.radio(key="new_source").set_value("Form").run()
    assert at.button(key="new_go").disabled  # nothing filled in yet
    at.text_input(key="new_id").set_value("bad id!")
    at.text_input(key="new_title").set_value("t")
    at.text_area(key="new_prompt").set_value("p")
    at.text_input(key="new_bad").set_value(" b").run()
    assert not at.exception
    assert at.error and "not a valid id" in at.error[0].value
    at.text_input(key="new_id").set_value("ok-id").run()
    assert not at.error and not at.button(key="new_go").disabled
    assert not (tmp_path / "rca.duckdb").exists()


# ------------------------------------------------------------------------------- escaping


def test_script_and_img_payloads_render_as_text(app: Any, xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    for page in ("cases", "case_detail", "regression", "audit"):
        at = goto(app(db), page, run=run_id)
        for kind in ("title", "subheader", "markdown", "caption", "success", "info", "error"):
            for el in getattr(at, kind):
                low = str(el.value).lower()
                assert "<script" not in low and "<img" not in low, (page, kind, el.value)
                assert "](javascript" not in low, (page, kind, el.value)
        if page == "case_detail":
            page_text = texts(at)
            assert SCRIPT in page_text and IMG in page_text  # shown, as text
            assert "&lt;script&gt;" in at.title[0].value
            html_blocks = [m.value for m in at.markdown if m.allow_html]
            assert len(html_blocks) == 2  # the heat strip and the graph, both escaped
            escaped = "&lt;script&gt;window.__rca_xss = 1&lt;/script&gt;"
            assert any(escaped in b for b in html_blocks)
            assert f"note {SCRIPT} {IMG}" in [t.value for t in at.text]
        if page == "cases":
            assert table(at.dataframe[0])[0]["case"] == XSS_CASE


def assert_no_markup_from_payloads(at: AppTest) -> None:
    for kind in ("title", "subheader", "markdown", "caption", "success", "info", "error"):
        for el in getattr(at, kind):
            low = str(el.value).lower()
            assert "<script" not in low and "<img" not in low, (kind, el.value)
            assert "](javascript" not in low, (kind, el.value)


def test_a_chat_case_shows_its_turns_focus_and_greedy_decoding(
    app: Any, xss_chat_db: tuple[Path, str]
) -> None:
    db, run_id = xss_chat_db
    at = goto(app(db), "case_detail", run=run_id)
    assert_no_markup_from_payloads(at)
    assert len([m for m in at.markdown if m.allow_html]) == 2  # the heat strip and the graph
    # the conversation, then the counterfactual's: one chat message per turn, system apart
    chats = at.chat_message
    assert [c.name for c in chats] == ["system", "user", "system", "user"]
    assert [c.avatar for c in chats[:2]] == [":material/settings:", "user"]
    assert [c.code[0].value for c in chats] == [CHAT_SYSTEM, CHAT_USER, CHAT_SYSTEM, CHAT_CF_USER]
    assert chats[0].caption[0].value.startswith("system")
    seen = [e for e in at.expander if e.label.startswith("What the model saw")]
    assert [e.code[0].value for e in seen] == [
        CHAT_SEEN,
        CHAT_SEEN.replace(CHAT_USER, CHAT_CF_USER),
    ]
    codes = [c.value for c in at.code]
    assert CHAT_FOCUS in codes and CHAT_DECODING["greedy_text"] in codes
    # the greedy-decoding check
    assert "Greedy decoding" in [h.value for h in at.subheader]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["reproduces the bad continuation"] == "no"
    assert metrics["reproduces the focus"] == "yes"
    rows = next(table(df) for df in at.dataframe if "greedy token" in df.value.columns)
    assert [(r["token"], r["in focus"], r["greedy token"]) for r in rows] == [
        (" bad", False, " greedy"),
        (IMG, True, SCRIPT),
    ]

    # the Cases search reads a chat case's messages
    at = app(db)
    at.text_input(key="cases_search").set_value("WOMBAT").run()
    assert [r["case"] for r in table(at.dataframe[0])] == [XSS_CASE]
    at.text_input(key="cases_search").set_value("no such thing").run()
    assert not table(at.dataframe[0])


def test_a_run_without_decoding_has_no_such_section(app: Any, xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    at = goto(app(db), "case_detail", run=run_id)
    assert "Greedy decoding" not in [h.value for h in at.subheader]
    assert not at.chat_message
    assert not [e for e in at.expander if e.label.startswith("What the model saw")]
