"""Pruning at initialisation: criteria compared, and the *Missing the mark* ablations.

* :func:`compare` builds an untrained network per seed, prunes it one-shot at initialisation with
  each criterion (SNIP, Lee et al. 2019; GraSP, Wang et al. 2020; iterative SynFlow, Tanaka et al.
  2020; magnitude; random ...), scope and sparsity, builds the ablations of Frankle et al. 2021
  (*Pruning neural networks at initialization: why are we missing the mark?*, Fig. 4)
  and trains every variant with the same recipe, masks applied throughout. One tidy row per run.
* :func:`ablate` is one cell of that grid without the training: the pruned mask and its ablated
  variants as masked, untrained copies (what :func:`compare` trains).
* :func:`blalock` is the global-vs-layerwise magnitude-vs-gradient comparison of Blalock et al.
  2020 (*What is the state of neural network pruning?*, Figs. 6-7), done at
  initialisation.

Ablations (Frankle et al. 2021, Fig. 4):

- ``"original"``: the criterion's mask on the initial weights θ₀.
- ``"shuffled"``: each layer's mask randomly permuted (:func:`prunelab.masks.shuffle`): the same
  number of weights kept per layer, at random positions.
- ``"inverted"``: keep the weights the criterion ranks *lowest*: the negated scores thresholded
  with the same scope and sparsity, so a layerwise mask keeps the same count in every layer as the
  original and a global mask the same total (its per-layer counts may differ -- which layers the
  inversion empties is part of what the ablation measures). The ranking is the criterion's
  one-shot score of the unpruned θ₀; for iterative criteria (SynFlow) that is the single-round
  score (Tanaka et al. Eq. 2 at θ₀), because the iterative run's final scores only rank the
  survivors of its last round (the rest are −inf, whose negation would pick an arbitrary index
  order).
- ``"reinitialised"``: the original mask on fresh weights drawn from the *architecture's own*
  initialiser with another seed (``models.build(arch, bundle, seed=seed + ABLATION_SEED_OFFSET)``),
  biases included.

Seeds: seed ``s`` gives θ₀ (``models.build(..., seed=s)``), the scoring batch
(``bundle.batch("train", n, seed=s)``), the criterion's own randomness and the training data order
(the same for every variant of a seed, so variants differ only in mask and weights); the shuffle
permutation and the re-drawn weights use ``s + ABLATION_SEED_OFFSET``.
"""
from __future__ import annotations

import copy
import itertools
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
from torch import nn

from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab import models as models_
from prunelab.pruning import PruneResult, prune
from prunelab.train import Recipe, evaluate, fit

__all__ = ["ABLATIONS", "COLUMNS", "TIMING_COLUMNS", "ABLATION_SEED_OFFSET", "Ablated", "ablate",
           "compare", "blalock"]



def __dir__():
    return sorted(__all__)

ABLATIONS = ("original", "shuffled", "inverted", "reinitialised")
ABLATION_SEED_OFFSET = 10_000  # far from the run seeds, so seed s's redraw is not seed s+1's θ₀
COLUMNS = ["arch", "dataset", "seed", "criterion", "scope", "sparsity", "ablation", "density",
           "collapsed_layers", "min_layer_density", "test_accuracy", "test_loss", "val_accuracy",
           "val_loss", "train_steps", "prune_seconds", "train_seconds"]
TIMING_COLUMNS = ("prune_seconds", "train_seconds")


# ----------------------------------------------------------------------------- validation
def _names(values, what: str, allowed: Sequence[str] | None = None) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of names, got {values!r}") from None
    if not values:
        raise ValueError(f"{what} must name at least one entry, got an empty sequence")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {bad}; valid: {', '.join(allowed)}")
    return values


def _check_criteria(criteria) -> tuple[str, ...]:
    criteria = _names(criteria, "criteria")
    for c in criteria:
        C.spec(c)  # ValueError listing every registered criterion
    return criteria


def _check_scopes(scopes) -> tuple[str, ...]:
    return _names(scopes, "scopes", M.SCOPES)


def _check_ablations(ablations) -> tuple[str, ...]:
    return _names(ablations, "ablations", ABLATIONS)


def _check_sparsities(sparsities) -> tuple[float, ...]:
    if isinstance(sparsities, (int, float)):
        sparsities = (sparsities,)
    out = tuple(M.check_sparsity(s) for s in sparsities)
    if not out:
        raise ValueError("sparsities must hold at least one fraction in [0, 1)")
    return out


def _check_seeds(seeds) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = (seeds,)
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    return seeds


