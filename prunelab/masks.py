"""Masks on models: attach, read, remove, save, convert, summarise.

Masks are plain data: ``dict[name, bool Tensor]`` (True = kept), keyed by the prunable weight names
of :mod:`prunelab.graph`. Choosing them from scores is :mod:`prunelab.selection` (exact counts,
ties by index, pruned stays pruned); its public names (:func:`select`, :class:`Ranking`,
:func:`schedule`, :func:`check_sparsity`, :func:`check_scope`, :func:`n_pruned`,
:func:`lap_layer_sparsity`, :data:`SCOPES`) are re-exported here, so ``pl.masks.select`` keeps
working.

How :func:`apply` holds masks on a model (``mechanism=``, :data:`MECHANISMS`):

- ``"hooks"`` (default; ``prunelab/_masking.py``): the pruned weights are set to exactly 0 and a
  ``post_accumulate_grad`` hook multiplies each masked parameter's gradient by a mask buffer on
  its module (1 = kept, in the weight's dtype, not in ``state_dict``). With zero weights and zero
  gradients SGD (momentum, Nesterov, weight decay), Adam, AdamW, RMSprop, Adagrad leave them
  exactly 0, so training code is unaware of masks, and a fine-tuning step costs one multiply
  more than unmasked (~1.03-1.04x on the CPU, DESIGN budget 1.05x; parametrize ~1.24-1.3x). Parameter names stay
  plain (``fc.weight``) and keep their identity; ``copy.deepcopy``, pickling and ``.to()`` keep
  the masks (a forward pre-hook re-wires the gradient hook on a copied parameter);
  ``load_state_dict`` of dense weights keeps the model pruned (a load post-hook re-zeroes).
  What it does *not* catch: a manual in-place write into a pruned weight (``w.copy_(...)``;
  use :func:`write_weight` / :func:`load_dense`, or re-:func:`apply`), a gradient assigned to
  ``.grad`` by hand, and optimiser momentum that predates ``apply(..., inplace=True)``
  (create the optimiser after pruning). Pruning is destructive: the dense values are gone.
- ``"parametrize"``: ``torch.nn.utils.parametrize`` with a :class:`WeightMask` holding a bool
  buffer, as ``torch.ao.pruning`` does: the optimiser updates ``parametrizations.weight.original``
  and every forward computes ``original * mask`` (which also undoes manual writes). Kept as an
  explicit export (:func:`to_parametrize`), as is ``torch.nn.utils.prune``
  (:func:`to_torch_prune`, :func:`import_torch_prune`, :func:`from_torch_prune`).

Masks are keyed by tensor name (``module.tensor``), so any parameter of a module can be masked.
:func:`current`, :func:`remove`, :func:`load_dense`, :func:`prunelab.graph.plain_copy` and
:func:`prunelab.graph.is_masked` read both mechanisms. Checkpoints are a plain state dict plus
the masks (safetensors), never a pickled masked module.
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
from prunelab._masking import attach as hold, detach as unhold, mask as held_mask
from prunelab._masking import names as held_names, rezero
from prunelab.selection import (SCOPES, Ranking, check_prunable, check_scope,  # noqa: F401
                                check_sparsity, lap_layer_sparsity, n_pruned, schedule, select)

__all__ = ["density", "sparsity", "apply", "current", "remove", "shuffle", "invert", "reinitialize",
           "MECHANISMS", "mechanism", "to_parametrize", "WeightMask", "dense_state_dict",
           "load_dense", "write_weight", "to_torch_prune", "from_torch_prune", "save", "load",
           "SCOPES"]


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
            fresh = G.plain_copy(module) if G.is_masked(module) else module
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
            if fresh is not module:  # masked: the dense draw, pruned entries kept pruned
                write_weight(module, tname, getattr(fresh, tname))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(fresh.bias)
    return out


# ----------------------------------------------------------------------------- masks on models
#: How :func:`apply` holds masks: ``"hooks"`` (default: pruned weights zero, gradients zeroed by
#: a hook; ``prunelab/_masking.py``) or ``"parametrize"`` (``torch.nn.utils.parametrize``).
MECHANISMS = ("hooks", "parametrize")


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask``; the mask is a bool buffer updated in place."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def _weight_mask(module: nn.Module, tensor_name: str) -> WeightMask | None:
    """The :class:`WeightMask` parametrizing ``module.<tensor_name>``, or None."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    return next((p for p in module.parametrizations[tensor_name] if isinstance(p, WeightMask)),
                None)


def _attached(module: nn.Module) -> dict[str, tuple[str, Tensor]]:
    """``{tensor name: (mechanism, mask as stored)}`` of the masks on ``module`` itself."""
    out = {name: ("hooks", held_mask(module, name)) for name in held_names(module)}
    if parametrize.is_parametrized(module):
        for name in module.parametrizations:
            wm = _weight_mask(module, name)
            if wm is not None:
                out[name] = ("parametrize", wm.mask)
    return out


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


