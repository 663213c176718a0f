"""The view layer: one style per criterion, axis labels, chance level, log ticks, and the
frames plots and figures share (prepared once, torch-free)."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from prunelab import metrics, views as V


def test_every_registered_name_has_a_style_with_a_valid_colour():
    from prunelab import criteria, structured, units

    for name in [*criteria.names(), *structured.names(), *units.SCORES]:
        assert name in V.STYLES, f"{name} has no display name / colour in views.STYLES"
        assert len(V.STYLES[name].color) == 7 and V.STYLES[name].color.startswith("#")
    main = ["mp", "lap", "obd", "lm", "qm", "snip", "grasp", "synflow", "taylor-fo", "obs",
            "random"]
    assert len({V.STYLES[n].color for n in main}) == len(main)     # the main ones differ
    assert [V.display_name(n) for n in main[:9]] == ["MP", "LAP", "OBD", "LM", "QM", "SNIP",
                                                     "GraSP", "SynFlow", "Taylor-FO"]
    for base in units.BASE_SCORES:                                 # a bp_ twin shares a colour
        assert V.STYLES[f"bp_{base}"].color == V.STYLES[base].color


def test_palette_fixed_for_styled_names_positional_and_distinct_for_the_rest():
    colors = V.palette(["stage-a", "mp", "stage-b", 14])
    assert colors["mp"] == V.STYLES["mp"].color
    assert len(set(colors.values())) == 4
    assert V.palette(["x", "y"]) == V.palette(["x", "y"])          # deterministic
    assert V.display_name(0.1) == "0.1" and V.display_name("unknown") == "unknown"
    styles = V.pair_styles(["bp_rs", "rs", "norm"], "bp_")
    assert styles["bp_rs"] == (V.STYLES["rs"].color, False) and styles["rs"][1] is True


@pytest.mark.parametrize("column,label", [
    ("delta_loss", "ΔL on the pruning batch (nats)"),
    ("val_error", "validation error (fraction)"),
    ("val_error_ft", "validation error after fine-tuning (fraction)"),
    ("test_loss_dense", "test loss of the dense model (nats)"),
    ("val_error_gap", "validation error gap before fine-tuning (fraction)"),
    ("val_error_gap_ft", "validation error gap after fine-tuning (fraction)"),
    ("train_accuracy", "training accuracy (fraction)"),
    ("something_else", "something else"),
])
def test_axis_labels_name_the_split_and_the_unit(column, label):
    assert V.axis_label(column) == label


def test_axis_label_takes_the_split_from_the_frame():
    assert V.axis_label("accuracy", pd.DataFrame({"split": ["test"]})) == \
        "test accuracy (fraction)"
    assert V.axis_label("accuracy", pd.DataFrame({"split": ["val", "test"]})) == \
        "accuracy (fraction)"


def test_chance_level_from_a_column_or_an_argument():
    f = pd.DataFrame({"accuracy": [0.5], "num_classes": [10]})
    assert V.chance_level(f, "accuracy") == pytest.approx(0.1)
    assert V.chance_level(f, "test_error") == pytest.approx(0.9)
    assert V.chance_level(f, "val_error_gap") is None
    assert V.chance_level(f, "accuracy", chance=False) is None
    assert V.chance_level(f.drop(columns="num_classes"), "accuracy") is None
    assert V.chance_level(f.drop(columns="num_classes"), "accuracy", chance=0.25) == 0.25
    with pytest.raises(ValueError, match="num_classes"):
        V.chance_level(pd.DataFrame({"num_classes": [10, 2]}), "accuracy")
    with pytest.raises(ValueError, match="finite"):
        V.chance_level(f, "accuracy", chance=float("nan"))


def test_spearman_title():
    assert V.spearman_title({"rho": 0.571, "low": -0.2549, "high": 0.981}) == \
        "Spearman ρ = 0.57, 95 % CI [-0.25, 0.98]"
    assert V.spearman_title({"rho": 0.5, "low": 0.1, "high": 0.9}, ci=0.9).startswith(
        "Spearman ρ = 0.50, 90 % CI")


@pytest.mark.parametrize("lo,hi", [(2.5, 3.5), (2.4, 3.6), (2.5, 4.5e4), (1e-5, 1e2), (0.8, 30),
                                   (1.001, 1.002), (3e-6, 8e-6), (0.05, 0.3), (1e-12, 1e12)])
def test_log_ticks_read_at_every_range(lo, hi):
    ticks = V.log_ticks(lo, hi, 6)
    assert 2 <= len(ticks) <= 6
    assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks)
    assert ticks == sorted(ticks)
    labels = [V.tick_text(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels)                    # no two ticks read the same
    assert all(len(s) <= 20 for s in labels)


def test_tick_text_is_exact_and_short():
    assert V.tick_text(100.0, [10.0, 100.0, 1000.0]) == "$10^{2}$"
    assert V.tick_text(2.5, [2.5, 3.0, 3.5]) == "$2.5$"
    assert V.tick_text(3.0, [2.5, 3.0, 3.5]) == "$3$"
    assert V.tick_text(5e-6, [3e-6, 5e-6]) == "$5\\times10^{-6}$"
    # the label reads back as the tick: 2.75 is not rounded to 2.8
    assert V.tick_text(2.75, [2.5, 2.75, 3.0]) == "$2.75$"


def test_lambda_view_places_zero_a_decade_left_and_reduces_the_reference():
    rows = [{"criterion": c, "lam": lam, "stages": 1, "seed": s, "delta_loss": v + s}
            for c, v in (("lm", 1.0), ("qm", 2.0)) for lam in (0.0, 1e-3, 1e-1)
            for s in (0, 1)]
    rows += [{"criterion": "mp", "lam": 0.0, "stages": 1, "seed": s, "delta_loss": 5.0 + s}
             for s in (0, 1)]
    view = V.lambda_view(pd.DataFrame(rows))
    assert view.criteria == ["lm", "qm"]
    lm = view.lines[view.lines.criterion == "lm"]
    assert list(lm["_x"]) == pytest.approx([1e-4, 1e-3, 1e-1])
    assert list(lm["delta_loss_mean"]) == pytest.approx([1.5] * 3)
    assert list(lm["delta_loss_std"]) == pytest.approx([np.std([1, 2], ddof=1)] * 3)
    assert view.reference == pytest.approx((5.5, np.std([5, 6], ddof=1), 2))
    assert view.tickexps[0] is None and view.tickvals[0] == pytest.approx(1e-4)
    assert list(V.lambda_positions([0.0, 0.01, 1.0])) == pytest.approx([1e-3, 0.01, 1.0])
    with pytest.raises(ValueError, match="several rows"):
        V.lambda_view(pd.concat([pd.DataFrame(rows)] * 2))


def test_density_bars_refuse_overplotting():
    f = pd.DataFrame({"layer": ["a", "b", "total"], "numel": [10, 10, 20], "kept": [1, 2, 3],
                      "density": [0.1, 0.2, 0.15]})
    rows, totals = V.density_bars(f)
    assert list(rows.layer) == ["a", "b"] and totals == {None: 0.15}
    collapse = pd.DataFrame({"criterion": "mp", "compression": [1.0, 10.0], "layer": "a",
                             "density": [1.0, 0.1]})
    with pytest.raises(ValueError, match="collapse.layer_density.*layer_density_heatmap"):
        V.density_bars(collapse)


def test_one_config_column_list():
    from prunelab import experiments, plots

    assert V.CONFIG_COLUMNS is metrics.CONFIG_COLUMNS is plots.CONFIG_COLUMNS
    assert tuple(experiments.FIELDS) == metrics.CONFIG_COLUMNS


def test_views_are_torch_free():
    code = "import sys, prunelab.views; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
