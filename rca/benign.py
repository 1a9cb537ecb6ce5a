"""A packaged corpus of ordinary text, for any model.

Side-effect checks of fixes (language-model loss and KL on ordinary text), mean ablations and
the automatic counterfactual need text that carries no incident. ``rca/data/benign.jsonl`` holds
short everyday sentences (``{"text": ...}``) and short chat exchanges (``{"messages": [...]}``),
written for this project. ``benign_prompts`` draws from it deterministically and renders chat
items through a tokenizer's chat template when it has one; ``CORPUS_VERSION`` names the file's
content so a run can record which corpus it used.

No torch here: the core imports this module.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["CORPUS_VERSION", "BenignItem", "benign_items", "benign_prompts"]

_RESOURCE = "data/benign.jsonl"
ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class BenignItem:
    """One corpus item: exactly one of ``text`` (a sentence) or ``messages`` (chat turns)."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def plain(self) -> str:
        """The item without a template: the text, or the turns' contents joined by newlines."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        return "\n".join(m["content"] for m in self.messages)

    def conversation(self) -> list[dict[str, str]]:
        """The item as chat messages: a text item is one user turn."""
        if self.text is not None:
            return [{"role": "user", "content": self.text}]
        assert self.messages is not None
        return [dict(m) for m in self.messages]


def _raw() -> bytes:
    return resources.files("rca").joinpath(_RESOURCE).read_bytes()


def _parse(line_no: int, obj: Any) -> BenignItem:
    where = f"{_RESOURCE}:{line_no}"
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"{where}: expected an object with one key, 'text' or 'messages'")
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return BenignItem(text=text)
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        turns: list[dict[str, str]] = []
        for m in messages:
            if (
                not isinstance(m, dict)
                or set(m) != {"role", "content"}
                or m["role"] not in ROLES
                or not isinstance(m["content"], str)
                or not m["content"].strip()
            ):
                raise ValueError(f"{where}: bad message {m!r}")
            turns.append({"role": m["role"], "content": m["content"]})
        return BenignItem(messages=tuple(turns))
    raise ValueError(f"{where}: expected 'text' or 'messages', got {sorted(obj)}")


@cache
def _items() -> tuple[BenignItem, ...]:
    lines = _raw().decode("utf-8").splitlines()
    return tuple(_parse(i, json.loads(line)) for i, line in enumerate(lines, 1) if line.strip())


def benign_items() -> list[BenignItem]:
    """Every item of the packaged corpus, in file order (parsed once, then cached)."""
    return list(_items())


def benign_prompts(n: int, *, seed: int = 0, tokenizer: Any = None) -> list[str]:
    """``n`` corpus texts, drawn deterministically by ``seed``.

    A seeded shuffle of all items, then the first ``n`` (all of them when ``n`` is larger).
    With a tokenizer that has a chat template, a text item is rendered as one user turn and a
    chat item as its whole conversation, without a generation prompt; otherwise a text item is
    its text and a chat item its turns' contents joined by newlines.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    items = list(_items())
    random.Random(seed).shuffle(items)
    chosen = items[:n]
    if not getattr(tokenizer, "chat_template", None):
        return [item.plain() for item in chosen]
    assert tokenizer is not None
    out: list[str] = []
    for item in chosen:
        text = tokenizer.apply_chat_template(
            item.conversation(), tokenize=False, add_generation_prompt=False
        )
        out.append(str(text))
    return out


CORPUS_VERSION: str = "benign-" + hashlib.sha256(_raw()).hexdigest()[:12]
"""Names the corpus file's content: changes whenever ``rca/data/benign.jsonl`` does."""
