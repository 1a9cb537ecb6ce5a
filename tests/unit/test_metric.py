"""The incident metric equals a hand computation from separate, unpadded forward passes:
sum over continuation tokens t of log_softmax(logits)[t - 1, token t]; with a good continuation
the metric is logP(bad) - logP(good), without one logP(bad)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rca.model.hooks import ablate
from rca.model.metric import MetricError, Target, encode_target, evaluate
from rca.model.subject import Subject
from tests.helpers import BOS, UNK, one_thread, tiny_model, word_tokenizer, words

SENTENCES = [
    "The cat sat on the mat.",
    "The dog sat on the log.",
    "A cat and a dog met on the mat.",
    "The cat saw the dog, and the dog saw the cat.",
    "Dogs and cats sat together on mats.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def word() -> tuple[torch.nn.Module, Any]:
    """A tiny GPT-2 and a WordLevel tokenizer (prepends <bos>; has an unk token)."""
    return tiny_model("gpt2", seed=3), word_tokenizer()


def byte_level_bpe() -> Any:
    from tests.helpers import bpe_tokenizer

    return bpe_tokenizer(SENTENCES, vocab_size=300)


def metaspace_bpe() -> Any:
    """A SentencePiece-style BPE ('▁' marks a word start): a continuation's tokens depend on
    whether it starts a word, so only tokenizing prompt + continuation gets them right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<eos>"])
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def ids_of(tok: Any, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


@torch.no_grad()
def hand_logp(model: torch.nn.Module, prompt: list[int], cont: list[int]) -> float:
    """log P(cont | prompt), one unpadded forward pass, summed by hand in float64."""
    logits = model(input_ids=torch.tensor([prompt + cont])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def word_ids(*idx: int) -> list[int]:
    """Token ids of the words ``w{i}``, computed from the vocabulary layout (w_i -> i + 4)."""
    return [i + 4 for i in idx]


PROMPT = words(1, 2, 3)
BAD, GOOD = words(10, 11, 12), words(20)


def test_target_ids_come_from_the_vocabulary(word) -> None:
    _, tok = word
    t = encode_target(tok, PROMPT, " " + BAD, " " + GOOD)
    assert t.prompt_ids == (BOS, *word_ids(1, 2, 3))
    assert t.bad_ids == tuple(word_ids(10, 11, 12))
    assert t.good_ids == tuple(word_ids(20))
    assert t.pad_id == tok.pad_token_id
    # without the leading space the words run together; the continuation alone is used
    assert encode_target(tok, PROMPT, BAD, GOOD) == t


@pytest.mark.parametrize(("bad", "good"), [(BAD, GOOD), (GOOD, BAD), (BAD, words(20, 21, 22))])
def test_metric_is_logp_bad_minus_logp_good(word, bad: str, good: str) -> None:
    model, tok = word
    t = encode_target(tok, PROMPT, bad, good)
    lp_bad = hand_logp(model, list(t.prompt_ids), list(t.bad_ids))
    lp_good = hand_logp(model, list(t.prompt_ids), list(t.good_ids or ()))
    v = evaluate(model, t)
    assert v.logp_bad == pytest.approx(lp_bad, abs=1e-4)
    assert v.logp_good == pytest.approx(lp_good, abs=1e-4)
    assert v.metric == pytest.approx(lp_bad - lp_good, abs=1e-4)
    assert v.p_bad == pytest.approx(math.exp(lp_bad), rel=1e-4)
    assert v.p_good == pytest.approx(math.exp(lp_good), rel=1e-4)
    with torch.no_grad():
        logits = model(input_ids=t.input_ids()).logits
    assert t.metric(logits).tolist() == pytest.approx([lp_bad - lp_good], abs=1e-4)
    assert abs(lp_bad - lp_good) > 1e-3  # the two continuations are told apart


def test_metric_without_good_is_logp_bad(word) -> None:
    model, tok = word
    t = encode_target(tok, PROMPT, BAD)
    assert t.good_ids is None and t.rows == 1
    lp_bad = hand_logp(model, list(t.prompt_ids), word_ids(10, 11, 12))
    v = evaluate(model, t)
    assert v.metric == pytest.approx(lp_bad, abs=1e-4)
    assert v.logp_bad == pytest.approx(lp_bad, abs=1e-4)
    assert v.logp_good is None and v.p_good is None
    with torch.no_grad():
        logits = model(input_ids=t.input_ids()).logits
    assert t.metric(logits).tolist() == pytest.approx([lp_bad], abs=1e-4)


@pytest.mark.parametrize(
    ("bad", "good", "rows"),
    [
        (words(10), words(20), 1),  # single tokens: both read after the prompt
        (BAD, GOOD, 1),  # good's one token is read at the prompt's end, in bad's row
        (GOOD, BAD, 1),
        (words(10, 11), words(10, 12), 1),  # good's first token is bad's: its row serves
        (BAD, words(20, 21), 2),
        (words(10, 11), words(12, 10, 11), 2),
    ],
)
def test_continuations_share_rows_and_keep_their_metric(word, bad, good, rows) -> None:
    """A continuation is read from another's row where that row holds every token its logits
    depend on; the metric is still the hand computation from two separate passes."""
    model, tok = word
    t = encode_target(tok, PROMPT, " " + bad, " " + good)
    assert t.rows == rows and t.n_conts == 2
    assert t.input_ids(3).shape == (3 * rows, t.length)
    lp_bad = hand_logp(model, list(t.prompt_ids), list(t.bad_ids))
    lp_good = hand_logp(model, list(t.prompt_ids), list(t.good_ids or ()))
    v = evaluate(model, t)
    assert (v.logp_bad, v.logp_good) == pytest.approx((lp_bad, lp_good), abs=1e-4)
    with torch.no_grad():
        logits = model(input_ids=t.input_ids(3)).logits
    assert t.metric(logits).tolist() == pytest.approx([lp_bad - lp_good] * 3, abs=1e-4)


def test_padding_token_does_not_change_the_metric(word) -> None:
    model, tok = word
    t = encode_target(tok, PROMPT, BAD, words(20, 21))  # good is padded by one token
    other = Target(t.prompt_ids, t.bad_ids, t.good_ids, pad_id=57)
    assert not torch.equal(t.input_ids(), other.input_ids())
    assert evaluate(model, other).metric == pytest.approx(evaluate(model, t).metric, abs=1e-5)


@pytest.mark.parametrize("good", [GOOD, None])
def test_each_variant_in_a_batch_gets_its_own_metric(word, good: str | None) -> None:
    """Variants are k stacked copies; the metric of copy k reads copy k's logits only."""
    model, tok = word
    subject = Subject.from_model(model, tok)
    t = encode_target(tok, PROMPT, BAD, good)
    ids = t.input_ids(n_variants=3)
    assert torch.equal(ids, t.input_ids().repeat(3, 1))

    with torch.no_grad():
        same = t.metric(model(input_ids=ids).logits)
    assert same.tolist() == pytest.approx([evaluate(model, t).metric] * 3, abs=1e-5)

    edits = [[], ["L1.H2"], ["L0.MLP"]]  # variant k runs under ablation edits[k]
    parts, want = [], []
    for ids_k in edits:
        with ablate(subject, ids_k), torch.no_grad():
            parts.append(model(input_ids=t.input_ids()).logits)
            lp_bad = hand_logp(model, list(t.prompt_ids), list(t.bad_ids))
            lp_good = hand_logp(model, list(t.prompt_ids), list(t.good_ids or ()))
        want.append(lp_bad - lp_good if good else lp_bad)
    got = t.metric(torch.cat(parts)).tolist()
    assert got == pytest.approx(want, abs=1e-4)
    assert len({round(w, 3) for w in want}) == 3  # the variants really differ


PAIRS = [
    ("The cat", " sat on the mat."),
    ("The cat sat on the", " mat."),
    ("The cat", "s sat."),  # continues the prompt's last word
    ("The dog saw the cat", ", and the dog"),
    ("A cat and a dog met on", " the log."),
]


@pytest.mark.parametrize("make_tok", [byte_level_bpe, metaspace_bpe])
def test_bpe_continuations_are_scored_as_tokenized_after_the_prompt(make_tok) -> None:
    tok = make_tok()
    model = tiny_model("gpt2", seed=5, vocab_size=len(tok))
    context_mattered = False
    for prompt, bad in PAIRS:
        t = encode_target(tok, prompt, bad)
        prompt_ids, full = ids_of(tok, prompt), ids_of(tok, prompt + bad)
        assert list(t.prompt_ids) == prompt_ids
        if full[: len(prompt_ids)] == prompt_ids:
            assert list(t.prompt_ids + t.bad_ids) == full
        else:
            assert list(t.bad_ids) == ids_of(tok, bad, special=False)
        context_mattered |= list(t.bad_ids) != ids_of(tok, bad, special=False)
        lp = hand_logp(model, list(t.prompt_ids), list(t.bad_ids))
        assert evaluate(model, t).metric == pytest.approx(lp, abs=1e-4)
    if make_tok is metaspace_bpe:
        assert context_mattered, "no pair exercised the prompt + continuation tokenization"


def test_bpe_good_and_bad_are_both_scored() -> None:
    tok = byte_level_bpe()
    model = tiny_model("gpt2", seed=6, vocab_size=len(tok))
    t = encode_target(tok, "The cat sat on the", " log.", " mat.")
    lp_bad = hand_logp(model, list(t.prompt_ids), list(t.bad_ids))
    lp_good = hand_logp(model, list(t.prompt_ids), list(t.good_ids or ()))
    assert evaluate(model, t).metric == pytest.approx(lp_bad - lp_good, abs=1e-4)


ERRORS = [
    ("", BAD, GOOD, "prompt"),
    (PROMPT, "", GOOD, "bad"),
    (PROMPT, "   ", GOOD, "bad"),
    (PROMPT, BAD, "", "good"),
    (PROMPT, BAD, "  ", "good"),
    (PROMPT, BAD, BAD, "same"),
    (PROMPT, " " + BAD, BAD, "same"),  # different strings, same tokens
    (PROMPT, words(10) + " zebra", GOOD, "bad"),  # not in the vocabulary: <unk>
    (PROMPT, BAD, " zebra", "good"),
]


@pytest.mark.parametrize(("prompt", "bad", "good", "needle"), ERRORS)
def test_unscorable_texts_raise_metric_error(word, prompt, bad, good, needle) -> None:
    _, tok = word
    with pytest.raises(MetricError) as info:
        encode_target(tok, prompt, bad, good)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_prompt_that_encodes_to_nothing_is_refused() -> None:
    tok = word_tokenizer(bos=False)  # without <bos>, whitespace encodes to no tokens
    with pytest.raises(MetricError, match="prompt encodes to no tokens"):
        encode_target(tok, "   ", BAD)


def test_a_whitespace_prompt_after_bos_is_scored_unconditionally(word) -> None:
    model, tok = word
    t = encode_target(tok, "   ", BAD)
    assert t.prompt_ids == (BOS,)
    assert evaluate(model, t).metric == pytest.approx(
        hand_logp(model, [BOS], word_ids(10, 11, 12)), abs=1e-4
    )


def test_unknown_word_really_is_unk(word) -> None:
    _, tok = word
    assert tok.unk_token_id == UNK
    assert ids_of(tok, "zebra", special=False) == [UNK]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(((), (5,)), "prompt"), (((5,), ()), "bad"), (((5,), (6,), ()), "good")],
)
def test_target_validates_its_ids(args: tuple, needle: str) -> None:
    with pytest.raises(MetricError, match=needle):
        Target(*args)


