"""Masks on models: attach, read, remove, save, convert, summarise.

Masks are plain data: ``dict[name, bool Tensor]`` (True = kept), keyed by the prunable weight names
of :mod:`prunelab.graph`. Choosing them from scores is :mod:`prunelab.selection` (exact counts,
ties by index, pruned stays pruned); its public names (:func:`select`, :class:`Ranking`,
:func:`schedule`, :func:`check_sparsity`, :func:`check_scope`, :func:`n_pruned`,
:func:`lap_layer_sparsity`, :data:`SCOPES`) are re-exported here, so ``pl.masks.select`` keeps
working.

Masks are attached to a model with ``torch.nn.utils.parametrize`` (a :class:`WeightMask` holding a
bool buffer, as ``torch.ao.pruning`` does): the optimiser keeps updating the original parameter but
the forward pass always sees ``original * mask``, so pruned weights stay exactly zero through any
training loop, and ``copy.deepcopy`` and ``state_dict`` work. Checkpoints are a plain state dict
plus the masks (safetensors), never a pickled parametrized module.
"""
from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunelab import graph as G
from prunelab.selection import (SCOPES, Ranking, check_prunable, check_scope,  # noqa: F401
                                check_sparsity, lap_layer_sparsity, n_pruned, schedule, select)

__all__ = ["density", "sparsity", "apply", "current", "remove", "shuffle", "invert", "reinitialize",
           "WeightMask", "dense_state_dict", "load_dense", "to_torch_prune", "from_torch_prune",
           "save", "load", "SCOPES"]


def __dir__():
    return sorted(__all__)


Masks = G.Masks
Scores = G.Scores


# ----------------------------------------------------------------------------- summaries
def density(masks: Masks) -> pd.DataFrame:
    """One row per layer: layer, numel, kept, density; plus a final ``total`` row."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict weight name -> bool tensor, got "
                        f"{type(masks).__name__}")
    rows = [{"layer": n, "numel": m.numel(), "kept": int(m.sum())} for n, m in masks.items()]
    rows.append({"layer": "total", "numel": sum(r["numel"] for r in rows),
                 "kept": sum(r["kept"] for r in rows)})
    df = pd.DataFrame(rows)
    df["density"] = df["kept"] / df["numel"].clip(lower=1)
    return df


def sparsity(masks: Masks) -> float:
    """Total fraction of masked-out entries."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
    return 1.0 - kept / max(total, 1)


