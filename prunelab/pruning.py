"""The pruning loop: stages, schedules, the step-size penalty λ and fine-tuning.

Follows Algorithm 1 of *Revisiting Loss Modelling for Unstructured Pruning* (the LM paper): the
target sparsity is reached in π stages (``schedule="linear"``: the same number of weights per stage;
``"exponential"``: the same fraction of the remaining weights per stage); at every stage the
criterion re-scores the *masked* model, the lowest scores are masked (pruned weights stay pruned),
optionally the network is fine-tuned, and at the end it is fine-tuned once.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab import results as R
from prunelab import selection as S
from prunelab import semistructured as NM
from prunelab.config import PruneConfig
from prunelab.metrics import loss as metrics_loss
from prunelab.train import FitResult, Recipe, check_on_interrupt, fit

__all__ = ["prune", "prune_with", "PruneResult", "SCHEDULES"]


def __dir__():
    return sorted(__all__)


SCHEDULES = S.SCHEDULES


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: the pruned model (a copy unless ``inplace``) with masks attached (:func:`prunelab.masks.apply`).
        masks: name -> bool mask, True = kept.
        history: one row per stage: stage, target_sparsity, sparsity, loss, delta_loss,
            step_norm, seconds, examples (plus fine-tuning metrics when fine-tuned).
        scores: the scores of the last stage.
        config: the arguments of the call, as plain values.
        finetune: the final fine-tuning's :class:`~prunelab.train.FitResult`, if any.
        interrupted: True when a KeyboardInterrupt or the callback stopped it early.
    """

    model: nn.Module
    masks: G.Masks
    history: pd.DataFrame
    scores: G.Scores
    config: dict
    finetune: FitResult | None = None
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    def _fields(self) -> dict:
        c, h = self.config, self.history
        reached = M.sparsity(self.masks) if self.masks else 0.0
        target = c.get("sparsity")
        out = {"criterion": c.get("criterion"),
               "sparsity": R.text(R.fmt(reached) + (f" (target {R.fmt(target)})"
                                                    if target is not None else "")),
               "stages": R.text(f"{len(h)}/{c.get('stages')}")}
        loss0 = self.extra.get("loss0", math.nan)
        last = float(h["loss"].iloc[-1]) if len(h) else math.nan
        if not (math.isnan(loss0) and math.isnan(last)):
            out["loss"] = R.text(f"{R.fmt(loss0)} → {R.fmt(last)}")
        if self.finetune is not None:
            out["finetune"] = R.text(f"{len(self.finetune.history)} epochs")
        out["interrupted"] = self.interrupted
        return out

    def __repr__(self) -> str:
        return R.short_repr("PruneResult", self._fields())

    def _repr_html_(self) -> str:
        return R.html_summary("PruneResult", self._fields(), self.history, "history (per stage)")


def _layer_targets(layer_sparsity: dict[str, float], stages: int, kind: str,
                   start: dict[str, float]) -> list[dict[str, float]]:
    per_layer = {n: S.schedule(s, stages, kind, start=min(start.get(n, 0.0), s))
                 for n, s in layer_sparsity.items()}
    return [{n: per_layer[n][i] for n in per_layer} for i in range(stages)]


