"""Mode connectivity: loss and error along paths between trained networks.

* :func:`interpolate` -- the straight segment ``w(t) = a + t (b - a)`` (Frankle et al., linear
  mode connectivity); :func:`barrier` -- max along the path minus the mean of the endpoints.
* :func:`instability` -- train a network for ``k`` steps, finish two copies with different data
  orders, and measure the barrier between them (Frankle et al., Figs. 2-3);
  :func:`instability_curve` -- the barrier for every ``k`` (Fig. 3) and the paths behind it.
* :class:`Bezier` / :class:`PolyChain` curves with one trainable bend ``theta`` (Garipov et al.),
  :func:`fit_bend` trains only the bend on ``E_{t~U[0,1]} L(phi_theta(t))``, :func:`curve_frame`
  evaluates along the curve and :func:`ensemble_error` gives the two-network ensemble error.
* :func:`plane` -- loss/error on the 2-D plane through three networks (Garipov et al., Fig. 1).

Pruned models: every path is built from the *effective* weights (``w * mask``) of plain copies
(:func:`prunelab.graph.plain_copy`); the path models carry no masks. Where both endpoints share
a mask the pruned entries are zero at both ends and so stay exactly zero along the segment; a
curve bend is multiplied by the union of the endpoints' masks, so entries pruned in both
endpoints stay zero along curves too. Entries pruned in only one endpoint are interpolated.

Endpoints are exact: ``t == 0`` and ``t == 1`` use the endpoint tensors themselves, so the frame
reproduces the endpoints' loss bit for bit (no ``(1 - t) a + t b`` round-off).

BatchNorm: running statistics of a blended network are meaningless, so for models with BatchNorm
every point gets fresh statistics computed on ``bn_data`` (stats reset, ``momentum=None`` i.e. a
cumulative average over the batches, forward passes in train mode without gradients) before it
is evaluated in eval mode -- including the endpoints, so with BN the frame's endpoint values equal
the endpoints *after the same recomputation*, not the endpoints as stored. Models with BatchNorm
and no ``bn_data`` raise ``ValueError``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from prunelab import graph as G
from prunelab import masks as M
from prunelab.train import Recipe, _tensors, evaluate, fit

__all__ = [
    "interpolate", "lerp_model", "barrier", "instability", "instability_curve",
    "InstabilityResult", "Curve", "Bezier",
    "PolyChain", "bezier", "polychain", "fit_bend", "curve_frame", "ensemble_error", "plane",
    "has_batchnorm", "recompute_bn",
]

_BN = nn.modules.batchnorm._BatchNorm


# ----------------------------------------------------------------------------- helpers
def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` contains a BatchNorm layer."""
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, bn_data, *, batch_size: int = 500) -> nn.Module:
    """Reset and recompute BatchNorm running statistics of ``model`` in place on ``bn_data``.

    Statistics are a cumulative average over the batches (``momentum=None``), computed in train
    mode without gradients; the model is left in eval mode with its momenta restored.
    """
    x, _ = _tensors(bn_data)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return model


def _check_bn(model: nn.Module, bn_data) -> None:
    if has_batchnorm(model) and bn_data is None:
        raise ValueError("the model has BatchNorm: its running statistics are not valid at blended "
                         "weights; pass bn_data=(x, y) (e.g. the train split) to recompute them "
                         "at every point")


def _plain(model: nn.Module) -> nn.Module:
    """Plain copy (effective weights, no masks), in eval mode."""
    return G.plain_copy(model).eval()


def _check_same(*states: Mapping[str, Tensor]) -> None:
    ref = states[0]
    for s in states[1:]:
        if set(s) != set(ref):
            raise ValueError(f"models differ in architecture: tensors {sorted(set(s) ^ set(ref))}")
        for k, v in s.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"models differ in architecture: {k} has shapes "
                                 f"{tuple(ref[k].shape)} and {tuple(v.shape)}")


def _lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """``a + t (b - a)`` with exact endpoints; non-float tensors are taken from ``a``."""
    if t == 0 or not a.is_floating_point():
        return a.clone()
    if t == 1:
        return b.clone()
    return a + t * (b - a)


