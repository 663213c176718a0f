"""Lookahead pruning variants, Park et al. (ICLR 2020) Sec. 2.3, App. F, J, on the LAP core.

The core (Eq. 5, Eq. 8 with BN, LFP, LBP, the :class:`~prunelab.criteria.lookahead.Lookahead`
engine) is :mod:`prunelab.criteria.lookahead`. Here:

- :func:`lap_forward` / :func:`lap_backward` prune layer by layer to per-layer targets, each
  layer scored against already-pruned neighbours (Sec. 2.3 "Order of pruning"), and their
  ``_seq`` forms split every layer's budget into ``steps`` (5) equal rounds ("Sequential
  pruning"). Counts and cuts are :mod:`prunelab.selection`'s (exact, ties by index), so the
  masks built from the returned scores are the ones the procedure chose.
- :func:`lap_act` weights neurons by activation probabilities (App. F).
- :func:`lap_all` looks ahead through the whole linearised network (App. J).
- :func:`obd_lap` uses OBD saliencies in place of magnitudes.

All criteria read a plain model in eval mode whose pruned weights are already zero and never
modify it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab import selection as S
from prunelab.criteria.lookahead import (Lookahead, bn_scales, check_bn, graph_of, scaled_abs,
                                         work_dtype)

Scores = G.Scores
Masks = G.Masks

LAYERWISE = "layerwise"


def layer_targets(model: nn.Module, sparsity, scope: str, criterion: str) -> dict[str, int]:
    """Entries to prune per layer for the layerwise LAP variants: name -> count.

    ``sparsity`` is a float (the same fraction of every layer) or ``{name: fraction}`` (layers not
    named keep all their weights, as in :func:`prunelab.selection.select`); the counts are
    :func:`prunelab.selection.n_pruned`'s.
    """
    if scope != LAYERWISE or sparsity is None:
        raise ValueError(
            f"{criterion!r} prunes layer by layer (Park et al. Sec. 2.3): it needs per-layer "
            f"targets, i.e. scope='layerwise' and sparsity= a fraction or {{layer: fraction}}; "
            f"got scope={scope!r}, sparsity={sparsity!r}")
    return S.pruned_counts({n: G.weight(model, n).numel() for n in G.prunable_names(model)},
                           sparsity)


@torch.no_grad()
def _ordered(model: nn.Module, *, sparsity, scope: str, masks: Masks | None, backward: bool,
             steps: int, bn: str, criterion: str, batch=None) -> Scores:
    """Layer-by-layer LAP (Sec. 2.3, "Order of pruning" and "Sequential pruning").

    ``steps`` rounds; in round ``t`` every layer, in order, is pruned to
    ``d0 + (target - d0)·t/steps`` entries (``d0`` = entries already zero) by its LAP score
    computed against the current (partly pruned) neighbours. Already-pruned entries go first, ties
    by index. Returns the LAP scores of the final round with every entry the procedure pruned at
    −inf, so keeping the top (1 − s_l)·n_l of each layer reproduces it exactly.
    """
    targets = layer_targets(model, sparsity, scope, criterion)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    la = Lookahead(model, graph_of(model, batch), bn=bn)
    missing = [n for n in targets if n not in la.graph]
    if missing:
        raise ValueError(f"criterion {criterion!r} cannot score {missing}: they are not layers "
                         f"of the layer graph (embeddings, norms); leave them out with prunable=")
    # layers outside prunable= stay as they are: neighbours only
    order = [n for n in (list(la.graph)[::-1] if backward else list(la.graph)) if n in targets]
    for n, m in (masks or {}).items():  # direct calls may pass masks not yet multiplied in
        if n in la.graph:
            la.update(n, la.w[n] * la.canonical(n, m.to(device=la.w[n].device,
                                                          dtype=torch.bool)))
    alive = {n: la.w[n] != 0 for n in order}
    dead0 = {n: int(a.numel() - a.sum()) for n, a in alive.items()}
    out: Scores = {}
    for t in range(1, steps + 1):
        for n in order:
            goal = targets[n]
            k = goal if goal <= dead0[n] else dead0[n] + (goal - dead0[n]) * t // steps
            s = la.score(n)
            keep = S.prune_lowest(s.masked_fill(~alive[n], -math.inf), k)
            alive[n] = keep
            la.update(n, la.w[n] * keep)
            if t == steps:
                out[n] = la.canonical(n, s.masked_fill_(~keep, -math.inf))
    return out


def lap_forward(model: nn.Module, *, batch=None, masks: Masks | None = None, sparsity=None,
                scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP-forward, Park et al. Sec. 2.3: prune layers first to last, each scored with Eq. 5/8
    against its already-pruned predecessors. Needs per-layer targets (``scope="layerwise"``)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=False, steps=1,
                    bn=bn, criterion="lap-forward", batch=batch)


def lap_backward(model: nn.Module, *, batch=None, masks: Masks | None = None, sparsity=None,
                 scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP-backward, Park et al. Sec. 2.3: prune layers last to first, each scored against its
    already-pruned successors. Needs per-layer targets (``scope="layerwise"``)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=True, steps=1,
                    bn=bn, criterion="lap-backward", batch=batch)


def lap_forward_seq(model: nn.Module, *, batch=None, masks: Masks | None = None, sparsity=None,
                    scope: str = "global", bn: str = "eq8", steps: int = 5, **_) -> Scores:
    """LAP-forward-seq, Park et al. Sec. 2.3 "Sequential pruning": each layer's budget is split
    into ``steps`` (5) equal parts, and ``steps`` forward passes each prune one part of every
    layer, first to last, re-scoring against the current neighbours (as the authors' code)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=False,
                    steps=steps, bn=bn, criterion="lap-forward-seq", batch=batch)


