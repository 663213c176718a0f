"""Experiments: drive the whole pipeline and return tidy frames.

:func:`accuracy_curve` prunes one model at several sparsities. :class:`Sweep` runs the LM paper's
workflow (Algorithm 1 and Sec. 4 of *Revisiting Loss Modelling for Unstructured Pruning*) over a
grid: load the pretrained zoo model, prune it, measure ΔL(θ, Δθ) = |L(θ+Δθ) − L(θ)| on the pruning
batch and the train / val / test loss and error, fine-tune with the original training recipe
(App. B), measure again, and commit one row per run to a :class:`prunelab.store.Store`.

The grid takes your own models and data too: ``Sweep(arch={"mine": make_model},
dataset={"mine": bundle})`` maps a name to a callable ``seed -> pretrained model`` or to a bundle
(DESIGN.md "Round 2"); the name is what the config, the store key and the frame hold.
``loss="mse"`` sweeps regression models; ``device="cuda"`` prunes, fine-tunes and evaluates every
run there, and frames hold plain numbers whatever the device.

Runs execute inline, in local worker processes (``executor="local"``) or on a Dask cluster
(``executor="dask"`` or a ``dask.distributed.Client``; the machinery is :mod:`prunelab.executors`).
Workers only compute: the process that calls :meth:`Sweep.run` commits each result as it arrives,
so a cluster needs no shared database, and an interrupted or killed sweep resumes where it stopped
when run again. A run's pruning fields are validated once, as a
:class:`~prunelab.config.PruneConfig`, when the sweep (or :func:`run_one`) is built.

Over 500 lines because it is one idea, the LM paper's workflow: the grid's fields and
their validation, one run, and the driver that commits results are read together.
"""
from __future__ import annotations

import copy
import itertools
import json
import numbers
import os
import pickle
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from prunelab import data as D
from prunelab import executors as X
from prunelab import masks as M
from prunelab import models as models_
from prunelab import paths, zoo
from prunelab.metrics import loss as batch_loss
from prunelab import graph as G
from prunelab.config import PruneConfig, check_integer, check_recipe_fields, prunable_label
from prunelab.pruning import prune, prune_with
from prunelab.store import Store, canonical_json, config_key
from prunelab.train import Recipe, check_on_interrupt, evaluate, finetune as finetune_model

__all__ = ["accuracy_curve", "Sweep", "SweepError", "run_one", "normalize_config",
           "finetune_recipe", "check_device", "check_sweep_prunable", "prunable_of",
           "FIELDS", "DEFAULTS", "OPTIONAL", "MEASURED",
           "TIMINGS"]



def __dir__():
    return sorted(__all__)