# ----------------------------------------------------------------------------- one grid cell
@dataclass
class Ablated:
    """What :func:`ablate` returns: one criterion's mask at initialisation and its ablations.

    Attributes:
        masks: ablation name -> masks (name -> bool, True = kept).
        models: ablation name -> masked, *untrained* copy (masks attached, :func:`prunelab.masks.apply`).
        scores: the criterion's scores from :func:`prunelab.prune` (iterative SynFlow: its last
            round, −inf on weights pruned in earlier rounds).
        ranking: the one-shot scores whose lowest entries the ``"inverted"`` mask keeps
            (None when ``"inverted"`` was not requested).
        result: the :class:`~prunelab.pruning.PruneResult` of the original mask.
    """

    masks: dict[str, G.Masks]
    models: dict[str, nn.Module]
    scores: G.Scores
    ranking: G.Scores | None
    result: PruneResult
    extra: dict = field(default_factory=dict)


def ablate(model: nn.Module, criterion: str, *, sparsity: float, scope: str = "global",
           ablations: Iterable[str] = ABLATIONS, batch=None, seed: int = 0,
           reinit: nn.Module | None = None, ablation_seed: int | None = None,
           **options) -> Ablated:
    """Prune ``model`` at initialisation and build the *Missing the mark* ablations of its mask.

    Frankle et al. 2021, Fig. 4; the ablations are defined in the module docstring.

    Args:
        model: the untrained network θ₀; never modified.
        criterion: a name from :func:`prunelab.criteria.names`.
        sparsity: total fraction of prunable weights pruned, in [0, 1).
        scope: ``"global"``, ``"layerwise"`` or ``"normalized"``.
        ablations: any of :data:`ABLATIONS`.
        batch: (x, y) scoring batch; required by data-dependent criteria (SNIP, GraSP, grad-mag),
            used only for its input shape by SynFlow.
        seed: seed of the criterion (``random``) and of :func:`prunelab.prune`.
        reinit: a freshly initialised network of the same architecture with another seed, whose
            weights the ``"reinitialised"`` variant uses (required for it): e.g.
            ``models.build(arch, bundle, seed=seed + ABLATION_SEED_OFFSET)``.
        ablation_seed: seed of the shuffle; default ``seed + ABLATION_SEED_OFFSET``.
        **options: passed to the criterion (e.g. ``iterations=100`` for SynFlow), and
            ``loss=`` / ``output=`` (see :mod:`prunelab.batches`) to :func:`prunelab.prune`.
            ``batch`` may be (x, y) tensors, a Dataset or a DataLoader.

    Returns:
        :class:`Ablated`.

    Raises:
        ValueError: unknown criterion, scope or ablation; sparsity outside [0, 1); a missing
            ``batch`` or ``reinit``; a ``reinit`` of another architecture.
    """
    spec = C.spec(criterion)
    ablations = _check_ablations(ablations)
    M.check_scope(scope)
    sparsity = M.check_sparsity(sparsity)
    if "reinitialised" in ablations:
        if reinit is None:
            raise ValueError("the 'reinitialised' ablation needs reinit= a freshly initialised "
                             "model of the same architecture, e.g. models.build(arch, bundle, "
                             f"seed={seed} + ABLATION_SEED_OFFSET)")
        mine = {k: v.shape for k, v in M.dense_state_dict(model).items()}
        theirs = {k: v.shape for k, v in M.dense_state_dict(reinit).items()}
        if mine != theirs:
            raise ValueError("reinit has another architecture than model: tensors "
                             f"{sorted(set(mine.items()) ^ set(theirs.items()))[:4]} differ")
    if ablation_seed is None:
        ablation_seed = seed + ABLATION_SEED_OFFSET

    result = prune(model, criterion, sparsity=sparsity, scope=scope, batch=batch, seed=seed,
                   **options)
    out_masks: dict[str, G.Masks] = {}
    out_models: dict[str, nn.Module] = {}
    ranking = None
    for name in ablations:
        if name == "original":
            masks, net = result.masks, result.model
        elif name == "shuffled":
            masks = M.shuffle(result.masks, seed=ablation_seed)
            net = M.apply(model, masks)
        elif name == "inverted":
            if spec.uses_target:  # iterative: final scores rank only the last round's survivors
                ranking = C.compute(model, criterion, batch=batch, seed=seed, **options).scores
            else:
                ranking = result.scores
            masks = M.select(M.invert(ranking), sparsity, scope=scope)
            net = M.apply(model, masks)
        else:  # reinitialised
            masks = result.masks
            net = M.apply(reinit, masks)
        out_masks[name] = {n: m.clone() for n, m in masks.items()}
        out_models[name] = net
    return Ablated(out_masks, out_models, result.scores, ranking, result,
                   {"ablation_seed": ablation_seed})


# ----------------------------------------------------------------------------- the grid
def _mask_stats(masks: G.Masks) -> dict[str, float]:
    if not masks:
        return {"density": 1.0, "collapsed_layers": 0, "min_layer_density": 1.0}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    layer = [float(m.sum()) / max(m.numel(), 1) for m in masks.values()]
    return {"density": kept / max(total, 1),
            "collapsed_layers": sum(1 for m in masks.values() if m.numel() and not bool(m.any())),
            "min_layer_density": min(layer)}


