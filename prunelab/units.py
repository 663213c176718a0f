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

The scores are the literal registry :data:`UNIT_SCORES` (one small function per base score of
MRP Table 1). The MRP penalty study (penalties during training, layer sets of Table 2,
consistency, performance profiles) is in :mod:`prunelab.mrp`.

Over 500 lines because the twelve scores, mean replacement and the masked and physical
surgery all work on the same :class:`Unit` bookkeeping of consumers, flattens and BatchNorms.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab.graph import PRUNABLE_TYPES, is_parametrized, layer_graph, plain_copy


__all__ = ["names", "UnitPruneResult", "Unit", "parse_score", "layer_units", "objective_of",
           "check_batch", "check_finite_layers", "unit_statistics", "score_rand", "score_norm",
           "score_rs", "score_mrs", "score_abs_rs", "score_abs_mrs", "UNIT_SCORES",
           "BASE_SCORES", "SCORES", "DATA_SCORES", "score_units", "score", "prune"]


def __dir__():
    return sorted(__all__)


def names() -> list[str]:
    """The 12 score tags of MRP Table 1: the base scores of :data:`UNIT_SCORES` and their
    ``bp_`` (mean-replacement) variants."""
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
class Unit:
    """A chosen layer and what its consumers see of it (from :func:`layer_units`).

    Attributes:
        module: Module name of the layer (``"features.0"``).
        weight: Its weight name in the layer graph.
        n: Number of units (output neurons / channels).
        consumers: ``(consumer module name, flatten size or None)`` for each layer reading it.
        bns: BatchNorm module names between the layer and its consumers.
    """

    module: str
    weight: str
    n: int
    consumers: list[tuple[str, int | None]]  # (consumer module name, flatten size or None)
    bns: list[str]


# --------------------------------------------------------------------------------- validation

def parse_score(score: str) -> tuple[str, bool]:
    """``(base score, mean replacement?)`` of a tag of :data:`SCORES` (``"bp_mrs"`` ->
    ``("mrs", True)``); ValueError listing the valid tags for anything else."""
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"unknown unit score {score!r}; valid names: {', '.join(SCORES)}")
    if score.startswith("bp_"):
        return score[3:], True
    return score, False


def layer_units(model: nn.Module, layers: Iterable[str] | None, example=None) -> list[Unit]:
    """The :class:`Unit` of each chosen layer (module names; default every prunable layer but
    the last), or ValueError for a layer whose units cannot be removed through its consumers.

    The consumers come from the layer graph: torch.fx where the model traces, else the autograd
    graph of one forward pass on ``example`` (model inputs: a tensor, mapping or tuple). A model
    that neither traces nor comes with an example is refused (ValueError): a chain guess in
    registration order would name wrong consumers (attention, residual blocks) and zero the
    wrong columns.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chain fallback's warning: refused below instead
        graph = layer_graph(model, example)
    if graph.source == "chain":
        raise ValueError(f"units: torch.fx cannot trace {type(model).__name__}, so its layer "
                         "graph must be read from one forward pass: pass batch=(x, y) (also for "
                         "the data-free scores); a guessed chain of layers is never used")
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
    def plain(layer) -> bool:  # units are rows of a (out, in, ...) nn.Linear/nn.Conv weight
        return layer.name.endswith(".weight") and isinstance(
            model.get_submodule(layer.module), PRUNABLE_TYPES)

    out = []
    for name in chosen:
        layer = by_module[name]
        if not plain(layer):
            raise ValueError(f"units: layer {name!r} ({type(model.get_submodule(name)).__name__}, "
                             f"tensor {layer.name!r}) is not an nn.Linear/nn.Conv weight; unit "
                             "pruning removes rows of nn.Linear/nn.Conv layers and columns of "
                             "their consumers only (attention projections and third-party "
                             "layers such as HuggingFace's Conv1D are not handled)")
        if layer.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped conv (groups={layer.groups}); unit "
                             "pruning supports groups=1 only")
        if layer.external_out or not layer.next:
            raise ValueError(f"units: layer {name!r}: its output reaches the model output or an "
                             "operation the layer graph cannot see through (attention, a "
                             "concatenation, a functional op), so its units cannot be removed "
                             "through consumer layers (the last layer's units are the classes); "
                             "name prunable layers with layers= (e.g. the first Linear of a "
                             "feed-forward block)")
        consumers, bns = [], []
        for e in layer.outputs:
            dst = graph[e.dst]
            if dst.prev != (layer.name,) or dst.external_in:
                raise ValueError(f"units: layer {name!r}: its consumer {dst.module!r} also "
                                 f"receives "
                                 f"{[p for p in dst.prev if p != layer.name] or 'other inputs'} "
                                 "(residual add or concatenation); unit pruning needs each "
                                 "consumer to read this layer alone")
            if dst.groups != 1:
                raise ValueError(f"layer {name!r}: consumer {dst.module!r} is a grouped conv")
            if not plain(dst):
                raise ValueError(f"units: layer {name!r}: its consumer {dst.module!r} is not an "
                                 f"nn.Linear/nn.Conv layer; unit pruning cannot remove its "
                                 f"input columns")
            consumers.append((dst.module, e.flatten))
            bns.extend(b for b in e.bns if b not in bns)
        out.append(Unit(name, layer.name, layer.out_size, consumers, bns))
    return out


def _of_layer(value, name: str):
    """A per-layer mapping's value for ``name``; a plain value as it is."""
    return value[name] if isinstance(value, Mapping) else value


