"""Which training examples taught an incident: TRAK influence scores (``traker``), restricted to
the parameters of the verdict's circuit.

For a training example z and an incident query x (a prompt with its bad and good
continuations), TRAK (Park et al. 2023) estimates how much training on z raised the incident
metric at x:

    score(z, x) = g_x . (G^T G + lambda I)^-1 . g_z

where g is a gradient projected to ``proj_dim`` dimensions by a fixed Gaussian matrix, and G
stacks every training example's projected gradient. rca's choices:

- **The gradients are taken over the circuit's parameters only** (``circuit_parameters``): the
  query and key and value projections and the output projection of every layer that holds one
  of the circuit's heads, and the MLP of every layer whose MLP is a member. The answer is then
  about the mechanism the verdict found, and the per-example gradient is a few percent of the
  model's. ``scope="full"`` takes every parameter, to compare with.
- **The output function is the log-likelihood**, on both sides. A training text's is the sum
  of its tokens' log-probabilities, so its gradient is the negative of the gradient of its
  training loss, exactly what a step on it applied (every token weighs the same: how a given
  corpus weighted its tokens is not known). A query's is the incident metric itself, log P(bad)
  minus log P(good) (the focus of the bad continuation only, where the case has one). With
  TRAK's out-to-loss factor at 1, G^T G is the empirical Fisher of the training set, and the
  score is an influence function with that curvature.
- **Features are computed once** per (model fingerprint, data hash, parameters, projection,
  seed) and written to Parquet (``FEATURES_NAME``): each example's row of
  G (G^T G + lambda I)^-1, TRAK's "features". A query projects its own gradient with the same
  matrix (regenerated from the seed) and takes one matrix product with them; a second incident
  on the same data and circuit reuses them.
- **The projection** is a Gaussian matrix (traker's ``BasicProjector``, passed explicitly: on
  a GPU traker would pick a Rademacher one and the scores would depend on the device) where it
  fits in ``PROJECTION_MATRIX_BYTES``, so that it is generated once. Beyond that (a circuit of
  more than about 260,000 parameters at the default 256 dimensions) the CPU projector would
  regenerate the matrix block by block for every batch, minutes per batch on a 135M model; a
  count sketch takes its place (``CountSketch``: each parameter added, with a random sign, into
  one random dimension; a sparse JL transform, Clarkson and Woodruff 2013), which costs one
  pass over the gradient and about 5 bytes per parameter. ``Features.projection`` says which.

traker is used for the per-example gradients (``torch.func`` over the real module, through a
gradient computer that differentiates only the chosen parameters), the projection and the
features; rca adds the output function, the data batches and the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rca.model.ids import parse_id
from rca.model.metric import Target
from rca.model.subject import Subject

__all__ = [
    "FEATURES_NAME",
    "META_NAME",
    "Features",
    "InfluenceConfig",
    "InfluenceError",
    "circuit_parameters",
    "featurize",
    "load_features",
    "query_scores",
]

FEATURES_NAME = "features.parquet"
META_NAME = "features.json"
FORMAT = 2  # bumped when what the features mean changes; part of the cache key
PROJECTION_MATRIX_BYTES = 256 << 20  # the largest Gaussian projection matrix; beyond: a sketch


class InfluenceError(ValueError):
    """An influence computation that cannot run as asked."""


@dataclass(frozen=True)
class InfluenceConfig:
    """``proj_dim``: dimensions of the projected gradients; ``lambda_reg``: the ridge term
    added to G^T G; ``max_tokens``: a training text is cut to its first this many tokens
    (counted in ``Features.truncated``); ``batch_size``: examples per vmapped gradient pass
    (0: from the parameter count); ``seed``: the projection's."""

    scope: str = "circuit"
    proj_dim: int = 256
    lambda_reg: float = 0.0
    max_tokens: int = 256
    batch_size: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.scope not in ("circuit", "full"):
            raise InfluenceError(f"scope must be circuit or full, got {self.scope!r}")
        # traker frees a one-block projector's matrix when it finalizes the features
        if not 100 < self.proj_dim <= 8192:
            raise InfluenceError(f"--proj-dim must be 101 to 8192, got {self.proj_dim}")
        if not (self.lambda_reg >= 0 and math.isfinite(self.lambda_reg)):
            raise InfluenceError(f"--lambda must be 0 or more, got {self.lambda_reg}")
        if not 2 <= self.max_tokens <= 8192:
            raise InfluenceError(f"--max-tokens must be 2 to 8192, got {self.max_tokens}")
        if self.batch_size < 0:
            raise InfluenceError(f"batch size must be 0 (auto) or more, got {self.batch_size}")


