"""PruningExplorer: what a user sees after moving a control, asserted on widget traits.

Plain pytest, no kernel (ECOSYSTEM.md §1.2: observers run synchronously when a trait is set, so
assert on ``slider.value``, ``html.value``, ``fig.data[i].y``; never on Output widgets). One test at
the end runs a small notebook in a real kernel with nbclient.
"""
import copy
import math
import re
import threading
import time

import pytest
import torch

import prunelab as pl
from prunelab import criteria as C
from prunelab import masks as M
from prunelab.train import evaluate

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")  # plotly >= 6 FigureWidget needs it

NUMBER = r"([0-9]+\.[0-9]+)"


@pytest.fixture(scope="module")
def pretrained():
    """The committed pretrained MLP on MNIST-1D (< 2 s); an untrained one if it is missing."""
    try:
        return pl.zoo.load("mlp", "mnist1d", seed=0, train_if_missing=False)
    except FileNotFoundError:
        bundle = pl.data.load("mnist1d")
        return pl.models.build("mlp", bundle, seed=0).eval(), bundle


@pytest.fixture
def model(pretrained):
    return pretrained[0]


@pytest.fixture
def bundle(pretrained):
    return pretrained[1]


@pytest.fixture
def explorer(model, bundle):
    return pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "lap", "snip", "random",
                                                               "synflow", "lap-forward"])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def accuracy_after(readout: str) -> float:
    m = re.search(rf"accuracy {NUMBER} → {NUMBER}", readout)
    assert m, readout
    return float(m.group(2))


def shown_sparsity(readout: str) -> float:
    m = re.search(rf"sparsity {NUMBER}", readout)
    assert m, readout
    return float(m.group(1))


def bars(explorer):
    return list(explorer.layers_fig.data[0].y)


def kept_fraction(masks):
    return [float(m.float().mean()) for m in masks.values()]


# ---------------------------------------------------------------------------- structure
def test_is_returned_not_displayed_and_has_the_controls(explorer):
    import ipywidgets as W
    import plotly.graph_objects as go

    assert isinstance(explorer.widget, W.VBox)
    assert "prunelab-explorer" in explorer.widget._dom_classes
    assert isinstance(explorer.density, W.FloatLogSlider)
    assert explorer.density.min == pytest.approx(-3) and explorer.density.max == pytest.approx(0)
    assert explorer.lam.description == "λ"
    assert explorer.lam.options[0] == ("0", 0.0)  # λ = 0 is a position of the slider
    assert [v for _, v in explorer.stages.options] == [1, 2, 5, 14, 50, 140]
    assert list(explorer.scope.options) == list(M.SCOPES) + ["2:4"]  # N:M where it fits
    assert isinstance(explorer.layers_fig, go.FigureWidget)
    assert isinstance(explorer.trajectory_fig, go.FigureWidget)
    bundle = explorer._repr_mimebundle_()
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == explorer.widget.model_id


def test_initial_state_is_complete_before_display(explorer, model):
    assert explorer.density.value == pytest.approx(0.3, abs=0.003)  # 0.3 on the log grid
    assert shown_sparsity(explorer.readout.value) == pytest.approx(1 - explorer.density.value,
                                                                   abs=5e-4)
    assert explorer.metrics["accuracy_before"] == evaluate(model, explorer.eval_batch)["accuracy"]
    assert bars(explorer) == pytest.approx(kept_fraction(explorer.masks()))
    # the synced widget state (what a late frontend such as Voilà draws) is not the stale
    # y = [1, 1, 1] the figure was built with (ECOSYSTEM.md §1.2 item 3)
    assert list(explorer.layers_fig._widget_data[0]["y"]) == pytest.approx(bars(explorer))


def test_rejects_unknown_criterion(model, bundle):
    with pytest.raises(ValueError, match="valid names"):
        pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "nope"])


# ---------------------------------------------------------------------------- one-shot path
def test_sparsity_slider_updates_readout_and_bars(explorer):
    text0, bars0 = explorer.readout.value, bars(explorer)
    explorer.density.value = 0.05
    assert explorer.readout.value != text0
    assert bars(explorer) != bars0
    assert shown_sparsity(explorer.readout.value) == pytest.approx(0.95, abs=1e-3)
    masks = explorer.masks()
    assert M.sparsity(masks) == explorer.metrics["sparsity"]
    assert explorer.metrics["sparsity"] == pytest.approx(0.95, abs=1e-4)  # exact counts
    assert bars(explorer) == pytest.approx(kept_fraction(masks))
    assert list(explorer.layers_fig._widget_data[0]["y"]) == pytest.approx(bars(explorer))
    assert explorer.log[-1]["event"] == "move"


