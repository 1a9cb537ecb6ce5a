"""Checking a ranking by retraining: a zoo model trained again, on its own recipe and seed,
without the ranked examples, and the incident measured on the case's held-out variants.

Only a zoo model trained from scratch can be retrained here (``support-bot-v1``): rca knows
its corpus, its recipe and its seed from its manifest (``zoo.json``), and its training data
file lists the corpus in training order, so example ``i`` of the ranking is ticket ``i``. A
model that continues another (``support-bot-v2``) would need its parent retrained too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rca.model.subject import Subject
from rca.provenance.influence import InfluenceError

__all__ = ["Retrained", "held_out_p_bad", "recipe", "retrain_without"]


@dataclass
class Retrained:
    subject: Subject
    excluded: int
    seconds: float


def _manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "zoo.json"
    if not path.is_file():
        raise InfluenceError(
            f"{model_dir} is not a zoo model (no zoo.json): only the zoo's models can be "
            "retrained here"
        )
    return dict(json.loads(path.read_text()))


def recipe(manifest: dict[str, Any]) -> Any:
    """The ``rca.zoo.train.TrainConfig`` a zoo model was trained with, from its manifest's
    ``config`` (fields this rca does not know are left out); None where it has none."""
    from rca.zoo.train import TrainConfig

    config = manifest.get("config")
    if not isinstance(config, dict):
        return None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in config.items() if k in names})


def retrain_without(model_dir: Path, exclude: Iterable[int]) -> Retrained:
    """The zoo model at ``model_dir`` trained again from scratch on its corpus less the
    examples at ``exclude`` (indices into its training data file), same recipe and seed."""
    from transformers import AutoTokenizer

    from rca.provenance.data import load_training_data
    from rca.zoo.corpus import CORPUS_VERSION, TRAINING_DATA, corpus_for, make_corpus
    from rca.zoo.train import train_model

    man = _manifest(model_dir)
    if man.get("continues"):
        raise InfluenceError(
            f"{man.get('name')} continues {man['continues']}: only a zoo model trained from "
            "scratch can be retrained without examples"
        )
    if man.get("corpus_version") != CORPUS_VERSION:
        raise InfluenceError(
            f"{model_dir} was trained on corpus {man.get('corpus_version')}, and this rca "
            f"writes {CORPUS_VERSION}: rebuild the zoo (rca zoo build --force)"
        )
    cfg = recipe(man)
    if cfg is None:
        raise InfluenceError(
            f"{model_dir / 'zoo.json'} has no training recipe (config): rebuild the zoo "
            "(rca zoo build --force)"
        )
    data = corpus_for(make_corpus(cfg.corpus_size, seed=cfg.seed), fixed=frozenset(man["fixed"]))
    recorded = load_training_data(model_dir / TRAINING_DATA)
    if recorded.texts != tuple(ex.text for ex in data):
        raise InfluenceError(
            f"{model_dir / TRAINING_DATA} does not list the corpus this rca generates: "
            "rebuild the zoo (rca zoo build --force)"
        )
    drop = set(exclude)
    bad = [i for i in drop if not 0 <= i < len(data)]
    if bad:
        raise InfluenceError(f"example {bad[0]} is not in the {len(data)} training examples")
    kept = [ex for i, ex in enumerate(data) if i not in drop]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    t0 = time.perf_counter()
    result = train_model(kept, tokenizer, cfg)  # type: ignore[arg-type]
    return Retrained(
        Subject.from_model(result.model, tokenizer), len(drop), time.perf_counter() - t0
    )


def held_out_p_bad(subject: Subject, incident: Any) -> list[float]:
    """P(bad) on each of the case's held-out variants."""
    from rca.ingest.preflight import check_variants

    return [c.p_bad for c in check_variants(subject, incident) if c.part == "held_out"]


def under(values: Sequence[float], target: float = 0.2) -> float:
    """The share of ``values`` under ``target``."""
    return sum(v < target for v in values) / len(values) if values else 0.0
