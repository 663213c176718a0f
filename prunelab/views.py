"""Views: the tidy frames and the style every figure draws, prepared once.

:mod:`prunelab.plots` (plotly) and :mod:`prunelab.figures` (seaborn/matplotlib) only draw what
this module prepares: the grouped means of a sweep, where λ = 0 sits on a log axis, the pairing
of the MRP scores with their mean-replacement twins, the per-(criterion, ρ) summary of layer
collapse, path barriers, and the style they share (a display name and a fixed colour per
criterion, axis labels that name the split and the unit, the chance level, log-axis ticks that
read at every range). Torch-free and plotting-library-free: numpy and pandas only.

Over 500 lines because the style table and one preparation per figure family are kept
together so that plots and figures cannot drift apart.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prunelab.metrics import CONFIG_COLUMNS, require_columns

__all__ = ["CONFIG_COLUMNS", "require_columns", "Style", "STYLES", "FALLBACK_COLORS", "DASHES",
           "display_name", "palette", "pair_styles", "axis_label", "chance_level",
           "spearman_title", "fmt", "levels", "check_unique", "summary", "aggregate",
           "hover_columns", "group_columns", "lambda_positions", "lambda_ticks", "LambdaView",
           "lambda_view", "log_ticks", "tick_text", "density_bars", "collapse_points",
           "collapse_summary", "collapse_view", "path_groups", "pick_criterion",
           "density_matrix", "path_barriers",
           "profile_kind", "histogram_edges", "LandscapeView", "landscape_view"]


def __dir__():
    return sorted(__all__)


# ============================================================================ style
@dataclass(frozen=True)
class Style:
    """How one criterion (or score) is shown: its display name and fixed colour."""

    label: str
    color: str


#: Criterion / score name -> style, shared by plotly and seaborn. Families share a hue: the
#: LAP variants are oranges and browns, the loss models green/red/purple, the MRP unit scores
#: (MRP Table 1) have one colour per base score, shared with their ``bp_`` twin.
STYLES: dict[str, Style] = {
    # unstructured criteria (prunelab.criteria.names())
    "random": Style("random", "#7f7f7f"),
    "mp": Style("MP", "#1f77b4"),
    "lap": Style("LAP", "#ff7f0e"),
    "lfp": Style("LFP", "#ffbb78"),
    "lbp": Style("LBP", "#c49c94"),
    "lap-forward": Style("LAP-forward", "#e6550d"),
    "lap-backward": Style("LAP-backward", "#a63603"),
    "lap-forward-seq": Style("LAP-forward-seq", "#fd8d3c"),
    "lap-backward-seq": Style("LAP-backward-seq", "#ad494a"),
    "lap-act": Style("LAP-act", "#fdae6b"),
    "lap-all": Style("LAP-all", "#d94801"),
    "obd+lap": Style("OBD+LAP", "#b5cf6b"),
    "obd": Style("OBD", "#2ca02c"),
    "lm": Style("LM", "#d62728"),
    "qm": Style("QM", "#9467bd"),
    "snip": Style("SNIP", "#8c564b"),
    "grasp": Style("GraSP", "#e377c2"),
    "synflow": Style("SynFlow", "#bcbd22"),
    "taylor-fo": Style("Taylor-FO", "#17becf"),
    "grad-mag": Style("gradient magnitude", "#6b6ecf"),
    "obs": Style("OBS", "#843c39"),
    # structured criteria (prunelab.structured.names())
    "mp-l1": Style("MP-ℓ1", "#1f77b4"),
    "mp-l2": Style("MP-ℓ2", "#6baed6"),
    "lap-l1": Style("LAP-ℓ1", "#ff7f0e"),
    "lap-l2": Style("LAP-ℓ2", "#fdae6b"),
    "hrank": Style("HRank", "#637939"),
    "bn-scale": Style("BN scale", "#7b4173"),
    # MRP unit scores (prunelab.units.SCORES): the tags of MRP Table 1
    "rand": Style("rand", "#7f7f7f"),
    "norm": Style("norm", "#1f77b4"),
    "abs_rs": Style("abs_rs", "#ff7f0e"),
    "abs_mrs": Style("abs_mrs", "#2ca02c"),
    "rs": Style("rs", "#d62728"),
    "mrs": Style("mrs", "#9467bd"),
}
for _base in ("rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs"):
    STYLES[f"bp_{_base}"] = Style(f"bp_{_base}", STYLES[_base].color)
del _base

#: Colours for groups without a fixed style (π, schedules, seeds …), by position.
FALLBACK_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860",
                   "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
#: Line dashes of a second grouping, named as plotly names them.
DASHES = ("solid", "dot", "dashdot", "longdash", "longdashdot")


def fmt(value) -> str:
    """A value as legend / hover text: floats to 4 significant digits, others as str."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def display_name(value) -> str:
    """The display name of a criterion or score (``"mp"`` -> ``"MP"``); other values as text."""
    style = STYLES.get(value) if isinstance(value, str) else None
    return style.label if style else fmt(value)


