"""The DuckDB case store: one file, one writer at a time, every write in a hash chain.

    models         one row per model fingerprint                     key: fingerprint
    incidents      the case as ingested (fields as JSON, raw TOML)   key: incident_id @ sha256
    runs           one row per investigation / regression run        key: run_id (a uuid)
    token_scores   the evidence of one run, in bulk                  key: run_id
    nodes          (Arrow in, never executemany; each row keeps its
    edges          position in the run as row_no)
    ablations      remedies: the fixes tried; variants: the case's
    remedies       variants as measured; variant_results: each fix's
    variants       P(bad) on each variant (both empty for a
    variant_results single-prompt case)
    notes          append-only free text on a run or an incident     key: note_id
    audit          the hash chain over every write                   key: seq
    schema_version one row per applied migration                     key: version

A run is written in one transaction at its end, or not at all: ``Store.record_run`` opens the
file, writes every row and one audit record per table and entity, commits and closes. Readers
open the file read-only per call and retry while a writer holds it (DuckDB allows one
read-write process or many read-only ones, never both). No connection lets DuckDB install or
load an extension, and a file that is not a DuckDB database is refused before DuckDB opens it.

The audit chain: each audit record holds ``content_hash``, a digest of the rows of one entity
(``digest_rows``), and ``hash = sha256(prev_hash + canonical JSON of the record)``. ``verify``
recomputes every digest from the tables as they are now, so changing, adding or deleting any
row by hand breaks it, and it names the first broken link. The full schema, the digest format
and example SQL are in docs/store.md.

The package, bottom up: ``errors`` (StoreError, RecordError), ``tables`` (the tables and their
audit entities), ``audit`` (canonical forms, row digests, the chain, verification),
``schema`` (migrations and versions), ``connection`` (opening the file, locks, read-only
access), ``records`` (ModelRecord, IncidentRecord, RunRecord), ``stages`` (what a run's write
transaction writes, stage by stage), ``stores`` (ReadOnlyStore, Store). ``from_run`` builds a
RunRecord from an investigation; it knows the pipeline's objects (and so torch), so this
package does not import it: ``from rca.store.from_run import to_run_record``. The store itself
imports neither torch nor streamlit.
"""

from __future__ import annotations

from .audit import (
    EMPTY_DIGEST,
    GENESIS,
    AuditRecord,
    Broken,
    VerifyResult,
    append_audit,
    canonical_json,
    chain_hash,
    digest_rows,
)
from .connection import open_readonly
from .errors import RecordError, StoreError
from .records import (
    BULK_COLUMNS,
    RUN_STATUSES,
    IncidentRecord,
    ModelRecord,
    RunRecord,
    library_versions,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, Migration
from .stages import RUN_STAGES
from .stores import ReadOnlyStore, Store
from .tables import CHILD_TABLES, ENTITY_SQL, TABLES

__all__ = [
    "BULK_COLUMNS",
    "CHILD_TABLES",
    "EMPTY_DIGEST",
    "ENTITY_SQL",
    "GENESIS",
    "MIGRATIONS",
    "RUN_STAGES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "TABLES",
    "AuditRecord",
    "Broken",
    "IncidentRecord",
    "Migration",
    "ModelRecord",
    "ReadOnlyStore",
    "RecordError",
    "RunRecord",
    "Store",
    "StoreError",
    "VerifyResult",
    "append_audit",
    "canonical_json",
    "chain_hash",
    "digest_rows",
    "library_versions",
    "open_readonly",
]
