"""Case files (HTML, Markdown, terminal) and the workbench's case pages made from runs whose
every string is a payload.

The HTML report is parsed: no element, attribute or URL may come from the payloads, and each
payload must be there as text. The Markdown report is rendered by a CommonMark renderer with
tables (markdown-it-py, as GitHub and most viewers would) and the result held to the same
rule: only the elements the report itself writes, no link, image or raw HTML, no URL or
e-mail address a GFM renderer would link outside a code span, and the payloads shown as text.
The terminal report shows them as typed. In every medium, and on every page of the app,
control sequences (ESC, OSC 8 hyperlinks, CSI), bidirectional overrides and zero-width
characters in the title, the tags, the reporter's notes and the analysts' notes and authors
are shown as their escapes (``\\x1b``, ``\\u202e``); the app's Markdown widgets hold no
text Streamlit would link. Ordinary text comes through as typed.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from rca.report import (
    render_html,
    render_markdown,
    render_regression_html,
    render_regression_markdown,
    render_terminal,
)
from rca.store import Store
from tests.app.conftest import (
    APP,
    CHAT_CF_USER,
    CHAT_DECODING,
    CHAT_SEEN,
    CHAT_SYSTEM,
    CHAT_USER,
    IMG,
    LINK,
    SCRIPT,
    _xss_fields,
    _xss_run,
)
from tests.helpers import GFM_BARE, HIDDEN, ST_EMAIL, ST_URL

MARKDOWN = MarkdownIt("commonmark").enable("table")
# every element the Markdown reports write themselves
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
    """What CommonMark makes of ``md``: only the report's own elements, no attribute but a
    code block's language, and every payload as text."""
    page = MARKDOWN.render(md)
    p = parsed(page)
    assert set(p.tags) <= CASE_FILE_ELEMENTS, set(p.tags) - CASE_FILE_ELEMENTS
    assert set(p.attrs) <= {("class", "language-text"), ("style", "text-align:right")}, p.attrs
    assert_inert(page, *shown)


