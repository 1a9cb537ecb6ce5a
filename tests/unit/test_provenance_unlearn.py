"""Unlearning, the approximation of retraining: the steps lower the unlearned texts' likelihood,
keep the benign KL that a separate measurement finds within the bound, change only the ranked
parameters, and put every weight and gradient flag back on exit, an exception's too."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rca.model.subject import Subject
from rca.provenance.influence import InfluenceError
from rca.provenance.unlearn import UnlearnConfig, forget_loglik, unlearned
from rca.specificity import BenignRun
from tests.helpers import tiny_model, word_tokenizer

FORGET = [" ".join(f"w{(3 * i + j) % 40}" for j in range(12)) for i in range(6)]
RETAIN = [" ".join(f"w{(7 * i + 2 * j) % 40}" for j in range(10)) for i in range(8)]
BOUND = [" ".join(f"w{(5 * i + j + 1) % 40}" for j in range(10)) for i in range(8)]


@pytest.fixture(params=["gpt2", "llama"])
def subject(request) -> Subject:
    return Subject.from_model(tiny_model(request.param, seed=2), word_tokenizer())


def _params(s: Subject) -> list[str]:
    # one layer's attention: the parameters a circuit of its heads is ranked over
    return [n for n, _ in s.model.named_parameters() if ".0." in n and "attn" in n]


def test_unlearning_lowers_the_texts_likelihood_within_the_bound_and_puts_all_back(
    subject: Subject,
) -> None:
    names = _params(subject)
    assert names
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    bound, retain = BenignRun(subject, BOUND), BenignRun(subject, RETAIN)
    cfg = UnlearnConfig(steps=5, step_size=0.05, kl_bound=0.05)
    ll0 = forget_loglik(subject, FORGET)
    with unlearned(subject, names, FORGET, bound, cfg, retain=retain) as rep:
        assert rep["steps_taken"] >= 1
        ll1 = forget_loglik(subject, FORGET)
        assert ll1 < ll0 - 1e-3 and rep["loglik_after"] == pytest.approx(ll1)
        # measured again, from scratch: the benign KL is within the bound
        kl = BenignRun(subject, BOUND)  # the unlearned model's own distributions...
        side = bound.side_effect(contextlib.nullcontext)  # ...against the original's
        assert side["kl_mean"] <= cfg.kl_bound + 1e-6
        assert side["kl_mean"] == pytest.approx(rep["benign_kl_mean"], rel=1e-4, abs=1e-7)
        assert kl.loss == pytest.approx(side["loss_after"], rel=1e-5)
        changed = {n for n, p in subject.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= set(names)
    for n, p in subject.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad
    assert forget_loglik(subject, FORGET) == pytest.approx(ll0, abs=1e-6)


def test_a_step_that_breaks_the_bound_is_not_kept(subject: Subject) -> None:
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    cfg = UnlearnConfig(steps=3, step_size=0.5, kl_bound=1e-12)
    with unlearned(subject, _params(subject), FORGET, BenignRun(subject, BOUND), cfg) as rep:
        assert rep["steps_taken"] == 0 and rep["halvings"] > 0
        for n, p in subject.model.named_parameters():
            assert torch.equal(p, before[n])


def test_the_weights_come_back_after_an_exception(subject: Subject) -> None:
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    cfg = UnlearnConfig(steps=2, step_size=0.05, kl_bound=1.0)
    with pytest.raises(RuntimeError, match="inside"):
        with unlearned(subject, _params(subject), FORGET, BenignRun(subject, BOUND), cfg):
            raise RuntimeError("inside")
    for n, p in subject.model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad


def test_bad_settings_are_refused_before_anything_runs(subject: Subject) -> None:
    with pytest.raises(InfluenceError, match="unlearn-steps"):
        UnlearnConfig(steps=0).check()
    with pytest.raises(InfluenceError, match="unlearn-kl"):
        UnlearnConfig(kl_bound=float("nan")).check()
    with pytest.raises(InfluenceError, match="no parameter"):
        with unlearned(subject, ["nope"], FORGET, None, UnlearnConfig()):
            pass
