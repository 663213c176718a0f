"""prunelab: pruning research behind Jupyter notebooks.

Submodules load lazily (``pl.data``, ``pl.models`` ...), so ``import prunelab`` stays fast and a
plotting notebook never loads what it does not use. ``pl.score`` and ``pl.prune`` are the two
verbs of the engine.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "paths", "store", "executors", "results", "download", "data_readers", "batches", "data",
    "models", "train", "metrics", "zoo", "graph", "semistructured", "selection", "criteria",
    "masks", "config", "pruning", "depgraph", "surgery", "explore", "units", "mrp", "structured",
    "metapruning", "connectivity", "landscape", "curves", "collapse", "lottery", "at_init",
    "compression", "experiments", "views", "plots", "figures", "widgets",
)
_FUNCTIONS = {"score": ("criteria", "score"), "prune": ("pruning", "prune")}


def __getattr__(name: str):
    if name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'prunelab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES, *_FUNCTIONS])
