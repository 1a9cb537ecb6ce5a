"""Fixes on a behaviour: fit on the fit set, scored on held-out variants that choose nothing,
and a fix that holds only on the fit set labelled a symptom patch and never recommended."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rca.model.metric import Target, evaluate
from rca.model.subject import load_subject
from rca.remedy import Remedy, VariantTarget, fix_context, recommend, try_remedies
from rca.remedy.direction_removal import residual_directions
from rca.remedy.edit import weight_edit
from rca.remedy.write_direction_removal import write_directions
from tests.helpers import save_model_dir, tiny_model, word_tokenizer, words

REFS = [words(*range(i, i + 6)) for i in range(0, 60, 6)]


def pair(k: int) -> tuple[Target, Target]:
    """A prompt whose fourth token is the 'trigger' (word 20), and its counterfactual."""
    prompt = (1, 5 + k, 6, 20, 8 + k, 9, 10)
    return Target(prompt, (11, 12), (13,)), Target((*prompt[:3], 21, *prompt[4:]), (11, 12), (13,))


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("gpt2")
    return load_subject(
        save_model_dir(d, tiny_model("gpt2", seed=5), word_tokenizer()), device="cpu"
    )


def variants(n: int, held: set[int]) -> list[VariantTarget]:
    out = []
    for i in range(n):
        t, cf = pair(i + 1)
        out.append(VariantTarget(i, "held_out" if i in held else "fit", t, cf))
    return out


def test_every_fix_is_scored_on_every_variant_as_its_patch_really_does(subject) -> None:
    target, cf = pair(0)
    vs = variants(6, {1, 3, 4})
    rs = try_remedies(
        subject, target, ["L1.H2", "L0.MLP"], counterfactual=cf, reference=REFS, variants=vs
    )
    assert rs
    for r in rs:
        b = r.behaviour
        assert b is not None and b["fit"]["n"] == 4 and b["held_out"]["n"] == 3
        for row, v in zip(b["per_variant"], vs, strict=True):
            assert (row["index"], row["part"]) == (v.index, v.part)
            assert row["p_bad_before"] == pytest.approx(evaluate(subject.model, v.target).p_bad)
            with fix_context(subject, r.patch_spec):
                after = evaluate(subject.model, v.target).p_bad
            assert row["p_bad_after"] == pytest.approx(after, abs=1e-5)
        held = [x["p_bad_after"] for x in b["per_variant"] if x["part"] == "held_out"]
        assert b["held_out"]["mean_p_bad_after"] == pytest.approx(sum(held) / len(held))
        under = sum(p < 0.2 for p in held) / len(held)
        assert b["held_out"]["share_under_target"] == pytest.approx(under)


def test_directions_are_fit_on_the_fit_set_only(subject) -> None:
    """The direction fixes average their directions over the fit pairs; a held-out variant
    changes nothing in them."""
    target, cf = pair(0)
    fit_pairs = [(target, cf), *(pair(k) for k in (1, 2))]
    one = [residual_directions(subject, [p], [0, 1]) for p in fit_pairs]
    mean = residual_directions(subject, fit_pairs, [0, 1])
    for layer in (0, 1):
        want = sum(d[layer] for d in one) / len(one)
        assert torch.allclose(mean[layer], want, atol=1e-6)
    w_one = [write_directions(subject, [p], ["L1.H2"])["L1.H2"] for p in fit_pairs]
    w_mean = write_directions(subject, fit_pairs, ["L1.H2"])["L1.H2"]
    assert torch.allclose(torch.tensor(w_mean), torch.tensor(w_one).mean(0), atol=1e-6)

    def specs(held_k: int) -> dict[str, object]:
        vs = [
            VariantTarget(0, "fit", *pair(1)),
            VariantTarget(1, "fit", *pair(2)),
            VariantTarget(2, "held_out", *pair(held_k)),
        ]
        rs = try_remedies(
            subject, target, ["L1.H2"], counterfactual=cf, reference=REFS, variants=vs
        )
        return {f"{r.kind}{r.layer}": r.patch_spec for r in rs if "direction" in r.kind}

    assert specs(3) == specs(7)


def test_the_weight_edit_is_trained_on_every_fit_prompt(tmp_path: Path) -> None:
    s = load_subject(
        save_model_dir(tmp_path, tiny_model("gpt2", seed=5), word_tokenizer()), device="cpu"
    )
    targets = [pair(k)[0] for k in range(3)]
    before = [evaluate(s.model, t).p_bad for t in targets]
    deltas = weight_edit(s, targets, ["L1.MLP"], REFS, p_bad_target=max(before) / 4)
    from rca.remedy.edit import weights_edited

    with weights_edited(s, deltas):
        after = [evaluate(s.model, t).p_bad for t in targets]
    assert all(a < b for a, b in zip(after, before, strict=True))


def remedy(kind: str, loss: float, fit: float, held: float) -> Remedy:
    def figures(share: float) -> dict[str, float]:
        return {"n": 10, "mean_p_bad_before": 0.9, "mean_p_bad_after": 1 - share,
                "share_under_target": share}  # fmt: skip

    return Remedy(
        kind=kind,
        components=["L1.H2"],
        metric_before=2.0,
        metric_after=-2.0,
        p_bad_before=0.9,
        p_bad_after=0.05,
        side_effect={"loss_change_pct": loss, "kl_mean": 0.0, "n_prompts": 10},
        patch_spec={},
        behaviour={
            "fit": figures(fit),
            "held_out": figures(held),
            "p_bad_target": 0.2,
            "hold_share": 0.9,
            "symptom_patch": fit >= 0.9 and held < 0.9,
            "per_variant": [],
        },
    )


def test_the_fit_set_chooses_and_a_symptom_patch_is_never_recommended() -> None:
    cheap_symptom = remedy("write_direction_removal", 0.1, fit=1.0, held=0.5)
    dearer_general = remedy("direction_removal", 1.0, fit=0.95, held=1.0)
    assert cheap_symptom.symptom_patch and not dearer_general.symptom_patch
    # the fit set's choice is the cheap fix; it is a symptom patch, so nothing is recommended,
    # and the held-out set does not pick another in its place
    assert recommend([cheap_symptom, dearer_general]) is None
    assert not cheap_symptom.recommended and not dearer_general.recommended
    assert "symptom patch" in cheap_symptom.note
    # a fix that generalizes is recommended when the fit set chooses it
    fresh_general = remedy("direction_removal", 1.0, fit=0.95, held=1.0)
    worse_on_fit = remedy("mean_ablation", 0.1, fit=0.5, held=1.0)
    assert recommend([worse_on_fit, fresh_general]) is fresh_general
    # the held-out figures never rank: a fix that fails the fit set is not chosen for them
    assert not worse_on_fit.recommended
