"""Attribution must predict what a real intervention does, to first order.

In float64 on tiny random models: for a small step ``eps`` of a component's activation toward
its baseline value (or of an upstream write into one downstream input only), the real change
in the metric divided by ``eps`` equals the AtP node or edge score. Changes are measured as
central differences, (f(-eps) - f(+eps)) / 2 eps, so the second-order term cancels.
"""

from __future__ import annotations

import pytest
import torch

from rca.model.hooks import capture, patch
from rca.model.metric import Target
from rca.model.subject import Subject
from rca.trace.components import Baseline, score_components, site_means
from rca.trace.tokens import integrated_gradients
from tests.helpers import ARCHS, tiny_model

PROMPT = (5, 6, 7, 8, 9, 10)
CF = (5, 6, 20, 8, 9, 10)
BAD, GOOD = (11, 12), (13,)


def subject_of(model_type: str, **overrides: object) -> Subject:
    m = tiny_model(model_type, seed=1, **overrides).double().eval()
    return Subject.from_model(m)


# the tiny Llama-family configs share keys and values (grouped-query attention), which takes
# the general edge path; with their own keys and values each head takes the fast one
MHA = {"num_key_value_heads": 4}


def metric(s: Subject, t: Target) -> float:
    with torch.no_grad():
        return float(t.metric(s.model(input_ids=t.input_ids()).logits)[0])


# RMSNorm implementations upcast to float32 inside, which floors the finite-difference noise
EPS = {"gpt2": 1e-4, "llama": 1e-2, "phi": 1e-3, "gpt_neox": 1e-3, "phi3": 1e-2}
TOL = {"gpt2": 1e-6, "llama": 2e-4, "phi": 1e-5, "gpt_neox": 1e-5, "phi3": 2e-4}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi", "gpt_neox"])
def test_atp_node_scores_predict_small_patches(model_type: str) -> None:
    s = subject_of(model_type)
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    res = score_components(s, tgt, Baseline("counterfactual", "cf", target=cf), edges=False)
    ids = [n for n in res.nodes if n != "EMB"]
    with capture(s, ids) as clean, torch.no_grad():
        s.model(input_ids=tgt.input_ids())
    with capture(s, ids) as base, torch.no_grad():
        s.model(input_ids=cf.input_ids())
    eps = EPS[model_type]
    real, pred = [], []
    for n in ids:
        f = []
        for sign in (-1, 1):
            with patch(s, {n: clean[n] + sign * eps * (base[n] - clean[n])}):
                f.append(metric(s, tgt))
        real.append((f[0] - f[1]) / (2 * eps))
        pred.append(res.score(n))
    real_t, pred_t = torch.tensor(real), torch.tensor(pred)
    assert real_t.abs().max() > 1e-3  # the test is not vacuous
    torch.testing.assert_close(pred_t, real_t, atol=TOL[model_type], rtol=0.02)


def _write(s: Subject, u: str, acts) -> torch.Tensor:
    if u == "EMB":
        return acts["L0.RESID_PRE"]
    if u.endswith("MLP"):
        return acts[u]
    layer, head = int(u[1:].split(".")[0]), int(u.split(".H")[1])
    return s.adapter.head_result(layer, head, acts[u])


