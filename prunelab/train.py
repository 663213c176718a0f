"""Training, fine-tuning and evaluation loops. They know nothing about pruning.

Masks attached by :mod:`prunelab.masks` hold pruned weights at exactly zero by themselves (their
gradients are zeroed by a hook, or the forward multiplies by the mask under ``parametrize``), so
these loops need no special case for them. The recipes follow the papers' appendices: Adam without
weight decay for the LAP paper (Park et al. 2020, App. A); SGD with momentum 0.9, weight decay
5e-4, step schedules and early stopping on validation for the LM paper (App. B).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import results as R
from prunelab.results import Summary

__all__ = ["Recipe", "OPTIMIZERS", "Batch", "evaluate", "make_optimizer", "FitResult", "fit",
           "finetune", "ON_INTERRUPT", "check_on_interrupt"]


def __dir__():
    return sorted(__all__)


Batch = tuple[Tensor, Tensor]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """How to train: optimiser, schedule, stopping rule. Plain data, stored in the zoo manifest.

    Attributes:
        optimizer: "adam" or "sgd" (SGD uses ``momentum``).
        lr: learning rate.
        epochs: number of passes over the train split (an upper bound with early stopping).
        batch_size: mini-batch size.
        momentum: SGD momentum.
        weight_decay: L2 penalty coefficient passed to the optimiser.
        milestones: epochs after which the learning rate is multiplied by ``gamma``.
        gamma: learning-rate factor at each milestone.
        patience: early stopping: stop after this many epochs without a better validation loss
            and restore the best weights; ``None`` trains all epochs and keeps the last weights.
        max_steps: optional cap on optimiser steps (the LAP paper counts steps, not epochs).
        device: where to train (e.g. ``"cuda"``); ``None`` trains where the model's parameters
            are. Data is moved there per mini-batch.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 100
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    patience: int | None = None
    max_steps: int | None = None
    device: str | None = None

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("lr", "batch_size", "epochs"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience!r}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must be None or a torch device name such as 'cpu' or "
                                 f"'cuda:0', got {self.device!r}") from err
            object.__setattr__(self, "device", str(self.device))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-friendly plain values (``device`` only when set, so manifests of
        recipes without one are unchanged)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        if d["device"] is None:
            del d["device"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of a full run on ``n_train`` examples: ``ceil(n_train / batch_size)``
        steps per epoch times ``epochs``, capped at ``max_steps`` (early stopping aside)."""
        steps = math.ceil(n_train / self.batch_size) * self.epochs
        return min(steps, self.max_steps) if self.max_steps is not None else steps


def as_tensors(data, what: str = "data") -> Batch:
    """(x, y) from (x, y) tensors, a Dataset or a DataLoader (see :func:`prunelab.batches.as_batch`)."""
    return B.as_batch(data, what=what)


_tensors = as_tensors  # within this module


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 1000, loss="cross_entropy",
             output=None) -> dict[str, float]:
    """Mean loss, accuracy and error of ``model`` on ``data``.

    Args:
        model: any model (see :mod:`prunelab.batches` for inputs and outputs); evaluated in eval
            mode, every module's own training flag restored afterwards. Runs on the device and in
            the dtype of its parameters; data is moved there per batch.
        data: (x, y) tensors, a Dataset or a DataLoader.
        batch_size: examples per forward pass.
        loss: ``"cross_entropy"`` (default), ``"mse"`` or a callable ``(output, target) -> mean``.
        output: optional ``model output -> tensor``.

    Returns:
        ``{"loss": float, "accuracy": float, "error": float, "n": int}`` as a
        :class:`prunelab.results.Summary` (a dict that renders in Jupyter); accuracy and error are
        NaN for a loss that does not classify. Per-token cross-entropy averages over the tokens
        that are not ignored and counts accuracy per token.
    """
    obj = B.objective(loss, output)
    x, y = _tensors(data)
    total, correct, units, counted = 0.0, 0, 0, 0
    with B.evaluating(model):
        for i, (xb, yb) in enumerate(B.chunks(x, y, batch_size)):
            xb, yb = B.to_model(xb, model), B.to_model(yb, model)
            out = obj.forward(model, xb) if i else obj.first_forward(model, xb)
            obj.check(out, yb)
            total += float(obj.value(out, yb, reduction="sum"))
            units += obj.units(out, yb)
            hit, cnt = obj.correct(out, yb)
            correct += hit
            counted += cnt
    acc = correct / counted if counted else math.nan
    return Summary({"loss": total / max(units, 1), "accuracy": acc, "error": 1.0 - acc,
                    "n": len(y)}, title="Evaluation")


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm  # notebook-aware bar in Jupyter, plain text elsewhere

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=1.0)


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (the one passed in) and a tidy history."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    stopped_early: bool = False
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    def _fields(self) -> dict:
        h = self.history
        out = {"epochs": len(h), "steps": int(h["step"].iloc[-1]) if len(h) else 0}
        if len(h):
            out["train_loss"] = R.text(f"{R.fmt(h['train_loss'].iloc[0])} → "
                                       f"{R.fmt(h['train_loss'].iloc[-1])}")
            if "val_accuracy" in h:
                best = h.loc[h["epoch"] == self.best_epoch, "val_accuracy"]
                out["val_accuracy"] = float(best.iloc[0] if len(best)
                                            else h["val_accuracy"].iloc[-1])
        out.update(best_epoch=self.best_epoch, stopped_early=self.stopped_early,
                   interrupted=self.interrupted)
        return out

    def __repr__(self) -> str:
        return R.short_repr("FitResult", self._fields())

    def _repr_html_(self) -> str:
        return R.html_summary("FitResult", self._fields(), self.history, "history (per epoch)")


ON_INTERRUPT = ("raise", "return")


def check_on_interrupt(on_interrupt) -> None:
    """Refuse an ``on_interrupt`` other than ``"raise"`` or ``"return"``."""
    if on_interrupt not in ON_INTERRUPT:
        raise ValueError(f"on_interrupt must be one of {list(ON_INTERRUPT)}, got {on_interrupt!r}")


def _keep_best(model: nn.Module, best_state) -> bool:
    """Load the early-stopping best weights into ``model``; False when there are none."""
    if best_state is None:
        return False
    model.load_state_dict(best_state)
    return True


def fit(model: nn.Module, train, *, recipe: Recipe, val=None, seed: int = 0,
        progress: bool = True, step_callback: Callable[[nn.Module, int], None] | None = None,
        desc: str = "train",
        regularizer: Callable[[nn.Module], Tensor] | None = None, loss="cross_entropy",
        output=None, on_interrupt: str = "raise") -> FitResult:
    """Train ``model`` in place with ``recipe``; one history row per epoch.

    Deterministic on the CPU for a given ``seed``: the shuffling order comes from a generator
    seeded with it, and the global RNG is not touched. A Jupyter Interrupt (KeyboardInterrupt)
    stops training cleanly: the weights reached so far (or the best ones, with early stopping)
    stay in the model (in eval mode), then the interrupt propagates to the caller, unless
    ``on_interrupt="return"``, which returns the :class:`FitResult` with ``interrupted`` set.

    Args:
        model: the network; trained in place (copy it first to keep the original).
        train: (x, y) tensors or a Dataset to train on.
        recipe: optimiser and schedule.
        val: optional (x, y) or Dataset for per-epoch validation and early stopping.
        seed: seed of the data order.
        progress: show a progress bar over optimiser steps.
        step_callback: called as ``fn(model, step)`` after every optimiser step.
        desc: progress bar label.
        regularizer: optional ``fn(model) -> scalar tensor`` added to every mini-batch loss
            before ``backward`` (e.g. ``λ·R_s(γ)`` of the polarization regularizer,
            :func:`prunelab.structured.polarization_regularizer`); called in train mode after
            the forward pass. The recipe's ``weight_decay`` still acts in the optimiser.
        loss, output: the loss (``"cross_entropy"``, ``"mse"`` or a callable) and output rule
            (:mod:`prunelab.batches`).
        on_interrupt: ``"raise"`` (default: re-raise KeyboardInterrupt after the clean-up) or
            ``"return"`` (return what was reached, ``interrupted=True``).

    Returns:
        :class:`FitResult` with columns epoch, step, lr, train_loss, train_accuracy, val_loss,
        val_accuracy, seconds. ``train_loss`` is always the data (cross-entropy) loss alone, so
        runs with and without a regularizer compare; with a regularizer a column
        ``train_regularizer`` (its mean over the epoch's steps) follows ``train_accuracy``.
        Without one, training and history are exactly as before the option existed.
    """
    check_on_interrupt(on_interrupt)
    obj = B.objective(loss, output)
    x, y = _tensors(train, "train")
    n = len(y)
    if val is not None:
        val = _tensors(val, "val")
    if recipe.device is not None:
        model.to(recipe.device)
    if recipe.patience is not None and val is None:
        raise ValueError("early stopping (recipe.patience) needs a validation set: pass val=")
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(recipe.milestones), recipe.gamma)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    rows, step, best, best_state, best_epoch, bad_epochs = [], 0, math.inf, None, 0, 0
    stopped_early = interrupted = False
    bar = _progress(total_steps, desc, progress)
    t0 = time.perf_counter()
    try:
        model.train()
        for epoch in range(1, recipe.epochs + 1):
            order = torch.randperm(n, generator=gen)
            run_loss, run_correct, seen, run_reg, steps, run_counted = 0.0, 0, 0, 0.0, 0, 0
            for i in range(0, n, recipe.batch_size):
                if step >= total_steps:
                    break
                idx = order[i:i + recipe.batch_size]
                xb, yb = B.to_model(B.take(x, idx), model), B.to_model(y[idx], model)
                opt.zero_grad(set_to_none=True)
                out = obj.forward(model, xb)
                if step == 0:
                    obj.check(out, yb)
                loss = obj.value(out, yb)
                if regularizer is None:
                    loss.backward()
                else:
                    reg = regularizer(model)
                    if not (isinstance(reg, Tensor) and reg.numel() == 1):
                        raise ValueError(f"regularizer must return a scalar tensor, got "
                                         f"{type(reg).__name__} {getattr(reg, 'shape', '')}")
                    (loss + reg.reshape(())).backward()
                    run_reg += reg.item()
                opt.step()
                step += 1
                if step_callback is not None:
                    step_callback(model, step)
                run_loss += loss.item() * len(yb)
                hit, cnt = obj.correct(out.detach(), yb)
                run_correct += hit
                run_counted += cnt
                seen += len(yb)
                steps += 1
                bar.update(1)
            sched.step()
            row = {"epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"],
                   "train_loss": run_loss / max(seen, 1),
                   "train_accuracy": run_correct / max(run_counted, 1) if obj.classifies else math.nan}
            if regularizer is not None:
                row["train_regularizer"] = run_reg / max(steps, 1)
            if val is not None:
                ev = evaluate(model, val, loss=obj)
                row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
                model.train()
                if ev["loss"] < best:
                    best, best_epoch, bad_epochs = ev["loss"], epoch, 0
                    if recipe.patience is not None:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                            val=f"{row.get('val_accuracy', float('nan')):.3f}")
            if recipe.patience is not None and bad_epochs >= recipe.patience:
                stopped_early = True
                break
            if step >= total_steps:
                break
    except KeyboardInterrupt:
        interrupted = True
        if on_interrupt == "raise":
            _keep_best(model, best_state)
            raise
    finally:
        bar.close()
        model.eval()
    if not _keep_best(model, best_state):
        best_epoch = rows[-1]["epoch"] if rows else 0
    return FitResult(model, pd.DataFrame(rows), best_epoch, stopped_early, interrupted)


def finetune(model: nn.Module, train, *, recipe: Recipe, val=None, seed: int = 0,
             progress: bool = True, inplace: bool = False, **kwargs) -> FitResult:
    """Fine-tune a (possibly pruned) model; a copy unless ``inplace=True``.

    Pruned weights stay exactly zero because the attached masks hold them there (see
    :mod:`prunelab.masks`: their gradients are zeroed after every backward pass).
    """
    target = model if inplace else copy.deepcopy(model)
    return fit(target, train, recipe=recipe, val=val, seed=seed, progress=progress,
               desc="fine-tune", **kwargs)
