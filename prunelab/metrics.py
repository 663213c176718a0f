"""Measurements on models and tidy results: losses, ΔL, and (later) rank statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.train import evaluate

__all__ = ["loss", "delta_loss", "evaluate"]


@torch.no_grad()
def loss(model: nn.Module, batch) -> float:
    """Mean cross-entropy of ``model`` (eval mode, restored afterwards) on a (x, y) batch."""
    x, y = batch
    was = model.training
    model.eval()
    try:
        return float(F.cross_entropy(model(x), y))
    finally:
        model.train(was)


def delta_loss(model: nn.Module, pruned: nn.Module, batch) -> float:
    """ΔL(θ, Δθ) = |L(θ + Δθ) − L(θ)| on ``batch`` (LM paper Sec. 4, the quantity criteria
    try to minimise), with ``model`` at θ and ``pruned`` at θ + Δθ."""
    return abs(loss(pruned, batch) - loss(model, batch))
