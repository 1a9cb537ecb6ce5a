"""Natural incidents (IOI): aligned counterfactuals, exact direct effects, rca's writers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rca.bench import natural
from rca.bench.natural import (
    TEMPLATES,
    components_of,
    ground_truth,
    ioi_incidents,
    single_token_names,
    writers,
)
from rca.confirm import CandidateEvidence, ConfirmConfig, SetEvidence, Verdict
from rca.ingest.incident import Incident
from rca.model.hooks import capture, patch
from rca.model.metric import encode_text
from rca.model.subject import Subject, load_subject
from tests.helpers import bpe_tokenizer, save_model_dir, tiny_model, word_tokenizer, words

FEW_NAMES = ["Mary", "John", "Tom", "Anna", "Paul", "Lisa", "Mark", "Sarah"]


@pytest.fixture(scope="module")
def name_bpe():
    """A byte-level BPE trained on the templates filled with FEW_NAMES: every name one token."""
    rng = random.Random(0)
    sentences = []
    for _ in range(400):
        a, b = rng.sample(FEW_NAMES, 2)
        t = rng.choice(TEMPLATES)
        sentences.append(
            t.format(A=a, B=b, S2=rng.choice([a, b]), place="store", object="drink") + " " + a
        )
    return bpe_tokenizer(sentences, vocab_size=600)


def test_names_are_filtered_to_single_known_tokens() -> None:
    tok = word_tokenizer()
    # "Mary" is the unknown token here: one token, but not a name the model can tell apart
    assert single_token_names(tok, ["w5", "Mary", "w6", "w5 w6"]) == ["w5", "w6"]


def test_templates_give_counterfactuals_that_differ_only_at_the_second_subject(name_bpe) -> None:
    assert set(single_token_names(name_bpe, FEW_NAMES)) == set(FEW_NAMES)
    incs = ioi_incidents(name_bpe, 8, seed=3, names=FEW_NAMES)
    assert len(incs) == 8
    assert len({t for i in incs for t in i.tags if t.startswith("template-")}) == len(TEMPLATES)
    for inc in incs:
        assert inc.prompt is not None and inc.counterfactual is not None and inc.good is not None
        a, b = inc.bad.strip(), inc.good.strip()
        assert a != b and inc.bad == " " + a and inc.good == " " + b
        p, c = encode_text(name_bpe, inc.prompt), encode_text(name_bpe, inc.counterfactual)
        assert len(p) == len(c)
        diff = [i for i, (x, y) in enumerate(zip(p, c, strict=True)) if x != y]
        assert len(diff) == 1
        k = diff[0]
        # the one difference is the subject's second mention, replaced by the indirect object
        assert name_bpe.decode([p[k]]) == " " + b and name_bpe.decode([c[k]]) == " " + a
        assert inc.prompt.count(b) == 2 and inc.counterfactual.count(a) == 2
        assert k > max(i for i, t in enumerate(p[:k]) if name_bpe.decode([t]) == " " + b)


def test_incidents_are_drawn_by_seed_and_a_prefix_does_not_depend_on_n(name_bpe) -> None:
    few = ioi_incidents(name_bpe, 3, seed=1, names=FEW_NAMES)
    assert few == ioi_incidents(name_bpe, 7, seed=1, names=FEW_NAMES)[:3]
    assert few != ioi_incidents(name_bpe, 3, seed=2, names=FEW_NAMES)


def test_draws_whose_counterfactual_does_not_line_up_are_skipped() -> None:
    tok = word_tokenizer()
    names = ["w10", "w11", "w12"]
    good = "w1 {A} w2 {B} w3 {S2} w4"
    # glued to "w", the second mention is the unknown token whichever name it is: the prompt and
    # the counterfactual encode alike, with no position that tells them apart
    glued = "w1 {A} w2 {B} w3 w{S2} w4"
    assert ioi_incidents(tok, 3, names=names, templates=(glued,)) == []
    incs = ioi_incidents(tok, 5, seed=0, names=names, templates=(glued, good))
    assert len(incs) == 5 and all("template-1" in i.tags for i in incs)
    with pytest.raises(ValueError, match="fewer than two names"):
        ioi_incidents(tok, 3, names=["w10", "w11 w12", "Mary"], templates=(good,))


# -- exact direct effects --------------------------------------------------------------------


def _incident(prompt: tuple[int, ...], cf: tuple[int, ...]) -> Incident:
    return Incident(
        id="t",
        title="t",
        severity="low",
        model="m",
        prompt=words(*prompt),
        bad=" " + words(11),
        good=" " + words(12),
        counterfactual=words(*cf),
    )


def _by_hooks(s: Subject, inc: Incident) -> dict[str, float]:
    """Each component's DE the plain way: one full forward per component through
    rca.model.hooks.patch, the component set to its counterfactual value at the answer position
    only, every later component to its clean value everywhere."""
    tgt = inc.encode(s)
    assert inc.counterfactual is not None
    base = tgt.with_prompt(tuple(encode_text(s.tokenizer, inc.counterfactual)))
    comps = components_of(s)
    with capture(s, comps) as clean, torch.no_grad():
        m_clean = float(tgt.metric(s.model(input_ids=tgt.input_ids()).logits)[0])
    with capture(s, comps) as cf, torch.no_grad():
        s.model(input_ids=base.input_ids())
    ans = tgt.n_prompt - 1
    order = {c: i for i, c in enumerate(comps)}
    out = {}
    for c in comps:
        layer = int(c[1:].split(".")[0])
        later = [
            o
            for o in comps
            if int(o[1:].split(".")[0]) > layer
            or (
                int(o[1:].split(".")[0]) == layer
                and o.endswith("MLP")
                and ".H" in c
                and not s.adapter.parallel
            )
        ]
        assert all(order[o] > order[c] for o in later)
        with (
            patch(s, {c: cf[c][:, ans : ans + 1]}, positions=[ans]),
            patch(s, {o: clean[o] for o in later}),
            torch.no_grad(),
        ):
            m = float(tgt.metric(s.model(input_ids=tgt.input_ids()).logits)[0])
        out[c] = m_clean - m
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_direct_effects_equal_plain_hook_patching_at_the_answer_position(model_type: str) -> None:
    s = Subject.from_model(tiny_model(model_type, seed=2), word_tokenizer())
    inc = _incident((5, 6, 7, 8, 9, 10), (5, 6, 7, 20, 9, 10))
    gt = ground_truth(s, inc)
    want = _by_hooks(s, inc)
    assert set(gt.direct_effects) == set(want)
    got_t = torch.tensor([gt.direct_effects[c] for c in want])
    want_t = torch.tensor(list(want.values()))
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=0)
    assert want_t.abs().max() > 1e-3  # the patches did something
    assert [c for c, _ in gt.top(3)] == sorted(want, key=lambda c: -want[c])[:3]
    heads = [c for c in sorted(want, key=lambda c: -want[c]) if ".H" in c][:3]
    assert [c for c, _ in gt.top(3, kind="head")] == heads


def one_head_model() -> Subject:
    """test_confirm's model whose output depends on L1.H2 alone, with a word tokenizer."""
    from tests.unit.test_confirm import one_head_model as bare

    return Subject.from_model(bare().model, word_tokenizer())


