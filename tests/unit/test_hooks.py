"""Hooks never outlive their block (captum's ``test_hook_removal`` idea), and edits mean what
they say.

No hook may survive a normal exit, a bad component id (which must be refused before anything is
registered), or a forward pass that raises; afterwards the model computes what it did before.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from torch import nn

from rca.model.adapter import out_in_weight
from rca.model.hooks import HookError, ablate, capture, mean_activations, patch, top_mlp_trimmed
from rca.model.ids import IdError
from rca.model.subject import Subject
from tests.helpers import ARCHS, VOCAB, module, one_thread, tiny_model, word_tokenizer, words

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def live_hooks(model: nn.Module) -> list[str]:
    """Every hook registered anywhere on the model, or globally, as 'module:dict' strings."""
    found = [
        f"{name or '<root>'}:{d}"
        for name, mod in model.named_modules()
        for d in HOOK_DICTS
        if getattr(mod, d, None)
    ]
    found += [g for g in GLOBAL_HOOKS if getattr(nn.modules.module, g, None)]
    return found


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def subject(request: pytest.FixtureRequest) -> Subject:
    s = Subject.from_model(tiny_model(request.param), word_tokenizer())
    assert live_hooks(s.model) == []  # the baseline: a fresh model carries no hooks
    return s


g = torch.Generator().manual_seed(0)
X = torch.randint(4, VOCAB, (2, 6), generator=g)
Y = torch.randint(4, VOCAB, (2, 6), generator=g)


def logits(s: Subject, ids: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return s.model(input_ids=ids).logits


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


# --- no hook survives -------------------------------------------------------------------------

ALL_KINDS = [
    "EMB",
    "LOGITS",
    "L0.H1",
    "L1.ATTN",
    "L0.MLP",
    "L1.N7",
    "L0.RESID_PRE",
    "L1.RESID_POST",
]
EDITABLE = [c for c in ALL_KINDS if c != "LOGITS"]
Ctx = Callable[[Subject], AbstractContextManager[Any]]

GOOD_BLOCKS: dict[str, Ctx] = {
    "capture": lambda s: capture(s, ALL_KINDS),
    "capture-positions": lambda s: capture(s, ["L0.H1@2", "L1.N7@0", "L0.H1"]),
    "patch": lambda s: patch(s, {c: 0.5 for c in EDITABLE}),
    "patch-positions": lambda s: patch(s, {"L0.H1": 1.0, "L1.MLP@3": 0.0}, positions=[1, 2]),
    "ablate-zero": lambda s: ablate(s, EDITABLE),
    "ablate-values": lambda s: ablate(s, ["L0.H1"], kind="values", values={"L0.H1": 2.0}),
    "ablate-mean": lambda s: ablate(
        s,
        ["L0.H1", "L1.N7"],
        kind="mean",
        means=mean_activations(s, [[5, 6, 7]], ["L0.H1", "L1.N7"]),
    ),
}


@pytest.mark.parametrize("block", sorted(GOOD_BLOCKS))
def test_no_hook_survives_a_normal_exit(subject: Subject, block: str) -> None:
    before = logits(subject)
    with GOOD_BLOCKS[block](subject):
        assert live_hooks(subject.model), "the block registered no hook at all"
        logits(subject)
    assert live_hooks(subject.model) == []
    assert torch.equal(logits(subject), before)


def test_one_hook_per_module_and_direction(subject: Subject) -> None:
    """Ids sharing a site share one hook: nothing is registered twice on a module."""
    with capture(subject, ["L0.H0", "L0.H1", "L0.H1@3", "L0.ATTN", "L0.N1", "L0.N2"]):
        assert sorted(live_hooks(subject.model)) == sorted(
            [
                f"{name}:{d}"
                for name, d in [
                    (_name(subject, subject.adapter.attn_out(0)), "_forward_pre_hooks"),
                    (_name(subject, subject.adapter.attn_out(0)), "_forward_pre_hooks_with_kwargs"),
                    (_name(subject, subject.adapter.attn_out(0)), "_forward_hooks"),
                    (_name(subject, subject.adapter.mlp_down(0)), "_forward_pre_hooks"),
                    (_name(subject, subject.adapter.mlp_down(0)), "_forward_pre_hooks_with_kwargs"),
                ]
            ]
        )
        assert len(subject.adapter.attn_out(0)._forward_pre_hooks) == 1


def _name(s: Subject, mod: nn.Module) -> str:
    return next(n for n, m in s.model.named_modules() if m is mod)


BAD: list[tuple[str, Ctx, type[Exception], str]] = [
    ("layer out of range", lambda s: capture(s, ["L0.H0", "L9.H0"]), HookError, "L9.H0"),
    ("layer == n_layers", lambda s: capture(s, ["L0.MLP", "L2.MLP"]), HookError, "L2.MLP"),
    ("head out of range", lambda s: capture(s, ["L0.MLP", "L0.H99"]), HookError, "L0.H99"),
    ("head == n_heads", lambda s: patch(s, {"L0.MLP": 0.0, "L1.H4": 0.0}), HookError, "L1.H4"),
    ("neuron == d_mlp", lambda s: ablate(s, ["L0.H0", "L0.N64"]), HookError, "L0.N64"),
    ("malformed id", lambda s: capture(s, ["L0.H0", "L1.X"]), IdError, "L1.X"),
    ("lowercase id", lambda s: ablate(s, ["L0.H0", "l1.h0"]), IdError, "l1.h0"),
    ("non-string id", lambda s: capture(s, ["L0.H0", 3]), IdError, "int"),
    ("LOGITS ablated", lambda s: ablate(s, ["L0.H0", "LOGITS"]), HookError, "LOGITS"),
    ("LOGITS patched", lambda s: patch(s, {"L0.H0": 0.0, "LOGITS": 0.0}), HookError, "LOGITS"),
    ("unknown kind", lambda s: ablate(s, ["L0.H0"], kind="bogus"), HookError, "bogus"),
    ("mean without means", lambda s: ablate(s, ["L0.H0"], kind="mean"), HookError, "L0.H0"),
    (
        "mean missing one id",
        lambda s: ablate(s, ["L0.H0", "L1.H1"], kind="mean", means={"L0.H0": torch.zeros(8)}),
        HookError,
        "L1.H1",
    ),
    ("values missing", lambda s: ablate(s, ["L0.MLP"], kind="values"), HookError, "L0.MLP"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_a_bad_id_is_refused_before_any_hook_is_registered(
    subject: Subject, case: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, make, error, names = case
    registered: list[str] = []
    for meth in ("register_forward_hook", "register_forward_pre_hook"):
        orig = getattr(nn.Module, meth)

        def spy(self, *a, _orig=orig, _meth=meth, **kw):
            registered.append(_meth)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(nn.Module, meth, spy)
    before = logits(subject)
    body_ran = False
    with pytest.raises(error) as info:
        with make(subject):
            body_ran = True
    assert not body_ran
    assert registered == []
    assert live_hooks(subject.model) == []
    msg = str(info.value)
    assert names in msg and "\n" not in msg
    assert torch.equal(logits(subject), before)


RAISING_BLOCKS: dict[str, Ctx] = {
    k: GOOD_BLOCKS[k] for k in ("capture", "patch", "ablate-zero", "ablate-mean")
}


class Boom(Exception):
    pass


@pytest.mark.parametrize("block", sorted(RAISING_BLOCKS))
def test_no_hook_survives_an_exception_in_the_block(subject: Subject, block: str) -> None:
    before = logits(subject)
    with pytest.raises(Boom):
        with RAISING_BLOCKS[block](subject):
            logits(subject)
            raise Boom
    assert live_hooks(subject.model) == []
    assert torch.equal(logits(subject), before)


@pytest.mark.parametrize("block", sorted(RAISING_BLOCKS))
def test_no_hook_survives_a_module_that_raises(
    subject: Subject, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = logits(subject)

    def explode(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise Boom("final norm failed")

    # the raise happens mid-forward, after the hooked layers have run
    monkeypatch.setattr(subject.adapter.final_norm, "forward", explode)
    with pytest.raises(Boom):
        with RAISING_BLOCKS[block](subject):
            logits(subject)
    monkeypatch.undo()
    assert live_hooks(subject.model) == []
    assert torch.equal(logits(subject), before)


def test_no_hook_survives_nested_blocks_and_a_keyboard_interrupt(subject: Subject) -> None:
    before = logits(subject)
    with pytest.raises(KeyboardInterrupt):
        with ablate(subject, ["L1.H0"]), capture(subject, ALL_KINDS), patch(subject, {"EMB": 0.1}):
            logits(subject)
            raise KeyboardInterrupt
    assert live_hooks(subject.model) == []
    assert torch.equal(logits(subject), before)


def test_no_hook_survives_an_edit_that_fails_inside_the_hook(subject: Subject) -> None:
    before = logits(subject)
    with pytest.raises(RuntimeError):  # a (3,) value cannot broadcast to (batch, pos, d_head)
        with patch(subject, {"L1.H0": torch.zeros(3)}), capture(subject, ["L0.MLP"]):
            logits(subject)
    assert live_hooks(subject.model) == []
    assert torch.equal(logits(subject), before)


# --- edits mean what they say -----------------------------------------------------------------


def test_patched_neuron_is_what_the_down_projection_reads(subject: Subject) -> None:
    down = subject.adapter.mlp_down(0)
    with capture(subject, ["L0.N5", "L0.N6", "L0.MLP"]) as base:
        logits(subject)
    with patch(subject, {"L0.N5": 3.0}, positions=[1, 3]):
        with capture(subject, ["L0.N5", "L0.N6", "L0.MLP", "L1.RESID_PRE"]) as acts:
            got = logits(subject)
    n5 = base["L0.N5"].clone()
    n5[:, [1, 3]] = 3.0
    assert torch.equal(acts["L0.N5"], n5)
    assert torch.equal(acts["L0.N6"], base["L0.N6"])
    # the MLP output moves by (3 - old) times neuron 5's output direction, at those positions
    w5 = out_in_weight(down)[:, 5]
    shift = (n5 - base["L0.N5"]).unsqueeze(-1) * w5
    torch.testing.assert_close(acts["L0.MLP"], base["L0.MLP"] + shift, atol=1e-5, rtol=1e-5)
    assert differs(got, logits(subject))


def test_ablating_two_heads_equals_zeroing_both_weight_slices(subject: Subject) -> None:
    ad = subject.adapter
    with ablate(subject, ["L1.H0", "L1.H3"]):
        got = logits(subject)
    with ablate(subject, ["L1.H3", "L1.H0"]):
        assert torch.equal(logits(subject), got)
    ref = copy.deepcopy(subject.model)
    proj = module(ref, _name(subject, ad.attn_out(1)))
    with torch.no_grad():
        for h in (0, 3):
            sl = slice(h * ad.d_head, (h + 1) * ad.d_head)
            out_in_weight(proj)[:, sl] = 0
        want = ref(input_ids=X).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert differs(got, logits(subject))


def test_a_capture_inside_an_ablation_sees_the_edit(subject: Subject) -> None:
    with capture(subject, ["L1.H1", "L1.H2"]) as base:
        logits(subject)
    with ablate(subject, ["L1.H2"]), capture(subject, ["L1.H1", "L1.H2"]) as acts:
        logits(subject)
    assert torch.equal(acts["L1.H2"], torch.zeros_like(base["L1.H2"]))
    assert torch.equal(acts["L1.H1"], base["L1.H1"])


def test_an_edit_never_writes_into_a_tensor_someone_else_holds(subject: Subject) -> None:
    """A capture made before an edit keeps the model's own values: the edit works on a copy."""
    # same site: the capture's hook runs first and holds the tensor the patch then edits;
    # next site: L1.RESID_PRE is the very tensor layer 0 returned (captured as L0.RESID_POST)
    for cid, edited in [("L1.H2", "L1.H2"), ("L0.RESID_POST", "L1.RESID_PRE")]:
        with capture(subject, [cid]) as base:
            logits(subject)
        with capture(subject, [cid]) as outer, patch(subject, {edited: 0.5}):
            logits(subject)
        assert torch.equal(outer[cid], base[cid]), cid


