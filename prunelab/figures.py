"""Static paper figures (seaborn/matplotlib) and the only writer to ``figures/``.

Axes-level functions take a tidy frame and an optional ``ax`` and return the ``Axes``; the two
multi-panel paper figures (:func:`delta_loss_vs_lambda`, LM Fig. 1, and
:func:`stage_trajectories`, LM Fig. 2) take optional ``axes`` and return the ``Figure``.
The frames come from :mod:`prunelab.views` (shared with the plotly :mod:`prunelab.plots`): this
module only draws, in one style: every criterion has its display name and fixed colour,
legends list every group of every panel and sit outside the data, log axes get ticks that
read at every range, axis labels name the split and the unit. :func:`style` picks the font
sizes (``"paper"`` or ``"talk"``); :func:`save` writes 300 dpi PNG and PDF with embedded
TrueType fonts, byte-identical across runs. Torch-free: matplotlib, seaborn and
``prunelab.metrics`` are imported when a figure is drawn.

Over 500 lines because it holds one short matplotlib drawing function per paper figure (LM,
LAP, MRP, Tanaka, Frankle, Garipov), all in the one style; splitting them by paper would split
the style.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from prunelab import paths
from prunelab import views as V

__all__ = ["style", "current_style", "new_axes", "save", "is_fast", "DPI", "accuracy_vs_density",
           "delta_loss_vs_lambda", "stage_trajectories", "delta_loss_scatter",
           "performance_profile", "penalty_scatter", "penalty_over_training",
           "selection_consistency", "activation_histogram", "loss_plane", "instability",
           "collapse_curves", "layer_density_heatmap", "layer_density", "interpolation",
           "loss_landscape", "accuracy_vs_flops"]


def __dir__():
    return sorted(__all__)


#: Resolution of saved raster files (PNG).
DPI = 300
# pdf/ps.fonttype 42: TrueType fonts embedded (journals refuse Type 3); svg text kept as text.
_RC = {"svg.hashsalt": "prunelab", "svg.fonttype": "none", "pdf.fonttype": 42,
       "ps.fonttype": 42, "figure.dpi": 100, "savefig.dpi": DPI, "savefig.bbox": "tight"}
# Figure sizes grow with the fonts, so a talk figure has the layout of the paper one:
# seaborn's "talk" context scales fonts and lines by 1.5 / 0.8 of its "paper" context.
_SCALE = {"paper": 1.0, "talk": 1.5 / 0.8}
_current = ["paper"]


class style:
    """Set the figure style: ``"paper"`` (default; small fonts for a journal column) or
    ``"talk"`` (projector fonts, 1.875× larger, figures scaled alike).

    ``pl.figures.style("talk")`` sets it for the figures drawn next; ``with
    pl.figures.style("talk"): ...`` sets it for the block and restores the previous one.
    """

    def __init__(self, name: str = "paper"):
        if name not in _SCALE:
            raise ValueError(f"style must be one of {sorted(_SCALE)}, got {name!r}")
        self.name, self.previous = name, _current[0]
        _current[0] = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _current[0] = self.previous
        return False


def current_style() -> str:
    """The style figures are drawn in now (see :func:`style`)."""
    return _current[0]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_RC)
    return plt


def _theme():
    plt = _plt()
    import seaborn as sns

    sns.set_theme(style="whitegrid", context=_current[0], rc=_RC)
    return plt, _SCALE[_current[0]]


def new_axes(width: float = 5.0, height: float = 3.5):
    """A fresh (figure, axes) pair in the current style (sizes in inches for ``"paper"``)."""
    plt, k = _theme()
    fig, ax = plt.subplots(figsize=(width * k, height * k))
    return fig, ax


def _axes_row(n: int, width: float, height: float, *, sharey: bool = False):
    """A fresh figure with ``n`` axes side by side in the current style."""
    plt, k = _theme()
    fig, axes = plt.subplots(1, n, figsize=(width * k, height * k), sharey=sharey,
                             squeeze=False)
    return fig, list(axes[0])


def _outside_legend(ax, handles=None, labels=None, title: str | None = None):
    """The legend right of ``ax``, outside the data; None when there is nothing to list."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, title=title or None, frameon=False, loc="upper left",
                     bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                     title_fontsize="small")


def _readable_log(axis, max_ticks: int = 5) -> None:
    """Log-axis ticks from :func:`prunelab.views.log_ticks`, labelled by
    :func:`prunelab.views.tick_text`: no crowded or overlapping labels at any range."""
    from matplotlib.ticker import Formatter, Locator, NullFormatter

    class ReadableLogLocator(Locator):
        def __call__(self):
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin, vmax):
            return V.log_ticks(vmin, vmax, max_ticks)

    class ReadableLogFormatter(Formatter):
        ticks: Sequence[float] = ()

        def set_locs(self, locs):
            self.ticks = list(locs)

        def __call__(self, x, pos=None):
            return V.tick_text(x, self.ticks)

    axis.set_major_locator(ReadableLogLocator())
    axis.set_major_formatter(ReadableLogFormatter())
    axis.set_minor_formatter(NullFormatter())


