"""Interactive plotly views of tidy result frames. Frames in, ``go.Figure`` out; never shown.

Every point's hover text lists its configuration (:func:`hover_columns`). Torch-free: a plotting
notebook never loads a model; plotly (and the statistics in ``prunelab.metrics``) are imported
when a figure is built.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

CONFIG_COLUMNS = ("arch", "dataset", "seed", "criterion", "sparsity", "stages", "lam",
                  "schedule", "scope")

# Colours by position, so a level keeps its colour across the panels of one figure.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
# Line dashes for a second grouping; "dash" itself is kept for the MP reference line.
_DASHES = ("solid", "dot", "dashdot", "longdash", "longdashdot")
_LABELS = {"delta_loss": "ΔL(θ, Δθ)", "lam": "λ", "stages": "π", "step_norm": "‖Δθ‖",
           "val_error_gap": "validation error gap before fine-tuning",
           "val_error_gap_ft": "validation error gap after fine-tuning",
           "test_error_gap_ft": "test error gap after fine-tuning"}


def _go():
    import plotly.graph_objects as go

    return go


def _subplots(**kwargs):
    from plotly.subplots import make_subplots

    return make_subplots(**kwargs)


def _label(col: str) -> str:
    return _LABELS.get(col, col.replace("_", " "))


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; it has {list(frame.columns)}")


def _check_unique(frame: pd.DataFrame, keys: Sequence[str]) -> None:
    """Raise if several rows share ``keys``: averaging them would mix settings silently."""
    dup = frame.duplicated(list(keys), keep=False)
    if dup.any():
        varying = [c for c in frame.columns if c not in keys and c in CONFIG_COLUMNS
                   and frame.loc[dup, c].nunique(dropna=False) > 1]
        raise ValueError(f"several rows per {list(keys)}; configuration columns that vary "
                         f"among them: {varying}; filter the frame first")


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _hover(frame: pd.DataFrame, columns: Sequence[str], lines: Sequence[str] = ()):
    """``customdata`` (values as strings) and a hovertemplate listing ``columns``, then
    ``lines`` (plotly template snippets such as ``"ΔL=%{y:.3g}"``)."""
    columns = list(columns)
    data = (np.array([[_fmt(v) for v in frame[c]] for c in columns], dtype=object).T
            if columns else None)
    parts = [f"{c}=%{{customdata[{i}]}}" for i, c in enumerate(columns)] + list(lines)
    return data, "<br>".join(parts) + "<extra></extra>"


def _aggregate(frame: pd.DataFrame, x: str, y: str, group: str) -> pd.DataFrame:
    """mean ± std of ``y`` per (group, x); std is 0 for a single seed."""
    agg = frame.groupby([group, x], sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    return agg


def _summary(frame: pd.DataFrame, keys: list[str], values: Sequence[str]) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one seed) and n per ``keys`` for each of ``values``; infinite
    values (diverged runs) become NaN so they leave a gap instead of breaking the axis."""
    data = frame[keys + list(values)].replace([np.inf, -np.inf], np.nan)
    g = data.groupby(keys, sort=False, dropna=False)
    out = g[list(values)].agg(["mean", "std"])
    out.columns = [f"{v}_{s}" for v, s in out.columns]
    out["n"] = g.size()
    out = out.reset_index()
    for v in values:
        out[f"{v}_std"] = out[f"{v}_std"].fillna(0.0)
    return out


def _levels(series: pd.Series) -> list:
    """Sorted levels for numbers, order of first appearance otherwise."""
    levels = pd.unique(series.dropna())
    return sorted(levels) if pd.api.types.is_numeric_dtype(series) else list(levels)


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


# ----------------------------------------------------------------------------- LM paper Fig. 1
def lambda_positions(lam: pd.Series | np.ndarray, *, zero_decades: float = 1.0) -> np.ndarray:
    """Where each λ is drawn on a log axis: λ > 0 at itself, λ = 0 ``zero_decades`` decades
    left of the smallest positive λ (at 1 if there is none), labelled "0" as in LM Fig. 1."""
    lam = np.asarray(lam, dtype=float)
    positive = lam[lam > 0]
    zero_at = positive.min() / 10.0 ** zero_decades if positive.size else 1.0
    return np.where(lam == 0, zero_at, lam)


