"""The model under investigation: loading, fingerprinting, and the architecture adapter.

A ``Subject`` is a Hugging Face causal LM, its tokenizer, and an ``Adapter`` that says where each
layer's attention heads, MLP, neurons and residual stream live in the *real* modules. rca never
re-implements a model: every later stage reads and edits activations through hooks on these
modules (see ``rca.hooks``).

Loading is local and safe by construction: a directory, safetensors only, ``trust_remote_code``
never set, and a config that asks for custom code (``auto_map``) is refused. Every model file
must be a regular file (or a symlink to one), and a config.json whose model would not be the
size of the weights in the safetensors headers is refused before any model is built. A GGUF
file is converted once into such a directory (``rca.gguf``) and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rca.paths import PathError, read_bounded_json

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "ArchSpec",
    "Subject",
    "SubjectError",
    "fingerprint",
    "load_subject",
    "module_at",
    "weight_of",
    "as_out_in",
    "out_in_weight",
    "in_features",
    "out_features",
    "read_source",
    "resolve_device",
    "resolve_model_ref",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
CONFIG_FILES = ("config.json", "generation_config.json")
# Where a directory came from (a converted GGUF: its file, sha256 and quantization); hashed into
# the fingerprint where present.
SOURCE_MANIFEST = "rca-source.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SubjectError(ValueError):
    """A model directory that rca cannot or will not load; the message says why and the fix."""


MAX_JSON_BYTES = 16 << 20  # a config, tokenizer config, source manifest or shard index


def _read_json(p: Path) -> Any:
    """A model directory's JSON file, read with a size bound and a nesting bound
    (``rca.paths.read_bounded_json``); one-line SubjectError otherwise."""
    try:
        return read_bounded_json(p, what=p.name, max_bytes=MAX_JSON_BYTES, max_depth=64)
    except PathError as e:
        raise SubjectError(f"{str(p)!r} {e.problem}") from None


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its parts, as dotted paths into the HF module tree.

    ``layers`` and the top-level paths are relative to the causal-LM root; the per-layer
    paths are relative to one decoder layer.
    """

    layers: str  # the ModuleList of decoder layers
    embed: str  # token embedding (nn.Embedding)
    final_norm: str
    unembed: str
    attn_out: str  # attention output projection; its input is the heads' outputs concatenated
    mlp: str  # the MLP block; its output is the MLP output
    mlp_down: str  # MLP down projection; its input is the neuron activations
    attn_norm: str  # the norm whose input is the residual stream the attention reads
    mlp_norm: str  # the norm whose input is the residual stream the MLP reads
    parallel: bool = False  # attention and MLP read the same layer input (no attn -> MLP path)
    # the projections that read the attention norm's output, and how their output features
    # split into heads: "split" (one module each for q, k, v, head-major), "gpt2" (one fused
    # module, [q | k | v]), "neox" (one fused module, per head [q_h | k_h | v_h]), "fused"
    # (Phi-3: one module, [q | k | v] with the key/value heads' widths)
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: str = "split"
    note: str = ""


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)

