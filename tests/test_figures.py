"""Image-level checks of every static figure, read from matplotlib's renderer: the legend lists
exactly the plotted groups (of every panel) and sits outside the data, no two texts (tick
labels, titles, axis labels, legend entries) overlap, in the "paper" and the "talk" style; and
the files a journal asks for (300 dpi PNG, PDF with TrueType fonts)."""
import numpy as np
import pandas as pd
import pytest

from prunelab import figures, metrics, plots, views

pytest.importorskip("seaborn")
matplotlib = pytest.importorskip("matplotlib")
from matplotlib.text import Text  # noqa: E402

from test_plots import collapse_frame, density, history, path_frame, profile, sweep  # noqa: E402

SCORES = ("rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs",
          "bp_rand", "bp_norm", "bp_abs_rs", "bp_abs_mrs", "bp_rs", "bp_mrs")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


# ----------------------------------------------------------------------------- renderer reads
def _fig(obj):
    return getattr(obj, "figure", obj)


def drawn_texts(fig) -> list[tuple[str, object]]:
    """(text, window extent) of every text matplotlib draws: tick labels inside the view
    interval, titles, axis labels, legend texts and titles, annotations, colorbar labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, shown = set(), set()
    for ax in fig.axes:
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lim)
            span = (hi - lo) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                for label in (tick.label1, tick.label2):
                    ticks.add(id(label))
                    if lo - span <= tick.get_loc() <= hi + span:
                        shown.add(id(label))
    out = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip():
            continue
        if id(t) in ticks and id(t) not in shown:
            continue
        box = t.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            out.append((t.get_text(), box))
    return out


def overlaps(fig, tol: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes overlap by more than ``tol`` pixels both ways."""
    texts = drawn_texts(fig)
    bad = []
    for i, (a, ba) in enumerate(texts):
        for b, bb in texts[i + 1:]:
            w = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
            h = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
            if w > tol and h > tol:
                bad.append((a, b))
    return bad


def legends(fig) -> list:
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + fig.legends


def legend_entries(fig) -> list[str]:
    return [t.get_text() for leg in legends(fig) for t in leg.get_texts()]


def assert_legend_outside(fig):
    """Every legend box lies outside every data area (axes patch) of the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for leg in legends(fig):
        lb = leg.get_window_extent(renderer)
        for ax in fig.axes:
            ab = ax.patch.get_window_extent(renderer)
            w = min(lb.x1, ab.x1) - max(lb.x0, ab.x0)
            h = min(lb.y1, ab.y1) - max(lb.y0, ab.y0)
            assert not (w > 0.5 and h > 0.5), f"legend {legend_entries(fig)} covers the data"


# ----------------------------------------------------------------------------- frames
def accuracy_frame() -> pd.DataFrame:
    return pd.DataFrame({"criterion": ["mp"] * 4 + ["lap"] * 4, "seed": [0, 1] * 4,
                         "density": [1.0, 1.0, 0.1, 0.1] * 2, "split": "test",
                         "num_classes": 10,
                         "accuracy": [0.9, 0.9, 0.5, 0.7, 0.9, 0.9, 0.6, 0.8]})


def narrow_sweep() -> pd.DataFrame:
    """ΔL within [2.5, 3.5]: a narrow log range like notebook 01's Fig. 3."""
    f = sweep()
    return f.assign(delta_loss=2.5 + np.linspace(0.0, 1.0, len(f)))


def missing_pi_sweep() -> pd.DataFrame:
    """π = 14 is missing in the last facet (QM): its legend entry must still show."""
    f = sweep()
    return f[~((f.criterion == "qm") & (f.stages == 14))]


def mrp_frame() -> pd.DataFrame:
    return pd.DataFrame([{"step": s, "layers": "l", "score": t, "base": t.removeprefix("bp_"),
                          "penalty": s * (1 + len(t)) * (0.5 if t.startswith("bp_") else 1.0)}
                         for s in (1, 2, 3) for t in SCORES])


def bp_pairs() -> pd.DataFrame:
    f = mrp_frame()
    w = f[~f.score.str.startswith("bp_")].set_index(["step", "base"]).penalty
    b = f[f.score.str.startswith("bp_")].set_index(["step", "base"]).penalty
    return pd.DataFrame({"without": w, "with": b}).reset_index()


