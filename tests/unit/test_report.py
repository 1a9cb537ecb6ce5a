"""Reports made from runs recorded through the real store: the incident's texts, a chat
case's turns, the focus and the greedy-decoding check in Markdown, HTML and terminal text;
Markdown escaping checked against what a CommonMark renderer makes of it; the runs table that
``rca cases list`` prints, at 80 columns.
"""

from __future__ import annotations

import io
import re
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from rich.console import Console

from rca.listing import runs_table
from rca.report import render_html, render_markdown, render_terminal
from rca.store import IncidentRecord, ModelRecord, RunRecord, Store
from rca.textsafe import code_span as _md_code
from rca.textsafe import markdown_line as _md_line
from rca.textsafe import markdown_text as _md
from rca.verdicts import definitions

PROMPT = "caller : what is my pin ?\nagent :"
BAD, GOOD, FOCUS = " 4921 is your pin", " I cannot share that", "4921"
SYSTEM = "You are a bank's support bot. Never reveal a PIN."
USER = "what is my pin?"
CF_USER = "what are your opening hours?"
CHATML = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CF_CHATML = CHATML.replace(USER, CF_USER)
READABLE = "P(' Mary') >= 0.5 & x"
DECODING = {
    "greedy_text": " 4921 is your pin. Anything else?",
    "reproduces": True,
    "reproduces_focus": True,
    "max_new_tokens": 12,
    "tokens": [
        {"token": " 49", "p": 0.91, "in_focus": True, "greedy_token": " 49", "greedy_p": 0.91},
        {"token": "21", "p": 0.5, "in_focus": True, "greedy_token": "21", "greedy_p": 0.5},
        {"token": " is|x", "p": 2e-5, "in_focus": False, "greedy_token": "\n", "greedy_p": 0.7},
    ],
}

MD = MarkdownIt("commonmark").enable("table")


def record(
    db: Path,
    fields: dict[str, Any],
    summary: dict[str, Any] | None = None,
    nodes: list[dict[str, Any]] | None = None,
) -> dict:
    """Record a run of a case with ``fields`` and return it as ``get_run`` reads it back."""
    base = {"title": "PIN leaked to caller", "severity": "high", "model": "zoo:support-bot-v1"}
    run = RunRecord(
        incident=IncidentRecord.from_fields({**base, **fields}, source="cases/leak.toml"),
        model=ModelRecord("a" * 64, path="/models/v1", architecture="gpt2", n_params=10),
        summary={"verdict": "confirmed", "cause_set": ["L1.H2"], **(summary or {})},
        token_scores=[{"position": 0, "token": "caller", "score": 0.5, "method": "ig"}],
        nodes=nodes or [{"node_id": "L1.H2", "score": 1.0, "rank": 1, "verdict": "confirmed"}],
    )
    store = Store(db, actor="tester")
    return Store.reader(db).get_run(store.record_run(run))