@pytest.mark.parametrize("scope", M.SCOPES)
def test_fast_path_equals_the_library(explorer, model, scope):
    """The cached, in-place path shows what pl.prune + evaluate give for the same settings."""
    explorer.scope.value = scope
    explorer.lam.value = 1e-2
    explorer.density.value = 0.1
    ref = pl.prune(model, "mp", sparsity=explorer.sparsity, scope=scope, lam=1e-2,
                   batch=explorer.score_batch)
    masks = explorer.masks()
    assert all(torch.equal(masks[n], ref.masks[n]) for n in ref.masks)
    after = evaluate(ref.model, explorer.eval_batch)
    assert explorer.metrics["accuracy"] == after["accuracy"]
    assert explorer.metrics["loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert accuracy_after(explorer.readout.value) == pytest.approx(after["accuracy"], abs=5e-4)
    pruned = explorer.pruned_model()
    assert M.sparsity(M.current(pruned)) == explorer.metrics["sparsity"]


@pytest.mark.parametrize("criterion", ["mp", "lap", "snip"])
def test_nm_scope_gives_exact_n_of_m_masks(explorer, model, criterion):
    """Scope "2:4": in every group of 4 consecutive input weights exactly the 2 highest scores
    are kept, as one-shot pl.prune with that scope gives; the fraction slider does not apply."""
    from prunelab import semistructured as NM

    explorer.criterion.value = criterion
    explorer.lam.value = 1e-3
    explorer.density.value = 0.1
    explorer.scope.value = "2:4"
    masks = explorer.masks()
    NM.check_nm(masks, 2, 4, exact=True)
    assert explorer.sparsity == 0.5 and explorer.metrics["sparsity"] == 0.5
    ref = pl.prune(model, criterion, scope="2:4", lam=1e-3, batch=explorer.score_batch)
    assert all(torch.equal(masks[n], ref.masks[n]) for n in ref.masks)
    after = evaluate(ref.model, explorer.eval_batch)
    assert explorer.metrics["accuracy"] == after["accuracy"]
    assert explorer.metrics["loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert bars(explorer) == pytest.approx([0.5] * len(masks))
    assert "2:4 keeps 2 of every 4" in explorer.readout.value
    if criterion == "mp":  # brute force: the 2 largest |θ| + λ/2·θ² of each group of 4
        for n, m in masks.items():
            w = pl.graph.weight(explorer.model, n).detach()
            s = (w.abs() + 1e-3 / 2 * w ** 2).reshape(w.shape[0], -1, 4)
            top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(2, -1).indices, True)
            assert torch.equal(m, top.reshape(w.shape)), n
    # the slider does not change the N:M masks, and the unchanged network is not re-evaluated
    rankings, text = explorer.stats["rankings"], explorer.readout.value
    explorer.density.value = 0.5
    assert all(torch.equal(explorer.masks()[n], masks[n]) for n in masks)
    assert explorer.stats["rankings"] == rankings and explorer.readout.value == text
    assert explorer.config.scope == "2:4" and explorer.config.sparsity == 0.5
    # back to a global scope: the slider's masks again
    explorer.scope.value = "global"
    ref = pl.prune(model, criterion, sparsity=0.5, lam=1e-3, batch=explorer.score_batch)
    assert all(torch.equal(explorer.masks()[n], ref.masks[n]) for n in ref.masks)


def test_nm_patterns_are_offered_where_every_layer_fits(model, bundle):
    shapes = [pl.graph.weight(model, n).shape[1:].numel() for n in pl.graph.prunable_names(model)]
    fits = [p for p in ("2:4", "1:8", "3:7") if all(c % int(p[-1]) == 0 for c in shapes)]
    ex = pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], batch_size=50,
                                    nm_patterns=("2:4", "1:8", "3:7"))
    assert list(ex.scope.options) == list(M.SCOPES) + fits
    assert "3:7" not in fits  # 40 inputs: not divisible by 7
    none = pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], batch_size=50,
                                      nm_patterns=())
    assert list(none.scope.options) == list(M.SCOPES)
    with pytest.raises(ValueError, match="m must be larger than n"):
        pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], batch_size=50,
                                   nm_patterns=("4:2",))