def _labels(ax, xlabel: str | None = None, ylabel: str | None = None) -> None:
    """Axis labels, wrapped onto a second line where they are longer than their axis."""
    import textwrap

    fig_w, fig_h = ax.figure.get_size_inches()
    box = ax.get_position()
    for text, length, setter, label in ((xlabel, box.width * fig_w, ax.set_xlabel, ax.xaxis),
                                        (ylabel, box.height * fig_h, ax.set_ylabel, ax.yaxis)):
        if text is None:
            continue
        # ~0.55 em per character of the label font
        chars = max(16, int(length * 72 / (0.55 * label.label.get_size())))
        setter(textwrap.fill(text, chars) if len(text) > chars else text)


def _band(ax, x, mean, std, color, label, *, marker="o", linestyle="-"):
    ax.plot(x, mean, color=color, marker=marker, markersize=3, linewidth=1.3,
            linestyle=linestyle, label=label)
    std = np.asarray(std, dtype=float)
    if (std > 0).any():
        ax.fill_between(x, np.asarray(mean) - std, np.asarray(mean) + std, color=color,
                        alpha=0.18, linewidth=0)


def _chance(ax, frame: pd.DataFrame, y: str, chance) -> None:
    level = V.chance_level(frame, y, chance)
    if level is not None:
        ax.axhline(level, color="gray", linestyle=":", linewidth=1.0,
                   label=f"chance ({level:.3g})")


def accuracy_vs_density(frame: pd.DataFrame, *, x: str = "density", y: str = "accuracy",
                        hue: str = "criterion", chance=None, ax=None):
    """Accuracy vs fraction remaining, log-x (reversed), mean ± std band over seeds (LAP
    Fig. 3); ``chance``: a number, False, or None for 1 / num_classes from a ``num_classes``
    column (:func:`prunelab.views.chance_level`)."""
    V.require_columns(frame, [x, y, hue])
    if ax is None:
        _, ax = new_axes()
    agg = V.aggregate(frame, x, y, hue)
    colors = V.palette(list(pd.unique(agg[hue])))
    for name, part in agg.groupby(hue, sort=False):
        _band(ax, part[x], part["mean"], part["std"], colors[name], V.display_name(name))
    _chance(ax, frame, y, chance)
    ax.set_xscale("log")
    ticks = sorted(frame[x].dropna().unique())
    if 0 < len(ticks) <= 8 and all(b / a >= 1.5 for a, b in zip(ticks, ticks[1:])):
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.3g}" for t in ticks])
    else:
        _readable_log(ax.xaxis)
    ax.invert_xaxis()
    _labels(ax, V.axis_label(x, frame))
    _labels(ax, None, V.axis_label(y, frame))
    _outside_legend(ax, title=hue)
    return ax


