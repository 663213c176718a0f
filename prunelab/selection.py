"""Scores -> keep-masks: the one selection rule every pruning path goes through.

Like :func:`torch.nn.utils.prune`'s ``compute_mask(t, default_mask)``, one contract: given scores
(higher = more important) and a target, prune **exactly** ``n_pruned(sparsity, n) =
floor(sparsity · n)`` entries, the lowest scores first, **ties broken by index** (lower index
pruned first), and an entry pruned before (``previous``) stays pruned. :func:`select` (one-shot
and staged pruning, :mod:`prunelab.masks`), :class:`StagedSelection` (the same masks for global
staged pruning, survivors only), :class:`Ranking` (a slider's cheap re-selection),
iterative SynFlow's inner loop (:mod:`prunelab.criteria.gradient`) and the ordered LAP variants
(:mod:`prunelab.criteria.lookahead_variants`) all count with :func:`n_pruned` and cut with
:func:`prune_lowest`, so the masks built from their returned scores are the ones they chose.

Also here: the sparsity range check (:func:`check_sparsity`), the stage schedules of the LM
paper's Algorithm 1 (:func:`schedule`) and the LAP paper's (p, q, τ) per-layer rule
(:func:`lap_layer_sparsity`). Needs only torch and :mod:`prunelab.graph`'s types.

Over 500 lines because the rule and its exact fast paths (sampled brackets for large inputs,
:class:`StagedSelection` for staged pruning, :class:`Ranking` for sliders) share its private
helpers and must stay side by side: each must give the masks of :func:`prune_lowest`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunelab import graph as G
from prunelab import semistructured as NM

Masks = G.Masks
Scores = G.Scores
SCOPES = ("global", "layerwise", "normalized")
SCHEDULES = ("linear", "exponential")

__all__ = ["SCOPES", "SCHEDULES", "as_real", "check_sparsity", "check_scope", "nm_sparsity",
           "check_scores", "check_prunable",
           "n_pruned", "pruned_counts", "prune_lowest", "select", "StagedSelection", "Ranking",
           "schedule",
           "lap_layer_sparsity"]


def __dir__():
    return sorted(__all__)


# ----------------------------------------------------------------------------- validation
def as_real(value, what: str, allowed: str) -> float:
    """``value`` as a Python float, numpy scalars included; ValueError for bools and non-numbers.

    A numpy float is read at its own precision (``np.float32(0.9)`` is 0.9, as it prints), so a
    value handed over as float32 selects and hashes like the same value typed as a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, numbers.Integral):  # numpy integers
        return float(int(value))
    return float(str(value)) if hasattr(value, "dtype") else float(value)


def check_sparsity(sparsity, what: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), or ValueError naming the value and the allowed range."""
    s = as_real(sparsity, what, "a number in [0, 1)")
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"{what} must be a finite number in [0, 1), got {sparsity!r}")
    return s


def check_prunable(model, prunable=None) -> list[str]:
    """The model's prunable weight names (``prunable=`` as in
    :func:`prunelab.graph.prunable_names`), or ValueError when it has none (a model without
    ``nn.Linear`` / ``nn.Conv1d/2d/3d`` weights has nothing to prune; it would otherwise look
    "fully pruned" already)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = G.prunable_names(model, prunable)
    if not names and prunable is not None:
        raise ValueError(f"prunable={prunable!r} selects no tensor of {type(model).__name__}; "
                         f"candidates: {[c.name for c in G.candidates(model)]}")
    if not names:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"the model ({type(model).__name__}) has no prunable weights: no "
                         f"nn.Linear or nn.Conv1d/2d/3d layer (it holds {kinds})")
    return names


def check_scope(scope) -> str:
    """``scope`` if it is one of :data:`SCOPES` or an N:M pattern ``"n:m"`` (1 <= n < m), else
    ValueError naming the value (a malformed ``"n:m"`` gets the message of
    :func:`prunelab.semistructured.parse_nm`: m <= n, n = 0, not integers)."""
    if isinstance(scope, str) and ":" in scope:
        NM.parse_nm(scope)
        return scope
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} or an N:M pattern 'n:m' such as '2:4', "
                         f"got {scope!r}")
    return scope


