"""GGUF files as model references: check the header, de-quantize once, cache the directory.

A GGUF (llama.cpp's format) holds a model's weights, often quantized, and its config and
tokenizer as metadata. rca investigates float32 Hugging Face modules, so a GGUF is converted
once with transformers' own GGUF reader into an ordinary safetensors directory, cached under
``<RCA_HOME>/gguf/<sha256>``, with ``rca-source.json`` beside the weights saying which file,
which hash and which quantization it came from. ``load_subject`` hashes that manifest into the
fingerprint, so two quantizations of one model never share a fingerprint.

Every refusal (not a GGUF, an architecture transformers or rca cannot load, a tokenizer or a
tensor type that cannot be rebuilt) is decided from the header, before any de-quantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rca.model.adapter import ARCHITECTURES, SubjectError
from rca.model.files import SOURCE_MANIFEST, read_source

__all__ = ["GGUFInfo", "convert_gguf", "gguf_model_dir", "inspect_gguf"]

MAGIC = b"GGUF"
# transformers' legacy GGUF loader keeps llama.cpp's architecture name as config.model_type,
# except for these (modeling_gguf_pytorch_utils.load_gguf_checkpoint and the config builders
# of transformers.integrations.gguf); convert_gguf checks the result against it.
_MODEL_TYPE = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen35": "qwen3_5_text",
    "qwen35moe": "qwen3_5_moe_text",
}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says, and its hash: enough to decide and to record.

    ``architecture`` is llama.cpp's name (``general.architecture``), ``model_type`` the HF
    ``config.model_type`` transformers builds from it. ``quantization`` is the file type's name
    (``"Q4_1"``, ``"Q4_K_M"``, ``"F32"``), from ``general.file_type`` or, where the file does
    not state it, the tensor type holding the most parameters outside F32. ``tensor_types``
    counts the tensors of each ggml type (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``).
    """

    path: Path
    sha256: str
    size: int
    architecture: str
    model_type: str
    quantization: str
    tensor_types: dict[str, int]
    name: str | None = None  # general.name, where the file has one

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")

    def manifest(self) -> dict[str, Any]:
        """The content of ``rca-source.json`` for a directory converted from this file."""
        return {
            "format": "gguf",
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "quantization": self.quantization,
            "tensor_types": dict(sorted(self.tensor_types.items())),
            "architecture": self.architecture,
            "model_type": self.model_type,
        }


def _shown(path: Path) -> str:
    return repr(str(path))


def _check_magic(path: Path) -> None:
    if not path.exists():
        raise SubjectError(f"GGUF file {_shown(path)} does not exist")
    if not path.is_file():
        raise SubjectError(f"GGUF path {_shown(path)} is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise SubjectError(
            f"{_shown(path)} is not a GGUF file (it starts with {head!r}, a GGUF with "
            f"{MAGIC!r}); give a .gguf model file or a Hugging Face model directory"
        )


def _sha256(path: Path) -> tuple[str, int]:
    """(hex digest, size), streamed: a GGUF can be larger than memory."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _dequantizable(type_name: str) -> bool:
    """Whether the gguf package de-quantizes this ggml tensor type (transformers' loader calls
    ``gguf.dequantize``): asked of one all-zero block, which costs microseconds."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType[type_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _transformers_archs() -> set[str]:
    """The GGUF architectures this transformers can load (both of its GGUF loaders)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata groups
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    return archs


def _transformers_tokenizers() -> set[str] | None:
    """The ``tokenizer.ggml.model`` values transformers builds a tokenizer from; None: unknown."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES
    except ImportError:
        return None
    return set(GGUF_TOKENIZER_TYPES)


def _model_type(architecture: str, name: str | None) -> str:
    # transformers names a llama file whose general.name is exactly "mistral" a Mistral model
    if "llama" in architecture and name == "mistral":
        return "mistral"
    return _MODEL_TYPE.get(architecture, architecture)