def lap_backward_seq(model: nn.Module, *, batch=None, masks: Masks | None = None, sparsity=None,
                     scope: str = "global", bn: str = "eq8", steps: int = 5, **_) -> Scores:
    """LAP-backward-seq: as :func:`lap_forward_seq`, each round going from last to first."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=True,
                    steps=steps, bn=bn, criterion="lap-backward-seq", batch=batch)


# ==================================================================================== LAP-act
_RELU_TYPES = (nn.ReLU,)
_RELU_FUNCS = {F.relu, torch.relu, F.relu_, torch.relu_}


def _gate_prob(z: Tensor, op, rest: tuple, kwargs: dict, relu: bool) -> Tensor:
    """Mean over the batch of σ'(z)², per unit: the activation probability for ReLU."""
    z = z.detach()
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    if relu:
        return (z > 0).to(dtype).mean(0)
    with torch.enable_grad():
        zz = z.to(dtype).clone().requires_grad_(True)
        y = op(zz.clone(), *rest, **kwargs)  # clone: in-place activations must not hit the leaf
        (g,) = torch.autograd.grad(y.sum(), zz)
    return g.square().mean(0)


@torch.no_grad()
def activation_probabilities(model: nn.Module, x: Tensor,
                             graph: G.LayerGraph | None = None) -> dict[str, Tensor]:
    """For each prunable layer, the probability that each unit of its gating activation is on.

    Estimated on the inputs ``x`` (Park et al. App. F: "the k-th ReLU's probability of
    activation, which can be estimated by passing the training data"). For a ReLU this is the
    fraction of examples with positive pre-activation; other activations get ``E[σ'(z)²]``, the
    same mean-field quantity (a unit's squared gain). Values are shaped like one example's
    activation (``(out,)`` or ``(out, *spatial)``); layers without a gating activation are absent.
    """
    graph = graph if graph is not None else G.layer_graph(model)
    owners: dict[str, list[str]] = {}
    for n, layer in graph.layers.items():
        if layer.act is not None:
            owners.setdefault(layer.act, []).append(n)
    probs: dict[str, Tensor] = {}
    if not owners:
        return {}
    if graph.traced:
        gm = G.trace(model)

        class _Probe(torch.fx.Interpreter):
            def run_node(self, node):
                if node.name in owners:
                    args, kwargs = self.fetch_args_kwargs_from_env(node)
                    if node.op == "call_module":
                        op = self.fetch_attr(node.target)
                        relu = isinstance(op, _RELU_TYPES)
                    elif node.op == "call_method":
                        method = node.target

                        def op(t, *a, **k):
                            return getattr(t, method)(*a, **k)
                        relu = method in ("relu", "relu_")
                    else:
                        op = node.target
                        relu = op in _RELU_FUNCS
                    p = _gate_prob(args[0], op, tuple(args[1:]), dict(kwargs), relu)
                    for n in owners[node.name]:
                        probs[n] = p
                return super().run_node(node)

        _Probe(gm).run(*G.fx_inputs(gm, x))
    else:
        handles = []
        for act, layers in owners.items():
            module = model.get_submodule(act)

            def hook(m, inputs, layers=layers):
                p = _gate_prob(inputs[0], m, (), {}, isinstance(m, _RELU_TYPES))
                for n in layers:
                    probs[n] = p
            handles.append(module.register_forward_pre_hook(hook))
        try:
            B.call(model, x)
        finally:
            for h in handles:
                h.remove()
    return probs