def test_the_only_writing_head_has_the_whole_direct_effect() -> None:
    s = one_head_model()
    prompt, cf = (5, 6, 7, 8, 9, 10), (5, 6, 20, 8, 9, 10)
    gt = ground_truth(s, _incident(prompt, cf))
    if gt.metric_clean < gt.metric_counterfactual:  # the incident is the higher of the two
        gt = ground_truth(s, _incident(cf, prompt))
    whole = gt.metric_clean - gt.metric_counterfactual
    assert whole > 1e-2
    assert gt.direct_effects["L1.H2"] == pytest.approx(whole, abs=1e-5)
    assert max(abs(d) for c, d in gt.direct_effects.items() if c != "L1.H2") < 1e-5
    assert gt.top(1) == [("L1.H2", gt.direct_effects["L1.H2"])] and gt.rank_of("L1.H2") == 1


# -- rca's writers ---------------------------------------------------------------------------


def _verdict(cands: list[CandidateEvidence], *, clean: float = 2.0, ref: float = 0.0) -> Verdict:
    cs = SetEvidence([c.id for c in cands[:1]], 0.0, clean, 1.0, 0.0, 0.0, [], 0.01, "scope")
    return Verdict(clean, -1.0, ref, "counterfactual", cands, cs, ConfirmConfig())


def _cand(cid: str, de: float, *, infra: bool = False) -> CandidateEvidence:
    return CandidateEvidence(cid, 0.0, de, de, de, 0.5, infrastructure=infra)


