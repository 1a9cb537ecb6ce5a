"""Hostile or broken model directories are refused on the command line in one line, before
any model is built; honest ones of every supported architecture still load.

A directory, a FIFO or a dangling symlink under a weight file's name is named, not met as a
traceback from the fingerprint (and a FIFO is never opened: reading one blocks). A config.json
whose model would not be the size of the weights (another architecture, more layers, a wider
MLP) is refused by comparing the parameter count it implies, built on the meta device, with
the sum of the tensor shapes in the safetensors headers: the real build is replaced here by a
function that fails the test. Tied embeddings count once or twice, as the file stores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rca.model.files import fingerprint
from rca.model.subject import SubjectError, load_subject
from tests.helpers import (
    ARCHS,
    assert_one_line_error,
    one_thread,
    rca_cli,
    save_model_dir,
    tiny_model,
    words,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_model("gpt2", seed=5)  # tied: lm_head shares the token embedding


@pytest.fixture(scope="module")
def template(gpt2: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("hostile") / "model", gpt2)


@pytest.fixture
def model_dir(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the saved tiny GPT-2 and its word tokenizer, for a test to break."""
    return Path(shutil.copytree(template, tmp_path / "model"))


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every model build: a real one (``from_pretrained``, which then fails) and each
    meta-device one by its class; a build off the meta device or of over 1,000 layers fails.

    The CLI runs in-process (``rca_cli``), so patching the library's classes reaches it. The
    list is checked too, because the loader turns any exception into its own one-line error.
    """
    import transformers

    auto = transformers.AutoModelForCausalLM
    built: list[str] = []
    meta_build = auto.from_config

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        built.append("from_pretrained")
        raise AssertionError("from_pretrained ran: a model was built before the refusal")

    def from_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        layers = config.num_hidden_layers
        if torch.empty(0).device.type != "meta" or layers > 1000:
            built.append(f"{layers} layers on {torch.empty(0).device}")
            raise AssertionError(f"from_config built {layers} layers on {torch.empty(0).device}")
        model = meta_build(config, *args, **kwargs)
        built.append(type(model).__name__)
        return model

    monkeypatch.setattr(auto, "from_pretrained", from_pretrained)
    monkeypatch.setattr(auto, "from_config", from_config)
    return built


_WATCH = """
import os, sys, time
while True:
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader
    except OSError:
        time.sleep(0.02)
        continue
    os.close(fd)
    print("opened", flush=True)