def _channel_sum_sqrt(p: Tensor, layer: G.Layer) -> Tensor | None:
    """``Σ_{k ∈ I_{i,j}} sqrt(p_k)`` per output channel j (App. F, Eq. 19/23)."""
    root = p.sqrt()
    if layer.kind == "linear":  # features on the last axis
        if root.shape[-1] != layer.out_size:
            return None
        return root.reshape(-1, layer.out_size).sum(0)
    if root.dim() == 0 or root.shape[0] != layer.out_size:
        return None
    return root.reshape(layer.out_size, -1).sum(1)


def lap_act(model: nn.Module, *, batch=None, bn: str = "eq8", **_) -> Scores:
    """LAP-act, Park et al. App. F (Eq. 18-19, 23-24): LAP on activation-rescaled weights.

    ``Ŵ_i[j, :] = (Σ_{k ∈ I_{i,j}} sqrt(p_k)) · W_i[j, :]`` where ``I_{i,j}`` are the units of
    output channel ``j`` of layer ``i`` that its gating activation (ReLU) acts on — one unit for a
    Linear, every spatial position of the channel for a conv (a *sum* of square roots, as in the
    paper and the authors' code) — and ``p_k`` their activation probabilities on ``batch``. The
    score is ``|ŵ| · ||Ŵ_{i-1}[j,:]|| · ||Ŵ_{i+1}[:,k]||``: the mean-field root-mean-square
    lookahead distortion under independent ReLU gates. Layers without a gating activation (the
    output layer) keep factor 1; BN factors per ``bn`` as in :func:`lap`. With every unit always
    active a fully-connected net gets exactly :func:`lap`.
    """
    if batch is None:
        raise ValueError("lap-act estimates activation probabilities from data: pass "
                         "batch=(x, y)")
    x = batch[0]
    if G.is_parametrized(model):  # direct calls: trace and run the plain equivalent
        model = G.plain_copy(model)
    graph = G.layer_graph(model, x)
    if graph.source == "autograd":
        raise ValueError(f"lap-act reads activation probabilities from the torch.fx graph, and "
                         f"torch.fx cannot trace {type(model).__name__} ({graph.reason}); use "
                         f"'lap' (its graph comes from a forward pass) instead")
    probs = activation_probabilities(model, x, graph)
    scale = {}
    for n, p in probs.items():
        s = _channel_sum_sqrt(p, graph[n])
        if s is not None:
            scale[n] = s
    return Lookahead(model, graph, bn=bn, row_scale=scale).scores()


