"""The records a run writes, as plain Python data validated on construction: ``ModelRecord``,
``IncidentRecord`` and ``RunRecord``, whose bulk tables (token scores, nodes, edges,
ablations, remedies, variants, variant results) are converted to Arrow in the store's column
order (``BULK_COLUMNS``).

A record that cannot be stored as given raises ``RecordError`` when it is built, before any
file is touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import numbers
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .audit import canonical_json, json_default
from .errors import RecordError
from .tables import CHILD_TABLES

__all__ = [
    "BULK_COLUMNS",
    "RUN_STATUSES",
    "IncidentRecord",
    "ModelRecord",
    "RunRecord",
    "VARIANT_PARTS",
    "TableLike",
    "library_versions",
]

RUN_STATUSES = ("ok", "partial", "failed")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _json_text(value: Any, *, what: str) -> str | None:
    """A JSON column's stored text. A str is taken as JSON text and must parse."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RecordError(
                f"{what}: {value[:40]!r} is not JSON text; pass a dict or list instead"
            ) from e
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{what}: cannot be stored as JSON: {e}") from e


def _utc(value: dt.datetime | str | None, *, what: str) -> dt.datetime | None:
    """An aware UTC datetime. Naive datetimes and ISO strings without an offset are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as e:
            raise RecordError(f"{what}: {value!r} is not an ISO-8601 time") from e
    if not isinstance(value, dt.datetime):
        raise RecordError(f"{what}: expected a datetime or ISO string, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


@dataclass(frozen=True)
class ModelRecord:
    """A model as the store keeps it, keyed by ``fingerprint`` (``rca.model.files.fingerprint``)."""

    fingerprint: str
    path: str | None = None
    architecture: str | None = None
    n_params: int | None = None
    dims: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, str) or not self.fingerprint.strip():
            raise RecordError("model.fingerprint: must be a non-empty string")
        if self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        if self.n_params is not None and (
            not isinstance(self.n_params, int) or isinstance(self.n_params, bool)
        ):
            raise RecordError(f"model.n_params: expected an int, got {self.n_params!r}")
        if not isinstance(self.dims, Mapping):
            raise RecordError(f"model.dims: expected a mapping, got {type(self.dims).__name__}")

    @classmethod
    def from_subject(cls, subject: Any) -> ModelRecord:
        """From a loaded ``rca.Subject`` (duck-typed: the store does not import torch)."""
        if not subject.fingerprint:
            raise RecordError("model: the subject has no fingerprint; load it with load_subject")
        return cls(
            fingerprint=subject.fingerprint,
            path=None if subject.path is None else str(subject.path),
            architecture=subject.architecture,
            n_params=int(subject.n_params),
            dims=dict(subject.adapter.dims()),
        )


def _fields_sha256(fields: Mapping[str, Any]) -> str:
    # the same recipe as rca.ingest.incident.Incident.sha256
    blob = json.dumps(dict(fields), sort_keys=True, ensure_ascii=False, default=json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class IncidentRecord:
    """An incident as ingested: every field, the content hash that keys it with its id, where
    it came from and the raw TOML text when there was a file."""

    id: str
    sha256: str
    fields: Mapping[str, Any]
    source: str | None = None
    toml: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise RecordError("incident.id: must be a non-empty string")
        if not isinstance(self.sha256, str) or not _SHA_RE.fullmatch(self.sha256):
            raise RecordError(f"incident.sha256: {self.sha256!r} is not a lowercase sha256 hex")
        if not isinstance(self.fields, Mapping):
            raise RecordError("incident.fields: expected a mapping of the case's fields")
        if "id" in self.fields and self.fields["id"] != self.id:
            raise RecordError(f"incident.fields: id {self.fields['id']!r} is not {self.id!r}")
        _json_text(dict(self.fields), what="incident.fields")
        for key in ("source", "toml"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise RecordError(f"incident.{key}: expected a string, got {type(v).__name__}")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Any], *, source: str | None = None, toml: str | None = None
    ) -> IncidentRecord:
        """From a mapping with at least ``id``; the hash is computed as ``Incident.sha256``."""
        if "id" not in fields:
            raise RecordError("incident.fields: needs an 'id'")
        return cls(str(fields["id"]), _fields_sha256(fields), dict(fields), source, toml)

    @classmethod
    def from_incident(cls, incident: Any, *, toml: str | None = None) -> IncidentRecord:
        """From an ``rca.Incident``. Without ``toml``, the case file is read from its source
        when it still parses to the same incident (the text as ingested)."""
        source = getattr(incident, "source", None)
        if toml is None and source and source != "<flags>" and Path(source).is_file():
            with contextlib.suppress(Exception):
                from rca.ingest.case_file import load_case

                if load_case(source, check_model=False).sha256 == incident.sha256:
                    toml = Path(source).read_text(encoding="utf-8")
        return cls(incident.id, incident.sha256, incident.to_dict(), source, toml)

    @property
    def key(self) -> str:
        return f"{self.id}@{self.sha256}"


# column name -> (type, required); every bulk table also has run_id, filled by the store.
# "bool" is a flag, False when missing; "bool_or_null" keeps a missing value NULL.
_T = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "bool_or_null": pa.bool_(),
}
BULK_COLUMNS: dict[str, dict[str, tuple[str, bool]]] = {
    "token_scores": {
        "position": ("int", True),
        "token": ("str", True),
        "score": ("float", True),
        "method": ("str", False),
    },
    "nodes": {
        "node_id": ("str", True),
        "kind": ("str", False),
        "layer": ("int", False),
        "score": ("float", False),
        "method": ("str", False),
        "baseline": ("str", False),
        "total_effect": ("float", False),
        "direct_effect": ("float", False),
        "necessity": ("float", False),
        "p_value": ("float", False),
        "verdict": ("str", False),
        "reason": ("str", False),
        "rank": ("int", False),
        "benign_loss_pct": ("float", False),
        "benign_kl": ("float", False),
        "role": ("str", False),
        "sites": ("list", False),
    },
    "edges": {"source": ("str", True), "target": ("str", True), "score": ("float", True)},
    "ablations": {
        "experiment": ("str", True),
        "components": ("list", True),
        "kind": ("str", False),
        "metric": ("float", False),
        "effect": ("float", False),
        "p_value": ("float", False),
        "details": ("json", False),
    },
    "remedies": {
        "remedy_id": ("str", True),
        "kind": ("str", True),
        "components": ("list", False),
        "metric_before": ("float", False),
        "metric_after": ("float", False),
        "p_bad_before": ("float", False),
        "p_bad_after": ("float", False),
        "side_effect": ("json", False),
        "recommended": ("bool", False),
        "note": ("str", False),
        "patch_spec": ("json", False),
        "behaviour": ("json", False),
    },
    "variants": {
        "variant_index": ("int", True),
        "part": ("str", True),
        "origin": ("str", False),
        "label": ("str", False),
        "prompt_tokens": ("int", False),
        "metric": ("float", False),
        "p_bad": ("float", False),
        "counterfactual_aligned": ("bool_or_null", False),
        "metric_counterfactual": ("float", False),
    },
    "variant_results": {
        "remedy_row": ("int", True),
        "kind": ("str", False),
        "variant_index": ("int", True),
        "part": ("str", True),
        "p_bad_before": ("float", False),
        "p_bad_after": ("float", False),
    },
}
# the sets a variant belongs to (rca.ingest.variants)
VARIANT_PARTS = ("fit", "held_out")


def _arrow_type(kind: str) -> pa.DataType:
    if kind == "list":
        return pa.list_(pa.string())
    return _T.get(kind, pa.string())  # json is stored as its text


TableLike = Any  # pyarrow.Table | pandas.DataFrame | Mapping[str, Sequence] | Sequence[Mapping]


def _source_columns(data: TableLike, what: str) -> tuple[dict[str, Any], int]:
    """name -> column values (Arrow ChunkedArray, pandas Series, or sequence), row count."""
    if isinstance(data, pa.Table):
        return {n: data.column(n) for n in data.column_names}, data.num_rows
    if hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame
        return {str(c): data[c] for c in data.columns}, len(data)
    if isinstance(data, Mapping):
        cols = dict(data)
        try:
            lengths = {len(v) for v in cols.values()}
        except TypeError:
            raise RecordError(f"{what}: a dict of columns needs a sequence per column") from None
        if len(lengths) > 1:
            raise RecordError(f"{what}: columns have different lengths {sorted(lengths)}")
        return cols, lengths.pop() if lengths else 0
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        keys: dict[str, None] = {}
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise RecordError(f"{what}: row {i} is {type(row).__name__}, not a mapping")
            keys.update(dict.fromkeys(row))
        return {k: [row.get(k) for row in data] for k in keys}, len(data)
    raise RecordError(
        f"{what}: expected a pyarrow Table, pandas DataFrame, dict of columns or list of rows, "
        f"got {type(data).__name__}"
    )


def _pylist(values: Any) -> list[Any]:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.to_pylist()
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


def _components(v: Any, what: str) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, list | tuple) or not all(isinstance(c, str) for c in v):
        raise RecordError(f"{what}: expected a list of component ids, got {v!r:.60}")
    return list(v)


def _bulk_table(table: str, data: TableLike, run_id: str) -> pa.Table:
    """The rows of one bulk table as Arrow in the store's column order, run_id first."""
    spec = BULK_COLUMNS[table]
    what = f"RunRecord.{table}"
    cols, n = ({}, 0) if data is None else _source_columns(data, what)
    if "run_id" in cols:
        ids = set(_pylist(cols.pop("run_id")))
        if ids - {run_id}:
            raise RecordError(f"{what}: column run_id holds other runs' ids; leave it out")
    unknown = sorted(set(cols) - set(spec))
    if unknown:
        raise RecordError(f"{what}: unknown column {unknown[0]!r}; expected some of {list(spec)}")
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "row_no": pa.array(np.arange(n, dtype=np.int32)),
    }
    for name, (kind, required) in spec.items():
        if name not in cols:
            if required and n:
                raise RecordError(f"{what}: column {name!r} is missing")
            if kind == "bool":
                arrays[name] = pa.array([False] * n, pa.bool_())
            else:
                arrays[name] = pa.nulls(n, _arrow_type(kind))
            continue
        values = cols[name]
        try:
            if kind == "json":
                arr = pa.array(
                    [_json_text(v, what=f"{what}.{name}") for v in _pylist(values)], pa.string()
                )
            elif kind == "list":
                arr = pa.array(
                    [_components(v, f"{what}.{name}") for v in _pylist(values)],
                    pa.list_(pa.string()),
                )
            elif isinstance(values, pa.ChunkedArray | pa.Array):
                arr = values.cast(_T[kind])
            elif hasattr(values, "iloc"):  # pandas: NaN means missing except in float columns
                arr = pa.array(values, type=_T[kind], from_pandas=kind != "float")
            else:
                arr = pa.array(list(values) if not hasattr(values, "dtype") else values, _T[kind])
        except RecordError:
            raise
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise RecordError(
                f"{what}: column {name!r} cannot be read as {kind.removesuffix('_or_null')}: "
                f"{str(e).splitlines()[0]}"
            ) from e
        if kind == "bool":
            arr = arr.fill_null(False)
        if required and arr.null_count:
            raise RecordError(f"{what}: column {name!r} has {arr.null_count} missing value(s)")
        arrays[name] = arr
    out = pa.table(arrays)
    if table == "nodes" and n:
        out = _fill_node_kinds(out)
    if n:
        _check_values(table, out)
    return out


