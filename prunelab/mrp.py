"""The pruning-penalty study of Mean Replacement Pruning (MRP; ICLR 2019 submission, Sec. 4).

How much does pruning hurt while a network trains, and does mean replacement help? This module
measures that with the unit pruning of :mod:`prunelab.units` (the mechanism):

- :class:`PenaltyRecorder`: a ``train.fit`` step callback measuring the pruning penalty
  ``L(pruned) - L(dense)`` of every score of MRP Table 1 during training (Sec. 4.1-4.2), with
  the units each score selected (consistency, Fig. 7) and their squared activations (Fig. 6b).
- :func:`penalty_study`: trains a copy of a model with one recorder per layer set of MRP
  Table 2 (:func:`layer_sets`) and fraction.
- :func:`bp_pairs` (Figs. 3-4) and :func:`penalty_profile` (performance profiles, Sec. 4.3):
  tidy views of the recorded penalties.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab.graph import is_masked, layer_graph, plain_copy
from prunelab.units import (DATA_SCORES, SCORES, layer_units, objective_of, parse_score, prune,
                            unit_statistics)

__all__ = ["PenaltyRecorder", "PenaltyStudy", "penalty_study", "penalty_profile", "bp_pairs",
           "layer_sets", "MEASUREMENT_KEYS"]



def __dir__():
    return sorted(__all__)


def _loss(model: nn.Module, batch, objective) -> float:
    """Mean loss of ``model`` on ``batch`` in eval mode (every module's own flag restored);
    ``objective`` an Objective or a loss callable ``(output, y) -> mean``."""
    objective = objective_of(loss_fn=objective)
    x, y = B.to_model(batch[0], model), B.to_model(batch[1], model)
    with B.evaluating(model), torch.no_grad():
        return float(objective.value(objective.forward(model, x), y))


class PenaltyRecorder:
    """Pruning penalties of every score variant measured during training (MRP Sec. 4.1-4.2).

    Use as ``train.fit(..., step_callback=recorder)``. Every ``every`` optimiser steps it
    copies the training model (the model, its gradients and the optimiser are never touched and
    the global RNG state is restored), prunes the copy with each score of ``scores`` via
    :func:`prune` (``fraction`` of the units of each chosen layer at once, masked) and records
    the pruning penalty ``L(pruned) - L(dense)`` on the fixed ``batch`` (mean loss, eval mode).
    With ``finetune_steps = k > 0`` the pruned copy is then trained ``k`` plain-SGD steps on
    mini-batches of ``finetune_batch_size`` examples of ``batch`` (MRP Fig. 4: batch size 64,
    learning rate 1e-3; ``None`` = full batch), drawn with a generator seeded by ``seed`` and
    the step so every score sees the same mini-batches, in the mode the training model was in,
    with the masks re-applied after every step so pruned units stay removed; then
    ``penalty_ft = L(pruned, fine-tuned) - L(dense)`` is recorded too (MRP Sec. 4.2; the dense
    model is *not* fine-tuned), else ``penalty_ft`` is NaN. (MRP fine-tunes on training
    batches; here the mini-batches come from the fixed sample, which keeps the measurement
    independent of the training data order.)

    For MRP Fig. 6b the mean squared activation ``E[a²]`` of every unit (over the sample and
    positions, as its consumer sees it) is kept per measurement: :meth:`activations`.

    ``rand`` draws from seed ``seed + step``, so it picks a fresh random set at each
    measurement (as MRP Fig. 7 requires); the other scores are deterministic.

    ``batch`` is ``(x, y)`` tensors, a Dataset or a DataLoader (read once); ``loss=`` /
    ``output=`` as in :func:`prunelab.units.prune` (``loss_fn=``, a callable, is the older name).

    Attributes:
        rows: The recorded rows (see :meth:`frame`).
        selected: score tag -> layer module name -> set of unit indices ever selected.
        history: ``(step, score, {layer: pruned indices})`` per measurement and score.
    """

    COLUMNS = ["step", "layers", "score", "base", "bp", "loss_dense", "loss_pruned", "penalty",
               "loss_ft", "penalty_ft", "pruned", "units"]

    def __init__(self, batch, *, every: int = 250, fraction: float = 0.1,
                 layers: Sequence[str] | str | None = None, scores: Sequence[str] | None = None,
                 finetune_steps: int = 0, finetune_lr: float = 0.01,
                 finetune_batch_size: int | None = 64, seed: int = 0,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 loss="cross_entropy", output=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) \
                or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}")
        if not (isinstance(finetune_lr, (int, float)) and finetune_lr > 0):
            raise ValueError(f"finetune_lr must be positive, got {finetune_lr!r}")
        if finetune_batch_size is not None and (
                isinstance(finetune_batch_size, bool) or not isinstance(finetune_batch_size, int)
                or finetune_batch_size < 1):
            raise ValueError("finetune_batch_size must be None or a positive int, got "
                             f"{finetune_batch_size!r}")
        scores = list(SCORES) if scores is None else ([scores] if isinstance(scores, str)
                                                      else list(dict.fromkeys(scores)))
        for s in scores:
            parse_score(s)
        if not scores:
            raise ValueError("scores must name at least one score tag")
        self.batch = B.as_batch(batch, what="batch")
        B.check_inputs(self.batch[0], "batch inputs")
        self.every = every
        self.fraction = float(fraction)
        self.layers = [layers] if isinstance(layers, str) else (
            None if layers is None else list(layers))
        self.scores = scores
        self.finetune_steps = finetune_steps
        self.finetune_lr = float(finetune_lr)
        self.finetune_batch_size = finetune_batch_size
        self.seed = int(seed)
        self.sq_activations: dict[int, dict[str, Tensor]] = {}
        self.objective = objective_of(loss, output, loss_fn)
        self.loss_fn = self.objective.loss if loss_fn is None else loss_fn
        self.rows: list[dict] = []
        self.selected: dict[str, dict[str, set[int]]] = {s: {} for s in scores}
        self.history: list[tuple[int, str, dict[str, list[int]]]] = []
        self.sizes: dict[str, int] = {}

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.measure(model, step)

    def _finetune(self, model: nn.Module, masks: dict[str, Tensor], train_mode: bool,
                  step: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.finetune_lr)
        targets = [(model.get_parameter(k), m) for k, m in masks.items()]
        model.train(train_mode)
        x, y = B.to_model(self.batch[0], model), B.to_model(self.batch[1], model)
        n, size = len(y), self.finetune_batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        for _ in range(self.finetune_steps):
            if size is None or size >= n:
                xb, yb = x, y
            else:
                idx = torch.randperm(n, generator=gen)[:size].to(y.device)
                xb, yb = B.take(x, idx), y[idx]
            opt.zero_grad(set_to_none=True)
            self.objective.value(self.objective.forward(model, xb), yb).backward()
            opt.step()
            with torch.no_grad():
                for p, m in targets:
                    p.mul_(m.to(p.dtype))

    def measure(self, model: nn.Module, step: int) -> list[dict]:
        """Measure now (whatever ``step`` is) and return the new rows."""
        dense = plain_copy(model) if is_masked(model) else copy.deepcopy(model)
        for p in dense.parameters():
            p.grad = None
        train_mode = model.training
        new = []
        with torch.random.fork_rng(devices=[]):
            loss_dense = _loss(dense, self.batch, self.objective)
            # one forward/backward for every score: the statistics only depend on the dense copy
            batch = (B.to_model(self.batch[0], dense), B.to_model(self.batch[1], dense))
            stats = unit_statistics(dense, layer_units(dense, self.layers,
                                                       B.take(batch[0], slice(0, 1))), batch,
                                    self.objective,
                                    any(parse_score(t)[0] in DATA_SCORES for t in self.scores))
            self.sq_activations[int(step)] = {
                name: (per[0][0].double() ** 2).mean(dim=(0, 2)).cpu()
                for name, per in stats.items()}
            for tag in self.scores:
                res = prune(dense, fraction=self.fraction, score=tag, layers=self.layers,
                            batch=batch, seed=self.seed + int(step), loss=self.objective,
                            stats=stats)
                loss_pruned = _loss(res.model, self.batch, self.objective)
                loss_ft = math.nan
                if self.finetune_steps > 0:
                    self._finetune(res.model, res.masks, train_mode, step)
                    loss_ft = _loss(res.model, self.batch, self.objective)
                self.sizes.update(res.sizes)
                chosen = self.selected.setdefault(tag, {})
                for name, idx in res.pruned.items():
                    chosen.setdefault(name, set()).update(idx)
                self.history.append((int(step), tag, {k: list(v) for k, v in res.pruned.items()}))
                base, bp = parse_score(tag)
                new.append({"step": int(step), "layers": ",".join(res.pruned), "score": tag,
                            "base": base, "bp": bp, "loss_dense": loss_dense,
                            "loss_pruned": loss_pruned, "penalty": loss_pruned - loss_dense,
                            "loss_ft": loss_ft, "penalty_ft": loss_ft - loss_dense,
                            "pruned": sum(len(v) for v in res.pruned.values()),
                            "units": sum(res.sizes.values())})
        self.rows.extend(new)
        return new

    def frame(self):
        """Tidy frame, one row per measurement and score: ``step, layers`` (the layer set,
        comma-joined module names), ``score`` (tag), ``base``, ``bp`` (mean replacement),
        ``loss_dense, loss_pruned, penalty`` (= loss_pruned - loss_dense), ``loss_ft,
        penalty_ft`` (NaN without fine-tuning), ``pruned`` (units pruned over the layer set) and
        ``units`` (units in the layer set)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.COLUMNS)

    def activations(self, *, selected_only: bool = True):
        """Mean squared activation of units per measurement (MRP Fig. 6b).

        Returns a tidy frame ``step, score, layer, unit, sq_activation`` with one row per unit
        each score selected (``selected_only``), or ``step, layer, unit, sq_activation`` for
        every unit of the chosen layers.
        """
        import pandas as pd

        if not selected_only:
            rows = [{"step": step, "layer": name, "unit": i, "sq_activation": float(v)}
                    for step, per in self.sq_activations.items()
                    for name, values in per.items() for i, v in enumerate(values.tolist())]
            return pd.DataFrame(rows, columns=["step", "layer", "unit", "sq_activation"])
        rows = [{"step": step, "score": tag, "layer": name, "unit": i,
                 "sq_activation": float(self.sq_activations[step][name][i])}
                for step, tag, picked in self.history for name, idx in picked.items()
                for i in idx]
        return pd.DataFrame(rows, columns=["step", "score", "layer", "unit", "sq_activation"])

    def consistency(self, *, since: int = 0, by_layer: bool = False):
        """Accumulated fraction of units ever selected per score (MRP Fig. 7).

        Args:
            since: Ignore measurements before this step (MRP Fig. 7b uses 10k).
            by_layer: One fraction per layer (extra ``layer`` column) instead of one over the
                whole layer set (units ever selected / units in the set).

        Returns:
            Tidy frame ``step, score, fraction_ever_selected`` (plus ``layer``); non-decreasing
            in ``step`` for each score (and layer), in [0, 1].
        """
        import pandas as pd

        seen: dict[str, dict[str, set[int]]] = {}
        rows = []
        for step, tag, picked in self.history:
            if step < since:
                continue
            acc = seen.setdefault(tag, {})
            for name, idx in picked.items():
                acc.setdefault(name, set()).update(idx)
            if by_layer:
                rows += [{"step": step, "score": tag, "layer": name,
                          "fraction_ever_selected": len(acc.get(name, ())) / self.sizes[name]}
                         for name in picked]
            else:
                total = sum(self.sizes[name] for name in picked)
                rows.append({"step": step, "score": tag, "fraction_ever_selected":
                             sum(len(acc.get(name, ())) for name in picked) / total})
        cols = ["step", "score"] + (["layer"] if by_layer else []) + ["fraction_ever_selected"]
        return pd.DataFrame(rows, columns=cols)


