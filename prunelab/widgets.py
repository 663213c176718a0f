"""Interactive pruning in a notebook: ipywidgets controls wired to the library's calls.

:class:`PruningExplorer` (weights) and :class:`UnitExplorer` (whole units, MRP) are returned,
never displayed (put one last in a cell or call ``display``). Everything they show comes from
:class:`prunelab.explore.Pruner` (masks at any sparsity, one-shot or staged),
:mod:`prunelab.units` / :mod:`prunelab.structured` and :func:`prunelab.train.evaluate`; this
module only wires them to controls and two plotly ``FigureWidget``\\ s updated in place.

ipywidgets, plotly and anywidget are optional dependencies (the ``notebooks`` extra): they are
imported when a widget is built, so ``import prunelab`` stays light.

Over 500 lines because it holds two explorers; each is widget wiring only (the pruning
engine is :mod:`prunelab.explore`).
"""
from __future__ import annotations

import copy
import html
import math
import threading
import time
from collections import OrderedDict

import torch
from torch import nn

from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.explore import NeedsRun, Pruner, one_shot_scores
from prunelab.pruning import SCHEDULES
from prunelab.train import evaluate

__all__ = ["PruningExplorer", "UnitExplorer", "layer_density_figure",
           "stage_trajectory_figure", "unit_penalty_figure", "unit_scores_figure"]

LOG_LIMIT = 1000  # entries kept in ``PruningExplorer.log``


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
_MARGIN = dict(l=55, r=15, t=45, b=45)


def layer_density_figure(go, labels: list[str], numels: list[int]):
    """Bars of the fraction of weights kept per layer (all 1 until the first update)."""
    return go.FigureWidget(
        data=[go.Bar(x=labels, y=[1.0] * len(labels), name="density",
                     customdata=numels, marker_color="#4C78A8",
                     texttemplate="%{y:.3g}",
                     textposition="outside", cliponaxis=False,
                     hovertemplate="%{x}: %{customdata} weights<br>density %{y:.4g}"
                                   "<extra></extra>")],
        layout=dict(title=dict(text="fraction of weights kept per layer", font_size=14),
                    yaxis=dict(range=[0, 1.12], title="density"),
                    height=320, width=460, margin=_MARGIN, template="plotly_white"))


def stage_trajectory_figure(go):
    """An empty line of ΔL per stage, filled by a staged run (customdata: the sparsity)."""
    return go.FigureWidget(
        data=[go.Scatter(x=[], y=[], mode="lines+markers", name="ΔL",
                         marker_color="#F58518",
                         hovertemplate="stage %{x}<br>ΔL %{y:.4g}<br>sparsity "
                                       "%{customdata:.4f}<extra></extra>")],
        layout=dict(title=dict(text="ΔL per stage", font_size=14),
                    annotations=[dict(text="no staged run yet:<br>set π > 1 and press Run",
                                      x=0.5, y=0.5, xref="paper", yref="paper",
                                      showarrow=False, font=dict(size=13, color="#777"))],
                    xaxis=dict(title="stage", rangemode="tozero"),
                    yaxis=dict(title="ΔL on the pruning batch", rangemode="tozero"),
                    height=320, width=460, margin=_MARGIN, template="plotly_white"))


def unit_penalty_figure(go):
    """Two bars: the pruning penalty with the units removed and with them mean-replaced."""
    return go.FigureWidget(
        data=[go.Bar(x=["removed", "mean replaced"], y=[0.0, 0.0],
                     marker_color=["#E45756", "#4C78A8"], texttemplate="%{y:.3g}",
                     textposition="outside", cliponaxis=False,
                     hovertemplate="%{x}: penalty %{y:.4g}<extra></extra>")],
        layout=dict(title=dict(text="pruning penalty L(pruned) − L(dense)", font_size=14),
                    yaxis=dict(title="penalty"), height=320, width=420, margin=_MARGIN,
                    template="plotly_white"))


