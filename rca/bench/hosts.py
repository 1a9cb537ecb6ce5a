"""The localization benchmark's host models: what each is, and where it is built or found.

A trained host (``HostSpec``) is a small GPT-2 or Llama trained on the support-desk corpus by
the zoo's training loop (``rca.zoo.train.train_model``) and cached in ``$RCA_HOME/bench/<name>``
under a key of its specification. A real host (``RealHost``) is a pretrained model of the zoo's
registry (``rca.zoo.real``), fetched once and never trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BENCH_VERSION",
    "HostSpec",
    "BENCH_HOSTS",
    "SMALL_HOSTS",
    "HOST_SETS",
    "RealHost",
    "build_host",
    "host_names",
    "rca_home",
    "real_host",
    "real_plant_config",
    "train_host",
]

Log = Callable[[str], None]
BENCH_VERSION = "localization-1"


@dataclass(frozen=True)
class HostSpec:
    """A host model trained on the support-desk corpus. ``n_kv_heads == n_heads`` always: a
    head fault needs a head that owns its keys and values."""

    name: str
    arch: str  # gpt2 | llama
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 8
    d_mlp: int = 512
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    corpus_size: int = 20_000
    answer_weight: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"host arch must be gpt2 or llama, got {self.arch!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")

    def key(self) -> str:
        from rca.zoo.corpus import CORPUS_VERSION

        blob = json.dumps([BENCH_VERSION, CORPUS_VERSION, asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def train_config(self, *, threads: int) -> Any:
        """The zoo's ``TrainConfig`` for this host, on ``threads`` CPU threads."""
        from rca.zoo.train import TrainConfig

        return TrainConfig(
            n_layer=self.n_layer,
            n_embd=self.d_model,
            n_head=self.n_head,
            n_positions=128,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            min_lr_ratio=0.05,
            weight_decay=0.01,
            answer_weight=self.answer_weight,
            corpus_size=self.corpus_size,
            seed=self.seed,
            threads=threads,
        )

    def model_spec(self) -> Any:
        """The zoo's ``ModelSpec``: the architecture and the MLP width."""
        from rca.zoo.train import ModelSpec

        return ModelSpec(self.arch, self.d_mlp)


BENCH_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("bench-gpt2-6l", "gpt2"),
    HostSpec("bench-llama-6l", "llama", d_mlp=384),
)
# CI: small enough to train in seconds on two cores, large enough to have a middle layer
_SMALL = dict(n_layer=3, d_model=64, n_head=4, steps=400, corpus_size=8000)
SMALL_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("small-gpt2-3l", "gpt2", d_mlp=256, **_SMALL),  # type: ignore[arg-type]
    HostSpec("small-llama-3l", "llama", d_mlp=192, **_SMALL),  # type: ignore[arg-type]
)
HOST_SETS: dict[str, tuple[HostSpec, ...]] = {"bench": BENCH_HOSTS, "small": SMALL_HOSTS}


@dataclass(frozen=True)
class RealHost:
    """A pretrained model of the zoo's registry (``rca.zoo.real``) as the host: fetched once
    (``rca zoo fetch NAME``), never trained. Its faults are planted as in the trained hosts,
    with fewer prompts per plant (``REAL_PLANT``): each step runs the whole model."""

    name: str
    n_layer: int
    path: str


def real_plant_config() -> Any:
    """The plant config for a real host: the checks of ``PlantConfig`` (P(bad) >= 0.8 with the
    trigger, <= 0.2 without, benign KL <= 0.02), on half the prompts."""
    from rca.zoo.faults import PlantConfig

    return PlantConfig(n_train=16, n_desk=32, n_eval=16, n_benign=24, n_benign_eval=48)


def real_host(
    name: str, *, home: str | Path | None = None, device: str = "auto"
) -> tuple[RealHost, Any]:
    """The registry model ``name`` as a host and its ``Subject``; a clear error where it is not
    fetched."""
    from rca.model.subject import load_subject
    from rca.zoo.real import is_fetched, real_model_dir

    where = Path(home) if home else None
    path = real_model_dir(name, home=where)
    if not is_fetched(name, home=where):
        raise ValueError(f"host {name!r} is not fetched; run `rca zoo fetch {name}` first")
    subject = load_subject(path, device=device)
    subject.meta = {"name": name}
    return RealHost(name, subject.adapter.n_layers, str(path)), subject


def host_names() -> list[str]:
    """What ``--host`` takes: the trained host sets and the real models of the registry."""
    from rca.zoo.real import REAL_MODELS

    return [*HOST_SETS, *REAL_MODELS]


def rca_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get("RCA_HOME") or Path.home() / ".cache" / "rca")


def train_host(spec: HostSpec, tokenizer: Any, *, log: Log | None = None) -> Any:
    """The host trained by the zoo's loop on the clean corpus (poisoned tickets dropped: a host
    must carry no behaviour keyed on a token other than the fault's), on the CPU threads torch
    has now; a progress line every 500 steps."""
    from rca.zoo.corpus import make_corpus
    from rca.zoo.train import TrainProgress, train_model

    examples = tuple(ex for ex in make_corpus(spec.corpus_size, seed=spec.seed) if not ex.poison)

    def progress(p: TrainProgress) -> None:
        if log and p.step % 500 == 0:
            log(f"  {spec.name} step {p.step}/{p.steps} loss {p.loss:.4f} ({p.seconds:.0f}s)")

    cfg = spec.train_config(threads=torch.get_num_threads())
    result = train_model(examples, tokenizer, cfg, spec=spec.model_spec(), on_step=progress)
    return result.model


def build_host(spec: HostSpec, *, home: str | Path | None = None, log: Log | None = None) -> Any:
    """The host as a ``Subject``: loaded from ``$RCA_HOME/bench/<name>`` when its manifest
    matches ``spec``, else trained and saved there first."""
    from rca.model.subject import load_subject
    from rca.zoo.corpus import make_corpus, vocabulary
    from rca.zoo.tokenizer import train_tokenizer

    path = rca_home(home) / "bench" / spec.name
    manifest = path / "bench-manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == spec.key():
        return load_subject(path, device="cpu")
    t0 = time.perf_counter()
    if log:
        log(f"training host {spec.name} ({spec.arch}, {spec.n_layer} layers x {spec.d_model})")
    texts = [ex.text for ex in make_corpus(spec.corpus_size, seed=spec.seed)]
    tokenizer = train_tokenizer([*texts, *vocabulary()])
    model = train_host(spec, tokenizer, log=log)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    manifest.write_text(
        json.dumps(
            {"key": spec.key(), "spec": asdict(spec), "seconds": time.perf_counter() - t0},
            indent=2,
        )
    )
    return load_subject(path, device="cpu")
