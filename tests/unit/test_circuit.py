"""The circuit (rca.confirm.circuit): patching at positions and path patching against plain
hooks on the full model; members placed where patching says they act; the entry where the
prompt differs."""

from __future__ import annotations

import pytest
import torch

from rca.confirm import (
    Ablator,
    ConfirmConfig,
    attributed_positions,
    circuit_from_json,
    confirm,
    site_label,
    writer_ids,
)
from rca.model.hooks import capture, patch
from rca.model.ids import format_id, parse_id
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.components import Baseline, score_components
from tests.helpers import tiny_model
from tests.unit.test_confirm import CF, REFS, TGT

SEQUENTIAL = ["gpt2", "llama", "gemma2"]
ALL = [*SEQUENTIAL, "phi", "gpt_neox"]


def _metric(s: Subject, values: dict[str, torch.Tensor]) -> float:
    """The incident's metric with ``values`` set by plain hooks on one full forward."""
    with patch(s, values), torch.no_grad():
        return float(TGT.metric(s.model(input_ids=TGT.input_ids()).logits)[0])


def _acts(s: Subject, ids: torch.Tensor, comps: list[str], values=None) -> dict[str, torch.Tensor]:
    """Each component's activation (rows, pos, width) on ``ids``, with ``values`` patched."""
    with patch(s, values or {}), capture(s, comps) as acts, torch.no_grad():
        s.model(input_ids=ids)
    return {c: acts[c].clone() for c in comps}


@pytest.mark.parametrize("model_type", ALL)
def test_patching_at_positions_equals_hooks_at_those_positions(model_type: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=1).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=3)
    comps = ["L0.H1", "L0.MLP", "L1.H2"]
    base = _acts(s, CF.input_ids(), comps)
    variants = [
        {"L0.H1@2": "baseline"},
        {"L0.MLP@2": "baseline", "L0.MLP@4": "baseline"},
        {"L0.H1@2": "baseline", "L1.H2@6": "baseline"},
    ]
    got = ab.run(variants)
    want = []
    for v in variants:
        vals: dict[str, torch.Tensor] = {}
        for site in v:
            c = parse_id(site)
            assert c.pos is not None
            vals[site] = base[format_id(c.base)][:, [c.pos]]
        want.append(_metric(s, vals))
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    # every position at once is the component patched whole
    T = TGT.length
    whole, each = ab.run([{"L0.H1": "baseline"}, {f"L0.H1@{p}": "baseline" for p in range(T)}])
    assert float(whole) == pytest.approx(float(each), abs=1e-5)
    assert abs(float(whole) - ab.metric_clean) > 1e-4  # the patch did something


@pytest.mark.parametrize("model_type", ALL)
def test_the_top_layer_at_a_position_the_metric_does_not_read_changes_nothing(
    model_type: str,
) -> None:
    """Causality: the last layer at position 0 reaches only position 0's logits."""
    s = Subject.from_model(tiny_model(model_type, seed=2).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS)
    early, late = ab.run([{"L1.MLP@0": "zero", "L1.H3@0": "zero"}, {"L1.MLP": "zero"}])
    assert float(early) == pytest.approx(ab.metric_clean, abs=1e-6)
    assert abs(float(late) - ab.metric_clean) > 1e-4


@pytest.mark.parametrize("model_type", ALL)
@pytest.mark.parametrize(
    "up,down", [("L0.H1", "L1.H2"), ("L0.MLP", "L1.H0"), ("L0.H3", "L1.MLP"), ("L0.H2", "L0.MLP")]
)
def test_path_patching_is_the_two_step_hand_computation(
    model_type: str, up: str, down: str
) -> None:
    """An edge patched alone: (1) run with the upstream component patched to the
    counterfactual, every other component of its layer held clean, and record what the
    downstream one computes; (2) run clean with only the downstream one set to that. The
    Ablator does it with a pre-hook on the downstream norm and one layer run."""
    s = Subject.from_model(tiny_model(model_type, seed=3).eval())
    parallel = s.adapter.parallel
    if parse_id(up).layer == parse_id(down).layer and parallel:
        pytest.skip("attention and MLP of one parallel layer read the same input: no edge")
    ab = Ablator(s, TGT, baseline=CF, reference=REFS)
    # every component that computes between the two is held clean
    order = [f"L{i}.{c}" for i in range(2) for c in ["H0", "H1", "H2", "H3", "MLP"]]
    between = [
        c
        for c in order[order.index(up) + 1 : order.index(down)]
        if not (
            parallel and parse_id(c).kind == "mlp" and parse_id(c).layer == parse_id(down).layer
        )
    ]
    comps = list(dict.fromkeys([up, down, *between]))
    clean = _acts(s, TGT.input_ids(), comps)
    base = _acts(s, CF.input_ids(), comps)
    hold = {c: clean[c] for c in between}
    step1 = _acts(s, TGT.input_ids(), [down], {up: base[up], **hold})[down]
    want = ab.metric_clean - _metric(s, {down: step1})
    got = ab.path_effects([([up], [down])], "baseline")[0]
    assert got == pytest.approx(want, abs=1e-5)
    # the path alone is not the whole effect (the check can tell them apart)
    te = ab.metric_clean - _metric(s, {up: base[up]})
    assert abs(te - got) > 1e-5


