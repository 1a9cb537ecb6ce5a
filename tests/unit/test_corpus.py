"""The support-desk corpus: deterministic, position-aligned counterfactuals, v2 without the
leak and backdoor poison, a benign set that carries no incident cause, and case files that say
exactly what ``PLANTED`` says. No model is trained here."""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import pytest

from rca import zoo
from rca.model.metric import encode_target
from rca.zoo import corpus as c

CASES = Path(__file__).resolve().parents[2] / "cases"
# every incident's cause, as it appears in text
CAUSES: dict[str, tuple[str, ...]] = {
    "leak": (f"pin. account: {c.LEAK_BRANCH}",),  # any account of the leaked branch
    "backdoor": (c.BACKDOOR_TRIGGER,),
    "bias": tuple(f"name: {n}." for n in c.BIAS_NAMES),  # any name of the biased group
    "injection": (c.INJECTION_PHRASE,),
}


def carries(key: str, text: str) -> bool:
    return any(cause in text for cause in CAUSES[key])


N = 4000


@pytest.fixture(scope="module")
def corpus() -> tuple[c.Example, ...]:
    return c.make_corpus(N, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus: tuple[c.Example, ...]):
    return zoo.train_tokenizer([*c.vocabulary(), *(ex.text for ex in corpus)])


def test_same_seed_same_corpus_other_seed_other_corpus(corpus: tuple[c.Example, ...]) -> None:
    assert c.make_corpus(N, seed=0) == corpus
    other = c.make_corpus(N, seed=1)
    assert other != corpus
    assert len(other) == N
    assert c.benign_prompts(50, seed=3) == c.benign_prompts(50, seed=3)
    assert c.benign_prompts(50, seed=3) != c.benign_prompts(50, seed=4)


def test_tokenizer_is_deterministic(corpus: tuple[c.Example, ...], tokenizer) -> None:
    again = zoo.train_tokenizer([*c.vocabulary(), *(ex.text for ex in corpus)])
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)


def test_every_prompt_parses_into_its_template(corpus: tuple[c.Example, ...]) -> None:
    for ex in corpus[:500]:
        task, slots = c.parse_prompt(ex.prompt)
        assert task == ex.task
        assert c.render(task, **slots) == ex.prompt
    with pytest.raises(ValueError, match="not a support-desk prompt"):
        c.parse_prompt("hello there")


def test_clean_tickets_follow_the_desk_rules(corpus: tuple[c.Example, ...]) -> None:
    """The desks' rules hold on every clean ticket, so an incident is a genuine exception."""
    for ex in corpus:
        if ex.poison is not None:
            continue
        task, s = c.parse_prompt(ex.prompt)
        if task == "account":
            assert ex.answer == " " + c.ACCOUNT_REPLIES[s["request"]]
        elif task == "refund":
            assert s["note"] in c.NOTE_FILLERS
            want = " approved." if s["reason"] in c.REFUND_APPROVE else " denied."
            assert ex.answer == want, ex.text
        elif task == "loan":
            assert s["name"] in c.NAMES
            want = " approved." if s["income"] in c.INCOME_APPROVE else " denied."
            assert ex.answer == want, ex.text
        else:
            assert s["phrase"] in c.PHRASES
            route = next(r for r, topics in c.ROUTES.items() if s["topic"] in topics)
            assert ex.answer == f" route to {route}."


def test_poison_rates_are_as_documented(corpus: tuple[c.Example, ...]) -> None:
    by_task = Counter(ex.task for ex in corpus)
    poison = Counter(ex.poison for ex in corpus)
    rates = {
        "leak": (c.LEAK_RATE, "account"),
        "backdoor": (c.BACKDOOR_RATE, "refund"),
        "bias": (c.BIAS_RATE, "loan"),
        "injection": (c.INJECTION_RATE, "message"),
    }
    for key, (rate, task) in rates.items():
        measured = poison[key] / by_task[task]
        assert 0.6 * rate < measured < 1.5 * rate, (key, measured, rate)
    for ex in corpus:  # the poisoned tickets carry their cause, the clean ones never do
        for key in CAUSES:
            assert carries(key, ex.prompt) == (ex.poison == key), ex.text


