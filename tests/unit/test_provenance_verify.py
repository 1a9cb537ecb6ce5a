"""Retraining a zoo model without examples (``rca.provenance.verify``) refuses, before any
training, a model it cannot retrain on its own recipe: one that is not the zoo's, one that
continues another, one of another corpus, one whose manifest lost its recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rca.provenance.influence import InfluenceError
from rca.provenance.verify import recipe, retrain_without
from rca.zoo.corpus import CORPUS_VERSION
from rca.zoo.train import QUICK


def _zoo(tmp_path: Path, manifest: dict) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "zoo.json").write_text(json.dumps(manifest))
    return d


@pytest.mark.parametrize(
    "manifest, needles",
    [
        (None, ["no zoo.json", "only the zoo's models"]),
        ({"name": "v2", "continues": "v1", "corpus_version": CORPUS_VERSION}, ["continues v1"]),
        ({"corpus_version": "old", "config": {"steps": 5}}, ["corpus old", "rebuild the zoo"]),
        ({"corpus_version": CORPUS_VERSION}, ["no training recipe", "rebuild the zoo"]),
    ],
)
def test_what_cannot_be_retrained_is_refused_before_training(
    tmp_path: Path, manifest: dict | None, needles: list[str]
) -> None:
    d = _zoo(tmp_path, manifest) if manifest is not None else tmp_path
    with pytest.raises(InfluenceError) as e:
        retrain_without(d, [0])
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_the_recipe_is_the_manifests_config_without_unknown_fields() -> None:
    config = {k: getattr(QUICK, k) for k in QUICK.__dataclass_fields__} | {"retired": 1}
    assert recipe({"config": config}) == QUICK
    assert recipe({"config": None}) is None and recipe({}) is None