# ----------------------------------------------------------------------------- LM paper Fig. 1
def delta_loss_vs_lambda(frame: pd.DataFrame, *, criterion_col: str = "criterion",
                         x: str = "lam", y: str = "delta_loss", line: str = "stages",
                         dash: str | None = None, reference: str | None = "mp",
                         zero_decades: float = 1.0, axes=None):
    """ΔL vs λ, one axes per criterion, one line per π, MP dashed black (LM paper Fig. 1).

    Mean over seeds with ± std error bars; log-log axes, y shared. λ = 0 is drawn
    ``zero_decades`` decades left of the smallest positive λ with its tick labelled "0".
    The ``reference`` criterion (MP, invariant to λ and π) is the mean ΔL of all its runs,
    drawn as a dashed black horizontal line in every axes. One legend, right of the last axes,
    lists every line of every panel (:func:`prunelab.views.lambda_view`).

    Args:
        frame: one row per run (one sparsity, schedule and architecture).
        criterion_col: one axes per value (the reference excepted).
        x: the λ column; y: the measurement; line: one line per value (π).
        dash: optional second grouping drawn with line styles (e.g. ``"schedule"``).
        reference: criterion drawn as the dashed reference, or None.
        zero_decades: how far left of the smallest positive λ the λ = 0 points sit.
        axes: one Axes per criterion to draw on (default: a new row of axes).

    Returns:
        The matplotlib Figure (several axes, so not an Axes: this is the one figure-level
        function besides :func:`stage_trajectories`).
    """
    view = V.lambda_view(frame, criterion_col=criterion_col, x=x, y=y, line=line, dash=dash,
                         reference=reference, zero_decades=zero_decades, max_ticks=5)
    n = len(view.criteria)
    if axes is None:
        fig, axes = _axes_row(n, 2.6 * n + 0.6, 2.6, sharey=True)
    elif len(axes) != n:
        raise ValueError(f"need {n} axes (one per criterion), got {len(axes)}")
    fig = axes[0].figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    colors = V.palette(view.line_levels)
    styles = dict(zip(view.dash_levels, ("-", ":", "-.", "--", (0, (5, 1)))))
    for ax, crit in zip(axes, view.criteria):
        part = view.lines[view.lines[criterion_col] == crit]
        for key, g in part.groupby(view.groups, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            ax.errorbar(g["_x"], g[f"{y}_mean"], yerr=g[f"{y}_std"], color=colors[key[0]],
                        linestyle=styles.get(key[-1], "-") if dash else "-", marker="o",
                        markersize=3, capsize=2, linewidth=1.2)
        if view.reference is not None:
            ax.axhline(view.reference[0], color="black", linestyle="--", linewidth=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(view.tickvals))
        ax.xaxis.set_minor_locator(NullLocator())
        # mathtext for "0" too, so it sits on the baseline of the 10^k labels
        ax.set_xticklabels(["$0$" if k is None else f"$10^{{{k}}}$" for k in view.tickexps])
        ax.set_title(V.display_name(crit))
        _labels(ax, V.axis_label(x))
    _readable_log(axes[0].yaxis, 6)
    _labels(axes[0], None, V.axis_label(y))
    sym = "π" if line == "stages" else line
    handles = [Line2D([], [], color=colors[v], marker="o", markersize=3, linewidth=1.2)
               for v in view.line_levels]
    labels = [f"{sym} = {V.fmt(v)}" for v in view.line_levels]
    handles += [Line2D([], [], color="gray", linestyle=styles[v]) for v in view.dash_levels]
    labels += [f"{dash} = {V.fmt(v)}" for v in view.dash_levels]
    if view.reference is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.2))
        labels.append(f"{V.display_name(reference)} (any λ, π)")
    _outside_legend(axes[-1], handles, labels)
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 2
def stage_trajectories(history: pd.DataFrame, *, x: str = "sparsity",
                       hue: str | Sequence[str] | None = None, log_y: bool = True, axes=None):
    """ΔL after each stage (against ``x``) and ‖Δθ‖ of each stage (LM paper Fig. 2, left and
    middle), one line per level of ``hue``, mean ± std band over seeds.

    Args:
        history: concatenated ``PruneResult.history`` frames with the columns telling them
            apart (schedule, criterion, seed …).
        x: x of the left axes (``"sparsity"`` or ``"stage"``).
        hue: column(s) giving one line each; default: those of arch, criterion, schedule,
            stages, lam that vary.
        log_y: log scale for ΔL.
        axes: two Axes to draw on (default: a new pair).

    Returns:
        The matplotlib Figure holding the two axes.
    """
    V.require_columns(history, ["stage", "delta_loss", "step_norm", x])
    hues = V.group_columns(history, hue)
    data = history if hues else history.assign(_all="history")
    keys = hues or ["_all"]
    values = ["delta_loss", "step_norm"] + ([x] if x != "stage" else [])
    agg = V.summary(data, [*keys, "stage"], values).sort_values([*keys, "stage"])
    if axes is None:
        fig, axes = _axes_row(2, 6.4, 2.6)
        fig.subplots_adjust(wspace=0.35)  # room for the right panel's y label
    elif len(axes) != 2:
        raise ValueError(f"need 2 axes, got {len(axes)}")
    fig = axes[0].figure
    colors = V.palette(list(pd.unique(agg[keys[0]])) if len(keys) == 1 else [])
    for i, (key, g) in enumerate(agg.groupby(keys, sort=False)):
        key = key if isinstance(key, tuple) else (key,)
        name = " · ".join(V.display_name(v) for v in key)
        color = colors.get(key[0], V.FALLBACK_COLORS[i % len(V.FALLBACK_COLORS)])
        xs = g["stage"] if x == "stage" else g[f"{x}_mean"]
        _band(axes[0], xs, g["delta_loss_mean"], g["delta_loss_std"], color, name)
        _band(axes[1], g["stage"], g["step_norm_mean"], g["step_norm_std"], color, name)
    _labels(axes[0], V.axis_label(x))
    _labels(axes[0], None, "ΔL after the stage (nats)")
    _labels(axes[1], V.axis_label("stage"))
    _labels(axes[1], None, "‖Δθ‖ of the stage")
    if log_y:
        axes[0].set_yscale("log")
        _readable_log(axes[0].yaxis, 6)
    if hues:
        _outside_legend(axes[1], title=" · ".join(hues))
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 3
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def delta_loss_scatter(frame: pd.DataFrame, *, x: str = "delta_loss",
                       y: str = "val_error_gap_ft", hue: str | None = "criterion",
                       ci: float = 0.95, n_boot: int = 2000, seed: int = 0, ax=None):
    """One point per run, ``y`` against ΔL on a log x axis, "Spearman ρ = …, 95 % CI […]"
    in the title (LM paper Fig. 3; :func:`prunelab.metrics.spearman`, bootstrap interval).

    ρ uses every run; runs with ΔL ≤ 0 or infinite cannot sit on the log axis. Error gaps
    missing from the frame are derived by :func:`prunelab.metrics.error_gaps`.
    """
    from prunelab import metrics

    if y not in frame.columns and y.startswith(("val_error_gap", "test_error_gap")):
        frame = metrics.error_gaps(frame)
    V.require_columns(frame, [x, y] + ([hue] if hue else []))
    stat = metrics.spearman(frame, x, y, ci=ci, n_boot=n_boot, seed=seed)
    if ax is None:
        _, ax = new_axes(3.6, 2.8)
    values = frame[x].to_numpy(dtype=float)
    shown = frame[np.isfinite(values) & (values > 0)]
    names = list(pd.unique(frame[hue])) if hue else ["runs"]
    colors = V.palette(names)
    for i, name in enumerate(names):
        part = shown[shown[hue] == name] if hue else shown
        ax.scatter(part[x], part[y], s=18, alpha=0.8, color=colors[name], linewidths=0,
                   marker=_MARKERS[i % len(_MARKERS)], label=V.display_name(name))
    ax.set_xscale("log")
    _readable_log(ax.xaxis)
    _labels(ax, V.axis_label(x))
    _labels(ax, None, V.axis_label(y, frame))
    ax.set_title(V.spearman_title(stat, ci), fontsize="medium")
    if hue:
        _outside_legend(ax, title=hue)
    return ax