#: Columns that identify one measurement in a recorder or study frame (those present are used).
MEASUREMENT_KEYS = ("seed", "layer_set", "fraction", "step", "layers")


def _keys(frame) -> list[str]:
    return [c for c in MEASUREMENT_KEYS if c in frame.columns]


def penalty_profile(frame, *, value: str = "penalty", taus: Iterable[float] | None = None,
                    missing: str = "raise"):
    """Performance profile (MRP Sec. 4.3) of the scores in a :meth:`PenaltyRecorder.frame`
    or a :func:`penalty_study` frame.

    Method = score tag, value = ``value`` (``"penalty"`` or ``"penalty_ft"``), measurement =
    the columns of :data:`MEASUREMENT_KEYS` present (e.g. ``(seed, layer_set, fraction, step,
    layers)``). Returns :func:`prunelab.metrics.performance_profile`'s tidy frame
    ``method, tau, fraction`` (one curve per tag).
    """
    from prunelab import metrics

    return metrics.performance_profile(frame, method="score", value=value, by=_keys(frame),
                                       taus=taus, missing=missing)


def bp_pairs(frame, *, value: str = "penalty"):
    """Penalty without vs with mean replacement for every measurement (MRP Figs. 3-4).

    Pairs each base score's row with its ``bp_`` row of the same measurement. Returns a tidy
    frame with the measurement keys, ``base``, ``without``, ``with`` and ``below``
    (``with < without``: the point lies under the line y = x, bias propagation helped).
    """
    import pandas as pd

    missing = {"base", "bp", value} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks column(s) {sorted(missing)}; pass a PenaltyRecorder or "
                         "penalty_study frame")
    keys = _keys(frame) + ["base"]
    wide = frame.pivot_table(index=keys, columns="bp", values=value, aggfunc="first")
    wide = wide.rename(columns={False: "without", True: "with"}).dropna().reset_index()
    wide.columns.name = None
    if "without" not in wide or "with" not in wide:
        return pd.DataFrame(columns=keys + ["without", "with", "below"])
    wide["below"] = wide["with"] < wide["without"]
    return wide


