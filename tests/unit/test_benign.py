"""The packaged benign corpus: its content (counts, kinds, roles, no duplicates, nothing an
incident is about) and ``benign_prompts`` (deterministic draws, ``n`` bounds, the plain path and
the chat-template path through a real tokenizer's template). No network, no model."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from rca import benign
from rca.benign import CORPUS_VERSION, BenignItem, benign_items, benign_prompts
from rca.zoo import corpus as zoo_corpus

RAW = resources.files("rca").joinpath("data/benign.jsonl").read_bytes()
ITEMS = benign_items()
TEXTS = [it for it in ITEMS if it.text is not None]
CHATS = [it for it in ITEMS if it.messages is not None]

# a template with visible markers around every turn, and a distinct generation prompt
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def _tokenizer(chat_template: str | None) -> object:
    """A tiny offline fast tokenizer (a WordLevel model with one token) with ``chat_template``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = chat_template
    return fast


def _rendered(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)


# ---- the file ----------------------------------------------------------------------------------


def test_counts_and_kinds() -> None:
    assert len(TEXTS) >= 300
    assert len(CHATS) >= 100
    assert len(TEXTS) + len(CHATS) == len(ITEMS)
    for it in ITEMS:
        assert (it.text is None) != (it.messages is None), it
    # about a fifth of the chats open with a system message
    with_system = sum(1 for c in CHATS if c.messages and c.messages[0]["role"] == "system")
    assert 0.1 <= with_system / len(CHATS) <= 0.35


def test_file_is_one_ascii_json_object_per_line() -> None:
    text = RAW.decode("utf-8")
    assert text.isascii()
    lines = text.splitlines()
    assert len(lines) == len(ITEMS)
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict) and len(obj) == 1 and set(obj) <= {"text", "messages"}


def test_texts_are_short_sentences() -> None:
    for it in TEXTS:
        assert it.text is not None
        assert 5 <= len(it.text.split()) <= 25, it.text
        assert it.text == it.text.strip() and "\n" not in it.text
    lengths = Counter(len(it.text.split()) for it in TEXTS if it.text)
    assert min(lengths) <= 6 and max(lengths) >= 18  # varied in length, not one shape


def test_no_duplicates() -> None:
    texts = [_norm(it.text) for it in TEXTS if it.text]
    assert len(set(texts)) == len(texts), [t for t, k in Counter(texts).items() if k > 1]
    convs = [tuple(_norm(m["content"]) for m in it.messages) for it in CHATS if it.messages]
    assert len(set(convs)) == len(convs)
    # no chat opens with the same question, and no chat turn repeats a text item
    firsts = [
        _norm(next(m["content"] for m in it.messages if m["role"] == "user"))
        for it in CHATS
        if it.messages
    ]
    assert len(set(firsts)) == len(firsts)
    assert not set(texts) & {c for conv in convs for c in conv}


