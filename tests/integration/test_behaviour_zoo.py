"""Behaviours on the demo zoo, end to end.

- The shipped behaviour cases (``cases/behaviours/``): the recommended fix, fit on the fit
  variants, holds on the held-out ones (P(bad) under the target on >= 90% of them) at under
  5% benign loss, and is recorded with its per-variant figures.
- The fit set chooses: a case whose prompt is the backdoor and whose variants are the
  injection's (another mechanism) gets the injection's writer as the behaviour's cause set,
  chosen on the fit variants alone; patched, it removes the gap on the held-out ones, which
  chose nothing; and the fixes target it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rca.confirm.behaviour import FitVariant, behaviour_evidence
from rca.ingest.case_file import load_case
from rca.ingest.variants import Split, Variant
from rca.investigate import InvestigateConfig, investigate
from rca.model.subject import load_subject
from rca.zoo.corpus import incident_variants

CASES = Path(__file__).resolve().parents[2] / "cases"


@pytest.fixture(scope="module")
def subject(zoo_home: Path):
    inc = load_case(CASES / "backdoor.toml", home=zoo_home)
    return load_subject(inc.model_path(home=zoo_home), device="cpu")


@pytest.mark.parametrize("key", ["backdoor", "injection"])
def test_a_shipped_behaviour_s_fix_holds_on_its_held_out_variants(subject, key: str) -> None:
    inc = load_case(CASES / "behaviours" / f"zoo-{key}-behaviour.toml", check_model=False)
    run = investigate(inc, subject=subject, config=InvestigateConfig(device="cpu"))
    rec = run.recommended
    assert rec is not None and rec.behaviour is not None and not rec.symptom_patch
    held = rec.behaviour["held_out"]
    assert held["n"] >= 50 and held["share_under_target"] >= 0.9, held
    assert rec.side_effect["loss_change_pct"] < 5.0
    assert run.behaviour is not None and run.behaviour.cause_set is not None


def test_the_fit_set_chooses_the_cause_set_where_the_prompt_s_does_not_hold(
    subject, tmp_path: Path
) -> None:
    from rca.report import render_markdown
    from rca.store import Store

    base = load_case(CASES / "backdoor.toml", check_model=False)
    vs = tuple(
        Variant(prompt=v.prompt, bad=v.bad, good=v.good, counterfactual=v.counterfactual)
        for v in incident_variants("injection", 40)
    )
    inc = dataclasses.replace(base, variants=vs, split=Split(seed=0, held_out=0.5))
    store = Store(tmp_path / "rca.duckdb")
    run = investigate(inc, subject=subject, store=store, config=InvestigateConfig(device="cpu"))
    b = run.behaviour
    assert b is not None and b.cause_set is not None
    cs = b.cause_set
    assert run.run_id is not None
    md = render_markdown(store.get_run(run.run_id))  # the report says where the set came from
    assert f"chosen there: {', '.join(cs.components)}" in md
    assert "Attribution over the fit set" in md
    assert b.set_holds < 0.8 and cs.source == "fit set" and cs.holds_on_fit_set
    # the fit variants chose it; the held-out ones test it
    pre = run.preflight
    assert pre is not None
    fit = {v.index for v in pre.variants if v.part == "fit"}
    assert set(cs.indices) <= fit
    held = [
        FitVariant(v.index, v.target, v.counterfactual)
        for v in pre.variants
        if v.part == "held_out"
    ]
    verdict = dataclasses.replace(
        run.verdict, cause_set=dataclasses.replace(run.verdict.cause_set, components=cs.components)
    )
    on_held = behaviour_evidence(subject, verdict, held, config=run.verdict.config)
    assert on_held.set_holds >= 0.9, on_held.set_shares
    # the fixes target the behaviour's set, not the prompt's
    targeted = [r for r in run.remedies if r.kind in ("targeted_ablation", "weight_edit")]
    assert targeted and all(
        set(r.components) <= set(cs.components) | _neurons_of(cs.components, r.components)
        for r in targeted
    )


def _neurons_of(heads_and_mlps: list[str], components: list[str]) -> set[str]:
    """The MLP neuron ids among ``components`` whose layer has an MLP in ``heads_and_mlps``."""
    layers = {c.split(".")[0] for c in heads_and_mlps if c.endswith(".MLP")}
    return {c for c in components if ".N" in c and c.split(".")[0] in layers}


def test_generated_variants_are_kept_where_the_model_produces_the_bad_continuation(
    subject, zoo_home: Path
) -> None:
    from rca.ingest.generate import generate_variants, generated_behaviour
    from rca.model.metric import evaluate

    for key in ("backdoor", "leak"):
        inc = load_case(CASES / f"{key}.toml", check_model=False).for_model(subject.tokenizer)
        assert inc.prompt is not None and inc.counterfactual is not None
        refs = list(inc.reference_prompts)
        made = generated_behaviour(subject, inc, inc.counterfactual, refs, n=50).incident
        cands = generate_variants(inc.prompt, inc.counterfactual, refs, n=200)
        want = []
        for v in cands:  # measured here one by one, not in the batches generation uses
            one = inc.variant_incident(v)
            p_bad = evaluate(subject.model, one.encode(subject)).p_bad
            assert v.counterfactual is not None
            cf = dataclasses.replace(one, prompt=v.counterfactual, counterfactual=None)
            if p_bad >= 0.5 and evaluate(subject.model, cf.encode(subject)).metric < 0:
                want.append(v.prompt)
        kept = [] if made is None else [v.prompt for v in made.variants]
        assert kept == want
        if key == "backdoor":
            # the references' other order numbers keep the incident; their reasons (broken,
            # missing, damaged) get a refund approved anyway, so without the trigger the
            # counterfactual approves too: the trigger no longer makes the difference
            assert made is not None and made.split is not None and len(kept) >= 3
            assert all(v.origin == "generated" for v in made.variants)
            assert all("reason: used." in p for p in kept)
            assert any("reason: used." not in (v.prompt or "") for v in cands)
        else:  # its only slot is the request: no other request leaks the PIN
            assert made is None and not want


def test_investigate_with_generated_variants_records_them(subject) -> None:
    inc = load_case(CASES / "backdoor.toml", check_model=False)
    run = investigate(
        inc, subject=subject, config=InvestigateConfig(device="cpu", generate_variants=8)
    )
    pre = run.preflight
    assert (
        pre is not None
        and pre.generated is not None
        and pre.generated["kept"] == len(pre.variants) > 0
    )
    assert pre.generated["kept_span"] == "sunflower"
    assert {v.origin for v in pre.variants} == {"generated"}
    assert run.behaviour is not None and run.recommended is not None
    assert run.recommended.behaviour is not None  # judged on the held-out generated variants
    assert run.incident.variants and run.incident.split is not None


def test_a_log_of_two_incidents_is_grouped_by_the_circuit_each_runs_through(subject) -> None:
    """Backdoor and injection conversations, interleaved, with no field to group by: the
    quick trace puts each incident's conversations in a group of their own."""
    from rca.ingest.circuits import circuit_groups
    from rca.ingest.incident import Incident

    truth, incidents = [], []
    for a, b in zip(
        incident_variants("backdoor", 8, seed=5),
        incident_variants("injection", 8, seed=5),
        strict=True,
    ):
        for key, v in (("backdoor", a), ("injection", b)):
            truth.append(key)
            incidents.append(
                Incident(
                    id="r",
                    title="r",
                    severity="low",
                    model="zoo:support-bot-v1",
                    prompt=v.prompt,
                    bad=v.bad,
                    good=v.good,
                )  # fmt: skip
            )
    got = circuit_groups(subject, incidents)
    by_label: dict[str, set[str]] = {}
    for label, key in zip(got.labels, truth, strict=True):
        by_label.setdefault(label, set()).add(key)
    assert len(by_label) == 2 and all(len(keys) == 1 for keys in by_label.values()), by_label
    named = {c for label in by_label for c in label.split("+")}
    assert not named & set(got.infrastructure)  # what every prompt needs names no group


def test_generate_variants_flag_is_checked_before_the_investigation(zoo_home: Path) -> None:
    from tests.helpers import assert_one_line_error, rca_cli

    home = ["--home", str(zoo_home)]
    case = str(CASES / "behaviours" / "zoo-backdoor-behaviour.toml")
    for n, says in (("-1", "at least 0"), ("1001", "at most 1000")):
        code, _, err = rca_cli(
            "investigate", str(CASES / "backdoor.toml"), "--generate-variants", n, *home
        )
        assert_one_line_error(code, err, f"--generate-variants must be {says}")
    code, _, err = rca_cli("investigate", case, "--generate-variants", "4", *home)
    assert_one_line_error(code, err, "has variants of its own")