def _edge_patched_metric(s: Subject, tgt: Target, v: str, d: torch.Tensor) -> float:
    """The metric with ``d`` added to downstream ``v``'s input only (exact edge patching)."""
    a, ids = s.adapter, tgt.input_ids()
    handles = []
    add = lambda mod, args: (args[0] + d, *args[1:])  # noqa: E731
    shared = a.spec.mlp_norm == a.spec.attn_norm  # Phi: attention and MLP read one norm
    try:
        if v == "LOGITS":
            handles.append(a.final_norm.register_forward_pre_hook(add))
        elif v.endswith("MLP"):
            layer = int(v[1:].split(".")[0])
            if shared:  # the attention reading the same norm keeps its clean output
                with capture(s, [f"L{layer}.H{h}" for h in range(a.n_heads)]) as z:
                    with torch.no_grad():
                        s.model(input_ids=ids)
                clean_all = torch.cat([z[f"L{layer}.H{h}"] for h in range(a.n_heads)], dim=-1)
                keep = lambda mod, args: (clean_all, *args[1:])  # noqa: E731
                handles.append(a.attn_out(layer).register_forward_pre_hook(keep))
            handles.append(a.mlp_norm(layer).register_forward_pre_hook(add))
        else:
            layer, head = int(v[1:].split(".")[0]), int(v.split(".H")[1])
            with capture(s, [f"L{layer}.H{h}" for h in range(a.n_heads)]) as z, torch.no_grad():
                s.model(input_ids=ids)
            clean_z = torch.cat([z[f"L{layer}.H{h}"] for h in range(a.n_heads)], dim=-1)
            sl = slice(head * a.d_head, (head + 1) * a.d_head)

            def splice(mod, args):  # every head but `head` keeps its clean output
                out = clean_z.clone()
                out[..., sl] = args[0][..., sl]
                return (out, *args[1:])

            if shared:  # the MLP reading the same norm keeps its clean output
                with capture(s, [f"L{layer}.MLP"]) as mo, torch.no_grad():
                    s.model(input_ids=ids)
                clean_m = mo[f"L{layer}.MLP"]
                handles.append(a.mlp(layer).register_forward_hook(lambda mod, i, o: clean_m))
            handles.append(a.attn_norm(layer).register_forward_pre_hook(add))
            handles.append(a.attn_out(layer).register_forward_pre_hook(splice))
        return metric(s, tgt)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("gpt2", {}),  # fused [q | k | v] Conv1D
        ("llama", {}),  # grouped-query: the general path through the attention
        ("llama", MHA),  # separate q, k, v projections
        ("phi", MHA),  # parallel attention and MLP on one norm
        ("gpt_neox", {}),  # fused per-head [q_h | k_h | v_h]
        ("phi3", MHA),  # fused [q | k | v] Linear
    ],
    ids=["gpt2", "llama-gqa", "llama", "phi", "gpt_neox", "phi3"],
)
def test_eap_edge_scores_predict_exact_edge_patching(model_type: str, overrides: dict) -> None:
    s = subject_of(model_type, **overrides)
    fast = s.adapter.head_reads(0) is not None
    assert fast == (model_type != "llama" or bool(overrides))  # both edge paths are tested
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    res = score_components(s, tgt, Baseline("counterfactual", "cf", target=cf))
    assert res.edges is not None
    names = ["L0.RESID_PRE"] + [n for n in res.nodes if n != "EMB"]
    with capture(s, names) as clean, torch.no_grad():
        s.model(input_ids=tgt.input_ids())
    with capture(s, names) as base, torch.no_grad():
        s.model(input_ids=cf.input_ids())
    eps = EPS[model_type]
    real, pred = [], []
    for j, v in enumerate(res.down):
        for i, u in enumerate(res.up):
            if res.edges[i, j] == 0:
                continue
            d = eps * (_write(s, u, base) - _write(s, u, clean))
            f = [_edge_patched_metric(s, tgt, v, sign * d) for sign in (-1, 1)]
            real.append((f[0] - f[1]) / (2 * eps))
            pred.append(float(res.edges[i, j]))
    assert len(real) >= 40  # every edge of a 2-layer model with 4 heads that has a path
    real_t, pred_t = torch.tensor(real), torch.tensor(pred)
    assert real_t.abs().max() > 1e-3
    torch.testing.assert_close(pred_t, real_t, atol=TOL[model_type], rtol=0.02)


def test_edges_into_logits_sum_to_their_node_scores() -> None:
    """Every upstream write reaches LOGITS directly, so the LOGITS column holds the direct
    effects; summed over upstream nodes it is the gradient at the final residual dotted with
    the whole residual difference."""
    s = subject_of("gpt2")
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    res = score_components(s, tgt, Baseline("counterfactual", "cf", target=cf))
    assert res.edges is not None
    with capture(s, ["L1.RESID_POST"]) as c, torch.no_grad():
        s.model(input_ids=tgt.input_ids())
    with capture(s, ["L1.RESID_POST"]) as b, torch.no_grad():
        s.model(input_ids=cf.input_ids())
    d = c["L1.RESID_POST"] - b["L1.RESID_POST"]
    eps = 1e-5
    real = (metric(s, tgt) - _edge_patched_metric(s, tgt, "LOGITS", -eps * d)) / eps
    # the final residual is the sum of all writes (GPT-2 biases and position terms cancel)
    assert abs(float(res.edges[:, -1].sum()) - real) < 1e-5 + 1e-3 * abs(real)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_eap_ig_converges_to_the_exact_effect_of_a_single_patch(model_type: str) -> None:
    """With the embeddings as the only difference, EAP-IG's EMB score is the integral of the
    gradient along the path: it equals the full metric difference (completeness), which AtP
    only approximates."""
    s = subject_of(model_type)
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    gap = metric(s, tgt) - metric(s, cf)
    ig = score_components(
        s, tgt, Baseline("counterfactual", "cf", target=cf), method="eap-ig", steps=32
    )
    assert abs(ig.score("EMB") - gap) < 0.01 * abs(gap) + 1e-6
    assert ig.metric_clean - ig.metric_baseline == pytest.approx(gap, rel=1e-9, abs=1e-12)


