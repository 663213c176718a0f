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

**Variants** (Sec. 2.3): :func:`lfp` looks forward only (the succeeding layer), :func:`lbp`
backward only (the preceding layer). The ordered (LAP-forward/-backward and their ``-seq``
forms), activation-weighted (LAP-act), whole-network (LAP-all) and OBD+LAP variants build on
:class:`Lookahead` in :mod:`prunelab.criteria.lookahead_variants`.

All criteria read a plain model in eval mode whose pruned weights are already zero (pruned
neighbours count as zero, as they should) and never modify it.

**Cost.** What depends on the layer graph alone (every layer's producer and consumer terms, the
BN edges) is computed once per graph (graphs are cached by the model's structure) and reused;
a call then reads the weights afresh and costs its tensor operations: one squaring and the two
norm reductions per layer, shared sums for layers with the same producers (attention's q, k,
v), and a lone all-ones neighbour's factor 1 skipped. The scores are the same numbers, bit for
bit, as those of the straightforward evaluation.

Over 500 lines because the Eq. 5/8 engine (its per-graph plan, the norms and neighbour sums
with their caches) and the one-shot criteria on it are one piece: the variants build on it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunelab import graph as G

Scores = G.Scores
Masks = G.Masks

BN_MODES = ("eq8", "fold", "none")


# ============================================================================= core (Eq. 5/8)
def check_bn(bn) -> str:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    return bn


def work_dtype(w: Tensor) -> Tensor:
    w = w.detach()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


@torch.no_grad()
def bn_scales(model: nn.Module, graph: G.LayerGraph | None = None) -> dict[str, Tensor]:
    """Eval-mode BN scales ``a = γ / sqrt(running_var + eps)`` (Park et al. Eq. 7), by module name.

    Only the BNs on the graph's edges are returned. A BN without running statistics normalises
    by batch statistics even in eval mode, so it has no fixed scale and is left out (factor 1).
    """
    graph = graph if graph is not None else G.layer_graph(model)
    return _scales(model, {b for e in graph.edges for b in e.bns})


@torch.no_grad()
def _scales(model: nn.Module, names) -> dict[str, Tensor]:
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


class _Plan:
    """The part of Eq. 5/8 that depends on the layer graph alone (and ``bn``), built once per
    graph: a one-shot LAP then costs its tensor operations, not a walk over the graph's edges.

    ``ins[n]`` / ``outs[n]``: the producer / consumer terms of layer ``n`` in edge order, each
    ``(neighbour or None for an all-ones marker, features per channel, edge key)``; ``edge_bns``:
    for every edge whose BN scales apply, ``(BN names, size, features per channel, layer whose
    dtype the factor takes)``; ``both``: the layers whose input-side norms some producer needs;
    ``has_out``: those whose output-side norms some consumer needs; ``prev_rep``: for each layer,
    the first layer with the same producer terms (their sums are equal).
    """

    __slots__ = ("graph", "ins", "outs", "edge_bns", "both", "has_out", "prev_rep", "bns",
                 "modules")

    def __init__(self, graph: G.LayerGraph, bn: str) -> None:
        self.graph = graph  # held: the cache is keyed by its id
        fold = bn == "fold"

        def applied(bns: tuple[str, ...], src: str) -> tuple[str, ...]:
            if bn == "none":
                return ()
            skip = graph[src].bn if fold and src not in G.MARKERS else None
            return tuple(b for b in bns if b != skip)

        self.ins: dict[str, tuple] = {}
        self.outs: dict[str, tuple] = {}
        self.edge_bns: dict[tuple[str, str], tuple] = {}
        for n, layer in graph.layers.items():
            ins = []
            for e in layer.inputs:
                bns = applied(e.bns, e.src)
                if bns:
                    self.edge_bns[e.src, n] = (bns, layer.in_size, e.flatten or 1, n)
                ins.append((None if e.src in G.MARKERS else e.src, e.flatten or 1, (e.src, n)))
            outs = []
            for e in layer.outputs:
                if e.dst in G.MARKERS:
                    bns = applied(e.bns, n)
                    if bns:
                        self.edge_bns[n, e.dst] = (bns, layer.out_size, 1, n)
                    outs.append((None, 1, (n, e.dst)))
                else:
                    outs.append((e.dst, e.flatten or 1, (n, e.dst)))
            self.ins[n], self.outs[n] = tuple(ins), tuple(outs)
        self.both = {n: bool(layer.prev) for n, layer in graph.layers.items()}
        self.has_out = {n: bool(layer.next) for n, layer in graph.layers.items()}
        # Layers fed by the same producers through edges without BN factors share their sum.
        first: dict[tuple, str] = {}
        self.prev_rep: dict[str, str] = {}
        for n, ins in self.ins.items():
            if any(key in self.edge_bns for _, _, key in ins):
                self.prev_rep[n] = n
            else:
                self.prev_rep[n] = first.setdefault(tuple(t[:2] for t in ins), n)
        self.bns = sorted({b for e in graph.edges for b in e.bns}) if bn != "none" else []
        self.modules = {n: (layer.module, G.split_name(n)[1]) for n, layer in graph.layers.items()}


_PLANS: OrderedDict[tuple[int, str], _Plan] = OrderedDict()
_PLANS_MAX = 64
_PLANS_LOCK = threading.Lock()


def _plan(graph: G.LayerGraph, bn: str) -> _Plan:
    """The :class:`_Plan` of ``graph``, cached by the graph's identity.

    Graphs are immutable and cached by the model's structure (:func:`prunelab.graph.layer_graph`),
    so a model edited in place gets a new graph and with it a new plan; a plan holds its graph,
    so its id cannot be reused while the entry lives.
    """
    key = (id(graph), bn)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None and plan.graph is graph:
            _PLANS.move_to_end(key)
            return plan
    plan = _Plan(graph, bn)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_MAX:
            _PLANS.popitem(last=False)
    return plan


class Lookahead:
    """Neighbour factors of Eq. 5/8 for every layer, each norm computed once.

    ``prev_sq(i)`` is, for every input channel ``j`` of layer ``i``, the squared norm of what
    produces it (summed over producers); ``next_sq(i)`` for every output channel ``k`` the squared
    norm of what consumes it (summed over consumers). ``score(i)`` is then
    ``|w| · ρ_i[k] · sqrt(next_sq[k]) · sqrt(prev_sq[j])``.

    Args:
        model: plain model (weights are read, never written).
        graph: its :func:`prunelab.graph.layer_graph` (computed when omitted).
        weights: replacement tensors by weight name (e.g. OBD magnitudes), laid out as the
            model's; the model's weights are used for the others.
        bn: ``"eq8"``, ``"fold"`` or ``"none"`` (see the module docstring).
        row_scale: per-output-channel factors ``ρ_l`` that scale the rows of ``W_l`` wherever it
            appears (LAP-act's ``Ŵ_l``, App. F Eq. 19); multiplied with the folded BN scales.

    Internally every weight is held ``(out, in, ...)`` (:func:`prunelab.graph.canonical`: a
    HuggingFace ``Conv1D`` stores ``(in, out)``): :attr:`w`, :meth:`score` and :meth:`update`
    use that layout, :meth:`scores` returns the model's. What depends on the graph alone (the
    neighbour terms of every layer) is computed once per graph and reused by every instance.
    """

    def __init__(self, model: nn.Module, graph: G.LayerGraph | None = None, *,
                 weights: Mapping[str, Tensor] | None = None, bn: str = "eq8",
                 row_scale: Mapping[str, Tensor] | None = None) -> None:
        self.graph = graph if graph is not None else G.layer_graph(model)
        self.bn = check_bn(bn)
        plan = self._plan = _plan(self.graph, bn)
        weights = weights or {}
        modules = dict(model.named_modules())  # one walk: ~5x cheaper than a lookup per layer
        self.w: dict[str, Tensor] = {}
        transposed = []
        for n, (mname, tname) in plan.modules.items():
            m = modules.get(mname)
            if m is None:
                m = model.get_submodule(mname)
            w = work_dtype(weights[n] if n in weights else getattr(m, tname))
            # only a Linear-like layer of another library can store (in, out) (HF Conv1D)
            if tname == "weight" and not isinstance(m, G.PRUNABLE_TYPES) \
                    and G.linear_like(m) == (1, 0):
                transposed.append(n)
                w = w.transpose(0, 1)
            self.w[n] = w
        self.transposed = frozenset(transposed)
        self._a = _scales(model, plan.bns) if plan.bns else {}
        self.rho: dict[str, Tensor] = {}
        if bn == "fold" or row_scale is not None:
            for n, layer in self.graph.layers.items():
                r = None
                if bn == "fold" and layer.bn is not None and layer.bn in self._a:
                    r = self._a[layer.bn]
                if row_scale is not None and n in row_scale:
                    r = row_scale[n] if r is None else r * row_scale[n]
                if r is not None:
                    self.rho[n] = r.to(self.w[n].dtype)
        # Squared BN scales of the edges that have any, in the consumer's input space (or the
        # producer's output space for edges that leave the prunable part).
        self._e2: dict[tuple[str, str], Tensor] = {}
        for key, (bns, size, fpc, like) in plan.edge_bns.items():
            v = self._edge_sq(bns, size, fpc, like)
            if v is not None:
                self._e2[key] = v
        self._out: dict[str, Tensor] = {}
        self._in: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor | float] = {}
        self._next: dict[str, Tensor | float] = {}
        self._q: dict[str, Tensor] = {}  # sqrt of the producer sums, shared like them

    def canonical(self, n: str, t: Tensor) -> Tensor:
        """``t`` (shaped like weight ``n``) in the ``(out, in, ...)`` layout, or back: a
        transpose is its own inverse."""
        return G.canonical(t, n in self.transposed)

    def _edge_sq(self, bns: tuple[str, ...], size: int, fpc: int, like: str) -> Tensor | None:
        v = None
        for b in bns:
            a = self._a.get(b)
            if a is None:
                continue
            if a.numel() != size:
                if a.numel() * fpc != size:
                    continue  # a BN over another axis cannot be matched to channels
                a = a.repeat_interleave(fpc)  # BN before the flatten: per channel -> features
            a2 = a.to(self.w[like].dtype).square()
            v = a2 if v is None else v * a2
        return v

    # ----------------------------------------------------------------------- per-layer norms
    def _norms(self, n: str, want_in: bool, want_out: bool) -> None:
        """Row (output side) and/or column (input side) squared norms of layer ``n``.

        The row norms of a layer without prunable producers (whose column norms nobody needs)
        come from one fused read; otherwise both sides come from one squaring (into a reused
        buffer for big layers): a fused norm is ~5x slower down columns than along rows, and a
        fresh w² would cost more than the two reductions. Each side always takes the same path,
        whatever asks first, so the numbers never depend on the order of the calls.
        """
        w = self.w[n]
        out = w.shape[0]
        rho = self.rho.get(n)
        weights = rho.square() if rho is not None else None
        if want_out and not self._plan.both[n]:
            o = torch.linalg.vector_norm(w.reshape(out, -1), dim=1).square_()
            self._out[n] = o * weights if weights is not None else o
            want_out = False
        if not (want_in or want_out):
            return
        sq = _squares(w)
        if sq.dim() != 2:
            sq = sq.reshape(out, -1)
        if want_out:
            o = sq.sum(1)
            self._out[n] = o * weights if rho is not None else o
        if not want_in:
            return
        if weights is None:
            weights = _ones(out, w)
        g = self.graph[n].groups
        if g == 1:
            i = torch.mv(sq.t(), weights)
            if w.dim() > 2:
                i = i.view(w.shape[1], -1).sum(1)
        else:
            per = (sq * weights.unsqueeze(1)).view(g, out // g, w.shape[1], -1)
            i = per.sum(dim=(1, 3)).reshape(-1)
        self._in[n] = i

    def out_sq(self, n: str) -> Tensor:
        """Squared norm of the weights producing each output channel, ``ρ_k² ||W[k, :]||²``."""
        o = self._out.get(n)
        if o is None:
            # producers will want in_sq too: one squaring for both sides
            self._norms(n, want_in=self._plan.both[n] and n not in self._in, want_out=True)
            o = self._out[n]
        return o

    def in_sq(self, n: str) -> Tensor:
        """Squared norm of the weights consuming each input channel, ``Σ_r ρ_r² W[r, j]²``."""
        i = self._in.get(n)
        if i is None:
            plan = self._plan
            self._norms(n, want_in=True,
                        want_out=plan.both[n] and plan.has_out[n] and n not in self._out)
            i = self._in[n]
        return i

    # Sums over neighbours are accumulated in edge order, so the result does not depend on how
    # it is computed; a lone all-ones neighbour (model input/output, opaque operation) stays
    # the number 1.0, which the score then skips multiplying by. Layers fed by the same
    # producers (attention's q, k, v) share one sum.
    def _prev_key(self, n: str) -> str:
        rep = self._plan.prev_rep[n]
        return rep if rep == n or self.w[rep].dtype == self.w[n].dtype else n

    def _prev_sum(self, n: str) -> Tensor | float:
        n = self._prev_key(n)
        acc = self._prev.get(n)
        if acc is not None:
            return acc
        dtype = self.w[n].dtype
        for src, fpc, key in self._plan.ins[n]:
            e2 = self._e2.get(key)
            if src is None:
                term = 1.0 if e2 is None else e2
            else:
                term = self.out_sq(src)
                if term.dtype != dtype:
                    term = term.to(dtype)
                if fpc > 1:
                    term = term.repeat_interleave(fpc)
                if e2 is not None:
                    term = term * e2
            acc = term if acc is None else acc + term
        self._prev[n] = acc
        return acc

    def _next_sum(self, n: str) -> Tensor | float:
        acc = self._next.get(n)
        if acc is not None:
            return acc
        dtype = self.w[n].dtype
        for dst, fpc, key in self._plan.outs[n]:
            e2 = self._e2.get(key)
            if dst is None:
                term = 1.0 if e2 is None else e2
            else:
                term = self.in_sq(dst)
                if term.dtype != dtype:
                    term = term.to(dtype)
                if e2 is not None:
                    term = term * e2
                if fpc > 1:
                    term = term.view(-1, fpc).sum(1)
            acc = term if acc is None else acc + term
        self._next[n] = acc
        return acc

    def _full(self, v: Tensor | float, n: str, size: int) -> Tensor:
        return v if isinstance(v, Tensor) else self.w[n].new_full((size,), v)

    def prev_sq(self, n: str) -> Tensor:
        """For each input channel of ``n``: Σ over producers of the squared producer norm."""
        return self._full(self._prev_sum(n), n, self.graph[n].in_size)

    def next_sq(self, n: str) -> Tensor:
        """For each output channel of ``n``: Σ over consumers of the squared consumer norm."""
        return self._full(self._next_sum(n), n, self.graph[n].out_size)

    # ------------------------------------------------------------------------------ scores
    def _root(self, v: Tensor | float, n: str, size: int) -> Tensor | None:
        """``sqrt(v)``; None for the factor 1 (a lone all-ones neighbour)."""
        if isinstance(v, Tensor):
            return v.sqrt()
        return None if v == 1.0 else self.w[n].new_full((size,), v).sqrt()

    def _prev_root(self, n: str) -> Tensor | None:
        key = self._prev_key(n)
        q = self._q.get(key)
        if q is None:
            v = self._prev_sum(n)
            if not isinstance(v, Tensor):  # markers only: sized by the layer, not shared
                return self._root(v, n, self.graph[n].in_size)
            q = self._q[key] = v.sqrt()
        return q

    def score(self, n: str, *, prev: bool = True, next: bool = True) -> Tensor:
        """Lookahead distortion of every entry of layer ``n`` (Eq. 5/8); one side if asked."""
        layer = self.graph[n]
        r = self._root(self._next_sum(n), n, layer.out_size) if next else None
        rho = self.rho.get(n)
        if rho is not None:
            r = rho.abs() if r is None else r * rho.abs()
        q = self._prev_root(n) if prev else None
        return scaled_abs(self.w[n], r, q, layer.groups)

    def scores(self, *, prev: bool = True, next: bool = True) -> Scores:
        return {n: self.canonical(n, self.score(n, prev=prev, next=next)) for n in self.graph}

    def update(self, n: str, weight: Tensor) -> None:
        """Replace the weight of ``n`` (e.g. after pruning it) and forget what depended on it."""
        self.w[n] = work_dtype(weight)
        for cache in (self._out, self._in):
            cache.pop(n, None)
        layer = self.graph[n]
        for m in layer.next:
            for key in (m, self._plan.prev_rep[m]):
                self._prev.pop(key, None)
                self._q.pop(key, None)
        for m in layer.prev:
            self._next.pop(m, None)


def _ones(size: int, like: Tensor) -> Tensor:
    """A read-only vector of ones shaped ``(size,)`` on ``like``'s device and dtype, reused."""
    key = (size, like.dtype, like.device)
    ones = getattr(_BUFFERS, "ones", None)
    if ones is None:
        ones = _BUFFERS.ones = {}
    v = ones.get(key)
    if v is None:
        if len(ones) >= 256:
            ones.clear()
        v = ones[key] = torch.ones(size, dtype=like.dtype, device=like.device)
    return v


_BUFFERS = threading.local()
_BUFFER_MAX = 1 << 23  # elements (32 MB of float32) kept per thread; larger layers get a temporary
_BUFFER_MIN = 1 << 15  # elements (128 KB of float32): below, malloc's reused blocks are as warm


def _squares(w: Tensor) -> Tensor:
    """``w²`` in a per-thread buffer reused across calls (fresh memory costs ~7x warm memory).

    Valid until the next call: consume it before squaring another tensor. Small tensors are
    squared into fresh memory, which the allocator serves warm (the buffer's bookkeeping would
    cost more than the multiplication).
    """
    if w.numel() > _BUFFER_MAX:
        return w.square().contiguous()
    if w.numel() <= _BUFFER_MIN and w.is_contiguous():
        return torch.mul(w, w)
    key = (w.device, w.dtype)
    bufs = getattr(_BUFFERS, "bufs", None)
    if bufs is None:
        bufs = _BUFFERS.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < w.numel():
        buf = bufs[key] = torch.empty(w.numel(), dtype=w.dtype, device=w.device)
    return torch.mul(w, w, out=buf[:w.numel()].view(w.shape))


def scaled_abs(w: Tensor, r: Tensor | None, q: Tensor | None, groups: int) -> Tensor:
    """``|w[k, j, ...]| · r[k] · q[j]`` with broadcasting only (one allocation, no loops).

    In-place multiplications by a row vector and by a contiguous-row vector vectorise well; a
    (out, in, 1, 1) factor broadcast over 3x3 kernels is ~2x slower, and a materialised
    outer product would be a second full-size allocation.
    """
    if w.is_contiguous():
        s = torch.abs(w)
    else:
        s = torch.empty(w.shape, dtype=w.dtype, device=w.device)  # contiguous even if w is not
        torch.abs(w, out=s)
    if r is None and q is None:
        return s
    out = w.shape[0]
    flat = s if s.dim() == 2 else s.view(out, -1)
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
def graph_of(model: nn.Module, batch=None) -> G.LayerGraph:
    """The layer graph of ``model``: torch.fx, else the autograd graph of one forward pass on
    the batch's inputs (models fx cannot trace, e.g. HuggingFace transformers)."""
    return G.layer_graph(model, None if batch is None else batch[0])


def lap(model: nn.Module, *, batch=None, masks: Masks | None = None, seed: int = 0,
        sparsity=None, scope: str = "global", bn: str = "eq8", **_) -> Scores:
    """LAP score, Park et al. 2020, Eq. 5 (Eq. 8 with batch normalisation).

    ``L(w) = |w| · ||W_{i-1}[j,:]|| · ||W_{i+1}[:,k]||`` with the neighbours of the model's graph;
    squared norms summed over several producers/consumers (residual adds); BN per ``bn``
    (``"eq8"``, ``"fold"``, ``"none"``; module docstring). Data-free; one pass over the weights
    (a ``batch`` only serves to read the graph of a model torch.fx cannot trace).
    """
    return Lookahead(model, graph_of(model, batch), bn=bn).scores()


def lfp(model: nn.Module, *, batch=None, bn: str = "eq8", **_) -> Scores:
    """Lookahead-forward pruning (LFP), Park et al. Sec. 2.3: only the succeeding layer.

    "Looking forward, i.e., only considering the succeeding layer": ``|w| · ||W_{i+1}[:,k]||``
    (with Eq. 8's ``|a_i[k]|`` when the layer has a BN). The last layer reduces to MP.
    """
    return Lookahead(model, graph_of(model, batch), bn=bn).scores(prev=False)


def lbp(model: nn.Module, *, batch=None, bn: str = "eq8", **_) -> Scores:
    """Lookahead-backward pruning (LBP), Park et al. Sec. 2.3: only the preceding layer.

    "Looking backward ... the expected structure of input coming into the current layer":
    ``|w| · ||W_{i-1}[j,:]||`` (with Eq. 8's ``|a_{i-1}[j]|``). The first layer reduces to MP.
    """
    return Lookahead(model, graph_of(model, batch), bn=bn).scores(next=False)
