"""Regression: two runs of one case side by side (by default a regression run and the run it
re-checks): cause sets, top components, verdict and classification, scores, and how much the
two mechanisms overlap (``rca.regress.compare``: Jaccard of the cause sets and of the top
components, Spearman of the attribution scores)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import streamlit as st

from rca.regress import Mechanism, RegressConfig, compare
from rca.ui import common


def _defaults(runs: list[dict[str, Any]]) -> tuple[str, str]:
    """(reference, new): the newest regression run and its parent, else the two newest runs."""
    ids = [str(r["run_id"]) for r in runs]
    reg = next((r for r in runs if r.get("kind") == "regress" and r.get("parent_run_id")), None)
    if reg is not None and str(reg["parent_run_id"]) in ids:
        return str(reg["parent_run_id"]), str(reg["run_id"])
    return ids[min(1, len(ids) - 1)], ids[0]


def _column(run: Mapping[str, Any], mech: Mechanism, models: Mapping[str, str], k: int) -> None:
    s = common.summary(run)
    st.markdown(
        f"**{common.md(models.get(str(run['model_fingerprint']), run['model_fingerprint']))}**"
        f" · {common.md(run.get('kind'))} run `{str(run['run_id'])[:8]}`"
    )
    a, b = st.columns(2)
    a.metric("verdict", common.plain(s.get("verdict") or "-"))
    b.metric("classification", common.plain(s.get("classification") or "-"))
    c, d = st.columns(2)
    c.metric("P(bad)", common.fmt(s.get("p_bad_before"), ".3f"))
    d.metric("metric", common.fmt(s.get("metric_before")))
    st.markdown("**Cause set**")
    st.code(common.plain(", ".join(mech.cause_set) or "(none)"), language=None)
    st.markdown(f"**Top {k} components** by |attribution|")
    top = mech.top(k)
    if top:
        st.dataframe(
            common.cell_rows(
                [
                    {"rank": i + 1, "component": c, "score": mech.scores[c]}
                    for i, c in enumerate(top)
                ]
            ),
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("No attribution in this run (a run found fixed is not re-investigated).")
    reg = s.get("regress")
    if isinstance(reg, Mapping) and reg.get("reason"):
        st.markdown("**Regression check**")
        st.text(common.plain(reg["reason"]))


def main() -> None:
    st.title("Regression")
    store = common.reader()
    runs, models, error = common.runs_or_error(store)
    if error is not None:
        st.error(error)
        return
    cases = sorted({str(r["incident_id"]) for r in runs})
    if not cases:
        st.info("The database has no runs yet.")
        return
    # open on a case whose regression check found the incident persisting (two mechanisms to
    # compare), else on any case with a regression run
    regress = [r for r in runs if r.get("kind") == "regress"]
    persisting = [r for r in regress if common.summary(r).get("classification") != "fixed"]
    first = str((persisting or regress or runs)[0]["incident_id"])
    case = st.selectbox(
        "Case", cases, index=cases.index(first), format_func=common.plain, key="reg_case"
    )
    case_runs = [r for r in runs if r["incident_id"] == case]
    labels = {str(r["run_id"]): common.run_label(r, models) for r in case_runs}
    ids = list(labels)
    ref_default, new_default = _defaults(case_runs)
    left, right = st.columns(2)
    ref_id = left.selectbox(
        "Reference run",
        ids,
        index=ids.index(ref_default),
        format_func=labels.__getitem__,
        key=f"reg_ref_{case}",
    )
    new_id = right.selectbox(
        "New run",
        ids,
        index=ids.index(new_default),
        format_func=labels.__getitem__,
        key=f"reg_new_{case}",
    )
    if ref_id is None or new_id is None:
        return
    ref_run, new_run = store.get_run(ref_id), store.get_run(new_id)
    ref, new = Mechanism.from_stored(ref_run), Mechanism.from_stored(new_run)
    cfg = RegressConfig()
    if ref_id == new_id:
        st.info("Pick two different runs to compare.")
    elif ref.scores and new.scores:
        cmp = compare(ref, new, cfg)
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("cause-set Jaccard", common.fmt(cmp["jaccard_cause_set"], ".2f"))
        m2.metric(f"top-{cfg.top_k} Jaccard", common.fmt(cmp["jaccard_top_k"], ".2f"))
        rho = cmp["spearman"]
        m3.metric("Spearman", "-" if math.isnan(rho) else f"{rho:.2f}")
        m4.metric("same mechanism", "yes" if cmp["same_mechanism"] else "no")
        st.caption(f"Rule: {common.md(cmp['rule'])}")
    else:
        st.info(
            "One of the runs has no attribution (a regression run that found the incident "
            "fixed measures P(bad) only), so the mechanisms cannot be compared."
        )
    col_ref, col_new = st.columns(2)
    with col_ref:
        st.subheader("Reference")
        _column(ref_run, ref, models, cfg.top_k)
    with col_new:
        st.subheader("New")
        _column(new_run, new, models, cfg.top_k)
    shared = sorted(set(ref.scores) & set(new.scores))
    if shared:
        with st.expander(f"Attribution scores of the {len(shared)} components both runs traced"):
            st.dataframe(
                common.cell_rows(
                    [
                        {"component": c, "reference": ref.scores[c], "new": new.scores[c]}
                        for c in sorted(shared, key=lambda c: -abs(ref.scores[c]))
                    ]
                ),
                hide_index=True,
                width="stretch",
            )


main()