def palette(values: Sequence) -> dict:
    """value -> colour: the fixed colour of a styled name, positional colours for the rest
    (skipping colours already taken in this figure)."""
    out = {v: STYLES[v].color for v in values if isinstance(v, str) and v in STYLES}
    free = [c for c in FALLBACK_COLORS if c not in out.values()] or list(FALLBACK_COLORS)
    i = 0
    for v in values:
        if v not in out:
            out[v] = free[i % len(free)]
            i += 1
    return out


def pair_styles(names: Sequence, prefix: str | None) -> dict:
    """name -> (colour, dashed). With ``prefix`` (e.g. ``"bp_"``) a name and its prefixed twin
    share a colour and the unprefixed one is dashed (MRP Fig. 5); else one colour each."""
    names = list(names)
    if not prefix:
        colors = palette(names)
        return {n: (colors[n], False) for n in names}
    base = {n: str(n)[len(prefix):] if str(n).startswith(prefix) else str(n) for n in names}
    colors = palette(list(dict.fromkeys(base.values())))
    return {n: (colors[base[n]], not str(n).startswith(prefix)) for n in names}


# Axis labels: what was measured, on which split, in which unit.
_LABELS = {
    "delta_loss": "ΔL on the pruning batch (nats)",
    "lam": "λ (step-size penalty)",
    "stages": "π (pruning stages)",
    "stage": "stage",
    "step_norm": "‖Δθ‖ of the stage (L2 norm of the weight change)",
    "density": "fraction of weights remaining",
    "sparsity": "sparsity (fraction of weights pruned)",
    "compression": "compression ratio ρ (dense / remaining weights)",
    "min_layer_density": "smallest fraction of a layer kept",
    "penalty": "pruning penalty L(pruned) − L(dense) (nats)",
    "penalty_ft": "pruning penalty after fine-tuning (nats)",
    "fraction_ever_selected": "fraction of units ever selected",
    "step": "training step",
    "k": "splitting step k",
    "alpha": "α (along the filter-normalised direction δ)",
    "beta": "β (along the filter-normalised direction η)",
}
_SPLITS = {"train": "training", "val": "validation", "test": "test"}
_KINDS = {"error": "error (fraction)", "loss": "loss (nats)", "accuracy": "accuracy (fraction)",
          "error_gap": "error gap (fraction)"}


def axis_label(column: str, frame: pd.DataFrame | None = None) -> str:
    """The axis label of ``column``: its meaning, split and unit.

    ``val_error_ft`` -> "validation error after fine-tuning (fraction)"; a bare ``accuracy``,
    ``error`` or ``loss`` takes its split from a single-valued ``split`` column of ``frame``.
    """
    if column in _LABELS:
        return _LABELS[column]
    name = column
    after = name.endswith("_ft")
    name = name.removesuffix("_ft")
    dense = name.endswith("_dense")
    name = name.removesuffix("_dense")
    split = None
    for prefix in _SPLITS:
        if name.startswith(prefix + "_"):
            split, name = _SPLITS[prefix], name[len(prefix) + 1:]
            break
    if split is None and frame is not None and "split" in getattr(frame, "columns", ()):
        splits = pd.unique(frame["split"].dropna())
        if len(splits) == 1:
            split = _SPLITS.get(str(splits[0]), str(splits[0]))
    if name not in _KINDS:
        return column.replace("_", " ")
    what = _KINDS[name]
    when = " of the dense model" if dense else (" after fine-tuning" if after else "")
    if name == "error_gap" and not after and not dense:
        when = " before fine-tuning"
    head, unit = what.split(" (", 1)
    return f"{split + ' ' if split else ''}{head}{when} ({unit}"