def accuracy_curve(model: nn.Module, bundle, *, criteria: Sequence[str] = ("mp",),
                   sparsities: Iterable[float] = (0.5, 0.8, 0.9, 0.95, 0.98),
                   scope: str = "global", stages: int = 1, batch_size: int = 1000,
                   split: str = "test", seed: int = 0, loss="cross_entropy", output=None,
                   device: str | None = None, **prune_options) -> pd.DataFrame:
    """Accuracy of ``model`` pruned one-shot (or in ``stages``) at each sparsity, no fine-tuning.

    ``bundle``: a :class:`prunelab.data.Bundle` or any object with ``train``/``val``/``test``
    Datasets and ``batch(split, n, seed)``. ``loss``/``output`` (:mod:`prunelab.batches`) are
    used by the criteria and the evaluation; ``device``: where pruning and evaluation run
    (None: where the model is; the caller's model is never moved).

    Returns:
        One row per (criterion, sparsity): criterion, sparsity (actual), density, accuracy,
        loss, error, split, seconds; plus the dense model as sparsity 0 for each criterion.
        Accuracy and error are NaN for a loss that does not classify.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of ['train', 'val', 'test'], got {split!r}")
    device = check_device(device)
    data = getattr(bundle, split)
    x, y = bundle.batch("train", n=min(batch_size, len(bundle.train)), seed=seed)
    dense_model = model if device is None else copy.deepcopy(model).to(device)
    dense = evaluate(dense_model, data, loss=loss, output=output)
    rows = []
    for crit in criteria:
        rows.append({"criterion": crit, "sparsity": 0.0, "density": 1.0, **dense,
                     "split": split, "seconds": 0.0})
        for s in sparsities:
            t0 = time.perf_counter()
            r = prune(dense_model, crit, sparsity=s, scope=scope, stages=stages, batch=(x, y),
                      seed=seed, loss=loss, output=output, **prune_options)
            ev = evaluate(r.model, data, loss=loss, output=output)
            actual = float(M.sparsity(r.masks))
            rows.append({"criterion": crit, "sparsity": actual, "density": 1.0 - actual, **ev,
                         "split": split, "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows)


# ============================================================================ sweeps
# The grid's fields, in column order, with their defaults (the LM paper's MLP setting).
DEFAULTS: dict[str, Any] = {
    "arch": "mlp", "dataset": "mnist1d", "seed": 0, "criterion": "mp", "sparsity": 0.9,
    "stages": 1, "lam": 0.0, "schedule": "exponential", "scope": "global",
    "finetune": "recipe", "examples": 1000,
}
FIELDS: tuple[str, ...] = tuple(DEFAULTS)
#: Run settings held in a config (and so in its key and the frame) only when they differ from
#: these defaults, so the keys of runs that do not set them are those of earlier versions.
OPTIONAL: dict[str, Any] = {"loss": "cross_entropy", "device": None, "prunable": None}
#: Losses a sweep can key: a callable has no stable name to store.
SWEEP_LOSSES: tuple[str, ...] = ("cross_entropy", "mse")

_SPLIT_METRICS = ("train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error")
#: Measured columns of a run, in order (see :func:`run_one`).
MEASURED: tuple[str, ...] = (
    "sparsity_actual", "loss_dense", "loss_pruned", "delta_loss", "loss_ft",
    *(f"{m}_dense" for m in _SPLIT_METRICS), *_SPLIT_METRICS, *(f"{m}_ft" for m in _SPLIT_METRICS),
    "val_error_gap", "val_error_gap_ft", "finetune_recipe", "finetune_epochs",
    "finetune_best_epoch", "prune_seconds", "finetune_seconds", "seconds", "torch_version",
)
#: Wall-clock columns: the only measured values that differ between identical runs.
TIMINGS: tuple[str, ...] = ("prune_seconds", "finetune_seconds", "seconds")

DEFAULT_STORE = "sweeps.sqlite"


class SweepError(RuntimeError):
    """Some runs of a sweep raised; the others are committed. ``failures`` holds
    ``(config, traceback text)`` pairs."""

    def __init__(self, message: str, failures: list[tuple[dict, str]]):
        super().__init__(message)
        self.failures = failures


# ---------------------------------------------------------------------------- configs
def _normalize_finetune(value) -> str:
    """The canonical spelling of a fine-tuning spec: "recipe", "none" or 'recipe{json}'."""
    if value is None or value == "none":
        return "none"
    if isinstance(value, str):
        if value == "recipe":
            return "recipe"
        if value.startswith("recipe{"):
            try:
                value = json.loads(value[len("recipe"):])
            except json.JSONDecodeError as exc:
                raise ValueError(f"finetune {value!r}: bad JSON after 'recipe' ({exc})") from None
        else:
            raise ValueError(f"finetune must be 'recipe', None, a dict of Recipe fields or a "
                             f"prunelab.train.Recipe, got {value!r}")
    if isinstance(value, Recipe):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"finetune must be 'recipe', None, a dict of Recipe fields or a "
                         f"prunelab.train.Recipe, got {value!r}")
    # Every field checked (types and ranges) before anything runs; numbers made plain Python.
    overrides = check_recipe_fields(value)
    Recipe.from_dict({**Recipe().to_dict(), **overrides})
    return "recipe" + canonical_json(overrides) if overrides else "recipe"


def normalize_config(config: Mapping[str, Any], *, archs: Iterable[str] = (),
                     datasets: Iterable[str] = ()) -> dict[str, Any]:
    """One run's configuration, validated, with defaults filled in and canonical types.

    Args:
        config: any subset of :data:`FIELDS` (missing fields take :data:`DEFAULTS`), plus
            optionally ``loss`` (one of :data:`SWEEP_LOSSES`) and ``device`` (None or a torch
            device name).
        archs, datasets: names of custom architectures / datasets accepted besides the
            registered ones (a :class:`Sweep` over your own models passes them).

    Returns:
        A dict with exactly :data:`FIELDS`, in that order, then ``loss`` and ``device`` only
        where they differ from :data:`OPTIONAL` (so keys of default runs never change);
        ``finetune`` is the canonical string ``"recipe"``, ``"none"`` or
        ``'recipe{"epochs":1}'`` (overrides as sorted JSON).

    Raises:
        ValueError: an unknown field or a bad value, naming it.
    """
    return _normalize(config, frozenset(archs), frozenset(datasets))[0]


def check_device(device) -> str | None:
    """None, or the canonical name of a torch device (``"cuda"`` -> ``"cuda"``, ``"cuda:1"``).

    Only the spelling is checked here: a sweep may be built on a machine without the device
    and run on one that has it (a Dask cluster's GPU workers).

    Raises:
        ValueError: not a device name, naming the value.
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be None or a torch device name such as 'cpu', 'cuda' or "
                         f"'cuda:1', got {device!r}")
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device must be None or a torch device name such as 'cpu', 'cuda' or "
                         f"'cuda:1', got {device!r}") from err


def check_sweep_loss(loss) -> str:
    """The loss of a sweep: a name of :data:`SWEEP_LOSSES` (a callable cannot be keyed)."""
    if isinstance(loss, str) and loss in SWEEP_LOSSES:
        return loss
    if callable(loss):
        raise ValueError(f"loss must be one of {SWEEP_LOSSES} in a sweep, got the callable "
                         f"{getattr(loss, '__name__', type(loss).__name__)!r}: a callable has no "
                         f"name the store can key runs by; use pl.prune(..., loss=fn) and "
                         f"pl.train.evaluate(..., loss=fn) for a custom loss")
    raise ValueError(f"loss must be one of {SWEEP_LOSSES} in a sweep, got {loss!r}")


def check_sweep_prunable(prunable) -> str | None:
    """The ``prunable=`` of a sweep as its stable label (kinds and/or tensor names joined by
    ``+``, sorted), or None for the default. A callable cannot be keyed, so it is refused."""
    if callable(prunable):
        raise ValueError(f"prunable must be None or kinds / tensor names in a sweep, got the "
                         f"callable {getattr(prunable, '__name__', type(prunable).__name__)!r}: "
                         f"a callable has no name the store can key runs by; use "
                         f"pl.prune(..., prunable=fn) for it")
    if isinstance(prunable, str) and "+" in prunable:  # a label read back from a config
        prunable = prunable.split("+")
    checked = G.check_prunable(prunable)
    return None if checked is None else prunable_label(checked)


def prunable_of(label: str | None):
    """The ``prunable=`` a sweep config's label stands for (see :func:`check_sweep_prunable`)."""
    return None if label is None else tuple(label.split("+"))


def _dataset_name(name) -> str:
    return str(name).strip().lower().replace("_", "-")