# One entry per architecture (config.model_type). Adding one is one line plus a test config
# in tests/unit/test_architectures.py.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn_out="attn.c_proj",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        qkv=("attn.c_attn",),
        qkv_layout="gpt2",
        note="Conv1D projections: weight is [in, out]",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn_out="attention.dense",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        parallel=True,
        qkv=("attention.query_key_value",),
        qkv_layout="neox",
        note="parallel residual by default: attention and MLP both read the layer input",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": ArchSpec(
        **{
            **_LLAMA_LIKE.__dict__,
            "mlp_norm": "pre_feedforward_layernorm",
            "note": "attention and MLP outputs pass a norm before the add",
        }
    ),
    "phi": ArchSpec(
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.final_layernorm",
        unembed="lm_head",
        attn_out="self_attn.dense",
        mlp="mlp",
        mlp_down="mlp.fc2",
        attn_norm="input_layernorm",
        mlp_norm="input_layernorm",
        parallel=True,
        note="parallel attention and MLP on one layer norm",
    ),
    "phi3": ArchSpec(
        **{**_LLAMA_LIKE.__dict__, "qkv": ("self_attn.qkv_proj",), "qkv_layout": "fused"}
    ),
}


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at the dotted attribute ``path`` under ``root``; a SubjectError naming the
    missing part where there is none."""
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise SubjectError(f"module path {path!r} not found (missing {part!r})")
        mod = getattr(mod, part)
    return mod


def _find(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` under ``root``, or None where it has none."""
    mod: nn.Module | None = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def weight_of(mod: nn.Module) -> torch.Tensor:
    """A module's weight tensor, as stored (GPT-2's Conv1D keeps [in, out], nn.Linear
    [out, in]); a SubjectError where it has none."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise SubjectError(f"{type(mod).__name__} has no weight tensor")
    return w


def _stores_in_out(mod: nn.Module) -> bool:
    """Whether ``mod`` keeps its weight as [in, out], a row per input unit: GPT-2's Conv1D and
    nn.Embedding (a row per token). nn.Linear and the rest keep [out, in]."""
    return type(mod).__name__ == "Conv1D" or isinstance(mod, nn.Embedding)


def as_out_in(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t``, a tensor laid out as ``mod``'s weight is stored (the weight, a mask, a delta),
    as a view (out_features, in_features): transposed where the module stores [in, out]."""
    return t.T if _stores_in_out(mod) else t


def out_in_weight(mod: nn.Module) -> torch.Tensor:
    """A module's weight as (out_features, in_features), a view of the stored tensor (writes go
    through), so that ``x @ out_in_weight(mod).T`` is the module's output without its bias, for
    a Conv1D or nn.Linear as for an nn.Embedding on one-hot rows."""
    return as_out_in(mod, weight_of(mod))


def in_features(mod: nn.Module) -> int:
    """The input width of a projection (for an embedding: its number of rows)."""
    return int(out_in_weight(mod).shape[1])


def out_features(mod: nn.Module) -> int:
    """The output width of a projection (for an embedding: its width)."""
    return int(out_in_weight(mod).shape[0])


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