def test_the_html_report_shows_payloads_as_text(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    run = Store.reader(db).get_run(run_id)
    page = render_html(run)
    assert "<h2>Training data</h2>" in page and "ticket" in page and "Unlearning (" in page
    assert_inert(page, LINK)


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


def test_the_markdown_report_escapes_html_and_links(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    md = render_markdown(Store.reader(db).get_run(run_id))
    assert "## Training data" in md and "0.500 after the top 1" in md
    assert_markdown_inert(md, LINK, f"note {SCRIPT} {IMG}", f"Title {SCRIPT} {IMG}")


@pytest.mark.parametrize("render", [render_markdown, render_html, render_terminal])
def test_a_chat_report_shows_payloads_as_text(xss_chat_db: tuple[Path, str], render: Any) -> None:
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


# ---------------------------------------------------- links, control sequences, bidi, zero-width

URLS = (
    "http://evil.example/a www.evil.example/b mallory@evil.example <https://evil.example/c> "
    "![x](http://evil.example/p.png) [y](javascript:alert(1))"
)
OSC8 = "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07"  # a terminal hyperlink
BIDI = "\u202eevil\u202c \u2066iso\u2069"
ZERO_WIDTH = "zero\u200bwidth\ufeff\u2060"
TITLE = f"Title {URLS} {BIDI} {ZERO_WIDTH} \x1b[2J"
AUTHOR = f"eve {OSC8} eve@evil.example {BIDI}"
NOTE = f"note {URLS} {OSC8} \x1b[2J \x9b31m {BIDI} {ZERO_WIDTH}"
REPORTER = f"reporter {URLS} {OSC8}"
TAGS = [f"tag {BIDI}", "http://evil.example/tag"]
# each as a reader must see it: every hidden character as its escape
SHOWN = {
    "title": "Title http://evil.example/a www.evil.example/b mallory@evil.example "
    "<https://evil.example/c> ![x](http://evil.example/p.png) [y](javascript:alert(1)) "
    r"\u202eevil\u202c \u2066iso\u2069 zero\u200bwidth\ufeff\u2060 \x1b[2J",
    "author": r"eve \x1b]8;;http://evil.example\x07click\x1b]8;;\x07 eve@evil.example "
    r"\u202eevil\u202c \u2066iso\u2069",
    "osc8": r"\x1b]8;;http://evil.example\x07click\x1b]8;;\x07",
    "csi": r"\x1b[2J \x9b31m",
    "bidi": r"\u202eevil\u202c \u2066iso\u2069",
    "zero_width": r"zero\u200bwidth\ufeff\u2060",
}
PLAIN_TITLE, PLAIN_NOTE = "PIN leaked to the caller", "PIN rotated today, see ticket 4521."


@pytest.fixture(scope="module")
def hostile_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(database, run id, plain run id): a run whose title, tags, reporter's notes, prompt and
    set reason, and an analyst's note and its author, carry links, terminal control sequences,
    bidi overrides and zero-width characters; and a run of an ordinary case, with a note."""
    db = tmp_path_factory.mktemp("app_hostile") / "rca.duckdb"
    fields = _xss_fields(
        id="hostile",
        title=TITLE,
        tags=TAGS,
        notes=REPORTER,
        prompt=f"prompt {URLS}\n{OSC8} {BIDI}",
        bad=f" bad {ZERO_WIDTH}",
    )
    store = Store(db, actor="tester")
    run_id = store.record_run(_xss_run(fields, set_reason=f"reason {URLS} {BIDI}"))
    store.add_note(run_id=run_id, author=AUTHOR, text=NOTE)
    plain = _xss_fields(id="plain", title=PLAIN_TITLE, tags=["pii"], notes=None)
    plain_id = store.record_run(_xss_run({**plain, "prompt": "caller: my pin?", "bad": " 4921"}))
    store.add_note(run_id=plain_id, author="ana", text=PLAIN_NOTE)
    return db, run_id, plain_id


def rendered_text(md: str) -> str:
    return "".join(parsed(MARKDOWN.render(md)).text)


def inline_tokens(md: str) -> list[Any]:
    tokens = MARKDOWN.parse(md)
    return [*tokens, *(c for t in tokens for c in t.children or [])]


def test_the_markdown_report_links_nothing_and_shows_hidden_characters(
    hostile_db: tuple[Path, str, str],
) -> None:
    db, run_id, plain_id = hostile_db
    md = render_markdown(Store.reader(db).get_run(run_id))
    assert not HIDDEN.search(md)
    assert_markdown_inert(md)  # no link, image or raw HTML
    bare = [t.content for t in inline_tokens(md) if t.type == "text" and GFM_BARE.search(t.content)]
    assert not bare  # every URL and address a GFM renderer would link sits in a code span
    text = rendered_text(md)
    assert f"Case hostile: {SHOWN['title']}\n" in text
    assert f", {SHOWN['author']}: note " in text
    for shown in SHOWN.values():
        assert shown in text, shown
    # ordinary text comes through as typed
    plain = render_markdown(Store.reader(db).get_run(plain_id))
    assert f"# Case plain: {PLAIN_TITLE}\n" in plain and f", ana: {PLAIN_NOTE}\n" in plain


def test_the_html_and_terminal_reports_show_hidden_characters(
    hostile_db: tuple[Path, str, str],
) -> None:
    db, run_id, plain_id = hostile_db
    run = Store.reader(db).get_run(run_id)
    page = render_html(run)
    assert not HIDDEN.search(page)
    assert_inert(page)
    text = "".join(parsed(page).text)
    assert f"Case hostile: {SHOWN['title']}" in text and f", {SHOWN['author']}: note " in text
    for shown in SHOWN.values():
        assert shown in text, shown
    term = render_terminal(run)
    assert not HIDDEN.search(term)
    assert f"# Case hostile: {SHOWN['title']}\n" in term and f", {SHOWN['author']}: note " in term
    for shown in SHOWN.values():
        assert shown in term, shown
    plain = Store.reader(db).get_run(plain_id)
    assert f"<h1>Case plain: {PLAIN_TITLE}</h1>" in render_html(plain)
    assert f", ana: {PLAIN_NOTE}\n" in render_terminal(plain)


# ------------------------------------------------------------------------------- the app

MARKDOWN_WIDGETS = (
    "title", "header", "subheader", "markdown", "caption", "success", "info", "warning", "error",
)  # fmt: skip


def streamlit_would_link(value: str) -> list[str]:
    """What Streamlit's Markdown would make live in ``value``: links, images, raw HTML, and
    text its autolinker links."""
    tokens = inline_tokens(value)
    live = [t.type for t in tokens if t.type in ("link_open", "image", "html_inline")]
    texts = [t.content for t in tokens if t.type == "text"]
    return live + [s for s in texts if ST_URL.search(s) or ST_EMAIL.search(s)]


def shown_in(at: AppTest, kind: str) -> list[str]:
    """What the page's ``kind`` widgets show, as a reader reads it (Markdown rendered)."""
    return [rendered_text(str(el.value)) for el in getattr(at, kind)]


def assert_page_is_text(at: AppTest) -> None:
    """No Markdown widget of the page holds a link or text Streamlit would link, and nothing
    the page shows holds a control, bidi or zero-width character."""
    assert not at.exception, at.exception
    for kind in MARKDOWN_WIDGETS:
        for el in getattr(at, kind):
            value = str(el.value)
            assert not HIDDEN.search(value), (kind, value)
            if not getattr(el, "allow_html", False):  # the heat strip and the graph are HTML
                assert not streamlit_would_link(value), (kind, value)
    for kind in ("text", "code", "metric"):
        for el in getattr(at, kind):
            assert not HIDDEN.search(str(el.value)), (kind, el.value)
    for df in at.dataframe:
        cells = [v for v in df.value.to_numpy().ravel() if isinstance(v, str)]
        assert not [v for v in cells if HIDDEN.search(v)], cells
    for widget in (*at.selectbox, *at.multiselect):
        assert not [o for o in widget.options if HIDDEN.search(str(o))], widget.options


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``page(db, name, **query)``: an AppTest of app.py on ``db``, switched to a page."""

    def make(db: Path, name: str, **query: str) -> AppTest:
        monkeypatch.setenv("RCA_DB", str(db))
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        at.query_params.update(query)
        at.switch_page(f"rca/ui/{name}.py").run()
        assert not at.exception, at.exception
        return at

    return make


def test_the_case_page_links_nothing_and_shows_hidden_characters(
    page: Any, hostile_db: tuple[Path, str, str]
) -> None:
    db, run_id, plain_id = hostile_db
    at = page(db, "case_detail", run=run_id)
    assert_page_is_text(at)
    title = shown_in(at, "title")[0]
    assert title.startswith("hostile: Title http[:]//evil.example/a www[.]evil.example/b ")
    assert SHOWN["bidi"] in title and SHOWN["zero_width"] in title
    captions = "\n".join(shown_in(at, "caption"))
    assert "eve \\x1b]8;;http[:]//evil.example\\x07click\\x1b]8;;\\x07 eve[@]evil.example" in (
        captions
    )
    assert f"tags tag {SHOWN['bidi']}, http[:]//evil.example/tag" in captions
    texts = [str(t.value) for t in at.text]
    assert f"reporter {URLS} {SHOWN['osc8']}" in texts  # the reporter's notes, as typed
    note = next(t for t in texts if t.startswith("note "))
    assert all(s in note for s in ("http://evil.example/a", SHOWN["osc8"], SHOWN["csi"]))
    assert any(SHOWN["bidi"] in str(c.value) for c in at.code)  # the prompt

    # ordinary text comes through as typed
    at = page(db, "case_detail", run=plain_id)
    assert_page_is_text(at)
    assert at.title[0].value == f"plain: {PLAIN_TITLE}"
    assert PLAIN_NOTE in [t.value for t in at.text]
    assert any("**ana**" in str(c.value) for c in at.caption)

    # a link to the page whose run parameter is a payload
    at = page(db, "case_detail", run=f"http://evil.example/{BIDI}")
    assert_page_is_text(at)
    assert "http[:]//evil.example/" + SHOWN["bidi"] in shown_in(at, "warning")[0]


def test_the_cases_page_shows_hidden_characters(
    page: Any, hostile_db: tuple[Path, str, str]
) -> None:
    db, _, _ = hostile_db
    at = page(db, "cases")
    assert_page_is_text(at)
    rows = at.dataframe[0].value.to_dict("records")
    by_case = {r["case"]: r for r in rows}
    assert SHOWN["bidi"] in by_case["hostile"]["title"]
    assert by_case["plain"]["title"] == PLAIN_TITLE
    assert f"tag {SHOWN['bidi']}" in at.multiselect(key="cases_tag").options
