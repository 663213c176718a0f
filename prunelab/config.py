"""One validated pruning configuration, checked once where it enters the library.

:class:`PruneConfig` holds what a pruning run is (LM paper Algorithm 1: criterion, final
sparsity or per-layer sparsities, scope, stages π, schedule, step-size penalty λ, seed and the
criterion's options). Building one validates every field (numpy scalars accepted and read at
their own precision; bools, NaN and values out of range raise ValueError naming the argument,
the value and what is allowed). :func:`prunelab.pruning.prune`, :class:`prunelab.experiments.Sweep`
/ :func:`~prunelab.experiments.run_one` and the explorer build it from their arguments; the
layers below (:func:`prunelab.pruning.prune_with`, the stage loop, :func:`prunelab.criteria.compute`
with ``copy=False``) take it and trust it.

One name for the sparsity along the path: ``sparsity`` (final total fraction pruned),
``layer_sparsity`` (final per-layer fractions), ``stage_targets`` (the total after each stage).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from prunelab import batches as B
from prunelab import criteria as C
from prunelab import graph as G
from prunelab import selection as S
from prunelab import semistructured as NM
from prunelab.train import OPTIMIZERS

__all__ = ["PruneConfig", "check_integer", "check_recipe_fields", "prunable_label",
           "SCHEDULES", "SCOPES"]


def __dir__():
    return sorted(__all__)


SCHEDULES = S.SCHEDULES
SCOPES = S.SCOPES


def check_integer(value, what: str, minimum: int) -> int:
    """``value`` (numpy integers too) as an int >= ``minimum``; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(value, what: str) -> float:
    v = S.as_real(value, what, "a finite number > 0")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return v


def _nonnegative(value, what: str) -> float:
    v = S.as_real(value, what, "a finite number >= 0")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


def check_recipe_fields(fields: Mapping[str, Any], what: str = "finetune") -> dict[str, Any]:
    """Fine-tuning overrides (fields of :class:`prunelab.train.Recipe`), validated and canonical.

    ``optimizer`` in ("adam", "sgd"); ``lr`` > 0; ``epochs``, ``batch_size`` integers >= 1;
    ``momentum`` in [0, 1); ``weight_decay`` >= 0; ``milestones`` integers >= 1; ``gamma`` > 0;
    ``patience``, ``max_steps`` None or integers >= 1. Numbers come back as Python numbers.
    """
    known = {f.name for f in dataclasses.fields(_recipe_class())}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"{what}: unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = f"{what}[{key!r}]"
        if key == "optimizer":
            if value not in OPTIMIZERS:
                raise ValueError(f"{name} must be one of {OPTIMIZERS}, got {value!r}")
            out[key] = value
        elif key in ("lr", "gamma"):
            out[key] = _positive(value, name)
        elif key == "weight_decay":
            out[key] = _nonnegative(value, name)
        elif key == "momentum":
            m = S.as_real(value, name, "a number in [0, 1)")
            if not 0.0 <= m < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
            out[key] = m
        elif key in ("epochs", "batch_size"):
            out[key] = check_integer(value, name, 1)
        elif key in ("patience", "max_steps"):
            out[key] = None if value is None else check_integer(value, f"{name} (or None)", 1)
        elif key == "milestones":
            if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{name} must be a list of integers >= 1, got {value!r}")
            out[key] = [check_integer(v, f"{name} entry", 1) for v in value]
    return out


def prunable_label(prunable) -> str:
    """A plain, stable label of a ``prunable=`` setting for a frame column or a config key:
    the sorted kinds/names joined by ``+``, or a callable's qualified name."""
    if callable(prunable):
        return f"{getattr(prunable, '__module__', '')}.{getattr(prunable, '__qualname__', '?')}"
    return "+".join(sorted(prunable))


def _recipe_class():
    from prunelab.train import Recipe

    return Recipe


