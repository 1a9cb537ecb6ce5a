"""Data provenance: which training examples taught an incident (issue 23, in progress).

What exists: :mod:`rca.provenance.data`, the reader of training data (JSONL, Parquet, text,
a saved `datasets` directory) with its checks and content hash.
"""

from .data import FORMATS, DataError, TrainingData, load_training_data

__all__ = ["FORMATS", "DataError", "TrainingData", "load_training_data"]
