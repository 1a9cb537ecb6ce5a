"""The schema: every migration from an empty file to ``SCHEMA_VERSION``, applying them (each
re-audits the entities whose rows it changes), and reading and checking a file's version.

The tables and their entities are listed in ``rca.store.tables``; the full schema, column by
column, is in docs/store.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from .audit import append_audit, now_utc, table_digests
from .errors import StoreError
from .tables import TABLES, first_row, table_names

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "migrate",
    "read_version",
    "require_current",
    "require_tables",
]


@dataclass(frozen=True)
class Migration:
    """One schema step. ``statements`` run in order inside the opening transaction; entities of
    ``rehash`` tables whose rows the step changes get a 'migrate' audit record."""

    version: int
    note: str
    statements: tuple[str, ...]
    rehash: tuple[str, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE schema_version (
                version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL,
                note VARCHAR NOT NULL)""",
            """CREATE TABLE models (
                fingerprint VARCHAR PRIMARY KEY, path VARCHAR, architecture VARCHAR,
                n_params BIGINT, dims JSON, first_seen TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE incidents (
                incident_id VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, title VARCHAR,
                severity VARCHAR, tags VARCHAR[], source VARCHAR, case_data JSON NOT NULL,
                case_toml VARCHAR, ingested_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (incident_id, sha256))""",
            """CREATE TABLE runs (
                run_id VARCHAR PRIMARY KEY, incident_id VARCHAR NOT NULL,
                incident_sha256 VARCHAR NOT NULL, model_fingerprint VARCHAR NOT NULL,
                status VARCHAR NOT NULL, device VARCHAR, seed BIGINT, config JSON,
                versions JSON, timings JSON, summary JSON, started_at TIMESTAMPTZ,
                finished_at TIMESTAMPTZ, recorded_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE token_scores (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, "position" INTEGER NOT NULL,
                token VARCHAR, score DOUBLE, method VARCHAR)""",
            """CREATE TABLE nodes (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, node_id VARCHAR NOT NULL,
                kind VARCHAR, layer INTEGER, score DOUBLE, method VARCHAR, baseline VARCHAR,
                total_effect DOUBLE, direct_effect DOUBLE, necessity DOUBLE, p_value DOUBLE,
                verdict VARCHAR, reason VARCHAR, rank INTEGER)""",
            """CREATE TABLE edges (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, source VARCHAR NOT NULL,
                target VARCHAR NOT NULL, score DOUBLE)""",
            """CREATE TABLE ablations (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, experiment VARCHAR NOT NULL,
                components VARCHAR[], kind VARCHAR, metric DOUBLE, effect DOUBLE,
                p_value DOUBLE, details JSON)""",
            """CREATE TABLE remedies (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, remedy_id VARCHAR NOT NULL,
                kind VARCHAR, components VARCHAR[], metric_before DOUBLE, metric_after DOUBLE,
                p_bad_before DOUBLE, p_bad_after DOUBLE, side_effect JSON,
                recommended BOOLEAN NOT NULL, note VARCHAR)""",
            """CREATE TABLE notes (
                note_id BIGINT PRIMARY KEY, run_id VARCHAR, incident_id VARCHAR,
                author VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL, text VARCHAR NOT NULL)""",
            """CREATE TABLE audit (
                seq BIGINT PRIMARY KEY, written_at TIMESTAMPTZ NOT NULL, actor VARCHAR NOT NULL,
                action VARCHAR NOT NULL, table_name VARCHAR NOT NULL, entity VARCHAR NOT NULL,
                content_hash VARCHAR NOT NULL, prev_hash VARCHAR NOT NULL,
                hash VARCHAR NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "runs.kind and runs.parent_run_id (regression runs link to earlier runs); "
        "remedies.patch_spec",
        (
            "ALTER TABLE runs ADD COLUMN kind VARCHAR NOT NULL DEFAULT 'investigate'",
            "ALTER TABLE runs ADD COLUMN parent_run_id VARCHAR",
            "ALTER TABLE remedies ADD COLUMN patch_spec JSON",
        ),
        rehash=("runs", "remedies"),
    ),
    Migration(
        3,
        "nodes.benign_loss_pct and nodes.benign_kl: what mean-ablating a component does to "
        "ordinary text (its benign damage); nodes.role: its role in the circuit",
        (
            "ALTER TABLE nodes ADD COLUMN benign_loss_pct DOUBLE",
            "ALTER TABLE nodes ADD COLUMN benign_kl DOUBLE",
            "ALTER TABLE nodes ADD COLUMN role VARCHAR",
        ),
        rehash=("nodes",),
    ),
    Migration(
        4,
        "nodes.sites: a circuit member's ids at the positions where it acts (L3.H2@7)",
        ("ALTER TABLE nodes ADD COLUMN sites VARCHAR[]",),
        rehash=("nodes",),
    ),
    Migration(
        5,
        "variants: a case's variants as the preflight measured them; variant_results: each "
        "fix's P(bad) before and after on each variant; remedies.behaviour: a fix's figures "
        "on the fit and held-out sets",
        (
            """CREATE TABLE variants (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL,
                variant_index INTEGER NOT NULL, part VARCHAR NOT NULL, origin VARCHAR,
                label VARCHAR, prompt_tokens INTEGER, metric DOUBLE, p_bad DOUBLE,
                counterfactual_aligned BOOLEAN, metric_counterfactual DOUBLE)""",
            """CREATE TABLE variant_results (
                run_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, remedy_row INTEGER NOT NULL,
                kind VARCHAR, variant_index INTEGER NOT NULL, part VARCHAR NOT NULL,
                p_bad_before DOUBLE, p_bad_after DOUBLE)""",
            "ALTER TABLE remedies ADD COLUMN behaviour JSON",
        ),
        # the new column is NULL in every existing row, which leaves their digests as they
        # were: nothing is re-audited unless DuckDB changed a row
        rehash=("remedies",),
    ),
    Migration(
        6,
        "monitors: detectors compiled from confirmed runs (rca monitor build); monitor_evals: "
        "their figures on held-out prompts and on later checkpoints; monitor_alerts: the "
        "prompts a monitor flagged (rca monitor run)",
        (
            """CREATE TABLE monitors (
                monitor_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL,
                incident_id VARCHAR NOT NULL, model_fingerprint VARCHAR NOT NULL,
                artifact_path VARCHAR, weights_sha256 VARCHAR NOT NULL,
                site_specs JSON NOT NULL, threshold DOUBLE NOT NULL, target_fpr DOUBLE,
                fit JSON, data JSON, created_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE monitor_evals (
                eval_id BIGINT PRIMARY KEY, monitor_id VARCHAR NOT NULL,
                model_fingerprint VARCHAR NOT NULL, kind VARCHAR NOT NULL, figures JSON,
                baselines JSON, stale BOOLEAN, reason VARCHAR,
                evaluated_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE monitor_alerts (
                batch_id VARCHAR NOT NULL, row_no INTEGER NOT NULL, monitor_id VARCHAR NOT NULL,
                model_fingerprint VARCHAR NOT NULL, alerted_at TIMESTAMPTZ NOT NULL,
                prompt_sha256 VARCHAR NOT NULL, score DOUBLE NOT NULL, step INTEGER,
                sites VARCHAR[], text VARCHAR)""",
        ),
    ),
    Migration(
        7,
        "influence_features: TRAK features of a training set over a circuit's parameters, "
        "cached as Parquet (rca provenance); provenance: a run's influence query over them; "
        "provenance_examples: its top-ranked training examples",
        (
            """CREATE TABLE influence_features (
                cache_key VARCHAR PRIMARY KEY, model_fingerprint VARCHAR,
                data_sha256 VARCHAR NOT NULL, data_path VARCHAR, scope VARCHAR NOT NULL,
                params JSON NOT NULL, n_params BIGINT NOT NULL, proj_dim INTEGER NOT NULL,
                lambda_reg DOUBLE NOT NULL, seed INTEGER NOT NULL, max_tokens INTEGER NOT NULL,
                n_examples BIGINT NOT NULL, truncated BIGINT, seconds DOUBLE,
                path VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE provenance (
                query_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL,
                incident_id VARCHAR NOT NULL, cache_key VARCHAR NOT NULL,
                method VARCHAR NOT NULL, circuit JSON, queries JSON, k INTEGER NOT NULL,
                seconds DOUBLE, summary JSON, created_at TIMESTAMPTZ NOT NULL)""",
            """CREATE TABLE provenance_examples (
                query_id VARCHAR NOT NULL, rank INTEGER NOT NULL, example_index BIGINT NOT NULL,
                score DOUBLE NOT NULL, text VARCHAR, fields JSON)""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def require_tables(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Every table of the schema is there; one dropped by hand is named, not met later as a
    query error."""
    tables = table_names(con)
    missing = [t for t in TABLES if t not in tables]
    if missing:
        names = ", ".join(repr(t) for t in missing)
        what = f"the table {names} is" if len(missing) == 1 else f"the tables {names} are"
        raise StoreError(
            f"database {path}: {what} missing; the database was damaged outside rca: "
            "restore it from a backup"
        )


def read_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version of an open store; 0 for an empty file."""
    tables = table_names(con)
    if "schema_version" not in tables:
        if len(tables & set(TABLES)) >= len(TABLES) // 2:  # a store that lost its version table
            require_tables(con, path)
        if tables:
            raise StoreError(
                f"database {path} has tables but no schema_version: it is not an rca store; "
                "give a new path"
            )
        return 0
    row = first_row(con, "SELECT max(version) FROM schema_version")
    v = int(row[0]) if row and row[0] is not None else 0
    if v > SCHEMA_VERSION:
        raise StoreError(
            f"database {path} has schema version {v}, newer than this rca knows "
            f"({SCHEMA_VERSION}); upgrade rca to open it"
        )
    return v


def _apply(con: duckdb.DuckDBPyConnection, m: Migration, *, actor: str) -> None:
    """Apply one migration inside the caller's transaction, re-auditing the entities it changes
    (only those that matched their audit record before: a migration never blesses tampering)."""
    before: dict[str, dict[str, tuple[str, int]]] = {}
    latest: dict[tuple[str, str], str] = {}
    if m.rehash:
        for table, entity, content in con.execute(
            "SELECT table_name, entity, content_hash FROM audit ORDER BY seq"
        ).fetchall():
            latest[(table, entity)] = content
        before = {t: table_digests(con, t) for t in m.rehash}
    for sql in m.statements:
        con.execute(sql)
    now = now_utc()
    for table in m.rehash:
        after = table_digests(con, table)
        for entity, (digest, _) in sorted(before[table].items()):
            if latest.get((table, entity)) == digest and after[entity][0] != digest:
                append_audit(con, actor=actor, action="migrate", table=table, entity=entity, at=now)
    con.execute(
        "INSERT INTO schema_version (version, applied_at, note) VALUES (?, ?, ?)",
        [m.version, now, m.note],
    )
    append_audit(
        con, actor=actor, action="migrate", table="schema_version", entity=str(m.version), at=now
    )


def migrate(con: duckdb.DuckDBPyConnection, path: Path, *, actor: str) -> None:
    """Bring the open store at ``path`` to ``SCHEMA_VERSION`` inside the caller's transaction:
    every migration newer than the file's version, in order, signed by ``actor``."""
    v = read_version(con, path)
    for m in MIGRATIONS:
        if m.version > v:
            _apply(con, m, actor=actor)
    require_tables(con, path)


def require_current(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """The open store is at this rca's schema version with every table there: what a reader
    needs (a reader never migrates)."""
    v = read_version(con, path)
    if v < SCHEMA_VERSION:
        raise StoreError(
            f"database {path} has schema version {v}, older than this rca "
            f"({SCHEMA_VERSION}); open it once with rca.store.Store(path) to migrate it"
        )
    require_tables(con, path)
