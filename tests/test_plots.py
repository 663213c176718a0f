"""Interactive (plotly) and static (seaborn) figures on small synthetic frames: traces, axis
types, titles, hover text, deterministic files, and no torch import."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from prunelab import figures, metrics, plots

pytest.importorskip("plotly")
go = pytest.importorskip("plotly.graph_objects")


def sweep(seeds: int = 2) -> pd.DataFrame:
    """A tiny LM-paper sweep: mp once per seed; lm and qm over λ ∈ {0, 1e-3, 1e-1}, π ∈ {1, 14}."""
    rng = np.random.default_rng(0)
    rows = []
    for crit, base in [("mp", 3.0), ("lm", 2.0), ("qm", 1.0)]:
        lams = [0.0] if crit == "mp" else [0.0, 1e-3, 1e-1]
        stages = [1] if crit == "mp" else [1, 14]
        for lam in lams:
            for st in stages:
                for s in range(seeds):
                    dl = base / st * (1 + 0.2 * rng.random())
                    rows.append({"arch": "mlp", "dataset": "mnist1d", "seed": s,
                                 "criterion": crit, "sparsity": 0.9, "stages": st, "lam": lam,
                                 "schedule": "exponential", "scope": "global",
                                 "delta_loss": dl, "val_error": 0.2 + dl / 10,
                                 "val_error_dense": 0.1, "val_error_ft": 0.11 + dl / 100
                                 + 0.002 * rng.standard_normal(), "key": f"{crit}{lam}{st}{s}"})
    return pd.DataFrame(rows)


def history(seeds: int = 2) -> pd.DataFrame:
    rows = []
    for sched in ("linear", "exponential"):
        for s in range(seeds):
            for st in range(1, 6):
                sp = 0.9 * st / 5 if sched == "linear" else 1 - 0.1 ** (st / 5)
                rows.append({"schedule": sched, "criterion": "qm", "seed": s, "stage": st,
                             "target_sparsity": sp, "sparsity": sp, "loss": 0.1 + sp,
                             "delta_loss": sp ** 3 * (1 + 0.1 * s), "step_norm": 1.0 + s / st,
                             "seconds": 0.0, "examples": 100})
    return pd.DataFrame(rows)


def profile() -> pd.DataFrame:
    f = pd.DataFrame({"method": list("abc") * 3, "measurement": np.repeat([1, 2, 3], 3),
                      "penalty": [1.0, 2, 3, 2, 1, 3, 1, 1, 2]})
    return metrics.performance_profile(f, taus=np.linspace(0, 1, 11))


def density() -> pd.DataFrame:
    return pd.DataFrame({"layer": ["0.weight", "2.weight", "total"], "numel": [100, 50, 150],
                         "kept": [10, 20, 30], "density": [0.1, 0.4, 0.2]})


def hover(trace) -> str:
    """All hover text of a trace: the template plus every customdata string."""
    data = "" if trace.customdata is None else " ".join(map(str, np.ravel(trace.customdata)))
    return f"{trace.hovertemplate} {data}"


# ----------------------------------------------------------------------------- LM Fig. 1
def test_delta_loss_vs_lambda_panels_lines_reference_and_zero_tick():
    f = sweep()
    fig = plots.delta_loss_vs_lambda(f)
    assert isinstance(fig, go.Figure)
    lines = [t for t in fig.data if t.name.startswith("π")]
    refs = [t for t in fig.data if t.name == "MP"]     # display name
    assert len(fig.data) == 2 * 2 + 2                  # (lm, qm) x π ∈ {1, 14}, mp in each panel
    assert len(lines) == 4 and len(refs) == 2
    mp_mean = f[f.criterion == "mp"].delta_loss.mean()
    for r in refs:                                     # dashed black, at MP's mean ΔL
        assert r.line.dash == "dash" and r.line.color == "black"
        assert list(r.y) == pytest.approx([mp_mean, mp_mean])
    assert sum(bool(t.showlegend) for t in refs) == 1
    assert fig.layout.xaxis.type == fig.layout.xaxis2.type == "log"
    assert fig.layout.yaxis.type == fig.layout.yaxis2.type == "log"
    assert fig.layout.yaxis2.matches == "y"            # shared ΔL axis
    # λ = 0 sits one decade left of the smallest positive λ, labelled "0"
    assert fig.layout.xaxis.ticktext[0] == "0"
    assert fig.layout.xaxis.tickvals[0] == pytest.approx(1e-4)
    lm1 = next(t for t in lines if t.name == "π=1" and t.xaxis == "x")
    assert list(lm1.x) == pytest.approx([1e-4, 1e-3, 1e-1])
    ref = f[(f.criterion == "lm") & (f.stages == 1) & (f.lam == 0)].delta_loss
    assert lm1.y[0] == pytest.approx(ref.mean())
    assert lm1.error_y.array[0] == pytest.approx(ref.std())
    text = hover(lm1)
    assert "lam=" in text and "stages=" in text and "criterion=" in text
    assert "0.001" in text and "lm" in text


def test_delta_loss_vs_lambda_dash_grouping_and_errors():
    f = pd.concat([sweep().assign(schedule="exponential"), sweep().assign(schedule="linear")])
    with pytest.raises(ValueError, match="schedule"):
        plots.delta_loss_vs_lambda(f)                  # two schedules would be averaged
    fig = plots.delta_loss_vs_lambda(f, dash="schedule")
    dashes = {t.line.dash for t in fig.data if t.name != "MP"}
    assert dashes == {"solid", "dot"}
    with pytest.raises(ValueError, match="stages"):
        plots.delta_loss_vs_lambda(f.drop(columns="stages"))


# ----------------------------------------------------------------------------- LM Fig. 2
def test_stage_trajectories_two_panels_one_line_per_schedule():
    fig = plots.stage_trajectories(history())
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2 * 2                      # (ΔL, ‖Δθ‖) x (linear, exponential)
    assert {t.name for t in fig.data} == {"linear", "exponential"}
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text.startswith("sparsity")   # with its unit
    assert fig.layout.xaxis2.title.text == "stage"
    step = next(t for t in fig.data if t.xaxis == "x2" and t.name == "linear")
    assert step.y[0] == pytest.approx(1.5)             # mean of 1 + s/1 over s ∈ {0, 1}
    assert step.error_y.visible
    assert "schedule=" in hover(step) and "linear" in hover(step)
    single = plots.stage_trajectories(history(seeds=1)[lambda d: d.schedule == "linear"],
                                      x="stage")
    assert len(single.data) == 2 and single.layout.xaxis.title.text == "stage"


# ----------------------------------------------------------------------------- LM Fig. 3
def test_delta_loss_scatter_rho_in_title_log_x_and_run_hover():
    f = sweep()
    fig = plots.delta_loss_scatter(f, n_boot=300)     # val_error_gap_ft derived from the errors
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 3                          # one trace per criterion
    assert sum(len(t.x) for t in fig.data) == len(f)   # one point per run
    assert fig.layout.xaxis.type == "log"
    s = metrics.spearman(metrics.error_gaps(f), n_boot=300)
    title = fig.layout.title.text
    assert f"ρ = {s['rho']:.2f}" in title and f"[{s['low']:.2f}, {s['high']:.2f}]" in title
    text = hover(next(t for t in fig.data if t.name == "QM"))
    for key in ("criterion=", "seed=", "stages=", "lam=", "schedule=", "qm", "exponential"):
        assert key in text
    with pytest.raises(ValueError, match="nope"):
        plots.delta_loss_scatter(f, y="nope")


# ----------------------------------------------------------------------------- others
def test_performance_profile_plot_step_lines():
    fig = plots.performance_profile(profile())
    assert len(fig.data) == 3
    assert all(t.line.shape == "hv" for t in fig.data)
    assert all(0 <= y <= 1 for t in fig.data for y in t.y)
    assert tuple(fig.layout.xaxis.range) == (0, 1)


def test_performance_profile_plot_dolan_more_on_a_log_ratio_axis():
    f = pd.DataFrame({"method": list("ab") * 2, "measurement": [1, 1, 2, 2],
                      "penalty": [1.0, 2.0, 3.0, np.inf]})
    fig = plots.performance_profile(metrics.performance_profile(f, kind="dolan-more"))
    assert fig.layout.xaxis.type == "log" and "ratio" in fig.layout.xaxis.title.text
    b = next(t for t in fig.data if t.name == "b")
    assert list(b.x) == [1.0, 2.0] and list(b.y) == [0.0, 0.5]   # b failed on measurement 2
    mrp = plots.performance_profile(profile())
    assert mrp.layout.xaxis.type is None and tuple(mrp.layout.xaxis.range) == (0, 1)


def test_layer_density_bars_skip_total():
    fig = plots.layer_density(density())
    assert len(fig.data) == 1 and fig.data[0].type == "bar"
    assert list(fig.data[0].x) == ["0.weight", "2.weight"]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == pytest.approx(0.2)
    assert "numel=" in hover(fig.data[0])


def test_accuracy_vs_density_averages_seeds():
    f = pd.DataFrame({"criterion": ["mp"] * 4 + ["lap"] * 4, "seed": [0, 1] * 4,
                      "density": [1.0, 1.0, 0.1, 0.1] * 2,
                      "accuracy": [0.9, 0.9, 0.5, 0.7, 0.9, 0.9, 0.6, 0.8]})
    fig = plots.accuracy_vs_density(f)
    assert len(fig.data) == 2 and fig.layout.xaxis.type == "log"
    mp = next(t for t in fig.data if t.name == "MP")
    assert list(mp.y) == pytest.approx([0.6, 0.9])    # density sorted ascending: 0.1, 1.0
    assert mp.error_y.array[0] == pytest.approx(np.std([0.5, 0.7], ddof=1))


# ----------------------------------------------------------------------------- static figures
STATIC = {
    "lambda": lambda: figures.delta_loss_vs_lambda(sweep()),
    "stages": lambda: figures.stage_trajectories(history()),
    "scatter": lambda: figures.delta_loss_scatter(sweep(), n_boot=200),
    "profile": lambda: figures.performance_profile(profile()),
}


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_figures_save_deterministic_pdf_and_png(name, tmp_path):
    first = figures.save(STATIC[name](), name, folder=tmp_path / "a")
    (second,) = figures.save(STATIC[name](), name, folder=tmp_path / "b", formats=("png",))
    assert [p.suffix for p in first] == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in first)
    assert first[0].read_bytes().startswith(b"%PDF")
    assert first[1].read_bytes() == second.read_bytes()


def test_static_figure_contents():
    fig = figures.delta_loss_vs_lambda(sweep())
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "$0$"
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_color() == "black"
    ax = figures.delta_loss_scatter(sweep(), n_boot=200)
    s = metrics.spearman(metrics.error_gaps(sweep()), n_boot=200)
    assert f"ρ = {s['rho']:.2f}" in ax.get_title() and ax.get_xscale() == "log"
    assert len(figures.stage_trajectories(history()).axes) == 2
    ax = figures.performance_profile(profile())
    assert len(ax.get_lines()) == 3 and ax.get_xlim() == (0, 1)
    import matplotlib.pyplot as plt

    plt.close("all")


# ----------------------------------------------------------------------------- torch-free
@pytest.mark.parametrize("module", ["plots", "figures"])
def test_plotting_modules_do_not_import_torch(module):
    code = f"import sys, prunelab.{module}; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_the_scatter_does_not_import_torch():
    code = ("import sys, pandas as pd, prunelab.plots as p\n"
            "f = pd.DataFrame({'delta_loss': [1, 2, 3, 4.0], 'val_error_gap_ft': [0, 1, 1, 2.0],"
            " 'criterion': list('aabb')})\n"
            "p.delta_loss_scatter(f, n_boot=50)\n"
            "assert 'torch' not in sys.modules, 'torch loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- layer collapse
def collapse_frame() -> pd.DataFrame:
    """A tiny ``collapse.layer_density`` frame: two criteria, three layers, ρ ∈ {1, 10, 100};
    "mp" empties layer b at ρ = 100."""
    rows = []
    for crit in ("snip", "mp"):
        for rho in (1.0, 10.0, 100.0):
            for layer, numel in (("a.weight", 100), ("b.weight", 1000), ("c.weight", 10)):
                kept = max(1, int(numel / rho)) if not (crit == "mp" and rho == 100 and layer ==
                                                "b.weight") else 0
                rows.append({"criterion": crit, "scope": "global", "compression": rho,
                             "density_target": 1 / rho, "layer": layer, "numel": numel,
                             "kept": kept, "density": kept / numel, "collapsed": kept == 0})
    return pd.DataFrame(rows)


def test_collapse_curves_lines_log_x_and_collapse_markers():
    fig = plots.collapse_curves(collapse_frame())
    assert isinstance(fig, go.Figure)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    marks = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in lines] == ["SNIP", "MP"]
    assert len(marks) == 1 and marks[0].marker.symbol == "x"   # only mp collapses, at ρ = 100
    assert list(marks[0].x) == [100.0]
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.yaxis.type == "log"                      # a density: log y, 0 at a floor
    assert min(marks[0].y) > 0


def test_collapse_curves_from_accuracy_frame():
    f = pd.DataFrame({"criterion": ["a", "a", "b", "b"], "compression": [1.0, 10, 1, 10],
                      "n_collapsed": [0, 1, 0, 0], "accuracy": [0.9, 0.1, 0.9, 0.8]})
    fig = plots.collapse_curves(f)
    assert len(fig.data) == 3 and fig.layout.yaxis.type == "linear"
    assert fig.data[1].marker.symbol == "x" and list(fig.data[1].y) == [0.1]


def test_layer_density_heatmap_cells_and_collapsed_marks():
    f = collapse_frame()
    with pytest.raises(ValueError, match="criterion="):
        plots.layer_density_heatmap(f)
    fig = plots.layer_density_heatmap(f, criterion="mp")
    heat, marks = fig.data
    assert np.asarray(heat.z).shape == (3, 3)                  # layers × ρ
    assert list(heat.y) == ["a.weight", "b.weight", "c.weight"]
    assert list(marks.y) == ["b.weight"] and list(marks.x) == ["100"]
    assert marks.marker.symbol == "x"
    assert len(plots.layer_density_heatmap(f, criterion="snip").data[1].x) == 0


def path_frame() -> pd.DataFrame:
    t = np.linspace(0, 1, 5)
    rows = []
    for path, bump in (("segment", 1.0), ("bezier", 0.1)):
        for split, off in (("train", 0.0), ("test", 0.2)):
            for ti in t:
                rows.append({"path": path, "split": split, "t": ti,
                             "loss": off + 0.5 + bump * 4 * ti * (1 - ti), "error": 0.1})
    return pd.DataFrame(rows)


def test_interpolation_lines_and_barriers_in_legend():
    f = path_frame()
    fig = plots.interpolation(f)
    assert len(fig.data) == 4
    names = [t.name for t in fig.data]
    assert "segment · train (barrier 1)" in names and "bezier · test (barrier 0.1)" in names
    assert plots.path_barriers(f)["segment · train"] == pytest.approx(1.0)
    single = plots.interpolation(f[(f.path == "segment") & (f.split == "train")].drop(
        columns=["path", "split"]), y="error")
    assert len(single.data) == 1 and "barrier 0" in single.data[0].name


def test_static_collapse_and_interpolation_figures_save(tmp_path):
    f = collapse_frame()
    written = figures.save(figures.collapse_curves(f), "collapse", folder=tmp_path)
    written += figures.save(figures.layer_density_heatmap(f, criterion="mp"), "heat",
                            folder=tmp_path)
    ax = figures.interpolation(path_frame())
    assert len(ax.get_lines()) == 4
    assert any("barrier" in t.get_text() for t in ax.get_legend().get_texts())
    written += figures.save(ax, "interp", folder=tmp_path)
    assert len(written) == 6 and all(p.stat().st_size > 0 for p in written)


def test_loss_plane_contour_and_points():
    import pandas as pd

    rows = [{"u": u, "v": v, "split": s, "loss": 1 + u * u + v * v, "error": 0.1}
            for s in ("train", "test") for u in (0.0, 1.0, 2.0) for v in (-1.0, 0.0, 1.0)]
    frame = pd.DataFrame(rows)
    frame.attrs["points"] = {"a": (0.0, 0.0), "b": (2.0, 0.0), "c": (1.0, 1.0)}
    with pytest.raises(ValueError, match="pass split="):
        plots.loss_plane(frame)
    fig = plots.loss_plane(frame, split="test", log=False)
    contour, marks = fig.data
    assert list(contour.x) == [0.0, 1.0, 2.0] and list(contour.y) == [-1.0, 0.0, 1.0]
    assert contour.z[0][2] == pytest.approx(1 + 4 + 1)  # row v = -1, column u = 2
    assert list(marks.x) == [0.0, 2.0, 1.0] and list(marks.text) == ["a", "b", "c"]
    logged = plots.loss_plane(frame, split="train")
    assert logged.data[0].z[1][0] == pytest.approx(0.0)  # log10(1)


def test_instability_plot_sorted_by_k():
    import pandas as pd

    fig = plots.instability(pd.DataFrame({"k": [10, 0, 5], "barrier": [0.0, 0.3, 0.1],
                                          "metric": "error"}))
    assert list(fig.data[0].x) == [0, 5, 10] and list(fig.data[0].y) == [0.3, 0.1, 0.0]
    assert "error barrier" in fig.layout.yaxis.title.text
    both = pd.DataFrame({"k": [5, 0, 0, 5], "barrier": [0.1, 0.3, 0.2, 0.0],
                         "network": ["dense", "dense", "sparse", "sparse"], "metric": "error"})
    fig = plots.instability(both, color="network")
    assert [t.name for t in fig.data] == ["dense", "sparse"]
    assert list(fig.data[0].y) == [0.3, 0.1] and list(fig.data[1].y) == [0.2, 0.0]
    ax = figures.instability(both, color="network")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense", "sparse"]
    assert list(ax.lines[1].get_ydata()) == [0.2, 0.0]


def test_mrp_plots_from_a_recorder_like_frame():
    import pandas as pd

    from prunelab import mrp, units

    rows = []
    for step in (1, 2):
        for tag in units.SCORES:
            base = tag.removeprefix("bp_")
            rows.append({"step": step, "layers": "l", "score": tag, "base": base,
                         "bp": tag.startswith("bp_"),
                         "penalty": 0.1 * step + (0.0 if tag.startswith("bp_") else 0.05)})
    frame = pd.DataFrame(rows)
    pairs = mrp.bp_pairs(frame)
    fig = plots.penalty_scatter(pairs)
    assert "100% of points below" in fig.layout.title.text
    assert len(fig.data) == 6 + 1  # one trace per base score and the y = x line
    over = plots.penalty_over_training(frame)
    styles = {t.name: (t.line.color, t.line.dash) for t in over.data}
    assert styles["bp_norm"][0] == styles["norm"][0] and styles["norm"][1] == "dash"
    prof = plots.performance_profile(mrp.penalty_profile(frame), pair_prefix="bp_")
    assert {t.line.dash for t in prof.data} == {"dash", "solid"}
    cons = pd.DataFrame({"step": [1, 2], "score": ["rand", "rand"],
                         "fraction_ever_selected": [0.1, 0.2]})
    assert list(plots.selection_consistency(cons).data[0].y) == [0.1, 0.2]
    acts = pd.DataFrame({"score": ["rand", "rand", "norm"], "sq_activation": [1.0, 10.0, 0.0]})
    hist = plots.activation_histogram(acts)
    assert list(hist.data[0].x) == [0.0, 1.0] and len(hist.data[1].x) == 0  # zeros dropped


def test_new_static_figures_save(tmp_path):
    from prunelab import mrp, units

    rows = [{"u": u, "v": v, "loss": 1 + u * u + v * v}
            for u in (0.0, 1.0, 2.0) for v in (-1.0, 0.0, 1.0)]
    plane = pd.DataFrame(rows)
    plane.attrs["points"] = {"a": (0.0, 0.0), "b": (2.0, 0.0), "c": (1.0, 1.0)}
    written = figures.save(figures.loss_plane(plane), "plane", folder=tmp_path)
    written += figures.save(figures.instability(pd.DataFrame({"k": [0, 5], "barrier": [.3, .1]})),
                            "inst", folder=tmp_path)
    frame = pd.DataFrame([{"step": s, "layers": "l", "score": t, "base": t.removeprefix("bp_"),
                           "bp": t.startswith("bp_"), "penalty": s * (1 + len(t))}
                          for s in (1, 2) for t in units.SCORES])
    written += figures.save(figures.penalty_scatter(mrp.bp_pairs(frame)), "scatter",
                            folder=tmp_path)
    written += figures.save(figures.penalty_over_training(frame), "over", folder=tmp_path)
    cons = pd.DataFrame({"step": [1, 2], "score": ["rand", "rand"],
                         "fraction_ever_selected": [0.1, 0.2]})
    written += figures.save(figures.selection_consistency(cons), "cons", folder=tmp_path)
    acts = pd.DataFrame({"score": ["rand", "rand", "norm"], "sq_activation": [1.0, 10.0, 3.0]})
    written += figures.save(figures.activation_histogram(acts), "acts", folder=tmp_path)
    assert len(written) == 12 and all(p.stat().st_size > 1000 for p in written)



def test_loss_landscape_line_contour_and_surface():
    from test_figures import landscape_frame

    fig = plots.loss_landscape(landscape_frame(1))
    assert [t.name for t in fig.data] == ["dense", "pruned"]
    assert list(fig.data[0].x) == sorted(fig.data[0].x) and "α" in fig.layout.xaxis.title.text
    contour = plots.loss_landscape(landscape_frame(2))
    assert [t.type for t in contour.data] == ["contour", "contour"]
    assert contour.data[0].zmax == contour.data[1].zmax == pytest.approx(6.1)
    assert [a.text for a in contour.layout.annotations] == ["dense", "pruned"]
    z = np.asarray(contour.data[1].z)
    assert z.shape == (7, 7) and z[3, 3] == pytest.approx(0.1)  # β rows, α columns, centre θ
    surface = plots.loss_landscape(landscape_frame(2), kind="surface")
    assert [t.type for t in surface.data] == ["surface", "surface"]
    with pytest.raises(ValueError, match="kind must be .*'wire'"):
        plots.loss_landscape(landscape_frame(2), kind="wire")
