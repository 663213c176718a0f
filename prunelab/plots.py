"""Interactive plotly views of tidy result frames. Frames in, ``go.Figure`` out; never shown.

Every point's hover text lists its configuration (:func:`hover_columns`). The frames are
prepared by :mod:`prunelab.views` (shared with the static :mod:`prunelab.figures`), which also
gives every criterion its display name and fixed colour; this module only draws. Torch-free: a
plotting notebook never loads a model; plotly is imported when a figure is built.

Over 500 lines because it holds one short plotly drawing function per paper figure (LM, LAP,
MRP, Tanaka, Frankle, Garipov), all in the one style; splitting them by paper would split the
style.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from prunelab import views as V
from prunelab.views import (CONFIG_COLUMNS, collapse_points, hover_columns, lambda_positions,
                            path_barriers)

__all__ = ["CONFIG_COLUMNS", "hover_columns", "lambda_positions", "collapse_points",
           "path_barriers", "accuracy_vs_density", "delta_loss_vs_lambda", "stage_trajectories",
           "delta_loss_scatter", "performance_profile", "layer_density", "collapse_curves",
           "layer_density_heatmap", "interpolation", "penalty_scatter", "penalty_over_training",
           "selection_consistency", "activation_histogram", "loss_plane", "instability",
           "loss_landscape", "search_progress", "accuracy_vs_flops"]


def __dir__():
    return sorted(__all__)


_label = V.axis_label
_require = V.require_columns
_fmt = V.fmt


def _go():
    import plotly.graph_objects as go

    return go


def _subplots(**kwargs):
    from plotly.subplots import make_subplots

    return make_subplots(**kwargs)


def _hover(frame: pd.DataFrame, columns: Sequence[str], lines: Sequence[str] = ()):
    """``customdata`` (values as strings) and a hovertemplate listing ``columns``, then
    ``lines`` (plotly template snippets such as ``"ΔL=%{y:.3g}"``)."""
    columns = list(columns)
    data = (np.array([[_fmt(v) for v in frame[c]] for c in columns], dtype=object).T
            if columns else None)
    parts = [f"{c}=%{{customdata[{i}]}}" for i, c in enumerate(columns)] + list(lines)
    return data, "<br>".join(parts) + "<extra></extra>"


def _chance_line(fig, frame: pd.DataFrame, y: str, chance) -> None:
    level = V.chance_level(frame, y, chance)
    if level is not None:
        fig.add_hline(y=level, line_dash="dot", line_color="gray", line_width=1,
                      annotation_text=f"chance {level:.3g}", annotation_position="bottom left")


def accuracy_vs_density(frame: pd.DataFrame, *, x: str = "density", y: str = "accuracy",
                        color: str = "criterion", chance=None, title: str | None = None):
    """Accuracy vs fraction of weights remaining, log-x, mean ± std over seeds (LAP Fig. 3).

    Args:
        frame: tidy rows with columns ``x``, ``y`` and ``color`` (and optionally ``seed``).
        x: fraction remaining column (log axis).
        y: metric column.
        color: one line per value of this column (criteria by their display name and colour).
        chance: the chance line: a number, False for none, or None to take 1 / num_classes
            from a ``num_classes`` column (see :func:`prunelab.views.chance_level`).
        title: figure title.
    """
    go = _go()
    _require(frame, [x, y, color])
    agg = V.aggregate(frame, x, y, color)
    colors = V.palette(list(pd.unique(agg[color])))
    fig = go.Figure()
    for name, part in agg.groupby(color, sort=False):
        fig.add_trace(go.Scatter(
            x=part[x], y=part["mean"], name=V.display_name(name), mode="lines+markers",
            line=dict(color=colors[name]),
            error_y=dict(type="data", array=part["std"], visible=bool((part["std"] > 0).any())),
            customdata=part[["count"]].to_numpy(),
            hovertemplate=(f"{color}={name}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4f}}"
                           "<br>runs=%{customdata[0]}<extra></extra>")))
    _chance_line(fig, frame, y, chance)
    fig.update_xaxes(type="log", title=_label(x), autorange="reversed")
    fig.update_yaxes(title=_label(y, frame))
    fig.update_layout(title=title or f"{_label(y, frame)} vs fraction of weights remaining",
                      template="plotly_white", legend_title=color)
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 1
def delta_loss_vs_lambda(frame: pd.DataFrame, *, criterion_col: str = "criterion",
                         x: str = "lam", y: str = "delta_loss", line: str = "stages",
                         dash: str | None = None, reference: str | None = "mp",
                         zero_decades: float = 1.0, title: str | None = None):
    """ΔL vs the step-size penalty λ, one panel per criterion, one line per π (LM paper Fig. 1).

    Lines are the mean over seeds with ± std error bars; the y axes (ΔL) are log-scaled and
    shared. The x axis is log-scaled; λ = 0 is drawn ``zero_decades`` decades left of the
    smallest positive λ and its tick is labelled "0" (the hover text shows the true λ).
    The ``reference`` criterion (MP, invariant to λ and π) is not given a panel: its mean ΔL
    over all its runs is a dashed black horizontal line in every panel. Diverged runs (NaN or
    infinite ΔL) leave a gap. Frames prepared by :func:`prunelab.views.lambda_view`.

    Args:
        frame: one row per run (a sweep at one sparsity, schedule, architecture).
        criterion_col: one panel per value.
        x: the λ column.
        y: the plotted measurement.
        line: one line per value (π by default).
        dash: optional second grouping drawn with line dashes (e.g. ``"schedule"``, LM Fig. 2
            right: exponential solid, linear dotted).
        reference: the criterion drawn as the dashed reference, or None.
        zero_decades: how far left of the smallest positive λ the λ = 0 points sit.
        title: figure title.

    Raises:
        ValueError: a column is missing, no criterion besides ``reference`` is present, or
            several runs share a (criterion, line, dash, λ, seed) setting.
    """
    go = _go()
    view = V.lambda_view(frame, criterion_col=criterion_col, x=x, y=y, line=line, dash=dash,
                         reference=reference, zero_decades=zero_decades)
    groups = view.groups
    fig = _subplots(rows=1, cols=len(view.criteria), shared_yaxes=True, horizontal_spacing=0.03,
                    subplot_titles=[V.display_name(c) for c in view.criteria])
    colors = V.palette(view.line_levels)
    dashes = {v: V.DASHES[i % len(V.DASHES)] for i, v in enumerate(view.dash_levels)}
    shown: set[str] = set()
    for col, crit in enumerate(view.criteria, start=1):
        agg = view.lines[view.lines[criterion_col] == crit]
        for key, g in agg.groupby(groups, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            name = ", ".join(f"{'π' if c == 'stages' else c}={_fmt(v)}"
                             for c, v in zip(groups, key))
            data, template = _hover(g.assign(std=g[f"{y}_std"]),
                                    [criterion_col, *groups, x, "n", "std"],
                                    [f"mean {y}=%{{y:.4g}}"])
            fig.add_trace(go.Scatter(
                x=g["_x"], y=g[f"{y}_mean"], name=name, legendgroup=name,
                showlegend=name not in shown, mode="lines+markers",
                line=dict(color=colors[key[0]], dash=dashes.get(key[-1], "solid") if dash
                          else "solid"),
                error_y=dict(type="data", array=g[f"{y}_std"],
                             visible=bool((g[f"{y}_std"] > 0).any())),
                customdata=data, hovertemplate=template), row=1, col=col)
            shown.add(name)

    if view.reference is not None:
        mean, std, n = view.reference
        for col in range(1, len(view.criteria) + 1):
            fig.add_trace(go.Scatter(
                x=list(view.span), y=[mean, mean], mode="lines",
                name=V.display_name(reference), legendgroup="ref", showlegend=col == 1,
                line=dict(color="black", dash="dash", width=1.5),
                hovertemplate=(f"{reference} (invariant to λ and π)<br>{y}={mean:.4g} ± "
                               f"{std:.2g}<br>runs={n}<extra></extra>")), row=1, col=col)

    ticktext = ["0" if k is None else f"10<sup>{k}</sup>" for k in view.tickexps]
    fig.update_xaxes(type="log", tickvals=view.tickvals, ticktext=ticktext,
                     title_text=_label(x))
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text=_label(y), row=1, col=1)
    fig.update_layout(title=title or f"{_label(y)} vs {_label(x)}, one line per {_label(line)}",
                      template="plotly_white", legend_title_text="")
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 2
def stage_trajectories(history: pd.DataFrame, *, x: str = "sparsity",
                       color: str | Sequence[str] | None = None, log_y: bool = True,
                       title: str | None = None):
    """ΔL so far and ‖Δθ‖ at each pruning stage (LM paper Fig. 2, left and middle).

    Left panel: ``delta_loss`` (ΔL of the model after that stage vs the dense one) against
    ``x`` (``"sparsity"`` or ``"stage"``), markers at the stages. Right panel: ``step_norm``
    (‖Δθ‖ of that stage's step) against the stage. One line per level of ``color``; several
    seeds are averaged (mean ± std).

    Args:
        history: ``PruneResult.history`` frames, concatenated with the columns that tell them
            apart (schedule, criterion, seed …).
        x: x of the left panel.
        color: column(s) giving one line each; default: those of arch, criterion, schedule,
            stages, lam that vary in ``history``.
        log_y: log scale for ΔL.
        title: figure title.
    """
    go = _go()
    _require(history, ["stage", "delta_loss", "step_norm", x])
    groups = V.group_columns(history, color)
    if "seed" in history.columns:
        V.check_unique(history, [*groups, "stage", "seed"])
    elif history.duplicated([*groups, "stage"]).any():
        raise ValueError(f"several rows per {[*groups, 'stage']}: pass color= to tell the "
                         "histories apart (e.g. color='schedule')")
    frame = history if groups else history.assign(_all="history")
    keys = groups or ["_all"]
    values = ["delta_loss", "step_norm"] + ([x] if x != "stage" else [])
    agg = V.summary(frame, [*keys, "stage"], values).sort_values([*keys, "stage"])
    fig = _subplots(rows=1, cols=2, horizontal_spacing=0.1,
                    subplot_titles=["ΔL(θ, Δθ) after each stage", "‖Δθ‖ of each stage"])
    colors = V.palette(list(pd.unique(agg[keys[0]])) if len(keys) == 1 else [])
    for i, (key, g) in enumerate(agg.groupby(keys, sort=False)):
        key = key if isinstance(key, tuple) else (key,)
        name = " · ".join(V.display_name(v) for v in key)
        color_ = colors.get(key[0], V.FALLBACK_COLORS[i % len(V.FALLBACK_COLORS)])
        xs = g["stage"] if x == "stage" else g[f"{x}_mean"]
        cols = [c for c in keys if c != "_all"] + ["stage", "n"]
        g = g.assign(**({x: g[f"{x}_mean"]} if x != "stage" else {}))
        data, template = _hover(g, cols + ([x] if x != "stage" else []),
                                ["%{meta}=%{y:.4g}"])
        for col, value in ((1, "delta_loss"), (2, "step_norm")):
            std = g[f"{value}_std"]
            fig.add_trace(go.Scatter(
                x=xs if col == 1 else g["stage"], y=g[f"{value}_mean"], name=name,
                legendgroup=name, showlegend=col == 1, mode="lines+markers", meta=_label(value),
                line=dict(color=color_), marker=dict(size=5),
                error_y=dict(type="data", array=std, visible=bool((std > 0).any())),
                customdata=data, hovertemplate=template), row=1, col=col)
    fig.update_xaxes(title_text=_label(x), row=1, col=1)
    fig.update_xaxes(title_text="stage", row=1, col=2)
    fig.update_yaxes(title_text=_label("delta_loss"), type="log" if log_y else "linear",
                     row=1, col=1)
    fig.update_yaxes(title_text=_label("step_norm"), row=1, col=2)
    fig.update_layout(title=title or "Pruning trajectory per stage", template="plotly_white",
                      legend_title_text=" · ".join(groups))
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 3
def delta_loss_scatter(frame: pd.DataFrame, x: str = "delta_loss", y: str = "val_error_gap_ft",
                       color: str | None = "criterion", *, ci: float = 0.95, n_boot: int = 2000,
                       seed: int = 0, title: str | None = None):
    """One point per run: ``y`` (validation error gap after fine-tuning) against ΔL on a log
    x axis, with Spearman's ρ over all runs and its bootstrap interval in the title
    (LM paper Fig. 3; :func:`prunelab.metrics.spearman`).

    Error gaps missing from the frame are derived by :func:`prunelab.metrics.error_gaps`.
    ρ uses every run; runs with ΔL ≤ 0 or infinite cannot sit on the log axis and are counted
    in the title instead.

    Args:
        frame: one row per run (a sweep's results).
        x, y: the columns to correlate.
        color: one trace (colour) per value, or None.
        ci, n_boot, seed: of the bootstrap interval of ρ.
        title: put above the ρ line.

    Raises:
        ValueError: a column is missing or holds NaN (from ``metrics.spearman``).
    """
    from prunelab import metrics

    go = _go()
    if y not in frame.columns and y in ("val_error_gap", "val_error_gap_ft", "test_error_gap",
                                        "test_error_gap_ft"):
        frame = metrics.error_gaps(frame)
    _require(frame, [x, y] + ([color] if color else []))
    stat = metrics.spearman(frame, x, y, ci=ci, n_boot=n_boot, seed=seed)
    values = frame[x].to_numpy(dtype=float)
    hidden = int((~(np.isfinite(values) & (values > 0))).sum())
    columns = hover_columns(frame, extra=["key"])
    fig = go.Figure()
    parts = frame.groupby(color, sort=False) if color else [("runs", frame)]
    colors = V.palette(list(pd.unique(frame[color])) if color else ["runs"])
    for name, part in parts:
        name = name[0] if isinstance(name, tuple) else name
        data, template = _hover(part, columns, [f"{x}=%{{x:.4g}}", f"{y}=%{{y:.4g}}"])
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers",
                                 name=V.display_name(name),
                                 marker=dict(size=8, opacity=0.8, color=colors[name]),
                                 customdata=data,
                                 hovertemplate=template))
    rho = f"{V.spearman_title(stat, ci)}, n = {stat['n']}"
    if hidden:
        rho += f"; {hidden} runs with {_label(x)} ≤ 0 or ∞ not drawn"
    fig.update_xaxes(type="log", title_text=_label(x))
    fig.update_yaxes(title_text=_label(y, frame))
    fig.update_layout(title=f"{title}<br><sup>{rho}</sup>" if title else rho,
                      template="plotly_white", legend_title_text=color or "")
    return fig


# ----------------------------------------------------------------------------- MRP Sec. 4.3
def performance_profile(profile: pd.DataFrame, *, method: str = "method", tau: str = "tau",
                        fraction: str = "fraction", title: str | None = None,
                        pair_prefix: str | None = None, kind: str | None = None):
    """Performance profiles as step lines, from :func:`prunelab.metrics.performance_profile`;
    higher curves are better.

    ``kind="mrp"`` (MRP paper Fig. 5): over τ ∈ [0, 1], y is the fraction of measurements in
    which a method's penalty is strictly below τ·best + (1 − τ)·worst. ``kind="dolan-more"``:
    over the ratio to the best τ ≥ 1 (log axis), y is the fraction of problems with ratio ≤ τ.
    ``kind=None`` reads it from the profile (``attrs["kind"]``, else the τ range). The steps are
    drawn "hv": each value holds until the next τ.

    With ``pair_prefix="bp_"`` each MRP score and its mean-replacement twin share a colour and
    the one without mean replacement is dashed, as in MRP Fig. 5.
    """
    go = _go()
    _require(profile, [method, tau, fraction])
    kind = V.profile_kind(profile, tau, kind)
    fig = go.Figure()
    style = V.pair_styles(list(pd.unique(profile[method])), pair_prefix)
    for name, part in profile.groupby(method, sort=False):
        part = part.sort_values(tau)
        color, dashed = style[name]
        fig.add_trace(go.Scatter(
            x=part[tau], y=part[fraction], name=V.display_name(name), mode="lines",
            line_shape="hv", line=dict(color=color, dash="dash" if dashed else "solid"),
            hovertemplate=f"{method}={name}<br>τ=%{{x:.3g}}<br>fraction=%{{y:.3f}}<extra></extra>"))
    if kind == "mrp":
        fig.update_xaxes(title_text="τ (threshold τ·best + (1 − τ)·worst)", range=[0, 1])
        ylabel = "fraction of measurements below the threshold"
    else:
        fig.update_xaxes(title_text="τ (ratio to the best)", type="log")
        ylabel = "fraction of problems with ratio ≤ τ"
    fig.update_yaxes(title_text=ylabel, range=[-0.02, 1.02])
    fig.update_layout(title=title or ("Performance profile" if kind == "mrp" else
                                      "Performance profile (Dolan & Moré)"),
                      template="plotly_white", legend_title_text=method)
    return fig


# ----------------------------------------------------------------------------- masks
def layer_density(density_frame: pd.DataFrame, *, layer: str = "layer",
                  density: str = "density", color: str | None = None,
                  title: str | None = None):
    """Fraction of weights kept per layer as bars (a ``pl.masks.density`` frame).

    The ``total`` row is not a layer: it is drawn as a dashed horizontal line instead.

    Args:
        density_frame: rows layer, numel, kept, density (and ``color`` if given).
        layer: the layer-name column.
        density: the fraction-kept column.
        color: one bar group per value (e.g. criterion), or None.
        title: figure title.

    Raises:
        ValueError: a layer appears several times per ``color`` level, e.g. a
            ``pl.collapse.layer_density`` frame (use :func:`layer_density_heatmap` or
            :func:`collapse_curves` for those).
    """
    go = _go()
    rows, totals = V.density_bars(density_frame, layer=layer, density=density, color=color)
    fig = go.Figure()
    columns = [c for c in (layer, "numel", "kept") if c in rows.columns]
    parts = rows.groupby(color, sort=False) if color else [(None, rows)]
    colors = V.palette(list(pd.unique(rows[color])) if color else [None])
    for name, part in parts:
        name = name[0] if isinstance(name, tuple) else name
        data, template = _hover(part, ([color] if color else []) + columns,
                                ["density=%{y:.4f}"])
        fig.add_trace(go.Bar(x=part[layer], y=part[density],
                             name=V.display_name(name) if color else density,
                             marker_color=colors[name], customdata=data,
                             hovertemplate=template))
    for name, total in totals.items():
        who = "" if name is None else f" {V.display_name(name)}"
        fig.add_hline(y=total, line_dash="dash",
                      line_color="black" if name is None else colors[name],
                      annotation_text=f"total{who} {total:.3g}", annotation_position="top left")
    fig.update_xaxes(title_text=layer, type="category")
    fig.update_yaxes(title_text="fraction of weights kept", range=[0, 1.05])
    fig.update_layout(title=title or "Density per layer", template="plotly_white",
                      barmode="group", showlegend=bool(color), legend_title_text=color or "")
    return fig


# ----------------------------------------------------------------------------- layer collapse
def collapse_curves(frame: pd.DataFrame, *, y: str | None = None, criterion: str = "criterion",
                    x: str = "compression", chance=None, title: str | None = None):
    """``y`` against the compression ratio ρ (log x), one line per criterion, collapsed points
    marked with an x (Tanaka et al. 2020, Fig. 1 / Fig. 3).

    Args:
        frame: a ``collapse.accuracy_vs_compression`` frame (default ``y="accuracy"``) or a
            ``collapse.layer_density`` frame (aggregated per ρ; default
            ``y="min_layer_density"``, the smallest fraction kept in any layer; ``"density"``
            is the overall fraction remaining).
        y: the plotted column; several seeds are averaged.
        criterion: one line per value.
        x: the compression-ratio column (log axis).
        chance: the chance line of an accuracy ``y`` (see :func:`accuracy_vs_density`).
        title: figure title.
    """
    go = _go()
    agg, y, log_y = V.collapse_view(frame, y=y, criterion=criterion, x=x)
    colors = V.palette(list(pd.unique(agg[criterion])))
    fig = go.Figure()
    for name, part in agg.groupby(criterion, sort=False):
        part = part.sort_values(x)
        color = colors[name]
        fig.add_trace(go.Scatter(
            x=part[x], y=part["shown"], name=V.display_name(name), legendgroup=str(name),
            mode="lines+markers", line=dict(color=color), marker=dict(size=5),
            customdata=part[["value"]].to_numpy(),
            hovertemplate=(f"{criterion}={name}<br>ρ=%{{x:.4g}}<br>{y}=%{{customdata[0]:.4g}}"
                           "<extra></extra>")))
        hit = part[part["collapsed"]]
        if len(hit):
            fig.add_trace(go.Scatter(
                x=hit[x], y=hit["shown"], name=f"{name} collapsed", legendgroup=str(name),
                showlegend=False, mode="markers",
                marker=dict(symbol="x", size=11, color=color, line=dict(width=1)),
                hovertemplate=(f"{criterion}={name}<br>ρ=%{{x:.4g}}<br>layer collapse"
                               "<extra></extra>")))
    if not log_y:
        _chance_line(fig, frame, y, chance)
    fig.update_xaxes(type="log", title_text=_label(x))
    fig.update_yaxes(title_text=_label(y, frame) + (" (0 drawn at the bottom)" if log_y else ""),
                     type="log" if log_y else "linear")
    fig.update_layout(title=title or f"{_label(y)} vs compression (x: layer collapse)",
                      template="plotly_white", legend_title_text=criterion)
    return fig


def layer_density_heatmap(frame: pd.DataFrame, *, criterion: str | None = None,
                          criterion_col: str = "criterion", x: str = "compression",
                          title: str | None = None):
    """Layers × compression ratio, colour = fraction of the layer kept (log colour scale),
    collapsed cells (every weight pruned) marked with an x (Tanaka et al. 2020, Fig. 3 data).

    Args:
        frame: a ``collapse.layer_density`` frame.
        criterion: the criterion to show (required when the frame holds several).
    """
    go = _go()
    _require(frame, ["layer", x, "density", "collapsed"])
    criterion = V.pick_criterion(frame, criterion, criterion_col)
    layers, rhos, z, dead = V.density_matrix(frame, criterion, criterion_col, x)
    cols = [f"{r:.3g}" for r in rhos]
    logz = np.log10(np.clip(z.to_numpy(dtype=float), 1e-6, None))
    lo = float(np.floor(np.nanmin(logz))) if np.isfinite(logz).any() else -6.0
    ticks = list(range(int(lo), 1))
    fig = go.Figure(go.Heatmap(
        z=logz, x=cols, y=layers, colorscale="Viridis", zmin=lo, zmax=0.0,
        customdata=z.to_numpy(dtype=float),
        colorbar=dict(title="density", tickvals=ticks, ticktext=[f"1e{t}" for t in ticks]),
        hovertemplate="layer=%{y}<br>ρ=%{x}<br>density=%{customdata:.4g}<extra></extra>"))
    ii, jj = np.nonzero(dead.to_numpy())
    fig.add_trace(go.Scatter(x=[cols[j] for j in jj], y=[layers[i] for i in ii], mode="markers",
                             name="collapsed", marker=dict(symbol="x", size=10, color="red"),
                             hovertemplate="layer=%{y}<br>ρ=%{x}<br>collapsed<extra></extra>"))
    fig.update_xaxes(title_text="compression ratio ρ", type="category")
    fig.update_yaxes(title_text="layer", type="category", autorange="reversed")
    fig.update_layout(title=title or f"Density per layer ({V.display_name(criterion)}); "
                      "x: layer collapse",
                      template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- connectivity
def interpolation(frame: pd.DataFrame, *, y: str = "loss", x: str = "t",
                  groups: Sequence[str] | None = None, title: str | None = None):
    """``y`` (loss or error) along paths between two networks, one line per path/split, the
    barrier (max minus the mean of the endpoints) in each legend entry (Frankle et al. Fig. 1;
    Garipov et al. Fig. 2).

    Args:
        frame: ``connectivity.interpolate`` / ``curve_frame`` frames, concatenated with a
            ``path`` column (e.g. "segment", "bezier") when there are several.
        groups: columns giving one line each; default those of path, split present.
    """
    go = _go()
    _require(frame, [x, y])
    groups = V.path_groups(frame, groups)
    barriers = path_barriers(frame, y=y, x=x, groups=groups)
    fig = go.Figure()
    parts = frame.groupby(groups, sort=False) if groups else [("path", frame)]
    dashes = {}
    if "split" in groups:
        dashes = {s: V.DASHES[i % len(V.DASHES)]
                  for i, s in enumerate(pd.unique(frame["split"]))}
    first = [g for g in groups if g != "split"]
    colors = V.palette(list(pd.unique(frame[first[0]]))) if first else {}
    for i, (key, part) in enumerate(parts):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(map(str, key))
        named = dict(zip(groups, key))
        part = part.sort_values(x)
        color = colors.get(named.get(first[0]) if first else None,
                           V.FALLBACK_COLORS[i % len(V.FALLBACK_COLORS)])
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], mode="lines+markers", marker=dict(size=4),
            name=f"{label} (barrier {barriers[label]:.3g})",
            line=dict(color=color, dash=dashes.get(named.get("split"), "solid")),
            hovertemplate=f"{label}<br>t=%{{x:.3f}}<br>{y}=%{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title_text=x, range=[-0.02, 1.02] if x == "t" else None)
    fig.update_yaxes(title_text=_label(y))
    fig.update_layout(title=title or f"{_label(y)} along the path (barrier = max − mean of "
                      "endpoints)", template="plotly_white", legend_title_text="")
    return fig


# ------------------------------------------------------------- MRP Sec. 4 (mean replacement)
def penalty_scatter(pairs: pd.DataFrame, *, color: str = "base", title: str | None = None):
    """Pruning penalty without (x) vs with (y) mean replacement, one point per measurement and
    score, with the line y = x (MRP Figs. 3-4). Points under the line: mean replacement helped.

    Args:
        pairs: :func:`prunelab.units.bp_pairs` frame (``without``, ``with``, ``below``, keys).
        color: one colour per value of this column.
    """
    go = _go()
    _require(pairs, ["without", "with", color])
    keys = [c for c in ("seed", "layer_set", "fraction", "step", "layers") if c in pairs]
    fig = go.Figure()
    colors = V.palette(list(pd.unique(pairs[color])))
    for name, part in pairs.groupby(color, sort=False):
        data, template = _hover(part, [color] + keys, ["without=%{x:.4g}", "with=%{y:.4g}"])
        below = part["with"].lt(part["without"]).mean()
        fig.add_trace(go.Scatter(x=part["without"], y=part["with"], mode="markers",
                                 name=f"{V.display_name(name)} ({below:.0%} below)",
                                 marker=dict(color=colors[name], size=6, opacity=0.7),
                                 customdata=data, hovertemplate=template))
    lo = float(min(pairs["without"].min(), pairs["with"].min())) if len(pairs) else 0.0
    hi = float(max(pairs["without"].max(), pairs["with"].max())) if len(pairs) else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
    below = float(pairs["with"].lt(pairs["without"]).mean()) if len(pairs) else float("nan")
    fig.update_xaxes(title_text="pruning penalty without mean replacement (nats)")
    fig.update_yaxes(title_text="pruning penalty with mean replacement, bp_ (nats)")
    fig.update_layout(title=title or f"Mean replacement: {below:.0%} of points below y = x",
                      template="plotly_white", legend_title_text=color)
    return fig


def penalty_over_training(frame: pd.DataFrame, *, y: str = "penalty", x: str = "step",
                          color: str = "score", title: str | None = None):
    """Pruning penalty of each score over training steps (MRP Fig. 2), mean ± std over the
    other rows at the same (score, step) — e.g. seeds. Scores with the ``bp_`` prefix are
    solid, their twins without mean replacement dashed in the same colour."""
    go = _go()
    _require(frame, [x, y, color])
    agg = V.aggregate(frame, x, y, color)
    style = V.pair_styles(list(pd.unique(agg[color])), "bp_")
    fig = go.Figure()
    for name, part in agg.groupby(color, sort=False):
        c, dashed = style[name]
        fig.add_trace(go.Scatter(
            x=part[x], y=part["mean"], name=V.display_name(name), mode="lines+markers",
            line=dict(color=c, dash="dash" if dashed else "solid"), marker=dict(size=4),
            error_y=dict(type="data", array=part["std"], visible=bool((part["std"] > 0).any())),
            customdata=part[["count"]].to_numpy(),
            hovertemplate=(f"{color}={name}<br>{x}=%{{x}}<br>{y}=%{{y:.4g}}"
                           "<br>n=%{customdata[0]}<extra></extra>")))
    fig.update_xaxes(title_text=_label(x))
    fig.update_yaxes(title_text=_label(y))
    fig.update_layout(title=title or "Pruning penalty during training", template="plotly_white",
                      legend_title_text=color)
    return fig


def selection_consistency(frame: pd.DataFrame, *, title: str | None = None):
    """Accumulated fraction of units ever selected per score over training (MRP Fig. 7), from
    :meth:`prunelab.units.PenaltyRecorder.consistency`. Lower = a more consistent choice."""
    go = _go()
    _require(frame, ["step", "score", "fraction_ever_selected"])
    style = V.pair_styles(list(pd.unique(frame["score"])), "bp_")
    fig = go.Figure()
    for name, part in frame.groupby("score", sort=False):
        c, dashed = style[name]
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["fraction_ever_selected"],
                                 name=V.display_name(name), mode="lines",
                                 line=dict(color=c, dash="dash" if dashed else "solid"),
                                 hovertemplate=(f"score={name}<br>step=%{{x}}<br>"
                                                "fraction=%{y:.3f}<extra></extra>")))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="fraction of units ever selected", range=[0, 1.02])
    fig.update_layout(title=title or "Selection consistency", template="plotly_white")
    return fig


def activation_histogram(frame: pd.DataFrame, *, scores: Sequence[str] | None = None,
                         value: str = "sq_activation", bins: int = 40,
                         title: str | None = None):
    """Histogram of the mean squared activation of the units each score selected (MRP Fig. 6b),
    from :meth:`prunelab.units.PenaltyRecorder.activations`; log10 x axis (zeros dropped)."""
    go = _go()
    positive, edges = V.histogram_edges(frame, value, bins, scores)
    scores = list(pd.unique(frame["score"])) if scores is None else list(scores)
    colors = V.palette(scores)
    fig = go.Figure()
    for name in scores:
        vals = positive.loc[positive["score"] == name, "log10"].to_numpy()
        fig.add_trace(go.Histogram(x=vals, name=V.display_name(name), opacity=0.55,
                                   xbins=dict(start=edges[0], end=edges[-1],
                                              size=edges[1] - edges[0]),
                                   marker_color=colors[name]))
    fig.update_layout(barmode="overlay", template="plotly_white",
                      title=title or "Squared activations of the selected units")
    fig.update_xaxes(title_text="log10 mean squared activation E[a²]")
    fig.update_yaxes(title_text="units selected (over all measurements)")
    return fig


# ------------------------------------------------------------------ loss plane (Garipov Fig. 1)
def loss_plane(frame: pd.DataFrame, *, z: str = "loss", split: str | None = None,
               labels: Sequence[str] = ("a", "b", "c"), log: bool = True,
               title: str | None = None):
    """Contour of ``z`` over the plane through three models (Garipov et al. Fig. 1), from
    :func:`prunelab.connectivity.plane`; the three models are marked (``frame.attrs["points"]``).

    Args:
        frame: columns ``u, v, z`` (and ``split`` if the plane was evaluated on several).
        z: "loss" or "error".
        split: the split to draw when the frame has several.
        labels: names of the three models, in the order given to ``plane`` (a, b, c).
        log: colour by log10 of ``z`` (losses span decades away from the minima).
    """
    go = _go()
    _require(frame, ["u", "v", z])
    data = frame
    if "split" in frame.columns:
        splits = list(pd.unique(frame["split"]))
        if split is None:
            if len(splits) > 1:
                raise ValueError(f"the frame holds splits {splits}: pass split=")
            split = splits[0]
        if split not in splits:
            raise ValueError(f"split {split!r} not in the frame; it has {splits}")
        data = frame[frame["split"] == split]
    grid = data.pivot_table(index="v", columns="u", values=z, aggfunc="first").sort_index()
    values = grid.to_numpy(dtype=float)
    shown = np.log10(np.maximum(values, 1e-12)) if log else values
    fig = go.Figure(go.Contour(
        x=grid.columns.to_numpy(), y=grid.index.to_numpy(), z=shown, colorscale="Viridis",
        ncontours=25, customdata=values,
        colorbar=dict(title=("log10 " if log else "") + z),
        hovertemplate=f"u=%{{x:.3g}}<br>v=%{{y:.3g}}<br>{z}=%{{customdata:.4g}}<extra></extra>"))
    points = frame.attrs.get("points")
    if points:
        pts = np.asarray(list(points.values()) if isinstance(points, dict) else points,
                         dtype=float)
        fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="markers+text",
                                 text=list(labels)[:len(pts)], textposition="top center",
                                 marker=dict(color="white", size=10,
                                             line=dict(color="black", width=1.5)),
                                 showlegend=False, hoverinfo="text"))
    fig.update_xaxes(title_text="u (along b − a)")
    fig.update_yaxes(title_text="v", scaleanchor="x", scaleratio=1)
    fig.update_layout(title=title or f"{split + ' ' if split else ''}{z} on the plane through "
                      "three models", template="plotly_white")
    return fig


def instability(barriers: pd.DataFrame, *, x: str = "k", y: str = "barrier",
                color: str | None = None, title: str | None = None):
    """Instability (barrier of the linear path between two copies split at step ``k``) vs
    ``k`` (Frankle et al. 2020, Fig. 3; Figs. 5-6 for sparse subnetworks), from
    :func:`prunelab.connectivity.instability_curve`; ``color`` names a column with one line per
    value (e.g. dense vs sparse frames concatenated)."""
    go = _go()
    _require(barriers, [x, y] + ([color] if color else []))
    metric = (str(barriers["metric"].iloc[0]) if "metric" in barriers and len(barriers)
              else "error")
    groups = barriers.groupby(color, sort=False) if color else [(None, barriers)]
    colors = V.palette(list(pd.unique(barriers[color])) if color else [None])
    fig = go.Figure()
    for name, part in groups:
        part = part.sort_values(x)
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers",
                                 name=None if name is None else V.display_name(name),
                                 showlegend=name is not None, line=dict(color=colors[name]),
                                 hovertemplate=f"k=%{{x}}<br>{metric} barrier=%{{y:.4g}}"
                                               "<extra></extra>"))
    fig.update_xaxes(title_text="rewinding / splitting step k (training steps)")
    fig.update_yaxes(title_text=f"{metric} barrier (instability)")
    fig.update_layout(title=title or "Instability vs the step the two copies split at",
                      template="plotly_white")
    return fig


# ------------------------------------------------------------- loss landscape (Li et al. 2018)
def loss_landscape(frame: pd.DataFrame, *, z: str = "loss", kind: str = "contour",
                   network: str = "network", title: str | None = None):
    """Loss landscape along filter-normalised random directions (Li et al. 2018, Figs. 1, 5),
    from :func:`prunelab.landscape.line`, :func:`~prunelab.landscape.surface` or
    :func:`~prunelab.landscape.compare`.

    1-D frames: one line of ``z`` over α per network. 2-D frames: one panel per network side
    by side, ``kind="contour"`` (default) or ``"surface"`` (3-D), on one shared colour scale.
    """
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}")
    go = _go()
    view = V.landscape_view(frame, z=z, network=network)
    names = [name for name, _ in view.parts]
    label = _label(z)
    if view.dims == 1:
        colors = V.palette(names)
        fig = go.Figure()
        for name, part in view.parts:
            fig.add_trace(go.Scatter(
                x=part["alpha"], y=part[z], mode="lines+markers",
                name=None if name is None else V.display_name(name), showlegend=name is not None,
                line=dict(color=colors[name]),
                hovertemplate=f"α=%{{x:.3g}}<br>{z}=%{{y:.4g}}<extra></extra>"))
        fig.update_xaxes(title_text=_label("alpha"))
        fig.update_yaxes(title_text=label)
    else:
        n = len(view.parts)
        titles = [V.display_name(name) if name is not None else "" for name in names]
        spec = {"type": "scene"} if kind == "surface" else {}
        fig = _subplots(rows=1, cols=n, subplot_titles=titles, specs=[[spec] * n],
                        horizontal_spacing=0.08)
        lo, hi = view.zrange
        for i, (name, grid) in enumerate(view.parts, start=1):
            common = dict(x=grid.columns.to_numpy(), y=grid.index.to_numpy(),
                          z=grid.to_numpy(dtype=float), colorscale="Viridis", zmin=lo, zmax=hi,
                          showscale=i == n, colorbar=dict(title=z),
                          hovertemplate=f"α=%{{x:.3g}}<br>β=%{{y:.3g}}<br>{z}=%{{z:.4g}}"
                                        "<extra></extra>")
            if kind == "surface":
                common.pop("zmin"), common.pop("zmax")
                trace = go.Surface(cmin=lo, cmax=hi, **common)
            else:
                trace = go.Contour(ncontours=25, **common)
            fig.add_trace(trace, row=1, col=i)
        if kind == "surface":
            fig.update_scenes(xaxis_title_text="α", yaxis_title_text="β", zaxis_title_text=z)
        else:
            fig.update_xaxes(title_text=_label("alpha"))
            fig.update_yaxes(title_text=_label("beta"), col=1)
    fig.update_layout(title=title or f"{label} along filter-normalised random directions",
                      template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- MetaPruning
def search_progress(generations: pd.DataFrame, *,
                    title: str = "MetaPruning search: best accuracy per generation"):
    """Best validation accuracy so far per generation of an evolutionary search (Liu et al.
    2019, Algorithm 1), one line per (budget, seed) when the frame has them, from
    ``pl.metapruning.SearchResult.generations`` or ``Comparison.searches``."""
    go = _go()
    _require(generations, ["generation", "best_accuracy"])
    fig = go.Figure()
    keys = [k for k in ("budget", "seed") if k in generations.columns]
    groups = generations.groupby(keys, sort=True) if keys else [((), generations)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k} = {v:g}" for k, v in zip(keys, key)) or "search"
        fig.add_trace(go.Scatter(x=part["generation"], y=part["best_accuracy"],
                                 mode="lines+markers", name=f"best ({label})"))
        if "generation_mean" in part.columns and not keys:
            fig.add_trace(go.Scatter(x=part["generation"], y=part["generation_mean"],
                                     mode="lines", line={"dash": "dot"}, name="generation mean"))
    fig.update_layout(template="plotly_white", title=title, xaxis_title="generation",
                      yaxis_title="validation accuracy (generated weights, fraction)")
    return fig


def accuracy_vs_flops(frame: pd.DataFrame, *, x: str = "budget", y: str = "accuracy",
                      color: str = "method", reference: str | None = "dense",
                      title: str | None = None):
    """Accuracy vs FLOPs budget (fraction of the dense network's), mean ± std over seeds, one
    line per method; the ``reference`` method (the dense net) as a horizontal line (MetaPruning
    comparison, ``pl.metapruning.compare(...).frame``)."""
    go = _go()
    _require(frame, [x, y, color])
    rest = frame[frame[color] != reference] if reference is not None else frame
    agg = V.aggregate(rest, x, y, color)
    colors = V.palette(list(pd.unique(agg[color])))
    fig = go.Figure()
    for name, part in agg.groupby(color, sort=False):
        fig.add_trace(go.Scatter(x=part[x], y=part["mean"], mode="lines+markers",
                                 name=V.display_name(name), line={"color": colors[name]},
                                 error_y={"type": "data", "array": part["std"]}))
    if reference is not None and (frame[color] == reference).any():
        fig.add_hline(y=float(frame.loc[frame[color] == reference, y].mean()), line_dash="dash",
                      line_color="gray", annotation_text=V.display_name(reference))
    fig.update_layout(template="plotly_white", title=title,
                      xaxis_title="FLOPs budget (fraction of the dense network)",
                      yaxis_title=V.axis_label(y, frame))
    return fig
