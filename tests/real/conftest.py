"""The real tier's shared fixture: the fetched SmolLM2 directory, or a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from rca.zoo.real import is_fetched, real_model_dir


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not is_fetched("smollm2-135m"):
        pytest.skip("needs zoo:smollm2-135m: `make test-real` fetches it first")
    return real_model_dir("smollm2-135m")
