"""One criterion on one model at any sparsity: the engine of the pruning explorer and the
layer-collapse sweeps.

:class:`Pruner` gives the masks of a criterion at any target sparsity, two ways:

* **One-shot** (:func:`ranks_once`: one stage and a criterion that does not prune toward the
  target inside itself, i.e. not ``spec(name).uses_target``): the model is scored once and
  the scores ranked once (:class:`prunelab.masks.Ranking`); the masks at any sparsity are then
  one comparison per weight, exactly the masks one-shot :func:`prunelab.prune` selects. This is
  what makes a sparsity slider (``prunelab.widgets.PruningExplorer``) and a compression sweep
  (Tanaka et al. 2020 Figs. 1 and 3, :mod:`prunelab.collapse`) cheap.
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

from torch import nn

from prunelab import batches as B
from prunelab import criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.config import PruneConfig
from prunelab.pruning import PruneResult, prune_with

__all__ = ["Pruner", "NeedsRun", "ranks_once", "one_shot_scores", "options_for"]



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