"""


@contextlib.contextmanager
def readers_of(fifo: Path) -> Iterator[list[str]]:
    """Watch a FIFO from another process: whenever something opens it to read (which blocks
    until a writer comes, holding the GIL where native code opens it), open it to write and
    close at once, so the reader sees an empty file instead of hanging the test. The list
    gets one entry per such open once the block exits."""
    opened: list[str] = []
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCH, str(fifo)], stdout=subprocess.PIPE, text=True
    )
    try:
        yield opened
    finally:
        watcher.kill()
        out, _ = watcher.communicate()
        opened += out.split()


def edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def inspect_json(path: Path) -> dict[str, Any]:
    code, out, err = rca_cli("inspect", str(path), "--json")
    assert code == 0, err
    return json.loads(out)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ entries that are not files


def _directory(p: Path) -> str:
    p.mkdir()
    return "is a directory"


def _dangling(p: Path) -> str:
    os.symlink(p.parent / "gone" / "weights.bin", p)
    return "which does not exist"


def _loop(p: Path) -> str:
    os.symlink(p.name, p)  # a link to itself: stat fails with ELOOP
    return "cannot be read"


def _to_a_directory(p: Path) -> str:
    (p.parent.parent / "elsewhere").mkdir()
    os.symlink(p.parent.parent / "elsewhere", p)
    return "is a directory"


def _fifo(p: Path) -> str:
    os.mkfifo(p)
    return "is a FIFO"


ENTRIES: dict[str, Callable[[Path], str]] = {
    "directory": _directory,
    "dangling-symlink": _dangling,
    "symlink-loop": _loop,
    "symlink-to-directory": _to_a_directory,
    "fifo": _fifo,
}


@pytest.mark.parametrize("name", ["model.safetensors", "extra.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("kind", list(ENTRIES))
def test_an_entry_that_is_not_a_regular_file_is_named_in_one_line(
    model_dir: Path, name: str, kind: str, no_model_built: list[str]
) -> None:
    entry = model_dir / name
    if entry.exists():
        entry.unlink()
    said = ENTRIES[kind](entry)
    with readers_of(entry) if kind == "fifo" else contextlib.nullcontext([]) as opened:
        code, _, err = rca_cli("inspect", str(model_dir), "--json")
        assert_one_line_error(code, err, name, said)
        assert no_model_built == []
        # the library's fingerprint says the same, rather than IsADirectoryError
        with pytest.raises(SubjectError, match=said):
            fingerprint(model_dir)
    assert opened == []  # refused from its stat alone: nothing opened the FIFO


def test_weights_symlinked_from_outside_load_with_the_same_fingerprint(
    model_dir: Path, template: Path, gpt2: nn.Module
) -> None:
    """A shared model store links weights in: the link is followed, the content fingerprinted."""
    outside = model_dir.parent / "store" / "blob"
    outside.parent.mkdir()
    (model_dir / "model.safetensors").rename(outside)
    os.symlink(outside, model_dir / "model.safetensors")
    info = inspect_json(model_dir)
    assert info["fingerprint"] == fingerprint(template)
    assert info["n_params"] == n_params(gpt2)


# ------------------------------------------------------------------ config against the weights


def llama_defaults_size(config: Any) -> int:
    """Parameters of a Llama from its config, counted by hand (projections, MLP, norms)."""
    h, i, n_layers, v = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    d_head = config.head_dim
    q_o = 2 * h * config.num_attention_heads * d_head
    k_v = 2 * h * config.num_key_value_heads * d_head
    per_layer = q_o + k_v + 3 * h * i + 2 * h  # q, o, k, v; gate, up, down; two RMSNorms
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return n_layers * per_layer + embeddings + h  # + the final norm


def test_a_config_of_another_architecture_is_refused_before_any_model_is_built(
    model_dir: Path, gpt2: nn.Module, no_model_built: list[str]
) -> None:
    """model_type gpt2 -> llama: transformers would build a default Llama (about 6.5B
    parameters, 26 GB in float32) for minutes before the shapes disagreed."""
    from transformers import AutoConfig

    edit_config(model_dir, model_type="llama")
    implied = llama_defaults_size(AutoConfig.from_pretrained(model_dir))
    assert implied > 6_000_000_000
    code, _, err = rca_cli("inspect", str(model_dir), "--json")
    assert_one_line_error(
        code, err, "config.json does not match the weights", f"{implied:,}", f"{n_params(gpt2):,}"
    )
    assert no_model_built == ["LlamaForCausalLM"]  # on the meta device only


def test_rca_check_load_refuses_the_same_config_in_one_line(
    model_dir: Path, tmp_path: Path, no_model_built: list[str]
) -> None:
    edit_config(model_dir, model_type="llama")
    case = tmp_path / "case.toml"
    case.write_text(
        f'id = "c"\ntitle = "t"\nseverity = "low"\nmodel = "{model_dir}"\n'
        f'prompt = "{words(1, 2, 3)}"\nbad = " {words(4)}"\ngood = " {words(5)}"\n'
    )
    code, _, err = rca_cli("check", str(case), "--load", "--device", "cpu")
    assert_one_line_error(code, err, "config.json does not match the weights", "22,400")
    assert no_model_built == ["LlamaForCausalLM"]


def test_a_config_with_absurdly_many_layers_is_refused_without_a_meta_build(
    model_dir: Path, no_model_built: list[str]
) -> None:
    """Even on the meta device a build makes one module per layer: a billion would take hours."""
    edit_config(model_dir, n_layer=10**9)
    code, _, err = rca_cli("inspect", str(model_dir), "--json")
    assert_one_line_error(code, err, "config.json does not match the weights", "1,000,000,000")
    assert no_model_built == []


def _mlp_key(arch: str) -> str:
    return "n_inner" if arch == "gpt2" else "intermediate_size"


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_loads_with_its_lm_head_stored_or_tied(
    arch: str, tmp_path: Path
) -> None:
    """No false refusal: each architecture the tests build loads and computes what was saved;
    a tied model loads also from a file that stores the lm_head a second time."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(arch, seed=2)
    path = save_model_dir(tmp_path / arch, model)
    ids = torch.tensor([[1, 5, 9, 13, 40, 77]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    variants = ["as saved"]
    if _tied(model):
        f = path / "model.safetensors"
        tensors = load_file(f)
        head = next(k for k, _ in model.named_parameters(remove_duplicate=False) if "head" in k)
        assert head not in tensors  # save_pretrained leaves the tied copy out
        variants.append("with the tied lm_head stored")
    for variant in variants:
        if variant != "as saved":
            embed = model.get_input_embeddings().weight.detach().clone()
            save_file({**tensors, head: embed}, f, metadata={"format": "pt"})
        info = inspect_json(path)
        assert info["architecture"] == arch and info["n_params"] == n_params(model), variant
        s = load_subject(path, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(s.model(input_ids=ids).logits, want, msg=variant)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_refuses_a_wider_mlp_in_its_config(
    arch: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = tiny_model(arch, seed=2)
    path = save_model_dir(tmp_path / arch, model)
    key = _mlp_key(arch)
    edit_config(path, **{key: 128})
    implied = n_params(tiny_model(arch, seed=2, **{key: 128}))
    built = request.getfixturevalue("no_model_built")  # from here on, only meta builds
    code, _, err = rca_cli("inspect", str(path), "--json")
    assert_one_line_error(
        code, err, "does not match the weights", f"{implied:,}", f"{n_params(model):,}"
    )
    assert built == [type(model).__name__]  # the meta build only


def test_a_tied_architecture_untied_in_its_config_names_the_missing_head(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = save_model_dir(tmp_path / "gemma", tiny_model("gemma"))
    edit_config(path, tie_word_embeddings=False)
    built = request.getfixturevalue("no_model_built")  # from here on, only meta builds
    code, _, err = rca_cli("inspect", str(path), "--json")
    assert_one_line_error(code, err, "does not match the weights", "missing", "lm_head.weight")
    assert built == ["GemmaForCausalLM"]


def test_a_stray_checkpoint_beside_the_weights_is_not_counted(
    model_dir: Path, gpt2: nn.Module
) -> None:
    """Mistral's repositories keep consolidated.safetensors beside model.safetensors;
    transformers reads only the latter, and so does the count."""
    shutil.copy(model_dir / "model.safetensors", model_dir / "consolidated.safetensors")
    assert inspect_json(model_dir)["n_params"] == n_params(gpt2)


def test_sharded_weights_are_counted_across_their_shards(tmp_path: Path) -> None:
    from tests.helpers import word_tokenizer

    model = tiny_model("llama", seed=3)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    word_tokenizer().save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert inspect_json(path)["n_params"] == n_params(model)
    edit_config(path, intermediate_size=128)
    code, _, err = rca_cli("inspect", str(path), "--json")
    assert_one_line_error(code, err, "does not match the weights", f"{n_params(model):,}")


@pytest.mark.parametrize(
    ("shard", "said"),
    [("../outside.safetensors", "not a file name"), ("gone.safetensors", "missing")],
)
def test_an_index_naming_a_shard_outside_or_missing_is_refused(
    model_dir: Path, shard: str, said: str, no_model_built: list[str]
) -> None:
    real = "model-00001-of-00002.safetensors"
    (model_dir / "model.safetensors").rename(model_dir / real)
    index = {"metadata": {}, "weight_map": {"transformer.h.0.ln_1.weight": real}}
    index["weight_map"]["transformer.wte.weight"] = shard
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = rca_cli("inspect", str(model_dir), "--json")
    assert_one_line_error(code, err, "model.safetensors.index.json", shard, said)
    assert no_model_built == []


# ------------------------------------------------------------------ malformed headers


def _rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    new = json.dumps(edit(header)).encode()
    return len(new).to_bytes(8, "little") + new + data[8 + n :]


def _no_shape(h: dict[str, Any]) -> dict[str, Any]:
    h["transformer.wte.weight"]["shape"] = "wide"
    return h


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "length-past-the-end": (
        lambda b: (len(b) + 1).to_bytes(8, "little") + b[8:],
        "runs past the end of the file",
    ),
    "not-json": (lambda b: b[:8] + b"{not json" + b[17:], "is not JSON"),
    "not-an-object": (lambda b: _rewrite_header(b, lambda h: list(h)), "not a JSON object"),
    "no-shape": (lambda b: _rewrite_header(b, _no_shape), "'transformer.wte.weight'"),
    "too-short": (lambda b: b[:5], "too short"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_malformed_header_is_refused_in_one_line(
    model_dir: Path, damage: str, no_model_built: list[str]
) -> None:
    f = model_dir / "model.safetensors"
    fn, said = DAMAGE[damage]
    f.write_bytes(fn(f.read_bytes()))
    code, _, err = rca_cli("inspect", str(model_dir), "--json")
    assert_one_line_error(code, err, "model.safetensors", said)
    assert no_model_built == []
