"""Unit pruning with mean replacement (Mean Replacement Pruning, MRP; ICLR 2019 submission).

A *unit* is an output neuron of a ``Linear`` or an output channel of a ``Conv``. In each chosen
layer the units with the lowest scores are pruned (MRP Sec. 3, Eq. 2); the twelve scores of MRP
Table 1 are registered under their plot tags (``rand``, ``norm``, ``abs_rs``, ``abs_mrs``, ``rs``,
``mrs`` and the ``bp_`` variants, which add mean replacement, MRP Sec. 3.2 Eq. 4).

How a unit is removed
    The unit's *outgoing* effect is zeroed: the input columns of every consumer layer that carry
    the unit (for conv -> flatten -> Linear the whole block of columns of that channel; for
    conv -> conv the input channel) are set to 0. This is exactly "removing the unit" whatever
    the activation is (zeroing the unit's own weights would leave ``f(0)``, which is not 0 for
    sigmoid or after BatchNorm). The unit's own weights are left as they are; ``physical=True``
    instead removes the unit's row/filter, its bias and BatchNorm entries and the consumer's
    columns/channels, giving a smaller dense model with the same function.

Mean replacement (MRP Eq. 4, justified by Sec. 3.3)
    The removed unit's contribution is replaced by its mean on the batch: ``b_consumer +=
    W_consumer[:, unit] * mean(a_unit)``, where ``a`` is the unit's output as the consumer sees it
    (the consumer's input, captured with a forward hook: after activation, BatchNorm and pooling).
    A consumer without a bias gets one. For a Linear consumer behind a flatten, each flattened
    position of the channel gets its own mean (the exact optimal constant, Sec. 3.3). For a conv
    consumer the channel is replaced by its mean over examples *and* positions (MRP Sec. 3.2),
    which adds ``mean * sum(kernel)`` to the bias; at zero-padded borders the true replacement
    would cover only part of the kernel, so there it is an approximation.

Statistics (means, gradients) come from one forward/backward pass of the *dense* model in eval
mode on ``batch`` with the mean cross-entropy loss, for all chosen layers at once, as in MRP's
experiments where all layers are pruned by the same fraction at once.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.graph import is_parametrized, layer_graph, plain_copy

#: Base score names of MRP Table 1 (without the ``bp_`` prefix).
BASE_SCORES = ("rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs")
#: Every valid score tag: the base names and their ``bp_`` (mean-replacement) variants.
SCORES = BASE_SCORES + tuple(f"bp_{s}" for s in BASE_SCORES)
_DATA_SCORES = {"abs_rs", "abs_mrs", "rs", "mrs"}


def names() -> list[str]:
    """The 12 score tags of MRP Table 1."""
    return list(SCORES)


@dataclass
class UnitPruneResult:
    """What :func:`prune` did.

    Attributes:
        model: The pruned model (a copy unless ``inplace=True``).
        pruned: Module name -> sorted list of pruned unit indices (indices of the original layer).
        scores: Module name -> one score per unit (float64; lower = pruned first).
        sizes: Module name -> number of units of the original layer.
        examples: Number of examples in the batch used (0 for data-free scores without batch).
        score: The score tag used.
        mean_replacement: Whether mean replacement (``bp_``) was applied.
        physical: Whether the units were physically removed.
        masks: For masked (not physical) pruning: consumer weight name -> bool mask (True = kept)
            of the zeroed input columns, in the DESIGN.md mask convention.
        means: Module name -> the batch means that were propagated (``bp_`` only), shaped
            ``(units, positions)`` (positions = 1 for conv consumers and Linear units).
    """

    model: nn.Module
    pruned: dict[str, list[int]]
    scores: dict[str, Tensor]
    sizes: dict[str, int]
    examples: int
    score: str
    mean_replacement: bool
    physical: bool
    masks: dict[str, Tensor] = field(default_factory=dict)
    means: dict[str, Tensor] = field(default_factory=dict)

    def table(self):
        """Tidy frame, one row per layer: ``layer, units, pruned, fraction, score``."""
        import pandas as pd

        rows = [{"layer": name, "units": self.sizes[name], "pruned": len(idx),
                 "fraction": len(idx) / self.sizes[name], "score": self.score}
                for name, idx in self.pruned.items()]
        return pd.DataFrame(rows, columns=["layer", "units", "pruned", "fraction", "score"])


@dataclass
class _Unit:
    """A chosen layer and what its consumers see of it."""

    module: str
    weight: str
    n: int
    consumers: list[tuple[str, int | None]]  # (consumer module name, flatten size or None)
    bns: list[str]


# --------------------------------------------------------------------------------- validation

def _parse_score(score: str) -> tuple[str, bool]:
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"unknown unit score {score!r}; valid names: {', '.join(SCORES)}")
    if score.startswith("bp_"):
        return score[3:], True
    return score, False


def _units(model: nn.Module, layers: Iterable[str] | None) -> list[_Unit]:
    graph = layer_graph(model)
    by_module = {graph[w].module: graph[w] for w in graph.names}
    if layers is None:
        chosen = [graph[w].module for w in graph.names[:-1]]
    else:
        if isinstance(layers, str):
            layers = [layers]
        chosen = list(dict.fromkeys(layers))
        for name in chosen:
            if name not in by_module:
                raise ValueError(f"unknown layer {name!r}; prunable layers (module names): "
                                 f"{', '.join(by_module)}")
    out = []
    for name in chosen:
        layer = by_module[name]
        if layer.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped conv (groups={layer.groups}); unit "
                             "pruning supports groups=1 only")
        if layer.external_out or not layer.next:
            raise ValueError(f"layer {name!r}: its output reaches the model output or an "
                             "operation the layer graph cannot see through, so its units cannot "
                             "be removed through consumer layers (the last layer's units are the "
                             "classes)")
        consumers, bns = [], []
        for e in layer.outputs:
            dst = graph[e.dst]
            if dst.prev != (layer.name,) or dst.external_in:
                raise ValueError(f"layer {name!r}: its consumer {dst.module!r} also receives "
                                 f"{[p for p in dst.prev if p != layer.name] or 'other inputs'} "
                                 "(residual add or concatenation); unit pruning needs each "
                                 "consumer to read this layer alone")
            if dst.groups != 1:
                raise ValueError(f"layer {name!r}: consumer {dst.module!r} is a grouped conv")
            consumers.append((dst.module, e.flatten))
            bns.extend(b for b in e.bns if b not in bns)
        out.append(_Unit(name, layer.name, layer.out_size, consumers, bns))
    return out


def _of_layer(value, name: str):
    """A per-layer mapping's value for ``name``; a plain value as it is."""
    return value[name] if isinstance(value, Mapping) else value


