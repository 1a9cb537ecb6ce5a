"""Ingest: what went wrong, read and checked before the expensive stages start.

- ``incident``: the ``Incident`` record, validated on construction whatever its source, and
  ``incident_from_flags`` for an incident stated on the command line;
- ``case_file``: the strict TOML case-file loader (``load_case``, ``load_cases``) and the
  incident texts given as files (``--prompt-file``, ``--messages``);
- ``variants``: a case's variants (listed, or made from a template) and their fit / held-out
  split;
- ``log``: incidents read from a production log (JSON Lines), grouped into cases
  (``rca ingest``); ``case_writer``: case files written back, all or none;
- ``preflight``: the checks on the loaded model (chat template, context window, reference
  prompts, memory plan, metric gap, greedy decoding, every variant) that ``rca investigate``
  runs first.

Importing the package is cheap: each name below loads its module on first use (PEP 562), so
that the record and the case-file loader never import torch. The function ``preflight`` is
reached through its module, ``rca.ingest.preflight.preflight``: exported here, its name would
hide the module's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rca.exports import lazy_exports

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
    from rca.ingest.case_writer import case_toml, write_cases
    from rca.ingest.incident import (
        SEVERITIES,
        Incident,
        IncidentError,
        Turn,
        incident_from_flags,
        render_chat,
        text_problem,
    )
    from rca.ingest.log import LogError, read_log
    from rca.ingest.preflight import Decoding, Preflight, gap_error, reference_prompts

__all__ = [
    "Decoding",
    "Incident",
    "IncidentError",
    "LogError",
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
    "read_log",
    "read_text_file",
    "reference_prompts",
    "render_chat",
    "text_problem",
    "turns_from_data",
    "write_cases",
    "case_toml",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "case_file": (
            "load_case",
            "load_cases",
            "loads_case",
            "parse_case_data",
            "read_json_file",
            "read_text_file",
            "turns_from_data",
        ),
        "incident": (
            "SEVERITIES",
            "Incident",
            "IncidentError",
            "Turn",
            "incident_from_flags",
            "render_chat",
            "text_problem",
        ),
        "log": ("LogError", "read_log"),
        "case_writer": ("case_toml", "write_cases"),
        "preflight": ("Decoding", "Preflight", "gap_error", "reference_prompts"),
    },
)
