"""Component and edge scores by attribution patching (AtP) and EAP-IG.

Both estimate, for every component c, how much the incident metric would fall if c's
activation were patched from the incident prompt ("clean") to the baseline, to first order:

    score(c) = sum_{rows, pos} (a_c(clean) - a_c(baseline)) . dm/da_c

AtP takes the gradient at the clean run (2 forward passes, 1 backward). EAP-IG averages it
over ``steps`` points on the straight line from the baseline's embeddings to the clean ones,
all packed into one batch (Hanna et al. 2024); it is exact where AtP saturates.

Edges (Syed et al. 2023): an upstream component u writes ``w_u`` into the residual stream; a
downstream component v reads the residual stream through its own input norm. The edge score is
``sum (w_u(clean) - w_u(baseline)) . g_v`` with ``g_v`` the gradient of the metric with respect
to the residual stream *as only v reads it*. They come from the node scores' own backward: for a
head with its own q/k/v features, the gradients at those features times their weight rows,
then back through the attention norm alone (all heads in one batched norm backward); for an
MLP, the gradient at its input back through the MLP norm; for LOGITS, the gradient at the final
norm's input. Grouped-query heads, whose keys and values are shared, take a local VJP from the
head's slice of the output-projection input back through the attention. All edges are then one
batched contraction.

Node order (the docstring of every tensor here refers to it): ``EMB``, then per layer
``L.H0 .. L.H{n-1}, L.MLP``, then ``LOGITS`` (downstream only).

``score_nodes_batched`` scores the nodes alone for many prompts at once (a behaviour's fit set),
many prompts to one forward and backward.

One module over 500 lines: node scores, edge scores and neuron scores share one forward and
backward pass and the node order above.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rca.model.hooks import Site, hooked
from rca.model.ids import parse_id
from rca.model.metric import Target, encode_text, logits_kwargs
from rca.model.subject import Subject

__all__ = [
    "Baseline",
    "ComponentScores",
    "TraceError",
    "node_ids",
    "score_components",
    "score_nodes_batched",
]


class TraceError(ValueError):
    """A trace that cannot run as asked (mismatched counterfactual, bad option)."""


@dataclass(frozen=True)
class Baseline:
    """What a component is patched *to*.

    ``counterfactual``: the activations of the counterfactual prompt (same token count as the
    incident prompt, so positions line up). ``mean``: mean activations over reference prompts,
    averaged over positions.
    """

    kind: str
    description: str
    target: Target | None = None  # the counterfactual, encoded with the same continuations
    means: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("counterfactual", "mean"):
            raise TraceError(f"baseline kind must be counterfactual or mean, got {self.kind!r}")
        if self.kind == "counterfactual" and self.target is None:
            raise TraceError("a counterfactual baseline needs its encoded target")
        if self.kind == "mean" and not self.means:
            raise TraceError("a mean baseline needs mean activations")


@dataclass
class ComponentScores:
    """Scores of every head and MLP (and neurons on request), and of every edge.

    ``nodes``: ids in node order; ``scores``: (n_nodes,) summed over positions;
    ``per_position``: (n_nodes, n_pos); ``edges``: (n_up, n_down) with ``up``/``down`` ids,
    zero where no path exists; ``neurons``: neuron id -> score when asked for.
    """

    nodes: list[str]
    scores: torch.Tensor
    per_position: torch.Tensor
    method: str
    baseline: str
    metric_clean: float
    metric_baseline: float
    up: list[str] = field(default_factory=list)
    down: list[str] = field(default_factory=list)
    edges: torch.Tensor | None = None
    emb_edges: torch.Tensor | None = None  # (n_prompt, n_down): EMB's edges split by position
    neurons: dict[str, float] = field(default_factory=dict)
    steps: int = 1
    cost: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[tuple[str, float]]:
        """(id, score) by decreasing |score|."""
        order = torch.argsort(self.scores.abs(), descending=True)
        return [(self.nodes[i], float(self.scores[i])) for i in order.tolist()]

    def score(self, cid: str) -> float:
        return float(self.scores[self.nodes.index(cid)])


def node_ids(n_layers: int, n_heads: int) -> list[str]:
    """Upstream node order: EMB, then per layer its heads and its MLP."""
    out = ["EMB"]
    for layer in range(n_layers):
        out += [f"L{layer}.H{h}" for h in range(n_heads)]
        out.append(f"L{layer}.MLP")
    return out


# ---------------------------------------------------------------------------------------------
# recording the site tensors of one forward pass


_Reads = list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] | None


def _sites(
    subject: Subject,
    *,
    neurons: bool,
    edges: bool,
    fast_edges: bool = False,
    reads: Sequence[_Reads] = (),
) -> dict[str, Site]:
    """The recorded sites. With ``edges``, also what the edge step reads: each norm's input,
    and with ``fast_edges`` the q/k/v outputs of the layers in ``reads`` that have them
    (``Adapter.head_reads``, one entry per layer) and the MLPs' inputs."""
    a = subject.adapter
    full = slice(None)
    s: dict[str, Site] = {"emb": Site(a.embed, False, full), "r0": Site(a.layer(0), True, full)}
    for layer in range(a.n_layers):
        s[f"z{layer}"] = Site(a.attn_out(layer), True, full)
        s[f"m{layer}"] = Site(a.mlp(layer), False, full)
        if neurons:
            s[f"n{layer}"] = Site(a.mlp_down(layer), True, full)
        if edges:
            s[f"an{layer}"] = Site(a.attn_norm(layer), True, full)
            s[f"mn{layer}"] = Site(a.mlp_norm(layer), True, full)
            layer_reads = reads[layer] if fast_edges and reads else None
            if layer_reads is not None:  # the q/k/v projections' outputs, for their gradients
                for i, (mod, _, _) in enumerate(layer_reads):
                    s[f"qkv{layer}.{i}"] = Site(mod, False, full)
            if fast_edges and a.spec.mlp_norm != a.spec.attn_norm:
                # the MLP norm's output has one reader, the MLP: its gradient is the MLP's own
                s[f"mx{layer}"] = Site(a.mlp(layer), True, full)
    if edges:
        s["fin"] = Site(a.final_norm, True, full)
    return s


