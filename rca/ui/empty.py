"""Page shown while there is no database: how to fill one."""

from __future__ import annotations

import streamlit as st

from rca.ui import common


def main() -> None:
    db = common.db_path()
    st.title("No case database yet")
    st.markdown(
        f"The workbench reads the database that `RCA_DB` names, or `./rca.duckdb`; there is "
        f"nothing at **{common.md(db)}**. Fill it with the demo, which trains the demo models "
        "if needed, investigates their four planted incidents and checks the retrained model "
        "against them (a few minutes on a laptop CPU):"
    )
    st.code(f"rca demo --quick --db {db}", language="bash")
    st.markdown(
        "or investigate a case file of your own, from the terminal (`rca investigate "
        "CASE.toml --db ...`) or on the **New investigation** page. Then reload this page."
    )
    st.caption("To open another database: `RCA_DB=/path/to/rca.duckdb streamlit run app.py`.")


main()