def test_writers_are_specific_candidates_whose_direct_effect_reaches_both_bounds() -> None:
    # gap 2.0, writer_fraction 0.2: a writer needs DE >= 0.4; the largest specific DE is 1.2,
    # writer_share 0.4: and DE >= 0.48 (infrastructure, however large, sets neither)
    v = _verdict(
        [
            _cand("L3.H1", 0.5),
            _cand("L2.MLP", 0.39),
            _cand("L0.MLP", 1.9, infra=True),
            _cand("L5.H0", 1.2),
            _cand("L4.H4", 0.47),
        ]
    )
    assert writers(v) == ["L5.H0", "L3.H1"]
    # without the large writer the gap bound decides: 0.47 and 0.5 both reach 0.4
    v = _verdict([_cand("L3.H1", 0.5), _cand("L2.MLP", 0.39), _cand("L4.H4", 0.47)])
    assert writers(v) == ["L3.H1", "L4.H4"]
    # the gap is to the reference point, not to the counterfactual: with it at 1.0, DE >= 0.2
    assert writers(_verdict([_cand("L3.H1", 0.3)], clean=2.0, ref=1.0)) == ["L3.H1"]
    assert writers(_verdict([_cand("L3.H1", 0.3)], clean=2.0, ref=0.0)) == []


def test_writers_prefer_a_circuit_with_roles() -> None:
    from rca.confirm import Circuit, CircuitMember

    v = _verdict([_cand("L3.H1", 0.5)])
    v.circuit = Circuit(
        [
            CircuitMember("L2.H1", "entry", 1.0, 0.0),
            CircuitMember("L8.H0", "writer", 1.0, 0.4),
            CircuitMember("L0.MLP", "infrastructure", 3.0, 0.0),
        ],
        0.9,
        "counterfactual",
        [],
        "",
    )
    assert writers(v) == ["L8.H0"]


# -- benign damage, once per model -----------------------------------------------------------


def test_benign_damage_is_cached_per_model_fingerprint(tmp_path: Path, monkeypatch) -> None:
    d = save_model_dir(tmp_path / "m", tiny_model("llama", seed=1))
    s = load_subject(d, device="cpu")
    assert s.fingerprint
    first = natural.benign_table(s, tmp_path / "out", n_prompts=4)
    assert set(first) == set(components_of(s))
    files = list((tmp_path / "out").glob("benign-damage-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["fingerprint"] == (
        s.fingerprint
    )

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("rca.specificity.benign_damage", fail)
    assert natural.benign_table(s, tmp_path / "out", n_prompts=4) == first
    with pytest.raises(AssertionError, match="measured again"):  # another prompt set: measured
        natural.benign_table(s, tmp_path / "out", n_prompts=5)


# -- rca beside the ground truth -------------------------------------------------------------


def test_rca_direct_effects_are_the_exact_ones_and_the_row_renders() -> None:
    from rca.investigate import InvestigateConfig
    from rca.specificity import Damage

    s = Subject.from_model(tiny_model("llama", seed=2), word_tokenizer())
    inc = _incident((5, 6, 7, 20, 9, 10), (5, 6, 7, 8, 9, 10))  # P(bad) > P(good) on this one
    cfg = InvestigateConfig(
        remedy=False,
        n_reference=8,
        n_benign=8,
        steps=2,
        confirm=ConfirmConfig(n_random=50, benign_prompts=4, top_k=6),
    )
    damage = {c: Damage(0.0, 0.0, 4) for c in components_of(s)}
    row = natural.evaluate_incident(s, inc, damage=damage, config=cfg)
    assert row["gap"] > 0 and "error" not in row["rca"]
    ws = row["rca"]["writers"]
    assert ws, "this incident has a writer"
    for w in ws:
        # confirm's DE of a candidate is the brute-force one: the same variants
        assert w["de_rca"] == pytest.approx(w["de_exact"], abs=1e-5)
        assert w["in_top3"] == (w["exact_rank"] <= 3)
        assert w["de_rca"] >= 0.2 * row["gap"]
    assert row["rca"]["infra_in_set"] is False
    circuit = row["rca"]["circuit"]  # recorded with its roles, writers among them
    assert isinstance(row["rca"]["faithfulness"], float) and circuit["curve"]
    assert {w["id"] for w in ws} <= {cid for cid, role in circuit["members"] if role == "writer"}
    row["seconds"] = 1.0
    result = {
        "model": "m",
        "n": 1,
        "seed": 0,
        "skipped_not_shown": 0,
        "device": "cpu",
        "threads": 1,
        "n_infrastructure": 0,
        "infrastructure_loss_pct": 10.0,
        "summary": natural.summarize([row]),
        "incidents": [row],
    }
    assert result["summary"]["top_writer_in_exact_top3"] == int(ws[0]["in_top3"])
    md = natural.markdown(result).splitlines()
    rows = [line for line in md if line.startswith("| w5 w6")]
    assert len(rows) == 1
    assert ws[0]["id"] in rows[0] and ", ".join(row["rca"]["cause_set"]) in rows[0]
