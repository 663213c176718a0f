"""Scores -> masks, and masks on models.

Masks are plain data: ``dict[name, bool Tensor]`` (True = kept), keyed by the prunable weight names
of :mod:`prunelab.graph`. Selection is exact: a requested sparsity prunes exactly
``floor(sparsity · n)`` entries even when scores tie (zeros, pruned weights), ties broken by index
(lower index pruned first), and an entry pruned before stays pruned.

Masks are attached to a model with ``torch.nn.utils.parametrize`` (a :class:`WeightMask` holding a
bool buffer, as ``torch.ao.pruning`` does): the optimiser keeps updating the original parameter but
the forward pass always sees ``original * mask``, so pruned weights stay exactly zero through any
training loop, and ``copy.deepcopy`` and ``state_dict`` work. Checkpoints are a plain state dict
plus the masks (safetensors), never a pickled parametrized module.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunelab import graph as G

Masks = G.Masks
Scores = G.Scores
SCOPES = ("global", "layerwise", "normalized")


# ----------------------------------------------------------------------------- validation
def check_sparsity(sparsity, what: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), or ValueError naming the value and the allowed range."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"{what} must be a finite number in [0, 1), got {sparsity!r}")
    return s


def check_scope(scope) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def n_pruned(sparsity: float, n: int) -> int:
    """floor(sparsity · n), robust to float round-off (0.29 · 100 prunes 29, not 28)."""
    x = sparsity * n
    r = round(x)
    return int(r) if abs(x - r) < 1e-6 * max(1.0, x) else int(math.floor(x))


def _check_scores(scores: Scores, previous: Masks | None) -> None:
    if not scores:
        raise ValueError("scores is empty: nothing to prune")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores of {name} contain NaN; refusing to rank them")
        if previous is not None and name in previous and previous[name].shape != s.shape:
            raise ValueError(f"previous mask of {name} has shape {tuple(previous[name].shape)}, "
                             f"scores have {tuple(s.shape)}")


# ----------------------------------------------------------------------------- selection
def _prune_lowest(flat: Tensor, k: int) -> Tensor:
    """Bool keep-mask of ``flat`` with exactly the ``k`` lowest entries pruned (ties by index)."""
    n = flat.numel()
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= n:
        return ~keep
    dead = torch.isneginf(flat)  # entries pruned in earlier stages (see _prepare)
    n_dead = int(torch.count_nonzero(dead))  # ~30x faster than a bool sum
    if k > n_dead > n // 4:
        # Late stages of a schedule: select among the surviving entries only.
        alive = torch.nonzero(~dead).flatten()
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
        keep[alive[_prune_lowest(flat[alive], k - n_dead)]] = True
        return keep
    # Ties at the threshold are resolved by index below, so counts are exact.
    t = _kth_smallest(flat, k)
    below = flat < t
    keep &= ~below
    need = k - int(torch.count_nonzero(below))
    if need > 0:
        tied = torch.nonzero(flat == t).flatten()[:need]
        keep[tied] = False
    return keep


def _kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The k-th smallest value (1-based), exactly.

    Large inputs: a seeded random sample brackets the k-th value, and ``kthvalue`` runs only on the
    ~1 % of entries inside the bracket (falling back to the full ``kthvalue`` if the bracket
    missed, which the 5-sigma margin makes rare). The answer never depends on the sample.
    """
    n = flat.numel()
    if n < 2_000_000:
        return torch.kthvalue(flat, k).values
    m = 50_000
    gen = torch.Generator().manual_seed(0)
    sample = flat[torch.randint(0, n, (m,), generator=gen)].sort().values
    q = k / n
    margin = 5 * math.sqrt(q * (1 - q) / m) + 2 / m
    lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = sample[lo_i] if lo_i > 0 else None
    hi = sample[hi_i] if hi_i < m else None
    inside = torch.ones_like(flat, dtype=torch.bool) if lo is None else flat >= lo
    below = 0 if lo is None else n - int(torch.count_nonzero(inside))
    if hi is not None:
        inside &= flat <= hi
    candidates = flat[inside]
    if below < k <= below + candidates.numel():
        return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(flat, k).values


def _prepare(scores: Scores, previous: Masks | None) -> dict[str, Tensor]:
    out = {}
    for name, s in scores.items():
        s = s.detach().float()
        if previous is not None and name in previous:
            s = s.masked_fill(~previous[name].to(torch.bool), -math.inf)
        out[name] = s
    return out


