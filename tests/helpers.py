"""Tiny offline models and tokenizers for the unit tests.

Every model here is a real Hugging Face causal LM built with ``from_config`` (2 layers, hidden 32,
4 heads, vocab 100) and its weights re-drawn at a visible scale, so biases are non-zero and an
ablation moves the logits. Module paths in ``ARCHS`` are written out independently of
``rca.model.adapter.ARCHITECTURES``: the tests compare what rca hooks against these.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 100
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# 96 plain words: ids 4..99
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
_GQA = dict(num_key_value_heads=2)


@dataclass(frozen=True)
class Arch:
    """One architecture: its tiny config and where its parts are (dotted paths, ``{l}`` = layer).

    ``v_proj``/``v_layout`` say how to read a layer's value vectors: ``"kv"`` is a projection
    whose output is (pos, n_kv_heads * d_head); ``"gpt2"`` is c_attn's (q, k, v) concatenation;
    ``"neox"`` is query_key_value's per-head (q, k, v) interleave; ``"fused"`` is Phi-3's
    qkv_proj, (q, k, v) concatenated with n_kv_heads for k and v.
    """

    model_type: str
    config_cls: str
    config: dict[str, Any]
    attn_out: str
    mlp: str
    mlp_down: str
    final_norm: str
    embed: str
    v_proj: str
    v_layout: str = "kv"
    conv1d: bool = False
    # how the residual update of a layer is built from ATTN and MLP; "gemma2" norms each first
    residual: str = "sum"
    extra: dict[str, Any] = field(default_factory=dict)


_LL = dict(
    attn_out="model.layers.{l}.self_attn.o_proj",
    mlp="model.layers.{l}.mlp",
    mlp_down="model.layers.{l}.mlp.down_proj",
    final_norm="model.norm",
    embed="model.embed_tokens",
    v_proj="model.layers.{l}.self_attn.v_proj",
)

ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in [
        Arch(
            "gpt2",
            "GPT2Config",
            dict(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=64,
                n_positions=64,
                pad_token_id=PAD,
                bos_token_id=BOS,
                eos_token_id=EOS,
            ),
            attn_out="transformer.h.{l}.attn.c_proj",
            mlp="transformer.h.{l}.mlp",
            mlp_down="transformer.h.{l}.mlp.c_proj",
            final_norm="transformer.ln_f",
            embed="transformer.wte",
            v_proj="transformer.h.{l}.attn.c_attn",
            v_layout="gpt2",
            conv1d=True,
        ),
        Arch(
            "gpt_neox",
            "GPTNeoXConfig",
            dict(_COMMON),  # no GQA in GPT-NeoX
            attn_out="gpt_neox.layers.{l}.attention.dense",
            mlp="gpt_neox.layers.{l}.mlp",
            mlp_down="gpt_neox.layers.{l}.mlp.dense_4h_to_h",
            final_norm="gpt_neox.final_layer_norm",
            embed="gpt_neox.embed_in",
            v_proj="gpt_neox.layers.{l}.attention.query_key_value",
            v_layout="neox",
        ),
        # attention_bias so one Llama-like projection has a bias to add back
        Arch("llama", "LlamaConfig", {**_COMMON, **_GQA, "attention_bias": True}, **_LL),
        Arch("mistral", "MistralConfig", {**_COMMON, **_GQA, "sliding_window": None}, **_LL),
        Arch("qwen2", "Qwen2Config", {**_COMMON, **_GQA}, **_LL),
        Arch("qwen3", "Qwen3Config", {**_COMMON, **_GQA, "head_dim": 8}, **_LL),
        # Gemma's head_dim (16) differs from hidden / heads (8)
        Arch("gemma", "GemmaConfig", {**_COMMON, **_GQA, "head_dim": 16}, **_LL),
        Arch(
            "gemma2",
            "Gemma2Config",
            {**_COMMON, **_GQA, "head_dim": 16, "sliding_window": 4},
            residual="gemma2",
            **_LL,
        ),
        Arch(
            "phi",
            "PhiConfig",
            {**_COMMON, **_GQA},
            attn_out="model.layers.{l}.self_attn.dense",
            mlp="model.layers.{l}.mlp",
            mlp_down="model.layers.{l}.mlp.fc2",
            final_norm="model.final_layernorm",
            embed="model.embed_tokens",
            v_proj="model.layers.{l}.self_attn.v_proj",
        ),
        Arch(
            "phi3",
            "Phi3Config",
            {**_COMMON, **_GQA},
            v_layout="fused",
            **{**_LL, "v_proj": "model.layers.{l}.self_attn.qkv_proj"},
        ),
    ]
}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread. Tiny models gain nothing from threads, and on a shared 2-core
    machine OpenMP's barrier makes each small matmul cost ~10 ms instead of ~10 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def module(model: nn.Module, path: str, layer: int | None = None) -> nn.Module:
    """The submodule at a dotted ``path`` (``{l}`` filled with ``layer``)."""
    return model.get_submodule(path.format(l=layer) if layer is not None else path)


def expected_dims(arch: Arch, config: Any) -> dict[str, int]:
    """The dimensions the adapter must report, read from the config by this arch's names."""
    if arch.model_type == "gpt2":
        n_heads = config.n_head
        return dict(
            n_layers=config.n_layer,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            d_head=config.n_embd // n_heads,
            d_model=config.n_embd,
            d_mlp=config.n_inner,
        )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return dict(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=head_dim,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
    )