def nm_sparsity(scope: str, sparsity=None) -> float:
    """The sparsity ``1 - n/m`` an N:M ``scope`` implies; ``sparsity`` must be None or that value.

    Raises:
        ValueError: A malformed pattern, or a ``sparsity`` other than ``1 - n/m`` (both named).
    """
    n, m = NM.parse_nm(scope)
    implied = 1.0 - n / m
    if sparsity is not None:
        s = check_sparsity(sparsity)
        if abs(s - implied) > 1e-9:
            raise ValueError(f"scope={scope!r} keeps {n} of every {m} weights, i.e. sparsity "
                             f"{implied:g}; got sparsity={sparsity!r}: pass sparsity=None "
                             f"(implied) or {implied:g}")
    return implied


def check_scores(scores: Scores, previous: Masks | None = None) -> None:
    """ValueError for empty scores, NaN scores or a previous mask of another shape."""
    if not scores:
        raise ValueError("scores is empty: nothing to prune")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores of {name} contain NaN; refusing to rank them")
        if previous is not None and name in previous and previous[name].shape != s.shape:
            raise ValueError(f"previous mask of {name} has shape {tuple(previous[name].shape)}, "
                             f"scores have {tuple(s.shape)}")


# ----------------------------------------------------------------------------- counting
def n_pruned(sparsity: float, n: int) -> int:
    """floor(sparsity · n), robust to float round-off (0.29 · 100 prunes 29, not 28)."""
    x = sparsity * n
    r = round(x)
    return int(r) if abs(x - r) < 1e-6 * max(1.0, x) else int(math.floor(x))


def pruned_counts(numels: Mapping[str, int], sparsity, what: str = "sparsity") -> dict[str, int]:
    """Entries to prune per layer: ``{name: n_pruned(s_name, numel)}``.

    ``sparsity`` is one fraction for every layer or ``{name: fraction}`` (layers not named keep
    all their weights); unknown names and fractions outside [0, 1) raise ValueError.
    """
    if isinstance(sparsity, Mapping):
        unknown = set(sparsity) - set(numels)
        if unknown:
            raise ValueError(f"{what} names unknown layers {sorted(unknown)}; prunable "
                             f"weights: {list(numels)}")
        fr = {n: check_sparsity(sparsity.get(n, 0.0), f"{what}[{n!r}]") for n in numels}
    else:
        s = check_sparsity(sparsity, what)
        fr = dict.fromkeys(numels, s)
    return {n: n_pruned(fr[n], k) for n, k in numels.items()}


# ----------------------------------------------------------------------------- exact lowest-k
def prune_lowest(flat: Tensor, k: int) -> Tensor:
    """Bool keep-mask of ``flat`` (any shape) with exactly the ``k`` lowest entries pruned.

    Ties are broken by index (lower index pruned first); entries at −inf (pruned before) go
    first. The result has the shape of ``flat``.
    """
    if flat.dim() != 1:
        return prune_lowest(flat.flatten(), k).view_as(flat)
    n = flat.numel()
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= n:
        return ~keep
    dead = torch.isneginf(flat)  # entries pruned in earlier stages (see _prepare)
    n_dead = int(torch.count_nonzero(dead))  # ~30x faster than a bool sum
    if k > n_dead > n // 4:
        # Late stages of a schedule: select among the surviving entries only.
        alive = torch.nonzero(~dead).flatten()
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
        keep[alive[prune_lowest(flat[alive], k - n_dead)]] = True
        return keep
    # Ties at the threshold are resolved by index below, so counts are exact.
    t = _kth_smallest(flat, k)
    below = flat < t
    keep &= ~below
    need = k - int(torch.count_nonzero(below))
    if need > 0:
        tied = torch.nonzero(flat == t).flatten()[:need]
        keep[tied] = False
    return keep


def _kth_smallest(flat: Tensor, k: int, *, min_n: int = 2_000_000, m: int = 50_000,
                  gen: torch.Generator | None = None) -> Tensor:
    """The k-th smallest value (1-based) of the 1-D ``flat``, exactly.

    Inputs of ``min_n`` entries or more: a random sample of ``m`` entries brackets the k-th value,
    and ``kthvalue`` runs only on the few entries inside the bracket (falling back to the full
    ``kthvalue`` if the bracket missed, which the 5-sigma margin makes rare). The answer never
    depends on the sample (``gen``: its generator; default seeded 0).
    """
    n = flat.numel()
    if n < min_n:
        return torch.kthvalue(flat, k).values
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    sample = flat[torch.randint(0, n, (m,), generator=gen).to(flat.device)]
    q = k / n
    margin = 5 * math.sqrt(q * (1 - q) / m) + 2 / m
    # ranks (1-based) in the sample of the bracket's ends; two small kthvalues beat a sort
    lo_r, hi_r = math.floor((q - margin) * m) + 1, math.ceil((q + margin) * m) + 1
    lo = torch.kthvalue(sample, lo_r).values if lo_r > 1 else None
    hi = torch.kthvalue(sample, hi_r).values if hi_r <= m else None
    if lo is None:
        below, inside = 0, (flat <= hi if hi is not None else None)
    else:
        under = flat < lo
        below = int(torch.count_nonzero(under))
        inside = under.logical_not_()
        if hi is not None:
            inside &= flat <= hi
    candidates = flat if inside is None else flat.masked_select(inside)
    if below < k <= below + candidates.numel():
        return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(flat, k).values


