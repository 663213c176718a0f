"""Statistics on tidy result frames: Spearman with bootstrap CI, seed tables, best-over
hyper-parameters, error gaps and performance profiles (checked against hand computations)."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prunelab import metrics as M


def correlated(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(size=n)
    return pd.DataFrame({"delta_loss": x, "val_error_gap_ft": np.log(x) + rng.normal(size=n),
                         "seed": np.arange(n)})


# ----------------------------------------------------------------------------- spearman
def test_spearman_equals_scipy_on_a_small_frame():
    f = pd.DataFrame({"delta_loss": [0.1, 0.5, 0.3, 2.0, 1.5, 0.05, 0.7, 0.7],
                      "val_error_gap_ft": [0.2, 0.1, 0.4, 0.9, 0.3, 0.0, 0.5, 0.6]})
    s = M.spearman(f, n_boot=200)
    ref = stats.spearmanr(f.delta_loss, f.val_error_gap_ft)
    assert s["rho"] == pytest.approx(ref.statistic, abs=1e-12)
    assert s["pvalue"] == pytest.approx(ref.pvalue, abs=1e-12)
    assert s["n"] == 8
    assert set(s) == {"rho", "low", "high", "n", "pvalue"}


def test_spearman_result_is_a_dict_that_renders():
    s = M.spearman(correlated(20), n_boot=100)
    assert isinstance(s, dict) and dict(s) == s and s == {k: s[k] for k in s}
    assert repr(s) == (f"Spearman(rho={s['rho']:.4g}, low={s['low']:.4g}, high={s['high']:.4g}, "
                       f"n=20, pvalue={s['pvalue']:.4g})")
    assert s._repr_html_().count("<tr>") == 5 and "Spearman" in s._repr_html_()


def test_spearman_interval_contains_rho_is_seeded_and_narrows_with_more_runs():
    small, large = correlated(25), correlated(400)
    a = M.spearman(small, n_boot=500, seed=3)
    assert a["low"] <= a["rho"] <= a["high"]
    assert M.spearman(small, n_boot=500, seed=3) == a          # same seed, same numbers
    assert M.spearman(small, n_boot=500, seed=4)["low"] != a["low"]
    b = M.spearman(large, n_boot=500, seed=3)
    assert b["low"] <= b["rho"] <= b["high"]
    assert b["high"] - b["low"] < 0.5 * (a["high"] - a["low"])
    # a wider coverage gives a wider interval
    c = M.spearman(small, n_boot=500, seed=3, ci=0.5)
    assert c["high"] - c["low"] < a["high"] - a["low"]


def test_spearman_bad_inputs_name_the_problem():
    f = correlated(10)
    with pytest.raises(ValueError, match="val_error_gap_ft"):
        M.spearman(f.drop(columns="val_error_gap_ft"))
    f.loc[3, "delta_loss"] = np.nan
    with pytest.raises(ValueError, match="delta_loss.*NaN"):
        M.spearman(f)
    with pytest.raises(ValueError, match="at least 3"):
        M.spearman(correlated(2))


# ----------------------------------------------------------------------------- seed_table
def runs() -> pd.DataFrame:
    # mp at 0.5: 1, 2, 3 -> 2.00 ± 1.00; mp at 0.9: 4, 6 -> 5.00 ± 1.41; lm at 0.9: one seed, 4
    return pd.DataFrame({
        "criterion": ["mp"] * 5 + ["lm"] * 2,
        "sparsity": [0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.5],
        "seed": [0, 1, 2, 0, 1, 0, 0],
        "val_error_gap_ft": [1.0, 2.0, 3.0, 4.0, 6.0, 4.0, 0.25],
    })


def test_seed_table_formats_mean_and_std_by_hand():
    t = M.seed_table(runs())
    assert list(t.index) == ["mp", "lm"]            # order of appearance, not alphabetical
    assert list(t.columns) == [0.5, 0.9]
    assert t.loc["mp", 0.5] == "2.00 ± 1.00"
    assert t.loc["mp", 0.9] == f"5.00 ± {np.std([4, 6], ddof=1):.2f}"
    assert t.loc["lm", 0.9] == "4.00 ± 0.00"       # one seed: std 0
    assert t.loc["lm", 0.5] == "0.25 ± 0.00"


def test_seed_table_numeric_and_without_columns():
    t = M.seed_table(runs(), numeric=True)
    assert t["mean"].loc["mp", 0.5] == 2.0
    assert t["std"].loc["mp", 0.5] == 1.0
    assert t["n"].loc["mp", 0.5] == 3
    assert t["std"].loc["lm", 0.9] == 0.0
    single = M.seed_table(runs(), cols=None, seeds=None, fmt="{:.1f}±{:.1f}")  # rows = samples
    assert single.loc["mp", "val_error_gap_ft"] == f"{np.mean([1, 2, 3, 4, 6]):.1f}±" \
                                                  f"{np.std([1, 2, 3, 4, 6], ddof=1):.1f}"


def test_seed_table_refuses_to_average_over_other_settings():
    f = pd.concat([runs().assign(lam=0.0), runs().assign(lam=0.1)])
    with pytest.raises(ValueError, match="lam"):
        M.seed_table(f)
    with pytest.raises(ValueError, match="missing|lacks"):
        M.seed_table(runs(), cols="stages")
    bad = runs()
    bad.loc[2, "val_error_gap_ft"] = np.nan
    with pytest.raises(ValueError, match="NaN.*criterion=mp"):
        M.seed_table(bad)


# ----------------------------------------------------------------------------- best_over
def grid() -> pd.DataFrame:
    rows = []
    for crit, setting, values in [
        ("lm", (0.0, 1), [3.0, 3.2]),       # mean 3.1
        ("lm", (1e-3, 14), [1.0, 1.4]),     # mean 1.2  <- best mean
        ("lm", (0.1, 14), [0.5, 3.0]),      # mean 1.75 (has the best single run)
        ("qm", (0.1, 1), [2.0, 2.0]),       # tie with the next: the smaller λ wins
        ("qm", (0.0, 1), [2.0, 2.0]),
        ("qm", (0.0, 140), [2.5, 2.7]),
    ]:
        for seed, v in enumerate(values):
            rows.append({"criterion": crit, "lam": setting[0], "stages": setting[1],
                         "seed": seed, "delta_loss": v})
    return pd.DataFrame(rows)


def test_best_over_picks_the_best_mean_per_criterion():
    b = M.best_over(grid())
    assert list(b.columns) == ["criterion", "lam", "stages", "mean", "std", "n"]
    lm = b[b.criterion == "lm"].iloc[0]
    assert (lm.lam, lm.stages, lm.n) == (1e-3, 14, 2)
    assert lm["mean"] == pytest.approx(1.2)
    assert lm["std"] == pytest.approx(np.std([1.0, 1.4], ddof=1))
    qm = b[b.criterion == "qm"].iloc[0]
    assert (qm.lam, qm.stages, qm["std"]) == (0.0, 1, 0.0)
    worst = M.best_over(grid(), minimize=False)
    assert tuple(worst[worst.criterion == "lm"][["lam", "stages"]].iloc[0]) == (0.0, 1)


def test_best_over_bad_inputs():
    with pytest.raises(ValueError, match="schedule"):
        M.best_over(grid(), over=("lam", "schedule"))
    dup = pd.concat([grid().assign(sparsity=0.9), grid().assign(sparsity=0.95)])
    with pytest.raises(ValueError, match="sparsity"):
        M.best_over(dup)
    nan = grid()
    nan.loc[0, "delta_loss"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.best_over(nan)


# ----------------------------------------------------------------------------- error_gaps
def test_error_gaps_derives_missing_and_fills_nan():
    f = pd.DataFrame({"val_error": [0.3, 0.4], "val_error_dense": [0.1, 0.1],
                      "val_error_ft": [0.15, 0.12], "val_error_gap": [0.25, np.nan]})
    g = M.error_gaps(f)
    assert g.val_error_gap.tolist() == pytest.approx([0.25, 0.3])  # present value kept
    assert g.val_error_gap_ft.tolist() == pytest.approx([0.05, 0.02])
    assert "val_error_gap_ft" not in f.columns                      # caller's frame untouched
    with pytest.raises(ValueError, match="val_error_dense"):
        M.error_gaps(pd.DataFrame({"val_error": [0.3]}))


# ----------------------------------------------------------------------------- profiles
def hand_example() -> pd.DataFrame:
    """3 methods x 4 measurements, penalties d_i(j) (lower is better):

        j   a  b  c    min max
        1   1  2  3     1   3
        2   2  2  4     2   4     a, b tie for best
        3   5  5  5     5   5     all tie: counts for nobody
        4   3  1  3     1   3     a, c tie for worst
    """
    d = {"a": [1, 2, 5, 3], "b": [2, 2, 5, 1], "c": [3, 4, 5, 3]}
    return pd.DataFrame([{"method": m, "measurement": j + 1, "penalty": float(v)}
                         for m, vs in d.items() for j, v in enumerate(vs)])


def test_performance_profile_by_hand_with_ties_and_both_ends():
    p = M.performance_profile(hand_example(), taus=[0.0, 0.25, 0.5, 1.0])
    got = p.pivot(index="tau", columns="method", values="fraction")
    # t_j = tau*min + (1-tau)*max, counted when d < t (strict):
    # tau=0    t=(3,4,5,3):       a: j1 j2 -> 2/4; b: j1 j2 j4 -> 3/4; c: never (worst or tied)
    # tau=0.25 t=(2.5,3.5,5,2.5): a: j1 j2;        b: j1 (2<2.5) j2 j4;  c: none
    # tau=0.5  t=(2,3,5,2):       a: j1 j2;        b: j2 j4 (2<2 fails at j1); c: none
    # tau=1    t=min:             nobody is strictly below the best
    expected = pd.DataFrame({"a": [0.5, 0.5, 0.5, 0.0], "b": [0.75, 0.75, 0.5, 0.0],
                             "c": [0.0, 0.0, 0.0, 0.0]}, index=[0.0, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(got[["a", "b", "c"]].to_numpy(), expected.to_numpy())
    assert list(p.columns) == ["method", "tau", "fraction"]
    assert list(pd.unique(p.method)) == ["a", "b", "c"]


def test_performance_profile_defaults_and_exact_ties_in_floating_point():
    p = M.performance_profile(hand_example())
    assert len(p) == 3 * 101
    assert p.tau.min() == 0.0 and p.tau.max() == 1.0
    # non-increasing in tau for every method
    assert all((np.diff(g.sort_values("tau").fraction) <= 0).all() for _, g in p.groupby("method"))
    # naive 0.18*0.1 + 0.82*0.1 rounds above 0.1; a full tie must still count for nobody
    tied = pd.DataFrame({"method": ["a", "b"], "measurement": [1, 1], "penalty": [0.1, 0.1]})
    assert (M.performance_profile(tied).fraction == 0).all()


def test_performance_profile_several_key_columns():
    f = hand_example()
    f["layer"], f["step"] = f.measurement % 2, f.measurement // 2
    p = M.performance_profile(f.drop(columns="measurement"), by=["layer", "step"], taus=[0.0])
    assert p.set_index("method").fraction.to_dict() == {"a": 0.5, "b": 0.75, "c": 0.0}


def test_performance_profile_missing_measurements_raise_or_drop():
    f = hand_example()
    f = f[~((f.method == "c") & (f.measurement == 4))]
    with pytest.raises(ValueError, match=r"4: \['c'\]"):
        M.performance_profile(f)
    with pytest.warns(UserWarning, match="dropped"):
        p = M.performance_profile(f, taus=[0.0], missing="drop")
    # N = 3 complete measurements: a at j1, j2; b at j1, j2
    assert p.set_index("method").fraction.to_dict() == pytest.approx(
        {"a": 2 / 3, "b": 2 / 3, "c": 0.0})


def test_performance_profile_bad_inputs_name_them():
    f = hand_example()
    with pytest.raises(ValueError, match="measurement"):
        M.performance_profile(f.drop(columns="measurement"))
    nan = f.copy()
    nan.loc[(nan.method == "b") & (nan.measurement == 2), "penalty"] = np.nan
    with pytest.raises(ValueError, match="NaN.*method=b, measurement=2"):
        M.performance_profile(nan)
    inf = f.copy()
    inf.loc[0, "penalty"] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        M.performance_profile(inf)
    with pytest.raises(ValueError, match="several rows"):
        M.performance_profile(pd.concat([f, f.head(1)]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.performance_profile(f, taus=[0.5, 1.5])


# ----------------------------------------------------------------------------- module
def test_metrics_import_is_torch_free_and_evaluate_is_reexported():
    code = ("import sys, prunelab.metrics as m; assert 'torch' not in sys.modules; "
            "m.spearman; m.performance_profile")
    subprocess.run([sys.executable, "-c", code], check=True)
    from prunelab import train

    assert M.evaluate is train.evaluate
    assert "evaluate" in M.__all__


# ----------------------------------------------------------------------------- Dolan-Moré profile
def dolan_more_table() -> pd.DataFrame:
    """Costs (lower is better), inf = the solver failed.

        j   A    B    C      best   ratios A, B, C
        1   1    2    inf    1      1, 2, inf      C failed
        2   3    3    6      3      1, 1, 2        A and B tie for best
        3   4    2    1      1      4, 2, 1
        4   inf  inf  inf    inf    inf, inf, inf  everybody failed: counts in N for nobody
    """
    d = {"A": [1, 3, 4, np.inf], "B": [2, 3, 2, np.inf], "C": [np.inf, 6, 1, np.inf]}
    return pd.DataFrame([{"method": m, "measurement": j + 1, "penalty": float(v)}
                         for m, vs in d.items() for j, v in enumerate(vs)])


def perprof_reference(costs: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Brute force from the definition, problem by problem (Dolan & Moré 2002, Eqs. 1-2)."""
    n_p, n_s = costs.shape
    out = np.zeros((len(taus), n_s))
    for p in range(n_p):
        best = min(costs[p])
        for s in range(n_s):
            r = costs[p, s] / best if np.isfinite(best) and np.isfinite(costs[p, s]) else np.inf
            for t, tau in enumerate(taus):
                out[t, s] += (r <= tau) / n_p
    return out


