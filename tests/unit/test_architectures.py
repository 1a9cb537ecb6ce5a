"""Every supported architecture, saved to disk and loaded through ``load_subject``, hooked right.

Each test compares what rca reads or edits through its component ids with what the real HF
modules compute, found by module paths written out independently in ``tests.helpers.ARCHS``:
heads must sum (through the output projection) to the attention output, a head ablation must
equal zeroing that head's weight slice, a patch must reproduce the source run, and so on.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from rca.model.adapter import in_features, out_features, out_in_weight
from rca.model.hooks import ablate, capture, mean_activations, patch
from rca.model.subject import Subject, load_subject
from tests.helpers import (
    ARCHS,
    BOS,
    VOCAB,
    Arch,
    expected_dims,
    module,
    one_thread,
    save_model_dir,
    tiny_model,
    word_tokenizer,
    words,
)

ATOL = 1e-5
N_POS = 7


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def differs(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() > tol)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module", params=sorted(ARCHS))
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(arch, subject): a tiny random model of one architecture, saved and loaded from disk."""
    arch = ARCHS[request.param]
    path = save_model_dir(tmp_path_factory.mktemp(arch.model_type), tiny_model(arch.model_type))
    subject = load_subject(path, device="cpu")
    assert subject.architecture == arch.model_type
    return arch, subject


def tokens(seed: int, n_pos: int = N_POS, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, n_pos), generator=g)


A, B = tokens(1), tokens(2)


