"""rca: explain why a language model misbehaved, and prove it.

The public API, re-exported flat. ``import rca`` never imports a UI toolkit (streamlit);
the CLI (``rca.cli``) and the app (``app.py``) are thin shells over these functions.
"""

from __future__ import annotations

__version__ = "0.1.0"

from rca.ingest.case_file import load_case, load_cases
from rca.ingest.incident import Incident, IncidentError
from rca.model.files import fingerprint
from rca.model.hooks import HookError, ablate, capture, mean_activations, patch
from rca.model.ids import ComponentId, IdError, format_id, parse_id
from rca.model.metric import MetricError, MetricValue, Target, encode_target, evaluate
from rca.model.subject import Subject, SubjectError, load_subject

__all__ = [
    "__version__",
    "ComponentId",
    "HookError",
    "IdError",
    "Incident",
    "IncidentError",
    "MetricError",
    "MetricValue",
    "Subject",
    "SubjectError",
    "Target",
    "ablate",
    "capture",
    "encode_target",
    "evaluate",
    "fingerprint",
    "format_id",
    "load_case",
    "load_cases",
    "load_subject",
    "mean_activations",
    "parse_id",
    "patch",
]
