"""Chat incidents, the focus of a continuation, and the one encoding every prompt goes through.

- A chat incident is rendered with the model's own chat template, recorded as ingested (its
  hash does not depend on the model), and every problem with it is one line naming the key.
- ``focus``: the metric reads only the focus tokens, with the rest of the bad continuation
  teacher-forced; checked against log-probabilities gathered by hand from a forward pass.
- A tokenizer that appends an end-of-sequence token: prompts, counterfactuals and reference
  prompts are encoded without it everywhere, so a same-length counterfactual lines up.
- A generated counterfactual's text can be pasted back: it encodes to the counterfactual's ids.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rca.ingest.case_file import loads_case
from rca.ingest.incident import Incident, IncidentError, Turn, incident_from_flags
from rca.model.metric import MetricError, Target, encode_target, encode_text, evaluate
from rca.model.subject import Subject
from rca.trace import given_counterfactual
from rca.trace.counterfactual import auto_counterfactual, counterfactual_text
from rca.trace.tokens import segment_ablation, word_segments
from tests.helpers import EOS, bpe_tokenizer, tiny_model, word_tokenizer, words

CHAT_CASE = """
id = "chat-1"
title = "leak"
severity = "high"
model = "m"
messages = [
  { role = "system", content = "w1 w2 w3" },
  { role = "user", content = "w4 w5" },
]
counterfactual_messages = [
  { role = "system", content = "w1 w9 w3" },
  { role = "user", content = "w4 w5" },
]
bad = " w6 w7"
focus = "w7"
"""


def subject(tok, *, seed: int = 0) -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=seed), tok)


# --- chat incidents --------------------------------------------------------------------------


def test_a_chat_case_renders_with_the_models_template_and_keeps_its_fields_as_ingested() -> None:
    inc = loads_case(CHAT_CASE, source="<case>")
    assert inc.prompt is None
    assert inc.messages == (Turn("system", "w1 w2 w3"), Turn("user", "w4 w5"))
    tok = word_tokenizer(chat=True)
    rendered = inc.for_model(tok)
    want = tok.apply_chat_template(
        [{"role": "system", "content": "w1 w2 w3"}, {"role": "user", "content": "w4 w5"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.prompt == want == "w90 w1 w2 w3 w91 w4 w5 w92"
    assert rendered.counterfactual == "w90 w1 w9 w3 w91 w4 w5 w92"
    # what is recorded is what was ingested: the same hash before and after rendering
    assert rendered.sha256 == inc.sha256
    d = rendered.to_dict()
    assert "prompt" not in d and "counterfactual" not in d
    assert d["messages"][0] == {"role": "system", "content": "w1 w2 w3"}
    assert rendered.for_model(tok) is rendered
    # the rendered prompt is what the metric reads
    s = subject(tok)
    assert inc.encode(s).prompt_ids == tuple(encode_text(tok, want))


def test_a_plain_incident_keeps_the_hash_it_always_had() -> None:
    inc = incident_from_flags(model="m", prompt="w1 w2", bad=" w3", good=" w4")
    d = inc.to_dict()
    assert set(d) == {
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


@pytest.mark.parametrize(
    ("change", "key", "needle"),
    [
        (lambda s: s.replace('role = "system"', 'role = "bot"', 1), "messages", "unknown role"),
        (lambda s: s.replace('content = "w4 w5" },\n]\ncounter', 'content = "" },\n]\ncounter'),
         "messages", "item 1"),
        (lambda s: s.replace('messages = [\n  { role = "system", content = "w1 w2 w3" },\n'
                             '  { role = "user", content = "w4 w5" },\n]', "messages = []", 1),
         "messages", "empty conversation"),
        (lambda s: s + 'prompt = "w1"\n', "messages", "not both"),
        (lambda s: s + 'counterfactual = "w1"\n', "counterfactual_messages", "counterfactual"),
        (lambda s: s.replace('focus = "w7"', 'focus = "w8"'), "focus", "not part of bad"),
        (lambda s: s.replace('{ role = "user", content = "w4 w5" },\n]\ncounter',
                             '{ role = "assistant", content = "w4 w5" },\n]\ncounter'),
         "messages", "user's turn"),
        (lambda s: s.replace('{ role = "system", content = "w1 w2 w3" }',
                             '{ role = "system", content = "w1", name = "x" }', 1),
         "messages", "unknown key"),
    ],
)  # fmt: skip
def test_chat_case_errors_are_one_line_naming_the_key(change, key: str, needle: str) -> None:
    with pytest.raises(IncidentError) as e:
        loads_case(change(CHAT_CASE), source="case.toml")
    msg = str(e.value)
    assert "\n" not in msg and f"key {key!r}" in msg and needle in msg, msg


def test_a_model_without_a_chat_template_is_one_line_naming_messages() -> None:
    inc = loads_case(CHAT_CASE, source="case.toml")
    with pytest.raises(IncidentError) as e:
        inc.encode(subject(word_tokenizer()))
    assert "key 'messages'" in str(e.value) and "no chat template" in str(e.value)


def test_a_template_that_refuses_the_conversation_is_one_line() -> None:
    tok = word_tokenizer(chat=True)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(IncidentError) as e:
        loads_case(CHAT_CASE, source="case.toml").for_model(tok)
    assert "roles must alternate" in str(e.value) and "\n" not in str(e.value)


# --- focus -----------------------------------------------------------------------------------


def test_the_focus_metric_reads_only_the_focus_tokens() -> None:
    tok = word_tokenizer()
    s = subject(tok, seed=3)
    prompt, bad, good = words(1, 2, 3), " " + words(4, 5, 6), " " + words(7)
    full = encode_target(tok, prompt, bad, good)
    focused = encode_target(tok, prompt, bad, good, focus="w5")
    assert focused.focus == (1, 2) and full.focus is None
    # by hand: one forward of prompt + bad, each bad token's log-probability
    ids = torch.tensor([list(full.prompt_ids) + list(full.bad_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(s.model(input_ids=ids).logits[0], -1)
    n = full.n_prompt
    per_tok = [float(lp[n - 1 + j, t]) for j, t in enumerate(full.bad_ids)]
    good_lp = evaluate(s.model, full).logp_good
    assert good_lp is not None
    assert evaluate(s.model, full).metric == pytest.approx(sum(per_tok) - good_lp, abs=1e-5)
    assert evaluate(s.model, focused).metric == pytest.approx(per_tok[1] - good_lp, abs=1e-5)
    assert evaluate(s.model, focused).p_bad == pytest.approx(float(torch.tensor(per_tok[1]).exp()))


def test_focus_finds_the_tokens_of_a_bpe_continuation() -> None:
    sentences = ["The secret code is 8841.", "The code is here.", "secret 8841 code"] * 20
    tok = bpe_tokenizer(sentences, vocab_size=300)
    t = encode_target(tok, "Tell me:", " The secret code is 8841.", focus="8841")
    assert t.focus is not None
    a, b = t.focus
    assert tok.decode(list(t.bad_ids[a:b])).strip() == "8841"
    with pytest.raises(MetricError):
        encode_target(tok, "Tell me:", " The code.", focus="8841")


# --- one encoding for every prompt -----------------------------------------------------------


def test_a_tokenizer_that_appends_eos_is_encoded_without_it_everywhere() -> None:
    tok = word_tokenizer(eos=True)
    assert tok(words(1, 2))["input_ids"][-1] == EOS  # the tokenizer does append it
    assert encode_text(tok, words(1, 2))[-1] != EOS
    s = subject(tok)
    inc = Incident(
        id="eos",
        title="t",
        severity="low",
        model="m",
        prompt=words(1, 2, 3, 4),
        bad=" " + words(5),
        good=" " + words(6),
        counterfactual=words(1, 9, 3, 4),
    )
    target = inc.encode(s)
    assert EOS not in target.prompt_ids
    # a counterfactual of the same length lines up (it was judged misaligned when tokenized raw)
    cf = given_counterfactual(s, inc, target)
    assert cf.ok and cf.prompt_ids == tuple(encode_text(tok, words(1, 9, 3, 4)))


def test_word_segments_of_an_eos_tokenizer_come_from_its_offsets() -> None:
    from tokenizers import processors

    tok = bpe_tokenizer(["alpha betagammadelta epsilon"] * 5 + ["a b c d e f g"], vocab_size=280)
    eos = tok.convert_tokens_to_ids("<eos>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", eos)]
    )
    prompt = "alpha betagammadelta"
    assert tok(prompt)["input_ids"][-1] == eos
    ids = encode_text(tok, prompt)
    assert len(ids) > 2  # "betagammadelta" is several tokens here
    # one segment per word, from the offsets (the fallback would give one per token)
    assert len(word_segments(tok, prompt, ids)) == 2


def test_reference_prompts_are_encoded_as_prompts() -> None:
    from rca.confirm import Ablator

    tok = word_tokenizer(eos=True)
    s = subject(tok)
    t = Target(tuple(encode_text(tok, words(1, 2, 3))), (7,), (8,))
    refs = [words(4, 5), words(6, 7, 8)]
    ab = Ablator(s, t, reference=refs)
    assert [next(iter(r.values())).shape[0] for r in ab.refs] == [3, 4]  # BOS + words, no EOS


# --- the generated counterfactual's text -----------------------------------------------------


@pytest.mark.parametrize("eos", [False, True])
def test_a_generated_counterfactual_text_encodes_back_to_its_tokens(eos: bool) -> None:
    tok = word_tokenizer(eos=eos)
    s = subject(tok, seed=2)
    prompt = words(1, 2, 3, 4, 5)
    target = encode_target(tok, prompt, " " + words(6), " " + words(7))
    refs = [words(10, 11, 12, 13, 14), words(20, 21, 22, 23, 24)]
    seg = segment_ablation(s, target, prompt=prompt, reference_prompts=refs)
    cf = auto_counterfactual(s, target, prompt=prompt, reference_prompts=refs, segments=seg)
    assert cf.prompt_ids != target.prompt_ids
    assert "<bos>" not in cf.text and "<eos>" not in cf.text
    assert cf.text_exact and encode_text(tok, cf.text) == list(cf.prompt_ids)
    # a case file with it as the counterfactual lines up token for token
    inc = Incident(
        id="x", title="t", severity="low", model="m", prompt=prompt, bad=" w6", good=" w7",
        counterfactual=cf.text,
    )  # fmt: skip
    assert given_counterfactual(s, inc, target).ok


def test_a_replacement_by_a_special_token_is_written_as_its_text() -> None:
    tok = word_tokenizer()
    prompt = words(1, 2, 3)
    base = encode_text(tok, prompt)
    ids = list(base)
    ids[2] = 0  # <pad>, the neutral token
    text = counterfactual_text(tok, prompt, base, ids)
    assert text == "w1 <pad> w3" and encode_text(tok, text) == ids


def test_the_flags_take_a_conversation() -> None:
    turns = (Turn("system", "w1"), Turn("user", "w2"))
    inc = incident_from_flags(model="m", prompt=None, bad=" w3", messages=turns)
    assert inc.is_chat and inc.id.startswith("adhoc-")
    with pytest.raises(IncidentError):
        incident_from_flags(model="m", prompt="w1", bad=" w3", messages=turns)
    again = dataclasses.replace(inc, messages=(Turn("system", "w9"), Turn("user", "w2")))
    assert again.sha256 != inc.sha256
    assert json.loads(json.dumps(inc.to_dict()))["messages"][1]["role"] == "user"