def select(scores: Scores, sparsity: float | None = None, *, scope: str = "global",
           layer_sparsity: dict[str, float] | None = None,
           previous: Masks | None = None, _checked: bool = False) -> Masks:
    """Keep the highest-scoring weights so that ``sparsity`` of them are pruned.

    Args:
        scores: name -> score tensor (higher = more important).
        sparsity: total fraction of weights to prune, in [0, 1) (not a fraction of survivors).
        scope: ``"global"`` ranks all layers together; ``"layerwise"`` prunes ``sparsity`` of
            each layer; ``"normalized"`` ranks globally after dividing each layer's scores by their
            Frobenius norm (LAP paper App. I).
        layer_sparsity: explicit per-layer sparsities (name -> fraction); layers not named keep all
            their weights. Overrides ``sparsity`` and ``scope``.
        previous: masks of an earlier stage; what they pruned stays pruned.

    Returns:
        name -> bool mask, True = kept.
    """
    if not _checked:  # the pruning loop's scores were checked by criteria.compute
        _check_scores(scores, previous)
    out = _select(scores, sparsity, scope, layer_sparsity, previous)
    if previous:  # pruned stays pruned, also when the new target is below the old sparsity
        out = {n: m & previous[n].to(torch.bool) if n in previous else m for n, m in out.items()}
    return out


def _select(scores: Scores, sparsity, scope: str, layer_sparsity, previous) -> Masks:
    ranked = _prepare(scores, previous)
    if layer_sparsity is not None:
        unknown = set(layer_sparsity) - set(scores)
        if unknown:
            raise ValueError(f"layer_sparsity names unknown layers {sorted(unknown)}; "
                             f"prunable weights: {list(scores)}")
        targets = {n: check_sparsity(v, f"layer_sparsity[{n!r}]") for n, v in layer_sparsity.items()}
        return {n: _prune_lowest(s.flatten(), n_pruned(targets.get(n, 0.0), s.numel())).view_as(s)
                for n, s in ranked.items()}
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    if scope == "layerwise":
        return {n: _prune_lowest(s.flatten(), n_pruned(sparsity, s.numel())).view_as(s)
                for n, s in ranked.items()}
    if scope == "normalized":
        normed = {}
        for n, s in ranked.items():
            finite = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
            norm = torch.linalg.vector_norm(finite)
            normed[n] = s / norm if norm > 0 else s
        ranked = normed
    flat = torch.cat([s.flatten() for s in ranked.values()])
    keep = _prune_lowest(flat, n_pruned(sparsity, flat.numel()))
    parts = keep.split([s.numel() for s in ranked.values()])
    return {n: m.view_as(s) for (n, s), m in zip(ranked.items(), parts)}


