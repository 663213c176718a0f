"""Output-side factors of the GGN: columns V with Σ_j V_j V_jᵀ = ∇²_z ℓ per unit of the loss.

The Generalised Gauss-Newton matrix (LM paper App. A, Eq. 8) is G = 1/U Σ_n J_nᵀ H_n J_n with H_n
the Hessian of the loss w.r.t. the model output of example n. :mod:`prunelab.criteria.ggn`
propagates the columns of a factor of H_n backward (BackPACK's square-root-factor propagation,
Dangel et al. 2020); this module builds that factor for each loss of the Round-2 contract
(:mod:`prunelab.batches`): softmax cross-entropy over classes or per token, mean squared error,
or a user's callable (Hessian by autograd), exactly or as an unbiased Monte-Carlo estimate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prunelab import batches as B

__all__ = ["MAX_EXACT_COLUMNS", "output_factor", "columns", "draws", "units_of"]

# Backward columns per example above which the exact diagonal is refused (use mc_samples=).
MAX_EXACT_COLUMNS = 4096


# --------------------------------------------------------------------------------------------
# Output-side factors: columns V[j, n, :] with Σ_j V[j,n] V[j,n]ᵀ = ∇²_z ℓ_n (or its MC estimate).
# --------------------------------------------------------------------------------------------
def output_factor(z: Tensor, y: Tensor, uniforms: Tensor | None, grad: bool,
                  objective: B.Objective | None = None) -> tuple[Tensor, int, Tensor]:
    """Columns V (cols, *z.shape) with Σ_j V_j V_jᵀ = ∇²_z ℓ per unit, the gradient of the summed
    loss as the last column when ``grad``, and the summed loss, for the objective's loss:

    * cross-entropy over classes (N, C): :func:`_softmax_factor`;
    * per-token cross-entropy (N, T, C): one block of C − 1 columns per position (exact) or one
      sampled label per token and column (Monte-Carlo: tokens are independent, so summing their
      zero-mean columns keeps the estimate unbiased); ignored tokens get zero columns;
    * ``"mse"`` (mean over the D output elements): H = (2/D)·I, so R = √(2/D)·I (D columns), or
      √(2/D)·ε/√k with ε ~ N(0, I) for Monte-Carlo;
    * a callable: the per-example Hessian by autograd, factored as Q·√max(Λ, 0) (Monte-Carlo:
      R·ε/√k).
    """
    obj = objective or B.Objective()
    if obj.loss == "cross_entropy" and z.dim() == 2:
        return _softmax_factor(z, y, uniforms, grad)
    if obj.loss == "cross_entropy":
        return _token_factor(z, y, uniforms, grad, obj.ignore_index)
    if obj.loss == "mse":
        return _mse_factor(z, y, uniforms, grad)
    return _callable_factor(z, y, uniforms, grad, obj)


def _softmax_factor(z: Tensor, y: Tensor, uniforms: Tensor | None,
                    grad: bool) -> tuple[Tensor, int, Tensor]:
    """Columns to propagate: the Hessian factor (and the loss gradient as the last column).

    Exact: C − 1 columns R = S Q with S = diag(√p) − p √pᵀ (S Sᵀ = diag(p) − p pᵀ) and Q the
    Householder reflection sending √p to −e_C, which zeroes S's last column (S √p = 0), so one
    column fewer than S is propagated. Monte-Carlo: (p − e_ŷ_s)/√k for k labels ŷ_s ~ p drawn
    from ``uniforms`` (N, k) by inverse CDF.

    Returns:
        (V of shape (columns, N, C), number of factor columns, summed loss of the batch).
    """
    z = z.detach()
    n, c = z.shape
    logp = z.log_softmax(1)
    p = logp.exp()
    if y.is_floating_point():  # class probabilities
        if y.shape != z.shape:
            raise ValueError(f"float targets must be class probabilities shaped like the logits "
                             f"{tuple(z.shape)}, got {tuple(y.shape)}")
        mass = y.sum(1)
        loss = -(y * logp).sum()
        gcol = p * mass.unsqueeze(1) - y
    else:
        mass = None
        loss = F.nll_loss(logp, y, reduction="sum")
        gcol = p.clone()
        gcol[torch.arange(n), y] -= 1
    k = c - 1 if uniforms is None else uniforms.shape[1]
    v = z.new_empty(k + int(grad), n, c)
    f = v[:k]
    if uniforms is None:
        sp = p.sqrt()
        spc = sp[:, -1]
        f.copy_((-p / (1 + spc).unsqueeze(1)).unsqueeze(0).expand(k, n, c))
        idx = torch.arange(k)
        f[idx, :, idx] += 1
        f[:, :, -1] -= (spc / (1 + spc)).unsqueeze(0)
        f.mul_(sp[:, :k].T.unsqueeze(2))
    else:
        cdf = p.to(torch.float64).cumsum(1)
        # the draws come from a CPU generator (same labels on every device): move them over
        labels = torch.searchsorted(cdf, uniforms.to(cdf.device), right=True).clamp_(
            max=c - 1)  # (N, k)
        f.copy_(p.unsqueeze(0).expand(k, n, c))
        f.scatter_add_(2, labels.T.unsqueeze(2), f.new_full((k, n, 1), -1.0))
        f.mul_(1 / math.sqrt(k))
    if mass is not None:  # H scales with the target mass Σ_c y_c
        f.mul_(mass.sqrt().unsqueeze(1))
    if grad:
        v[k].copy_(gcol)
    return v, k, loss


def _token_factor(z: Tensor, y: Tensor, uniforms: Tensor | None, grad: bool,
                  ignore: int) -> tuple[Tensor, int, Tensor]:
    """Per-token cross-entropy on (N, T, C) logits with (N, T) targets (see :func:`output_factor`)."""
    if y.is_floating_point():
        raise TypeError("per-token cross-entropy needs integer class indices (N, T), got float "
                        "targets")
    n, t, c = z.shape
    valid = y != ignore
    yv = y.masked_fill(~valid, 0)
    flat_v, kk, loss = _softmax_factor(z.reshape(n * t, c), yv.reshape(n * t),
                                       None if uniforms is None else uniforms.reshape(n * t, -1),
                                       grad)
    keep = valid.reshape(1, n * t, 1).to(flat_v.dtype)
    flat_v = flat_v * keep  # ignored tokens contribute nothing
    loss = F.cross_entropy(z.detach().reshape(-1, c), y.reshape(-1), ignore_index=ignore,
                           reduction="sum")
    per_tok = flat_v.reshape(-1, n, t, c)
    if uniforms is not None:  # one sampled label per token and column, tokens summed
        return per_tok, kk, loss
    # Exact: the Hessian is block-diagonal over tokens, so column (τ, j) is token τ's j-th
    # column placed at position τ and zero elsewhere.
    k = t * kk
    v = z.new_zeros(k + int(grad), n, t, c)
    for tau in range(t):
        v[tau * kk:(tau + 1) * kk, :, tau] = per_tok[:kk, :, tau]
    if grad:
        v[k] = per_tok[kk]
    return v, k, loss


def _mse_factor(z: Tensor, y: Tensor, uniforms: Tensor | None,
                grad: bool) -> tuple[Tensor, int, Tensor]:
    """Mean squared error, ℓ_n = 1/D Σ_d (z_nd − y_nd)² (see :func:`output_factor`)."""
    z = z.detach()
    n = len(z)
    d = z[0].numel()
    diff = (z - y).reshape(n, d)
    loss = diff.square().sum() / d
    s = math.sqrt(2.0 / d)
    if uniforms is None:
        k = d
        v = z.new_zeros(k + int(grad), n, d)
        idx = torch.arange(d, device=z.device)
        v[idx, :, idx] = s
    else:
        k = uniforms.shape[1]
        v = z.new_empty(k + int(grad), n, d)
        v[:k] = uniforms.to(z).permute(1, 0, 2) * (s / math.sqrt(k))
    if grad:
        v[k] = diff * (2.0 / d)
    return v.reshape(k + int(grad), *z.shape), k, loss


def _callable_factor(z: Tensor, y: Tensor, uniforms: Tensor | None, grad: bool,
                     obj: B.Objective) -> tuple[Tensor, int, Tensor]:
    """A user's loss: per-example output Hessians by autograd (see :func:`output_factor`)."""
    z = z.detach()
    n = len(z)
    d = z[0].numel()

    def one(zi: Tensor, yi: Tensor) -> Tensor:
        return obj.loss(zi.reshape(1, *z.shape[1:]), yi.unsqueeze(0))

    with torch.enable_grad():
        zz = z.clone().requires_grad_(True)
        per = torch.stack([one(zz[i], y[i]) for i in range(n)])
        whole = obj.loss(zz, y)
        if not isinstance(whole, Tensor) or whole.dim() != 0:
            raise ValueError("the loss callable must return a scalar tensor (the mean loss)")
        if not torch.allclose(per.mean(), whole, rtol=1e-4, atol=1e-6 * max(1.0, abs(float(whole)))):
            raise ValueError(f"the loss callable is not a mean over examples: the mean of its "
                             f"per-example values is {float(per.mean()):.6g}, on the whole batch it "
                             f"gives {float(whole):.6g}; the GGN needs L = 1/N Σ_n ℓ(z_n, y_n)")
        gz = torch.autograd.grad(per.sum(), zz)[0] if grad else None
    hess = torch.stack([
        torch.autograd.functional.hessian(lambda zi, i=i: one(zi, y[i]), z[i]).reshape(d, d)
        for i in range(n)])
    hess = 0.5 * (hess + hess.transpose(1, 2))
    lam, q = torch.linalg.eigh(hess)
    r = q * lam.clamp(min=0).sqrt().unsqueeze(1)  # (N, D, D): H ≈ R Rᵀ, negative part clipped
    if uniforms is None:
        k = d
        cols = r.permute(2, 0, 1)  # column j of every R_n
    else:
        k = uniforms.shape[1]
        cols = torch.einsum("nde,nke->knd", r, uniforms.to(r)) / math.sqrt(k)
    v = z.new_empty(k + int(grad), n, d)
    v[:k] = cols
    if grad:
        v[k] = gz.reshape(n, d)
    return v.reshape(k + int(grad), *z.shape), k, per.detach().sum()


