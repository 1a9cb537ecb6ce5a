"""Text from a case, a model or an analyst, made safe to show: one function per medium.

Every string that came from a prompt, a model, a case file, a note or a store is data, never
markup, and never an instruction to the screen that shows it:

- ``visible``: the text as it is, but every character that acts on a terminal or hides what is
  there is shown as its Python escape (``\\x1b``, ``\\u202e``): C0 controls but tab and newline,
  DEL and C1 controls (ESC starts every escape sequence, OSC 8 makes a hyperlink, CR and BS
  overwrite); bidirectional embeddings, overrides and isolates (they reorder what a reader
  sees); zero-width and invisible characters, line and paragraph separators and tag
  characters (they hide text); lone surrogates (no encoder can write them). Every function
  below starts with it, after reading CR LF and CR as the line breaks Markdown and HTML
  make of them.
- Markdown (CommonMark with GFM's tables, strikethrough and autolinks): ``markdown_text`` for
  inline text, ``markdown_line`` for a line of its own, ``code_span`` and ``fence`` for text
  quoted verbatim. A run of text a renderer would link bare (``http://``, ``https://``,
  ``ftp://``, ``www.``, ``mailto:``, ``xmpp:``, an e-mail address) goes in a code span, which no
  renderer links; the rest is backslash-escaped where it would open markup.
- ``html_text``: HTML element content or a quoted attribute.
- ``streamlit_markdown``: a label or text for a Streamlit widget that renders Markdown.
  Streamlit links URLs and e-mail addresses in the text it has parsed, after backslash escapes
  are resolved, so there they are defanged instead (``http[:]//``, ``www[.]``, ``[@]``, the
  convention of incident write-ups), and everything is backslash-escaped.

A bare domain (``example.com``, no scheme, no ``www.``) is left as text: neither GitHub nor
Streamlit links it.
"""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = [
    "code_span",
    "fence",
    "html_text",
    "markdown_line",
    "markdown_text",
    "streamlit_markdown",
    "visible",
]

# C0 but tab and newline, DEL, C1; Arabic letter mark, zero-width and directional marks,
# line and paragraph separators, bidi embeddings and overrides, word joiner and invisible
# operators, bidi isolates and deprecated format characters, BOM; tag characters; surrogates
_HIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\U000e0000-\U000e007f\ud800-\udfff]"
)
_NEWLINE = re.compile(r"\r\n|\r|\n")


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def visible(v: Any) -> str:
    """``v`` as text, with each control, bidi, invisible or surrogate character shown as its
    Python escape (``\\x1b``, ``\\u202e``); ``None`` is ``''``. Tab and newline are kept, a
    carriage return is shown (a terminal would go back over the line with it)."""
    return _HIDDEN.sub(lambda m: _escape(m.group()), "" if v is None else str(v))


def _lines(v: Any, sep: str = "\n") -> str:
    """``v`` as text with each line break (CR LF, CR or LF, as Markdown and HTML read them)
    made ``sep``."""
    return _NEWLINE.sub(sep, "" if v is None else str(v))


def html_text(v: Any) -> str:
    """Text for HTML, element content or a quoted attribute."""
    return html.escape(visible(_lines(v)), quote=True)


# ---------------------------------------------------------------------------------------------
# Markdown

# What opens inline markup in CommonMark (code, emphasis, links and images, raw HTML and
# autolinks, entities, escapes), GFM's strikethrough, or ends a table cell. ' " > are left as
# they are: inline they are plain text, so "P(' Mary') >= 0.5" stays readable.
# ``_`` between two letters or digits cannot start or end emphasis (CommonMark's flanking
# rules), so ``not_confirmed`` is left as typed
_MD_INLINE = re.compile(r"[\\`*\[\]<&|~]|_(?![^\W_])|(?<![^\W_])_")
# what makes a line a block (heading, quote, list, rule, setext underline, fence) at its start
_MD_BLOCK_START = re.compile(r"^(?:([#>+=~-])|(\d{1,9})([.)]))")
# what GFM (and markdown-it's linkify) would link in plain text
_LINKABLE = re.compile(
    r"(?:https?|ftp)://|www\.|(?:mailto|xmpp):|[-.\w+]@[-\w]+\.[-\w]", re.IGNORECASE
)
# a run of text, as a renderer delimits an autolink: up to whitespace or a table's cell bar;
# the brackets and punctuation around it stay outside its code span
_RUN = re.compile(r"[^\s|]+")
_LEAD, _TRAIL = "([{<'\"", ".,:;!?)]}>'\""