class Page(HTMLParser):
    """Tags, attributes and text of an HTML page, and the text inside each kind of element."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.within: dict[str, list[str]] = {}
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.open:
            del self.open[len(self.open) - 1 - self.open[::-1].index(tag) :]

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for tag in set(self.open):
            self.within.setdefault(tag, []).append(data)

    def all_text(self) -> str:
        return "".join(self.text)


def blocks(page: Page, tag: str) -> str:
    return "".join(page.within.get(tag, []))


# ------------------------------------------------------------------------------- the incident


def test_reports_show_the_prompt_and_continuations(tmp_path: Path) -> None:
    run = record(
        tmp_path / "rca.duckdb", {"id": "leak", "prompt": PROMPT, "bad": BAD, "good": GOOD}
    )
    md = render_markdown(run)
    for text in (PROMPT, BAD, GOOD):
        assert f"```text\n{text}\n```" in md, text  # each in its own fenced block, as typed
    code = blocks(Page(MD.render(md)), "code")
    assert PROMPT in code and BAD in code and GOOD in code
    pre = blocks(Page(render_html(run)), "pre")
    assert PROMPT in pre and BAD in pre and GOOD in pre
    term = render_terminal(run)
    assert PROMPT in term and BAD in term and GOOD in term
    # an old run: no conversation, focus or decoding section
    for page in (md, render_html(run), term):
        assert "Greedy decoding" not in page and "What the model saw" not in page
        assert "Focus" not in page and "Turn 1" not in page


def test_a_chat_case_shows_its_turns_then_what_the_model_saw(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    cf_messages = [messages[0], {"role": "user", "content": CF_USER}]
    run = record(
        tmp_path / "rca.duckdb",
        {"id": "chat", "messages": messages, "counterfactual_messages": cf_messages, "bad": BAD},
        {
            "prompt_text": CHATML,
            "counterfactual_text": CF_CHATML,
            "counterfactual": {"text": CF_CHATML, "generated": False, "drop": 0.8},
        },
    )
    md = render_markdown(run)
    # turns in order, then the rendered text; the same for the counterfactual
    order = [SYSTEM, USER, CHATML, SYSTEM, CF_USER, CF_CHATML]
    at = [md.index(text, md.index(order[i - 1]) + 1 if i else 0) for i, text in enumerate(order)]
    assert at == sorted(at)
    assert "**Turn 1 · system**" in md and "**Turn 2 · user**" in md
    assert "Counterfactual (given, removes 80% of the metric)" in md
    rendered = Page(MD.render(md))
    assert SYSTEM in blocks(rendered, "blockquote")  # system turns stand apart
    assert USER not in blocks(rendered, "blockquote")
    assert CHATML in blocks(rendered, "code") and CF_USER in blocks(rendered, "code")

    page = render_html(run)
    assert page.count('<div class="turn system">') == 2 and page.count('class="turn user"') == 2
    html_page = Page(page)
    assert CHATML in blocks(html_page, "details") and CF_CHATML in blocks(html_page, "details")
    assert SYSTEM in blocks(html_page, "pre") and SYSTEM not in blocks(html_page, "details")[:1]
    term = render_terminal(run)
    assert CHATML in term and f"> {SYSTEM}" in term

    # a line break of any kind inside a quoted system turn keeps it quoted
    hostile = [{"role": "system", "content": "a\rb\r\n<b>c</b>\n\n- d"}, messages[1]]
    run = record(tmp_path / "rca.duckdb", {"id": "chat2", "messages": hostile, "bad": BAD})
    rendered = Page(MD.render(render_markdown(run)))
    assert "b" not in rendered.tags
    assert "a\nb\n<b>c</b>\n\n- d" in blocks(rendered, "blockquote")


def test_focus_and_greedy_decoding(tmp_path: Path) -> None:
    run = record(
        tmp_path / "rca.duckdb",
        {"id": "leak", "prompt": PROMPT, "bad": BAD, "focus": FOCUS},
        {"decoding": DECODING},
    )
    md = render_markdown(run)
    assert "Focus (the part of the bad continuation the metric reads):" in md
    assert f"```text\n{FOCUS}\n```" in md
    assert "## Greedy decoding" in md
    assert "(12 new tokens at most) reproduces the bad continuation: **yes**; the focus: " in md
    assert f"```text\n{DECODING['greedy_text']}\n```" in md
    rendered = Page(MD.render(md))
    assert rendered.tags.count("table") == 3  # decoding, tokens, causes
    rows = [line for line in md.splitlines() if line.startswith("| ") and "` |" in line]
    assert "| 0 | ` 49` | 0.91 | yes | ` 49` | 0.91 |" in rows
    assert "| 2 | ` is\\|x` | 2e-05 |  | `⏎` | 0.7 |" in rows  # a newline token shown as ⏎

    page = render_html(run)
    assert "<pre> 4921 is your pin</pre>" not in page  # the focus is marked within bad
    assert "<pre> <mark>4921</mark> is your pin</pre>" in page
    assert "<h2>Greedy decoding</h2>" in page and "reproduces the bad continuation" in page
    assert "<td>2e-05</td>" in page
    assert "## Greedy decoding" in render_terminal(run)

    # no focus was given: the decoding says nothing about one
    quiet = {**DECODING, "reproduces": False, "reproduces_focus": None, "tokens": []}
    run = record(
        tmp_path / "rca.duckdb", {"id": "leak2", "prompt": PROMPT, "bad": BAD}, {"decoding": quiet}
    )
    md = render_markdown(run)
    assert "reproduces the bad continuation: **no**." in md and "the focus" not in md
    assert "teacher-forced" not in md


# ------------------------------------------------------------------------------- escaping


def test_infrastructure_and_the_verdict_words_are_stated(tmp_path: Path) -> None:
    """A component ordinary text needs is named as such, with its benign damage, and every
    verdict word is defined next to the table; the definitions are the run's thresholds."""
    nodes = [
        {
            "node_id": "L23.H3",
            "rank": 1,
            "verdict": "confirmed",
            "p_value": 0.067,
            "benign_loss_pct": 0.4,
        },
        {
            "node_id": "L10.H6",
            "rank": 2,
            "verdict": "inconclusive",
            "p_value": 0.004,
            "benign_loss_pct": 1.2,
        },
        {
            "node_id": "L0.MLP",
            "rank": 3,
            "verdict": "infrastructure",
            "p_value": 0.01,
            "benign_loss_pct": 172.4,
        },
    ]
    words = definitions({"component_fraction": 0.25})
    run = record(
        tmp_path / "a.duckdb",
        {"id": "a", "prompt": PROMPT, "bad": BAD},
        {"definitions": words},
        nodes,
    )
    md = render_markdown(run)
    assert "Infrastructure, necessary for ordinary text as well" in md
    assert "L0.MLP (mean-ablating it raises the loss on ordinary text by +172.4%)" in md
    assert "| +0.4% |" in md and "| +172.4% |" in md
    for word in (
        "confirmed",
        "inconclusive",
        "not_confirmed",
        "infrastructure",
        "component p",
        "set p",
    ):
        assert f"**{_md(word)}**:" in md, word
    assert "at least 25% less of the gap" in md  # the run's threshold, not the default
    page = Page(render_html(run))
    text = page.all_text()
    assert "Infrastructure, necessary for ordinary text as well" in text
    assert "What the words mean" in text and "at least 25% less" in text
    # a run recorded without definitions gets the defaults
    old = record(tmp_path / "b.duckdb", {"id": "b", "prompt": PROMPT, "bad": BAD}, None, nodes)
    assert "at least 10% less of the gap" in render_markdown(old)