def _prepare(scores: Scores, previous: Masks | None) -> dict[str, Tensor]:
    out = {}
    for name, s in scores.items():
        s = s.detach().float()
        if previous is not None and name in previous:
            s = s.masked_fill(~previous[name].to(torch.bool), -math.inf)
        out[name] = s
    return out


def _normalized(ranked: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's scores divided by their Frobenius norm (−inf entries left out of the norm)."""
    out = {}
    for n, s in ranked.items():
        norm = torch.linalg.vector_norm(torch.where(torch.isfinite(s), s, torch.zeros_like(s)))
        out[n] = s / norm if norm > 0 else s
    return out


# ----------------------------------------------------------------------------- select
def select(scores: Scores, sparsity: float | None = None, *, scope: str = "global",
           layer_sparsity: Mapping[str, float] | None = None,
           previous: Masks | None = None, in_dims: Mapping[str, int] | None = None,
           _checked: bool = False) -> Masks:
    """Keep the highest-scoring weights so that ``sparsity`` of them are pruned.

    Args:
        scores: name -> score tensor (higher = more important).
        sparsity: total fraction of weights to prune, in [0, 1) (not a fraction of survivors).
        scope: ``"global"`` ranks all layers together; ``"layerwise"`` prunes ``sparsity`` of
            each layer; ``"normalized"`` ranks globally after dividing each layer's scores by their
            Frobenius norm (LAP paper App. I); ``"n:m"`` (e.g. ``"2:4"``) keeps the ``n``
            highest scores of every ``m`` consecutive weights along each layer's input dimension
            (:func:`prunelab.semistructured.nm_select`; ``sparsity`` None or ``1 - n/m``).
        layer_sparsity: explicit per-layer sparsities (name -> fraction); layers not named keep all
            their weights. Overrides ``sparsity`` and ``scope`` (not allowed with ``"n:m"``).
        previous: masks of an earlier stage; what they pruned stays pruned.
        in_dims: for ``"n:m"``, ``{name: dim}`` of tensors whose input dimension is not dim 1
            (:func:`prunelab.graph.in_dims`; a HuggingFace ``Conv1D`` weight: 0).

    Returns:
        name -> bool mask, True = kept.
    """
    if not _checked:  # the pruning loop's scores were checked by criteria.compute
        check_scores(scores, previous)
    if isinstance(scope, str) and ":" in scope:
        if layer_sparsity is not None:
            raise ValueError(f"layer_sparsity cannot be combined with the N:M scope {scope!r}: the "
                             "pattern fixes every layer's sparsity at 1 - n/m")
        nm_sparsity(scope, sparsity)
        n, m = NM.parse_nm(scope)
        # nm_select keeps what ``previous`` pruned pruned (it ranks below every live weight)
        return NM.nm_select(scores, n, m, previous, in_dims=in_dims)
    out = _select(scores, sparsity, scope, layer_sparsity, previous)
    if previous:  # pruned stays pruned, also when the new target is below the old sparsity
        out = {n: m & previous[n].to(torch.bool) if n in previous else m for n, m in out.items()}
    return out


def _select(scores: Scores, sparsity, scope: str, layer_sparsity, previous) -> Masks:
    ranked = _prepare(scores, previous)
    if layer_sparsity is not None:
        counts = pruned_counts({n: s.numel() for n, s in ranked.items()}, layer_sparsity,
                               "layer_sparsity")
        return {n: prune_lowest(s, counts[n]) for n, s in ranked.items()}
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    if scope == "layerwise":
        return {n: prune_lowest(s, n_pruned(sparsity, s.numel())) for n, s in ranked.items()}
    if scope == "normalized":
        ranked = _normalized(ranked)
    total = sum(s.numel() for s in ranked.values())
    keeps = prune_lowest_parts(list(ranked.values()), n_pruned(sparsity, total))
    return dict(zip(ranked, keeps))


def prune_lowest_parts(parts: list[Tensor], k: int) -> list[Tensor]:
    """:func:`prune_lowest` over the concatenation of ``parts`` (global selection), returned as
    one keep-mask per part, without building the concatenation for large inputs.

    Same rule and same masks: the k lowest pruned, ties by global index. For ≥ 2M entries a
    seeded sample brackets the k-th value; each part is compared with the bracket once and only
    the ~1 % of entries inside it are gathered for ``kthvalue``; ties at the threshold are
    resolved part by part in index order. Any miss of the bracket (or a threshold at −inf, i.e.
    earlier-pruned entries) takes the exact concatenating path.
    """
    sizes = [p.numel() for p in parts]
    n = sum(sizes)
    flats = [p.reshape(-1) for p in parts]
    if n >= 2_000_000 and 0 < k < n:
        keeps = _bracketed_parts(flats, k, n)
        if keeps is not None:
            return [kp.view(p.shape) for kp, p in zip(keeps, parts)]
    keep = prune_lowest(torch.cat(flats), k)
    return [m.view(p.shape) for m, p in zip(keep.split(sizes), parts)]


def _bracketed_parts(flats: list[Tensor], k: int, n: int) -> list[Tensor] | None:
    m = 50_000
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (m,), generator=gen)
    ends = torch.tensor([f.numel() for f in flats]).cumsum(0)
    which = torch.searchsorted(ends, idx, right=True)
    starts = ends - torch.tensor([f.numel() for f in flats])
    sample = torch.empty(m, dtype=flats[0].dtype)
    for i, f in enumerate(flats):
        sel = which == i
        if sel.any():
            sample[sel] = f[(idx[sel] - starts[i]).to(f.device)].cpu()
    sample = sample.sort().values
    q = k / n
    margin = 5 * math.sqrt(q * (1 - q) / m) + 2 / m
    lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    if lo_i <= 0 or hi_i >= m:
        return None
    lo, hi = sample[lo_i].item(), sample[hi_i].item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    below, cands = 0, []
    for f in flats:
        ge = f >= lo
        below += f.numel() - int(torch.count_nonzero(ge))
        cands.append(f[ge & (f <= hi)])
    inside = sum(c.numel() for c in cands)
    if not below < k <= below + inside:
        return None
    t = torch.kthvalue(torch.cat(cands), k - below).values
    need = k - below - sum(int(torch.count_nonzero(c < t)) for c in cands)  # ties to prune
    keeps = [f > t for f in flats]
    for f, c, keep in zip(flats, cands, keeps):
        ties = int(torch.count_nonzero(c == t))  # every entry equal to t lies in the bracket
        pruned_here = min(need, ties)
        need -= pruned_here
        if ties > pruned_here:
            keep[torch.nonzero(f == t).flatten()[pruned_here:]] = True
    return keeps


