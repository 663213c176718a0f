"""Diagonal of the Generalised Gauss-Newton matrix of the mean cross-entropy, BackPACK-style.

The GGN (LM paper App. A, Eq. 8) of L(θ) = 1/N Σ_n ℓ(f_θ(x_n), y_n) is
G = 1/N Σ_n J_nᵀ H_n J_n, with J_n = ∂f_θ(x_n)/∂θ and H_n = ∇²_z ℓ = diag(p) − p pᵀ, p = softmax(z).
Writing H_n = R_n R_nᵀ, the diagonal is G_kk = 1/N Σ_n Σ_j (J_nᵀ R_n[:, j])²_k: each column of
R_n is propagated backward like an output gradient and contracted with the layer inputs (the
"square-root factor" propagation of BackPACK's DiagGGN, Dangel et al. 2020). The Monte-Carlo
variant replaces R_n by the gradients p − e_ŷ of sampled labels ŷ ~ softmax(z), which is unbiased
because E[(p − e_ŷ)(p − e_ŷ)ᵀ] = H_n.

Two propagation engines give identical numbers:

* ``"chain"``: the model is a chain of modules (nested ``nn.Sequential``); the factor, shaped
  (columns, N, features), is pushed through each module by hand -- one large matmul per Linear,
  one transposed convolution per Conv, in-place masks for activations. Modules it does not know
  and that hold no prunable layer (pooling, custom blocks) are differentiated locally.
* ``"autograd"``: any graph autograd can differentiate (residual nets, functional code): the
  prunable layers' outputs are captured with hooks and each factor column is pulled back with one
  ``torch.autograd.grad`` call. Each column is contracted as it arrives: Σ_j b² for Linear layers
  on (N, features), and for Linear layers on token sequences (transformers: the weight is shared
  across positions) either the position-pair expansion or per-example gradients, whichever costs
  less (:class:`_TokenLinear`), so the k columns are never stacked.

Cost (measured, ``python -m benchmarks --only ggn transformer``): the exact diagonal needs C − 1
backward passes of the factor (C classes); on a transformer each costs about half a
forward+backward (LayerNorm, GELU, softmax and reshape backward are memory-bound and are paid per
column), which puts the floor of the exact diagonal near (C − 1)/2 forward+backward passes
before any contraction (4.5× at C = 10). A batched backward (``is_grads_batched=True``, vmap
over the columns) measured slower than the loop here.

``"auto"`` picks the chain when the model is one, otherwise autograd. The output-side factor of
each loss comes from :mod:`prunelab.criteria.factors`.

Over 500 lines because the two engines, their shared accumulator and chunking are one idea that
must give identical numbers; apart they would drift.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab._masking import foreign_forward_hooks
from prunelab.criteria.factors import (MAX_EXACT_COLUMNS, columns, draws, output_factor,
                                       units_of)

Method = Literal["auto", "chain", "autograd"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
             nn.Dropout3d, nn.AlphaDropout)
# Elementwise activations: their Jacobian is diagonal, so the factor is scaled in place.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)

# Elements of the temporary per-example gradients (columns x examples x weight) of conv layers.
_PER_EXAMPLE_BUDGET = 2**24
# Elements of one chunk of per-example gradients, squared and summed right after the matmul that
# writes them: 4 MB in float32 stays in cache (measured 4x faster than 64 MB chunks for k = 1;
# 1 MB chunks were as fast on one thread but slower on two).
_PER_EXAMPLE_CHUNK = 2**20
# Relative cost of one elementwise multiply-add (memory-bound) to one matmul multiply-add.
_ELEMENTWISE_COST = 8
# Bytes of activations and propagated factors per chunk of examples when ``chunk=None``.
_CHUNK_BUDGET_BYTES = 2**29


@dataclass
class LossGradGGN:
    """What one pass of :func:`loss_grad_ggn` measures on a batch.

    Attributes:
        loss: mean cross-entropy L(θ) on the batch (a float).
        grad: ``{name: ∂L/∂θ}`` for every prunable weight (empty when not requested).
        ggn: ``{name: diag G}`` for every prunable weight, shaped like the weight.
        examples: number of examples used.
    """

    loss: float
    grad: dict[str, Tensor] = field(default_factory=dict)
    ggn: dict[str, Tensor] = field(default_factory=dict)
    examples: int = 0


def ggn_diagonal(model: nn.Module, batch: tuple[Tensor, Tensor], *, mc_samples: int = 0,
                 seed: int = 0, chunk: int | None = None, method: Method = "auto",
                 loss="cross_entropy", output=None) -> dict[str, Tensor]:
    """Diagonal of the GGN of the mean cross-entropy w.r.t. every prunable weight (LM paper App. A).

    Args:
        model: classifier returning logits (N, C); evaluated in eval mode (BatchNorm uses its
            running statistics), never modified.
        batch: (x, y) with y class indices (N,) or class probabilities (N, C).
        mc_samples: 0 for the exact diagonal; k > 0 for the Monte-Carlo estimate with k sampled
            labels per example (unbiased).
        seed: seed of the label sampling (same seed, same numbers).
        chunk: examples per pass; ``None`` picks it from a memory budget.
        method: ``"chain"`` (hand-written propagation, sequential models only), ``"autograd"``
            (any graph) or ``"auto"``.
        loss, output: the loss and output rule (:func:`prunelab.batches.objective`).

    Returns:
        ``{name: tensor shaped like the weight}``, keyed as :func:`prunelab.graph.prunable_names`.
    """
    return loss_grad_ggn(model, batch, mc_samples=mc_samples, seed=seed, chunk=chunk,
                         method=method, grad=False, loss=loss, output=output).ggn


def loss_grad_ggn(model: nn.Module, batch: tuple[Tensor, Tensor], *, mc_samples: int = 0,
                  seed: int = 0, chunk: int | None = None, method: Method = "auto",
                  grad: bool = True, loss="cross_entropy", output=None) -> LossGradGGN:
    """Loss, gradient and GGN diagonal of the mean cross-entropy in one pass (LM paper App. A).

    The gradient rides along as one extra backward column, p − e_y, so the quadratic model
    (``qm``) costs one batched backward, not a backward plus the GGN.

    Args:
        model: classifier returning logits (N, C); see :func:`ggn_diagonal`.
        batch: (x, y) tensors.
        mc_samples: 0 = exact GGN diagonal; k > 0 = Monte-Carlo with k labels per example.
        seed: seed of the label sampling.
        chunk: examples per pass; ``None`` picks it from a memory budget.
        method: ``"auto"``, ``"chain"`` or ``"autograd"``.
        grad: also return the gradient of the loss w.r.t. the prunable weights.
        loss: ``"cross_entropy"`` (per example, or per token for (N, T, C) outputs with
            ignore_index -100), ``"mse"`` or a callable ``(output, target) -> mean loss`` whose
            Hessian w.r.t. the output is taken by autograd per example (it must be a mean over
            examples; non-convex parts of it are clipped to the positive semi-definite part).
        output: optional ``model output -> tensor`` (see :func:`prunelab.batches.output_tensor`).

    Returns:
        :class:`LossGradGGN` with loss, grad, ggn and the number of examples.

    Raises:
        ValueError: bad batch, logits not (N, C) with C >= 2, bad ``mc_samples``, ``chunk`` or
            ``method``.
    """
    obj = B.objective(loss, output)
    x, y = batch
    # the batch follows the model (DESIGN, Round 2): floating inputs and soft labels take its
    # dtype, everything its device
    x, y = B.to_model(x, model), B.to_model(y, model)
    if B.length(x) != len(y) or len(y) == 0:
        raise ValueError(f"batch x and y must have the same non-zero length, got {B.length(x)} "
                         f"and {len(y)}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
        raise ValueError(f"mc_samples must be an int >= 0, got {mc_samples!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    if method not in ("auto", "chain", "autograd"):
        raise ValueError(f"method must be 'auto', 'chain' or 'autograd', got {method!r}")

    names = G.prunable_names(model)
    modules = {n: G.module_of(model, n) for n in names}
    odd = [n for n in names if G.split_name(n)[1] != "weight" or not G.is_layer(modules[n])]
    if odd:
        raise ValueError(
            f"the GGN diagonal is read from the calls of each prunable module (Linear, Conv or "
            f"Linear-like), and {odd} are not such a module's weight (nn.MultiheadAttention's "
            f"fused projections, embeddings, norms): obd, qm and obd+lap cannot score this "
            f"model; use lm, snip, taylor-fo or mp, or leave them out with prunable=")
    plain_ce = obj.loss == "cross_entropy" and obj.output is None and y.dim() == 1
    chain = _chain(model) if method != "autograd" and isinstance(x, Tensor) and plain_ce else None
    if method == "chain" and chain is None:
        raise ValueError("method='chain' needs a model made of nested nn.Sequential containers "
                         "with Linear/Conv layers (zero padding mode), tensor inputs and "
                         "loss='cross_entropy' over classes; use method='autograd'")

    modes = {m: m.training for m in model.modules()}
    model.eval()  # BN becomes the affine map of its running statistics; dropout is off
    try:
        n_total = len(y)
        shape = None if plain_ce else _output_shape(model, x, obj)
        cols = columns(obj, y, shape, mc_samples)
        if not mc_samples and cols > MAX_EXACT_COLUMNS:
            raise ValueError(
                f"the exact GGN diagonal of loss {obj.name!r} with outputs shaped "
                f"{(n_total, *shape) if shape else tuple(y.shape)} needs {cols} backward columns "
                f"per example (limit {MAX_EXACT_COLUMNS}, e.g. a wide vocabulary); pass "
                f"mc_samples=1 for the unbiased Monte-Carlo estimate instead")
        # Random draws made up front so the estimate does not depend on the chunking.
        uniforms = draws(obj, y, shape, mc_samples, seed)
        units = units_of(obj, y)
        step = chunk or _auto_chunk(model, x, chain, mc_samples, grad, obj, cols)
        acc = _Accumulator(modules, grad)
        loss_sum = 0.0
        for start in range(0, n_total, step):
            sl = slice(start, min(start + step, n_total))
            u = uniforms[sl] if uniforms is not None else None
            if chain is not None:
                loss_sum += _chain_pass(chain, x[sl], y[sl], u, acc)
            else:
                loss_sum += _autograd_pass(model, modules, B.take(x, sl), y[sl], u, acc, obj)
    finally:
        for m, mode in modes.items():
            m.training = mode
    ggn, grads = acc.result(units)
    unseen = [n for n, m in modules.items() if m not in acc.seen]
    if unseen:
        _check_unused(model, x, obj, unseen)
        for n in unseen:
            warnings.warn(f"{n} was never called through its module during the forward pass and "
                          f"does not affect the output; its GGN diagonal and gradient are zero",
                          stacklevel=2)
    return LossGradGGN(loss=loss_sum / units,
                       grad={n: grads[modules[n]] for n in names} if grad else {},
                       ggn={n: ggn[modules[n]] for n in names}, examples=n_total)


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear, or a Linear-like layer (:func:`prunelab.graph.linear_like`) computing the
    same map: per-example gradients follow the Linear formulas in the ``(out, in)`` layout."""
    return isinstance(m, nn.Linear) or G.linear_like(m) is not None