def test_a_repeated_setting_is_not_evaluated_again(explorer, monkeypatch):
    calls = []
    real = explorer._evaluate
    monkeypatch.setattr(explorer, "_evaluate", lambda m: calls.append(1) or real(m))
    explorer.density.value = 0.2
    explorer.density.value = 0.1
    assert len(calls) == 2
    metrics = dict(explorer.metrics)
    explorer.refresh()  # nothing changed: the last evaluation is shown again
    assert len(calls) == 2 and explorer.metrics == metrics


def test_scores_are_cached_per_criterion_lambda_and_ranked_per_scope(explorer):
    s0 = dict(explorer.stats)
    assert s0["scores"] == 1 and s0["rankings"] == 1  # mp, global, λ=0 at construction
    for d in (0.5, 0.2, 0.01):
        explorer.density.value = d
    assert explorer.stats["scores"] == 1 and explorer.stats["rankings"] == 1  # moves: no rescoring
    explorer.criterion.value = "lap"
    assert explorer.stats["scores"] == 2
    lap_text = explorer.readout.value
    explorer.criterion.value = "mp"
    assert explorer.stats["scores"] == 2 and explorer.stats["rankings"] == 2  # cache hit
    assert explorer.readout.value != lap_text
    explorer.scope.value = "layerwise"
    assert explorer.stats["scores"] == 2 and explorer.stats["rankings"] == 3  # re-ranked only
    explorer.lam.value = 1.0
    assert explorer.stats["scores"] == 3  # λ changes the scores
    explorer.lam.value = 0.0
    explorer.scope.value = "global"
    assert explorer.stats["scores"] == 3 and explorer.stats["rankings"] == 4
    assert explorer.stats["hits"] >= 2


def test_criterion_and_scope_change_what_is_shown(explorer):
    explorer.density.value = 0.1
    shown = {}
    for criterion, scope in [("mp", "global"), ("random", "global"), ("mp", "layerwise")]:
        explorer.criterion.value = criterion
        explorer.scope.value = scope
        shown[criterion, scope] = (explorer.readout.value, bars(explorer))
    assert len({t for t, _ in shown.values()}) == 3
    # layerwise: every layer keeps the same fraction
    assert max(shown["mp", "layerwise"][1]) - min(shown["mp", "layerwise"][1]) < 1e-3
    assert shown["mp", "global"][1] != shown["mp", "layerwise"][1]


def test_time_slider_move_reports_the_ratio(explorer):
    from benchmarks.explorer import time_slider_move

    start = explorer.density.value
    t = time_slider_move(explorer, repeats=5)
    assert t["move"] > 0 and t["evaluate"] > 0 and t["evaluate_1000"] > 0
    assert t["ratio"] == pytest.approx(t["move"] / t["evaluate"])
    assert t["examples"] == len(explorer.eval_batch[1])
    assert explorer.density.value == start  # restored