def _normalize(config: Mapping[str, Any], archs: frozenset = frozenset(),
               datasets: frozenset = frozenset()) -> tuple[dict[str, Any], PruneConfig]:
    """:func:`normalize_config` and the run's validated :class:`PruneConfig`."""
    unknown = set(config) - set(FIELDS) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown sweep field(s) {sorted(unknown)}; fields: "
                         f"{[*FIELDS, *OPTIONAL]}")
    c = {**DEFAULTS, **OPTIONAL, **config}
    if c["arch"] in archs:
        arch = c["arch"]
    elif c["arch"] in models_.names():
        arch = c["arch"]
    else:
        valid = [*models_.names(), *sorted(archs)]
        raise ValueError(f"unknown arch {c['arch']!r}; valid names: {', '.join(valid)}")
    if c["dataset"] in datasets:
        dataset = c["dataset"]
    else:
        dataset = _dataset_name(c["dataset"])
        if dataset not in D.names():
            valid = [*D.names(), *sorted(datasets)]
            raise ValueError(f"unknown dataset {c['dataset']!r}; valid names: {', '.join(valid)}")
    loss, device = check_sweep_loss(c["loss"]), check_device(c["device"])
    prunable = check_sweep_prunable(c["prunable"])
    # The pruning fields are validated (and numbers canonicalised: np.float32(0.9) is 0.9) by
    # the one config the pruning loop runs; the key is computed from these canonical values.
    pc = PruneConfig(c["criterion"], sparsity=c["sparsity"], scope=c["scope"],
                     stages=c["stages"], schedule=c["schedule"], lam=c["lam"], seed=c["seed"],
                     loss=loss, device=device, prunable=prunable_of(prunable))
    out = {"arch": arch, "dataset": dataset, "seed": pc.seed, "criterion": pc.criterion,
           "sparsity": pc.sparsity, "stages": pc.stages, "lam": pc.lam,
           "schedule": pc.schedule, "scope": pc.scope,
           "finetune": _normalize_finetune(c["finetune"]),
           "examples": check_integer(c["examples"], "examples", 1)}
    # Only settings that differ from their defaults enter the config (and so the key).
    if loss != OPTIONAL["loss"]:
        out["loss"] = loss
    if device != OPTIONAL["device"]:
        out["device"] = device
    if prunable != OPTIONAL["prunable"]:
        out["prunable"] = prunable
    return out, pc


