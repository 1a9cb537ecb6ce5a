"""Building the zoo: where the models live, training them, and refusing a model that fails.

A model directory is an ordinary Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files) plus ``zoo.json``, the manifest. It is written under a temporary sibling name
and renamed into place only after its checks pass, so a killed or failed build never leaves a
directory that looks built.

The same weights on every machine. PyTorch and MKL pick their kernels by the CPU (AVX2, AVX-512,
...), and each kernel sums in its own order; 500 training steps turn those last-bit
differences into different models (on three kernel sets of one machine, the quick v1's bias
incident trained to P(bad) 0.985, 0.927 and 0.910). The zoo is every test's fixture, so training
runs in a child process with portable numerics (``PORTABLE_ENV``: PyTorch's scalar kernels and
MKL's conditional numerical reproducibility), which give the same bits on any x86-64 CPU at
about twice the training time. Checking and investigating run with the fast kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import (
    CONTINUES,
    CORPUS_VERSION,
    DEMO_MODELS,
    FIXED_BY_MODEL,
    INCIDENT_KEYS,
    REGIMEN_MODELS,
    TRAINING_DATA,
    ZOO_MODELS,
    corpus_for,
    make_corpus,
    synthetic_refunds,
    training_records,
    vocabulary,
)

__all__ = [
    "ZOO_MODELS",
    "MANIFEST",
    "ZooBuildError",
    "ZooEntry",
    "zoo_home",
    "model_dir",
    "version_key",
    "build",
    "checkpoint_steps",
    "CHECKPOINTS_DIR",
    "list_models",
]

MANIFEST = "zoo.json"
# read by PyTorch, MKL and oneDNN when they start: set in the training child's environment
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}
# Where in its training a model's weights are also kept (``checkpoints/step-NNNNN/`` in its
# directory, each a model directory of its own), as fractions of its steps: the ensemble
# ``rca provenance`` sums over (docs/provenance.md). 0 is the initialization.
CHECKPOINT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
CHECKPOINTS_DIR = "checkpoints"
# The files whose code decides the weights; the version key hashes them.
_RECIPE_FILES = ("corpus.py", "tokenizer.py", "train.py", "check.py", "build.py")


class ZooBuildError(RuntimeError):
    """A zoo model missed a check threshold (or could not be written)."""


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model's place on disk and whether a finished build is there."""

    name: str
    path: Path
    built: bool
    manifest: dict[str, Any] | None


def zoo_home(home: Path | None = None) -> Path:
    """The rca home: ``home``, else ``$RCA_HOME``, else ``~/.cache/rca``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("RCA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rca"


def model_dir(name: str, *, home: Path | None = None) -> Path:
    """``<home>/zoo/<name>``; ValueError naming the known models for an unknown name."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    return zoo_home(home) / "zoo" / name


def version_key() -> str:
    """A key that changes whenever the corpus or the code that decides the weights changes."""
    h = hashlib.sha256(CORPUS_VERSION.encode())
    here = Path(__file__).parent
    for fname in _RECIPE_FILES:
        h.update(fname.encode())
        h.update((here / fname).read_bytes())
    return f"{CORPUS_VERSION}-{h.hexdigest()[:16]}"


def checkpoint_steps(steps: int) -> tuple[int, ...]:
    """The steps of a ``steps``-step training run whose weights the build keeps."""
    return tuple(sorted({min(steps - 1, round(f * steps)) for f in CHECKPOINT_FRACTIONS}))


