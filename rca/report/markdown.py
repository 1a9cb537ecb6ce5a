"""The report as text: Markdown, or a terminal's; and the regression check in Markdown.

A report's layout is written once (``_report_lines``) for a medium that says how a case string
is shown (``_Medium``):

- Markdown: backslash escapes for the characters that open inline markup or end a table cell,
  newlines folded to spaces, a URL or e-mail address a renderer would link in a code span,
  code spans and fenced blocks delimited by a backtick run longer than any inside. What a
  CommonMark or GFM renderer makes of it holds no element from the data.
- terminal: the text as it is otherwise, with control, bidirectional and invisible characters
  shown as their escapes, so a payload cannot move the cursor, clear the screen, change
  colours or make a hyperlink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rca.report.stored import NEWLINE as _NEWLINE
from rca.report.stored import (
    behaviour_of,
    case_fields,
    circuit_lines,
    circuit_of,
    fit_evidence_lines,
    infrastructure_sentence,
    provenance_of,
    token_warning,
    turns,
    verdict_words,
)
from rca.report.stored import cell_token as _token
from rca.report.stored import json_column as _j
from rca.report.stored import names_or_dash as _top
from rca.report.stored import number as _f
from rca.report.stored import percent as _pct
from rca.report.stored import ranked_causes as _causes
from rca.report.stored import summary_of as _summary
from rca.report.stored import token_start as _token_start
from rca.report.stored import yes_no as _yes
from rca.textsafe import code_span as _md_code
from rca.textsafe import fence
from rca.textsafe import markdown_line as _md_line
from rca.textsafe import markdown_text as _md
from rca.textsafe import visible as _visible

__all__ = ["render_markdown", "render_regression_markdown", "render_terminal"]


class _Medium(Protocol):
    """How case strings are written into the report's text, for one medium."""

    def text(self, v: Any) -> str:
        """Inline text within a line or a table cell."""
        ...

    def code(self, v: Any, *, cell: bool = False) -> str:
        """An inline code span (in a table ``cell``, or within a line)."""
        ...

    def block(self, v: Any) -> str:
        """A verbatim block: the text with its newlines and whitespace, fenced."""
        ...


class _Markdown:
    def text(self, v: Any) -> str:
        return _md(v)

    def code(self, v: Any, *, cell: bool = False) -> str:
        return _md_code(v, cell=cell)

    def block(self, v: Any) -> str:
        return fence(v)


class _Terminal:
    """Markdown's layout, the text as it is: a reader of a terminal sees what was typed."""

    def text(self, v: Any) -> str:
        return _NEWLINE.sub(" ", _visible(v))

    def code(self, v: Any, *, cell: bool = False) -> str:
        return f"`{self.text(v)}`"

    def block(self, v: Any) -> str:
        return fence(_visible(v))  # a carriage return shown, not read as a line break


# ---------------------------------------------------------------------------------------------
# a run's report as text


def _input_lines(m: _Medium, *, text: Any, messages: Any, seen: Any, what: str) -> list[str]:
    """A prompt or counterfactual as given (its text, or a chat's turns with system turns
    quoted), then what the model saw when that is not the text as given."""
    chat = turns(messages)
    if chat:
        n = len(chat)
        lines = [f"{what}, a conversation of {n} turn{'s' * (n != 1)}:"]
        for i, (role, content) in enumerate(chat, 1):
            block = m.block(content)
            if role == "system":  # instructions, not dialogue: quoted, so they stand apart
                block = "\n".join(f"> {row}" if row else ">" for row in _NEWLINE.split(block))
            lines += ["", f"**Turn {i} · {m.text(role)}**", "", block]
    else:
        lines = [f"{what}:", "", m.block(text)]
    if seen and (chat or seen != text):
        how = "the conversation in the model's chat template" if chat else "the exact text"
        lines += ["", f"What the model saw ({how}):", "", m.block(seen)]
    return lines