class Adapter:
    """The real modules of one loaded model, by role, with its dimensions.

    Per layer: ``attn_out(L)`` (input = heads concatenated, (batch, pos, n_heads * d_head)),
    ``mlp(L)`` (output = MLP output, (batch, pos, d_model)), ``mlp_down(L)`` (input = neurons,
    (batch, pos, d_mlp)), and ``layer(L)`` (input/output = residual stream before/after).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, model_type: str) -> None:
        self.model = model
        self.spec = spec
        self.model_type = model_type
        self.layers: list[nn.Module] = list(module_at(model, spec.layers).children())
        self.embed = module_at(model, spec.embed)
        self.final_norm = module_at(model, spec.final_norm)
        self.unembed = module_at(model, spec.unembed)
        self._attn_out = [module_at(layer, spec.attn_out) for layer in self.layers]
        self._mlp = [module_at(layer, spec.mlp) for layer in self.layers]
        self._mlp_down = [module_at(layer, spec.mlp_down) for layer in self.layers]
        self._attn_norm = [module_at(layer, spec.attn_norm) for layer in self.layers]
        self._mlp_norm = [module_at(layer, spec.mlp_norm) for layer in self.layers]
        self._qkv = [
            [m for m in (_find(layer, p) for p in spec.qkv) if m is not None]
            for layer in self.layers
        ]
        cfg = model.config  # type: ignore[union-attr]
        self.n_layers = len(self.layers)
        self.n_heads = int(_cfg(cfg, "num_attention_heads", "n_head"))
        self.n_kv_heads = int(_cfg(cfg, "num_key_value_heads", default=self.n_heads))
        width = in_features(self._attn_out[0])
        if width % self.n_heads:
            raise SubjectError(
                f"attention output width {width} is not divisible by {self.n_heads} heads"
            )
        # read from the module, not hidden_size // n_heads: Gemma's head_dim differs
        self.d_head = width // self.n_heads
        self.d_model = int(weight_of(self.embed).shape[1])
        self.d_mlp = in_features(self._mlp_down[0])
        self.vocab_size = int(weight_of(self.embed).shape[0])
        self.n_ctx = _cfg(cfg, "max_position_embeddings", "n_positions")
        # GPT-NeoX makes the parallel residual a config choice
        self.parallel = bool(_cfg(cfg, "use_parallel_residual", default=spec.parallel))

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def attn_out(self, i: int) -> nn.Module:
        return self._attn_out[i]

    def mlp(self, i: int) -> nn.Module:
        return self._mlp[i]

    def mlp_down(self, i: int) -> nn.Module:
        return self._mlp_down[i]

    def attn_norm(self, i: int) -> nn.Module:
        """The norm in front of layer i's attention: its input is what the attention reads."""
        return self._attn_norm[i]

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm in front of layer i's MLP: its input is what the MLP reads."""
        return self._mlp_norm[i]

    def head_out_weight(self, layer: int, head: int) -> torch.Tensor:
        """The slice of the output projection that head ``head`` writes through: (d_head, out)."""
        proj = self._attn_out[layer]
        sl = slice(head * self.d_head, (head + 1) * self.d_head)
        return out_in_weight(proj)[:, sl].T

    def head_result(self, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
        """What head ``head`` adds to the projection's output, bias excluded.

        ``z``: (..., d_head), the head's slice of the projection input -> (..., out).
        """
        return z @ self.head_out_weight(layer, head).to(z.dtype)

    def head_writes(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Every head's write through the output projection, bias excluded.

        ``z``: (..., n_heads * d_head), the projection's input -> (n_heads, ..., out). Each head
        is its slice times its rows of the weight; where the weights are offloaded (accelerate's
        meta placeholders), the projection module itself is called on masked inputs, so that
        its offload hooks bring the weights in.
        """
        proj = self._attn_out[layer]
        H, dh = self.n_heads, self.d_head
        w = weight_of(proj)
        if w.device.type != "meta":
            # each head's slice times its rows of the weight: (H, ..., dh) @ (H, dh, out)
            w_in_out = out_in_weight(proj).T  # (H * dh, out)
            zh = z.reshape(-1, H, dh).transpose(0, 1)  # (H, n, dh)
            out = torch.bmm(zh, w_in_out.reshape(H, dh, -1).to(z.dtype))
            return out.reshape(H, *z.shape[:-1], -1)
        mask = torch.zeros(H, H * dh, device=z.device, dtype=z.dtype)
        for h in range(H):
            mask[h, h * dh : (h + 1) * dh] = 1
        zm = z.unsqueeze(0) * mask.view(H, *([1] * (z.dim() - 1)), H * dh)
        out = proj(zm.reshape(-1, H * dh)).reshape(H, *z.shape[:-1], -1)
        bias = proj(torch.zeros(1, H * dh, device=z.device, dtype=z.dtype))
        return out - bias

    def head_reads(self, layer: int) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]] | None:
        """How each head of layer ``layer`` reads the attention norm's output.

        One entry per projection that reads it (q, k, v or a fused one): ``(module, W, cols)``
        with ``W`` its weight as (out_features, in_features) and ``cols`` (n_heads, c) the
        output features head h alone reads, so that head h's share of the gradient at the
        projections' common input is ``sum grad_out[..., cols[h]] @ W[cols[h]]``. None where
        heads share features (grouped-query attention shares keys and values), where the
        layout is not known, or where weights are offloaded (not materialised on a device).
        """
        mods = self._qkv[layer]
        if self.n_kv_heads != self.n_heads or not mods or len(mods) != len(self.spec.qkv):
            return None
        H, dh = self.n_heads, self.d_head
        head = torch.arange(H).view(H, 1) * dh + torch.arange(dh).view(1, dh)  # (H, dh)
        layout = self.spec.qkv_layout
        if layout == "split":
            cols = [head] * len(mods)
        elif layout in ("gpt2", "fused"):  # [q | k | v], each n_heads * d_head wide here
            cols = [torch.cat([head + i * H * dh for i in range(3)], dim=1)]
        elif layout == "neox":  # per head [q_h | k_h | v_h]
            cols = [torch.arange(H).view(H, 1) * 3 * dh + torch.arange(3 * dh).view(1, -1)]
        else:
            return None
        out = []
        for mod, c in zip(mods, cols, strict=True):
            w = weight_of(mod)
            if w.device.type == "meta":
                return None
            w = out_in_weight(mod)  # (out_features, in_features)
            if w.shape[0] != int(c.max()) + 1:
                return None  # a width this layout does not explain: use the general path
            out.append((mod, w, c.to(w.device)))
        return out

    def attn_out_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self._attn_out[layer], "bias", None)

    def dims(self) -> dict[str, int]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
        }


@dataclass
class Subject:
    """A loaded model with its tokenizer, adapter, provenance and device."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    path: Path | None = None
    fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        # the input device: with an accelerate device_map, where the embeddings live
        return weight_of(self.adapter.embed).device

    @property
    def dtype(self) -> torch.dtype:
        return weight_of(self.adapter.embed).dtype

    @property
    def architecture(self) -> str:
        return self.adapter.model_type

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None) -> Subject:
        """Wrap an in-memory model (tests, fault injection). No fingerprint: nothing on disk."""
        model_type = getattr(model.config, "model_type", None)  # type: ignore[union-attr]
        return cls(model.eval(), tokenizer, adapter_for(model, model_type))


def adapter_for(model: nn.Module, model_type: str | None) -> Adapter:
    if model_type not in ARCHITECTURES:
        raise SubjectError(
            f"architecture {model_type!r} is not supported; rca knows "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec entry in rca/subject.py"
        )
    return Adapter(model, ARCHITECTURES[model_type], model_type)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SubjectError(f"device {device!r} asked for but CUDA is not available; use 'cpu'")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise SubjectError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SubjectError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_model_ref(ref: str, *, base: Path | None = None, home: Path | None = None) -> Path:
    """A case file's ``model``: ``zoo:NAME``, a directory path, or a ``.gguf`` file path.

    ``zoo:NAME`` is a demo model under RCA_HOME, or a real pretrained model fetched there
    (``rca.zoo.real.REAL_MODELS``). A ``.gguf`` path stays the file's path: ``load_subject``
    converts it. A relative path resolves against ``base`` (the case file's directory), else
    the cwd.
    """
    if ref.startswith("zoo:"):
        from rca import zoo
        from rca.zoo import real

        name = ref[4:]
        if name in real.REAL_MODELS:
            return real.real_model_dir(name, home=home)
        if name not in zoo.ZOO_MODELS:
            known = [*zoo.ZOO_MODELS, *real.REAL_MODELS]
            raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(known)}")
        return zoo.model_dir(name, home=home)  # type: ignore[attr-defined]
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


