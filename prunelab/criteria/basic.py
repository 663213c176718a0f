"""Data-free baselines: random scores and weight magnitude."""
from __future__ import annotations

import torch
from torch import nn

from prunelab import graph as G


def random(model: nn.Module, *, seed: int = 0, **_) -> G.Scores:
    """Uniform random scores in [0, 1), reproducible from ``seed`` (the baseline to include).

    Drawn from a CPU generator, so every device gets the same scores, then moved beside the
    weights (scores live on the parameters' device)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=gen).to(w.device)
            for n, w in G.weights(model).items()}


@torch.no_grad()
def magnitude(model: nn.Module, **_) -> G.Scores:
    """|θ| (Han et al. 2015; the LM paper's s_MP = θ², Eq. 4, gives the same order)."""
    return {n: w.detach().abs().clone() for n, w in G.weights(model).items()}