def _md_plain(text: str) -> str:
    return _MD_INLINE.sub(r"\\\g<0>", text)


def markdown_text(v: Any) -> str:
    """Inline Markdown text, a table cell included: shown as typed, never as markup.

    Newlines become spaces, so the text cannot start a block or end a row; a run a renderer
    would link goes in a code span (without the brackets and punctuation around it); a
    trailing run of ``#`` is escaped, so a heading's closing sequence cannot eat it."""
    text = visible(_lines(v, " "))
    out: list[str] = []
    at = 0
    for run in _RUN.finditer(text):
        if not _LINKABLE.search(run.group()):
            continue
        core = run.group().lstrip(_LEAD)
        start = run.end() - len(core)
        core = core.rstrip(_TRAIL)
        if not _LINKABLE.search(core):
            continue
        out += [_md_plain(text[at:start]), code_span(core)]
        at = start + len(core)
    out.append(_md_plain(text[at:]))
    # the parts around a code span end and start at whitespace, a bar, or bracket and
    # punctuation, never at an ``_``, so escaping them apart reads each ``_``'s neighbours as
    # they are in the text
    return re.sub(r"#+(?=[ \t]*$)", r"\\\g<0>", "".join(out))


def markdown_line(v: Any) -> str:
    """Markdown text that starts a line of its own: ``markdown_text`` without leading blanks
    (they would make it code), and a first character that would make the line a heading,
    quote, list, rule or fence escaped."""
    return _MD_BLOCK_START.sub(
        lambda m: f"\\{m.group(1)}" if m.group(1) else f"{m.group(2)}\\{m.group(3)}",
        markdown_text(v).lstrip(" \t"),
    )


def code_span(v: Any, *, cell: bool = False) -> str:
    """A Markdown code span: delimited by a backtick run longer than any inside, padded with a
    space where the text starts or ends with a backtick, or both starts and ends with a space
    (a renderer strips one space from each side then). In a table ``cell`` a ``|`` is
    escaped: GFM tables split rows before they find code spans."""
    text = visible(_lines(v, " "))
    if not text:
        return ""
    if cell:
        text = text.replace("|", "\\|")
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    edge = text[0] == "`" or text[-1] == "`" or (text[0] == text[-1] == " ")
    pad = " " if edge and text.strip(" ") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fence(v: Any, *, info: str = "text") -> str:
    """A fenced block of the text with its newlines and whitespace, longer than any backtick
    run inside, so it cannot be closed early."""
    text = visible(_lines(v))
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return f"{f}{info}\n{text}\n{f}"


# ---------------------------------------------------------------------------------------------
# Streamlit

# Markdown punctuation (CommonMark lets any of it be backslash-escaped), plus Streamlit's own
# syntax: ``$`` opens LaTeX, ``:`` emoji and colour directives.
_ST_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:$=^])")
# the separator of what Streamlit links after parsing: http(s)://, www., user@domain.tld
_ST_LINK = re.compile(
    r"(?:(?<=http)|(?<=https)|(?<=ftp)):(?=//)|(?<=www)\.|(?<=[-.\w+])@(?=[-\w]+\.[-\w])",
    re.IGNORECASE,
)


def streamlit_markdown(v: Any, *, one_line: bool = True) -> str:
    """Text for a Streamlit widget that renders Markdown (``st.markdown``, ``st.caption``,
    titles, alerts, labels): shown as typed, never as markup.

    HTML is escaped (``<script>`` stays text), Markdown and Streamlit syntax is
    backslash-escaped (no link, image, emphasis or formula), URLs and e-mail addresses are
    defanged (``http[:]//``, ``www[.]``, ``[@]``) so they are not linked, and with
    ``one_line`` newlines become spaces so a value cannot start a new block. Blanks that start
    a line are dropped: four of them would make the line a code block."""
    text = re.sub(r"(?m)^[ \t]+", "", visible(_lines(v, " " if one_line else "\n")))
    text = _ST_LINK.sub(lambda m: f"[{m.group()}]", text)
    return html.escape(_ST_SPECIAL.sub(r"\\\1", text), quote=True)
