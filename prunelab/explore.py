"""One criterion on one model at any sparsity: the engine of the pruning explorer and the
layer-collapse sweeps.

:class:`Pruner` gives the masks of a criterion at any target sparsity, two ways:

* **One-shot** (:func:`ranks_once`: one stage and a criterion that does not prune toward the
  target inside itself, i.e. not ``spec(name).uses_target``): the model is scored once and
  the scores ranked once (:class:`prunelab.masks.Ranking`); the masks at any sparsity are then
  one comparison per weight, exactly the masks one-shot :func:`prunelab.prune` selects. This is
  what makes a sparsity slider (``prunelab.widgets.PruningExplorer``) and a compression sweep
  (Tanaka et al. 2020 Figs. 1 and 3, :mod:`prunelab.collapse`) cheap.
* **A live pruned copy** (:class:`MaskedCopy`): a plain copy of the model whose weights are
  ``dense ⊙ mask`` for a ranking's masks at any sparsity, rewritten in place. A slider move from
  one sparsity to the next changes only the weights ranked between the two thresholds, so only
  those are written (one gather/scatter over the changed entries instead of a pass over every
  weight); what is then evaluated is an ordinary model, no parametrization in its forward.
* **Staged or iterative** (SynFlow, ordered LAP, π > 1 stages): :meth:`Pruner.run` calls
  :func:`prunelab.prune` for each target (with the stage callback a live view needs).

Masks already attached to the model stay pruned (``previous`` of the ranking / of the run).
Any model, loss and device (DESIGN, Round 2): ``loss=`` / ``output=`` reach the criterion and the
run; a staged run is one :class:`prunelab.config.PruneConfig` (:meth:`Pruner.config`), validated
when built, then run by :func:`prunelab.pruning.prune_with`. Scores and rankings are computed
where the model's parameters are (its device and dtype).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunelab import batches as B
from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.config import PruneConfig
from prunelab.pruning import PruneResult, prune_with

__all__ = ["Pruner", "NeedsRun", "MaskedCopy", "ranks_once", "one_shot_scores", "options_for"]



def __dir__():
    return sorted(__all__)


class NeedsRun(Exception):
    """The one-shot masks cannot show this criterion: it also moves the kept weights (OBS-like
    criteria return an update), so only a full :func:`prunelab.prune` run can."""


def ranks_once(criterion: str, stages: int = 1) -> bool:
    """True when one scoring and one ranking give ``criterion``'s masks at every sparsity:
    one stage and a criterion without an inner target (not ``spec(criterion).uses_target``)."""
    return stages == 1 and not C.spec(criterion).uses_target


def one_shot_scores(model: nn.Module, criterion: str, *, batch=None, seed: int = 0,
                    lam: float = 0.0, scope: str = "global", allow_update: bool = True,
                    loss="cross_entropy", output=None, **options) -> G.Scores:
    """The scores one-shot pruning ranks: :func:`prunelab.criteria.compute`'s ``scores``.

    With ``allow_update=False`` a criterion that also updates the kept weights (OBS) raises
    :class:`NeedsRun` instead (masks alone would show a different network than
    :func:`prunelab.prune` gives).
    """
    result = C.compute(model, criterion, batch=batch, lam=lam, seed=seed, scope=scope,
                       loss=loss, output=output, **options)
    if result.update is not None and not allow_update:
        raise NeedsRun(criterion)
    return result.scores


def options_for(criterion: str, options: dict, criteria) -> dict:
    """The part of ``options`` that ``criterion`` takes, when one set of options is shared by
    several criteria (``iterations=`` for SynFlow next to MP): an option no criterion of
    ``criteria`` takes is still a TypeError naming it."""
    valid = {c: set(C.options_of(c)) for c in criteria}
    unknown = sorted(set(options) - set().union(*valid.values()))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for criteria {list(criteria)}; their "
                        f"options: { {c: sorted(v) for c, v in valid.items()} }")
    return {k: v for k, v in options.items() if k in valid[criterion]}


class Pruner:
    """Masks of ``criterion`` on ``model`` at any target sparsity (see the module docstring).

    Args:
        model: the network (never modified); masks already attached stay pruned.
        criterion: a name of :func:`prunelab.criteria.names`.
        batch: (x, y) for data-dependent criteria.
        scope: "global", "layerwise" or "normalized".
        seed: seed of stochastic criteria.
        lam: step-size penalty λ (``prunelab.prune``'s ``lam``).
        scores: precomputed one-shot scores (from :func:`one_shot_scores`, e.g. shared between
            scopes); default: scored on the first :meth:`masks` call.
        loss: ``"cross_entropy"``, ``"mse"`` or a callable ``(output, target) -> mean loss``
            (:mod:`prunelab.batches`); what the criterion models.
        output: optional callable ``model output -> tensor`` (e.g. ``lambda o: o.logits``).
        **options: passed to the criterion (e.g. ``iterations=`` for synflow).

    Attributes:
        one_shot: whether :meth:`masks` thresholds a ranking (:func:`ranks_once`).
        evaluations: number of :meth:`masks` calls (probes of a search).
        previous: the masks attached to ``model`` (None if none).
    """

    def __init__(self, model: nn.Module, criterion: str, *, batch=None, scope: str = "global",
                 seed: int = 0, lam: float = 0.0, scores: G.Scores | None = None,
                 loss="cross_entropy", output=None, **options):
        C.spec(criterion)  # ValueError listing the valid names
        M.check_scope(scope)
        C.check_options(criterion, options)
        B.objective(loss, output)  # validated now, not at the first slider move
        self.model, self.criterion, self.batch = model, criterion, batch
        self.scope, self.seed, self.lam, self.options = scope, seed, lam, options
        self.loss, self.output = loss, output
        self.one_shot = ranks_once(criterion)
        self.previous = M.current(model) or None
        self._scores = scores
        self._ranking: M.Ranking | None = None
        self.evaluations = 0

    @property
    def ranking(self) -> M.Ranking:
        """The one-shot ranking (scored and ranked on first use)."""
        if not self.one_shot:
            raise ValueError(f"{self.criterion!r} prunes toward the target inside the criterion: "
                             "it has no one-shot ranking; use run()")
        if self._ranking is None:
            if self._scores is None:
                self._scores = one_shot_scores(self.model, self.criterion, batch=self.batch,
                                               seed=self.seed, lam=self.lam, scope=self.scope,
                                               loss=self.loss, output=self.output,
                                               **self.options)
            self._ranking = M.Ranking(self._scores, scope=self.scope, previous=self.previous)
        return self._ranking

    def masks(self, sparsity: float, *, out: G.Masks | None = None) -> G.Masks:
        """Masks at ``sparsity``: thresholded ranking (one-shot; written into ``out``'s tensors
        when given), else a one-stage :func:`prunelab.prune` run."""
        self.evaluations += 1
        if self.one_shot:
            return self.ranking.masks(sparsity, out=out)
        return self.run(sparsity).masks

    def config(self, sparsity: float, *, stages: int = 1,
               schedule: str = "exponential") -> PruneConfig:
        """The run to ``sparsity`` in ``stages`` stages as one validated
        :class:`~prunelab.config.PruneConfig` (ValueError naming a bad value)."""
        return PruneConfig.from_kwargs(self.criterion, sparsity=sparsity, scope=self.scope,
                                       stages=stages, schedule=schedule, lam=self.lam,
                                       seed=self.seed, loss=self.loss, output=self.output,
                                       **self.options)

    def run(self, sparsity: float | PruneConfig, *, stages: int = 1,
            schedule: str = "exponential",
            callback: Callable[[dict], bool | None] | None = None) -> PruneResult:
        """:func:`prunelab.pruning.prune_with` to ``sparsity`` in ``stages`` stages (``callback``
        as there: called after each stage, returning True stops the run). ``sparsity`` may be a
        :class:`~prunelab.config.PruneConfig` from :meth:`config` (then used as it is)."""
        config = sparsity if isinstance(sparsity, PruneConfig) else \
            self.config(sparsity, stages=stages, schedule=schedule)
        return prune_with(self.model, config, batch=self.batch, callback=callback)


class MaskedCopy:
    """A plain copy of ``model`` whose prunable weights show ``dense ⊙ mask`` for any masks:
    the live network of a sparsity slider.

    The copy has no parametrization (``torch.nn.utils.parametrize`` re-multiplies the mask in
    Python on every forward); its prunable weights, and the bool masks beside them
    (:attr:`masks`), are views into one flat buffer each, so that a move of a
    :class:`prunelab.masks.Ranking`'s threshold from ``k_old`` to ``k_new`` writes only the
    entries ranked between the two (:meth:`show`): the ranking's order (entries by increasing
    rank) is computed once per ranking, and the entries with ranks in ``[k_old, k_new)`` are
    zeroed, or restored from the dense weights when the threshold moves down. The masks are
    the ranking's (:meth:`prunelab.masks.Ranking.masks`, ties by index, exact counts), so the
    copy equals ``prunelab.masks.apply(model, ranking.masks(s))`` at every step; a move
    touching more than a third of the weights, a new ranking, or arbitrary masks
    (:meth:`show_masks`) take the full pass.

    Masks attached to ``model`` stay pruned (the dense weights are the effective ones, and a
    restored entry takes the attached mask's value). Weights shared by two prunable layers
    (tied) are kept as they are and always take the full pass.

    Args:
        model: the network (never modified: the copy is made here).

    Raises:
        ValueError: a model without prunable weights.

    Attributes:
        model: the plain copy (eval mode, no gradients) that forward passes should use.
        names: the prunable weight names.
        masks: ``{name: bool tensor}``, the masks shown now (live views: copy before keeping).
        kept: weights kept per layer (ints, in :attr:`names` order), updated with the masks.
    """

    # Above this fraction of changed weights a dense pass (compare + multiply per layer)
    # beats the scattered writes.
    FULL_PASS_FRACTION = 1 / 3

    def __init__(self, model: nn.Module):
        M.check_prunable(model)  # ValueError for a model without prunable weights
        previous = M.current(model)
        self.model = G.plain_copy(model).eval()  # attached masks baked into the weights
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = G.prunable_names(self.model)
        weights = [G.weight(self.model, n) for n in self.names]
        self.numels = [w.numel() for w in weights]
        self.total = sum(self.numels)
        ref = weights[0]
        self._flat = len({id(w) for w in weights}) == len(weights) and \
            len({(w.device, w.dtype) for w in weights}) <= 1
        self._starts = [0]
        for k in self.numels:
            self._starts.append(self._starts[-1] + k)
        with torch.no_grad():
            if self._flat:
                flat = torch.cat([w.detach().reshape(-1) for w in weights])
                for w, a, b in zip(weights, self._starts, self._starts[1:]):
                    w.data = flat[a:b].view(w.shape)  # the parameter now lives in ``flat``
                self._w = flat
                self._dense = flat.clone()
            self.weights = {n: G.weight(self.model, n) for n in self.names}
            self.dense = ({n: self._dense[a:b].view(self.weights[n].shape)
                           for n, a, b in zip(self.names, self._starts, self._starts[1:])}
                          if self._flat else
                          {n: w.detach().clone() for n, w in self.weights.items()})
        device = ref.device
        self._mask = torch.ones(self.total, dtype=torch.bool, device=device)
        self._prev = None
        if previous:
            self._prev = torch.ones(self.total, dtype=torch.bool, device=device)
            for n, a, b in zip(self.names, self._starts, self._starts[1:]):
                if n in previous:
                    self._prev[a:b] = previous[n].reshape(-1).to(device)
            self._mask.copy_(self._prev)
        self.masks = {n: self._mask[a:b].view(self.weights[n].shape)
                      for n, a, b in zip(self.names, self._starts, self._starts[1:])}
        self.kept = [int(torch.count_nonzero(m)) for m in self.masks.values()]
        # layer of every flat entry (for counting what a move changed per layer)
        self._layer = torch.repeat_interleave(
            torch.arange(len(self.names), device=device),
            torch.tensor(self.numels, device=device)) if self._flat else None
        self._ranking = None   # the ranking shown now
        self._order = None     # its entries by increasing rank (flat positions)
        self._groups = []      # (offset into _order, size) per ranked group
        self._ks = []          # entries pruned per group now (the ranking's thresholds)

    def show(self, ranking: M.Ranking, sparsity: float) -> bool:
        """Weights and masks at ``sparsity`` of ``ranking`` (scores of this copy's prunable
        weights, any scope but N:M); returns False when nothing changed (same ranking, same
        thresholds), so the caller may skip re-evaluating."""
        sparsity = M.check_sparsity(sparsity)
        layerwise = ranking.scope == "layerwise"
        sizes = self.numels if layerwise else [self.total]
        ks = [M.n_pruned(sparsity, size) for size in sizes]
        if ranking is self._ranking:
            if ks == self._ks:
                return False
            changed = sum(abs(a - b) for a, b in zip(ks, self._ks))
            if self._flat and changed <= self.FULL_PASS_FRACTION * self.total:
                self._move(ks)
                self._count(ks)
                return True
        else:
            self._set_ranking(ranking, layerwise)
        ranking.masks(sparsity, out=self.masks)
        self._full_pass()
        self._ks = ks
        if self._flat:
            self._count(ks)
        else:
            self.kept = [int(torch.count_nonzero(m)) for m in self.masks.values()]
        return True

    def show_masks(self, masks: G.Masks) -> None:
        """Show arbitrary masks (e.g. N:M ones) with a full pass; the next :meth:`show` then
        takes a full pass too."""
        for n, m in self.masks.items():
            m.copy_(masks[n] if n in masks else torch.ones_like(m))
            if self._prev is not None:
                a, b = self._bounds(n)
                m &= self._prev[a:b].view(m.shape)
        self._ranking, self._ks = None, []
        self._full_pass()
        self.kept = [int(torch.count_nonzero(m)) for m in self.masks.values()]

    def _bounds(self, name: str) -> tuple[int, int]:
        i = self.names.index(name)
        return self._starts[i], self._starts[i + 1]

    @torch.no_grad()
    def _full_pass(self) -> None:
        for n, w in self.weights.items():
            torch.mul(self.dense[n], self.masks[n], out=w)

    def _set_ranking(self, ranking: M.Ranking, layerwise: bool) -> None:
        """The ranking's order and what a move reads along it: entries by increasing rank
        (per layer for a layerwise ranking), their dense weights and attached masks in that
        order, and the ranks of the live entries keyed by layer (``layer · (N + 1) + rank``,
        sorted) so that the kept count of every layer at any threshold is one searchsorted."""
        missing = set(self.names) - set(ranking.ranks)
        if missing:
            raise ValueError(f"the ranking has no scores for {sorted(missing)}")
        self._ranking, self._ks = ranking, []
        if not self._flat:
            return
        device = self._mask.device
        ranks = torch.cat([ranking.ranks[n].reshape(-1) for n in self.names]).to(device)
        order = torch.empty(self.total, dtype=torch.long, device=device)
        if layerwise:  # one order per layer, as flat positions
            for a, b in zip(self._starts, self._starts[1:]):
                order[a + ranks[a:b]] = torch.arange(a, b, device=device)
            self._groups = list(zip(self._starts, self.numels))
        else:  # one order over every weight
            order[ranks] = torch.arange(self.total, device=device)
            self._groups = [(0, self.total)]
        self._order = order
        self._dense_by_rank = self._dense[order]
        self._prev_by_rank = self._prev[order] if self._prev is not None else None
        keyed = self._layer * (self.total + 1) + ranks
        if self._prev is not None:
            keyed = keyed[self._prev]  # entries pruned by attached masks are never kept
        self._keyed = keyed.sort().values
        self._alive = torch.bincount(self._layer if self._prev is None else
                                     self._layer[self._prev], minlength=len(self.names))
        self._layer_base = torch.arange(len(self.names), device=device) * (self.total + 1)
        self._live_start = torch.searchsorted(self._keyed, self._layer_base)

    def _count(self, ks: list[int]) -> None:
        """Kept weights per layer at thresholds ``ks``: live entries ranked at or above k."""
        k = torch.tensor(ks if len(ks) == len(self.names) else ks * len(self.names),
                         device=self._keyed.device)
        below = torch.searchsorted(self._keyed, self._layer_base + k) - self._live_start
        self.kept = (self._alive - below).tolist()

    @torch.no_grad()
    def _move(self, ks: list[int]) -> None:
        for (offset, _), k_old, k_new in zip(self._groups, self._ks, ks):
            if k_new == k_old:
                continue
            lo, hi = sorted((offset + k_old, offset + k_new))
            idx = self._order[lo:hi]
            if k_new > k_old:  # prune the entries ranked in [k_old, k_new)
                self._mask.index_fill_(0, idx, False)
                self._w.index_fill_(0, idx, 0)
            else:  # restore them (an entry pruned by attached masks stays pruned)
                if self._prev_by_rank is None:
                    self._mask.index_fill_(0, idx, True)
                else:
                    self._mask.index_copy_(0, idx, self._prev_by_rank[lo:hi])
                self._w.index_copy_(0, idx, self._dense_by_rank[lo:hi])
        self._ks = ks