@dataclasses.dataclass(frozen=True, eq=True)
class PruneConfig:
    """What a pruning run is, validated when built (then trusted by the layers below).

    Attributes:
        criterion: a name from :func:`prunelab.criteria.names`.
        sparsity: final total fraction of prunable weights pruned, in [0, 1); may be None when
            ``layer_sparsity`` is given (which then overrides it and ``scope``).
        layer_sparsity: final per-layer fractions ``{weight name: fraction}`` (a mapping: one
            fraction for every layer is ``sparsity=s, scope="layerwise"``); layers not named
            keep their weights. Names are checked against the model by
            :func:`prunelab.pruning.prune_with`, which has it.
        scope: "global", "layerwise" or "normalized" (:func:`prunelab.selection.select`), or an
            N:M pattern ``"n:m"`` (e.g. ``"2:4"``: keep n of every m consecutive weights along
            each layer's input dimension; :mod:`prunelab.semistructured`). With ``"n:m"``,
            ``sparsity`` is None or ``1 - n/m`` (stored as ``1 - n/m``, the sparsity of the N:M
            layers) and ``layer_sparsity`` is not allowed; stages step n down from m
            (:func:`prunelab.semistructured.stage_ns`).
        nm_layers: with an N:M scope, the weights the pattern applies to (names checked against
            the model by :func:`prunelab.pruning.prune_with`); the others are left as they are
            (not pruned). None (default): every prunable weight, and a layer whose input
            dimension is not divisible by m raises ValueError naming it.
        stages: number of pruning stages π >= 1.
        schedule: "linear" or "exponential" (LM paper Algorithm 1).
        lam: step-size penalty λ >= 0 (LM paper Sec. 3.2).
        seed: integer >= 0; stage i of a stochastic criterion uses ``seed + i``.
        options: criterion-specific options (e.g. ``{"signed": True}``); an option the
            criterion does not take raises TypeError naming it and the valid ones.
        loss: ``"cross_entropy"`` (default; per class or per token), ``"mse"`` or a callable
            ``(output, target) -> mean loss`` (:mod:`prunelab.batches`).
        output: optional callable ``model output -> tensor``.
        device: where the pruning runs (e.g. ``"cuda"``); None: where the model's parameters
            are. The pruned model is returned on that device.
        prunable: which tensors are prunable (:func:`prunelab.graph.prunable_names`): None
            (default: Linear, Conv, attention projections, Linear-like layers), kinds among
            ``prunelab.graph.KINDS`` and/or tensor names (names checked against the model by
            :func:`prunelab.pruning.prune_with`), or a callable ``(name, module, tensor) ->
            bool``. In :meth:`to_dict` (and so a sweep's key) only when not None.
    """

    criterion: str
    sparsity: float | None = None
    layer_sparsity: Mapping[str, float] | None = None
    scope: str = "global"
    nm_layers: tuple[str, ...] | None = None
    stages: int = 1
    schedule: str = "exponential"
    lam: float = 0.0
    seed: int = 0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss: Any = "cross_entropy"
    output: Any = None
    device: str | None = None
    prunable: Any = None

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        C.spec(self.criterion)  # ValueError listing the valid names
        S.check_scope(self.scope)
        if self.nm is not None:
            if self.layer_sparsity is not None:
                raise ValueError(f"layer_sparsity cannot be combined with the N:M scope "
                                 f"{self.scope!r}: the pattern fixes each layer's sparsity at "
                                 "1 - n/m (choose the layers with nm_layers=)")
            set_(self, "sparsity", S.nm_sparsity(self.scope, self.sparsity))
        if self.nm_layers is not None:
            if self.nm is None:
                raise ValueError(f"nm_layers is for an N:M scope such as '2:4', got "
                                 f"scope={self.scope!r}")
            if isinstance(self.nm_layers, str) or not all(
                    isinstance(n, str) for n in self.nm_layers) or not self.nm_layers:
                raise ValueError(f"nm_layers must be a non-empty list of weight names, got "
                                 f"{self.nm_layers!r}")
            set_(self, "nm_layers", tuple(self.nm_layers))
        if self.layer_sparsity is not None:
            if not isinstance(self.layer_sparsity, Mapping):
                raise ValueError(
                    f"layer_sparsity must be a mapping {{weight name: fraction in [0, 1)}}, got "
                    f"{self.layer_sparsity!r}; for one fraction of every layer pass "
                    f"sparsity={self.layer_sparsity!r}, scope='layerwise'")
            layers = {}
            for n, v in self.layer_sparsity.items():
                if not isinstance(n, str):
                    raise ValueError(f"layer_sparsity keys must be weight names (str), got {n!r}")
                layers[n] = S.check_sparsity(v, f"layer_sparsity[{n!r}]")
            set_(self, "layer_sparsity", layers)  # our own copy
        elif self.sparsity is None:
            raise ValueError("pass sparsity= (a fraction in [0, 1)) or layer_sparsity= (per layer)")
        if self.sparsity is not None:
            set_(self, "sparsity", S.check_sparsity(self.sparsity))
        set_(self, "stages", check_integer(self.stages, "stages", 1))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        set_(self, "lam", C.check_lam(self.lam))
        set_(self, "seed", check_integer(self.seed, "seed", 0))
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping of criterion options, "
                             f"got {self.options!r}")
        set_(self, "options", dict(self.options))  # our own copy
        C.check_options(self.criterion, self.options)
        set_(self, "prunable", G.check_prunable(self.prunable))  # kinds checked; names later
        obj = B.objective(self.loss, self.output)  # ValueError/TypeError naming the loss
        set_(self, "loss", obj.loss)
        if self.device is not None:
            import torch

            try:
                set_(self, "device", str(torch.device(self.device)))
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device must be None or a torch device name such as 'cpu' or "
                                 f"'cuda:0', got {self.device!r}") from err

    @property
    def objective(self) -> B.Objective:
        """The loss and output rule as a :class:`prunelab.batches.Objective`."""
        return B.objective(self.loss, self.output)

    FIELDS = ("criterion", "sparsity", "layer_sparsity", "scope", "nm_layers", "stages",
              "schedule", "lam", "seed", "loss", "output", "device", "prunable")

    @classmethod
    def from_kwargs(cls, criterion: str, **kwargs) -> PruneConfig:
        """Build from keyword arguments as :func:`prunelab.prune` takes them: the fields by
        name, every other keyword a criterion option (``PruneConfig.from_kwargs("lm",
        sparsity=0.9, lam=1.0, signed=True)``)."""
        fields = {k: kwargs.pop(k) for k in cls.FIELDS if k in kwargs}
        options = dict(kwargs.pop("options", None) or {})
        options.update(kwargs)
        return cls(criterion, **fields, options=options)

    def replace(self, **changes) -> PruneConfig:
        """A copy with some fields changed (validated again: it is a new entry)."""
        return dataclasses.replace(self, **changes)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M scope, else None."""
        return NM.parse_nm(self.scope) if ":" in self.scope else None

    @property
    def stage_scope(self) -> str:
        """The scope the criteria see: per-layer targets (and N:M, the same fraction of every
        N:M layer) are layerwise."""
        return "layerwise" if self.layer_sparsity is not None or self.nm else self.scope

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (``layer_sparsity`` a dict or None); options left out."""
        return {"criterion": self.criterion, "sparsity": self.sparsity, "scope": self.scope,
                "stages": self.stages, "schedule": self.schedule, "lam": self.lam,
                "seed": self.seed,
                "layer_sparsity": dict(self.layer_sparsity) if self.layer_sparsity else None,
                **({"nm_layers": list(self.nm_layers)} if self.nm_layers else {}),
                **({"prunable": prunable_label(self.prunable)}
                   if self.prunable is not None else {})}