def _count(n: int, name: str, fraction: float | None, count: int | None) -> int:
    if fraction is not None:
        k = int(math.floor(float(str(fraction)) * n + 0.5))  # np.float32(0.4) read as 0.4
    else:
        k = int(count)
    if k >= n:
        raise ValueError(f"layer {name!r}: pruning {k} of its {n} units would remove every "
                         f"unit (fraction={fraction}, count={count})")
    return k


# ------------------------------------------------------------------------------ statistics

def _as_units(x: Tensor, n: int, flatten: int | None, linear: bool = False) -> Tensor:
    """A consumer input as ``(N, n, positions)``: a Linear consumer reads units in its last
    dimension (a sequence ``(N, T, n)`` has T positions), a conv in dimension 1."""
    if x.dim() == 2:
        return x.reshape(x.shape[0], n, flatten or 1)
    if linear:
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    return x.flatten(2)


def objective_of(loss=None, output=None, loss_fn=None) -> B.Objective:
    """The :class:`prunelab.batches.Objective` of ``loss=``/``output=``; the older ``loss_fn``
    (a callable ``(output, y) -> mean loss``) is taken as ``loss=loss_fn``."""
    if loss_fn is not None:
        if loss not in (None, "cross_entropy"):
            raise ValueError(f"give loss= or loss_fn=, not both (got loss={loss!r})")
        if isinstance(loss_fn, B.Objective):
            return B.objective(loss_fn, output)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (output, y) -> mean loss, got "
                            f"{type(loss_fn).__name__}")
        loss = loss_fn
    return B.objective(loss, output)


def check_batch(model: nn.Module, batch, objective: B.Objective, what: str = "batch"):
    """``batch`` as ``(x, y)`` on the model's device and dtype, from (x, y) tensors, a Dataset or
    a DataLoader; ValueError/TypeError for an empty batch, NaN/inf inputs, inputs the model cannot
    take or targets that do not fit its outputs (one example is run first)."""
    x, y = B.as_batch(batch, what=what)
    B.check_inputs(x, f"{what} inputs")
    x, y = B.to_model(x, model), B.to_model(y, model)
    B.probe(model, x, y, objective, what=f"units: {what}")
    return x, y


def check_finite_layers(model: nn.Module, units: list[Unit]) -> None:
    """ValueError naming the chosen layers or consumers whose weights hold NaN or inf (their
    unit scores would be NaN and sort arbitrarily)."""
    bad = []
    for u in units:
        for name in (u.module, *(c for c, _ in u.consumers)):
            w = model.get_submodule(name).weight
            if not bool(torch.isfinite(w).all()) and name not in bad:
                bad.append(name)
    if bad:
        raise ValueError(f"units: the weights of layer(s) {bad} contain NaN or inf; refusing to "
                         "score their units")


