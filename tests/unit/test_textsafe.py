"""rca.textsafe held to what renderers make of its output.

Markdown is rendered by markdown-it-py (CommonMark with GFM tables and strikethrough): no link,
image or raw HTML may come out of the text, and no run that GFM links bare (``www.``,
``http://``, an e-mail address) may stay outside a code span. Text for Streamlit is held to the
two patterns Streamlit's Markdown links in parsed text (copied from its bundle's
mdast-util-gfm-autolink-literal). Every renderer must still show every character: hidden ones
as their escapes, ordinary text as typed.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from markdown_it.token import Token

from rca.textsafe import (
    code_span,
    fence,
    html_text,
    markdown_line,
    markdown_text,
    streamlit_markdown,
    visible,
)
from tests.helpers import GFM_BARE, HIDDEN, ST_EMAIL, ST_URL

MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])

LIVE = {"link_open", "image", "html_inline", "html_block", "s_open"}

OSC8 = "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07"
PAYLOADS = [
    "![](http://evil.example/p.png) [x](javascript:alert(1))",
    "<http://evil.example> <javascript:alert(1)> <mallory@evil.example>",
    "see http://evil.example/a, www.evil.example/b and mallory@evil.example.",
    "(https://evil.example/c) _http://evil.example_ *www.evil.example* ~~ftp://evil.example~~",
    "mailto:mallory@evil.example xmpp:mallory@evil.example",
    "<img src=x onerror=alert(1)> <script>alert(1)</script> &lt;b&gt;",
    "a|http://evil.example|b ``http://`evil`.example``",
    f"{OSC8} \x1b[2J \x9b31m back\x08\r over",
    "\u202eevil\u202c \u2066iso\u2069 zero\u200bwidth\ufeff\u2060 \u061c",
    "line one\nline two\r\nline three",
]


def inline(src: str) -> list[Token]:
    """The inline tokens of ``src`` as markdown-it parses it."""
    return [c for t in MD.parse(src) if t.type == "inline" for c in t.children or []]


def live(src: str) -> list[str]:
    """The tokens of ``src`` that are a link, an image, raw HTML or a strikethrough."""
    tokens = MD.parse(src)
    return [t.type for t in [*tokens, *(c for t in tokens for c in t.children or [])]
            if t.type in LIVE]  # fmt: skip


def shown(tokens: list[Token]) -> str:
    """The text a reader sees: text and code, a soft break as a newline."""
    parts = []
    for t in tokens:
        if t.type in ("text", "code_inline"):
            parts.append(t.content)
        elif t.type in ("softbreak", "hardbreak"):
            parts.append("\n")
    return "".join(parts)


def outside_code(tokens: list[Token]) -> list[str]:
    return [t.content for t in tokens if t.type == "text"]


def one_line(text: str) -> str:
    return re.sub(r"\r\n|\r|\n", " ", text)


# ---------------------------------------------------------------------------------- visible


@pytest.mark.parametrize(
    ("char", "escape"),
    [
        ("\x1b", r"\x1b"),
        ("\x07", r"\x07"),
        ("\x00", r"\x00"),
        ("\r", r"\x0d"),
        ("\x7f", r"\x7f"),
        ("\x9b", r"\x9b"),
        ("\u202e", r"\u202e"),
        ("\u202a", r"\u202a"),
        ("\u2066", r"\u2066"),
        ("\u2069", r"\u2069"),
        ("\u061c", r"\u061c"),
        ("\u200b", r"\u200b"),
        ("\u200f", r"\u200f"),
        ("\u2060", r"\u2060"),
        ("\ufeff", r"\ufeff"),
        ("\u2028", r"\u2028"),
        ("\U000e0041", r"\U000e0041"),  # a tag character: invisible "ASCII smuggling"
        ("\ud800", r"\ud800"),  # a lone surrogate: no encoder could write it
    ],
)
def test_visible_shows_a_hidden_character_as_its_escape(char: str, escape: str) -> None:
    assert visible(f"a{char}b") == f"a{escape}b"
    assert visible(visible(f"a{char}b")) == f"a{escape}b"


def test_visible_keeps_ordinary_text_tabs_and_newlines() -> None:
    text = "PIN leaked to the caller\n\tcafé, 日本語, مرحبا, emoji 🙂, P(' Mary') >= 0.5"
    assert visible(text) == text
    assert visible(None) == "" and visible(3) == "3"


def test_an_osc8_hyperlink_and_a_screen_clear_become_text() -> None:
    out = visible(f"{OSC8} \x1b[2J")
    assert not HIDDEN.search(out)
    assert out == r"\x1b]8;;http://evil.example\x07click\x1b]8;;\x07 \x1b[2J"


# --------------------------------------------------------------------------------- Markdown


def assert_markdown_is_text(text: str) -> None:
    """``markdown_text(text)`` in a paragraph, a table cell and a heading: nothing live, no
    bare link outside code, no hidden character, and every character shown."""
    expected = visible(one_line(text))
    contexts = {  # where the text goes -> what a reader sees there
        "x {} y\n": f"x {expected} y",
        "| a |\n|---|\n| x {} y |\n": f"ax {expected} y",
        "# x {}\n": f"x {expected}".rstrip(" \t"),
    }
    for where, seen in contexts.items():
        src = where.format(markdown_text(text))
        assert not HIDDEN.search(src)
        assert not live(src), src
        tokens = inline(src)
        assert not [s for s in outside_code(tokens) if GFM_BARE.search(s)], src
        assert shown(tokens) == seen, src
    src = f"a\n\n{markdown_line(text)}\n"  # a paragraph of its own
    assert {t.type for t in MD.parse(src)} == {"paragraph_open", "inline", "paragraph_close"}
    assert not live(src) and shown(inline(src)) == "a" + expected.strip(" \t")


@pytest.mark.parametrize("text", PAYLOADS)
def test_markdown_text_shows_payloads_as_text(text: str) -> None:
    assert_markdown_is_text(text)


FRAGMENTS = st.sampled_from(
    [
        "http://", "https://", "www.", "ftp://", "mailto:", "mallory@evil.example", "evil",
        ".example", "/p", "a", "_", "*", "~", "`", "``", "[", "]", "(", ")", "!", "<", ">",
        "|", "#", " ", "\n", "\\", "&amp;", "\x1b", "\u202e", "\u200b", "é",
    ]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(FRAGMENTS, max_size=14).map("".join))
def test_markdown_text_of_any_mix_links_nothing_and_shows_everything(text: str) -> None:
    assert_markdown_is_text(text)


def test_markdown_text_leaves_ordinary_text_as_typed() -> None:
    for text in ("PIN leaked to the caller", "The bot's refund window (v2) is 30 days."):
        assert markdown_text(text) == text
        assert shown(inline(streamlit_markdown(text))) == text


def test_a_url_is_quoted_without_the_punctuation_around_it() -> None:
    assert markdown_text("see (http://evil.example/a).") == "see (`http://evil.example/a`)."
    assert markdown_text("<http://evil.example>") == "\\<`http://evil.example`>"


def test_code_span_and_fence_cannot_be_closed_early() -> None:
    for text in ("a ``` b", "`x`", "``", " `a` ", f"{OSC8} \u202e"):
        tokens = inline(f"x {code_span(text)} y")
        assert [t.type for t in tokens] == ["text", "code_inline", "text"]
        assert tokens[1].content == visible(text)
    text = "```\n<b>x</b>\r\n````\n\x1b[2J \u202e"
    blocks = MD.parse(fence(text))
    assert [b.type for b in blocks] == ["fence"]
    assert blocks[0].content == visible(text.replace("\r\n", "\n")) + "\n"
    assert "\\x1b[2J \\u202e" in blocks[0].content


def test_html_text_escapes_markup_and_shows_hidden_characters() -> None:
    assert html_text('<a href="x">\u202e\x1b</a>') == (
        "&lt;a href=&quot;x&quot;&gt;\\u202e\\x1b&lt;/a&gt;"
    )


# -------------------------------------------------------------------------------- Streamlit


def assert_streamlit_is_text(text: str) -> None:
    out = streamlit_markdown(text)
    assert "<" not in out and ">" not in out and not HIDDEN.search(out)
    tokens = inline(out)
    assert not live(out), out
    assert not [t.type for t in tokens if t.type == "code_inline"], out
    for s in outside_code(tokens):
        assert not ST_URL.search(s) and not ST_EMAIL.search(s), (out, s)
    seen = shown(tokens)
    undefanged = seen.replace("[:]", ":").replace("[.]", ".").replace("[@]", "@")
    assert undefanged == visible(one_line(text)).strip(" "), (out, seen)


@pytest.mark.parametrize("text", PAYLOADS)
def test_streamlit_markdown_shows_payloads_as_text(text: str) -> None:
    assert_streamlit_is_text(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=14).map("".join))
def test_streamlit_markdown_of_any_mix_links_nothing(text: str) -> None:
    assert_streamlit_is_text(text)


def test_leading_blanks_cannot_make_streamlit_text_a_code_block() -> None:
    for text in ("    http://", "      evil", "  \n    www.evil.example"):
        assert_streamlit_is_text(text)
    blocks = MD.parse(streamlit_markdown("a\n\n    b *c*", one_line=False))
    assert "code_block" not in [b.type for b in blocks]


def test_streamlit_markdown_defangs_urls_and_addresses() -> None:
    out = streamlit_markdown("http://a.example www.b.example c@d.example")
    assert out == "http\\[\\:\\]//a\\.example www\\[\\.\\]b\\.example c\\[@\\]d\\.example"
    assert streamlit_markdown("a\nb", one_line=False) == "a\nb"
