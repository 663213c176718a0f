"""Lookahead pruning, Park et al. (ICLR 2020), and its variants.

Notation as in the paper: layer ``i`` has weight ``W_i`` of shape ``(out, in, *kernel)``; an entry
``w = W_i[k, j, ...]`` connects input neuron/channel ``j`` to output neuron/channel ``k``.

**LAP** (Eq. 4 -> Eq. 5). Zeroing ``w`` changes the linear block ``W_{i+1} W_i W_{i-1}`` by
``w · W_{i+1}[:, k] W_{i-1}[j, :]`` (App. E, Eq. 17), a rank-one matrix whose Frobenius norm is::

    L_i(w) = |w| · ||W_{i-1}[j, :]||_F · ||W_{i+1}[:, k]||_F

``W_{i-1}[j, :]`` is everything that *produces* input channel ``j`` of layer ``i`` (the whole
filter ``W_{i-1}[j, :, :, :]`` of a conv), ``W_{i+1}[:, k]`` everything that *consumes* its
output channel ``k``. ``W_0`` and ``W_{L+1}`` are all-ones (the paper's convention), so the first
and last layers get a constant factor 1 on their open side. For fully-connected blocks Eq. 5 is
exactly Eq. 4. For convolutions the paper substitutes convolutions for the products (App. E);
the exact distortion is then ``|w| · sqrt(P · Σ_{r,c} ||W_{i+1}[r,k] ⋆ W_{i-1}[j,c]||²)``
(``P`` = output positions, ``⋆`` = full 2-D convolution of kernels), which equals Eq. 5 times
``sqrt(P)`` when the neighbours' kernels are 1x1 and is at most Eq. 5 times
``sqrt(P · kernel area)`` otherwise (Young's inequality). Eq. 5 is what the paper and its code
use; it is the root-mean-square distortion when the kernels' entries have random signs.

**Where the neighbours come from.** From :func:`prunelab.graph.layer_graph` (torch.fx), not from
module order. At a conv -> (pool) -> flatten -> Linear boundary, a conv channel's consumer norm
covers all the Linear columns its features feed, and a Linear input feature's producer norm is
the filter of the channel it comes from (as the authors' code does). When several layers meet
at a residual ``add``, the next layer's input is the sum of their outputs, and since they act on
different inputs (block input vs. residual branch) the producer operator is the concatenation
``[W_p1, W_p2, ...]``, whose row norm is ``sqrt(Σ_p ||W_p[j, :]||²)``: **squared neighbour norms
are summed over all producers, and likewise over all consumers** (stacked ``[W_c1; W_c2]``). The
model input, the model output and operations the graph cannot see through (``cat``, attention
...) count as all-ones neighbours (a contribution of 1).

**Batch normalisation** (Sec. 2.2, Eq. 8): in eval mode a BN is ``x -> a·x + b`` with
``a = γ / sqrt(running_var + eps)``. Option ``bn``:

- ``"eq8"`` (default, the paper and the authors' code): the block is
  ``W_{i+1} diag(a_i) W_i diag(a_{i-1}) W_{i-1}``, hence
  ``L = |w| · |a_{i-1}[j]| · |a_i[k]| · ||W_{i-1}[j,:]|| · ||W_{i+1}[:,k]||``. Generally, every BN
  on the path between two neighbours scales that connection channel-wise (so a BN after a
  residual add scales all its producers); the BN after ``W_{i+1}`` is outside the block.
- ``"fold"``: LAP of the BN-folded network (each BN that directly follows a layer folded into it,
  ``W'_l = diag(a_l) W_l``): as ``"eq8"`` but the consumer norm becomes
  ``||diag(a_{i+1}) W_{i+1}[:, k]||``, i.e. the block also includes the BN after ``W_{i+1}``.
- ``"none"``: ignore BN ("LAP w/o batchnorm" of App. G).

**Variants** (Sec. 2.3, App. F, J): :func:`lfp` looks forward only (the succeeding layer),
:func:`lbp` backward only (the preceding layer); :func:`lap_forward` / :func:`lap_backward` prune
layer by layer to per-layer targets, each layer scored against already-pruned neighbours, and
their ``_seq`` forms split every layer's budget into ``steps`` (5) equal rounds; :func:`lap_act`
weights neurons by activation probabilities; :func:`lap_all` looks ahead through the whole
linearised network; :func:`obd_lap` uses OBD saliencies in place of magnitudes.

All criteria read a plain model in eval mode whose pruned weights are already zero (pruned
neighbours count as zero, as they should) and never modify it.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import graph as G

Scores = G.Scores
Masks = G.Masks

BN_MODES = ("eq8", "fold", "none")
LAYERWISE = "layerwise"


# ============================================================================= core (Eq. 5/8)
def _check_bn(bn) -> str:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    return bn


def _work_dtype(w: Tensor) -> Tensor:
    w = w.detach()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


@torch.no_grad()
def bn_scales(model: nn.Module, graph: G.LayerGraph | None = None) -> dict[str, Tensor]:
    """Eval-mode BN scales ``a = γ / sqrt(running_var + eps)`` (Park et al. Eq. 7), by module name.

    Only the BNs on the graph's edges are returned. A BN without running statistics normalises
    by batch statistics even in eval mode, so it has no fixed scale and is left out (factor 1).
    """
    graph = graph if graph is not None else G.layer_graph(model)
    names = {b for e in graph.edges for b in e.bns}
    out = {}
    for name in names:
        m = model.get_submodule(name)
        if getattr(m, "running_var", None) is None:
            continue
        var = m.running_var.detach()
        a = torch.rsqrt(var.float() + m.eps) if var.dtype in (torch.float16, torch.bfloat16) \
            else torch.rsqrt(var + m.eps)
        if m.weight is not None:
            a = a * m.weight.detach().to(a.dtype)
        out[name] = a
    return out


class Lookahead:
    """Neighbour factors of Eq. 5/8 for every layer, each norm computed once.

    ``prev_sq(i)`` is, for every input channel ``j`` of layer ``i``, the squared norm of what
    produces it (summed over producers); ``next_sq(i)`` for every output channel ``k`` the squared
    norm of what consumes it (summed over consumers). ``score(i)`` is then
    ``|w| · ρ_i[k] · sqrt(next_sq[k]) · sqrt(prev_sq[j])``.

    Args:
        model: plain model (weights are read, never written).
        graph: its :func:`prunelab.graph.layer_graph` (computed when omitted).
        weights: replacement tensors by weight name (e.g. the working copies of the ordered
            variants, or OBD magnitudes); the model's weights are used for the others.
        bn: ``"eq8"``, ``"fold"`` or ``"none"`` (see the module docstring).
        row_scale: per-output-channel factors ``ρ_l`` that scale the rows of ``W_l`` wherever it
            appears (LAP-act's ``Ŵ_l``, App. F Eq. 19); multiplied with the folded BN scales.
    """

    def __init__(self, model: nn.Module, graph: G.LayerGraph | None = None, *,
                 weights: Mapping[str, Tensor] | None = None, bn: str = "eq8",
                 row_scale: Mapping[str, Tensor] | None = None) -> None:
        self.graph = graph if graph is not None else G.layer_graph(model)
        self.bn = _check_bn(bn)
        weights = dict(weights or {})
        self.w: dict[str, Tensor] = {}
        for n in self.graph:
            self.w[n] = _work_dtype(weights[n] if n in weights else G.weight(model, n))
        self._a = bn_scales(model, self.graph) if bn != "none" else {}
        self.rho: dict[str, Tensor] = {}
        for n, layer in self.graph.layers.items():
            r = None
            if bn == "fold" and layer.bn is not None and layer.bn in self._a:
                r = self._a[layer.bn]
            if row_scale is not None and n in row_scale:
                r = row_scale[n] if r is None else r * row_scale[n]
            if r is not None:
                self.rho[n] = r.to(self.w[n].dtype)
        # Squared BN scales of every edge, in the consumer's input space (or the producer's
        # output space for edges that leave the prunable part).
        self._e2: dict[tuple[str, str], Tensor | None] = {}
        for n, layer in self.graph.layers.items():
            for e in layer.inputs:
                skip = self._folded(e.src)
                self._e2[e.src, n] = self._edge_sq(e.bns, layer.in_size, e.flatten or 1, skip, n)
            for e in layer.outputs:
                if e.dst in G.MARKERS:
                    self._e2[n, e.dst] = self._edge_sq(e.bns, layer.out_size, 1,
                                                       self._folded(n), n)
        self._out: dict[str, Tensor] = {}
        self._in: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._next: dict[str, Tensor] = {}

    def _folded(self, src: str) -> str | None:
        if self.bn != "fold" or src in G.MARKERS:
            return None
        return self.graph[src].bn

    def _edge_sq(self, bns: tuple[str, ...], size: int, fpc: int, skip: str | None,
                 like: str) -> Tensor | None:
        v = None
        for b in bns:
            a = self._a.get(b)
            if b == skip or a is None:
                continue
            if a.numel() != size:
                if a.numel() * fpc != size:
                    continue  # a BN over another axis cannot be matched to channels
                a = a.repeat_interleave(fpc)  # BN before the flatten: per channel -> features
            a2 = a.to(self.w[like].dtype).square()
            v = a2 if v is None else v * a2
        return v

    # ----------------------------------------------------------------------- per-layer norms
    def _norms(self, n: str, both: bool) -> None:
        w, layer = self.w[n], self.graph[n]
        out = w.shape[0]
        rho = self.rho.get(n)
        weights = rho.square() if rho is not None else None
        if not both:
            # column norms not needed (first layer): one fused read along the rows
            o = torch.linalg.vector_norm(w.reshape(out, -1), dim=1).square_()
            self._out[n] = o * weights if weights is not None else o
            return
        # Both sides from one squaring into a reused buffer: a fused norm is ~5x slower down
        # columns than along rows, and a fresh w² would cost more than the two reductions.
        sq = _squares(w).reshape(out, -1)
        o = sq.sum(1)
        if weights is None:
            weights = w.new_ones(out)
        g = layer.groups
        if g == 1:
            i = torch.mv(sq.t(), weights)
            if w.dim() > 2:
                i = i.view(w.shape[1], -1).sum(1)
        else:
            per = (sq * weights.unsqueeze(1)).view(g, out // g, w.shape[1], -1)
            i = per.sum(dim=(1, 3)).reshape(-1)
        self._out[n] = o * weights if rho is not None else o
        self._in[n] = i

    def out_sq(self, n: str) -> Tensor:
        """Squared norm of the weights producing each output channel, ``ρ_k² ||W[k, :]||²``."""
        if n not in self._out:
            self._norms(n, both=bool(self.graph[n].prev))  # producers will want in_sq
        return self._out[n]

    def in_sq(self, n: str) -> Tensor:
        """Squared norm of the weights consuming each input channel, ``Σ_r ρ_r² W[r, j]²``."""
        if n not in self._in:
            self._norms(n, both=True)
        return self._in[n]

    def prev_sq(self, n: str) -> Tensor:
        """For each input channel of ``n``: Σ over producers of the squared producer norm."""
        if n not in self._prev:
            layer = self.graph[n]
            acc = None
            for e in layer.inputs:
                e2 = self._e2[e.src, n]
                if e.src in G.MARKERS:
                    term = e2 if e2 is not None else self.w[n].new_ones(layer.in_size)
                else:
                    term = self.out_sq(e.src).to(self.w[n].dtype)
                    if (e.flatten or 1) > 1:
                        term = term.repeat_interleave(e.flatten)
                    if e2 is not None:
                        term = term * e2
                acc = term if acc is None else acc + term
            self._prev[n] = acc
        return self._prev[n]

    def next_sq(self, n: str) -> Tensor:
        """For each output channel of ``n``: Σ over consumers of the squared consumer norm."""
        if n not in self._next:
            layer = self.graph[n]
            acc = None
            for e in layer.outputs:
                if e.dst in G.MARKERS:
                    e2 = self._e2[n, e.dst]
                    term = e2 if e2 is not None else self.w[n].new_ones(layer.out_size)
                else:
                    term = self.in_sq(e.dst).to(self.w[n].dtype)
                    e2 = self._e2[n, e.dst]
                    if e2 is not None:
                        term = term * e2
                    if (e.flatten or 1) > 1:
                        term = term.view(layer.out_size, e.flatten).sum(1)
                acc = term if acc is None else acc + term
            self._next[n] = acc
        return self._next[n]

    # ------------------------------------------------------------------------------ scores
    def score(self, n: str, *, prev: bool = True, next: bool = True) -> Tensor:
        """Lookahead distortion of every entry of layer ``n`` (Eq. 5/8); one side if asked."""
        r = self.next_sq(n).sqrt() if next else None
        rho = self.rho.get(n)
        if rho is not None:
            r = rho.abs() if r is None else r * rho.abs()
        q = self.prev_sq(n).sqrt() if prev else None
        return _scaled_abs(self.w[n], r, q, self.graph[n].groups)

    def scores(self, *, prev: bool = True, next: bool = True) -> Scores:
        return {n: self.score(n, prev=prev, next=next) for n in self.graph}

    def update(self, n: str, weight: Tensor) -> None:
        """Replace the weight of ``n`` (e.g. after pruning it) and forget what depended on it."""
        self.w[n] = _work_dtype(weight)
        for cache in (self._out, self._in):
            cache.pop(n, None)
        layer = self.graph[n]
        for m in layer.next:
            self._prev.pop(m, None)
        for m in layer.prev:
            self._next.pop(m, None)


_BUFFERS = threading.local()
_BUFFER_MAX = 1 << 23  # elements (32 MB of float32) kept per thread; larger layers get a temporary


def _squares(w: Tensor) -> Tensor:
    """``w²`` in a per-thread buffer reused across calls (fresh memory costs ~7x warm memory).

    Valid until the next call: consume it before squaring another tensor.
    """
    if w.numel() > _BUFFER_MAX:
        return w.square().contiguous()
    key = (w.device, w.dtype)
    bufs = getattr(_BUFFERS, "bufs", None)
    if bufs is None:
        bufs = _BUFFERS.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < w.numel():
        buf = bufs[key] = torch.empty(w.numel(), dtype=w.dtype, device=w.device)
    return torch.mul(w, w, out=buf[:w.numel()].view(w.shape))


def _scaled_abs(w: Tensor, r: Tensor | None, q: Tensor | None, groups: int) -> Tensor:
    """``|w[k, j, ...]| · r[k] · q[j]`` with broadcasting only (one allocation, no loops).

    In-place multiplications by a row vector and by a contiguous-row vector vectorise well; a
    (out, in, 1, 1) factor broadcast over 3x3 kernels is ~2x slower, and a materialised
    outer product would be a second full-size allocation.
    """
    s = torch.empty(w.shape, dtype=w.dtype, device=w.device)  # contiguous even if w is not
    torch.abs(w, out=s)
    if r is None and q is None:
        return s
    out = w.shape[0]
    flat = s.view(out, -1)
    if r is not None:
        flat.mul_(r.unsqueeze(1))
    if q is None:
        return s
    kk = flat.shape[1] // w.shape[1]  # kernel positions per input channel (1 for Linear)
    if groups == 1:
        flat.mul_(q.repeat_interleave(kk) if kk > 1 else q)
    else:
        in_g = w.shape[1]
        qg = q.view(groups, 1, in_g).expand(groups, out // groups, in_g).reshape(out, in_g)
        s.mul_(qg.view(out, in_g, *(1,) * (w.dim() - 2)))
    return s


# ================================================================================ one-shot
def lap(model: nn.Module, *, batch=None, masks: Masks | None = None, seed: int = 0,
        sparsity=None, scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP score, Park et al. 2020, Eq. 5 (Eq. 8 with batch normalisation).

    ``L(w) = |w| · ||W_{i-1}[j,:]|| · ||W_{i+1}[:,k]||`` with the neighbours of the model's graph;
    squared norms summed over several producers/consumers (residual adds); BN per ``bn``
    (``"eq8"``, ``"fold"``, ``"none"``; module docstring). Data-free; one pass over the weights.
    """
    return Lookahead(model, bn=bn).scores()


def lfp(model: nn.Module, *, bn: str = "eq8", **_) -> Scores:
    """Lookahead-forward pruning (LFP), Park et al. Sec. 2.3: only the succeeding layer.

    "Looking forward, i.e., only considering the succeeding layer": ``|w| · ||W_{i+1}[:,k]||``
    (with Eq. 8's ``|a_i[k]|`` when the layer has a BN). The last layer reduces to MP.
    """
    return Lookahead(model, bn=bn).scores(prev=False)


def lbp(model: nn.Module, *, bn: str = "eq8", **_) -> Scores:
    """Lookahead-backward pruning (LBP), Park et al. Sec. 2.3: only the preceding layer.

    "Looking backward ... the expected structure of input coming into the current layer":
    ``|w| · ||W_{i-1}[j,:]||`` (with Eq. 8's ``|a_{i-1}[j]|``). The first layer reduces to MP.
    """
    return Lookahead(model, bn=bn).scores(next=False)


# ============================================================================ ordered / seq
def _n_pruned(sparsity: float, n: int) -> int:
    """floor(sparsity · n), robust to round-off: the count :func:`prunelab.masks.select` uses."""
    x = sparsity * n
    r = round(x)
    return int(r) if abs(x - r) < 1e-6 * max(1.0, x) else int(math.floor(x))


def _fraction(s, what: str) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0 \
            or not math.isfinite(float(s)):
        raise ValueError(f"{what} must be a number in [0, 1), got {s!r}")
    return float(s)


def layer_targets(model: nn.Module, sparsity, scope: str, criterion: str) -> dict[str, int]:
    """Entries to prune per layer for the layerwise LAP variants: name -> count.

    ``sparsity`` is a float (the same fraction of every layer) or ``{name: fraction}`` (layers not
    named keep all their weights, as in :func:`prunelab.masks.select`).
    """
    if scope != LAYERWISE or sparsity is None:
        raise ValueError(
            f"{criterion!r} prunes layer by layer (Park et al. Sec. 2.3): it needs per-layer "
            f"targets, i.e. scope='layerwise' and sparsity= a fraction or {{layer: fraction}}; "
            f"got scope={scope!r}, sparsity={sparsity!r}")
    names = G.prunable_names(model)
    if isinstance(sparsity, Mapping):
        unknown = set(sparsity) - set(names)
        if unknown:
            raise ValueError(f"sparsity names unknown layers {sorted(unknown)}; prunable "
                             f"weights: {names}")
        fr = {n: _fraction(sparsity.get(n, 0.0), f"sparsity[{n!r}]") for n in names}
    else:
        s = _fraction(sparsity, "sparsity")
        fr = dict.fromkeys(names, s)
    return {n: _n_pruned(fr[n], G.weight(model, n).numel()) for n in names}


def _prune_lowest(key: Tensor, k: int) -> Tensor:
    """Keep-mask pruning exactly the ``k`` lowest entries, lower index first among ties.

    The rule of :func:`prunelab.masks.select`, so the masks built from our scores are the ones
    the inner procedure chose.
    """
    flat = key.flatten()
    n = flat.numel()
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep.view_as(key)
    if k >= n:
        return (~keep).view_as(key)
    t = torch.kthvalue(flat, k).values
    below = flat < t
    keep &= ~below
    need = k - int(below.sum())
    if need > 0:
        keep[torch.nonzero(flat == t).flatten()[:need]] = False
    return keep.view_as(key)


@torch.no_grad()
def _ordered(model: nn.Module, *, sparsity, scope: str, masks: Masks | None, backward: bool,
             steps: int, bn: str, criterion: str) -> Scores:
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
    la = Lookahead(model, bn=bn)
    order = list(la.graph)[::-1] if backward else list(la.graph)
    for n, m in (masks or {}).items():  # direct calls may pass masks not yet multiplied in
        if n in la.graph:
            la.update(n, la.w[n] * m.to(device=la.w[n].device, dtype=torch.bool))
    alive = {n: la.w[n] != 0 for n in order}
    dead0 = {n: int(a.numel() - a.sum()) for n, a in alive.items()}
    out: Scores = {}
    for t in range(1, steps + 1):
        for n in order:
            goal = targets[n]
            k = goal if goal <= dead0[n] else dead0[n] + (goal - dead0[n]) * t // steps
            s = la.score(n)
            keep = _prune_lowest(s.masked_fill(~alive[n], -math.inf), k)
            alive[n] = keep
            la.update(n, la.w[n] * keep)
            if t == steps:
                out[n] = s.masked_fill_(~keep, -math.inf)
    return out


def lap_forward(model: nn.Module, *, masks: Masks | None = None, sparsity=None,
                scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP-forward, Park et al. Sec. 2.3: prune layers first to last, each scored with Eq. 5/8
    against its already-pruned predecessors. Needs per-layer targets (``scope="layerwise"``)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=False, steps=1,
                    bn=bn, criterion="lap-forward")


def lap_backward(model: nn.Module, *, masks: Masks | None = None, sparsity=None,
                 scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP-backward, Park et al. Sec. 2.3: prune layers last to first, each scored against its
    already-pruned successors. Needs per-layer targets (``scope="layerwise"``)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=True, steps=1,
                    bn=bn, criterion="lap-backward")


def lap_forward_seq(model: nn.Module, *, masks: Masks | None = None, sparsity=None,
                    scope: str = "global", bn: str = "eq8", steps: int = 5, **_) -> Scores:
    """LAP-forward-seq, Park et al. Sec. 2.3 "Sequential pruning": each layer's budget is split
    into ``steps`` (5) equal parts, and ``steps`` forward passes each prune one part of every
    layer, first to last, re-scoring against the current neighbours (as the authors' code)."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=False,
                    steps=steps, bn=bn, criterion="lap-forward-seq")


def lap_backward_seq(model: nn.Module, *, masks: Masks | None = None, sparsity=None,
                     scope: str = "global", bn: str = "eq8", steps: int = 5, **_) -> Scores:
    """LAP-backward-seq: as :func:`lap_forward_seq`, each round going from last to first."""
    return _ordered(model, sparsity=sparsity, scope=scope, masks=masks, backward=True,
                    steps=steps, bn=bn, criterion="lap-backward-seq")


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
        gm = torch.fx.symbolic_trace(model)

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

        _Probe(gm).run(x)
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
            model(x)
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
    graph = G.layer_graph(model)
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
        if isinstance(m, G._BN_MODULES):
            a = self.scales.get(target)
            return x if a is None else x * a.view(1, -1, *(1,) * (x.dim() - 2))
        if isinstance(m, G._ACT_MODULES + G._PASS_MODULES):
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
        if target in G._ACT_FUNCS or target in G._PASS_FUNCS:
            return args[0] if args else kwargs["input"]
        if target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            return _avg_for_max(args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in G._ACT_METHODS or target in G._PASS_METHODS:
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
    _check_bn(bn)
    if G.is_parametrized(model):
        model = G.plain_copy(model)
    graph = G.layer_graph(model)
    if not graph.traced:
        raise ValueError(f"lap-all needs a model torch.fx can trace ({graph.reason})")
    if batch is not None:
        shape = tuple(batch[0].shape[1:])
    elif input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    elif hasattr(model, "input_shape"):
        shape = tuple(int(s) for s in model.input_shape)
    else:
        raise ValueError("lap-all needs the input shape: pass batch=(x, y) or input_shape=")
    weights = {n: _work_dtype(G.weight(model, n)) for n in graph}
    dtype = next(iter(weights.values())).dtype
    scales = bn_scales(model, graph) if bn != "none" else {}
    scales = {k: v.to(dtype) for k, v in scales.items()}
    gm = torch.fx.symbolic_trace(model)
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
        scores[n] = _scaled_abs(weights[n], r, q, layer.groups)
    return scores


# ==================================================================================== OBD+LAP
def obd_lap(model: nn.Module, *, batch=None, bn: str = "none", mc_samples: int = 0,
            seed: int = 0, chunk: int | None = None, **_) -> Scores:
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

    ggn = ggn_diagonal(model, batch, mc_samples=mc_samples, seed=seed, chunk=chunk)
    weights = {}
    for n, w in G.weights(model).items():
        w = _work_dtype(w)
        weights[n] = w.abs() * (0.5 * ggn[n].detach().to(w.dtype).clamp_min(0)).sqrt()
    return Lookahead(model, weights=weights, bn=bn).scores()