# ---------------------------------------------------------------------------- staged path
def test_staged_setting_waits_for_run_then_fills_the_trajectory(explorer):
    text0 = explorer.readout.value
    scored = explorer.stats["scores"]
    explorer.stages.value = 5
    assert "press <b>Run</b>" in explorer.readout.value
    explorer.density.value = 0.1  # a move in staged mode does not start a run
    assert explorer.stats["scores"] == scored and explorer.result is None
    result = explorer.run(block=True)
    assert result is not None and len(result.history) == 5
    assert explorer.progress.value == 5 and explorer.progress.bar_style == "success"
    traj = explorer.trajectory_fig.data[0]
    assert list(traj.x) == [1, 2, 3, 4, 5]
    assert list(traj.y) == pytest.approx(result.history["delta_loss"].tolist())
    assert "π=5" in explorer.trajectory_fig.layout.title.text
    assert explorer.metrics["mode"] == "staged"
    assert explorer.metrics["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert bars(explorer) == pytest.approx(kept_fraction(result.masks))
    assert explorer.readout.value != text0 and "5 stages done" in explorer.readout.value
    assert [e["event"] for e in explorer.log].count("stage") == 5
    assert not any(w.disabled for w in explorer._controls) and explorer.cancel_button.disabled


def test_cancel_after_stage_two_stops_early(explorer):
    explorer.stages.value = 5

    def cancel_at_two(change):
        if change["new"] == 2:
            explorer.cancel_button.click()

    explorer.progress.observe(cancel_at_two, names="value")
    result = explorer.run(block=True)
    assert result.interrupted and len(result.history) == 2
    assert list(explorer.trajectory_fig.data[0].x) == [1, 2]
    assert "cancelled after stage 2 of 5" in explorer.readout.value
    assert explorer.progress.bar_style == "warning"
    assert explorer.metrics["interrupted"]
    # stopped at stage 2's sparsity of the exponential schedule, not the target
    assert explorer.metrics["sparsity"] == pytest.approx(result.history["sparsity"].iloc[-1])
    assert explorer.metrics["sparsity"] < 0.7


def test_background_run_can_be_cancelled_from_another_thread(explorer):
    explorer.criterion.value = "lap"
    explorer.stages.value = 140
    assert explorer.run(block=False) is None
    deadline = time.monotonic() + 120
    while explorer.progress.value < 2 and explorer.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert explorer.running, "the run finished before it could be cancelled"
    assert explorer.run_button.disabled and explorer.density.disabled
    explorer.cancel_button.click()
    result = explorer.wait(timeout=120)
    assert result is not None and result.interrupted
    assert 2 <= len(result.history) < 140
    assert not explorer.run_button.disabled and not explorer.density.disabled
    assert not explorer.running
    assert not any(t.name == "prunelab-explorer-run" for t in threading.enumerate())


def test_target_using_criterion_runs_only_on_request(explorer):
    scored = explorer.stats["scores"]
    explorer.criterion.value = "synflow"
    assert explorer.stats["scores"] == scored
    assert "synflow prunes toward the target" in explorer.readout.value
    result = explorer.run(block=True)
    assert result is not None and explorer.metrics["mode"] == "staged"
    assert explorer.metrics["sparsity"] == pytest.approx(explorer.sparsity, abs=1e-4)


# ---------------------------------------------------------------------------- robustness
def test_library_errors_show_in_the_readout(explorer):
    explorer.criterion.value = "lap-forward"  # needs scope="layerwise": prune raises
    assert explorer.run(block=True) is None
    assert "error: ValueError" in explorer.readout.value and "layerwise" in explorer.readout.value
    assert explorer.progress.bar_style == "danger"
    assert not explorer.run_button.disabled  # still live
    explorer.criterion.value = "mp"
    assert "error" not in explorer.readout.value
    assert shown_sparsity(explorer.readout.value) == pytest.approx(explorer.sparsity, abs=5e-4)


def test_a_failing_criterion_on_the_fast_path_shows_an_error(model, bundle, monkeypatch):
    monkeypatch.setitem(C.CRITERIA, "broken", C.Spec("basic", "does_not_exist", False, "x"))
    ex = pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "broken"])
    bars0 = bars(ex)
    ex.criterion.value = "broken"
    assert "error: AttributeError" in ex.readout.value
    assert bars(ex) == bars0 and ex.log[-1]["event"] == "error"
    ex.criterion.value = "mp"
    ex.density.value = 0.5
    assert "error" not in ex.readout.value


def test_obs_like_criteria_with_weight_updates_go_through_run(model, bundle):
    ex = pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "obs"])
    ex.criterion.value = "obs"
    assert not ex.one_shot and "updates the kept weights" in ex.readout.value
    result = ex.run(block=True)
    assert result is not None and ex.metrics["mode"] == "staged"


def test_the_model_handed_in_is_never_modified(model, bundle):
    before = snapshot(model)
    ex = pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "lap"])
    for d in (0.5, 0.05, 0.001, 1.0):
        ex.density.value = d
    ex.criterion.value = "lap"
    ex.scope.value = "normalized"
    ex.stages.value = 2
    ex.run(block=True)
    ex.pruned_model()
    assert same(before, snapshot(model))
    assert not pl.graph.is_parametrized(model)


def test_masks_already_on_the_model_stay_pruned(model, bundle):
    half = pl.prune(model, "mp", sparsity=0.5).model
    ex = pl.widgets.PruningExplorer(half, bundle, criteria=["mp"], density=0.9)
    assert ex.density.max == pytest.approx(math.log10(0.5))
    assert ex.metrics["sparsity"] == pytest.approx(0.5, abs=1e-4)
    ex.density.value = 0.2
    old = M.current(half)
    new = ex.masks()
    assert all(not (new[n] & ~old[n]).any() for n in old)  # nothing revived
    assert ex.metrics["sparsity"] == pytest.approx(0.8, abs=1e-4)