def _named_data(data, splits) -> dict[str, Any] | None:
    """``None`` for a single (x, y)/Dataset; else ``{split name: data}``."""
    if hasattr(data, "split") and hasattr(data, "train") and hasattr(data, "test"):  # a Bundle
        names = ("test",) if splits is None else tuple(splits)
        return {s: data.split(s) for s in names}
    if isinstance(data, Mapping):
        names = tuple(data) if splits is None else tuple(splits)
        unknown = set(names) - set(data)
        if unknown:
            raise ValueError(f"unknown splits {sorted(unknown)}; data has {sorted(data)}")
        return {s: data[s] for s in names}
    if splits is not None:
        raise ValueError("splits= needs data as a dict of named (x, y) pairs or a Bundle")
    return None


def _ts(steps: int | Iterable[float]) -> list[float]:
    if isinstance(steps, int):
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        # i / (steps - 1) gives exactly 0.0 and 1.0 at the ends
        return [i / (steps - 1) for i in range(steps)]
    return [float(t) for t in steps]


def _evaluate_point(model: nn.Module, data, splits, bn_data) -> list[dict[str, Any]]:
    if bn_data is not None and has_batchnorm(model):
        recompute_bn(model, bn_data)
    named = _named_data(data, splits)
    if named is None:
        ev = evaluate(model, data)
        return [{"loss": ev["loss"], "error": ev["error"]}]
    rows = []
    for name, d in named.items():
        ev = evaluate(model, d)
        rows.append({"split": name, "loss": ev["loss"], "error": ev["error"]})
    return rows


def _frame(point: Callable[[float], nn.Module], ts: list[float], data, splits, bn_data,
           **extra) -> pd.DataFrame:
    rows = []
    for t in ts:
        for r in _evaluate_point(point(t), data, splits, bn_data):
            rows.append({"t": t, **extra, **r})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- straight line