# ----------------------------------------------------------------------------- MRP Sec. 4.3
def performance_profile(profile: pd.DataFrame, *, method: str = "method", tau: str = "tau",
                        fraction: str = "fraction", ax=None, pair_prefix: str | None = None,
                        kind: str | None = None):
    """Performance profiles as right-continuous steps, from
    :func:`prunelab.metrics.performance_profile`; higher curves are better.

    ``kind="mrp"`` (MRP paper Fig. 5): τ ∈ [0, 1], the fraction of measurements strictly below
    τ·best + (1 − τ)·worst. ``kind="dolan-more"``: the ratio to the best τ ≥ 1 (log₂ axis), the
    fraction of problems with ratio ≤ τ. ``None`` reads it from the profile. With
    ``pair_prefix="bp_"`` a score and its mean-replacement twin share a colour and the one
    without is dashed."""
    V.require_columns(profile, [method, tau, fraction])
    kind = V.profile_kind(profile, tau, kind)
    if ax is None:
        _, ax = new_axes(4.0, 2.8)
    names = list(pd.unique(profile[method]))
    right = float(profile[tau].max()) * 1.25 if kind == "dolan-more" else 1.0
    for name, (color, dashed) in V.pair_styles(names, pair_prefix).items():
        part = profile[profile[method] == name].sort_values(tau)
        xs, ys = part[tau].to_numpy(), part[fraction].to_numpy()
        if kind == "dolan-more":  # the last step holds beyond the last breakpoint
            xs, ys = np.r_[xs, right], np.r_[ys, ys[-1:]]
        ax.step(xs, ys, where="post", color=color, linewidth=1.4,
                linestyle="--" if dashed else "-", label=V.display_name(name))
    if kind == "mrp":
        ax.set_xlim(0, 1)
        _labels(ax, "τ (threshold τ·best + (1 − τ)·worst)")
        _labels(ax, None, "fraction below the threshold")
    else:
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, right)
        _readable_log(ax.xaxis)
        _labels(ax, "τ (ratio to the best)")
        _labels(ax, None, "fraction with ratio ≤ τ")
    ax.set_ylim(-0.02, 1.02)
    _outside_legend(ax, title=method)
    return ax


