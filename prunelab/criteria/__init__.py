"""Pruning criteria: ``(model, batch) -> scores``, one registry, looked up by a short name.

Every criterion is a function ``fn(model, *, batch, masks, seed, sparsity, scope, **options)``
returning ``dict[name, Tensor]`` (higher = more important, kept) or a :class:`ScoreResult` when it
also proposes a weight update for the kept weights (OBS). The model it receives is a plain module in
eval mode whose pruned weights are already zero; it must not modify it (use
``torch.autograd.grad``, never ``.backward()``). ``sparsity``/``scope`` are the target of the
current pruning step, for the criteria that prune in an inner loop (iterative SynFlow, the ordered
LAP variants); the others ignore them.

:func:`score` validates the input, calls the criterion on a safe view of the caller's model, checks
the scores and adds the step-size penalty λ/2·θ² (LM paper Sec. 3.2), so λ → ∞ recovers MP's
order for any criterion.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab import selection as S

__all__ = ["names", "score", "compute", "spec", "get", "CRITERIA", "Spec", "ScoreResult",
           "options_of", "check_options", "check_batch", "check_lam", "check_finite_weights",
           "check_scores", "check_masks"]


def __dir__():
    return sorted(__all__)


Scores = G.Scores
Masks = G.Masks


@dataclass(frozen=True)
class Spec:
    """Where a criterion lives and what it needs. ``needs_data``: it reads a (x, y) batch."""

    module: str
    function: str
    needs_data: bool
    summary: str
    uses_target: bool = False


@dataclass
class ScoreResult:
    """Scores plus an optional update of the kept weights once the mask is chosen (OBS).

    ``update(masks) -> {name: new weight}`` returns full weight tensors for the layers it changes.
    """

    scores: Scores
    update: Callable[[Masks], dict[str, Tensor]] | None = None
    examples: int = 0
    info: dict = field(default_factory=dict)


# One literal registry (easy to grep); modules import lazily so `import prunelab` stays fast.
CRITERIA: dict[str, Spec] = {
    "random": Spec("basic", "random", False, "uniform random scores from `seed`"),
    "mp": Spec("basic", "magnitude", False, "|θ| (Han et al. 2015)"),
    "lap": Spec("lookahead", "lap", False, "lookahead distortion, Park et al. 2020 Eq. 5 (Eq. 8 with BN)"),
    "lfp": Spec("lookahead", "lfp", False, "lookahead forward only (the succeeding layer), Park et al. Sec. 2.3"),
    "lbp": Spec("lookahead", "lbp", False, "lookahead backward only (the preceding layer), Park et al. Sec. 2.3"),
    "lap-forward": Spec("lookahead_variants", "lap_forward", False, "LAP layer by layer from input to output", True),
    "lap-backward": Spec("lookahead_variants", "lap_backward", False, "LAP layer by layer from output to input", True),
    "lap-forward-seq": Spec("lookahead_variants", "lap_forward_seq", False, "sequential LAP-forward", True),
    "lap-backward-seq": Spec("lookahead_variants", "lap_backward_seq", False, "sequential LAP-backward", True),
    "lap-act": Spec("lookahead_variants", "lap_act", True, "LAP weighted by activation probabilities, Park et al. App. F"),
    "lap-all": Spec("lookahead_variants", "lap_all", False, "LAP over all layers of the block, Park et al. App. J"),
    "obd+lap": Spec("lookahead_variants", "obd_lap", True, "OBD saliency with lookahead neighbours, Park et al."),
    "obd": Spec("loss_model", "obd", True, "½·G_kk·θ_k², GGN diagonal (LM paper Eq. 3, App. A)"),
    "lm": Spec("loss_model", "lm", True, "linear model |g_k·θ_k| (LM paper Eq. 6)"),
    "qm": Spec("loss_model", "qm", True, "quadratic model |−g_k·θ_k + ½G_kk·θ_k²| (LM paper Eq. 5)"),
    "snip": Spec("gradient", "snip", True, "|g ⊙ θ|, Lee et al. 2019"),
    "grasp": Spec("gradient", "grasp", True, "−θ ⊙ Hg, Wang et al. 2020"),
    "synflow": Spec("gradient", "synflow", False, "iterative synaptic flow, Tanaka et al. 2020", True),
    "taylor-fo": Spec("gradient", "taylor_fo", True, "(g·θ)², Molchanov et al. 2019"),
    "grad-mag": Spec("gradient", "gradient_magnitude", True, "|g|, Blalock et al. 2020"),
    "obs": Spec("obs", "obs", True, "Optimal Brain Surgeon, layerwise inverse Fisher, with weight update"),
}


def names() -> list[str]:
    """Every registered criterion name."""
    return list(CRITERIA)


def spec(name: str) -> Spec:
    """The registry entry of ``name``; unknown names raise ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; valid names: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def get(name: str) -> Callable:
    """The criterion function registered as ``name``."""
    s = spec(name)
    return getattr(importlib.import_module(f"{__name__}.{s.module}"), s.function)


