"""What an influence ranking is compared with: text similarity to the incident (TF-IDF),
full-model gradient similarity at the final weights (TracIn with one checkpoint), and chance.

Each returns one score per training example, higher = more implicated, for the same queries
the influence ranking averages over.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from rca.model.metric import Target
from rca.model.subject import Subject

__all__ = ["gradient_similarity", "random_scores", "tfidf_scores"]

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def tfidf_scores(texts: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """Mean cosine similarity of each text's TF-IDF vector (words, smoothed idf, l2-normed)
    to each query's: (len(texts),)."""
    docs = [Counter(_words(t)) for t in texts]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}

    def vec(counts: Counter[str]) -> dict[str, float]:
        v = {w: c * idf.get(w, math.log(1 + n) + 1) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    qv = [vec(Counter(_words(q))) for q in queries]
    out = np.zeros(n)
    for i, d in enumerate(docs):
        dv = vec(d)
        out[i] = sum(sum(q.get(w, 0.0) * x for w, x in dv.items()) for q in qv) / len(qv)
    return out


def gradient_similarity(
    subject: Subject, texts: Sequence[str], targets: Sequence[Target], *, max_tokens: int = 256
) -> np.ndarray:
    """TracIn at the final weights: each text's log-likelihood gradient over every parameter,
    dotted with the mean gradient of the incident metric over ``targets`` (no projection, no
    curvature): (len(texts),)."""
    from rca.provenance.influence import (
        batch_size,
        gradient_computer_class,
        output_class,
        query_batch,
        quiet_model,
        text_batch,
    )

    names = [n for n, _ in subject.model.named_parameters()]
    n_params = sum(p.numel() for p in subject.model.parameters())
    gc = gradient_computer_class()(
        model=subject.model,
        task=output_class()(),
        grad_dim=n_params,
        dtype=torch.float32,
        device=subject.device,
        grad_wrt=names,
    )
    bs = batch_size(n_params)

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in names], dim=1)

    with quiet_model(subject):
        gc.load_model_params(subject.model)
        q = torch.zeros(n_params, device=subject.device)
        for i in range(0, len(targets), bs):
            q += flat(gc.compute_per_sample_grad(query_batch(subject, targets[i : i + bs]))).sum(0)
        q /= len(targets)
        out = []
        for i in range(0, len(texts), bs):
            batch, _ = text_batch(subject, texts[i : i + bs], max_tokens)
            out.append((flat(gc.compute_per_sample_grad(batch)) @ q).cpu())
    return torch.cat(out).double().numpy()


def random_scores(n: int, *, seed: int = 0) -> np.ndarray:
    """A ranking by chance: (n,) uniform scores from ``seed``."""
    return np.random.default_rng(seed).random(n)