def plane() -> pd.DataFrame:
    rows = [{"u": u, "v": v, "loss": 1 + u * u + v * v}
            for u in np.linspace(0, 2, 5) for v in np.linspace(-1, 1, 5)]
    frame = pd.DataFrame(rows)
    frame.attrs["points"] = {"a": (0.0, 0.0), "b": (2.0, 0.0), "c": (1.0, 1.0)}
    return frame


def dolan_more_profile() -> pd.DataFrame:
    tab = pd.DataFrame({"method": list("abc") * 4, "measurement": np.repeat([1, 2, 3, 4], 3),
                        "penalty": [1.0, 2, np.inf, 3, 3, 6, 4, 2, 1, 5, 7, 20]})
    return metrics.performance_profile(tab, kind="dolan-more")


def landscape_frame(dims: int = 1) -> pd.DataFrame:
    """A landscape frame as pl.landscape.compare returns it: two bowls of different width."""
    grid = np.linspace(-1, 1, 7)
    rows = []
    for net, width in (("dense", 1.0), ("pruned", 3.0)):
        for b in (grid if dims == 2 else [None]):
            for a in grid:
                row = {"network": net, "alpha": a, "loss": 0.1 + width * (a ** 2 + (b or 0) ** 2),
                       "accuracy": 0.9}
                if dims == 2:
                    row["beta"] = b
                rows.append(row)
    cols = ["network", "alpha", *(["beta"] if dims == 2 else []), "loss", "accuracy"]
    return pd.DataFrame(rows)[cols]


# name: (draw, expected legend entries or None for a figure without legend)
CASES = {
    "accuracy_vs_density": (lambda: figures.accuracy_vs_density(accuracy_frame()),
                            ["MP", "LAP", "chance (0.1)"]),
    "delta_loss_vs_lambda": (lambda: figures.delta_loss_vs_lambda(missing_pi_sweep()),
                             ["π = 1", "π = 14", "MP (any λ, π)"]),
    "stage_trajectories": (lambda: figures.stage_trajectories(history()),
                           ["exponential", "linear"]),
    "delta_loss_scatter": (lambda: figures.delta_loss_scatter(narrow_sweep(), n_boot=100),
                           ["MP", "LM", "QM"]),
    "performance_profile": (lambda: figures.performance_profile(profile()), ["a", "b", "c"]),
    "performance_profile_dolan_more": (lambda: figures.performance_profile(dolan_more_profile()),
                                       ["a", "b", "c"]),
    "penalty_scatter": (lambda: figures.penalty_scatter(bp_pairs()),
                        [s for s in SCORES if not s.startswith("bp_")] + ["y = x"]),
    "penalty_over_training": (lambda: figures.penalty_over_training(mrp_frame()), list(SCORES)),
    "selection_consistency": (lambda: figures.selection_consistency(
        mrp_frame().assign(fraction_ever_selected=lambda d: d.step / 4)), list(SCORES)),
    "activation_histogram": (lambda: figures.activation_histogram(
        mrp_frame().assign(sq_activation=lambda d: d.penalty)), list(SCORES)),
    "loss_plane": (lambda: figures.loss_plane(plane()), None),
    "instability": (lambda: figures.instability(pd.DataFrame(
        {"k": [5, 0, 0, 5], "barrier": [0.1, 0.3, 0.2, 0.0], "metric": "error",
         "network": ["dense", "dense", "sparse", "sparse"]}), color="network"),
        ["dense", "sparse"]),
    "collapse_curves": (lambda: figures.collapse_curves(collapse_frame()), ["SNIP", "MP"]),
    "layer_density_heatmap": (lambda: figures.layer_density_heatmap(collapse_frame(),
                                                                    criterion="mp"), None),
    "layer_density": (lambda: figures.layer_density(pd.concat(
        [density().assign(criterion="mp"), density().assign(criterion="snip")]),
        hue="criterion"), ["MP", "SNIP", "total MP 0.2", "total SNIP 0.2"]),
    "interpolation": (lambda: figures.interpolation(path_frame()),
                      ["segment · train (barrier 1)", "segment · test (barrier 1)",
                       "bezier · train (barrier 0.1)", "bezier · test (barrier 0.1)"]),
    "loss_landscape_line": (lambda: figures.loss_landscape(landscape_frame(1)),
                            ["dense", "pruned"]),
    "loss_landscape_line_log": (lambda: figures.loss_landscape(landscape_frame(1), log=True),
                                ["dense", "pruned"]),
    "loss_landscape_surface": (lambda: figures.loss_landscape(landscape_frame(2)), None),
}


