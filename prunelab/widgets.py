"""Interactive pruning in a notebook: ipywidgets controls wired to the library's calls.

:class:`PruningExplorer` (weights) and :class:`UnitExplorer` (whole units, MRP) are returned,
never displayed (put one last in a cell or call ``display``). Everything they show comes from
:class:`prunelab.explore.Pruner` (masks at any sparsity, one-shot or staged),
:mod:`prunelab.units` / :mod:`prunelab.structured` and :func:`prunelab.train.evaluate`; this
module only wires them to controls and two plotly ``FigureWidget``\\ s updated in place.

ipywidgets, plotly and anywidget are optional dependencies (the ``notebooks`` extra): they are
imported when a widget is built, so ``import prunelab`` stays light.

Layout for any screen (a laptop, a projector at 1280×720, a 150 % browser zoom): rows of controls
wrap (flex-wrap) instead of running off the right edge, controls and figures have relative widths
with a minimum, the plotly figures take the width of their box (``autosize``; a small anywidget
re-fits them when the box changes size, since a figure drawn before it is attached to the page
would otherwise keep plotly's 700 px default), and ``scale=`` multiplies every font and size
(ipywidgets' CSS variables, the readout and the figures' fonts): 1.0 for a notebook, 1.5 for a
projector.

Over 500 lines because it holds two explorers and the layout they share (wrapping rows,
figure boxes, the scale stylesheet, the figure-fitting anywidget); each explorer is widget wiring
only (the pruning engine is :mod:`prunelab.explore`).
"""
from __future__ import annotations

import copy
import html
import math
import numbers
import threading
import time
from collections import OrderedDict

import torch
from torch import nn

from prunelab import batches as B
from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab import semistructured as NM
from prunelab.config import PruneConfig
from prunelab.explore import MaskedCopy, NeedsRun, Pruner, one_shot_scores
from prunelab.pruning import SCHEDULES
from prunelab.train import evaluate

__all__ = ["PruningExplorer", "UnitExplorer", "layer_density_figure",
           "stage_trajectory_figure", "unit_penalty_figure", "unit_scores_figure"]



def __dir__():
    return sorted(__all__)

LOG_LIMIT = 1000  # entries kept in ``PruningExplorer.log``
# Seconds a background run waits before its first heavy step. The "running" state (Cancel
# enabled) leaves the kernel through ipykernel's IOPub thread, which needs the GIL; a run that
# starts scoring at once holds it (and the cores) and the page saw Cancel enabled 1.7-2.4 s
# late. With this head start the messages are out before the work begins.
RUN_HEAD_START = 0.05
SCALE_RANGE = (0.5, 3.0)


def _widgets():
    try:
        import ipywidgets
        import plotly.graph_objects as go
    except ImportError as err:
        raise ImportError("prunelab.widgets needs ipywidgets, plotly and anywidget "
                          "(pip install 'prunelab[notebooks]')") from err
    return ipywidgets, go


