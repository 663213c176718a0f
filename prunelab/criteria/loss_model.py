"""Loss-model criteria: OBD, the linear model (LM) and the diagonal quadratic model (QM).

LM paper (*Revisiting Loss Modelling for Unstructured Pruning*), Sec. 2-3: removing weight k is the
step Δθ_k = −θ_k, and a local model of the mean training loss predicts the change it causes,

* LM (Eq. 6):  ΔL_LM(k) = g_k·(−θ_k) = −g_k θ_k,
* QM (Eq. 5):  ΔL_QM(k) = −g_k θ_k + ½ G_kk θ_k²,
* OBD (Eq. 3): ΔL_OBD(k) = ½ G_kk θ_k² (QM at convergence, g = 0),

with g = ∂L/∂θ on the batch and G_kk the Generalised Gauss-Newton diagonal (App. A, computed by
:mod:`prunelab.criteria.ggn`).

**Sign convention.** Scores are "higher = more important = kept". A weight is important when
removing it would change the loss a lot, so the default score is |ΔL̂(k)|. With ``signed=True``
the score is the predicted change itself, ΔL̂(k): the weights whose removal is predicted to
*increase* the loss most are kept, and those whose removal is predicted to *decrease* it (negative
scores) are pruned first. OBD's saliency is ≥ 0, so ``signed`` does not apply to it. Weights that
are already zero get score 0 from every formula. The step-size penalty λ/2·θ² (Sec. 3.2) is added
by :func:`prunelab.criteria.compute`, not here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab.criteria import ScoreResult
from prunelab.criteria.ggn import loss_grad_ggn


def obd(model: nn.Module, *, batch: tuple[Tensor, Tensor], mc_samples: int = 0,
        chunk: int | None = None, seed: int = 0, objective=None, **_) -> ScoreResult:
    """OBD saliency ½·G_kk·θ_k² (LM paper Eq. 3; GGN diagonal, App. A).

    Args:
        model: plain module in eval mode, pruned weights already zero; not modified.
        batch: (x, y) the loss is averaged over.
        mc_samples: 0 = exact GGN diagonal; k > 0 = Monte-Carlo with k labels per example.
        chunk: examples per pass of the GGN computation (``None``: from a memory budget).
        seed: seed of the Monte-Carlo label sampling.

    Returns:
        :class:`ScoreResult` with the saliencies and the number of examples used.
    """
    res = loss_grad_ggn(model, batch, mc_samples=mc_samples, seed=seed, chunk=chunk, grad=False,
                        loss=objective or "cross_entropy")
    scores = {}
    for n, w in G.weights(model).items():
        w = w.detach()
        scores[n] = 0.5 * res.ggn[n] * w.square()
    return ScoreResult(scores, examples=res.examples,
                       info={"loss": res.loss, "mc_samples": mc_samples})


def lm(model: nn.Module, *, batch: tuple[Tensor, Tensor], signed: bool = False,
       objective=None, **_) -> ScoreResult:
    """Linear model: predicted loss change of removing θ_k, ΔL_LM = −g_k·θ_k (LM paper Eq. 6).

    Args:
        model: plain module in eval mode with ``requires_grad`` weights; not modified.
        batch: (x, y) the loss is averaged over.
        signed: score = ΔL_LM (keep weights whose removal would raise the loss most) instead of
            |ΔL_LM| = |g_k θ_k|.

    Returns:
        :class:`ScoreResult` with the scores and the number of examples used.
    """
    obj = objective or B.Objective()
    x, y = batch
    weights = G.weights(model)
    with torch.enable_grad():
        z = obj.forward(model, x)
        obj.check(z, y)
        loss = obj.value(z, y)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    scores = {}
    for (n, w), g in zip(weights.items(), grads):
        if g is None:
            scores[n] = torch.zeros_like(w)
            continue
        # one fresh tensor per layer: −g·θ (signed) or |g·θ|, the same values as −(g·θ)
        prod = torch.mul(g.detach(), w.detach())
        scores[n] = prod.neg_() if signed else prod.abs_()
    return ScoreResult(scores, examples=len(y), info={"loss": float(loss.detach())})


def qm(model: nn.Module, *, batch: tuple[Tensor, Tensor], signed: bool = False,
       mc_samples: int = 0, chunk: int | None = None, seed: int = 0, objective=None,
       **_) -> ScoreResult:
    """Quadratic model: ΔL_QM = −g_k θ_k + ½ G_kk θ_k² for removing θ_k (LM paper Eq. 5, App. A).

    Gradient and GGN diagonal come from one pass of :func:`~prunelab.criteria.ggn.loss_grad_ggn`.

    Args:
        model: plain module in eval mode, pruned weights already zero; not modified.
        batch: (x, y) the loss is averaged over.
        signed: score = ΔL_QM (keep weights whose removal would raise the loss most) instead of
            |ΔL_QM|.
        mc_samples: 0 = exact GGN diagonal; k > 0 = Monte-Carlo with k labels per example.
        chunk: examples per pass (``None``: from a memory budget).
        seed: seed of the Monte-Carlo label sampling.

    Returns:
        :class:`ScoreResult` with the scores and the number of examples used.
    """
    res = loss_grad_ggn(model, batch, mc_samples=mc_samples, seed=seed, chunk=chunk, grad=True,
                        loss=objective or "cross_entropy")
    scores = {}
    for n, w in G.weights(model).items():
        w = w.detach()
        change = (0.5 * res.ggn[n] * w - res.grad[n]) * w
        scores[n] = change if signed else change.abs()
    return ScoreResult(scores, examples=res.examples,
                       info={"loss": res.loss, "mc_samples": mc_samples})
