"""Fixes: a baked patch behaves exactly as the run-time fix it came from; side effects are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rca.model.ids import parse_id
from rca.model.metric import Target, evaluate
from rca.model.subject import load_subject
from rca.remedy import (
    FIX_KINDS,
    Fix,
    Remedy,
    RemedyError,
    apply_patch,
    fix_context,
    pack,
    recommend,
    try_remedies,
    weight_edit,
)
from tests.helpers import ARCHS, save_model_dir, tiny_model, word_tokenizer, words

TGT = Target((1, 5, 6, 7, 8, 9, 10), (11, 12), (13,))
CF = Target((1, 5, 6, 20, 8, 9, 10), (11, 12), (13,))
REFS = [words(*range(i, i + 6)) for i in range(0, 60, 6)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    return save_model_dir(d, tiny_model("gpt2", seed=5), word_tokenizer())


def logits(s, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return s.model(input_ids=ids).logits


def test_every_fix_is_measured_and_one_is_recommended(gpt2_dir: Path) -> None:
    s = load_subject(gpt2_dir, device="cpu")
    rs = try_remedies(s, TGT, ["L1.H2", "L0.MLP"], counterfactual=CF, reference=REFS)
    assert {r.kind for r in rs} == {
        "mean_ablation",
        "mean_ablation_top",
        "direction_removal",
        "write_direction_removal",
    }
    assert sum(r.recommended for r in rs) == 1
    before = evaluate(s.model, TGT)
    for r in rs:
        assert r.p_bad_before == pytest.approx(before.p_bad)
        # the effect is what the run-time fix really does
        with fix_context(s, r.patch_spec):
            assert evaluate(s.model, TGT).metric == pytest.approx(r.metric_after, abs=1e-5)
        assert r.side_effect["kl_mean"] >= 0 and r.side_effect["n_prompts"] == len(REFS)
        assert "P(" in r.note and "benign prompts" in r.note


@pytest.mark.parametrize(
    "kind", ["mean_ablation", "mean_ablation_top", "direction_removal", "write_direction_removal"]
)
def test_baked_patch_equals_run_time_fix(gpt2_dir: Path, tmp_path: Path, kind: str) -> None:
    s = load_subject(gpt2_dir, device="cpu")
    rs = {
        r.kind: r
        for r in try_remedies(s, TGT, ["L1.H2", "L0.MLP"], counterfactual=CF, reference=REFS)
    }
    spec = rs[kind].patch_spec
    ids = torch.tensor([list(TGT.prompt_ids) + [11, 12], [1, 30, 31, 32, 33, 34, 35, 36, 37]][:1])
    with fix_context(s, spec):
        fixed = logits(s, ids)
    assert (fixed - logits(s, ids)).abs().max() > 1e-4  # the fix changes something
    spec_path = tmp_path / "patch.json"
    spec_path.write_text(json.dumps(spec))
    out = apply_patch(spec_path, gpt2_dir, tmp_path / "patched")
    patched = load_subject(out, device="cpu")
    assert patched.fingerprint != s.fingerprint
    torch.testing.assert_close(logits(patched, ids), fixed, atol=1e-5, rtol=1e-5)


def test_every_fix_kind_is_tried_and_its_spec_reads_back_as_the_same_json(gpt2_dir: Path) -> None:
    """Each registered kind comes out of the search, and a patch spec written to JSON reads
    back (``Fix.from_spec``) as the fix that writes the same bytes and has the same effect."""
    s = load_subject(gpt2_dir, device="cpu")
    edit = [words(*range(i, i + 5)) for i in range(1, 40, 5)]
    rs = try_remedies(
        s, TGT, ["L1.H2", "L0.N3+7"], counterfactual=CF, reference=REFS, edit_prompts=edit
    )
    assert {r.kind for r in rs} == set(FIX_KINDS)
    for r in rs:
        text = json.dumps(r.patch_spec)
        fix = Fix.from_spec(json.loads(text))
        assert type(fix) is FIX_KINDS[r.kind] and fix.kind == r.kind
        assert json.dumps(fix.to_spec()) == text
        assert r.note.startswith(fix.describe())
        with fix.context(s):
            assert evaluate(s.model, TGT).metric == pytest.approx(r.metric_after, abs=1e-5)


# patch specs as rca writes them, one per kind, with the first layer each changes: they must
# keep loading, and write the same bytes back
STORED_SPECS = [
    (
        '{"format": "rca-patch-v1", "model_fingerprint": "f00d", "kind": "mean_ablation", '
        '"components": ["L1.H2", "L0.MLP"], "values": {"L1.H2": [0.5, -1.0], "L0.MLP": [2.0]}}',
        0,
    ),
    (
        '{"format": "rca-patch-v1", "model_fingerprint": "f00d", "kind": "mean_ablation_top", '
        '"components": ["L1.H2"], "values": {"L1.H2": [0.5, -1.0]}}',
        1,
    ),
    (
        '{"format": "rca-patch-v1", "model_fingerprint": "f00d", "kind": "targeted_ablation", '
        '"components": ["L1.H2", "L1.N3"], "values": {"L1.H2": [0.5, -1.0], "L1.N3": [0.125]}}',
        1,
    ),
    (
        '{"format": "rca-patch-v1", "model_fingerprint": "f00d", "kind": "direction_removal", '
        '"components": ["L1.RESID_POST"], "layer": 1, "direction": [0.5, -0.25, 1.0]}',
        0,  # the embedding is one of the writes it projects
    ),
    (
        '{"format": "rca-patch-v1", "model_fingerprint": null, "kind": '
        '"write_direction_removal", "components": ["L1.MLP"], '
        '"directions": {"L1.MLP": [0.5, -0.25, 1.0]}}',
        1,
    ),
    (
        '{"format": "rca-patch-v1", "model_fingerprint": "f00d", "kind": "weight_edit", '
        '"components": ["L1.H0"], "deltas": {"L1.H0": {"shape": [1, 2], "f32le": '
        '"AAAAPwAAAMA="}}, "edit_prompts": 8}',
        1,
    ),
]


@pytest.mark.parametrize("text, first", STORED_SPECS)
def test_a_stored_patch_spec_loads_as_its_kind_and_writes_the_same_bytes(
    text: str, first: int
) -> None:
    spec = json.loads(text)
    fix = Fix.from_spec(spec)
    assert type(fix) is FIX_KINDS[spec["kind"]]
    assert json.dumps(fix.to_spec()) == text
    assert fix.first_layer == first
    assert {json.loads(t)["kind"] for t, _ in STORED_SPECS} == set(FIX_KINDS)


def test_an_unknown_or_incomplete_fix_is_refused_naming_what_is_known(
    gpt2_dir: Path, tmp_path: Path
) -> None:
    s = load_subject(gpt2_dir, device="cpu")
    with pytest.raises(RemedyError, match="unknown fix kind 'nope'") as e:
        fix_context(s, {"kind": "nope", "components": ["L0.H0"]})
    assert all(k in str(e.value) for k in FIX_KINDS)
    with pytest.raises(RemedyError, match="mean_ablation patch spec needs 'values'"):
        fix_context(s, {"kind": "mean_ablation", "components": ["L0.H0"]})
    with pytest.raises(RemedyError, match="no value for L0.H1"):
        Fix.from_spec({"kind": "mean_ablation", "components": ["L0.H1"], "values": {}})
    # apply_patch refuses the spec before it loads any model
    p = tmp_path / "patch.json"
    p.write_text(json.dumps({"format": "rca-patch-v1", "kind": "nope", "components": []}))
    with pytest.raises(RemedyError, match="unknown fix kind"):
        apply_patch(p, tmp_path / "no-such-model", tmp_path / "out")


def test_patch_refuses_another_model(gpt2_dir: Path, tmp_path: Path) -> None:
    s = load_subject(gpt2_dir, device="cpu")
    spec = try_remedies(s, TGT, ["L1.H2"], counterfactual=None, reference=REFS)[0].patch_spec
    other = save_model_dir(tmp_path / "other", tiny_model("gpt2", seed=6), word_tokenizer())
    p = tmp_path / "patch.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(RemedyError, match="made for model"):
        apply_patch(p, other, tmp_path / "out")


def test_mean_ablation_cannot_be_baked_without_biases(tmp_path: Path) -> None:
    m = tiny_model("llama", seed=1, attention_bias=False, mlp_bias=False)
    d = save_model_dir(tmp_path / "llama", m, word_tokenizer())
    s = load_subject(d, device="cpu")
    spec = try_remedies(s, TGT, ["L1.H2"], counterfactual=None, reference=REFS)[0].patch_spec
    p = tmp_path / "patch.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(RemedyError, match="no bias"):
        apply_patch(p, d, tmp_path / "out")


def _random_edit(s, comps: list[str], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = s.adapter
    deltas = {
        c: pack(
            0.05
            * torch.randn(
                a.d_head if parse_id(c).kind == "head" else a.d_mlp, a.d_model, generator=g
            )
        )
        for c in comps
    }
    return {"format": "rca-patch-v1", "kind": "weight_edit", "components": comps, "deltas": deltas}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["weight_edit", "write_direction_removal"])
def test_component_level_fixes_bake_exactly(tmp_path: Path, arch: str, kind: str) -> None:
    """Conv1D (GPT-2) and Linear (Llama) orientations: baked weights equal the run-time hooks,
    two heads of one layer and an MLP edited together."""
    d = save_model_dir(tmp_path / arch, tiny_model(arch, seed=3), word_tokenizer())
    s = load_subject(d, device="cpu")
    comps = ["L1.H0", "L1.H2", "L0.MLP"]
    if kind == "weight_edit":
        spec = _random_edit(s, comps, seed=1)
    else:
        spec = next(
            r.patch_spec
            for r in try_remedies(s, TGT, comps, counterfactual=CF, reference=REFS)
            if r.kind == kind
        )
    ids = torch.tensor([list(TGT.prompt_ids) + [11, 12]])
    with fix_context(s, spec):
        fixed = logits(s, ids)
    assert (fixed - logits(s, ids)).abs().max() > 1e-4
    p = tmp_path / "patch.json"
    p.write_text(json.dumps(spec))
    patched = load_subject(apply_patch(p, d, tmp_path / "patched"), device="cpu")
    torch.testing.assert_close(logits(patched, ids), fixed, atol=1e-5, rtol=1e-5)


def test_weight_edit_lowers_p_bad_and_stays_close_elsewhere(tmp_path: Path) -> None:
    """Make the bad continuation likely with a planted edit, then let weight_edit undo it: the
    edit must bring P(bad) under the target, and its KL on held-out benign text must be far
    smaller than what simply zeroing the planted component costs."""
    d = save_model_dir(tmp_path / "g", tiny_model("gpt2", seed=4), word_tokenizer())
    s = load_subject(d, device="cpu")
    tgt = Target((1, 5, 6, 7, 8, 9, 10), (11,), None)
    # plant: the L1 MLP writes the bad token's unembedding direction, strongly
    a = s.adapter
    bad_dir = a.unembed.weight[11].detach()
    plant = {"L1.MLP": pack(torch.ones(a.d_mlp, 1) @ (30.0 * bad_dir[None] / a.d_mlp**0.5))}
    planted = {"format": "rca-patch-v1", "kind": "weight_edit", "components": ["L1.MLP"]}
    p = tmp_path / "plant.json"
    p.write_text(json.dumps({**planted, "deltas": plant}))
    s = load_subject(apply_patch(p, d, tmp_path / "planted"), device="cpu")
    assert evaluate(s.model, tgt).p_bad > 0.5
    train = [words(*range(i, i + 7)) for i in range(0, 70, 7)]
    deltas = weight_edit(s, tgt, ["L1.MLP"], train, p_bad_target=0.2)
    # the KL term in chunks of 3 prompts (a memory bound) trains the same edit
    chunked = weight_edit(s, tgt, ["L1.MLP"], train, p_bad_target=0.2, batch=3)
    assert torch.allclose(chunked["L1.MLP"], deltas["L1.MLP"], atol=1e-5, rtol=1e-4)
    spec = {**planted, "deltas": {k: pack(v) for k, v in deltas.items()}}
    with fix_context(s, spec):
        assert evaluate(s.model, tgt).p_bad < 0.2
    from rca.remedy import benign_side_effect

    held = [words(*range(i, i + 5)) for i in range(3, 60, 5)]
    edit_kl = benign_side_effect(s, held, spec)["kl_mean"]
    zero = {
        "kind": "mean_ablation",
        "components": ["L1.MLP"],
        "values": {"L1.MLP": [0.0] * a.d_model},
    }
    zero_kl = benign_side_effect(s, held, zero)["kl_mean"]
    assert edit_kl < 0.5 * zero_kl, (edit_kl, zero_kl)


def _fix(kind: str, before: float, after: float, loss: float) -> Remedy:
    return Remedy(kind, ["L0.H0"], 0.0, 0.0, before, after, {"loss_change_pct": loss}, {})


def test_a_fix_that_raises_p_bad_is_never_recommended() -> None:
    # a random model's "incident": P(bad) is already low and the fixes only move it about
    rs = [_fix("a", 0.01, 0.09, -0.8), _fix("b", 0.01, 0.02, 0.4)]
    assert recommend(rs) is None
    assert not any(r.recommended for r in rs)
    assert "none is recommended" in rs[0].note
    # the cheapest fix under target wins only among those that lower P(bad)
    rs = [_fix("raise", 0.5, 0.6, -1.0), _fix("cheap", 0.5, 0.1, 2.0), _fix("dear", 0.5, 0.05, 4.0)]
    assert recommend(rs) is rs[1] and rs[1].recommended and "Recommended." in rs[1].note
    # none under target: the lowest P(bad) among the tolerable ones that lower it
    rs = [_fix("x", 0.9, 0.95, 0.0), _fix("y", 0.9, 0.5, 1.0), _fix("z", 0.9, 0.3, 9.0)]
    assert recommend(rs) is rs[1] and "with reservations" in rs[1].note


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_side_effects_run_from_the_first_changed_layer_as_full_forwards_do(arch: str) -> None:
    """A fix that changes nothing below layer L is measured from L up on the recorded
    residual stream; its KL and loss equal those of full forwards, on padded batches of
    prompts of different lengths, and layer 0 is really not run. The means the run records
    are those of mean_activations."""
    from rca.model.hooks import mean_activations
    from rca.model.subject import Subject
    from rca.remedy import first_layer
    from rca.specificity import BenignRun

    s = Subject.from_model(tiny_model(arch, seed=4), word_tokenizer())
    refs = [words(*range(i, i + 2 + i % 5)) for i in range(0, 40, 4)]
    comps = ["L1.H1", "L1.MLP"]
    bench = BenignRun(s, refs, batch=3, sites=[*comps, "L1.N2"], keep=[1])
    want = mean_activations(s, refs, [*comps, "L1.N2"])
    for k, v in want.items():
        torch.testing.assert_close(bench.means[k], v, atol=1e-5, rtol=1e-5)
    specs = [
        {
            "kind": "mean_ablation",
            "components": comps,
            "values": {c: bench.means[c] for c in comps},
        },
        _random_edit(s, comps, seed=2),
    ]
    calls: list[int] = []
    for spec in specs:
        spec["values"] = {k: v.tolist() for k, v in spec.get("values", {}).items()}
        assert first_layer(spec) == 1
        ctx = lambda _s=spec: fix_context(s, _s)  # noqa: E731
        calls.clear()
        h = s.adapter.layer(0).register_forward_hook(lambda m, a, o: calls.append(1))
        try:
            skipped = bench.side_effect(ctx, first=1)
            assert not calls  # layer 0 stood in for by its recorded output
            full = bench.side_effect(ctx, first=0)
            assert calls
        finally:
            h.remove()
        assert full["kl_mean"] > 1e-4  # the fix does something
        for key in ("kl_mean", "kl_max", "loss_after"):
            assert skipped[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6)


def test_mlp_neurons_in_the_cause_set_are_fixed_through_their_mlp_first_by_ablating_them(
    gpt2_dir: Path,
) -> None:
    """A cause set that names an MLP's neurons (an infrastructure MLP resolved to them) gets
    the MLP's fixes, and a targeted ablation that takes those neurons first; each fix's effect
    is what the run-time fix really does."""
    s = load_subject(gpt2_dir, device="cpu")
    rs = try_remedies(s, TGT, ["L1.H2", "L0.N3+7"], counterfactual=CF, reference=REFS)
    by_kind = {r.kind: r for r in rs}
    assert by_kind["mean_ablation"].patch_spec["components"] == ["L1.H2", "L0.MLP"]
    targeted = by_kind["targeted_ablation"].patch_spec["components"]
    assert targeted[:3] == ["L1.H2", "L0.N3", "L0.N7"], targeted
    for r in rs:
        with fix_context(s, r.patch_spec):
            assert evaluate(s.model, TGT).metric == pytest.approx(r.metric_after, abs=1e-5)
