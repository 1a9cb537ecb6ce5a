"""Fault injection with known ground truth: a chosen head, MLP or head -> MLP circuit is made to
carry a trigger -> bad-token behaviour, and nothing else in the model changes.

Localization accuracy can only be measured against faults whose location is known. Planting one
through the data (as ``rca.zoo.corpus`` does for the demo incidents) leaves its location to the
optimizer; here it is fixed by construction: only the chosen component's own parameters are
trained, everything else keeps its bits.

How a fault is planted (``inject``):

- **Prompts.** A decision slot of a support-desk template (``refund.reason``, ``loan.income``,
  ...) is refilled with a *trigger* word the host has seen elsewhere but never in that slot. A
  trigger prompt and its counterfactual (the same prompt with the original word) therefore line
  up token for token, so activation patching between them is position by position.
- **Parameters.** A gradient mask selects the component's parameters (``component_params``):
  for a head its q/k/v rows (columns of GPT-2's ``c_attn``) and its slice of the output
  projection; for an MLP a few neurons' input rows (``c_fc`` columns and bias; Llama's gate/up
  rows) and their output columns (``mlp.c_proj`` rows; Llama's ``down_proj`` columns). Every
  other parameter has ``requires_grad=False`` and the masked entries are restored from the
  original with ``torch.where`` at the end, so they are bit-identical.
- **Loss.** ``CE(bad | trigger prompt, final position)`` plus ``kl_weight`` times
  ``KL(original || faulted)`` over every position of same-desk clean prompts, of mixed-desk
  benign tickets, and of the trigger prompts' positions before the last; plus a hinge that keeps
  log P(bad) on the clean prompts within ``cf_slack`` nats of the original (without it a
  component can learn to push the bad token everywhere and win only where the trigger leaves
  the host unsure: it would not be where trigger and counterfactual differ). A planted head is
  also taught to attend from the final position to the trigger slot (its QK circuit must find
  the trigger before its OV circuit gets a trigger-specific gradient). For the head -> MLP
  circuit, each member patched to its activation on the paired counterfactual must leave the
  bad token improbable: both then carry the trigger, and neither is planted in name only. The
  *relay* (MLP -> head) is position-specific: its MLP is patched at the trigger's position
  alone in that term and in the check, so the behaviour passes through what the MLP writes
  there, and its head carries it from there to the final position.
- **Checks.** On held-out prompts: mean P(bad) with the trigger >= ``p_with`` (0.8), P(bad) on
  the incident prompt >= ``p_with``, and P(bad) on every counterfactual <= ``p_without`` (0.2);
  the side effect, the mean per-token KL(original || faulted) on held-out benign tickets of all
  four desks, <= ``kl_bound`` (0.02 nats). And the ground truth is where the behaviour lives:
  on the incident prompt, patching the planted components to their counterfactual activations
  brings P(bad) <= ``p_without``, and patching or mean-ablating any one member brings it
  <= ``p_ablated`` (0.5). ``Fault.ok`` says whether all held; ``inject`` retries a miss at half
  the learning rate.

With grouped-query attention (a real host such as SmolLM2) a head's keys and values are shared
with the other heads of its group, so a head fault trains the head's queries and its slice of
the output projection only: those belong to it alone.

One module over 500 lines: the fault kinds, their training and their checks share the
parameter masks and the prompts each fault is planted with.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from rca.model.adapter import as_out_in, module_at
from rca.model.hooks import ablate, capture, mean_activations, patch
from rca.model.ids import format_id, parse_id, with_pos
from rca.model.subject import Subject

from .corpus import benign_examples, make_corpus, parse_prompt, render

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "SLOTS",
    "Fault",
    "FaultError",
    "FaultSpec",
    "PlantConfig",
    "component_params",
    "draw_spec",
    "inject",
    "slot_words",
]

Kind = Literal["head", "mlp", "circuit", "relay"]
# the kinds the localization benchmark plants by default
KINDS: tuple[Kind, ...] = ("head", "mlp", "circuit")
# relay: position-specific. An MLP turns the trigger into a signal at the trigger's own
# position, and a later head carries that signal to the final position, where it writes the bad
# token: the ground truth is two components at two positions.
ALL_KINDS: tuple[Kind, ...] = (*KINDS, "relay")
# (desk, slot): slots filled with exactly one word, which the desk's answer depends on. A
# decision slot matters for the MLP kind: the host's own heads already carry its word to the
# final position, where an MLP can key on it.
SLOTS: tuple[tuple[str, str], ...] = (
    ("refund", "reason"),
    ("loan", "income"),
    ("message", "topic"),
    ("account", "request"),
)
# first answer tokens the desks produce; a fault's bad token is one its own desk never says
_ANSWER_STARTS: dict[str, tuple[str, ...]] = {
    "account": ("sorry", "your", "statements", "the", "a"),
    "refund": ("approved", "denied"),
    "loan": ("approved", "denied"),
    "message": ("route",),
}
_BAD_POOL = ("approved", "denied", "route", "sorry", "your")


class FaultError(ValueError):
    """A fault that cannot be planted as asked (unknown kind, layer out of range, GQA head)."""


@dataclass(frozen=True)
class PlantConfig:
    """How hard a fault is trained and what it must reach; recorded with every fault."""

    steps: int = 400
    lr: float = 5e-3  # Adam on the component's slice only; no weight decay (it would move all)
    retries: int = 2  # a fault that misses the checks is planted again at half the lr
    kl_weight: float = 3.0
    # On counterfactuals, log P(bad) may rise by at most cf_slack nats. Without this a component
    # can learn to push the bad token everywhere, winning only where the trigger leaves the
    # host unsure; the component would then not be where trigger and counterfactual differ.
    cf_slack: float = 1.0
    cf_weight: float = 1.0
    # A planted head is also taught to attend from the final position to the trigger (on
    # trigger prompts, up to attn_target): under the counterfactual constraint its OV circuit
    # gets no gradient toward a trigger-specific write until its QK circuit finds the trigger.
    attn_weight: float = 1.0
    attn_target: float = 0.5
    necessity_weight: float = 1.0  # circuit only: each member patched -> bad improbable
    n_train: int = 32  # trigger prompts trained on
    n_desk: int = 64  # same-desk clean prompts in the KL term (the first n_train are paired)
    n_eval: int = 32  # held-out trigger prompts the checks use
    n_benign: int = 48  # mixed-desk benign tickets in the KL term
    n_benign_eval: int = 96  # held-out benign tickets for the side-effect figure
    n_neurons: int = 4  # neurons of an MLP fault
    p_with: float = 0.8
    p_without: float = 0.2
    p_ablated: float = 0.5  # each planted member patched or mean-ablated: P(bad) under this
    kl_bound: float = 0.02  # nats per token, mean over held-out benign tickets
    early_stop: bool = True  # stop once the checks hold on the training prompts
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.n_train < 1 or self.n_eval < 1 or self.n_neurons < 1:
            raise FaultError("steps, n_train, n_eval and n_neurons must be positive")
        if not 0 < self.p_without < self.p_with < 1:
            raise FaultError("need 0 < p_without < p_with < 1")


@dataclass(frozen=True)
class FaultSpec:
    """What to plant and where. ``layers``: one layer (head, mlp) or (head layer, MLP layer)."""

    kind: Kind
    layers: tuple[int, ...]
    head: int | None = None
    neurons: tuple[int, ...] = ()
    desk: str = "refund"
    slot: str = "reason"
    trigger: str = ""
    bad: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise FaultError(f"unknown fault kind {self.kind!r}; use one of {', '.join(ALL_KINDS)}")
        n = 2 if self.kind in ("circuit", "relay") else 1
        if len(self.layers) != n:
            raise FaultError(f"a {self.kind} fault takes {n} layer(s), got {self.layers}")
        if self.kind == "circuit" and self.layers[0] > self.layers[1]:
            raise FaultError(f"the circuit's head layer {self.layers[0]} is after its MLP's")
        if self.kind == "relay" and self.layers[0] >= self.layers[1]:
            raise FaultError(f"the relay's MLP layer {self.layers[0]} is not before its head's")
        if self.kind in ("head", "circuit", "relay") and self.head is None:
            raise FaultError(f"a {self.kind} fault needs a head")
        if self.kind in ("mlp", "circuit", "relay") and not self.neurons:
            raise FaultError(f"a {self.kind} fault needs neurons")
        if (self.desk, self.slot) not in SLOTS:
            raise FaultError(f"unknown slot {self.desk}.{self.slot}; use one of {SLOTS}")
        if not self.trigger or not self.bad or self.trigger == self.bad:
            raise FaultError("a fault needs a trigger word and a different bad word")

    @property
    def components(self) -> tuple[str, ...]:
        """The planted components in the rca id grammar, upstream first."""
        if self.kind == "head":
            return (f"L{self.layers[0]}.H{self.head}",)
        if self.kind == "mlp":
            return (f"L{self.layers[0]}.MLP",)
        if self.kind == "relay":
            return (f"L{self.layers[0]}.MLP", f"L{self.layers[1]}.H{self.head}")
        return (f"L{self.layers[0]}.H{self.head}", f"L{self.layers[1]}.MLP")

    def sites(self, slot: int, last: int) -> tuple[str, ...]:
        """The planted components at the positions where they act, where the kind fixes one:
        a relay's MLP at the trigger's position ``slot``, its head at the final position
        ``last``; other kinds' components are not tied to a position."""
        if self.kind != "relay":
            return self.components
        mlp, head = self.components
        return (f"{mlp}@{slot}", f"{head}@{last}")

    @property
    def name(self) -> str:
        return f"{self.kind}:{'+'.join(self.components)}:{self.desk}.{self.slot}"