# ----------------------------------------------------------------------------- ablations
def shuffle(masks: Masks, seed: int = 0) -> Masks:
    """Each layer's mask randomly permuted: same per-layer density, random positions
    (Frankle et al. 2021, *Missing the mark*, 'shuffle within layer')."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in masks.items():
        flat = m.flatten()
        perm = torch.randperm(flat.numel(), generator=gen).to(flat.device)  # CPU generator
        out[n] = flat[perm].view_as(m)
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
            module, tname = G.module_of(out, n), G.split_name(n)[1]
            fresh = G.plain_copy(module) if parametrize.is_parametrized(module, tname) \
                else module
            if scheme is None:
                # nn.MultiheadAttention names its reset _reset_parameters
                reset = getattr(fresh, "reset_parameters", None) or getattr(
                    fresh, "_reset_parameters", None)
                if reset is None:
                    raise ValueError(f"reinitialize: {n} ({type(module).__name__}) has no "
                                     f"reset_parameters; pass init= one of {models.INITS}")
                reset()
            else:
                models.init_weight_(getattr(fresh, tname), scheme)
                if tname == "weight" and getattr(fresh, "bias", None) is not None:
                    fresh.bias.zero_()
            if fresh is not module:
                module.parametrizations[tname].original.copy_(getattr(fresh, tname))
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


def _attached(module: nn.Module, tname: str = "weight") -> WeightMask | None:
    if not parametrize.is_parametrized(module, tname):
        return None
    return next((p for p in module.parametrizations[tname] if isinstance(p, WeightMask)), None)


def _check_masks(model: nn.Module, masks: Masks, what: str = "masks") -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what} must be a dict weight name -> bool tensor (True = kept), got "
                        f"{type(masks).__name__}")
    names = {c.name for c in G.candidates(model)}  # any kind: masks of a prunable= run too
    unknown = set(masks) - names
    if unknown:
        raise ValueError(f"{what} name unknown layers {sorted(map(str, unknown))}; prunable "
                         f"weights: {sorted(names)}")
    for n, m in masks.items():
        w = G.weight(model, n)
        if not isinstance(m, Tensor):
            raise TypeError(f"{what}[{n!r}] must be a bool tensor, got {type(m).__name__}")
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
        module, tname = G.module_of(target, n), G.split_name(n)[1]
        wm = _attached(module, tname)
        if wm is not None:
            wm.mask.copy_(m)
        else:
            parametrize.register_parametrization(
                module, tname, WeightMask(m.to(getattr(module, tname).device)))
    return target


def current(model: nn.Module) -> Masks:
    """The masks attached to ``model`` (copies), keyed by weight name."""
    out = {}
    for c in G.candidates(model):
        n = c.name
        wm = _attached(model.get_submodule(c.module), c.tensor)
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
    import torch.nn.utils.prune as torch_prune  # a submodule: not loaded by ``import torch``

    masks = current(model) if masks is None else masks
    out = remove(model)
    _check_masks(out, masks)
    for n, m in masks.items():
        torch_prune.custom_from_mask(G.module_of(out, n), G.split_name(n)[1], m)
    return out


def _torch_prune_hooks(model: nn.Module) -> list[tuple[str, nn.Module, int, object]]:
    """``(module name, module, hook id, pruning method)`` of every ``torch.nn.utils.prune``
    reparametrization on ``model``."""
    import sys

    tp = sys.modules.get("torch.nn.utils.prune")
    if tp is None:  # nobody imported it: no model can carry its hooks
        return []
    return [(name, module, k, hook) for name, module in model.named_modules()
            for k, hook in module._forward_pre_hooks.items()
            if isinstance(hook, tp.BasePruningMethod)]


def has_torch_prune(model: nn.Module) -> bool:
    """True when ``model`` carries ``torch.nn.utils.prune`` reparametrizations."""
    return bool(_torch_prune_hooks(model))


@torch.no_grad()
def import_torch_prune(model: nn.Module) -> nn.Module:
    """``model`` with its ``torch.nn.utils.prune`` masks as prunelab masks.

    A model pruned with ``torch.nn.utils.prune`` holds ``weight`` as a non-leaf tensor
    recomputed by a forward pre-hook from ``weight_orig * weight_mask``, which
    ``copy.deepcopy`` refuses. This returns a copy in which each such weight is an ordinary
    parameter again (the dense original ``weight_orig``) with the mask attached as prunelab's
    :class:`WeightMask` parametrization, so it computes exactly what ``model`` computes and every
    prunelab function takes it (its masks are :func:`current`). A model without such hooks is
    returned as it is. ``model`` is never changed.

    Raises:
        ValueError: a torch pruning mask on a tensor prunelab does not prune (a bias, a norm).
    """
    hooks = _torch_prune_hooks(model)
    if not hooks:
        return model
    memo = {}
    for _, module, _, hook in hooks:
        name = hook._tensor_name
        # the recomputed tensor is not a leaf: give deepcopy a detached stand-in
        memo[id(getattr(module, name))] = getattr(module, name).detach().clone()
    out = copy.deepcopy(model, memo)
    maskable = {c.name for c in G.candidates(model)}
    masks = {}
    for mname, _, key, hook in hooks:
        module = out.get_submodule(mname)
        tname = hook._tensor_name
        full = f"{mname}.{tname}" if mname else tname
        if full not in maskable:
            raise ValueError(f"import_torch_prune: {full} carries a torch.nn.utils.prune mask, "
                             f"but prunelab prunes only the tensors of {list(G.KINDS)} layers; "
                             "call torch.nn.utils.prune.remove on it first")
        del module._forward_pre_hooks[key]
        orig = getattr(module, f"{tname}_orig")
        mask = getattr(module, f"{tname}_mask").detach().clone().to(torch.bool)
        delattr(module, tname)
        del module._parameters[f"{tname}_orig"]
        del module._buffers[f"{tname}_mask"]
        module.register_parameter(tname, nn.Parameter(orig.detach().clone(),
                                                      requires_grad=orig.requires_grad))
        masks[full] = mask
    return apply(out, masks, inplace=True)


def from_torch_prune(model: nn.Module) -> Masks:
    """The masks of a model pruned with ``torch.nn.utils.prune`` (its ``weight_mask`` buffers)."""
    out = {}
    for c in G.candidates(model):
        buf = model.get_submodule(c.module)._buffers.get(f"{c.tensor}_mask")
        if buf is not None:
            out[c.name] = buf.detach().bool().clone()
    return out


def save(masks: Masks, path: str | Path) -> None:
    """Write masks to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict weight name -> bool tensor, got "
                        f"{type(masks).__name__}")
    for n, m in masks.items():
        if not isinstance(n, str) or not isinstance(m, Tensor):
            raise TypeError(f"masks must map str names to tensors, got {n!r}: "
                            f"{type(m).__name__}")
        if m.dtype != torch.bool:
            raise ValueError(f"mask of {n} must be a bool tensor, got {m.dtype}")

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
    """Masks from a safetensors file written by :func:`save`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file of bool tensors (naming the file).
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no mask file {str(path)!r}")
    try:
        masks = load_file(str(path))
    except Exception as err:  # SafetensorError and OSError-like errors of a corrupt file
        raise ValueError(f"{str(path)!r} is not a safetensors mask file written by "
                         f"prunelab.masks.save: {err}") from err
    bad = [n for n, m in masks.items() if m.dtype != torch.bool]
    if bad:
        raise ValueError(f"{path} is not a mask file: {bad} are not bool tensors")
    return masks
