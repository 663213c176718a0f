"""Layer-collapse diagnostics (Tanaka et al. 2020, *Pruning neural networks without any data by
iteratively conserving synaptic flow*, Sec. 3–6).

The compression ratio is ρ = (prunable weights) / (weights remaining), i.e. density = 1/ρ.
*Layer collapse* is a mask that prunes every weight of some layer while weights remain elsewhere.
*Max compression* ρ_max = N/L (N prunable weights, L prunable layers): the ratio that keeps one
weight per layer. *Critical compression* ρ_cr of a criterion: the largest ρ at which its mask has no
collapsed layer, ρ_cr ≤ ρ_max (the axiom *Maximal Critical Compression* asks for equality).

:func:`conservation_table` checks the conservation laws of synaptic saliency (Theorems 1–2) for
SynFlow's scores. Everything here returns plot data (tidy DataFrames); :mod:`prunelab.plots` plots.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.explore import Pruner, options_for

__all__ = ["collapsed", "max_compression", "layer_density", "critical_compression",
           "critical_compression_search", "conservation_table", "accuracy_vs_compression"]



def __dir__():
    return sorted(__all__)


def collapsed(masks: G.Masks) -> list[str]:
    """Names of the layers whose masks keep no weight (all False), in the masks' order."""
    return [n for n, m in masks.items() if m.numel() > 0 and not bool(m.any())]


def max_compression(model: nn.Module) -> float:
    """ρ_max = N / L (Tanaka et al. 2020, Sec. 3): N prunable weights, L prunable layers.

    The compression of a mask that keeps exactly one weight per prunable layer.
    """
    names = G.prunable_names(model)
    if not names:
        raise ValueError("the model has no prunable (Linear/Conv) weights")
    n = sum(G.weight(model, k).numel() for k in names)
    return n / len(names)


def _check_compression(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) \
            or rho < 1.0:
        raise ValueError(f"compression ratios must be finite numbers >= 1, got {rho!r}")
    return float(rho)


def _sparsity(rho: float) -> float:
    return 1.0 - 1.0 / rho


def layer_density(model: nn.Module, criteria: str | Sequence[str], compressions: Iterable[float],
                  *, batch=None, scope: str = "global", seed: int = 0,
                  progress: bool = False, loss="cross_entropy", output=None,
                  **options) -> pd.DataFrame:
    """Per-layer density of each criterion's one-shot mask at each compression ratio ρ.

    Tanaka et al. 2020 Fig. 1/Fig. 3 data: prune ``model`` (untrained or trained; not modified) to
    density 1/ρ, one shot; iterative criteria (``synflow``, ordered LAP) get the target through
    :func:`prunelab.prune` and run their inner loop to it.

    Args:
        model: the network; masks already attached stay pruned.
        criteria: a criterion name or a list of names.
        compressions: ratios ρ >= 1, e.g. ``10 ** np.linspace(0, 4, 9)``.
        batch: (x, y) for data-dependent criteria.
        scope: "global", "layerwise" or "normalized".
        seed: seed of stochastic criteria.
        progress: a progress bar over (criterion, ρ).
        loss, output: the loss and output rule of data-dependent criteria
            (:mod:`prunelab.batches`).
        **options: passed to the criterion (e.g. ``iterations=100`` for synflow).

    Returns:
        Tidy DataFrame, one row per (criterion, compression, layer): criterion, scope,
        compression, density_target, layer, numel, kept, density, collapsed (every weight of the
        layer pruned).
    """
    from tqdm.auto import tqdm

    names = [criteria] if isinstance(criteria, str) else list(criteria)
    rhos = [_check_compression(float(r)) for r in compressions]
    rows = []
    bar = tqdm(total=len(names) * len(rhos), desc="layer density", disable=not progress,
               leave=False)
    try:
        for crit in names:
            pruner = Pruner(model, crit, batch=batch, scope=scope, seed=seed, loss=loss,
                            output=output, **options_for(crit, options, names))
            for rho in rhos:
                masks = pruner.masks(_sparsity(rho))
                for n, m in masks.items():
                    kept = int(m.sum())
                    rows.append({"criterion": crit, "scope": scope, "compression": rho,
                                 "density_target": 1.0 / rho, "layer": n, "numel": m.numel(),
                                 "kept": kept, "density": kept / max(m.numel(), 1),
                                 "collapsed": m.numel() > 0 and kept == 0})
                bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=["criterion", "scope", "compression", "density_target",
                                       "layer", "numel", "kept", "density", "collapsed"])


