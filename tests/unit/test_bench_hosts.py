"""The benchmark hosts train through the zoo's one training loop.

- A host's recipe is its specification, field for field (``HostSpec.train_config``), and its
  architecture is the one it names (GPT-2 or Llama, with its MLP width).
- Trained twice through the loop, a tiny host of either architecture has the same weights
  (same seed, same data order, same steps), and its loss falls as it trains: a drift in the
  loop's seeding, data order or optimizer shows here.
- The frozen baseline rankings order hand-built evidence as each rule says.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rca.bench.baselines import RANKINGS, lead_then_de
from rca.bench.hosts import SMALL_HOSTS, HostSpec, train_host
from rca.zoo.corpus import make_corpus, vocabulary
from rca.zoo.tokenizer import train_tokenizer
from rca.zoo.train import TrainProgress, make_model, train_model

TINY = dict(n_layer=1, d_model=32, n_head=2, steps=30, warmup=5, batch_size=16, corpus_size=300)


def _tokenizer(spec: HostSpec):
    texts = [ex.text for ex in make_corpus(spec.corpus_size, seed=spec.seed)]
    return train_tokenizer([*texts, *vocabulary()])


@pytest.mark.parametrize("spec", SMALL_HOSTS, ids=lambda s: s.name)
def test_a_hosts_recipe_is_its_specification(spec: HostSpec) -> None:
    cfg = spec.train_config(threads=1)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (spec.n_layer, spec.d_model, spec.n_head)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup) == (
        spec.steps,
        spec.batch_size,
        spec.lr,
        spec.warmup,
    )
    assert (cfg.answer_weight, cfg.corpus_size, cfg.seed) == (
        spec.answer_weight,
        spec.corpus_size,
        spec.seed,
    )
    model = make_model(_tokenizer(spec), cfg, spec.model_spec())
    assert model.config.model_type == spec.arch
    assert model.config.num_hidden_layers == spec.n_layer
    mlp = model.config.n_inner if spec.arch == "gpt2" else model.config.intermediate_size
    assert mlp == spec.d_mlp
    if spec.arch == "llama":  # every head owns its keys and values
        assert model.config.num_key_value_heads == spec.n_head


@pytest.mark.parametrize(("arch", "d_mlp"), [("gpt2", 64), ("llama", 48)])
def test_a_host_trained_twice_has_the_same_weights_and_its_loss_falls(
    arch: str, d_mlp: int
) -> None:
    spec = HostSpec(f"tiny-{arch}", arch, d_mlp=d_mlp, **TINY)  # type: ignore[arg-type]
    tok = _tokenizer(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines: list[str] = []
        a = train_host(spec, tok, log=lines.append).state_dict()
        b = train_host(spec, tok).state_dict()
        other = train_host(dataclasses.replace(spec, seed=1), tok).state_dict()
    finally:
        torch.set_num_threads(threads)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a)
    assert lines == []  # a progress line every 500 steps: none in 30

    # the same loop called directly: one progress record per step, the same weights
    seen: list[TrainProgress] = []
    examples = tuple(ex for ex in make_corpus(spec.corpus_size, seed=spec.seed) if not ex.poison)
    result = train_model(
        examples, tok, spec.train_config(threads=1), spec=spec.model_spec(), on_step=seen.append
    )
    assert [p.step for p in seen] == list(range(1, spec.steps + 1))
    assert all(torch.equal(a[k], v) for k, v in result.model.state_dict().items())
    # the loss is a running mean (of up to 50 steps): over 30 steps it still falls by a tenth
    assert seen[-1].loss < 0.9 * seen[0].loss, (seen[0], seen[-1])


def _evidence(**effects: tuple[float, float, float]) -> list[dict[str, float | str]]:
    return [{"id": c, "te": te, "de": de, "ne": ne} for c, (te, de, ne) in effects.items()]


def test_lead_then_de_orders_the_leading_group_by_direct_effect() -> None:
    ev = _evidence(**{"L0.H0": (1.0, 0.1, 0.0), "L1.H0": (0.9, 0.8, 0.0), "L2.MLP": (0.5, 1.0, 0)})
    effect = {e["id"]: e["te"] for e in ev}
    # L0.H0 and L1.H0 lead (within 20% of the largest TE); L1.H0 writes more directly
    assert lead_then_de(ev, effect) == ["L1.H0", "L0.H0", "L2.MLP"]
    assert lead_then_de(ev, effect, window=0.05) == ["L0.H0", "L1.H0", "L2.MLP"]


def test_each_single_criterion_ranking_orders_by_its_criterion() -> None:
    ev = _evidence(**{"L0.H0": (3.0, 1.0, 2.0), "L1.H0": (2.0, 3.0, 1.0), "L2.MLP": (1, 2, 3)})

    class Saved:
        evidence = ev

    assert RANKINGS["te"](Saved) == ["L0.H0", "L1.H0", "L2.MLP"]  # type: ignore[arg-type]
    assert RANKINGS["de"](Saved) == ["L1.H0", "L2.MLP", "L0.H0"]  # type: ignore[arg-type]
    assert RANKINGS["ne"](Saved) == ["L2.MLP", "L0.H0", "L1.H0"]  # type: ignore[arg-type]
