"""The report stage: a stored run as Markdown, as text for a terminal, or as one HTML page.

Input is the dict ``ReadOnlyStore.get_run`` returns, so a report is always of what was
recorded. Sections that need keys older runs lack (a chat case's ``messages``, ``focus``, the
summary's ``prompt_text`` and ``decoding``) are left out for them.

Every string that came from a prompt, a model, a case file or a note is data, never markup,
and is escaped for the medium it lands in (``rca.textsafe``); in every medium, control,
bidirectional and invisible characters are shown as their escapes (``\\x1b``, ``\\u202e``).

    stored     a stored run's fields, numbers and sentences; the circuit in words
    drawing    the attribution graph and the circuit as inline SVG
    markdown   Markdown and terminal text (one layout, two media); the regression check
    html       one self-contained HTML page; the regression check
"""

from __future__ import annotations

from rca.report.drawing import circuit_svg, graph_svg
from rca.report.html import render_html, render_regression_html
from rca.report.markdown import render_markdown, render_regression_markdown, render_terminal
from rca.report.stored import (
    case_fields,
    circuit_lines,
    circuit_of,
    infrastructure_sentence,
    member_label,
    provenance_of,
    token_warning,
    turns,
    verdict_words,
)

__all__ = [
    "case_fields",
    "circuit_lines",
    "circuit_of",
    "circuit_svg",
    "graph_svg",
    "infrastructure_sentence",
    "member_label",
    "provenance_of",
    "render_html",
    "render_markdown",
    "render_regression_html",
    "render_regression_markdown",
    "render_terminal",
    "token_warning",
    "turns",
    "verdict_words",
]