def lerp_model(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """Plain copy (no masks, eval mode) with all floating state ``a + t (b - a)``; exact at 0, 1.

    BatchNorm statistics are blended too; call :func:`recompute_bn` before evaluating.
    """
    pa, pb = _plain(model_a), _plain(model_b)
    sa, sb = pa.state_dict(), pb.state_dict()
    _check_same(sa, sb)
    pa.load_state_dict({k: _lerp(sa[k], sb[k], float(t)) for k in sa})
    return pa.eval()


def interpolate(model_a: nn.Module, model_b: nn.Module, data, *,
                steps: int | Iterable[float] = 21, splits: Iterable[str] | None = None,
                bn_data=None) -> pd.DataFrame:
    """Loss and error along the straight segment ``w(t) = a + t (b - a)``.

    Args:
        model_a, model_b: Same architecture, dense or pruned (effective weights are blended; see
            the module docstring). All floating state (parameters and buffers) is blended.
        data: ``(x, y)``, a Dataset, a dict ``{name: (x, y)}`` or a Bundle (then ``splits``,
            default ``("test",)``, picks its splits).
        steps: Number of equally spaced ``t`` in [0, 1], or explicit ``t`` values.
        splits: Subset of the named data to evaluate.
        bn_data: ``(x, y)`` for recomputing BatchNorm statistics at every point; required for
            models with BatchNorm.

    Returns:
        DataFrame with columns t, loss, error (and split first-after-t for named data).
    """
    _check_bn(model_a, bn_data)
    pa, pb = _plain(model_a), _plain(model_b)
    # clones: state_dict() shares storage with pa, which every point overwrites
    sa = {k: v.clone() for k, v in pa.state_dict().items()}
    sb = {k: v.clone() for k, v in pb.state_dict().items()}
    _check_same(sa, sb)

    def point(t: float) -> nn.Module:
        pa.load_state_dict({k: _lerp(sa[k], sb[k], t) for k in sa})
        return pa.eval()

    return _frame(point, _ts(steps), data, splits, bn_data)


def barrier(frame: pd.DataFrame, *, metric: str = "loss", split: str | None = None) -> float:
    """Max of ``metric`` along the path minus the mean of its two endpoints (Frankle et al.).

    ``frame`` is a path frame (columns t and ``metric``); with a ``split`` column pass ``split=``
    unless it holds only one split.
    """
    f = frame
    if "split" in f.columns:
        names = f["split"].unique()
        if split is None:
            if len(names) != 1:
                raise ValueError(f"frame has splits {list(names)}: pass split=")
            split = names[0]
        f = f[f["split"] == split]
    elif split is not None:
        raise ValueError("frame has no split column")
    if metric not in f.columns:
        raise ValueError(f"frame has no column {metric!r}")
    f = f.sort_values("t")
    if len(f) < 2:
        raise ValueError("a path needs at least two points")
    values = f[metric].to_numpy(dtype=float)
    return float(values.max() - 0.5 * (values[0] + values[-1]))


# ----------------------------------------------------------------------------- instability
@dataclass
class InstabilityResult:
    """Barrier between two networks finished from the same state after ``k_steps``."""

    barrier: float
    frame: pd.DataFrame
    model_a: nn.Module
    model_b: nn.Module
    k_steps: int
    extra: dict = field(default_factory=dict)


def _fit_or_raise(model: nn.Module, data, recipe: Recipe, seed: int, progress: bool) -> None:
    """``fit``, re-raising an interrupt it caught: a barrier between half-trained copies would
    be a wrong number, not a partial result."""
    if fit(model, data, recipe=recipe, seed=seed, progress=progress).interrupted:
        raise KeyboardInterrupt("interrupted while training the copies; no barrier computed")


def instability(model_init: nn.Module, bundle, *, k_steps: int, recipe: Recipe,
                seeds: tuple[int, int] = (0, 1), steps: int = 11, split: str = "test",
                metric: str = "error", progress: bool = False) -> InstabilityResult:
    """Linear-mode-connectivity instability at step ``k_steps`` (Frankle et al., Figs. 2-3).

    ``model_init`` (not modified) is trained ``k_steps`` optimiser steps with data-order seed
    ``seeds[0]``; two copies of that state are then trained with data orders ``seeds[0]`` and
    ``seeds[1]`` for the rest of the recipe's budget, and the straight segment between them is
    evaluated on ``bundle``'s ``split``. The budget is ``recipe.max_steps`` or ``epochs`` x steps
    per epoch. Simplification: the second phase starts a fresh optimiser and schedule (no
    optimiser state or learning-rate schedule position is carried over from the first phase).

    Returns:
        :class:`InstabilityResult` with the ``metric`` barrier and the path frame.
    """
    x, y = bundle.train.tensors
    total = math.ceil(len(y) / recipe.batch_size) * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    if not 0 <= k_steps <= total:
        raise ValueError(f"k_steps must be in 0..{total}, got {k_steps}")
    start = copy.deepcopy(model_init)
    if k_steps > 0:
        _fit_or_raise(start, (x, y), recipe.replace(max_steps=k_steps), seeds[0], progress)
    rest = recipe.replace(max_steps=total - k_steps) if total > k_steps else None
    finished = []
    for s in seeds:
        m = copy.deepcopy(start)
        if rest is not None:
            _fit_or_raise(m, (x, y), rest, s, progress)
        finished.append(m.eval())
    bn = (x, y) if has_batchnorm(start) else None
    frame = interpolate(finished[0], finished[1], bundle.split(split), steps=steps, bn_data=bn)
    return InstabilityResult(barrier(frame, metric=metric), frame, finished[0], finished[1],
                             k_steps)


def _check_ks(ks, total: int) -> list[int]:
    if isinstance(ks, (int, float)) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = list(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of integer steps in 0..{total}, "
                         f"got {ks!r}") from None
    if not ks:
        raise ValueError(f"ks must hold at least one step in 0..{total}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total]
    if bad:
        raise ValueError(f"ks must be integer steps in 0..{total} (the recipe's budget), got {bad}")
    return sorted(set(ks))


def instability_curve(model_init: nn.Module, bundle, *, ks: Iterable[int], recipe: Recipe,
                      seeds: tuple[int, int] = (0, 1), steps: int = 11, split: str = "test",
                      metric: str = "error", sparsity: float | None = None,
                      masks: M.Masks | None = None,
                      progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instability vs the step ``k`` the two copies split at (Frankle et al. 2020, Fig. 3).

    For every ``k`` this is exactly :func:`instability` with ``k_steps=k`` (same phase-1 state, same
    second-phase runs, bit-identical barrier and path), computed more cheaply: phase 1 (data
    order ``seeds[0]``) runs once to ``max(ks)`` and the state at every ``k`` is snapshotted on the
    way -- fit's first ``k`` steps do not depend on its ``max_steps``, so the snapshot equals a run
    stopped at ``k``. (Resuming phase 1 from ``k1`` to ``k2`` would *not* be equivalent: each fit
    call restarts the data order and the optimiser.) Cost: ``max(ks)`` steps once, then
    ``2 (T - k)`` steps per ``k``, T the recipe's budget (``max_steps`` or epochs x steps per
    epoch); calling :func:`instability` per ``k`` would add ``Σ k`` steps.

    Sparse subnetworks (Frankle et al. 2020, Sec. 4, Figs. 5-6): with ``sparsity`` the dense
    phase-1 run goes on to T, θ_T is pruned by global magnitude to ``sparsity`` (mask m, one
    round of IMP with rewinding), and for every ``k`` the *rewound subnetwork* m ⊙ θ_k is what the
    two copies train from, with m held during training and along the segment. One IMP round
    prunes θ_T, which does not depend on ``k``, so m is the same for every ``k``; the paper's
    iterative IMP (several rounds, each retrained from θ_k) would give a mask per ``k``. Pass
    ``masks`` instead to use a mask of your own (e.g. ``pl.lottery.imp(...).masks[-1]``).

    Args:
        model_init: the network θ₀; not modified.
        bundle: trains on ``bundle.train``; the path is evaluated on ``bundle``'s ``split``.
        ks: steps in 0..T; sorted and de-duplicated. ``k = T`` gives two identical copies, so a
            barrier of exactly 0.
        recipe: the training recipe (no early stopping: ``patience`` must be None).
        seeds: data orders of the two copies (``seeds[0]`` also drives phase 1).
        steps: points along each path (``t`` in [0, 1]).
        split: "train", "val" or "test".
        metric: "error" or "loss", the barrier's quantity.
        sparsity: prune the rewound networks: one-shot global magnitude mask of θ_T (above).
        masks: an explicit mask (bool dict, True = kept) for the rewound networks; not with
            ``sparsity``.
        progress: progress bars.

    Returns:
        ``(barriers, paths)``: ``barriers`` has one row per k (k, barrier, metric, split,
        <metric>_a, <metric>_b, path_max, total_steps, density: the fraction of prunable
        weights kept, 1.0 for dense runs); ``paths`` the concatenated path frames
        with a ``k`` column (k, t, loss, error), e.g. for a plot with a ``k`` slider. Interrupting
        returns the ``k`` finished so far, with ``attrs["interrupted"]`` True on both frames.

    Raises:
        ValueError: ``ks`` empty or outside 0..T, an unknown ``split`` or ``metric``, a recipe with
            ``patience``, ``seeds`` not a pair, a bad ``sparsity`` or ``masks``, or both given.
    """
    if metric not in ("error", "loss"):
        raise ValueError(f"metric must be 'error' or 'loss', got {metric!r}")
    if recipe.patience is not None:
        raise ValueError("instability runs have no validation set: use a recipe with "
                         f"patience=None, got patience={recipe.patience}")
    seeds = tuple(seeds)
    if len(seeds) != 2:
        raise ValueError(f"seeds must be a pair of data-order seeds, got {seeds!r}")
    eval_data = bundle.split(split)  # ValueError on an unknown split
    x, y = bundle.train.tensors
    total = math.ceil(len(y) / recipe.batch_size) * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    ks = _check_ks(ks, total)
    _ts(steps)
    if sparsity is not None and masks is not None:
        raise ValueError("give sparsity (a magnitude mask of θ_T) or masks, not both")
    if sparsity is not None:
        sparsity = M.check_sparsity(sparsity)
    if masks is not None:
        M._check_masks(_plain(model_init), masks)
        masks = {k: v.clone() for k, v in masks.items()}

    from tqdm.auto import tqdm

    rows, frames, interrupted = [], [], False
    bn = (x, y) if has_batchnorm(model_init) else None
    try:
        start = copy.deepcopy(model_init)
        snaps = {0: copy.deepcopy(start)} if 0 in ks else {}
        wanted = set(ks)
        # phase 1 runs to T when the mask comes from θ_T; fit's first k steps do not depend
        # on its max_steps, so the snapshots are the same either way
        until = total if sparsity is not None else ks[-1]
        if until > 0:
            def keep(model: nn.Module, step: int) -> None:
                if step in wanted:
                    snaps[step] = copy.deepcopy(model)

            res = fit(start, (x, y), recipe=recipe.replace(max_steps=until), seed=seeds[0],
                      progress=progress, step_callback=keep, desc="phase 1")
            if res.interrupted:
                raise KeyboardInterrupt
        if sparsity is not None:  # one IMP round: global magnitude of θ_T
            theta_t = _plain(start)
            weights = dict(theta_t.named_parameters())
            masks = M.select({n: weights[n].detach().abs() for n in G.prunable_names(theta_t)},
                             sparsity, scope="global")
        density = 1.0 if masks is None else (
            sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values()))
        for k in tqdm(ks, desc="instability per k", disable=not progress, leave=False):
            finished = []
            for s in seeds:
                m = copy.deepcopy(snaps[k])
                if masks is not None:  # the rewound subnetwork m ⊙ θ_k, m held in training
                    m = M.apply(_plain(m), masks)
                if total > k:
                    res = fit(m, (x, y), recipe=recipe.replace(max_steps=total - k), seed=s,
                              progress=progress)
                    if res.interrupted:
                        raise KeyboardInterrupt
                finished.append(m.eval())
            frame = interpolate(finished[0], finished[1], eval_data, steps=steps, bn_data=bn)
            values = frame.sort_values("t")[metric].to_numpy(dtype=float)
            rows.append({"k": k, "barrier": barrier(frame, metric=metric), "metric": metric,
                         "split": split, f"{metric}_a": values[0], f"{metric}_b": values[-1],
                         "path_max": values.max(), "total_steps": total,
                         "density": density})
            frames.append(frame.assign(k=k)[["k", *frame.columns]])
            del snaps[k]  # free the snapshot once used
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"instability_curve interrupted: returning {len(rows)} of {len(ks)} k",
                      RuntimeWarning, stacklevel=2)
    barriers = pd.DataFrame(rows, columns=["k", "barrier", "metric", "split", f"{metric}_a",
                                           f"{metric}_b", "path_max", "total_steps",
                                           "density"])
    paths = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=["k", "t", "loss", "error"]))
    barriers.attrs["interrupted"] = paths.attrs["interrupted"] = interrupted
    return barriers, paths


# ----------------------------------------------------------------------------- curves
class Curve:
    """A path ``phi_theta(t)`` between two networks with one trainable bend ``theta``.

    Only parameters are curved; buffers (BatchNorm running statistics) come from ``model_a`` and
    are recomputed on ``bn_data`` when a point is evaluated. ``theta`` is a dict of tensors with
    ``requires_grad``; :meth:`weights` is differentiable in it.
    """

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, bend_init: str = "midpoint"):
        self.template = _plain(model_a)
        pb = _plain(model_b)
        self.a = {k: p.detach().clone() for k, p in self.template.named_parameters()}
        self.b = {k: p.detach().clone() for k, p in pb.named_parameters()}
        _check_same(self.a, self.b)
        _check_same(dict(self.template.named_buffers()), dict(pb.named_buffers()))
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

    def forward(self, t: float, x: Tensor) -> Tensor:
        """Output of the network ``phi_theta(t)`` on ``x`` (via ``functional_call``)."""
        return functional_call(self.template, {**self.weights(t), **self.buffers}, (x,))

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
    """Quadratic Bezier curve between two models; ``bend_init="midpoint"`` gives the segment."""
    return Bezier(model_a, model_b, bend_init=bend_init)


def polychain(model_a: nn.Module, model_b: nn.Module, *, bend_init: str = "midpoint") -> PolyChain:
    """One-bend polygonal chain between two models."""
    return PolyChain(model_a, model_b, bend_init=bend_init)


def fit_bend(curve: Curve, train_data, *, steps: int = 500, lr: float = 1e-2,
             batch_size: int = 128, seed: int = 0, optimizer: str = "adam",
             momentum: float = 0.9, weight_decay: float = 0.0) -> pd.DataFrame:
    """Train only the bend of ``curve`` on ``E_{t~U[0,1]} L(phi_theta(t))`` (Garipov et al.).

    One ``t ~ U[0, 1]`` is drawn per mini-batch; endpoints stay fixed. Deterministic for a given
    ``seed`` (its own generator for batches and ``t``). With BatchNorm the template runs in train
    mode (batch statistics), as in the paper; evaluate with ``bn_data`` afterwards.

    Returns:
        History DataFrame with columns step, t, loss.
    """
    x, y = _tensors(train_data)
    params = list(curve.theta.values())
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    gen = torch.Generator().manual_seed(seed)
    curve.template.train(has_batchnorm(curve.template))
    rows, order, pos = [], torch.randperm(len(y), generator=gen), 0
    try:
        for step in range(1, steps + 1):
            if pos + batch_size > len(y):
                order, pos = torch.randperm(len(y), generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            t = float(torch.rand((), generator=gen))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(curve.forward(t, x[idx]), y[idx])
            loss.backward()
            opt.step()
            rows.append({"step": step, "t": t, "loss": loss.item()})
    finally:
        curve.template.eval()
    return pd.DataFrame(rows)


def curve_frame(curve: Curve, data, *, steps: int | Iterable[float] = 21,
                splits: Iterable[str] | None = None, bn_data=None) -> pd.DataFrame:
    """Loss and error along ``curve`` (columns t, [split,] loss, error); see :func:`interpolate`."""
    _check_bn(curve.template, bn_data)
    return _frame(curve.point, _ts(steps), data, splits, bn_data)


@torch.no_grad()
def ensemble_error(model_a: nn.Module, model_b: nn.Module, data, *, bn_data=None,
                   batch_size: int = 1000) -> float:
    """Error of the two-network ensemble (mean of the softmax outputs) on ``data``.

    ``model_b`` may be a point of a curve (``curve.point(t)``). Models are evaluated as given
    (eval mode); pass ``bn_data`` to recompute BatchNorm statistics of copies first.
    """
    models = []
    for m in (model_a, model_b):
        m = copy.deepcopy(m).eval()
        if bn_data is not None and has_batchnorm(m):
            recompute_bn(m, bn_data)
        models.append(m)
    x, y = _tensors(data)
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size]
        p = sum(F.softmax(m(xb), dim=1) for m in models) / len(models)
        correct += int((p.argmax(1) == y[i:i + batch_size]).sum())
    return 1.0 - correct / max(len(y), 1)


# ----------------------------------------------------------------------------- plane
def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, data, *, grid: int = 21,
          margin: float = 0.2, splits: Iterable[str] | None = None, bn_data=None) -> pd.DataFrame:
    """Loss and error on the plane through three models (Garipov et al., Fig. 1).

    The basis is Gram-Schmidt of ``(b - a, c - a)`` over all parameters (effective weights;
    buffers come from ``a`` and are recomputed with ``bn_data`` for BatchNorm models). ``u`` and
    ``v`` are coordinates in parameter-space units with ``a`` at the origin and ``b`` on the
    u axis; the grid covers the three models' bounding box widened by ``margin`` of its size on
    each side. ``frame.attrs["points"]`` holds the models' (u, v).

    Returns:
        DataFrame with columns u, v, [split,] loss, error; ``grid * grid`` points.
    """
    _check_bn(model_a, bn_data)
    tmpl = _plain(model_a)
    names = [k for k, _ in tmpl.named_parameters()]
    ps = [dict(_plain(m).named_parameters()) for m in (model_a, model_b, model_c)]
    _check_same(*ps)
    flat = [torch.cat([p[k].detach().reshape(-1) for k in names]).double() for p in ps]
    a, b, c = flat
    e1 = b - a
    nb = e1.norm()
    if nb == 0:
        raise ValueError("model_a and model_b have the same weights")
    e1 = e1 / nb
    dc = c - a
    cu = float(dc @ e1)
    e2 = dc - cu * e1
    n2 = e2.norm()
    if n2 == 0:
        raise ValueError("the three models are collinear")
    e2 = e2 / n2
    pts = {"a": (0.0, 0.0), "b": (float(nb), 0.0), "c": (cu, float(n2))}
    us, vs = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
    du, dv = max(us) - min(us), max(vs) - min(vs)
    ulo, uhi = min(us) - margin * du, max(us) + margin * du
    vlo, vhi = min(vs) - margin * dv, max(vs) + margin * dv
    shapes = [(k, ps[0][k].shape, ps[0][k].numel()) for k in names]
    buffers = {k: v.clone() for k, v in tmpl.named_buffers()}
    rows = []
    for i in range(grid):
        u = ulo + (uhi - ulo) * i / (grid - 1)
        for j in range(grid):
            v = vlo + (vhi - vlo) * j / (grid - 1)
            w = (a + u * e1 + v * e2).float()
            state, off = {}, 0
            for k, shape, n in shapes:
                state[k] = w[off:off + n].reshape(shape)
                off += n
            tmpl.load_state_dict({**state, **buffers})
            tmpl.eval()
            for r in _evaluate_point(tmpl, data, splits, bn_data):
                rows.append({"u": u, "v": v, **r})
    out = pd.DataFrame(rows)
    out.attrs["points"] = pts
    return out