def _transposed(m: nn.Module) -> bool:
    """True for a layer storing its weight ``(in, out)`` (HF ``Conv1D``)."""
    return not isinstance(m, G.PRUNABLE_TYPES) and G.linear_like(m) == (1, 0)


def _out_in(m: nn.Module) -> Tensor:
    """The weight of ``m`` laid out ``(out, in, ...)`` (a view)."""
    return m.weight.T if _transposed(m) else m.weight


def _check_unused(model: nn.Module, x, obj: B.Objective, names: list[str]) -> None:
    """ValueError when weights whose module was never called still shape the output (used by a
    functional kernel, as nn.MultiheadAttention uses its out_proj): their GGN diagonal cannot be
    read from module calls, and zero would be wrong."""
    ws = [G.weight(model, n) for n in names]
    with torch.enable_grad():
        z = obj.forward(model, B.take(x, slice(0, 1)))
        grads = torch.autograd.grad(z.sum(), ws, allow_unused=True) if z.requires_grad else []
    used = [n for n, g in zip(names, grads) if g is not None]
    if used:
        raise ValueError(
            f"the GGN diagonal is read from the calls of each prunable module, and {used} shape "
            f"the output without their module being called (e.g. nn.MultiheadAttention's "
            f"out_proj inside F.multi_head_attention_forward): obd, qm and obd+lap cannot score "
            f"this model; use lm, snip, taylor-fo or mp, or write attention with nn.Linear "
            f"projections (as pl.models' vit and HuggingFace models do)")