class Ranking:
    """Scores sorted once, so that the mask of any sparsity is a comparison, not a sort.

    This is what makes a sparsity slider cheap: ``Ranking(scores).masks(0.9)`` costs one
    ``>=`` per weight. Same selection rule as :func:`select` (global or layerwise, ties by index).
    """

    def __init__(self, scores: Scores, *, scope: str = "global", previous: Masks | None = None):
        check_scope(scope)
        _check_scores(scores, previous)
        ranked = _prepare(scores, previous)
        self.previous = {n: m.to(torch.bool) for n, m in (previous or {}).items()}
        self.scope = scope
        self.names = list(ranked)
        self.shapes = {n: s.shape for n, s in ranked.items()}
        self.numels = [s.numel() for s in ranked.values()]
        if scope == "normalized":
            ranked = {n: s / n_ if (n_ := torch.linalg.vector_norm(
                torch.where(torch.isfinite(s), s, torch.zeros_like(s)))) > 0 else s
                for n, s in ranked.items()}
        if scope == "layerwise":
            self.ranks = {n: self._rank(s.flatten()).view(s.shape) for n, s in ranked.items()}
        else:
            flat = torch.cat([s.flatten() for s in ranked.values()])
            self.ranks = dict(zip(self.names, (r.view(self.shapes[n]) for n, r in
                                               zip(self.names, self._rank(flat).split(self.numels)))))
        self.total = sum(self.numels)

    @staticmethod
    def _rank(flat: Tensor) -> Tensor:
        # Stable ascending sort: among ties the lower index gets the lower rank (pruned first).
        order = torch.sort(flat, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(flat.numel(), device=flat.device)
        return ranks

    def masks(self, sparsity: float, out: Masks | None = None) -> Masks:
        """Masks at ``sparsity``; written into ``out``'s tensors when given (no allocation)."""
        sparsity = check_sparsity(sparsity)
        result = {} if out is None else out
        for n, r in self.ranks.items():
            k = n_pruned(sparsity, r.numel() if self.scope == "layerwise" else self.total)
            if out is None:
                result[n] = r >= k
            else:
                torch.ge(r, k, out=out[n])
            if n in self.previous:
                result[n] &= self.previous[n]
        return result


def schedule(sparsity: float, stages: int, kind: str = "exponential",
             start: float = 0.0) -> list[float]:
    """Total sparsity after each of ``stages`` stages (LM paper Algorithm 1).

    ``"linear"`` prunes the same number of weights per stage; ``"exponential"`` keeps the same
    fraction of the remaining weights per stage: density_i = (1−start)·((1−s)/(1−start))^(i/π).
    """
    sparsity = check_sparsity(sparsity)
    start = check_sparsity(start, "start")
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    if kind not in ("linear", "exponential"):
        raise ValueError(f"schedule must be 'linear' or 'exponential', got {kind!r}")
    if kind == "linear":
        return [start + (sparsity - start) * i / stages for i in range(1, stages + 1)]
    ratio = (1.0 - sparsity) / (1.0 - start)
    out = [1.0 - (1.0 - start) * ratio ** (i / stages) for i in range(1, stages + 1)]
    out[-1] = sparsity  # no round-off on the final target
    return out


def lap_layer_sparsity(model: nn.Module, tau: int, *, p: float, q: float,
                       skip_first_conv: bool = False) -> dict[str, float]:
    """Per-layer sparsities of the LAP paper's (p, q, τ) rule (Park et al. 2020, App. A).

    Convolutions keep p^τ of their weights, fully-connected layers q^τ, the last layer
    ((1+q)/2)^τ. The paper uses (p, q) = (0, 0.5) for FCN and (0.85, 0.8) for the conv nets, and
    leaves the first convolution of ResNets unpruned (``skip_first_conv``).
    """
    names = G.prunable_names(model)
    out, seen_conv = {}, False
    for i, n in enumerate(names):
        module = G.module_of(model, n)
        if isinstance(module, nn.Linear):
            keep = ((1 + q) / 2) ** tau if i == len(names) - 1 else q ** tau
        else:
            if skip_first_conv and not seen_conv:
                seen_conv = True
                out[n] = 0.0
                continue
            seen_conv = True
            keep = p ** tau
        out[n] = 1.0 - keep
    return out


# ----------------------------------------------------------------------------- summaries
def density(masks: Masks) -> pd.DataFrame:
    """One row per layer: layer, numel, kept, density; plus a final ``total`` row."""
    rows = [{"layer": n, "numel": m.numel(), "kept": int(m.sum())} for n, m in masks.items()]
    rows.append({"layer": "total", "numel": sum(r["numel"] for r in rows),
                 "kept": sum(r["kept"] for r in rows)})
    df = pd.DataFrame(rows)
    df["density"] = df["kept"] / df["numel"].clip(lower=1)
    return df


def sparsity(masks: Masks) -> float:
    """Total fraction of masked-out entries."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / max(total, 1)


# ----------------------------------------------------------------------------- ablations
def shuffle(masks: Masks, seed: int = 0) -> Masks:
    """Each layer's mask randomly permuted: same per-layer density, random positions
    (Frankle et al. 2021, *Missing the mark*, 'shuffle within layer')."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        flat = m.flatten()
        out[n] = flat[torch.randperm(flat.numel(), generator=gen)].view_as(m)
    return out


def invert(scores: Scores) -> Scores:
    """Scores negated: the weights a criterion would keep are pruned first (*Missing the mark*)."""
    return {n: -s for n, s in scores.items()}


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int = 0, *, init: str | None = None) -> nn.Module:
    """A copy with every prunable layer re-drawn, masks kept (*Missing the mark*, Frankle et
    al. 2021, 'reinitialise').

    The weights come from the model's own initialiser: ``init`` (a name of
    :data:`prunelab.models.INITS`), by default the one :func:`prunelab.models.build` recorded on
    the model, with biases set to 0 as ``build`` does. A model not built by prunelab falls back
    to each layer's ``reset_parameters`` (PyTorch's default initialisation).
    """
    from prunelab import models

    scheme = init if init is not None else getattr(model, models.INIT_ATTRIBUTE, None)
    if scheme is not None and scheme not in models.INITS:
        raise ValueError(f"unknown init {scheme!r}; choose from {', '.join(models.INITS)}")
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for n in G.prunable_names(out):
            module = G.module_of(out, n)
            fresh = G.plain_copy(module) if parametrize.is_parametrized(module, "weight") \
                else module
            if scheme is None:
                fresh.reset_parameters()
            else:
                models.init_weight_(fresh.weight, scheme)
                if getattr(fresh, "bias", None) is not None:
                    fresh.bias.zero_()
            if fresh is not module:
                module.parametrizations["weight"].original.copy_(fresh.weight)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(fresh.bias)
    return out


