"""The store's provenance records (``rca provenance``): the cached influence features of a
training set, and each run's influence query with its top-ranked training examples.

Mixed into ``ReadOnlyStore`` (reads) and ``Store`` (writes), which provide the connections.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import duckdb

from .audit import append_audit, now_utc
from .errors import StoreError
from .tables import first_row

__all__ = ["ProvenanceReads", "ProvenanceWrites"]


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict]:
    from .stores import _rows as rows

    return rows(con, sql, params)


class ProvenanceReads:
    path: Path

    def _read(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        raise NotImplementedError

    def influence_features(self, cache_key: str) -> dict[str, Any] | None:
        """The recorded features of one cache key, or None."""
        with self._read() as con:
            rows = _rows(con, "SELECT * FROM influence_features WHERE cache_key = ?", [cache_key])
            return rows[0] if rows else None

    def list_provenance(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Influence queries, newest first (one run's, or every run's)."""
        sql = "SELECT * FROM provenance" + (" WHERE run_id = ?" if run_id else "")
        with self._read() as con:
            return _rows(
                con, sql + " ORDER BY created_at DESC, query_id", [run_id] if run_id else []
            )

    def get_provenance(self, query_id: str) -> dict[str, Any]:
        """One influence query (its id or a unique prefix) with its examples in rank order
        (``examples``) and its features' record (``features``)."""
        with self._read() as con:
            rows = _rows(
                con,
                "SELECT * FROM provenance WHERE query_id = ? OR starts_with(query_id, ?)",
                [query_id, query_id],
            )
            exact = [r for r in rows if r["query_id"] == query_id]
            if not exact and len(rows) > 1:
                raise StoreError(
                    f"provenance prefix {query_id!r} is ambiguous in {self.path}; give more"
                )
            if not rows:
                raise StoreError(
                    f"no provenance query {query_id!r} in {self.path}; see `rca provenance list`"
                )
            row = (exact or rows)[0]
            row["examples"] = _rows(
                con,
                "SELECT * FROM provenance_examples WHERE query_id = ? ORDER BY rank",
                [row["query_id"]],
            )
            feats = _rows(
                con, "SELECT * FROM influence_features WHERE cache_key = ?", [row["cache_key"]]
            )
            row["features"] = feats[0] if feats else None
            return row


class ProvenanceWrites:
    path: Path
    actor: str

    def _transaction(self, what: str) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        raise NotImplementedError

    def record_provenance(
        self,
        *,
        run_id: str,
        incident_id: str,
        features: dict[str, Any],
        method: str,
        circuit: Sequence[str],
        queries: dict[str, Any],
        examples: Sequence[dict[str, Any]],
        seconds: float,
        summary: dict[str, Any],
    ) -> str:
        """Record one influence query and its top examples (each: ``index``, ``score``,
        ``text``, ``fields``), and the features it used where they are not recorded yet, in one
        transaction; returns the query id. ``features``: ``Features.meta()`` plus ``path``
        and ``data_path``."""
        query_id = str(uuid.uuid4())
        now = now_utc()
        key = features["key"]
        with self._transaction(f"recording provenance of run {run_id}") as con:
            if not first_row(con, "SELECT 1 FROM runs WHERE run_id = ?", [run_id]):
                raise StoreError(
                    f"database {self.path}: run {run_id!r} is not recorded; provenance is "
                    "recorded in the store that holds its run"
                )
            if not first_row(con, "SELECT 1 FROM influence_features WHERE cache_key = ?", [key]):
                con.execute(
                    "INSERT INTO influence_features (cache_key, model_fingerprint, data_sha256, "
                    "data_path, scope, params, n_params, proj_dim, lambda_reg, seed, "
                    "max_tokens, n_examples, truncated, seconds, path, created_at) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        key,
                        features.get("model_fingerprint"),
                        features["data_sha256"],
                        features.get("data_path"),
                        features["scope"],
                        json.dumps(features["params"]),
                        int(features["n_params"]),
                        int(features["proj_dim"]),
                        float(features["lambda_reg"]),
                        int(features["seed"]),
                        int(features["max_tokens"]),
                        int(features["n"]),
                        int(features.get("truncated") or 0),
                        float(features.get("seconds") or 0.0),
                        str(features["path"]),
                        now,
                    ],
                )
                append_audit(
                    con,
                    actor=self.actor,
                    action="insert",
                    table="influence_features",
                    entity=key,
                    at=now,
                )
            con.execute(
                "INSERT INTO provenance (query_id, run_id, incident_id, cache_key, method, "
                "circuit, queries, k, seconds, summary, created_at) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    query_id,
                    run_id,
                    incident_id,
                    key,
                    method,
                    json.dumps(list(circuit)),
                    json.dumps(queries, default=str),
                    len(examples),
                    float(seconds),
                    json.dumps(summary, default=str),
                    now,
                ],
            )
            if examples:
                import pyarrow as pa

                from .stages import _insert_arrow

                rows = pa.table(
                    {
                        "query_id": pa.array([query_id] * len(examples), pa.string()),
                        "rank": pa.array(range(1, len(examples) + 1), pa.int32()),
                        "example_index": pa.array([int(e["index"]) for e in examples], pa.int64()),
                        "score": pa.array([float(e["score"]) for e in examples], pa.float64()),
                        "text": pa.array([e.get("text") for e in examples], pa.string()),
                        "fields": pa.array(
                            [json.dumps(e.get("fields") or {}, default=str) for e in examples],
                            pa.string(),
                        ),
                    }
                )
                _insert_arrow(con, "provenance_examples", rows)
            for table in ("provenance", "provenance_examples")[: 2 if examples else 1]:
                append_audit(
                    con, actor=self.actor, action="insert", table=table, entity=query_id, at=now
                )
        return query_id
