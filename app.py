"""rca workbench (Streamlit). A minimal page until the app issue lands: `streamlit run app.py`."""

from __future__ import annotations

import streamlit as st

import rca
from rca import zoo

st.set_page_config(page_title="rca workbench", layout="wide")
st.title("rca: incident root-cause analysis")
st.caption(f"version {rca.__version__}")
st.write(
    "The case store and investigation pages are not built yet. From a terminal: "
    "`rca zoo build` trains the demo models, `rca demo` shows their planted incidents."
)
rows = [{"model": e.name, "built": e.built, "path": str(e.path)} for e in zoo.list_models()]
st.subheader("Demo models")
st.dataframe(rows, hide_index=True)
