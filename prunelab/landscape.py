"""Loss landscapes along random, filter-normalised directions (Li et al. 2018).

*Visualizing the Loss Landscape of Neural Nets* (Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018),
Sec. 4: plot f(α) = L(θ + α·δ) (1-D) or f(α, β) = L(θ + α·δ + β·η) (2-D) around the trained
θ, with δ, η Gaussian directions *filter-normalised* so that the landscapes of networks with
different weight scales compare: every filter (a row of a Linear weight, an output channel of a
Conv weight) d_i of the direction is rescaled to

    d_i ← d_i / ‖d_i‖ · ‖θ_i‖                                        (Li et al., Sec. 4)

Biases and BatchNorm parameters (every parameter with at most one dimension) get direction 0,
Li et al.'s "ignore biasbn" setting, so they stay at their trained values.

For a pruned model (masks attached, :mod:`prunelab.masks`) the direction
is masked before it is normalised: a pruned weight gets direction 0, so every point of the
landscape stays in the sparse subspace and ‖d_i‖ still equals the (sparse) filter norm ‖θ_i‖.

The caller's model is never touched: the landscape is evaluated on a plain copy with the
effective (masked) weights; BatchNorm runs with its stored statistics (eval mode).
"""
from __future__ import annotations

import math
import numbers

import pandas as pd
import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab import masks as M

__all__ = ["directions", "direction", "line", "surface", "compare", "COLUMNS"]

#: Measured columns of every landscape frame (after ``alpha``[, ``beta``]).
COLUMNS = ["loss", "accuracy"]


def __dir__():
    return sorted(__all__)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_span(span) -> float:
    if isinstance(span, bool) or not isinstance(span, numbers.Real) or not math.isfinite(span) \
            or span <= 0:
        raise ValueError(f"span must be a finite number > 0 (the grid covers [-span, span]), "
                         f"got {span!r}")
    return float(span)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@torch.no_grad()
def directions(model: nn.Module, k: int = 1, *, seed: int = 0) -> list[dict[str, Tensor]]:
    """``k`` random filter-normalised directions around ``model`` (Li et al. 2018, Sec. 4).

    Each is a dict keyed like ``model.named_parameters()`` of a plain model (masks stripped,
    names as in masks: ``"0.weight"``), values shaped, typed and placed like the parameters.
    Entries are drawn from N(0, 1) with a CPU generator seeded with ``seed`` (the same seed
    gives the same directions on every device), direction after direction and parameter by
    parameter (so the first direction is the same for every ``k``); then pruned entries are
    zeroed, each filter ``i`` rescaled to ‖θ_i‖ (a filter whose direction is all zero, e.g.
    fully pruned, stays zero), and parameters with at most one dimension (biases, BatchNorm)
    set to zero ("ignore biasbn").
    """
    _check_model(model)
    k = _check_int(k, "k", 1)
    _check_int(seed, "seed", 0)
    plain = G.plain_copy(model)
    masks = M.current(model)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[dict[str, Tensor]] = [{} for _ in range(k)]
    for d in out:  # direction after direction: the first does not depend on k
        for name, p in plain.named_parameters():
            if p.dim() <= 1:
                d[name] = torch.zeros_like(p)
                continue
            raw = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            if name in masks:
                raw = raw * masks[name].to(device=p.device, dtype=p.dtype)
            rows, theta = raw.reshape(len(raw), -1), p.detach().reshape(len(p), -1)
            norm = rows.norm(dim=1, keepdim=True)
            scale = torch.where(norm > 0, theta.norm(dim=1, keepdim=True) / norm.clamp_min(
                torch.finfo(p.dtype).tiny), torch.zeros_like(norm))
            d[name] = (rows * scale).reshape(p.shape)
    return out


def direction(model: nn.Module, *, seed: int = 0) -> dict[str, Tensor]:
    """One filter-normalised direction: the first of :func:`directions` (what :func:`line`
    walks along, and the α axis of :func:`surface`)."""
    return directions(model, 1, seed=seed)[0]