def _refuse_irregular(p: Path) -> None:
    """Refuse ``p`` unless it is a regular file or a symlink to one (which may point anywhere).

    A directory, a FIFO, a socket, a device or a dangling symlink under a model file's name is
    refused here, before anything opens it: hashing a directory fails, and reading a FIFO blocks.
    """
    try:
        mode = os.stat(p).st_mode  # follows symlinks; never opens, so a FIFO does not block
    except FileNotFoundError:
        target = os.readlink(p) if p.is_symlink() else None
        raise SubjectError(
            f"{str(p)!r} is a symlink to {target!r}, which does not exist; restore the file or "
            "remove the link"
            if target is not None
            else f"{str(p)!r} vanished while rca read the model directory"
        ) from None
    except OSError as e:  # a symlink loop, a denied permission
        raise SubjectError(f"{str(p)!r} cannot be read: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
    what = next((w for test, w in kinds.items() if test(mode)), "a device")
    raise SubjectError(
        f"{str(p)!r} is {what}, not a regular file; rca reads weight, config and tokenizer "
        "files only as regular files or symlinks to them: remove or replace it"
    )


def _model_files(path: Path) -> list[Path]:
    """The files of a model directory that rca or transformers read, in name order: weights
    (safetensors and pickle), the safetensors index, config, tokenizer and the source manifest.

    Each is checked to be a regular file or a symlink to one (``_refuse_irregular``).
    """
    named = {*CONFIG_FILES, *TOKENIZER_FILES, SOURCE_MANIFEST}
    files = [
        p
        for p in path.iterdir()
        if p.name in named
        or p.name.endswith((".safetensors", ".safetensors.index.json"))
        or p.suffix in PICKLE_SUFFIXES
    ]
    for p in files:
        _refuse_irregular(p)
    return sorted(files, key=lambda p: p.name)


def _weight_files(path: Path) -> tuple[list[Path], list[Path]]:
    files = _model_files(path)
    safes = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    return safes, pickles


def fingerprint(path: str | Path) -> str:
    """sha256 over the weight files, the config and the tokenizer files of a model directory.

    Each file contributes its name, its size and its content hash, in name order, so renaming,
    truncating or editing any of them changes the fingerprint. A directory, FIFO or dangling
    symlink under one of these names is a ``SubjectError`` naming it.
    """
    outer = hashlib.sha256(b"rca-fingerprint-v1\0")
    for p in _model_files(Path(path)):
        inner = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        outer.update(inner.digest())
    return outer.hexdigest()


def read_source(path: str | Path) -> dict[str, Any] | None:
    """The ``rca-source.json`` manifest of a model directory, or None where it has none."""
    p = Path(path) / SOURCE_MANIFEST
    if not p.is_file():
        return None
    data = _read_json(p)
    if not isinstance(data, dict):
        raise SubjectError(f"{str(p)!r} must hold a JSON object")
    return data


def _is_gguf(path: Path) -> bool:
    """A ``.gguf`` path that is not a directory, or any file that starts as a GGUF does."""
    if path.is_dir():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # unreadable: _check_dir says the path is not a model directory
        return False


def _check_dir(path: Path, *, allow_pickle: bool) -> dict[str, Any]:
    if not path.exists():
        raise SubjectError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise SubjectError(f"model path {str(path)!r} is not a directory of HF model files")
    _model_files(path)  # a directory or FIFO under a model file's name: refused by name
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SubjectError(f"{str(path)!r} has no config.json; save the model with save_pretrained")
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise SubjectError(f"{str(cfg_path)!r} must hold a JSON object")
    if "auto_map" in cfg:
        raise SubjectError(
            f"{str(path)!r} needs custom model code (config.json has auto_map); rca never sets "
            "trust_remote_code. Use a model whose architecture transformers ships"
        )
    if cfg.get("model_type") not in ARCHITECTURES:
        raise SubjectError(
            f"architecture {cfg.get('model_type')!r} in {str(cfg_path)!r} is not supported; "
            f"rca knows {', '.join(sorted(ARCHITECTURES))}"
        )
    safes, pickles = _weight_files(path)
    if not safes:
        if pickles and not allow_pickle:
            raise SubjectError(
                f"{str(path)!r} holds only pickle weights ({pickles[0].name}); pickle can run "
                "code on load. Convert to safetensors, or pass --allow-pickle if you trust it"
            )
        if not pickles:
            raise SubjectError(f"{str(path)!r} has no *.safetensors weight files")
        warnings.warn(f"loading pickle weights from {path} (allow_pickle=True)", stacklevel=3)
    tcfg_path = path / "tokenizer_config.json"
    if tcfg_path.is_file():
        tcfg = _read_json(tcfg_path)
        if isinstance(tcfg, dict) and "auto_map" in tcfg:
            raise SubjectError(
                f"{str(path)!r} needs custom tokenizer code (tokenizer_config.json has auto_map); "
                "rca never sets trust_remote_code"
            )
    if not (path / "tokenizer.json").is_file() and not tcfg_path.is_file():
        raise SubjectError(
            f"{str(path)!r} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
            "save the tokenizer beside the model with save_pretrained"
        )
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``, as saved.

    A plain ``tokenizer.json`` saved from a ``PreTrainedTokenizerFast`` (declared class
    ``PreTrainedTokenizerFast`` or ``TokenizersBackend``) is loaded with that class directly:
    ``AutoTokenizer`` would otherwise pick the architecture's own tokenizer class (Qwen2's
    ignores tokenizer.json) and encode silently differently.
    """
    import transformers
    from transformers import AutoTokenizer

    declared = None
    tcfg = path / "tokenizer_config.json"
    if tcfg.is_file():
        data = _read_json(tcfg)
        declared = data.get("tokenizer_class") if isinstance(data, dict) else None
    if (path / "tokenizer.json").is_file() and declared in (
        None,
        "PreTrainedTokenizerFast",
        "TokenizersBackend",
    ):
        cls = (
            getattr(transformers, "TokenizersBackend", None) or transformers.PreTrainedTokenizerFast
        )
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


# safetensors' own bound on the JSON header
_MAX_HEADER = 100_000_000
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


def _header_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read from its header only.

    The format: an 8-byte little-endian length n, n bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``, then the data. A
    header that does not parse is a one-line ``SubjectError`` naming the file.
    """
    shown, fix = repr(str(f)), "the file is truncated or corrupt; re-save or re-copy the model"
    size = f.stat().st_size
    with open(f, "rb") as h:
        head = h.read(8)
        if len(head) < 8:
            raise SubjectError(
                f"{shown} is {size} bytes, too short for a safetensors header; {fix}"
            )
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise SubjectError(
                f"{shown}: the safetensors header length ({n:,} bytes) runs past the end of the "
                f"file ({size:,} bytes); {fix}"
            )
        if n > _MAX_HEADER:
            raise SubjectError(
                f"{shown}: the safetensors header length ({n:,} bytes) is over safetensors' "
                f"limit of {_MAX_HEADER:,}; {fix}"
            )
        raw = h.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise SubjectError(
            f"{shown}: the safetensors header is not JSON ({_first_line(e)}); {fix}"
        ) from e
    if not isinstance(header, dict):
        raise SubjectError(f"{shown}: the safetensors header is not a JSON object; {fix}")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        # type() is int, not isinstance: a JSON true is not a dimension
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SubjectError(f"{shown}: tensor {name!r} in the header has no valid shape; {fix}")
        shapes[name] = tuple(shape)
    return shapes