def _check_values(table: str, rows: pa.Table) -> None:
    """The values a column's type does not constrain: a variant's set, a fix's behaviour."""
    what = f"RunRecord.{table}"
    if "part" in rows.column_names and table in ("variants", "variant_results"):
        for i, part in enumerate(rows.column("part").to_pylist()):
            if part not in VARIANT_PARTS:
                raise RecordError(
                    f"{what}: row {i} has part {part!r}; expected one of {VARIANT_PARTS}"
                )
    if table == "remedies":
        for i, text in enumerate(rows.column("behaviour").to_pylist()):
            if text is None:
                continue
            b = json.loads(text)
            if not isinstance(b, dict):
                raise RecordError(
                    f"{what}: row {i} has behaviour {text[:40]!r}; expected a mapping (the "
                    "fit and held_out figures) or None"
                )
            if "per_variant" in b:
                raise RecordError(
                    f"{what}: row {i}'s behaviour holds per_variant; give those as "
                    "RunRecord.variant_results rows (one per fix and variant) and leave it out"
                )


def _link_variant_results(tables: dict[str, pa.Table]) -> None:
    """Check each variant_results row against the fix and the variant it names, and fill in
    the fix's kind where it was left out. Changes ``tables`` in place."""
    results = tables["variant_results"]
    if results.num_rows == 0:
        return
    what = "RunRecord.variant_results"
    remedies = tables["remedies"]
    rows = results.column("remedy_row").to_pylist()
    bad = [(i, r) for i, r in enumerate(rows) if not 0 <= r < remedies.num_rows]
    if bad:
        i, r = bad[0]
        raise RecordError(
            f"{what}: row {i} names remedy_row {r}, but the run has {remedies.num_rows} "
            "remedies; remedy_row is the fix's position in RunRecord.remedies"
        )
    own = remedies.column("kind").to_pylist()
    kinds = results.column("kind").to_pylist()
    for i, (r, k) in enumerate(zip(rows, kinds, strict=True)):
        if k is not None and k != own[r]:
            raise RecordError(f"{what}: row {i} has kind {k!r}, but remedy {r} is {own[r]!r}")
    if any(k is None for k in kinds):
        filled = pa.array([own[r] for r in rows], pa.string())
        results = results.set_column(results.column_names.index("kind"), "kind", filled)
    parts = dict(
        zip(
            tables["variants"].column("variant_index").to_pylist(),
            tables["variants"].column("part").to_pylist(),
            strict=True,
        )
    )
    for i, (v, part) in enumerate(
        zip(
            results.column("variant_index").to_pylist(),
            results.column("part").to_pylist(),
            strict=True,
        )
    ):
        if parts.get(v) != part:
            known = "not among RunRecord.variants" if v not in parts else f"in {parts[v]!r}"
            raise RecordError(f"{what}: row {i} is variant {v} in {part!r}, but it is {known}")
    tables["variant_results"] = results


