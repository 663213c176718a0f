"""Mode connectivity: loss and error along paths between trained networks.

* :func:`interpolate` -- the straight segment ``w(t) = a + t (b - a)`` (Frankle et al., linear
  mode connectivity); :func:`barrier` -- max along the path minus the mean of the endpoints.
* :func:`plane` -- loss/error on the 2-D plane through three networks (Garipov et al., Fig. 1).
* The path toolkit the other path modules share: :func:`path_ts`, :func:`path_frame`,
  :func:`evaluate_point`, :func:`plain_eval`, :func:`check_same_architecture`,
  :func:`require_bn_data`, :func:`recompute_bn`.

Curves with a trainable bend (Bezier, polygonal chain, ``fit_bend``; Garipov et al.) are in
:mod:`prunelab.curves`; instability vs the rewinding step ``k`` (Frankle et al. 2020, Figs. 2-6)
is in :mod:`prunelab.lottery`, beside the IMP it shares.

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

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab.train import as_tensors, evaluate

__all__ = [
    "interpolate", "lerp_model", "barrier", "plane", "has_batchnorm", "recompute_bn",
    "path_ts", "path_frame", "evaluate_point", "plain_eval", "check_same_architecture",
    "require_bn_data", "check_data",
]



def __dir__():
    return sorted(__all__)

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
    x, y = as_tensors(bn_data, what="bn_data")
    B.check_inputs(x, "bn_data inputs")
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for xb, _ in B.chunks(x, y, batch_size):
            B.call(model, B.to_model(xb, model))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return model


def require_bn_data(model: nn.Module, bn_data) -> None:
    """ValueError when ``model`` has BatchNorm and no ``bn_data`` to recompute it along a path."""
    if has_batchnorm(model) and bn_data is None:
        raise ValueError("the model has BatchNorm: its running statistics are not valid at blended "
                         "weights; pass bn_data=(x, y) (e.g. the train split) to recompute them "
                         "at every point")


def plain_eval(model: nn.Module) -> nn.Module:
    """Plain copy (effective weights, no masks), in eval mode."""
    return G.plain_copy(model).eval()


def check_same_architecture(*states: Mapping[str, Tensor]) -> None:
    """ValueError unless the state dicts have the same tensor names and shapes."""
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


def path_ts(steps: int | Iterable[float]) -> list[float]:
    """The ``t`` of a path: ``steps`` equally spaced in [0, 1] (exact ends), or the given ``t``
    (finite numbers; values outside [0, 1] extrapolate). ValueError/TypeError naming ``steps``."""
    if isinstance(steps, bool):
        raise TypeError(f"steps must be an int >= 2 or a sequence of t values, got {steps!r}")
    if isinstance(steps, numbers.Integral):
        steps = int(steps)
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        # i / (steps - 1) gives exactly 0.0 and 1.0 at the ends
        return [i / (steps - 1) for i in range(steps)]
    if isinstance(steps, (str, bytes, numbers.Number)) or not isinstance(steps, Iterable):
        raise TypeError(f"steps must be an int >= 2 or a sequence of t values, got {steps!r}")
    ts = []
    for t in steps:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) and not (
                isinstance(t, Tensor) and t.numel() == 1):
            raise TypeError(f"steps must hold real numbers t, got {t!r} in {steps!r}")
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"steps must hold finite t values, got {t!r} in {list(steps)!r}")
        ts.append(t)
    if not ts:
        raise ValueError("steps is empty: give at least one t")
    return ts


def check_data(model: nn.Module, data, splits, objective: B.Objective,
               what: str = "data") -> None:
    """ValueError/TypeError before any path is walked: empty or NaN data, inputs the model
    cannot take, targets that do not fit its outputs (one example per split is run)."""
    named = _named_data(data, splits)
    for name, d in (named or {None: data}).items():
        label = what if name is None else f"{what}[{name!r}]"
        x, y = as_tensors(d, what=label)
        B.check_inputs(x, f"{label} inputs")
        x, y = B.to_model(x, model), B.to_model(y, model)
        B.probe(model, x, y, objective, what=label)


def evaluate_point(model: nn.Module, data, splits, bn_data, *, loss="cross_entropy",
                   output=None) -> list[dict[str, Any]]:
    """Loss and error of one point of a path, per split; BatchNorm recomputed on ``bn_data``."""
    if bn_data is not None and has_batchnorm(model):
        recompute_bn(model, bn_data)
    named = _named_data(data, splits)
    if named is None:
        ev = evaluate(model, data, loss=loss, output=output)
        return [{"loss": ev["loss"], "error": ev["error"]}]
    rows = []
    for name, d in named.items():
        ev = evaluate(model, d, loss=loss, output=output)
        rows.append({"split": name, "loss": ev["loss"], "error": ev["error"]})
    return rows


def path_frame(point: Callable[[float], nn.Module], ts: list[float], data, splits, bn_data,
               *, loss="cross_entropy", output=None, **extra) -> pd.DataFrame:
    """Tidy frame ``t, [extra], [split], loss, error`` of the models ``point(t)`` for each ``t``."""
    rows = []
    for t in ts:
        for r in evaluate_point(point(t), data, splits, bn_data, loss=loss, output=output):
            rows.append({"t": t, **extra, **r})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- straight line
def lerp_model(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """Plain copy (no masks, eval mode) with all floating state ``a + t (b - a)``; exact at 0, 1.

    BatchNorm statistics are blended too; call :func:`recompute_bn` before evaluating.
    """
    pa, pb = plain_eval(model_a), plain_eval(model_b)
    sa, sb = pa.state_dict(), pb.state_dict()
    check_same_architecture(sa, sb)
    pa.load_state_dict({k: _lerp(sa[k], sb[k], float(t)) for k in sa})
    return pa.eval()


def interpolate(model_a: nn.Module, model_b: nn.Module, data, *,
                steps: int | Iterable[float] = 21, splits: Iterable[str] | None = None,
                bn_data=None, loss="cross_entropy", output=None) -> pd.DataFrame:
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
        loss, output: the loss measured and how outputs are read (:mod:`prunelab.batches`;
            ``error`` is NaN for a loss that does not classify).

    Each split is (x, y) tensors (``x`` a tensor, mapping or tuple), a Dataset or a DataLoader;
    evaluation runs on the device and in the dtype of the models.

    Returns:
        DataFrame with columns t, loss, error (and split first-after-t for named data).

    Raises:
        ValueError/TypeError: ``steps`` not finite numbers; data the model cannot take, NaN or
            empty data, targets out of range (checked on one example before the walk).
    """
    require_bn_data(model_a, bn_data)
    obj = B.objective(loss, output)
    ts = path_ts(steps)
    pa, pb = plain_eval(model_a), plain_eval(model_b)
    # clones: state_dict() shares storage with pa, which every point overwrites
    sa = {k: v.clone() for k, v in pa.state_dict().items()}
    sb = {k: v.clone() for k, v in pb.state_dict().items()}
    check_same_architecture(sa, sb)
    check_data(pa, data, splits, obj)

    def point(t: float) -> nn.Module:
        pa.load_state_dict({k: _lerp(sa[k], sb[k], t) for k in sa})
        return pa.eval()

    return path_frame(point, ts, data, splits, bn_data, loss=obj, output=None)


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