class StagedSelection:
    """Global selection over a sequence of stages, with its buffers reused from stage to stage.

    The masks are those of ``select(scores, sparsity, scope="global", previous=masks)`` called
    stage after stage with the masks of the stage before (same rule: exactly ``n_pruned(sparsity,
    n)`` pruned in total, the lowest scores of the surviving weights first, ties by global index,
    pruned stays pruned), computed for the staged pruning loop (LM paper Algorithm 1) at a cost
    that shrinks with the survivors: the flat indices of the surviving weights are kept sorted,
    each stage gathers only their scores, finds the cut with :func:`_kth_smallest` (a sampled
    bracket around the k-th value on large inputs) and drops the newly pruned from the list.
    No per-layer masking with −inf, no concatenated masks, no ``kthvalue`` over dead weights.

    Args:
        masks: name -> bool mask (True = kept) of every weight taking part, in the global order
            (the order of the scores' keys); all on one device.

    Attributes:
        masks: name -> bool mask, views into one flat buffer that :meth:`select` updates in
            place (clone them to keep a stage's masks).
        total: number of weights; ``alive``: number of weights still kept.
    """

    #: at or above this many survivors the k-th score is bracketed by a sample (see _kth_smallest)
    BRACKET_MIN = 32_768

    def __init__(self, masks: Masks):
        if not masks:
            raise ValueError("masks is empty: nothing to select from")
        self.names = list(masks)
        devices = {m.device for m in masks.values()}
        if len(devices) > 1:
            raise ValueError(f"StagedSelection needs every mask on one device, got {devices}")
        self.shapes = [masks[n].shape for n in self.names]
        self.numels = [masks[n].numel() for n in self.names]
        self.keep = torch.cat([masks[n].reshape(-1).to(torch.bool) for n in self.names])
        self.total = self.keep.numel()
        self._alive = torch.nonzero(self.keep).flatten()
        self._scores: Tensor | None = None
        # (pruned by the last stage, the survivors before it), for undo()
        self._undo: tuple[Tensor, Tensor] | None = None
        self._gen = torch.Generator().manual_seed(0)
        self._ends: Tensor | None = None  # cumulative sizes of the layers (pruned_now)
        self.masks = {n: v.view(shape) for n, v, shape in
                      zip(self.names, self.keep.split(self.numels), self.shapes)}

    @property
    def alive(self) -> int:
        return self._alive.numel()

    @property
    def sparsity(self) -> float:
        """Fraction pruned, as :func:`prunelab.masks.sparsity` of :attr:`masks` counts it."""
        return 1.0 - self.alive / max(self.total, 1)

    def select(self, scores: Scores, sparsity: float) -> Masks:
        """Prune the lowest-scoring survivors until ``n_pruned(sparsity, total)`` are pruned.

        Args:
            scores: name -> score tensor for the names of the masks (higher = more important;
                checked for NaN by the caller, e.g. :func:`prunelab.criteria.compute`).
            sparsity: total fraction pruned after this stage, in [0, 1). A value at or below the
                current sparsity prunes nothing more.

        Returns:
            :attr:`masks`, updated in place.
        """
        self._undo = None
        a = self.alive
        k = n_pruned(check_sparsity(sparsity), self.total) - (self.total - a)
        if k <= 0:
            return self.masks
        if k >= a:
            self._undo = (self._alive, self._alive)
            self.keep[self._alive] = False
            self._alive = self._alive[:0]
            return self.masks
        first = scores[self.names[0]]
        if self._scores is None or self._scores.dtype != first.dtype:
            self._scores = torch.empty(self.total, dtype=first.dtype, device=first.device)
        torch.cat([scores[n].detach().reshape(-1) for n in self.names], out=self._scores)
        alive = self._alive
        # scores of the survivors, in global index order (index_select: ~4x faster than [])
        sa = self._scores if a == self.total else torch.index_select(self._scores, 0, alive)
        t = _kth_smallest(sa, k, min_n=self.BRACKET_MIN, m=2048, gen=self._gen)
        if bool(torch.isneginf(t)):
            # a score of −inf on a survivor ranks with the pruned ones (select's −inf): the
            # index tie-break then mixes both; let select decide this rare stage
            return self._load(select({n: scores[n] for n in self.names}, sparsity,
                                     previous=self.masks, _checked=True))
        pruned = sa <= t
        extra = int(torch.count_nonzero(pruned)) - k  # ties at the cut beyond the k-th
        if extra > 0:  # the lowest indices among the ties go first: spare the last `extra`
            pruned[torch.nonzero(sa == t).flatten()[-extra:]] = False
        gone = alive.masked_select(pruned)
        rest = alive.masked_select(pruned.logical_not_())
        self._undo = (gone, alive)
        self.keep[gone] = False
        self._alive = rest
        return self.masks

    def pruned_now(self) -> dict[str, Tensor]:
        """name -> flat indices (into that weight) of the entries the last :meth:`select`
        pruned, ascending; empty tensors where it pruned none of a layer."""
        gone = self._undo[0] if self._undo is not None else self._alive[:0]
        if self._ends is None:
            self._ends = torch.tensor(self.numels, device=gone.device).cumsum(0)
        cuts = torch.searchsorted(gone, self._ends).tolist()
        out, lo, start = {}, 0, 0
        for n, hi, size in zip(self.names, cuts, self.numels):
            out[n] = gone[lo:hi] - start
            lo, start = hi, start + size
        return out

    def undo(self) -> Masks:
        """Take back the last :meth:`select` (e.g. a stage interrupted before it finished):
        :attr:`masks` are those of the stage before again. A second call does nothing."""
        if self._undo is not None:
            gone, alive = self._undo
            self.keep[gone] = True
            self._alive = alive
            self._undo = None
        return self.masks

    def _load(self, masks: Masks) -> Masks:
        alive = self._alive
        fresh = torch.cat([masks[n].reshape(-1) for n in self.names])
        gone = torch.nonzero(self.keep & ~fresh).flatten()
        self._undo = (gone, alive)
        self.keep[gone] = False
        self._alive = torch.nonzero(self.keep).flatten()
        return self.masks


