"""A behaviour's cost and fix against one prompt's, on the same model and machine: each zoo
incident as one prompt and with its listed variants (``m_behaviour``), and each real case of
``cases/real/`` as its prompt and with its variants (``m_real_behaviour``). Each gives the ratio
of the two wall times, the recommended fix's figures on the held-out variants, and the
one-prompt investigation's fix scored on the same held-out variants."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rca.bench.cost.common import peaks

__all__ = ["BEHAVIOUR_RATIO", "m_behaviour", "m_real_behaviour"]

BEHAVIOUR_RATIO = 5.0  # target: a case with 50 variants costs at most 5x one prompt
CASES = Path(__file__).resolve().parents[3] / "cases"


def m_behaviour(key: str, _: int, device: str = "cpu") -> dict[str, Any]:
    """The zoo incident ``key`` (quick ``support-bot-v1``) as the one prompt of
    ``cases/<key>.toml``, then as the behaviour of ``cases/behaviours/zoo-<key>-behaviour.toml``
    (its listed variants, 60% held out)."""
    from rca import zoo
    from rca.ingest.case_file import load_case
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject

    zoo.build(quick=True)
    single = load_case(CASES / f"{key}.toml")
    behaviour = load_case(CASES / "behaviours" / f"zoo-{key}-behaviour.toml")
    subject = load_subject(single.model_path(), device=device)
    config = InvestigateConfig(device=device)
    investigate(single, subject=subject, config=config)  # warm: the first run loads code
    return {"config": key, **compare(single, behaviour, subject, config), **peaks(device)}


def compare(single: Any, behaviour: Any, subject: Any, config: Any) -> dict[str, Any]:
    """``single`` (one prompt) and ``behaviour`` (the same case with variants) investigated on
    ``subject``: the wall times and their ratio, each fix's fit and held-out figures, and the
    one-prompt recommended fix scored on the behaviour's held-out variants."""
    from rca.investigate import investigate
    from rca.model.metric import evaluate_many
    from rca.remedy import fix_context

    t = time.perf_counter()
    one = investigate(single, subject=subject, config=config)
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    run = investigate(behaviour, subject=subject, config=config)
    behaviour_s = time.perf_counter() - t
    rec = run.recommended
    fixes = [
        {
            "kind": r.kind,
            "layer": r.layer,
            "recommended": r.recommended,
            "fit_share": r.behaviour["fit"]["share_under_target"] if r.behaviour else None,
            "held_out_share": r.behaviour["held_out"]["share_under_target"]
            if r.behaviour
            else None,
            "held_out_mean_p_bad": r.behaviour["held_out"]["mean_p_bad_after"]
            if r.behaviour
            else None,
            "symptom_patch": r.symptom_patch,
            "loss_change_pct": r.side_effect["loss_change_pct"],
        }
        for r in run.remedies
    ]
    checks = run.preflight.variants if run.preflight else []
    held = [v.target for v in checks if v.part == "held_out"]
    single_rec = one.recommended
    single_held = None
    if single_rec is not None and held:
        with fix_context(subject, single_rec.patch_spec):
            after = evaluate_many(subject.model, held)
        single_held = {
            "share_under_target": sum(v.p_bad < config.p_bad_target for v in after) / len(after),
            "mean_p_bad_after": sum(v.p_bad for v in after) / len(after),
            "loss_change_pct": single_rec.side_effect["loss_change_pct"],
        }
    b = run.behaviour
    return {
        "n_variants": len(checks),
        "held_out": len(held),
        "shown": sum(v.shows for v in checks),
        "held_out_p_bad_before": sum(v.p_bad for v in checks if v.part == "held_out")
        / max(1, len(held)),
        "single_s": single_s,
        "behaviour_s": behaviour_s,
        "ratio": behaviour_s / single_s,
        "single_stages_s": one.timings,
        "behaviour_stages_s": run.timings,
        "behaviour_forward_equiv": None if b is None else b.forward_equiv,
        "set_holds": None if b is None else b.set_holds,
        "circuit_kept": None if b is None else b.circuit_kept,
        "circuit_dropped": None if b is None else b.circuit_dropped,
        "behaviour_cause_set": None
        if b is None or b.cause_set is None
        else {
            "components": b.cause_set.components,
            "source": b.cause_set.source,
            "holds": b.cause_set.holds,
            "holds_on_fit_set": b.cause_set.holds_on_fit_set,
        },
        "cause_set": run.verdict.cause_set.components,
        "recommended": None if rec is None else rec.kind,
        "single_recommended": None if single_rec is None else single_rec.kind,
        "single_on_held_out": single_held,
        "fixes": fixes,
    }


def m_real_behaviour(case: str, _: int, device: str = "cpu") -> dict[str, Any]:
    """``cases/real/<case>.toml`` investigated as its prompt alone, then with its variants (no
    warm-up run: the one-prompt run pays for the first calls, which makes the ratio a little
    smaller than it is)."""
    from rca.bench.cost.real import REAL_CASES, one_prompt
    from rca.ingest.case_file import load_case
    from rca.investigate import InvestigateConfig
    from rca.model.subject import load_subject

    behaviour = load_case(REAL_CASES / f"{case}.toml")
    subject = load_subject(behaviour.model_path(), device=device)
    got = compare(one_prompt(behaviour), behaviour, subject, InvestigateConfig(device=device))
    return {"config": case, **got, **peaks(device)}