def _in_kernel() -> bool:
    """True inside a live Jupyter kernel (where a button click can arrive during a long run)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _sync_figure(fig, layout: bool = False) -> None:
    """Make the figure's synced widget state match what Python holds.

    ``fig.data[0].y = ...`` reaches live views as a transient restyle message, but the synced
    traits ``_widget_data``/``_widget_layout`` keep the data the figure was built with until the
    figure itself is displayed (plotly's own ``_repr_mimebundle_`` does this copy). A figure shown
    inside a VBox is never displayed itself, so a frontend attaching later (Voilà, a reloaded page,
    the widget state saved in an executed notebook) would draw stale bars (ECOSYSTEM.md §1.2).
    The data copy costs ~10 µs here; the layout copy (~0.7 ms: it holds the template) is only
    made when the layout changed.
    """
    fig._widget_data = copy.deepcopy(fig._data)
    if layout:
        fig._widget_layout = copy.deepcopy(fig._layout_obj._props)


def _lam_label(lam: float) -> str:
    return f"{lam:g}"


def _num(value: float) -> str:
    """A loss for the readout: 3 decimals, or 4 significant digits when large or tiny."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if value == 0 or 1e-2 <= abs(value) < 1e4 else f"{value:.4g}"


def check_scale(scale) -> float:
    """``scale`` as a float in [0.5, 3]; ValueError naming the value otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(float(scale)) \
            or not SCALE_RANGE[0] <= float(scale) <= SCALE_RANGE[1]:
        raise ValueError(f"scale must be a finite number in [{SCALE_RANGE[0]}, "
                         f"{SCALE_RANGE[1]}] (1.0: notebook, 1.5: projector), got {scale!r}")
    return float(scale)


def _px(value: float, scale: float) -> str:
    return f"{round(value * scale)}px"


# ipywidgets' sizes are CSS variables (defaults in @jupyter-widgets/controls); custom properties
# inherit, so setting them on the explorer's root scales every control inside it. Variables that
# :root derives with calc() are set again here (a calc is computed where it is declared).
_CSS_SIZES = {"font-size": 13, "inline-height": 28, "inline-width": 300,
              "inline-width-short": 148, "inline-width-tiny": 48, "inline-label-width": 80,
              "inline-margin": 4, "slider-handle-size": 16, "slider-track-thickness": 4,
              "progress-thickness": 20, "radio-item-height": 20, "menu-item-height": 24,
              "horizontal-tab-height": 24, "input-padding": 4}


def theme_css(css_class: str, scale: float) -> str:
    """The ``<style>`` that sizes one explorer (root CSS class ``css_class``) at ``scale``."""
    variables = "".join(f"--jp-widgets-{k}:{_px(v, scale)};" for k, v in _CSS_SIZES.items())
    root = f".{css_class}"
    return (f"<style>{root}{{{variables}font-size:{_px(13, scale)};max-width:100%;"
            f"box-sizing:border-box}}"
            f"{root} .prunelab-readout{{font-size:{_px(15, scale)};line-height:1.45;"
            f"overflow-wrap:anywhere}}"
            f"{root} .widget-label,{root} .widget-readout,{root} button,{root} select"
            f"{{font-size:{_px(13, scale)}}}"
            f"{root} .widget-hbox{{column-gap:{_px(12, scale)}}}"
            f"{root} .prunelab-figure{{overflow:hidden}}</style>")


# A ResizeObserver on the explorer's root: when its width changes (window resize, browser
# zoom, a sidebar opened) or a figure is (re)drawn inside it, every plotly figure whose drawn
# width differs from its box is re-fitted with plotly's own responsive handler. Plotly's
# widget draws before its element is in the page and then falls back to a 700 px width.
_FIT_ESM = """
function render({ el }) {
  let root = null, timer = 0, observers = [];
  const fit = () => {
    timer = 0;
    for (const gd of root.querySelectorAll('.js-plotly-plot')) {
      const w = gd.clientWidth;
      if (w > 0 && gd._fullLayout && Math.abs(gd._fullLayout.width - w) > 2) {
        if (gd._responsiveChartHandler) gd._responsiveChartHandler();
        else window.dispatchEvent(new Event('resize'));
      }
    }
  };
  const later = () => { if (!timer) timer = setTimeout(fit, 30); };
  const attach = () => {
    root = el.closest('.prunelab-root');
    if (!root) { setTimeout(attach, 50); return; }
    const ro = new ResizeObserver(later);
    ro.observe(root);
    const mo = new MutationObserver(later);
    mo.observe(root, { childList: true, subtree: true });
    observers = [ro, mo];
    later();
  };
  attach();
  return () => observers.forEach(o => o.disconnect());
}
export default { render };
"""


def _fit_widget():
    """The (invisible) anywidget that keeps the figures as wide as their boxes."""
    import anywidget

    class FigureFit(anywidget.AnyWidget):
        _esm = _FIT_ESM

    fit = FigureFit()
    fit.layout.display = "none"
    return fit


def _row(W, children, **layout):
    """A row of controls that wraps onto the next line when the page is narrow."""
    return W.HBox(children, layout=W.Layout(**{"flex_flow": "row wrap", "align_items": "center",
                                               "width": "100%", **layout}))


def _figure_box(W, fig, scale: float):
    """A box for a figure: shares the row, at least 300 px (scaled) unless the row is
    narrower, at most 100 % wide."""
    # the basis is not scaled: two figures share a 1280-px row at any scale
    box = W.VBox([fig], layout=W.Layout(flex="1 1 420px",
                                        min_width=f"min({_px(300, scale)}, 100%)",
                                        max_width="100%", margin="0 4px 0 0"))
    box.add_class("prunelab-figure")
    return box


def _theme(W, scale: float) -> tuple[str, object]:
    """The root CSS class for ``scale`` and the hidden HTML widget carrying its style."""
    css_class = f"prunelab-scale-{round(scale * 100)}"
    return css_class, W.HTML(theme_css(css_class, scale), layout=W.Layout(display="none"))


def check_density(value, what: str = "density") -> float:
    """A fraction of weights remaining, in (0, 1]; ValueError naming the value otherwise."""
    allowed = "a finite number in (0, 1] (the fraction of weights remaining)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 < v <= 1.0:
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return v


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


# ----------------------------------------------------------------- the explorers' figures
# Plots-style builders of the live figures (plotly FigureWidgets updated in place by the
# explorers); ``go`` is ``plotly.graph_objects``, passed in so plotly loads with a widget only.
# No fixed width: the figure autosizes to its box (``_figure_box``); ``scale`` sizes fonts,
# height and margins.


def figure_height(scale: float) -> int:
    """Height of the explorers' figures: 320 px at scale 1, growing half as fast as the fonts,
    so that at 1280×720 with ``scale=1.5`` the controls and the plots still fit one screen."""
    return round(320 * (1 + (scale - 1) / 2))


def _figure_layout(title: str, scale: float, **extra) -> dict:
    return dict(title=dict(text=title, font_size=14 * scale), font=dict(size=12 * scale),
                autosize=True, height=figure_height(scale),
                margin=dict(l=round(55 * scale), r=round(15 * scale), t=round(45 * scale),
                            b=round(45 * scale)),
                template="plotly_white", **extra)


def _responsive(fig):
    fig._config = {**(fig._config or {}), "responsive": True}
    return fig


def layer_density_figure(go, labels: list[str], numels: list[int], *, scale: float = 1.0):
    """Bars of the fraction of weights kept per layer (all 1 until the first update)."""
    return _responsive(go.FigureWidget(
        data=[go.Bar(x=labels, y=[1.0] * len(labels), name="density",
                     customdata=numels, marker_color="#4C78A8",
                     texttemplate="%{y:.3g}",
                     textposition="outside", cliponaxis=False,
                     hovertemplate="%{x}: %{customdata} weights<br>density %{y:.4g}"
                                   "<extra></extra>")],
        layout=_figure_layout("fraction of weights kept per layer", scale,
                              yaxis=dict(range=[0, 1.12], title="density"))))


_NO_RUN_NOTE = "no staged run yet:<br>set π > 1 and press Run"


def _no_run_annotation(scale: float) -> dict:
    return dict(text=_NO_RUN_NOTE, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                font=dict(size=13 * scale, color="#777"))


def stage_trajectory_figure(go, *, scale: float = 1.0, loss_name: str = "ΔL on the pruning batch"):
    """An empty line of ΔL per stage, filled by a staged run (customdata: the sparsity)."""
    return _responsive(go.FigureWidget(
        data=[go.Scatter(x=[], y=[], mode="lines+markers", name="ΔL",
                         marker_color="#F58518",
                         hovertemplate="stage %{x}<br>ΔL %{y:.4g}<br>sparsity "
                                       "%{customdata:.4f}<extra></extra>")],
        layout=_figure_layout("ΔL per stage", scale,
                              annotations=[_no_run_annotation(scale)],
                              xaxis=dict(title="stage", rangemode="tozero"),
                              yaxis=dict(title=loss_name, rangemode="tozero"))))


def unit_penalty_figure(go, *, scale: float = 1.0):
    """Two bars: the pruning penalty with the units removed and with them mean-replaced."""
    return _responsive(go.FigureWidget(
        data=[go.Bar(x=["removed", "mean replaced"], y=[0.0, 0.0],
                     marker_color=["#E45756", "#4C78A8"], texttemplate="%{y:.3g}",
                     textposition="outside", cliponaxis=False,
                     hovertemplate="%{x}: penalty %{y:.4g}<extra></extra>")],
        layout=_figure_layout("pruning penalty L(pruned) − L(dense)", scale,
                              yaxis=dict(title="penalty"))))


def unit_scores_figure(go, order: list, values: list, colors: list, xtitle: str, *,
                       scale: float = 1.0):
    """Unit scores sorted ascending (``order``: the unit indices), pruned units in red."""
    return _responsive(go.FigureWidget(
        data=[go.Bar(x=list(range(len(order))), y=values, customdata=order,
                     marker_color=colors,
                     hovertemplate="unit %{customdata}<br>score %{y:.4g}<extra></extra>")],
        layout=_figure_layout("unit scores, sorted (red = pruned)", scale,
                              xaxis=dict(title=xtitle), yaxis=dict(title="score"))))


class PruningExplorer:
    """Sliders for criterion, scope, schedule, sparsity, λ and stages π over a pretrained model.

    Displays as its :attr:`widget` (an ``ipywidgets.VBox``): end a cell with the explorer, or
    ``display(explorer)``; to place it inside other widgets use ``explorer.widget``. (It holds
    the VBox rather than being one so that its attribute names, e.g. :attr:`log`, cannot clash
    with widget traits.)

    Shows the validation accuracy and loss before → after pruning, ΔL and the actual sparsity
    (:attr:`readout`), the density of every prunable layer (:attr:`layers_fig`) and ΔL after each
    stage of the last staged run (:attr:`trajectory_fig`).

    The engine is :class:`prunelab.explore.Pruner` (shared with :mod:`prunelab.collapse`); the
    explorer only wires controls, caches and figures to it. Two paths:

    * **One-shot** (π = 1 and a criterion that does not prune toward the target inside itself,
      i.e. not ``spec(name).uses_target``): the scores of each (criterion, λ) are computed once on
      the fixed scoring batch and ranked once per scope (:class:`prunelab.masks.Ranking`); one
      pruned copy of the model is kept (:class:`prunelab.explore.MaskedCopy`). Moving the
      sparsity slider rewrites only the weights (and masks) ranked between the old and the new
      threshold, in place, and evaluates the fixed evaluation batch; a setting whose masks did
      not change is not evaluated again. A move costs the evaluation plus ~0.3-0.8 ms of mask
      writing and widget traffic (plotly's restyle messages); ``benchmarks/explorer.py``'s
      ``time_slider_move`` measures it (DESIGN.md's budget: within 1.1× of evaluating 1,000
      examples).
    * **N:M** (scope ``"2:4"`` or another pattern of ``nm_patterns``): one-shot criteria keep the
      n highest scores of every m consecutive input weights (:func:`prunelab.masks.select`);
      the pattern fixes the sparsity at 1 − n/m, so the fraction slider does not apply (the
      readout says so); staged runs use the pattern as :func:`prunelab.prune` does.
    * **Staged** (π > 1, or a target-using criterion such as ``synflow`` or ``lap-forward``):
      moving a control only says what will run; the Run button builds the run's
      :class:`prunelab.config.PruneConfig` (:attr:`config`) and calls
      :func:`prunelab.pruning.prune_with` with a callback that advances :attr:`progress`, extends
      the trajectory per stage and stops the run when Cancel was pressed. Inside a live kernel
      the run goes to a background thread, so the Cancel click can arrive while it works
      (Jupyter's Interrupt only reaches the main thread, so Cancel is the way to stop it); Cancel
      is enabled and the controls disabled in the caller's thread before the run starts, and
      the run waits :data:`RUN_HEAD_START` seconds so that this state reaches the page first.
      Outside a kernel, and with ``run(block=True)``, it runs in the caller's thread. Setting π
      back to 1 hides the stage bar and empties the trajectory (a one-shot readout again).

    The model handed in is never modified: the explorer works on a deep copy taken when it is
    built (so later training of ``model`` does not invalidate its cached scores). Masks already
    attached to ``model`` stay pruned and bound the sparsity from below. Library errors (an
    invalid combination, a failing criterion) are shown in the readout; the widget stays live.

    Args:
        model: a trained network (e.g. from :func:`prunelab.zoo.load`), any inputs and outputs
            :mod:`prunelab.batches` understands (a tensor, ``model(**x)`` for mapping inputs,
            outputs with ``logits``).
        bundle: its :class:`prunelab.data.Bundle` (:func:`prunelab.data.load`, or
            :func:`prunelab.data.from_tensors` / ``from_datasets`` for your own data).
        loss: ``"cross_entropy"`` (default), ``"mse"`` or a callable ``(output, target) ->
            mean loss``: what the criteria model and the readout reports. Accuracy is shown only
            for a loss that classifies (cross-entropy).
        output: optional callable ``model output -> tensor``.
        device: where the explorer's copy of the model, its batches, cached scores and rankings
            live (None: where the model's parameters are; their dtype is kept).
        criteria: criterion names offered (default: every registered one).
        batch_size: examples of the scoring batch (``bundle.batch("train", n, seed)``) and of the
            evaluation batch (``bundle.batch(eval_split, n, seed)``), each capped at the split's
            size.
        eval_split: split on which accuracy and loss are reported.
        seed: seed of both batches and of stochastic criteria.
        lam_values: λ positions of the λ slider (0 included: no penalty).
        stages_values: π positions of the stages slider.
        density: initial fraction of weights remaining, in (0, 1] (rounded to the slider's grid,
            steps of 0.01 in log10).
        min_density: left end of the (log) density slider, in (0, 1).
        cache_size: rankings (and score sets) kept; each holds one int64 per prunable weight.
        scale: size of fonts, controls and figures (1.0 in a notebook, 1.5 for a projector), in
            [0.5, 3].
        nm_patterns: N:M patterns offered on the scope toggle after the scope words; a pattern
            is left out when a prunable weight cannot take it (fewer than 2 dimensions, or an
            input dimension not divisible by m). ``()``: none.

    Raises:
        ValueError: an unknown criterion; a density, λ, π, loss or device that a run could not
            take (named, with the allowed values: every run is a
            :class:`prunelab.config.PruneConfig`, validated here once for the shared fields).

    Attributes used by tests and notebooks:
        widget: the ``ipywidgets.VBox`` shown (CSS classes ``prunelab-explorer``,
            ``prunelab-root`` and ``prunelab-scale-<100·scale>``).
        criterion, scope, schedule, density, lam, stages: the controls (``density`` is the
            fraction of weights remaining, sparsity = 1 − density).
        readout: HTML with e.g. ``sparsity 0.900 · accuracy 0.648 → 0.512 · loss 0.96 → 1.40
            · ΔL 0.44`` (CSS class ``prunelab-readout``); without accuracy for a loss that does
            not classify.
        metrics: the readout's numbers as a dict (also ``mode``, ``error``, ``interrupted``).
        layers_fig, trajectory_fig: ``plotly.graph_objects.FigureWidget``.
        progress, run_button, cancel_button: staged runs (the progress bar is hidden while the
            readout is one-shot).
        config: the validated :class:`prunelab.config.PruneConfig` the controls select now.
        log: Python-side list of events (dicts), newest last; capped at 1,000 entries.
        result: the last staged run's :class:`prunelab.pruning.PruneResult`.
        stats: counts of scores and rankings computed and of cache hits.
    """

    def __init__(self, model: nn.Module, bundle, *, loss="cross_entropy", output=None,
                 device=None, criteria=None, batch_size: int = 1000, eval_split: str = "val",
                 seed: int = 0, lam_values=(0, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10),
                 stages_values=(1, 2, 5, 14, 50, 140), density: float = 0.3,
                 min_density: float = 1e-3, cache_size: int = 16, scale: float = 1.0,
                 nm_patterns=("2:4",)):
        W, go = _widgets()
        names = list(C.names()) if criteria is None else list(criteria)
        if not names:
            raise ValueError("criteria must name at least one criterion")
        for n in names:
            C.spec(n)  # ValueError listing the valid names
        density = check_density(density)
        min_density = check_density(min_density, "min_density")
        if min_density >= 1:
            raise ValueError(f"min_density must be a finite number in (0, 1), got {min_density!r}")
        scale = check_scale(scale)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        # One validated configuration (loss, output, device, seed; λ and π of every slider
        # position): a Run only changes the fields its controls set, so nothing a run takes can
        # fail validation later.
        base = PruneConfig.from_kwargs(names[0], sparsity=0.0, seed=seed, loss=loss,
                                       output=output, device=device)
        lam_values = [base.replace(lam=v).lam for v in lam_values]
        stages_values = [base.replace(stages=v).stages for v in stages_values]
        if not lam_values or not stages_values:
            raise ValueError("lam_values and stages_values must each hold at least one value")
        self._base_config = base
        self._objective = base.objective
        self.scale = scale

        self.seed = base.seed
        self._model = copy.deepcopy(model).eval()
        if base.device is not None:
            self._model.to(base.device)
        self._names = G.prunable_names(self._model)
        if not self._names:
            raise ValueError("the model has no prunable weights (Linear/Conv)")
        self._previous = M.current(self._model) or None
        self._base_sparsity = M.sparsity(self._previous) if self._previous else 0.0
        # batches moved once to the model's device (floating inputs in its dtype)
        self._score_batch = B.to_model(
            bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=self.seed),
            self._model)
        split = bundle.split(eval_split)
        self.eval_split = eval_split
        self._eval_batch = B.to_model(
            bundle.batch(eval_split, n=min(batch_size, len(split)), seed=self.seed), self._model)
        self.before = self._evaluate(self._model)

        # One pruned copy, plain (no parametrization: torch.nn.utils.parametrize re-multiplies
        # the mask in Python on every forward, ~25 % of a 500-example evaluation of the MLP).
        # A move rewrites only the weights (and masks, ``_buffers``) whose mask changed
        # (prunelab.explore.MaskedCopy); all of them beside the parameters (same device).
        self._live = MaskedCopy(self._model)
        self._pruned = self._live.model
        self._buffers = self._live.masks
        self._numels = list(self._live.numels)
        self._live_key = None     # the N:M selection the live copy shows (None: a ranking)
        self._live_after = None   # its evaluation, reused while the copy is unchanged

        self._scores = _LRU(cache_size)
        self._rankings = _LRU(cache_size)
        self.stats = {"scores": 0, "rankings": 0, "hits": 0}
        self._needs_run: set[str] = set()
        self.log: list[dict] = []
        self.metrics: dict = {}
        self.result = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._note = ""
        self._shown_density: list[float] = []
        self._staged_shown = False

        # ---- controls (relative widths, capped at the row; rows wrap)
        style = {"description_width": "initial"}
        fits = dict(max_width="100%")
        self.criterion = W.Dropdown(options=names, value="mp" if "mp" in names else names[0],
                                    description="criterion", style=style,
                                    layout=W.Layout(width=_px(260, scale), **fits))
        self.scope = W.ToggleButtons(options=list(M.SCOPES) + self._fitting_nm(nm_patterns),
                                     value="global", description="scope",
                                     style={"button_width": _px(105, scale), **style},
                                     layout=W.Layout(**fits))
        self.schedule = W.ToggleButtons(options=list(SCHEDULES), value="exponential",
                                        description="schedule",
                                        style={"button_width": _px(105, scale), **style},
                                        layout=W.Layout(**fits))
        hi, lo, step = math.log10(1.0 - self._base_sparsity), math.log10(min_density), 0.01
        # on the slider's grid, else the browser snaps it on first render and the numbers jump
        start = math.log10(min(max(density, min_density), 1.0 - self._base_sparsity))
        start = min(lo + round((start - lo) / step) * step, hi)
        self.density = W.FloatLogSlider(
            value=10 ** start, base=10, min=lo, max=hi, step=step, readout_format=".3g",
            description="fraction remaining",
            continuous_update=True, style=style,
            layout=W.Layout(width=_px(420, scale), flex="0 1 auto", **fits))
        self.density.add_class("prunelab-density")
        self.lam = W.SelectionSlider(options=[(_lam_label(v), v) for v in lam_values],
                                     value=lam_values[0], description="λ", style=style,
                                     layout=W.Layout(width=_px(260, scale), **fits))
        self.stages = W.SelectionSlider(options=[(str(v), v) for v in stages_values],
                                        value=stages_values[0], description="stages π",
                                        style=style,
                                        layout=W.Layout(width=_px(260, scale), **fits))
        self.run_button = W.Button(description="Run", icon="play", button_style="primary",
                                   tooltip="prune with these settings (all stages)",
                                   layout=W.Layout(width=_px(90, scale)))
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True,
                                      tooltip="stop the staged run after the current stage",
                                      layout=W.Layout(width=_px(90, scale)))
        self.run_button.add_class("prunelab-run")
        self.cancel_button.add_class("prunelab-cancel")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="stage 0/1",
                                      style=style,
                                      layout=W.Layout(width=_px(260, scale), display="none",
                                                      **fits))
        self.readout = W.HTML(layout=W.Layout(width="auto", max_width="100%"))
        self.readout.add_class("prunelab-readout")
        self._controls = [self.criterion, self.scope, self.schedule, self.density, self.lam,
                          self.stages, self.run_button]

        # ---- figures, built from the initial state (see _sync_figure)
        self.layers_fig = layer_density_figure(
            go, [n.removesuffix(".weight") for n in self._names], self._numels, scale=scale)
        self.trajectory_fig = stage_trajectory_figure(go, scale=scale)

        for w in (self.criterion, self.scope, self.schedule, self.lam, self.stages):
            w.observe(self._on_control, names="value")
        self.density.observe(self._on_control, names="value")
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())

        css_class, theme = _theme(W, scale)
        self.widget = W.VBox([
            theme,
            _row(W, [self.criterion, self.lam, self.stages]),
            _row(W, [self.scope, self.schedule]),
            _row(W, [self.density, self.run_button, self.cancel_button, self.progress]),
            self.readout,
            _row(W, [_figure_box(W, self.layers_fig, scale),
                     _figure_box(W, self.trajectory_fig, scale)], align_items="flex-start"),
            _fit_widget(),
        ], layout=W.Layout(width="100%", max_width="100%"))
        for cls in ("prunelab-explorer", "prunelab-root", css_class):
            self.widget.add_class(cls)
        self._refresh()  # initial state before anything is displayed

    # ------------------------------------------------------------------ public
    @property
    def sparsity(self) -> float:
        """Target sparsity of the controls: 1 − density (at least the model's own sparsity);
        with an N:M scope the ``1 - n/m`` the pattern fixes (the slider does not apply)."""
        if NM.is_nm(self.scope.value):
            n, m = NM.parse_nm(self.scope.value)
            return 1.0 - n / m
        return min(max(1.0 - float(self.density.value), self._base_sparsity), 1.0 - 1e-12)

    @property
    def one_shot(self) -> bool:
        """True when the controls pick the cached fast path (π = 1, no inner-target criterion)."""
        name = self.criterion.value
        return (self.stages.value == 1 and not C.spec(name).uses_target
                and name not in self._needs_run)

    @property
    def running(self) -> bool:
        """True while a background run is on."""
        return self._thread is not None and self._thread.is_alive()

    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the masks shown now (one-shot path: the live buffers; else the last run)."""
        if self.metrics.get("mode") == "staged" and self.result is not None:
            return {n: m.clone() for n, m in self.result.masks.items()}
        return {n: b.clone() for n, b in self._buffers.items()}

    def pruned_model(self) -> nn.Module:
        """The model shown now as a pruned copy with its masks attached (ready to fine-tune)."""
        if self.metrics.get("mode") == "staged" and self.result is not None:
            return copy.deepcopy(self.result.model)
        return M.apply(self._model, self.masks())

    def run(self, block: bool | None = None):
        """Prune with the current controls via :func:`prunelab.prune`, all π stages.

        ``block=None`` runs in a background thread inside a live kernel (so Cancel can be
        clicked) and in the caller's thread otherwise; ``block=True`` always waits. Returns the
        :class:`~prunelab.pruning.PruneResult` when it waited (None on error), else None
        (use :meth:`wait`).
        """
        if self.running:
            return None
        try:
            config = self.config
        except ValueError as err:  # e.g. a sparsity no run can reach: shown, the widget stays
            self._show_error(err, self.criterion.value)
            return None
        self._cancel.clear()
        # Everything the page shows for "running" (controls off, Cancel on, the bar) is set
        # here, in the caller's thread, before any work starts.
        self._start_run(config)
        if block is None:
            block = not _in_kernel()
        if block:
            return self._run_job(config)
        self._thread = threading.Thread(target=self._run_job, args=(config, RUN_HEAD_START),
                                        daemon=True, name="prunelab-explorer-run")
        self._thread.start()
        return None

    @property
    def config(self) -> PruneConfig:
        """The run the controls select, as a validated :class:`prunelab.config.PruneConfig`."""
        return self._base_config.replace(
            criterion=self.criterion.value, sparsity=self.sparsity, scope=self.scope.value,
            stages=self.stages.value, schedule=self.schedule.value, lam=self.lam.value)

    def wait(self, timeout: float | None = None):
        """Wait for a background run; returns its result (None if it failed or is still on)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return None if self.running else self.result

    def cancel(self) -> None:
        """Stop the staged run after its current stage (what the Cancel button does)."""
        self._cancel.set()
        self._log(event="cancel")

    @property
    def model(self) -> nn.Module:
        """The explorer's own dense copy of the model (scored and evaluated; do not modify)."""
        return self._model

    @property
    def score_batch(self):
        """The fixed scoring batch ``(x, y)`` (``batch_size`` training examples)."""
        return self._score_batch

    @property
    def eval_batch(self):
        """The fixed evaluation batch ``(x, y)`` of ``eval_split``."""
        return self._eval_batch

    def refresh(self) -> None:
        """Show the current controls now (what a control change triggers)."""
        self._refresh()

    def _repr_mimebundle_(self, **kwargs):
        # Displaying the explorer displays its VBox; figures re-synced first (see _sync_figure).
        for fig in (self.layers_fig, self.trajectory_fig):
            _sync_figure(fig, layout=True)
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ internals
    def _fitting_nm(self, patterns) -> list[str]:
        """The N:M patterns of ``patterns`` every prunable weight can take (at least 2-D, input
        dimension divisible by m); ValueError for a malformed pattern."""
        if isinstance(patterns, str):
            patterns = (patterns,)
        out = []
        for p in patterns:
            n, m = NM.parse_nm(p)  # ValueError naming a malformed pattern
            label = f"{n}:{m}"
            if label not in out and all(
                    len(shape) >= 2 and math.prod(shape[1:]) % m == 0
                    for shape in (G.weight(self._model, w).shape for w in self._names)):
                out.append(label)
        return out

    def _evaluate(self, model: nn.Module) -> dict:
        return evaluate(model, self._eval_batch, loss=self._objective)

    def _log(self, **entry) -> None:
        entry.setdefault("time", time.time())
        self.log.append(entry)
        if len(self.log) > LOG_LIMIT:
            del self.log[: len(self.log) - LOG_LIMIT]

    def _ranking(self, name: str, scope: str, lam: float) -> M.Ranking:
        """The one-shot ranking of the engine (:class:`prunelab.explore.Pruner`) for these
        controls; scores cached per (criterion, λ), rankings per (criterion, scope, λ)."""
        key = (name, scope, lam)
        pruner = self._rankings.hit(key)
        if pruner is not None:
            self.stats["hits"] += 1
            return pruner.ranking
        scores = self._scores_of(name, lam)
        pruner = Pruner(self._model, name, batch=self._score_batch, scope=scope, seed=self.seed,
                        lam=lam, scores=scores, loss=self._objective.loss,
                        output=self._objective.output)
        ranking = pruner.ranking
        self.stats["rankings"] += 1
        self._rankings.put(key, pruner)
        return ranking

    def _nm_masks(self, name: str, scope: str, lam: float) -> dict[str, torch.Tensor]:
        """The N:M masks of one-shot ``name`` at λ (cached beside the rankings): in every group
        of m consecutive weights along the input the n highest scores are kept
        (:func:`prunelab.masks.select`, as one-shot :func:`prunelab.prune` with this scope)."""
        key = (name, scope, lam)
        masks = self._rankings.hit(key)
        if masks is not None:
            self.stats["hits"] += 1
            return masks
        masks = M.select(self._scores_of(name, lam), None, scope=scope, previous=self._previous)
        self.stats["rankings"] += 1
        return self._rankings.put(key, masks)

    def _scores_of(self, name: str, lam: float) -> dict[str, torch.Tensor]:
        """One-shot scores of ``name`` at λ on the scoring batch, cached per (criterion, λ)."""
        scores = self._scores.hit((name, lam))
        if scores is None:
            self._set_note(f"scoring {html.escape(name)} on {len(self._score_batch[1])} "
                           "training examples …")
            t0 = time.perf_counter()
            try:
                scores = one_shot_scores(self._model, name, batch=self._score_batch, lam=lam,
                                         seed=self.seed, allow_update=False,
                                         loss=self._objective.loss,
                                         output=self._objective.output)
            except NeedsRun:
                # OBS-like: the kept weights move too, which masks alone cannot show.
                self._needs_run.add(name)
                raise
            self._scores.put((name, lam), scores)
            self.stats["scores"] += 1
            self._log(event="score", criterion=name, lam=lam,
                      seconds=time.perf_counter() - t0)
        return scores

    def _on_control(self, change) -> None:
        if self.running:  # controls are disabled in the browser; ignore programmatic changes too
            return
        self._refresh()

    def _refresh(self) -> None:
        if self.one_shot:
            self._clear_staged()
            self._update_fast()
        else:
            self._show_pending()

    def _clear_staged(self) -> None:
        """Back to a one-shot readout: hide the stage bar and empty the stage trajectory, so
        that no "stage 140/140" or π = 140 curve stands next to one-shot numbers."""
        if not self._staged_shown:
            return
        self._staged_shown = False
        self.progress.layout.display = "none"
        self.progress.value, self.progress.bar_style = 0, ""
        self.progress.description = "stage 0/1"
        tr = self.trajectory_fig.data[0]
        with self.trajectory_fig.batch_update():
            tr.x, tr.y, tr.customdata = [], [], []
            self.trajectory_fig.layout.annotations = [_no_run_annotation(self.scale)]
            self.trajectory_fig.layout.title.text = "ΔL per stage"
        _sync_figure(self.trajectory_fig, layout=True)

    def _show_staged(self) -> None:
        if not self._staged_shown:
            self._staged_shown = True
            self.progress.layout.display = None

    def _update_fast(self) -> None:
        name, scope, lam = self.criterion.value, self.scope.value, self.lam.value
        nm = NM.is_nm(scope)
        try:
            if nm:  # the pattern fixes the masks: the density slider does not move them
                key = (name, scope, lam)
                changed = self._live_key != key
                if changed:
                    self._live.show_masks(self._nm_masks(name, scope, lam))
                    self._live_key = key
            else:
                changed = self._live.show(self._ranking(name, scope, lam), self.sparsity)
                self._live_key = None
            after = self._live_after
            if changed or after is None:  # an unchanged network is not evaluated again
                self._live_after = None
                after = self._live_after = self._evaluate(self._pruned)
        except NeedsRun:
            self._show_pending()
            return
        except Exception as err:  # noqa: BLE001 - shown to the user, the widget stays live
            self._show_error(err, name)
            return
        kept = self._live.kept
        fixed = (f" · {scope} keeps {scope.split(':')[0]} of every {scope.split(':')[1]} "
                 "weights: the fraction slider does not apply") if nm else ""
        self._show(after, kept, mode="one-shot",
                   note=f"one-shot {name} · {scope} · λ={_lam_label(lam)} · scores cached · "
                        f"evaluated on {after['n']} {self.eval_split} examples{fixed}")
        self._log(event="move", criterion=name, scope=scope, lam=lam, sparsity=self.sparsity,
                  accuracy=after["accuracy"])

    def _show_pending(self) -> None:
        name = self.criterion.value
        if C.spec(name).uses_target:
            why = f"{name} prunes toward the target inside the criterion"
        elif name in self._needs_run:
            why = f"{name} also updates the kept weights"
        else:
            why = f"π={self.stages.value} stages ({self.schedule.value}) re-score after each stage"
        self._show_staged()
        if self.metrics.get("mode") != "staged" and not self.running:
            # no staged result on show: the bar says what Run will do
            self.progress.max, self.progress.value = self.stages.value, 0
            self.progress.bar_style = ""
            self.progress.description = f"stage 0/{self.stages.value}"
        self._set_note(f"{html.escape(why)}: press <b>Run</b> for sparsity "
                       f"{self.sparsity:.3f} (numbers above are from the last result)")

    def _set_note(self, note: str) -> None:
        self._note = note
        self._render()

    def _render(self) -> None:
        m = self.metrics
        if m.get("error"):
            head = (f"<span style='color:#b00020'>error: {html.escape(m['error'])}</span>")
        elif m:
            parts = [f"sparsity {m['sparsity']:.3f}"]
            # accuracy only where it is defined (a classifying loss); NaN is never printed
            if self._objective.classifies and math.isfinite(m["accuracy"]) \
                    and math.isfinite(m["accuracy_before"]):
                parts.append(f"accuracy {m['accuracy_before']:.3f} → {m['accuracy']:.3f}")
            parts.append(f"loss {_num(m['loss_before'])} → {_num(m['loss'])}")
            parts.append(f"ΔL {_num(m['delta_loss'])}")
            head = " · ".join(parts)
        else:
            head = ""
        note = f"<br><span style='color:#555;font-size:90%'>{self._note}</span>" if self._note \
            else ""
        self.readout.value = f"<span style='font-size:110%'>{head}</span>{note}"

    def _show(self, after: dict, kept: list[int], *, mode: str, note: str,
              interrupted: bool = False) -> None:
        total = sum(self._numels)
        self.metrics = {
            "mode": mode, "sparsity": 1.0 - sum(kept) / total, "target_sparsity": self.sparsity,
            "accuracy_before": self.before["accuracy"], "accuracy": after["accuracy"],
            "loss_before": self.before["loss"], "loss": after["loss"],
            "delta_loss": abs(after["loss"] - self.before["loss"]), "error": None,
            "interrupted": interrupted,
        }
        dens = [k / n for k, n in zip(kept, self._numels)]
        if dens != self._shown_density:
            # one restyle message (batch_update would validate and diff three properties)
            # one restyle of y (labels come from texttemplate): ~0.1 ms, a property
            # assignment or batch_update validates more
            self.layers_fig.plotly_restyle({"y": [dens]}, trace_indexes=0)
            _sync_figure(self.layers_fig)
            self._shown_density = dens
        self._note = html.escape(note)
        self._render()

    def _show_error(self, err: Exception, name: str) -> None:
        msg = f"{type(err).__name__}: {err}"
        self.metrics = {**self.metrics, "error": msg}
        self._note = html.escape(f"criterion {name}, scope {self.scope.value}, "
                                 f"λ={_lam_label(self.lam.value)}, π={self.stages.value}")
        self._render()
        self._log(event="error", criterion=name, error=msg)

    # ---- staged runs
    def _start_run(self, config: PruneConfig) -> None:
        # Cancel first: the first message out is the one the user may need at once.
        self.cancel_button.disabled = False
        for w in self._controls:
            w.disabled = True
        self._show_staged()
        self.progress.max = config.stages
        self.progress.value = 0
        self.progress.bar_style = ""
        self.progress.description = f"stage 0/{config.stages}"
        tr = self.trajectory_fig.data[0]
        with self.trajectory_fig.batch_update():
            tr.x, tr.y, tr.customdata = [], [], []
            self.trajectory_fig.layout.annotations = []
            self.trajectory_fig.layout.title.text = (
                f"ΔL per stage: {config.criterion}, π={config.stages}, "
                f"{config.schedule}, λ={_lam_label(config.lam)}")
        _sync_figure(self.trajectory_fig, layout=True)
        self._set_note(html.escape(f"running {config.criterion} to sparsity "
                                   f"{config.sparsity:.3f} in {config.stages} stages …"))
        self._log(event="run", **config.to_dict())

    def _on_stage(self, row: dict) -> bool:
        self._log(event="stage", **row)
        self.progress.value = int(row["stage"])
        self.progress.description = f"stage {int(row['stage'])}/{self.progress.max}"
        tr = self.trajectory_fig.data[0]
        with self.trajectory_fig.batch_update():
            tr.x = [*tr.x, int(row["stage"])]
            tr.y = [*tr.y, float(row["delta_loss"])]
            tr.customdata = [*tr.customdata, float(row["sparsity"])]
        _sync_figure(self.trajectory_fig)
        return self._cancel.is_set()

    def _run_job(self, config: PruneConfig, head_start: float = 0.0):
        result = None
        try:
            if head_start:
                time.sleep(head_start)  # let the "running" state reach the page first
            pruner = Pruner(self._model, config.criterion, batch=self._score_batch,
                            scope=config.scope, seed=config.seed, lam=config.lam,
                            loss=config.loss, output=config.output, **config.options)
            result = pruner.run(config, callback=self._on_stage)
            after = self._evaluate(result.model)
            kept = [int(result.masks[n].sum()) for n in self._names]
            done = len(result.history)
            status = (f"cancelled after stage {done} of {config.stages}" if result.interrupted
                      else f"{config.stages} stage{'s' if config.stages > 1 else ''} done")
            self.result = result
            self._show(after, kept, mode="staged", interrupted=result.interrupted,
                       note=f"{status} · {config.criterion} · {config.scope} · "
                            f"{config.schedule} · λ={_lam_label(config.lam)} · "
                            f"evaluated on {after['n']} {self.eval_split} examples")
            self.progress.bar_style = "warning" if result.interrupted else "success"
            self._log(event="done", stages=done, interrupted=result.interrupted,
                      accuracy=after["accuracy"], sparsity=self.metrics["sparsity"])
        except Exception as err:  # noqa: BLE001 - shown to the user, the widget stays live
            self.progress.bar_style = "danger"
            self._show_error(err, config.criterion)
        finally:
            for w in self._controls:
                w.disabled = False
            self.cancel_button.disabled = True
        return result


# ------------------------------------------------------------------------ unit pruning (MRP)
class UnitExplorer:
    """Prune whole units with a chosen layer set, fraction and score (MRP Table 1 and the
    structured criteria of :mod:`prunelab.structured`), with and without mean replacement.

    Every move prunes a copy twice, with and without mean replacement (MRP Eq. 4), and shows
    the pruning penalty ``L(pruned) - L(dense)`` and the accuracy of both on a fixed evaluation
    batch, plus the scores of the units of the set's first layer with the pruned ones marked.
    Statistics (activations, gradients) and scores are computed once per layer set and score on
    a fixed scoring batch from the train split and cached, so a fraction move costs two
    evaluations.

    Attributes:
        widget: the ``ipywidgets.VBox`` to display.
        layer_set, fraction, score, mean_replacement: the controls.
        readout: HTML with the numbers; ``penalty_fig`` (bars: penalty without / with mean
            replacement) and ``scores_fig`` (sorted unit scores, pruned in red).
        metrics: the numbers shown (dict), updated on every move.

    ``scale`` sizes fonts, controls and figures as in :class:`PruningExplorer` (1.5 for a
    projector); rows wrap and figures take the width of their box.
    """

    def __init__(self, model: nn.Module, bundle, *, batch_size: int = 500, seed: int = 0,
                 eval_split: str = "val", fraction: float = 0.1, scores=None,
                 scale: float = 1.0):
        W, go = _widgets()
        self.scale = scale = check_scale(scale)
        from prunelab import mrp, structured, units

        self._units, self._structured = units, structured
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self._model = G.plain_copy(model).eval() if G.is_masked(model) else \
            copy.deepcopy(model).eval()
        self.sets = mrp.layer_sets(self._model)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for m in self._model.modules())
        default = list(units.BASE_SCORES) + ["mp-l1", "mp-l2", "lap-l1", "lap-l2", "hrank"] + (
            ["bn-scale"] if has_bn else [])
        options = default if scores is None else list(scores)
        valid = set(units.BASE_SCORES) | set(structured.names())
        for name in options:
            if name not in valid:
                raise ValueError(f"unknown score {name!r}; valid: {', '.join(sorted(valid))}")
        self.seed = seed
        self._score_batch = B.to_model(  # on the model's device and in its dtype
            bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=seed), model)
        split = bundle.split(eval_split)
        self._eval_batch = bundle.batch(eval_split, n=min(batch_size, len(split)), seed=seed)
        self.before = evaluate(self._model, self._eval_batch)
        self._stats: dict[str, object] = {}
        self._cache: dict[tuple[str, str], dict] = {}
        self.metrics: dict = {}
        self.errors: list[str] = []

        style = {"description_width": "initial"}
        fits = dict(max_width="100%")
        self.layer_set = W.Dropdown(options=list(self.sets), value="all", description="layers",
                                    style=style, layout=W.Layout(width=_px(260, scale), **fits))
        self.score = W.Dropdown(options=options,
                                value="abs_mrs" if "abs_mrs" in options else options[0],
                                description="score", style=style,
                                layout=W.Layout(width=_px(260, scale), **fits))
        self.fraction = W.FloatSlider(value=fraction, min=0.01, max=0.9, step=0.01,
                                      readout_format=".2f", description="fraction of units",
                                      continuous_update=False, style=style,
                                      layout=W.Layout(width=_px(380, scale), flex="0 1 auto",
                                                      **fits))
        self.mean_replacement = W.Checkbox(value=True, description="show bp_ (mean replacement)",
                                           indent=False, layout=W.Layout(width="auto", **fits))
        self.readout = W.HTML(layout=W.Layout(width="auto", max_width="100%"))
        self.readout.add_class("prunelab-readout")
        self._go = go
        self.penalty_fig = unit_penalty_figure(go, scale=scale)
        self.scores_fig = unit_scores_figure(go, [], [], [], "units by score", scale=scale)
        for w in (self.layer_set, self.score, self.fraction, self.mean_replacement):
            w.observe(lambda change: self._refresh(), names="value")
        self._scores_box = _figure_box(W, self.scores_fig, scale)
        self._figures = _row(W, [_figure_box(W, self.penalty_fig, scale), self._scores_box],
                             align_items="flex-start")
        css_class, theme = _theme(W, scale)
        self.widget = W.VBox([theme, _row(W, [self.layer_set, self.score]),
                              _row(W, [self.fraction, self.mean_replacement]),
                              self.readout, self._figures, _fit_widget()],
                             layout=W.Layout(width="100%", max_width="100%"))
        for cls in ("prunelab-unit-explorer", "prunelab-root", css_class):
            self.widget.add_class(cls)
        self._refresh()

    def _repr_mimebundle_(self, **kwargs):
        for fig in (self.penalty_fig, self.scores_fig):
            _sync_figure(fig, layout=True)
        return self.widget._repr_mimebundle_(**kwargs)

    def _layer_stats(self, name: str):
        if name not in self._stats:
            u = self._units
            chosen = u.layer_units(self._model, self.sets[name])
            self._stats[name] = u.unit_statistics(self._model, chosen, self._score_batch,
                                                  torch.nn.functional.cross_entropy, True)
        return self._stats[name]

    def _scores(self, layer_set: str, score: str) -> dict:
        key = (layer_set, score)
        if key not in self._cache:
            layers = self.sets[layer_set]
            if score in self._units.BASE_SCORES:
                stats = self._layer_stats(layer_set)
                chosen = self._units.layer_units(self._model, layers)
                self._cache[key] = self._units.score_units(self._model, chosen, score, stats,
                                                           self.seed)
            else:
                self._cache[key] = self._structured.score(self._model, score, layers=layers,
                                                          batch=self._score_batch,
                                                          seed=self.seed)
        return self._cache[key]

    def prune(self, mean_replacement: bool):
        """The current setting's :class:`prunelab.units.UnitPruneResult`."""
        name, score = self.layer_set.value, self.score.value
        return self._units.prune(self._model, fraction=self.fraction.value,
                                 score=("bp_" if mean_replacement else "") + score,
                                 layers=self.sets[name],
                                 unit_scores=self._scores(name, score),
                                 mean_replacement=mean_replacement,
                                 stats=self._layer_stats(name))

    def _refresh(self) -> None:
        try:
            results = {bp: self.prune(bp) for bp in ((False, True) if self.mean_replacement.value
                                                     else (False,))}
        except ValueError as err:
            self.errors.append(str(err))
            self.readout.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return
        after = {bp: evaluate(r.model, self._eval_batch) for bp, r in results.items()}
        res = results[False]
        pruned = sum(len(v) for v in res.pruned.values())
        total = sum(res.sizes.values())
        m = {"layer_set": self.layer_set.value, "score": self.score.value,
             "fraction": self.fraction.value, "pruned": pruned, "units": total,
             "loss": self.before["loss"], "accuracy": self.before["accuracy"],
             "penalty": after[False]["loss"] - self.before["loss"],
             "accuracy_pruned": after[False]["accuracy"]}
        if True in after:
            m.update(penalty_bp=after[True]["loss"] - self.before["loss"],
                     accuracy_bp=after[True]["accuracy"])
        self.metrics = m
        text = (f"pruned {pruned}/{total} units · loss {m['loss']:.3f} · accuracy "
                f"{m['accuracy']:.3f} → removed: penalty {m['penalty']:+.3f}, accuracy "
                f"{m['accuracy_pruned']:.3f}")
        if "penalty_bp" in m:
            text += (f" · mean replaced: penalty {m['penalty_bp']:+.3f}, accuracy "
                     f"{m['accuracy_bp']:.3f}")
        self.readout.value = html.escape(text)
        self.penalty_fig.plotly_restyle(
            {"y": [[m["penalty"], m.get("penalty_bp", float("nan"))]]}, trace_indexes=0)
        _sync_figure(self.penalty_fig)
        first = next(iter(res.scores))
        scores = res.scores[first]
        order = torch.argsort(scores, stable=True).tolist()
        dropped = set(res.pruned[first])
        # A new figure per move: in Voilà (plotly 6 anywidget frontend) restyle/update deltas of
        # this trace's x, y, customdata and marker.color were dropped or redrawn from the first
        # state when moves came quickly (tests/test_browser_units.py); a fresh widget carries
        # its whole state. Costs ~20 ms, small beside the two evaluations of a move.
        self.scores_fig = unit_scores_figure(
            self._go, order, [float(scores[i]) for i in order],
            ["#E45756" if i in dropped else "#9ecae9" for i in order], f"{first}: units by score",
            scale=self.scale)
        if hasattr(self, "_scores_box"):
            self._scores_box.children = (self.scores_fig,)