def _lambda_ticks(lam: np.ndarray, zero_decades: float) -> tuple[list[float], list[str]]:
    positive = lam[lam > 0]
    vals: list[float] = []
    text: list[str] = []
    if (lam == 0).any():
        vals.append(float(lambda_positions(np.r_[0.0, positive], zero_decades=zero_decades)[0]))
        text.append("0")
    if positive.size:
        lo, hi = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
        step = max(1, math.ceil((hi - lo + 1) / 10))  # at most ~10 decade ticks
        for k in range(lo, hi + 1, step):
            vals.append(10.0 ** k)
            text.append(f"10<sup>{k}</sup>")
    return vals, text


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
    infinite ΔL) leave a gap.

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
    groups = [line] + ([dash] if dash else [])
    _require(frame, [criterion_col, x, y, *groups])
    if "seed" in frame.columns:
        _check_unique(frame, [criterion_col, *groups, x, "seed"])
    is_ref = (frame[criterion_col].astype(str).str.lower() == str(reference).lower()
              if reference is not None else pd.Series(False, index=frame.index))
    ref, rest = frame[is_ref], frame[~is_ref]
    if rest.empty:
        raise ValueError(f"no criterion other than the reference {reference!r} in the frame")

    lam = rest[x].to_numpy(dtype=float)
    rest = rest.assign(_x=lambda_positions(lam, zero_decades=zero_decades))
    criteria = _levels(rest[criterion_col])
    fig = _subplots(rows=1, cols=len(criteria), shared_yaxes=True, horizontal_spacing=0.03,
                    subplot_titles=[str(c) for c in criteria])
    colors = {v: _COLORS[i % len(_COLORS)] for i, v in enumerate(_levels(rest[line]))}
    dashes = ({v: _DASHES[i % len(_DASHES)] for i, v in enumerate(_levels(rest[dash]))}
              if dash else {})
    shown: set[str] = set()
    for col, crit in enumerate(criteria, start=1):
        part = rest[rest[criterion_col] == crit]
        agg = _summary(part, [*groups, x, "_x"], [y]).sort_values([*groups, "_x"])
        for key, g in agg.groupby(groups, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            name = ", ".join(f"{'π' if c == 'stages' else c}={_fmt(v)}"
                             for c, v in zip(groups, key))
            data, template = _hover(g.assign(**{criterion_col: crit, "std": g[f"{y}_std"]}),
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

    if reference is not None and not ref.empty:
        values = ref[y].replace([np.inf, -np.inf], np.nan)
        mean, std, n = values.mean(), values.std(), int(values.notna().sum())
        std = 0.0 if pd.isna(std) else std
        span = [rest["_x"].min() / 10 ** 0.25, rest["_x"].max() * 10 ** 0.25]
        for col in range(1, len(criteria) + 1):
            fig.add_trace(go.Scatter(
                x=span, y=[mean, mean], mode="lines", name=str(reference), legendgroup="ref",
                showlegend=col == 1, line=dict(color="black", dash="dash", width=1.5),
                hovertemplate=(f"{reference} (invariant to λ and π)<br>{y}={mean:.4g} ± "
                               f"{std:.2g}<br>runs={n}<extra></extra>")), row=1, col=col)

    tickvals, ticktext = _lambda_ticks(lam, zero_decades)
    fig.update_xaxes(type="log", tickvals=tickvals, ticktext=ticktext, title_text=_label(x))
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text=_label(y), row=1, col=1)
    fig.update_layout(title=title or f"{_label(y)} vs {_label(x)}, one line per {_label(line)}",
                      template="plotly_white", legend_title_text="")
    return fig


# ----------------------------------------------------------------------------- LM paper Fig. 2
def _group_columns(frame: pd.DataFrame, color: str | Sequence[str] | None) -> list[str]:
    if color is None:  # whatever distinguishes the histories that were concatenated
        return [c for c in ("arch", "criterion", "schedule", "stages", "lam")
                if c in frame.columns and frame[c].nunique(dropna=False) > 1]
    cols = [color] if isinstance(color, str) else list(color)
    _require(frame, cols)
    return cols


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
    groups = _group_columns(history, color)
    if "seed" in history.columns:
        _check_unique(history, [*groups, "stage", "seed"])
    elif history.duplicated([*groups, "stage"]).any():
        raise ValueError(f"several rows per {[*groups, 'stage']}: pass color= to tell the "
                         "histories apart (e.g. color='schedule')")
    frame = history if groups else history.assign(_all="history")
    keys = groups or ["_all"]
    values = ["delta_loss", "step_norm"] + ([x] if x != "stage" else [])
    agg = _summary(frame, [*keys, "stage"], values).sort_values([*keys, "stage"])
    fig = _subplots(rows=1, cols=2, horizontal_spacing=0.1,
                    subplot_titles=["ΔL(θ, Δθ) after each stage", "‖Δθ‖ of each stage"])
    for i, (key, g) in enumerate(agg.groupby(keys, sort=False)):
        key = key if isinstance(key, tuple) else (key,)
        name = " · ".join(_fmt(v) for v in key)
        color_ = _COLORS[i % len(_COLORS)]
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
    columns = hover_columns(frame, extra=[c for c in ("schedule", "finetune", "key")
                                          if c not in CONFIG_COLUMNS])
    fig = go.Figure()
    parts = frame.groupby(color, sort=False) if color else [("runs", frame)]
    for i, (name, part) in enumerate(parts):
        name = name[0] if isinstance(name, tuple) else name
        data, template = _hover(part, columns, [f"{x}=%{{x:.4g}}", f"{y}=%{{y:.4g}}"])
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=str(name),
                                 marker=dict(size=8, opacity=0.8, color=_COLORS[i % len(_COLORS)]),
                                 customdata=data,
                                 hovertemplate=template))
    rho = (f"Spearman ρ = {stat['rho']:.2f} ({ci:.0%} CI [{stat['low']:.2f}, "
           f"{stat['high']:.2f}], n = {stat['n']})")
    if hidden:
        rho += f"; {hidden} runs with {_label(x)} ≤ 0 or ∞ not drawn"
    fig.update_xaxes(type="log", title_text=_label(x))
    fig.update_yaxes(title_text=_label(y))
    fig.update_layout(title=f"{title}<br><sup>{rho}</sup>" if title else rho,
                      template="plotly_white", legend_title_text=color or "")
    return fig