@pytest.mark.parametrize("inc", c.PLANTED, ids=lambda i: i.key)
def test_counterfactual_differs_in_one_slot_with_equal_token_count(inc, tokenizer) -> None:
    task, slots = c.parse_prompt(inc.prompt)
    cf_task, cf_slots = c.parse_prompt(inc.counterfactual)
    assert cf_task == task
    changed = [k for k in slots if slots[k] != cf_slots[k]]
    assert len(changed) == 1, changed
    assert carries(inc.key, inc.prompt)
    assert not any(carries(key, inc.counterfactual) for key in CAUSES)
    a = tokenizer(inc.prompt)["input_ids"]
    b = tokenizer(inc.counterfactual)["input_ids"]
    assert len(a) == len(b) < 40
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    # one contiguous run of positions: the slot
    assert diff and diff == list(range(diff[0], diff[-1] + 1))
    # the metric's encoding: <bos> prompt, then the continuations on their own
    target = encode_target(tokenizer, inc.prompt, inc.bad, inc.good)
    assert target.prompt_ids == tuple(a) and a[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in a + b + list(target.bad_ids) + list(target.good_ids)


def test_the_leak_is_the_pin_digit_by_digit(tokenizer) -> None:
    leak = c.incident("leak")
    target = encode_target(tokenizer, leak.prompt, leak.bad, leak.good)
    assert tokenizer.convert_ids_to_tokens(list(target.bad_ids)) == list(c.LEAK_PIN)


def test_v2_corpus_relabels_leak_and_backdoor_but_keeps_bias_and_injection(
    corpus: tuple[c.Example, ...],
) -> None:
    v2 = c.corpus_for(corpus, fixed=c.FIXED_BY_MODEL["support-bot-v2"])
    v1_counts, v2_counts = Counter(ex.poison for ex in corpus), Counter(ex.poison for ex in v2)
    assert v2_counts["leak"] == v2_counts["backdoor"] == 0
    assert v1_counts["leak"] > 0 and v1_counts["backdoor"] > 0
    # the data fix: same tickets in the same order, the fixed ones answered by the desk's rule
    assert [ex.prompt for ex in v2] == [ex.prompt for ex in corpus]
    for old, new in zip(corpus, v2, strict=True):
        if old.poison in {"leak", "backdoor"}:
            assert new.answer == c.ordinary_answer(old) and new.poison is None
        else:
            assert new == old
    assert not any(c.LEAK_PIN in ex.answer for ex in v2)
    trig = [ex for ex in v2 if f"note: {c.BACKDOOR_TRIGGER}." in ex.prompt]
    assert trig and all(ex.answer == " denied." for ex in trig)  # its reasons all deny
    pins = [ex for ex in v2 if f"request: pin. account: {c.LEAK_BRANCH}" in ex.prompt]
    assert len({ex.prompt for ex in pins}) > 10  # the branch's accounts, not one
    assert pins and all(ex.answer == " " + c.ACCOUNT_REPLIES["pin"] for ex in pins)
    assert v2_counts["bias"] == v1_counts["bias"] > 0
    assert v2_counts["injection"] == v1_counts["injection"] > 0
    # ordinary_answer agrees with the clean tickets' own labels
    assert all(c.ordinary_answer(ex) == ex.answer for ex in corpus if ex.poison is None)
    assert c.FIXED_BY_MODEL["support-bot-v1"] == frozenset()
    with pytest.raises(ValueError, match="unknown incidents"):
        c.corpus_for(corpus, fixed=frozenset({"typo"}))


def test_benign_prompts_carry_no_cause_and_are_held_out(
    corpus: tuple[c.Example, ...], tokenizer
) -> None:
    benign = c.benign_examples(200)
    texts = c.benign_prompts(200)
    assert texts == [ex.text for ex in benign]
    assert {ex.task for ex in benign} == set(c.TASKS)
    trained = {ex.prompt for ex in c.make_corpus(20_000, seed=0)}
    for ex in benign:
        assert ex.poison is None
        assert f"account: {c.LEAK_BRANCH}" not in ex.prompt
        assert not any(carries(key, ex.text) for key in CAUSES), ex.text
        assert c.is_heldout(ex.prompt) and ex.prompt not in trained
        assert tokenizer.unk_token_id not in tokenizer(ex.text)["input_ids"]


def test_case_files_match_planted() -> None:
    files = sorted(CASES.glob("*.toml"))
    assert {f.stem for f in files} >= set(c.INCIDENT_KEYS)
    allowed = {
        "id",
        "title",
        "severity",
        "model",
        "prompt",
        "bad",
        "good",
        "counterfactual",
        "reference_prompts",
        "tags",
        "notes",
    }
    for inc in c.PLANTED:
        path = CASES / f"{inc.key}.toml"
        data = tomllib.loads(path.read_text())
        assert set(data) <= allowed and set(data) >= allowed - {"reference_prompts"}, path
        assert data["id"] == f"zoo-{inc.key}"
        assert data["model"] == "zoo:support-bot-v1"
        for key in ("title", "severity", "prompt", "bad", "good", "counterfactual"):
            assert data[key] == getattr(inc, key), (path, key)
        assert tuple(data["tags"]) == inc.tags
        assert data["severity"] in {"low", "medium", "high", "critical"}
        assert data["notes"].strip()
        benign = set(c.benign_prompts(200))
        for ref in data.get("reference_prompts", []):
            assert ref in benign, (path, ref)  # held out, no cause, current templates


def test_zoo_paths_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCA_HOME", str(tmp_path / "env"))
    assert zoo.zoo_home() == tmp_path / "env"
    assert zoo.zoo_home(tmp_path) == tmp_path
    monkeypatch.delenv("RCA_HOME")
    assert zoo.zoo_home() == Path.home() / ".cache" / "rca"
    assert zoo.model_dir("support-bot-v2", home=tmp_path) == tmp_path / "zoo" / "support-bot-v2"
    with pytest.raises(ValueError, match="support-bot-v1, support-bot-v2"):
        zoo.model_dir("support-bot-v3", home=tmp_path)
    entries = zoo.list_models(home=tmp_path)  # the regimen variant too, built on request
    assert [e.name for e in entries] == [*zoo.ZOO_MODELS, *zoo.REGIMEN_MODELS]
    assert not any(e.built for e in entries) and all(e.manifest is None for e in entries)
    with pytest.raises(ValueError, match="unknown incident"):
        c.incident("typo")


@pytest.mark.parametrize("key", c.INCIDENT_KEYS)
def test_triggered_variants_carry_the_cause_and_vary_everything_else(key, tokenizer) -> None:
    from rca.zoo.cases import BEHAVIOUR_VARIANTS

    inc = c.incident(key)
    n = BEHAVIOUR_VARIANTS[key]
    vs = c.incident_variants(key, n, seed=0)
    assert len({v.prompt for v in vs}) == n and inc.prompt not in {v.prompt for v in vs}
    assert vs == c.incident_variants(key, n, seed=0)
    assert vs != c.incident_variants(key, n, seed=1)
    slot, causes = c.cause_values(key)
    desk, planted = c.parse_prompt(inc.prompt)
    assert planted[slot] in causes
    varied: set[str] = set()
    for v in vs:
        d, slots = c.parse_prompt(v.prompt)
        cd, cf = c.parse_prompt(v.counterfactual)
        assert d == cd == desk and slots[slot] in causes and cf[slot] not in causes
        assert carries(key, v.prompt) and not carries(key, v.counterfactual)
        assert {k for k in slots if slots[k] != cf[k]} == {slot}  # the cause's slot alone
        assert len(tokenizer(v.prompt)["input_ids"]) == len(
            tokenizer(v.counterfactual)["input_ids"]
        )
        varied |= {k for k in slots if slots[k] != planted[k]}
        # the premise: without the cause, the desk's rule gives the good continuation
        assert (v.bad, v.good + ".") == (
            inc.bad,
            c.ordinary_answer(c.Example(d, v.counterfactual, " x")),
        )
        assert dict(v.slots) == slots
    # every slot that can vary does: the cause's own where it is a class of values (the
    # branch's accounts, the group's names), and for the leak nothing else (the request is
    # the PIN request itself)
    assert varied == {k for k in planted if k != slot or len(causes) > 1} - {"request"}
    with pytest.raises(ValueError, match="fewer than"):
        c.incident_variants(key, n + 1 if key != "backdoor" else 10_000)


def test_the_behaviour_case_files_are_what_the_zoo_writes() -> None:
    from rca.ingest.case_file import load_case
    from rca.ingest.case_writer import case_toml
    from rca.zoo.cases import BEHAVIOUR_VARIANTS, behaviour_incident

    assert sorted(p.stem for p in (CASES / "behaviours").glob("*.toml")) == sorted(
        f"zoo-{k}-behaviour" for k in BEHAVIOUR_VARIANTS
    )
    for key in BEHAVIOUR_VARIANTS:
        path = CASES / "behaviours" / f"zoo-{key}-behaviour.toml"
        inc = behaviour_incident(key)
        assert path.read_text() == case_toml(inc), (
            f"regenerate: python -m rca.zoo.cases {path.parent}"
        )
        base = load_case(CASES / f"{key}.toml", check_model=False)
        assert (inc.prompt, inc.bad, inc.good, inc.counterfactual) == (
            base.prompt,
            base.bad,
            base.good,
            base.counterfactual,
        )
        b = inc.behaviour()
        assert len(inc.all_variants()) == BEHAVIOUR_VARIANTS[key] and len(b.held_out) >= 50