def chance_level(frame: pd.DataFrame, y: str, chance=None) -> float | None:
    """Where the chance line of an accuracy (or error) plot goes, or None for no line.

    ``chance``: a number draws the line there; ``False`` draws none; ``None`` (default) takes
    1 / num_classes from a single-valued ``num_classes`` column for an accuracy column
    (1 − 1 / num_classes for an error column), and no line otherwise.
    """
    if chance is False:
        return None
    if chance is not None and chance is not True:
        value = float(chance)
        if not math.isfinite(value):
            raise ValueError(f"chance must be a finite number, False or None, got {chance!r}")
        return value
    if "num_classes" not in frame.columns:
        if chance is True:
            raise ValueError("chance=True needs a 'num_classes' column; pass chance=1/classes")
        return None
    classes = pd.unique(frame["num_classes"].dropna())
    if len(classes) != 1 or not classes[0] >= 2:
        raise ValueError(f"num_classes must hold one value >= 2 to draw a chance line, got "
                         f"{list(classes)}; pass chance= instead")
    level = 1.0 / float(classes[0])
    if "accuracy" in y:
        return level
    if "error" in y and "gap" not in y:
        return 1.0 - level
    return None


def spearman_title(stat, ci: float = 0.95) -> str:
    """"Spearman ρ = 0.57, 95 % CI [-0.25, 0.98]" from :func:`prunelab.metrics.spearman`."""
    return (f"Spearman ρ = {stat['rho']:.2f}, {100 * ci:.3g} % CI "
            f"[{stat['low']:.2f}, {stat['high']:.2f}]")


# ============================================================================ frames
def levels(series: pd.Series) -> list:
    """Sorted levels for numbers, order of first appearance otherwise."""
    values = pd.unique(series.dropna())
    return sorted(values) if pd.api.types.is_numeric_dtype(series) else list(values)


def check_unique(frame: pd.DataFrame, keys: Sequence[str]) -> None:
    """Raise if several rows share ``keys``: averaging them would mix settings silently."""
    dup = frame.duplicated(list(keys), keep=False)
    if dup.any():
        varying = [c for c in frame.columns if c not in keys and c in CONFIG_COLUMNS
                   and frame.loc[dup, c].nunique(dropna=False) > 1]
        raise ValueError(f"several rows per {list(keys)}; configuration columns that vary "
                         f"among them: {varying}; filter the frame first")


def summary(frame: pd.DataFrame, keys: list[str], values: Sequence[str]) -> pd.DataFrame:
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