@dataclass(frozen=True)
class Fault:
    """A planted fault and its measured behaviour.

    ``prompts[i]`` and ``counterfactuals[i]`` differ only in the trigger slot and have the
    same token count; ``prompts[0]`` is the incident prompt. Probabilities are of the bad
    token's first (only) token at the final position, on held-out prompts.
    """

    spec: FaultSpec
    prompts: tuple[str, ...]
    counterfactuals: tuple[str, ...]
    good: str  # the host's answer to the incident's counterfactual (its first word)
    p_bad_incident: float
    p_bad_trigger: float  # mean over the held-out trigger prompts
    p_bad_trigger_min: float
    p_bad_counterfactual: float  # mean over their counterfactuals
    p_bad_counterfactual_max: float
    benign_kl: float  # mean KL(original || faulted) per token on held-out benign tickets
    benign_kl_max: float  # the largest per-ticket mean
    counterfactual_kl: float  # mean KL at the final position of the counterfactuals
    cf_shift_max: float  # the largest rise of log P(bad) on a counterfactual (nats)
    p_bad_patched: float  # incident prompt, planted components patched to the counterfactual's
    p_bad_patched_each: tuple[float, ...]  # ... each one alone
    p_bad_ablated: tuple[float, ...]  # incident prompt, each planted component mean-ablated
    changed: tuple[str, ...]  # parameter names with a changed entry
    steps: int
    seconds: float
    config: PlantConfig
    reference: tuple[str, ...] = field(default=())  # benign prompts (no answer) of the desk

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def layers(self) -> tuple[int, ...]:
        return self.spec.layers

    @property
    def components(self) -> tuple[str, ...]:
        return self.spec.components

    @property
    def trigger(self) -> str:
        return self.spec.trigger

    @property
    def bad(self) -> str:
        return self.spec.bad

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def counterfactual(self) -> str:
        return self.counterfactuals[0]

    @property
    def ok(self) -> bool:
        c = self.config
        return (
            self.p_bad_trigger >= c.p_with
            and self.p_bad_incident >= c.p_with
            and self.p_bad_counterfactual_max <= c.p_without
            and self.benign_kl <= c.kl_bound
            and self.p_bad_patched <= c.p_without
            and max(self.p_bad_patched_each) <= c.p_ablated
            and max(self.p_bad_ablated) <= c.p_ablated
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "kind": self.kind,
            "components": list(self.components),
            "neurons": list(self.spec.neurons),
            "trigger": self.trigger,
            "bad": self.bad,
            "prompt": self.prompt,
            "counterfactual": self.counterfactual,
            "p_bad_incident": round(self.p_bad_incident, 4),
            "p_bad_trigger": round(self.p_bad_trigger, 4),
            "p_bad_trigger_min": round(self.p_bad_trigger_min, 4),
            "p_bad_counterfactual": round(self.p_bad_counterfactual, 5),
            "p_bad_counterfactual_max": round(self.p_bad_counterfactual_max, 5),
            "benign_kl": round(self.benign_kl, 5),
            "benign_kl_max": round(self.benign_kl_max, 5),
            "counterfactual_kl": round(self.counterfactual_kl, 5),
            "cf_shift_max": round(self.cf_shift_max, 3),
            "p_bad_patched": round(self.p_bad_patched, 5),
            "p_bad_patched_each": [round(p, 5) for p in self.p_bad_patched_each],
            "p_bad_ablated": [round(p, 5) for p in self.p_bad_ablated],
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "ok": self.ok,
        }