def _count(n: int, name: str, fraction: float | None, count: int | None) -> int:
    if fraction is not None:
        k = int(math.floor(fraction * n + 0.5))
    else:
        k = int(count)
    if k >= n:
        raise ValueError(f"layer {name!r}: pruning {k} of its {n} units would remove every "
                         f"unit (fraction={fraction}, count={count})")
    return k


# ------------------------------------------------------------------------------ statistics

def _as_units(x: Tensor, n: int, flatten: int | None) -> Tensor:
    """A consumer input as ``(N, n, positions)``."""
    if x.dim() == 2:
        return x.reshape(x.shape[0], n, flatten or 1)
    return x.flatten(2)


def _statistics(model: nn.Module, units: list[_Unit], batch, loss_fn, need_grad: bool):
    """Consumer inputs ``a`` (N, n, P), their means ``ā`` (broadcastable) and ``dL/da``.

    ``ā`` is per unit and flattened position for Linear consumers, per channel (over examples
    and positions, MRP Sec. 3.2) for conv consumers. ``L`` is the mean loss over the batch.
    """
    x, y = batch
    captured: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def fn(module, args):
            captured[name] = args[0]
        return fn

    wanted = {c for u in units for c, _ in u.consumers}
    for name in wanted:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(need_grad and x.is_floating_point())
            out = model(inp)
            grads = {}
            if need_grad:
                loss = loss_fn(out, y)
                names = sorted(wanted)
                gs = torch.autograd.grad(loss, [captured[c] for c in names], allow_unused=True)
                grads = {c: (torch.zeros_like(captured[c]) if g is None else g)
                         for c, g in zip(names, gs)}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    stats = {}
    for u in units:
        per = []
        for cname, flat in u.consumers:
            a = _as_units(captured[cname].detach(), u.n, flat)
            conv_consumer = captured[cname].dim() > 2
            mean = a.mean(dim=(0, 2), keepdim=True) if conv_consumer else a.mean(0, keepdim=True)
            g = _as_units(grads[cname], u.n, flat) if need_grad else None
            per.append((a, mean, g))
        stats[u.module] = per
    return stats