@dataclass
class Features:
    """Cached TRAK features of one dataset: where they are and what produced them."""

    path: Path  # the cache directory (FEATURES_NAME and META_NAME)
    key: str
    model_fingerprint: str | None
    data_sha256: str
    scope: str
    params: list[str]
    n_params: int
    proj_dim: int
    lambda_reg: float
    seed: int
    max_tokens: int
    n: int
    truncated: int = 0
    seconds: float = 0.0
    projection: str = "gaussian"  # or "countsketch" (PROJECTION_MATRIX_BYTES)
    cached: bool = False  # read from an earlier run, not computed now

    def meta(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d.pop("cached")
        d["format"] = FORMAT
        return d


# ---------------------------------------------------------------------------------------------
# what is differentiated


def circuit_parameters(subject: Subject, components: Sequence[str]) -> list[str]:
    """Names of the parameters a circuit's members compute with, in the model's order: for a
    head, its layer's query, key and value projections and output projection; for an MLP, its
    layer's MLP. Neurons count as their layer's MLP. InfluenceError where nothing is left."""
    a = subject.adapter
    mods: list[torch.nn.Module] = []
    for cid in components:
        c = parse_id(cid)
        if c.layer is None:
            continue
        if c.kind == "head":
            mods += [*a.qkv(c.layer), a.attn_out(c.layer)]
        elif c.kind in ("mlp", "neuron", "neurons"):
            mods.append(a.mlp(c.layer))
    wanted = {id(p) for m in mods for p in m.parameters()}
    names = [n for n, p in subject.model.named_parameters() if id(p) in wanted]
    if not names:
        raise InfluenceError(
            f"the circuit {', '.join(components) or '(empty)'} has no head or MLP whose "
            "parameters rca can differentiate; use --scope full"
        )
    return names


def _all_parameters(subject: Subject) -> list[str]:
    return [n for n, _ in subject.model.named_parameters()]


# ---------------------------------------------------------------------------------------------
# traker's pieces: the output function and a gradient computer over chosen parameters


def _seq_logprob(
    model: torch.nn.Module, params: dict, buffers: dict, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """sum_t w[t] log p(ids[t] | ids[<t]) for one unbatched row (w[0] unused); right padding
    weighs 0 and never reaches a real position under causal attention."""
    logits = torch.func.functional_call(model, (params, buffers), args=(ids.unsqueeze(0),))
    logp = logits.logits[0, :-1].float().log_softmax(-1)
    return (w[1:] * logp.gather(1, ids[1:, None])[:, 0]).sum()


def output_class() -> type:
    from trak.modelout_functions import AbstractModelOutput

    class LogLikelihood(AbstractModelOutput):  # type: ignore[misc]
        """f = sum w_a log p(a) + sum w_b log p(b): a training text's log-likelihood (b empty),
        or an incident's metric (a: prompt + bad with weight 1 on the bad tokens read, b:
        prompt + good with weight -1 on its tokens). Out-to-loss factor 1."""

        def __init__(self) -> None:
            pass

        @staticmethod
        def get_output(model, weights, buffers, ids_a, w_a, ids_b, w_b):  # type: ignore[no-untyped-def]
            return _seq_logprob(model, weights, buffers, ids_a, w_a) + _seq_logprob(
                model, weights, buffers, ids_b, w_b
            )

        def get_out_to_loss_grad(self, model, weights, buffers, batch):  # type: ignore[no-untyped-def]
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    return LogLikelihood


def gradient_computer_class() -> type:
    from trak.gradient_computers import FunctionalGradientComputer

    class ChosenParameters(FunctionalGradientComputer):  # type: ignore[misc]
        """Per-example gradients of the chosen parameters (``grad_wrt``) only: the others are
        held as constants, so the backward never computes their gradients (traker's own
        computer differentiates every parameter and then drops the rest)."""

        def compute_per_sample_grad(self, batch):  # type: ignore[no-untyped-def]
            wrt = list(self.grad_wrt)
            # detached: the gradients are torch.func's alone, with no graph back to the
            # module's parameters (one would keep every batch's activations alive)
            sub = {n: self.func_weights[n].detach() for n in wrt}
            rest = {n: w.detach() for n, w in self.func_weights.items() if n not in sub}
            fn = self.modelout_fn.get_output

            def f(s, *b):  # type: ignore[no-untyped-def]
                return fn(self.model, {**rest, **s}, self.func_buffers, *b)

            grads = torch.func.vmap(
                torch.func.grad(f), in_dims=(None, *([0] * len(batch))), randomness="different"
            )(sub, *batch)
            return {n: grads[n] for n in wrt}  # traker vectorizes in grad_wrt's order

    return ChosenParameters


def _no_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    return iterable


@contextlib.contextmanager
def quiet_model(subject: Subject) -> Iterator[None]:
    """The model as vmap can run it: eval mode, and no padding check (a model whose config has
    a pad token id checks the ids for it, a data-dependent branch vmap refuses); traker's
    progress bars and log lines off. Everything is restored on exit."""
    cfg: Any = subject.model.config
    pad = getattr(cfg, "pad_token_id", None)
    was_training = subject.model.training
    import trak.traker

    old_tqdm = trak.traker.tqdm
    trak.traker.tqdm = _no_bar
    trak_log = logging.getLogger("TRAK")
    old_level = trak_log.level
    trak_log.setLevel(logging.ERROR)
    try:
        cfg.pad_token_id = None
        subject.model.eval()
        yield
    finally:
        cfg.pad_token_id = pad
        subject.model.train(was_training)
        trak_log.setLevel(old_level)
        trak.traker.tqdm = old_tqdm


def projection_kind(n_params: int, proj_dim: int) -> str:
    """``gaussian`` where the matrix fits ``PROJECTION_MATRIX_BYTES``, else ``countsketch``."""
    return "gaussian" if 4 * n_params * proj_dim <= PROJECTION_MATRIX_BYTES else "countsketch"


def _countsketch_class() -> type:
    from trak.projectors import AbstractProjector
    from trak.utils import vectorize

    class CountSketch(AbstractProjector):  # type: ignore[misc]
        """A sparse JL transform: coordinate i goes to dimension h(i) with sign s(i), both drawn
        from ``seed``; scaled by sqrt(proj_dim) so that squared norms match a Gaussian
        projection's in expectation."""

        def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: Any) -> None:
            super().__init__(grad_dim, proj_dim, seed, "countsketch", device)
            g = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, proj_dim, (grad_dim,), generator=g).to(device)
            sign = torch.randint(0, 2, (grad_dim,), generator=g, dtype=torch.int8) * 2 - 1
            self.sign = sign.to(device)
            self.scale = math.sqrt(proj_dim)

        def project(self, grads: Any, model_id: int) -> torch.Tensor:
            if isinstance(grads, dict):
                grads = vectorize(grads, device=self.device)
            grads = grads.float() * self.sign.to(torch.float32)
            out = torch.zeros(grads.shape[0], self.proj_dim, device=grads.device)
            out.index_add_(1, self.bucket, grads)
            return out * self.scale

    return CountSketch


