"""``load_subject`` loads a local, safe model directory and refuses everything else with a
one-line ``SubjectError`` that names the problem; ``fingerprint`` tracks every byte that matters.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rca.model.files import fingerprint
from rca.model.subject import SubjectError, load_subject, resolve_device
from tests.helpers import VOCAB, one_thread, save_model_dir, tiny_model, word_tokenizer, words

IDS = torch.tensor([[1, 5, 9, 13, 40, 77]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return tiny_model("llama", seed=11)


@pytest.fixture(scope="module")
def template(original: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("template") / "model", original)


@pytest.fixture
def model_dir(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a saved tiny Llama with its word tokenizer, for a test to break."""
    return Path(shutil.copytree(template, tmp_path / "model"))


def refused(path: Path, *needles: str, **kwargs: Any) -> str:
    """Load ``path``, expect a SubjectError on one line naming ``needles``; return the message."""
    with pytest.raises(SubjectError) as info:
        load_subject(path, device="cpu", **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_a_saved_model_loads_and_computes_what_was_saved(original, model_dir: Path) -> None:
    s = load_subject(model_dir, device="cpu")
    with torch.no_grad():
        assert torch.equal(s.model(input_ids=IDS).logits, original(input_ids=IDS).logits)
    assert not s.model.training
    assert s.fingerprint == fingerprint(model_dir)
    assert s.meta["architecture"] == "llama" and s.meta["device"] == "cpu"
    assert s.meta["dtype"] == "float32" and s.meta["n_params"] == s.n_params
    assert s.n_params == sum(p.numel() for p in original.parameters())
    text = words(3, 1, 4, 1, 5)
    assert s.tokenizer(text)["input_ids"] == word_tokenizer()(text)["input_ids"]


def test_dtype_is_applied(model_dir: Path) -> None:
    s = load_subject(model_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in s.model.parameters()} == {torch.bfloat16}
    assert s.meta["dtype"] == "bfloat16"


def test_missing_directory(tmp_path: Path) -> None:
    refused(tmp_path / "nowhere", "nowhere", "does not exist")


def test_a_file_is_not_a_model_directory(model_dir: Path) -> None:
    refused(model_dir / "config.json", "not a directory")


def test_no_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    refused(model_dir, "no config.json")


def test_config_that_is_not_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{model_type: llama")
    refused(model_dir, "config.json", "not valid JSON")


def test_custom_code_is_refused_before_anything_loads(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    calls: list[str] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _c=cls, **k: calls.append(_c))
    edit_json(
        model_dir / "config.json",
        lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}),
    )
    refused(model_dir, "auto_map", "trust_remote_code")
    assert calls == []


def test_custom_tokenizer_code_is_refused(model_dir: Path) -> None:
    def add(c: dict) -> None:
        c.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "t.Evil"]})

    edit_json(model_dir / "tokenizer_config.json", add)
    refused(model_dir, "tokenizer")


@pytest.mark.parametrize("model_type", ["bert", "falcon", None])
def test_unsupported_architecture(model_dir: Path, model_type: str | None) -> None:
    edit_json(model_dir / "config.json", lambda c: c.update(model_type=model_type))
    msg = refused(model_dir, repr(model_type), "not supported")
    assert "llama" in msg  # it lists what is supported


def _to_pickle(model_dir: Path, original: torch.nn.Module) -> None:
    """transformers 5 no longer writes pytorch_model.bin (save_pretrained lost
    safe_serialization), so write the state dict the way older versions did."""
    (model_dir / "model.safetensors").unlink()
    torch.save(original.state_dict(), model_dir / "pytorch_model.bin")


def test_pickle_weights_are_refused(original, model_dir: Path) -> None:
    _to_pickle(model_dir, original)
    refused(model_dir, "pytorch_model.bin", "pickle")


