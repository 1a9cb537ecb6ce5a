"""Cases: every recorded run, filtered by severity, status, model, tag and kind, and searched."""

from __future__ import annotations

import streamlit as st

from rca.store import StoreError
from rca.ui import common


def main() -> None:
    st.title("Cases")
    store = common.reader()
    try:
        runs, models = common.runs_and_models(store)
        incidents = store.list_incidents()
    except StoreError as e:
        st.error(common.md(e))
        return
    if not runs:
        st.info(
            "The database has no runs yet: run `rca demo`, `rca investigate CASE.toml`, or use "
            "the New investigation page."
        )
        return
    rows = common.run_rows(runs, incidents, models)

    search = st.text_input(
        "Search", key="cases_search", placeholder="case id, title, tag, prompt, run id ..."
    )
    c1, c2, c3, c4, c5 = st.columns(5)
    severity = c1.multiselect(
        "Severity",
        common.severity_order(r["severity"] for r in rows),
        format_func=common.plain,
        key="cases_severity",
    )
    status = c2.multiselect(
        "Status",
        sorted({str(r["status"]) for r in rows}),
        format_func=common.plain,
        key="cases_status",
    )
    model = c3.multiselect(
        "Model", sorted({r["model"] for r in rows}), format_func=common.plain, key="cases_model"
    )
    tag = c4.multiselect(
        "Tag",
        sorted({t for r in rows for t in r["tags"]}),
        format_func=common.plain,
        key="cases_tag",
    )
    kind = c5.multiselect(
        "Kind", sorted({str(r["kind"]) for r in rows}), format_func=common.plain, key="cases_kind"
    )
    shown = common.filter_rows(
        rows, severity=severity, status=status, model=model, tag=tag, kind=kind, search=search
    )
    n_cases = len({r["case"] for r in shown})
    st.caption(f"{len(shown)} of {len(rows)} runs, {n_cases} cases")
    table = common.cell_rows([{k: v for k, v in r.items() if k != "prompt"} for r in shown])
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            "p_bad": st.column_config.NumberColumn("P(bad)", format="%.3f"),
            "p_bad_after_fix": st.column_config.NumberColumn("P(bad) after fix", format="%.3f"),
            "recorded": st.column_config.DatetimeColumn("recorded", format="YYYY-MM-DD HH:mm"),
        },
    )
    if not shown:
        return
    by_id = {r["run_id"]: r for r in runs}
    labels = {r["run_id"]: common.run_label(by_id[r["run_id"]], models) for r in shown}
    pick = st.selectbox(
        "Open a run", list(labels), format_func=labels.__getitem__, key="cases_open"
    )
    if st.button("Open case", key="cases_open_button", type="primary"):
        st.session_state["rca_run"] = pick
        st.switch_page(common.PAGES["case"], query_params={"run": pick})


main()