def check_batch(batch, name: str, model: nn.Module | None = None,
                objective: B.Objective | None = None):
    """``batch`` as (x, y) on the model's device and dtype (floating inputs take its dtype), from
    (x, y) tensors (x a tensor, mapping or tuple), a Dataset or a DataLoader; ValueError/TypeError
    saying what ``name`` needs otherwise.

    With a model, one example is run through it first, so inputs the model cannot take and
    targets that do not fit its outputs under the loss (labels out of range, float labels, a
    wrong shape) are named here instead of failing deep inside a criterion.
    """
    if batch is None:
        raise ValueError(f"criterion {name!r} is data-dependent: pass batch=(x, y), a Dataset or "
                         f"a DataLoader, e.g. bundle.batch('train', n=1000, seed=0)")
    x, y = B.as_batch(batch, what="batch")
    B.check_inputs(x)
    if model is not None:
        x, y = B.to_model(x, model), B.to_model(y, model)
        B.probe(model, x, y, objective or B.Objective(), what=f"criterion {name!r}")
    return x, y


# Keywords every criterion receives from :func:`compute`; the rest of a function's keyword
# parameters are its options.
_COMMON = frozenset({"model", "batch", "masks", "seed", "sparsity", "scope", "objective"})


def options_of(name: str) -> list[str]:
    """The options criterion ``name`` accepts (its keyword parameters beyond the common ones)."""
    import inspect

    params = inspect.signature(get(name)).parameters.values()
    return sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.name not in _COMMON and not p.name.startswith("_"))


def check_options(name: str, options) -> None:
    """TypeError naming any option criterion ``name`` does not take, and the ones it does."""
    valid = options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"criterion {name!r} got unknown option(s) {unknown}; its options: "
                        f"{valid or 'none'}")


def check_lam(lam) -> float:
    """λ as a float (numpy scalars too), or ValueError: it must be finite and >= 0."""
    what, allowed = "lam (the step-size penalty λ)", "a finite number >= 0"
    value = S.as_real(lam, what, allowed)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be {allowed}, got {lam!r}")
    return value


def check_finite_weights(model: nn.Module) -> None:
    """ValueError listing the prunable weights that hold NaN or inf."""
    bad = [n for n, w in G.weights(model).items() if not torch.isfinite(w).all()]
    if bad:
        raise ValueError(f"weights contain NaN or inf in {bad}; refusing to rank them")