def _loaded_safetensors(path: Path) -> list[Path]:
    """The safetensors files transformers loads from ``path``: ``model.safetensors``, else the
    shards ``model.safetensors.index.json`` names; [] when neither is there (the loader then
    says so). Other ``*.safetensors`` files (e.g. ``consolidated.safetensors``) are not read."""
    if (path / _SINGLE).exists():
        return [path / _SINGLE]
    index = path / _INDEX
    if not index.exists():
        return []
    data = _read_json(index)
    if not isinstance(data, dict):
        raise SubjectError(f"{str(index)!r} is not a JSON object")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SubjectError(f"{str(index)!r} has no weight_map of tensor names to shard files")
    shards = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or name in (".", ".."):
            raise SubjectError(
                f"{str(index)!r} names the shard {name!r}, which is not a file name in the "
                "model directory"
            )
        shard = path / name
        if not os.path.lexists(shard):
            raise SubjectError(f"{str(index)!r} names the shard {name!r}, which is missing")
        _refuse_irregular(shard)
        shards.append(shard)
    return shards


def _ignored_on_load(meta: nn.Module) -> Callable[[str], bool]:
    """Whether a checkpoint tensor name is one the loader drops without a report: not one of
    the model's own tensors, and one of its buffers (GPT-2's causal mask, a rotary inv_freq)
    or a key its class declares ignorable. Names may lack the base model's prefix."""
    prefix = getattr(meta, "base_model_prefix", "")
    own = set(meta.state_dict())
    buffers = {k for k, _ in meta.named_buffers()}
    patterns = getattr(meta, "_keys_to_ignore_on_load_unexpected", None) or ()

    def ignored(name: str) -> bool:
        keys = {name, f"{prefix}.{name}"}
        if keys & own:
            return False
        return bool(keys & buffers) or any(re.search(pat, name) for pat in patterns)

    return ignored


