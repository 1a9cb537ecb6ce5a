"""The influence scores are TRAK's formula over the circuit's parameters, computed right (GPT-2's
fused Conv1D projections and Llama's separate ones): each training text's log-likelihood
gradient and the incident metric's gradient, taken one text at a time by plain autograd with no
padding, projected by the same Gaussian matrix, give the same ranking as the batched, cached
path, and the cached gradients give TracIn's dot products. The cache is reused for the same
model, data and circuit, and not for another circuit. The TracIn baseline predicts what one
gradient step on a text really does to the incident metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rca.model.metric import Target
from rca.model.subject import Subject
from rca.provenance.baselines import gradient_similarity, tfidf_scores
from rca.provenance.influence import (
    InfluenceConfig,
    InfluenceError,
    circuit_parameters,
    featurize,
    query_scores,
)
from tests.helpers import tiny_model, word_tokenizer

N_TEXTS = 150


@pytest.fixture(scope="module")
def subject() -> Subject:
    return Subject.from_model(tiny_model("gpt2", seed=7), word_tokenizer())


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(N_TEXTS):
        n = int(rng.integers(3, 12))  # different lengths: the batches are padded
        out.append(" ".join(f"w{int(x)}" for x in rng.integers(0, 30, n)))
    return out


def _targets() -> list[Target]:
    return [Target((1, 5 + k, 9, 12), (20 + k, 7), (33,)) for k in range(3)] + [
        Target((1, 8, 8), (15,), None, focus=(0, 1))
    ]


def _logprob_grad(s: Subject, names: list[str], ids: list[int], w: list[float]) -> torch.Tensor:
    """d/dθ sum_t w[t] log p(ids[t] | ids[<t]) over ``names``, one unpadded sequence."""
    params = dict(s.model.named_parameters())
    s.model.zero_grad(set_to_none=True)
    logits = s.model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    lp = logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    (torch.tensor(w[1:]) * lp).sum().backward()
    return torch.cat([params[n].grad.reshape(-1) for n in names])  # type: ignore[union-attr]


def _metric_grad(s: Subject, names: list[str], t: Target) -> torch.Tensor:
    p = list(t.prompt_ids)
    a, b = t.focus or (0, len(t.bad_ids))
    w_bad = [0.0] * len(p) + [1.0 if a <= i < b else 0.0 for i in range(len(t.bad_ids))]
    g = _logprob_grad(s, names, p + list(t.bad_ids), w_bad)
    if t.good_ids is not None:
        g = g - _logprob_grad(
            s, names, p + list(t.good_ids), [0.0] * len(p) + [1.0] * len(t.good_ids)
        )
    return g


def test_circuit_parameters_are_the_members_layers_projections(subject) -> None:
    got = circuit_parameters(subject, ["L1.H2", "L0.MLP"])
    attn = {
        f"transformer.h.1.attn.{m}.{p}" for m in ("c_attn", "c_proj") for p in ("weight", "bias")
    }
    mlp = {f"transformer.h.0.mlp.{m}.{p}" for m in ("c_fc", "c_proj") for p in ("weight", "bias")}
    assert set(got) == attn | mlp
    order = [n for n, _ in subject.model.named_parameters()]
    assert got == [n for n in order if n in got]
    with pytest.raises(InfluenceError, match="--scope full"):
        circuit_parameters(subject, ["EMB"])


@pytest.mark.parametrize(
    "arch, projection", [("gpt2", "gaussian"), ("llama", "gaussian"), ("gpt2", "countsketch")]
)
def test_scores_are_trak_s_formula_over_the_circuit(
    arch: str, projection: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trak.projectors import BasicProjector, ProjectionType

    import rca.provenance.influence as influence

    if projection == "countsketch":  # the projection of a circuit too large for the matrix
        monkeypatch.setattr(influence, "PROJECTION_MATRIX_BYTES", 0)
    subject = Subject.from_model(tiny_model(arch, seed=7), word_tokenizer())

    texts = _texts()
    names = circuit_parameters(subject, ["L1.H0"])
    cfg = InfluenceConfig(proj_dim=128, lambda_reg=1e-3)
    f = featurize(subject, texts, data_sha256="t", params=names, cfg=cfg, cache_root=tmp_path)
    assert not f.cached and f.n == N_TEXTS and f.truncated == 0
    got = query_scores(subject, f, _targets())

    tok = subject.tokenizer
    G = torch.stack(
        [
            _logprob_grad(subject, names, ids, [0.0] + [1.0] * (len(ids) - 1))
            for ids in (tok(t)["input_ids"] for t in texts)
        ]
    )
    gx = torch.stack([_metric_grad(subject, names, t) for t in _targets()]).mean(0)
    n_params = G.shape[1]
    assert f.projection == projection
    if projection == "gaussian":
        proj = BasicProjector(
            grad_dim=n_params,
            proj_dim=128,
            seed=0,
            proj_type=ProjectionType.normal,
            device=torch.device("cpu"),
            block_size=128,
            dtype=torch.float32,
        )
    else:
        proj = influence._countsketch_class()(n_params, 128, 0, "cpu")
    P = proj.project(torch.eye(n_params), model_id=0).double()  # (n_params, 128)
    X = (G.double() @ P) / math.sqrt(n_params)
    q = (gx.double() @ P) / math.sqrt(n_params)
    want = X @ torch.linalg.solve(X.T @ X + 1e-3 * torch.eye(128, dtype=X.dtype), q)
    # the same scores up to traker's positive rescaling of (X^T X)^-1
    a, b = torch.from_numpy(got), want
    assert float(a @ b) > 0
    torch.testing.assert_close(a / a.norm(), b / b.norm(), atol=2e-4, rtol=0)
    # TracIn from the same cache: the projected gradients' dot products with the query's, no
    # curvature (up to traker's positive scale)
    a = torch.from_numpy(query_scores(subject, f, _targets(), kind="tracin"))
    b = X @ q
    assert float(a @ b) > 0
    torch.testing.assert_close(a / a.norm(), b / b.norm(), atol=2e-4, rtol=0)


def test_features_are_cached_per_model_data_and_circuit(subject, tmp_path: Path) -> None:
    texts = _texts()[:40]
    cfg = InfluenceConfig(proj_dim=101)
    names = circuit_parameters(subject, ["L0.H1"])
    first = featurize(subject, texts, data_sha256="d", params=names, cfg=cfg, cache_root=tmp_path)
    again = featurize(subject, texts, data_sha256="d", params=names, cfg=cfg, cache_root=tmp_path)
    assert again.cached and again.key == first.key and again.path == first.path
    assert np.array_equal(
        query_scores(subject, first, _targets()), query_scores(subject, again, _targets())
    )
    other = circuit_parameters(subject, ["L1.H1"])
    third = featurize(subject, texts, data_sha256="d", params=other, cfg=cfg, cache_root=tmp_path)
    assert not third.cached and third.key != first.key
    new_data = featurize(
        subject, texts, data_sha256="e", params=names, cfg=cfg, cache_root=tmp_path
    )
    assert not new_data.cached
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.key, third.key, new_data.key]
    )  # no partial directory is left behind


def test_tracin_predicts_what_one_gradient_step_does(subject) -> None:
    """TracIn's score of a text is the metric's first-order change when one gradient step is
    taken on that text: take the step, and the metric moves by about lr * score."""
    texts = _texts()[:12]
    targets = _targets()[:2]
    scores = gradient_similarity(subject, texts, targets)
    model = subject.model
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def metric() -> float:
        with torch.no_grad():
            return float(
                sum(t.metric(model(input_ids=t.input_ids()).logits)[0] for t in targets)
                / len(targets)
            )

    m0, lr, moved = metric(), 1e-3, []
    for text in texts:
        ids = subject.tokenizer(text)["input_ids"]
        names = list(base)
        g = _logprob_grad(subject, names, ids, [0.0] + [1.0] * (len(ids) - 1))
        with torch.no_grad():
            off = 0
            for p in model.parameters():
                k = p.numel()
                p.add_(lr * g[off : off + k].view_as(p))  # ascend the text's log-likelihood
                off += k
        moved.append((metric() - m0) / lr)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])
    assert np.corrcoef(scores, moved)[0, 1] > 0.99
    assert np.allclose(scores, moved, rtol=0.05, atol=0.02 * np.abs(scores).max())


def test_tfidf_ranks_the_texts_that_share_the_query_s_rare_words() -> None:
    texts = ["w1 w2 w3", "w1 w1 w9", "w4 w5 w6", "w9 w8 w1", "w2 w2 w2"]
    s = tfidf_scores(texts, ["w9 w8"])
    assert list(np.argsort(-s)[:2]) == [3, 1] and s[2] == 0 and s[4] == 0


def test_the_count_sketch_keeps_inner_products_as_a_gaussian_projection_does() -> None:
    """A JL transform: squared norms and inner products scaled by proj_dim, within a few
    percent at 512 dimensions, for dense vectors."""
    from rca.provenance.influence import _countsketch_class

    n, p = 20_000, 512
    sketch = _countsketch_class()(n, p, 3, "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, n, generator=g)
    y = 0.6 * x + 0.8 * y  # correlated: inner product about 0.6 n
    sx, sy = sketch.project(torch.stack([x, y]), model_id=0)
    assert float(sx @ sx) / (p * float(x @ x)) == pytest.approx(1, abs=0.1)
    assert float(sx @ sy) / (p * float(x @ y)) == pytest.approx(1, abs=0.15)