def _output_shape(model: nn.Module, x, obj: B.Objective) -> tuple[int, ...]:
    """Shape of one example's output (a forward pass on the first example)."""
    with torch.no_grad():
        return tuple(obj.forward(model, B.take(x, slice(0, 1))).shape[1:])


# --------------------------------------------------------------------------------------------
# Contraction of propagated factors with layer inputs.
# --------------------------------------------------------------------------------------------
class _Accumulator:
    """Running sums of Σ_n Σ_j (per-example gradient)² and Σ_n gradient, per prunable module."""

    def __init__(self, modules: dict[str, nn.Module], grad: bool) -> None:
        self.modules = list(dict.fromkeys(modules.values()))
        self.grad = grad
        self.diag: dict[nn.Module, Tensor] = {}
        self.gsum: dict[nn.Module, Tensor] = {}
        self.seen: set[nn.Module] = set()

    def _add(self, store: dict, m: nn.Module, value: Tensor) -> None:
        if m in store:
            store[m] += value
        else:
            store[m] = value

    @staticmethod
    def fast(m: nn.Module, a: Tensor) -> bool:
        """True for a Linear on (N, features): no weight sharing across positions."""
        return _is_linear(m) and a.dim() == 2

    def add(self, m: nn.Module, a: Tensor, b: Tensor, k: int, scale: Tensor | None = None) -> None:
        """Add one call of ``m``: input ``a`` (N, ...), factors ``scale·b`` (cols, N, ...)."""
        if self.fast(m, a):
            # Accumulating column by column reads b once and allocates only (N, O) (measured
            # faster than b.square().sum(0)).
            sq = b[0].square()
            for j in range(1, k):
                sq.addcmul_(b[j], b[j])
            if scale is not None:
                sq.mul_(scale.square())
            gcol = None
            if self.grad:
                gcol = b[k] if scale is None else b[k] * scale
            self.add_linear(m, a, sq, gcol)
            return
        if scale is not None:
            b = b * scale
        self.add_calls(m, [(a, b)], k)

    def add_linear(self, m: nn.Module, a: Tensor, sq: Tensor, gcol: Tensor | None) -> None:
        """Add a Linear on (N, K) from sq = Σ_j b_j² (N, O) and the gradient column (N, O).

        Without weight sharing, Σ_j over columns can precede the matmul: (Σ_j b_j²)ᵀ a².
        """
        self.seen.add(m)
        self._add(self.diag, m, sq.T @ a.square())
        if self.grad and gcol is not None:
            self._add(self.gsum, m, gcol.T @ a)

    def add_done(self, m: nn.Module, diag: Tensor, gsum: Tensor | None) -> None:
        """Add sums already contracted for ``m``: Σ squared per-example gradients, Σ gradients."""
        self.seen.add(m)
        self._add(self.diag, m, diag.reshape(m.weight.shape))
        if self.grad and gsum is not None:
            self._add(self.gsum, m, gsum.reshape(m.weight.shape))

    def add_calls(self, m: nn.Module, calls: Sequence[tuple[Tensor, Tensor]], k: int) -> None:
        """Add all calls of ``m`` in one pass; several calls (shared weights) add up per example."""
        self.seen.add(m)
        us, bs = zip(*(_positions(m, a, b) for a, b in calls))
        u = torch.cat(us, -1) if len(us) > 1 else us[0]  # (N, g, Kg, P)
        b = torch.cat(bs, -1) if len(bs) > 1 else bs[0]  # (cols, N, g, Og, P)
        cols, n, g, og, p = b.shape
        kg = u.shape[2]
        # Positions are summed BEFORE squaring (the weight is shared across them). Per-example
        # gradients cost k·P multiply-adds per weight and example but write k outputs, which is
        # memory-bound for few positions; expanding the square over position pairs costs P² in
        # one large matmul. Measured crossover: P ≈ 2k.
        if p <= 2 * k:
            diag = _square_sum_pairs(b[:k], u)
        else:
            diag = _square_sum_per_example(b[:k], u)
        shape = _out_in(m).shape
        if self.grad:  # the plain weight gradient: one matmul over examples and positions
            bg = b[k].permute(1, 2, 0, 3).reshape(g, og, n * p)
            ug = u.permute(1, 0, 3, 2).reshape(g, n * p, kg)
            self._add(self.gsum, m, torch.bmm(bg, ug).reshape(shape))
        self._add(self.diag, m, diag.reshape(shape))

    def result(self, n_total: int) -> tuple[dict[nn.Module, Tensor], dict[nn.Module, Tensor]]:
        """Means over ``n_total`` examples: ({module: GGN diagonal}, {module: gradient})."""
        ggn, grads = {}, {}
        for m in self.modules:
            # sums are (out, in, ...); a transposed Conv1D stores (in, out): back to its layout
            back = _transposed(m)
            zero = torch.zeros_like(m.weight).detach()
            ggn[m] = (self.diag[m] / n_total).detach() if m in self.diag else zero
            if self.grad:
                grads[m] = (self.gsum[m] / n_total).detach() if m in self.gsum else zero.clone()
            if back and m in self.diag:
                ggn[m] = ggn[m].T
                if self.grad and m in self.gsum:
                    grads[m] = grads[m].T
        return ggn, grads


