"""Monitors: the detectors ``rca monitor build`` compiled from confirmed runs. Every monitor
with its sites, threshold, figures on the fit prompts and its latest evaluation (stale ones
marked, with the reason); then one monitor, linkable as ``/monitors?monitor=<id>``: its
held-out evaluation beside the two baselines (``rca monitor eval``), its evaluations on other
checkpoints (``rca regress``), and the alerts ``rca monitor run`` recorded, over time."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from rca.store import ReadOnlyStore, StoreError
from rca.ui import common


def _short(value: Any) -> str:
    """An id's first characters for a code span (letters, digits and dashes only)."""
    return re.sub(r"[^0-9A-Za-z-]", "", str(value))[:8]


def _model(models: Mapping[str, str], fp: Any) -> str:
    """A model's label (``common.model_labels``), or its fingerprint's start, for Markdown."""
    return common.md(models.get(str(fp), str(fp)[:8]))


def _pick(monitors: Sequence[Mapping[str, Any]], models: Mapping[str, str]) -> str | None:
    """The monitor shown: the one the URL names (``?monitor=``, a prefix is enough), else the
    one picked in this session, else the newest; a selectbox changes it."""
    ids = [str(m["monitor_id"]) for m in monitors]
    labels = {str(m["monitor_id"]): common.monitor_label(m, models) for m in monitors}
    wanted = st.query_params.get("monitor") or st.session_state.get("mon_pick") or ids[0]
    current = next((i for i in ids if i == wanted), None) or next(
        (i for i in ids if i.startswith(str(wanted))), None
    )
    if current is None:
        st.warning(
            f"Monitor {common.md(wanted)} is not in this database; showing the newest monitor."
        )
        current = ids[0]
    st.session_state["mon_pick"] = current

    def changed() -> None:
        st.query_params["monitor"] = st.session_state["mon_pick"]

    return st.selectbox(
        "Monitor", ids, format_func=labels.__getitem__, key="mon_pick", on_change=changed
    )


def _overview(monitors: Sequence[Mapping[str, Any]], models: Mapping[str, str]) -> None:
    stale = [m for m in monitors if (m.get("latest_eval") or {}).get("stale")]
    st.caption(
        f"Detectors `rca monitor build` compiled from confirmed runs: {len(monitors)} "
        f"monitors, newest first; {len(stale)} stale on their latest "
        "evaluation. Figures at each monitor's threshold: precision, recall, false-positive "
        "rate (FPR) and AUROC, on its fit prompts and on its latest evaluation."
    )
    for m in stale:
        ev = m["latest_eval"]
        st.warning(
            f"**Stale**: {common.md(m['incident_id'])} (monitor "
            f"`{_short(m['monitor_id'])}`) on {_model(models, ev['model_fingerprint'])}: "
            f"{common.md(ev.get('reason') or 'no reason recorded')}",
            icon=":material/warning:",
        )
    st.dataframe(
        common.cell_rows(common.monitor_rows(monitors, models)),
        hide_index=True,
        width="stretch",
    )


def _summary(m: Mapping[str, Any], models: Mapping[str, str]) -> None:
    st.markdown(
        f"Monitor `{_short(m['monitor_id'])}` of **{common.md(m['incident_id'])}**, built "
        f"from run `{_short(m['run_id'])}` on {_model(models, m['model_fingerprint'])}; "
        f"artifact {common.md(m.get('artifact_path') or '-')}."
    )
    a, b, c, d = st.columns(4)
    a.metric("threshold", common.fmt(m.get("threshold"), ".4g"))
    b.metric("target FPR", common.fmt(m.get("target_fpr"), ".2%"))
    c.metric("evaluations", len(m.get("evals") or []))
    d.metric("alerts", m.get("n_alerts", 0))
    st.dataframe(
        common.cell_rows(
            [
                {"site": s.get("id"), "role": s.get("role"), "position rule": s.get("rule")}
                for s in m.get("site_specs") or []
                if isinstance(s, Mapping)
            ]
        ),
        hide_index=True,
        width="content",
    )
    st.markdown("**On the fit prompts**")
    fit = {"figures": m.get("fit")}
    st.dataframe(common.cell_rows(common.held_out_rows(fit)), hide_index=True, width="content")