def _decoding_lines(m: _Medium, dec: Any) -> list[str]:
    """The greedy-decoding check: does the model say the bad continuation unprompted?"""
    if not isinstance(dec, Mapping):
        return []
    limit = dec.get("max_new_tokens")
    focus = dec.get("reproduces_focus")
    lines = [
        "",
        "## Greedy decoding",
        "",
        "Greedy decoding from the prompt"
        + (f" ({int(limit)} new tokens at most)" if limit is not None else "")
        + f" reproduces the bad continuation: **{_yes(dec.get('reproduces'))}**"
        + (f"; the focus: **{_yes(focus)}**" if focus is not None else "")
        + ".",
        "",
        "Greedy text:",
        "",
        m.block(dec.get("greedy_text")),
    ]
    toks = [t for t in dec.get("tokens") or [] if isinstance(t, Mapping)]
    if toks:
        lines += [
            "",
            "Each token of the bad continuation with its teacher-forced probability, next to "
            "the token greedy decoding produced at that step:",
            "",
            "| # | token | P (teacher-forced) | in focus | greedy token | greedy P |",
            "|---:|---|---:|---|---|---:|",
        ]
        lines += [
            f"| {i} | {m.code(_token(t.get('token')), cell=True)} | {_f(t.get('p'), '.3g')} | "
            f"{'yes' if t.get('in_focus') else ''} | "
            f"{m.code(_token(t.get('greedy_token')), cell=True)} | "
            f"{_f(t.get('greedy_p'), '.3g')} |"
            for i, t in enumerate(toks)
        ]
    return lines