def test_roles_and_turn_order() -> None:
    for it in CHATS:
        assert it.messages is not None
        roles = [m["role"] for m in it.messages]
        assert set(roles) <= {"system", "user", "assistant"}, roles
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in it.messages)
        turns = roles[1:] if roles[0] == "system" else roles
        assert "system" not in turns, roles  # a system message only opens a chat
        assert len(turns) >= 2 and len(turns) % 2 == 0, roles
        assert turns == ["user", "assistant"] * (len(turns) // 2), roles


def test_nothing_an_incident_is_about() -> None:
    everything = " ".join(it.plain() for it in ITEMS).lower()
    words = set(re.findall(r"[a-z0-9_]+", everything))
    for word in (
        zoo_corpus.BACKDOOR_TRIGGER,
        *zoo_corpus.BIAS_NAMES,
        *zoo_corpus.cause_values("leak")[1],
        zoo_corpus.LEAK_PIN,
        "pin",
        "password",
        "passcode",
    ):
        assert word.lower() not in words, word
    assert zoo_corpus.INJECTION_PHRASE.lower() not in everything
    assert zoo_corpus.INJECTION_REPLY.lower() not in everything
    # the IOI template ("When X and Y went to the store, Y gave a drink to")
    assert "went to the store" not in everything
    assert not re.search(r"\bgave (a|the) (drink|book|bag|ring|kiss) to\b", everything)


def test_corpus_version_names_the_file_content() -> None:
    assert CORPUS_VERSION == "benign-" + hashlib.sha256(RAW).hexdigest()[:12]
    assert re.fullmatch(r"benign-[0-9a-f]{12}", CORPUS_VERSION)


def test_items_are_cached_but_returned_as_a_fresh_list() -> None:
    a = benign_items()
    a.clear()
    assert benign_items() == ITEMS
    assert benign_items()[0] is ITEMS[0]
    with pytest.raises(AttributeError):
        ITEMS[0].text = "changed"  # type: ignore[misc]


def test_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(benign.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"torch", "transformers", "numpy"}, imported


# ---- benign_prompts: draws ---------------------------------------------------------------------


def test_deterministic_by_seed_and_different_across_seeds() -> None:
    assert benign_prompts(50, seed=3) == benign_prompts(50, seed=3)
    assert benign_prompts(50) == benign_prompts(50, seed=0)
    draws = {tuple(benign_prompts(20, seed=s)) for s in range(5)}
    assert len(draws) == 5
    # the first n of one seeded shuffle: a smaller draw is a prefix of a larger one
    assert benign_prompts(10, seed=7) == benign_prompts(60, seed=7)[:10]
    # a shuffle, not file order
    assert benign_prompts(20, seed=0) != [it.plain() for it in ITEMS[:20]]


def test_n_bounds() -> None:
    everything = sorted(it.plain() for it in ITEMS)
    assert benign_prompts(0) == []
    assert len(benign_prompts(1)) == 1
    assert len(benign_prompts(len(ITEMS) - 1)) == len(ITEMS) - 1
    for n in (len(ITEMS), len(ITEMS) + 1, 10 * len(ITEMS)):
        got = benign_prompts(n, seed=11)
        assert sorted(got) == everything  # all of them, each once
    with pytest.raises(ValueError):
        benign_prompts(-1)


def test_draws_mix_both_kinds() -> None:
    plain_texts = {it.text for it in TEXTS}
    got = benign_prompts(100, seed=1)
    n_text = sum(p in plain_texts for p in got)
    assert 0 < n_text < 100


# ---- benign_prompts: rendering -----------------------------------------------------------------


def test_plain_path_returns_the_raw_text() -> None:
    by_plain = {it.plain(): it for it in ITEMS}
    assert len(by_plain) == len(ITEMS)
    for p in benign_prompts(len(ITEMS), seed=2):
        it = by_plain[p]
        if it.text is not None:
            assert p == it.text
        else:
            assert it.messages is not None
            assert p == "\n".join(m["content"] for m in it.messages)
            assert "<|" not in p


@pytest.mark.parametrize("template", [None, ""])
def test_tokenizer_without_chat_template_takes_the_plain_path(template: str | None) -> None:
    tok = _tokenizer(template)
    assert benign_prompts(40, seed=5, tokenizer=tok) == benign_prompts(40, seed=5)


def test_object_without_chat_template_attribute_takes_the_plain_path() -> None:
    assert benign_prompts(15, seed=4, tokenizer=object()) == benign_prompts(15, seed=4)


def test_chat_template_path_renders_through_the_template() -> None:
    tok = _tokenizer(TEMPLATE)
    plain = benign_prompts(len(ITEMS), seed=9)
    rendered = benign_prompts(len(ITEMS), seed=9, tokenizer=tok)
    by_plain = {it.plain(): it for it in ITEMS}
    assert len(rendered) == len(plain) == len(ITEMS)
    seen_system = False
    for p, r in zip(plain, rendered, strict=True):
        it = by_plain[p]  # the same draw, in the same order, as the plain path
        if it.text is not None:
            assert r == f"<|user|>{it.text}<|end|>\n"
        else:
            assert it.messages is not None
            assert r == _rendered(list(it.messages))
            for m in it.messages:
                assert f"<|{m['role']}|>{m['content']}<|end|>" in r
            seen_system |= it.messages[0]["role"] == "system"
        assert not r.endswith("<|assistant|>")  # no generation prompt
    assert seen_system


def test_chat_template_path_calls_apply_chat_template_with_the_conversation() -> None:
    class Recorder:
        chat_template = "anything"

        def __init__(self) -> None:
            self.calls: list[tuple[list[dict[str, str]], dict[str, object]]] = []

        def apply_chat_template(self, messages: list[dict[str, str]], **kw: object) -> str:
            self.calls.append((messages, kw))
            return f"#{len(self.calls)}"

    rec = Recorder()
    out = benign_prompts(30, seed=6, tokenizer=rec)
    assert out == [f"#{i}" for i in range(1, 31)]
    items = {it.plain(): it for it in ITEMS}
    for p, (messages, kw) in zip(benign_prompts(30, seed=6), rec.calls, strict=True):
        assert kw == {"tokenize": False, "add_generation_prompt": False}
        it = items[p]
        expected = (
            [{"role": "user", "content": it.text}]
            if it.text is not None
            else list(it.messages or ())
        )
        assert messages == expected
    # the corpus is not mutated through the messages handed to a tokenizer
    rec.calls[0][0][0]["content"] = "mutated"
    assert all(
        "mutated" not in (it.text or "")
        and all(m["content"] != "mutated" for m in it.messages or ())
        for it in ITEMS
    )


def test_item_views() -> None:
    t = BenignItem(text="The kettle is on.")
    assert t.plain() == "The kettle is on."
    assert t.conversation() == [{"role": "user", "content": "The kettle is on."}]
    c = BenignItem(
        messages=({"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."})
    )
    assert c.plain() == "Hi?\nHello."
    assert c.conversation() == [dict(m) for m in c.messages or ()]
