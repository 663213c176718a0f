"""How prunelab holds a mask on a model by default: pruned entries zero, their gradients zeroed.

A masked tensor (any parameter, keyed by its module and its name, e.g. ``fc.weight`` or
``attn.in_proj_weight``) keeps its identity; :func:`attach` sets its pruned entries to exactly 0
and registers on the module

- a buffer ``<name>_prunelab_mask``: 1 where kept, 0 where pruned, in the tensor's dtype (a
  float multiply is one vectorised pass; a bool mask costs ~7x more on the CPU because of the
  cast) and not persistent, so ``state_dict()`` stays a plain state dict;
- a ``Tensor.register_post_accumulate_grad_hook`` on the parameter that multiplies its
  accumulated ``.grad`` by the mask in place. With zero weights and zero gradients SGD (momentum,
  Nesterov, weight decay), Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam and RAdam all leave the
  pruned entries exactly zero, so training code needs no knowledge of masks;
- a forward pre-hook that re-registers that gradient hook when the parameter object changed
  (``copy.deepcopy`` and pickling do not copy tensor hooks; ``load_state_dict(assign=True)`` or
  a frozen parameter unfrozen later), an identity check per forward;
- a ``load_state_dict`` post-hook that re-zeroes the pruned entries, so loading dense weights
  into a masked model keeps it pruned.

Not covered (documented in :mod:`prunelab.masks`): a manual in-place write into a pruned entry
(``w.copy_(...)``) stays until the next :func:`rezero`; gradients that reach ``.grad`` without a
backward pass (assigned by hand), and optimiser state (momentum) that existed before the mask
was attached with ``inplace=True``.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

SUFFIX = "_prunelab_mask"


def buffer_name(tensor_name: str) -> str:
    """The name of the mask buffer of ``tensor_name`` on its module."""
    return tensor_name + SUFFIX


class GradMask:
    """Post-accumulate-grad hook: ``param.grad *= mask`` in place (mask read from the module, so
    it follows ``.to()`` and in-place mask updates)."""

    __slots__ = ("module", "buffer")

    def __init__(self, module: nn.Module, buffer: str):
        self.module = weakref.ref(module)
        self.buffer = buffer

    def __call__(self, param: Tensor) -> None:
        module = self.module()
        mask = None if module is None else module._buffers.get(self.buffer)
        if mask is not None and param.grad is not None:
            param.grad.mul_(mask)


class Holder:
    """Forward pre-hook keeping a :class:`GradMask` on the module's current parameter ``name``.

    Copies (``copy.deepcopy``, pickle) hold no hook handle: tensor hooks are not copied, so the
    copy's first forward registers a fresh one. ``torch.utils.swap_tensors`` (``Module.to`` in
    swap mode) keeps the Python hook dict but drops its C++ side: a changed ``_cdata`` rewires
    it. No weak reference to the parameter is kept (``swap_tensors`` refuses those).
    """

    def __init__(self, name: str):
        self.name = name
        self.buffer = buffer_name(name)
        self._handle = None
        self._cdata = self._hooks = None  # the tensor and hook dict the hook was wired to

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.__init__(state["name"])

    def __call__(self, module: nn.Module, args) -> None:
        param = module._parameters.get(self.name)
        # fast path (every forward): the same tensor and the same hook dict (held here, so its
        # id cannot be reused) as when the hook was wired
        if param is not None and (param._cdata != self._cdata
                                  or param._post_accumulate_grad_hooks is not self._hooks):
            self.hook(module, param)

    def hooked(self, module: nn.Module, param: Tensor) -> bool:
        """True when ``param``'s hook dict holds this module's :class:`GradMask` for ``name``."""
        hooks = getattr(param, "_post_accumulate_grad_hooks", None)
        return bool(hooks) and any(type(h) is GradMask and h.buffer == self.buffer
                                   and h.module() is module for h in hooks.values())

    def hook(self, module: nn.Module, param: Tensor) -> None:
        """Put the gradient hook on ``param`` (a leaf Parameter that requires grad)."""
        if not (isinstance(param, nn.Parameter) and param.requires_grad and param.is_leaf):
            return  # frozen (checked again next forward) or a functional stand-in
        if self.hooked(module, param):  # swapped tensor: re-assigning the dict rewires it
            param._post_accumulate_grad_hooks = param._post_accumulate_grad_hooks
        else:
            self.release()
            self._handle = param.register_post_accumulate_grad_hook(
                GradMask(module, self.buffer))
        self._cdata, self._hooks = param._cdata, param._post_accumulate_grad_hooks

    def release(self) -> None:
        """Remove the gradient hook this holder registered (if its parameter still exists)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._cdata = self._hooks = None