def _report_lines(run: Mapping[str, Any], m: _Medium) -> list[str]:
    case = case_fields(run)
    model = run.get("model") or {}
    summary = _summary(run)
    versions = _j(run.get("versions")) or {}
    lines = [
        f"# Case {m.text(case.get('id'))}: {m.text(case.get('title'))}",
        "",
        f"- run {m.code(run.get('run_id'))} ({m.text(run.get('kind'))}, "
        f"status {m.text(run.get('status'))}),"
        f" recorded {m.text(run.get('recorded_at') or run.get('finished_at'))}",
        f"- severity **{m.text(case.get('severity'))}**; "
        f"verdict **{m.text(summary.get('verdict'))}**",
        "",
        "## Incident",
        "",
        *_input_lines(
            m,
            text=case.get("prompt"),
            messages=case.get("messages"),
            seen=summary.get("prompt_text"),
            what="Prompt",
        ),
        "",
        "Bad continuation:",
        "",
        m.block(case.get("bad")),
    ]
    if case.get("focus"):
        lines += ["", "Focus (the part of the bad continuation the metric reads):", ""]
        lines.append(m.block(case["focus"]))
    if case.get("good"):
        lines += ["", "Good continuation:", "", m.block(case["good"])]
    cf = summary.get("counterfactual") or {}
    if cf or case.get("counterfactual_messages"):
        what = "Counterfactual"
        if cf:
            what += (
                f" ({'generated' if cf.get('generated') else 'given'}, removes "
                f"{_f(cf.get('drop'), '.0%')} of the metric)"
            )
        lines += [""] + _input_lines(
            m,
            text=cf.get("text"),
            messages=case.get("counterfactual_messages"),
            seen=summary.get("counterfactual_text") or cf.get("text"),
            what=what,
        )
    lines += _decoding_lines(m, summary.get("decoding"))
    lines += [
        "",
        "## Model and environment",
        "",
        f"- fingerprint {m.code(model.get('fingerprint') or run.get('model_fingerprint'))}",
        f"- architecture {m.text(model.get('architecture'))}, "
        f"{m.text(model.get('n_params'))} parameters, path {m.code(model.get('path'))}",
        f"- device {m.text(run.get('device'))}, seed {m.text(run.get('seed'))}",
        "- versions: " + ", ".join(f"{m.text(k)} {m.text(v)}" for k, v in sorted(versions.items())),
        "",
        "## Token attribution",
        "",
    ]
    start = _token_start(summary.get("token_completeness"))
    if start:
        lines += [start, ""]
    warn = token_warning(summary.get("token_completeness"))
    if warn:
        lines += [f"**Warning:** {m.text(warn)}.", ""]
    lines += [
        "| position | token | score |",
        "|---:|---|---:|",
    ]
    for t in run.get("token_scores", []):
        lines.append(
            f"| {t['position']} | {m.code(_token(t['token']), cell=True)} | {_f(t['score'])} |"
        )
    lines += [
        "",
        "## Causes",
        "",
        f"Cause set: **{m.text(', '.join(summary.get('cause_set') or []) or '-')}**. "
        f"{m.text(summary.get('set_reason'))}",
        "",
    ]
    infra = infrastructure_sentence(run)
    if infra:
        lines += [m.text(infra), ""]
    lines += [
        "| rank | component | attribution | total effect | direct effect | necessity "
        "| component p | benign loss | verdict |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in _causes(run):
        lines.append(
            f"| {c['rank']} | {m.text(c['node_id'])} | {_f(c.get('score'))} | "
            f"{_f(c.get('total_effect'))} | {_f(c.get('direct_effect'))} | "
            f"{_f(c.get('necessity'))} | {_f(c.get('p_value'), '.3f')} | "
            f"{_pct(c.get('benign_loss_pct'))} | {m.text(c.get('verdict'))} |"
        )
    lines += ["", "What the words mean:", ""]
    lines += [f"- **{m.text(k)}**: {m.text(v)}" for k, v in verdict_words(run).items()]
    circuit = circuit_of(run)
    if circuit is not None:
        text = circuit_lines(circuit)
        lines += ["", "## Circuit", "", m.text(text[0]), ""]
        lines += [f"- {m.text(t)}" for t in text[1:]]
        curve = circuit.get("curve") or []
        if curve:
            lines += [
                "",
                "Faithfulness of the first k components (the circuit's order, and the trace's "
                "attribution ranking):",
                "",
                "| k | circuit | attribution top-k | attribution top-k, infrastructure left out |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {int(r['k'])} | {_f(r.get('circuit'), '.0%')} | "
                f"{_f(r.get('attribution'), '.0%')} | "
                f"{_f(r.get('attribution_specific'), '.0%')} |"
                for r in curve
            ]
    lines += _fit_evidence_lines(run, m)
    lines += ["", "## Remediation", ""]
    for r in run.get("remedies", []):
        mark = " (recommended)" if r.get("recommended") else ""
        lines.append(f"- **{m.text(r['kind'])}**{mark}: {m.text(r.get('note'))}")
    lines += _behaviour_lines(run, m)
    lines += _provenance_lines(run, m)
    lines += ["", "## Notes", ""]
    notes = run.get("notes", [])
    if not notes:
        lines.append("No notes yet (`rca notes add RUN --author A --text T`).")
    for n in notes:
        lines.append(
            f"- {m.text(n.get('created_at'))}, {m.text(n.get('author'))}: {m.text(n.get('text'))}"
        )
    return lines


def _fit_evidence_lines(run: Mapping[str, Any], m: _Medium) -> list[str]:
    """The verdict measured on the fit variants: the cause set, the behaviour's circuit, and
    each component's share of the gap (mean, 95% interval) and consistency."""
    got = fit_evidence_lines(run)
    if got is None:
        return []
    text, rows = got
    lines = ["", "## On the fit variants", "", *(m.text(t) for t in text), ""]
    lines += [
        "| component | in the cause set | share of the gap, mean (95% interval) | holds on | "
        "necessary on |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {m.code(r['id'], cell=True)} | {'yes' if r['in_set'] else 'no'} | "
        f"{_f(r['mean'], '.2f')} ({_f(r['ci'][0], '.2f')} to {_f(r['ci'][1], '.2f')}) | "
        f"{_pct_plain(r.get('holds'))} | {_pct_plain(r['consistency'])} |"
        for r in rows
    ]
    return lines


def _behaviour_lines(run: Mapping[str, Any], m: _Medium) -> list[str]:
    """The fixes on the case's variants: per fix the fit and held-out figures, then P(bad)
    per variant before and after each fix."""
    b = behaviour_of(run)
    if b is None or not b["fixes"]:
        return []
    first = b["fixes"][0]
    target, share = first.get("p_bad_target"), first.get("hold_share")
    split = b["split"]
    lines = [
        "",
        "### On the variants",
        "",
        m.text(
            f"Each fix was fit on the incident prompt and the fit variants and scored on the "
            f"held-out variants, which chose nothing (split seed {split.get('seed')}, held-out "
            f"share {split.get('held_out')}). A fix holds on a set where P(bad) is under "
            f"{target} on at least {_pct_plain(share)} of it; one that holds on the fit set and "
            "not on the held-out variants is a symptom patch, never recommended."
        ),
        "",
        "| fix | fit: under target | held out: under target | held out: mean P(bad) | "
        "symptom patch |",
        "|---|---:|---:|---:|---|",
    ]
    for f in b["fixes"]:
        fit, held = f.get("fit") or {}, f.get("held_out") or {}
        mark = " (recommended)" if f["recommended"] else ""
        lines.append(
            f"| {m.text(f['kind'])}{mark} | {_pct_plain(fit.get('share_under_target'))} of "
            f"{fit.get('n')} | {_pct_plain(held.get('share_under_target'))} of {held.get('n')} "
            f"| {_f(held.get('mean_p_bad_before'), '.3f')} -> "
            f"{_f(held.get('mean_p_bad_after'), '.3f')} | "
            f"{'yes' if f.get('symptom_patch') else 'no'} |"
        )
    kinds = [str(f["kind"]) for f in b["fixes"]]
    lines += [
        "",
        "P(bad) per variant, before and after each fix:",
        "",
        "| variant | set | slots | P(bad) | " + " | ".join(m.text(k) for k in kinds) + " |",
        "|---:|---|---|---:|" + "---:|" * len(kinds),
    ]
    for v in b["variants"]:
        cells = " | ".join(_f(v["after"].get(k), ".3f") for k in kinds)
        lines.append(
            f"| {v['index']} | {m.text(v['part'])} | "
            f"{m.code(v['label'], cell=True) if v['label'] else '-'} "
            f"| {_f(v['p_bad'], '.3f')} | {cells} |"
        )
    return lines


def _provenance_lines(run: Mapping[str, Any], m: _Medium) -> list[str]:
    p = provenance_of(run)
    if p is None:
        return []
    lines = ["", "## Training data", "", m.text(p["heading"]) + "."]
    if p["sources"]:
        lines += ["", m.text(p["sources"])]
    if p["ensemble"]:
        lines += ["", m.text(p["ensemble"])]
    if p["unlearning"]:
        lines += ["", m.text(p["unlearning"])]
    lines += ["", "| rank | example | score | text |", "|---:|---:|---:|---|"]
    lines += [
        f"| {r['rank']} | {r['index']} | {_f(r['score'], '.4g')} | {m.code(r['text'], cell=True)} |"
        for r in p["rows"]
    ]
    return lines


def _pct_plain(v: Any) -> str:
    return "-" if v is None else f"{float(v):.0%}"


def render_markdown(run: Mapping[str, Any]) -> str:
    """The report as Markdown: every case string shown as typed, none of it markup."""
    return "\n".join(_report_lines(run, _Markdown())) + "\n"


def render_terminal(run: Mapping[str, Any]) -> str:
    """The report for a terminal: the Markdown report's content with every string as it
    is, but control characters (C0 other than newline and tab, DEL, C1), bidirectional and
    invisible characters shown as escapes (``\\x1b``, ``\\u202e``), so nothing in it moves
    the cursor, clears the screen, changes colours or reorders what is shown."""
    return "\n".join(_report_lines(run, _Terminal())) + "\n"


# ---------------------------------------------------------------------------------------------
# the regression report


def render_regression_markdown(results: Sequence[Mapping[str, Any]], *, model: str = "") -> str:
    """A table of incidents and classes, then each incident's two mechanisms side by side."""
    lines = [
        "# Regression check",
        "",
        f"New model {_md_code(model)}." if model else "",
        "",
        "| case | severity | class | P(bad) reference → new | cause-set Jaccard | Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.get("comparison") or {}
        lines.append(
            f"| {_md(r['case_id'])} | {_md(r['severity'])} | **{_md(r['classification'])}** | "
            f"{_f(r.get('p_bad_reference'), '.3f')} → {_f(r.get('p_bad_new'), '.3f')} | "
            f"{_f(c.get('jaccard_cause_set'), '.2f')} | {_f(c.get('spearman'), '.2f')} |"
        )
    for r in results:
        lines += [
            "",
            f"## {_md(r['case_id'])}: {_md(r['title'])}",
            "",
            _md_line(r["reason"]),
            "",
            "| | reference run | new model |",
            "|---|---|---|",
            f"| run | {_md_code(r.get('reference_run_id'), cell=True)} | "
            f"{_md_code(r.get('run_id'), cell=True)} |",
            f"| cause set | {_md(_top(r.get('cause_set_reference')))} | "
            f"{_md(_top(r.get('cause_set_new')))} |",
            f"| top components | {_md(_top(r.get('top_reference')))} | "
            f"{_md(_top(r.get('top_new')))} |",
        ]
        wc = r.get("weight_change")
        if wc:
            lines += [
                "",
                "Weight change since the baseline checkpoint (revert drop: the metric lost when "
                "the component's weights are set back):",
                "",
                "| rank | component | first order | revert drop |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c['rank']} | {_md(c['id'])} | {_f(c['first_order'])} | "
                f"{_f(c['revert_drop'])} |"
                for c in wc["components"]
            ]
    return "\n".join(lines) + "\n"
