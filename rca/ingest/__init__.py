"""Ingest: what went wrong, read and checked before the expensive stages start.

- ``incident``: the ``Incident`` record, validated on construction whatever its source, and
  ``incident_from_flags`` for an incident stated on the command line;
- ``case_file``: the strict TOML case-file loader (``load_case``, ``load_cases``) and the
  incident texts given as files (``--prompt-file``, ``--messages``);
- ``preflight``: the checks on the loaded model (chat template, context window, reference
  prompts, memory plan, metric gap, greedy decoding) that ``rca investigate`` runs first.

Importing the package is cheap: each name below loads its module on first use (PEP 562), so
that the record and the case-file loader never import torch. The function ``preflight`` is
reached through its module, ``rca.ingest.preflight.preflight``: exported here, its name would
hide the module's.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rca.ingest.case_file import (
        load_case,
        load_cases,
        loads_case,
        parse_case_data,
        read_json_file,
        read_text_file,
        turns_from_data,
    )
    from rca.ingest.incident import (
        SEVERITIES,
        Incident,
        IncidentError,
        Turn,
        incident_from_flags,
        render_chat,
        text_problem,
    )
    from rca.ingest.preflight import Decoding, Preflight, gap_error, reference_prompts

__all__ = [
    "Decoding",
    "Incident",
    "IncidentError",
    "Preflight",
    "SEVERITIES",
    "Turn",
    "gap_error",
    "incident_from_flags",
    "load_case",
    "load_cases",
    "loads_case",
    "parse_case_data",
    "read_json_file",
    "read_text_file",
    "reference_prompts",
    "render_chat",
    "text_problem",
    "turns_from_data",
]

_MODULE_OF = {
    **dict.fromkeys(
        (
            "load_case",
            "load_cases",
            "loads_case",
            "parse_case_data",
            "read_json_file",
            "read_text_file",
            "turns_from_data",
        ),
        "case_file",
    ),
    **dict.fromkeys(
        (
            "SEVERITIES",
            "Incident",
            "IncidentError",
            "Turn",
            "incident_from_flags",
            "render_chat",
            "text_problem",
        ),
        "incident",
    ),
    **dict.fromkeys(("Decoding", "Preflight", "gap_error", "reference_prompts"), "preflight"),
}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