def _evaluations(m: Mapping[str, Any], models: Mapping[str, str]) -> None:
    evals = list(m.get("evals") or [])
    st.subheader("Held-out evaluation")
    held = [e for e in evals if e.get("kind") == "held_out"]
    if not held:
        st.info(
            "Not judged on its held-out prompts yet: `rca monitor eval "
            f"{_short(m['monitor_id'])}` scores it there, beside the output check "
            "and a prompt-text classifier."
        )
    else:
        latest = held[-1]
        st.caption(
            f"Evaluated {common.md(latest.get('evaluated_at'))} on "
            f"{_model(models, latest['model_fingerprint'])}. The baselines, on the same "
            "held-out split: the output check (generate greedily and look for the bad "
            "continuation) and the same regression on the prompt's token counts."
        )
        st.dataframe(
            common.cell_rows(common.held_out_rows(latest)), hide_index=True, width="content"
        )
        if len(held) > 1:
            with st.expander(f"Earlier held-out evaluations ({len(held) - 1})"):
                for ev in reversed(held[:-1]):
                    st.caption(f"Evaluated {common.md(ev.get('evaluated_at'))}")
                    st.dataframe(
                        common.cell_rows(common.held_out_rows(ev)),
                        hide_index=True,
                        width="content",
                    )
    st.subheader("On other checkpoints")
    rows = common.regress_rows(evals, models)
    if not rows:
        st.caption(
            "Not checked on another checkpoint yet: `rca regress` re-checks the monitors of "
            "its cases on the new model."
        )
        return
    st.caption(
        f"{len(rows)} checks on {len({r['fingerprint'] for r in rows})} models: the recall on "
        "the held-out variants that still show the incident there (stale below the threshold "
        "the reason names)."
    )
    st.dataframe(common.cell_rows(rows), hide_index=True, width="stretch")


def _alerts(store: ReadOnlyStore, m: Mapping[str, Any], models: Mapping[str, str]) -> None:
    st.subheader("Alerts")
    alerts = store.monitor_alerts(str(m["monitor_id"]))
    if not alerts:
        st.info(
            "This monitor has no alerts: `rca monitor run --monitor "
            f"{_short(m['monitor_id'])} --model ... --prompts FILE` records the "
            "prompts it flags."
        )
        return
    rows = common.alert_rows(alerts, models)
    a, b, c = st.columns(3)
    a.metric("alerts", len(alerts))
    b.metric("batches", len({x["batch_id"] for x in alerts}))
    c.metric("distinct prompts", len({x["prompt_sha256"] for x in alerts}))
    per_day = pd.DataFrame(common.alerts_per_day(alerts))
    per_day["day"] = pd.to_datetime(per_day["day"])
    bars = (
        alt.Chart(per_day, title="Alerts per day (UTC)")
        .mark_bar(color="#c0392b")
        .encode(
            x=alt.X("day:T", timeUnit="yearmonthdate", title="day"),
            y=alt.Y("alerts:Q", title="alerts"),
            tooltip=[alt.Tooltip("day:T", timeUnit="yearmonthdate"), "alerts:Q"],
        )
    )
    scores = pd.DataFrame(
        {
            "alerted": pd.to_datetime([x["alerted_at"] for x in alerts], utc=True),
            "score": [float(x["score"]) for x in alerts],
            "batch": [r["batch"] for r in rows],
            "prompt": [str(x["prompt_sha256"])[:12] for x in alerts],
        }
    )
    points = (
        alt.Chart(scores, title="Score of each alert")
        .mark_circle(size=60)
        .encode(
            x=alt.X("alerted:T", title="alerted (UTC)"),
            y=alt.Y("score:Q", title="score", scale=alt.Scale(zero=False)),
            color=alt.Color("batch:N"),
            tooltip=["alerted:T", "score:Q", "batch:N", "prompt:N"],
        )
    )
    rule = (
        alt.Chart(pd.DataFrame({"threshold": [float(m["threshold"])]}))
        .mark_rule(color="#7f8c8d", strokeDash=[4, 4])
        .encode(y="threshold:Q")
    )
    left, right = st.columns(2)
    left.altair_chart(bars, width="stretch")
    right.altair_chart(points + rule, width="stretch")
    kept = sum(1 for x in alerts if x.get("text") is not None)
    st.caption(
        "Each alert: the prompt's SHA-256, its score (the dashed line is the threshold), the "
        "generation step it fired at (empty: on the prompt itself) and the sites read; "
        + (
            f"the prompt's text for the {kept} alerts recorded with `--store-text`."
            if kept
            else "no prompt text (recorded only with `rca monitor run --store-text`)."
        )
    )
    st.dataframe(common.cell_rows(rows), hide_index=True, width="stretch")


def main() -> None:
    st.title("Monitors")
    store = common.reader()
    try:
        monitors = store.list_monitors()
        models = common.model_labels(store.models())
    except StoreError as e:
        st.error(common.md(e))
        return
    if not monitors:
        st.info(
            "No monitors recorded yet. `rca monitor build RUN` compiles a confirmed run into "
            "one: a probe on its circuit members' activations that flags the incident at run "
            "time."
        )
        return
    _overview(monitors, models)
    st.subheader("Monitor")
    pick = _pick(monitors, models)
    if pick is None:
        return
    try:
        monitor = store.get_monitor(pick)
    except StoreError as e:
        st.error(common.md(e))
        return
    monitor["n_alerts"] = next(
        (m.get("n_alerts", 0) for m in monitors if m["monitor_id"] == pick), 0
    )
    _summary(monitor, models)
    _evaluations(monitor, models)
    _alerts(store, monitor, models)


main()