# ----------------------------------------------------------------------------- plane
def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, data, *, grid: int = 21,
          margin: float = 0.2, splits: Iterable[str] | None = None, bn_data=None,
          loss="cross_entropy", output=None) -> pd.DataFrame:
    """Loss and error on the plane through three models (Garipov et al., Fig. 1).

    The basis is Gram-Schmidt of ``(b - a, c - a)`` over all parameters (effective weights;
    buffers come from ``a`` and are recomputed with ``bn_data`` for BatchNorm models). ``u`` and
    ``v`` are coordinates in parameter-space units with ``a`` at the origin and ``b`` on the
    u axis; the grid covers the three models' bounding box widened by ``margin`` of its size on
    each side. ``frame.attrs["points"]`` holds the models' (u, v).

    Returns:
        DataFrame with columns u, v, [split,] loss, error; ``grid * grid`` points.
    """
    require_bn_data(model_a, bn_data)
    if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    obj = B.objective(loss, output)
    tmpl = plain_eval(model_a)
    check_data(tmpl, data, splits, obj)
    names = [k for k, _ in tmpl.named_parameters()]
    ps = [dict(plain_eval(m).named_parameters()) for m in (model_a, model_b, model_c)]
    check_same_architecture(*ps)
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
            w = a + u * e1 + v * e2
            state, off = {}, 0
            for k, shape, n in shapes:  # each parameter back in its own dtype
                state[k] = w[off:off + n].reshape(shape).to(ps[0][k].dtype)
                off += n
            tmpl.load_state_dict({**state, **buffers})
            tmpl.eval()
            for r in evaluate_point(tmpl, data, splits, bn_data, loss=obj):
                rows.append({"u": u, "v": v, **r})
    out = pd.DataFrame(rows)
    out.attrs["points"] = pts
    return out
