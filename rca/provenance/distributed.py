"""The per-example gradients of a large training set on Ray workers (``--workers N``).

Feature extraction is a map over the examples: each one's gradient of the output function,
projected, and its out-to-loss term. ``ray_gradients`` runs that map with ``ray.data``
(``map_batches`` over an actor pool of ``workers`` actors, one CPU each); every actor loads the
model once, through the ``loader`` it is given, and builds the same projection from the same
seed. The driver gathers the rows in order and finalizes the features itself
(``rca.provenance.influence.featurize``): the inverse of G^T G needs every row. The features
are those a single process computes, to float noise: the out-to-loss terms to 1e-4, the
features (which pass through the inverse of G^T G) to 1% of their norm, the ranking the same
(tested on the zoo); so the cache key does not depend on the number of workers.

Ray is an optional extra (``pip install 'rca[ray]'``); ``ray_address`` joins a running cluster,
else a local one of ``workers`` CPUs is started.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rca.model.subject import Subject

__all__ = ["ray_gradients", "require_ray"]


def require_ray() -> Any:
    """The ``ray`` module, or InfluenceError saying how to get it."""
    from rca.provenance.influence import InfluenceError
    from rca.ray_pool import import_ray

    return import_ray(InfluenceError)


class _Worker:
    """One actor: the model loaded once, a TRAKer for the projection and the gradients."""

    def __init__(
        self, loader: Callable[[], Subject], params: list[str], cfg: Any, threads: int
    ) -> None:
        from rca.provenance.influence import _traker, quiet_model

        torch.set_num_threads(max(1, threads))
        self.subject = loader()
        self.cfg = cfg
        self.tmp = tempfile.TemporaryDirectory(prefix="rca-trak-worker-")
        self._quiet = quiet_model(self.subject)
        self._quiet.__enter__()
        self.tr = _traker(self.subject, params, cfg, 1, Path(self.tmp.name) / "trak")
        self.tr.gradient_computer.load_model_params(self.subject.model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rca.provenance.influence import text_batch

        texts = [str(t) for t in batch["text"]]
        inputs, n_cut = text_batch(self.subject, texts, self.cfg.max_tokens)
        grads = self.tr.gradient_computer.compute_per_sample_grad(batch=inputs)
        grads = self.tr.projector.project(grads, model_id=0) / self.tr.normalize_factor
        q = self.tr.gradient_computer.compute_loss_grad(inputs)
        cut = np.zeros(len(texts), dtype=np.int64)  # the batch's count, on its first row
        cut[0] = n_cut
        return {
            "row": np.asarray(batch["row"], dtype=np.int64),
            "grad": grads.float().cpu().numpy(),
            "q": q.float().cpu().numpy().reshape(-1),
            "cut": cut,
        }


def ray_gradients(
    loader: Callable[[], Subject],
    texts: Sequence[str],
    params: Sequence[str],
    cfg: Any,
    *,
    batch: int,
    workers: int,
    ray_address: str | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every text's projected gradient (n, proj_dim) and out-to-loss term (n,), in the texts'
    order, computed on ``workers`` Ray actors; and how many texts were cut to
    ``cfg.max_tokens``."""
    from rca.ray_pool import start_ray

    ray = require_ray()
    start_ray(ray, workers, ray_address)
    threads = max(1, torch.get_num_threads() // workers)
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(
        _Worker,
        fn_constructor_args=(loader, list(params), cfg, threads),
        batch_size=batch,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=1,
    )
    n = len(texts)
    grads = np.zeros((n, cfg.proj_dim), dtype=np.float32)
    q = np.zeros(n, dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    cut = 0
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows = b["row"]
        grads[rows], q[rows], seen[rows] = b["grad"], b["q"], True
        cut += int(b["cut"].sum())
    if not seen.all():
        from rca.provenance.influence import InfluenceError

        raise InfluenceError(f"Ray returned {int(seen.sum())} of {n} examples' gradients")
    return grads, q, cut