def penalty_scatter(pairs: pd.DataFrame, *, hue: str = "base", ax=None):
    """Pruning penalty without vs with mean replacement and the line y = x (MRP Figs. 3-4), from
    :func:`prunelab.units.bp_pairs`; the title gives the fraction of points below the line."""
    V.require_columns(pairs, ["without", "with", hue])
    if ax is None:
        _, ax = new_axes(3.8, 3.6)
    names = list(pd.unique(pairs[hue]))
    colors = V.palette(names)
    for name in names:
        part = pairs[pairs[hue] == name]
        ax.scatter(part["without"], part["with"], s=12, alpha=0.7, linewidths=0,
                   color=colors[name], label=V.display_name(name))
    lo = float(min(pairs["without"].min(), pairs["with"].min()))
    hi = float(max(pairs["without"].max(), pairs["with"].max()))
    ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=0.8, label="y = x")
    _labels(ax, "penalty without mean replacement (nats)")
    _labels(ax, None, "penalty with mean replacement, bp_ (nats)")
    ax.set_title(f"{pairs['with'].lt(pairs['without']).mean():.0%} of points below y = x",
                 fontsize="medium")
    _outside_legend(ax, title=hue)
    return ax


def penalty_over_training(frame: pd.DataFrame, *, y: str = "penalty", x: str = "step",
                          hue: str = "score", ax=None):
    """Pruning penalty per score over training steps, mean over the other rows (MRP Fig. 2);
    a ``bp_`` score solid, its twin without mean replacement dashed in the same colour."""
    V.require_columns(frame, [x, y, hue])
    if ax is None:
        _, ax = new_axes(5.0, 3.2)
    agg = V.aggregate(frame, x, y, hue)
    for name, (color, dashed) in V.pair_styles(list(pd.unique(agg[hue])), "bp_").items():
        part = agg[agg[hue] == name].sort_values(x)
        ax.plot(part[x], part["mean"], color=color, linestyle="--" if dashed else "-",
                linewidth=1.2, label=V.display_name(name))
    _labels(ax, V.axis_label(x))
    _labels(ax, None, V.axis_label(y))
    _outside_legend(ax, title=hue)
    return ax


def selection_consistency(frame: pd.DataFrame, *, ax=None):
    """Accumulated fraction of units ever selected per score over training (MRP Fig. 7)."""
    V.require_columns(frame, ["step", "score", "fraction_ever_selected"])
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    for name, (color, dashed) in V.pair_styles(list(pd.unique(frame["score"])), "bp_").items():
        part = frame[frame["score"] == name].sort_values("step")
        ax.plot(part["step"], part["fraction_ever_selected"], color=color,
                linestyle="--" if dashed else "-", linewidth=1.2, label=V.display_name(name))
    ax.set_ylim(0, 1.02)
    _labels(ax, V.axis_label("step"))
    _labels(ax, None, V.axis_label("fraction_ever_selected"))
    _outside_legend(ax, title="score")
    return ax


def activation_histogram(frame: pd.DataFrame, *, scores: Sequence[str] | None = None,
                         value: str = "sq_activation", bins: int = 30, ax=None):
    """Histogram of log10 mean squared activation of the units each score selected (MRP
    Fig. 6b), from :meth:`prunelab.units.PenaltyRecorder.activations`; common bins."""
    data, edges = V.histogram_edges(frame, value, bins, scores)
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    names = list(scores) if scores is not None else list(pd.unique(data["score"]))
    colors = V.palette(names)
    for name in names:
        vals = data.loc[data["score"] == name, "log10"].to_numpy()
        ax.hist(vals, bins=edges, histtype="step", linewidth=1.3, color=colors[name],
                label=V.display_name(name))
    _labels(ax, "log10 mean squared activation of the selected units")
    _labels(ax, None, "units selected (count)")
    _outside_legend(ax, title="score")
    return ax


def loss_plane(frame: pd.DataFrame, *, z: str = "loss", split: str | None = None,
               labels: Sequence[str] = ("a", "b", "c"), log: bool = True, ax=None):
    """Filled contour of ``z`` on the plane through three models (Garipov et al. Fig. 1), from
    :func:`prunelab.connectivity.plane`, with the models marked."""
    V.require_columns(frame, ["u", "v", z])
    data = frame
    if "split" in frame.columns:
        splits = list(pd.unique(frame["split"]))
        if split is None and len(splits) > 1:
            raise ValueError(f"the frame holds splits {splits}: pass split=")
        split = split or splits[0]
        data = frame[frame["split"] == split]
    grid = data.pivot_table(index="v", columns="u", values=z, aggfunc="first").sort_index()
    values = grid.to_numpy(dtype=float)
    shown = np.log10(np.maximum(values, 1e-12)) if log else values
    if ax is None:
        _, ax = new_axes(4.2, 3.4)
    cs = ax.contourf(grid.columns.to_numpy(), grid.index.to_numpy(), shown, levels=20,
                     cmap="viridis")
    what = V.axis_label(f"{split}_{z}" if split in ("train", "val", "test") else z)
    ax.figure.colorbar(cs, ax=ax, label=("log10 " if log else "") + what)
    points = frame.attrs.get("points")
    if points:
        pts = list(points.values()) if isinstance(points, dict) else list(points)
        for label, (u, v) in zip(labels, pts):
            ax.plot(u, v, "o", color="white", markeredgecolor="black", markersize=6)
            ax.annotate(label, (u, v), textcoords="offset points", xytext=(4, 4), color="white")
    ax.set_aspect("equal", adjustable="box")
    _labels(ax, "u (along b − a)")
    _labels(ax, None, "v")
    return ax