def run(subject: Subject, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return subject.model(input_ids=ids, **kw).logits


@contextlib.contextmanager
def record(mod: nn.Module, *, pre: bool = False) -> Iterator[list[torch.Tensor]]:
    """Our own hook, independent of rca.model.hooks: the module's first input or its output."""
    seen: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        seen.append(x.detach().clone())

    if pre:
        handle = mod.register_forward_pre_hook(lambda m, args: grab(args[0]))
    else:
        handle = mod.register_forward_hook(
            lambda m, args, out: grab(out[0] if isinstance(out, tuple) else out)
        )
    try:
        yield seen
    finally:
        handle.remove()


def head_slice_result(proj: nn.Module, head: int, d_head: int, z: torch.Tensor):
    """What head ``head`` adds to the projection output, by slicing the weight ourselves."""
    sl = slice(head * d_head, (head + 1) * d_head)
    return z @ out_in_weight(proj)[:, sl].T


def values_of(arch: Arch, v_out: torch.Tensor, dims: dict[str, int]) -> torch.Tensor:
    """Value vectors (batch, pos, n_kv_heads, d_head) from the recorded value-projection output."""
    b, p, _ = v_out.shape
    nh, nkv, dh = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    if arch.v_layout == "gpt2":  # c_attn: [q | k | v], each n_heads * d_head wide
        return v_out[..., 2 * nh * dh :].reshape(b, p, nh, dh)
    if arch.v_layout == "neox":  # per head [q_h | k_h | v_h]
        return v_out.reshape(b, p, nh, 3 * dh)[..., 2 * dh :]
    if arch.v_layout == "fused":  # phi3 qkv_proj: [q | k | v] with n_kv_heads for k and v
        return v_out[..., (nh + nkv) * dh :].reshape(b, p, nkv, dh)
    return v_out.reshape(b, p, nkv, dh)


def test_adapter_dims_equal_the_config(loaded) -> None:
    arch, s = loaded
    want = expected_dims(arch, s.model.config)
    got = s.adapter.dims()
    assert {k: got[k] for k in want} == want
    assert got["vocab_size"] == s.model.config.vocab_size
    assert {k: s.meta[k] for k in want} == want
    # the adapter points at the modules we name independently
    for layer in range(want["n_layers"]):
        assert s.adapter.attn_out(layer) is module(s.model, arch.attn_out, layer)
        assert s.adapter.mlp(layer) is module(s.model, arch.mlp, layer)
        assert s.adapter.mlp_down(layer) is module(s.model, arch.mlp_down, layer)


def test_loaded_tokenizer_encodes_like_the_saved_one(loaded) -> None:
    """The tokenizer saved beside the model (WordLevel, <bos> prepended) comes back as it was."""
    _, s = loaded
    text = words(0, 17, 95, 42)
    saved = word_tokenizer()
    assert s.tokenizer(text)["input_ids"] == saved(text)["input_ids"] == [BOS, 4, 21, 99, 46]
    assert len(s.tokenizer) == len(saved)


def test_heads_through_output_projection_sum_to_attention_output(loaded) -> None:
    arch, s = loaded
    ad = s.adapter
    for layer in range(ad.n_layers):
        proj = module(s.model, arch.attn_out, layer)
        heads = [f"L{layer}.H{h}" for h in range(ad.n_heads)]
        with record(proj) as mine, capture(s, [*heads, f"L{layer}.ATTN"]) as acts:
            run(s, A)
        parts = [ad.head_result(layer, h, acts[hid]) for h, hid in enumerate(heads)]
        for h, part in enumerate(parts):
            assert_close(part, head_slice_result(proj, h, ad.d_head, acts[heads[h]]))
        bias = ad.attn_out_bias(layer)
        if getattr(proj, "bias", None) is not None:
            assert bias is proj.bias and bias.abs().max() > 0  # so adding it back is tested
        total = torch.stack(parts).sum(0) + (0 if bias is None else bias)
        assert_close(total, acts[f"L{layer}.ATTN"])
        assert_close(acts[f"L{layer}.ATTN"], mine[0])
        # every head's write at once (the edge step's upstream writes) is the same per head
        z = torch.cat([acts[hid] for hid in heads], dim=-1)
        assert_close(ad.head_writes(layer, z), torch.stack(parts))


def test_head_capture_is_that_heads_pattern_times_its_values(loaded) -> None:
    """``L.H<h>`` really is head h: its attention pattern applied to its (GQA-shared) values."""
    arch, s = loaded
    dims = s.adapter.dims()
    group = dims["n_heads"] // dims["n_kv_heads"]
    for layer in range(dims["n_layers"]):
        heads = [f"L{layer}.H{h}" for h in range(dims["n_heads"])]
        with record(module(s.model, arch.v_proj, layer)) as v_out, capture(s, heads) as acts:
            with torch.no_grad():
                out = s.model(input_ids=A, output_attentions=True)
        pattern = out.attentions[layer]  # (batch, n_heads, q, k)
        v = values_of(arch, v_out[0], dims)  # (batch, k, n_kv_heads, d_head)
        for h, hid in enumerate(heads):
            assert_close(acts[hid], pattern[:, h] @ v[:, :, h // group])


@pytest.mark.parametrize("head", ["L0.H1", "L1.H2"])
def test_zero_ablating_a_head_equals_zeroing_its_weight_slice(loaded, head: str) -> None:
    arch, s = loaded
    layer, h = int(head[1]), int(head.split("H")[1])
    d_head = expected_dims(arch, s.model.config)["d_head"]
    base = run(s, A)
    with ablate(s, [head]):
        got = run(s, A)
    surgery = copy.deepcopy(s.model)
    proj = module(surgery, arch.attn_out, layer)
    sl = slice(h * d_head, (h + 1) * d_head)
    with torch.no_grad():
        out_in_weight(proj)[:, sl] = 0
        want = surgery(input_ids=A).logits
    assert_close(got, want)
    assert differs(got, base)


@pytest.mark.parametrize(
    "arch, path, stored_in_out",
    [
        ("gpt2", "transformer.h.0.attn.c_attn", True),  # Conv1D, fused [q | k | v]
        ("gpt2", "transformer.h.1.attn.c_proj", True),
        ("gpt2", "transformer.h.0.mlp.c_proj", True),
        ("gpt2", "transformer.wte", True),  # nn.Embedding: a row per token
        ("llama", "model.layers.0.self_attn.o_proj", False),  # nn.Linear with a bias
        ("llama", "model.layers.1.self_attn.k_proj", False),  # grouped-query: narrower out
        ("llama", "model.layers.0.mlp.down_proj", False),
        ("llama", "model.embed_tokens", True),
    ],
)
def test_out_in_weight_is_the_map_the_module_computes(
    arch: str, path: str, stored_in_out: bool
) -> None:
    """x @ out_in_weight(mod).T is the module's output less its bias (one-hot rows for an
    embedding), for GPT-2's Conv1D as for nn.Linear; the widths are the map's, and the
    weight is a view: a write through it changes the module."""
    from transformers.pytorch_utils import Conv1D

    mod = module(tiny_model(arch, seed=2), path)
    stored = mod.weight
    w = out_in_weight(mod)
    n_out, n_in = out_features(mod), in_features(mod)
    assert w.shape == (n_out, n_in)
    assert w.shape == (stored.shape[::-1] if stored_in_out else stored.shape)
    assert isinstance(mod, Conv1D | nn.Linear | nn.Embedding)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(mod, nn.Embedding):
            tok = torch.randint(0, n_in, (2, 5), generator=g)
            x = torch.nn.functional.one_hot(tok, n_in).float()
            want = mod(tok)
        else:
            x = torch.randn(2, 5, n_in, generator=g)
            bias = getattr(mod, "bias", None)
            want = mod(x) - (0 if bias is None else bias)
        assert_close(x @ w.T, want)
        before = stored.clone()
        w[0, 1] += 1.0
        changed = (stored != before).nonzero().tolist()
    assert changed == ([[1, 0]] if stored_in_out else [[0, 1]])


def test_block_and_residual_ids_read_the_real_modules(loaded) -> None:
    arch, s = loaded
    m, last = s.model, s.adapter.n_layers - 1
    ids = ["EMB", "LOGITS", "L0.MLP", "L0.N5", f"L{last}.RESID_POST"]
    for layer in range(s.adapter.n_layers):
        ids += [f"L{layer}.{k}" for k in ("RESID_PRE", "RESID_POST", "ATTN", "MLP")]
    with (
        record(module(m, arch.mlp, 0)) as mlp0,
        record(module(m, arch.mlp_down, 0), pre=True) as down0,
        capture(s, ids) as acts,
    ):
        logits = run(s, A)
    assert torch.equal(acts["LOGITS"], logits)
    # Gemma's embedding module scales its rows by sqrt(d_model); EMB is the module's output
    scale = m.config.hidden_size**0.5 if arch.model_type.startswith("gemma") else 1.0
    assert_close(acts["EMB"], module(m, arch.embed).weight[A] * scale)
    assert_close(acts["L0.MLP"], mlp0[0])
    assert_close(acts["L0.N5"], down0[0][..., 5])
    assert torch.equal(acts["L0.RESID_POST"], acts["L1.RESID_PRE"])

    # each layer adds its attention and MLP outputs to the residual stream
    for layer in range(s.adapter.n_layers):
        attn, mlp = acts[f"L{layer}.ATTN"], acts[f"L{layer}.MLP"]
        if arch.residual == "gemma2":  # both outputs are normed before the add
            blk = m.model.layers[layer]
            with torch.no_grad():
                attn, mlp = blk.post_attention_layernorm(attn), blk.post_feedforward_layernorm(mlp)
        assert_close(acts[f"L{layer}.RESID_POST"], acts[f"L{layer}.RESID_PRE"] + attn + mlp)

    # the last residual stream through the final norm and the unembedding gives the logits
    with torch.no_grad():
        final = module(m, arch.final_norm)(acts[f"L{last}.RESID_POST"])
        hand = m.get_output_embeddings()(final)
        cap = getattr(m.config, "final_logit_softcapping", None)
        if cap is not None:
            hand = torch.tanh(hand / cap) * cap
    assert_close(hand, logits)


def test_position_ids_select_one_position(loaded) -> None:
    _, s = loaded
    with capture(s, ["L1.H0", "L1.H0@3", "L0.N5", "L0.N5@2", "L1.RESID_POST@0"]) as acts:
        run(s, A)
        assert torch.equal(acts["L1.H0@3"], acts["L1.H0"][:, 3])
        assert torch.equal(acts["L0.N5@2"], acts["L0.N5"][:, 2])
    assert acts["L1.RESID_POST@0"].shape == (A.shape[0], s.adapter.d_model)


def test_ablating_at_a_position_respects_causality(loaded) -> None:
    _, s = loaded
    base = run(s, A)
    with ablate(s, ["L0.MLP"], positions=[2]):
        early = run(s, A)
    assert_close(early[:, :2], base[:, :2], atol=1e-6)
    for p in range(2, N_POS):  # layer 1's attention carries the edit to every later position
        assert differs(early[:, p], base[:, p]), p
    with ablate(s, ["L0.MLP@2"]):
        assert torch.equal(run(s, A), early)
    # in the last layer nothing mixes positions after the MLP: only position 2 moves
    with ablate(s, ["L1.MLP"], positions=[2]):
        late = run(s, A)
    keep = [p for p in range(N_POS) if p != 2]
    assert_close(late[:, keep], base[:, keep], atol=1e-6)
    assert differs(late[:, 2], base[:, 2])


@pytest.mark.parametrize("site", ["EMB", "L0.RESID_PRE", "L1.RESID_PRE", "L1.RESID_POST"])
def test_patching_the_whole_residual_stream_gives_the_source_run(loaded, site: str) -> None:
    _, s = loaded
    logits_a = run(s, A)
    with capture(s, [site]) as acts:
        logits_b = run(s, B)
    assert differs(logits_a, logits_b)
    with patch(s, {site: acts[site]}):
        assert_close(run(s, A), logits_b)


def test_patching_some_positions_leaves_earlier_ones_alone(loaded) -> None:
    _, s = loaded
    logits_a = run(s, A)
    with capture(s, ["L1.RESID_PRE@3"]) as acts:
        run(s, B)
    with patch(s, {"L1.RESID_PRE": acts["L1.RESID_PRE@3"].unsqueeze(1)}, positions=[3]):
        got = run(s, A)
    assert_close(got[:, :3], logits_a[:, :3], atol=1e-6)
    assert differs(got[:, 3], logits_a[:, 3])


def test_patching_a_head_moves_the_attention_output_by_its_projected_difference(loaded) -> None:
    _, s = loaded
    ad = s.adapter
    with capture(s, ["L1.H2", "L1.ATTN"]) as a:
        run(s, A)
    with capture(s, ["L1.H2"]) as b:
        run(s, B)
    with patch(s, {"L1.H2": b["L1.H2"]}):
        got = run(s, A)
    shifted = a["L1.ATTN"] + ad.head_result(1, 2, b["L1.H2"] - a["L1.H2"])
    with patch(s, {"L1.ATTN": shifted}):
        want = run(s, A)
    assert_close(got, want)
    assert differs(got, run(s, A))


MEAN_IDS = ["L1.H2", "L0.MLP", "L0.N5"]


def reference_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 8, 6, 8)]


def test_mean_activations_are_the_average_of_captured_activations(loaded) -> None:
    _, s = loaded
    prompts = reference_prompts()
    per_prompt = []
    for p in prompts:
        with capture(s, MEAN_IDS) as acts:
            run(s, torch.tensor([p]))
        per_prompt.append({k: acts[k][0] for k in MEAN_IDS})  # (pos, ...) each

    means = mean_activations(s, prompts, MEAN_IDS)
    per_pos = mean_activations(s, prompts, MEAN_IDS, per_position=True)
    for k in MEAN_IDS:
        assert_close(means[k], torch.cat([a[k] for a in per_prompt]).mean(0))
        for t in range(max(len(p) for p in prompts)):
            have = [a[k][t] for a in per_prompt if a[k].shape[0] > t]
            assert_close(per_pos[k][t], torch.stack(have).mean(0))


def test_mean_ablation_equals_patching_the_mean(loaded) -> None:
    """Run with gradients on (no inference_mode), as attribution does."""
    _, s = loaded
    prompts = reference_prompts()
    x = A[:1, :6]
    base = s.model(input_ids=x).logits
    means = mean_activations(s, prompts, MEAN_IDS)
    with ablate(s, MEAN_IDS, kind="mean", means=means):
        got = s.model(input_ids=x).logits
    with patch(s, {k: means[k] for k in MEAN_IDS}):
        want = s.model(input_ids=x).logits
    assert_close(got, want)
    assert differs(got, base)

    per_pos = mean_activations(s, prompts, MEAN_IDS, per_position=True)
    n = x.shape[1]
    with ablate(s, MEAN_IDS, kind="mean", means=per_pos):
        got = s.model(input_ids=x).logits
    with patch(s, {k: per_pos[k][:n] for k in MEAN_IDS}):
        want = s.model(input_ids=x).logits
    assert_close(got, want)
    assert differs(got, base)

    sel = [1, 4]
    with ablate(s, MEAN_IDS, kind="mean", means=per_pos, positions=sel):
        got = s.model(input_ids=x).logits
    with patch(s, {k: per_pos[k][sel] for k in MEAN_IDS}, positions=sel):
        want = s.model(input_ids=x).logits
    assert_close(got, want)
    assert_close(got[:, :1], base[:, :1], atol=1e-6)

    with ablate(s, ["L1.H2@3"], kind="mean", means=per_pos):
        got = s.model(input_ids=x).logits
    with patch(s, {"L1.H2@3": per_pos["L1.H2"][3]}):
        want = s.model(input_ids=x).logits
    assert_close(got, want)
    assert differs(got[:, 3], base[:, 3])