def unit_statistics(model: nn.Module, units: list[Unit], batch, loss_fn, need_grad: bool):
    """Consumer inputs ``a`` (N, n, P), their means ``ā`` (broadcastable) and ``dL/da``, per
    chosen layer: ``{module: [(a, ā, dL/da or None) per consumer]}``.

    ``ā`` is per unit and flattened position for Linear consumers, per channel (over examples
    and positions, MRP Sec. 3.2) for conv consumers and for Linear consumers of sequences (a bias
    cannot vary per token). ``L`` is the mean loss over the batch. ``batch`` is ``(x, y)`` on the
    model's device (see :func:`check_batch`); ``loss_fn`` a :class:`prunelab.batches.Objective`
    or a callable ``(output, y) -> mean loss``. The model runs in eval mode with every module's
    own training flag restored afterwards.

    Raises:
        ValueError: statistics holding NaN or inf (a NaN batch or weight), naming the layer.
    """
    obj = loss_fn if isinstance(loss_fn, B.Objective) else objective_of(loss_fn=loss_fn)
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
    try:
        with B.evaluating(model), torch.enable_grad():
            # inputs that need a gradient, so dL/da exists even with frozen parameters
            inp = B.map_tensors(x, lambda t: t.detach().clone().requires_grad_(
                need_grad and t.is_floating_point()))
            out = obj.forward(model, inp)
            grads = {}
            if need_grad:
                loss = obj.value(out, y)
                names = sorted(wanted)
                gs = torch.autograd.grad(loss, [captured[c] for c in names], allow_unused=True)
                grads = {c: (torch.zeros_like(captured[c]) if g is None else g)
                         for c, g in zip(names, gs)}
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for u in units:
        per = []
        for cname, flat in u.consumers:
            linear = isinstance(model.get_submodule(cname), nn.Linear)
            a = _as_units(captured[cname].detach(), u.n, flat, linear)
            by_channel = captured[cname].dim() > 2
            mean = a.mean(dim=(0, 2), keepdim=True) if by_channel else a.mean(0, keepdim=True)
            g = _as_units(grads[cname], u.n, flat, linear) if need_grad else None
            if not bool(torch.isfinite(a).all()) or (g is not None
                                                     and not bool(torch.isfinite(g).all())):
                raise ValueError(f"units: the activations or gradients of layer {u.module!r} "
                                 "(as its consumer reads them) hold NaN or inf on this batch; "
                                 "check the batch and the weights")
            per.append((a, mean, g))
        stats[u.module] = per
    return stats


# ------------------------------------------------------------------------- scores (Table 1)
# Each base score of MRP Table 1 is a small function ``(model, unit, stats, gen) -> (n,)``
# (lower = pruned first). ``stats`` is :func:`unit_statistics` (``None`` for data-free scores);
# ``gen`` is the one generator of a call, drawn in layer order.