class Ranking:
    """Scores sorted once, so that the mask of any sparsity is a comparison, not a sort.

    This is what makes a sparsity slider cheap: ``Ranking(scores).masks(0.9)`` costs one
    ``>=`` per weight. Same selection rule as :func:`select` (global or layerwise, ties by index).
    """

    def __init__(self, scores: Scores, *, scope: str = "global", previous: Masks | None = None):
        check_scope(scope)
        if ":" in scope:
            raise ValueError(f"Ranking cannot express the N:M scope {scope!r}: one global order "
                             "of the weights has no sparsity at which every group of m keeps "
                             "exactly n; use select(scores, scope=...) or "
                             "prunelab.semistructured.nm_select")
        check_scores(scores, previous)
        ranked = _prepare(scores, previous)
        self.previous = {n: m.to(torch.bool) for n, m in (previous or {}).items()}
        self.scope = scope
        self.names = list(ranked)
        self.shapes = {n: s.shape for n, s in ranked.items()}
        self.numels = [s.numel() for s in ranked.values()]
        if scope == "normalized":
            ranked = _normalized(ranked)
        if scope == "layerwise":
            self.ranks = {n: self._rank(s.flatten()).view(s.shape) for n, s in ranked.items()}
        else:
            flat = torch.cat([s.flatten() for s in ranked.values()])
            parts = self._rank(flat).split(self.numels)
            self.ranks = {n: r.view(self.shapes[n]) for n, r in zip(self.names, parts)}
        self.total = sum(self.numels)

    @staticmethod
    def _rank(flat: Tensor) -> Tensor:
        # Stable ascending sort: among ties the lower index gets the lower rank (pruned first).
        order = torch.sort(flat, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(flat.numel(), device=flat.device)
        return ranks

    def masks(self, sparsity: float, out: Masks | None = None) -> Masks:
        """Masks at ``sparsity``; written into ``out``'s tensors when given (no allocation)."""
        sparsity = check_sparsity(sparsity)
        result = {} if out is None else out
        for n, r in self.ranks.items():
            k = n_pruned(sparsity, r.numel() if self.scope == "layerwise" else self.total)
            if out is None:
                result[n] = r >= k
            else:
                torch.ge(r, k, out=out[n])
            if n in self.previous:
                result[n] &= self.previous[n]
        return result


# ----------------------------------------------------------------------------- targets
def schedule(sparsity: float, stages: int, kind: str = "exponential",
             start: float = 0.0) -> list[float]:
    """Total sparsity after each of ``stages`` stages (LM paper Algorithm 1).

    ``"linear"`` prunes the same number of weights per stage; ``"exponential"`` keeps the same
    fraction of the remaining weights per stage: density_i = (1−start)·((1−s)/(1−start))^(i/π).
    """
    sparsity = check_sparsity(sparsity)
    start = check_sparsity(start, "start")
    if isinstance(stages, bool) or not isinstance(stages, numbers.Integral) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    stages = int(stages)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be 'linear' or 'exponential', got {kind!r}")
    if kind == "linear":
        return [start + (sparsity - start) * i / stages for i in range(1, stages + 1)]
    ratio = (1.0 - sparsity) / (1.0 - start)
    out = [1.0 - (1.0 - start) * ratio ** (i / stages) for i in range(1, stages + 1)]
    out[-1] = sparsity  # no round-off on the final target
    return out


def lap_layer_sparsity(model: nn.Module, tau: int, *, p: float, q: float,
                       skip_first_conv: bool = False) -> dict[str, float]:
    """Per-layer sparsities of the LAP paper's (p, q, τ) rule (Park et al. 2020, App. A).

    Convolutions keep p^τ of their weights, fully-connected layers q^τ, the last layer
    ((1+q)/2)^τ. The paper uses (p, q) = (0, 0.5) for FCN and (0.85, 0.8) for the conv nets, and
    leaves the first convolution of ResNets unpruned (``skip_first_conv``).
    """
    names = G.prunable_names(model)
    out, seen_conv = {}, False
    kinds = {c.name: c.kind for c in G.candidates(model)}
    for i, n in enumerate(names):
        if kinds[n] != "conv":  # Linear, Linear-like and attention projections: fully connected
            keep = ((1 + q) / 2) ** tau if i == len(names) - 1 else q ** tau
        else:
            if skip_first_conv and not seen_conv:
                seen_conv = True
                out[n] = 0.0
                continue
            seen_conv = True
            keep = p ** tau
        out[n] = 1.0 - keep
    return out