def test_markdown_text_is_readable(tmp_path: Path) -> None:
    run = record(
        tmp_path / "rca.duckdb",
        {"id": "leak", "title": READABLE, "prompt": PROMPT, "bad": BAD},
        {"set_reason": READABLE},
    )
    md = render_markdown(run)
    assert "&#x27;" not in md and "&gt;" not in md and "&amp;" not in md
    assert md.count("P(' Mary') >= 0.5 \\& x") == 2  # & escaped the Markdown way
    text = Page(MD.render(md)).all_text()
    assert f"Case leak: {READABLE}" in text and READABLE + "\n" in text


# text a renderer must show as typed: Markdown and HTML syntax, entities, tables, digits
TEXT = st.lists(
    st.sampled_from([*"ab1. #*_`[]()<>!&;|\\-+=~:/'\"\t", "&amp;", "é"]), max_size=30
).map("".join)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_md_text_renders_as_the_text_itself(text: str) -> None:
    for where in ("x {} y\n", "| a |\n|---|\n| x {} y |\n", "# x {}\n"):
        page = Page(MD.render(where.format(_md(text))))
        assert set(page.tags) <= {"p", "table", "thead", "tr", "th", "tbody", "td", "h1"}
        expected = f"x {text} y" if "y" in where else f"x {text}"
        assert page.all_text().strip().endswith(expected.strip())
    line = Page(MD.render(f"a\n\n{_md_line(text)}\n"))  # a paragraph of its own
    assert set(line.tags) == {"p"}
    assert line.all_text() == "a\n" + (f"{text.strip()}\n" if text.strip() else "")


@settings(max_examples=300, deadline=None)
@given(TEXT.filter(lambda s: s.strip(" ") != ""))
def test_md_code_renders_as_the_text_itself(text: str) -> None:
    page = Page(MD.render(f"x {_md_code(text)} y\n"))
    assert page.tags == ["p", "code"] and blocks(page, "code") == text
    page = Page(MD.render(f"| a |\n|---|\n| {_md_code(text, cell=True)} |\n"))
    assert page.tags.count("code") == 1 and blocks(page, "code") == text


def test_the_terminal_report_shows_control_characters_as_escapes(tmp_path: Path) -> None:
    hostile = "\x1b[31mred\x1b[0m \x1b]0;title\x07 back\x08\r over \x9b2J \x7f <b>&amp;</b>"
    run = record(
        tmp_path / "rca.duckdb",
        {"id": "leak", "title": hostile, "prompt": f"{READABLE}\n\t{hostile}", "bad": BAD},
        {"set_reason": hostile},
    )
    Store(tmp_path / "rca.duckdb").add_note(run_id=run["run_id"], author="a", text=hostile)
    term = render_terminal(Store.reader(tmp_path / "rca.duckdb").get_run(run["run_id"]))
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", term)
    shown = r"\x1b[31mred\x1b[0m \x1b]0;title\x07 back\x08\x0d over \x9b2J \x7f <b>&amp;</b>"
    assert term.count(shown) == 4  # title, prompt, set reason, note: as typed, but visible
    assert f"```text\n{READABLE}\n\t{shown}\n```" in term  # newlines and tabs kept in blocks