def test_mean_baseline_scores_record_their_baseline() -> None:
    s = subject_of("gpt2")
    tgt = Target(PROMPT, BAD, GOOD)
    means = site_means(s, [(20, 21, 22, 23), (30, 31, 32)])
    res = score_components(s, tgt, Baseline("mean", "mean over 2", means=means), edges=False)
    assert res.baseline == "mean over 2" and res.method == "atp"
    # patching L1.MLP to its mean at every position changes the metric about as predicted
    with capture(s, ["L1.MLP"]) as c, torch.no_grad():
        s.model(input_ids=tgt.input_ids())
    eps = 1e-4
    v = c["L1.MLP"] + eps * (means["m1"] - c["L1.MLP"])
    with patch(s, {"L1.MLP": v}):
        m1 = metric(s, tgt)
    real = (metric(s, tgt) - m1) / eps
    assert abs(res.score("L1.MLP") - real) < 1e-6 + 0.01 * abs(real)


def test_integrated_gradients_completeness_on_a_tiny_model(tmp_path) -> None:
    from rca.model.subject import load_subject
    from tests.helpers import save_model_dir, word_tokenizer

    path = save_model_dir(tmp_path, tiny_model("gpt2", seed=3), word_tokenizer())
    s = load_subject(path, device="cpu")
    tgt = Target(PROMPT, BAD, GOOD)
    ts = integrated_gradients(s, tgt, n_steps=32)
    c = ts.completeness
    assert abs(c["metric_input"] - c["metric_baseline"]) > 1e-3
    assert c["relative_error"] < 0.05
    assert len(ts.scores) == len(PROMPT)


def test_integrated_gradients_take_the_fewest_points_that_are_complete() -> None:
    """Points double from ``min_steps`` until completeness is within the tolerance; the result
    is the fixed-count attribution at the count it stopped at, and a looser tolerance stops
    sooner."""
    from tests.helpers import word_tokenizer

    s = Subject.from_model(tiny_model("gpt2", seed=3), word_tokenizer())
    tgt = Target(PROMPT, BAD, GOOD)
    errs = {n: integrated_gradients(s, tgt, n_steps=n) for n in (1, 2, 4, 8, 16, 32)}
    rel = {n: ts.completeness["relative_error"] for n, ts in errs.items()}
    tol = 0.5 * (rel[1] + rel[32])  # between the worst and the best count
    assert rel[1] > tol > rel[32]
    want = min(n for n in (1, 2, 4, 8, 16, 32) if rel[n] <= tol)
    ts = integrated_gradients(s, tgt, n_steps=32, min_steps=1, tolerance=tol)
    assert ts.completeness["tries"] == [n for n in (1, 2, 4, 8, 16, 32) if n <= want]
    assert ts.n_steps == want
    assert ts.scores == pytest.approx(errs[want].scores, abs=1e-6)
    # never more than n_steps, even when no count meets the tolerance
    worst = integrated_gradients(s, tgt, n_steps=4, min_steps=1, tolerance=0.0)
    assert worst.completeness["tries"] == [1, 2, 4] and worst.n_steps == 4


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_fast_edge_path_equals_the_general_path(model_type: str) -> None:
    """Heads' input gradients from their q/k/v features equal the per-head VJP through the
    attention, and MLPs' from their own input equal the VJP through the MLP, to float64
    rounding, on every architecture; grouped-query layers keep the general path."""
    overrides = MHA if "num_key_value_heads" in ARCHS[model_type].config else {}
    s = subject_of(model_type, **overrides)
    assert s.adapter.head_reads(0) is not None
    assert subject_of(model_type).adapter.head_reads(0) is None or not overrides
    tgt, cf = Target(PROMPT, BAD, GOOD), Target(CF, BAD, GOOD)
    base = Baseline("counterfactual", "cf", target=cf)
    for method in ("atp", "eap-ig"):
        fast = score_components(s, tgt, base, method=method, steps=3)
        slow = score_components(s, tgt, base, method=method, steps=3, fast_edges=False)
        assert fast.edges is not None and slow.edges is not None
        assert slow.edges.abs().max() > 1e-3
        torch.testing.assert_close(fast.edges, slow.edges, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(fast.scores, slow.scores, atol=1e-12, rtol=1e-12)
