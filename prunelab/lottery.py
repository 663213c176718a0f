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
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from prunelab import graph as G
from prunelab import masks as M
from prunelab.criteria import compute
from prunelab.train import Recipe, evaluate, fit



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


def _total_steps(recipe: Recipe, n_train: int) -> int:
    steps = math.ceil(n_train / recipe.batch_size) * recipe.epochs
    return min(steps, recipe.max_steps) if recipe.max_steps is not None else steps


def imp(model: nn.Module, bundle, *, rounds: int, recipe: Recipe, prune_fraction: float = 0.2,
        rewind_step: int = 0, scope: str = "global", reinit_control: bool = False,
        seed: int = 0, progress: bool = False) -> LotteryResult:
    """Iterative magnitude pruning with rewinding to step ``rewind_step``.

    Args:
        model: the *untrained* network (θ₀); never modified.
        bundle: dataset bundle; trains on ``bundle.train``, reports ``bundle.val`` and ``bundle.test``.
        rounds: pruning rounds after the dense training (round r has density (1−p)^r).
        recipe: training recipe for one full training run of T steps.
        prune_fraction: fraction p of the *remaining* weights pruned per round, in (0, 1).
        rewind_step: k, the step the surviving weights are rewound to (0 = θ₀, Frankle & Carbin).
        scope: "global" or "layerwise" magnitude pruning.
        reinit_control: also train each round's mask from a random re-initialisation.
        seed: data order and the control's re-initialisation.
        progress: progress bars.

    Returns:
        :class:`LotteryResult`.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if not (isinstance(prune_fraction, (int, float)) and 0 < prune_fraction < 1):
        raise ValueError(f"prune_fraction must be in (0, 1), got {prune_fraction!r}")
    total = _total_steps(recipe, len(bundle.train))
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or not 0 <= rewind_step < total:
        raise ValueError(f"rewind_step must be an integer in [0, {total}), got {rewind_step!r}")
    M.check_scope(scope)

    net = copy.deepcopy(model)
    if rewind_step > 0:
        fit(net, bundle.train, recipe=recipe.replace(max_steps=rewind_step, patience=None),
            seed=seed, progress=progress, desc="train to rewind point")
    rewind_state = {k: v.detach().clone() for k, v in M.dense_state_dict(net).items()}
    rest = recipe.replace(max_steps=total - rewind_step, patience=None)

    names = G.prunable_names(net)
    cur = {n: torch.ones_like(G.weight(net, n), dtype=torch.bool) for n in names}
    rows, history = [], []

    def record(r, trained, control):
        val, test = evaluate(trained, bundle.val), evaluate(trained, bundle.test)
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
        fit(net, bundle.train, recipe=rest, seed=seed, progress=progress, desc=f"round {r}")
        record(r, net, "ticket")
        if reinit_control and r > 0:
            ctrl = M.reinitialize(M.apply(copy.deepcopy(model), cur), seed=seed + 1000 + r)
            fit(ctrl, bundle.train, recipe=rest, seed=seed, progress=progress, desc=f"control {r}")
            record(r, ctrl, "reinit")
    return LotteryResult(pd.DataFrame(rows), history, rewind_state, net)