def _traker(
    subject: Subject, params: list[str], cfg: InfluenceConfig, n: int, save_dir: Path
) -> Any:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model_params = dict(subject.model.named_parameters())
    n_params = sum(model_params[p].numel() for p in params)
    if projection_kind(n_params, cfg.proj_dim) == "gaussian":
        projector = BasicProjector(
            grad_dim=n_params,
            proj_dim=cfg.proj_dim,
            seed=cfg.seed,
            proj_type=ProjectionType.normal,
            device=subject.device,
            block_size=cfg.proj_dim,  # one block: the matrix is generated once
            dtype=torch.float32,
        )
    else:
        projector = _countsketch_class()(n_params, cfg.proj_dim, cfg.seed, subject.device)
    return TRAKer(
        model=subject.model,
        task=output_class()(),
        train_set_size=n,
        save_dir=str(save_dir),
        load_from_save_dir=False,
        device=subject.device,
        gradient_computer=gradient_computer_class(),
        projector=projector,
        proj_dim=None,
        use_half_precision=False,
        grad_wrt=params,
        lambda_reg=cfg.lambda_reg,
        logging_level=logging.ERROR,
    )


# ---------------------------------------------------------------------------------------------
# batches


def _pad(rows: Sequence[Sequence[float]], value: float, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def text_batch(
    subject: Subject, texts: Sequence[str], max_tokens: int
) -> tuple[tuple[torch.Tensor, ...], int]:
    """(ids_a, w_a, ids_b, w_b) for training texts, and how many were cut to ``max_tokens``."""
    tok = subject.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, cut = [], 0
    for t in texts:
        row = list(tok(t)["input_ids"])
        if len(row) > max_tokens:
            row, cut = row[:max_tokens], cut + 1
        if len(row) < 2:  # nothing to predict: one pad token after it, weight 0
            row = row + [pad] * (2 - len(row))
            ids.append((row, [0.0, 0.0]))
        else:
            ids.append((row, [0.0] + [1.0] * (len(row) - 1)))
    dev = subject.device
    a = _pad([r for r, _ in ids], pad, torch.long).to(dev)
    wa = _pad([w for _, w in ids], 0.0, torch.float32).to(dev)
    n = len(texts)
    b = torch.full((n, 1), pad, dtype=torch.long, device=dev)
    return (a, wa, b, torch.zeros(n, 1, device=dev)), cut


def query_batch(subject: Subject, targets: Sequence[Target]) -> tuple[torch.Tensor, ...]:
    """(ids_a, w_a, ids_b, w_b) for incident targets: f is each one's metric."""
    rows_a, w_a, rows_b, w_b = [], [], [], []
    for t in targets:
        p = list(t.prompt_ids)
        a, b = t.focus or (0, len(t.bad_ids))
        rows_a.append(p + list(t.bad_ids))
        w_a.append([0.0] * len(p) + [1.0 if a <= i < b else 0.0 for i in range(len(t.bad_ids))])
        if t.good_ids is None:
            rows_b.append(p[:1])
            w_b.append([0.0])
        else:
            rows_b.append(p + list(t.good_ids))
            w_b.append([0.0] * len(p) + [-1.0] * len(t.good_ids))
    pad = max(0, targets[0].pad_id)
    dev = subject.device
    return (
        _pad(rows_a, pad, torch.long).to(dev),
        _pad(w_a, 0.0, torch.float32).to(dev),
        _pad(rows_b, pad, torch.long).to(dev),
        _pad(w_b, 0.0, torch.float32).to(dev),
    )


def batch_size(n_params: int, given: int = 0) -> int:
    """Examples per vmapped pass: ``given``, else per-example gradients of 64 MiB at most,
    1 to 64."""
    if given:
        return given
    return max(1, min(64, (64 << 20) // (4 * max(1, n_params))))


# ---------------------------------------------------------------------------------------------
# features: computed once, cached


def cache_key(
    fingerprint: str | None, data_sha256: str, params: Sequence[str], cfg: InfluenceConfig
) -> str:
    """What the features depend on, hashed: the model, the data, the parameters, the settings."""
    parts = {
        "format": FORMAT,
        "model": fingerprint,
        "data": data_sha256,
        "params": list(params),
        "proj_dim": cfg.proj_dim,
        "lambda": cfg.lambda_reg,
        "seed": cfg.seed,
        "max_tokens": cfg.max_tokens,
        "projection_matrix_bytes": PROJECTION_MATRIX_BYTES,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def featurize(
    subject: Subject,
    texts: Sequence[str],
    *,
    data_sha256: str,
    params: Sequence[str],
    cfg: InfluenceConfig,
    cache_root: Path,
    workers: int = 0,
    loader: Callable[[], Subject] | None = None,
    ray_address: str | None = None,
) -> Features:
    """The TRAK features of ``texts`` (a ``TrainingData``'s, hashed ``data_sha256``) over
    ``params``: read from ``cache_root/<key>`` where an earlier run wrote them, else computed
    and written there (a temporary directory renamed into place when complete). ``workers``:
    the per-example gradients on that many Ray actors, each loading the model with ``loader``
    (``rca.provenance.distributed``); the same features."""
    cfg.check()
    if workers and loader is None:
        raise InfluenceError("--workers needs a model the workers can load from its path")
    if not texts:
        raise InfluenceError("the training data has no examples")
    fp = subject.fingerprint
    # an in-memory model has no fingerprint: its features are cached under its weights' hash
    fp_key = fp if fp is not None else _weights_hash(subject, params)
    key = cache_key(fp_key, data_sha256, params, cfg)
    d = cache_root / key
    if (d / META_NAME).is_file() and (d / FEATURES_NAME).is_file():
        f = load_features(d)
        f.cached = True
        return f
    t0 = time.perf_counter()
    model_params = dict(subject.model.named_parameters())
    n_params = sum(model_params[p].numel() for p in params)
    bs = batch_size(n_params, cfg.batch_size)
    n = len(texts)
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.partial-", dir=cache_root))
    truncated = 0
    try:
        with quiet_model(subject):
            tr = _traker(subject, list(params), cfg, n, work / "trak")
            tr.load_checkpoint(subject.model.state_dict(), model_id=0)
            if workers:
                from rca.provenance.distributed import ray_gradients

                assert loader is not None
                grads, q_rows, truncated = ray_gradients(
                    loader, texts, params, cfg, batch=bs, workers=workers, ray_address=ray_address
                )
                st = tr.saver.current_store  # what traker's own featurize writes, row by row
                st["grads"][:] = grads
                st["out_to_loss"][:] = q_rows.reshape(st["out_to_loss"].shape)
                st["is_featurized"][:] = 1
                tr.saver.serialize_current_model_id_metadata()
            else:
                for i in range(0, n, bs):
                    batch, cut = text_batch(subject, texts[i : i + bs], cfg.max_tokens)
                    truncated += cut
                    tr.featurize(batch=batch, num_samples=len(texts[i : i + bs]))
            tr.finalize_features()
            store = tr.saver.current_store
            feats = np.asarray(store["features"], dtype=np.float32).copy()
            grads = np.asarray(store["grads"], dtype=np.float32).copy()
            q = np.asarray(store["out_to_loss"], dtype=np.float32).reshape(-1).copy()
        out = Features(
            path=d,
            key=key,
            model_fingerprint=fp,
            data_sha256=data_sha256,
            scope=cfg.scope,
            params=list(params),
            n_params=n_params,
            proj_dim=cfg.proj_dim,
            lambda_reg=cfg.lambda_reg,
            seed=cfg.seed,
            max_tokens=cfg.max_tokens,
            n=n,
            truncated=truncated,
            seconds=time.perf_counter() - t0,
            projection=projection_kind(n_params, cfg.proj_dim),
        )
        _write_parquet(work / FEATURES_NAME, feats, grads, q)
        (work / META_NAME).write_text(json.dumps(out.meta(), indent=1))
        shutil.rmtree(work / "trak", ignore_errors=True)  # traker's memory maps: not needed
        try:
            work.rename(d)
        except OSError:  # another process wrote the same key meanwhile: its features are these
            shutil.rmtree(work, ignore_errors=True)
        return out
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _weights_hash(subject: Subject, params: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name, p in subject.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(list(params)).encode())
    return "weights:" + h.hexdigest()


def _write_parquet(path: Path, feats: np.ndarray, grads: np.ndarray, q: np.ndarray) -> None:
    """A row per example: its index, out-to-loss factor, feature (a row of
    G (G^T G + lambda I)^-1) and projected gradient (its row of G)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, p = feats.shape

    def col(a: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), p)

    rows = pa.array(np.arange(n), pa.int64())
    pq.write_table(pa.table({"row": rows, "q": q, "feature": col(feats), "grad": col(grads)}), path)


def load_features(path: Path) -> Features:
    """Cached features from their directory (META_NAME beside FEATURES_NAME)."""
    meta = json.loads((path / META_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise InfluenceError(f"{path}: features of format {meta.get('format')}, not {FORMAT}")
    meta.pop("format")
    return Features(path=path, **meta)


def _read_parquet(f: Features, column: str = "feature") -> tuple[torch.Tensor, torch.Tensor]:
    """One of the cache's vector columns (``feature`` or ``grad``) as an (n, proj_dim) tensor,
    and the out-to-loss factors."""
    import pyarrow.parquet as pq

    t = pq.read_table(f.path / FEATURES_NAME, columns=["q", column])
    col = t.column(column).combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    feats = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(len(col), f.proj_dim))
    q = torch.from_numpy(t.column("q").to_numpy().astype(np.float32))
    return feats, q


# ---------------------------------------------------------------------------------------------
# queries


def query_scores(
    subject: Subject, features: Features, targets: Sequence[Target], *, kind: str = "trak"
) -> np.ndarray:
    """Each training example's influence on the incident metric, averaged over ``targets``
    (an incident's prompt and its variants): (n,) float64, higher = training on it raised the
    metric more. The targets' gradients are projected with the features' own matrix.

    ``kind``: ``trak``, the TRAK score (the feature times the query's projected gradient,
    times the out-to-loss factor); or ``tracin``, the plain dot product of the example's and
    the query's projected gradients, with no curvature (TracIn at this checkpoint: what one
    gradient step on the example does to the metric, per unit of learning rate)."""
    if kind not in ("trak", "tracin"):
        raise InfluenceError(f"kind must be trak or tracin, got {kind!r}")
    if not targets:
        raise InfluenceError("no incident prompt to score against")
    model_params = dict(subject.model.named_parameters())
    missing = [p for p in features.params if p not in model_params]
    if missing:
        raise InfluenceError(
            f"the features were computed over parameters this model does not have "
            f"({missing[0]}, ...): compute them for this model"
        )
    cfg = InfluenceConfig(
        scope=features.scope,
        proj_dim=features.proj_dim,
        lambda_reg=features.lambda_reg,
        seed=features.seed,
        max_tokens=features.max_tokens,
    )
    rows, q = _read_parquet(features, "feature" if kind == "trak" else "grad")
    with tempfile.TemporaryDirectory(prefix="rca-trak-") as tmp, quiet_model(subject):
        tr = _traker(subject, list(features.params), cfg, features.n, Path(tmp) / "trak")
        tr.gradient_computer.load_model_params(subject.model)
        if projection_kind(features.n_params, features.proj_dim) != features.projection:
            raise InfluenceError("the features were projected another way; compute them again")
        acc = torch.zeros(features.proj_dim, dtype=torch.float32)
        bs = batch_size(features.n_params)
        for i in range(0, len(targets), bs):
            batch = query_batch(subject, targets[i : i + bs])
            g = tr.gradient_computer.compute_per_sample_grad(batch=batch)
            g = tr.projector.project(g, model_id=0) / tr.normalize_factor
            acc += g.float().sum(0).cpu()
    acc /= len(targets)
    if kind == "tracin":
        return (rows @ acc).double().numpy()
    return ((rows @ acc) * q).double().numpy()