# ---------------------------------------------------------------------------- in a kernel
KERNEL_CELLS = [
    """import torch
torch.set_num_threads(1)
import prunelab as pl
model, bundle = pl.zoo.load("mlp", "mnist1d", seed=0, train_if_missing=False)
explorer = pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "lap"])
explorer""",
    """text0, bars0 = explorer.readout.value, list(explorer.layers_fig.data[0].y)
explorer.density.value = 0.05""",
    """assert explorer.readout.value != text0, explorer.readout.value
assert list(explorer.layers_fig.data[0].y) != bars0
assert abs(explorer.metrics["sparsity"] - 0.95) < 1e-3
explorer.stages.value = 5
explorer.run()            # a live kernel: runs in a background thread
result = explorer.wait(120)
assert result is not None and len(result.history) == 5, explorer.readout.value
assert list(explorer.trajectory_fig.data[0].x) == [1, 2, 3, 4, 5]
print("BARS", list(explorer.layers_fig.data[0].y), explorer.layers_fig.model_id)""",
]


@pytest.mark.slow
def test_explorer_in_a_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    if not (pl.paths.ZOO / "mlp-mnist1d-s0.safetensors").exists():
        pytest.skip("the pretrained mlp-mnist1d-s0 checkpoint is not in data/zoo")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in KERNEL_CELLS]
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on error
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    m = re.search(r"BARS (\[.*\]) (\w+)", text)
    assert m, text
    shown, model_id = eval(m.group(1)), m.group(2)
    # the widget state saved with the notebook (what a frontend opening it later draws) holds
    # the final bars, not the figure's initial ones
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    saved = state[model_id]["state"]["_widget_data"][0]["y"]
    assert saved == pytest.approx(shown)


# ------------------------------------------------------------------------- UnitExplorer (MRP)

@pytest.fixture(scope="module")
def unit_setup():
    torch.manual_seed(0)
    bundle = pl.data.load("digits")
    model = pl.models.build("small_conv", bundle, seed=0, padding="same", bn=True,
                            width=0.25).eval()
    return model, bundle


def test_unit_explorer_numbers_match_library_calls(unit_setup):
    from plotly import graph_objects as go
    from ipywidgets import widgets as W

    model, bundle = unit_setup
    before = snapshot(model)
    ex = pl.widgets.UnitExplorer(model, bundle, batch_size=200)
    assert isinstance(ex.widget, W.VBox) and isinstance(ex.penalty_fig, go.FigureWidget)
    assert "bn-scale" in ex.score.options and "bp_abs_mrs" not in ex.score.options
    ex.layer_set.value = "midconv"
    ex.score.value = "norm"
    ex.fraction.value = 0.25
    m = ex.metrics
    layers = pl.mrp.layer_sets(model)["midconv"]
    score_batch = bundle.batch("train", n=200, seed=0)
    eval_batch = bundle.batch("val", n=200, seed=0)
    for bp, key in ((False, "penalty"), (True, "penalty_bp")):
        ref = pl.units.prune(model, fraction=0.25, score=("bp_" if bp else "") + "norm",
                             layers=layers, batch=score_batch)
        want = evaluate(ref.model, eval_batch)["loss"] - evaluate(model, eval_batch)["loss"]
        assert m[key] == pytest.approx(want, abs=1e-6)
    assert list(ex.penalty_fig.data[0].y) == pytest.approx([m["penalty"], m["penalty_bp"]])
    assert f"pruned {m['pruned']}/{m['units']} units" in ex.readout.value
    colors = list(ex.scores_fig.data[0].marker.color)
    assert colors.count("#E45756") == m["pruned"] == round(0.25 * m["units"])
    assert colors[:m["pruned"]] == ["#E45756"] * m["pruned"]  # the lowest scores are pruned
    ex.mean_replacement.value = False
    assert "penalty_bp" not in ex.metrics and "mean replaced" not in ex.readout.value
    assert same(model.state_dict(), before)


