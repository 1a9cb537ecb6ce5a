"""The store's tables: which there are, the entity one audit record covers in each, the bulk
tables a run fills, each table's natural reading order and its JSON columns; and the two small
queries every part of the store runs (the first row of a query, the tables present)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb

__all__ = [
    "CHILD_TABLES",
    "ENTITY_SQL",
    "JSON_COLUMNS",
    "ORDER",
    "TABLES",
    "first_row",
    "table_names",
]

# Every audited table, with the SQL expression of its entity: the unit one audit record covers.
ENTITY_SQL: dict[str, str] = {
    "schema_version": "CAST(version AS VARCHAR)",
    "models": "fingerprint",
    "incidents": "incident_id || '@' || sha256",
    "runs": "run_id",
    "token_scores": "run_id",
    "nodes": "run_id",
    "edges": "run_id",
    "ablations": "run_id",
    "remedies": "run_id",
    "variants": "run_id",
    "variant_results": "run_id",
    "notes": "CAST(note_id AS VARCHAR)",
    "monitors": "monitor_id",
    "monitor_evals": "CAST(eval_id AS VARCHAR)",
    "monitor_alerts": "batch_id",
    "influence_features": "cache_key",
    "provenance": "query_id",
    "provenance_examples": "query_id",
}
TABLES: tuple[str, ...] = (*ENTITY_SQL, "audit")
# the bulk tables: a run's evidence, its rows numbered by row_no
CHILD_TABLES = (
    "token_scores",
    "nodes",
    "edges",
    "ablations",
    "remedies",
    "variants",
    "variant_results",
)
# natural reading order of each table's rows (readers and export)
ORDER: dict[str, str] = {
    "schema_version": "version",
    "models": "first_seen, fingerprint",
    "incidents": "ingested_at, incident_id, sha256",
    "runs": "recorded_at, run_id",
    "token_scores": 'run_id, "position", method',
    "nodes": "run_id, rank NULLS LAST, abs(score) DESC NULLS LAST, node_id, method",
    "edges": "run_id, abs(score) DESC NULLS LAST, source, target",
    "ablations": "run_id, experiment, components",
    "remedies": "run_id, row_no",  # in the order they were tried
    "variants": "run_id, row_no",  # in the case's order (Incident.all_variants)
    "variant_results": "run_id, row_no",  # per fix in the order tried, then per variant
    "notes": "note_id",
    "monitors": "created_at, monitor_id",
    "monitor_evals": "eval_id",
    "monitor_alerts": "batch_id, row_no",
    "influence_features": "created_at, cache_key",
    "provenance": "created_at, query_id",
    "provenance_examples": "query_id, rank",
    "audit": "seq",
}
# columns that hold JSON text; readers return them parsed
JSON_COLUMNS = frozenset(
    {"dims", "case_data", "config", "versions", "timings", "summary", "details", "side_effect"}
    | {"patch_spec", "behaviour"}
    | {"site_specs", "fit", "data", "figures", "baselines"}
    | {"params", "circuit", "queries", "fields"}
)


def first_row(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first row of a query, or None. Always fetches every row: an unfinished result
    would block the connection's next statement (DuckDB 2.0)."""
    rows = con.execute(sql, list(params)).fetchall()
    return rows[0] if rows else None


def table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The names of the tables in the open database."""
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