def _takes_keep(subject: Subject) -> bool:
    return bool(logits_kwargs(subject.model, _KEEP_PROBE))


_KEEP_PROBE = Target((0,), (0,))


def _run(
    subject: Subject,
    input_ids: torch.Tensor,
    sites: dict[str, Site],
    *,
    grad: bool,
    emb_override: torch.Tensor | None = None,
    keep: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass recording each site's tensor; returns (logits, tensors).

    ``keep``: logits of the last ``keep`` positions only (0: all), ``Target.keep`` for a metric.
    """
    rec: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def cb(x: torch.Tensor) -> None:
            rec[name] = x

        return cb

    callbacks: list[tuple[Site, Any]] = []
    if emb_override is not None:
        callbacks.append((sites["emb"], lambda x: emb_override))
    callbacks += [(site, recorder(name)) for name, site in sites.items()]
    with torch.set_grad_enabled(grad), hooked(callbacks):
        kw = {"logits_to_keep": keep} if keep and _takes_keep(subject) else {}
        logits = subject.model(input_ids=input_ids, **kw).logits
    return logits, rec


# ---------------------------------------------------------------------------------------------


def _baseline_acts(
    subject: Subject, target: Target, baseline: Baseline, sites: dict[str, Site], n_rows: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Baseline site tensors shaped like the clean run's rows: (rows, pos, width)."""
    dev = subject.device
    if baseline.kind == "counterfactual":
        assert baseline.target is not None
        cf = baseline.target
        if cf.n_prompt != target.n_prompt or cf.conts != target.conts:
            raise TraceError(
                f"the counterfactual has {cf.n_prompt} prompt tokens and the incident prompt "
                f"{target.n_prompt}: positions must line up. Give a counterfactual with the "
                "same token count, or use the mean baseline"
            )
        logits, rec = _run(subject, cf.input_ids(device=dev), sites, grad=False, keep=cf.keep)
        return {k: v.detach() for k, v in rec.items()}, float(cf.metric(logits)[0])
    assert baseline.means is not None
    out = {}
    T = target.length
    for k in sites:
        if k in baseline.means:
            m = baseline.means[k].to(dev)
            out[k] = m.expand(n_rows, T, *m.shape[-1:]) if m.dim() == 1 else m
    # the metric at the baseline: the model run with its embeddings at their mean
    logits, _ = _run(
        subject,
        target.input_ids(device=dev),
        {"emb": sites["emb"]},
        grad=False,
        emb_override=out["emb"],
        keep=target.keep,
    )
    return out, float(target.metric(logits)[0])


def site_means(
    subject: Subject, prompts: Sequence[str] | Sequence[Sequence[int]], *, neurons: bool = False
) -> dict[str, torch.Tensor]:
    """Position-averaged means of every site over reference prompts (the mean baseline).

    Prompts are texts, or token id sequences.
    """
    if not prompts:
        raise TraceError("the mean baseline needs at least one reference prompt")
    sites = _sites(subject, neurons=neurons, edges=False)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for p in prompts:
        toks = encode_text(subject.tokenizer, p) if isinstance(p, str) else list(p)
        ids = torch.tensor([toks], device=subject.device)
        _, rec = _run(subject, ids, sites, grad=False, keep=1)  # logits unused
        for k, v in rec.items():
            s = v[0].float().sum(0)
            sums[k] = sums[k] + s if k in sums else s
        n += ids.shape[1]
    return {k: (v / n).to(subject.dtype) for k, v in sums.items()}


def _head_writes(subject: Subject, layer: int, dz: torch.Tensor) -> torch.Tensor:
    """Each head's write into the residual stream: (n_heads, rows, pos, d_model)."""
    with torch.no_grad():
        return subject.adapter.head_writes(layer, dz)


def _local_vjp(
    out: torch.Tensor, inp: torch.Tensor, grads: torch.Tensor, *, batched: bool
) -> torch.Tensor:
    """Gradient at ``inp`` of ``out . grads[k]`` for each k, through the local graph only."""
    if batched:
        try:
            (g,) = torch.autograd.grad(
                out, inp, grad_outputs=grads, retain_graph=True, is_grads_batched=True
            )
            return g
        except RuntimeError:
            pass  # some backward formulas do not batch; fall back to one VJP each
    return torch.stack(
        [torch.autograd.grad(out, inp, grad_outputs=g, retain_graph=True)[0] for g in grads]
    )


def _norm_vjp(norm: torch.nn.Module, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Gradient at the norm's input ``x`` (rows, pos, d) of ``norm(x) . grads[k]`` for each k.

    ``grads``: (k, rows, pos, d). The norm is run once more on ``x`` repeated k times along the
    batch, and one backward takes every k at once: the vectorised backward of a norm falls back
    to a loop over k, which costs more than the whole attention backward it replaces.
    """
    k = grads.shape[0]
    xr = x.detach().unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
    xr.requires_grad_(True)
    with torch.enable_grad():
        y = norm(xr)
    (g,) = torch.autograd.grad(y, xr, grad_outputs=grads.reshape(y.shape).to(y.dtype))
    return g.view(k, *x.shape)


def _head_read_grads(
    reads: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]],
    live: dict[str, torch.Tensor],
    gmap: Mapping[int, torch.Tensor | None],
    layer: int,
    hs: range,
) -> torch.Tensor:
    """Heads ``hs``' shares of the gradient at the q/k/v input: (len(hs), rows, pos, d_in).

    ``sum_proj grad_out[..., cols[h]] @ W[cols[h]]``: head h's query, key and value features
    are its own, so the gradient reaching them is the part of the metric's gradient that flows
    through head h alone.
    """
    out: torch.Tensor | None = None
    for i, (_, w, cols) in enumerate(reads):
        g = gmap[id(live[f"qkv{layer}.{i}"])]
        assert g is not None
        c = cols[hs.start : hs.stop]  # (h, c)
        part = torch.einsum("nthc,hci->hnti", g[..., c], w[c].to(g.dtype))
        out = part if out is None else out + part
    assert out is not None
    return out


def score_components(
    subject: Subject,
    target: Target,
    baseline: Baseline,
    *,
    method: str = "atp",
    steps: int = 8,
    neurons: bool = False,
    edges: bool = True,
    top_neurons: int = 50,
    step_chunk: int | None = None,
    head_chunk: int | None = None,
    fast_edges: bool = True,
) -> ComponentScores:
    """Score every head and MLP (and edges, and neurons on request) for the incident metric.

    ``method``: ``atp`` (gradient at the clean run) or ``eap-ig`` (mean gradient over
    ``steps`` interpolation points, packed along the batch). Memory is bounded by three knobs,
    none of which changes the scores beyond float summation order (``rca.trace.memory`` picks
    them from a budget): ``step_chunk`` interpolation points share one forward and backward
    (default all of them); ``head_chunk`` heads share one batched local VJP in the edge step
    (default all of a layer's).

    ``fast_edges``: where a layer's heads each read their own q/k/v output features
    (``Adapter.head_reads``), a head's input gradient is taken from the gradients at those
    projections' outputs and carried back through the norm alone, so the edge step costs no
    attention backward; False (and grouped-query layers) use the general per-head VJP through
    the attention. Both give the same scores.
    """
    if method not in ("atp", "eap-ig"):
        raise TraceError(f"method must be atp or eap-ig, got {method!r}")
    if steps < 1:
        raise TraceError("steps must be at least 1")
    t0 = time.perf_counter()
    a = subject.adapter
    L, H, rows, T = a.n_layers, a.n_heads, target.rows, target.length
    dev = subject.device
    # per layer, how its heads read the norm's output where the fast edge path applies
    reads: list[_Reads] = [
        a.head_reads(layer) if edges and fast_edges else None for layer in range(L)
    ]
    sites = _sites(subject, neurons=neurons, edges=edges, fast_edges=fast_edges, reads=reads)
    keys = [k for k in sites if k != "emb"]
    # the sites whose activations are scored (the rest only give the edge step its gradients):
    # only these are recorded on the baseline and the EAP-IG clean run
    node_keys = [k for k in keys if not k.startswith(("qkv", "mx", "an", "mn", "fin"))]
    scored = {k: sites[k] for k in ("emb", *node_keys)}
    base, metric_base = _baseline_acts(subject, target, baseline, scored, rows)
    clean: dict[str, torch.Tensor] = {}
    metric_clean = float("nan")
    if method == "eap-ig":  # AtP's gradient pass is the clean run: its tensors are taken there
        with torch.no_grad():
            logits, clean = _run(
                subject, target.input_ids(device=dev), scored, grad=False, keep=target.keep
            )
            metric_clean = float(target.metric(logits)[0])
        clean = {k: v.detach() for k, v in clean.items()}
        del logits

    # the gradient pass: the clean run (AtP) or the interpolation path (EAP-IG), in chunks of
    # ``step_chunk`` points; every sum below is over points, divided by m at the end
    m = 1 if method == "atp" else steps
    chunk = max(1, min(step_chunk or m, m))
    hchunk = max(1, min(head_chunk or H, H))
    alphas = (torch.arange(m, device=dev, dtype=torch.float32) + 0.5) / m  # midpoint rule
    gsum: dict[str, torch.Tensor] = {}
    down: list[str] = []
    if edges:
        for layer in range(L):
            down += [f"L{layer}.H{h}" for h in range(H)] + [f"L{layer}.MLP"]
        down.append("LOGITS")
    G: torch.Tensor | None = None  # (n_down, rows, pos, d): summed over points
    n_vjp = 0
    n_chunks = 0
    for c0 in range(0, m, chunk):
        k = min(chunk, m - c0)
        n_chunks += 1
        override = None
        if method == "eap-ig":
            e_c, e_b = clean["emb"], base["emb"].expand_as(clean["emb"])
            al = alphas[c0 : c0 + k].view(k, 1, 1, 1).to(e_c.dtype)
            path = e_b.unsqueeze(0) + al * (e_c - e_b).unsqueeze(0)
            # a leaf that requires grad, so that the residual stream it becomes is on the graph
            override = path.reshape(k * rows, T, -1).detach().requires_grad_(True)
        logits, live = _run(
            subject,
            target.input_ids(k, device=dev),
            sites,
            grad=True,
            emb_override=override,
            keep=target.keep,
        )
        metric_sum = target.metric(logits).sum()
        if method == "atp":
            clean = {key: v.detach() for key, v in live.items()}
            metric_clean = float(metric_sum.detach())
        del logits
        # one backward for every site; several keys may share a tensor (r0 is an0 in most archs)
        uniq: dict[int, torch.Tensor] = {}
        for key in keys:
            uniq.setdefault(id(live[key]), live[key])
        gl = torch.autograd.grad(
            metric_sum, list(uniq.values()), retain_graph=edges, allow_unused=True
        )
        gmap = dict(zip(uniq.keys(), gl, strict=True))
        del gl, uniq
        for key in node_keys:
            g = gmap[id(live[key])]
            if g is None:
                continue
            s = g.view(k, rows, *g.shape[1:]).sum(0)
            gsum[key] = gsum[key] + s if key in gsum else s
        if edges:
            if G is None:
                G = torch.zeros(len(down), rows, T, a.d_model, device=dev, dtype=torch.float32)
            j = 0
            for layer in range(L):
                z, an = live[f"z{layer}"], live[f"an{layer}"]
                gz = gmap[id(z)]
                assert gz is not None
                for h0 in range(0, H, hchunk):
                    hs = range(h0, min(H, h0 + hchunk))
                    layer_reads = reads[layer]
                    if layer_reads is None:
                        # general path: back from each head's output through the attention
                        masks = torch.zeros(len(hs), 1, 1, H * a.d_head, device=dev, dtype=gz.dtype)
                        for i, h in enumerate(hs):
                            masks[i, ..., h * a.d_head : (h + 1) * a.d_head] = 1
                        g_heads = _local_vjp(z, an, gz.unsqueeze(0) * masks, batched=True)
                        del masks
                    else:
                        # each head's share of the gradient at the q/k/v projections' input,
                        # from the gradients at their outputs, then back through the norm only
                        g_read = _head_read_grads(layer_reads, live, gmap, layer, hs)
                        g_heads = _norm_vjp(a.attn_norm(layer), an, g_read)
                        del g_read
                    G[j + h0 : j + h0 + len(hs)] += (
                        g_heads.view(len(hs), k, rows, T, -1).sum(1).float()
                    )
                    del g_heads
                    n_vjp += 1
                j += H
                if f"mx{layer}" in live:  # the gradient at the MLP's input, back through its norm
                    gm = gmap[id(live[f"mx{layer}"])]
                    assert gm is not None
                    g_mlp = _norm_vjp(a.mlp_norm(layer), live[f"mn{layer}"], gm.unsqueeze(0))
                else:
                    gm = gmap[id(live[f"m{layer}"])]
                    assert gm is not None
                    g_mlp = _local_vjp(
                        live[f"m{layer}"], live[f"mn{layer}"], gm.unsqueeze(0), batched=False
                    )
                G[j] += g_mlp[0].view(k, rows, T, -1).sum(0).float()
                del g_mlp
                j += 1
                n_vjp += 1
            g_fin = gmap[id(live["fin"])]
            assert g_fin is not None
            G[j] += g_fin.view(k, rows, T, -1).sum(0).float()
        del live, gmap, metric_sum, override

    grads = {
        key: (gsum[key] / m if key in gsum else torch.zeros_like(clean[key])) for key in node_keys
    }
    del gsum
    delta = {key: clean[key] - base[key] for key in node_keys if key in base and key in clean}

    nodes = node_ids(L, H)
    per_pos = _node_positions(subject, delta, grads)
    neuron_scores: dict[str, float] = {}
    if neurons:
        for layer in range(L):
            s = (delta[f"n{layer}"] * grads[f"n{layer}"]).sum((0, 1))
            for n in torch.argsort(s.abs(), descending=True)[:top_neurons].tolist():
                neuron_scores[f"L{layer}.N{n}"] = float(s[n])

    result = ComponentScores(
        nodes=nodes,
        scores=per_pos.sum(1).cpu(),
        per_position=per_pos.cpu(),
        method=method,
        baseline=baseline.description,
        metric_clean=metric_clean,
        metric_baseline=metric_base,
        neurons=neuron_scores,
        steps=m,
    )
    if edges:
        assert G is not None
        G /= m
        E = torch.zeros(len(nodes), len(down), device=dev)
        Gf = G.view(len(down), -1)  # (n_down, rows * pos * d)
        # upstream writes, one layer at a time: EMB, then each layer's heads and MLP
        r = 0
        for layer in range(-1, L):
            if layer < 0:
                U = delta["r0"].unsqueeze(0)
            else:
                U = torch.cat(
                    [
                        _head_writes(subject, layer, delta[f"z{layer}"]),
                        delta[f"m{layer}"].unsqueeze(0),
                    ]
                )
            # downstream inputs this layer can reach start at its own MLP (heads -> MLP): the
            # columns before it are masked to zero anyway, so they are not contracted. One
            # matrix product over (rows, pos, d) flattened: G is contiguous that way
            j0 = 0 if layer < 0 else layer * (H + 1) + H
            E[r : r + U.shape[0], j0:] += U.reshape(U.shape[0], -1).float() @ Gf[j0:].T
            if layer < 0:
                emb = torch.einsum("rpd,vrpd->pv", U[0].float(), G)
            r += U.shape[0]
            del U
        E *= _edge_mask(nodes, down, parallel=a.parallel).to(dev)
        result.up, result.down, result.edges = nodes, down, E.cpu()
        result.emb_edges = emb[: target.n_prompt].cpu()
    result.cost = {
        "seconds": time.perf_counter() - t0,
        "forward_rows": rows * (1 + m + (method == "eap-ig")),
        "backward_rows": rows * m,
        "local_vjps": n_vjp,
        "step_chunk": chunk,
        "head_chunk": hchunk,
        "gradient_passes": n_chunks,
        # forward-pass equivalents: a backward costs about two forwards
        "forward_equiv": 1 + (method == "eap-ig") + 3 * m,
    }
    return result


def score_nodes_batched(
    subject: Subject,
    items: Sequence[tuple[Target, Baseline]],
    *,
    max_memory: int | str | None = "auto",
) -> list[ComponentScores]:
    """``score_components(subject, target, baseline, method="atp", edges=False)`` for every
    ``(target, baseline)`` item, many items to one forward and backward pass.

    Items of different lengths share a batch right-padded to the longest: a causal model's
    positions never read later ones, so padding changes no real position's activation, and the
    gradient at a padding position is zero. Each item's metric is read from its own rows and
    positions, and the backward of their sum gives every item its own gradient. Items are
    batched by baseline (one counterfactual run for the batch's counterfactuals, or one run at
    the shared mean embeddings), shortest first, as many to a batch as ``max_memory`` allows
    (``rca.trace.memory``; at least one). The scores equal the one-at-a-time ones up to float
    summation order (tested). Results are in the items' order; each ``cost`` records its batch.
    """
    from rca.trace.memory import estimate_trace, memory_budget

    for target, baseline in items:
        if baseline.kind == "counterfactual":
            cf = baseline.target
            assert cf is not None
            if cf.n_prompt != target.n_prompt or cf.conts != target.conts:
                raise TraceError(
                    f"a counterfactual has {cf.n_prompt} prompt tokens and its variant "
                    f"{target.n_prompt}: positions must line up. Give a counterfactual with "
                    "the same token count, or use the mean baseline"
                )
        elif any(m.dim() != 1 for m in (baseline.means or {}).values()):
            raise TraceError("batched scoring needs position-averaged means (site_means)")
    budget = memory_budget(subject.device, max_memory)

    def group(i: int) -> tuple[str, int]:
        b = items[i][1]
        return (b.kind, 0 if b.kind == "counterfactual" else id(b.means))

    order = sorted(range(len(items)), key=lambda i: (group(i), items[i][0].length))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else []
        if cur and group(cur[0]) == group(i):
            ts = [items[j][0] for j in (*cur, i)]
            need = estimate_trace(
                subject,
                length=max(t.length for t in ts),
                rows=sum(t.rows for t in ts),
                keep=max(t.length for t in ts) - min(t.n_prompt for t in ts) + 1,
                method="atp",
                edges=False,
            )["components"]
            if budget is None or need <= budget:
                cur.append(i)
                continue
        batches.append([i])
    out: list[ComponentScores | None] = [None] * len(items)
    for n, batch in enumerate(batches):
        for i, sc in zip(batch, _node_batch(subject, [items[i] for i in batch]), strict=True):
            sc.cost["pass"] = n
            out[i] = sc
    return [sc for sc in out if sc is not None]


def _node_batch(
    subject: Subject, items: Sequence[tuple[Target, Baseline]]
) -> list[ComponentScores]:
    """One batch of ``score_nodes_batched``: items sharing a baseline kind (and means)."""
    t0 = time.perf_counter()
    dev = subject.device
    sites = _sites(subject, neurons=False, edges=False)
    node_keys = [k for k in sites if k != "emb"]
    targets = [t for t, _ in items]
    T = max(t.length for t in targets)
    keep = T - min(t.n_prompt for t in targets) + 1
    offsets = [0]
    for t in targets:
        offsets.append(offsets[-1] + t.rows)

    def stacked(ts: Sequence[Target]) -> torch.Tensor:
        return torch.cat(
            [
                torch.nn.functional.pad(t.input_ids(device=dev), (0, T - t.length), value=t.pad_id)
                for t in ts
            ]
        )

    def metrics(logits: torch.Tensor, ts: Sequence[Target]) -> torch.Tensor:
        # logits end at position T - 1; each item's own positions end at its length - 1
        P = logits.shape[1]
        return torch.stack(
            [
                t.metric(logits[offsets[i] : offsets[i + 1], : P - (T - t.length)])[0]
                for i, t in enumerate(ts)
            ]
        )

    kind = items[0][1].kind
    with torch.no_grad():
        if kind == "counterfactual":
            cfs = [b.target for _, b in items]
            assert all(c is not None for c in cfs)
            cf_targets = [c for c in cfs if c is not None]
            logits, base = _run(
                subject,
                stacked(cf_targets),
                {k: sites[k] for k in node_keys},
                grad=False,
                keep=keep,
            )
            metric_base = metrics(logits, cf_targets).tolist()
        else:
            means = items[0][1].means
            assert means is not None
            R = offsets[-1]
            base = {
                k: means[k].to(dev).expand(R, T, means[k].shape[-1]) for k in ("emb", *node_keys)
            }
            logits, _ = _run(
                subject,
                stacked(targets),
                {"emb": sites["emb"]},
                grad=False,
                emb_override=base["emb"],
                keep=keep,
            )
            metric_base = metrics(logits, targets).tolist()
        del logits
    logits, live = _run(subject, stacked(targets), sites, grad=True, keep=keep)
    metric = metrics(logits, targets)
    del logits
    uniq: dict[int, torch.Tensor] = {}
    for key in node_keys:
        uniq.setdefault(id(live[key]), live[key])
    gl = torch.autograd.grad(metric.sum(), list(uniq.values()), allow_unused=True)
    gmap = dict(zip(uniq.keys(), gl, strict=True))
    grads = {
        k: (g if (g := gmap[id(live[k])]) is not None else torch.zeros_like(live[k]))
        for k in node_keys
    }
    clean = {k: live[k].detach() for k in node_keys}
    del live, gmap, gl, uniq
    nodes = node_ids(subject.adapter.n_layers, subject.adapter.n_heads)
    seconds = time.perf_counter() - t0
    out = []
    for i, (t, b) in enumerate(items):
        r = slice(offsets[i], offsets[i + 1])
        delta = {k: clean[k][r, : t.length] - base[k][r, : t.length] for k in node_keys}
        per_pos = _node_positions(subject, delta, {k: grads[k][r, : t.length] for k in node_keys})
        out.append(
            ComponentScores(
                nodes=nodes,
                scores=per_pos.sum(1).cpu(),
                per_position=per_pos.cpu(),
                method="atp",
                baseline=b.description,
                metric_clean=float(metric[i].detach()),
                metric_baseline=metric_base[i],
                cost={
                    "batch": len(items),
                    "batch_rows": offsets[-1],
                    "batch_length": T,
                    "batch_seconds": seconds,
                    "forward_equiv": 4,
                },
            )
        )
    return out


def _node_positions(
    subject: Subject, delta: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Node scores per position, (n_nodes, pos), summed over rows: each site's difference
    (clean minus baseline) times its gradient, a head's share from its slice of ``z``."""
    a = subject.adapter
    L, H = a.n_layers, a.n_heads
    rows, T = delta["r0"].shape[:2]
    per_pos = torch.zeros(1 + L * (H + 1), T, device=delta["r0"].device)
    per_pos[0] = (delta["r0"] * grads["r0"]).sum(-1).sum(0)
    i = 1
    for layer in range(L):
        dz, gz = delta[f"z{layer}"], grads[f"z{layer}"]
        prod = (dz * gz).view(rows, T, H, a.d_head).sum(-1).sum(0)  # (pos, H)
        per_pos[i : i + H] = prod.T
        per_pos[i + H] = (delta[f"m{layer}"] * grads[f"m{layer}"]).sum(-1).sum(0)
        i += H + 1
    return per_pos


def _edge_mask(up: list[str], down: list[str], *, parallel: bool) -> torch.Tensor:
    """1 where upstream u can reach downstream v's input, else 0: (n_up, n_down).

    EMB reaches everything and everything reaches LOGITS; otherwise u reaches v in a later
    layer, and a head reaches its own layer's MLP unless the block is parallel."""
    ups, downs = [parse_id(u) for u in up], [parse_id(v) for v in down]
    lu = torch.tensor([u.depth() for u in ups]).unsqueeze(1)  # EMB: -1
    lv = torch.tensor([v.depth() for v in downs]).unsqueeze(0)  # LOGITS: above every layer
    u_head = torch.tensor([u.is_head for u in ups]).unsqueeze(1)
    v_mlp = torch.tensor([v.kind == "mlp" for v in downs]).unsqueeze(0)
    same = (lu == lv) & u_head & v_mlp & (not parallel)
    return ((lu < lv) | same).float()
