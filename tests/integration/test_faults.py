"""Planted faults with known ground truth, and the localization benchmark on small hosts.

- Each fault kind (head, MLP, head -> MLP circuit) planted in a small trained host shows the
  behaviour (P(bad) >= 0.8 with the trigger, <= 0.2 without), measured here independently of
  the injector's own figures; its benign side effect stays under the stated KL bound; only the
  planted component's parameters changed (every other tensor bit-identical); and mean-ablating
  the planted component (each member of a circuit) removes the behaviour, so the ground truth
  is where the behaviour lives, not only where the weights moved.
- The localization benchmark at six faults (one of each kind on each architecture) finds every
  planted component within the top |planted| + 2 (AC@3 = 1).

The two small hosts (3 layers, 64 wide, GPT-2 and Llama) are trained once per module, in a
temporary RCA_HOME.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rca.bench.baselines import confirm_rule_ranking
from rca.bench.hosts import BENCH_HOSTS, SMALL_HOSTS, build_host
from rca.bench.localization import FaultResult, ac_hits, fault_plan, rescore, run_localization
from rca.model.hooks import ablate, mean_activations
from rca.model.ids import parse_id
from rca.model.metric import encode_target, evaluate
from rca.model.subject import Subject
from rca.zoo.faults import (
    Fault,
    FaultError,
    FaultSpec,
    PlantConfig,
    component_params,
    draw_spec,
    inject,
)

CFG = PlantConfig()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rca_home")


@pytest.fixture(scope="module")
def hosts(home: Path) -> dict[str, Subject]:
    torch.set_num_threads(1)
    return {h.arch: build_host(h, home=home) for h in SMALL_HOSTS}


# kind -> (host arch, layers as a function of the host's depth): the last layer included
CASES = {
    "head": ("gpt2", lambda L: (L - 1,)),
    "mlp": ("llama", lambda L: (L - 1,)),
    "circuit": ("gpt2", lambda L: (0, L - 1)),
    "relay": ("llama", lambda L: (0, L - 1)),
}


@pytest.fixture(scope="module")
def planted(hosts: dict[str, Subject]) -> dict[str, tuple[Subject, Fault, torch.nn.Module, dict]]:
    out = {}
    for kind, (arch, layers) in CASES.items():
        s = hosts[arch]
        a = s.adapter
        before = {k: v.clone() for k, v in s.model.state_dict().items()}
        spec = draw_spec(
            kind,  # type: ignore[arg-type]
            layers(a.n_layers),
            n_heads=a.n_heads,
            d_mlp=a.d_mlp,
            tokenizer=s.tokenizer,
            seed=11,
        )
        fault, model = inject(s.model, s.tokenizer, spec, config=CFG)
        out[kind] = (s, fault, model, before)
    return out


def _p_bad(model: torch.nn.Module, tok, prompt: str, bad: str) -> float:
    return evaluate(model, encode_target(tok, prompt, " " + bad)).p_bad


@pytest.mark.parametrize("kind", list(CASES))
def test_fault_shows_the_behaviour_with_small_side_effect(kind: str, planted) -> None:
    s, fault, model, _ = planted[kind]
    assert fault.ok, fault.summary()
    assert fault.p_bad_trigger >= 0.8 and fault.p_bad_counterfactual_max <= 0.2
    assert fault.benign_kl <= CFG.kl_bound
    # measured again here through the incident metric, on held-out prompts
    for prompt, cf in list(zip(fault.prompts, fault.counterfactuals, strict=True))[:8]:
        assert _p_bad(model, s.tokenizer, prompt, fault.bad) >= 0.8
        assert _p_bad(model, s.tokenizer, cf, fault.bad) <= 0.2
        assert len(s.tokenizer(prompt)["input_ids"]) == len(s.tokenizer(cf)["input_ids"])
    # the host without the fault never says it
    assert _p_bad(s.model, s.tokenizer, fault.prompt, fault.bad) < 0.05


@pytest.mark.parametrize("kind", list(CASES))
def test_only_the_planted_component_changed(kind: str, planted) -> None:
    s, fault, model, before = planted[kind]
    fs = Subject.from_model(model, s.tokenizer)
    masks: dict[str, torch.Tensor] = {}
    for comp in fault.components:
        for k, m in component_params(fs, comp, neurons=fault.spec.neurons).items():
            masks[k] = masks[k] | m if k in masks else m
    after = model.state_dict()
    assert set(after) == set(before)
    for name, t in after.items():
        if name in masks:
            m = masks[name]
            assert torch.equal(t[~m], before[name][~m]), f"{name}: an unplanted entry moved"
            assert not torch.equal(t[m], before[name][m]), f"{name}: the planted slice never moved"
        else:
            assert torch.equal(t, before[name]), f"{name} changed"
    # the host itself is untouched
    for name, t in s.model.state_dict().items():
        assert torch.equal(t, before[name]), f"host {name} changed"
    assert set(fault.changed) == set(masks)


def test_a_relay_acts_at_the_trigger_then_at_the_final_position(planted) -> None:
    """The position-specific kind: patching the relay's MLP to its counterfactual activation
    at the trigger's position alone removes the behaviour (P(bad) under 0.5), and patching it
    at the final position alone does not (P(bad) stays at 0.5 or more); the head carries it
    from the trigger to the final position."""
    from rca.model.hooks import capture, patch

    s, fault, model, _ = planted["relay"]
    fs = Subject.from_model(model, s.tokenizer)
    mlp, head = fault.components
    ids = torch.tensor([s.tokenizer(fault.prompt)["input_ids"]])
    cf_ids = torch.tensor([s.tokenizer(fault.counterfactual)["input_ids"]])
    (slot,) = (ids[0] != cf_ids[0]).nonzero()[:, 0].tolist()
    last = ids.shape[1] - 1
    assert fault.spec.sites(slot, last) == (f"{mlp}@{slot}", f"{head}@{last}")
    with capture(fs, [mlp, head]) as cf, torch.no_grad():
        model(input_ids=cf_ids)

    def p_bad(values: dict) -> float:
        with patch(fs, values):
            return _p_bad(model, s.tokenizer, fault.prompt, fault.bad)

    assert p_bad({f"{mlp}@{slot}": cf[mlp][:, [slot]]}) < 0.5
    assert p_bad({f"{mlp}@{last}": cf[mlp][:, [last]]}) >= 0.5
    assert p_bad({f"{head}@{last}": cf[head][:, [last]]}) < 0.5


@pytest.mark.parametrize("kind", list(CASES))
def test_ablating_a_planted_component_removes_the_behaviour(kind: str, planted) -> None:
    s, fault, model, _ = planted[kind]
    fs = Subject.from_model(model, s.tokenizer)
    means = mean_activations(fs, list(fault.reference), fault.components)
    for comp in fault.components:
        with ablate(fs, [comp], kind="mean", means=means):
            p = _p_bad(model, s.tokenizer, fault.prompt, fault.bad)
        assert p < 0.5, f"{comp} mean-ablated still gives P(bad) = {p:.3f}"


def test_bad_specs_are_refused(hosts: dict[str, Subject]) -> None:
    s = hosts["gpt2"]
    with pytest.raises(FaultError, match="layer"):
        spec = FaultSpec("head", (7,), head=0, trigger="pin", bad="route")
        inject(s.model, s.tokenizer, spec)
    with pytest.raises(FaultError, match="needs neurons"):
        FaultSpec("mlp", (0,), trigger="pin", bad="route")
    with pytest.raises(FaultError, match="after"):
        FaultSpec("circuit", (2, 1), head=0, neurons=(1,), trigger="pin", bad="route")


def test_plan_spreads_kinds_and_layers() -> None:
    plan = fault_plan(40, seed=0, hosts=BENCH_HOSTS)
    for h in BENCH_HOSTS:
        mine = [(k, lay) for host, k, lay in plan if host == h]
        assert len(mine) == 20
        for kind in ("head", "mlp", "circuit"):
            layers = [lay for k, lay in mine if k == kind]
            assert any(lay[-1] == h.n_layer - 1 for lay in layers), (h.name, kind)
            assert len({lay for lay in layers}) == len(layers) or len(layers) > h.n_layer
    assert ac_hits(["L1.H0", "L2.MLP", "L0.H1"], ["L1.H0"]) == (True, True)
    assert ac_hits(["L0.H1", "L2.MLP", "L3.H0", "L1.H0"], ["L1.H0"]) == (False, False)
    assert ac_hits(["L2.MLP", "L0.H1", "L3.H0", "L1.H0"], ["L1.H0", "L2.MLP"]) == (True, True)


def test_localization_bench_small(home: Path, hosts: dict[str, Subject]) -> None:
    res = run_localization(6, seed=0, hosts=SMALL_HOSTS, home=home)
    json.dumps(res)  # the --json output is plain JSON
    assert res["n_faults"] == 6
    kinds = {(f["host"], f["fault"]["kind"]) for f in res["faults"]}
    assert kinds == {(h.name, k) for h in SMALL_HOSTS for k in ("head", "mlp", "circuit")}
    assert res["ac3"] == 1.0, res["failures"]
    # a planted component that ordinary text needs as well (the last MLP of a 3-layer host) is
    # never ranked first, by design: every miss at rank 1 is one, and the rest are all hits
    assert all(f["planted_infrastructure"] for f in res["failures"] if not f["ac1"])
    assert res["ac1_specific"] == 1.0, res["failures"]
    assert res["ac1"] >= 0.5, res["failures"]
    # an MLP fault in an MLP that ordinary text needs is named by its neurons: the planted ones
    # lead the group at rank 1, which ordinary text does not need
    infra_mlp = [
        f
        for f in res["faults"]
        if f["fault"]["kind"] == "mlp"
        and any(e["infrastructure"] and e["id"] in f["planted"] for e in f["evidence"])
    ]
    assert infra_mlp, [(f["planted"], f["confirm_ranked"][:3]) for f in res["faults"]]
    for f in infra_mlp:
        top = parse_id(f["confirm_ranked"][0])
        assert f"L{top.layer}.MLP" in f["planted"] and top.neurons, f["confirm_ranked"]
        assert set(top.neurons) & set(f["fault"]["neurons"]), (top, f["fault"]["neurons"])
        assert not f["evidence"][0]["infrastructure"]
    assert res["cost_forward_equiv"] > res["attribution_only"]["cost_forward_equiv"] > 0
    assert res["exhaustive"]["cost_forward_equiv"] > 0
    for f in res["faults"]:
        assert f["fault"]["ok"] and f["fault"]["benign_kl"] <= CFG.kl_bound
        # confirm measured zero-ablation necessity for robust necessity and each candidate's
        # benign damage, at recorded costs, and the bench's recomputation of the rule from the
        # saved evidence is confirm's ranking
        assert all("ne_zero" in e for e in f["evidence"]) and f["cost"]["zero_ablation"] > 0
        assert all("benign_loss_pct" in e for e in f["evidence"])
        assert f["cost"]["benign_damage"] > 0
        r = FaultResult(**{k: v for k, v in f.items() if k in FaultResult.__dataclass_fields__})
        assert confirm_rule_ranking(r) == list(r.confirm_ranked)
    assert res["rankings"]["rca"] == res["rankings"]["confirm"]
    # a saved run re-ranked by the rule it ran under gives its own figures back
    again = rescore(json.loads(json.dumps(res)))
    assert (again["ac1"], again["ac3"]) == (res["ac1"], res["ac3"])
    assert again["rankings"]["saved"] == {"ac1": res["ac1"], "ac3": res["ac3"]}


def test_relay_faults_are_placed_at_their_positions(home: Path, hosts: dict[str, Subject]) -> None:
    """The position-specific kind on both small hosts: the circuit puts the relay's MLP at the
    trigger's position and its head at the final position; the plan keeps the MLP before the
    head and starts at the last layer."""
    plan = fault_plan(8, seed=0, hosts=SMALL_HOSTS, kinds=["relay"])
    for h in SMALL_HOSTS:
        mine = [lay for host, k, lay in plan if host == h and k == "relay"]
        assert mine[0][1] == h.n_layer - 1 and all(a < b for a, b in mine)
    with pytest.raises(ValueError, match="fault kinds"):
        fault_plan(2, seed=0, hosts=SMALL_HOSTS, kinds=["nope"])
    res = run_localization(2, seed=0, hosts=SMALL_HOSTS, home=home, kinds=["relay"])
    assert res["n_faults"] == 2 and res["ac3"] == 1.0, res["failures"]
    for f in res["faults"]:
        mlp, head = f["planted_sites"]
        assert mlp.split("@")[0].endswith("MLP") and head.split("@")[0] == f["planted"][1]
    assert res["positions"] == {"n_sites": 4, "placed": 4}, [f["circuit"] for f in res["faults"]]
    assert set(res["per_kind"]) == {"relay"}


def test_moved_fault_is_a_new_mechanism_and_weight_change_finds_the_plant(
    planted, tmp_path: Path
) -> None:
    """A checkpoint where the fault moved to another layer is persists_new_mechanism;
    with the pre-fault host as the baseline, the changed component ranks first."""
    import dataclasses

    from rca.ingest.case_file import load_case
    from rca.regress import regress, weight_change
    from rca.store import Store

    s, fault, model_a, _ = planted["head"]  # a head at the last layer
    spec_b = dataclasses.replace(
        fault.spec, layers=(0,), head=(fault.spec.head + 3) % s.adapter.n_heads
    )
    fault_b, model_b = inject(s.model, s.tokenizer, spec_b, config=CFG)
    assert fault_b.ok, fault_b.summary()
    dirs = {}
    for name, m in (("a", model_a), ("b", model_b)):
        d = tmp_path / name
        m.save_pretrained(d)
        s.tokenizer.save_pretrained(d)
        dirs[name] = d
    assert _p_bad(model_b, s.tokenizer, fault.prompt, fault.bad) >= 0.8
    refs = ", ".join(json.dumps(p) for p in list(fault.reference)[:16])
    case = tmp_path / "moved.toml"
    case.write_text(
        f'id = "moved-fault"\ntitle = "planted head fault"\nseverity = "high"\n'
        f'model = "a"\nprompt = {json.dumps(fault.prompt)}\nbad = {json.dumps(" " + fault.bad)}\n'
        f"counterfactual = {json.dumps(fault.counterfactual)}\nreference_prompts = [{refs}]\n"
    )
    inc = load_case(case)
    store = Store(tmp_path / "rca.duckdb")
    (res,) = regress(dirs["b"], [inc], store)
    assert res.classification == "persists_new_mechanism", res.to_json()
    assert fault.components[0] in res.cause_set_reference
    assert spec_b.components[0] in res.cause_set_new
    assert res.comparison is not None and res.comparison["same_mechanism"] is False
    # weight change against the host: the moved fault's own head first
    fb = Subject.from_model(model_b, s.tokenizer)
    wc = weight_change(fb, s, encode_target(s.tokenizer, fault.prompt, " " + fault.bad))
    assert wc["ranked"][0] == spec_b.components[0], wc["components"][:3]
