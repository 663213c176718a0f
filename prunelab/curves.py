"""Curves between two trained networks with one trainable bend (Garipov et al. 2018).

* :class:`Bezier` / :class:`PolyChain` (built by :func:`bezier` / :func:`polychain`): paths
  ``phi_theta(t)`` with a bend ``theta`` (Garipov et al., Sec. 3: the polygonal chain with one
  bend and the quadratic Bezier curve).
* :func:`fit_bend` trains only the bend on ``E_{t~U[0,1]} L(phi_theta(t))`` (Garipov et al.,
  Sec. 3); :func:`curve_frame` evaluates loss and error along the curve;
  :func:`ensemble_error` gives the two-network ensemble error.

Masks, exact endpoints and BatchNorm as in :mod:`prunelab.connectivity` (whose path toolkit this
module uses): a bend is multiplied by the union of the endpoints' masks, so entries pruned in
both endpoints stay zero along the curve.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from prunelab import batches as B
from prunelab import masks as M
from prunelab.connectivity import (check_data, check_same_architecture, has_batchnorm,
                                   path_frame, path_ts, plain_eval, recompute_bn,
                                   require_bn_data)
from prunelab.train import as_tensors

__all__ = ["Curve", "Bezier", "PolyChain", "bezier", "polychain", "fit_bend", "curve_frame",
           "ensemble_error"]



def __dir__():
    return sorted(__all__)


class Curve:
    """A path ``phi_theta(t)`` between two networks with one trainable bend ``theta``.

    Only parameters are curved; buffers (BatchNorm running statistics) come from ``model_a`` and
    are recomputed on ``bn_data`` when a point is evaluated. ``theta`` is a dict of tensors with
    ``requires_grad``; :meth:`weights` is differentiable in it.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, bend_init: str = "midpoint"):
        self.template = plain_eval(model_a)
        pb = plain_eval(model_b)
        self.a = {k: p.detach().clone() for k, p in self.template.named_parameters()}
        self.b = {k: p.detach().clone() for k, p in pb.named_parameters()}
        check_same_architecture(self.a, self.b)
        check_same_architecture(dict(self.template.named_buffers()), dict(pb.named_buffers()))
        self.buffers = {k: v.clone() for k, v in self.template.named_buffers()}
        # union of the endpoints' masks: entries pruned in both stay zero along the curve
        ma, mb = M.current(model_a), M.current(model_b)
        self.keep = {}
        for n in set(ma) | set(mb):
            ones = torch.ones_like(self.a[n], dtype=torch.bool)
            self.keep[n] = (ma.get(n, ones) | mb.get(n, ones)).to(self.a[n].dtype)
        if bend_init == "midpoint":
            theta = {k: 0.5 * (self.a[k] + self.b[k]) for k in self.a}
        elif bend_init == "a":
            theta = {k: self.a[k].clone() for k in self.a}
        else:
            raise ValueError(f"bend_init must be 'midpoint' or 'a', got {bend_init!r}")
        self.theta = {k: v.requires_grad_(True) for k, v in theta.items()}

    def bend(self) -> dict[str, Tensor]:
        """The bend with entries pruned in both endpoints zeroed."""
        return {k: v * self.keep[k] if k in self.keep else v for k, v in self.theta.items()}

    def _combine(self, t: float, a: Tensor, th: Tensor, b: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def weights(self, t: float) -> dict[str, Tensor]:
        """Parameters ``phi_theta(t)`` (differentiable in theta; exact endpoints at 0 and 1)."""
        t = float(t)
        if t == 0:
            return {k: v.clone() for k, v in self.a.items()}
        if t == 1:
            return {k: v.clone() for k, v in self.b.items()}
        th = self.bend()
        return {k: self._combine(t, self.a[k], th[k], self.b[k]) for k in self.a}

    def forward(self, t: float, x):
        """Output of the network ``phi_theta(t)`` on inputs ``x`` (via ``functional_call``): a
        tensor, a mapping (``model(**x)``) or a tuple (``model(*x)``), as
        :func:`prunelab.batches.call`."""
        state = {**self.weights(t), **self.buffers}
        if isinstance(x, Mapping):
            return functional_call(self.template, state, (), dict(x))
        return functional_call(self.template, state, tuple(x) if isinstance(x, (tuple, list))
                               else (x,))

    @torch.no_grad()
    def point(self, t: float) -> nn.Module:
        """A plain copy of the architecture with weights ``phi_theta(t)``, in eval mode."""
        m = copy.deepcopy(self.template)
        m.load_state_dict({**{k: v.detach() for k, v in self.weights(t).items()},
                           **self.buffers})
        return m.eval()


class Bezier(Curve):
    """Quadratic Bezier ``(1-t)^2 w1 + 2 t (1-t) theta + t^2 w2`` (Garipov et al.)."""

    def _combine(self, t, a, th, b):
        return (1 - t) ** 2 * a + 2 * t * (1 - t) * th + t ** 2 * b


class PolyChain(Curve):
    """Polygonal chain ``w1 -> theta -> w2`` with the bend at ``t = 1/2`` (Garipov et al.)."""

    def _combine(self, t, a, th, b):
        if t < 0.5:
            return a + 2 * t * (th - a)
        return th + (2 * t - 1) * (b - th)


def bezier(model_a: nn.Module, model_b: nn.Module, *, bend_init: str = "midpoint") -> Bezier:
    """Quadratic Bezier curve between two models (Garipov et al. 2018, Sec. 3.2);
    ``bend_init="midpoint"`` gives the segment."""
    return Bezier(model_a, model_b, bend_init=bend_init)


def polychain(model_a: nn.Module, model_b: nn.Module, *, bend_init: str = "midpoint") -> PolyChain:
    """One-bend polygonal chain between two models."""
    return PolyChain(model_a, model_b, bend_init=bend_init)


def fit_bend(curve: Curve, train_data, *, steps: int = 500, lr: float = 1e-2,
             batch_size: int = 128, seed: int = 0, optimizer: str = "adam",
             momentum: float = 0.9, weight_decay: float = 0.0, loss="cross_entropy",
             output=None) -> pd.DataFrame:
    """Train only the bend of ``curve`` on ``E_{t~U[0,1]} L(phi_theta(t))`` (Garipov et al.).

    One ``t ~ U[0, 1]`` is drawn per mini-batch; endpoints stay fixed. Deterministic for a given
    ``seed`` (its own generator for batches and ``t``). With BatchNorm the template runs in train
    mode (batch statistics), as in the paper; evaluate with ``bn_data`` afterwards.
    ``train_data``: (x, y) tensors, a Dataset or a DataLoader, moved to the curve's device and
    dtype; ``loss`` / ``output`` as in :mod:`prunelab.batches`.

    Returns:
        History DataFrame with columns step, t, loss.
    """
    obj = B.objective(loss, output)
    x, y = as_tensors(train_data, what="train_data")
    B.check_inputs(x, "train_data inputs")
    x, y = B.to_model(x, curve.template), B.to_model(y, curve.template)
    B.probe(curve.template, x, y, obj, what="fit_bend: train_data")
    params = list(curve.theta.values())
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    gen = torch.Generator().manual_seed(seed)
    curve.template.train(has_batchnorm(curve.template))
    order = torch.randperm(len(y), generator=gen).to(y.device)
    rows, pos = [], 0
    try:
        for step in range(1, steps + 1):
            if pos + batch_size > len(y):
                order, pos = torch.randperm(len(y), generator=gen).to(y.device), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            t = float(torch.rand((), generator=gen))
            opt.zero_grad(set_to_none=True)
            value = obj.value(B.output_tensor(curve.forward(t, B.take(x, idx)), obj.output),
                              y[idx])
            value.backward()
            opt.step()
            rows.append({"step": step, "t": t, "loss": value.item()})
    finally:
        curve.template.eval()
    return pd.DataFrame(rows)


def curve_frame(curve: Curve, data, *, steps: int | Iterable[float] = 21,
                splits: Iterable[str] | None = None, bn_data=None, loss="cross_entropy",
                output=None) -> pd.DataFrame:
    """Loss and error along ``curve`` (columns t, [split,] loss, error); see
    :func:`prunelab.connectivity.interpolate` (data, ``loss`` and ``output`` as there)."""
    require_bn_data(curve.template, bn_data)
    obj = B.objective(loss, output)
    ts = path_ts(steps)
    check_data(curve.template, data, splits, obj)
    return path_frame(curve.point, ts, data, splits, bn_data, loss=obj)


@torch.no_grad()
def ensemble_error(model_a: nn.Module, model_b: nn.Module, data, *, bn_data=None,
                   batch_size: int = 1000, output=None) -> float:
    """Error of the two-network ensemble (mean of the softmax outputs) on ``data``.

    ``model_b`` may be a point of a curve (``curve.point(t)``). Models are evaluated as given
    (eval mode); pass ``bn_data`` to recompute BatchNorm statistics of copies first. ``data``
    as in :func:`prunelab.connectivity.interpolate`; per-token outputs count tokens (targets
    -100 ignored); ``output`` reads logits from other model outputs.
    """
    models = []
    for m in (model_a, model_b):
        m = copy.deepcopy(m).eval()
        if bn_data is not None and has_batchnorm(m):
            recompute_bn(m, bn_data)
        models.append(m)
    obj = B.objective("cross_entropy", output)
    x, y = as_tensors(data)
    B.check_inputs(x, "data inputs")
    x, y = B.to_model(x, models[0]), B.to_model(y, models[0])
    B.probe(models[0], x, y, obj, what="ensemble_error: data")
    correct = counted = 0
    for xb, yb in B.chunks(x, y, batch_size):
        p = sum(F.softmax(obj.forward(m, xb), dim=-1) for m in models) / len(models)
        hit, cnt = obj.correct(p, yb)
        correct, counted = correct + hit, counted + cnt
    return 1.0 - correct / max(counted, 1)
