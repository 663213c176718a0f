"""Experiments: drive the whole pipeline and return tidy frames (sweeps come with issue 4)."""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from prunelab import masks as M
from prunelab.pruning import prune
from prunelab.train import evaluate


def accuracy_curve(model: nn.Module, bundle, *, criteria: Sequence[str] = ("mp",),
                   sparsities: Iterable[float] = (0.5, 0.8, 0.9, 0.95, 0.98),
                   scope: str = "global", stages: int = 1, batch_size: int = 1000,
                   split: str = "test", seed: int = 0, **prune_options) -> pd.DataFrame:
    """Accuracy of ``model`` pruned one-shot (or in ``stages``) at each sparsity, no fine-tuning.

    Returns:
        One row per (criterion, sparsity): criterion, sparsity (actual), density, accuracy,
        loss, error, split, seconds; plus the dense model as sparsity 0 for each criterion.
    """
    data = bundle.split(split)
    x, y = bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=seed)
    dense = evaluate(model, data)
    rows = []
    for crit in criteria:
        rows.append({"criterion": crit, "sparsity": 0.0, "density": 1.0, **dense,
                     "split": split, "seconds": 0.0})
        for s in sparsities:
            t0 = time.perf_counter()
            r = prune(model, crit, sparsity=s, scope=scope, stages=stages, batch=(x, y),
                      seed=seed, **prune_options)
            ev = evaluate(r.model, data)
            actual = M.sparsity(r.masks)
            rows.append({"criterion": crit, "sparsity": actual, "density": 1.0 - actual, **ev,
                         "split": split, "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows)
