"""Optimal Brain Surgeon with block-diagonal curvature and the OBS weight update.

OBS (Hassibi & Stork 1993) models the loss change of a step δw as ½ δwᵀHδw, scores weight q by
L_q = w_q² / (2 [H⁻¹]_qq) (their Eq. 5) and, once a set P of weights is removed, moves the
others by the constrained minimiser δw = −H⁻¹_{:,P} ([H⁻¹]_{PP})⁻¹ w_P, whose cost is
½ w_Pᵀ ([H⁻¹]_{PP})⁻¹ w_P (their Eq. 5 generalised to a set of weights, the block form of
Kurtic et al. 2022). A full H over all weights does not fit (an FCN 784-500×4-10 has 1.9M
weights), so H is block diagonal:

- ``block="row"`` (default; ``"layer"`` is an alias): layer-wise OBS, L-OBS (Dong et al. 2017).
  Each layer is pruned to preserve its own output; for output unit (row) q of a Linear
  layer the error of a step δw_q is (1/2N) Σ_n (δw_qᵀ a_n)² = ½ δw_qᵀ H δw_q with
  H = (1/N) Σ_n a_n a_nᵀ the layer-input second moment, shared by all rows (d_in × d_in). Conv
  layers use their input patches (im2col): the error sums over output positions, so
  H = (1/N) Σ_n Σ_l p_nl p_nlᵀ per group of ``C_in/groups · Π kernel`` inputs. Biases are not
  touched. Rows wider than ``max_row`` fall back to the diagonal of H (no compensation).
- ``block="fisher"``: the empirical Fisher F = (1/N) Σ_n g_n g_nᵀ of a whole layer's weights from
  per-example gradients of the cross-entropy (``torch.func.vmap``), as an approximation of the
  loss Hessian; layers with more than ``max_block`` weights fall back to its diagonal
  (OBD-like ½ F_qq w_q², no compensation).

Damping: H + λI with λ = ``damp`` · mean(diag H) per layer (``damp`` absolute when that mean is
0), so a singular H (dead inputs, N < d) stays invertible; ``damp=0`` gives the exact OBS
quantities when H is non-singular.

Weights already pruned (zero, or masked out) are constraints, not free weights: scores use the
inverse of H restricted to each row's alive weights, and the update keeps them at exactly 0.
Scores of different layers measure different layers' output errors (row mode) — L-OBS prunes
layer by layer, so ``scope="layerwise"`` is its setting; global ranking is allowed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab.criteria.gradient import single_threaded

Scores = G.Scores
Masks = G.Masks

BLOCKS = ("row", "layer", "fisher")


# ----------------------------------------------------------------------------- statistics
def _conv_padding(module: nn.Module) -> list[int]:
    """``F.pad`` list (last dim first) equivalent to the module's padding, 'same' included."""
    nd = module.weight.dim() - 2
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pairs = [(0, 0)] * nd
        else:  # "same": as torch does, the odd extra goes to the right
            pairs = []
            for k, d in zip(module.kernel_size, module.dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in module.padding]
    return [v for pair in reversed(pairs) for v in pair]


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """Inputs of each output unit of ``module`` (im2col): ``(N, groups, d, L)``.

    ``d`` is the row width of ``weight.reshape(C_out, -1)`` within a group and ``L`` the number
    of output positions, so ``out[n, g·C_out/groups + c, l] = W_rows[c] · patches[n, g, :, l]``
    (plus bias). Linear layers give ``(N, 1, in_features, positions)``.
    """
    if isinstance(module, nn.Linear) or G.linear_like(module) is not None:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x.transpose(1, 2).unsqueeze(1)
    nd = module.weight.dim() - 2
    pad = _conv_padding(module)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        span = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        x = x.unfold(2 + i, span, module.stride[i])
    # (N, C, o_1..o_nd, span_1..span_nd): subsample the spans by the dilation.
    x = x[(Ellipsis, *[slice(None, None, d) for d in module.dilation])]
    n, c = x.shape[:2]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    x = x.permute(perm)
    g = module.groups
    return x.reshape(n, g, (c // g) * math.prod(module.kernel_size), -1)


def input_second_moments(model: nn.Module, x: Tensor, names: list[str] | None = None, *,
                         diagonal: tuple[str, ...] = (), chunk_size: int = 256
                         ) -> dict[str, Tensor]:
    """H = (1/N) Σ_n Σ_l p_nl p_nlᵀ of each layer's input patches (L-OBS, Dong et al. 2017).

    Args:
        model: the network (eval mode); not modified.
        x: inputs, N examples.
        names: prunable weights to collect (default all).
        diagonal: names for which only diag(H) is collected.
        chunk_size: examples per forward pass.

    Returns:
        ``{name: (groups, d, d) float64}`` (``(groups, d)`` for ``diagonal`` names), so that for
        a step δW of a row in group g the summed squared output change over the N examples is
        N · δWᵀ H[g] δW.
    """
    names = G.prunable_names(model) if names is None else names
    acc: dict[str, Tensor] = {}
    budget = 1 << 22  # patch entries per einsum, to bound memory on conv layers

    def hook_for(name: str):
        def hook(module, inputs):
            p = patches(module, inputs[0].detach())
            step = max(1, budget // max(1, p[0].numel()))
            for i in range(0, p.shape[0], step):
                q = p[i:i + step].to(torch.float64)
                if name in diagonal:
                    part = (q * q).sum(dim=(0, 3))
                else:
                    part = torch.einsum("ngdl,ngel->gde", q, q)
                acc[name] = acc[name] + part if name in acc else part
        return hook

    handles = [G.module_of(model, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for i in range(0, B.length(x), chunk_size):
                B.call(model, B.take(x, slice(i, i + chunk_size)))
    finally:
        for h in handles:
            h.remove()
    return {n: acc[n] / B.length(x) for n in names if n in acc}


def empirical_fisher(model: nn.Module, batch, names: list[str], *, diagonal: tuple[str, ...] = (),
                     chunk_size: int | None = None,
                     objective: B.Objective | None = None) -> dict[str, Tensor]:
    """F = (1/N) Σ_n g_n g_nᵀ per layer from per-example loss gradients (vmap; cross-entropy
    unless ``objective`` says otherwise).

    Returns ``{name: (numel, numel) float64}`` (``(numel,)`` for ``diagonal`` names).
    """
    from torch.func import functional_call, grad, vmap

    x, y = batch
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    weights = {n: params[n] for n in names}

    obj = objective or B.Objective()

    def loss_one(w: dict[str, Tensor], xi, yi: Tensor) -> Tensor:
        one = B.map_tensors(xi, lambda t: t.unsqueeze(0))
        args, kwargs = ((), one) if isinstance(one, dict) else (
            (tuple(one) if isinstance(one, (tuple, list)) else (one,)), {})
        out = functional_call(model, ({**params, **w}, buffers), args, kwargs)
        return obj.value(B.output_tensor(out, obj.output), yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = sum(w.numel() for w in weights.values())
    step = chunk_size or max(1, (1 << 23) // max(1, total))
    acc: dict[str, Tensor] = {}
    for i in range(0, len(y), step):
        gs = per_example(weights, B.take(x, slice(i, i + step)), y[i:i + step])
        for n in names:
            g = gs[n].reshape(gs[n].shape[0], -1).to(torch.float64)
            part = (g * g).sum(0) if n in diagonal else g.T @ g
            acc[n] = acc[n] + part if n in acc else part
    return {n: acc[n] / len(y) for n in names}


# ----------------------------------------------------------------------------- linear algebra
_BUDGET = 1 << 22  # float64 entries per batched block (32 MB): bounds memory, keeps batches big


def _singular(a: Tensor, chol: Tensor, info: Tensor) -> bool:
    """Cholesky failed, or a pivot is at round-off level (a rank-deficient PSD matrix often
    factors "successfully" with pivots ~ eps·‖A‖, depending on the BLAS and its threads)."""
    if bool((info != 0).any()):
        return True
    d = a.shape[-1]
    pivots = chol.diagonal(dim1=-2, dim2=-1) ** 2
    scale = a.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    return bool((pivots <= d * torch.finfo(a.dtype).eps * scale).any())


def _spd_inverse(a: Tensor, name: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if _singular(a, chol, info):
        raise ValueError(f"obs: the curvature of {name} is singular; increase damp (e.g. 1e-4)")
    return torch.cholesky_inverse(chol)


def _index_sets(sets: Tensor) -> tuple[Tensor, Tensor]:
    """Per row the indices of its True entries in order, padded: ``(m, s)`` indices and validity."""
    counts = sets.sum(1)
    s = int(counts.max())
    idx = torch.sort(sets.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :s]
    valid = torch.arange(s) < counts[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def _blocks(rows: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """``mat[S_r][:, S_r]`` per row r from ``rows = mat[idx]``, padded with the identity so every
    block stays SPD (a gather along the last dim: much faster than 2-D fancy indexing)."""
    s = idx.shape[1]
    a = rows.gather(2, idx[:, None, :].expand(-1, s, -1))
    pad = ~valid
    if bool(pad.any()):
        a.masked_fill_(pad[:, :, None] | pad[:, None, :], 0.0)
        a.diagonal(dim1=1, dim2=2).add_(pad.to(rows.dtype))
    return a


def _cholesky(a: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if _singular(a, chol, info):
        raise ValueError("obs: a curvature block is numerically singular; increase damp")
    return chol


def _chunks(rows: Tensor, sizes: Tensor, d: int):
    """Batches of ``rows`` with similar set sizes whose (s × max(s, d)) blocks fit the budget."""
    def fit(s: int) -> int:
        return max(1, _BUDGET // max(1, s * max(s, d)))

    rows = rows[torch.argsort(sizes[rows], stable=True)]
    i = 0
    while i < len(rows):
        step = fit(int(sizes[rows[i]]))
        largest = int(sizes[rows[min(len(rows), i + step) - 1]])  # sizes ascend along rows
        step = min(step, fit(largest))
        yield rows[i:i + step]
        i += step


def _routes(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Rows solved through H⁻¹_PP (few pruned) and through H_KK (few kept); others are trivial."""
    n_p, n_k = (~keep).sum(1), keep.sum(1)
    busy = (n_p > 0) & (n_k > 0)
    return (busy & (n_p <= n_k)).nonzero().flatten(), (busy & (n_p > n_k)).nonzero().flatten()


def _restricted_inverse_diag(h: Tensor, hinv: Tensor, keep: Tensor) -> Tensor:
    """Per row r, diag((H_{K_r K_r})⁻¹) on K_r = ``keep[r]`` (1 elsewhere).

    This is OBS's [H⁻¹]_qq when the row's other pruned weights are held at 0. Few fixed weights:
    the Schur complement of H⁻¹, diag(H⁻¹) − diag(H⁻¹_{:,P} (H⁻¹_PP)⁻¹ H⁻¹_{P,:}); many: invert
    H_KK directly. Rows are batched with identity padding.
    """
    m, d = keep.shape
    out = hinv.diagonal().expand(m, d).clone()
    via_p, via_k = _routes(keep)
    for rows in _chunks(via_p, (~keep).sum(1), d):
        idx, valid = _index_sets(~keep[rows])
        b = hinv[idx] * valid[..., None]                      # (c, s, d) = H⁻¹_{P,:}
        z = torch.cholesky_solve(b, _cholesky(_blocks(b, idx, valid)))
        out[rows] = hinv.diagonal() - (b * z).sum(1)
    for rows in _chunks(via_k, keep.sum(1), d):
        idx, valid = _index_sets(keep[rows])
        inv = torch.cholesky_inverse(_cholesky(_blocks(h[idx], idx, valid)))
        block = torch.ones(len(rows), d, dtype=h.dtype)
        r = torch.arange(len(rows))[:, None].expand_as(idx)
        block[r[valid], idx[valid]] = inv.diagonal(dim1=-2, dim2=-1)[valid]
        out[rows] = block
    return out.masked_fill_(~keep, 1.0)  # fixed entries: the Schur complement there is 0


def _surgeon(h: Tensor, hinv: Tensor, w: Tensor, keep: Tensor) -> Tensor:
    """OBS update of rows ``w`` (m, d) for kept sets ``keep`` (m, d): pruned entries exactly 0.

    Per row, minimises ½ δwᵀHδw subject to (w + δw)_P = 0: δw = −H⁻¹_{:,P}(H⁻¹_PP)⁻¹ w_P, or
    equivalently w_K ← w_K + H_KK⁻¹ H_KP w_P; the smaller of the two systems is solved.
    """
    d = w.shape[1]
    out = w * keep
    via_p, via_k = _routes(keep)
    for rows in _chunks(via_p, (~keep).sum(1), d):
        idx, valid = _index_sets(~keep[rows])
        rows_p = hinv[idx]                                      # (c, s, d) = H⁻¹_{P,:}
        rhs = (w[rows].gather(1, idx) * valid)[..., None]      # w_P
        z = torch.cholesky_solve(rhs, _cholesky(_blocks(rows_p, idx, valid))).squeeze(-1) * valid
        step = torch.einsum("csd,cs->cd", rows_p, z)            # H⁻¹_{:,P} z
        out[rows] = (w[rows] - step) * keep[rows]
    for rows in _chunks(via_k, keep.sum(1), d):
        idx, valid = _index_sets(keep[rows])
        rhs = ((w[rows] * ~keep[rows]) @ h).gather(1, idx) * valid   # H_KP w_P
        z = torch.cholesky_solve(rhs[..., None], _cholesky(_blocks(h[idx], idx, valid)))
        z = z.squeeze(-1)
        block = torch.zeros(len(rows), d, dtype=w.dtype)
        r = torch.arange(len(rows))[:, None].expand_as(idx)
        block[r[valid], idx[valid]] = (w[rows].gather(1, idx) + z)[valid]
        out[rows] = block
    return out


# ----------------------------------------------------------------------------- per layer
@dataclass
class _Layer:
    """One layer as rows (m, d) with a curvature per row group: full ``h`` or diagonal ``diag``."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    w: Tensor           # (m, d) float64
    alive: Tensor       # (m, d) bool
    groups: int         # row groups sharing one curvature (conv groups; 1 otherwise)
    h: Tensor | None = None      # (groups, d, d), damped
    hinv: Tensor | None = None   # (groups, d, d)
    diag: Tensor | None = None   # (groups, d), damped
    damping: float = 0.0

    def group_rows(self):
        per = self.w.shape[0] // self.groups
        for g in range(self.groups):
            yield g, slice(g * per, (g + 1) * per)

    def scores(self) -> Tensor:
        out = torch.zeros_like(self.w)
        for g, rows in self.group_rows():
            w = self.w[rows]
            if self.diag is None:
                out[rows] = w * w / (2 * _restricted_inverse_diag(self.h[g], self.hinv[g],
                                                                  self.alive[rows]))
            else:
                out[rows] = 0.5 * w * w * self.diag[g]  # [H⁻¹]_qq = 1/H_qq for diagonal H
        return (out * self.alive).view(self.shape)

    def update(self, mask: Tensor) -> Tensor:
        keep = mask.reshape(self.w.shape).to(torch.bool) & self.alive
        if self.diag is not None:
            return (self.w * keep).view(self.shape).to(self.dtype)
        out = torch.empty_like(self.w)
        for g, rows in self.group_rows():
            out[rows] = _surgeon(self.h[g], self.hinv[g], self.w[rows], keep[rows])
        return out.view(self.shape).to(self.dtype)


def _damped(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """H + λI (or diag + λ) with λ = damp · mean(diag H), absolute ``damp`` when that is 0."""
    d = h.diagonal(dim1=-2, dim2=-1) if h.dim() == 3 else h
    mean = float(d.mean()) if d.numel() else 0.0
    lam = damp * mean if mean > 0 else damp
    if h.dim() == 3:
        return h + lam * torch.eye(h.shape[-1], dtype=h.dtype), lam
    return h + lam, lam


# ----------------------------------------------------------------------------- criterion
def obs(model: nn.Module, *, batch=None, masks: Masks | None = None, seed: int = 0,
        sparsity=None, scope: str = "global", block: str = "row", damp: float = 1e-4,
        max_row: int = 2048, max_block: int = 4096, chunk_size: int = 256, objective=None,
        **_):
    """Optimal Brain Surgeon saliency w_q² / (2 [H⁻¹]_qq) with the OBS update of the kept weights.

    Hassibi & Stork (1993), Eq. 5, with block-diagonal H: layer-input second moments per output
    row (``block="row"``, L-OBS of Dong et al. 2017) or the layer's empirical Fisher
    (``block="fisher"``). See the module docstring for the blocks, damping and fallbacks.

    Args:
        model: plain network in eval mode; not modified.
        batch: (x, y); row mode uses x only, fisher mode the cross-entropy on (x, y).
        masks: extra masks (True = kept); zero weights count as pruned too.
        block: ``"row"`` (alias ``"layer"``) or ``"fisher"``.
        damp: damping relative to the mean curvature diagonal of each layer (>= 0).
        max_row: widest row (inputs per output unit) with a full H in row mode; wider rows use
            diag(H) with a warning.
        max_block: largest layer (weights) with a full Fisher in fisher mode; larger layers use
            the Fisher diagonal with a warning.
        chunk_size: examples per forward pass when collecting statistics.

    Returns:
        :class:`~prunelab.criteria.ScoreResult` with ``update(masks) -> {name: weight}``, the
        OBS-compensated weights for the chosen masks (pruned entries exactly 0), ``examples`` =
        N and ``info`` = {"block", "damping": {name: λ}, "diagonal": [names]}.
    """
    from prunelab.criteria import ScoreResult

    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0 \
            or not math.isfinite(damp):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if batch is None:
        raise ValueError("criterion 'obs' is data-dependent: pass batch=(x, y)")
    if G.is_parametrized(model):
        model = G.plain_copy(model)
    block = "row" if block == "layer" else block
    x, y = batch
    names = G.prunable_names(model)
    weights = {n: G.weight(model, n).detach() for n in names}
    alive = {n: w != 0 for n, w in weights.items()}
    for n, m in (masks or {}).items():
        alive[n] &= m.to(torch.bool)

    tr: frozenset[str] = frozenset()
    if block == "row":
        modules = {n: G.module_of(model, n) for n in names}
        odd = [n for n in names if G.split_name(n)[1] != "weight" or not G.is_layer(modules[n])]
        if odd:
            raise ValueError(f"obs (row mode) reads each layer's inputs from its module calls, "
                             f"and {odd} are not the weight of a Linear/Conv/Linear-like module "
                             f"(nn.MultiheadAttention's fused projections, embeddings, norms), "
                             f"so they are never called as modules; use block='fisher', "
                             f"prunable= without them, or another criterion")
        # rows are output units: a transposed (in, out) Conv1D weight is read as (out, in)
        tr = G.transposed_names(model) & set(names)
        for n in tr:
            weights[n], alive[n] = weights[n].T, alive[n].T
        groups = {n: getattr(m, "groups", 1) for n, m in modules.items()}
        width = {n: weights[n][0].numel() for n in names}
        diagonal = tuple(n for n in names if width[n] > max_row)
        stats = input_second_moments(model, x, names, diagonal=diagonal, chunk_size=chunk_size)
        unseen = [n for n in names if n not in stats]
        if unseen:
            raise ValueError(f"obs (row mode) reads each layer's inputs from its module calls, and "
                             f"{unseen} were never called as modules (e.g. nn.MultiheadAttention's "
                             f"out_proj inside F.multi_head_attention_forward); use block='fisher' "
                             f"or another criterion for this model")
    else:
        groups = {n: 1 for n in names}
        diagonal = tuple(n for n in names if weights[n].numel() > max_block)
        stats = empirical_fisher(model, (x, y), names, diagonal=diagonal, objective=objective)
        stats = {n: s.unsqueeze(0) for n, s in stats.items()}
    if diagonal:
        limit = f"max_row={max_row} inputs per row" if block == "row" else \
            f"max_block={max_block} weights"
        warnings.warn(f"obs: {list(diagonal)} exceed {limit}; using the diagonal curvature "
                      f"there (OBD-like scores, no weight compensation)", stacklevel=2)

    # Many small factorisations: one thread (see single_threaded) for the whole linear algebra.
    with single_threaded():
        layers = _layers(names, weights, alive, stats, groups, diagonal, block, float(damp))
        scores = {layer.name: G.canonical(layer.scores().float(), layer.name in tr)
                  for layer in layers}

    def update(new_masks: Masks) -> dict[str, Tensor]:
        """OBS-compensated weights for ``new_masks`` (True = kept); earlier pruning stays 0."""
        with single_threaded():
            return {layer.name: G.canonical(layer.update(G.canonical(new_masks[layer.name],
                                                                     layer.name in tr)),
                                            layer.name in tr)
                    for layer in layers if layer.name in new_masks}

    info = {"block": block, "damping": {layer.name: layer.damping for layer in layers},
            "diagonal": list(diagonal)}
    return ScoreResult(scores, update=update, examples=len(x), info=info)


def _layers(names: list[str], weights: dict[str, Tensor], alive: dict[str, Tensor],
            stats: dict[str, Tensor], groups: dict[str, int], diagonal: tuple[str, ...],
            block: str, damp: float) -> list[_Layer]:
    """Rows, damped curvature and its inverse (full blocks) per layer."""
    layers = []
    for n in names:
        w = weights[n]
        rows = w.reshape(w.shape[0], -1) if block == "row" else w.reshape(1, -1)
        h, lam = _damped(stats[n], damp)
        layer = _Layer(n, w.shape, w.dtype, rows.to(torch.float64),
                       alive[n].reshape(rows.shape), groups[n], damping=lam)
        if n in diagonal:
            layer.diag = h
        else:
            layer.h = h
            layer.hinv = torch.stack([_spd_inverse(hg, n) for hg in h])
        layers.append(layer)
    return layers
