"""The demo: every case of a directory investigated, recorded and reported, then the regression
check of the retrained checkpoint.

``run_demo`` builds the demo zoo (or fetches the real model) where it is missing, investigates
each case file on its model, writes each run's case file (Markdown and HTML) into ``reports``,
and, for the demo zoo, re-checks support-bot-v1's incidents on support-bot-v2 (``rca.regress``)
and writes the regression report beside them. ``rca demo`` prints what it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "run_demo"]

Progress = Callable[[str, float], None]
# a fresh progress callback for each investigation, as a context manager
ProgressFor = Callable[[], AbstractContextManager[Progress]]

REAL_MODEL = "smollm2-135m"
V1, V2 = "zoo:support-bot-v1", "zoo:support-bot-v2"


@dataclass(frozen=True)
class DemoResult:
    """What the demo found: each case's run (``CaseRun.to_json``) and each regression check
    (``RegressionResult.to_json``, empty for the real model)."""

    cases: list[dict[str, Any]]
    regression: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"cases": self.cases, "regression": self.regression}


def _quiet() -> AbstractContextManager[Progress]:
    return contextlib.nullcontext(lambda stage, frac: None)


def run_demo(
    *,
    cases_dir: Path,
    reports: Path,
    db: Path,
    real: bool = False,
    quick: bool = True,
    device: str = "auto",
    allow_pickle: bool = False,
    home: Path | None = None,
    log: Callable[[str], None] | None = None,
    progress: ProgressFor = _quiet,
) -> DemoResult:
    """Investigate every case in ``cases_dir``, record the runs in the database ``db`` and
    write the case files and the regression report into ``reports``.

    ``real``: fetch the real model (``zoo:smollm2-135m``) instead of building the demo zoo
    (``quick``: its quick recipe), and run no regression check. ``log`` sees the build's and
    the fetch's messages; ``progress`` gives each investigation its progress callback.
    """
    from rca import zoo
    from rca.ingest.case_file import load_cases
    from rca.investigate import InvestigateConfig, investigate
    from rca.model.subject import load_subject
    from rca.report import render_html, render_markdown
    from rca.store import Store

    say = log or (lambda m: None)
    if real:
        from rca.zoo.real import fetch

        fetch(REAL_MODEL, home=home, log=say)
    else:
        zoo.build(home=home, quick=quick, log=say)  # type: ignore[attr-defined]
    incidents = load_cases(cases_dir, home=home)
    store = Store(db)
    subjects: dict[Path, Any] = {}
    rows = []
    reports.mkdir(parents=True, exist_ok=True)
    for inc in incidents:
        path = inc.model_path(home=home)
        if path not in subjects:
            subjects[path] = load_subject(path, device=device, allow_pickle=allow_pickle, home=home)
        cfg = InvestigateConfig(device=device, allow_pickle=allow_pickle)
        with progress() as bar:
            run = investigate(inc, subject=subjects[path], store=store, config=cfg, progress=bar)
        r = run.to_json()
        stored = store.get_run(r["run_id"])
        (reports / f"{inc.id}.md").write_text(render_markdown(stored))
        (reports / f"{inc.id}.html").write_text(render_html(stored))
        rows.append(r)
    v1 = [inc for inc in incidents if inc.model == V1]
    regression = []
    if v1 and not real:
        regression = _regression(v1, store, reports, device, allow_pickle, home)
    return DemoResult(cases=rows, regression=regression)


def _regression(
    incidents: list[Any],
    store: Any,
    reports: Path,
    device: str,
    allow_pickle: bool,
    home: Path | None,
) -> list[dict[str, Any]]:
    """support-bot-v1's incidents re-checked on support-bot-v2 (v1 retrained after a data
    fix) against the runs just recorded; the report written as regression.md and .html."""
    from rca.investigate import InvestigateConfig
    from rca.regress import RegressConfig, regress
    from rca.report import render_regression_html, render_regression_markdown

    results = regress(
        V2,
        incidents,
        store,
        baseline_model=V1,
        config=RegressConfig(
            investigate=InvestigateConfig(remedy=False, device=device, allow_pickle=allow_pickle)
        ),
        home=home,
    )
    rows = [r.to_json() for r in results]
    fp = results[0].new_model
    (reports / "regression.md").write_text(render_regression_markdown(rows, model=fp))
    (reports / "regression.html").write_text(render_regression_html(rows, model=fp))
    return rows
