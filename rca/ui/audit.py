"""Audit: the hash chain's status (``verify``), the model fingerprints, rows per table and the
latest audit records."""

from __future__ import annotations

import streamlit as st

from rca.store import StoreError
from rca.ui import common


def main() -> None:
    st.title("Audit")
    store = common.reader()
    try:
        result = store.verify()
        models = store.models()
        counts = store.counts()
        recent = store.query(
            "SELECT seq, written_at, actor, action, table_name, entity, hash "
            "FROM audit ORDER BY seq DESC LIMIT ?",
            [50],
        )
    except StoreError as e:
        st.error(common.md(e))
        return
    if result.ok:
        st.success(f"Audit chain intact. {common.md(result)}")
    else:
        st.error(f"Audit chain broken. {common.md(result)}")
        st.dataframe(
            common.cell_rows(
                [
                    {"seq": p.seq, "table": p.table, "entity": p.entity, "problem": p.what}
                    for p in result.problems
                ]
            ),
            hide_index=True,
            width="stretch",
        )
    m1, m2, m3 = st.columns(3)
    m1.metric("audit records", result.records)
    m2.metric("entities checked", result.entities)
    m3.metric("head", result.head[:16])

    st.subheader("Models")
    st.caption("Every model seen, by the fingerprint of its weights and configuration.")
    st.dataframe(
        common.cell_rows(
            [
                {
                    "fingerprint": m["fingerprint"],
                    "path": m.get("path"),
                    "architecture": m.get("architecture"),
                    "parameters": m.get("n_params"),
                    "dims": m.get("dims"),
                    "first seen": m.get("first_seen"),
                    "runs": m.get("n_runs"),
                }
                for m in models
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    st.subheader("Rows per table")
    st.dataframe(
        [{"table": t, "rows": n} for t, n in counts.items()], hide_index=True, width="content"
    )
    st.subheader("Latest audit records")
    st.dataframe(
        recent.map(lambda v: common.plain(v) if isinstance(v, str) else v),
        hide_index=True,
        width="stretch",
    )


main()
