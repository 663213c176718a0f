"""Measurements on models (losses, ΔL) and statistics on tidy result frames.

Model measurements (:func:`loss`, :func:`delta_loss`, :func:`evaluate`) follow the LM paper
(Sec. 4, "Performance Metrics"). Frame statistics (:func:`spearman`, :func:`seed_table`,
:func:`best_over`, :func:`error_gaps`, :func:`performance_profile`) reproduce the papers' tables
and rank statistics from a sweep's one-row-per-run frame.

torch is imported only inside the model functions, so ``prunelab.plots`` can use the frame
statistics without loading torch (a plotting notebook never loads a model).
"""
from __future__ import annotations

import numbers

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from prunelab.results import Summary

if TYPE_CHECKING:
    from torch import nn

__all__ = ["loss", "delta_loss", "evaluate", "spearman", "seed_table", "best_over", "error_gaps",
           "performance_profile", "PROFILE_KINDS", "CONFIG_COLUMNS", "require_columns"]


def __dir__():
    return sorted(__all__)


# ----------------------------------------------------------------------------- models
def loss(model: nn.Module, batch, *, loss="cross_entropy", output=None) -> float:
    """Mean loss of ``model`` (eval mode; every module's flag restored) on a batch.

    ``batch``: (x, y) tensors, a Dataset or a DataLoader; ``loss``: ``"cross_entropy"``,
    ``"mse"`` or a callable ``(output, target) -> mean loss`` (see :mod:`prunelab.batches`).
    Runs on the model's device and dtype.
    """
    import torch

    from prunelab import batches as B

    obj = B.objective(loss, output)
    x, y = B.as_batch(batch, what="batch")
    x, y = B.to_model(x, model), B.to_model(y, model)
    with B.evaluating(model), torch.no_grad():
        z = obj.first_forward(model, x, what="batch")
        obj.check(z, y)
        return float(obj.value(z, y))


def delta_loss(model: nn.Module, pruned: nn.Module, batch, *, loss="cross_entropy",
               output=None) -> float:
    """ΔL(θ, Δθ) = |L(θ + Δθ) − L(θ)| on ``batch`` (LM paper Sec. 4, the quantity criteria
    try to minimise), with ``model`` at θ and ``pruned`` at θ + Δθ."""
    kw = {"loss": loss, "output": output}
    return abs(_loss(pruned, batch, **kw) - _loss(model, batch, **kw))


_loss = loss


def __getattr__(name: str):
    # ``evaluate`` is train.evaluate, re-exported lazily so importing metrics stays torch-free.
    if name == "evaluate":
        from prunelab.train import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- frame checks
#: The configuration columns of a run, in the order a sweep writes them (the fields of
#: ``prunelab.experiments.Sweep``): the one list the statistics, views and plots share.
CONFIG_COLUMNS: tuple[str, ...] = ("arch", "dataset", "seed", "criterion", "sparsity", "stages",
                                   "lam", "schedule", "scope", "finetune", "examples")


def _names(columns: str | Iterable[str] | None) -> list[str]:
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