def _unit_scores(model: nn.Module, units: list[_Unit], base: str, stats, seed: int) -> dict:
    scores = {}
    gen = torch.Generator().manual_seed(int(seed))
    for u in units:
        if base == "rand":
            s = torch.rand(u.n, generator=gen, dtype=torch.float64)
        elif base == "norm":
            w = model.get_submodule(u.module).weight.detach()
            s = w.reshape(u.n, -1).double().norm(dim=1)
        else:
            per_example = 0.0
            for a, mean, g in stats[u.module]:
                delta = (mean - a) if base.endswith("mrs") else -a
                per_example = per_example + (delta * g).sum(dim=2)  # (N, n): Σ_p Δa·∂L/∂a
            per_example = per_example.double()
            s = per_example.abs().sum(0) if base.startswith("abs_") else per_example.sum(0)
        scores[u.module] = s.detach().cpu()
    return scores


def _given_scores(unit_scores: Mapping[str, Tensor], units: list[_Unit]) -> dict:
    wanted = [u.module for u in units]
    if set(unit_scores) != set(wanted):
        raise ValueError(f"unit_scores must have exactly the chosen layers {wanted}, got "
                         f"{sorted(unit_scores)}")
    out = {}
    for u in units:
        s = torch.as_tensor(unit_scores[u.module]).detach().reshape(-1).double().cpu()
        if s.numel() != u.n:
            raise ValueError(f"unit_scores[{u.module!r}] has {s.numel()} values, the layer has "
                             f"{u.n} units")
        if torch.isnan(s).any():
            raise ValueError(f"unit_scores[{u.module!r}] contains NaN")
        out[u.module] = s
    return out