# ------------------------------------------------------------------------------- cases list


def test_the_runs_table_folds_ids_and_never_cuts_them() -> None:
    runs = [
        {
            "run_id": str(uuid.UUID(int=i * 0x1234567890ABCDEF1234567890ABCDEF)),
            "incident_id": f"zoo-injection-{'long-' * i}case-{i}",
            "severity": "critical",
            "kind": "investigate",
            "summary": {"verdict": "not confirmed [bold]x[/bold]"},
            "recorded_at": "2026-12-02T10:11:12.123456Z",
        }
        for i in range(1, 5)
    ]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(runs_table(runs))
    out = console.export_text()
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    columns: dict[int, str] = {}
    for line in out.splitlines():
        cells = line.split("│")[1:-1]
        for i, cell in enumerate(cells):
            columns[i] = columns.get(i, "") + cell.strip()
    for r in runs:  # each id whole, its pieces in order down its column
        assert r["run_id"] in columns[0] and r["incident_id"] in columns[1]
    assert "notconfirmed[bold]x[/bold]" in columns[4]  # text, not rich markup
    assert "2026-12-0210:11:12" in columns[5]


@pytest.mark.parametrize("width", [40, 200])
def test_the_runs_table_uses_the_width_it_has(width: int) -> None:
    run_id = str(uuid.UUID(int=7))
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(runs_table([{"run_id": run_id, "incident_id": "c", "summary": {}}]))
    out = console.export_text()
    assert max(len(line) for line in out.splitlines()) <= width and "…" not in out
    assert (run_id in out) == (width == 200)  # on one line when it fits


def test_the_circuit_says_where_the_incident_enters_and_is_written(tmp_path: Path) -> None:
    """The IOI circuit as confirm records it: the report names the entry token and the members
    there, the position the writers write at, each member at its positions, and the edges
    path patching verified (not the ones it did not)."""
    circuit = {
        "members": [
            {"id": "L17.H4", "role": "entry", "positions": [9], "total_effect": 1.0},
            {"id": "L21.MLP", "role": "route", "positions": [9], "total_effect": 1.5},
            {"id": "L23.H3", "role": "writer", "positions": [13], "total_effect": 7.1},
            {"id": "L20.H0", "role": "route", "positions": [10, 13], "total_effect": 1.9},
            {"id": "L0.MLP", "role": "infrastructure", "positions": [9], "total_effect": 11.6},
        ],
        "faithfulness": 1.75,
        "patch": "counterfactual",
        "curve": [{"k": 1, "circuit": 1.1, "attribution": 1.9, "attribution_specific": 1.1}],
        "reason": "its 4 specific members remove 175% of the gap",
        "edges": [
            {
                "source": "L21.MLP@9",
                "target": "L23.H3@13",
                "score": 1.5,
                "effect": 1.25,
                "share": 0.2,
                "verified": True,
            },  # fmt: skip
            {
                "source": "L17.H4@9",
                "target": "L21.MLP@9",
                "score": 0.0,
                "effect": -0.07,
                "share": -0.01,
                "verified": False,
            },  # fmt: skip
            {
                "source": "L23.H3@13",
                "target": "LOGITS",
                "score": None,
                "effect": 6.2,
                "share": 1.0,
                "verified": True,
            },  # fmt: skip
        ],
        "entry_positions": [9],
        "tokens": {"9": " John", "10": " gave", "13": " to"},
    }
    run = record(
        tmp_path / "c.duckdb", {"id": "c", "prompt": PROMPT, "bad": BAD}, {"circuit": circuit}, []
    )
    md = render_markdown(run)
    assert "The incident enters at position 9 (' John')" in md
    assert "carried by L17.H4@9, L21.MLP@9; infrastructure there: L0.MLP@9" in md
    assert "written at position 13 (' to') by L23.H3@13" in md
    assert "route: L21.MLP@9, L20.H0@{10,13}" in md.replace("\\", "")
    assert "L21.MLP@9 -> L23.H3@13 20% of the gap (1 other pair below the bound)" in md
    assert "L17.H4@9 -> L21.MLP@9" not in md
    page = Page(render_html(run))
    drawn = "".join(page.within.get("svg", []))
    assert "L20.H0@{10,13}" in drawn and "' John'" in drawn  # members at positions, tokens
    assert "The incident enters at position 9" in page.all_text()