def layer_sets(model: nn.Module) -> dict[str, list[str]]:
    """The layer sets of MRP Table 2 that exist in ``model``: ``all`` (every prunable layer
    but the last), ``firstconv``, ``midconv`` (the middle one of the convs), ``lastconv`` and
    ``firstdense`` (the first Linear layer whose units can be pruned)."""
    return _table2_sets(model)


def _table2_sets(model: nn.Module) -> dict[str, list[str]]:
    # the body of layer_sets, callable where penalty_study's keyword shadows that name
    graph = layer_graph(model)
    chosen = [graph[w].module for w in graph.names[:-1]]
    convs = [m for m in chosen
             if isinstance(model.get_submodule(m), (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    dense = [m for m in chosen if isinstance(model.get_submodule(m), nn.Linear)]
    sets = {"all": chosen}
    if convs:
        sets.update(firstconv=[convs[0]], midconv=[convs[len(convs) // 2]],
                    lastconv=[convs[-1]])
    if dense:
        sets["firstdense"] = [dense[0]]
    return sets


@dataclass
class PenaltyStudy:
    """What :func:`penalty_study` measured.

    Attributes:
        frame: Tidy penalties: the recorder columns plus ``seed, layer_set, fraction``.
        recorders: ``(layer_set, fraction)`` -> the :class:`PenaltyRecorder` that measured it.
        model: The trained model.
        history: The training history (:class:`prunelab.train.FitResult`).
    """

    frame: object
    recorders: dict
    model: nn.Module
    history: object

    def consistency(self, layer_set: str, fraction: float, **kwargs):
        """:meth:`PenaltyRecorder.consistency` of one recorder (MRP Fig. 7)."""
        return self.recorders[(layer_set, float(fraction))].consistency(**kwargs)

    def activations(self, layer_set: str, fraction: float, **kwargs):
        """:meth:`PenaltyRecorder.activations` of one recorder (MRP Fig. 6b)."""
        return self.recorders[(layer_set, float(fraction))].activations(**kwargs)


def penalty_study(model: nn.Module, bundle, *, recipe, layer_sets: Sequence[str] | None = None,
                  fractions: Sequence[float] = (0.1,), every: int = 250, sample: int = 1000,
                  scores: Sequence[str] | None = None, finetune_steps: int = 0,
                  finetune_lr: float = 1e-3, seed: int = 0, progress: bool = False,
                  on_interrupt: str = "raise") -> PenaltyStudy:
    """Train a copy of ``model`` and measure the pruning penalty of every score during training
    (MRP Sec. 4 and App. 6.2): every ``every`` steps, for each layer set of MRP Table 2 and each
    fraction, each score prunes a copy and ``L(pruned) - L(dense)`` is measured on a fixed
    sample of ``sample`` training examples (drawn with ``seed``, as MRP's fixed validation
    subset of the training set).

    Args:
        model: The network to train (not modified; a copy is trained).
        bundle: Data bundle; training uses ``bundle.train``.
        recipe: Training recipe (:class:`prunelab.train.Recipe`).
        layer_sets: Names from :func:`layer_sets` (default: all that exist in the model).
        fractions: Fractions of units pruned per layer.
        every, scores, finetune_steps, finetune_lr: As :class:`PenaltyRecorder`.
        seed: Seed of the data order, the fixed sample and ``rand``.
        progress: Progress bar over training steps.
        on_interrupt: "raise" (default) or "return" (see Returns).

    Returns:
        :class:`PenaltyStudy`. An interrupt (Jupyter's Interrupt) stops training and propagates
        (``on_interrupt="raise"``); with ``on_interrupt="return"`` the measurements taken so far
        are returned instead.
    """
    import pandas as pd

    from prunelab.train import fit

    available = _table2_sets(model)
    wanted = list(available) if layer_sets is None else list(dict.fromkeys(layer_sets))
    for name in wanted:
        if name not in available:
            raise ValueError(f"unknown layer set {name!r} for this model; available: "
                             f"{', '.join(available)}")
    fractions = [float(f) for f in fractions]
    if not fractions:
        raise ValueError("fractions must name at least one fraction")
    sample_batch = bundle.batch("train", n=sample, seed=seed)
    recorders = {(name, f): PenaltyRecorder(sample_batch, every=every, fraction=f,
                                            layers=available[name], scores=scores,
                                            finetune_steps=finetune_steps,
                                            finetune_lr=finetune_lr, seed=seed)
                 for name in wanted for f in fractions}

    def callback(m, step):
        for rec in recorders.values():
            rec(m, step)

    trained = copy.deepcopy(model)
    history = fit(trained, bundle.train, recipe=recipe, seed=seed, progress=progress,
                  step_callback=callback, desc="train + penalties", on_interrupt=on_interrupt)
    frames = [rec.frame().assign(seed=seed, layer_set=name, fraction=f)
              for (name, f), rec in recorders.items()]
    frame = pd.concat(frames, ignore_index=True)
    front = ["seed", "layer_set", "fraction"]
    frame = frame[front + [c for c in frame.columns if c not in front]]
    return PenaltyStudy(frame, recorders, trained, history)