def _lowest(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores; ties broken by the lower index (stable sort)."""
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:k].tolist())


# ------------------------------------------------------------------------------ surgery

def _columns(n: int, flat: int | None, idx: list[int]) -> Tensor:
    """Consumer input columns of units ``idx`` (blocks of ``flat`` columns after a flatten)."""
    if flat is None:
        return torch.tensor(idx, dtype=torch.long)
    return (torch.tensor(idx, dtype=torch.long)[:, None] * flat
            + torch.arange(flat)[None, :]).reshape(-1)


@torch.no_grad()
def _propagate(model: nn.Module, u: _Unit, idx: list[int], stats) -> Tensor:
    """MRP Eq. 4: ``b += W[:, unit] · ā`` in every consumer; returns the means used."""
    means = None
    for (cname, flat), (a, mean, _) in zip(u.consumers, stats[u.module]):
        m = model.get_submodule(cname)
        mean = mean[0]  # (n, P) or (n, 1)
        means = mean if means is None else means
        sel = torch.tensor(idx, dtype=torch.long)
        w = m.weight
        if isinstance(m, nn.Linear):
            cols = _columns(u.n, flat, idx)
            delta = w[:, cols] @ mean[sel].reshape(-1).to(w.dtype)
        else:
            delta = (w[:, sel].flatten(2).sum(2) * mean[sel, 0].to(w.dtype)).sum(1)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        m.bias.add_(delta.to(m.bias.device))
    return means


@torch.no_grad()
def _mask(model: nn.Module, u: _Unit, idx: list[int], masks: dict[str, Tensor]) -> None:
    for cname, flat in u.consumers:
        m = model.get_submodule(cname)
        key = f"{cname}.weight"
        mask = masks.setdefault(key, torch.ones_like(m.weight, dtype=torch.bool))
        cols = _columns(u.n, flat, idx) if isinstance(m, nn.Linear) else torch.tensor(idx)
        mask[:, cols] = False
        m.weight[:, cols] = 0


def _keep(n: int, idx: list[int]) -> Tensor:
    drop = set(idx)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


@torch.no_grad()
def _remove(model: nn.Module, u: _Unit, idx: list[int]) -> None:
    """Physically drop units ``idx``: rows, bias and BN entries, consumer columns/channels."""
    keep = _keep(u.n, idx)
    m = model.get_submodule(u.module)
    m.weight = nn.Parameter(m.weight[keep].clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias[keep].clone(), requires_grad=m.bias.requires_grad)
    if isinstance(m, nn.Linear):
        m.out_features = len(keep)
    else:
        m.out_channels = len(keep)
    for bname in u.bns:
        bn = model.get_submodule(bname)
        for attr in ("weight", "bias"):
            p = getattr(bn, attr)
            if p is not None:
                setattr(bn, attr, nn.Parameter(p[keep].clone(), requires_grad=p.requires_grad))
        for attr in ("running_mean", "running_var"):
            if getattr(bn, attr) is not None:
                setattr(bn, attr, getattr(bn, attr)[keep].clone())
        bn.num_features = len(keep)
    for cname, flat in u.consumers:
        c = model.get_submodule(cname)
        if isinstance(c, nn.Linear):
            cols = _columns(u.n, flat, keep.tolist()) if flat else keep
            c.weight = nn.Parameter(c.weight[:, cols].clone(), requires_grad=c.weight.requires_grad)
            c.in_features = len(cols)
        else:
            c.weight = nn.Parameter(c.weight[:, keep].clone(), requires_grad=c.weight.requires_grad)
            c.in_channels = len(keep)


# ------------------------------------------------------------------------------ public API

def score(model: nn.Module, score: str = "abs_mrs", *, layers: Sequence[str] | None = None,
          batch=None, seed: int = 0,
          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Per-unit scores of MRP Table 1 (lower = pruned first); see :func:`prune` for definitions."""
    base, _ = _parse_score(score)
    units = _units(model, layers)
    if base in _DATA_SCORES and batch is None:
        raise ValueError(f"score {score!r} is data-dependent: pass batch=(x, y)")
    stats = (_statistics(model, units, batch, loss_fn or F.cross_entropy, base in _DATA_SCORES)
             if base in _DATA_SCORES else None)
    return _unit_scores(model, units, base, stats, seed)


def prune(model: nn.Module, *, fraction: float | None = None, count: int | None = None,
          score: str = "bp_abs_mrs", layers: Sequence[str] | None = None, batch=None,
          seed: int = 0, inplace: bool = False, physical: bool = False,
          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
          unit_scores: Mapping[str, Tensor] | None = None,
          mean_replacement: bool | None = None, _stats=None) -> UnitPruneResult:
    """Prune the lowest-scoring units of each chosen layer (MRP Sec. 3, Eq. 2).

    Scores (MRP Table 1 and Sec. 3.4; App. 6.1 Eqs. 5-6), with ``a`` a unit's output as its
    consumer sees it, ``g = ∂L/∂a`` for the mean loss ``L`` over the batch, sums over positions
    ``p`` of a conv unit (or the flattened positions of a channel) and over examples ``i``:

    - ``rs`` (removal saliency): ``Σ_i Σ_p (0 - a)·g``, the first-order Taylor prediction of the
      loss change when the unit is set to 0. Signed, so the units whose removal is predicted to
      *lower* the loss most are pruned first (MRP Sec. 3: lowest score pruned).
    - ``mrs`` (mean replacement saliency, App. 6.1 Eq. 5 without absolute values):
      ``Σ_i Σ_p (ā - a)·g``, the prediction for replacing the unit by its mean ``ā``.
    - ``abs_rs`` / ``abs_mrs``: ``E_i |Σ_p Δa·∂l_i/∂a|`` — Sec. 3.4 writes ``E_{i~Ds}|∇_a L ⊙ Δa|``,
      the absolute value *per example* before averaging over examples (as Molchanov et al. 2016,
      who average positions inside the absolute value). As ``∂l_i/∂a_i = N·g_i`` for the loss
      ``l_i`` of example ``i``, this equals ``Σ_i |Σ_p Δa·g|``.
    - ``norm``: L2 norm of the unit's incoming weights (its weight row / filter; bias excluded).
    - ``rand``: uniform in [0, 1) from ``seed`` (one generator, drawn in layer order).
    - ``bp_<score>``: the same score, then mean replacement (Eq. 4) after removing the units.

    Args:
        model: Model whose prunable layers form a chain around the chosen layers (each consumer
            reads the chosen layer alone; residual adds raise ``ValueError``).
        fraction: Fraction of the units of each layer to prune, in (0, 1); rounded to the nearest
            count. Exactly one of ``fraction`` and ``count``. A mapping module name -> fraction
            gives each layer its own (its keys are then the layers; ``layers`` may be omitted).
        count: Number of units to prune in each layer, or a mapping module name -> count.
        score: A tag of :data:`SCORES`.
        layers: Module names (``"features.0"``); default every prunable layer but the last.
        batch: ``(x, y)``; needed by the Taylor scores and by every ``bp_`` score.
        seed: Seed of ``rand``.
        inplace: Modify ``model`` itself (not allowed for models carrying parametrizations).
        physical: Remove the units, giving a smaller dense model with the same function.
        loss_fn: ``loss_fn(output, y)``, a mean over the batch; default cross-entropy.
        unit_scores: Precomputed scores, module name -> one value per unit (lower = pruned
            first), e.g. from the structured criteria of :mod:`prunelab.structured`; they must
            cover exactly the chosen layers. ``score`` is then only a label and is not checked.
        mean_replacement: Apply mean replacement (MRP Eq. 4); default: whether ``score`` starts
            with ``bp_``.

    Returns:
        :class:`UnitPruneResult`.

    Raises:
        ValueError: Bad fraction/count, unknown score or layer, missing batch, pruning every
            unit of a layer, or a layer whose units cannot be removed through its consumers.
            The model is unchanged.
    """
    if unit_scores is None:
        base, bp = _parse_score(score)
    else:
        if not isinstance(score, str):
            raise ValueError(f"score must be a str label, got {score!r}")
        base, bp = "given", score.startswith("bp_")
    if mean_replacement is not None:
        bp = bool(mean_replacement)
    if (fraction is None) == (count is None):
        raise ValueError(f"give exactly one of fraction and count (got fraction={fraction!r}, "
                         f"count={count!r})")
    per_layer = fraction if fraction is not None else count
    if isinstance(per_layer, Mapping):  # one value per layer: the layers are its keys
        if not per_layer:
            raise ValueError("a per-layer fraction/count mapping must name at least one layer")
        if layers is None:
            layers = list(per_layer)
        elif isinstance(layers, str) or set(layers) != set(per_layer):
            raise ValueError(f"the per-layer {'fraction' if fraction is not None else 'count'} "
                             f"names layers {sorted(per_layer)}, but layers={layers!r}; give "
                             "the same layers (or leave layers=None)")
    values = per_layer.items() if isinstance(per_layer, Mapping) else [(None, per_layer)]
    for name, v in values:
        where = f"[{name!r}]" if name is not None else ""
        if fraction is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and 0.0 < float(v) < 1.0):
            raise ValueError(f"fraction{where} must be in (0, 1), got {v!r}")
        if count is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"count{where} must be a non-negative int, got {v!r}")
    needs_data = base in _DATA_SCORES or bp
    if needs_data and batch is None and _stats is None:
        raise ValueError(f"score {score!r} is data-dependent (Taylor scores and bp_ mean "
                         "replacement need activations): pass batch=(x, y)")
    if inplace and is_parametrized(model):
        raise ValueError("inplace=True on a model with parametrizations (masks) is not "
                         "supported; pass inplace=False to get a pruned plain copy")
    units = _units(model, layers)
    counts = {u.module: _count(u.n, u.module, _of_layer(fraction, u.module),
                               _of_layer(count, u.module)) for u in units}

    if _stats is not None:
        stats = _stats
    else:
        stats = (_statistics(model, units, batch, loss_fn or F.cross_entropy,
                             base in _DATA_SCORES) if needs_data else None)
    if unit_scores is None:
        scores = _unit_scores(model, units, base, stats, seed)
    else:
        scores = _given_scores(unit_scores, units)
    pruned = {u.module: _lowest(scores[u.module], counts[u.module]) for u in units}

    if inplace:
        target = model
    else:
        target = plain_copy(model) if is_parametrized(model) else copy.deepcopy(model)
    means, masks = {}, {}
    if bp:  # on the full-size weights, before any column is dropped
        for u in units:
            if pruned[u.module]:
                means[u.module] = _propagate(target, u, pruned[u.module], stats)
    for u in units:
        if pruned[u.module] and not physical:
            _mask(target, u, pruned[u.module], masks)
    if physical:
        for u in units:
            if pruned[u.module]:
                _remove(target, u, pruned[u.module])
    examples = int(batch[0].shape[0]) if batch is not None else 0
    if examples == 0 and stats:
        examples = int(next(iter(stats.values()))[0][0].shape[0])
    return UnitPruneResult(model=target, pruned=pruned, scores=scores,
                           sizes={u.module: u.n for u in units}, examples=examples, score=score,
                           mean_replacement=bp, physical=physical, masks=masks, means=means)


