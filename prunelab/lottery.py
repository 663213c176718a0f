"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle et al.).

Algorithm 2 of *Linear Mode Connectivity and the Lottery Ticket Hypothesis* (Frankle et al. 2020),
which with ``rewind_step=0`` is the original IMP of Frankle & Carbin (2019):

1. initialise θ₀, train ``k`` steps to θ_k and keep θ_k (the rewind point);
2. train to the end, θ_T;
3. prune a fraction of the remaining weights by magnitude (mask m);
4. rewind the remaining weights to θ_k ⊙ m and train again from step k; repeat from 3.

The control (``reinit_control=True``) trains, at every round, the ticket's own mask with the kept
weights re-drawn at random (a fresh initialisation), as in the random-reinitialisation experiments of
both papers: a ticket is a ticket only if it beats this control.

Instability (Frankle et al. 2020, Figs. 2-6) shares the rewinding: :func:`instability` trains a
network ``k`` steps, finishes two copies with different data orders and measures the barrier of
the segment between them; :func:`instability_curve` does it for every ``k``, dense or for the
rewound subnetwork ``m ⊙ θ_k`` of one IMP round. The paths come from
:mod:`prunelab.connectivity`.
"""
from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab import masks as M
from prunelab import semistructured as NM
from prunelab.connectivity import barrier, has_batchnorm, interpolate, path_ts, plain_eval
from prunelab.criteria import compute
from prunelab.train import Recipe, as_tensors, evaluate, fit


__all__ = ["LotteryResult", "imp", "InstabilityResult", "instability", "instability_curve"]


def __dir__():
    return sorted(__all__)



@dataclass
class LotteryResult:
    """What :func:`imp` returns.

    Attributes:
        rounds: one row per round: round, sparsity, density, control, val/test loss and accuracy,
            steps trained.
        masks: the masks used in each round (round 0 = dense).
        rewind_state: θ_k, the plain state dict the tickets are rewound to.
        model: the model trained in the last round (masks attached).
    """

    rounds: pd.DataFrame
    masks: list[G.Masks]
    rewind_state: dict[str, torch.Tensor]
    model: nn.Module
    extra: dict = field(default_factory=dict)


def imp(model: nn.Module, bundle, *, rounds: int, recipe: Recipe, prune_fraction: float = 0.2,
        rewind_step: int = 0, scope: str = "global", reinit_control: bool = False,
        seed: int = 0, progress: bool = False, loss="cross_entropy",
        output=None) -> LotteryResult:
    """Iterative magnitude pruning with rewinding to step ``rewind_step`` (Frankle et al.,
    *Linear Mode Connectivity and the Lottery Ticket Hypothesis*, Algorithm 2).

    Args:
        model: the *untrained* network (θ₀); never modified.
        bundle: dataset bundle; trains on ``bundle.train``, reports ``bundle.val`` and ``bundle.test``.
        rounds: pruning rounds after the dense training (round r has density (1−p)^r).
        recipe: training recipe for one full training run of T steps.
        prune_fraction: fraction p of the *remaining* weights pruned per round, in (0, 1).
        rewind_step: k, the step the surviving weights are rewound to (0 = θ₀, Frankle & Carbin).
        scope: "global", "layerwise" or "normalized" magnitude pruning
            (:func:`prunelab.masks.select`). Not an N:M pattern such as ``"2:4"``: IMP's round
            r has density (1−p)^r, while an N:M pattern fixes the density at n/m in every
            round (at most one round could reach it, and none could go beyond), so the
            pattern is refused here rather than after the dense training. For N:M tickets
            prune to the pattern in stages (``pl.prune(model, "mp", scope="2:4", stages=...)``,
            n stepping down from m) and train the result, or rewind it with
            :func:`instability_curve` (``masks=``).
        reinit_control: also train each round's mask from a random re-initialisation.
        seed: data order and the control's re-initialisation.
        progress: progress bars.
        loss, output: the training and evaluation loss and output rule
            (:mod:`prunelab.batches`); accuracies are NaN for a loss that does not classify.

    Any model (trained on the device and in the dtype of its parameters) and any bundle whose
    splits are Datasets (``pl.data.from_tensors`` / ``from_datasets`` included).

    Returns:
        :class:`LotteryResult`.

    Raises:
        ValueError: a bad ``rounds``, ``prune_fraction``, ``rewind_step``, ``scope`` (an N:M
            pattern included), ``seed``, or a bundle without the train, val and test splits
            the rounds report; TypeError: a ``recipe`` that is not a
            :class:`prunelab.train.Recipe`, or flags that are not booleans. All checked before
            any training.
    """
    B.objective(loss, output)  # validated before any training
    M.check_prunable(model)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a prunelab.train.Recipe, got {type(recipe).__name__}")
    for flag, value in (("reinit_control", reinit_control), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(rounds, numbers.Integral) and not isinstance(rounds, bool):
        rounds = int(rounds)
    if isinstance(rewind_step, numbers.Integral) and not isinstance(rewind_step, bool):
        rewind_step = int(rewind_step)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, numbers.Real) \
            or not 0 < prune_fraction < 1:
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction!r}")
    for split in ("train", "val", "test"):
        data = getattr(bundle, split, None)
        if data is None or not hasattr(data, "__len__") or len(data) == 0:
            raise ValueError(f"imp trains on bundle.train and reports bundle.val and bundle.test "
                             f"every round: bundle.{split} must be a non-empty Dataset, got "
                             f"{type(data).__name__}" + (" of length 0" if data is not None
                                                          and hasattr(data, "__len__") else ""))
    total = recipe.total_steps(len(bundle.train))
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or not 0 <= rewind_step < total:
        raise ValueError(f"rewind_step must be an integer in [0, {total}), got {rewind_step!r}")
    if NM.is_nm(scope):
        n, m = NM.parse_nm(scope)
        raise ValueError(f"scope={scope!r}: IMP prunes prune_fraction={prune_fraction} of the "
                         f"remaining weights per round (round r keeps (1-p)^r), but an N:M "
                         f"pattern keeps exactly {n} of every {m} weights in every round (density "
                         f"{n / m:g}, no further); use scope 'global', 'layerwise' or "
                         f"'normalized', or prune to the pattern with pl.prune(model, 'mp', "
                         f"scope={scope!r}, stages=...) and train that")
    if scope not in M.SCOPES:
        raise ValueError(f"scope must be one of {M.SCOPES}, got {scope!r}")

    net = copy.deepcopy(model)
    if rewind_step > 0:
        fit(net, bundle.train, recipe=recipe.replace(max_steps=rewind_step, patience=None),
            seed=seed, progress=progress, desc="train to rewind point", loss=loss, output=output)
    rewind_state = {k: v.detach().clone() for k, v in M.dense_state_dict(net).items()}
    rest = recipe.replace(max_steps=total - rewind_step, patience=None)

    names = G.prunable_names(net)
    cur = {n: torch.ones_like(G.weight(net, n), dtype=torch.bool) for n in names}
    rows, history = [], []

    def record(r, trained, control):
        val = evaluate(trained, bundle.val, loss=loss, output=output)
        test = evaluate(trained, bundle.test, loss=loss, output=output)
        rows.append({"round": r, "sparsity": M.sparsity(cur), "density": 1 - M.sparsity(cur),
                     "control": control, "rewind_step": rewind_step,
                     "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                     "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                     "steps": total - rewind_step})

    for r in range(rounds + 1):
        if r > 0:
            scores = compute(net, "mp").scores
            cur = M.select(scores, 1.0 - (1.0 - prune_fraction) ** r, scope=scope, previous=cur)
            net = copy.deepcopy(model)
            M.load_dense(net, rewind_state)
            net = M.apply(net, cur)
        history.append({n: m.clone() for n, m in cur.items()})
        fit(net, bundle.train, recipe=rest, seed=seed, progress=progress, desc=f"round {r}",
            loss=loss, output=output)
        record(r, net, "ticket")
        if reinit_control and r > 0:
            ctrl = M.reinitialize(M.apply(copy.deepcopy(model), cur), seed=seed + 1000 + r)
            fit(ctrl, bundle.train, recipe=rest, seed=seed, progress=progress,
                desc=f"control {r}", loss=loss, output=output)
            record(r, ctrl, "reinit")
    return LotteryResult(pd.DataFrame(rows), history, rewind_state, net)


# ------------------------------------------- instability vs the rewinding step k (Frankle 2020)
@dataclass
class InstabilityResult:
    """Barrier between two networks finished from the same state after ``k_steps``."""

    barrier: float
    frame: pd.DataFrame
    model_a: nn.Module
    model_b: nn.Module
    k_steps: int
    extra: dict = field(default_factory=dict)


def _fit_or_raise(model: nn.Module, data, recipe: Recipe, seed: int, progress: bool) -> None:
    """``fit``, re-raising an interrupt it caught: a barrier between half-trained copies would
    be a wrong number, not a partial result."""
    if fit(model, data, recipe=recipe, seed=seed, progress=progress).interrupted:
        raise KeyboardInterrupt("interrupted while training the copies; no barrier computed")


def instability(model_init: nn.Module, bundle, *, k_steps: int, recipe: Recipe,
                seeds: tuple[int, int] = (0, 1), steps: int = 11, split: str = "test",
                metric: str = "error", progress: bool = False) -> InstabilityResult:
    """Linear-mode-connectivity instability at step ``k_steps`` (Frankle et al., Figs. 2-3).

    ``model_init`` (not modified) is trained ``k_steps`` optimiser steps with data-order seed
    ``seeds[0]``; two copies of that state are then trained with data orders ``seeds[0]`` and
    ``seeds[1]`` for the rest of the recipe's budget, and the straight segment between them is
    evaluated on ``bundle``'s ``split``. The budget is ``recipe.max_steps`` or ``epochs`` x steps
    per epoch. Simplification: the second phase starts a fresh optimiser and schedule (no
    optimiser state or learning-rate schedule position is carried over from the first phase).

    Returns:
        :class:`InstabilityResult` with the ``metric`` barrier and the path frame.
    """
    x, y = as_tensors(bundle.train, what="bundle.train")
    total = recipe.total_steps(len(y))
    if not 0 <= k_steps <= total:
        raise ValueError(f"k_steps must be in 0..{total}, got {k_steps}")
    start = copy.deepcopy(model_init)
    if k_steps > 0:
        _fit_or_raise(start, (x, y), recipe.replace(max_steps=k_steps), seeds[0], progress)
    rest = recipe.replace(max_steps=total - k_steps) if total > k_steps else None
    finished = []
    for s in seeds:
        m = copy.deepcopy(start)
        if rest is not None:
            _fit_or_raise(m, (x, y), rest, s, progress)
        finished.append(m.eval())
    bn = (x, y) if has_batchnorm(start) else None
    frame = interpolate(finished[0], finished[1], bundle.split(split), steps=steps, bn_data=bn)
    return InstabilityResult(barrier(frame, metric=metric), frame, finished[0], finished[1],
                             k_steps)


def _check_ks(ks, total: int) -> list[int]:
    if isinstance(ks, (int, float)) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = list(ks)
    except TypeError:
        raise ValueError(f"ks must be a sequence of integer steps in 0..{total}, "
                         f"got {ks!r}") from None
    if not ks:
        raise ValueError(f"ks must hold at least one step in 0..{total}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total]
    if bad:
        raise ValueError(f"ks must be integer steps in 0..{total} (the recipe's budget), got {bad}")
    return sorted(set(ks))


def instability_curve(model_init: nn.Module, bundle, *, ks: Iterable[int], recipe: Recipe,
                      seeds: tuple[int, int] = (0, 1), steps: int = 11, split: str = "test",
                      metric: str = "error", sparsity: float | None = None,
                      masks: M.Masks | None = None,
                      progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instability vs the step ``k`` the two copies split at (Frankle et al. 2020, Fig. 3).

    For every ``k`` this is exactly :func:`instability` with ``k_steps=k`` (same phase-1 state, same
    second-phase runs, bit-identical barrier and path), computed more cheaply: phase 1 (data
    order ``seeds[0]``) runs once to ``max(ks)`` and the state at every ``k`` is snapshotted on the
    way -- fit's first ``k`` steps do not depend on its ``max_steps``, so the snapshot equals a run
    stopped at ``k``. (Resuming phase 1 from ``k1`` to ``k2`` would *not* be equivalent: each fit
    call restarts the data order and the optimiser.) Cost: ``max(ks)`` steps once, then
    ``2 (T - k)`` steps per ``k``, T the recipe's budget (``max_steps`` or epochs x steps per
    epoch); calling :func:`instability` per ``k`` would add ``Σ k`` steps.

    Sparse subnetworks (Frankle et al. 2020, Sec. 4, Figs. 5-6): with ``sparsity`` the dense
    phase-1 run goes on to T, θ_T is pruned by global magnitude to ``sparsity`` (mask m, one
    round of IMP with rewinding), and for every ``k`` the *rewound subnetwork* m ⊙ θ_k is what the
    two copies train from, with m held during training and along the segment. One IMP round
    prunes θ_T, which does not depend on ``k``, so m is the same for every ``k``; the paper's
    iterative IMP (several rounds, each retrained from θ_k) would give a mask per ``k``. Pass
    ``masks`` instead to use a mask of your own (e.g. ``pl.lottery.imp(...).masks[-1]``).

    Args:
        model_init: the network θ₀; not modified.
        bundle: trains on ``bundle.train``; the path is evaluated on ``bundle``'s ``split``.
        ks: steps in 0..T; sorted and de-duplicated. ``k = T`` gives two identical copies, so a
            barrier of exactly 0.
        recipe: the training recipe (no early stopping: ``patience`` must be None).
        seeds: data orders of the two copies (``seeds[0]`` also drives phase 1).
        steps: points along each path (``t`` in [0, 1]).
        split: "train", "val" or "test".
        metric: "error" or "loss", the barrier's quantity.
        sparsity: prune the rewound networks: one-shot global magnitude mask of θ_T (above).
        masks: an explicit mask (bool dict, True = kept) for the rewound networks; not with
            ``sparsity``.
        progress: progress bars.

    Returns:
        ``(barriers, paths)``: ``barriers`` has one row per k (k, barrier, metric, split,
        <metric>_a, <metric>_b, path_max, total_steps, density: the fraction of prunable
        weights kept, 1.0 for dense runs); ``paths`` the concatenated path frames
        with a ``k`` column (k, t, loss, error), e.g. for a plot with a ``k`` slider. Interrupting
        returns the ``k`` finished so far, with ``attrs["interrupted"]`` True on both frames.

    Raises:
        ValueError: ``ks`` empty or outside 0..T, an unknown ``split`` or ``metric``, a recipe with
            ``patience``, ``seeds`` not a pair, a bad ``sparsity`` or ``masks``, or both given.
    """
    if metric not in ("error", "loss"):
        raise ValueError(f"metric must be 'error' or 'loss', got {metric!r}")
    if recipe.patience is not None:
        raise ValueError("instability runs have no validation set: use a recipe with "
                         f"patience=None, got patience={recipe.patience}")
    seeds = tuple(seeds)
    if len(seeds) != 2:
        raise ValueError(f"seeds must be a pair of data-order seeds, got {seeds!r}")
    eval_data = bundle.split(split)  # ValueError on an unknown split
    x, y = as_tensors(bundle.train, what="bundle.train")
    total = recipe.total_steps(len(y))
    ks = _check_ks(ks, total)
    path_ts(steps)
    if sparsity is not None and masks is not None:
        raise ValueError("give sparsity (a magnitude mask of θ_T) or masks, not both")
    if sparsity is not None:
        sparsity = M.check_sparsity(sparsity)
    if masks is not None:
        M.apply(plain_eval(model_init), masks, inplace=True)  # validates: ValueError
        masks = {k: v.clone() for k, v in masks.items()}

    from tqdm.auto import tqdm

    rows, frames, interrupted = [], [], False
    bn = (x, y) if has_batchnorm(model_init) else None
    try:
        start = copy.deepcopy(model_init)
        snaps = {0: copy.deepcopy(start)} if 0 in ks else {}
        wanted = set(ks)
        # phase 1 runs to T when the mask comes from θ_T; fit's first k steps do not depend
        # on its max_steps, so the snapshots are the same either way
        until = total if sparsity is not None else ks[-1]
        if until > 0:
            def keep(model: nn.Module, step: int) -> None:
                if step in wanted:
                    snaps[step] = copy.deepcopy(model)

            res = fit(start, (x, y), recipe=recipe.replace(max_steps=until), seed=seeds[0],
                      progress=progress, step_callback=keep, desc="phase 1")
            if res.interrupted:
                raise KeyboardInterrupt
        if sparsity is not None:  # one IMP round: global magnitude of θ_T
            theta_t = plain_eval(start)
            weights = dict(theta_t.named_parameters())
            masks = M.select({n: weights[n].detach().abs() for n in G.prunable_names(theta_t)},
                             sparsity, scope="global")
        density = 1.0 if masks is None else (
            sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values()))
        for k in tqdm(ks, desc="instability per k", disable=not progress, leave=False):
            finished = []
            for s in seeds:
                m = copy.deepcopy(snaps[k])
                if masks is not None:  # the rewound subnetwork m ⊙ θ_k, m held in training
                    m = M.apply(plain_eval(m), masks)
                if total > k:
                    res = fit(m, (x, y), recipe=recipe.replace(max_steps=total - k), seed=s,
                              progress=progress)
                    if res.interrupted:
                        raise KeyboardInterrupt
                finished.append(m.eval())
            frame = interpolate(finished[0], finished[1], eval_data, steps=steps, bn_data=bn)
            values = frame.sort_values("t")[metric].to_numpy(dtype=float)
            rows.append({"k": k, "barrier": barrier(frame, metric=metric), "metric": metric,
                         "split": split, f"{metric}_a": values[0], f"{metric}_b": values[-1],
                         "path_max": values.max(), "total_steps": total,
                         "density": density})
            frames.append(frame.assign(k=k)[["k", *frame.columns]])
            del snaps[k]  # free the snapshot once used
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"instability_curve interrupted: returning {len(rows)} of {len(ks)} k",
                      RuntimeWarning, stacklevel=2)
    barriers = pd.DataFrame(rows, columns=["k", "barrier", "metric", "split", f"{metric}_a",
                                           f"{metric}_b", "path_max", "total_steps",
                                           "density"])
    paths = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=["k", "t", "loss", "error"]))
    barriers.attrs["interrupted"] = paths.attrs["interrupted"] = interrupted
    return barriers, paths
