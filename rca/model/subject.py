"""The model under investigation: ``Subject`` and ``load_subject``.

A ``Subject`` is a Hugging Face causal LM, its tokenizer, and an ``Adapter``
(``rca.model.adapter``) that says where each layer's attention heads, MLP, neurons and residual
stream live in the *real* modules. ``load_subject`` loads one from a local directory or a GGUF
file, after the directory checks of ``rca.model.files``, on the device and in the dtype asked
for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rca.model.adapter import Adapter, SubjectError, adapter_for, weight_of
from rca.model.files import (
    check_dir,
    check_weights_fit_config,
    fingerprint,
    first_line,
    is_gguf,
    loaded_safetensors,
    read_json,
    read_source,
    weight_files,
)

__all__ = [
    "Subject",
    "SubjectError",
    "load_subject",
    "resolve_device",
    "resolve_model_ref",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        if name not in zoo.DEMO_MODELS:
            known = [*zoo.DEMO_MODELS, *real.REAL_MODELS]
            raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(known)}")
        return zoo.model_dir(name, home=home)  # type: ignore[attr-defined]
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and base is not None:
        p = base / p
    return p


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
        data = read_json(tcfg)
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
    if gguf_file is not None or is_gguf(path):
        from rca.model.gguf import gguf_model_dir

        path = gguf_model_dir(path, home=home)
    check_dir(path, allow_pickle=allow_pickle)
    source = read_source(path)
    safes, _ = weight_files(path)
    shapes = check_weights_fit_config(path, loaded_safetensors(path)) if safes else ""
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
        raise SubjectError(f"cannot load the tokenizer from {str(path)!r}: {first_line(e)}") from e
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
            f"cannot load model weights from {str(path)!r}: {first_line(e)} (a truncated or "
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