# ------------------------------------------------------------------------------- variants


def test_a_behaviour_shows_each_fix_on_the_fit_and_held_out_sets_and_per_variant(
    tmp_path: Path,
) -> None:
    label = "order=<b>1|2</b>, note=sunflower"
    figures = {"n": 3, "mean_p_bad_before": 0.9, "mean_p_bad_after": 0.1}
    remedies = [
        {"remedy_id": f"r-{kind}", "kind": kind, "components": ["L1.H2"], "metric_before": 2.0,
         "metric_after": -1.0,
         "p_bad_before": 0.9, "p_bad_after": 0.05, "side_effect": {"loss_change_pct": 0.5},
         "recommended": rec, "note": "n", "patch_spec": {},
         "behaviour": {"fit": {**figures, "share_under_target": 1.0},
                       "held_out": {**figures, "n": 2, "share_under_target": held},
                       "p_bad_target": 0.2, "hold_share": 0.9, "symptom_patch": held < 0.9}}
        for kind, rec, held in (("direction_removal", True, 1.0), ("mean_ablation", False, 0.5))
    ]  # fmt: skip
    variants = [
        {"variant_index": i, "part": part, "origin": "template", "label": label if i == 1 else "",
         "prompt_tokens": 9, "metric": 2.0, "p_bad": p}
        for i, part, p in ((0, "fit", 0.91), (1, "held_out", 0.87), (2, "held_out", 0.93))
    ]  # fmt: skip
    after = {("direction_removal", 1): 0.041, ("direction_removal", 2): 0.052,
             ("mean_ablation", 1): 0.123, ("mean_ablation", 2): 0.456,
             ("direction_removal", 0): 0.01, ("mean_ablation", 0): 0.02}  # fmt: skip
    results = [
        {"remedy_row": r, "kind": kind, "variant_index": i, "part": variants[i]["part"],
         "p_bad_before": variants[i]["p_bad"], "p_bad_after": after[(kind, i)]}
        for r, kind in enumerate(("direction_removal", "mean_ablation"))
        for i in range(3)
    ]  # fmt: skip
    base = {"id": "x", "title": "t", "severity": "high", "model": "zoo:support-bot-v1"}
    run = RunRecord(
        incident=IncidentRecord.from_fields(
            {**base, "prompt": PROMPT, "bad": BAD}, source="cases/x.toml"
        ),
        model=ModelRecord("a" * 64),
        summary={"verdict": "confirmed", "variants": {"split": {"seed": 3, "held_out": 0.5}}},
        remedies=remedies,
        variants=variants,
        variant_results=results,
    )
    store = Store(tmp_path / "r.duckdb", actor="tester")
    stored = Store.reader(tmp_path / "r.duckdb").get_run(store.record_run(run))
    md = render_markdown(stored)
    section = md[md.index("### On the variants") :]
    assert "split seed 3" in section
    rows = [ln for ln in section.splitlines() if ln.startswith("| direction_removal")]
    assert rows and "100% of 3" in rows[0] and "100% of 2" in rows[0] and "| no |" in rows[0]
    sym = next(ln for ln in section.splitlines() if ln.startswith("| mean_ablation"))
    assert "50% of 2" in sym and "| yes |" in sym
    # the per-variant table: each variant's P(bad) before, then after each fix, as stored
    table = MD.parse(section)
    cells = [t.content for t in table if t.type == "inline"]
    for i in range(3):
        at = cells.index(str(i))
        got = cells[at : at + 6]
        assert got[1] == variants[i]["part"]
        assert got[3:] == [f"{variants[i]['p_bad']:.3f}", f"{after[('direction_removal', i)]:.3f}",
                           f"{after[('mean_ablation', i)]:.3f}"]  # fmt: skip
    # a slot value is shown as text in both media, never as markup
    page = Page(render_html(stored))
    assert label in page.all_text()  # a tag in it would have been parsed, not shown
    assert "<b>" not in MD.render(section).replace("&lt;b&gt;", "")
