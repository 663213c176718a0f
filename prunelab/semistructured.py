"""N:M semi-structured sparsity: keep exactly n of every m consecutive weights along the input.

The pattern of NVIDIA's sparse tensor cores (2:4; Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks", Sec. 2) as PyTorch stores it (``torch.sparse.to_sparse_semi_structured``: a 2-D
dense weight, groups of m consecutive elements along each row, i.e. along the input dimension of an
``nn.Linear`` weight ``(out, in)``). A conv weight ``(out, in, *kernel)`` is grouped along its
flattened ``in × kernel`` dimension in C order (``weight.reshape(out, -1)``), the layout
``torch.ao.pruning`` uses for its (1, 4) blocks.

A tensor stored with its inputs on another dim (HuggingFace's ``Conv1D`` keeps ``(in, out)``;
:func:`prunelab.graph.in_dim` says which) is grouped along that dim: pass ``in_dims=``.

Which n survive in a group is decided by any criterion's scores (higher = kept), so λ and stages
apply as for unstructured pruning: the stage's scores go in, with the previous stage's masks.

Torch only: nothing from prunelab is imported.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn


__all__ = ["parse_nm", "is_nm", "nm_select", "stage_ns", "check_nm", "to_semi_structured"]


def __dir__():
    return sorted(__all__)

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(spec) -> tuple[int, int]:
    """``"2:4" -> (2, 4)``: keep n of every m.

    Raises:
        ValueError: Not a string ``"n:m"`` of integers, ``n < 1`` or ``m <= n``.
    """
    match = _NM.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"an N:M pattern is a string 'n:m' of two integers such as '2:4', got "
                         f"{spec!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1:
        raise ValueError(f"N:M pattern {spec!r}: n must be at least 1 (n = 0 prunes everything)")
    if m <= n:
        raise ValueError(f"N:M pattern {spec!r}: m must be larger than n (m = {m} <= n = {n} "
                         "keeps every weight)")
    return n, m


def is_nm(scope) -> bool:
    """Whether ``scope`` names an N:M pattern (``"2:4"``) rather than a scope word."""
    return isinstance(scope, str) and _NM.match(scope) is not None


def _check_nm(n, m) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 1 or m <= n:
        raise ValueError(f"N:M needs 1 <= n < m, got n={n}, m={m}")


def _groups(t: Tensor, m: int, name: str) -> Tensor:
    """``t`` as ``(rows, groups, m)``: groups of m consecutive entries along the input dim."""
    if t.dim() < 2:
        raise ValueError(f"layer {name!r}: N:M groups run along the input dimension of a weight "
                         f"with at least 2 dimensions, got shape {tuple(t.shape)}")
    cols = math.prod(t.shape[1:])
    if cols % m:
        size = str(cols) if t.dim() == 2 else f"{cols} = {' x '.join(map(str, t.shape[1:]))}"
        raise ValueError(f"layer {name!r}: its input dimension ({size}) is not divisible by "
                         f"m = {m}")
    return t.reshape(t.shape[0], cols // m, m)


def _to_rows(t: Tensor, in_dim, name: str) -> Tensor:
    """``t`` with its input dim moved to dim 1 (a view), so groups run along rows."""
    if in_dim is None:
        raise ValueError(f"layer {name!r}: N:M groups run along an input dimension, and this "
                         f"tensor (shape {tuple(t.shape)}) has none (a norm's weight)")
    return t if in_dim == 1 or t.dim() < 2 else t.movedim(in_dim, 1)


def _select_one(s: Tensor, n: int, m: int, prev: Tensor | None, name: str,
                in_dim=1) -> Tensor:
    if in_dim != 1 and s.dim() >= 2:
        if prev is not None and prev.shape != s.shape:
            raise ValueError(f"previous[{name!r}] has shape {tuple(prev.shape)}, the scores "
                             f"{tuple(s.shape)}")
        keep = _select_one(_to_rows(s, in_dim, name), n, m,
                           None if prev is None else _to_rows(prev, in_dim, name), name)
        return keep.movedim(1, in_dim).contiguous()
    if s.is_complex() or not s.is_floating_point():
        s = s.double()
    if torch.isnan(s).any():
        raise ValueError(f"scores[{name!r}] contain NaN")
    g = _groups(s, m, name)
    if prev is not None:
        if prev.shape != s.shape:
            raise ValueError(f"previous[{name!r}] has shape {tuple(prev.shape)}, the scores "
                             f"{tuple(s.shape)}")
        alive = _groups(prev.to(device=s.device, dtype=torch.bool), m, name)
    # stable ascending sort: among equal scores the lower index comes first, so it is pruned
    order = torch.sort(g, dim=-1, stable=True).indices
    if prev is not None:
        # pruned weights rank below every live one (also below a live −inf score, as criteria
        # give what they prune themselves), so they are pruned first and stay pruned: a second
        # stable sort by liveness makes it the primary key
        order = order.gather(-1, torch.sort(alive.gather(-1, order).to(torch.int8), dim=-1,
                                            stable=True).indices)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order[..., m - n:], True)
    if prev is not None:
        keep &= alive  # a group with fewer than n live weights keeps only those
    return keep.reshape(s.shape)


def nm_select(scores, n: int, m: int, previous=None, *, in_dims=None):
    """Masks keeping exactly ``n`` of every ``m`` consecutive weights along the input dimension.

    In each group the ``n`` highest-scoring weights are kept; ties are broken by index (the lower
    index is pruned first), so the masks are deterministic. With ``previous`` masks (e.g. the last
    stage's) a pruned weight stays pruned: it ranks below every live weight of its group. A group
    that already has fewer than ``n`` live weights keeps exactly those (it is not refilled), so it
    then has fewer than ``n``.

    Per stage: call it with the stage's scores (λ already added by the criterion) and the
    previous stage's masks; ``n`` may step down from ``m`` to the target over the stages
    (:func:`stage_ns`).

    Args:
        scores: ``{name: tensor}`` (higher = kept) or one tensor; weights of at least 2 dims.
        n, m: Keep ``n`` of every ``m`` (``1 <= n < m``); see :func:`parse_nm`.
        previous: Masks of the same shape (``True`` = kept), a dict for a dict of scores.
        in_dims: ``{name: dim}`` of tensors whose inputs are not on dim 1 (a transposed
            ``Conv1D`` weight: 0), from :func:`prunelab.graph.in_dim`; others use dim 1.

    Returns:
        Bool masks shaped like the scores (a dict for a dict), on the scores' devices.

    Raises:
        ValueError: Bad n/m, a layer whose input dimension is not divisible by ``m`` (named),
            NaN scores, a mask of the wrong shape.
    """
    _check_nm(n, m)
    if isinstance(scores, Tensor):
        return _select_one(scores, n, m, previous, "<tensor>")
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be a dict of tensors or a tensor, got "
                         f"{type(scores).__name__}")
    previous, in_dims = previous or {}, in_dims or {}
    return {name: _select_one(s, n, m, previous.get(name), name, in_dims.get(name, 1))
            for name, s in scores.items()}


def stage_ns(n: int, m: int, stages: int, schedule: str = "linear") -> list[int]:
    """The ``n`` of each stage when an N:M pattern is reached in ``stages`` steps.

    ``"linear"`` prunes an equal number per group per stage (rounded), ``"exponential"`` keeps an
    equal fraction of the live weights per stage (``m·(n/m)^(k/stages)``, rounded); the last stage
    is always ``n`` and the sequence never increases. With more stages than ``m - n`` some stages
    repeat a value (they only re-score inside the same pattern).
    """
    _check_nm(n, m)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive int, got {stages!r}")
    if schedule == "linear":
        ns = [m - round((m - n) * k / stages) for k in range(1, stages + 1)]
    elif schedule == "exponential":
        ns = [round(m * (n / m) ** (k / stages)) for k in range(1, stages + 1)]
    else:
        raise ValueError(f"schedule must be 'linear' or 'exponential', got {schedule!r}")
    ns[-1] = n
    for i in range(1, len(ns)):
        ns[i] = min(ns[i], ns[i - 1])
    return [max(n, v) for v in ns]


def check_nm(masks, n: int, m: int, *, exact: bool = True, in_dims=None) -> None:
    """Raise ``ValueError`` naming the first layer whose mask breaks the N:M pattern.

    ``exact=True``: exactly ``n`` kept per group; else at most ``n`` (what the hardware needs).
    ``in_dims``: as for :func:`nm_select` (rows and groups are then counted in that layout).
    """
    _check_nm(n, m)
    items = masks.items() if isinstance(masks, Mapping) else [("<tensor>", masks)]
    in_dims = in_dims or {}
    for name, mask in items:
        kept = _groups(_to_rows(mask.bool(), in_dims.get(name, 1), name), m, name).sum(-1)
        bad = (kept != n) if exact else (kept > n)
        if bad.any():
            row, grp = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"layer {name!r}: row {row}, group {grp} keeps {int(kept[row, grp])} "
                             f"of {m} weights, not {'exactly' if exact else 'at most'} {n}")


def _semi_structured():
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as err:  # pragma: no cover - old torch
        raise RuntimeError("this torch has no torch.sparse.to_sparse_semi_structured "
                           f"(torch {torch.__version__}); it needs torch >= 2.1") from err
    return to_sparse_semi_structured


def _export_weight(w: Tensor, mask: Tensor, name: str) -> Tensor:
    if w.device.type != "cuda":
        raise RuntimeError(
            f"to_semi_structured: layer {name!r} is on {w.device.type!r}, but PyTorch's "
            "semi-structured sparse format (torch.sparse.to_sparse_semi_structured, CUTLASS / "
            "cuSPARSELt kernels) runs on CUDA GPUs only"
            + ("" if torch.cuda.is_available() else " and no CUDA device is present here")
            + ". The N:M masks themselves work on any device: apply them as ordinary masks.")
    if w.dim() != 2:
        raise ValueError(f"layer {name!r}: only 2-D (nn.Linear) weights can be exported to the "
                         f"semi-structured format, got shape {tuple(w.shape)}")
    check_nm({name: mask}, 2, 4, exact=False)  # the hardware's pattern: at most 2 of every 4
    return _semi_structured()(w * mask.to(w.dtype))


def to_semi_structured(model_or_weight, masks):
    """Export N:M-masked weights to ``torch.sparse.to_sparse_semi_structured`` (CUDA only).

    Args:
        model_or_weight: A weight tensor (with ``masks`` one bool tensor) or a model (with
            ``masks`` a dict weight name -> mask); for a model, a copy is returned whose masked
            ``nn.Linear`` weights are semi-structured sparse parameters (PyTorch's recipe:
            ``linear.weight = nn.Parameter(to_sparse_semi_structured(w))``).
        masks: Masks from :func:`nm_select` with the hardware's pattern (2:4 for float16,
            bfloat16 and int8).

    Raises:
        RuntimeError: No CUDA device (the message says so), or a torch without the format.
        ValueError: A non-Linear weight, a mask that breaks the 2:4 pattern.
    """
    if isinstance(model_or_weight, Tensor):
        return _export_weight(model_or_weight.detach(), masks, "<tensor>")
    if not isinstance(model_or_weight, nn.Module) or not isinstance(masks, Mapping):
        raise ValueError("to_semi_structured takes (weight tensor, mask) or (model, dict of "
                         f"masks), got ({type(model_or_weight).__name__}, "
                         f"{type(masks).__name__})")
    import copy

    out = copy.deepcopy(model_or_weight)
    for name, mask in masks.items():
        mod_name, _, attr = name.rpartition(".")
        mod = out.get_submodule(mod_name)
        if not isinstance(mod, nn.Linear) or attr != "weight":
            raise ValueError(f"layer {name!r}: only nn.Linear weights can be exported to the "
                             f"semi-structured format, got {type(mod).__name__}.{attr}")
        with torch.no_grad():
            mod.weight = nn.Parameter(_export_weight(mod.weight.detach(), mask, name),
                                      requires_grad=False)
    return out