def check_scores(scores: Scores, model: nn.Module, name: str) -> Scores:
    """Scores keyed and shaped like the prunable weights, finite; ValueError otherwise."""
    expected = G.prunable_names(model)
    missing = [n for n in expected if n not in scores]
    if missing:
        kinds = sorted({c.kind for c in G.candidates(model) if c.name in missing})
        raise ValueError(f"criterion {name!r} cannot score {missing} ({', '.join(kinds)} "
                         f"tensors): it scores only {sorted(scores)}; leave them out with "
                         f"prunable=")
    extra = set(scores) - set(expected)
    if extra:  # a graph criterion scores every layer; those outside prunable= are dropped
        extra -= {c.name for c in G.candidates(model)}
    if extra:
        raise ValueError(f"criterion {name!r} returned scores for {sorted(scores)}, expected {expected}")
    out = {}
    for n in expected:
        s = scores[n]
        w = G.weight(model, n)
        if s.shape != w.shape:
            raise ValueError(f"criterion {name!r}: scores of {n} have shape {tuple(s.shape)}, "
                             f"weight has {tuple(w.shape)}")
        # float32, beside the weight (a criterion drawing on the CPU lands on the weight's device)
        s = s.detach().to(device=w.device, dtype=torch.float32)
        # a NaN makes the sum NaN: one reduction instead of isnan + any on most calls
        if not torch.isfinite(s.sum()) and torch.isnan(s).any():
            raise ValueError(f"criterion {name!r} produced NaN scores in {n}")
        out[n] = s
    return out


@contextlib.contextmanager
def _scoring_view(model: nn.Module):
    """Eval mode and gradients on for every parameter, restored afterwards whatever happens."""
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p in frozen:
            p.requires_grad_(False)


def compute(model: nn.Module, name: str, *, batch=None, masks: Masks | None = None,
            lam: float = 0.0, seed: int = 0, sparsity=None, scope: str = "global",
            copy: bool = True, loss="cross_entropy", output=None, prunable=None,
            **options) -> ScoreResult:
    """Like :func:`score` but returns the full :class:`ScoreResult` (scores, update, examples),
    with the step-size penalty λ/2·θ² added to every score (LM paper Sec. 3.2).

    ``copy=False`` is for the pruning loop, which owns a plain working model already in eval
    mode with its pruned weights zeroed: scoring it directly saves a deep copy per stage.
    ``prunable``: see :func:`score`; None keeps the setting in effect (the pruning loop's).
    """
    if prunable is not None:
        G.check_prunable(prunable, model)
    with G.selecting(prunable):
        return _compute(model, name, batch=batch, masks=masks, lam=lam, seed=seed,
                        sparsity=sparsity, scope=scope, copy=copy, loss=loss, output=output,
                        **options)


def _compute(model: nn.Module, name: str, *, batch, masks, lam, seed, sparsity, scope, copy,
             loss, output, **options) -> ScoreResult:
    s = spec(name)
    objective = B.objective(loss, output)
    if _torch_prune_hooked(model):
        raise ValueError("the model carries torch.nn.utils.prune hooks (weight_orig/weight_mask); "
                         "convert them first: model = prunelab.masks.import_torch_prune(model)")
    if copy:  # the pruning loop (copy=False) validated its inputs once (a PruneConfig): trust them
        lam = check_lam(lam)
        check_options(name, options)
        if s.needs_data or batch is not None:
            batch = check_batch(batch, name, model, objective)
        if masks:
            masks = check_masks(masks, model)
        check_finite_weights(model)
    if not copy:
        work = model
    elif masks or G.is_masked(model):
        work = G.plain_copy(model, masks)  # criteria see the effective (masked) weights
        work.eval()
        for p in work.parameters():
            p.requires_grad_(True)
    else:
        work = None
    if work is None:
        # A plain model is scored as it is (a deep copy of a big net costs more than MP itself):
        # criteria only read it; eval mode and requires_grad are set for the call and restored.
        with _scoring_view(model):
            out = get(name)(model, batch=batch, masks=masks, seed=seed, sparsity=sparsity,
                            scope=scope, objective=objective, **options)
        work = model
    else:
        out = get(name)(work, batch=batch, masks=masks, seed=seed, sparsity=sparsity,
                        scope=scope, objective=objective, **options)
    result = out if isinstance(out, ScoreResult) else ScoreResult(out)
    result.scores = check_scores(result.scores, work, name)
    if s.needs_data and not result.examples:
        result.examples = len(batch[1])
    if lam > 0:
        # Step-size penalty λ/2·θ² (LM paper Sec. 3.2): large weights become costly to remove.
        for n, sc in result.scores.items():
            sc.add_(0.5 * lam * G.weight(work, n).detach().float() ** 2)
    return result


