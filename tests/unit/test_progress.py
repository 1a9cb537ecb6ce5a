"""Progress for logs: plain lines when stderr is not a terminal, one per stage change and at
most one every ``every`` seconds within a stage."""

from __future__ import annotations

import pytest

from rca.cli.shell import ProgressLines


def test_progress_lines_name_the_stage_the_fraction_and_the_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = [100.0]
    p = ProgressLines(every=10.0)
    p._clock = lambda: now[0]
    p.start = 100.0
    for t, stage, frac in [
        (100.0, "trace", 0.05),
        (101.0, "trace", 0.10),  # same stage within 10 s: quiet
        (112.0, "trace", 0.30),  # 12 s on: a line
        (113.0, "confirm", 0.40),  # a new stage: a line at once
        (114.0, "confirm", 0.7),  # same stage, 1 s on: quiet
        (130.0, "done", 1.0),
    ]:
        now[0] = t
        p(stage, frac)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "progress: trace 5% 0.0 s",
        "progress: trace 30% 12.0 s",
        "progress: confirm 40% 13.0 s",
        "progress: done 100% 30.0 s",
    ]
