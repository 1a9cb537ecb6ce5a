"""A model loaded with an accelerate device_map (a layer offloaded to disk) traces the same."""

from __future__ import annotations

from pathlib import Path

import torch

from rca.model.metric import Target
from rca.model.subject import load_subject
from rca.trace.components import Baseline, score_components
from tests.helpers import save_model_dir, tiny_model, word_tokenizer


def test_disk_offloaded_layer_gives_identical_scores_and_edges(tmp_path: Path) -> None:
    d = save_model_dir(tmp_path / "m", tiny_model("llama", seed=1), word_tokenizer())
    ref = load_subject(d, device="cpu")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    off = load_subject(d, device_map=device_map, offload_folder=tmp_path / "offload")
    # the offloaded layer's weights really are not in memory between forward passes
    assert off.adapter.attn_out(1).weight.device.type == "meta"
    tgt, cf = (
        Target((5, 6, 7, 8, 9, 10), (11, 12), (13,)),
        Target((5, 6, 20, 8, 9, 10), (11, 12), (13,)),
    )
    base = Baseline("counterfactual", "cf", target=cf)
    a = score_components(ref, tgt, base, method="eap-ig", steps=4)
    b = score_components(off, tgt, base, method="eap-ig", steps=4)
    assert a.edges is not None and b.edges is not None
    assert a.scores.abs().max() > 0
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.edges, b.edges, atol=1e-5, rtol=1e-4)