class Rezero:
    """``load_state_dict`` post-hook: pruned entries of ``name`` back to exactly zero."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        rezero(module, self.name)


def mask(module: nn.Module, name: str) -> Tensor | None:
    """The mask buffer of ``name`` on ``module`` (1 = kept, in the tensor's dtype), or None."""
    return module._buffers.get(buffer_name(name))


def names(module: nn.Module) -> list[str]:
    """Names of the tensors of ``module`` (not its children) masked by this mechanism."""
    return [k[: -len(SUFFIX)] for k in module._buffers if k.endswith(SUFFIX)]


def _holder(module: nn.Module, name: str) -> Holder | None:
    return next((h for h in module._forward_pre_hooks.values()
                 if isinstance(h, Holder) and h.name == name), None)


def foreign_forward_hooks(module: nn.Module) -> bool:
    """True when ``module`` has forward (pre-)hooks other than mask holders, which change
    nothing that flows."""
    return bool(module._forward_hooks) or any(not isinstance(h, Holder)
                                              for h in module._forward_pre_hooks.values())


def is_masked(model: nn.Module) -> bool:
    """True when any submodule of ``model`` holds a mask of this mechanism."""
    return any(k.endswith(SUFFIX) for m in model.modules() for k in m._buffers)


@torch.no_grad()
def rezero(module: nn.Module, name: str) -> None:
    """Set the pruned entries of ``module.<name>`` to exactly 0 (``masked_fill``, so a NaN or
    inf there becomes 0 too)."""
    keep = mask(module, name)
    tensor = getattr(module, name, None)
    if keep is not None and tensor is not None:
        tensor.masked_fill_(keep.to(tensor.device) == 0, 0)


@torch.no_grad()
def attach(module: nn.Module, name: str, keep: Tensor) -> None:
    """Hold the bool mask ``keep`` (True = kept) on ``module.<name>``; replaces an existing one.

    The parameter keeps its identity (an existing optimiser keeps working); its pruned entries
    become 0 now and their gradients 0 after every backward pass.
    """
    tensor = module._parameters.get(name)
    if tensor is None:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to mask")
    values = keep.to(device=tensor.device, dtype=tensor.dtype)
    holder = _holder(module, name)
    if holder is None:
        detach(module, name)  # a stray buffer of the same name: start clean
        module.register_buffer(buffer_name(name), values, persistent=False)
        holder = Holder(name)
        module.register_forward_pre_hook(holder)
        module.register_load_state_dict_post_hook(Rezero(name))
    else:
        mask(module, name).copy_(values)
    rezero(module, name)
    holder(module, ())


def detach(module: nn.Module, name: str) -> None:
    """Remove the mask of ``module.<name>`` (buffer and hooks); the tensor keeps its values."""
    for k, h in list(module._forward_pre_hooks.items()):
        if isinstance(h, Holder) and h.name == name:
            h.release()
            del module._forward_pre_hooks[k]
    for k, h in list(module._load_state_dict_post_hooks.items()):
        if isinstance(h, Rezero) and h.name == name:
            del module._load_state_dict_post_hooks[k]
    module._buffers.pop(buffer_name(name), None)


def detach_all(model: nn.Module) -> nn.Module:
    """:func:`detach` every mask of this mechanism in ``model``, in place; returns ``model``."""
    for module in model.modules():
        for name in names(module):
            detach(module, name)
    return model