def instability(barriers: pd.DataFrame, *, x: str = "k", y: str = "barrier",
                color: str | None = None, ax=None):
    """Instability (linear-path barrier) vs the splitting step ``k`` (Frankle et al. Fig. 3;
    Figs. 5-6 for sparse subnetworks); ``color``: one line per value of that column."""
    V.require_columns(barriers, [x, y] + ([color] if color else []))
    if ax is None:
        _, ax = new_axes(4.0, 2.8)
    groups = barriers.groupby(color, sort=False) if color else [(None, barriers)]
    colors = V.palette(list(pd.unique(barriers[color])) if color else [None])
    for name, part in groups:
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", linewidth=1.4, color=colors[name],
                label=None if name is None else V.display_name(name))
    if color:
        _outside_legend(ax, title=color)
    metric = str(barriers["metric"].iloc[0]) if "metric" in barriers and len(barriers) else "error"
    _labels(ax, "splitting step k (training steps)")
    _labels(ax, None, f"{metric} barrier" + (" (fraction)" if metric == "error" else " (nats)"))
    return ax


def is_fast() -> bool:
    """True when the environment asks for the small FAST setting (``PRUNELAB_FAST`` set to
    anything but ``""``/``"0"``), as the notebooks' papermill parameter does."""
    return os.environ.get("PRUNELAB_FAST", "0").strip() not in ("", "0")


def save(fig_or_ax, name: str, *, folder: str | Path | None = None,
         formats: Sequence[str] = ("pdf", "png"), dpi: int = DPI, final: bool | None = None,
         scratch: str | Path | None = None) -> list[Path]:
    """Write a matplotlib figure (or an Axes' figure) as ``figures/NAME.{pdf,png}``: PNG at
    ``dpi`` (300), PDF with embedded TrueType fonts (``pdf.fonttype`` 42), no timestamps.

    Only a complete, full-setting run writes ``figures/`` (or ``folder``): a FAST or partial
    (interrupted) run is not final, and its figure goes to the scratch folder instead
    (``scratch``, default :data:`prunelab.paths.SCRATCH_FIGURES`, ``build/scratch_figures/``),
    with one line on stdout saying where and why, so the paper's figures are never overwritten
    by a demo.

    Args:
        final: True for a complete run at full settings; False for a FAST or partial one;
            None (default): final unless ``PRUNELAB_FAST`` is set (:func:`is_fast`). With
            ``PRUNELAB_FAST`` set a figure is never final, whatever ``final`` says.

    Returns:
        The paths written.
    """
    if final not in (None, True, False):
        raise ValueError(f"final must be True, False or None (decided by PRUNELAB_FAST), got "
                         f"{final!r}")
    plt = _plt()
    import matplotlib

    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    out_dir = Path(folder) if folder is not None else paths.FIGURES
    fast = is_fast()
    if fast or final is False:
        why = "PRUNELAB_FAST is set" if fast else "final=False (a FAST or partial run)"
        target = Path(scratch) if scratch is not None else paths.SCRATCH_FIGURES
        print(f"figures.save: {name} is not a final figure ({why}): written to {target}, "
              f"not {out_dir}", flush=True)
        out_dir = target
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {"pdf": {"CreationDate": None, "ModDate": None}, "png": {"Software": None},
            "svg": {"Date": None}}
    with matplotlib.rc_context(_RC):
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=dpi, metadata=meta.get(fmt))
            written.append(path)
    plt.close(fig)
    return written


# ----------------------------------------------------------------------------- layer collapse
def collapse_curves(frame: pd.DataFrame, *, y: str | None = None, hue: str = "criterion",
                    x: str = "compression", chance=None, ax=None):
    """``y`` against the compression ratio ρ (log x), one line per criterion, layer collapse
    marked with an x (Tanaka et al. 2020, Fig. 1); frames as
    :func:`prunelab.plots.collapse_curves`; ``chance`` as in :func:`accuracy_vs_density`."""
    agg, y, log_y = V.collapse_view(frame, y=y, criterion=hue, x=x)
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    names = list(pd.unique(agg[hue]))
    colors = V.palette(names)
    for name in names:
        part = agg[agg[hue] == name].sort_values(x)
        ax.plot(part[x], part["shown"], marker="o", markersize=3, color=colors[name],
                linewidth=1.3, label=V.display_name(name))
        hit = part[part["collapsed"]]
        if len(hit):
            ax.scatter(hit[x], hit["shown"], marker="x", s=45, color=colors[name],
                       linewidths=1.6, zorder=3)
    if not log_y:
        _chance(ax, frame, y, chance)
    ax.set_xscale("log")
    _readable_log(ax.xaxis)
    if log_y:
        ax.set_yscale("log")
        _readable_log(ax.yaxis, 6)
    _labels(ax, V.axis_label(x))
    _labels(ax, None, V.axis_label(y, frame) + (" (0 drawn at the bottom)" if log_y else ""))
    _outside_legend(ax, title="× layer collapse")
    return ax


