"""Removing parametrizations without breaking copies of the same module.

``torch.nn.utils.parametrize.remove_parametrizations`` deletes the property from the module's
dynamically created class, and ``copy.deepcopy`` shares that class between the original and the
copy: removing the masks of a copy would break the original (its ``.weight`` disappears). This
helper only touches the instance.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


@torch.no_grad()
def strip(module: nn.Module) -> None:
    """Replace each parametrized tensor of ``module`` (not its children) by a plain Parameter
    holding its current (e.g. masked) value; works in place on this instance only.

    Where the value has the original's shape and dtype the original Parameter object is reused
    (so an optimiser holding it keeps working)."""
    if not parametrize.is_parametrized(module):
        return
    values = {}
    for name, plist in module.parametrizations.items():
        values[name] = (getattr(module, name).detach().clone(), plist.original)
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]
    for name, (value, original) in values.items():
        if isinstance(original, nn.Parameter) and original.shape == value.shape \
                and original.dtype == value.dtype:
            original.copy_(value)
            module.register_parameter(name, original)
        else:
            module.register_parameter(name, nn.Parameter(value,
                                                         requires_grad=original.requires_grad))


def strip_all(model: nn.Module) -> nn.Module:
    """:func:`strip` every submodule of ``model`` in place; returns ``model``."""
    for module in list(model.modules()):
        strip(module)
    return model