def _fill_node_kinds(nodes: pa.Table) -> pa.Table:
    """kind and layer from the id grammar where the caller left them out and the id parses."""
    from rca.model.ids import IdError, parse_id

    kinds = nodes.column("kind").to_pylist()
    layers = nodes.column("layer").to_pylist()
    if all(k is not None for k in kinds) and all(x is not None for x in layers):
        return nodes
    for i, node_id in enumerate(nodes.column("node_id").to_pylist()):
        if kinds[i] is not None and layers[i] is not None:
            continue
        try:
            cid = parse_id(node_id)
        except IdError:
            continue
        kinds[i] = kinds[i] if kinds[i] is not None else cid.kind
        layers[i] = layers[i] if layers[i] is not None else cid.layer
    nodes = nodes.set_column(nodes.column_names.index("kind"), "kind", pa.array(kinds, pa.string()))
    return nodes.set_column(
        nodes.column_names.index("layer"), "layer", pa.array(layers, pa.int64())
    )


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on, without importing them."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    import platform
    from importlib import metadata

    out = [("python", platform.python_version())]
    for name in ("rca", "torch", "transformers", "captum", "duckdb", "numpy", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append((name, metadata.version(name)))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class RunRecord:
    """Everything one run writes, as plain Python data; validated on construction.

    The bulk tables (``token_scores``, ``nodes``, ``edges``, ``ablations``, ``remedies``,
    ``variants``, ``variant_results``) take a pyarrow Table, a pandas DataFrame, a dict of
    columns or a list of row dicts, with the columns of ``BULK_COLUMNS`` (run_id and row_no
    are filled in). A ``variant_results`` row names its fix by ``remedy_row``, the fix's
    position in ``remedies`` (its ``kind`` is filled in from there when left out), and its
    variant by ``variant_index``, one of ``variants``. ``summary`` holds the verdict and the
    metric and P(bad) before and after, e.g. ``{"verdict": "confirmed", "metric_before": 3.1,
    "metric_after": -0.4, "p_bad_before": 0.91, "p_bad_after": 0.08}``.
    """

    incident: IncidentRecord
    model: ModelRecord
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    kind: str = "investigate"  # investigate | regress | confirm | ...
    parent_run_id: str | None = None  # the earlier run a regression run re-checks
    status: str = "ok"  # one of RUN_STATUSES
    config: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=library_versions)
    device: str | None = None
    seed: int | None = None
    timings: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds
    summary: Mapping[str, Any] = field(default_factory=dict)
    started_at: dt.datetime | str | None = None  # UTC; naive times are taken as UTC
    finished_at: dt.datetime | str | None = None  # None: the time it is recorded
    token_scores: TableLike = None
    nodes: TableLike = None
    edges: TableLike = None
    ablations: TableLike = None
    remedies: TableLike = None
    variants: TableLike = None  # a case's variants as the preflight measured them
    variant_results: TableLike = None  # per fix and variant: P(bad) before and after
    # the bulk tables converted to Arrow, in the store's column order
    tables: Mapping[str, pa.Table] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.incident, IncidentRecord):
            raise RecordError("RunRecord.incident: use IncidentRecord.from_incident(incident)")
        if not isinstance(self.model, ModelRecord):
            raise RecordError("RunRecord.model: use ModelRecord.from_subject(subject)")
        for key in ("run_id", "parent_run_id"):
            v = getattr(self, key)
            if v is None and key == "parent_run_id":
                continue
            try:
                object.__setattr__(self, key, str(uuid.UUID(str(v))))
            except ValueError as e:
                raise RecordError(f"RunRecord.{key}: {v!r} is not a uuid") from e
        if self.parent_run_id == self.run_id:
            raise RecordError("RunRecord.parent_run_id: a run cannot be its own parent")
        if not isinstance(self.kind, str) or not _KIND_RE.fullmatch(self.kind):
            raise RecordError(f"RunRecord.kind: {self.kind!r} is not a lowercase word")
        if self.status not in RUN_STATUSES:
            raise RecordError(f"RunRecord.status: {self.status!r} is not one of {RUN_STATUSES}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise RecordError(f"RunRecord.seed: expected an int, got {self.seed!r}")
        for key in ("config", "versions", "timings", "summary"):
            v = getattr(self, key)
            if not isinstance(v, Mapping):
                raise RecordError(f"RunRecord.{key}: expected a mapping, got {type(v).__name__}")
            _json_text(dict(v), what=f"RunRecord.{key}")
        for key, v in self.timings.items():
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
                raise RecordError(f"RunRecord.timings: {key!r} = {v!r} is not a number of seconds")
        for key in ("started_at", "finished_at"):
            object.__setattr__(self, key, _utc(getattr(self, key), what=f"RunRecord.{key}"))
        tables = {t: _bulk_table(t, getattr(self, t), self.run_id) for t in CHILD_TABLES}
        _link_variant_results(tables)
        object.__setattr__(self, "tables", tables)