def layer_density_heatmap(frame: pd.DataFrame, *, criterion: str | None = None,
                          criterion_col: str = "criterion", x: str = "compression", ax=None):
    """Layers × compression ratio, colour = log10 fraction kept, collapsed cells marked with a
    red x (Tanaka et al. 2020, Fig. 3 data); a ``collapse.layer_density`` frame."""
    V.require_columns(frame, ["layer", x, "density", "collapsed"])
    criterion = V.pick_criterion(frame, criterion, criterion_col)
    layers, rhos, z, dead = V.density_matrix(frame, criterion, criterion_col, x)
    if ax is None:
        _, ax = new_axes(0.5 * len(rhos) + 2.5, 0.28 * len(layers) + 1.4)
    logz = np.log10(np.clip(z.to_numpy(dtype=float), 1e-6, None))
    im = ax.imshow(logz, aspect="auto", cmap="viridis", vmin=min(-1.0, float(np.floor(
        np.nanmin(logz)))), vmax=0.0, interpolation="nearest")
    ii, jj = np.nonzero(dead.to_numpy())
    ax.scatter(jj, ii, marker="x", color="red", s=30, linewidths=1.5)
    ax.set_xticks(range(len(rhos)))
    ax.set_xticklabels([f"{r:.3g}" for r in rhos], rotation=90, fontsize="small")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(n).removesuffix(".weight") for n in layers], fontsize="small")
    ax.grid(False)
    _labels(ax, "compression ratio ρ")
    ax.set_title(f"{V.display_name(criterion)}: log10 density per layer (× collapsed)",
                 fontsize="medium")
    ax.figure.colorbar(im, ax=ax, label="log10 fraction of the layer kept")
    return ax


def layer_density(density_frame: pd.DataFrame, *, layer: str = "layer",
                  density: str = "density", hue: str | None = None, ax=None):
    """Fraction of weights kept per layer as bars (a ``pl.masks.density`` frame), the
    ``total`` row as a dashed line; as :func:`prunelab.plots.layer_density`.

    Raises:
        ValueError: a layer appears several times per ``hue`` level, e.g. a
            ``pl.collapse.layer_density`` frame (use :func:`layer_density_heatmap` or
            :func:`collapse_curves` for those).
    """
    rows, totals = V.density_bars(density_frame, layer=layer, density=density, color=hue)
    layers = list(pd.unique(rows[layer]))
    names = list(pd.unique(rows[hue])) if hue else [None]
    if ax is None:
        _, ax = new_axes(max(3.0, 0.35 * len(layers) * len(names) + 1.5), 3.0)
    colors = V.palette(names)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        part = rows[rows[hue] == name] if hue else rows
        pos = [layers.index(n) - 0.4 + width * (i + 0.5) for n in part[layer]]
        ax.bar(pos, part[density], width=width, color=colors[name],
               label=V.display_name(name) if hue else None)
    for name, total in totals.items():
        who = "" if name is None else f" {V.display_name(name)}"
        ax.axhline(total, color="black" if name is None else colors[name], linestyle="--",
                   linewidth=1.0, label=f"total{who} {total:.3g}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(n).removesuffix(".weight") for n in layers], rotation=90,
                       fontsize="small")
    ax.set_ylim(0, 1.05)
    _labels(ax, layer)
    _labels(ax, None, "fraction of weights kept")
    _outside_legend(ax, title=hue)
    return ax


