"""A model directory's files: which rca reads, the checks before anything loads, the fingerprint.

Loading is local and safe by construction: a directory, safetensors only, ``trust_remote_code``
never set, and a config that asks for custom code (``auto_map``) is refused. Every model file
must be a regular file (or a symlink to one), and a config.json whose model would not be the
size of the weights in the safetensors headers is refused before any model is built. A GGUF
file is converted once into such a directory (``rca.model.gguf``) and loaded from there.
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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rca.model.adapter import ARCHITECTURES, SubjectError
from rca.paths import PathError, read_bounded_json

__all__ = [
    "CONFIG_FILES",
    "MAX_JSON_BYTES",
    "PICKLE_SUFFIXES",
    "SOURCE_MANIFEST",
    "TOKENIZER_FILES",
    "check_dir",
    "check_weights_fit_config",
    "fingerprint",
    "first_line",
    "is_gguf",
    "loaded_safetensors",
    "read_json",
    "read_source",
    "weight_files",
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


MAX_JSON_BYTES = 16 << 20  # a config, tokenizer config, source manifest or shard index


def read_json(p: Path) -> Any:
    """A model directory's JSON file, read with a size bound and a nesting bound
    (``rca.paths.read_bounded_json``); one-line SubjectError otherwise."""
    try:
        return read_bounded_json(p, what=p.name, max_bytes=MAX_JSON_BYTES, max_depth=64)
    except PathError as e:
        raise SubjectError(f"{str(p)!r} {e.problem}") from None


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


def weight_files(path: Path) -> tuple[list[Path], list[Path]]:
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
    data = read_json(p)
    if not isinstance(data, dict):
        raise SubjectError(f"{str(p)!r} must hold a JSON object")
    return data


def is_gguf(path: Path) -> bool:
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
    except OSError:  # unreadable: check_dir says the path is not a model directory
        return False


def check_dir(path: Path, *, allow_pickle: bool) -> dict[str, Any]:
    if not path.exists():
        raise SubjectError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise SubjectError(f"model path {str(path)!r} is not a directory of HF model files")
    _model_files(path)  # a directory or FIFO under a model file's name: refused by name
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SubjectError(f"{str(path)!r} has no config.json; save the model with save_pretrained")
    cfg = read_json(cfg_path)
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
    safes, pickles = weight_files(path)
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
        tcfg = read_json(tcfg_path)
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
            f"{shown}: the safetensors header is not JSON ({first_line(e)}); {fix}"
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


def loaded_safetensors(path: Path) -> list[Path]:
    """The safetensors files transformers loads from ``path``: ``model.safetensors``, else the
    shards ``model.safetensors.index.json`` names; [] when neither is there (the loader then
    says so). Other ``*.safetensors`` files (e.g. ``consolidated.safetensors``) are not read."""
    if (path / _SINGLE).exists():
        return [path / _SINGLE]
    index = path / _INDEX
    if not index.exists():
        return []
    data = read_json(index)
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


def check_weights_fit_config(path: Path, files: list[Path]) -> str:
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
    cfg_json = read_json(cfg_path)
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
            f"{str(cfg_path)!r} does not describe a model transformers can build: {first_line(e)}"
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