class _Evaluator:
    """Loss and accuracy of ``θ + Σ c_j d_j`` on fixed data, on a private plain copy."""

    def __init__(self, model: nn.Module, data, dirs: list[dict[str, Tensor]], loss, output,
                 batch_size: int):
        self.obj = B.objective(loss, output)
        self.work = G.plain_copy(model)
        self.params = dict(self.work.named_parameters())
        self.theta = {n: p.detach().clone() for n, p in self.params.items()}
        self.dirs = dirs
        x, y = B.as_batch(data, what="data")
        self.x, self.y = B.to_model(x, self.work), B.to_model(y, self.work)
        self.batch_size = batch_size
        with B.evaluating(self.work), torch.no_grad():
            self.obj.check(self.obj.forward(self.work, B.take(self.x, slice(0, 2))),
                           self.y[:2])

    @torch.no_grad()
    def __call__(self, *coefs: float) -> dict[str, float]:
        for n, p in self.params.items():
            p.copy_(self.theta[n])
            for c, d in zip(coefs, self.dirs):
                p.add_(d[n], alpha=c)
        total, units, hit, counted = 0.0, 0, 0, 0
        with B.evaluating(self.work):
            for xb, yb in B.chunks(self.x, self.y, self.batch_size):
                z = self.obj.forward(self.work, xb)
                total += float(self.obj.value(z, yb, reduction="sum"))
                units += self.obj.units(z, yb)
                if self.obj.classifies:
                    h, c = self.obj.correct(z, yb)
                    hit, counted = hit + h, counted + c
        return {"loss": total / max(units, 1),
                "accuracy": hit / counted if counted else math.nan}


def _grid(steps: int, span: float) -> list[float]:
    return torch.linspace(-span, span, steps, dtype=torch.float64).tolist()


def line(model: nn.Module, data, *, steps: int = 21, span: float = 1.0, seed: int = 0,
         loss="cross_entropy", output=None, batch_size: int = 1000) -> pd.DataFrame:
    """The 1-D landscape f(α) = L(θ + α·δ), α on ``steps`` points of [-span, span], δ the
    filter-normalised direction of ``seed`` (Li et al. 2018, Sec. 4, Fig. 1 style).

    Args:
        model: the network (pruned ones stay in their sparse subspace); never modified.
        data: (x, y) tensors, a Dataset or a DataLoader (:func:`prunelab.batches.as_batch`).
        steps: grid points (>= 2); span: the grid's half-width in units of ‖θ_i‖ per filter.
        seed: seed of the direction; loss, output: the loss and output rule
            (:mod:`prunelab.batches`); batch_size: examples per forward pass.

    Returns:
        A tidy frame with columns alpha, loss, accuracy (NaN unless cross-entropy);
        ``attrs``: seed, span, normalization ("filter"), ignore ("biasbn").
    """
    _check_model(model)
    steps = _check_int(steps, "steps", 2)
    span = _check_span(span)
    batch_size = _check_int(batch_size, "batch_size", 1)
    ev = _Evaluator(model, data, directions(model, 1, seed=seed), loss, output, batch_size)
    frame = pd.DataFrame([{"alpha": a, **ev(a)} for a in _grid(steps, span)],
                         columns=["alpha", *COLUMNS])
    frame.attrs.update(seed=seed, span=span, normalization="filter", ignore="biasbn")
    return frame


def surface(model: nn.Module, data, *, n: int = 21, span: float = 1.0, seed: int = 0,
            loss="cross_entropy", output=None, batch_size: int = 1000) -> pd.DataFrame:
    """The 2-D landscape f(α, β) = L(θ + α·δ + β·η) on an ``n`` × ``n`` grid of
    [-span, span]², δ and η the first two filter-normalised directions of ``seed``
    (Li et al. 2018, Sec. 4; δ is :func:`line`'s direction). Arguments as :func:`line`.

    Returns:
        A tidy frame with columns alpha, beta, loss, accuracy (β outer, α inner).
    """
    _check_model(model)
    n = _check_int(n, "n", 2)
    span = _check_span(span)
    batch_size = _check_int(batch_size, "batch_size", 1)
    ev = _Evaluator(model, data, directions(model, 2, seed=seed), loss, output, batch_size)
    grid = _grid(n, span)
    frame = pd.DataFrame([{"alpha": a, "beta": b, **ev(a, b)} for b in grid for a in grid],
                         columns=["alpha", "beta", *COLUMNS])
    frame.attrs.update(seed=seed, span=span, normalization="filter", ignore="biasbn")
    return frame


def compare(dense: nn.Module, pruned: nn.Module, data, *, dims: int = 1,
            names: tuple[str, str] = ("dense", "pruned"), **kwargs) -> pd.DataFrame:
    """Landscapes of ``dense`` and ``pruned`` side by side: one frame, a ``network`` column
    first. ``dims`` 1 (:func:`line`) or 2 (:func:`surface`); ``kwargs`` go to it. Both use the
    same seed; the pruned network's direction respects its mask, so its landscape is the one
    of its sparse subspace."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (line) or 2 (surface), got {dims!r}")
    if len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"names must be two different labels, got {names!r}")
    fn = line if dims == 1 else surface
    frames = [fn(m, data, **kwargs).assign(network=name)
              for m, name in zip((dense, pruned), names)]
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[["network", *[c for c in frame.columns if c != "network"]]]
    frame.attrs.update(frames[0].attrs)
    return frame
