"""Data provenance: which training examples taught an incident.

- :mod:`rca.provenance.data` reads training data (JSONL, Parquet, text, a saved `datasets`
  directory), checks every record and hashes the content;
- :mod:`rca.provenance.influence` ranks the examples by TRAK influence (``traker``) over the
  circuit's parameters, with the features cached as Parquet;
- :mod:`rca.provenance.workflow` runs it for a recorded run and records the ranking.
"""

from .data import DataError, TrainingData, load_training_data
from .influence import InfluenceConfig, InfluenceError

__all__ = ["DataError", "InfluenceConfig", "InfluenceError", "TrainingData", "load_training_data"]
