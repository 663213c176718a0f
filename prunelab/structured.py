"""Structured (channel / neuron) pruning criteria and the polarization regularizer.

A *unit* is an output neuron of a ``Linear`` or an output channel of a ``Conv``, as in
:mod:`prunelab.units`, which does the removal (zeroing the consumers' input columns, or
``physical=True`` for a smaller dense model). This module only says *which* units to remove:
:func:`score` gives one score per unit (higher = more important, kept; the order of the units of
the layer), and :func:`prune` hands them to :func:`prunelab.units.prune` as ``unit_scores``.

Criteria (:data:`CRITERIA`), with ``W[k]`` the incoming weights of unit ``k`` (row ``k`` of a
Linear weight, filter ``k`` of a conv; bias excluded):

- ``random``: uniform in [0, 1) from ``seed``, one generator drawn in layer order (RP of Park et
  al. 2020, App. H).
- ``mp-l1`` / ``mp-l2``: ``Σ |W[k]|`` / ``sqrt(Σ W[k]²)``, the ℓ1 / ℓ2 aggregate of the weight
  magnitudes of the channel (MP-ℓ1 / MP-ℓ2, Park et al. 2020, App. H; Li et al. 2017).
- ``lap-l1`` / ``lap-l2``: the same aggregates of the per-weight LAP scores ``L(w)`` of the
  unit's incoming weights, ``Σ_{w∈W[k]} L(w)`` / ``sqrt(Σ_{w∈W[k]} L(w)²)`` (LAP-ℓ1 / LAP-ℓ2, Park
  et al. 2020, App. H, with ``L`` of Eq. 5, Eq. 8 with batch normalisation, from
  ``prunelab.score(model, "lap")``). Every ``L(w)`` of row ``k`` carries the factor
  ``||W_{i+1}[:, k]||`` of the unit's *outgoing* weights and the BN scale of unit ``k``, so the
  aggregate sees both sides of the unit; ``L`` is in the units of ``|w|``, so a layer without
  neighbours gets exactly the MP aggregate.
- ``hrank``: the average over the batch of the matrix rank of the unit's ``h × w`` output
  feature map (HRank, Lin et al. CVPR 2020, Sec. 3, Eq. 7-9: a filter whose feature maps have low
  rank carries little information and is pruned first). The feature map is the conv's own
  output ``O_j`` (the paper's notation, bias included, before BatchNorm and activation), in eval
  mode; rank by :func:`torch.linalg.matrix_rank` with its default tolerance. The authors' code
  hooks the ReLU after the conv instead, where dead channels get rank 0; the two can differ.
  ``Conv2d`` layers only.
- ``bn-scale``: ``|γ_k|`` of the BatchNorm directly after the layer (network slimming, Liu et
  al. 2017; polarization pruning, Zhuang et al. NeurIPS 2020). Train with :func:`polarization`
  as a regularizer (``prunelab.train.fit(..., regularizer=...)``) and prune with
  :func:`prune_by_threshold` at :func:`polarization_threshold`.

For ``hrank`` and ``bn-scale`` the default layers (``layers=None``) are the default layers of
:func:`prunelab.units.prune` (every prunable layer but the last) that the criterion applies to
(``Conv2d`` layers / layers with a BatchNorm directly after); naming another layer explicitly is a
``ValueError``.

Over 500 lines because the polarization regularizer and its threshold belong with the
``bn-scale`` criterion they train for.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import criteria, units
from prunelab import graph as G


__all__ = ["random_scores", "mp_l1", "mp_l2", "lap_l1", "lap_l2", "hrank", "bn_scale",
           "CRITERIA", "names", "score", "prune", "polarization", "polarization_regularizer",
           "gammas", "polarization_threshold", "prune_by_threshold", "compare"]


def __dir__():
    return sorted(__all__)

_BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def _check_criterion(criterion) -> str:
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"unknown structured criterion {criterion!r}; valid names: "
                         f"{', '.join(CRITERIA)}")
    return criterion


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def _inputs(batch, criterion: str, model: nn.Module):
    """The inputs of ``batch`` ((x, y), a Dataset, a DataLoader or x alone) on the model's device
    and dtype, or ValueError/TypeError saying what is needed."""
    if batch is None:
        raise ValueError(f"criterion {criterion!r} is data-dependent: pass batch=(x, y), a "
                         "Dataset or a DataLoader")
    if isinstance(batch, Tensor):
        if len(batch) == 0:
            raise ValueError("batch is empty (0 examples)")
        x = batch
    else:
        x, _ = B.as_batch(batch, what="batch")
    B.check_inputs(x, "batch inputs")
    return B.to_model(x, model)


def _example(batch, model: nn.Module):
    """One example of ``batch``'s inputs (for the layer graph of a model fx cannot trace)."""
    if batch is None:
        return None
    x = batch if isinstance(batch, Tensor) else B.as_batch(batch, 1, what="batch")[0]
    return B.to_model(B.take(x, slice(0, 1)), model)