def critical_compression_search(model: nn.Module, criterion: str, *, batch=None, lo: float = 1.0,
                                hi: float | None = None, tol: float = 0.01, max_iter: int = 40,
                                scope: str = "global", seed: int = 0, **options) -> dict:
    """Critical compression ρ_cr of ``criterion`` on ``model`` by bisection on log ρ.

    ρ_cr is the largest ρ at which the criterion's mask has no collapsed layer (Tanaka et al.
    2020, Sec. 3). Collapse is *assumed monotone in ρ* (no collapse below ρ_cr, collapse above):
    exact for one-shot criteria, whose masks are nested; for iterative SynFlow, which is re-run
    from scratch at every probe (its mask depends on the target), it is an assumption. The search
    first probes ``hi``; if it does not collapse, ρ_cr = hi. Otherwise it halves the bracket
    [lo, hi] in log ρ until hi/lo <= 1 + tol or ``max_iter`` probes.

    Args:
        lo: a ratio assumed (and checked) not to collapse; 1.0 (no pruning) by default.
        hi: upper end; default ρ_max = N/L (:func:`max_compression`).
        tol: relative width of the final bracket.
        **options: passed to the criterion (e.g. ``iterations=`` for synflow).

    Returns:
        dict: critical (the largest probed ρ without collapse: the bracket's lower end), lo, hi
        (final bracket; hi is None when ``hi`` itself did not collapse), evaluations (probes),
        max_compression, collapsed_layers (the layers collapsed at the bracket's upper end),
        criterion, scope.
    """
    rho_max = max_compression(model)
    lo = _check_compression(lo)
    hi = rho_max if hi is None else _check_compression(hi)
    if hi < lo:
        raise ValueError(f"hi ({hi}) must be >= lo ({lo})")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    pruner = Pruner(model, criterion, batch=batch, scope=scope, seed=seed, **options)
    out = {"criterion": criterion, "scope": scope, "max_compression": rho_max}

    top = collapsed(pruner.masks(_sparsity(hi)))
    if not top:
        return {**out, "critical": hi, "lo": hi, "hi": None, "evaluations": pruner.evaluations,
                "collapsed_layers": []}
    bottom = collapsed(pruner.masks(_sparsity(lo)))
    if bottom:
        raise ValueError(f"{criterion!r} already collapses {bottom} at lo={lo}; pass a smaller lo")
    while hi / lo > 1.0 + tol and pruner.evaluations < max_iter:
        mid = math.sqrt(lo * hi)
        layers = collapsed(pruner.masks(_sparsity(mid)))
        if layers:
            hi, top = mid, layers
        else:
            lo = mid
    return {**out, "critical": lo, "lo": lo, "hi": hi, "evaluations": pruner.evaluations,
            "collapsed_layers": top}


def critical_compression(model: nn.Module, criterion: str, *, batch=None, lo: float = 1.0,
                         hi: float | None = None, tol: float = 0.01, max_iter: int = 40,
                         scope: str = "global", seed: int = 0, **options) -> float:
    """ρ_cr of ``criterion`` on ``model``; see :func:`critical_compression_search` (which also
    returns the final bracket and the number of evaluations)."""
    return critical_compression_search(model, criterion, batch=batch, lo=lo, hi=hi, tol=tol,
                                       max_iter=max_iter, scope=scope, seed=seed,
                                       **options)["critical"]


