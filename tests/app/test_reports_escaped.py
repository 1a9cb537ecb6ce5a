"""Case files (HTML, Markdown, terminal) made from runs whose every string is a payload.

The HTML report is parsed: no element, attribute or URL may come from the payloads, and each
payload must be there as text. The Markdown report is rendered by a CommonMark renderer with
tables (markdown-it-py, as GitHub and most viewers would) and the result held to the same
rule: only the elements the case file itself writes, no link, image or raw HTML, and the
payloads shown as text. The terminal case file shows them as typed.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from rca.casefile import (
    render_html,
    render_markdown,
    render_regression_html,
    render_regression_markdown,
    render_terminal,
)
from rca.store import Store
from tests.app.conftest import (
    CHAT_CF_USER,
    CHAT_DECODING,
    CHAT_SEEN,
    CHAT_SYSTEM,
    CHAT_USER,
    IMG,
    LINK,
    SCRIPT,
)

MARKDOWN = MarkdownIt("commonmark").enable("table")
# every element the Markdown case files write themselves
CASE_FILE_ELEMENTS = {
    "h1", "h2", "p", "ul", "li", "strong", "code", "pre", "blockquote",
    "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(page: str) -> Elements:
    p = Elements()
    p.feed(page)
    return p


def assert_inert(page: str, *shown: str) -> None:
    p = parsed(page)
    assert "script" not in p.tags and "img" not in p.tags and "iframe" not in p.tags
    assert not [a for a, _ in p.attrs if a.lower().startswith("on")]
    urls = [v for a, v in p.attrs if a in ("href", "src", "action") and v]
    assert not [u for u in urls if not u.startswith("#")], urls
    text = "".join(p.text)
    for s in (SCRIPT, IMG, *shown):  # shown, as text
        assert s in text, s


def assert_markdown_inert(md: str, *shown: str) -> None:
    """What CommonMark makes of ``md``: only the case file's own elements, no attribute but a
    code block's language, and every payload as text."""
    page = MARKDOWN.render(md)
    p = parsed(page)
    assert set(p.tags) <= CASE_FILE_ELEMENTS, set(p.tags) - CASE_FILE_ELEMENTS
    assert set(p.attrs) <= {("class", "language-text"), ("style", "text-align:right")}, p.attrs
    assert_inert(page, *shown)


def test_the_html_case_file_shows_payloads_as_text(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    run = Store.reader(db).get_run(run_id)
    assert_inert(render_html(run), LINK)


def test_the_regression_report_shows_payloads_as_text() -> None:
    rows: list[dict[str, Any]] = [
        {
            "case_id": f"c{SCRIPT}",
            "severity": f"high {IMG}",
            "title": f"title {SCRIPT}",
            "reference_run_id": f"r{IMG}",
            "top_new": [SCRIPT],
            "classification": f"fixed {IMG}",
            "p_bad_reference": 0.9,
            "p_bad_new": 0.1,
            "cause_set_reference": [SCRIPT],
            "cause_set_new": [IMG],
            "comparison": {"jaccard_cause_set": 0.5},
            "reason": f"{SCRIPT} {IMG} {LINK}",
        }
    ]
    assert_inert(render_regression_html(rows, model=f"/m/{IMG}"))
    assert_markdown_inert(render_regression_markdown(rows, model=f"/m/{IMG}"), LINK)
    rows[0]["reason"] = f"# heading? > quote? 1. list? {SCRIPT}"  # a paragraph of its own
    md = render_regression_markdown(rows)
    assert_markdown_inert(md, rows[0]["reason"])


def test_the_markdown_case_file_escapes_html_and_links(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    md = render_markdown(Store.reader(db).get_run(run_id))
    assert_markdown_inert(md, LINK, f"note {SCRIPT} {IMG}", f"Title {SCRIPT} {IMG}")


@pytest.mark.parametrize("render", [render_markdown, render_html, render_terminal])
def test_a_chat_case_file_shows_payloads_as_text(
    xss_chat_db: tuple[Path, str], render: Any
) -> None:
    db, run_id = xss_chat_db
    out = render(Store.reader(db).get_run(run_id))
    shown = (CHAT_USER, CHAT_CF_USER, CHAT_DECODING["greedy_text"], "Greedy decoding")
    if render is render_terminal:  # as typed: a terminal does not interpret HTML
        for s in (CHAT_SEEN, CHAT_SYSTEM, *shown):
            assert s in out, s
        return
    if render is render_markdown:
        assert_markdown_inert(out, CHAT_SEEN, *shown)
        # the system turns are quoted; the payload inside is still text
        quotes = MARKDOWN.render(out).split("<blockquote>")[1:]
        assert len(quotes) == 2 and all(
            "&lt;script&gt;" in q.split("</blockquote>")[0] for q in quotes
        )
        return
    assert_inert(out, CHAT_SEEN, *shown)
    assert out.count('<div class="turn system">') == 2 and "<mark>&lt;img" in out