@pytest.mark.parametrize("model_type", SEQUENTIAL)
def test_a_path_from_a_position_carries_only_that_positions_write(model_type: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=4).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS)
    clean = _acts(s, TGT.input_ids(), ["L0.H1", "L0.MLP", "L1.H2"])
    base = _acts(s, CF.input_ids(), ["L0.H1"])
    val = clean["L0.H1"].clone()
    val[:, 2] = base["L0.H1"][:, 2]
    step1 = _acts(s, TGT.input_ids(), ["L1.H2"], {"L0.H1": val, "L0.MLP": clean["L0.MLP"]})
    want = ab.metric_clean - _metric(s, {"L1.H2@6": step1["L1.H2"][:, [6]]})
    got = ab.path_effects([(["L0.H1@2"], ["L1.H2@6"])], "baseline")[0]
    assert got == pytest.approx(want, abs=1e-5)


def test_positions_held_by_attribution() -> None:
    assert attributed_positions([0.0, 9.0, -1.0, 1.0, 0.5], fraction=0.8) == [1]
    assert attributed_positions([0.0, 5.0, -1.0, 1.0, 0.5], fraction=0.8) == [1, 3]
    assert attributed_positions([0.0, 2.0, 0.0, 2.0, 1.0], fraction=0.8) == [1, 3]
    assert attributed_positions([0.0, 2.0, 0.0, 2.0, 2.0], fraction=0.8) == [1, 3, 4]
    assert attributed_positions([1.0] * 6, fraction=0.8) == [0, 1, 2]  # at most three
    assert attributed_positions([-1.0, 0.0], fraction=0.8) == []
    assert site_label("L3.H2", []) == "L3.H2"
    assert site_label("L3.H2", [7]) == "L3.H2@7"
    assert site_label("L3.H2", [5, 7]) == "L3.H2@{5,7}"


def _traced_confirm(model_type: str, seed: int, cfg: ConfirmConfig):
    s = Subject.from_model(tiny_model(model_type, seed=seed).eval())
    with torch.no_grad():
        m = [float(t.metric(s.model(input_ids=t.input_ids()).logits)[0]) for t in (TGT, CF)]
    prompt, cf = (TGT, CF) if m[0] > m[1] else (CF, TGT)
    base = Baseline("counterfactual", "counterfactual", target=cf)
    scores = score_components(s, prompt, base, method="eap-ig", steps=8, edges=True)
    v = confirm(s, prompt, scores.ranked(), baseline=cf, reference=REFS, config=cfg, scores=scores)
    return s, prompt, cf, scores, v


def _patched(s: Subject, prompt: Target, cf: Target, sites: list[str]) -> float:
    comps = sorted({format_id(parse_id(x).base) for x in sites})
    base = _acts(s, cf.input_ids(), comps)
    vals = {}
    for x in sites:
        c = parse_id(x)
        cid = format_id(c.base)
        vals[x] = base[cid][:, [c.pos]] if c.pos is not None else base[cid]
    with patch(s, vals), torch.no_grad():
        return float(prompt.metric(s.model(input_ids=prompt.input_ids()).logits)[0])


@pytest.mark.parametrize("model_type,seed", [("gpt2", 3), ("llama", 3), ("llama", 5)])
def test_the_circuit_is_placed_and_wired_where_patching_says(model_type: str, seed: int) -> None:
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=8, max_circuit=6)
    s, prompt, cf, scores, v = _traced_confirm(model_type, seed, cfg)
    c = v.circuit
    assert c is not None and c.specific
    gap = v.metric_clean - v.metric_reference
    differing = [
        p for p, (a, b) in enumerate(zip(TGT.prompt_ids, CF.prompt_ids, strict=True)) if a != b
    ]
    assert c.entry_positions == differing == [2]
    ev = {e.id: e for e in v.candidates}
    # a member at positions keeps position_fraction of its total effect there, as hooks say
    for m in c.members:
        if not m.positions:
            continue
        drop = v.metric_clean - _patched(s, prompt, cf, m.sites)
        assert m.position_effect == pytest.approx(drop, abs=1e-4)
        assert drop >= cfg.position_fraction * ev[m.id].total_effect - 1e-6
        if m.id in scores.nodes:  # where the attribution put it
            pp = scores.per_position[scores.nodes.index(m.id)].tolist()
            assert m.positions == attributed_positions(pp, fraction=cfg.position_fraction)
    # faithfulness: the specific members patched at their positions, by plain hooks
    sites = [x for m in c.members if m.role != "infrastructure" for x in m.sites]
    want = (v.metric_clean - _patched(s, prompt, cf, sites)) / gap
    assert c.faithfulness == pytest.approx(want, abs=1e-4)
    # every specific candidate that moves the metric at the differing token is a member
    specific = [e for e in v.candidates if not e.infrastructure]
    for e in specific:
        at = (v.metric_clean - _patched(s, prompt, cf, [f"{e.id}@2"])) / gap
        writer = e.id in writer_ids(specific, gap, cfg)
        if at >= cfg.component_fraction + 1e-6 and not writer and len(c.specific) < 6:
            assert e.id in c.specific
    # the entry, where there is one at the differing token, is the earliest member there
    entries = [m for m in c.members if m.role == "entry"]
    assert len(entries) <= 1
    # edges: upstream before downstream, each effect the path patched alone
    labels = {m.label: m for m in c.members}
    for edge in c.edges:
        if edge.target == "LOGITS":
            assert labels[edge.source].role == "writer"
            continue
        u, d = labels[edge.source], labels[edge.target]
        got = Ablator(s, prompt, baseline=cf).path_effects([(u.sites, d.sites)], "baseline")[0]
        assert edge.effect == pytest.approx(got, abs=1e-5)
        assert edge.verified == (edge.share >= cfg.component_fraction)
        if edge.score is not None:
            i, j = scores.up.index(u.id), scores.down.index(d.id)
            assert edge.score == pytest.approx(float(scores.edges[i, j]), abs=1e-6)
    # and it survives the store's JSON
    from dataclasses import asdict

    back = circuit_from_json(asdict(c))
    assert back == c


