"""Case files (HTML and Markdown) made from a run whose every string is a payload.

The HTML report is parsed: no element, attribute or URL may come from the payloads, and each
payload must be there as text. The Markdown report must keep the payloads inert too: it is
shown by the app and by any Markdown viewer.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from rca.casefile import (
    render_html,
    render_markdown,
    render_regression_html,
    render_regression_markdown,
)
from rca.store import Store
from tests.app.conftest import IMG, SCRIPT


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


def assert_inert(page: str) -> None:
    p = parsed(page)
    assert "script" not in p.tags and "img" not in p.tags and "iframe" not in p.tags
    assert not [a for a, _ in p.attrs if a.lower().startswith("on")]
    urls = [v for a, v in p.attrs if a in ("href", "src", "action") and v]
    assert not [u for u in urls if not u.startswith("#")], urls
    text = "".join(p.text)
    assert SCRIPT in text and IMG in text  # shown, as text


def test_the_html_case_file_shows_payloads_as_text(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    run = Store.reader(db).get_run(run_id)
    assert_inert(render_html(run))


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
            "reason": f"{SCRIPT} {IMG}",
        }
    ]
    assert_inert(render_regression_html(rows, model=f"/m/{IMG}"))
    md = render_regression_markdown(rows, model=f"/m/{IMG}")
    assert "<script" not in md.lower() and "<img" not in md.lower()


def test_the_markdown_case_file_escapes_html_and_links(xss_db: tuple[Path, str]) -> None:
    db, run_id = xss_db
    md = render_markdown(Store.reader(db).get_run(run_id))
    assert "<script" not in md.lower() and "<img" not in md.lower()
    assert "](javascript:" not in md