def _as_values(value) -> list:
    """A grid field's values: a scalar (str, dict, Recipe, None, number) or an iterable of them."""
    if value is None or isinstance(value, (str, bytes, Mapping, Recipe, numbers.Number)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def _original_recipe(arch: str, dataset: str, seed: int, root: Path | None) -> Recipe:
    """The recipe that trained the zoo checkpoint (its manifest), else the zoo's default."""
    meta = (Path(root) if root is not None else paths.ZOO) / f"{zoo.key(arch, dataset, seed)}.json"
    if meta.exists():
        recorded = json.loads(meta.read_text()).get("recipe")
        if recorded:
            return Recipe.from_dict(recorded)
    return zoo.recipe_for(arch, dataset)


def finetune_recipe(config: Mapping[str, Any], *, zoo_root: str | os.PathLike | None = None
                    ) -> Recipe | None:
    """The fine-tuning recipe of a run: None for ``finetune="none"``; otherwise the recipe
    recorded with the zoo checkpoint (LM paper Sec. 4: fine-tune with the original training
    hyper-parameters) with the config's overrides applied."""
    return _recipe(normalize_config(config), Path(zoo_root) if zoo_root is not None else None)


def _recipe(cfg: Mapping[str, Any], root: Path | None, custom: bool = False) -> Recipe | None:
    """:func:`finetune_recipe` of a normalised config (trusted). A custom architecture has no
    recorded recipe: its overrides apply to ``Recipe()``'s defaults."""
    spec = cfg["finetune"]
    if spec == "none":
        return None
    base = Recipe() if custom else _original_recipe(cfg["arch"], cfg["dataset"], cfg["seed"],
                                                     root)
    overrides = json.loads(spec[len("recipe"):]) if spec != "recipe" else {}
    recipe = Recipe.from_dict({**base.to_dict(), **overrides})
    if cfg.get("device") is not None:  # the run's device wins over a recorded one
        recipe = recipe.replace(device=cfg["device"])
    return recipe


# ---------------------------------------------------------------------------- one run
@contextmanager
def _one_thread():
    """One intra-op thread, so numbers do not depend on the executor (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _split_data(bundle, split: str):
    """A bundle's split, or None when it has none (a custom bundle may lack val or test)."""
    data = getattr(bundle, split, None)
    return data if data is not None and len(data) else None


def _splits(model: nn.Module, bundle, suffix: str, loss: str = "cross_entropy"
            ) -> dict[str, float]:
    out = {}
    for split in ("train", "val", "test"):
        data = _split_data(bundle, split)
        ev = evaluate(model, data, loss=loss) if data is not None else \
            {"loss": float("nan"), "error": float("nan")}
        out[f"{split}_loss{suffix}"] = float(ev["loss"])
        out[f"{split}_error{suffix}"] = float(ev["error"])
    return out


def _load(cfg: Mapping[str, Any], root: Path | None, progress: bool,
          factory: Callable | None, bundle) -> tuple[nn.Module, Any]:
    """The run's pretrained model (on the run's device) and its data bundle."""
    if bundle is None:
        if factory is None:
            model, bundle = zoo.load(cfg["arch"], cfg["dataset"], cfg["seed"], root=root,
                                     progress=progress)
        else:
            bundle = D.load(cfg["dataset"])
    if factory is not None:
        model = factory(cfg["seed"])
        if not isinstance(model, nn.Module):
            raise TypeError(f"arch {cfg['arch']!r}: the model factory must return an nn.Module "
                            f"for seed={cfg['seed']}, got {type(model).__name__}")
        model = copy.deepcopy(model)  # the factory may hand out its own cached model
        model.eval()
    if cfg.get("device") is not None:
        model = model.to(cfg["device"])
    return model, bundle


def _measure(config: Mapping[str, Any], zoo_root: str | None = None,
             progress: bool = False, prune_config: PruneConfig | None = None,
             factory: Callable | None = None, bundle=None) -> dict[str, Any]:
    """The measured values of one run (see :func:`run_one`).

    ``config`` is already normalised (by :class:`Sweep` or :func:`run_one`) and trusted. A
    worker process receives it as a plain dict and builds its :class:`PruneConfig` from it
    (the one check on that side of the process boundary); the stages check nothing again.
    ``factory`` (``seed -> model``) and ``bundle`` replace the zoo for custom names.
    """
    t_start = time.perf_counter()
    cfg = config
    loss, device = cfg.get("loss", OPTIONAL["loss"]), cfg.get("device", OPTIONAL["device"])
    if prune_config is None:
        prune_config = PruneConfig(cfg["criterion"], sparsity=cfg["sparsity"], scope=cfg["scope"],
                                   stages=cfg["stages"], schedule=cfg["schedule"],
                                   lam=cfg["lam"], seed=cfg["seed"], loss=loss, device=device,
                                   prunable=prunable_of(cfg.get("prunable")))
    root = Path(zoo_root) if zoo_root is not None else None
    seed = cfg["seed"]
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # for any code that draws from the global generator
        model, bundle = _load(cfg, root, progress, factory, bundle)
        recipe = _recipe(cfg, root, custom=factory is not None)
        if cfg["examples"] > len(bundle.train):
            raise ValueError(f"examples={cfg['examples']} exceeds the {len(bundle.train)} "
                             f"training examples of {cfg['dataset']}")
        batch = bundle.batch("train", n=cfg["examples"], seed=seed)
        loss_dense = float(batch_loss(model, batch, loss=loss))
        dense = _splits(model, bundle, "_dense", loss)

        t0 = time.perf_counter()
        result = prune_with(model, prune_config, batch=batch, progress=progress)
        prune_seconds = time.perf_counter() - t0
        if result.interrupted:  # a callback stop (no Ctrl-C: that propagates by itself)
            raise KeyboardInterrupt("pruning was interrupted")
        pruned = result.model
        loss_pruned = float(batch_loss(pruned, batch, loss=loss))
        before = _splits(pruned, bundle, "", loss)

        nan = float("nan")
        after = {f"{m}_ft": nan for m in _SPLIT_METRICS}
        loss_ft, ft_epochs, ft_best, ft_seconds = nan, 0, 0, 0.0
        if recipe is not None:
            t0 = time.perf_counter()
            val = _split_data(bundle, "val")
            tuned = finetune_model(pruned, bundle.train, recipe=recipe, val=val, seed=seed,
                                   progress=progress, loss=loss)
            ft_seconds = time.perf_counter() - t0
            if tuned.interrupted:
                raise KeyboardInterrupt("fine-tuning was interrupted")
            loss_ft = float(batch_loss(tuned.model, batch, loss=loss))
            after = _splits(tuned.model, bundle, "_ft", loss)
            ft_epochs, ft_best = int(len(tuned.history)), int(tuned.best_epoch)

    return {
        "sparsity_actual": float(M.sparsity(result.masks)),
        "loss_dense": loss_dense, "loss_pruned": loss_pruned,
        "delta_loss": abs(loss_pruned - loss_dense), "loss_ft": loss_ft,
        **dense, **before, **after,
        "val_error_gap": before["val_error"] - dense["val_error_dense"],
        "val_error_gap_ft": after["val_error_ft"] - dense["val_error_dense"],
        "finetune_recipe": (json.dumps(recipe.to_dict(), sort_keys=True)
                            if recipe is not None else None),
        "finetune_epochs": ft_epochs, "finetune_best_epoch": ft_best,
        "prune_seconds": prune_seconds, "finetune_seconds": ft_seconds,
        "seconds": time.perf_counter() - t_start, "torch_version": torch.__version__,
    }


def run_one(config: Mapping[str, Any], *, factories: Mapping[str, Callable] | None = None,
            bundles: Mapping[str, Any] | None = None,
            zoo_root: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """One run of the LM paper's workflow (Algorithm 1, Sec. 4), a pure function of ``config``.

    Loads the zoo model of (arch, dataset, seed) (trained with its recorded recipe if missing),
    scores on ``bundle.batch("train", n=examples, seed=seed)``, prunes with (criterion,
    sparsity, stages π, λ, schedule, scope), measures, fine-tunes as ``finetune`` says, measures
    again. Runs with one torch thread and the seed set from the config, so the numbers are
    bit-identical in any process or executor on the CPU; the caller's RNG state and thread
    count are restored. With ``device`` in the config, the model is pruned, fine-tuned and
    evaluated there (data moves per batch); ``loss`` ("cross_entropy" or "mse") is the loss of
    every measurement, of the data-dependent criteria and of fine-tuning.

    Args:
        config: fields of :data:`FIELDS` (see :class:`Sweep`), plus ``loss`` / ``device``;
            missing ones take defaults.
        factories: custom architectures, ``{name: seed -> pretrained nn.Module}``; a config
            whose ``arch`` is such a name builds its model with it instead of the zoo.
        bundles: custom datasets, ``{name: bundle}`` (see :class:`Sweep`).
        zoo_root: zoo folder (default ``paths.ZOO``).
        progress: show the pruning / fine-tuning progress bars.

    Returns:
        ``{"key": config_key, **normalized config, **measurements}``: ``sparsity_actual``;
        ``loss_dense``, ``loss_pruned``, ``delta_loss`` = |loss_pruned − loss_dense| and
        ``loss_ft`` on the pruning batch; ``{train,val,test}_{loss,error}`` of the pruned model
        before fine-tuning, with suffix ``_dense`` for the unpruned model and ``_ft`` after
        fine-tuning (NaN when not fine-tuned; errors are NaN for ``loss="mse"``, and a split a
        custom bundle lacks is NaN); ``val_error_gap`` (pruned − dense) and
        ``val_error_gap_ft``; ``finetune_recipe`` (JSON of the recipe used, or None),
        ``finetune_epochs``, ``finetune_best_epoch``; ``prune_seconds``, ``finetune_seconds``,
        ``seconds``; ``torch_version``. Every value is a plain Python number or string.

    Raises:
        KeyboardInterrupt: interrupted while pruning or fine-tuning (nothing is returned).
    """
    archs, datasets = _check_archs(factories or {}), _check_bundles(bundles or {})
    cfg, pc = _normalize(config, frozenset(archs), frozenset(datasets))
    _check_pairs([(cfg["arch"], cfg["dataset"])], archs, datasets)
    return {"key": config_key(cfg), **cfg,
            **_measure(cfg, None if zoo_root is None else str(zoo_root), progress, pc,
                       archs.get(cfg["arch"]), datasets.get(cfg["dataset"]))}


# ---------------------------------------------------------------------------- custom entries
_BUNDLE_NEEDS = ("train", "val", "test", "batch")


def _check_archs(archs: Mapping) -> dict[str, Callable]:
    """``{name: seed -> model}`` checked: str names that no registered arch has, callables."""
    if not isinstance(archs, Mapping):
        raise ValueError(f"arch must be a name, a list of names or a mapping name -> "
                         f"(seed -> pretrained model), got {type(archs).__name__}")
    out = {}
    for name, factory in archs.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"arch: custom names must be non-empty strings, got {name!r}")
        if name in models_.names():
            raise ValueError(f"arch {name!r} is a registered architecture (its models come from "
                             f"the zoo); give your model factory another name, e.g. "
                             f"{name + '-mine'!r}")
        if not callable(factory):
            raise ValueError(f"arch {name!r}: expected a callable seed -> pretrained nn.Module, "
                             f"got {type(factory).__name__}")
        out[name] = factory
    return out


def _check_bundles(bundles: Mapping) -> dict[str, Any]:
    """``{name: bundle}`` checked: str names that no registered dataset has, and bundles with
    ``train``/``val``/``test`` datasets (val/test may be None or empty) and ``batch(split, n,
    seed)``, as :class:`prunelab.data.Bundle` and ``pl.data.from_tensors`` give."""
    if not isinstance(bundles, Mapping):
        raise ValueError(f"dataset must be a name, a list of names or a mapping name -> bundle, "
                         f"got {type(bundles).__name__}")
    out = {}
    for name, bundle in bundles.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"dataset: custom names must be non-empty strings, got {name!r}")
        if _dataset_name(name) in D.names():
            raise ValueError(f"dataset {name!r} is a registered dataset name; give your bundle "
                             f"another name, e.g. {name + '-mine'!r}")
        missing = [a for a in _BUNDLE_NEEDS if not hasattr(bundle, a)]
        if missing:
            raise ValueError(f"dataset {name!r}: a bundle needs {list(_BUNDLE_NEEDS)} (like "
                             f"prunelab.data.Bundle or pl.data.from_tensors(...)); "
                             f"{type(bundle).__name__} lacks {missing}")
        if not callable(bundle.batch):
            raise ValueError(f"dataset {name!r}: bundle.batch must be a method "
                             f"batch(split, n, seed) -> (x, y)")
        try:
            n_train = len(bundle.train)
        except TypeError:
            raise ValueError(f"dataset {name!r}: bundle.train must be a sized Dataset, got "
                             f"{type(bundle.train).__name__}") from None
        if n_train == 0:
            raise ValueError(f"dataset {name!r}: bundle.train is empty")
        out[name] = bundle
    return out