def test_metric_error_is_a_value_error() -> None:
    assert issubclass(MetricError, ValueError)


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_targets_of_any_length_batched_together_keep_their_own_metric(batch: int, arch) -> None:
    """``evaluate_many`` pads shorter targets into one pass; each metric is still the hand
    computation from its own unpadded forward passes, in the order given."""
    from rca.model.metric import evaluate_many

    model, tok = tiny_model(arch, seed=5), word_tokenizer()
    targets = [
        encode_target(tok, words(1, 2, 3), " " + BAD, " " + GOOD),  # one row
        encode_target(tok, words(4, 5, 6, 7, 8, 9), " " + words(10), None),  # longer prompt
        encode_target(tok, words(1), " " + BAD, " " + words(20, 21)),  # two rows
        encode_target(tok, words(2, 3), " " + words(30, 31), " " + words(32), focus=words(31)),
        encode_target(tok, words(7, 7, 7, 7), " " + words(12), " " + words(13)),
    ]
    got = evaluate_many(model, targets, batch=batch)
    for t, v in zip(targets, got, strict=True):
        bad = list(t.bad_ids)
        if t.focus is not None:  # the focus token's log-probability, its prefix teacher-forced
            lp_bad = hand_logp(model, list(t.prompt_ids) + bad[: t.focus[0]], bad[t.focus[0] :])
        else:
            lp_bad = hand_logp(model, list(t.prompt_ids), bad)
        assert v.logp_bad == pytest.approx(lp_bad, abs=1e-4)
        if t.good_ids is None:
            assert v.logp_good is None and v.metric == pytest.approx(lp_bad, abs=1e-4)
        else:
            lp_good = hand_logp(model, list(t.prompt_ids), list(t.good_ids))
            assert v.metric == pytest.approx(lp_bad - lp_good, abs=1e-4)