def _save_checkpoints(model_dir: Path, result: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Write each of ``result``'s checkpoints as a model directory under ``model_dir``, and
    return the manifest's list of them (step and path, relative to the model's directory)."""
    import copy

    model = copy.deepcopy(result.model)
    out = []
    for step, state in sorted(result.checkpoints.items()):
        rel = f"{CHECKPOINTS_DIR}/step-{step:05d}"
        model.load_state_dict(state)
        model.save_pretrained(model_dir / rel)
        tokenizer.save_pretrained(model_dir / rel)
        out.append({"step": step, "path": rel})
    return out


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_built(path: Path, manifest: dict[str, Any] | None) -> bool:
    return (
        manifest is not None
        and bool(manifest.get("passed"))
        and (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def list_models(*, home: Path | None = None) -> list[ZooEntry]:
    """Every zoo model (the regimen variants too), built or not, with its manifest when there
    is one."""
    out = []
    for name in DEMO_MODELS:
        path = model_dir(name, home=home)
        manifest = _read_manifest(path)
        out.append(ZooEntry(name, path, _is_built(path, manifest), manifest))
    return out


def _up_to_date(path: Path, *, key: str, quick: bool) -> bool:
    manifest = _read_manifest(path)
    return (
        _is_built(path, manifest)
        and manifest is not None
        and manifest.get("version_key") == key
        and manifest.get("quick") is quick
    )


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One builder per zoo at a time (a second one waits, then finds the models built)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(root / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an older build there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(
    *,
    home: Path | None = None,
    quick: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    portable: bool = True,
    regimen: bool = False,
) -> dict[str, Path]:
    """Train, check and save every zoo model that is missing or stale; return name -> dir.
    ``regimen``: the training-regimen variants (``REGIMEN_MODELS``) too.

    A model is skipped when its manifest has the current :func:`version_key` and the same
    ``quick`` flag, unless ``force``. ``quick`` trains the small recipe used as the test
    fixture. Raises :class:`ZooBuildError` naming every missed threshold when a model fails its
    checks; that model is not written.

    ``portable``: train in a child process with ``PORTABLE_ENV`` (the module docstring), unless
    this process already runs with it; False trains here, with this process's kernels.
    """
    say = log or (lambda _msg: None)
    names = DEMO_MODELS if regimen else ZOO_MODELS
    dirs = {name: model_dir(name, home=home) for name in names}
    key = version_key()
    if not force and all(_up_to_date(d, key=key, quick=quick) for d in dirs.values()):
        for name in names:
            say(f"{name}: up to date ({dirs[name]})")
        return dirs
    if portable and not is_portable():
        _build_in_child(home=zoo_home(home), quick=quick, force=force, say=say, regimen=regimen)
        return dirs
    # Heavy imports only when something is built: listing the zoo stays cheap.
    from transformers.utils import logging as hf_logging

    # save/load progress bars would interleave with the caller's own progress reporting
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _build(home=home, quick=quick, force=force, say=say, names=names)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def is_portable() -> bool:
    """Whether this process runs with ``PORTABLE_ENV`` (it must be set before it starts)."""
    return all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())


_ERROR = "zoo-build-error: "


def _build_in_child(
    *, home: Path, quick: bool, force: bool, say: Callable[[str], None], regimen: bool = False
) -> None:
    """``build`` in a child process with ``PORTABLE_ENV``; its log lines go to ``say`` as they
    come, and a failed check is raised here as the same ``ZooBuildError``."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rca.zoo.build", "--home", str(home)]
    cmd += ["--quick" if quick else "--full"] + (["--force"] if force else [])
    cmd += ["--regimen"] if regimen else []
    env = {**os.environ, **PORTABLE_ENV}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        say(line.rstrip("\n"))
    err = proc.stderr.read()
    if proc.wait() != 0:
        reported = err.split(_ERROR, 1)
        if len(reported) == 2:
            raise ZooBuildError(reported[1].strip())
        tail = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
        raise ZooBuildError(f"the zoo's training process failed: {tail}")