# ==================================================================================== LAP-all
def _avg_for_max(args: tuple, kwargs: dict) -> Tensor:
    """A max-pool call redone as the average pool over the same windows (linearised)."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
    a = dict(zip(names, args))
    a.update(kwargs)
    if a.get("return_indices"):
        raise ValueError("lap-all cannot linearise a max-pool that returns indices")
    dilation = a.get("dilation", 1)
    if any(d != 1 for d in (dilation if isinstance(dilation, (tuple, list)) else (dilation,))):
        raise ValueError("lap-all cannot linearise a dilated max-pool")
    x = a["input"]
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[x.dim() - 2]
    return avg(x, a["kernel_size"], a.get("stride") or a["kernel_size"], a.get("padding", 0),
               a.get("ceil_mode", False))


class _Linearised(torch.fx.Interpreter):
    """The network as one linear operator (App. J): activations and dropout become identities,
    BN its scale ``a`` (no shift), biases are dropped, max-pooling becomes average pooling over
    the same windows. Records every prunable layer's input and output."""

    def __init__(self, gm: torch.fx.GraphModule, graph: G.LayerGraph, weights: dict[str, Tensor],
                 scales: dict[str, Tensor]) -> None:
        super().__init__(gm)
        self.layer_of = {graph[n].module: n for n in graph}
        self.weights, self.scales = weights, scales
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0]
        if target in self.layer_of:
            n = self.layer_of[target]
            self.inputs[n] = x
            w = self.weights[n]
            y = F.linear(x, w) if isinstance(m, nn.Linear) else m._conv_forward(x, w, None)
            self.outputs[n] = y
            return y
        if isinstance(m, G.BN_MODULES):
            a = self.scales.get(target)
            return x if a is None else x * a.view(1, -1, *(1,) * (x.dim() - 2))
        if isinstance(m, G.ACT_MODULES + G.PASS_MODULES):
            return x
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return _avg_for_max((x, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.ceil_mode, m.return_indices), {})
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d,
                   3: F.adaptive_avg_pool3d}[x.dim() - 2]
            return avg(x, m.output_size)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten)):
            return m(x)
        raise ValueError(f"lap-all cannot linearise module {target!r} ({type(m).__name__})")

    def call_function(self, target, args, kwargs):
        if target in G.ACT_FUNCS or target in G.PASS_FUNCS:
            return args[0] if args else kwargs["input"]
        if target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            return _avg_for_max(args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in G.ACT_METHODS or target in G.PASS_METHODS:
            return args[0]
        return super().call_method(target, args, kwargs)


def _per_channel(sq: Tensor, kind: str, size: int) -> Tensor:
    """Sum of squares over probes, per unit -> mean over positions, per channel/feature."""
    if kind == "linear":
        return sq.reshape(-1, size).mean(0)
    return sq.reshape(size, -1).mean(1)


@torch.no_grad()
def lap_all(model: nn.Module, *, batch=None, bn: str = "eq8", input_shape=None,
            chunk: int = 256, **_) -> Scores:
    """LAP-all, Park et al. App. J: lookahead through the whole (linearised) network.

    Minimising ``||J_{d:i+1} J(W_i) J_{i-1:1} − J_{d:i+1} J(M⊙W_i) J_{i-1:1}||_F`` entrywise
    gives, by the argument of App. E, ``L(w) = |w| · ||J_{i-1:1}[j,:]|| · ||J_{d:i+1}[:,k]||``:
    the norms of row ``j`` of the operator from the model input to layer ``i``'s input and of
    column ``k`` of the operator from layer ``i``'s output to the model output (empty products
    are identities, so the first and last layers have factor 1 on their open side).
    "Linearised" (App. J blames LAP-all's shortfall on "ignoring the effect of activation
    functions"): activations and dropout are identities, BN its scale (unless ``bn="none"``),
    biases are dropped, max-pooling becomes average pooling over the same windows. Rows and
    columns are exact: the identity basis of the input is pushed through the network (``chunk``
    probes at a time) and the identity basis of the output pulled back; for a conv the
    per-channel value is the mean over spatial positions. For the middle of three Linear layers
    this is LAP.

    Needs a traceable model and the input shape: from ``batch``, ``input_shape`` or the model's
    ``input_shape`` attribute.
    """
    check_bn(bn)
    if G.is_parametrized(model):
        model = G.plain_copy(model)
    graph = G.layer_graph(model)
    if not graph.traced:
        raise ValueError(f"lap-all needs a model torch.fx can trace ({graph.reason})")
    odd = [n for n in graph if not (G.split_name(n)[1] == "weight" and isinstance(
        G.module_of(model, n), G.PRUNABLE_TYPES))]
    if odd:
        raise ValueError(f"lap-all linearises nn.Linear/nn.Conv layers only; it cannot push "
                         f"its probes through {odd} (attention projections or third-party "
                         f"layers)")
    if batch is not None:
        if not isinstance(batch[0], Tensor):
            raise ValueError("lap-all pushes the identity basis of one input tensor through the "
                             "network; this model takes several inputs or a mapping")
        shape = tuple(batch[0].shape[1:])
    elif input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    elif hasattr(model, "input_shape"):
        shape = tuple(int(s) for s in model.input_shape)
    else:
        raise ValueError("lap-all needs the input shape: pass batch=(x, y) or input_shape=")
    weights = {n: work_dtype(G.weight(model, n)) for n in graph}
    dtype = next(iter(weights.values())).dtype
    scales = bn_scales(model, graph) if bn != "none" else {}
    scales = {k: v.to(dtype) for k, v in scales.items()}
    gm = G.trace(model)
    d = math.prod(shape)
    prefix: dict[str, Tensor] = {}
    for start in range(0, d, chunk):
        rows = min(chunk, d - start)
        probes = torch.zeros(rows, d, dtype=dtype)
        probes[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
        lin = _Linearised(gm, graph, weights, scales)
        lin.run(probes.view(rows, *shape))
        for n, v in lin.inputs.items():
            sq = v.square().sum(0)
            prefix[n] = sq if n not in prefix else prefix[n] + sq
    # Pull the output basis back: example c of a zero batch carries the cotangent e_c, so its
    # gradient at a layer's output is column c of that layer's suffix operator (linear: exact).
    suffix: dict[str, Tensor] = {}
    n_out = None
    start = 0
    while n_out is None or start < n_out:
        rows = chunk if n_out is None else min(chunk, n_out - start)
        with torch.enable_grad():
            x0 = torch.zeros(rows, *shape, dtype=dtype, requires_grad=True)
            lin = _Linearised(gm, graph, weights, scales)
            out = lin.run(x0)
            if not isinstance(out, Tensor):
                raise ValueError("lap-all needs a model with a single tensor output")
            flat = out.reshape(rows, -1)
            n_out = flat.shape[1]
            rows = min(rows, n_out - start)
            cot = torch.zeros_like(flat)
            cot[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
            names = [n for n in graph if n in lin.outputs]
            grads = torch.autograd.grad(flat, [lin.outputs[n] for n in names], cot,
                                        allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sq = g.square().sum(0)
                suffix[n] = sq if n not in suffix else suffix[n] + sq
        start += rows
    scores = {}
    for n, layer in graph.layers.items():
        if n not in prefix or n not in suffix:  # not on the input-output path: no lookahead
            scores[n] = weights[n].abs()
            continue
        q = _per_channel(prefix[n], layer.kind, layer.in_size).sqrt()
        r = _per_channel(suffix[n], layer.kind, layer.out_size).sqrt()
        scores[n] = scaled_abs(weights[n], r, q, layer.groups)
    return scores


# ==================================================================================== OBD+LAP
def obd_lap(model: nn.Module, *, batch=None, bn: str = "none", mc_samples: int = 0,
            seed: int = 0, chunk: int | None = None, objective=None, **_) -> Scores:
    """OBD+LAP, Park et al. App. F.2: LAP "using OBD instead of weight magnitudes".

    Every weight, in the layer and in its neighbours, is replaced by its OBD magnitude
    ``ŵ = sqrt(½ G_kk) · |w|`` (so ``ŵ²`` is OBD's saliency ``½ G_kk w²``, LM paper Eq. 3; G the
    GGN diagonal on ``batch``), and Eq. 5 is applied to ``ŵ``: ``|ŵ| · ||Ŵ_{i-1}[j,:]|| ·
    ||Ŵ_{i+1}[:,k]||``, as the authors' code does. BN factors are off by default (``bn="none"``):
    G already contains the BN scales, counting them again would double them.
    """
    if batch is None:
        raise ValueError("obd+lap needs the GGN diagonal on data: pass batch=(x, y)")
    from prunelab.criteria.ggn import ggn_diagonal

    ggn = ggn_diagonal(model, batch, mc_samples=mc_samples, seed=seed, chunk=chunk,
                       loss=objective or "cross_entropy")
    weights = {}
    for n, w in G.weights(model).items():
        w = work_dtype(w)
        weights[n] = w.abs() * (0.5 * ggn[n].detach().to(w.dtype).clamp_min(0)).sqrt()
    return Lookahead(model, graph_of(model, batch), weights=weights, bn=bn).scores()