class _Stop(Exception):
    """A KeyboardInterrupt that fit/prune swallowed (they return ``interrupted``)."""


def _train_row(net: nn.Module, bundle, recipe: Recipe, seed: int) -> dict:
    t0 = time.perf_counter()
    res = fit(net, bundle.train, recipe=recipe,
              val=bundle.val if recipe.patience is not None else None, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    if res.interrupted:
        raise _Stop
    test, val = evaluate(net, bundle.test), evaluate(net, bundle.val)
    steps = int(res.history["step"].iloc[-1]) if len(res.history) else 0
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "val_accuracy": val["accuracy"], "val_loss": val["loss"], "train_steps": steps,
            "train_seconds": seconds}


def compare(bundle, *, arch: str = "mlp",
            criteria: Iterable[str] = ("snip", "grasp", "synflow", "mp", "random"),
            sparsities: Iterable[float] = (0.9,), scopes: Iterable[str] = ("global",),
            ablations: Iterable[str] = ("original",), seeds: Iterable[int] = (0,),
            recipe: Recipe, batch_size_for_scores: int = 512,
            model_kwargs: Mapping | None = None,
            criterion_options: Mapping[str, Mapping] | None = None, dense: bool = True,
            progress: bool = False) -> pd.DataFrame:
    """Train networks pruned at initialisation: one tidy row per (seed, criterion, scope,
    sparsity, ablation), plus a dense reference row per seed.

    Frankle et al. 2021 (*Missing the mark*), Fig. 3 (criteria vs sparsity) and Fig. 4
    (ablations); the criteria are SNIP (Lee et al. 2019, Eq. 5), GraSP (Wang et al. 2020, Eq. 8),
    iterative SynFlow (Tanaka et al. 2020, Algorithm 1, data-free: 100 rounds unless
    ``criterion_options={"synflow": {"iterations": R}}``), magnitude and random. For each seed the
    untrained ``arch`` is built once; SNIP/GraSP score one fixed batch of
    ``batch_size_for_scores`` train examples drawn with the seed; every variant is trained with
    ``recipe`` (masks stay attached, so pruned weights stay exactly zero) and the same data order;
    see the module docstring for the ablations and seeds.

    Blalock et al. 2020 (*What is the state of neural network pruning?*, Figs. 6-7) compare
    global vs layerwise magnitude and gradient-magnitude pruning: ``criteria=("mp", "snip"),
    scopes=("global", "layerwise")`` over a few sparsities, or :func:`blalock`. Their "gradient
    magnitude" is |θ ⊙ g| on a batch, which is the ``"snip"`` score; the registry's
    ``"grad-mag"`` is |g| alone (also valid here). Blalock et al. prune *trained* networks and
    fine-tune; this is the same comparison at initialisation.

    Args:
        bundle: a :class:`prunelab.data.Bundle`; trains on ``train``, reports ``val`` and ``test``.
        arch: a name from :func:`prunelab.models.names`.
        criteria: names from :func:`prunelab.criteria.names`.
        sparsities: total fractions of prunable weights pruned, each in [0, 1).
        scopes: ``"global"``, ``"layerwise"`` and/or ``"normalized"``.
        ablations: any of ``"original"``, ``"shuffled"``, ``"inverted"``, ``"reinitialised"``.
        seeds: one θ₀, scoring batch and data order per seed.
        recipe: the training recipe of every run (with ``patience`` it early-stops on ``val``).
        batch_size_for_scores: examples in the scoring batch, ``1 <= n <= len(bundle.train)``.
        model_kwargs: passed to :func:`prunelab.models.build` (``hidden=``, ``width=`` ...).
        criterion_options: criterion name -> options for it (e.g. SynFlow ``iterations``).
        dense: add the dense reference row per seed (criterion ``"dense"``, sparsity 0, scope
            None, ablation ``"original"``).
        progress: progress bar over runs.

    Returns:
        DataFrame with :data:`COLUMNS`: arch, dataset, seed, criterion, scope, sparsity, ablation,
        density (actual fraction kept), collapsed_layers (layers with no weight kept),
        min_layer_density, test/val accuracy and loss, train_steps, prune_seconds, train_seconds.
        ``frame.attrs["interrupted"]`` tells whether the run was cut short.

    Interrupting (Jupyter's Interrupt, KeyboardInterrupt) stops after the runs finished so far and
    *returns* their rows (a warning says so; ``attrs["interrupted"]`` is True); the run in progress
    is dropped, never reported half-trained.

    Cost: per seed and (criterion, scope, sparsity) one pruning (SynFlow: ``iterations`` rounds
    of a forward+backward on one input), plus one scoring of θ₀ for an inverted SynFlow; one full
    training per ablation, plus one dense training per seed.

    Raises:
        ValueError: unknown architecture, criterion, scope or ablation (listing the valid ones),
            sparsities outside [0, 1), bad seeds, a scoring batch larger than the train split,
            ``criterion_options`` for criteria not compared.
    """
    criteria = _check_criteria(criteria)
    scopes = _check_scopes(scopes)
    ablations = _check_ablations(ablations)
    sparsities = _check_sparsities(sparsities)
    seeds = _check_seeds(seeds)
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a prunelab.train.Recipe, got {recipe!r}")
    if arch not in models_.MODELS:
        raise ValueError(f"unknown arch {arch!r}; valid names: {', '.join(models_.names())}")
    n_train = len(bundle.train)
    if (isinstance(batch_size_for_scores, bool) or not isinstance(batch_size_for_scores, int)
            or not 1 <= batch_size_for_scores <= n_train):
        raise ValueError(f"batch_size_for_scores must be an integer in 1..{n_train} (the train "
                         f"split), got {batch_size_for_scores!r}")
    options = {k: dict(v) for k, v in (criterion_options or {}).items()}
    unknown = set(options) - set(criteria)
    if unknown:
        raise ValueError(f"criterion_options names criteria not compared {sorted(unknown)}; "
                         f"compared: {list(criteria)}")
    model_kwargs = dict(model_kwargs or {})
    dataset = getattr(bundle, "name", None)

    cells = list(itertools.product(criteria, scopes, sparsities))
    total = len(seeds) * (int(dense) + len(cells) * len(ablations))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="at-init runs", disable=not progress, leave=False)
    rows: list[dict] = []
    interrupted = False
    try:
        for seed in seeds:
            init = models_.build(arch, bundle, seed=seed, **model_kwargs)
            reinit = (models_.build(arch, bundle, seed=seed + ABLATION_SEED_OFFSET, **model_kwargs)
                      if "reinitialised" in ablations else None)
            batch = bundle.batch("train", n=batch_size_for_scores, seed=seed)
            base = {"arch": arch, "dataset": dataset, "seed": seed}
            if dense:
                bar.set_postfix_str(f"seed {seed} dense")
                row = {**base, "criterion": "dense", "scope": None, "sparsity": 0.0,
                       "ablation": "original", **_mask_stats({}), "prune_seconds": 0.0}
                row.update(_train_row(copy.deepcopy(init), bundle, recipe, seed))
                rows.append(row)
                bar.update(1)
            for criterion, scope, sparsity in cells:
                bar.set_postfix_str(f"seed {seed} {criterion} {scope} {sparsity:g}")
                t0 = time.perf_counter()
                ab = ablate(init, criterion, sparsity=sparsity, scope=scope, ablations=ablations,
                            batch=batch, seed=seed, reinit=reinit, **options.get(criterion, {}))
                prune_seconds = time.perf_counter() - t0
                if ab.result.interrupted:
                    raise _Stop
                for name in ablations:
                    row = {**base, "criterion": criterion, "scope": scope, "sparsity": sparsity,
                           "ablation": name, **_mask_stats(ab.masks[name]),
                           "prune_seconds": prune_seconds}
                    row.update(_train_row(ab.models[name], bundle, recipe, seed))
                    rows.append(row)
                    bar.update(1)
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        warnings.warn(f"compare interrupted: returning the {len(rows)} of {total} runs finished",
                      RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["interrupted"] = interrupted
    return frame


def blalock(bundle, *, criteria: Iterable[str] = ("mp", "snip"),
            scopes: Iterable[str] = ("global", "layerwise"),
            sparsities: Iterable[float] = (0.5, 0.75, 0.9, 0.95, 0.98), **kw) -> pd.DataFrame:
    """Global vs layerwise, magnitude vs gradient magnitude, at initialisation.

    The four baselines of Blalock et al. 2020 (*What is the state of neural network pruning?*,
    Figs. 6-7): global / layerwise magnitude (``"mp"``) and global / layerwise gradient
    magnitude, which they define as |weight × gradient| on a batch -- the ``"snip"`` score (pass
    ``criteria=("mp", "grad-mag")`` for |g| alone; add ``"random"`` for their random baseline).
    Blalock et al. prune trained networks and fine-tune; this prunes θ₀ and trains. A thin call
    of :func:`compare` (original masks only, unless ``ablations=`` is passed), same columns.

    Args:
        bundle: the dataset bundle.
        criteria, scopes, sparsities: as in :func:`compare`, with Blalock's defaults.
        **kw: the other arguments of :func:`compare` (``recipe=`` is required).
    """
    return compare(bundle, criteria=criteria, scopes=scopes, sparsities=sparsities, **kw)