def test_unit_explorer_structured_scores_and_errors_are_shown(unit_setup):
    model, bundle = unit_setup
    ex = pl.widgets.UnitExplorer(model, bundle, batch_size=100)
    ex.score.value = "hrank"  # the "all" set holds Linear layers: a readable error, no crash
    assert ex.errors and "hrank" in ex.readout.value and "color:#b00" in ex.readout.value
    ex.layer_set.value = "firstconv"
    want = pl.structured.score(model, "hrank", layers=pl.mrp.layer_sets(model)["firstconv"],
                               batch=bundle.batch("train", n=100, seed=0))
    got = ex._scores("firstconv", "hrank")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert "pruned" in ex.readout.value
    with pytest.raises(ValueError, match="unknown score 'bp_norm'"):
        pl.widgets.UnitExplorer(model, bundle, scores=["bp_norm"])


# ------------------------------------------------------- any model, loss, device (issue 14)
class TinyTextClassifier(torch.nn.Module):
    """HF-like: ``model(input_ids=..., attention_mask=...)`` returns an object with ``logits``."""

    def __init__(self, vocab=30, dim=8, classes=3):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, 16)
        self.fc2 = torch.nn.Linear(16, classes)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return SimpleNamespace(logits=self.fc2(torch.relu(self.fc1(h))))


@pytest.fixture(scope="module")
def text_setup():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (240, 7), generator=g)
    mask = (torch.rand(240, 7, generator=g) > 0.2).long()
    mask[:, 0] = 1
    y = ids[:, 0] % 3
    bundle = pl.data.from_tensors(({"input_ids": ids, "attention_mask": mask}, y))
    torch.manual_seed(0)
    return TinyTextClassifier().eval(), bundle


@pytest.fixture(scope="module")
def regression_setup():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], 1)
    bundle = pl.data.from_tensors((x, y))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return model.eval(), bundle


def test_mapping_inputs_and_logits_outputs_match_the_library(text_setup):
    model, bundle = text_setup
    before = snapshot(model)
    ex = pl.widgets.PruningExplorer(model, bundle, criteria=["mp", "snip", "lap"], batch_size=100)
    assert isinstance(ex.score_batch[0], dict) and set(ex.score_batch[0]) == {
        "input_ids", "attention_mask"}
    for criterion in ("snip", "mp"):
        ex.criterion.value = criterion
        ex.density.value = 0.2
        ref = pl.prune(model, criterion, sparsity=ex.sparsity, batch=ex.score_batch)
        assert all(torch.equal(ex.masks()[n], ref.masks[n]) for n in ref.masks)
        after = evaluate(ref.model, ex.eval_batch)
        assert ex.metrics["loss"] == pytest.approx(after["loss"], rel=1e-6)
        assert ex.metrics["accuracy"] == after["accuracy"]
        assert "accuracy" in ex.readout.value and "error" not in ex.readout.value
    ex.stages.value = 2
    result = ex.run(block=True)
    assert result is not None and len(result.history) == 2, ex.readout.value
    assert same(before, snapshot(model))


def test_regression_with_mse_shows_loss_without_accuracy(regression_setup):
    model, bundle = regression_setup
    ex = pl.widgets.PruningExplorer(model, bundle, loss="mse", criteria=["mp", "obd", "lm"],
                                    batch_size=200)
    assert math.isnan(ex.metrics["accuracy"])
    text = ex.readout.value
    assert "accuracy" not in text and "nan" not in text.lower()
    assert re.search(rf"loss {NUMBER} → {NUMBER} · ΔL {NUMBER}", text), text
    ex.criterion.value = "obd"
    ex.density.value = 0.1
    ref = pl.prune(model, "obd", sparsity=ex.sparsity, batch=ex.score_batch, loss="mse")
    assert all(torch.equal(ex.masks()[n], ref.masks[n]) for n in ref.masks)
    want = evaluate(ref.model, ex.eval_batch, loss="mse")["loss"]
    assert ex.metrics["loss"] == pytest.approx(want, rel=1e-6)
    assert ex.metrics["delta_loss"] == pytest.approx(abs(want - ex.before["loss"]), rel=1e-6)
    ex.criterion.value = "lm"
    ex.stages.value = 5
    result = ex.run(block=True)
    assert result is not None and len(result.history) == 5, ex.readout.value
    assert ex.config.loss == "mse" and "accuracy" not in ex.readout.value