def _square_sum_per_example(b: Tensor, u: Tensor) -> Tensor:
    """Σ_j Σ_n (Σ_p b[j,n,:,:,p] u[n,:,:,p]ᵀ)², per-example gradients from one bmm per column.

    Args:
        b: factors (k, N, g, Og, P); u: inputs (N, g, Kg, P).

    Returns:
        (g, Og, Kg).
    """
    k, n, g, og, p = b.shape
    kg = u.shape[2]
    ut = u.reshape(n * g, kg, p).transpose(1, 2)  # (N·g, P, Kg), no copy
    step = max(1, _PER_EXAMPLE_CHUNK // max(1, g * og * kg))
    buf = b.new_empty(min(n, step) * g, og, kg)
    diag = b.new_zeros(g, og, kg)
    for c in range(k):
        bc = b[c].reshape(n * g, og, p)
        for s in range(0, n, step):
            e = min(n, s + step)
            pe = torch.bmm(bc[s * g:e * g], ut[s * g:e * g], out=buf[: (e - s) * g])
            diag += pe.square_().view(e - s, g, og, kg).sum(0)  # in place: no fresh memory
    return diag


def _square_sum_pairs(b: Tensor, u: Tensor) -> Tensor:
    """The same sum expanded over position pairs: Σ_n Σ_pq (Σ_j b_p b_q)(u_p u_q), one matmul.

    Args:
        b: factors (k, N, g, Og, P); u: inputs (N, g, Kg, P).

    Returns:
        (g, Og, Kg).
    """
    k, n, g, og, p = b.shape
    kg = u.shape[2]
    step = max(1, _PER_EXAMPLE_BUDGET // max(1, g * (og + kg) * p * p + k * g * og * p))
    diag = b.new_zeros(g, og, kg)
    for s in range(0, n, step):
        e = min(n, s + step)
        bp = b[:, s:e].permute(1, 2, 3, 0, 4).reshape(-1, k, p)
        bb = torch.bmm(bp.transpose(1, 2), bp).view(e - s, g, og, p * p)  # Σ_j b_p b_q
        uu = (u[s:e].unsqueeze(-1) * u[s:e].unsqueeze(-2)).view(e - s, g, kg, p * p)
        diag.baddbmm_(bb.permute(1, 2, 0, 3).reshape(g, og, -1),
                      uu.permute(1, 0, 3, 2).reshape(g, -1, kg))
    return diag


def _positions(m: nn.Module, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs as (N, g, K/g, P); factors as (cols, N, g, O/g, P)."""
    cols, n = b.shape[:2]
    if _is_linear(m):
        u = a.reshape(n, -1, a.shape[-1]).transpose(1, 2).unsqueeze(1)
        bb = b.reshape(cols, n, -1, b.shape[-1]).transpose(2, 3).unsqueeze(2)
        return u, bb
    g = m.groups
    pad = m._reversed_padding_repeated_twice
    if a.dim() == 4 and m.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
        # im2col pads by itself: saves a padded copy of the input
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=(pad[2], pad[0]),
                     stride=m.stride)
    else:
        u = _unfold(_pad(m, a), m.kernel_size, m.stride, m.dilation)  # (N, I·k, P)
    u = u.reshape(n, g, -1, u.shape[-1])
    bb = b.reshape(cols, n, g, b.shape[2] // g, -1)
    return u, bb


def _pad(m: nn.Module, a: Tensor) -> Tensor:
    """The conv input as the convolution sees it (all padding modes, asymmetric 'same')."""
    pad = m._reversed_padding_repeated_twice
    if not any(pad):
        return a
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(a, pad, mode=mode)


def _unfold(a: Tensor, kernel: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int]) -> Tensor:
    """im2col of an already padded input (N, I, *spatial) -> (N, I·prod(kernel), positions)."""
    if a.dim() == 4:
        return F.unfold(a, kernel, dilation=dilation, stride=stride)
    d = len(kernel)
    u = a
    for i in range(d):
        span = dilation[i] * (kernel[i] - 1) + 1
        u = u.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            u = u[..., :: dilation[i]]
    # (N, I, out_1..out_d, k_1..k_d) -> (N, I, k_1..k_d, out_1..out_d)
    perm = [0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)]
    u = u.permute(perm)
    n, i = a.shape[:2]
    return u.reshape(n, i * math.prod(kernel), -1)


# --------------------------------------------------------------------------------------------
# Engine 1: hand-written propagation through a chain of modules.
# --------------------------------------------------------------------------------------------
def _chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as a flat list of modules applied one after the other, or None if it is not."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> bool:
        if foreign_forward_hooks(m):
            return False  # hooks may change what flows (a mask's do not); leave them to autograd
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            return all(visit(c) for c in m)
        if isinstance(m, G.PRUNABLE_TYPES):
            if isinstance(m, _CONV_TYPES) and m.padding_mode != "zeros":
                return False
            if type(m).forward not in (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward,
                                       nn.Conv3d.forward):
                return False
            out.append(m)
            return True
        if any(G.is_layer(s) for s in m.modules()):
            return False
        out.append(m)
        return True

    return out if visit(model) else None


@torch.no_grad()
def _chain_pass(chain: list[nn.Module], x: Tensor, y: Tensor, uniforms: Tensor | None,
                acc: _Accumulator) -> float:
    """Forward through the chain, then push the factor back module by module."""
    acts = [x]
    extras: list[Tensor | None] = [None] * len(chain)
    h = x
    for i, m in enumerate(chain):
        if type(m) in _MAXPOOL:
            h, extras[i] = _MAXPOOL[type(m)](h, m.kernel_size, m.stride, m.padding, m.dilation,
                                             ceil_mode=m.ceil_mode, return_indices=True)
        else:
            h = _call(m, h)
        acts.append(h)
    if h.dim() != 2 or h.shape[1] < 2:
        raise ValueError(f"the model must return logits of shape (N, C >= 2), got {tuple(h.shape)}")
    v, k, loss = output_factor(h, y, uniforms, acc.grad)
    first = next((i for i, m in enumerate(chain) if isinstance(m, G.PRUNABLE_TYPES)), None)
    if first is None:
        return float(loss)
    cols, n = v.shape[:2]
    widest = max((t[0].numel() for t in acts[first + 1:len(chain)]), default=0)
    bufs = _PingPong(cols * n * widest, v.dtype, v.device)
    # Diagonal Jacobians (activations, eval-mode BN) are multiplied into `scale` and applied to
    # the factor only when needed: at the first prunable layer Σ_j (s·b_j)² = s²·Σ_j b_j², which
    # saves a pass over the largest factor.
    scale: Tensor | None = None
    for i in range(len(chain) - 1, first - 1, -1):
        m, a, out = chain[i], acts[i], acts[i + 1]
        if isinstance(m, G.PRUNABLE_TYPES):
            if scale is not None and not (i == first and acc.fast(m, a)):
                v, scale = v.mul_(scale), None
            acc.add(m, a, v, k, scale=scale)
            if i > first:
                v = _back_prunable(m, a, v, bufs)
            continue
        d = _diagonal_jacobian(m, a, out)
        if d is not None:
            scale = d if scale is None else scale * d
        elif isinstance(m, _RESHAPES):
            if scale is not None:
                scale = scale.expand(n, *out.shape[1:]).reshape(n, *a.shape[1:])
            v = v.reshape(cols, n, *a.shape[1:])
        else:
            if scale is not None:
                v, scale = v.mul_(scale), None
            v = _back_other(m, a, out, v, extras[i], bufs)
    return float(loss)


def _call(m: nn.Module, t: Tensor) -> Tensor:
    """``m(t)``, on a copy when ``m`` works in place: the chain keeps every module's input."""
    return m(t.clone() if getattr(m, "inplace", False) else t)


class _PingPong:
    """Two reusable flat buffers: each propagation step writes into the one its input is not in.

    Fresh memory is several times slower to write than reused memory here (page faults), and the
    factor is the largest tensor of the pass, so it lives in these.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.bufs = [_workspace(slot, numel, dtype, device) for slot in (0, 1)]

    def next(self, v: Tensor, numel: int) -> Tensor:
        ptr = v.untyped_storage().data_ptr()
        buf = next(b for b in self.bufs if b.untyped_storage().data_ptr() != ptr)
        return buf[:numel]


_WORKSPACE = threading.local()
_WORKSPACE_KEEP_BYTES = 2**26  # keep buffers up to 64 MB between calls (staged pruning)


def _workspace(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat scratch tensor of at least ``numel`` elements, reused across calls when small."""
    cache = getattr(_WORKSPACE, "bufs", None)
    if cache is None:
        cache = _WORKSPACE.bufs = {}
    key = (slot, dtype, device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        if buf.numel() * buf.element_size() <= _WORKSPACE_KEEP_BYTES:
            cache[key] = buf
    return buf


def _back_prunable(m: nn.Module, a: Tensor, v: Tensor, bufs: _PingPong) -> Tensor:
    """Factor at the input of a Linear/Conv from the factor at its output."""
    cols, n = v.shape[:2]
    w = m.weight
    if isinstance(m, nn.Linear):
        flat = v.reshape(-1, v.shape[-1])
        out = bufs.next(v, flat.shape[0] * w.shape[1]).view(flat.shape[0], w.shape[1])
        return torch.mm(flat, w, out=out).view(cols, n, *a.shape[1:])
    pad = m._reversed_padding_repeated_twice
    d = len(m.kernel_size)
    sym = all(pad[2 * i] == pad[2 * i + 1] for i in range(d))
    # _reversed_padding_repeated_twice lists the last spatial axis first.
    padding = [pad[2 * (d - 1 - i)] for i in range(d)] if sym else [0] * d
    in_shape = list(a.shape[1:])
    if not sym:
        in_shape = [a.shape[1]] + [a.shape[2 + i] + pad[2 * (d - 1 - i)] + pad[2 * (d - 1 - i) + 1]
                                   for i in range(d)]
    flat = v.reshape(cols * n, *v.shape[2:])
    placeholder = flat.new_empty(1).expand(cols * n, *in_shape)
    gin = torch.ops.aten.convolution_backward(flat, placeholder, w, None, list(m.stride), padding,
                                              list(m.dilation), False, [0] * d, m.groups,
                                              (True, False, False))[0]
    if not sym:
        idx = [slice(None), slice(None)] + [
            slice(pad[2 * (d - 1 - i)], pad[2 * (d - 1 - i)] + a.shape[2 + i]) for i in range(d)]
        gin = gin[tuple(idx)]
    return gin.reshape(cols, n, *a.shape[1:])


def _diagonal_jacobian(m: nn.Module, a: Tensor, out: Tensor) -> Tensor | None:
    """d with ∂out/∂a = diag(d) (broadcastable to a): activations and eval-mode BN; else None."""
    if type(m) is nn.ReLU:
        return (out > 0).to(out.dtype)
    if type(m) is nn.Tanh:
        return 1 - out.square()
    if type(m) is nn.Sigmoid:
        return out * (1 - out)
    if isinstance(m, _ELEMENTWISE):
        with torch.enable_grad():
            a_ = a.detach().requires_grad_()
            deriv, = torch.autograd.grad(_call(m, a_), a_, torch.ones_like(out))
        return deriv
    if isinstance(m, _BN_TYPES) and m.running_var is not None and not m.training:
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach()
        return scale.reshape(-1, *[1] * (a.dim() - 2))
    return None


def _back_other(m: nn.Module, a: Tensor, out: Tensor, v: Tensor, indices: Tensor | None,
                bufs: _PingPong) -> Tensor:
    """Factor at the input of any other module without prunable weights (eval mode, per example)."""
    cols, n = v.shape[:2]
    if indices is not None:  # max pooling: route each output's factor to its argmax input
        numel = cols * n * a[0].numel()
        flat_in = bufs.next(v, numel).view(cols, n, a.shape[1], -1).zero_()
        idx = indices.reshape(1, n, a.shape[1], -1).expand(cols, -1, -1, -1)
        flat_in.scatter_add_(3, idx, v.reshape(cols, n, a.shape[1], -1))
        return flat_in.view(cols, n, *a.shape[1:])
    # Pooling, padding, custom blocks: differentiate on the examples repeated once per column.
    with torch.enable_grad():
        rep = a.detach().unsqueeze(0).expand(cols, *a.shape).reshape(cols * n, *a.shape[1:])
        rep.requires_grad_()
        o = _call(m, rep)
        gin, = torch.autograd.grad(o, rep, v.reshape(cols * n, *out.shape[1:]))
    return gin.reshape(cols, n, *a.shape[1:])


# --------------------------------------------------------------------------------------------
# Engine 2: autograd through any graph, one backward per factor column.
# --------------------------------------------------------------------------------------------
def _autograd_pass(model: nn.Module, modules: dict[str, nn.Module], x, y: Tensor,
                   uniforms: Tensor | None, acc: _Accumulator,
                   obj: B.Objective | None = None) -> float:
    """Forward with hooks on the prunable layers, then one ``autograd.grad`` per column."""
    obj = obj or B.Objective()
    unique = list(dict.fromkeys(modules.values()))
    z, calls, versions = _hooked_forward(model, unique, x, clone=False, obj=obj)
    if any(t._version != ver for t, ver in versions):
        # An in-place op changed a captured input or output; capture copies instead.
        z, calls, _ = _hooked_forward(model, unique, x, clone=True, obj=obj)
    obj.check(z, y)
    v, k, loss = output_factor(z, y, uniforms, acc.grad, obj)
    flat = [(m, i) for m in unique for i in range(len(calls[m]))]
    outs = [calls[m][i][1] for m, i in flat]
    if not outs:
        return float(loss)
    if not z.requires_grad:
        raise ValueError("the logits do not depend on any prunable layer")
    # Per column: fast-path layers (2-D Linear or Linear-like, one call) accumulate Σ_j b²;
    # nn.Linear layers on token sequences (one call) accumulate their contraction column by
    # column (no copy of the k columns); others keep b.
    fast = {m for m in unique if len(calls[m]) == 1 and _is_linear(m)
            and calls[m][0][0].dim() == 2}
    tokens = {m: _TokenLinear(calls[m][0][0], m.out_features, k, acc.grad) for m in unique
              if m not in fast and len(calls[m]) == 1 and isinstance(m, nn.Linear)}
    sq = {m: None for m in fast}
    kept: dict[nn.Module, list[list[Tensor]]] = {
        m: [[] for _ in calls[m]] for m in unique if m not in fast and m not in tokens}
    gcol: dict[nn.Module, Tensor] = {}
    cols = v.shape[0]
    for j in range(cols):
        grads = torch.autograd.grad(z, outs, v[j], retain_graph=j < cols - 1, allow_unused=True)
        for (m, i), o, b in zip(flat, outs, grads):
            b = torch.zeros_like(o) if b is None else b.detach()
            if m in fast:
                if j < k:
                    sq[m] = b.square() if sq[m] is None else sq[m].addcmul_(b, b)
                else:
                    gcol[m] = b
            elif m in tokens:
                tokens[m].add(j, b)
            else:
                kept[m][i].append(b)
    for m in fast:
        acc.add_linear(m, calls[m][0][0], sq[m], gcol.get(m))
    for m, tok in tokens.items():
        acc.add_done(m, *tok.result())
    for m, per_call in kept.items():
        if per_call:
            acc.add_calls(m, [(calls[m][i][0], torch.stack(bl)) for i, bl in enumerate(per_call)],
                          k)
    return float(loss)


def _pairs_cheaper(p: int, k: int, o: int, kin: int) -> bool:
    """Whether pairs of positions cost less than per-example gradients for a Linear (O, K) at P
    positions with k columns (see :class:`_TokenLinear`).

    Costs in matmul multiply-adds per example, an elementwise multiply-add counted as
    ``_ELEMENTWISE_COST`` of them (memory-bound ops run about that much slower here): pairs
    t·O·(e·k + K) + e·t·K with t = P(P+1)/2, per-example gradients k·O·K·(P + e).
    """
    t, e = p * (p + 1) // 2, _ELEMENTWISE_COST
    return t * o * (e * k + kin) + e * t * kin < k * o * kin * (p + e)


class _TokenLinear:
    """Σ_n Σ_j (Σ_p b_j[n,p] a[n,p]ᵀ)² of a Linear applied at P positions (tokens), one column
    b_j (N, ..., O) at a time, so the k columns are never stacked.

    The weight is shared across positions, so positions are summed before squaring. Two exact
    ways, the cheaper one chosen by P and k:

    * pairs (roughly P + 1 < 2k, by a cost model): Σ_n Σ_{p≤q} c_pq (Σ_j b_jp ∘ b_jq)(a_p ∘ a_q)
      with c = 1 on the diagonal and 2 off it. The Σ_j products accumulate per column into a
      (P(P+1)/2, N, O) buffer, then one matmul over (examples, pairs) contracts them with the
      input products: N·P(P+1)/2·O·K multiply-adds, against k·N·P·O·K for per-example gradients.
    * per-example gradients (otherwise, e.g. Monte-Carlo with one column or long sequences):
      one batched matmul per column, squared and summed in place.
    """

    def __init__(self, a: Tensor, out_features: int, k: int, grad: bool) -> None:
        n, kin = a.shape[0], a.shape[-1]
        self.a = a.reshape(n, -1, kin)  # (N, P, K)
        p = self.a.shape[1]
        self.k, self.grad = k, grad
        self.pairs = _pairs_cheaper(p, k, out_features, kin)
        self.bb: Tensor | None = None
        self.diag: Tensor | None = None
        self.gsum: Tensor | None = None
        if self.pairs:
            sizes = [p - i for i in range(p)]
            self.offsets = [sum(sizes[:i]) for i in range(p)]

    def add(self, j: int, b: Tensor) -> None:
        n, p = self.a.shape[:2]
        b = b.reshape(n, p, -1)  # (N, P, O)
        if j >= self.k:  # the gradient column: one matmul over examples and positions
            if self.grad:
                self.gsum = b.reshape(n * p, -1).T @ self.a.reshape(n * p, -1)
            return
        if not self.pairs:
            d = _square_sum_per_example(b.transpose(1, 2).unsqueeze(1).unsqueeze(0),
                                        self.a.transpose(1, 2).unsqueeze(1))[0]
            self.diag = d if self.diag is None else self.diag.add_(d)
            return
        # Pair-major layout (pairs, N, O): every update below is one contiguous block (measured
        # twice as fast as example-major slices, whose strided writes miss the cache).
        bt = b.transpose(0, 1)
        if self.bb is None:
            self.bb = b.new_empty(p * (p + 1) // 2, n, b.shape[-1])
        for i, off in enumerate(self.offsets):
            dst = self.bb[off:off + p - i]
            if j == 0:
                torch.mul(bt[i:i + 1], bt[i:], out=dst)
            else:
                dst.addcmul_(bt[i:i + 1], bt[i:])

    def result(self) -> tuple[Tensor, Tensor | None]:
        """(Σ of squared per-example gradients (O, K), Σ of gradients (O, K) or None)."""
        if self.pairs:
            n, p, kin = self.a.shape
            at = self.a.transpose(0, 1)
            uu = at.new_empty(p * (p + 1) // 2, n, kin)
            for i, off in enumerate(self.offsets):
                dst = uu[off:off + p - i]
                torch.mul(at[i:i + 1], at[i:], out=dst)
                dst[1:].mul_(2)  # off-diagonal pairs stand for (p, q) and (q, p)
            self.diag = self.bb.reshape(-1, self.bb.shape[-1]).T @ uu.reshape(-1, kin)
        return self.diag, self.gsum


def _hooked_forward(model: nn.Module, modules: list[nn.Module], x, *, clone: bool,
                    obj: B.Objective | None = None):
    """Run ``model(x)`` recording (input, output) of every call of ``modules``.

    Returns the logits, the calls per module and (tensor, version) pairs to detect in-place
    changes after the fact; with ``clone`` the inputs are copied and the outputs passed on as
    copies, so later in-place ops cannot reach what was recorded.
    """
    calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in modules}
    versions: list[tuple[Tensor, int]] = []

    def pre(m, args):
        if isinstance(args[0], Tensor) and not args[0].requires_grad:
            # Frozen weights and a plain input would leave the outputs outside the graph.
            return (args[0].detach().requires_grad_(), *args[1:])
        return None

    def post(m, args, out):
        a = args[0].detach()
        calls[m].append((a.clone() if clone else a, out))
        versions.extend([(args[0], args[0]._version), (out, out._version)])
        return out.clone() if clone else None

    handles = [m.register_forward_pre_hook(pre) for m in modules]
    handles += [m.register_forward_hook(post) for m in modules]
    try:
        with torch.enable_grad():
            z = (obj or B.Objective()).forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return z, calls, versions


def _auto_chunk(model: nn.Module, x, chain: list[nn.Module] | None, mc_samples: int,
                grad: bool, obj: B.Objective | None = None, columns: int | None = None) -> int:
    """Examples per pass so activations, propagated factors and im2col stay within a budget."""
    known = _dense_chain_sizes(chain, x)
    if known is not None:
        sizes, unfold, classes = known, 0, known[-1]
    else:
        sizes, unfold, classes = _probe_sizes(model, x, obj)
    cols = (columns if columns is not None else (mc_samples or max(1, classes - 1))) + int(grad)
    per_example = 2 * sum(sizes) + 3 * cols * max(sizes, default=1) + unfold
    if chain is None:  # autograd keeps every prunable output's factor for every column
        per_example += cols * sum(sizes)
    param = next(model.parameters(), None)
    itemsize = param.element_size() if param is not None else 4
    return max(1, min(B.length(x), _CHUNK_BUDGET_BYTES // (per_example * itemsize)))


def _dense_chain_sizes(chain: list[nn.Module] | None, x: Tensor) -> list[int] | None:
    """Per-example output sizes of a chain of Linear/elementwise/reshape modules (no probe)."""
    if chain is None or not isinstance(x, Tensor) or x.dim() < 2:
        return None
    f, sizes = x[0].numel(), []
    for m in chain:
        if isinstance(m, nn.Linear):
            if f % m.in_features:
                return None
            f = f // m.in_features * m.out_features
        elif not isinstance(m, (*_ELEMENTWISE, nn.BatchNorm1d, nn.Flatten, nn.Identity,
                                nn.Dropout)):
            return None
        sizes.append(f)
    return sizes or None


def _probe_sizes(model: nn.Module, x, obj: B.Objective | None = None
                 ) -> tuple[list[int], int, int]:
    """Per-example sizes of every leaf output, the largest im2col and the number of classes."""
    sizes: list[int] = []
    unfold = 0

    def post(m, args, out):
        nonlocal unfold
        if isinstance(out, Tensor):
            sizes.append(out[0].numel())
        if isinstance(m, _CONV_TYPES) and isinstance(args[0], Tensor):
            unfold = max(unfold, math.prod(m.kernel_size) * args[0].shape[1] * out[0, 0].numel())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(post) for m in leaves]
    try:
        with torch.no_grad():
            z = (obj or B.Objective()).forward(model, B.take(x, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return sizes, unfold, z.shape[-1]