def prune(model: nn.Module, criterion: str, *, sparsity: float | None = None,
          scope: str = "global", nm_layers=None, stages: int = 1,
          schedule: str = "exponential",
          lam: float = 0.0, batch=None, layer_sparsity: dict[str, float] | None = None,
          finetune: Recipe | None = None, train_data=None, val_data=None,
          finetune_stages: bool = False, seed: int = 0, inplace: bool = False,
          obs_update: bool = True, progress: bool = False,
          callback: Callable[[dict], bool | None] | None = None, loss="cross_entropy",
          output=None, device=None, on_interrupt: str = "raise", prunable=None,
          **options) -> PruneResult:
    """Prune ``model`` with ``criterion`` to ``sparsity`` in ``stages`` stages.

    Args:
        model: the network to prune; never modified unless ``inplace=True``. Masks already
            attached are kept (what they prune stays pruned).
        criterion: a name from :func:`prunelab.criteria.names`.
        sparsity: final total fraction of prunable weights pruned, in [0, 1).
        scope: "global", "layerwise" or "normalized" (see :func:`prunelab.selection.select`),
            or an N:M pattern such as ``"2:4"``: every group of m consecutive weights along a
            layer's input dimension keeps exactly the n highest-scoring ones (``sparsity`` None
            or ``1 - n/m``; λ and stages apply; :mod:`prunelab.semistructured`).
        nm_layers: with an N:M scope, the weights it applies to (the others are not pruned);
            None: all prunable weights, and one whose input dimension is not divisible by m
            raises ValueError naming it.
        stages: number of pruning stages π >= 1, re-scoring the masked model at each. With
            an N:M scope, stage i keeps n_i of every m (:func:`prunelab.semistructured.stage_ns`,
            n_i stepping down from m to n), so previously pruned weights stay pruned.
        schedule: "linear" or "exponential" (LM paper Algorithm 1; for N:M, of n_i).
        lam: step-size penalty λ >= 0 added to every score as λ/2·θ² (LM paper Sec. 3.2).
        batch: (x, y) used by data-dependent criteria and to record the loss per stage: tensors
            (x a tensor, a mapping -> ``model(**x)`` or a tuple), a Dataset or a DataLoader.
        layer_sparsity: explicit per-layer final sparsities (overrides ``sparsity``/``scope``).
        finetune: a training recipe; when given, the pruned model is fine-tuned at the end (and
            between stages when ``finetune_stages``) on ``train_data`` (with ``val_data``).
        seed: seed of stochastic criteria (stage i uses ``seed + i``) and of fine-tuning.
        inplace: prune ``model`` itself instead of a copy.
        obs_update: apply a criterion's weight update (OBS) after each mask choice.
        progress: show a progress bar over stages.
        callback: called with each stage's history row; returning True stops after that stage.
        loss: ``"cross_entropy"`` (per class or per token), ``"mse"`` or a callable
            ``(output, target) -> mean loss``: what the criteria model, the history records and
            fine-tuning minimises.
        output: optional ``model output -> tensor`` (default: tensor, first of a tuple, logits).
        device: where to prune (None: the model's device); the result lives there.
        prunable: which tensors are pruned (:func:`prunelab.graph.prunable_names`): None (the
            weights of Linear, Conv, attention projections and Linear-like layers), kinds among
            ``"linear"``, ``"conv"``, ``"attention"``, ``"embedding"``, ``"norm"`` and/or tensor
            names, or a callable ``(name, module, tensor) -> bool``. Unknown kinds or names
            raise ValueError listing the allowed ones.
        on_interrupt: what a KeyboardInterrupt (Jupyter's Interrupt) does. ``"raise"`` (default):
            the stages stop and the interrupt propagates; nothing of the caller's is changed
            (also with ``inplace=True``, unless it came during the final fine-tuning, which
            works on the pruned model itself). ``"return"``: return the stages finished so far
            with ``interrupted=True``. A ``callback`` returning True is not an interrupt: it
            always returns the stages so far.
        **options: passed to the criterion (e.g. ``signed=True``, ``mc_samples=1``); an option
            it does not take raises TypeError.

    Returns:
        :class:`PruneResult`.

    Raises:
        ValueError: invalid sparsity, scope, stages, schedule, λ, unknown criterion or layer,
            a data-dependent criterion without ``batch``, NaN weights; the model is untouched.
    """
    config = PruneConfig(criterion, sparsity=sparsity, layer_sparsity=layer_sparsity,
                         scope=scope, nm_layers=nm_layers, stages=stages, schedule=schedule,
                         lam=lam, seed=seed, options=options, loss=loss, output=output,
                         device=device, prunable=prunable)
    return prune_with(model, config, batch=batch, finetune=finetune, train_data=train_data,
                      val_data=val_data, finetune_stages=finetune_stages, inplace=inplace,
                      obs_update=obs_update, progress=progress, callback=callback,
                      on_interrupt=on_interrupt)