def _torch_prune_hooked(model: nn.Module) -> bool:
    import sys

    tp = sys.modules.get("torch.nn.utils.prune")
    return tp is not None and any(isinstance(h, tp.BasePruningMethod) for m in model.modules()
                                  for h in m._forward_pre_hooks.values())


def check_masks(masks, model: nn.Module) -> Masks:
    """Masks keyed by prunable weights, bool (or 0/1) and shaped like them, on their device;
    ValueError/TypeError naming the layer otherwise (a (1, n) mask must not broadcast, a float
    2.0 must not scale scores)."""
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict name -> bool tensor, got {type(masks).__name__}")
    names = G.prunable_names(model)
    unknown = set(masks) - set(names)
    if unknown:
        raise ValueError(f"masks name unknown layers {sorted(unknown)}; prunable weights: {names}")
    out = {}
    for n, m in masks.items():
        w = G.weight(model, n)
        if not isinstance(m, Tensor):
            raise TypeError(f"mask of {n} must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask of {n} has shape {tuple(m.shape)}, the weight has "
                             f"{tuple(w.shape)}")
        if m.dtype != torch.bool:
            if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"mask of {n} must be bool (True = kept) or hold only 0 and 1, "
                                 f"got dtype {m.dtype} with other values")
            m = m != 0
        out[n] = m.to(w.device)
    return out


def score(model: nn.Module, name: str, *, batch=None, masks: Masks | None = None,
          lam: float = 0.0, seed: int = 0, loss="cross_entropy", output=None,
          prunable=None, **options) -> Scores:
    """Scores of every prunable weight of ``model`` under criterion ``name``.

    Args:
        model: any module made of Linear/Conv layers; never modified (attached masks
            are honoured: pruned weights are zero while scoring).
        name: a name from :func:`names`.
        batch: (x, y) tensors (x a tensor, a mapping -> ``model(**x)`` or a tuple), a Dataset or
            a DataLoader; required by data-dependent criteria. Moved to the model's device.
        masks: extra masks (name -> bool, True = kept) applied before scoring.
        lam: step-size penalty λ >= 0; adds λ/2·θ² to every score.
        seed: seed of any sampling the criterion does.
        loss: ``"cross_entropy"`` (per class or per token), ``"mse"`` or a callable
            ``(output, target) -> mean loss``, for the data-dependent criteria.
        output: optional ``model output -> tensor`` (default: the tensor, the first element of a
            tuple, or ``logits``).
        prunable: which tensors to score (:func:`prunelab.graph.prunable_names`): None (the
            weights of Linear, Conv, attention projections and Linear-like layers), kinds among
            ``"linear"``, ``"conv"``, ``"attention"``, ``"embedding"``, ``"norm"`` and/or
            tensor names, or a callable ``(name, module, tensor) -> bool``.
        **options: criterion-specific options (e.g. ``signed=True`` for lm/qm); see
            :func:`options_of`.

    Returns:
        ``{name: float tensor}`` shaped like each weight, on its device; higher = more important.

    Raises:
        ValueError: unknown name, missing batch, labels that do not fit the outputs, λ < 0, NaN
            weights or NaN scores. TypeError: an unknown option, an output with no logits.
    """
    return compute(model, name, batch=batch, masks=masks, lam=lam, seed=seed, loss=loss,
                   output=output, prunable=prunable, **options).scores