def test_float64_model_keeps_its_dtype_and_device(model, bundle):
    m64 = copy.deepcopy(model).double()
    ex = pl.widgets.PruningExplorer(m64, bundle, criteria=["mp", "obd"], device="cpu",
                                    batch_size=300)
    assert ex.score_batch[0].dtype == torch.float64 and ex.eval_batch[0].dtype == torch.float64
    ex.criterion.value = "obd"
    ex.density.value = 0.1
    scores = ex._scores.hit(("obd", 0.0))
    w = dict(ex.model.named_parameters())
    for n, s in scores.items():  # (scores are float32 by criteria.check_scores, as pl.score's)
        assert s.device == w[n].device and w[n].dtype == torch.float64
    for n, b in ex._buffers.items():
        assert b.device == w[n].device and b.dtype == torch.bool
    ref = pl.prune(m64, "obd", sparsity=ex.sparsity, batch=ex.score_batch)
    assert all(torch.equal(ex.masks()[n], ref.masks[n]) for n in ref.masks)
    assert ex.metrics["loss"] == pytest.approx(evaluate(ref.model, ex.eval_batch)["loss"],
                                               rel=1e-12)
    assert next(ex.pruned_model().parameters()).dtype == torch.float64


@pytest.mark.parametrize("kwargs, match", [
    ({"density": float("nan")}, r"density must be a finite number in \(0, 1\].*nan"),
    ({"density": 0.0}, r"density must be a finite number in \(0, 1\].*0\.0"),
    ({"density": 1.5}, r"density must be .*1\.5"),
    ({"density": True}, r"density must be .*True"),
    ({"min_density": float("inf")}, r"min_density must be .*inf"),
    ({"lam_values": (0, -1)}, r"lam .* must be a finite number >= 0, got -1"),
    ({"lam_values": (0, float("nan"))}, r"lam .*nan"),
    ({"stages_values": (1, 0)}, r"stages must be an integer >= 1, got 0"),
    ({"stages_values": (1, 2.5)}, r"stages must be an integer >= 1, got 2\.5"),
    ({"loss": "hinge"}, r"loss must be one of .*'hinge'"),
    ({"device": "nonsense"}, r"device must be .*'nonsense'"),
    ({"scale": float("nan")}, r"scale must be a finite number in \[0\.5, 3\.0\].*nan"),
    ({"scale": 10}, r"scale must be .*10"),
    ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
])
def test_bad_settings_are_refused_naming_the_value(model, bundle, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], **kwargs)


def test_run_configuration_is_one_validated_prune_config(explorer):
    from prunelab.config import PruneConfig

    explorer.criterion.value = "lap"
    explorer.stages.value = 5
    explorer.lam.value = 1e-3
    explorer.scope.value = "layerwise"
    cfg = explorer.config
    assert isinstance(cfg, PruneConfig)
    assert (cfg.criterion, cfg.stages, cfg.lam, cfg.scope, cfg.loss) == (
        "lap", 5, 1e-3, "layerwise", "cross_entropy")
    assert cfg.sparsity == pytest.approx(explorer.sparsity)
    result = explorer.run(block=True)
    ref = pl.pruning.prune_with(explorer.model, cfg, batch=explorer.score_batch)
    assert all(torch.equal(result.masks[n], ref.masks[n]) for n in ref.masks)


# ------------------------------------------------------------ projector manners (issue 15)
def test_back_to_one_stage_clears_the_stage_bar_and_trajectory(explorer):
    assert explorer.progress.layout.display == "none"  # one-shot: no stage bar
    explorer.stages.value = 5
    assert explorer.progress.layout.display != "none"
    explorer.run(block=True)
    assert explorer.progress.value == 5 and len(explorer.trajectory_fig.data[0].x) == 5
    explorer.stages.value = 1
    assert explorer.metrics["mode"] == "one-shot"
    assert explorer.progress.layout.display == "none" and explorer.progress.value == 0
    assert "5/5" not in explorer.progress.description
    assert list(explorer.trajectory_fig.data[0].x) == [] == list(explorer.trajectory_fig.data[0].y)
    assert "π=5" not in explorer.trajectory_fig.layout.title.text
    assert "no staged run yet" in explorer.trajectory_fig.layout.annotations[0].text
    # what a late frontend draws (synced state) is cleared too
    assert list(explorer.trajectory_fig._widget_data[0]["x"]) == []