def columns(obj: B.Objective, y: Tensor, shape: tuple[int, ...] | None, mc_samples: int) -> int:
    """Backward columns per example of the output factor."""
    if mc_samples:
        return mc_samples
    if shape is None:  # plain classes: C − 1, known only after the forward; not limited here
        return 0
    if obj.loss == "cross_entropy":
        return (math.prod(shape[:-1]) or 1) * (shape[-1] - 1)
    return math.prod(shape)


def draws(obj: B.Objective, y: Tensor, shape: tuple[int, ...] | None, mc_samples: int,
           seed: int) -> Tensor | None:
    """Monte-Carlo draws for every example, made up front (independent of the chunking)."""
    if not mc_samples:
        return None
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    if obj.loss == "cross_entropy":
        per = () if shape is None else tuple(shape[:-1])
        return torch.rand(n, *per, mc_samples, generator=gen, dtype=torch.float64)
    return torch.randn(n, mc_samples, math.prod(shape), generator=gen, dtype=torch.float64)


def units_of(obj: B.Objective, y: Tensor) -> int:
    """What the mean loss divides by: examples, or non-ignored tokens of per-token CE."""
    if obj.loss == "cross_entropy" and y.dim() >= 2 and not y.is_floating_point():
        return max(1, int(torch.count_nonzero(y != obj.ignore_index)))
    return len(y)
