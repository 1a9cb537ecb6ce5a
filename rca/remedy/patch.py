"""Patch specs on disk, and baking one into a copy of a model directory.

A patch spec is a fix's JSON (``Fix.to_spec``, format ``PATCH_FORMAT``, with the fingerprint of
the model it was made for). ``apply_patch`` writes the fix into the weights, so the fixed model
can ship without rca's hooks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rca.model.subject import Subject, load_subject
from rca.paths import PathError, read_bounded_json
from rca.remedy.fix import PATCH_FORMAT, Fix, RemedyError, fix_from_spec

__all__ = ["MAX_SPEC_BYTES", "apply_patch", "bake", "load_spec"]

MAX_SPEC_BYTES = 64 << 20  # a patch spec: directions and means of one model, as JSON


def load_spec(spec_path: str | Path) -> tuple[dict[str, Any], Fix]:
    """A patch spec file: its JSON object as written, and the fix it describes. A RemedyError
    where the file is not an rca patch spec or describes no fix rca knows."""
    try:
        spec = read_bounded_json(spec_path, what="SPEC", max_bytes=MAX_SPEC_BYTES)
    except PathError as e:
        raise RemedyError(str(e)) from None
    if not isinstance(spec, dict) or spec.get("format") != PATCH_FORMAT:
        raise RemedyError(f"{str(spec_path)!r} is not an rca patch spec ({PATCH_FORMAT})")
    return spec, fix_from_spec(spec)


def bake(subject: Subject, spec: Mapping[str, Any]) -> None:
    """Write the fix a patch spec describes into ``subject``'s weights."""
    fix_from_spec(spec).bake(subject)


def apply_patch(
    spec_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    allow_pickle: bool = False,
) -> Path:
    """Bake a patch spec into a copy of ``model_dir`` at ``out_dir`` (safetensors).

    ``allow_pickle`` loads a model whose weights are pickle (this runs code from the file; only
    for files you trust); the patched copy is written as safetensors.

    The spec's model fingerprint must match the model's. Mean ablations need biases to hold
    the means (GPT-2 style); direction removal projects every write into the residual stream up
    to the causal layer, which is exact for architectures whose residual stream is a plain sum.
    """
    spec, fix = load_spec(spec_path)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RemedyError(f"output directory {str(out)!r} is not empty; choose a new one")
    subject = load_subject(model_dir, device="cpu", allow_pickle=allow_pickle)
    if spec.get("model_fingerprint") and spec["model_fingerprint"] != subject.fingerprint:
        raise RemedyError(
            f"the patch was made for model {spec['model_fingerprint'][:12]}, but {str(model_dir)!r}"
            f" is {str(subject.fingerprint)[:12]}; apply it to the model it was made for"
        )
    fix.bake(subject)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    subject.model.save_pretrained(tmp)  # type: ignore[operator]
    subject.tokenizer.save_pretrained(tmp)
    # the spec as written, without its tensors
    (tmp / "rca-patch.json").write_text(
        json.dumps({k: v for k, v in spec.items() if k not in fix.tensor_fields}, indent=1)
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
