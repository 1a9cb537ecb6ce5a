"""The table of recorded runs that ``rca cases list`` prints.

Ids are what a reader copies into the next command, so no cell is ever cut short: every column
folds what does not fit onto further lines of its cell (rich's ``overflow="fold"``), never an
ellipsis, at whatever width the console has. Cell text is shown as it is (no rich markup), with
control characters as visible escapes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from rca.textsafe import visible as _visible

__all__ = ["runs_table"]

COLUMNS = ("run", "case", "severity", "kind", "verdict", "recorded (UTC)")


def _when(v: Any) -> str:
    """A recorded time to the second: the store gives ISO text with a Z (or a datetime)."""
    if isinstance(v, dt.datetime):
        v = v.astimezone(dt.UTC).isoformat() if v.tzinfo else v.isoformat()
    return "-" if v is None else str(v).replace("T", " ")[:19]


def _verdict(run: Mapping[str, Any]) -> Any:
    s = run.get("summary") or {}
    if isinstance(s, str):
        try:
            s = json.loads(s)
        except json.JSONDecodeError:
            s = {}
    return s.get("verdict") if isinstance(s, Mapping) else None


def runs_table(runs: Sequence[Mapping[str, Any]]) -> Table:
    """One row per run, as ``ReadOnlyStore.list_runs`` gives them (newest first): the run id in
    full, the case, its severity, the run's kind, its verdict and when it was recorded."""
    t = Table()
    for name in COLUMNS:
        t.add_column(name, overflow="fold")
    for r in runs:
        cells = (
            r.get("run_id"),
            r.get("incident_id"),
            r.get("severity"),
            r.get("kind"),
            _verdict(r),
            _when(r.get("recorded_at")),
        )
        t.add_row(*(Text(_visible("-" if c is None else c)) for c in cells))
    return t
