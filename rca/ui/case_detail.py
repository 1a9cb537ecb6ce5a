"""Case detail: one run of a case, from the incident to the notes.

Sections: the incident as ingested (a chat case's turns as chat messages, with the text the
model saw); the greedy-decoding check, where the run made one; the token-attribution heat
strip over the prompt; the attribution graph with a node picker (score, edges, ablation
evidence); the ablation charts (the cause set's effect against the random-set distribution,
and each candidate's effects); the remediation table; the notes, append-only, with a form
to add one. The run comes from the ``run`` query parameter (``/case_detail?run=<id>``), so a
case can be linked to.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from rca import report
from rca.report import token_warning, turns
from rca.store import RecordError, Store, StoreError
from rca.ui import common


def _pick_run(runs: list[dict[str, Any]], models: Mapping[str, str]) -> str | None:
    """The run to show: the ``run`` query parameter (a full id or a prefix), else the last run
    opened in this session, else the newest; a selectbox changes it."""
    ids = [str(r["run_id"]) for r in runs]
    labels = {str(r["run_id"]): common.run_label(r, models) for r in runs}
    wanted = st.query_params.get("run") or st.session_state.get("rca_run") or ids[0]
    current = next((i for i in ids if i == wanted), None) or next(
        (i for i in ids if i.startswith(str(wanted))), None
    )
    if current is None:
        st.warning(f"Run {common.md(wanted)} is not in this database; showing the newest run.")
        current = ids[0]
    st.session_state["detail_run"] = current

    def changed() -> None:
        st.query_params["run"] = st.session_state["detail_run"]
        st.session_state["rca_run"] = st.session_state["detail_run"]

    return st.selectbox(
        "Run", ids, format_func=labels.__getitem__, key="detail_run", on_change=changed
    )


# each role's chat avatar (the role is also written in the turn): system turns stand apart
_AVATAR = {"system": ":material/settings:", "user": "user", "assistant": "assistant"}


def _given(text: Any, messages: Any, seen: Any) -> None:
    """A prompt or counterfactual as given: its text, or a chat's turns as chat messages; then
    what the model saw, in an expander, when that is not the text as given."""
    chat = turns(messages)
    if not chat:
        st.code(common.plain(text), language=None, wrap_lines=True)
    for role, content in chat:
        name = role if role in _AVATAR else "other"  # a known role; the caption says which
        with st.chat_message(name, avatar=_AVATAR.get(role, "❔")):
            st.caption("system: instructions to the model" if role == "system" else common.md(role))
            st.code(common.plain(content), language=None, wrap_lines=True)
    if seen and (chat or seen != text):
        how = "the conversation in the model's chat template" if chat else "the exact text"
        with st.expander(f"What the model saw ({how})"):
            st.code(common.plain(seen), language=None, wrap_lines=True)


def _incident(run: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
    st.subheader("Incident")
    s = common.summary(run)
    chat = bool(turns(fields.get("messages")))
    st.markdown("**Prompt** (a conversation)" if chat else "**Prompt**")
    _given(fields.get("prompt"), fields.get("messages"), s.get("prompt_text"))
    bad, good = st.columns(2)
    with bad:
        st.markdown("**Bad continuation** (what the model produced)")
        st.code(common.plain(fields.get("bad")), language=None, wrap_lines=True)
        if fields.get("focus"):
            st.markdown("**Focus** (the part of it the metric reads)")
            st.code(common.plain(fields["focus"]), language=None, wrap_lines=True)
    with good:
        st.markdown("**Good continuation** (what it should have produced)")
        st.code(common.plain(fields.get("good") or "-"), language=None, wrap_lines=True)
    cf = s.get("counterfactual") or {}
    if cf or fields.get("counterfactual_messages"):
        how = "generated" if cf.get("generated") else "given"
        drop = f"; removes {common.fmt(cf.get('drop'), '.0%')} of the metric" if cf else ""
        st.markdown(f"**Counterfactual** ({how}{drop})")
        _given(
            cf.get("text"),
            fields.get("counterfactual_messages"),
            s.get("counterfactual_text") or cf.get("text"),
        )
    if fields.get("notes"):
        st.markdown("**Reporter's notes**")
        st.text(common.plain(fields["notes"]))
    inc = run.get("incident") or {}
    with st.expander("Case file as ingested"):
        if inc.get("case_toml"):
            st.code(common.plain(inc["case_toml"]), language="toml")
        else:
            text = json.dumps(dict(fields), indent=2, ensure_ascii=False, default=str)
            st.code(common.plain(text), language="json")
        st.text(common.plain(f"source: {inc.get('source')}\nsha256: {inc.get('sha256')}"))


def _decoding(run: Mapping[str, Any]) -> None:
    """Whether greedy decoding from the prompt says the bad continuation (runs that checked)."""
    dec = common.summary(run).get("decoding")
    if not isinstance(dec, Mapping):
        return
    st.subheader("Greedy decoding")

    def yes(v: Any) -> str:
        return "-" if v is None else ("yes" if v else "no")

    m1, m2, m3 = st.columns(3)
    m1.metric("reproduces the bad continuation", yes(dec.get("reproduces")))
    m2.metric("reproduces the focus", yes(dec.get("reproduces_focus")))
    m3.metric("new tokens at most", str(dec.get("max_new_tokens") or "-"))
    st.markdown("**Greedy text** (what the model says from the prompt)")
    st.code(common.plain(dec.get("greedy_text")), language=None, wrap_lines=True)
    rows = common.decoding_rows(dec)
    if rows:
        st.caption(
            "Each token of the bad continuation with its teacher-forced probability, next to "
            "the token greedy decoding produced at that step."
        )
        st.dataframe(
            common.cell_rows(rows),
            hide_index=True,
            column_config={
                "P (teacher-forced)": st.column_config.NumberColumn(format="%.3g"),
                "greedy P": st.column_config.NumberColumn(format="%.3g"),
            },
        )


def _tokens(run: Mapping[str, Any]) -> None:
    st.subheader("Token attribution")
    scores = list(run.get("token_scores") or [])
    if not scores:
        st.caption("This run recorded no token attribution.")
        return
    methods = sorted({str(t.get("method")) for t in scores})
    method = methods[0]
    if len(methods) > 1:
        method = st.selectbox("Method", methods, key="detail_token_method")
    picked = [t for t in scores if str(t.get("method")) == method]
    warn = token_warning(common.summary(run).get("token_completeness"))
    if warn and method == "integrated-gradients":
        st.warning(common.md(warn[:1].upper() + warn[1:]) + ".")
    st.caption(
        "Each prompt token shaded by how much it pushes toward the bad continuation (red) or "
        "against it (blue); hover for the score."
    )
    st.markdown(common.heat_strip(picked), unsafe_allow_html=True)
    with st.expander("Token scores"):
        rows = [
            {"position": t["position"], "token": t["token"], "score": t["score"]} for t in picked
        ]
        st.dataframe(common.cell_rows(rows), hide_index=True)


def _circuit(run: Mapping[str, Any]) -> bool:
    """The circuit, drawn with its roles; False where the run recorded none."""
    circuit = report.circuit_of(run)
    if circuit is None:
        return False
    st.subheader("Circuit")
    text = report.circuit_lines(circuit)
    st.markdown(common.md(text[0]))
    svg = report.circuit_svg(circuit, list(run.get("edges") or []))
    st.markdown(
        '<div class="rca-graph" style="overflow-x:auto">' + svg + "</div>",
        unsafe_allow_html=True,
    )
    for line in text[1:]:
        st.markdown("- " + common.md(line))
    curve = circuit.get("curve") or []
    if curve:
        st.caption(
            "Faithfulness of the first k components: the circuit's order against the trace's "
            "attribution ranking."
        )
        st.dataframe(pd.DataFrame(curve), hide_index=True)
    return True


def _graph(run: Mapping[str, Any]) -> None:
    has_circuit = _circuit(run)
    nodes, edges = list(run.get("nodes") or []), list(run.get("edges") or [])
    if not nodes:
        st.subheader("Attribution graph")
        st.caption("This run recorded no graph.")
        return
    if has_circuit and not st.toggle("Show the full attribution graph", key="full_graph"):
        return
    st.subheader("Attribution graph")
    st.caption(
        "The strongest edges, layers left to right (token embeddings first, the logits last); "
        "red pushes toward the bad continuation, blue against it. Pick a node below."
    )
    st.markdown(common.graph_html(nodes, edges), unsafe_allow_html=True)
    options = common.node_options(nodes)
    by_id = {str(n["node_id"]): n for n in nodes}

    def label(nid: str) -> str:
        n = by_id[nid]
        rank = f"rank {n['rank']}, " if n.get("rank") is not None else ""
        return common.plain(f"{nid} ({rank}score {common.fmt(n.get('score'))})")

    node = st.selectbox("Node", options, format_func=label, key="detail_node")
    if node is None:
        return
    n = by_id[node]
    m1, m2, m3, m4, m5 = st.columns(5)
    m1.metric("attribution", common.fmt(n.get("score")))
    m2.metric("total effect", common.fmt(n.get("total_effect")))
    m3.metric("necessity", common.fmt(n.get("necessity")))
    loss = n.get("benign_loss_pct")
    m4.metric("benign loss", "-" if loss is None else common.fmt(loss, "+.1f") + "%")
    m5.metric("verdict", common.plain(n.get("verdict") or "-"))
    if n.get("reason"):
        st.text(common.plain(n["reason"]))
    left, right = st.columns(2)
    incoming, outgoing = common.node_edges(edges, node)
    with left:
        st.markdown(f"**Edges into {common.md(node)}** ({len(incoming)})")
        st.dataframe(common.cell_rows(incoming), hide_index=True, height=220)
    with right:
        st.markdown(f"**Edges out of {common.md(node)}** ({len(outgoing)})")
        st.dataframe(common.cell_rows(outgoing), hide_index=True, height=220)
    st.markdown(f"**Ablation evidence for {common.md(node)}**")
    evidence = common.node_ablations(list(run.get("ablations") or []), node)
    if evidence:
        st.dataframe(common.cell_rows(evidence), hide_index=True)
    else:
        st.caption("No ablation included this node (it was not a confirmation candidate).")
    with st.expander("All stored fields of the node"):
        st.dataframe(common.node_details(nodes, node), hide_index=True)


def _ablations(run: Mapping[str, Any]) -> None:
    st.subheader("Ablations")
    cause, drops, single = common.ablation_evidence(list(run.get("ablations") or []))
    if cause is None and not single:
        st.caption("This run recorded no ablation.")
        return
    if cause is not None:
        effect = cause.get("effect")
        comps = ", ".join(cause.get("components") or []) or "(empty)"
        beaten = sum(1 for d in drops if effect is not None and d >= float(effect))
        st.markdown(
            f"Ablating the cause set **{common.md(comps)}** ({common.md(cause.get('kind'))}) "
            f"drops the metric by **{common.fmt(effect)}**; {beaten} of {len(drops)} random "
            f"sets of the same size drop it as much "
            f"(p = {common.fmt(cause.get('p_value'), '.3f')})."
        )
        if drops:
            hist = (
                alt.Chart(pd.DataFrame({"effect": drops}))
                .mark_bar(color="#7f8c8d")
                .encode(
                    x=alt.X("effect:Q", bin=alt.Bin(maxbins=30), title="metric drop"),
                    y=alt.Y("count():Q", title="random sets"),
                )
            )
            rule = (
                alt.Chart(pd.DataFrame({"effect": [float(effect or 0.0)], "what": ["cause set"]}))
                .mark_rule(color="#c0392b", size=3)
                .encode(x="effect:Q", tooltip=["what:N", "effect:Q"])
            )
            st.altair_chart(hist + rule, width="stretch")
    if single:
        st.markdown("**Per candidate**: total effect, direct effect and necessity")
        df = pd.DataFrame(single)
        bars = (
            alt.Chart(df)
            .mark_bar()
            .encode(
                y=alt.Y("component:N", sort=None, title=None),
                x=alt.X("effect:Q", title="metric drop"),
                color=alt.Color("experiment:N"),
                yOffset="experiment:N",
                tooltip=["component:N", "experiment:N", "effect:Q", "p_value:Q"],
            )
        )
        st.altair_chart(bars, width="stretch")


def _remedies(run: Mapping[str, Any]) -> None:
    st.subheader("Remediation")
    rows = common.remedy_rows(list(run.get("remedies") or []))
    if not rows:
        st.caption("No fix was tried in this run (a regression re-check skips them).")
        return
    st.dataframe(
        common.cell_rows(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "P(bad) before": st.column_config.NumberColumn(format="%.3f"),
            "P(bad) after": st.column_config.NumberColumn(format="%.3f"),
            "KL (benign)": st.column_config.NumberColumn(format="%.4f"),
            "benign loss change %": st.column_config.NumberColumn(format="%+.2f"),
        },
    )
    tables = common.behaviour_rows(run)
    if tables is None:
        return
    fixes, variants = tables
    st.markdown(
        "**On the variants.** Each fix was fit on the incident prompt and the fit "
        "variants and scored on the held-out variants, which chose nothing. A fix that "
        "holds on the fit set and not on the held-out variants is a symptom patch, "
        "never recommended."
    )
    share = st.column_config.NumberColumn(format="percent")
    st.dataframe(
        common.cell_rows(fixes),
        hide_index=True,
        width="stretch",
        column_config={"fit: under target": share, "held out: under target": share},
    )
    st.caption("P(bad) per variant, before and after each fix")
    st.dataframe(common.cell_rows(variants), hide_index=True, width="stretch")


def _provenance(run: Mapping[str, Any]) -> None:
    p = report.provenance_of(run)
    if p is None:
        return
    st.subheader("Training data")
    st.markdown(common.md(p["heading"]) + ".")
    if p["sources"]:
        st.markdown(common.md(p["sources"]))
    if p["ensemble"]:
        st.markdown(common.md(p["ensemble"]))
    if p["unlearning"]:
        st.markdown(common.md(p["unlearning"]))
    rows = [
        {
            "rank": r["rank"],
            "example": r["index"],
            "score": r["score"],
            "text": common.plain(r["text"]),
            **{str(k): common.plain(v) for k, v in r["fields"].items()},
        }
        for r in p["rows"]
    ]
    st.dataframe(
        common.cell_rows(rows),
        hide_index=True,
        width="stretch",
        column_config={"score": st.column_config.NumberColumn(format="%.4g")},
    )


def _default_author() -> str:
    try:
        return os.environ.get("RCA_ACTOR") or getpass.getuser()
    except Exception:  # no login name in some containers
        return ""


def _notes(run: Mapping[str, Any]) -> None:
    st.subheader("Notes")
    notes = list(run.get("notes") or [])
    for n in notes:
        with st.container(border=True):
            when = n["created_at"]
            when_s = (
                when.strftime("%Y-%m-%d %H:%M:%S %Z")
                if hasattr(when, "strftime")
                else str(when)[:19].replace("T", " ") + " UTC"
            )
            st.caption(f"note {n['note_id']} · {common.md(when_s)} · **{common.md(n['author'])}**")
            st.text(common.plain(n["text"]))
    if not notes:
        st.caption("No notes on this run yet.")
    done = st.session_state.pop("detail_note_added", None)
    if done:
        st.success(f"Note {done} added.")
    with st.form("detail_note_form", clear_on_submit=True):
        st.caption("Notes are append-only: correct one by adding another.")
        author = st.text_input("Author", value=_default_author(), key="note_author")
        text = st.text_area("Note", key="note_text")
        if st.form_submit_button("Add note"):
            try:
                note_id = Store(common.db_path()).add_note(
                    run_id=str(run["run_id"]), author=author, text=text
                )
            except (RecordError, StoreError) as e:
                st.error(common.md(e))
            else:
                st.session_state["detail_note_added"] = note_id
                st.rerun()


def main() -> None:
    store = common.reader()
    runs, models, error = common.runs_or_error(store)
    if error is not None:
        st.error(error)
        return
    if not runs:
        st.title("Case detail")
        st.info("The database has no runs yet.")
        return
    run_id = _pick_run(runs, models)
    if run_id is None:
        return
    run = store.get_run(run_id)
    fields = common.incident_fields(run)
    s = common.summary(run)
    st.title(f"{common.md(run['incident_id'])}: {common.md(fields.get('title'))}")
    # run ids are uuids (RunRecord checks them), safe in a code span as they are
    st.caption(
        f"severity **{common.md(fields.get('severity'))}** · {common.md(run.get('kind'))} run "
        f"`{run['run_id']}` · status {common.md(run.get('status'))} · model "
        f"{common.md(models.get(str(run['model_fingerprint'])))} · device "
        f"{common.md(run.get('device'))} · tags {common.md(', '.join(fields.get('tags') or []))}"
    )
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("verdict", common.plain(s.get("verdict") or "-"))
    m2.metric("top cause", common.plain(s.get("top_cause") or "-"))
    m3.metric("P(bad)", common.fmt(s.get("p_bad_before"), ".3f"))
    m4.metric("P(bad) after the fix", common.fmt(s.get("p_bad_after"), ".3f"))
    if s.get("classification"):
        reason = (s.get("regress") or {}).get("reason")
        st.markdown(
            f"Regression check: **{common.md(s['classification'])}**"
            + (f" ({common.md(reason)})" if reason else "")
        )
    if s.get("cause_set"):
        st.markdown("**Cause set**")
        st.code(common.plain(", ".join(s["cause_set"])), language=None)
    if s.get("set_reason"):
        st.text(common.plain(s["set_reason"]))
    infra = report.infrastructure_sentence(run)
    if infra:
        st.info(common.md(infra))
    with st.expander("What the verdict words mean"):
        for word, meaning in report.verdict_words(run).items():
            st.markdown(f"**{common.md(word)}**: {common.md(meaning)}")
    if run.get("parent_run_id"):
        st.caption(f"re-checks run `{run['parent_run_id']}`")
    _incident(run, fields)
    _decoding(run)
    _tokens(run)
    _graph(run)
    _ablations(run)
    _remedies(run)
    _provenance(run)
    _notes(run)


main()