def apply(model: nn.Module, masks: Masks, *, inplace: bool = False,
          mechanism: str = "hooks") -> nn.Module:
    """``model`` with ``masks`` attached (a copy unless ``inplace``); existing masks are replaced.

    Args:
        mechanism: ``"hooks"`` (default): pruned weights are set to exactly 0 and their gradients
            are zeroed in place after every backward pass (a ``post_accumulate_grad`` hook and
            a float mask buffer on the module), so every standard optimiser leaves them 0 at the
            cost of one multiply per step; parameter names stay plain and ``state_dict()`` is a
            plain state dict. Destructive: the dense values of pruned weights are gone (keep
            the unpruned model for them). ``"parametrize"``: ``torch.nn.utils.parametrize``
            with a bool :class:`WeightMask`, as ``torch.ao.pruning`` does; the dense originals
            stay under ``parametrizations.<name>.original`` and every forward multiplies them
            by the mask (~1.2-1.3x a fine-tuning step on the CPU), which also undoes manual
            writes into pruned entries.

    Parameters keep their identity when ``inplace``, so an existing optimiser keeps working
    (its momentum at newly pruned entries is not cleared: create the optimiser after pruning).
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    _check_masks(model, masks)
    target = model if inplace else copy.deepcopy(model)
    for n, m in masks.items():
        module_name, tensor_name = G.split_name(n)
        module = target.get_submodule(module_name)
        held = _attached(module).get(tensor_name, (None, None))[0]
        if held is not None and held != mechanism:
            _detach(module, tensor_name)
        if mechanism == "hooks":
            hold(module, tensor_name, m)
        elif held == "parametrize":
            _weight_mask(module, tensor_name).mask.copy_(m)
        else:
            parametrize.register_parametrization(
                module, tensor_name, WeightMask(m.to(getattr(module, tensor_name).device)))
    return target


def to_parametrize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its masks held as ``torch.nn.utils.parametrize``
    parametrizations (:class:`WeightMask`), for code that expects that layout."""
    return apply(model, current(model), mechanism="parametrize")


@torch.no_grad()
def _detach(module: nn.Module, tensor_name: str) -> None:
    """Drop the mask of ``module.<tensor_name>`` (either mechanism); the tensor becomes its
    masked value (a parametrized one a plain Parameter again, the same object)."""
    from prunelab._parametrize import strip

    unhold(module, tensor_name)
    if not parametrize.is_parametrized(module, tensor_name):
        return
    # strip works per module: keep the other WeightMask tensors of this module masked
    others = {name: (module.parametrizations[name].original.detach().clone(), wm.mask.clone())
              for name in module.parametrizations if name != tensor_name
              for wm in [_weight_mask(module, name)] if wm is not None}
    strip(module)
    for name, (dense, mask) in others.items():
        getattr(module, name).copy_(dense)
        parametrize.register_parametrization(module, name, WeightMask(mask))


def current(model: nn.Module) -> Masks:
    """The masks attached to ``model`` (bool copies, True = kept), keyed by tensor name, in
    ``named_modules`` order; either mechanism."""
    out = {}
    for module_name, module in model.named_modules():
        for tensor_name, (_, mask) in _attached(module).items():
            key = f"{module_name}.{tensor_name}" if module_name else tensor_name
            out[key] = mask.to(torch.bool) if mask.dtype != torch.bool else mask.clone()
    return out


def mechanism(model: nn.Module) -> str | None:
    """``"hooks"``, ``"parametrize"`` or None: how the masks of ``model`` are held (ValueError
    when both are in use)."""
    kinds = {kind for module in model.modules() for kind, _ in _attached(module).values()}
    if len(kinds) > 1:
        raise ValueError(f"model mixes mask mechanisms {sorted(kinds)}; re-apply with one")
    return next(iter(kinds), None)


def remove(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Make pruning permanent: weights become ``w * mask`` and the masks (hooks or
    parametrizations) go; a plain model."""
    target = model if inplace else copy.deepcopy(model)
    for name in current(target):
        module_name, tensor_name = G.split_name(name)
        _detach(target.get_submodule(module_name), tensor_name)
    return target


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Plain-keyed state dict (``fc.weight``) without the masks.

    With the default ``"hooks"`` mechanism this is ``model.state_dict()`` (pruned entries are
    zero); with ``"parametrize"`` the keys of the *unmasked* originals are renamed to plain ones.
    """
    out = {}
    for key, value in model.state_dict().items():
        head, sep, tail = key.partition("parametrizations.")
        if not sep:
            out[key] = value
        elif tail.endswith(".original"):
            out[head + tail[: -len(".original")]] = value
    return out


@torch.no_grad()
def write_weight(module: nn.Module, tensor_name: str, value: Tensor) -> None:
    """Write ``value`` as the dense value of ``module.<tensor_name>``, masked or not.

    Parametrized: into ``original`` (the mask applies at the next forward). Hooks: into the
    parameter, then its pruned entries back to 0. Plain: into the tensor.
    """
    if parametrize.is_parametrized(module, tensor_name):
        module.parametrizations[tensor_name].original.copy_(value)
    else:
        getattr(module, tensor_name).copy_(value)
        rezero(module, tensor_name)


@torch.no_grad()
def load_dense(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load a plain state dict into ``model`` in place, also where masks are attached (masked
    entries stay pruned)."""
    for key, value in state.items():
        module_name, tensor_name = G.split_name(key)
        write_weight(model.get_submodule(module_name), tensor_name, value)
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
    parameter again (``weight_orig``) with the mask attached by :func:`apply` (default
    mechanism: pruned entries zero), so it computes exactly what ``model`` computes and every
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