def _chosen(model: nn.Module, criterion: str, layers, batch=None) -> list:
    """The :mod:`prunelab.units` layers to score, restricted to those the criterion applies to."""
    explicit = layers is not None
    chosen = units.layer_units(model, layers, _example(batch, model))
    if criterion == "hrank":
        ok = [u for u in chosen if isinstance(model.get_submodule(u.module), nn.Conv2d)]
        what = "Conv2d layers (HRank ranks h×w feature maps)"
    elif criterion == "bn-scale":
        graph = G.layer_graph(model, _example(batch, model))
        ok = [u for u in chosen if graph[u.weight].bn is not None]
        what = "layers with a BatchNorm directly after them"
    else:
        return chosen
    if explicit and len(ok) != len(chosen):
        bad = [u.module for u in chosen if u not in ok]
        raise ValueError(f"criterion {criterion!r} applies to {what} only; not to {bad}")
    if not ok:
        raise ValueError(f"criterion {criterion!r} applies to {what} only, and the model has "
                         "none among its prunable layers (all but the last)")
    return ok


@torch.no_grad()
def _mean_ranks(model: nn.Module, chosen: list, x) -> dict[str, Tensor]:
    """Mean matrix rank of each channel's feature map over the examples of ``x`` (HRank Eq. 9)."""
    sums: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def fn(module, args, out):
            if out.dim() != 4:
                raise ValueError(f"layer {name!r}: HRank needs (N, C, h, w) feature maps, got "
                                 f"shape {tuple(out.shape)}")
            # ranks computed in the hook, so no feature map outlives its layer
            sums[name] = torch.linalg.matrix_rank(out.detach()).double().sum(0).cpu()
        return fn

    for u in chosen:
        handles.append(model.get_submodule(u.module).register_forward_hook(hook(u.module)))
    try:
        with B.evaluating(model):
            B.call(model, x)
    finally:
        for h in handles:
            h.remove()
    return {u.module: sums[u.module] / B.length(x) for u in chosen}



# ------------------------------------------------------------------------------ the criteria
# Each criterion is a small function ``(model, chosen, batch, seed) -> {module: scores}``
# (higher = kept) over the chosen :class:`prunelab.units.Unit` layers.