def _quantization(file_type: int | None, params: Counter[str]) -> str:
    from gguf import LlamaFileType

    if file_type is not None and file_type in {int(t) for t in LlamaFileType}:
        ft = LlamaFileType(file_type)
        if ft is not LlamaFileType.GUESSED:
            return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    # norms and biases stay F32 under every scheme: the weights' type is what names the file
    weights = Counter({t: n for t, n in params.items() if t != "F32"})
    return weights.most_common(1)[0][0] if weights else "F32"


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _inspect(path: Path, sha256: str, size: int) -> GGUFInfo:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # struct, value and index errors all mean a damaged header
        raise SubjectError(
            f"cannot read the GGUF header of {_shown(path)} ({type(e).__name__}: "
            f"{_first_line(e)}); the file is truncated or corrupt, download it again"
        ) from e
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise SubjectError(
            f"{_shown(path)} has no general.architecture in its GGUF header; rca cannot tell "
            "which model it holds. Use a GGUF written by llama.cpp's converters"
        )
    name = _field(reader, "general.name")
    name = name if isinstance(name, str) else None
    model_type = _model_type(arch, name)
    archs = _transformers_archs()
    if arch not in archs and model_type not in archs:
        import transformers

        raise SubjectError(
            f"{_shown(path)}: GGUF architecture {arch!r} cannot be loaded by transformers "
            f"{transformers.__version__} (it loads {', '.join(sorted(archs))}); use a GGUF of one "
            "of those, or the model's Hugging Face safetensors directory"
        )
    if model_type not in ARCHITECTURES:
        raise SubjectError(
            f"{_shown(path)}: GGUF architecture {arch!r} (model_type {model_type!r}) is not "
            f"supported by rca; rca knows {', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec "
            "entry in rca/model/adapter.py"
        )
    tok = _field(reader, "tokenizer.ggml.model")
    if tok is None:
        raise SubjectError(
            f"{_shown(path)} carries no tokenizer (no tokenizer.ggml.model in its header); rca "
            "needs a GGUF that holds its tokenizer"
        )
    builders = _transformers_tokenizers()
    if builders is not None and tok not in builders:
        raise SubjectError(
            f"{_shown(path)}: transformers cannot build its tokenizer (tokenizer.ggml.model = "
            f"{tok!r}; it builds {', '.join(sorted(builders))}); use a GGUF with one of those"
        )
    if not reader.tensors:
        raise SubjectError(
            f"{_shown(path)} holds no tensors (a vocabulary-only GGUF?); give the model's "
            "weights file"
        )
    counts: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for t in reader.tensors:
        counts[t.tensor_type.name] += 1
        params[t.tensor_type.name] += int(t.n_elements)
    bad = sorted(t for t in counts if not _dequantizable(t))
    if bad:
        first = next(t.name for t in reader.tensors if t.tensor_type.name in bad)
        raise SubjectError(
            f"{_shown(path)}: tensor type {', '.join(bad)} cannot be de-quantized by the gguf "
            f"package ({sum(counts[b] for b in bad)} tensors, e.g. {first!r}); use a file "
            "quantized as F32, F16, BF16, Q8_0, Q4_K_M or another type gguf.quants reads"
        )
    file_type = _field(reader, "general.file_type")
    return GGUFInfo(
        path=path,
        sha256=sha256,
        size=size,
        architecture=arch,
        model_type=model_type,
        quantization=_quantization(file_type if isinstance(file_type, int) else None, params),
        tensor_types=dict(sorted(counts.items())),
        name=name,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Hash a GGUF file (streamed) and check from its header that rca can load it.

    Raises ``SubjectError`` (one line naming the file and the fix) for a file that is not a
    GGUF, a damaged header, an architecture transformers cannot load or rca does not know, a
    missing or unbuildable tokenizer, or a tensor type the gguf package cannot de-quantize.
    """
    path = Path(path)
    _check_magic(path)
    sha, size = _sha256(path)
    return _inspect(path, sha, size)


# ---- conversion --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _sweep(out_dir: Path) -> None:
    """Remove the temporary directories of conversions into ``out_dir`` whose process died."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = stale.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def partial_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of ``out_dir``: a rename away from done, on the same disk.

    Its name holds this process's id; those left by a process that died are removed here.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def install_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing an older directory there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _strip_version(path: Path) -> None:
    """Drop ``transformers_version``: it names the converter, not the model, and the file is
    fingerprinted, so keeping it would give one GGUF a new fingerprint per transformers release."""
    if path.is_file():
        data = json.loads(path.read_text())
        data.pop("transformers_version", None)
        _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_and_save(info: GGUFInfo, out: Path) -> None:
    """De-quantize ``info.path`` to float32 with transformers and save it into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = info.path.resolve()
    # From an empty directory: transformers would read a tokenizer_config.json or config.json
    # lying beside the GGUF and mix it into what the file says.
    with tempfile.TemporaryDirectory(prefix="rca-gguf-") as empty:
        opts: dict[str, Any] = dict(
            gguf_file=str(path), local_files_only=True, trust_remote_code=False
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(empty, **opts)
            model: Any = AutoModelForCausalLM.from_pretrained(empty, dtype=torch.float32, **opts)
        except Exception as e:
            raise SubjectError(
                f"transformers could not convert {_shown(info.path)}: {_first_line(e)} (the "
                "header passed rca's checks; the file may be damaged, download it again)"
            ) from e
    if model.config.model_type != info.model_type:
        raise SubjectError(
            f"{_shown(info.path)}: transformers built a {model.config.model_type!r} model where "
            f"rca expected {info.model_type!r} from GGUF architecture {info.architecture!r}; "
            "update rca/model/gguf.py's _MODEL_TYPE for this transformers version"
        )
    odd = sorted({str(p.dtype) for p in model.state_dict().values() if p.dtype != torch.float32})
    if odd:
        raise SubjectError(
            f"{_shown(info.path)}: transformers left weights as {', '.join(odd)}, not float32 "
            "(kept packed?); rca needs de-quantized float32 modules"
        )
    # A GGUF load installs a quantizer that refuses save_pretrained; the weights are plain
    # float32 tensors by now, so the directory is an ordinary unquantized model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):
        _strip_version(out / name)
    if not list(out.glob("*.safetensors")):
        raise SubjectError(f"saving {_shown(info.path)} wrote no safetensors file into {out}")


def convert_gguf(path: str | Path, out_dir: str | Path, *, info: GGUFInfo | None = None) -> Path:
    """De-quantize a GGUF to a float32 safetensors model directory at ``out_dir``.

    The directory holds the model, its tokenizer (with the chat template where the file has
    one) and ``rca-source.json`` (``GGUFInfo.manifest()``). It is written under a temporary
    sibling name and renamed into place only when complete, so a killed conversion never
    leaves a directory that looks done; an existing ``out_dir`` is replaced. ``info`` (from
    :func:`inspect_gguf` of the same file) saves hashing it again.
    """
    from transformers.utils import logging as hf_logging

    path, out_dir = Path(path), Path(out_dir)
    if info is None:
        info = inspect_gguf(path)
    tmp = partial_dir(out_dir)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller reports progress; bars would interleave
    try:
        load_and_save(info, tmp)
        _write_json(tmp / SOURCE_MANIFEST, info.manifest())
        install_dir(tmp, out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_converted(path: Path, sha256: str) -> bool:
    """Whether ``path`` holds a complete conversion of the GGUF file with this sha256."""
    try:
        source = read_source(path)
    except SubjectError:
        return False
    return (
        source is not None
        and source.get("format") == "gguf"
        and source.get("sha256") == sha256
        and (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def gguf_model_dir(path: str | Path, *, home: Path | None = None) -> Path:
    """The converted directory of a GGUF file, ``<RCA_HOME>/gguf/<sha256>``, converting once.

    Keyed by content: the same file under another name or place reuses the conversion, and an
    edited file gets its own. A cached directory costs one streamed hash of the file.
    """
    from rca.zoo import zoo_home

    path = Path(path)
    _check_magic(path)
    sha, size = _sha256(path)
    out = zoo_home(home) / "gguf" / sha
    if is_converted(out, sha):
        return out
    return convert_gguf(path, out, info=_inspect(path, sha, size))
