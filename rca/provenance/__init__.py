"""Data provenance: which training examples taught an incident. :mod:`rca.provenance.data`
reads training data (JSONL, Parquet, text, a saved `datasets` directory), checks every record
and hashes the content; the influence ranking is not built yet (docs/architecture.md).
"""

from .data import DataError, TrainingData, load_training_data

__all__ = ["DataError", "TrainingData", "load_training_data"]