def _in_out_sums(graph, name: str, scores: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per output unit of ``name``: summed incoming scores and summed outgoing scores, or None
    when its outputs do not feed exactly one prunable layer alone (residual adds, model output)."""
    layer = graph[name]
    if layer.external_out or len(layer.next) != 1:
        return None
    nxt = graph[layer.next[0]]
    if len(nxt.prev) != 1 or nxt.external_in or layer.groups != 1 or nxt.groups != 1:
        return None
    s_in, s_out = scores[name], scores[nxt.name]
    incoming = s_in.reshape(s_in.shape[0], -1).sum(1)
    cols = s_out.transpose(0, 1).reshape(s_out.shape[1], -1).sum(1)
    if cols.numel() != incoming.numel():
        per = cols.numel() // max(incoming.numel(), 1)
        if per * incoming.numel() != cols.numel():
            return None
        cols = cols.view(incoming.numel(), per).sum(1)  # channel-major flatten (nn.Flatten)
    return incoming, cols


def conservation_table(model: nn.Module, masks: G.Masks | None = None, *,
                       input_shape: Sequence[int] | None = None,
                       bias: str = "abs") -> pd.DataFrame:
    """Conservation of synaptic saliency for SynFlow's scores (Tanaka et al. 2020, Thms 1–2).

    Scores S = θ ⊙ ∂R/∂θ from :func:`prunelab.criteria.gradient.synflow_scores` (float64, one
    round). Theorem 2: for a bias-free network with homogeneous activations every layer's scores
    sum to the same R. Theorem 1: for each hidden neuron (conv channel), the summed scores of its
    incoming weights equal those of its outgoing weights. Networks with biases or BatchNorm shifts
    break both (``bias="abs"``, the authors' linearisation): the table reports by how much.

    Returns:
        One row per prunable layer: layer, numel, score_sum, sum_rel_dev (|score_sum − mean| /
        mean of the layer sums), units (hidden units at this layer's output checked), and
        unit_max_rel_diff (max over those units of |in − out| / max(in, out); NaN for the output
        layer or where the neighbourhood is not a plain chain, e.g. residual adds).
    """
    from prunelab.criteria.gradient import synflow_scores

    scores = synflow_scores(model, masks, input_shape=input_shape, bias=bias)
    graph = G.layer_graph(model)
    sums = {n: float(s.sum()) for n, s in scores.items()}
    mean = sum(sums.values()) / len(sums)
    rows = []
    tr = G.transposed_names(model)  # units are rows of the (out, in) layout
    canon = {n: G.canonical(s, n in tr) for n, s in scores.items()}
    for n, s in scores.items():
        pair = _in_out_sums(graph, n, canon) if n in graph else None
        if pair is None:
            units, diff = 0, math.nan
        else:
            a, b = pair
            denom = torch.maximum(a, b)
            rel = torch.where(denom > 0, (a - b).abs() / denom.clamp_min(1e-300),
                              torch.zeros_like(denom))
            units, diff = a.numel(), float(rel.max())
        rows.append({"layer": n, "numel": s.numel(), "score_sum": sums[n],
                     "sum_rel_dev": abs(sums[n] - mean) / mean if mean > 0 else math.nan,
                     "units": units, "unit_max_rel_diff": diff})
    return pd.DataFrame(rows)


def accuracy_vs_compression(model: nn.Module, bundle, criteria: str | Sequence[str],
                            compressions: Iterable[float], *, batch=None, batch_n: int = 1000,
                            split: str = "test", finetune=None, scope: str = "global",
                            seed: int = 0, progress: bool = False, **options) -> pd.DataFrame:
    """Accuracy of each criterion's mask at each compression ratio (Tanaka et al. 2020, Fig. 1).

    Prunes ``model`` (not modified) one shot to density 1/ρ as :func:`layer_density` does,
    optionally fine-tunes the masked copy with the :class:`~prunelab.train.Recipe` ``finetune`` on
    ``bundle.train`` (validated on ``bundle.val``; masks stay applied), and evaluates it on
    ``bundle``'s ``split``. Sudden drops to chance coincide with layer collapse.

    Args:
        bundle: a :class:`prunelab.data.Bundle`.
        batch: (x, y) for data-dependent criteria; default ``bundle.batch("train", n=batch_n,
            seed=seed)`` (at most the whole train split).
        **options: passed to the criterion.

    Returns:
        Tidy DataFrame, one row per (criterion, compression): criterion, scope, compression,
        density_target, density, n_collapsed, collapsed_layers (comma-separated), finetuned,
        split, loss, accuracy, error.
    """
    from tqdm.auto import tqdm

    from prunelab.train import evaluate, fit

    names = [criteria] if isinstance(criteria, str) else list(criteria)
    rhos = [_check_compression(float(r)) for r in compressions]
    data = bundle.split(split)
    rows = []
    bar = tqdm(total=len(names) * len(rhos), desc="accuracy vs compression",
               disable=not progress, leave=False)
    try:
        for crit in names:
            b = batch
            if b is None and C.spec(crit).needs_data:
                b = bundle.batch("train", n=min(batch_n, len(bundle.train)), seed=seed)
            pruner = Pruner(model, crit, batch=b, scope=scope, seed=seed,
                            **options_for(crit, options, names))
            for rho in rhos:
                masks = pruner.masks(_sparsity(rho))
                pruned = M.apply(model, masks)
                if finetune is not None:
                    fit(pruned, bundle.train, recipe=finetune, val=bundle.val, seed=seed,
                        progress=False)
                ev = evaluate(pruned, data)
                gone = collapsed(masks)
                rows.append({"criterion": crit, "scope": scope, "compression": rho,
                             "density_target": 1.0 / rho, "density": 1.0 - M.sparsity(masks),
                             "n_collapsed": len(gone), "collapsed_layers": ",".join(gone),
                             "finetuned": finetune is not None, "split": split,
                             "loss": ev["loss"], "accuracy": ev["accuracy"],
                             "error": ev["error"]})
                bar.update(1)
    finally:
        bar.close()
    return pd.DataFrame(rows)