def require_columns(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    """ValueError naming the ``columns`` that ``frame`` lacks and the ones it has."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}; it has {list(frame.columns)}")


def _describe(keys: pd.DataFrame, limit: int = 5) -> str:
    """A short human-readable list of key rows, e.g. "criterion=lm, seed=1; ..."."""
    rows = ["(" + ", ".join(f"{c}={v}" for c, v in row.items()) + ")"
            for _, row in keys.head(limit).iterrows()]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(rows) + more


def _no_nan(frame: pd.DataFrame, value: str, keys: Sequence[str]) -> None:
    bad = frame[value].isna()
    if bad.any():
        raise ValueError(f"{value!r} is NaN in {int(bad.sum())} rows: "
                         f"{_describe(frame.loc[bad, list(keys)])}; drop or fill them first")


def _unique(frame: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    """Raise if several rows share ``keys``: averaging them would silently mix settings."""
    dup = frame.duplicated(list(keys), keep=False)
    if dup.any():
        varying = [c for c in frame.columns if c not in keys
                   and frame.loc[dup, c].nunique(dropna=False) > 1]
        # Name the configuration columns first: they are what the caller should filter on.
        config = [c for c in varying if c in CONFIG_COLUMNS]
        varying = config or varying
        raise ValueError(f"several rows per {what} {list(keys)}, e.g. "
                         f"{_describe(frame.loc[dup, list(keys)].drop_duplicates(), 3)}; "
                         f"columns that vary among them: {varying[:8]}; filter the frame first")


def _ordered(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """String keys become categoricals in order of first appearance, so grouped output keeps the
    caller's order (e.g. MP, LM, QM, OBD) while numbers sort ascending."""
    out = frame.copy()
    for k in keys:
        if not pd.api.types.is_numeric_dtype(out[k]):
            out[k] = pd.Categorical(out[k], categories=pd.unique(out[k].dropna()), ordered=True)
    return out


def _plain(index: pd.Index) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_tuples(list(index), names=index.names)
    return pd.Index(list(index), name=index.name)


# ----------------------------------------------------------------------------- rank statistics
def spearman(frame: pd.DataFrame, x: str = "delta_loss", y: str = "val_error_gap_ft", *,
             ci: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman's ρ between two columns with a percentile bootstrap interval (LM paper Fig. 3).

    The interval resamples runs (rows) with replacement, ``n_boot`` times, from
    ``numpy.random.default_rng(seed)``; resamples in which a column is constant have no ρ and
    are skipped. Infinite values are allowed (they only enter through their ranks).

    Args:
        frame: one row per run.
        x, y: the two columns (by default ΔL and the validation error gap after fine-tuning).
        ci: coverage of the interval, in (0, 1).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``{"rho", "low", "high", "n", "pvalue"}`` as a :class:`prunelab.results.Summary` (a dict
        that renders in Jupyter); ``pvalue`` is scipy's (t-distribution) test
        of ρ = 0.

    Raises:
        ValueError: a column is missing, holds NaN, or there are fewer than 3 runs; ``ci`` not
            in (0, 1), ``n_boot`` not an int >= 1 (0 resamples would give no interval).
    """
    from scipy import stats

    require_columns(frame, [x, y])
    if isinstance(ci, bool) or not isinstance(ci, numbers.Real) or not 0 < ci < 1:
        raise ValueError(f"ci must be a number in (0, 1), got {ci!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot (bootstrap resamples of the interval) must be an int >= 1, "
                         f"got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    n_boot, seed = int(n_boot), int(seed)
    for col in (x, y):
        bad = frame[col].isna()
        if bad.any():
            raise ValueError(f"column {col!r} is NaN in {int(bad.sum())} of {len(frame)} rows "
                             f"(index {list(frame.index[bad][:5])}); drop them first")
    a = frame[x].to_numpy(dtype=float)
    b = frame[y].to_numpy(dtype=float)
    n = len(a)
    if n < 3:
        raise ValueError(f"Spearman's rho needs at least 3 runs, got {n}")
    res = stats.spearmanr(a, b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    # Spearman's ρ is Pearson's r of the (average) ranks; rank every resample at once.
    ra = stats.rankdata(a[idx], axis=1)
    rb = stats.rankdata(b[idx], axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (ra * rb).sum(axis=1) / den
    boot = boot[np.isfinite(boot)]
    alpha = (1.0 - ci) / 2
    low, high = (np.quantile(boot, [alpha, 1 - alpha]) if len(boot) else (np.nan, np.nan))
    return Summary({"rho": float(res.statistic), "low": float(low), "high": float(high), "n": n,
                    "pvalue": float(res.pvalue)}, title="Spearman")


# ----------------------------------------------------------------------------- tables
def _summary(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one seed) and n of ``value`` per ``keys``."""
    g = frame.groupby(keys, sort=True, observed=True, dropna=False)[value]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["n"] = out["n"].astype(int)
    # std is 0 for one seed; it stays NaN where an infinite value (a diverged run) makes it so.
    out.loc[out["n"] == 1, "std"] = 0.0
    return out


def seed_table(frame: pd.DataFrame, *, rows: str | Sequence[str] = "criterion",
               cols: str | Sequence[str] | None = "sparsity", value: str = "val_error_gap_ft",
               seeds: str | None = "seed", fmt: str = "{:.2f} ± {:.2f}",
               numeric: bool = False) -> pd.DataFrame:
    """Mean ± std over seeds in the papers' table layout (LM paper Tables 1–3).

    Each (rows, cols) cell must hold exactly one run per seed: if other configuration columns
    (λ, π, schedule …) vary inside a cell this raises instead of averaging across them; choose
    a setting first (filter, or :func:`best_over`).

    Args:
        frame: one row per run.
        rows: column(s) for the table rows.
        cols: column(s) for the table columns, or None for a single column named ``value``.
        value: the measured column.
        seeds: the seed column (None: every row is one sample, no uniqueness check).
        fmt: format of a cell, given mean and std.
        numeric: return numbers instead of strings: columns are a MultiIndex whose first level
            is ``mean``, ``std`` (ddof=1, 0 for one seed) or ``n``.

    Returns:
        Index = ``rows``; strings ``fmt.format(mean, std)`` (or numbers, see ``numeric``).
        String rows keep their order of first appearance; numbers sort ascending.
    """
    rows_, cols_ = _names(rows), _names(cols)
    keys = rows_ + cols_
    require_columns(frame, keys + [value] + _names(seeds))
    _no_nan(frame, value, keys + _names(seeds))
    if seeds is not None:
        _unique(frame, keys + [seeds], "cell and seed")
    summary = _summary(_ordered(frame, keys), keys, value)
    if not cols_:
        summary = summary.set_index(rows_)
        table = pd.concat({stat: summary[[stat]].rename(columns={stat: value})
                           for stat in ("mean", "std", "n")}, axis=1)
    else:
        table = summary.set_index(keys)[["mean", "std", "n"]].unstack(cols_)
    table.index = _plain(table.index)
    table.columns = _plain(table.columns)
    if numeric:
        return table
    mean, std = table["mean"], table["std"]
    text = pd.DataFrame(
        [[fmt.format(m, s) if pd.notna(m) else "" for m, s in zip(mr, sr)]
         for mr, sr in zip(mean.to_numpy(), std.to_numpy())],
        index=mean.index, columns=mean.columns)
    return text


def best_over(frame: pd.DataFrame, *, over: str | Sequence[str] = ("lam", "stages"),
              by: str | Sequence[str] = ("criterion",), value: str = "delta_loss",
              seeds: str | None = "seed", minimize: bool = True) -> pd.DataFrame:
    """For each ``by`` group, the hyper-parameters ``over`` with the best mean over seeds
    (LM paper Tables 1–3: "best ΔL across values of λ and π" per criterion).

    Ties in the mean go to the first setting in sorted order of ``over`` (so the smallest λ,
    then the fewest stages, with the defaults).

    Args:
        frame: one row per run.
        over: hyper-parameter columns to choose (NaN, e.g. λ of MP, is a value of its own).
        by: columns identifying what is compared (criterion, arch …).
        value: the measured column.
        seeds: the seed column; one row per (by, over, seed) is required.
        minimize: lower ``value`` is better (ΔL, error gaps).

    Returns:
        One row per ``by`` group: the ``by`` and ``over`` columns, then ``mean``, ``std``
        (ddof=1, 0 for one seed) and ``n`` of ``value`` at the chosen setting.
    """
    over_, by_ = _names(over), _names(by)
    keys = by_ + over_
    require_columns(frame, keys + [value] + _names(seeds))
    _no_nan(frame, value, keys + _names(seeds))
    if seeds is not None:
        _unique(frame, keys + [seeds], "setting and seed")
    summary = _summary(_ordered(frame, keys), keys, value)
    # A stable sort on the mean keeps the sorted order of ``over`` among ties.
    summary = summary.sort_values("mean", ascending=minimize, kind="mergesort")
    best = summary.groupby(by_, sort=True, observed=True, dropna=False).head(1)
    best = best.sort_values(by_, kind="mergesort").reset_index(drop=True)
    for k in keys:
        if isinstance(best[k].dtype, pd.CategoricalDtype):
            best[k] = best[k].astype(object)
    return best


_GAPS = {  # gap column: (pruned error, dense error)
    "val_error_gap": ("val_error", "val_error_dense"),
    "val_error_gap_ft": ("val_error_ft", "val_error_dense"),
    "test_error_gap": ("test_error", "test_error_dense"),
    "test_error_gap_ft": ("test_error_ft", "test_error_dense"),
}


def error_gaps(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with the error gaps before and after fine-tuning (LM paper Sec. 4:
    "validation error gap before/after fine-tuning", pruned minus dense).

    A gap column already present is kept, its NaN entries filled where the errors are known;
    a missing one is derived when both error columns exist (``val_error_gap = val_error −
    val_error_dense``, ``val_error_gap_ft = val_error_ft − val_error_dense``, and the same for
    ``test_`` when ``test_error_dense`` exists).

    Raises:
        ValueError: no validation gap is present or derivable (naming the columns needed).
    """
    out = frame.copy()
    for gap, (pruned, dense) in _GAPS.items():
        if pruned in out.columns and dense in out.columns:
            derived = out[pruned] - out[dense]
            out[gap] = out[gap].fillna(derived) if gap in out.columns else derived
    if "val_error_gap" not in out.columns and "val_error_gap_ft" not in out.columns:
        raise ValueError("cannot derive a validation error gap: need 'val_error_dense' and "
                         "'val_error' or 'val_error_ft'; frame has " + str(list(frame.columns)))
    return out


# ----------------------------------------------------------------------------- profiles
PROFILE_KINDS = ("mrp", "dolan-more")


def performance_profile(frame: pd.DataFrame, method: str = "method", value: str = "penalty",
                        by: str | Sequence[str] = ("measurement",),
                        taus: Iterable[float] | None = None, *,
                        missing: Literal["raise", "drop"] = "raise",
                        kind: Literal["mrp", "dolan-more"] = "mrp",
                        shift: float = 0.0) -> pd.DataFrame:
    """Performance profiles of methods over measurements (problems), lower values better.

    ``kind="mrp"`` (default): MRP's interpolated profile (MRP paper Sec. 4.3, after Dolan &
    Moré). For measurement j with penalties d_i(j), the threshold is
    t_j(τ) = τ·min_i d_i(j) + (1 − τ)·max_i d_i(j) and p_i(τ) = (1/N) Σ_j 1[d_i(j) < t_j(τ)],
    τ ∈ [0, 1], with the paper's strict "<". Hence, exactly:

    - τ = 1: t_j is the best penalty and nobody is strictly below it, so every p_i(1) = 0;
    - τ = 0: t_j is the worst penalty, so p_i(0) is the fraction of measurements in which
      method i is not (tied for) the worst;
    - a method tied with t_j does not count, and a measurement where all methods tie counts
      for nobody at any τ.

    t_j is clipped to [min_j, max_j] so these hold exactly in floating point. Values must be
    finite (any sign).

    ``kind="dolan-more"``: the classical profile (Dolan & Moré 2002, *Benchmarking optimization
    software with performance profiles*, Eqs. 1-2; as perprof-py computes it). The ratio to
    the best is r_{j,i} = d_i(j) / min_k d_k(j) and ρ_i(τ) = (1/N) Σ_j 1[r_{j,i} ≤ τ], τ ≥ 1,
    N counting every measurement. A failure is ``+inf`` (ratio ∞, never counted); a
    measurement where every method failed counts in N for nobody. Ratios need positive
    costs: a value ≤ 0 raises unless ``shift`` is given, and then d + shift is profiled
    (e.g. ``shift = 1 − min(d)`` for penalties that may be negative). Default ``taus``: the
    breakpoints, i.e. the distinct finite ratios (1 first), where the step function changes.

    Args:
        frame: one row per (method, measurement) with the penalty in ``value``.
        method: column naming the method (one profile each).
        value: the penalty column; lower is better.
        by: column(s) identifying a measurement j.
        taus: ``kind="mrp"``: constants in [0, 1], default 101 evenly spaced points;
            ``kind="dolan-more"``: ratios ≥ 1, default the breakpoints.
        missing: measurements lacking some method's penalty make d(j) incomplete:
            ``"raise"`` (default) raises ValueError naming them; ``"drop"`` drops those
            measurements with a warning (N counts complete measurements only).
        kind: ``"mrp"`` or ``"dolan-more"`` (see above).
        shift: added to every value before the ratios (``kind="dolan-more"`` only).

    Returns:
        Tidy frame with columns method, tau, fraction (methods in order of first appearance,
        tau ascending); ``attrs["kind"]`` holds ``kind`` so the figures label the axes.

    Raises:
        ValueError: a column is missing; a value is NaN (or infinite for ``"mrp"``, ``-inf``
            or ≤ 0 after ``shift`` for ``"dolan-more"``); a (method, measurement) pair repeats;
            measurements are incomplete (``missing="raise"``); a τ is out of range; ``kind``
            is unknown.
    """
    by_ = _names(by)
    require_columns(frame, [method, value] + by_)
    if kind not in PROFILE_KINDS:
        raise ValueError(f"kind must be one of {PROFILE_KINDS}, got {kind!r}")
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if kind == "mrp":
        if shift != 0.0:
            raise ValueError(f"shift applies to kind='dolan-more' only, got shift={shift!r}")
        tau = np.linspace(0.0, 1.0, 101) if taus is None else np.asarray(list(taus), dtype=float)
        if tau.ndim != 1 or not np.all((tau >= 0) & (tau <= 1)):
            raise ValueError(f"taus must lie in [0, 1] for kind='mrp', got {tau}")
    else:
        if isinstance(shift, bool) or not np.isfinite(float(shift)):
            raise ValueError(f"shift must be a finite number, got {shift!r}")
        tau = None if taus is None else np.asarray(list(taus), dtype=float)
        if tau is not None and (tau.ndim != 1 or not np.all(tau >= 1)):
            raise ValueError(f"taus must be ratios >= 1 for kind='dolan-more', got {tau}")
    _no_nan(frame, value, [method] + by_)
    values = frame[value].to_numpy(dtype=float)
    bad = (~np.isfinite(values) if kind == "mrp" else values == -np.inf)
    if bad.any():
        raise ValueError(f"{value!r} is {'infinite' if kind == 'mrp' else '-inf'} in "
                         f"{int(bad.sum())} rows: {_describe(frame.loc[bad, [method] + by_])}; "
                         + ("replace by a finite penalty or drop them" if kind == "mrp" else
                            "a failure is +inf"))
    _unique(frame, [method] + by_, "method and measurement")

    methods = list(pd.unique(frame[method]))
    d = frame.pivot_table(index=by_, columns=method, values=value, aggfunc="first",
                          observed=True, sort=True)
    d = d.reindex(columns=methods)
    # pivot_table drops measurements whose keys are NaN; nothing else goes missing here.
    incomplete = d.isna().any(axis=1)
    if incomplete.any():
        lacking = {j: [m for m in methods if pd.isna(d.loc[j, m])] for j in d.index[incomplete]}
        shown = "; ".join(f"{j}: {ms}" for j, ms in list(lacking.items())[:5])
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        msg = (f"{int(incomplete.sum())} of {len(d)} measurements {by_} lack some method's "
               f"{value!r}: {shown}{more}")
        if missing == "raise":
            raise ValueError(msg + "; pass missing='drop' to drop them")
        warnings.warn(msg + "; dropped", stacklevel=2)
        d = d[~incomplete]
    if d.empty:
        raise ValueError("no complete measurement to profile")

    v = d.to_numpy(dtype=float)                      # (J, I)
    if kind == "mrp":
        lo, hi = v.min(axis=1), v.max(axis=1)            # (J,)
        t = tau[:, None] * lo + (1.0 - tau[:, None]) * hi  # (T, J)
        t = np.clip(t, lo, hi)
        frac = (v[None, :, :] < t[:, :, None]).mean(axis=1)  # (T, I)
    else:
        tau, frac = _dolan_more(v + shift, tau, value, shift)
    out = pd.DataFrame({
        "method": np.repeat(np.asarray(methods, dtype=object), len(tau)),
        "tau": np.tile(tau, len(methods)),
        "fraction": frac.T.reshape(-1),
    })
    out.attrs["kind"] = kind
    return out


def _dolan_more(cost: np.ndarray, tau: np.ndarray | None, value: str, shift: float):
    """(taus, fractions (T, I)) of the Dolan-Moré profile of a (J, I) cost table (inf = fail)."""
    finite = np.isfinite(cost)
    if (cost[finite] <= 0).any():
        worst = float(cost[finite].min())
        raise ValueError(f"kind='dolan-more' takes ratios to the best, which need positive "
                         f"values; {value!r} + shift ({shift:g}) has minimum {worst:g}: pass "
                         f"shift= (e.g. shift={1.0 - worst + shift:g}) or use kind='mrp'")
    best = cost.min(axis=1, keepdims=True)           # inf where every method failed
    with np.errstate(invalid="ignore"):
        ratio = np.where(np.isfinite(best), cost / best, np.inf)
    if tau is None:
        tau = np.unique(ratio[np.isfinite(ratio)])
        if tau.size == 0:
            raise ValueError("every method failed on every measurement: no profile to draw")
    frac = (ratio[None, :, :] <= tau[:, None, None]).mean(axis=1)  # (T, I)
    return tau, frac
