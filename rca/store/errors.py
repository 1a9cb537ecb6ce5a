"""The store's errors: ``StoreError`` for an operation that failed, ``RecordError`` for a record
that cannot be stored as given."""

from __future__ import annotations

__all__ = ["RecordError", "StoreError"]


class StoreError(RuntimeError):
    """A store operation that failed; the one-line message names the database and the fix."""


class RecordError(StoreError, ValueError):
    """A run, model or incident record that cannot be stored as given; the message says why."""
