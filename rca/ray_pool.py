"""Ray, the optional extra behind ``--workers``: imported on demand with a one-line error where
it is missing, and a local cluster of the asked size started where none runs."""

from __future__ import annotations

from typing import Any

__all__ = ["import_ray", "start_ray"]


def import_ray(error: type[Exception]) -> Any:
    """The ``ray`` module; ``error`` (one line, saying how to get it) where it is missing."""
    try:
        import ray
    except ImportError:
        raise error(
            "--workers needs Ray, an optional extra: pip install 'rca[ray]' (or run without "
            "--workers)"
        ) from None
    return ray


def start_ray(ray: Any, workers: int, address: str | None) -> None:
    """Join the cluster at ``address``, else start a local one of ``workers`` CPUs, unless Ray
    already runs in this process."""
    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=None if address else workers,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