def test_dolan_more_profile_by_hand_with_ties_and_failures():
    p = M.performance_profile(dolan_more_table(), kind="dolan-more")
    got = p.pivot(index="tau", columns="method", values="fraction")[["A", "B", "C"]]
    # default taus: the breakpoints 1, 2, 4 (distinct finite ratios); N = 4 problems
    assert list(got.index) == [1.0, 2.0, 4.0]
    expected = np.array([[2, 1, 1],     # τ = 1: A best at j1, j2; B at j2 (tie); C at j3
                         [2, 3, 2],     # τ = 2: B adds j1, j3; C adds j2
                         [3, 3, 2]]) / 4  # τ = 4: A adds j3; C never reaches j1 (failed)
    np.testing.assert_array_equal(got.to_numpy(), expected)
    assert p.attrs["kind"] == "dolan-more"
    taus = np.array([1.0, 1.5, 2.0, 3.9, 4.0, 100.0])
    q = M.performance_profile(dolan_more_table(), kind="dolan-more", taus=taus)
    costs = np.array([[1, 2, np.inf], [3, 3, 6], [4, 2, 1], [np.inf] * 3])
    np.testing.assert_allclose(q.pivot(index="tau", columns="method", values="fraction")
                               [["A", "B", "C"]].to_numpy(), perprof_reference(costs, taus))


def test_dolan_more_default_kind_unchanged_and_bad_inputs():
    f = hand_example()
    assert M.performance_profile(f).equals(M.performance_profile(f, kind="mrp"))
    with pytest.raises(ValueError, match="kind must be one of"):
        M.performance_profile(f, kind="perprof")
    with pytest.raises(ValueError, match=">= 1"):
        M.performance_profile(f, kind="dolan-more", taus=[0.5])
    neg = f.assign(penalty=f.penalty - 2.0)       # penalties may be 0 or negative
    with pytest.raises(ValueError, match="positive.*shift="):
        M.performance_profile(neg, kind="dolan-more")
    shifted = M.performance_profile(neg, kind="dolan-more", shift=2.0)
    assert shifted.equals(M.performance_profile(f, kind="dolan-more"))
    with pytest.raises(ValueError, match="shift applies"):
        M.performance_profile(f, shift=1.0)
    with pytest.raises(ValueError, match="-inf"):
        M.performance_profile(f.assign(penalty=-np.inf), kind="dolan-more")
    with pytest.raises(ValueError, match="infinite"):              # mrp keeps refusing inf
        M.performance_profile(dolan_more_table())