def score_rand(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``rand`` (MRP Table 1): uniform in [0, 1), drawn from the call's generator."""
    return torch.rand(u.n, generator=gen, dtype=torch.float64)


def score_norm(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``norm`` (MRP Table 1): L2 norm of the unit's incoming weights (row / filter; no bias)."""
    w = model.get_submodule(u.module).weight.detach()
    return w.reshape(u.n, -1).double().norm(dim=1)


def _taylor(u: Unit, stats, mean_replaced: bool) -> Tensor:
    """Per-example first-order loss change ``Σ_p Δa·∂L/∂a``, (N, n) float64: ``Δa = ā - a``
    (mean replacement, MRP App. 6.1 Eq. 5) or ``Δa = 0 - a`` (removal)."""
    per_example = 0.0
    for a, mean, g in stats[u.module]:
        delta = (mean - a) if mean_replaced else -a
        per_example = per_example + (delta * g).sum(dim=2)  # (N, n): Σ_p Δa·∂L/∂a
    return per_example.double()


def score_rs(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``rs``, removal saliency (MRP Table 1, Sec. 3): ``Σ_i Σ_p (0 - a)·∂L/∂a``, signed."""
    return _taylor(u, stats, False).sum(0)


def score_mrs(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``mrs``, mean replacement saliency (MRP Table 1, App. 6.1 Eq. 5 without absolute
    values): ``Σ_i Σ_p (ā - a)·∂L/∂a``, signed."""
    return _taylor(u, stats, True).sum(0)


def score_abs_rs(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``abs_rs`` (MRP Table 1, Sec. 3.4): ``Σ_i |Σ_p (0 - a)·∂L/∂a|``, absolute per example."""
    return _taylor(u, stats, False).abs().sum(0)


def score_abs_mrs(model: nn.Module, u: Unit, stats, gen: torch.Generator) -> Tensor:
    """``abs_mrs`` (MRP Table 1, Sec. 3.4, App. 6.1 Eq. 5): ``Σ_i |Σ_p (ā - a)·∂L/∂a|``."""
    return _taylor(u, stats, True).abs().sum(0)


#: The base scores of MRP Table 1, by tag (lower = pruned first).
UNIT_SCORES: dict[str, Callable[..., Tensor]] = {
    "rand": score_rand,
    "norm": score_norm,
    "abs_rs": score_abs_rs,
    "abs_mrs": score_abs_mrs,
    "rs": score_rs,
    "mrs": score_mrs,
}
#: Base score names of MRP Table 1 (without the ``bp_`` prefix).
BASE_SCORES = tuple(UNIT_SCORES)
#: Every valid score tag: the base names and their ``bp_`` (mean-replacement) variants.
SCORES = BASE_SCORES + tuple(f"bp_{s}" for s in BASE_SCORES)
#: Base scores that need activations and gradients (:func:`unit_statistics` with gradients).
DATA_SCORES = frozenset({"abs_rs", "abs_mrs", "rs", "mrs"})


def score_units(model: nn.Module, units: list[Unit], base: str, stats, seed: int) -> dict:
    """``{module: scores}`` of base score ``base`` (a key of :data:`UNIT_SCORES`) for each
    :class:`Unit`; ``stats`` from :func:`unit_statistics` for the scores of :data:`DATA_SCORES`."""
    if base not in UNIT_SCORES:
        raise ValueError(f"unknown base unit score {base!r}; valid names: "
                         f"{', '.join(UNIT_SCORES)}")
    fn = UNIT_SCORES[base]
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for u in units:
        s = fn(model, u, stats, gen).detach().cpu()
        if s.shape != (u.n,):
            raise ValueError(f"unit score {base!r} returned shape {tuple(s.shape)} for layer "
                             f"{u.module!r}, expected ({u.n},)")
        if torch.isnan(s).any():  # NaN would sort last and keep the unit
            raise ValueError(f"unit score {base!r} is NaN for layer {u.module!r} (units "
                             f"{torch.nonzero(torch.isnan(s)).flatten().tolist()[:8]})")
        out[u.module] = s
    return out


def _given_scores(unit_scores: Mapping[str, Tensor], units: list[Unit]) -> dict:
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

def _columns(n: int, flat: int | None, idx: list[int], device=None) -> Tensor:
    """Consumer input columns of units ``idx`` (blocks of ``flat`` columns after a flatten)."""
    if flat is None:
        return torch.tensor(idx, dtype=torch.long, device=device)
    return (torch.tensor(idx, dtype=torch.long, device=device)[:, None] * flat
            + torch.arange(flat, device=device)[None, :]).reshape(-1)


@torch.no_grad()
def _propagate(model: nn.Module, u: Unit, idx: list[int], stats) -> Tensor:
    """MRP Eq. 4: ``b += W[:, unit] · ā`` in every consumer; returns the means used."""
    means = None
    for (cname, flat), (a, mean, _) in zip(u.consumers, stats[u.module]):
        m = model.get_submodule(cname)
        mean = mean[0]  # (n, P) or (n, 1)
        means = mean if means is None else means
        w = m.weight
        sel = torch.tensor(idx, dtype=torch.long, device=mean.device)
        if isinstance(m, nn.Linear):
            cols = _columns(u.n, flat, idx, w.device)
            delta = w[:, cols] @ mean[sel].reshape(-1).to(w.dtype)
        else:
            delta = (w[:, sel].flatten(2).sum(2) * mean[sel, 0].to(w.dtype)).sum(1)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        m.bias.add_(delta.to(device=m.bias.device, dtype=m.bias.dtype))
    return means


@torch.no_grad()
def _mask(model: nn.Module, u: Unit, idx: list[int], masks: dict[str, Tensor]) -> None:
    for cname, flat in u.consumers:
        m = model.get_submodule(cname)
        key = f"{cname}.weight"
        mask = masks.setdefault(key, torch.ones_like(m.weight, dtype=torch.bool))
        cols = (_columns(u.n, flat, idx, m.weight.device) if isinstance(m, nn.Linear)
                else torch.tensor(idx, device=m.weight.device))
        mask[:, cols] = False
        m.weight[:, cols] = 0


def _keep(n: int, idx: list[int]) -> Tensor:
    drop = set(idx)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


@torch.no_grad()
def _remove(model: nn.Module, u: Unit, idx: list[int]) -> None:
    """Physically drop units ``idx``: rows, bias and BN entries, consumer columns/channels."""
    m = model.get_submodule(u.module)
    keep = _keep(u.n, idx).to(m.weight.device)
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
          batch=None, seed: int = 0, loss="cross_entropy", output=None,
          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Per-unit scores of MRP Table 1 (lower = pruned first); see :func:`prune` for definitions
    and for ``batch``, ``loss``, ``output`` and ``loss_fn``. The model is never modified (its
    modules' training flags included)."""
    base, _ = parse_score(score)
    obj = objective_of(loss, output, loss_fn)
    if base in DATA_SCORES and batch is None:
        raise ValueError(f"score {score!r} is data-dependent: pass batch=(x, y), a Dataset or a "
                         "DataLoader")
    batch = None if batch is None else check_batch(model, batch, obj)
    units = layer_units(model, layers, None if batch is None else B.take(batch[0], slice(0, 1)))
    check_finite_layers(model, units)
    stats = (unit_statistics(model, units, batch, obj, True) if base in DATA_SCORES else None)
    return score_units(model, units, base, stats, seed)


def prune(model: nn.Module, *, fraction: float | None = None, count: int | None = None,
          score: str = "bp_abs_mrs", layers: Sequence[str] | None = None, batch=None,
          seed: int = 0, inplace: bool = False, physical: bool = False,
          loss="cross_entropy", output=None,
          loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
          unit_scores: Mapping[str, Tensor] | None = None,
          mean_replacement: bool | None = None, stats=None) -> UnitPruneResult:
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
        batch: ``(x, y)`` tensors (``x`` a tensor, a mapping -> ``model(**x)`` or a tuple), a
            Dataset or a DataLoader; needed by the Taylor scores and by every ``bp_`` score.
            Moved to the model's device and dtype; one example is run first, so labels out of
            range, a wrong input width or float labels are named here.
        seed: Seed of ``rand``.
        inplace: Modify ``model`` itself (not allowed for models carrying parametrizations).
        physical: Remove the units, giving a smaller dense model with the same function.
        loss: ``"cross_entropy"`` (default; per-token ``(N, T, C)`` outputs too), ``"mse"`` or a
            callable ``(output, y) -> mean loss`` (see :mod:`prunelab.batches`).
        output: Optional callable ``model output -> tensor``.
        loss_fn: Older name of a callable ``loss`` (``loss_fn(output, y)``, a mean).
        unit_scores: Precomputed scores, module name -> one value per unit (lower = pruned
            first), e.g. from the structured criteria of :mod:`prunelab.structured`; they must
            cover exactly the chosen layers. ``score`` is then only a label and is not checked.
        mean_replacement: Apply mean replacement (MRP Eq. 4); default: whether ``score`` starts
            with ``bp_``.
        stats: Precomputed :func:`unit_statistics` of the dense ``model`` for these layers
            (shared by callers that prune one model many times); replaces ``batch``'s pass.

    Returns:
        :class:`UnitPruneResult`.

    Raises:
        ValueError: Bad fraction/count, unknown score or layer, missing, empty or NaN batch,
            NaN weights or scores (named by layer), pruning every unit of a layer, or a layer
            whose units cannot be removed through its consumers. The model is unchanged.
    """
    if unit_scores is None:
        base, bp = parse_score(score)
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
        if fraction is not None and not (isinstance(v, numbers.Real) and not isinstance(v, bool)
                                         and 0.0 < float(v) < 1.0):
            raise ValueError(f"fraction{where} must be in (0, 1), got {v!r}")
        if count is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)
                                  or v < 0):
            raise ValueError(f"count{where} must be a non-negative int, got {v!r}")
    needs_data = base in DATA_SCORES or bp
    if needs_data and batch is None and stats is None:
        raise ValueError(f"score {score!r} is data-dependent (Taylor scores and bp_ mean "
                         "replacement need activations): pass batch=(x, y)")
    if inplace and is_parametrized(model):
        raise ValueError("inplace=True on a model with parametrizations (masks) is not "
                         "supported; pass inplace=False to get a pruned plain copy")
    obj = objective_of(loss, output, loss_fn)
    examples = 0
    if batch is not None and (stats is None or not needs_data):
        batch = check_batch(model, batch, obj)
        examples = B.length(batch[0])
    units = layer_units(model, layers, None if batch is None else B.take(batch[0], slice(0, 1)))
    counts = {u.module: _count(u.n, u.module, _of_layer(fraction, u.module),
                               _of_layer(count, u.module)) for u in units}
    if unit_scores is None:
        check_finite_layers(model, units)
    if stats is None and needs_data:
        stats = unit_statistics(model, units, batch, obj, base in DATA_SCORES)
    elif stats:
        examples = int(next(iter(stats.values()))[0][0].shape[0])
    if unit_scores is None:
        scores = score_units(model, units, base, stats, seed)
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
    return UnitPruneResult(model=target, pruned=pruned, scores=scores,
                           sizes={u.module: u.n for u in units}, examples=examples, score=score,
                           mean_replacement=bp, physical=physical, masks=masks, means=means)