def aggregate(frame: pd.DataFrame, x: str, y: str, group: str) -> pd.DataFrame:
    """mean ± std (0 for a single seed) and count of ``y`` per (group, x), x ascending."""
    agg = frame.groupby([group, x], sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    return agg


def hover_columns(frame: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """The configuration columns present in ``frame`` (for hover text)."""
    return [c for c in dict.fromkeys((*CONFIG_COLUMNS, *extra)) if c in frame.columns]


def group_columns(frame: pd.DataFrame, color: str | Sequence[str] | None) -> list[str]:
    """``color`` as a list of columns; None: those of arch, criterion, schedule, stages, lam
    that vary in ``frame`` (what tells concatenated histories apart)."""
    if color is None:
        return [c for c in ("arch", "criterion", "schedule", "stages", "lam")
                if c in frame.columns and frame[c].nunique(dropna=False) > 1]
    cols = [color] if isinstance(color, str) else list(color)
    require_columns(frame, cols)
    return cols


# ----------------------------------------------------------------------------- LM paper Fig. 1
def lambda_positions(lam: pd.Series | np.ndarray, *, zero_decades: float = 1.0) -> np.ndarray:
    """Where each λ is drawn on a log axis: λ > 0 at itself, λ = 0 ``zero_decades`` decades
    left of the smallest positive λ (at 1 if there is none), labelled "0" as in LM Fig. 1."""
    lam = np.asarray(lam, dtype=float)
    positive = lam[lam > 0]
    zero_at = positive.min() / 10.0 ** zero_decades if positive.size else 1.0
    return np.where(lam == 0, zero_at, lam)


def lambda_ticks(lam: np.ndarray, zero_decades: float = 1.0, max_ticks: int = 10
                 ) -> tuple[list[float], list[int | None]]:
    """Tick positions of a λ axis and their decade exponent (None for the "0" tick): the
    λ = 0 position, then every ``step``-th decade so at most ``max_ticks`` decades show."""
    lam = np.asarray(lam, dtype=float)
    positive = lam[lam > 0]
    vals: list[float] = []
    exps: list[int | None] = []
    if (lam == 0).any():
        vals.append(float(lambda_positions(np.r_[0.0, positive], zero_decades=zero_decades)[0]))
        exps.append(None)
    if positive.size:
        lo, hi = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
        step = max(1, math.ceil((hi - lo + 1) / max_ticks))
        for k in range(lo, hi + 1, step):
            vals.append(10.0 ** k)
            exps.append(k)
    return vals, exps


@dataclass
class LambdaView:
    """The frame of LM Fig. 1, ready to draw.

    Attributes:
        lines: one row per (criterion, line[, dash], λ): ``_x`` (position on the log axis),
            ``{y}_mean``, ``{y}_std``, ``n``; sorted by group and λ.
        criteria: the panels, in order.
        groups: the columns of one line (``[line]`` or ``[line, dash]``).
        line_levels, dash_levels: their levels, in drawing order.
        reference: (mean, std, n) of the reference criterion's ``y``, or None.
        span: x extent of the reference line.
        tickvals, tickexps: ticks of the λ axis (see :func:`lambda_ticks`).
    """

    lines: pd.DataFrame
    criteria: list
    groups: list[str]
    line_levels: list
    dash_levels: list
    reference: tuple[float, float, int] | None
    span: tuple[float, float]
    tickvals: list[float]
    tickexps: list[int | None]


def lambda_view(frame: pd.DataFrame, *, criterion_col: str = "criterion", x: str = "lam",
                y: str = "delta_loss", line: str = "stages", dash: str | None = None,
                reference: str | None = "mp", zero_decades: float = 1.0,
                max_ticks: int = 10) -> LambdaView:
    """Prepare ΔL vs λ (LM paper Fig. 1): mean ± std over seeds per (criterion, π, λ), λ = 0
    placed ``zero_decades`` decades left of the smallest positive λ, and the reference
    criterion (MP, invariant to λ and π) reduced to its mean over all its runs.

    Raises:
        ValueError: a column is missing, no criterion besides ``reference`` is present, or
            several runs share a (criterion, line, dash, λ, seed) setting.
    """
    groups = [line] + ([dash] if dash else [])
    require_columns(frame, [criterion_col, x, y, *groups])
    if "seed" in frame.columns:
        check_unique(frame, [criterion_col, *groups, x, "seed"])
    is_ref = (frame[criterion_col].astype(str).str.lower() == str(reference).lower()
              if reference is not None else pd.Series(False, index=frame.index))
    ref, rest = frame[is_ref], frame[~is_ref]
    if rest.empty:
        raise ValueError(f"no criterion other than the reference {reference!r} in the frame")
    lam = rest[x].to_numpy(dtype=float)
    rest = rest.assign(_x=lambda_positions(lam, zero_decades=zero_decades))
    lines = summary(rest, [criterion_col, *groups, x, "_x"], [y])
    lines = lines.sort_values([criterion_col, *groups, "_x"], kind="mergesort")
    ref_stat = None
    if reference is not None and not ref.empty:
        values = ref[y].replace([np.inf, -np.inf], np.nan)
        std = values.std()
        ref_stat = (float(values.mean()), 0.0 if pd.isna(std) else float(std),
                    int(values.notna().sum()))
    tickvals, tickexps = lambda_ticks(lam, zero_decades, max_ticks)
    return LambdaView(
        lines=lines.reset_index(drop=True), criteria=levels(rest[criterion_col]),
        groups=groups, line_levels=levels(rest[line]),
        dash_levels=levels(rest[dash]) if dash else [],
        reference=ref_stat,
        span=(float(rest["_x"].min()) / 10 ** 0.25, float(rest["_x"].max()) * 10 ** 0.25),
        tickvals=tickvals, tickexps=tickexps)


# ----------------------------------------------------------------------------- log ticks
def log_ticks(vmin: float, vmax: float, max_ticks: int = 6) -> list[float]:
    """Tick values for a log axis over [vmin, vmax] that never crowd: whole decades (every
    k-th) over three decades or more, else 1-2-5 × 10^k, else 1..9 × 10^k, else round numbers
    evenly spaced in value (a range under a factor of about 2), with at least two and at most
    ``max_ticks`` ticks inside."""
    if not (vmin > 0 and vmax > 0 and math.isfinite(vmin) and math.isfinite(vmax)):
        return []
    lo, hi = min(vmin, vmax), max(vmin, vmax)
    if hi <= lo * (1 + 1e-12):
        return [lo]
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    eps = 1e-9

    def inside(ticks):
        return [float(f"{t:.12g}") for t in ticks if lo * (1 - eps) <= t <= hi * (1 + eps)]

    decades = inside([10.0 ** k for k in range(e0, e1 + 1)])
    if len(decades) >= 3:
        step = max(1, math.ceil(len(decades) / max_ticks))
        return decades[::step]
    for subs in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = inside([s * 10.0 ** k for k in range(e0, e1 + 1) for s in subs])
        if 2 <= len(ticks) <= max_ticks:
            return ticks
    if len(decades) == 2:
        return decades
    # a narrow range: the smallest round step (1, 2, 5 × 10^k) that fits
    k = math.floor(math.log10(hi - lo)) - 2
    while k < e1:
        for m in (1, 2, 5):
            step = m * 10.0 ** k
            first = math.ceil(lo / step - eps)
            ticks = inside([(first + i) * step for i in range(int(hi / step - first + eps) + 1)])
            if 2 <= len(ticks) <= max_ticks:
                return ticks
        k += 1
    return [lo, hi]


def tick_text(value: float, ticks: Sequence[float] = ()) -> str:
    """Short mathtext for a log-axis tick among ``ticks``: ``10^k`` when every tick is a
    decade; else plain decimals within [1e-3, 1e4) and ``m×10^k`` outside, with as many
    significant digits as the ticks need to read differently."""
    others = sorted(set(ticks)) if len(ticks) else [value]
    if value <= 0 or not math.isfinite(value):
        return f"{value:g}"
    k = math.floor(math.log10(value) + 1e-12)
    if all(_is_decade(t) for t in others):
        return f"$10^{{{k}}}$"
    digits = 1  # enough that every label reads back as its tick
    while digits < 8 and any(abs(float(f"{t:.{digits}g}") - t) > 1e-9 * abs(t) for t in others):
        digits += 1
    if 1e-3 <= value < 1e4:
        return f"${np.format_float_positional(float(f'{value:.{digits}g}'), trim='-')}$"
    return f"${value / 10.0 ** k:.{digits}g}\\times10^{{{k}}}$"


def _is_decade(value: float) -> bool:
    return value > 0 and abs(math.log10(value) - round(math.log10(value))) < 1e-9


# ----------------------------------------------------------------------------- masks
def density_bars(frame: pd.DataFrame, *, layer: str = "layer", density: str = "density",
                 color: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The bars of a ``pl.masks.density`` frame and its ``total`` rows: (layer rows,
    {``color`` level (None without ``color``): total density}).

    Raises:
        ValueError: a layer appears several times per ``color`` level (a
            ``pl.collapse.layer_density`` frame holds one row per criterion × ρ × layer, which
            bars would draw on top of each other).
    """
    require_columns(frame, [layer, density] + ([color] if color else []))
    rows = frame[frame[layer] != "total"]
    keys = [layer] + ([color] if color else [])
    if rows.duplicated(keys).any():
        hint = ("this looks like a pl.collapse.layer_density frame (one row per criterion, "
                "compression and layer): draw it with layer_density_heatmap(frame, "
                "criterion=...) or collapse_curves(frame), or filter it to one compression "
                "(and pass color='criterion')" if "compression" in frame.columns else
                "filter the frame or pass color= naming the column that tells them apart")
        raise ValueError(f"several rows per {keys} in the density frame; {hint}")
    total = frame[frame[layer] == "total"]
    if color:
        totals = {k: float(g[density].iloc[0]) for k, g in total.groupby(color, sort=False)
                  if len(g) == 1}
    else:
        totals = {None: float(total[density].iloc[0])} if len(total) == 1 else {}
    return rows, totals


# ----------------------------------------------------------------------------- layer collapse
def collapse_summary(frame: pd.DataFrame, criterion: str, x: str) -> pd.DataFrame:
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
    ``collapse.layer_density`` frame (rows per layer: aggregated by :func:`collapse_summary`)
    or a ``collapse.accuracy_vs_compression`` frame (``n_collapsed`` column)."""
    require_columns(frame, [criterion, x])
    if "layer" in frame.columns:
        require_columns(frame, ["kept", "numel", "density", "collapsed"])
        return collapse_summary(frame, criterion, x)
    out = frame.copy()
    if "collapsed" not in out.columns:
        require_columns(out, ["n_collapsed"])
        out["collapsed"] = out["n_collapsed"] > 0
    out["collapsed"] = out["collapsed"].astype(bool)
    return out


def collapse_view(frame: pd.DataFrame, *, y: str | None, criterion: str, x: str
                  ) -> tuple[pd.DataFrame, str, bool]:
    """(rows per (criterion, ρ) with ``value``, ``shown``, ``collapsed``; y; log_y) for the
    collapse curves (Tanaka et al. 2020 Fig. 1). A density is drawn on a log axis with empty
    layers at a floor a third below the smallest positive value."""
    data = collapse_points(frame, criterion=criterion, x=x)
    if y is None:
        y = "accuracy" if "accuracy" in data.columns else "min_layer_density"
    require_columns(data, [y])
    agg = (data.groupby([criterion, x], sort=False)
           .agg(value=(y, "mean"), collapsed=("collapsed", "any")).reset_index())
    agg["shown"] = agg["value"]
    log_y = "density" in y
    if log_y:
        positive = agg["value"][agg["value"] > 0]
        floor = float(positive.min()) / 3 if len(positive) else 1e-6
        agg["shown"] = agg["value"].where(agg["value"] > 0, floor)
    return agg, y, log_y


def pick_criterion(frame: pd.DataFrame, criterion, criterion_col: str):
    """``criterion``, or the only criterion of ``frame``; ValueError when it holds several."""
    if criterion is None and criterion_col in frame.columns:
        names = list(pd.unique(frame[criterion_col]))
        if len(names) != 1:
            raise ValueError(f"frame holds criteria {names}: pass criterion=")
        criterion = names[0]
    return criterion


def density_matrix(frame: pd.DataFrame, criterion_value, criterion: str, x: str):
    """(layers in model order, ρ ascending, density table, collapsed table) of one criterion
    of a ``collapse.layer_density`` frame (Tanaka et al. 2020 Fig. 3 data)."""
    part = frame[frame[criterion] == criterion_value] if criterion_value is not None else frame
    if part.empty:
        raise ValueError(f"no rows with {criterion}={criterion_value!r}")
    check_unique(part, ["layer", x])
    layers = list(pd.unique(part["layer"]))  # model order
    rhos = sorted(part[x].unique())
    z = part.pivot(index="layer", columns=x, values="density").reindex(index=layers,
                                                                        columns=rhos)
    dead = (part.pivot(index="layer", columns=x, values="collapsed")
            .reindex(index=layers, columns=rhos).fillna(False).astype(bool))
    return layers, rhos, z, dead


# ----------------------------------------------------------------------------- connectivity
def path_groups(frame: pd.DataFrame, groups: Sequence[str] | None) -> list[str]:
    """The columns giving one path line each: ``groups`` or those of path, split present."""
    groups = [c for c in ("path", "split") if c in frame.columns] if groups is None \
        else list(groups)
    require_columns(frame, groups)
    return groups


def path_barriers(frame: pd.DataFrame, *, y: str = "loss", x: str = "t",
                  groups: Sequence[str] | None = None) -> dict:
    """Barrier (max of ``y`` along the path minus the mean of its endpoints, Frankle et al.)
    per group of a path frame: {group key (string): barrier}."""
    groups = path_groups(frame, groups)
    out = {}
    parts = frame.groupby(groups, sort=False) if groups else [("path", frame)]
    for key, part in parts:
        key = key if isinstance(key, tuple) else (key,)
        v = part.sort_values(x)[y].to_numpy(dtype=float)
        out[" · ".join(map(str, key))] = float(v.max() - 0.5 * (v[0] + v[-1]))
    return out


# ----------------------------------------------------------------------------- profiles
def profile_kind(profile: pd.DataFrame, tau: str = "tau", kind: str | None = None) -> str:
    """``"mrp"`` or ``"dolan-more"``: ``kind``, else ``profile.attrs["kind"]``, else from the
    τ range (τ > 1 only occurs in a Dolan-Moré profile)."""
    if kind is None:
        kind = profile.attrs.get("kind")
    if kind is None:
        kind = "dolan-more" if len(profile) and float(profile[tau].max()) > 1 else "mrp"
    if kind not in ("mrp", "dolan-more"):
        raise ValueError(f"kind must be 'mrp' or 'dolan-more', got {kind!r}")
    return kind


def histogram_edges(frame: pd.DataFrame, value: str, bins: int,
                    scores: Sequence[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows with a positive ``value`` and its ``log10`` column, common bin edges) of the
    activation histogram (MRP Fig. 6b); zeros cannot sit on the log axis and are dropped."""
    require_columns(frame, ["score", value])
    data = frame[frame[value] > 0]
    if scores is not None:
        data = data[data["score"].isin(list(scores))]
    if data.empty:
        raise ValueError(f"no positive {value!r} values to histogram")
    data = data.assign(log10=np.log10(data[value].to_numpy(dtype=float)))
    edges = np.linspace(data["log10"].min(), data["log10"].max() + 1e-9, bins + 1)
    return data, edges


# ----------------------------------------------------------------------------- loss landscapes
@dataclass(frozen=True)
class LandscapeView:
    """A loss-landscape frame (:mod:`prunelab.landscape`) ready to draw.

    Attributes:
        dims: 1 (``alpha``) or 2 (``alpha``, ``beta``).
        parts: one ``(network name or None, data)`` per network in frame order; ``data`` is
            the rows sorted by ``alpha`` (1-D) or the grid of ``z`` with index ``beta`` and
            columns ``alpha`` (2-D).
        z: the drawn column; zrange: (min, max) of ``z`` over all networks (one colour scale).
    """

    dims: int
    parts: list
    z: str
    zrange: tuple


def landscape_view(frame: pd.DataFrame, *, z: str = "loss",
                   network: str = "network") -> LandscapeView:
    """Split a landscape frame by its ``network`` column (if any) into lines or grids."""
    require_columns(frame, ["alpha", z])
    if frame.empty:
        raise ValueError("the landscape frame is empty")
    dims = 2 if "beta" in frame.columns else 1
    groups = list(frame.groupby(network, sort=False)) if network in frame.columns \
        else [(None, frame)]
    keys = [network] if network in frame.columns else []
    check_unique(frame, [*keys, "alpha", *(["beta"] if dims == 2 else [])])
    parts = []
    for name, part in groups:
        if dims == 1:
            parts.append((name, part.sort_values("alpha").reset_index(drop=True)))
        else:
            parts.append((name, part.pivot_table(index="beta", columns="alpha", values=z,
                                                 aggfunc="first", dropna=False).sort_index()))
    values = frame[z].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    zrange = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return LandscapeView(dims, parts, z, zrange)
