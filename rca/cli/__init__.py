"""The ``rca`` command line: a thin shell over the library.

Each command parses its options, checks them, calls one library function and prints what it
returns. Every error a user can cause (a bad case file, a model that will not load, a bad
component id) is printed as one line on stderr with exit code 2; a traceback means a bug in
rca. Every path a command takes is checked (``rca.paths``) and every number range-checked
before any model loads or any work starts.

The options more than one command takes, and the checks that turn option values into what
the library takes, are ``rca.cli_options``. The commands live in one module per group:

- ``shell``: the Typer apps, ``friendly`` (errors and warnings as one line each), progress,
  and the printing more than one command shares;
- ``models``: ``zoo build|fetch|list``, ``check``, ``inspect``, ``apply-patch``;
- ``investigation``: ``trace``, ``confirm``, ``investigate``, ``demo``;
- ``regression``: ``regress``;
- ``bench``: ``bench localization``;
- ``records``: ``cases list|show``, ``report``, ``notes add``, ``verify``, ``export``;
- ``ingest``: ``ingest`` (case files from a JSONL log of conversations);
- ``monitor``: ``monitor build|eval|run|list|show`` (run-time detectors);
- ``provenance``: ``provenance`` (the training examples that taught an incident).
"""

from __future__ import annotations

import sys

# each command module registers its commands on ``app`` when imported
from rca.cli import (  # noqa: F401
    bench,
    ingest,
    investigation,
    models,
    monitor,
    provenance,
    records,
    regression,
)
from rca.cli.shell import app, err

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
