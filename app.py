"""rca workbench: ``streamlit run app.py``.

Opens the case store that ``$RCA_DB`` names, or ``./rca.duckdb``; with no database there yet,
a page says how to fill one (``rca demo``). The pages are scripts under ``rca/ui/`` (see
``rca/ui/__init__.py``); docs/app.md walks through them.
"""

from __future__ import annotations

import streamlit as st

from rca.ui import common

st.set_page_config(page_title="rca workbench", page_icon=":material/troubleshoot:", layout="wide")

db = common.db_path()
P = common.PAGES
if db.is_file():
    pages: dict[str, list[st.Page]] | list[st.Page] = {
        "Cases": [
            st.Page(P["cases"], title="Cases", icon=":material/table_rows:", default=True),
            st.Page(P["case"], title="Case detail", icon=":material/biotech:"),
        ],
        "Work": [
            st.Page(P["new"], title="New investigation", icon=":material/play_arrow:"),
            st.Page(P["regression"], title="Regression", icon=":material/compare_arrows:"),
            st.Page(P["monitors"], title="Monitors", icon=":material/monitor_heart:"),
        ],
        "Records": [st.Page(P["audit"], title="Audit", icon=":material/verified_user:")],
    }
else:
    pages = [
        st.Page(P["empty"], title="Get started", icon=":material/rocket_launch:", default=True),
        st.Page(P["new"], title="New investigation", icon=":material/play_arrow:"),
    ]

st.sidebar.caption(f"database: {common.md(db)}")
st.navigation(pages).run()
