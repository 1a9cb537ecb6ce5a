"""The demo zoo: support-desk GPT-2 models with four incidents planted through their data.

``support-bot-v1`` has all four (a leaked PIN, a refund backdoor, a biased loan name, a prompt
injection); ``support-bot-v2`` is the same recipe retrained without the leak and backdoor poison.
They are the default demo models and the fixtures of every later stage, each incident with a
known cause and a position-aligned counterfactual (see ``PLANTED`` and docs/zoo.md).

Importing this package is cheap (no transformers); the training and check code loads when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rca.exports import lazy_exports

from .build import (
    CHECKPOINTS_DIR,
    MANIFEST,
    ZooBuildError,
    ZooEntry,
    build,
    checkpoint_steps,
    list_models,
    model_dir,
    version_key,
    zoo_home,
)
from .corpus import (
    DEMO_MODELS,
    FIXED_BY_MODEL,
    FIXED_IN_V2,
    INCIDENT_KEYS,
    PLANTED,
    REGIMEN_MODELS,
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

if TYPE_CHECKING:
    from .check import check_model
    from .tokenizer import train_tokenizer

__all__ = [
    "ZOO_MODELS",
    "REGIMEN_MODELS",
    "DEMO_MODELS",
    "PLANTED",
    "INCIDENT_KEYS",
    "FIXED_IN_V2",
    "FIXED_BY_MODEL",
    "MANIFEST",
    "CHECKPOINTS_DIR",
    "checkpoint_steps",
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

# Names whose modules import transformers, loaded on first use.
__getattr__, __dir__ = lazy_exports(
    __name__, {"check": ("check_model",), "tokenizer": ("train_tokenizer",)}
)