def _check_pairs(pairs: Iterable[tuple[str, str]], archs: Mapping, datasets: Mapping) -> None:
    """A registered arch only has zoo models for registered datasets."""
    for arch, dataset in pairs:
        if arch not in archs and dataset in datasets:
            raise ValueError(f"arch {arch!r} is registered: its pretrained models come from the "
                             f"zoo, which trains on registered datasets only, not on your "
                             f"dataset {dataset!r}; pass arch={{'{arch}-mine': make_model}} "
                             f"with make_model(seed) returning a model trained on it")


def _check_shippable(obj, what: str, kind: str) -> None:
    """ValueError when ``obj`` cannot reach a worker of ``kind`` ("local": spawned processes,
    standard pickle by reference; "dask": cloudpickle, which ships lambdas by value)."""
    hint = ("run inline (executor='inline', or workers=0), or define it at module level in an "
            "importable module (not a lambda, a closure or a notebook cell)")
    if kind == "dask":
        try:
            import cloudpickle as dumper
        except ImportError:
            dumper = pickle
    else:
        dumper = pickle
        if getattr(obj, "__module__", None) == "__main__" and callable(obj):
            raise ValueError(f"{what} is defined in __main__ (a script or notebook), which "
                             f"spawned worker processes cannot import; {hint}")
    try:
        dumper.dumps(obj)
    except Exception as exc:
        raise ValueError(f"{what} cannot be sent to {kind} worker processes "
                         f"({type(exc).__name__}: {exc}); {hint}") from None


