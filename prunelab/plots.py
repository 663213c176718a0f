"""Interactive plotly views of tidy result frames. Frames in, ``go.Figure`` out; never shown.

Torch-free: a plotting notebook never loads a model.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

CONFIG_COLUMNS = ("arch", "dataset", "seed", "criterion", "sparsity", "stages", "lam",
                  "schedule", "scope")


def _go():
    import plotly.graph_objects as go

    return go


def _aggregate(frame: pd.DataFrame, x: str, y: str, group: str) -> pd.DataFrame:
    """mean ± std of ``y`` per (group, x); std is 0 for a single seed."""
    agg = frame.groupby([group, x], sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    return agg


def accuracy_vs_density(frame: pd.DataFrame, *, x: str = "density", y: str = "accuracy",
                        color: str = "criterion", title: str | None = None):
    """Accuracy vs fraction of weights remaining, log-x, mean ± std over seeds (LAP Fig. 3).

    Args:
        frame: tidy rows with columns ``x``, ``y`` and ``color`` (and optionally ``seed``).
        x: fraction remaining column (log axis).
        y: metric column.
        color: one line per value of this column.
        title: figure title.
    """
    go = _go()
    for col in (x, y, color):
        if col not in frame.columns:
            raise ValueError(f"frame has no column {col!r}; columns: {list(frame.columns)}")
    agg = _aggregate(frame, x, y, color)
    fig = go.Figure()
    for name, part in agg.groupby(color, sort=False):
        fig.add_trace(go.Scatter(
            x=part[x], y=part["mean"], name=str(name), mode="lines+markers",
            error_y=dict(type="data", array=part["std"], visible=bool((part["std"] > 0).any())),
            customdata=part[["count"]].to_numpy(),
            hovertemplate=(f"{color}={name}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4f}}"
                           "<br>runs=%{customdata[0]}<extra></extra>")))
    fig.update_xaxes(type="log", title="fraction of weights remaining", autorange="reversed")
    fig.update_yaxes(title=y.replace("_", " "))
    fig.update_layout(title=title or f"{y} vs fraction of weights remaining",
                      template="plotly_white", legend_title=color)
    return fig


def hover_columns(frame: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """The configuration columns present in ``frame`` (for hover text)."""
    return [c for c in (*CONFIG_COLUMNS, *extra) if c in frame.columns]
