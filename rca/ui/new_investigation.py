"""New investigation: a case file or a form, a model and a device, then the whole pipeline
(ingest, trace, confirm, remedy, record) with a live status; the run then appears under Cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

from rca.ingest.case_file import load_case
from rca.ingest.incident import SEVERITIES, Incident, IncidentError
from rca.store import Store
from rca.ui import common

ZOO_REFS = ("zoo:support-bot-v1", "zoo:support-bot-v2")
OTHER = "a model directory ..."


def _devices() -> list[str]:
    """cpu, plus cuda where torch sees a GPU (torch is imported here, not at page load)."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _from_file() -> Incident | None:
    folder = common.cases_dir()
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else []
    if not files:
        st.info(f"No case files (*.toml) in {common.md(folder)}; set RCA_CASES or use the form.")
        return None
    path = st.selectbox(
        "Case file", files, format_func=lambda p: common.plain(p.name), key="new_case_file"
    )
    if path is None:
        return None
    try:
        incident = load_case(Path(path), check_model=False)
    except IncidentError as e:
        st.error(common.md(e))
        return None
    with st.expander(f"{common.md(path.name)}: {common.md(incident.id)}", expanded=False):
        st.code(common.plain(Path(path).read_text(encoding="utf-8")), language="toml")
    return incident


def _from_form() -> Incident | None:
    st.caption(
        "The fields of a case file (docs/case-files.md); id, title, prompt and bad are required."
    )
    c1, c2, c3 = st.columns([2, 4, 2])
    case_id = c1.text_input("Id", key="new_id", placeholder="leak-2026-03")
    title = c2.text_input("Title", key="new_title")
    severity = c3.selectbox("Severity", SEVERITIES, index=2, key="new_severity")
    prompt = st.text_area("Prompt (exactly what the model saw)", key="new_prompt")
    c4, c5 = st.columns(2)
    bad = c4.text_input("Bad continuation", key="new_bad")
    good = c5.text_input("Good continuation (optional)", key="new_good")
    counterfactual = st.text_input("Counterfactual prompt (optional)", key="new_cf")
    tags = st.text_input("Tags (comma-separated)", key="new_tags")
    if not (case_id and title and prompt and bad):
        return None
    try:
        return Incident(
            id=case_id.strip(),
            title=title,
            severity=str(severity),
            model=ZOO_REFS[0],  # replaced by the model picked below
            prompt=prompt,
            bad=bad,
            good=good or None,
            counterfactual=counterfactual or None,
            tags=tuple(t.strip() for t in tags.split(",") if t.strip()),
        )
    except IncidentError as e:
        st.error(common.md(e))
        return None


def _model(incident: Incident | None, from_file: bool) -> str | None:
    options = list(ZOO_REFS)
    if from_file and incident is not None and incident.model not in options:
        options.insert(0, incident.model)
    options.append(OTHER)
    index = options.index(incident.model) if from_file and incident is not None else 0
    choice = st.selectbox("Model", options, index=index, key="new_model")
    if choice == OTHER:
        path = st.text_input("Model directory", key="new_model_dir")
        return path.strip() or None
    return choice


def _run(incident: Incident, device: str) -> None:
    case = common.md(incident.id)
    status = st.status(f"Investigating {case} ...", expanded=True)
    with status:
        bar = st.progress(0.0, text="starting")

        def progress(stage: str, frac: float) -> None:
            frac = min(1.0, max(0.0, float(frac)))
            bar.progress(frac, text=f"{stage} ({frac:.0%})")
            status.update(label=f"Investigating {case}: {common.md(stage)}")

        from rca.investigate import InvestigateConfig, investigate

        try:
            run = investigate(
                incident,
                store=Store(common.db_path()),
                config=InvestigateConfig(device=device),
                progress=progress,
                home=common.rca_home(),
            )
        except Exception as e:  # shown to the user, who can fix the case or the model
            status.update(label=f"{case}: failed", state="error")
            st.error(common.md(f"{type(e).__name__}: {e}"))
            return
    status.update(label=f"{case}: recorded", state="complete", expanded=False)
    st.session_state["rca_run"] = run.run_id
    st.session_state["new_last_run"] = run.run_id
    st.success(
        f"Recorded run `{run.run_id}`: verdict **{common.md(run.verdict.verdict)}**, cause set "
        f"{common.md(', '.join(run.verdict.cause_set.components) or '(none)')}."
    )


def main() -> None:
    st.title("New investigation")
    source = st.radio("Case", ["Case file", "Form"], horizontal=True, key="new_source")
    from_file = source == "Case file"
    incident = _from_file() if from_file else _from_form()
    c1, c2 = st.columns(2)
    with c1:
        model = _model(incident, from_file)
    with c2:
        device = st.selectbox("Device", _devices(), key="new_device")
    st.caption(
        f"The run is recorded in {common.md(common.db_path())}; zoo models are read from "
        f"{common.md(common.rca_home() or '$RCA_HOME or ~/.cache/rca')}."
    )
    go = st.button(
        "Investigate", type="primary", disabled=incident is None or not model, key="new_go"
    )
    if go and incident is not None and model:
        _run(dataclasses.replace(incident, model=model), str(device))
    last = st.session_state.get("new_last_run")
    if last and st.button("Open the recorded run", key="new_open"):
        st.switch_page(common.PAGES["case"], query_params={"run": last})


main()