# ----------------------------------------------------------------------------- connectivity
def interpolation(frame: pd.DataFrame, *, y: str = "loss", x: str = "t",
                  groups: Sequence[str] | None = None, ax=None):
    """``y`` along paths between two networks, one line per path/split, barriers in the legend
    (Frankle et al. Fig. 1; Garipov et al. Fig. 2); frames as
    :func:`prunelab.plots.interpolation`."""
    V.require_columns(frame, [x, y])
    groups = V.path_groups(frame, groups)
    barriers = V.path_barriers(frame, y=y, x=x, groups=groups)
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    parts = list(frame.groupby(groups, sort=False)) if groups else [("path", frame)]
    styles = {}
    if "split" in groups:
        styles = {s: ls for s, ls in zip(pd.unique(frame["split"]), ("-", "--", ":", "-."))}
    first = [g for g in groups if g != "split"]
    colors = V.palette(list(pd.unique(frame[first[0]]))) if first else {}
    for i, (key, part) in enumerate(parts):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(map(str, key))
        named = dict(zip(groups, key))
        part = part.sort_values(x)
        color = colors.get(named.get(first[0])) if first else \
            V.FALLBACK_COLORS[i % len(V.FALLBACK_COLORS)]
        ax.plot(part[x], part[y], marker="o", markersize=2.5, linewidth=1.3, color=color,
                linestyle=styles.get(named.get("split"), "-"),
                label=f"{label} (barrier {barriers[label]:.3g})")
    _labels(ax, "t (position along the path)" if x == "t" else V.axis_label(x))
    _labels(ax, None, V.axis_label(y))
    _outside_legend(ax)
    return ax


def loss_landscape(frame: pd.DataFrame, *, z: str = "loss", network: str = "network",
                   log: bool = False, axes=None):
    """Loss landscape along filter-normalised random directions (Li et al. 2018, Figs. 1, 5),
    frames as :func:`prunelab.plots.loss_landscape`. 1-D: one line per network on one axes
    (returns the Axes); 2-D: one filled-contour panel per network side by side on one colour
    scale (returns the Figure). ``log``: colour / y axis by log10 of ``z``."""
    view = V.landscape_view(frame, z=z, network=network)
    label = V.axis_label(z)
    if view.dims == 1:
        ax = axes if axes is not None else new_axes(4.2, 3.0)[1]
        colors = V.palette([name for name, _ in view.parts])
        for name, part in view.parts:
            ax.plot(part["alpha"], part[z], marker="o", markersize=2.5, linewidth=1.3,
                    color=colors[name], label=None if name is None else V.display_name(name))
        if log:
            ax.set_yscale("log")
            _readable_log(ax.yaxis)
        _labels(ax, V.axis_label("alpha"))
        _labels(ax, None, label)
        if view.parts[0][0] is not None:
            _outside_legend(ax, title=network)
        return ax
    n = len(view.parts)
    if axes is None:
        fig, axes = _axes_row(n, 3.4 * n, 3.2, sharey=True)
    else:
        axes = list(np.atleast_1d(axes))
        if len(axes) != n:
            raise ValueError(f"axes must hold {n} Axes (one per network), got {len(axes)}")
        fig = axes[0].figure
    lo, hi = view.zrange
    transform = (lambda v: np.log10(np.maximum(v, 1e-12))) if log else (lambda v: v)
    levels = np.linspace(transform(lo), transform(hi) + 1e-12, 21)
    for ax, (name, grid) in zip(axes, view.parts):
        cs = ax.contourf(grid.columns.to_numpy(), grid.index.to_numpy(),
                         transform(grid.to_numpy(dtype=float)), levels=levels, cmap="viridis")
        ax.plot(0, 0, "o", color="white", markeredgecolor="black", markersize=5)
        if name is not None:
            ax.set_title(V.display_name(name), fontsize="medium")
        ax.set_aspect("equal", adjustable="box")
        _labels(ax, "α")
    _labels(axes[0], None, "β")
    fig.colorbar(cs, ax=list(axes), label=("log10 " if log else "") + label)
    return fig


# ----------------------------------------------------------------------------- MetaPruning
def accuracy_vs_flops(frame: pd.DataFrame, *, x: str = "budget", y: str = "accuracy",
                      hue: str = "method", reference: str | None = "dense", ax=None):
    """Accuracy vs FLOPs budget (fraction of the dense network's), mean ± std band over seeds,
    one line per method, the dense net dashed (MetaPruning comparison at equal FLOPs)."""
    V.require_columns(frame, [x, y, hue])
    if ax is None:
        _, ax = new_axes()
    rest = frame[frame[hue] != reference] if reference is not None else frame
    agg = V.aggregate(rest, x, y, hue)
    colors = V.palette(list(pd.unique(agg[hue])))
    for name, part in agg.groupby(hue, sort=False):
        _band(ax, part[x], part["mean"], part["std"], colors[name], V.display_name(name))
    if reference is not None and (frame[hue] == reference).any():
        ax.axhline(float(frame.loc[frame[hue] == reference, y].mean()), color="0.4", ls="--",
                   lw=1, label=V.display_name(reference))
    _labels(ax, "FLOPs budget (fraction of the dense network)")
    _labels(ax, None, V.axis_label(y, frame))
    _outside_legend(ax, title=hue)
    return ax