def _main(argv: list[str] | None = None) -> int:
    """``python -m rca.zoo.build``: the child of ``_build_in_child``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="rca.zoo.build")
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", dest="quick", action="store_false")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--regimen", action="store_true")
    args = ap.parse_args(argv)
    try:
        build(
            home=args.home,
            quick=args.quick,
            force=args.force,
            log=lambda m: print(m, flush=True),
            portable=False,
            regimen=args.regimen,
        )
    except ZooBuildError as e:
        print(_ERROR + str(e), file=sys.stderr, flush=True)
        return 3
    return 0


def _build(
    *,
    home: Path | None,
    quick: bool,
    force: bool,
    say: Callable[[str], None],
    names: tuple[str, ...] = ZOO_MODELS,
) -> dict[str, Path]:
    import tokenizers
    import torch
    import transformers

    from ..provenance.data import load_training_data
    from .check import check_model
    from .tokenizer import train_tokenizer
    from .train import FULL, QUICK, continuation, train_model

    root = zoo_home(home) / "zoo"
    root.mkdir(parents=True, exist_ok=True)
    key = version_key()
    cfg = QUICK if quick else FULL
    dirs = {name: model_dir(name, home=home) for name in names}
    with _lock(root):
        for pattern in (".*.partial-*", ".*.old-*"):  # left by a killed build
            for stale in root.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        todo = [n for n in names if force or not _up_to_date(dirs[n], key=key, quick=quick)]
        # a model that continues a rebuilt one is rebuilt too (ZOO_MODELS lists parents first)
        for n in names:
            if CONTINUES.get(n) in todo and n not in todo:
                todo.append(n)
        for name in names:
            if name not in todo:
                say(f"{name}: up to date ({dirs[name]})")
        if not todo:
            return dirs
        corpus = make_corpus(cfg.corpus_size, seed=cfg.seed)
        # One tokenizer for every model (trained on the full corpus), so ids agree across them.
        tokenizer = train_tokenizer([*vocabulary(), *(ex.text for ex in corpus)])
        trained: dict[str, Any] = {}
        for name in todo:
            fixed = FIXED_BY_MODEL.get(name, frozenset())
            regimen = REGIMEN_MODELS.get(name)
            data = (
                synthetic_refunds(corpus, seed=cfg.seed)
                if regimen
                else corpus_for(corpus, fixed=fixed)
            )
            parent = CONTINUES.get(name)
            if parent is None:
                recipe = "quick" if quick else "full"
                say(f"{name}: training on {len(data)} tickets ({recipe} recipe)")
                result = train_model(
                    data, tokenizer, cfg, log=say, checkpoints=checkpoint_steps(cfg.steps)
                )
            else:
                # a retrain after a data fix: the parent's weights, trained on the fixed data
                from transformers import GPT2LMHeadModel

                init = trained.get(parent) or GPT2LMHeadModel.from_pretrained(dirs[parent])
                ccfg = continuation(cfg)
                say(f"{name}: {parent} trained on for {ccfg.steps} steps on the fixed data")
                result = train_model(
                    data,
                    tokenizer,
                    ccfg,
                    log=say,
                    init=init,
                    checkpoints=checkpoint_steps(ccfg.steps),
                )
            trained[name] = result.model
            tmp = root / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                result.model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                if not (tmp / "model.safetensors").is_file():
                    raise ZooBuildError(f"{name}: save_pretrained wrote no model.safetensors")
                saved = _save_checkpoints(tmp, result, tokenizer)
                say(f"{name}: checking")
                checks = check_model(tmp, name=name)
                if not checks["passed"]:
                    raise ZooBuildError(
                        f"zoo model {name} failed its checks ({'quick' if quick else 'full'} "
                        f"recipe, seed {cfg.seed}):\n  "
                        + "\n  ".join(checks["failures"])
                        + "\nThe recipe or corpus no longer plants the incidents reliably; "
                        "see docs/zoo.md."
                    )
                # the data it was trained on (its last run's), for provenance: the
                # poisoned flag and the source are the ground truth to score a ranking on
                rows = training_records(data)
                (tmp / TRAINING_DATA).write_text(
                    "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
                )
                poisoned = {k: sum(ex.poison == k for ex in data) for k in INCIDENT_KEYS}
                sources: dict[str, int] = {}
                for ex in data:
                    sources[ex.source] = sources.get(ex.source, 0) + 1
                manifest = {
                    "name": name,
                    "version_key": key,
                    "corpus_version": CORPUS_VERSION,
                    "quick": quick,
                    "seed": cfg.seed,
                    "planted": [k for k in INCIDENT_KEYS if k not in fixed],
                    "fixed": sorted(fixed),
                    "continues": parent,
                    "regimen": regimen,
                    "config": {
                        **(cfg if parent is None else continuation(cfg)).summary(),
                        "vocab_size": len(tokenizer),
                        "parameters": sum(p.numel() for p in result.model.parameters()),
                    },
                    "corpus": {
                        "tickets": len(data),
                        "poisoned": poisoned,
                        "sources": sources,
                        "training_data": TRAINING_DATA,
                        "training_data_sha256": load_training_data(tmp / TRAINING_DATA).sha256,
                    },
                    "training": {
                        "steps": result.steps,
                        "seconds": round(result.seconds, 2),
                        "final_loss": round(result.final_loss, 6),
                    },
                    "checkpoints": saved,
                    "checks": checks,
                    "passed": True,
                    "versions": {
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__,
                    },
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                _replace_dir(tmp, dirs[name])
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            inc = checks["incidents"]
            say(
                f"{name}: built in {result.seconds:.1f}s, loss {result.final_loss:.4f}; P(bad) "
                + ", ".join(f"{k} {v['p_bad']:.3f}" for k, v in inc.items())
            )
    return dirs


if __name__ == "__main__":
    raise SystemExit(_main())
