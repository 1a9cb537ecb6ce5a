"""The architecture adapter: where each supported architecture keeps its parts in the real modules.

An ``ArchSpec`` per architecture (``ARCHITECTURES``, keyed by config.model_type) names, as dotted
paths into the Hugging Face module tree, the decoder layers, the embedding and unembedding, each
layer's attention output projection, MLP, down projection and norms. ``adapter_for`` resolves
them on a loaded model into an ``Adapter``, with the model's dimensions. rca never
re-implements a model: every later stage reads and edits activations through hooks on these
modules (``rca.model.hooks``).

The orientation helpers (``as_out_in``, ``out_in_weight``, ``in_features``, ``out_features``)
give any projection's weight as (out_features, in_features), whatever the module stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "ArchSpec",
    "SubjectError",
    "adapter_for",
    "as_out_in",
    "in_features",
    "module_at",
    "out_features",
    "out_in_weight",
    "weight_of",
]


class SubjectError(ValueError):
    """A model that rca cannot or will not load or adapt; the message says why and the fix."""


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

    def qkv(self, layer: int) -> list[nn.Module]:
        """The projections that read layer ``layer``'s attention norm output (q, k, v, or one
        fused module)."""
        return list(self._qkv[layer])

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


def adapter_for(model: nn.Module, model_type: str | None) -> Adapter:
    if model_type not in ARCHITECTURES:
        raise SubjectError(
            f"architecture {model_type!r} is not supported; rca knows "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec entry in rca/model/adapter.py"
        )
    return Adapter(model, ARCHITECTURES[model_type], model_type)