# ----------------------------------------------------------------------------- masks on models
class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; the mask is a bool buffer updated in place."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def _attached(module: nn.Module) -> WeightMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, WeightMask)), None)


def _check_masks(model: nn.Module, masks: Masks) -> None:
    names = set(G.prunable_names(model))
    unknown = set(masks) - names
    if unknown:
        raise ValueError(f"masks name unknown layers {sorted(unknown)}; prunable weights: "
                         f"{sorted(names)}")
    for n, m in masks.items():
        w = G.weight(model, n)
        if m.shape != w.shape:
            raise ValueError(f"mask of {n} has shape {tuple(m.shape)}, weight has {tuple(w.shape)}")
        if m.dtype != torch.bool:
            raise ValueError(f"mask of {n} must be a bool tensor, got {m.dtype}")


def apply(model: nn.Module, masks: Masks, *, inplace: bool = False) -> nn.Module:
    """``model`` with ``masks`` attached (a copy unless ``inplace``); existing masks are replaced.

    Parameters keep their identity when ``inplace``, so an existing optimiser keeps working.
    """
    _check_masks(model, masks)
    target = model if inplace else copy.deepcopy(model)
    for n, m in masks.items():
        module = G.module_of(target, n)
        wm = _attached(module)
        if wm is not None:
            wm.mask.copy_(m)
        else:
            parametrize.register_parametrization(module, "weight",
                                                 WeightMask(m.to(module.weight.device)))
    return target


def current(model: nn.Module) -> Masks:
    """The masks attached to ``model`` (copies), keyed by weight name."""
    out = {}
    for n in G.prunable_names(model):
        wm = _attached(G.module_of(model, n))
        if wm is not None:
            out[n] = wm.mask.clone()
    return out


def remove(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Make pruning permanent: weights become ``w * mask`` and the parametrizations go."""
    from prunelab._parametrize import strip

    target = model if inplace else copy.deepcopy(model)
    for n in current(target):
        strip(G.module_of(target, n))  # never remove_parametrizations: copies share its class
    return target


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Plain-keyed state dict (``fc.weight``) of the *unmasked* originals; masks left out."""
    out = {}
    for key, value in model.state_dict().items():
        head, sep, tail = key.partition("parametrizations.")
        if not sep:
            out[key] = value
        elif tail.endswith(".original"):
            out[head + tail[: -len(".original")]] = value
    return out


@torch.no_grad()
def load_dense(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load a plain state dict into ``model`` in place, also where masks are attached."""
    for key, value in state.items():
        module_name, tensor_name = G.split_name(key)
        module = model.get_submodule(module_name)
        if parametrize.is_parametrized(module, tensor_name):
            module.parametrizations[tensor_name].original.copy_(value)
        else:
            getattr(module, tensor_name).copy_(value)
    return model


def to_torch_prune(model: nn.Module, masks: Masks | None = None) -> nn.Module:
    """A copy pruned with ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``)."""
    masks = current(model) if masks is None else masks
    out = remove(model)
    _check_masks(out, masks)
    for n, m in masks.items():
        torch.nn.utils.prune.custom_from_mask(G.module_of(out, n), "weight", m)
    return out


def from_torch_prune(model: nn.Module) -> Masks:
    """The masks of a model pruned with ``torch.nn.utils.prune`` (its ``weight_mask`` buffers)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, G.PRUNABLE_TYPES) and hasattr(module, "weight_mask"):
            out[f"{name}.weight" if name else "weight"] = module.weight_mask.detach().bool().clone()
    return out


def save(masks: Masks, path: str | Path) -> None:
    """Write masks to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({n: m.to(torch.bool).contiguous().cpu() for n, m in masks.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path) -> Masks:
    """Masks from a safetensors file written by :func:`save`."""
    from safetensors.torch import load_file

    masks = load_file(str(path))
    bad = [n for n, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise ValueError(f"{path} is not a mask file: {bad} are not bool tensors")
    return masks