def test_values_ablation_equals_patching_those_values(subject: Subject) -> None:
    with capture(subject, ["L0.MLP"]) as other:
        logits(subject, Y)
    vals = {"L0.MLP": other["L0.MLP"]}
    with ablate(subject, ["L0.MLP"], kind="values", values=vals):
        got = logits(subject)
    with patch(subject, vals):
        assert torch.equal(logits(subject), got)
    assert differs(got, logits(subject))


def test_gradient_through_a_kept_capture_predicts_a_small_patch(subject: Subject) -> None:
    """keep_graph=True puts the site tensor on the graph: its gradient is the first-order effect
    of an edit made with ``patch`` (attribution patching on a double-precision copy)."""
    s = Subject.from_model(copy.deepcopy(subject.model).double())
    target = (0, 4, 17)  # (batch, pos, token) of the logit we follow
    with capture(s, ["L0.H2"], keep_graph=True) as acts:
        out = s.model(input_ids=X).logits[target]
    z = acts.site_tensor("L0.H2")
    assert z.requires_grad
    (grad,) = torch.autograd.grad(out, z)
    with capture(s, ["L0.H2"]) as plain:
        s.model(input_ids=X)
    assert not plain["L0.H2"].requires_grad

    d_head = s.adapter.d_head
    direction = torch.randn(
        X.shape[0],
        X.shape[1],
        d_head,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    # Llama's RMSNorm computes in float32 even in a double model: eps must stay well above its
    # rounding, and the central difference keeps the truncation error (eps^2) below the tolerance
    eps = 1e-3
    moved = []
    for sign in (1, -1):  # a central difference: its error is third order in eps
        with patch(s, {"L0.H2": acts["L0.H2"].detach() + sign * eps * direction}):
            with torch.no_grad():
                moved.append(s.model(input_ids=X).logits[target])
    predicted = eps * (grad[..., 2 * d_head : 3 * d_head] * direction).sum()
    torch.testing.assert_close((moved[0] - moved[1]) / 2, predicted, rtol=2e-3, atol=1e-9)
    assert predicted.abs() > 1e-6


def test_mean_activations_of_strings_equal_those_of_their_tokens(subject: Subject) -> None:
    texts = [words(1, 2, 3), words(4, 5, 6, 7, 8)]
    toks = [subject.tokenizer(t)["input_ids"] for t in texts]
    assert toks[0][0] == subject.tokenizer.bos_token_id and len(toks[1]) == 6
    for per_position in (False, True):
        a = mean_activations(subject, texts, ["L1.H0", "L0.N3"], per_position=per_position)
        b = mean_activations(subject, toks, ["L1.H0", "L0.N3"], per_position=per_position)
        assert a.keys() == b.keys() == {"L1.H0", "L0.N3"}
        for k in a:
            assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("batch", [1, 2, 16])
def test_mean_activations_are_the_mean_over_each_prompts_own_positions(
    subject: Subject, batch: int
) -> None:
    """Prompts of different lengths share a padded batch; the means count only each prompt's
    own positions: equal to means of one-prompt forward passes, computed here by hand."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    ids = ["L1.H0", "L0.MLP", "L0.N3"]
    per: dict[str, list[torch.Tensor]] = {k: [] for k in ids}
    for p in prompts:
        with capture(subject, ids) as acts, torch.no_grad():
            subject.model(input_ids=torch.tensor([p]))
        for k in ids:
            per[k].append(acts[k][0].float())
    flat = {k: torch.cat(v).mean(0) for k, v in per.items()}
    got = mean_activations(subject, prompts, ids, batch=batch)
    pos = mean_activations(subject, prompts, ids, per_position=True, batch=batch)
    for k in ids:
        torch.testing.assert_close(got[k], flat[k], atol=1e-5, rtol=1e-4)
        # position 4 exists only in the 6-token prompt; position 2 in three prompts
        torch.testing.assert_close(pos[k][4], per[k][1][4], atol=1e-5, rtol=1e-4)
        want2 = torch.stack([per[k][i][2] for i in (0, 1, 3)]).mean(0)
        torch.testing.assert_close(pos[k][2], want2, atol=1e-5, rtol=1e-4)


def test_mean_activations_end_each_forward_at_the_deepest_layer_they_read(
    subject: Subject,
) -> None:
    """Layer-0 means leave layer 1 unrun, and equal those of a whole forward per prompt."""
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    ran: list[int] = []
    h = subject.adapter.layer(1).register_forward_hook(lambda m, a, o: ran.append(1))
    try:
        got = mean_activations(subject, prompts, ["L0.H1", "L0.N3", "EMB"])
        assert not ran
        mean_activations(subject, prompts, ["L1.MLP"])
        assert ran
    finally:
        h.remove()
    assert live_hooks(subject.model) == []
    for k in got:
        per = []
        for p in prompts:
            with capture(subject, [k]) as acts, torch.no_grad():
                subject.model(input_ids=torch.tensor([p]))
            per.append(acts[k][0].float())
        torch.testing.assert_close(got[k], torch.cat(per).mean(0), atol=1e-5, rtol=1e-4)


def test_mean_activations_needs_a_prompt(subject: Subject) -> None:
    with pytest.raises(HookError, match="at least one"):
        mean_activations(subject, [], ["L0.H0"])
    assert live_hooks(subject.model) == []


def test_capture_names_what_it_lacks(subject: Subject) -> None:
    with capture(subject, ["L0.H0"]) as acts:
        pass  # no forward pass
    with pytest.raises(KeyError, match="not reached"):
        acts["L0.H0"]
    with pytest.raises(KeyError, match="L1.MLP was not captured"):
        acts["L1.MLP"]


# --- the top MLP on the metric's positions only -------------------------------------------------


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_a_trimmed_top_mlp_changes_no_kept_logit_nor_its_gradient(model_type: str) -> None:
    """The last layer's MLP runs on the kept positions only; their logits, and the gradient of
    a metric on them with respect to the embeddings, are those of the whole model."""
    s = Subject.from_model(tiny_model(model_type, seed=2), word_tokenizer())
    keep = 2
    seen: list[int] = []  # the positions the MLP computes
    mlp = s.adapter.mlp(s.adapter.n_layers - 1)
    h = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]) if a else None)

    def run(trim: bool) -> tuple[torch.Tensor, torch.Tensor]:
        emb: list[torch.Tensor] = []

        def grab(m: nn.Module, a: Any, o: torch.Tensor) -> None:
            o.retain_grad()
            emb.append(o)

        g = s.adapter.embed.register_forward_hook(grab)
        try:
            ctx = top_mlp_trimmed(s, keep) if trim else contextlib.nullcontext()
            with ctx:
                out = s.model(input_ids=X).logits[:, -keep:]
        finally:
            g.remove()
        out.log_softmax(-1)[..., 7].sum().backward()
        assert emb[0].grad is not None
        return out.detach(), emb[0].grad

    try:
        full, g_full = run(False)
        trimmed, g_trim = run(True)
    finally:
        h.remove()
    assert seen == [X.shape[1], keep]  # the trim is real: the MLP saw two positions
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_trim, g_full, atol=1e-5, rtol=1e-4)
    assert differs(g_full, torch.zeros_like(g_full))  # the gradient is not vacuous
    assert live_hooks(s.model) == []


def test_an_ablation_of_the_trimmed_mlp_sees_its_whole_output(subject: Subject) -> None:
    """A hook on the top MLP's output, registered before the trim, gets every position."""
    top = f"L{subject.adapter.n_layers - 1}.MLP"
    with torch.no_grad():
        with patch(subject, {top: 0.25}):
            want = subject.model(input_ids=X).logits[:, -2:]
        with patch(subject, {top: 0.25}), top_mlp_trimmed(subject, 2):
            got = subject.model(input_ids=X).logits[:, -2:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert live_hooks(subject.model) == []