# ---------------------------------------------------------------------------- worker tasks
def _task(config: dict, zoo_root: str | None, factory: Callable | None = None,
          bundle=None) -> dict[str, Any]:
    """What a worker runs: the measurements only (the parent holds the config)."""
    if factory is None and bundle is None:
        return _measure(config, zoo_root)
    return _measure(config, zoo_root, False, None, factory, bundle)


def _ensure_zoo(arch: str, dataset: str, seed: int, zoo_root: str | None) -> str:
    """Worker task: train and save a missing zoo checkpoint (one thread, deterministic)."""
    with _one_thread():
        zoo.load(arch, dataset, seed, root=None if zoo_root is None else Path(zoo_root),
                 progress=False)
    return zoo.key(arch, dataset, seed)


def _store(store: Store | str | os.PathLike | None) -> Store:
    return store if isinstance(store, Store) else Store(_store_path(store))


def _store_path(store: str | os.PathLike | None) -> Path:
    """None -> ``data/results/sweeps.sqlite``; a bare file name -> under ``data/results``."""
    if store is None:
        return paths.RESULTS / DEFAULT_STORE
    text = os.fspath(store)
    if os.sep not in text and "/" not in text:
        return paths.RESULTS / text
    return Path(text).expanduser()


# ---------------------------------------------------------------------------- the sweep
class Sweep:
    """A grid of runs of the LM paper's pruning workflow; each field is a value or a list.

    The runs are the cartesian product of the fields' values (duplicates dropped). Every field
    is validated here, so a bad grid fails before anything runs.

    Args:
        arch: architecture name(s) (:func:`prunelab.models.names`), or your own models: a
            mapping ``{name: make_model}`` where ``make_model(seed)`` returns a *pretrained*
            ``nn.Module`` for that seed (it is called once per run; the model it returns is
            copied, never changed). The name is what the config, the store key and the frame
            hold: reusing a name for a different model reuses the runs stored under it. A
            custom name may not be a registered one. Custom models have no recorded training
            recipe, so ``finetune="recipe"`` fine-tunes with ``Recipe()``'s defaults plus the
            overrides.
        dataset: dataset name(s) (:func:`prunelab.data.names`), or your own data: a mapping
            ``{name: bundle}`` where a bundle has ``train``/``val``/``test`` Datasets (val and
            test may be None or empty: their columns are then NaN) and ``batch(split, n,
            seed) -> (x, y)``, as :class:`prunelab.data.Bundle` and
            ``pl.data.from_tensors(...)`` give. A registered arch needs a registered dataset
            (its models come from the zoo); pair a custom dataset with a custom arch.
        seed: seed(s): the zoo model ``pl.zoo.load(arch, dataset, seed)`` (or
            ``make_model(seed)``), the pruning batch, stochastic criteria and fine-tuning's
            data order.
        criterion: criterion name(s) (:func:`prunelab.criteria.names`).
        sparsity: final fraction(s) of prunable weights removed, in [0, 1).
        stages: number(s) of pruning stages π >= 1.
        lam: step-size penalty(ies) λ >= 0.
        schedule: "exponential" and/or "linear".
        scope: "global", "layerwise" and/or "normalized".
        finetune: ``"recipe"`` (default): fine-tune once at the end with the recipe recorded
            with the zoo checkpoint, i.e. the original training hyper-parameters (LM paper
            Sec. 4, App. B); ``None``: no fine-tuning (the ``*_ft`` columns are NaN); a dict of
            :class:`~prunelab.train.Recipe` fields: overrides applied to the original recipe
            (``{"epochs": 1}``); a ``Recipe``: used as is (stored as the override of every
            field). To sweep over several, pass a list. The frame shows the canonical string:
            ``"recipe"``, ``"none"`` or ``'recipe{"epochs":1}'``.
        examples: size(s) of the pruning / scoring batch ``bundle.batch("train", n, seed)``.
        loss: ``"cross_entropy"`` (default) or ``"mse"`` (regression: error columns are NaN):
            the loss of the criteria, the measurements and fine-tuning. A callable is refused:
            the store could not key it. A column (and part of the key) only when not the
            default.
        device: None (default: where the model is, the CPU for zoo models), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``, ...: every run prunes, fine-tunes and evaluates there.
            A column (and part of the key) only when not None, so default sweeps keep their
            keys. Checked for spelling here; :meth:`run` refuses a CUDA device that this
            machine lacks unless the runs go to a Dask cluster.
        prunable: which tensors are pruned (see :func:`prunelab.graph.prunable_names`): None
            (default: Linear, Conv and attention projections), or kinds (``"embedding"``,
            ``"norm"``, ...) and/or tensor names. A column and part of the key only when not
            None, as its label (``"embedding+linear"``); a callable cannot be keyed, so it is
            refused here (``pl.prune`` takes it).

    Raises:
        ValueError: an unknown field or a bad value (naming it), or an empty list.
    """

    def __init__(self, *, arch="mlp", dataset="mnist1d", seed=0, criterion="mp", sparsity=0.9,
                 stages=1, lam=0.0, schedule="exponential", scope="global", finetune="recipe",
                 examples=1000, loss="cross_entropy", device=None, prunable=None, **unknown):
        if unknown:
            raise ValueError(f"unknown sweep field(s) {sorted(unknown)}; fields: "
                             f"{[*FIELDS, *OPTIONAL]}")
        self.archs: dict[str, Callable] = _check_archs(arch) if isinstance(arch, Mapping) else {}
        self.datasets: dict[str, Any] = (_check_bundles(dataset) if isinstance(dataset, Mapping)
                                         else {})
        if isinstance(arch, Mapping):
            arch = list(arch)
        if isinstance(dataset, Mapping):
            dataset = list(dataset)
        try:
            settings = {"loss": check_sweep_loss(loss), "device": check_device(device),
                        "prunable": check_sweep_prunable(prunable)}
        except (ValueError, TypeError) as exc:
            raise ValueError(f"sweep: {exc}") from None
        #: loss / device where they differ from :data:`OPTIONAL`: added to every config.
        self.settings = {k: v for k, v in settings.items() if v != OPTIONAL[k]}
        names = (frozenset(self.archs), frozenset(self.datasets))
        given = dict(arch=arch, dataset=dataset, seed=seed, criterion=criterion,
                     sparsity=sparsity, stages=stages, lam=lam, schedule=schedule, scope=scope,
                     finetune=finetune, examples=examples)
        self.grid: dict[str, list] = {}
        for name in FIELDS:
            values = _as_values(given[name])
            if not values:
                raise ValueError(f"sweep field {name!r} has no values")
            checked = []
            for v in values:
                try:
                    checked.append(_normalize({name: v}, *names)[0][name])
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"sweep field {name!r}: {exc}") from None
            self.grid[name] = list(dict.fromkeys(checked))  # drop duplicates, keep order
        _check_pairs(itertools.product(self.grid["arch"], self.grid["dataset"]), self.archs,
                     self.datasets)
        self._configs = list({config_key(c): c for c in (
            {**dict(zip(FIELDS, combo)), **self.settings}
            for combo in itertools.product(*self.grid.values()))
        }.values())

    def __repr__(self) -> str:
        varied = {k: v for k, v in self.grid.items() if len(v) > 1}
        fixed = {k: v[0] for k, v in self.grid.items() if len(v) == 1}
        fixed.update(self.settings)
        return f"Sweep({len(self)} runs; varied={varied}, fixed={fixed})"

    def __len__(self) -> int:
        return len(self._configs)

    def configs(self) -> list[dict[str, Any]]:
        """The runs: one plain dict per grid point, fields in :data:`FIELDS` order."""
        return [dict(c) for c in self._configs]

    def keys(self) -> list[str]:
        """The runs' :func:`prunelab.store.config_key`, in :meth:`configs` order."""
        return [config_key(c) for c in self._configs]

    def frame(self, store: Store | str | os.PathLike | None = None) -> pd.DataFrame:
        """The runs of this sweep found in ``store``, in grid order, one tidy row each.

        Columns: the :data:`FIELDS`, ``loss`` / ``device`` when set, the :data:`MEASURED`
        values, ``key`` and ``created`` (UTC commit time). A store that does not exist gives an
        empty frame (and is not created).
        """
        columns = [*FIELDS, *self.settings, *MEASURED]
        if not isinstance(store, Store) and not _store_path(store).exists():
            return pd.DataFrame(columns=[*columns, "key", "created"])
        frame = _store(store).frame(self.keys())
        if frame.empty:
            return pd.DataFrame(columns=[*columns, "key", "created"])
        first = [c for c in columns if c in frame.columns]
        rest = [c for c in frame.columns if c not in first and c not in ("key", "status",
                                                                             "created")]
        return frame[[*first, *rest, "key", "created"]].reset_index(drop=True)

    def run(self, store: Store | str | os.PathLike | None = None, *,
            executor: Any = "local", workers: int | None = None, progress: bool = True,
            zoo_root: str | os.PathLike | None = None,
            on_interrupt: str = "raise",
            resources: Mapping[str, float] | None = None) -> pd.DataFrame:
        """Run every run not yet in ``store``, committing each result as it arrives.

        Finished runs (their key is in the store) are skipped, so running the same sweep again
        resumes it. Zoo models that are missing are trained first, once each. Workers only
        compute; this process writes the store.

        Args:
            store: a :class:`~prunelab.store.Store` or its path; a bare file name goes under
                ``data/results/``; default ``data/results/sweeps.sqlite``.
            executor: ``"local"`` (worker processes on this machine), ``"inline"`` (this
                process, one run after the other: the choice for custom models defined in a
                notebook, which worker processes cannot import), ``"dask"`` (a fresh
                ``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)``,
                closed afterwards) or a ``dask.distributed.Client`` (left open; its workers
                must see ``zoo_root``, or they train their own identical copies; use one
                thread per worker: torch's thread count is per process, and bit-identical
                numbers need one thread per run).
            workers: processes; default one per CPU core (at most one per run). With
                ``"local"``, 0 or 1 runs inline in this process (handy in notebooks).
            progress: show a progress bar over runs and say how many were skipped.
            zoo_root: zoo folder (default ``paths.ZOO``), resolved here and passed to workers.
            on_interrupt: on Ctrl-C / Jupyter's Interrupt the pending runs are cancelled and the
                workers stopped; what finished is committed and stays (run again to resume).
                Then ``"raise"`` (default) re-raises the KeyboardInterrupt, so the cell stops;
                ``"return"`` returns the *partial* frame with ``attrs["interrupted"] = True``.
            resources: Dask only: abstract resources each run takes on a worker, passed to
                ``client.map(..., resources=)``; e.g. ``{"GPU": 1}`` with workers started as
                ``dask worker ... --resources "GPU=1"`` (one per GPU, each seeing its own
                device through ``CUDA_VISIBLE_DEVICES``) runs at most one run per GPU at a
                time; use it with ``Sweep(device="cuda")``. With ``executor="dask"`` the fresh
                ``LocalCluster``'s workers declare these resources.

        Custom models and bundles travel to worker processes with each run: for
        ``executor="local"`` they must pickle by reference (a module-level function of an
        importable module, not a lambda or a notebook cell); Dask ships them with cloudpickle
        (lambdas too). Both are checked here, before anything runs, with a ValueError that
        suggests ``executor="inline"``.

        Returns:
            :meth:`frame`: every run of this sweep in the store. ``frame.attrs`` holds
            ``ran``, ``skipped``, ``failed`` (counts) and ``interrupted``.

        Raises:
            ValueError: bad ``executor``/``workers``/``resources``, a store path that is not a
                store, ``examples`` larger than a dataset's training split, a CUDA device this
                machine lacks (inline or local runs), or custom entries that cannot reach the
                workers (before anything runs).
            SweepError: some runs raised; the others are committed.
            KeyboardInterrupt: interrupted, with ``on_interrupt="raise"`` (after committing).
        """
        check_on_interrupt(on_interrupt)
        X.check_executor(executor, workers, resources)
        st = _store(store)
        configs, keys = self.configs(), self.keys()
        done = set(st.keys())
        pending = [(k, c) for k, c in zip(keys, configs) if k not in done]
        self._check_runnable(pending, executor, workers, resources)
        for dataset in sorted({c["dataset"] for _, c in pending}):
            n_train = len((self.datasets.get(dataset) or D.load(dataset)).train)
            too_big = sorted({c["examples"] for _, c in pending
                              if c["dataset"] == dataset and c["examples"] > n_train})
            if too_big:
                raise ValueError(f"examples={too_big} exceeds the {n_train} training examples "
                                 f"of {dataset}")
        root = Path(zoo_root).expanduser() if zoo_root is not None else paths.ZOO

        def say(msg: str) -> None:
            if progress:
                print(msg, flush=True)  # information, not an error: stdout

        say(f"sweep: {len(configs)} runs; {len(configs) - len(pending)} already in "
            f"{st.path} (skipped); {len(pending)} to run")

        from tqdm.auto import tqdm

        ran, failures, interrupted, finished = 0, [], None, False
        runner, bar = X.Inline(), None
        try:
            if pending:
                runner = X.make_executor(executor, workers, len(pending), resources)
                say(f"sweep: running on {runner.name}")
            self._ensure_zoo(runner, pending, root, progress)
            bar = tqdm(total=len(pending), desc="sweep", unit="run", disable=not progress)
            calls = [self._call(c, str(root)) for _, c in pending]
            for i, ok, value in runner.unordered(_task, calls):
                key, config = pending[i]
                if ok:
                    st.put(key, config, value)  # committed now: a crash later loses nothing
                    ran += 1
                else:
                    failures.append((config, value))
                    bar.set_postfix(failed=len(failures))
                bar.update(1)
            finished = True
        except KeyboardInterrupt as exc:
            interrupted = exc
        finally:
            if bar is not None:
                bar.close()
            # Any early exit (Ctrl-C, or an error such as a full disk) cancels the rest at once.
            runner.close(cancel=not finished)
        if interrupted is not None:
            msg = (f"sweep interrupted: {ran} of {len(pending)} runs committed to {st.path}; "
                   f"run the same sweep again to resume")
            if on_interrupt == "raise":
                raise KeyboardInterrupt(msg) from interrupted
            say(msg)
        frame = self.frame(st)
        frame.attrs.update(ran=ran, skipped=len(configs) - len(pending), failed=len(failures),
                           interrupted=interrupted is not None)
        if failures:
            raise SweepError(f"{len(failures)} of {len(pending)} runs failed ({ran} committed, "
                             f"see .failures); first failure: {failures[0][0]}\n"
                             f"{failures[0][1]}", failures)
        return frame

    def _call(self, config: dict, root: str) -> tuple:
        """The worker arguments of one run: custom entries only where the run uses them."""
        factory, bundle = self.archs.get(config["arch"]), self.datasets.get(config["dataset"])
        if factory is None and bundle is None:
            return config, root
        return config, root, factory, bundle

    def _check_runnable(self, pending: list[tuple[str, dict]], executor, workers,
                        resources) -> None:
        """Refuse, before anything runs, a device this machine lacks (for runs here) and
        custom entries the chosen workers cannot receive."""
        if not pending:
            return
        kind = X.kind(executor, workers, len(pending))
        device = self.settings.get("device")
        if device is not None and kind != "dask":
            dev = torch.device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={device!r}: no CUDA device on this machine; run with "
                                 f"device=None/'cpu' here, or send the runs to a Dask cluster "
                                 f"with GPU workers (executor=client, resources={{'GPU': 1}})")
            if dev.type == "cuda" and dev.index is not None \
                    and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device={device!r}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        if kind == "inline":
            return
        used_archs = {c["arch"] for _, c in pending} & set(self.archs)
        used_data = {c["dataset"] for _, c in pending} & set(self.datasets)
        for name in sorted(used_archs):
            _check_shippable(self.archs[name], f"arch {name!r} (its model factory)", kind)
        for name in sorted(used_data):
            _check_shippable(self.datasets[name], f"dataset {name!r} (its bundle)", kind)

    def _ensure_zoo(self, runner, pending: list[tuple[str, dict]], root: Path,
                    progress: bool) -> None:
        """Train the missing zoo models once each (in parallel) before the runs need them."""
        wanted = sorted({(c["arch"], c["dataset"], c["seed"]) for _, c in pending
                         if c["arch"] not in self.archs})
        missing = [m for m in wanted
                   if not ((root / f"{zoo.key(*m)}.json").exists()
                           and (root / f"{zoo.key(*m)}.safetensors").exists())]
        if not missing:
            return
        from tqdm.auto import tqdm

        with tqdm(total=len(missing), desc="train zoo models", unit="model",
                  disable=not progress) as bar:
            for i, ok, value in runner.unordered(_ensure_zoo, [(*m, str(root)) for m in missing]):
                if not ok:
                    raise RuntimeError(f"training zoo model {zoo.key(*missing[i])} failed:\n"
                                       f"{value}")
                bar.update(1)