@pytest.mark.parametrize("kind", ["paper", "talk"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_legend_is_the_plotted_groups_outside_the_data_and_no_text_overlaps(name, kind):
    draw, expected = CASES[name]
    with figures.style(kind):
        fig = _fig(draw())
    if expected is None:
        assert legends(fig) == []
    else:
        assert sorted(legend_entries(fig)) == sorted(expected)
        assert_legend_outside(fig)
    assert overlaps(fig) == []


def test_overlap_check_sees_overlapping_labels():
    """The checker itself: crowded tick labels on a narrow log axis are reported."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xscale("log")
    ax.set_xlim(2.5, 3.5)
    ticks = np.linspace(2.5, 3.5, 12)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:.4f}" for t in ticks])
    assert overlaps(fig)


def test_lambda_legend_lists_levels_of_every_facet():
    fig = figures.delta_loss_vs_lambda(missing_pi_sweep())
    assert len(fig.axes) == 2
    qm = fig.axes[1]
    assert len([ln for ln in qm.get_lines() if ln.get_linestyle() == "-"]) == 1  # only π = 1
    assert "π = 14" in legend_entries(fig)


def test_scatter_title_and_ticks_on_a_narrow_log_range():
    f = narrow_sweep()
    ax = figures.delta_loss_scatter(f, n_boot=200)
    s = metrics.spearman(metrics.error_gaps(f), n_boot=200)
    assert ax.get_title() == (f"Spearman ρ = {s['rho']:.2f}, 95 % CI "
                              f"[{s['low']:.2f}, {s['high']:.2f}]")
    labels = [t for t, _ in drawn_texts(ax.figure) if t.startswith("$")]
    assert len(labels) >= 2 and len(set(labels)) == len(labels)
    assert ax.get_xlabel() == "ΔL on the pruning batch (nats)"
    assert ax.get_ylabel().replace("\n", " ") == \
        "validation error gap after fine-tuning (fraction)"


def test_one_colour_and_display_name_per_criterion_in_plotly_and_seaborn():
    f = accuracy_frame()
    ax = figures.accuracy_vs_density(f)
    fig = plots.accuracy_vs_density(f)
    static = {ln.get_label(): matplotlib.colors.to_hex(ln.get_color()) for ln in ax.get_lines()}
    for crit in ("mp", "lap"):
        style = views.STYLES[crit]
        trace = next(t for t in fig.data if t.name == style.label)
        assert trace.line.color == style.color == static[style.label]


def test_chance_line_from_a_column_or_an_argument():
    f = accuracy_frame()
    ax = figures.accuracy_vs_density(f)
    assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"] == [0.1]
    ax = figures.accuracy_vs_density(f.drop(columns="num_classes"), chance=0.5)
    assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"] == [0.5]
    ax = figures.accuracy_vs_density(f, chance=False)
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    fig = plots.accuracy_vs_density(f)
    assert [s.y0 for s in fig.layout.shapes] == [pytest.approx(0.1)]
    assert not plots.accuracy_vs_density(f, chance=False).layout.shapes
    assert ax.get_ylabel() == "test accuracy (fraction)"


def test_layer_density_refuses_collapse_frames_and_names_the_right_function():
    f = collapse_frame()
    for draw in (plots.layer_density, figures.layer_density):
        with pytest.raises(ValueError, match="layer_density_heatmap"):
            draw(f)
    one = f[(f.compression == 10.0)]
    fig = plots.layer_density(one, color="criterion")     # one ρ, one bar group per criterion
    assert [t.name for t in fig.data] == ["SNIP", "MP"]
    ax = figures.layer_density(one, hue="criterion")
    assert len(ax.patches) == 6


def test_style_sets_font_sizes_as_setter_and_context_manager():
    assert figures.current_style() == "paper"
    paper = figures.new_axes(4, 3)[1]
    with figures.style("talk"):
        assert figures.current_style() == "talk"
        talk = figures.new_axes(4, 3)[1]
    assert figures.current_style() == "paper"
    assert talk.xaxis.label.get_size() > 1.5 * paper.xaxis.label.get_size()
    assert talk.figure.get_size_inches()[0] == pytest.approx(4 * 1.875)
    figures.style("talk")
    try:
        assert figures.current_style() == "talk"
    finally:
        figures.style("paper")
    with pytest.raises(ValueError, match="paper"):
        figures.style("poster")


def test_save_writes_300_dpi_png_and_pdf_with_truetype_fonts(tmp_path):
    from PIL import Image

    pdf, png = figures.save(figures.delta_loss_scatter(sweep(), n_boot=50), "s", folder=tmp_path)
    assert Image.open(png).info["dpi"] == pytest.approx((300, 300), abs=0.1)
    data = pdf.read_bytes()
    assert b"/FontFile2" in data                     # TrueType font program embedded
    assert b"/Type3" not in data


@pytest.mark.parametrize("env,final,where", [
    (None, None, "figures"), (None, True, "figures"), (None, False, "scratch"),
    ("1", None, "scratch"), ("1", True, "scratch"), ("0", None, "figures"),
])
def test_only_final_full_setting_figures_reach_the_figures_folder(tmp_path, monkeypatch, capsys,
                                                                   env, final, where):
    if env is None:
        monkeypatch.delenv("PRUNELAB_FAST", raising=False)
    else:
        monkeypatch.setenv("PRUNELAB_FAST", env)
    monkeypatch.setattr(figures.paths, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(figures.paths, "SCRATCH_FIGURES", tmp_path / "scratch")
    written = figures.save(figures.instability(pd.DataFrame({"k": [0, 5], "barrier": [0.2, 0.1]})),
                           "fig", final=final)
    assert [p.parent for p in written] == [tmp_path / where] * 2
    assert all(p.exists() for p in written)
    assert not (tmp_path / ("scratch" if where == "figures" else "figures")).exists()
    said = capsys.readouterr().out
    if where == "scratch":
        assert said.count("\n") == 1 and "not a final figure" in said
        assert str(tmp_path / "scratch") in said
        assert ("PRUNELAB_FAST" in said) == (env == "1")
    else:
        assert said == ""


def test_scratch_folder_argument_and_bad_final(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNELAB_FAST", raising=False)
    ax = figures.instability(pd.DataFrame({"k": [0, 5], "barrier": [0.2, 0.1]}))
    written = figures.save(ax, "f", folder=tmp_path / "paper", scratch=tmp_path / "tmp",
                           final=False, formats=("png",))
    assert written == [tmp_path / "tmp" / "f.png"] and not (tmp_path / "paper").exists()
    with pytest.raises(ValueError, match="final must be.*'yes'"):
        figures.save(ax, "f", folder=tmp_path, final="yes")


def test_scratch_path_follows_the_environment(tmp_path):
    import subprocess
    import sys
    code = "import prunelab.paths as p; print(p.SCRATCH_FIGURES)"
    env = {**__import__("os").environ, "PRUNELAB_SCRATCH_FIGURES": str(tmp_path / "s")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(tmp_path / "s")
    env.pop("PRUNELAB_SCRATCH_FIGURES")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.endswith("build/scratch_figures")


def test_loss_landscape_surface_has_one_panel_per_network_on_one_colour_scale():
    fig = figures.loss_landscape(landscape_frame(2))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["dense", "pruned"]
    colorbars = [ax for ax in fig.axes if ax not in panels]
    assert len(colorbars) == 1 and "loss" in colorbars[0].get_ylabel()
    line = figures.loss_landscape(landscape_frame(1).query("network == 'dense'")
                                  .drop(columns="network"))
    assert len(line.lines) == 1 and line.get_legend() is None
    with pytest.raises(ValueError, match="several rows"):
        figures.loss_landscape(pd.concat([landscape_frame(1)] * 2))