def _check_weights_fit_config(path: Path, files: list[Path]) -> str:
    """Refuse a config.json whose model would not be the size of the weights, before it is built.

    The config's model is built on the meta device (no memory) and its parameter count compared
    with the sum of the tensor shapes in the safetensors headers (no tensor is read). A tied
    lm_head may be stored or left out, so each tied duplicate may or may not count; buffers and
    keys the loader ignores never count. Returns the tensors whose shapes differ, by name, for
    the loader's error ("" when none). A quantized checkpoint (``quantization_config``) stores
    packed tensors; its count is left to the loader.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not files:
        return ""
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for f in files:
        for name, shape in _header_shapes(f).items():
            shapes[name], where[name] = shape, f.name
    cfg_path = path / "config.json"
    cfg_json = _read_json(cfg_path)
    if "quantization_config" in cfg_json:
        return ""
    # a meta build still makes one module per layer: bound the layers by the tensors first
    layers = next(
        (
            v
            for k in ("num_hidden_layers", "n_layer", "num_layers")
            if type(v := cfg_json.get(k)) is int
        ),
        0,
    )
    if layers > len(shapes):
        raise SubjectError(
            f"{str(path)!r}: config.json does not match the weights: it asks for {layers:,} "
            f"layers, and the safetensors headers hold {len(shapes):,} tensors in all; the "
            "weights belong to another model, or the config was edited"
        )
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a config it cannot build
        raise SubjectError(
            f"{str(cfg_path)!r} does not describe a model transformers can build: {_first_line(e)}"
        ) from e
    want = sum(p.numel() for p in meta.parameters())  # each tied tensor once
    allowed = {want}
    seen: set[int] = set()
    for _, p in meta.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied duplicate (lm_head): stored or not, both load
            allowed |= {a + p.numel() for a in allowed}
        seen.add(id(p))
    ignored = _ignored_on_load(meta)
    got = sum(math.prod(shape) for name, shape in shapes.items() if not ignored(name))
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    diffs = [
        f"{k} is {list(v)} in {where[k]}, config.json makes {list(expected[k])}"
        for k, v in shapes.items()
        if k in expected and expected[k] != v
    ]
    shown = _listed(diffs)
    if got in allowed:
        return shown
    if not diffs:  # name the tensors that are missing or extra, where they explain the gap
        prefix = getattr(meta, "base_model_prefix", "")
        stored = set(shapes) | {f"{prefix}.{k}" for k in shapes}
        absent = {k: p.numel() for k, p in meta.named_parameters() if k not in stored}
        extra = {
            k: math.prod(v)
            for k, v in shapes.items()
            if not {k, f"{prefix}.{k}"} & expected.keys() and not ignored(k)
        }
        if absent and sum(absent.values()) == want - got:
            shown = f"missing from the weight files: {_listed(sorted(absent), sep=', ')}"
        elif extra and got - sum(extra.values()) in allowed:
            shown = f"not tensors of this model: {_listed(sorted(extra), sep=', ')}"
    raise SubjectError(
        f"{str(path)!r}: config.json does not match the weights: it implies {want:,} "
        f"parameters, and the safetensors headers hold {got:,}"
        + (f" ({shown})" if shown else "")
        + "; the weights belong to another model, or the config was edited"
    )


def _listed(items: list[str], *, sep: str = "; ", n: int = 2) -> str:
    """The first ``n`` items joined, with " ..." where there are more."""
    return sep.join(items[:n]) + (" ..." if len(items) > n else "")


def load_subject(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "eager",
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
    allow_pickle: bool = False,
    gguf_file: str | None = None,
    home: Path | None = None,
) -> Subject:
    """Load a causal LM and its tokenizer from a local directory or a GGUF file.

    ``device='auto'`` picks CUDA when present; fp32 is the default because attribution sums many
    small terms. ``eager`` attention keeps attention patterns available to hooks (``sdpa``
    silently drops ``output_attentions``). ``device_map`` is passed to accelerate as is
    (e.g. ``"auto"`` or a dict with ``"cpu"``/``"disk"`` entries, ``"disk"`` needing
    ``offload_folder``) and then ``device`` is ignored.

    A GGUF file (``path`` itself, or ``path / gguf_file``) is checked from its header,
    de-quantized to float32 once and cached under ``<home>/gguf/<sha256>`` (``home`` defaults
    to RCA_HOME); the cached directory is what loads. ``meta["source"]`` then holds its
    ``rca-source.json`` (the file, its sha256 and quantization), which the fingerprint covers.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if gguf_file is not None:
        if not path.is_dir():
            raise SubjectError(
                f"gguf_file={gguf_file!r} names a file inside a model directory, and "
                f"{str(path)!r} is not a directory; pass the GGUF file's own path instead"
            )
        path = path / gguf_file
    if gguf_file is not None or _is_gguf(path):
        from rca.gguf import gguf_model_dir

        path = gguf_model_dir(path, home=home)
    _check_dir(path, allow_pickle=allow_pickle)
    source = read_source(path)
    safes, _ = _weight_files(path)
    shapes = _check_weights_fit_config(path, _loaded_safetensors(path)) if safes else ""
    torch_dtype = _resolve_dtype(dtype)
    kwargs: dict[str, Any] = dict(
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=bool(safes),
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        tokenizer = _load_tokenizer(path)
    except Exception as e:  # tokenizers raise many types; all mean the same to the user
        raise SubjectError(f"cannot load the tokenizer from {str(path)!r}: {_first_line(e)}") from e
    model: Any
    info: Any
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        model, info = loaded
    except Exception as e:
        if shapes:
            raise SubjectError(
                f"{str(path)!r}: the weight files do not match config.json ({shapes}); the "
                "weights belong to another model, or the config was edited"
            ) from e
        raise SubjectError(
            f"cannot load model weights from {str(path)!r}: {_first_line(e)} (a truncated or "
            "corrupt safetensors file gives this; re-save or re-copy the model)"
        ) from e
    # transformers fills a missing tensor with random values and only logs it: refuse instead
    for key in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        bad = sorted(str(k) for k in (info or {}).get(key, ()) or ())
        if bad:
            raise SubjectError(
                f"{str(path)!r}: the weight files do not match the config ({key.replace('_', ' ')}"
                f": {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the checkpoint is "
                "incomplete or belongs to another model"
            )
    if device_map is None:
        model.to(resolve_device(device))
    model.eval()
    subject = Subject(model, tokenizer, adapter_for(model, model.config.model_type), path=path)
    n_tok = len(tokenizer)
    if n_tok > subject.adapter.vocab_size:
        raise SubjectError(
            f"tokenizer in {str(path)!r} has {n_tok} tokens but the embedding has "
            f"{subject.adapter.vocab_size} rows; the tokenizer does not belong to this model"
        )
    subject.fingerprint = fingerprint(path)
    subject.meta = {
        "path": str(path),
        "architecture": subject.architecture,
        "n_params": subject.n_params,
        "device": str(subject.device),
        "dtype": str(subject.dtype).removeprefix("torch."),
        **subject.adapter.dims(),
    }
    if source is not None:
        subject.meta["source"] = source
    return subject
