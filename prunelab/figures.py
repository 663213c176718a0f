"""Static paper figures (seaborn/matplotlib) and the only writer to ``figures/``.

Axes-level functions take a tidy frame and an optional ``ax`` and return the ``Axes``;
:func:`save` writes PDF and PNG with settings that make the files byte-identical across runs.
Torch-free.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from prunelab import paths

_RC = {"svg.hashsalt": "prunelab", "svg.fonttype": "none", "pdf.fonttype": 42,
       "figure.dpi": 100, "savefig.bbox": "tight"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_RC)
    return plt


def new_axes(width: float = 5.0, height: float = 3.5):
    """A fresh (figure, axes) pair in the paper style."""
    plt = _plt()
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", rc=_RC)
    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax


def accuracy_vs_density(frame: pd.DataFrame, *, x: str = "density", y: str = "accuracy",
                        hue: str = "criterion", ax=None):
    """Accuracy vs fraction remaining, log-x (reversed), mean ± std band over seeds (LAP Fig. 3)."""
    import seaborn as sns

    if ax is None:
        _, ax = new_axes()
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", errorbar="sd", ax=ax)
    ax.set_xscale("log")
    ticks = sorted(frame[x].dropna().unique())
    if 0 < len(ticks) <= 12:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("fraction of weights remaining")
    ax.set_ylabel(y.replace("_", " "))
    return ax


def save(fig_or_ax, name: str, *, folder: str | Path | None = None,
         formats: Sequence[str] = ("pdf", "png")) -> list[Path]:
    """Write a matplotlib figure (or an Axes' figure) as ``figures/NAME.{pdf,png}``.

    Returns:
        The paths written.
    """
    plt = _plt()
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    out_dir = Path(folder) if folder is not None else paths.FIGURES
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {"pdf": {"CreationDate": None, "ModDate": None}, "png": {"Software": None},
            "svg": {"Date": None}}
    for fmt in formats:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=150, metadata=meta.get(fmt))
        written.append(path)
    plt.close(fig)
    return written