def random_scores(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``random``: uniform in [0, 1) from ``seed``, one generator drawn in layer order (RP of
    Park et al. 2020, App. H)."""
    gen = torch.Generator().manual_seed(seed)
    return {u.module: torch.rand(u.n, generator=gen, dtype=torch.float64) for u in chosen}


def _aggregate(per_weight, chosen: list, ord_: int) -> dict[str, Tensor]:
    """ℓ1 / ℓ2 norm of each unit's row of per-weight values (Park et al. 2020, App. H)."""
    return {u.module: torch.linalg.vector_norm(per_weight[u.weight].detach().double()
                                               .reshape(u.n, -1), ord=ord_, dim=1).cpu()
            for u in chosen}


def _magnitudes(model: nn.Module, chosen: list) -> dict[str, Tensor]:
    return {u.weight: G.weight(model, u.weight).detach().abs() for u in chosen}


def mp_l1(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``mp-l1``: ``Σ |W[k]|`` over the unit's incoming weights (MP-ℓ1, Park et al. 2020,
    App. H; the filter ℓ1 norm of Li et al. ICLR 2017, "Pruning Filters for Efficient
    ConvNets", Sec. 3.1)."""
    return _aggregate(_magnitudes(model, chosen), chosen, 1)


def mp_l2(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``mp-l2``: ``sqrt(Σ W[k]²)`` over the unit's incoming weights (MP-ℓ2, Park et al. 2020,
    App. H; the ℓ2 variant of Li et al. 2017, Sec. 4.1)."""
    return _aggregate(_magnitudes(model, chosen), chosen, 2)


def lap_l1(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``lap-l1``: ``Σ_{w∈W[k]} L(w)`` of the LAP scores (Park et al. 2020, Eq. 5 / Eq. 8 with
    BN) of the unit's incoming weights (LAP-ℓ1, App. H)."""
    return _aggregate(criteria.score(model, "lap"), chosen, 1)


def lap_l2(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``lap-l2``: ``sqrt(Σ_{w∈W[k]} L(w)²)`` of the LAP scores (Park et al. 2020, Eq. 5 /
    Eq. 8 with BN) of the unit's incoming weights (LAP-ℓ2, App. H)."""
    return _aggregate(criteria.score(model, "lap"), chosen, 2)


def hrank(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``hrank``: mean over the batch of the matrix rank of each channel's ``h × w`` output
    feature map (HRank, Lin et al. CVPR 2020, Sec. 3, Eqs. 7-9); ``Conv2d`` layers only."""
    return _mean_ranks(model, chosen, _inputs(batch, "hrank", model))


def bn_scale(model: nn.Module, chosen: list, batch, seed: int) -> dict[str, Tensor]:
    """``bn-scale``: ``|γ_k|`` of the BatchNorm directly after the layer (network slimming,
    Liu et al. ICCV 2017, Sec. 3; polarization pruning, Zhuang et al. NeurIPS 2020, Sec. 3)."""
    graph = G.layer_graph(model, _example(batch, model))
    out = {}
    for u in chosen:
        bn = model.get_submodule(graph[u.weight].bn)
        if bn.weight is None:
            raise ValueError(f"layer {u.module!r}: its BatchNorm {graph[u.weight].bn!r} has "
                             "no scale γ (affine=False)")
        out[u.module] = bn.weight.detach().abs().double().cpu().clone()
    return out


#: Every structured criterion, by name (higher score = unit kept).
CRITERIA: dict[str, Callable[..., dict[str, Tensor]]] = {
    "random": random_scores,
    "mp-l1": mp_l1,
    "mp-l2": mp_l2,
    "lap-l1": lap_l1,
    "lap-l2": lap_l2,
    "hrank": hrank,
    "bn-scale": bn_scale,
}


def names() -> list[str]:
    """Every structured criterion name (:data:`CRITERIA`)."""
    return list(CRITERIA)


def score(model: nn.Module, criterion: str, *, layers: Sequence[str] | str | None = None,
          batch=None, seed: int = 0) -> dict[str, Tensor]:
    """One score per unit of each chosen layer (higher = more important, kept).

    Definitions are in the module docstring (Park et al. 2020 App. H for ``mp-*``, ``lap-*``
    and ``random``; HRank Sec. 3; network slimming / polarization for ``bn-scale``).

    Args:
        model: Any module whose chosen layers :func:`prunelab.units.prune` can prune; never
            modified (attached masks are honoured: the effective weights are
            scored). HRank runs it in eval mode and restores the modes.
        criterion: A name of :data:`CRITERIA`.
        layers: Module names (``"features.0"``); default as :func:`prunelab.units.prune` (every
            prunable layer but the last), narrowed to the applicable layers for ``hrank`` and
            ``bn-scale``.
        batch: ``(x, y)`` or ``x``; needed by ``hrank`` only (the others are data-free).
        seed: Seed of ``random``.

    Returns:
        ``{module name: float64 CPU tensor (units,)}`` in the order of the chosen layers, unit
        ``k`` at index ``k`` (the ordering :func:`prunelab.units.prune` uses).

    Raises:
        ValueError: Unknown criterion or layer, missing batch for ``hrank``, a layer the
            criterion does not apply to.
    """
    criterion = _check_criterion(criterion)
    seed = _check_seed(seed)
    chosen = _chosen(model, criterion, layers, batch)
    return CRITERIA[criterion](model, chosen, batch, seed)


def prune(model: nn.Module, criterion: str, *, fraction: float | None = None,
          count: int | None = None, layers: Sequence[str] | str | None = None, batch=None,
          seed: int = 0, mean_replacement: bool = False, physical: bool = False,
          loss="cross_entropy", output=None) -> units.UnitPruneResult:
    """Prune the lowest-scoring units of each chosen layer under a structured criterion.

    Scores come from :func:`score`; the removal is :func:`prunelab.units.prune` (its
    ``score`` field is ``criterion``): the same ``fraction`` / ``count`` in every chosen layer,
    ties broken by the lower unit index.

    Args:
        model: Never modified; the result holds a pruned copy.
        criterion: A name of :data:`CRITERIA`.
        fraction: Fraction of the units of each layer, in (0, 1), rounded to the nearest count.
            Exactly one of ``fraction`` and ``count``.
        count: Number of units to prune in each layer.
        layers: Module names; default as in :func:`score`.
        batch: ``(x, y)`` tensors, a Dataset or a DataLoader; needed by ``hrank`` and by mean
            replacement.
        seed: Seed of ``random``.
        mean_replacement: Add the pruned units' batch means to the consumers' biases (MRP Eq. 4).
        physical: Remove the units (a smaller dense model) instead of zeroing consumer columns.
        loss, output: How the batch's targets are checked against the model's outputs (see
            :func:`prunelab.units.prune`).

    Returns:
        :class:`prunelab.units.UnitPruneResult`.
    """
    scores = score(model, criterion, layers=layers, batch=batch, seed=seed)
    return units.prune(model, fraction=fraction, count=count, score=criterion,
                       layers=list(scores), batch=_unit_batch(batch, mean_replacement),
                       seed=seed, physical=physical, unit_scores=scores,
                       mean_replacement=mean_replacement, loss=loss, output=output)


def _unit_batch(batch, mean_replacement: bool):
    """The batch :func:`prunelab.units.prune` gets: (x, y) data (required for mean
    replacement); an input tensor alone only serves HRank."""
    if not mean_replacement:  # still handed over: it gives the graph of an untraceable model
        return None if isinstance(batch, Tensor) else batch
    if batch is None or isinstance(batch, Tensor):
        raise ValueError("mean replacement needs batch=(x, y), a Dataset or a DataLoader, got "
                         f"{'None' if batch is None else 'an input tensor without targets'}")
    return batch


# ============================================================= polarization (Zhuang et al. 2020)

def _bns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BN_TYPES) and m.weight is not None]


def polarization(model: nn.Module, t: float = 1.0, *, scope: str = "layer") -> Tensor:
    """Polarization regularizer, Zhuang et al. (NeurIPS 2020) Eq. 2, summed over BatchNorms.

    ``R_s(γ) = t·||γ||₁ − ||γ − γ̄·1||₁`` over the scale factors ``γ`` of a BatchNorm (``γ̄`` their
    mean). ``scope="layer"`` (default) returns ``Σ_BN R_s(γ_BN)``, each BN with its own mean;
    ``scope="global"`` applies Eq. 2 once to all γ of the network concatenated (the paper writes
    γ for all neurons of the network). Every affine BatchNorm of the model counts.

    Differentiable in the γ (the subgradient at kinks is torch's: ``d|x|/dx = 0`` at 0). Add
    ``λ·polarization(model, t)`` to the training loss (Eq. 1), e.g. with
    ``prunelab.train.fit(..., regularizer=polarization_regularizer(lam, t))``; the paper's
    defaults are ``t`` about 1 (t ∈ (0, 1] keeps some units, Sec. 3.2) and ``λ`` about 1e-4
    with the mean loss.

    Returns:
        A scalar tensor (dtype of the γ).

    Raises:
        ValueError: The model has no affine BatchNorm, ``t`` is not finite, bad ``scope``.
    """
    _check_polarization(t, scope)
    gs = [m.weight for _, m in _bns(model)]
    if not gs:
        raise ValueError("polarization needs BatchNorm scale factors γ; the model has no affine "
                         "BatchNorm")
    if scope == "global":
        gs = [torch.cat([g.reshape(-1) for g in gs])]
    return sum(t * g.abs().sum() - (g - g.mean()).abs().sum() for g in gs)


def _check_polarization(t, scope) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t must be a finite number, got {t!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")


def polarization_regularizer(lam: float, t: float = 1.0, *,
                             scope: str = "layer") -> Callable[[nn.Module], Tensor]:
    """``model -> lam · polarization(model, t)``, for ``prunelab.train.fit(regularizer=...)``."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    _check_polarization(t, scope)  # now, not at the first training step

    def regularizer(model: nn.Module) -> Tensor:
        return lam * polarization(model, t, scope=scope)

    return regularizer


def gammas(model: nn.Module) -> dict[str, Tensor]:
    """``{BatchNorm module name: |γ|}`` (detached copies) for every affine BatchNorm."""
    return {n: m.weight.detach().abs().clone() for n, m in _bns(model)}


def polarization_threshold(source: nn.Module | Mapping[str, Tensor] | Tensor | Iterable[float],
                           *, min_fraction: float = 0.05) -> float:
    """A threshold in the gap between the two clusters of polarized |γ| (Zhuang et al. Sec. 4).

    All |γ| are pooled (every affine BatchNorm of a model, every tensor of a mapping) and
    sorted, ``v_0 <= ... <= v_{n-1}``. The threshold is the midpoint of the widest gap
    ``v_{i+1} − v_i`` among those with at least ``max(1, ceil(min_fraction · n))`` values on
    each side, so a lone outlier at either end cannot be taken for a cluster (the paper picks
    the threshold by eye in the valley between the peak near 0 and the other peak; a widest
    gap is that valley once training has polarized γ). Ties go to the lowest gap.

    Args:
        source: A model, ``{name: γ}`` or a tensor / sequence of γ (signs are ignored).
        min_fraction: Smallest share of the values each cluster must hold, in [0, 0.5).

    Returns:
        The threshold (a float); prune with ``|γ| < threshold``.

    Raises:
        ValueError: Fewer than two values per side, all values equal (no gap), NaN values, or
            ``min_fraction`` out of range.
    """
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) \
            or not 0.0 <= min_fraction < 0.5:
        raise ValueError(f"min_fraction must be in [0, 0.5), got {min_fraction!r}")
    if isinstance(source, nn.Module):
        parts = list(gammas(source).values())
        if not parts:
            raise ValueError("the model has no affine BatchNorm: no γ to threshold")
    elif isinstance(source, Mapping):
        parts = [torch.as_tensor(v).detach() for v in source.values()]
    else:
        parts = [torch.as_tensor(source).detach()]
    v = torch.cat([p.reshape(-1).double().abs().cpu() for p in parts]) if parts \
        else torch.zeros(0, dtype=torch.float64)
    if torch.isnan(v).any():
        raise ValueError("γ contains NaN")
    n = v.numel()
    side = max(1, math.ceil(min_fraction * n))
    if n < 2 * side:
        raise ValueError(f"need at least {2 * side} values of γ (min_fraction={min_fraction}) "
                         f"to find a gap between two clusters, got {n}")
    v = torch.sort(v).values
    gaps = v[side:n - side + 1] - v[side - 1:n - side]  # gap i between v[i] and v[i+1]
    if gaps.max() <= 0:
        raise ValueError("all candidate γ are equal: there is no gap to put a threshold in")
    i = int(torch.argmax(gaps)) + side - 1  # argmax returns the first maximum
    return float((v[i] + v[i + 1]) / 2)


def prune_by_threshold(model: nn.Module, threshold: float, *,
                       layers: Sequence[str] | str | None = None, batch=None,
                       mean_replacement: bool = False, physical: bool = False,
                       loss="cross_entropy", output=None) -> units.UnitPruneResult:
    """Prune every unit whose BatchNorm scale satisfies ``|γ| < threshold`` (Zhuang et al. 2020,
    network slimming), a different number of units per layer.

    Layers as for ``bn-scale`` in :func:`score` (default: every prunable layer but the last with
    a BatchNorm directly after it). Never removes every unit of a layer: if all ``|γ|`` of a layer
    are below the threshold it raises ``ValueError`` naming the layer and its largest ``|γ|``
    (lower the threshold or leave the layer out) rather than silently keeping some units.
    All layers are pruned at once, with statistics (mean replacement) from the dense model, as
    :func:`prunelab.units.prune` does. ``result.score`` is ``"bn-scale"``, ``result.scores`` the
    ``|γ|``.

    Raises:
        ValueError: Non-finite or negative threshold, a layer without BatchNorm, a layer that
            would lose every unit, missing batch for mean replacement.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    scores = score(model, "bn-scale", layers=layers, batch=batch)
    counts = {}
    for name, s in scores.items():
        counts[name] = int((s < threshold).sum())
        if counts[name] == s.numel():
            raise ValueError(f"threshold {threshold!r} would prune every unit of layer {name!r} "
                             f"(its largest |γ| is {float(s.max()):.6g}); lower the threshold "
                             "or leave the layer out")
    batch = _unit_batch(batch, mean_replacement)
    if mean_replacement and batch is None:
        raise ValueError("mean replacement needs batch=(x, y)")
    chosen = units.layer_units(model, list(scores), _example(batch, model))
    # Dense-model statistics shared by every per-layer call: the same result as one call that
    # prunes all layers at once (each consumer reads one chosen layer only, see
    # units.layer_units).
    obj = units.objective_of(loss, output)
    stats = (units.unit_statistics(model, chosen, units.check_batch(model, batch, obj), obj, False)
             if mean_replacement else None)
    result, target = None, model
    for name in scores:
        r = units.prune(target, count=counts[name], score="bn-scale", layers=[name],
                        batch=batch, physical=physical, unit_scores={name: scores[name]},
                        mean_replacement=mean_replacement, inplace=result is not None,
                        loss=loss, output=output,
                        stats=stats)
        target = r.model
        if result is None:
            result = r
        else:
            for field in ("pruned", "scores", "sizes", "masks", "means"):
                getattr(result, field).update(getattr(r, field))
    result.model = target
    return result


# ==================================================================== comparison (App. H tables)

def compare(model: nn.Module, *, criteria: Sequence[str] = ("random", "mp-l1", "mp-l2",
                                                            "lap-l1", "lap-l2"),
            fractions: Sequence[float] = (0.1, 0.3, 0.5), layers: Sequence[str] | None = None,
            batch, eval_data, mean_replacement: Sequence[bool] = (False, True),
            seed: int = 0, loss="cross_entropy", output=None):
    """One-shot channel pruning of ``model`` with each structured criterion at each fraction,
    with and without mean replacement, evaluated before any fine-tuning (the comparison of Park
    et al. 2020, App. H, Tables 17-18, which report errors after retraining).

    Args:
        model: Never modified.
        criteria: Names of :data:`CRITERIA` (``hrank`` / ``bn-scale`` need matching layers).
        fractions: Fractions of the units of each chosen layer, each in (0, 1).
        layers: Module names (default: every prunable layer but the last).
        batch: ``(x, y)`` scoring batch (HRank, LAP's BN factors do not need ``y``; mean
            replacement does).
        eval_data: ``(x, y)`` or a Dataset for :func:`prunelab.train.evaluate`.
        mean_replacement: The settings of mean replacement to try.
        seed: Seed of ``random``.
        loss, output: The loss evaluated and how outputs are read (see
            :mod:`prunelab.batches`); ``accuracy``/``error`` are NaN for a loss that does not
            classify.

    Returns:
        Tidy frame: ``criterion, fraction, mean_replacement, pruned, units, loss, accuracy,
        error, penalty`` (``loss - dense loss`` on ``eval_data``); a ``dense`` row first.
    """
    import pandas as pd

    from prunelab.train import evaluate

    for c in criteria:
        _check_criterion(c)
    dense = evaluate(model, eval_data, loss=loss, output=output)
    rows = [{"criterion": "dense", "fraction": 0.0, "mean_replacement": False, "pruned": 0,
             "units": 0, "loss": dense["loss"], "accuracy": dense["accuracy"],
             "error": dense["error"], "penalty": 0.0}]
    for c in criteria:
        scores = score(model, c, layers=layers, batch=batch, seed=seed)
        for f in fractions:
            for bp in mean_replacement:
                res = units.prune(model, fraction=f, score=c, layers=list(scores),
                                  batch=_unit_batch(batch, bp), seed=seed, unit_scores=scores,
                                  mean_replacement=bp, loss=loss, output=output)
                ev = evaluate(res.model, eval_data, loss=loss, output=output)
                rows.append({"criterion": c, "fraction": float(f), "mean_replacement": bool(bp),
                             "pruned": sum(len(v) for v in res.pruned.values()),
                             "units": sum(res.sizes.values()), "loss": ev["loss"],
                             "accuracy": ev["accuracy"], "error": ev["error"],
                             "penalty": ev["loss"] - dense["loss"]})
    return pd.DataFrame(rows)