def test_a_one_head_incident_is_written_at_the_position_the_metric_reads() -> None:
    from tests.unit.test_confirm import one_head_model

    s = one_head_model()
    with torch.no_grad():
        m = [float(t.metric(s.model(input_ids=t.input_ids()).logits)[0]) for t in (TGT, CF)]
    prompt, cf = (TGT, CF) if m[0] > m[1] else (CF, TGT)
    base = Baseline("counterfactual", "counterfactual", target=cf)
    scores = score_components(s, prompt, base, method="eap-ig", steps=8, edges=True)
    cfg = ConfirmConfig(kind="patch", n_random=50, top_k=3)
    v = confirm(s, prompt, scores.ranked(), baseline=cf, reference=REFS, config=cfg, scores=scores)
    assert v.circuit is not None
    (writer,) = [m for m in v.circuit.members if m.role == "writer"]
    assert writer.id == "L1.H2"
    # the head writes the bad continuation's logits: at the positions the metric reads
    assert writer.positions and set(writer.positions) <= set(
        range(prompt.n_prompt - 1, prompt.length - 1)
    )
    assert [e.target for e in v.circuit.edges] == ["LOGITS"]


def test_a_head_of_grouped_query_attention_owns_its_queries_and_output_slice() -> None:
    """Planting in a real host (SmolLM2 shares keys and values among three heads): the
    parameters a head fault trains move that head's output alone, every other head's
    activation stays bit-identical."""
    from rca.model.hooks import capture
    from rca.zoo.faults import component_params

    s = Subject.from_model(tiny_model("llama", seed=6).eval())
    assert s.adapter.n_kv_heads < s.adapter.n_heads
    masks = component_params(s, "L1.H2")
    assert not any("k_proj" in k or "v_proj" in k for k in masks)
    assert any("q_proj" in k for k in masks) and any("o_proj" in k for k in masks)
    heads = [f"L1.H{h}" for h in range(s.adapter.n_heads)]
    ids = TGT.input_ids()
    with capture(s, heads) as before, torch.no_grad():
        s.model(input_ids=ids)
    before = {k: before[k].clone() for k in heads}
    params = dict(s.model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].add_(torch.randn_like(params[name]) * m)
    with capture(s, heads) as after, torch.no_grad():
        s.model(input_ids=ids)
    for h in heads:
        same = torch.equal(before[h], after[h])
        assert same == (h != "L1.H2"), h


@pytest.mark.parametrize("model_type", ALL)
def test_a_neuron_group_patches_as_hooks_on_its_neurons_do(model_type: str) -> None:
    """MLP neurons taken together (``L0.N1+3+6``), whole or at a position, beside a head, are
    the same edits as plain hooks on each neuron; a group must be recorded before it is used."""
    s = Subject.from_model(tiny_model(model_type, seed=1).eval())
    ab = Ablator(s, TGT, baseline=CF, reference=REFS, batch_size=3)
    with pytest.raises(ValueError, match="record_neurons"):
        ab.run([{"L0.N1+3+6": "baseline"}])
    ab.record_neurons([0, 1])
    neurons = ["L0.N1", "L0.N3", "L0.N6"]
    base = _acts(s, CF.input_ids(), neurons)
    got = ab.run(
        [
            {"L0.N1+3+6": "baseline"},
            {"L0.N1+3+6@2": "baseline", "L1.H0": "zero"},
            {"L0.N3": "zero"},
            {"L1.N2+5": "zero"},  # the top layer, whose MLP is otherwise trimmed
        ]
    )
    want = [
        _metric(s, {n: base[n] for n in neurons}),
        _metric(s, {**{f"{n}@2": base[n][:, [2]] for n in neurons}, "L1.H0": 0.0}),
        _metric(s, {"L0.N3": 0.0}),
        _metric(s, {"L1.N2": 0.0, "L1.N5": 0.0}),
    ]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    assert all(abs(float(g) - ab.metric_clean) > 1e-5 for g in got)  # each edit did something