def prune_with(model: nn.Module, config: PruneConfig, *, batch=None,
               finetune: Recipe | None = None, train_data=None, val_data=None,
               finetune_stages: bool = False, inplace: bool = False, obs_update: bool = True,
               progress: bool = False,
               callback: Callable[[dict], bool | None] | None = None,
               on_interrupt: str = "raise") -> PruneResult:
    """:func:`prune` for a :class:`~prunelab.config.PruneConfig` (validated when it was built).

    Checks only what needs the model and the data (layer names, the batch, the fine-tuning
    data, finite weights), then runs the stages; see :func:`prune` for the arguments.
    """
    if not isinstance(config, PruneConfig):
        raise ValueError(f"config must be a prunelab.config.PruneConfig, got {config!r}")
    check_on_interrupt(on_interrupt)
    if isinstance(model, nn.Module):
        G.check_prunable(config.prunable, model)  # the names, now that the model is here
    with G.selecting(config.prunable):  # every prunable_names below sees config.prunable
        return _prune_with(model, config, batch=batch, finetune=finetune,
                           train_data=train_data, val_data=val_data,
                           finetune_stages=finetune_stages, inplace=inplace,
                           obs_update=obs_update, progress=progress, callback=callback,
                           on_interrupt=on_interrupt)


def _prune_with(model: nn.Module, config: PruneConfig, *, batch, finetune, train_data,
                val_data, finetune_stages, inplace, obs_update, progress, callback,
                on_interrupt) -> PruneResult:
    criterion, sparsity, layer_sparsity = config.criterion, config.sparsity, config.layer_sparsity
    stages, seed = config.stages, config.seed
    spec = C.spec(criterion)
    if inplace and M.has_torch_prune(model):
        raise ValueError("inplace=True on a model carrying torch.nn.utils.prune hooks: pass "
                         "inplace=False, or call prunelab.masks.import_torch_prune(model) first")
    model = M.import_torch_prune(model)  # torch.nn.utils.prune hooks -> prunelab masks (a copy)
    names = M.check_prunable(model)
    if layer_sparsity is not None:
        unknown = set(layer_sparsity) - set(names)
        if unknown:
            raise ValueError(f"layer_sparsity names unknown layers {sorted(unknown)}; prunable "
                             f"weights: {names}")
    objective = config.objective
    if finetune is not None:
        if not isinstance(finetune, Recipe):
            raise ValueError(f"finetune must be a prunelab.train.Recipe or None, got {finetune!r}")
        if train_data is None:
            raise ValueError("finetune needs train_data= (a Dataset or (x, y) tensors)")
    C.check_finite_weights(model)

    base_masks = M.current(model)
    work = G.plain_copy(model)
    if config.device is not None:
        work.to(config.device)
    if spec.needs_data or batch is not None:
        batch = C.check_batch(batch, criterion, work, objective)
    base_masks = {n: m.to(G.weight(work, n).device) for n, m in base_masks.items()}
    work.eval()
    for p in work.parameters():
        p.requires_grad_(True)
    cur = {n: base_masks.get(n, torch.ones_like(G.weight(work, n), dtype=torch.bool)) for n in names}
    start = M.sparsity(cur)
    nm_names, stage_nm = [], [None] * stages
    if config.nm is not None:
        # N:M (issue 16): stage i keeps n_i of every m in the N:M layers; the criteria see the
        # same fraction 1 - n_i/m of each of them (the others at their current sparsity).
        n_keep, m = config.nm
        nm_names = list(config.nm_layers) if config.nm_layers is not None else names
        unknown = set(nm_names) - set(names)
        if unknown:
            raise ValueError(f"nm_layers names unknown layers {sorted(unknown)}; prunable "
                             f"weights: {names}")
        nm_in = G.in_dims(work, nm_names)  # a transposed Conv1D groups along its dim 0
        NM.nm_select({n: cur[n] for n in nm_names}, n_keep, m,  # ValueError naming a layer
                     in_dims=nm_in)
        stage_nm = [f"{k}:{m}" for k in NM.stage_ns(n_keep, m, stages, config.schedule)]
        stage_targets = [None] * stages
        stage_layer_targets = [{n: 1.0 - k / m if n in nm_names
                                else 1.0 - float(cur[n].float().mean()) for n in names}
                               for k in NM.stage_ns(n_keep, m, stages, config.schedule)]
    elif layer_sparsity is not None:
        start_layer = {n: 1.0 - float(cur[n].float().mean()) for n in names}
        # Per stage: {layer: its sparsity after the stage}; None where a total is the target.
        stage_layer_targets = _layer_targets(layer_sparsity, stages, config.schedule, start_layer)
        stage_targets = [None] * stages
    else:
        if start > sparsity + 1e-12:
            raise ValueError(f"the model already has sparsity {start:.4f} > the requested "
                             f"{sparsity}; pruned weights cannot be revived")
        # Per stage: the total sparsity after the stage (LM paper Algorithm 1).
        stage_targets = S.schedule(sparsity, stages, config.schedule, start=start)
        stage_layer_targets = [None] * stages

    record = {**config.to_dict(), "examples": len(batch[1]) if batch is not None else 0,
              **config.options}
    if objective.name != "cross_entropy":
        record["loss"] = objective.name

    def batch_loss(m: nn.Module, data) -> float:
        return metrics_loss(m, data, loss=objective)
    # The loss after stage i is the loss the criterion of stage i+1 computes anyway (its forward
    # pass on the same batch): reuse it instead of an extra forward per stage. The last stage, or
    # a run with a callback (which wants its row at once), measures it directly.
    loss0 = math.nan
    pending: dict | None = None
    rows, scores, interrupted, changed = [], {}, False, False

    def finish(row: dict, value: float) -> None:
        row["loss"], row["delta_loss"] = value, abs(value - loss0)
    # Global scope: one StagedSelection keeps the survivors across stages (flat buffers reused,
    # cost shrinking with the survivors); same masks as select(..., previous=cur) stage by stage.
    selector = None
    if config.nm is None and layer_sparsity is None and config.scope == "global" \
            and len({m.device for m in cur.values()}) == 1:
        selector = S.StagedSelection({n: cur[n] for n in names})
        cur = selector.masks  # views the selector updates in place
    staged = False  # a selection made but its stage not finished (undone on interrupt)
    from tqdm.auto import tqdm

    bar = tqdm(total=stages, desc=f"prune {criterion}", disable=not progress, leave=False)
    try:
        for i in range(stages):
            t0 = time.perf_counter()
            target = stage_targets[i]
            # Trusted: the config was validated when built (no per-stage re-checks).
            result = C.compute(work, criterion, batch=batch, lam=config.lam, seed=seed + i,
                               sparsity=stage_layer_targets[i] if target is None else target,
                               scope=config.stage_scope, copy=False, loss=objective,
                               **config.options)
            scores = result.scores
            crit_loss = result.info.get("loss") if batch is not None else None
            if i == 0:
                loss0 = crit_loss if crit_loss is not None else (
                    batch_loss(work, batch) if batch is not None else math.nan)
            elif pending is not None:
                finish(pending, crit_loss if crit_loss is not None else batch_loss(prev_work, batch))
                pending = None
            if stage_nm[i] is not None:
                nm_scope = stage_nm[i]
                new = dict(cur)  # layers outside nm_layers (and stages with n_i = m) keep theirs
                if int(nm_scope.split(":")[0]) < m:
                    new.update(S.select({n: scores[n] for n in nm_names}, None, scope=nm_scope,
                                        previous={n: cur[n] for n in nm_names},
                                        in_dims=nm_in, _checked=True))
            elif selector is not None:
                staged = True
                new = selector.select(scores, target)
            else:
                new = S.select(scores, target, scope=config.scope,
                               layer_sparsity=stage_layer_targets[i], previous=cur,
                               _checked=True)
            updates = result.update(new) if (obs_update and result.update is not None) else {}
            steps = []
            # with the selector, only the weights pruned now are touched (those pruned before
            # are zero already): θ·0 written back (as w·mask writes it), ‖Δθ‖² = Σ θ² of them
            now = selector.pruned_now() if selector is not None and not updates else None
            with torch.no_grad():
                for n in names:
                    w = G.weight(work, n)
                    if n in updates:
                        w_new = updates[n].to(w.dtype) * new[n]
                        steps.append((w_new - w).square().sum())
                        w.copy_(w_new)
                    elif now is not None:
                        if now[n].numel():
                            flat = w.view(-1)
                            gone = flat.index_select(0, now[n])
                            steps.append(torch.dot(gone, gone))
                            flat.index_copy_(0, now[n], gone.mul_(0))
                    else:  # Δθ = −θ on the entries masked now: ‖Δθ‖² = ‖θ‖² − ‖θ ⊙ m‖²
                        flat = w.view(-1)
                        before = torch.dot(flat, flat)
                        w.mul_(new[n])
                        steps.append(before - torch.dot(flat, flat))
            step_sq = float(torch.stack(steps).sum()) if steps else 0.0
            changed = changed or bool(updates)
            cur, staged = new, False
            if finetune is not None and finetune_stages and i < stages - 1:
                tuned = M.apply(work, cur)
                fit(tuned, train_data, recipe=finetune, val=val_data, seed=seed, progress=False,
                    loss=objective)
                work = M.remove(tuned)
                work.eval()
                changed = True
            reached = selector.sparsity if selector is not None else M.sparsity(cur)
            row = {"stage": i + 1, "target_sparsity": reached if target is None else target,
                   "sparsity": reached, "loss": math.nan, "delta_loss": math.nan,
                   "step_norm": math.sqrt(step_sq), "seconds": time.perf_counter() - t0,
                   "examples": result.examples}
            rows.append(row)
            if batch is not None:
                if callback is not None or i == stages - 1 or not C.CRITERIA[criterion].needs_data:
                    finish(row, batch_loss(work, batch))
                else:
                    pending, prev_work = row, work
            bar.update(1)
            if callback is not None and callback(row):
                interrupted = True
                break
    except KeyboardInterrupt:
        if on_interrupt == "raise":  # only the private copy `work` was touched
            raise
        interrupted = True
        if staged:  # the stage's selection is not kept: its masks are the stage before's
            selector.undo()
    finally:
        bar.close()
    if selector is not None:
        cur = {n: m.clone() for n, m in cur.items()}  # not views into the selector's buffer
    if pending is not None:  # interrupted between stages
        finish(pending, batch_loss(work, batch))

    target_model = model if inplace else copy.deepcopy(model)
    if config.device is not None:
        target_model.to(config.device)
    if changed:
        M.load_dense(target_model, {k: v for k, v in work.state_dict().items()})
    M.apply(target_model, cur, inplace=True)
    history = pd.DataFrame(rows, columns=["stage", "target_sparsity", "sparsity", "loss",
                                          "delta_loss", "step_norm", "seconds", "examples"])
    tuned = None
    if finetune is not None and not interrupted:
        tuned = fit(target_model, train_data, recipe=finetune, val=val_data, seed=seed,
                    progress=progress, desc="fine-tune", loss=objective, on_interrupt=on_interrupt)
        interrupted = tuned.interrupted
    target_model.eval()
    return PruneResult(target_model, {n: m.clone() for n, m in cur.items()}, history, scores,
                       record, tuned, interrupted, {"loss0": loss0})
