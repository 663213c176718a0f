"""Static paper figures (seaborn/matplotlib) and the only writer to ``figures/``.

Axes-level functions take a tidy frame and an optional ``ax`` and return the ``Axes``; the two
multi-panel paper figures (:func:`delta_loss_vs_lambda`, LM Fig. 1, and
:func:`stage_trajectories`, LM Fig. 2) take optional ``axes`` and return the ``Figure``.
:func:`save` writes PDF and PNG with settings that make the files byte-identical across runs.
Torch-free: matplotlib, seaborn and ``prunelab.metrics`` are imported when a figure is drawn.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


def _axes_row(n: int, width: float, height: float, *, sharey: bool = False):
    """A fresh figure with ``n`` axes side by side in the paper style."""
    plt = _plt()
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", rc=_RC)
    fig, axes = plt.subplots(1, n, figsize=(width, height), sharey=sharey, squeeze=False)
    return fig, list(axes[0])


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; it has {list(frame.columns)}")


def _levels(series: pd.Series) -> list:
    """Sorted levels for numbers, order of first appearance otherwise."""
    levels = pd.unique(series.dropna())
    return sorted(levels) if pd.api.types.is_numeric_dtype(series) else list(levels)


def _label(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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


# ----------------------------------------------------------------------------- LM paper Fig. 1
def delta_loss_vs_lambda(frame: pd.DataFrame, *, criterion_col: str = "criterion",
                         x: str = "lam", y: str = "delta_loss", line: str = "stages",
                         reference: str | None = "mp", zero_decades: float = 1.0, axes=None):
    """ΔL vs λ, one axes per criterion, one line per π, MP dashed black (LM paper Fig. 1).

    Mean over seeds with ± std error bars; log-log axes, y shared. λ = 0 is drawn
    ``zero_decades`` decades left of the smallest positive λ with its tick labelled "0".
    The ``reference`` criterion (MP, invariant to λ and π) is the mean ΔL of all its runs,
    drawn as a dashed black horizontal line in every axes.

    Args:
        frame: one row per run (one sparsity, schedule and architecture).
        criterion_col: one axes per value (the reference excepted).
        x: the λ column; y: the measurement; line: one line per value (π).
        reference: criterion drawn as the dashed reference, or None.
        zero_decades: how far left of the smallest positive λ the λ = 0 points sit.
        axes: one Axes per criterion to draw on (default: a new row of axes).

    Returns:
        The matplotlib Figure (several axes, so not an Axes: this is the one figure-level
        function besides :func:`stage_trajectories`).
    """
    _require(frame, [criterion_col, x, y, line])
    is_ref = (frame[criterion_col].astype(str).str.lower() == str(reference).lower()
              if reference is not None else pd.Series(False, index=frame.index))
    ref, rest = frame[is_ref], frame[~is_ref]
    if rest.empty:
        raise ValueError(f"no criterion other than the reference {reference!r} in the frame")
    lam = rest[x].to_numpy(dtype=float)
    positive = lam[lam > 0]
    zero_at = positive.min() / 10.0 ** zero_decades if positive.size else 1.0
    rest = rest.assign(_x=np.where(lam == 0, zero_at, lam),
                       _y=rest[y].replace([np.inf, -np.inf], np.nan))
    criteria = _levels(rest[criterion_col])
    if axes is None:
        fig, axes = _axes_row(len(criteria), 2.6 * len(criteria) + 0.6, 2.6, sharey=True)
    elif len(axes) != len(criteria):
        raise ValueError(f"need {len(criteria)} axes (one per criterion), got {len(axes)}")
    fig = axes[0].figure
    import seaborn as sns

    levels = _levels(rest[line])
    palette = sns.color_palette(n_colors=len(levels))
    for ax, crit in zip(axes, criteria):
        part = rest[rest[criterion_col] == crit]
        agg = part.groupby([line, "_x"])["_y"].agg(["mean", "std"]).reset_index()
        agg["std"] = agg["std"].fillna(0.0)
        for color, level in zip(palette, levels):
            g = agg[agg[line] == level]
            if g.empty:
                continue
            name = f"π = {_label(level)}" if line == "stages" else f"{line} = {_label(level)}"
            ax.errorbar(g["_x"], g["mean"], yerr=g["std"], color=color, marker="o",
                        markersize=3, capsize=2, linewidth=1.2, label=name)
        if reference is not None and not ref.empty:
            values = ref[y].replace([np.inf, -np.inf], np.nan)
            ax.axhline(values.mean(), color="black", linestyle="--", linewidth=1.2,
                       label=str(reference).upper())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks, text = [], []
        if (lam == 0).any():
            ticks.append(zero_at)
            text.append("$0$")  # mathtext, on the baseline of the 10^k labels
        if positive.size:
            lo = math.floor(math.log10(positive.min()))
            hi = math.ceil(math.log10(positive.max()))
            step = max(1, math.ceil((hi - lo + 1) / 6))
            for k in range(lo, hi + 1, step):
                ticks.append(10.0 ** k)
                text.append(f"$10^{{{k}}}$")
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels(text)
        ax.set_title(str(crit))
        ax.set_xlabel("λ")
    axes[0].set_ylabel("ΔL(θ, Δθ)" if y == "delta_loss" else y.replace("_", " "))
    axes[-1].legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
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
    import seaborn as sns

    _require(history, ["stage", "delta_loss", "step_norm", x])
    if hue is None:
        hues = [c for c in ("arch", "criterion", "schedule", "stages", "lam")
                if c in history.columns and history[c].nunique(dropna=False) > 1]
    else:
        hues = [hue] if isinstance(hue, str) else list(hue)
        _require(history, hues)
    data = history.assign(_line=history[hues].astype(str).agg(" · ".join, axis=1)
                          if hues else "history")
    if axes is None:
        fig, axes = _axes_row(2, 6.4, 2.6)
    elif len(axes) != 2:
        raise ValueError(f"need 2 axes, got {len(axes)}")
    fig = axes[0].figure
    for ax, (xcol, ycol, label) in zip(axes, ((x, "delta_loss", "ΔL(θ, Δθ)"),
                                              ("stage", "step_norm", "‖Δθ‖ of the stage"))):
        sns.lineplot(data=data, x=xcol, y=ycol, hue="_line", marker="o", markersize=4,
                     errorbar="sd", ax=ax, legend=ax is axes[0])
        ax.set_xlabel(xcol.replace("_", " "))
        ax.set_ylabel(label)
    if log_y:
        axes[0].set_yscale("log")
    legend = axes[0].get_legend()
    if legend is not None:
        legend.set_title(" · ".join(hues) or None)
        legend.set_frame_on(False)
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 3
def delta_loss_scatter(frame: pd.DataFrame, *, x: str = "delta_loss",
                       y: str = "val_error_gap_ft", hue: str | None = "criterion",
                       ci: float = 0.95, n_boot: int = 2000, seed: int = 0, ax=None):
    """One point per run, ``y`` against ΔL on a log x axis, Spearman's ρ with its bootstrap
    interval in the title (LM paper Fig. 3; :func:`prunelab.metrics.spearman`).

    ρ uses every run; runs with ΔL ≤ 0 or infinite cannot sit on the log axis. Error gaps
    missing from the frame are derived by :func:`prunelab.metrics.error_gaps`.
    """
    import seaborn as sns

    from prunelab import metrics

    if y not in frame.columns and y.startswith(("val_error_gap", "test_error_gap")):
        frame = metrics.error_gaps(frame)
    _require(frame, [x, y] + ([hue] if hue else []))
    stat = metrics.spearman(frame, x, y, ci=ci, n_boot=n_boot, seed=seed)
    if ax is None:
        _, ax = new_axes(3.6, 2.8)
    values = frame[x].to_numpy(dtype=float)
    shown = frame[np.isfinite(values) & (values > 0)]
    sns.scatterplot(data=shown, x=x, y=y, hue=hue, style=hue, s=22, alpha=0.8, ax=ax)
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, NullFormatter

    # Within a decade or two, matplotlib labels the minor ticks too and they run into each other.
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.set_xlabel("ΔL(θ, Δθ)" if x == "delta_loss" else x.replace("_", " "))
    ax.set_ylabel({"val_error_gap_ft": "val. error gap after fine-tuning",
                   "val_error_gap": "val. error gap before fine-tuning"}.get(
                       y, y.replace("_", " ")))
    ax.set_title(f"ρ = {stat['rho']:.2f}  [{stat['low']:.2f}, {stat['high']:.2f}]",
                 fontsize="medium")
    if ax.get_legend() is not None:
        ax.get_legend().set_frame_on(False)
    return ax


# ----------------------------------------------------------------------------- MRP Sec. 4.3
def _pair_styles(names: list, prefix: str | None, sns) -> dict:
    """name -> (colour, dashed): with ``prefix`` a name and its prefixed twin share a colour,
    the unprefixed one dashed (MRP Fig. 5)."""
    if not prefix:
        return dict(zip(names, ((c, False) for c in sns.color_palette(n_colors=len(names)))))
    base = {n: str(n)[len(prefix):] if str(n).startswith(prefix) else str(n) for n in names}
    bases = list(dict.fromkeys(base.values()))
    palette = sns.color_palette(n_colors=len(bases))
    return {n: (palette[bases.index(base[n])], not str(n).startswith(prefix)) for n in names}


def performance_profile(profile: pd.DataFrame, *, method: str = "method", tau: str = "tau",
                        fraction: str = "fraction", ax=None, pair_prefix: str | None = None):
    """Performance profiles as right-continuous steps over τ ∈ [0, 1] (MRP paper Fig. 5), from
    :func:`prunelab.metrics.performance_profile`; higher curves are better. With
    ``pair_prefix="bp_"`` a score and its mean-replacement twin share a colour and the one
    without is dashed."""
    import seaborn as sns

    _require(profile, [method, tau, fraction])
    if ax is None:
        _, ax = new_axes(4.0, 2.8)
    names = list(pd.unique(profile[method]))
    for name, (color, dashed) in _pair_styles(names, pair_prefix, sns).items():
        part = profile[profile[method] == name].sort_values(tau)
        ax.step(part[tau], part[fraction], where="post", color=color, linewidth=1.4,
                linestyle="--" if dashed else "-", label=str(name))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ")
    ax.set_ylabel("fraction below threshold")
    if len(names) > 6:  # many curves (the 12 MRP scores): the legend goes beside the axes
        ax.legend(frameon=False, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.legend(frameon=False, fontsize="small")
    return ax


def penalty_scatter(pairs: pd.DataFrame, *, hue: str = "base", ax=None):
    """Pruning penalty without vs with mean replacement and the line y = x (MRP Figs. 3-4), from
    :func:`prunelab.units.bp_pairs`; the title gives the fraction of points below the line."""
    import seaborn as sns

    _require(pairs, ["without", "with", hue])
    if ax is None:
        _, ax = new_axes(3.8, 3.6)
    sns.scatterplot(data=pairs, x="without", y="with", hue=hue, s=12, alpha=0.7, linewidth=0,
                    ax=ax)
    lo = float(min(pairs["without"].min(), pairs["with"].min()))
    hi = float(max(pairs["without"].max(), pairs["with"].max()))
    ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("pruning penalty without mean replacement")
    ax.set_ylabel("with mean replacement (bp_)")
    ax.set_title(f"{pairs['with'].lt(pairs['without']).mean():.0%} of points below y = x",
                 fontsize="medium")
    if ax.get_legend() is not None:
        ax.legend(frameon=False, fontsize="small", title=hue)
    return ax


def penalty_over_training(frame: pd.DataFrame, *, y: str = "penalty", x: str = "step",
                          hue: str = "score", ax=None):
    """Pruning penalty per score over training steps, mean over the other rows (MRP Fig. 2);
    a ``bp_`` score solid, its twin without mean replacement dashed in the same colour."""
    import seaborn as sns

    _require(frame, [x, y, hue])
    if ax is None:
        _, ax = new_axes(5.0, 3.2)
    mean = frame.groupby([hue, x], sort=False)[y].mean().reset_index()
    for name, (color, dashed) in _pair_styles(list(pd.unique(mean[hue])), "bp_", sns).items():
        part = mean[mean[hue] == name].sort_values(x)
        ax.plot(part[x], part[y], color=color, linestyle="--" if dashed else "-", linewidth=1.2,
                label=str(name))
    ax.set_xlabel("training step")
    ax.set_ylabel("pruning penalty")
    ax.legend(frameon=False, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return ax


def selection_consistency(frame: pd.DataFrame, *, ax=None):
    """Accumulated fraction of units ever selected per score over training (MRP Fig. 7)."""
    import seaborn as sns

    _require(frame, ["step", "score", "fraction_ever_selected"])
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    for name, (color, dashed) in _pair_styles(list(pd.unique(frame["score"])), "bp_",
                                              sns).items():
        part = frame[frame["score"] == name].sort_values("step")
        ax.plot(part["step"], part["fraction_ever_selected"], color=color,
                linestyle="--" if dashed else "-", linewidth=1.2, label=str(name))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of units ever selected")
    ax.legend(frameon=False, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return ax


def activation_histogram(frame: pd.DataFrame, *, scores: Sequence[str] | None = None,
                         value: str = "sq_activation", bins: int = 30, ax=None):
    """Histogram of log10 mean squared activation of the units each score selected (MRP
    Fig. 6b), from :meth:`prunelab.units.PenaltyRecorder.activations`."""
    import seaborn as sns

    _require(frame, ["score", value])
    data = frame[frame[value] > 0]
    if scores is not None:
        data = data[data["score"].isin(list(scores))]
    if data.empty:
        raise ValueError(f"no positive {value!r} values to histogram")
    data = data.assign(log10_sq_activation=np.log10(data[value]))
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    sns.histplot(data=data, x="log10_sq_activation", hue="score", bins=bins,
                 element="step", stat="count", common_bins=True, ax=ax,
                 hue_order=list(scores) if scores is not None else None)
    ax.set_xlabel("log10 mean squared activation of selected units")
    ax.set_ylabel("units selected")
    return ax


def loss_plane(frame: pd.DataFrame, *, z: str = "loss", split: str | None = None,
               labels: Sequence[str] = ("a", "b", "c"), log: bool = True, ax=None):
    """Filled contour of ``z`` on the plane through three models (Garipov et al. Fig. 1), from
    :func:`prunelab.connectivity.plane`, with the models marked."""
    _require(frame, ["u", "v", z])
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
    ax.figure.colorbar(cs, ax=ax, label=("log10 " if log else "") + z)
    points = frame.attrs.get("points")
    if points:
        pts = list(points.values()) if isinstance(points, dict) else list(points)
        for label, (u, v) in zip(labels, pts):
            ax.plot(u, v, "o", color="white", markeredgecolor="black", markersize=6)
            ax.annotate(label, (u, v), textcoords="offset points", xytext=(4, 4), color="white")
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("u (along b − a)")
    ax.set_ylabel("v")
    return ax


def instability(barriers: pd.DataFrame, *, x: str = "k", y: str = "barrier",
                color: str | None = None, ax=None):
    """Instability (linear-path barrier) vs the splitting step ``k`` (Frankle et al. Fig. 3;
    Figs. 5-6 for sparse subnetworks); ``color``: one line per value of that column."""
    _require(barriers, [x, y] + ([color] if color else []))
    if ax is None:
        _, ax = new_axes(4.0, 2.8)
    groups = barriers.groupby(color, sort=False) if color else [(None, barriers)]
    for name, part in groups:
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", linewidth=1.4,
                label=None if name is None else str(name))
    if color:
        ax.legend(frameon=False, fontsize="small")
    metric = str(barriers["metric"].iloc[0]) if "metric" in barriers and len(barriers) else "error"
    ax.set_xlabel("splitting step k")
    ax.set_ylabel(f"{metric} barrier")
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


# ----------------------------------------------------------------------------- layer collapse
def collapse_curves(frame: pd.DataFrame, *, y: str | None = None, hue: str = "criterion",
                    x: str = "compression", ax=None):
    """``y`` against the compression ratio ρ (log x), one line per criterion, layer collapse
    marked with an x (Tanaka et al. 2020, Fig. 1); frames as :func:`prunelab.plots.collapse_curves`."""
    import seaborn as sns

    from prunelab.plots import collapse_points

    data = collapse_points(frame, criterion=hue, x=x)
    if y is None:
        y = "accuracy" if "accuracy" in data.columns else "min_layer_density"
    _require(data, [y])
    agg = (data.groupby([hue, x], sort=False)
           .agg(value=(y, "mean"), collapsed=("collapsed", "any")).reset_index())
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    log_y = "density" in y
    if log_y:  # empty layers cannot sit on the log axis: drawn at a floor below the rest
        positive = agg["value"][agg["value"] > 0]
        floor = float(positive.min()) / 3 if len(positive) else 1e-6
        agg["value"] = agg["value"].where(agg["value"] > 0, floor)
    names = list(pd.unique(agg[hue]))
    for color, name in zip(sns.color_palette(n_colors=len(names)), names):
        part = agg[agg[hue] == name].sort_values(x)
        ax.plot(part[x], part["value"], marker="o", markersize=3, color=color, linewidth=1.3,
                label=str(name))
        hit = part[part["collapsed"]]
        if len(hit):
            ax.scatter(hit[x], hit["value"], marker="x", s=45, color=color, linewidths=1.6,
                       zorder=3)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("compression ratio ρ")
    ax.set_ylabel(y.replace("_", " ") + (" (0 drawn at the bottom)" if log_y else ""))
    ax.legend(frameon=False, fontsize="small", title="× layer collapse", loc="lower left",
              title_fontsize="small")
    return ax


def layer_density_heatmap(frame: pd.DataFrame, *, criterion: str | None = None,
                          criterion_col: str = "criterion", x: str = "compression", ax=None):
    """Layers × compression ratio, colour = log10 fraction kept, collapsed cells marked with a
    red x (Tanaka et al. 2020, Fig. 3 data); a ``collapse.layer_density`` frame."""
    from prunelab.plots import _density_matrix, _pick_criterion

    _require(frame, ["layer", x, "density", "collapsed"])
    criterion = _pick_criterion(frame, criterion, criterion_col)
    layers, rhos, z, dead = _density_matrix(frame, criterion, criterion_col, x)
    if ax is None:
        _, ax = new_axes(0.5 * len(rhos) + 2.5, 0.28 * len(layers) + 1.2)
    logz = np.log10(np.clip(z.to_numpy(dtype=float), 1e-6, None))
    im = ax.imshow(logz, aspect="auto", cmap="viridis", vmin=min(-1.0, float(np.floor(
        np.nanmin(logz)))), vmax=0.0, interpolation="nearest")
    ii, jj = np.nonzero(dead.to_numpy())
    ax.scatter(jj, ii, marker="x", color="red", s=30, linewidths=1.5)
    ax.set_xticks(range(len(rhos)))
    ax.set_xticklabels([f"{r:.3g}" for r in rhos], rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(n).removesuffix(".weight") for n in layers], fontsize="small")
    ax.grid(False)
    ax.set_xlabel("compression ratio ρ")
    ax.set_title(f"{criterion}: log10 density per layer (× collapsed)", fontsize="medium")
    ax.figure.colorbar(im, ax=ax, label="log10 density")
    return ax


# ----------------------------------------------------------------------------- connectivity
def interpolation(frame: pd.DataFrame, *, y: str = "loss", x: str = "t",
                  groups: Sequence[str] | None = None, ax=None):
    """``y`` along paths between two networks, one line per path/split, barriers in the legend
    (Frankle et al. Fig. 1; Garipov et al. Fig. 2); frames as
    :func:`prunelab.plots.interpolation`."""
    import seaborn as sns

    from prunelab.plots import path_barriers

    _require(frame, [x, y])
    groups = [c for c in ("path", "split") if c in frame.columns] if groups is None \
        else list(groups)
    _require(frame, groups)
    barriers = path_barriers(frame, y=y, x=x, groups=groups)
    if ax is None:
        _, ax = new_axes(4.2, 3.0)
    parts = list(frame.groupby(groups, sort=False)) if groups else [("path", frame)]
    styles = {}
    if "split" in groups:
        styles = {s: ls for s, ls in zip(pd.unique(frame["split"]), ("-", "--", ":", "-."))}
    first = [g for g in groups if g != "split"]
    levels = list(pd.unique(frame[first[0]])) if first else [None]
    palette = dict(zip(levels, sns.color_palette(n_colors=max(len(levels), len(parts)))))
    for i, (key, part) in enumerate(parts):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(map(str, key))
        named = dict(zip(groups, key))
        part = part.sort_values(x)
        color = palette.get(named.get(first[0])) if first else \
            sns.color_palette(n_colors=len(parts))[i]
        ax.plot(part[x], part[y], marker="o", markersize=2.5, linewidth=1.3, color=color,
                linestyle=styles.get(named.get("split"), "-"),
                label=f"{label} (barrier {barriers[label]:.3g})")
    ax.set_xlabel(x)
    ax.set_ylabel(y.replace("_", " "))
    ax.legend(frameon=True, framealpha=0.85, edgecolor="none", fontsize="small", loc="best")
    return ax