# ------------------------------------------------------------------ penalties during training

def _loss(model: nn.Module, batch, loss_fn) -> float:
    """Mean loss of ``model`` on ``batch`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(loss_fn(model(batch[0]), batch[1]))
    finally:
        model.train(was_training)


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
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None):
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
            _parse_score(s)
        if not scores:
            raise ValueError("scores must name at least one score tag")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("batch must be a fixed sample (x, y)")
        self.batch = (batch[0], batch[1])
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
        self.loss_fn = loss_fn or F.cross_entropy
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
        x, y = self.batch
        n, size = len(y), self.finetune_batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        for _ in range(self.finetune_steps):
            if size is None or size >= n:
                xb, yb = x, y
            else:
                idx = torch.randperm(n, generator=gen)[:size]
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            self.loss_fn(model(xb), yb).backward()
            opt.step()
            with torch.no_grad():
                for p, m in targets:
                    p.mul_(m.to(p.dtype))

    def measure(self, model: nn.Module, step: int) -> list[dict]:
        """Measure now (whatever ``step`` is) and return the new rows."""
        dense = plain_copy(model) if is_parametrized(model) else copy.deepcopy(model)
        for p in dense.parameters():
            p.grad = None
        train_mode = model.training
        new = []
        with torch.random.fork_rng(devices=[]):
            loss_dense = _loss(dense, self.batch, self.loss_fn)
            # one forward/backward for every score: the statistics only depend on the dense copy
            stats = _statistics(dense, _units(dense, self.layers), self.batch, self.loss_fn,
                                any(_parse_score(t)[0] in _DATA_SCORES for t in self.scores))
            self.sq_activations[int(step)] = {
                name: (per[0][0].double() ** 2).mean(dim=(0, 2)).cpu()
                for name, per in stats.items()}
            for tag in self.scores:
                res = prune(dense, fraction=self.fraction, score=tag, layers=self.layers,
                            batch=self.batch, seed=self.seed + int(step), loss_fn=self.loss_fn,
                            _stats=stats)
                loss_pruned = _loss(res.model, self.batch, self.loss_fn)
                loss_ft = math.nan
                if self.finetune_steps > 0:
                    self._finetune(res.model, res.masks, train_mode, step)
                    loss_ft = _loss(res.model, self.batch, self.loss_fn)
                self.sizes.update(res.sizes)
                chosen = self.selected.setdefault(tag, {})
                for name, idx in res.pruned.items():
                    chosen.setdefault(name, set()).update(idx)
                self.history.append((int(step), tag, {k: list(v) for k, v in res.pruned.items()}))
                base, bp = _parse_score(tag)
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
                  finetune_lr: float = 1e-3, seed: int = 0, progress: bool = False
                  ) -> PenaltyStudy:
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

    Returns:
        :class:`PenaltyStudy`. An interrupt (Jupyter's Interrupt) stops training; the
        measurements taken so far are kept in the returned frame.
    """
    import pandas as pd

    from prunelab.train import fit

    available = globals()["layer_sets"](model)
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
                  step_callback=callback, desc="train + penalties")
    frames = [rec.frame().assign(seed=seed, layer_set=name, fraction=f)
              for (name, f), rec in recorders.items()]
    frame = pd.concat(frames, ignore_index=True)
    front = ["seed", "layer_set", "fraction"]
    frame = frame[front + [c for c in frame.columns if c not in front]]
    return PenaltyStudy(frame, recorders, trained, history)