def test_cancel_is_clickable_before_the_run_starts_working(explorer, monkeypatch):
    from prunelab import explore, widgets

    seen = {}
    real_run = explore.Pruner.run

    def spy(self, *args, **kwargs):
        seen["cancel_enabled"] = not explorer.cancel_button.disabled
        seen["controls_disabled"] = all(w.disabled for w in explorer._controls)
        seen["after_return"] = time.perf_counter() - returned
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(explore.Pruner, "run", spy)
    explorer.criterion.value = "lap"
    explorer.stages.value = 140
    t0 = time.perf_counter()
    assert explorer.run(block=False) is None
    returned = time.perf_counter()
    # the state flip happened in the caller's thread, before run() returned
    assert returned - t0 < 0.5
    assert not explorer.cancel_button.disabled and explorer.run_button.disabled
    assert not any(e["event"] == "stage" for e in explorer.log)
    explorer.cancel_button.click()
    result = explorer.wait(timeout=120)
    assert seen["cancel_enabled"] and seen["controls_disabled"]
    assert seen["after_return"] >= widgets.RUN_HEAD_START * 0.9  # the work started later
    assert result is not None and result.interrupted and len(result.history) == 1


def test_layout_wraps_and_figures_follow_their_box(explorer):
    import ipywidgets as W

    rows = [c for c in explorer.widget.children if isinstance(c, W.HBox)]
    assert len(rows) == 4 and all(r.layout.flex_flow == "row wrap" for r in rows)
    assert "prunelab-root" in explorer.widget._dom_classes
    for fig in (explorer.layers_fig, explorer.trajectory_fig):
        assert fig.layout.width is None and fig.layout.autosize is True
        assert fig._config.get("responsive") is True
    boxes = [b for b in rows[-1].children]
    assert all("prunelab-figure" in b._dom_classes and b.layout.max_width == "100%"
               for b in boxes)
    for w in (explorer.criterion, explorer.density, explorer.lam, explorer.stages):
        assert w.layout.max_width == "100%"
    # the anywidget that re-fits the figures is in the tree, invisible
    assert any(getattr(c, "_esm", None) and "ResizeObserver" in c._esm
               for c in explorer.widget.children)


def test_scale_sizes_fonts_controls_and_figures(model, bundle):
    big = pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], scale=1.5)
    small = pl.widgets.PruningExplorer(model, bundle, criteria=["mp"])
    assert "prunelab-scale-150" in big.widget._dom_classes
    assert "prunelab-scale-100" in small.widget._dom_classes
    css = big.widget.children[0].value
    assert ".prunelab-scale-150{" in css and "--jp-widgets-font-size:20px" in css
    assert "--jp-widgets-inline-height:42px" in css and ".prunelab-readout{font-size:22px" in css
    assert "--jp-widgets-font-size:13px" in small.widget.children[0].value
    assert big.layers_fig.layout.font.size == pytest.approx(1.5 * small.layers_fig.layout.font.size)
    assert big.layers_fig.layout.title.font.size == pytest.approx(21)
    assert small.layers_fig.layout.height == 320 and big.layers_fig.layout.height == 400
    assert big.density.layout.width == "630px" and small.density.layout.width == "420px"
    assert big.readout.value == small.readout.value  # same numbers, only bigger


def test_unit_explorer_layout_and_scale(unit_setup):
    model, bundle = unit_setup
    ex = pl.widgets.UnitExplorer(model, bundle, batch_size=100, scale=1.5)
    assert "prunelab-scale-150" in ex.widget._dom_classes
    assert ex.penalty_fig.layout.width is None and ex.penalty_fig.layout.font.size == 18
    ex.fraction.value = 0.3
    assert ex._scores_box.children == (ex.scores_fig,)  # the new figure sits in its box
    assert ex.scores_fig.layout.height == 400
    with pytest.raises(ValueError, match="scale must be"):
        pl.widgets.UnitExplorer(model, bundle, scale=0)


def test_pending_bar_says_what_run_will_do(explorer):
    explorer.stages.value = 14
    assert explorer.progress.description == "stage 0/14" and explorer.progress.max == 14
    explorer.run(block=True)
    assert explorer.progress.description == "stage 14/14"
    explorer.stages.value = 5  # a staged result is on show: its bar stays until Run
    assert explorer.progress.description == "stage 14/14"