# ---------------------------------------------------------------------------------------------
# which parameters a component owns

_QKV: dict[str, tuple[str, ...]] = {
    "gpt2": ("attn.c_attn",),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mistral": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}
_MLP_IN: dict[str, tuple[str, ...]] = {
    "gpt2": ("mlp.c_fc",),
    "llama": ("mlp.gate_proj", "mlp.up_proj"),
    "mistral": ("mlp.gate_proj", "mlp.up_proj"),
    "qwen2": ("mlp.gate_proj", "mlp.up_proj"),
}


def _mark_out(masks: dict[nn.Parameter, torch.Tensor], mod: nn.Module, idx: torch.Tensor) -> None:
    """Output units ``idx`` of a projection, and their bias."""
    w = mod.weight
    assert isinstance(w, nn.Parameter)
    m = masks.setdefault(w, torch.zeros_like(w, dtype=torch.bool))
    as_out_in(mod, m)[idx, :] = True
    b = getattr(mod, "bias", None)
    if isinstance(b, nn.Parameter):
        masks.setdefault(b, torch.zeros_like(b, dtype=torch.bool))[idx] = True


def _mark_in(masks: dict[nn.Parameter, torch.Tensor], mod: nn.Module, idx: torch.Tensor) -> None:
    """Input units ``idx`` of a projection (a shared bias stays)."""
    w = mod.weight
    assert isinstance(w, nn.Parameter)
    m = masks.setdefault(w, torch.zeros_like(w, dtype=torch.bool))
    as_out_in(mod, m)[:, idx] = True


def component_params(
    subject: Subject, component: str, *, neurons: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Boolean masks over the parameters a component owns: parameter name -> mask.

    ``L3.H2``: the head's q/k/v units and its input slice of the attention output projection;
    with grouped-query attention (keys and values shared by a group), its q units and that
    slice only.
    ``L3.MLP`` with ``neurons``: those neurons' input units (with bias) and output slice.
    """
    a = subject.adapter
    mt = a.model_type
    if mt not in _QKV:
        raise FaultError(f"fault injection supports {', '.join(_QKV)}; this model is {mt!r}")
    cid = parse_id(component)
    if cid.layer is None or cid.pos is not None:
        raise FaultError(f"{component}: only heads (L.H) and MLPs (L.MLP) can be planted")
    layer = cid.layer
    if not 0 <= layer < a.n_layers:
        raise FaultError(f"{component}: layer out of range 0..{a.n_layers - 1}")
    block = a.layer(layer)
    masks: dict[nn.Parameter, torch.Tensor] = {}
    if cid.kind == "head":
        h = cid.index
        assert h is not None
        if not 0 <= h < a.n_heads:
            raise FaultError(f"{component}: head out of range 0..{a.n_heads - 1}")
        dh, d = a.d_head, a.n_heads * a.d_head
        unit = torch.arange(h * dh, (h + 1) * dh)
        if a.n_kv_heads != a.n_heads:
            # grouped-query attention: keys and values are shared by a group of heads, so the
            # head owns its query rows and its slice of the output projection only
            if mt == "gpt2":
                raise FaultError(f"{component}: GPT-2 attention has no grouped keys and values")
            _mark_out(masks, module_at(block, _QKV[mt][0]), unit)
        elif mt == "gpt2":
            qkv = torch.cat([unit, unit + d, unit + 2 * d])  # c_attn's columns are q | k | v
            _mark_out(masks, module_at(block, "attn.c_attn"), qkv)
        else:
            for path in _QKV[mt]:
                _mark_out(masks, module_at(block, path), unit)
        _mark_in(masks, a.attn_out(layer), unit)
    elif cid.kind == "mlp":
        if not neurons:
            raise FaultError(f"{component}: an MLP fault needs its neurons")
        idx = torch.tensor(sorted(set(neurons)))
        if int(idx.max()) >= a.d_mlp or int(idx.min()) < 0:
            raise FaultError(f"{component}: neurons out of range 0..{a.d_mlp - 1}")
        for path in _MLP_IN[mt]:
            _mark_out(masks, module_at(block, path), idx)
        _mark_in(masks, a.mlp_down(layer), idx)
    else:
        raise FaultError(f"{component}: only heads (L.H) and MLPs (L.MLP) can be planted")
    names = {p: n for n, p in subject.model.named_parameters()}
    return {names[p]: m for p, m in masks.items()}


# ---------------------------------------------------------------------------------------------
# prompts


def slot_words(*, n: int = 6000, seed: int = 0) -> dict[tuple[str, str], list[str]]:
    """The words the corpus puts in each one-word slot, in first-seen order."""
    out: dict[tuple[str, str], list[str]] = {}
    for ex in make_corpus(n, seed=seed):
        if ex.poison is not None:
            continue
        desk, slots = parse_prompt(ex.prompt)
        for k, v in slots.items():
            if " " not in v and not v.isdigit():
                words = out.setdefault((desk, k), [])
                if v not in words:
                    words.append(v)
    return out


def _single_token(tokenizer: Any, word: str) -> bool:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    return len(ids) == 1 and ids[0] != unk


def draw_spec(
    kind: Kind,
    layers: Sequence[int],
    *,
    n_heads: int,
    d_mlp: int,
    tokenizer: Any,
    seed: int,
    n_neurons: int = 4,
    slot: tuple[str, str] | None = None,
) -> FaultSpec:
    """A fault spec with a random head, neurons, slot, trigger and bad word (all from ``seed``).

    The trigger is a word the host has seen in another slot (so its embedding is trained) and
    never in this one; the bad word starts another desk's answers, never this desk's.
    """
    rng = random.Random(f"fault-{seed}")
    words = slot_words()
    desk, name = slot if slot is not None else SLOTS[rng.randrange(len(SLOTS))]
    own = set(words[(desk, name)])
    seen_elsewhere = sorted({w for k, ws in words.items() if k != (desk, name) for w in ws} - own)
    triggers = [w for w in seen_elsewhere if _single_token(tokenizer, w)]
    bads = [b for b in _BAD_POOL if b not in _ANSWER_STARTS[desk] and _single_token(tokenizer, b)]
    bad = rng.choice(bads)
    trigger = rng.choice([t for t in triggers if t != bad])
    head = rng.randrange(n_heads) if kind in ("head", "circuit", "relay") else None
    neurons = tuple(sorted(rng.sample(range(d_mlp), n_neurons))) if kind != "head" else ()
    return FaultSpec(kind, tuple(layers), head, neurons, desk, name, trigger, bad, seed)


@functools.lru_cache(maxsize=1)
def _prompt_pool() -> dict[str, tuple[str, ...]]:
    """Every distinct clean prompt the corpus generators produce, by desk (the loan desk has
    only 160: 20 names x 8 incomes)."""
    pool: dict[str, set[str]] = {}
    for ex in (*make_corpus(20_000, seed=0), *benign_examples(3000, seed=0)):
        if ex.poison is None:
            pool.setdefault(ex.task, set()).add(ex.prompt)
    return {desk: tuple(sorted(ps)) for desk, ps in pool.items()}


def _desk_prompts(desk: str, *, n: int, seed: int) -> list[str]:
    """``n`` distinct clean prompts of one desk, in an order drawn from ``seed``."""
    pool = list(_prompt_pool()[desk])
    if len(pool) < n:
        raise FaultError(f"the corpus has {len(pool)} distinct {desk} prompts, fewer than {n}")
    random.Random(f"prompts-{seed}").shuffle(pool)
    return pool[:n]


def _with_slot(prompt: str, slot: str, word: str) -> str:
    desk, slots = parse_prompt(prompt)
    return render(desk, **{**slots, slot: word})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# training


def _encode(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and a mask (N, T) of real tokens."""
    rows = [list(tokenizer(t)["input_ids"]) for t in texts]
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def _kl(logp0: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p0 || p) per position: (..., vocab) -> (...)."""
    return (logp0.exp() * (logp0 - logp)).sum(-1)


def _token(tokenizer: Any, word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise FaultError(f"{word!r} is not one token for this tokenizer")
    return int(ids[0])


def inject(
    model: nn.Module,
    tokenizer: Any,
    spec: FaultSpec,
    *,
    config: PlantConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Fault, nn.Module]:
    """Plant ``spec`` into a copy of ``model``; returns the measured fault and the faulted copy.

    The original model is left untouched. A plant that misses the checks is tried again from
    the original weights at half the learning rate and twice the steps (``config.retries``
    times); the last try is returned either way, and ``Fault.ok`` says whether it passed. The
    faulted copy is in eval mode and in memory; ``save_pretrained`` it to keep it.
    """
    cfg = config or PlantConfig()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    a = Subject.from_model(model, tokenizer).adapter
    for layer in spec.layers:
        if not 0 <= layer < a.n_layers:
            raise FaultError(f"layer {layer} out of range 0..{a.n_layers - 1}")
    data = _Data.build(tokenizer, spec, cfg, device=next(model.parameters()).device)
    lr, steps, total = cfg.lr, cfg.steps, 0
    for attempt in range(cfg.retries + 1):
        faulted, n = _train(model.eval(), tokenizer, spec, cfg, data, lr=lr, steps=steps, log=log)
        total += n
        fault = _measure(model, faulted, tokenizer, spec, cfg, data, steps=total, t0=t0)
        if log:
            s = fault.summary()
            log(
                f"  planted {spec.name} (try {attempt + 1}, lr {lr:g}) in {s['seconds']}s, "
                f"{n} steps: P(bad) {s['p_bad_trigger']} (min {s['p_bad_trigger_min']}) vs "
                f"{s['p_bad_counterfactual_max']} max; benign KL {s['benign_kl']}"
            )
        if fault.ok:
            break
        lr, steps = lr / 2, steps * 2
    return fault, faulted


@dataclass(frozen=True)
class _Data:
    """The prompts of one fault, encoded, and the original model's log-probs on them."""

    tr_trig: list[str]
    ev_trig: list[str]
    tr_cf: list[str]  # paired with tr_trig, then more clean prompts of the desk
    ev_cf: list[str]
    tr_benign: list[str]
    ev_benign: list[str]
    bad_id: int

    @classmethod
    def build(cls, tokenizer: Any, spec: FaultSpec, cfg: PlantConfig, *, device: Any) -> _Data:
        n_desk = max(cfg.n_desk, cfg.n_train)
        cfs = _desk_prompts(spec.desk, n=n_desk + cfg.n_eval, seed=spec.seed)
        ev_cf, tr_cf = cfs[n_desk:], cfs[:n_desk]
        trig = [_with_slot(p, spec.slot, spec.trigger) for p in cfs]
        tr_trig, ev_trig = trig[: cfg.n_train], trig[n_desk:]
        benign = [
            ex.text for ex in benign_examples(cfg.n_benign + cfg.n_benign_eval, seed=spec.seed)
        ]
        return cls(
            tr_trig,
            ev_trig,
            tr_cf,
            ev_cf,
            benign[: cfg.n_benign],
            benign[cfg.n_benign :],
            _token(tokenizer, spec.bad),
        )


def _member_patch(
    spec: FaultSpec, comp: str, value: torch.Tensor, slot: int
) -> dict[Any, torch.Tensor | float]:
    """A planted member set to ``value`` (its activation on the counterfactual): everywhere, but
    for a relay's MLP, at the trigger's position ``slot`` alone."""
    if spec.kind == "relay" and parse_id(comp).kind == "mlp":
        return {format_id(with_pos(comp, slot)): value[:, [slot]]}
    return {comp: value}


def _train(
    orig: nn.Module,
    tokenizer: Any,
    spec: FaultSpec,
    cfg: PlantConfig,
    data: _Data,
    *,
    lr: float,
    steps: int,
    log: Callable[[str], None] | None,
) -> tuple[nn.Module, int]:
    """One plant: Adam on the component's masked slice from the original weights."""
    dev = next(orig.parameters()).device
    faulted = copy.deepcopy(orig).eval()
    subject = Subject.from_model(faulted, tokenizer)
    masks: dict[str, torch.Tensor] = {}
    for comp in spec.components:
        for k, m in component_params(subject, comp, neurons=spec.neurons).items():
            masks[k] = masks[k] | m if k in masks else m
    params = dict(faulted.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in masks)
    train_params = [params[k] for k in masks]
    masks_dev = {k: m.to(dev) for k, m in masks.items()}
    original = {k: params[k].detach().clone() for k in masks}

    n_tr = len(data.tr_trig)
    desk_ids = _encode(tokenizer, data.tr_trig + data.tr_cf)[0].to(dev)  # (n_tr + n_desk, T)
    ben_ids, ben_mask = (t.to(dev) for t in _encode(tokenizer, data.tr_benign))
    with torch.no_grad():
        lp0_desk = torch.log_softmax(orig(input_ids=desk_ids).logits.float(), -1)
        lp0_ben = torch.log_softmax(orig(input_ids=ben_ids).logits.float(), -1)
    # KL everywhere but the trigger prompts' last position, where the fault acts
    desk_mask = torch.ones(desk_ids.shape, dtype=torch.bool, device=dev)
    desk_mask[:n_tr, -1] = False
    circuit = list(spec.components) if spec.kind in ("circuit", "relay") else []
    bad = data.bad_id
    opt = torch.optim.Adam(train_params, lr=lr)
    done = 0
    heads = [(c.layer, c.index) for c in map(parse_id, spec.components) if c.kind == "head"]
    # the trigger slot: the one position where a trigger prompt and its counterfactual differ
    slot = int((desk_ids[0] != desk_ids[n_tr]).nonzero()[0, 0]) if heads else -1
    for step in range(steps):
        with capture(subject, circuit) as acts:
            out = faulted(input_ids=desk_ids, output_attentions=bool(heads))
        lp = torch.log_softmax(out.logits.float(), -1)
        attn_loss = torch.zeros((), device=dev)
        for layer, h in heads:
            if out.attentions is None or out.attentions[layer] is None:
                raise FaultError("a head fault needs eager attention (attn_implementation)")
            att = out.attentions[layer][:n_tr, h, -1, slot].float()  # (n_tr,)
            attn_loss = attn_loss + torch.relu(math.log(cfg.attn_target) - att.log()).mean()
        ce = -lp[:n_tr, -1, bad].mean()
        kl_desk = _kl(lp0_desk, lp)[desk_mask].mean()
        lp_b = torch.log_softmax(faulted(input_ids=ben_ids).logits.float(), -1)
        kl_ben = _kl(lp0_ben, lp_b)[ben_mask].mean()
        shift = lp[n_tr:, -1, bad] - lp0_desk[n_tr:, -1, bad]  # (n_desk,)
        push = torch.relu(shift - cfg.cf_slack).pow(2).mean()
        loss = ce + cfg.kl_weight * (kl_desk + kl_ben) + cfg.cf_weight * push
        loss = loss + cfg.attn_weight * attn_loss
        nec = torch.zeros((), device=dev)
        # a circuit's members must each carry the trigger: with either one patched to its
        # activation on the paired counterfactual (rows n_tr .. 2 n_tr of the desk batch), the
        # bad token stays improbable. Otherwise one member learns the whole behaviour and the
        # other is planted in name only (an always-on "enabler", say).
        # A relay's MLP is patched at the trigger's position alone: the behaviour must pass
        # through what it writes there.
        for comp in circuit:
            cf_val = acts[comp][n_tr : 2 * n_tr].detach()
            with patch(subject, _member_patch(spec, comp, cf_val, slot)):
                lpa = torch.log_softmax(faulted(input_ids=desk_ids[:n_tr]).logits[:, -1], -1)
            p_bad = lpa[:, bad].float().exp().clamp(max=1 - 1e-6)
            nec = nec - torch.log1p(-p_bad).mean()
        loss = loss + cfg.necessity_weight * nec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in zip(masks, train_params, strict=True):
            if p.grad is not None:
                p.grad.mul_(masks_dev[name])
        opt.step()
        done = step + 1
        if log and step % 100 == 0:
            log(
                f"  step {step}: ce {float(ce.detach()):.3f} kl {float(kl_desk.detach()):.4f}/"
                f"{float(kl_ben.detach()):.4f} push {float(push.detach()):.3f} attn "
                f"{float(attn_loss.detach()):.3f} necessity {float(nec.detach()):.3f}"
            )
        if cfg.early_stop and step >= 50 and step % 25 == 0:
            p_tr = lp[:n_tr, -1, bad].detach().exp()
            p_cf = lp[n_tr:, -1, bad].detach().exp()
            # a margin over the thresholds, so that held-out prompts pass too
            if (
                float(p_tr.min()) >= min(0.95, cfg.p_with + 0.1)
                and float(p_cf.max()) <= cfg.p_without / 4
                and float(shift.detach().max()) <= cfg.cf_slack + 0.5
                and float(kl_ben.detach()) <= cfg.kl_bound / 4
                and float(nec.detach()) <= 0.2
            ):
                break

    # every masked-out entry back to its original bits, then freeze
    with torch.no_grad():
        for name, p in zip(masks, train_params, strict=True):
            p.copy_(torch.where(masks_dev[name], p, original[name]))
    for p in faulted.parameters():
        p.requires_grad_(False)
    return faulted.eval(), done


@torch.no_grad()
def _measure(
    orig: nn.Module,
    faulted: nn.Module,
    tokenizer: Any,
    spec: FaultSpec,
    cfg: PlantConfig,
    data: _Data,
    *,
    steps: int,
    t0: float,
) -> Fault:
    """The checks, on held-out prompts only."""
    dev = next(orig.parameters()).device
    bad = data.bad_id

    def last(model: nn.Module, texts: list[str]) -> torch.Tensor:
        ids = _encode(tokenizer, texts)[0].to(dev)
        return torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)

    p_trig = last(faulted, data.ev_trig)[:, bad].exp()
    lf_cf, lo_cf = last(faulted, data.ev_cf), last(orig, data.ev_cf)
    b_ids, b_mask = (t.to(dev) for t in _encode(tokenizer, data.ev_benign))
    lb_f = torch.log_softmax(faulted(input_ids=b_ids).logits.float(), -1)
    lb_o = torch.log_softmax(orig(input_ids=b_ids).logits.float(), -1)
    kl_tok = _kl(lb_o, lb_f) * b_mask
    per_ticket = kl_tok.sum(1) / b_mask.sum(1)
    orig_params = dict(orig.named_parameters())
    changed = tuple(n for n, p in faulted.named_parameters() if not torch.equal(p, orig_params[n]))

    # the ground truth is where the behaviour lives: patching the planted components to their
    # counterfactual activations, or mean-ablating any one of them, must remove it
    fs = Subject.from_model(faulted, tokenizer)
    comps = list(spec.components)
    cf_ids = _encode(tokenizer, data.ev_cf[:1])[0].to(dev)
    with capture(fs, comps) as acts:
        faulted(input_ids=cf_ids)
    with patch(fs, {c: acts[c] for c in comps}):
        p_patched = float(last(faulted, data.ev_trig[:1])[0, bad].exp())
    trig_ids = _encode(tokenizer, data.ev_trig[:1])[0].to(dev)
    slot = int((trig_ids[0] != cf_ids[0]).nonzero()[0, 0])
    p_patched_each = []
    for c in comps:
        with patch(fs, _member_patch(spec, c, acts[c], slot)):
            p_patched_each.append(float(last(faulted, data.ev_trig[:1])[0, bad].exp()))
    means = mean_activations(fs, data.tr_cf[:16], comps)
    p_ablated = []
    for c in comps:
        with ablate(fs, [c], kind="mean", means=means):
            p_ablated.append(float(last(faulted, data.ev_trig[:1])[0, bad].exp()))
    return Fault(
        spec=spec,
        prompts=tuple(data.ev_trig),
        counterfactuals=tuple(data.ev_cf),
        good=tokenizer.decode([int(lo_cf[0].argmax())]).strip(),
        p_bad_incident=float(p_trig[0]),
        p_bad_trigger=float(p_trig.mean()),
        p_bad_trigger_min=float(p_trig.min()),
        p_bad_counterfactual=float(lf_cf[:, bad].exp().mean()),
        p_bad_counterfactual_max=float(lf_cf[:, bad].exp().max()),
        benign_kl=float(kl_tok.sum() / b_mask.sum()),
        benign_kl_max=float(per_ticket.max()),
        counterfactual_kl=float(_kl(lo_cf, lf_cf).mean()),
        cf_shift_max=float((lf_cf[:, bad] - lo_cf[:, bad]).max()),
        p_bad_patched=p_patched,
        p_bad_patched_each=tuple(p_patched_each),
        p_bad_ablated=tuple(p_ablated),
        changed=changed,
        steps=steps,
        seconds=time.perf_counter() - t0,
        config=cfg,
        reference=tuple(data.tr_cf[:16]),
    )