def unit_scores_figure(go, order: list, values: list, colors: list, xtitle: str):
    """Unit scores sorted ascending (``order``: the unit indices), pruned units in red."""
    return go.FigureWidget(
        data=[go.Bar(x=list(range(len(order))), y=values, customdata=order,
                     marker_color=colors,
                     hovertemplate="unit %{customdata}<br>score %{y:.4g}<extra></extra>")],
        layout=dict(title=dict(text="unit scores, sorted (red = pruned)", font_size=14),
                    xaxis=dict(title=xtitle), yaxis=dict(title="score"), height=320,
                    width=480, margin=_MARGIN, template="plotly_white"))


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
      pruned copy of the model is kept. Moving the sparsity slider writes the new masks into
      reused buffers (one comparison per weight: no sort, no allocation), multiplies them into
      the copy's weights and evaluates the fixed evaluation batch, so a move costs the
      evaluation plus a fixed ~1 ms of mask writing and widget traffic
      (``benchmarks/explorer.py``'s ``time_slider_move`` measures it; DESIGN.md's budget:
      within 1.3× of evaluating 1,000 examples).
    * **Staged** (π > 1, or a target-using criterion such as ``synflow`` or ``lap-forward``):
      moving a control only says what will run; the Run button calls :func:`prunelab.prune` with a
      callback that advances :attr:`progress`, extends the trajectory per stage and stops the run
      when Cancel was pressed. Inside a live kernel the run goes to a background thread, so the
      Cancel click can arrive while it works (Jupyter's Interrupt only reaches the main thread, so
      Cancel is the way to stop it); the controls are disabled meanwhile. Outside a kernel, and
      with ``run(block=True)``, it runs in the caller's thread.

    The model handed in is never modified: the explorer works on a deep copy taken when it is
    built (so later training of ``model`` does not invalidate its cached scores). Masks already
    attached to ``model`` stay pruned and bound the sparsity from below. Library errors (an
    invalid combination, a failing criterion) are shown in the readout; the widget stays live.

    Args:
        model: a trained classifier (e.g. from :func:`prunelab.zoo.load`).
        bundle: its :class:`prunelab.data.Bundle`.
        criteria: criterion names offered (default: every registered one).
        batch_size: examples of the scoring batch (``bundle.batch("train", n, seed)``) and of the
            evaluation batch (``bundle.batch(eval_split, n, seed)``), each capped at the split's
            size.
        eval_split: split on which accuracy and loss are reported.
        seed: seed of both batches and of stochastic criteria.
        lam_values: λ positions of the λ slider (0 included: no penalty).
        stages_values: π positions of the stages slider.
        density: initial fraction of weights remaining (rounded to the slider's grid, steps of
            0.01 in log10).
        min_density: left end of the (log) density slider.
        cache_size: rankings (and score sets) kept; each holds one int64 per prunable weight.

    Attributes used by tests and notebooks:
        widget: the ``ipywidgets.VBox`` shown (CSS class ``prunelab-explorer``).
        criterion, scope, schedule, density, lam, stages: the controls (``density`` is the
            fraction of weights remaining, sparsity = 1 − density).
        readout: HTML with e.g. ``sparsity 0.900 · accuracy 0.648 → 0.512 · loss 0.96 → 1.40 ·
            ΔL 0.44`` (CSS class ``prunelab-readout``).
        metrics: the readout's numbers as a dict (also ``mode``, ``error``, ``interrupted``).
        layers_fig, trajectory_fig: ``plotly.graph_objects.FigureWidget``.
        progress, run_button, cancel_button: staged runs.
        log: Python-side list of events (dicts), newest last; capped at 1,000 entries.
        result: the last staged run's :class:`prunelab.pruning.PruneResult`.
        stats: counts of scores and rankings computed and of cache hits.
    """

    def __init__(self, model: nn.Module, bundle, *, criteria=None, batch_size: int = 1000,
                 eval_split: str = "val", seed: int = 0,
                 lam_values=(0, 1e-4, 1e-3, 1e-2, 1e-1, 1, 10),
                 stages_values=(1, 2, 5, 14, 50, 140), density: float = 0.3,
                 min_density: float = 1e-3, cache_size: int = 16):
        W, go = _widgets()
        names = list(C.names()) if criteria is None else list(criteria)
        if not names:
            raise ValueError("criteria must name at least one criterion")
        for n in names:
            C.spec(n)  # ValueError listing the valid names
        lam_values = [C.check_lam(v) for v in lam_values]
        stages_values = [int(v) for v in stages_values]
        if not stages_values or min(stages_values) < 1:
            raise ValueError(f"stages_values must be integers >= 1, got {stages_values!r}")
        if not 0 < min_density < 1:
            raise ValueError(f"min_density must be in (0, 1), got {min_density!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

        self.seed = seed
        self._model = copy.deepcopy(model).eval()
        self._names = G.prunable_names(self._model)
        if not self._names:
            raise ValueError("the model has no prunable weights (Linear/Conv)")
        self._previous = M.current(self._model) or None
        self._base_sparsity = M.sparsity(self._previous) if self._previous else 0.0
        self._score_batch = bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=seed)
        split = bundle.split(eval_split)
        self.eval_split = eval_split
        self._eval_batch = bundle.batch(eval_split, n=min(batch_size, len(split)), seed=seed)
        self.before = evaluate(self._model, self._eval_batch)

        # One pruned copy, plain (no parametrization: torch.nn.utils.parametrize re-multiplies
        # the mask in Python on every forward, ~25 % of a 500-example evaluation of the MLP).
        # A move writes the masks into ``_buffers`` and ``dense * mask`` into its weights.
        self._pruned = G.plain_copy(self._model).eval()
        for p in self._pruned.parameters():
            p.requires_grad_(False)
        self._dense = {n: G.weight(self._pruned, n).detach().clone() for n in self._names}
        self._weights = {n: G.weight(self._pruned, n) for n in self._names}
        self._buffers = {n: (self._previous[n].clone() if self._previous and n in self._previous
                             else torch.ones_like(w, dtype=torch.bool))
                         for n, w in self._dense.items()}
        self._numels = [b.numel() for b in self._buffers.values()]

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

        # ---- controls
        style = {"description_width": "initial"}
        self.criterion = W.Dropdown(options=names, value="mp" if "mp" in names else names[0],
                                    description="criterion", style=style)
        self.scope = W.ToggleButtons(options=list(M.SCOPES), value="global", description="scope",
                                     style={"button_width": "105px", **style})
        self.schedule = W.ToggleButtons(options=list(SCHEDULES), value="exponential",
                                        description="schedule",
                                        style={"button_width": "105px", **style})
        hi, lo, step = math.log10(1.0 - self._base_sparsity), math.log10(min_density), 0.01
        # on the slider's grid, else the browser snaps it on first render and the numbers jump
        start = math.log10(min(max(density, min_density), 1.0 - self._base_sparsity))
        start = min(lo + round((start - lo) / step) * step, hi)
        self.density = W.FloatLogSlider(
            value=10 ** start, base=10, min=lo, max=hi, step=step, readout_format=".3g",
            description="fraction remaining",
            continuous_update=True, style=style, layout=W.Layout(width="420px"))
        self.density.add_class("prunelab-density")
        self.lam = W.SelectionSlider(options=[(_lam_label(v), v) for v in lam_values],
                                     value=lam_values[0], description="λ", style=style)
        self.stages = W.SelectionSlider(options=[(str(v), v) for v in stages_values],
                                        value=stages_values[0], description="stages π",
                                        style=style)
        self.run_button = W.Button(description="Run", icon="play", button_style="primary",
                                   tooltip="prune with these settings (all stages)")
        self.cancel_button = W.Button(description="Cancel", icon="stop", disabled=True,
                                      tooltip="stop the staged run after the current stage")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="stage 0/1",
                                      style=style)
        self.readout = W.HTML()
        self.readout.add_class("prunelab-readout")
        self._controls = [self.criterion, self.scope, self.schedule, self.density, self.lam,
                          self.stages, self.run_button]

        # ---- figures, built from the initial state (see _sync_figure)
        self.layers_fig = layer_density_figure(
            go, [n.removesuffix(".weight") for n in self._names], self._numels)
        self.trajectory_fig = stage_trajectory_figure(go)

        for w in (self.criterion, self.scope, self.schedule, self.lam, self.stages):
            w.observe(self._on_control, names="value")
        self.density.observe(self._on_control, names="value")
        self.run_button.on_click(lambda _: self.run())
        self.cancel_button.on_click(lambda _: self.cancel())

        self.widget = W.VBox([
            W.HBox([self.criterion, self.lam, self.stages]),
            W.HBox([self.scope, self.schedule]),
            W.HBox([self.density, self.run_button, self.cancel_button, self.progress]),
            self.readout,
            W.HBox([self.layers_fig, self.trajectory_fig]),
        ])
        self.widget.add_class("prunelab-explorer")
        self._refresh()  # initial state before anything is displayed

    # ------------------------------------------------------------------ public
    @property
    def sparsity(self) -> float:
        """Target sparsity of the controls: 1 − density (at least the model's own sparsity)."""
        return min(max(1.0 - float(self.density.value), self._base_sparsity), 1.0 - 1e-12)

    @property
    def one_shot(self) -> bool:
        """True when the controls select the cached fast path (π = 1, no target-using criterion)."""
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
        config = dict(criterion=self.criterion.value, sparsity=self.sparsity,
                      scope=self.scope.value, stages=self.stages.value,
                      schedule=self.schedule.value, lam=self.lam.value)
        self._cancel.clear()
        self._start_run(config)
        if block is None:
            block = not _in_kernel()
        if block:
            return self._run_job(config)
        self._thread = threading.Thread(target=self._run_job, args=(config,), daemon=True,
                                        name="prunelab-explorer-run")
        self._thread.start()
        return None

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
        scores = self._scores.hit((name, lam))
        if scores is None:
            self._set_note(f"scoring {html.escape(name)} on {len(self._score_batch[1])} "
                           "training examples …")
            t0 = time.perf_counter()
            try:
                scores = one_shot_scores(self._model, name, batch=self._score_batch, lam=lam,
                                         seed=self.seed, allow_update=False)
            except NeedsRun:
                # OBS-like: the kept weights move too, which masks alone cannot show.
                self._needs_run.add(name)
                raise
            self._scores.put((name, lam), scores)
            self.stats["scores"] += 1
            self._log(event="score", criterion=name, lam=lam,
                      seconds=time.perf_counter() - t0)
        pruner = Pruner(self._model, name, batch=self._score_batch, scope=scope, seed=self.seed,
                        lam=lam, scores=scores)
        ranking = pruner.ranking
        self.stats["rankings"] += 1
        self._rankings.put(key, pruner)
        return ranking

    def _on_control(self, change) -> None:
        if self.running:  # controls are disabled in the browser; ignore programmatic changes too
            return
        self._refresh()

    def _refresh(self) -> None:
        if self.one_shot:
            self._update_fast()
        else:
            self._show_pending()

    def _update_fast(self) -> None:
        name, scope, lam = self.criterion.value, self.scope.value, self.lam.value
        try:
            ranking = self._ranking(name, scope, lam)
            ranking.masks(self.sparsity, out=self._buffers)
            with torch.no_grad():
                for n, w in self._weights.items():
                    torch.mul(self._dense[n], self._buffers[n], out=w)
            after = evaluate(self._pruned, self._eval_batch)
        except NeedsRun:
            self._show_pending()
            return
        except Exception as err:  # noqa: BLE001 - shown to the user, the widget stays live
            self._show_error(err, name)
            return
        kept = [int(b.sum()) for b in self._buffers.values()]
        self._show(after, kept, mode="one-shot",
                   note=f"one-shot {name} · {scope} · λ={_lam_label(lam)} · scores cached · "
                        f"evaluated on {after['n']} {self.eval_split} examples")
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
            head = (f"sparsity {m['sparsity']:.3f} · accuracy {m['accuracy_before']:.3f} → "
                    f"{m['accuracy']:.3f} · loss {m['loss_before']:.3f} → {m['loss']:.3f} · "
                    f"ΔL {m['delta_loss']:.3f}")
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
    def _start_run(self, config: dict) -> None:
        for w in self._controls:
            w.disabled = True
        self.cancel_button.disabled = False
        self.progress.max = config["stages"]
        self.progress.value = 0
        self.progress.bar_style = ""
        self.progress.description = f"stage 0/{config['stages']}"
        tr = self.trajectory_fig.data[0]
        with self.trajectory_fig.batch_update():
            tr.x, tr.y, tr.customdata = [], [], []
            self.trajectory_fig.layout.annotations = []
            self.trajectory_fig.layout.title.text = (
                f"ΔL per stage: {config['criterion']}, π={config['stages']}, "
                f"{config['schedule']}, λ={_lam_label(config['lam'])}")
        _sync_figure(self.trajectory_fig, layout=True)
        self._set_note(html.escape(f"running {config['criterion']} to sparsity "
                                   f"{config['sparsity']:.3f} in {config['stages']} stages …"))
        self._log(event="run", **config)

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

    def _run_job(self, config: dict):
        result = None
        try:
            pruner = Pruner(self._model, config["criterion"], batch=self._score_batch,
                            scope=config["scope"], seed=self.seed, lam=config["lam"])
            result = pruner.run(config["sparsity"], stages=config["stages"],
                                schedule=config["schedule"], callback=self._on_stage)
            after = evaluate(result.model, self._eval_batch)
            kept = [int(result.masks[n].sum()) for n in self._names]
            done = len(result.history)
            status = (f"cancelled after stage {done} of {config['stages']}" if result.interrupted
                      else f"{config['stages']} stage{'s' if config['stages'] > 1 else ''} done")
            self.result = result
            self._show(after, kept, mode="staged", interrupted=result.interrupted,
                       note=f"{status} · {config['criterion']} · {config['scope']} · "
                            f"{config['schedule']} · λ={_lam_label(config['lam'])} · "
                            f"evaluated on {after['n']} {self.eval_split} examples")
            self.progress.bar_style = "warning" if result.interrupted else "success"
            self._log(event="done", stages=done, interrupted=result.interrupted,
                      accuracy=after["accuracy"], sparsity=self.metrics["sparsity"])
        except Exception as err:  # noqa: BLE001 - shown to the user, the widget stays live
            self.progress.bar_style = "danger"
            self._show_error(err, config["criterion"])
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
    """

    def __init__(self, model: nn.Module, bundle, *, batch_size: int = 500, seed: int = 0,
                 eval_split: str = "val", fraction: float = 0.1, scores=None):
        W, go = _widgets()
        from prunelab import mrp, structured, units

        self._units, self._structured = units, structured
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        self._model = G.plain_copy(model).eval() if G.is_parametrized(model) else \
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
        self._score_batch = bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=seed)
        split = bundle.split(eval_split)
        self._eval_batch = bundle.batch(eval_split, n=min(batch_size, len(split)), seed=seed)
        self.before = evaluate(self._model, self._eval_batch)
        self._stats: dict[str, object] = {}
        self._cache: dict[tuple[str, str], dict] = {}
        self.metrics: dict = {}
        self.errors: list[str] = []

        style = {"description_width": "initial"}
        self.layer_set = W.Dropdown(options=list(self.sets), value="all", description="layers",
                                    style=style)
        self.score = W.Dropdown(options=options,
                                value="abs_mrs" if "abs_mrs" in options else options[0],
                                description="score", style=style)
        self.fraction = W.FloatSlider(value=fraction, min=0.01, max=0.9, step=0.01,
                                      readout_format=".2f", description="fraction of units",
                                      continuous_update=False, style=style,
                                      layout=W.Layout(width="380px"))
        self.mean_replacement = W.Checkbox(value=True, description="show bp_ (mean replacement)",
                                           indent=False)
        self.readout = W.HTML()
        self._go = go
        self.penalty_fig = unit_penalty_figure(go)
        self.scores_fig = unit_scores_figure(go, [], [], [], "units by score")
        for w in (self.layer_set, self.score, self.fraction, self.mean_replacement):
            w.observe(lambda change: self._refresh(), names="value")
        self.widget = W.VBox([W.HBox([self.layer_set, self.score]),
                              W.HBox([self.fraction, self.mean_replacement]),
                              self.readout])
        self._figures = W.HBox([self.penalty_fig, self.scores_fig])
        self.widget.children = (*self.widget.children, self._figures)
        self.widget.add_class("prunelab-unit-explorer")
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
            ["#E45756" if i in dropped else "#9ecae9" for i in order], f"{first}: units by score")
        if hasattr(self, "_figures"):
            self._figures.children = (self.penalty_fig, self.scores_fig)