@torch.no_grad()
def randomize(model: nn.Module, *, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Redraw every parameter: norms' weights near 1, everything else N(0, scale).

    HF initialises biases to zero and some norms to zero offsets; tests need all of them live.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * scale
        is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
        p.copy_(1.0 + 0.5 * noise if is_norm and name.endswith("weight") else noise)
    return model


def tiny_model(model_type: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomised tiny causal LM of ``model_type`` (eager attention, fp32, eval mode)."""
    import transformers

    arch = ARCHS[model_type]
    cfg = getattr(transformers, arch.config_cls)(**{**arch.config, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return randomize(model, seed=seed).eval()


# a chat template in the word tokenizer's vocabulary: roles are the words w90 (system), w91
# (user) and w92 (assistant); the generation prompt is w92
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w90', 'user': 'w91', 'assistant': 'w92'}[m['role']] }}"
    " {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w92{% endif %}"
)


def word_tokenizer(
    n_words: int = len(WORDS), *, bos: bool = True, eos: bool = False, chat: bool = False
) -> Any:
    """A WordLevel tokenizer over ``<pad> <bos> <eos> <unk> w0 .. w{n-1}``, whitespace split.

    With ``bos``, encoding with special tokens prepends ``<bos>``; with ``eos`` it also appends
    ``<eos>`` (as some real tokenizers do); with ``chat`` it has ``WORD_CHAT_TEMPLATE``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos or eos:
        single = ("<bos> " if bos else "") + "$A" + (" <eos>" if eos else "")
        specials = ([("<bos>", BOS)] if bos else []) + ([("<eos>", EOS)] if eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=single + " $B", special_tokens=specials
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    if chat:
        out.chat_template = WORD_CHAT_TEMPLATE
    return out


def bpe_tokenizer(sentences: list[str], *, vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style 'Ġ' spaces) trained offline on ``sentences``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences, vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "<eos>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>"
    )


def save_model_dir(path: Path, model: nn.Module, tokenizer: Any | None = None) -> Path:
    """save_pretrained the model and (by default) a word tokenizer into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (tokenizer if tokenizer is not None else word_tokenizer()).save_pretrained(path)
    return path


def words(*idx: int) -> str:
    """The text whose word tokens are ``w{i}`` for each i (token id i + 4)."""
    return " ".join(f"w{i}" for i in idx)


def rca_cli(*args: str) -> tuple[int, str, str]:
    """Run the ``rca`` command line in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from rca.cli import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def rca_cli_named(*args: str) -> tuple[int, str, str]:
    """``rca_cli``, with an unexpected exception's type and message added to stderr (a
    traceback says which)."""
    from typer.testing import CliRunner

    from rca.cli import app

    r = CliRunner().invoke(app, list(args))
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += f"{type(r.exception).__name__}: {r.exception}"
    return r.exit_code, r.stdout, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one ``error:`` line on stderr, no traceback, naming every needle.

    Plain ``progress:`` lines (stderr is not a terminal under the test runner) may come first.
    """
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("progress: ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


# what a reader of rca's reports must never meet live (tests of rca.textsafe and the reports)
# C0 but tab and newline, DEL, C1; bidi marks, embeddings, overrides and isolates; zero-width
HIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)
# what GFM links in text without brackets: extended www, url, e-mail and protocol autolinks
GFM_BARE = re.compile(
    r"(?:www\.|(?:https?|ftp)://)[\w-]|(?:mailto:|xmpp:)?[\w.+-]+@[\w-]+\.[\w-]", re.I
)
# what Streamlit links in the text it parsed, its escapes resolved (its bundle's
# mdast-util-gfm-autolink-literal)
ST_URL = re.compile(r"(https?://|www(?=\.))([-.\w]+)([^ \t\r\n]*)", re.I)
ST_EMAIL = re.compile(r"([-.\w+]+)@([-\w]+(?:\.[-\w]+)+)")
