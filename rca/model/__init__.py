"""The model layer: the code every stage shares to reach a model.

- ``subject``: ``Subject`` (a loaded causal LM, its tokenizer and adapter) and ``load_subject``;
- ``files``: the model directory's checks before anything loads, and its ``fingerprint``;
- ``gguf``: a GGUF file converted once into a model directory that ``load_subject`` loads;
- ``adapter``: where each architecture keeps its layers, heads, MLP, neurons and residual
  stream (``ArchSpec``, ``ARCHITECTURES``, ``Adapter``), and every projection's weight as
  (out_features, in_features);
- ``ids``: the component id grammar (``L3.H5``, ``L3.MLP``, ``L3.N1021``, ``EMB``, ...);
- ``hooks``: capture, patch and ablate components through hooks on the real modules;
- ``metric``: the incident metric, log P(bad) - log P(good), teacher-forced.

The trace, confirm and remedy stages reach a model only through these modules. Importing the
package is cheap: each name below loads its module on first use (PEP 562), so that ``ids``
alone, which the store and the reports read, never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rca.exports import lazy_exports

if TYPE_CHECKING:
    from rca.model.adapter import (
        ARCHITECTURES,
        Adapter,
        ArchSpec,
        SubjectError,
        adapter_for,
        module_at,
        out_in_weight,
        weight_of,
    )
    from rca.model.files import fingerprint, read_source
    from rca.model.hooks import HookError, ablate, capture, mean_activations, patch
    from rca.model.ids import ComponentId, IdError, format_id, parse_id
    from rca.model.metric import (
        MetricError,
        MetricValue,
        Target,
        encode_target,
        encode_text,
        evaluate,
    )
    from rca.model.subject import Subject, load_subject, resolve_device, resolve_model_ref

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "ArchSpec",
    "ComponentId",
    "HookError",
    "IdError",
    "MetricError",
    "MetricValue",
    "Subject",
    "SubjectError",
    "Target",
    "ablate",
    "adapter_for",
    "capture",
    "encode_target",
    "encode_text",
    "evaluate",
    "fingerprint",
    "format_id",
    "load_subject",
    "mean_activations",
    "module_at",
    "out_in_weight",
    "parse_id",
    "patch",
    "read_source",
    "resolve_device",
    "resolve_model_ref",
    "weight_of",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "adapter": (
            "ARCHITECTURES",
            "Adapter",
            "ArchSpec",
            "SubjectError",
            "adapter_for",
            "module_at",
            "out_in_weight",
            "weight_of",
        ),
        "files": ("fingerprint", "read_source"),
        "hooks": ("HookError", "ablate", "capture", "mean_activations", "patch"),
        "ids": ("ComponentId", "IdError", "format_id", "parse_id"),
        "metric": (
            "MetricError",
            "MetricValue",
            "Target",
            "encode_target",
            "encode_text",
            "evaluate",
        ),
        "subject": ("Subject", "load_subject", "resolve_device", "resolve_model_ref"),
    },
)