# ----------------------------------------------------------------------------- MRP Sec. 4.3
def _pair_styles(names: list, prefix: str | None) -> dict:
    """name -> (colour, dashed). With ``prefix`` (e.g. ``"bp_"``) a name and its prefixed twin
    share a colour and the unprefixed one is dashed (MRP Fig. 5); else one colour each."""
    if not prefix:
        return {n: (_COLORS[i % len(_COLORS)], False) for i, n in enumerate(names)}
    bases = list(dict.fromkeys(str(n)[len(prefix):] if str(n).startswith(prefix) else str(n)
                               for n in names))
    out = {}
    for n in names:
        paired = str(n).startswith(prefix)
        base = str(n)[len(prefix):] if paired else str(n)
        out[n] = (_COLORS[bases.index(base) % len(_COLORS)], not paired)
    return out


def performance_profile(profile: pd.DataFrame, *, method: str = "method", tau: str = "tau",
                        fraction: str = "fraction", title: str | None = None,
                        pair_prefix: str | None = None):
    """Performance profiles as step lines over τ ∈ [0, 1] (MRP paper Fig. 5), from
    :func:`prunelab.metrics.performance_profile`.

    With ``pair_prefix="bp_"`` each MRP score and its mean-replacement twin share a colour and
    the one without mean replacement is dashed, as in MRP Fig. 5.

    y is the fraction of measurements in which a method's penalty is strictly below
    τ·best + (1 − τ)·worst; higher curves are better. The steps are drawn "hv": each value
    holds until the next τ, matching the right-continuous steps of the strict inequality.
    """
    go = _go()
    _require(profile, [method, tau, fraction])
    fig = go.Figure()
    style = _pair_styles(list(pd.unique(profile[method])), pair_prefix)
    for name, part in profile.groupby(method, sort=False):
        part = part.sort_values(tau)
        color, dashed = style[name]
        fig.add_trace(go.Scatter(
            x=part[tau], y=part[fraction], name=str(name), mode="lines", line_shape="hv",
            line=dict(color=color, dash="dash" if dashed else "solid"),
            hovertemplate=f"{method}={name}<br>τ=%{{x:.3g}}<br>fraction=%{{y:.3f}}<extra></extra>"))
    fig.update_xaxes(title_text="τ", range=[0, 1])
    fig.update_yaxes(title_text="fraction of measurements below the threshold",
                     range=[-0.02, 1.02])
    fig.update_layout(title=title or "Performance profile", template="plotly_white",
                      legend_title_text=method)
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
    """
    go = _go()
    _require(density_frame, [layer, density] + ([color] if color else []))
    total = density_frame[density_frame[layer] == "total"]
    rows = density_frame[density_frame[layer] != "total"]
    fig = go.Figure()
    columns = [c for c in (layer, "numel", "kept") if c in rows.columns]
    parts = rows.groupby(color, sort=False) if color else [(None, rows)]
    for i, (name, part) in enumerate(parts):
        name = name[0] if isinstance(name, tuple) else name
        data, template = _hover(part, ([color] if color else []) + columns,
                                ["density=%{y:.4f}"])
        fig.add_trace(go.Bar(x=part[layer], y=part[density],
                             name=str(name) if color else density,
                             marker_color=_COLORS[i % len(_COLORS)], customdata=data,
                             hovertemplate=template))
    if len(total) == 1:
        value = float(total[density].iloc[0])
        fig.add_hline(y=value, line_dash="dash", line_color="black",
                      annotation_text=f"total {value:.3g}", annotation_position="top left")
    fig.update_xaxes(title_text=layer, type="category")
    fig.update_yaxes(title_text="fraction of weights kept", range=[0, 1.05])
    fig.update_layout(title=title or "Density per layer", template="plotly_white",
                      barmode="group", showlegend=bool(color), legend_title_text=color or "")
    return fig


# ----------------------------------------------------------------------------- layer collapse
def _collapse_summary(frame: pd.DataFrame, criterion: str, x: str) -> pd.DataFrame:
    """One row per (criterion, ρ) from a ``collapse.layer_density`` frame (one row per layer):
    density (overall kept fraction), min_layer_density, n_collapsed, collapsed (any layer)."""
    g = frame.groupby([criterion, x], sort=False)
    out = g.agg(kept=("kept", "sum"), numel=("numel", "sum"),
                min_layer_density=("density", "min"),
                n_collapsed=("collapsed", "sum")).reset_index()
    out["density"] = out["kept"] / out["numel"].clip(lower=1)
    out["collapsed"] = out["n_collapsed"] > 0
    return out


def collapse_points(frame: pd.DataFrame, *, criterion: str = "criterion",
                    x: str = "compression") -> pd.DataFrame:
    """Per-(criterion, ρ) rows with a boolean ``collapsed`` column, from either a
    ``collapse.layer_density`` frame (rows per layer: aggregated by :func:`_collapse_summary`) or
    a ``collapse.accuracy_vs_compression`` frame (``n_collapsed`` column)."""
    _require(frame, [criterion, x])
    if "layer" in frame.columns:
        _require(frame, ["kept", "numel", "density", "collapsed"])
        return _collapse_summary(frame, criterion, x)
    out = frame.copy()
    if "collapsed" not in out.columns:
        _require(out, ["n_collapsed"])
        out["collapsed"] = out["n_collapsed"] > 0
    out["collapsed"] = out["collapsed"].astype(bool)
    return out


def collapse_curves(frame: pd.DataFrame, *, y: str | None = None, criterion: str = "criterion",
                    x: str = "compression", title: str | None = None):
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
        title: figure title.
    """
    go = _go()
    data = collapse_points(frame, criterion=criterion, x=x)
    if y is None:
        y = "accuracy" if "accuracy" in data.columns else "min_layer_density"
    _require(data, [y])
    agg = (data.groupby([criterion, x], sort=False)
           .agg(value=(y, "mean"), collapsed=("collapsed", "any")).reset_index())
    agg["shown"] = agg["value"]
    log_y = "density" in y
    if log_y:  # empty layers cannot sit on the log axis: drawn at a floor below the rest
        positive = agg["value"][agg["value"] > 0]
        floor = float(positive.min()) / 3 if len(positive) else 1e-6
        agg["shown"] = agg["value"].where(agg["value"] > 0, floor)
    fig = go.Figure()
    for i, (name, part) in enumerate(agg.groupby(criterion, sort=False)):
        part = part.sort_values(x)
        color = _COLORS[i % len(_COLORS)]
        fig.add_trace(go.Scatter(
            x=part[x], y=part["shown"], name=str(name), legendgroup=str(name),
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
    fig.update_xaxes(type="log", title_text="compression ratio ρ")
    fig.update_yaxes(title_text=_label(y) + (" (0 drawn at the bottom)" if log_y else ""),
                     type="log" if log_y else "linear")
    fig.update_layout(title=title or f"{_label(y)} vs compression (x: layer collapse)",
                      template="plotly_white", legend_title_text=criterion)
    return fig


def _pick_criterion(frame: pd.DataFrame, criterion, criterion_col: str):
    """``criterion``, or the only criterion of ``frame``; ValueError when it holds several."""
    if criterion is None and criterion_col in frame.columns:
        names = list(pd.unique(frame[criterion_col]))
        if len(names) != 1:
            raise ValueError(f"frame holds criteria {names}: pass criterion=")
        criterion = names[0]
    return criterion


def _density_matrix(frame: pd.DataFrame, criterion_value, criterion: str, x: str):
    part = frame[frame[criterion] == criterion_value] if criterion_value is not None else frame
    if part.empty:
        raise ValueError(f"no rows with {criterion}={criterion_value!r}")
    _check_unique(part, ["layer", x])
    layers = list(pd.unique(part["layer"]))  # model order
    rhos = sorted(part[x].unique())
    z = part.pivot(index="layer", columns=x, values="density").reindex(index=layers,
                                                                        columns=rhos)
    dead = (part.pivot(index="layer", columns=x, values="collapsed")
            .reindex(index=layers, columns=rhos).fillna(False).astype(bool))
    return layers, rhos, z, dead


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
    criterion = _pick_criterion(frame, criterion, criterion_col)
    layers, rhos, z, dead = _density_matrix(frame, criterion, criterion_col, x)
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
    fig.update_layout(title=title or f"Density per layer ({criterion}); x: layer collapse",
                      template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- connectivity
def path_barriers(frame: pd.DataFrame, *, y: str = "loss", x: str = "t",
                  groups: Sequence[str] | None = None) -> dict:
    """Barrier (max of ``y`` along the path minus the mean of its endpoints, Frankle et al.)
    per group of a path frame: {group key (string): barrier}."""
    groups = [c for c in ("path", "split") if c in frame.columns] if groups is None \
        else list(groups)
    out = {}
    parts = frame.groupby(groups, sort=False) if groups else [("path", frame)]
    for key, part in parts:
        key = key if isinstance(key, tuple) else (key,)
        v = part.sort_values(x)[y].to_numpy(dtype=float)
        out[" · ".join(map(str, key))] = float(v.max() - 0.5 * (v[0] + v[-1]))
    return out


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
    groups = [c for c in ("path", "split") if c in frame.columns] if groups is None \
        else list(groups)
    _require(frame, groups)
    barriers = path_barriers(frame, y=y, x=x, groups=groups)
    fig = go.Figure()
    parts = frame.groupby(groups, sort=False) if groups else [("path", frame)]
    dashes = {}
    if "split" in groups:
        dashes = {s: _DASHES[i % len(_DASHES)] for i, s in enumerate(pd.unique(frame["split"]))}
    first = [g for g in groups if g != "split"]
    colors = ({v: _COLORS[i % len(_COLORS)] for i, v in enumerate(pd.unique(frame[first[0]]))}
              if first else {})
    for i, (key, part) in enumerate(parts):
        key = key if isinstance(key, tuple) else (key,)
        label = " · ".join(map(str, key))
        named = dict(zip(groups, key))
        part = part.sort_values(x)
        color = colors.get(named.get(first[0]) if first else None, _COLORS[i % len(_COLORS)])
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
    for i, (name, part) in enumerate(pairs.groupby(color, sort=False)):
        data, template = _hover(part, [color] + keys, ["without=%{x:.4g}", "with=%{y:.4g}"])
        fig.add_trace(go.Scatter(x=part["without"], y=part["with"], mode="markers",
                                 name=f"{name} ({part['with'].lt(part['without']).mean():.0%} below)",
                                 marker=dict(color=_COLORS[i % len(_COLORS)], size=6,
                                             opacity=0.7),
                                 customdata=data, hovertemplate=template))
    lo = float(min(pairs["without"].min(), pairs["with"].min())) if len(pairs) else 0.0
    hi = float(max(pairs["without"].max(), pairs["with"].max())) if len(pairs) else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip"))
    below = float(pairs["with"].lt(pairs["without"]).mean()) if len(pairs) else float("nan")
    fig.update_xaxes(title_text="pruning penalty without mean replacement")
    fig.update_yaxes(title_text="pruning penalty with mean replacement (bp_)")
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
    agg = _aggregate(frame, x, y, color)
    style = _pair_styles(list(pd.unique(agg[color])), "bp_")
    fig = go.Figure()
    for name, part in agg.groupby(color, sort=False):
        c, dashed = style[name]
        fig.add_trace(go.Scatter(
            x=part[x], y=part["mean"], name=str(name), mode="lines+markers",
            line=dict(color=c, dash="dash" if dashed else "solid"), marker=dict(size=4),
            error_y=dict(type="data", array=part["std"], visible=bool((part["std"] > 0).any())),
            customdata=part[["count"]].to_numpy(),
            hovertemplate=(f"{color}={name}<br>{x}=%{{x}}<br>{y}=%{{y:.4g}}"
                           "<br>n=%{customdata[0]}<extra></extra>")))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text=_label(y) + " = L(pruned) − L(dense)")
    fig.update_layout(title=title or "Pruning penalty during training", template="plotly_white",
                      legend_title_text=color)
    return fig


def selection_consistency(frame: pd.DataFrame, *, title: str | None = None):
    """Accumulated fraction of units ever selected per score over training (MRP Fig. 7), from
    :meth:`prunelab.units.PenaltyRecorder.consistency`. Lower = a more consistent choice."""
    go = _go()
    _require(frame, ["step", "score", "fraction_ever_selected"])
    style = _pair_styles(list(pd.unique(frame["score"])), "bp_")
    fig = go.Figure()
    for name, part in frame.groupby("score", sort=False):
        c, dashed = style[name]
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["fraction_ever_selected"],
                                 name=str(name), mode="lines",
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
    _require(frame, ["score", value])
    scores = list(pd.unique(frame["score"])) if scores is None else list(scores)
    positive = frame[frame[value] > 0]
    if positive.empty:
        raise ValueError(f"no positive {value!r} values to histogram")
    logs = np.log10(positive[value].to_numpy())
    edges = np.linspace(logs.min(), logs.max() + 1e-9, bins + 1)
    fig = go.Figure()
    for i, name in enumerate(scores):
        vals = np.log10(positive.loc[positive["score"] == name, value].to_numpy())
        fig.add_trace(go.Histogram(x=vals, name=str(name), opacity=0.55,
                                   xbins=dict(start=edges[0], end=edges[-1],
                                              size=edges[1] - edges[0]),
                                   marker_color=_COLORS[i % len(_COLORS)]))
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
    fig = go.Figure()
    for name, part in groups:
        part = part.sort_values(x)
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers",
                                 name=None if name is None else str(name),
                                 showlegend=name is not None,
                                 hovertemplate=f"k=%{{x}}<br>{metric} barrier=%{{y:.4g}}"
                                               "<extra></extra>"))
    fig.update_xaxes(title_text="rewinding / splitting step k")
    fig.update_yaxes(title_text=f"{metric} barrier (instability)")
    fig.update_layout(title=title or "Instability vs the step the two copies split at",
                      template="plotly_white")
    return fig
