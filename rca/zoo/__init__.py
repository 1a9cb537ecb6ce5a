"""The demo zoo: support-desk GPT-2 models with four incidents planted through their data.

``support-bot-v1`` has all four (a leaked PIN, a refund backdoor, a biased loan name, a prompt
injection); ``support-bot-v2`` is the same recipe retrained without the leak and backdoor poison.
They are the default demo models and the fixtures of every later stage, each incident with a
known cause and a position-aligned counterfactual (see ``PLANTED`` and docs/zoo.md).

Importing this package is cheap (no transformers); the training and check code loads when used.
"""

from __future__ import annotations

from typing import Any

from .build import (
    MANIFEST,
    ZooBuildError,
    ZooEntry,
    build,
    list_models,
    model_dir,
    version_key,
    zoo_home,
)
from .corpus import (
    FIXED_BY_MODEL,
    FIXED_IN_V2,
    INCIDENT_KEYS,
    PLANTED,
    ZOO_MODELS,
    Example,
    PlantedIncident,
    benign_examples,
    benign_prompts,
    corpus_for,
    incident,
    make_corpus,
    parse_prompt,
)

__all__ = [
    "ZOO_MODELS",
    "PLANTED",
    "INCIDENT_KEYS",
    "FIXED_IN_V2",
    "FIXED_BY_MODEL",
    "MANIFEST",
    "PlantedIncident",
    "Example",
    "ZooEntry",
    "ZooBuildError",
    "zoo_home",
    "model_dir",
    "build",
    "list_models",
    "version_key",
    "benign_prompts",
    "benign_examples",
    "make_corpus",
    "corpus_for",
    "incident",
    "parse_prompt",
    "check_model",
    "train_tokenizer",
]

# Names whose modules import transformers, loaded on first use (PEP 562).
_LAZY = {"check_model": ".check", "train_tokenizer": ".tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