def test_pickle_weights_load_with_a_warning_when_allowed(original, model_dir: Path) -> None:
    _to_pickle(model_dir, original)
    with pytest.warns(UserWarning, match="pickle"):
        s = load_subject(model_dir, device="cpu", allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(s.model(input_ids=IDS).logits, original(input_ids=IDS).logits)


def test_no_weights_at_all(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    refused(model_dir, "no *.safetensors")


def test_missing_tokenizer_files(model_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    refused(model_dir, "no tokenizer files")


def test_tokenizer_json_missing_beside_its_config(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").unlink()
    refused(model_dir, "cannot load the tokenizer")


def test_corrupt_tokenizer_json(model_dir: Path) -> None:
    (model_dir / "tokenizer.json").write_text("{not json")
    refused(model_dir, "cannot load the tokenizer")


def test_tokenizer_larger_than_the_embedding(model_dir: Path) -> None:
    big = word_tokenizer(n_words=VOCAB + 20)
    big.save_pretrained(model_dir)
    refused(model_dir, str(len(big)), str(VOCAB), "embedding")


def test_truncated_weights(model_dir: Path) -> None:
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SubjectError) as info:
        load_subject(model_dir, device="cpu")
    assert "\n" not in str(info.value) and "safetensors" in str(info.value)
    assert info.value.__cause__ is not None  # raised `from` the loader's error


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"\xff" * 8 + b[8:],  # header length garbage
        lambda b: b[:8] + b"{not json" + b[17:],  # header that is not JSON
        lambda b: b[:8] + bytes(reversed(b[8:64])) + b[64:],  # scrambled header
        lambda b: b"",  # empty file
    ],
    ids=["length", "json", "scrambled", "empty"],
)
def test_corrupt_weights(model_dir: Path, damage) -> None:
    f = model_dir / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(SubjectError) as info:
        load_subject(model_dir, device="cpu")
    assert "\n" not in str(info.value) and "safetensors" in str(info.value)


def test_a_tensor_of_the_wrong_shape_is_refused(model_dir: Path) -> None:
    """A vocabulary or width that does not match the config (another model's embeddings)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = emb[: emb.shape[0] - 7].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(SubjectError) as info:
        load_subject(model_dir, device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and "embed_tokens" in msg, msg


def test_a_checkpoint_missing_a_tensor_is_refused(model_dir: Path) -> None:
    """transformers fills a missing tensor with fresh random values and only logs a report;
    a root-cause analysis of such a model would analyse noise."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    refused(model_dir, "model.layers.1.mlp.down_proj.weight")


def test_trust_remote_code_is_never_set(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[dict[str, Any]] = []
    fast = getattr(transformers, "TokenizersBackend", transformers.PreTrainedTokenizerFast)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, fast):
        orig = cls.from_pretrained

        def record(*args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    load_subject(model_dir, device="cpu")
    assert len(seen) == 2
    for kwargs in seen:
        assert kwargs.get("trust_remote_code") is not True
        assert kwargs.get("local_files_only") is True


def test_bad_device_and_dtype(model_dir: Path) -> None:
    refused(model_dir, "float64", dtype="float64")
    with pytest.raises(SubjectError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SubjectError, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


# --- fingerprint ------------------------------------------------------------------------------


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_weight_byte(path: Path) -> None:
    """Flip one bit inside a tensor's data (past the safetensors header), same file size."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x10
    path.write_bytes(bytes(data))


EDITS: dict[str, Callable[[Path], None]] = {
    "a weight byte": lambda d: _flip_weight_byte(d / "model.safetensors"),
    "the config": lambda d: edit_json(d / "config.json", lambda c: c.update(rope_theta=20000.0)),
    "config whitespace": lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text() + "\n"
    ),
    "generation config": lambda d: edit_json(
        d / "generation_config.json", lambda c: c.update(max_length=7)
    ),
    "tokenizer.json": lambda d: _flip_last_byte(d / "tokenizer.json"),
    "tokenizer_config.json": lambda d: edit_json(
        d / "tokenizer_config.json", lambda c: c.update(model_max_length=64)
    ),
    "a renamed weight file": lambda d: (d / "model.safetensors").rename(
        d / "model-00001-of-00001.safetensors"
    ),
    "an added weight file": lambda d: shutil.copy(d / "model.safetensors", d / "extra.safetensors"),
    "an added vocab.json": lambda d: (d / "vocab.json").write_text("{}"),
}


def test_fingerprint_is_stable(model_dir: Path, template: Path) -> None:
    fp = fingerprint(model_dir)
    assert fingerprint(model_dir) == fp
    assert fingerprint(template) == fp  # a byte-identical copy elsewhere
    assert len(fp) == 64 and int(fp, 16) >= 0
    (model_dir / "README.md").write_text("notes do not change the model")
    assert fingerprint(model_dir) == fp


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_fingerprint_changes_with_every_file_that_matters(model_dir: Path, edit: str) -> None:
    before = fingerprint(model_dir)
    EDITS[edit](model_dir)
    assert fingerprint(model_dir) != before


def test_loaded_fingerprint_tracks_the_weights(model_dir: Path) -> None:
    before = load_subject(model_dir, device="cpu").fingerprint
    _flip_weight_byte(model_dir / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = load_subject(model_dir, device="cpu").fingerprint
    assert before != after == fingerprint(model_dir)
