"""The prunable tensors of a model, addressed by name, and how its layers connect.

Names are the parameter names of the *plain* model (``"features.0.weight"``), also when masks are
attached (by default they leave the names alone; attached as parametrizations,
``named_parameters`` would say ``features.0.parametrizations.weight.original``). By default the
weights of ``nn.Linear``, ``nn.Conv1d/2d/3d``, the projections of ``nn.MultiheadAttention`` and
Linear-like third-party layers (HuggingFace's transposed ``Conv1D``) are prunable; embeddings and
norm weights when asked (``prunable=``); biases never. :func:`candidates` / :func:`layout` say how
each tensor is laid out (:func:`out_dim`, :func:`in_dim`), the one place structure-aware methods
ask.

Over 500 lines because naming the prunable tensors and tracing how layers connect (the
layer graph every structured method reads) are one idea: the graph is keyed by those names.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import operator
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

# Defined once, in models (the lower layer: models cannot import graph); re-exported here as
# ``graph.PRUNABLE_TYPES`` for the layers above.
from prunelab.models import PRUNABLE_TYPES


__all__ = ["split_name", "prunable_names", "prunables", "candidates", "check_prunable",
           "selecting", "layout", "out_dim", "in_dim", "in_dims", "canonical", "transposed_names",
           "linear_like", "is_layer", "Prunable", "KINDS", "DEFAULT_KINDS", "NORM_TYPES",
           "module_of", "weight", "weights", "is_masked", "is_parametrized",
           "plain_copy", "INPUT", "OUTPUT", "EXTERNAL", "MARKERS", "Edge", "Layer", "LayerGraph",
           "ACT_MODULES", "PASS_MODULES", "BN_MODULES", "ACT_FUNCS", "ACT_METHODS", "PASS_FUNCS",
           "PASS_METHODS", "trace", "fx_inputs", "structure_key", "layer_graph",
           "PRUNABLE_TYPES", "Scores", "Masks"]


def __dir__():
    return sorted(__all__)

Scores = dict[str, Tensor]  # name -> float tensor shaped like the weight; higher = keep
Masks = dict[str, Tensor]   # name -> bool tensor shaped like the weight; True = kept


def split_name(name: str) -> tuple[str, str]:
    """``'features.0.weight'`` -> ``('features.0', 'weight')``."""
    module_name, _, tensor_name = name.rpartition(".")
    return module_name, tensor_name


# ============================================================================ what is prunable
# One place says which tensors are prunable and how each is laid out (which dim holds the
# output units and which the inputs); every structure-aware method asks here.

KINDS: tuple[str, ...] = ("linear", "conv", "attention", "embedding", "norm")
#: The kinds pruned when nothing else is asked (DESIGN "Prunable weights").
DEFAULT_KINDS: frozenset[str] = frozenset({"linear", "conv", "attention"})
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm,
                                           nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Prunable:
    """One prunable tensor: its name, owner, kind and layout.

    ``out_dim``/``in_dim`` are the dims of the tensor that index the output units and the
    inputs (``None`` for a 1-D norm weight). ``nn.Linear`` and convolutions store ``(out, in,
    ...)``; HuggingFace's ``Conv1D`` (``nx``/``nf``) stores ``(in, out)``; an embedding table
    ``(num_embeddings, dim)`` acts as a Linear map from one-hot tokens, so ``out_dim=1``.
    """

    name: str
    module: str
    tensor: str
    kind: str
    out_dim: int
    in_dim: int | None

    @property
    def transposed(self) -> bool:
        """True when the tensor stores ``(in, out)`` (HuggingFace ``Conv1D``, embeddings)."""
        return self.in_dim == 0 and self.out_dim == 1


def linear_like(module: nn.Module) -> tuple[int, int] | None:
    """``(out_dim, in_dim)`` of a third-party layer used in place of ``nn.Linear``, else None.

    Recognised by a 2-D ``weight`` and declared sizes, never by type: ``in_features`` /
    ``out_features`` with the weight stored ``(out, in)``, or ``nx`` / ``nf`` (HuggingFace
    ``transformers.pytorch_utils.Conv1D``, ``y = x @ W + b``) with the weight stored
    ``(nx, nf) = (in, out)``.
    """
    # _parameters first: while torch.fx traces, module attribute reads return proxies
    w = module._parameters.get("weight")
    if w is None:
        w = _tensor_of(module, "weight")  # a parametrized (masked) weight
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int) and tuple(w.shape) == (o, i):
        return 0, 1
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int) and tuple(w.shape) == (nx, nf):
        return 1, 0
    return None


def is_layer(module: nn.Module) -> bool:
    """A module whose ``weight`` is a layer of the layer graph: Linear/Conv or Linear-like."""
    return isinstance(module, PRUNABLE_TYPES) or linear_like(module) is not None


def _full(mname: str, tname: str) -> str:
    return f"{mname}.{tname}" if mname else tname


def _tensor_of(module: nn.Module, tname: str) -> Tensor | None:
    # cheap membership tests first: a missing attribute costs nn.Module.__getattr__ an exception
    plist = module._modules.get("parametrizations")
    if module._parameters.get(tname) is None and tname not in module.__dict__ \
            and (plist is None or tname not in plist):
        return None
    t = getattr(module, tname, None)
    return t if isinstance(t, Tensor) else None


def candidates(model: nn.Module) -> list[Prunable]:
    """Every tensor of ``model`` of one of :data:`KINDS`, in ``named_modules`` order."""
    out: list[Prunable] = []
    attention_children: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            # out_proj is an nn.Linear the attention calls functionally: an attention projection
            attention_children.add(_full(mname, "out_proj"))
            tnames = (("in_proj_weight",) if _tensor_of(m, "in_proj_weight") is not None
                      else ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
            out += [Prunable(_full(mname, t), mname, t, "attention", 0, 1) for t in tnames
                    if _tensor_of(m, t) is not None]
            continue
        if _tensor_of(m, "weight") is None:
            continue
        if isinstance(m, PRUNABLE_TYPES):
            kind = "attention" if mname in attention_children else (
                "linear" if isinstance(m, nn.Linear) else "conv")
            out.append(Prunable(_full(mname, "weight"), mname, "weight", kind, 0, 1))
        elif isinstance(m, nn.Embedding):
            out.append(Prunable(_full(mname, "weight"), mname, "weight", "embedding", 1, 0))
        elif isinstance(m, NORM_TYPES):
            out.append(Prunable(_full(mname, "weight"), mname, "weight", "norm", 0, None))
        else:
            dims = linear_like(m)
            if dims is not None:
                out.append(Prunable(_full(mname, "weight"), mname, "weight", "linear", *dims))
    return out


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("prunelab_prunable", default=None)


def check_prunable(prunable, model: nn.Module | None = None):
    """``prunable=`` checked: None, a kind or tensor name, a collection of kinds (of
    :data:`KINDS`) and/or tensor names, or a callable ``(name, module, tensor) -> bool``.

    Returns None for the default, a callable unchanged, else a frozenset. Without ``model`` a
    string that is not a kind is taken as a tensor name (checked once a model is at hand);
    with it, ValueError names what is neither a kind nor a candidate tensor and lists both.
    TypeError for anything else.
    """
    if prunable is None or callable(prunable):
        return prunable
    items = (prunable,) if isinstance(prunable, str) else prunable
    try:
        items = frozenset(items)
    except TypeError:
        raise TypeError(f"prunable must be None, kinds among {list(KINDS)} and/or parameter "
                        f"names, or a callable (name, module, tensor) -> bool; got "
                        f"{type(prunable).__name__}") from None
    bad = [i for i in items if not isinstance(i, str)]
    if bad or not items:
        raise TypeError(f"prunable must hold kinds among {list(KINDS)} and/or parameter names "
                        f"(str), got {sorted(map(repr, items)) or 'an empty collection'}")
    if model is not None:
        names = {c.name for c in candidates(model)}
        unknown = sorted(i for i in items if i not in KINDS and i not in names)
        if unknown:
            raise ValueError(f"prunable names unknown kinds or tensors {unknown}; allowed: the "
                             f"kinds {list(KINDS)} or tensor names {sorted(names)}")
    return items


def prunables(model: nn.Module, prunable=None) -> list[Prunable]:
    """The prunable tensors of ``model`` with their layout (see :func:`prunable_names`)."""
    if prunable is None:
        prunable = _ACTIVE.get()
    if prunable is None:
        return [c for c in candidates(model) if c.kind in DEFAULT_KINDS]
    if callable(prunable):
        return [c for c in candidates(model)
                if prunable(c.name, model.get_submodule(c.module), _tensor_of(
                    model.get_submodule(c.module), c.tensor))]
    items = check_prunable(prunable, model)
    return [c for c in candidates(model) if c.kind in items or c.name in items]


def prunable_names(model: nn.Module, prunable=None) -> list[str]:
    """Names of the prunable tensors, in ``named_modules`` order.

    ``prunable`` (DESIGN "Prunable weights"): ``None`` = the kinds in effect — by default the
    weights of ``nn.Linear``, ``nn.Conv1d/2d/3d``, the projections of ``nn.MultiheadAttention``
    (``in_proj_weight``, or ``q/k/v_proj_weight`` when kdim/vdim differ, and ``out_proj``) and
    Linear-like third-party layers (:func:`linear_like`); inside :func:`selecting` (which
    ``pl.score``/``pl.prune`` use) the set given there. Otherwise kinds among :data:`KINDS`
    (``"embedding"``: ``nn.Embedding`` weights, ``"norm"``: LayerNorm/BatchNorm/GroupNorm
    weights) and/or tensor names, or a callable ``(name, module, tensor) -> bool``.
    """
    return [c.name for c in prunables(model, prunable)]


@contextlib.contextmanager
def selecting(prunable):
    """Within the block, ``prunable_names(model)`` (and every function built on it) uses
    ``prunable`` instead of the default kinds; how ``prunable=`` reaches every criterion
    without each re-deriving its own list. ``None`` leaves the setting in effect unchanged."""
    if prunable is None:
        yield
        return
    token = _ACTIVE.set(check_prunable(prunable))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def layout(model: nn.Module, name: str) -> Prunable:
    """The :class:`Prunable` entry of tensor ``name`` (any kind); ValueError if it is none."""
    for c in candidates(model):
        if c.name == name:
            return c
    raise ValueError(f"{name!r} is not a prunable tensor of {type(model).__name__}; candidates: "
                     f"{[c.name for c in candidates(model)]}")


def out_dim(model: nn.Module, name: str) -> int:
    """The dim of tensor ``name`` that indexes the output units (0 for Linear/Conv)."""
    return layout(model, name).out_dim


def in_dim(model: nn.Module, name: str) -> int | None:
    """The dim of tensor ``name`` that indexes the inputs (1 for Linear/Conv, 0 for a
    transposed HuggingFace ``Conv1D``, None for a norm weight)."""
    return layout(model, name).in_dim


def in_dims(model: nn.Module, names=None) -> dict[str, int | None]:
    """``{name: in_dim}`` of the tensors (default: the prunable ones) whose inputs are not on
    dim 1 (for :func:`prunelab.selection.select`'s N:M scope)."""
    wanted = None if names is None else set(names)
    pool = candidates(model) if wanted is not None else prunables(model)
    return {c.name: c.in_dim for c in pool
            if (wanted is None or c.name in wanted) and c.in_dim != 1}


def transposed_names(model: nn.Module) -> frozenset[str]:
    """Names of the tensors stored ``(in, out)``."""
    return frozenset(c.name for c in candidates(model) if c.transposed)


def canonical(t: Tensor, transposed: bool) -> Tensor:
    """``t`` laid out ``(out, in, ...)`` (a view): the layout the structured methods read."""
    return t.transpose(0, 1) if transposed else t


def module_of(model: nn.Module, name: str) -> nn.Module:
    """The module that owns the tensor ``name``."""
    return model.get_submodule(split_name(name)[0])


def weight(model: nn.Module, name: str) -> Tensor:
    """The tensor the forward pass uses under ``name`` (already masked when a mask is attached)."""
    module_name, tensor_name = split_name(name)
    return getattr(model.get_submodule(module_name), tensor_name)


def weights(model: nn.Module) -> dict[str, Tensor]:
    """``{name: effective weight}`` for every prunable weight."""
    return {n: weight(model, n) for n in prunable_names(model)}


def is_masked(model: nn.Module) -> bool:
    """True when any submodule carries a prunelab mask (either mechanism of
    :mod:`prunelab.masks`) or any other parametrization: the test for "read it through
    :func:`plain_copy`"."""
    from prunelab._masking import is_masked as holds_masks

    return holds_masks(model) or any(parametrize.is_parametrized(m)
                                            for m in model.modules())


#: The older name of :func:`is_masked` (masks were parametrizations only); same test.
is_parametrized = is_masked


@torch.no_grad()
def plain_copy(model: nn.Module, masks: Masks | None = None) -> nn.Module:
    """A deep copy without masks or parametrizations whose weights are the effective (masked)
    ones.

    ``masks`` (name -> bool) are multiplied in as well, so the copy computes exactly what the
    pruned model computes with ordinary parameters that autograd and hooks see directly.
    """
    from prunelab._masking import detach_all
    from prunelab._parametrize import strip_all

    # not parametrize.remove_parametrizations: it would break ``model``, whose class the copy shares
    out = detach_all(strip_all(copy.deepcopy(model)))
    for name, mask in (masks or {}).items():
        weight(out, name).mul_(mask.to(weight(out, name).dtype))
    return out


# ============================================================================== layer graph
# Which prunable layers feed which, read from the torch.fx graph (LAP paper, Sec. 2: the
# lookahead neighbours of a layer are the layers next to it in the *network*, not in module
# order, so residual networks get the right ones).

INPUT = "<input>"        # the model input, as the producer of a layer's input
OUTPUT = "<output>"      # the model output, as the consumer of a layer's output
EXTERNAL = "<external>"  # an operation the graph cannot see through (cat, attention, ...)
MARKERS = (INPUT, OUTPUT, EXTERNAL)


@dataclass(frozen=True)
class Edge:
    """The output channels of ``src`` reach the input of ``dst`` without another prunable layer.

    Attributes:
        src: weight name of the producing layer, or :data:`INPUT` / :data:`EXTERNAL`.
        dst: weight name of the consuming layer, or :data:`OUTPUT` / :data:`EXTERNAL`.
        bns: module names of the BatchNorms on the way, in order (their eval-mode scales
            multiply the signal channel-wise).
        flatten: for a conv -> (pool) -> flatten -> Linear boundary, the number of Linear input
            features each conv output channel becomes (channel-major, as ``nn.Flatten`` does);
            ``None`` when the edge does not cross such a boundary.
    """

    src: str
    dst: str
    bns: tuple[str, ...] = ()
    flatten: int | None = None


@dataclass(frozen=True)
class Layer:
    """One prunable weight and its neighbourhood.

    Attributes:
        name: the weight name (``"features.0.weight"``).
        module: the module name (``"features.0"``).
        kind: ``"linear"`` or ``"conv"``.
        in_size, out_size: input/output features (Linear) or channels (conv).
        groups: conv groups (1 for Linear).
        inputs, outputs: the :class:`Edge` s into and out of this layer.
        bn: the BatchNorm module directly after this layer (nothing but identities between).
        act: the activation that gates this layer's output units (through BatchNorm, identities
            and residual adds): an fx node name when traced, a module name otherwise.
    """

    name: str
    module: str
    kind: str
    in_size: int
    out_size: int
    groups: int
    inputs: tuple[Edge, ...]
    outputs: tuple[Edge, ...]
    bn: str | None = None
    act: str | None = None

    @property
    def prev(self) -> tuple[str, ...]:
        """Prunable layers whose outputs feed this layer's input."""
        return tuple(e.src for e in self.inputs if e.src not in MARKERS)

    @property
    def next(self) -> tuple[str, ...]:
        """Prunable layers that consume this layer's output."""
        return tuple(e.dst for e in self.outputs if e.dst not in MARKERS)

    @property
    def flatten(self) -> int | None:
        """Features per conv channel at a conv -> flatten -> Linear boundary on either side."""
        sizes = [e.flatten for e in (*self.inputs, *self.outputs) if e.flatten is not None]
        return sizes[0] if sizes else None

    @property
    def external_in(self) -> bool:
        """Part of the input comes from the model input or from an opaque operation."""
        return any(e.src in MARKERS for e in self.inputs)

    @property
    def external_out(self) -> bool:
        """Part of the output reaches the model output or an opaque operation."""
        return any(e.dst in MARKERS for e in self.outputs)


@dataclass(frozen=True)
class LayerGraph:
    """The prunable layers of a model in execution order, with their neighbours.

    ``source`` says where the connections come from: ``"fx"`` (torch.fx trace), ``"autograd"``
    (the autograd graph of one forward pass on an example batch, for models fx cannot trace) or
    ``"chain"`` (neither was possible: layers chained in registration order, with a warning).
    ``traced`` is True only for ``"fx"``; ``reason`` says why fx failed.
    """

    layers: Mapping[str, Layer]  # read-only: graphs are cached and shared
    traced: bool
    reason: str = ""
    notes: tuple[str, ...] = ()
    source: str = "fx"

    def __getitem__(self, name: str) -> Layer:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name) -> bool:
        return name in self.layers

    @property
    def names(self) -> list[str]:
        """Weight names in execution order."""
        return list(self.layers)

    @functools.cached_property
    def edges(self) -> list[Edge]:
        """Every edge once."""
        seen: dict[tuple[str, str], Edge] = {}
        for layer in self.layers.values():
            for e in (*layer.inputs, *layer.outputs):
                seen.setdefault((e.src, e.dst), e)
        return list(seen.values())


def _attrs(module, *names: str) -> tuple:
    return tuple(getattr(module, n) for n in names if hasattr(module, n))


# What the layer graph sees through between two prunable layers (public: the lookahead
# criteria walk the same chains): activation / pass-through / BatchNorm modules, and the
# functions and tensor methods that act as activations or pass the signal unchanged.
ACT_MODULES: tuple[type[nn.Module], ...] = _attrs(
    nn, "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
    "Mish", "Tanh", "Sigmoid", "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softsign",
    "LogSigmoid", "Tanhshrink", "Threshold")
PASS_MODULES: tuple[type[nn.Module], ...] = _attrs(
    nn, "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout")
BN_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
# Channel-preserving but data-dependent scales: seen through, no fixed factor.
_NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_POOL_MODULES: tuple[type[nn.Module], ...] = _attrs(
    nn, "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "LPPool1d", "LPPool2d", "LPPool3d")

ACT_FUNCS = set(_attrs(
    F, "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "elu", "elu_",
    "selu", "celu", "gelu", "silu", "mish", "tanh", "sigmoid", "hardtanh", "hardtanh_",
    "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold"))
ACT_FUNCS |= set(_attrs(torch, "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"))
ACT_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
PASS_FUNCS = set(_attrs(F, "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                         "feature_alpha_dropout")) | {torch.clone}
PASS_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type",
                 "type_as", "detach", "requires_grad_"}
_POOL_FUNCS = set(_attrs(
    F, "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d"))
_POOL_FUNCS |= set(_attrs(torch, "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
                          "adaptive_avg_pool1d", "adaptive_max_pool1d"))
_ADD_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.neg,
              torch.mul, torch.div, torch.neg}
_MUL_METHODS = {"mul", "mul_", "div", "div_", "neg", "neg_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_SHAPE_FUNCS = {torch.flatten, torch.reshape}
_NONTENSOR_METHODS = {"size", "dim", "numel", "ndimension", "is_contiguous"}


@dataclass(frozen=True)
class _Path:
    """How a producer's signal reached a node: BNs passed, flattened, still 'directly' the
    layer output (identities only: for ``bn``), or still eligible for its gating activation."""

    bns: tuple[str, ...] = ()
    flat: bool = False
    direct: bool = True
    act_ok: bool = True


class _Builder:
    """Collects edges, BNs and activations while walking a graph."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, tuple[str, nn.Module]] = {}  # module name -> (weight, module)
        # weight name -> (kind, in, out, groups) of every layer, also of the attention
        # projections nn.MultiheadAttention applies functionally (never entered: opaque)
        self.size_of: dict[str, tuple[str, int, int, int]] = {}
        by_weight: dict[str, tuple[str, nn.Module]] = {}
        for c in candidates(model):
            if c.kind not in DEFAULT_KINDS:
                continue
            m = model.get_submodule(c.module)
            if c.tensor == "weight" and is_layer(m):
                self.layers[c.module] = (c.name, m)
                self.size_of[c.name] = self.sizes(m)
            else:
                t = getattr(m, c.tensor)
                self.size_of[c.name] = ("linear", t.shape[c.in_dim], t.shape[c.out_dim], 1)
            by_weight[c.name] = (c.module, m)
        self.by_weight = by_weight
        self.inputs: dict[str, dict[str, Edge]] = {w: {} for w in by_weight}
        self.outputs: dict[str, dict[str, Edge]] = {w: {} for w in by_weight}
        self.bn: dict[str, str] = {}
        self.act: dict[str, str] = {}
        self.order: list[str] = []
        self.notes: list[str] = []

    @staticmethod
    def sizes(m: nn.Module) -> tuple[str, int, int, int]:
        if isinstance(m, nn.Linear):
            return "linear", m.in_features, m.out_features, 1
        dims = None if isinstance(m, PRUNABLE_TYPES) else linear_like(m)
        if dims is not None:
            w = m.weight
            return "linear", w.shape[dims[1]], w.shape[dims[0]], 1
        return "conv", m.in_channels, m.out_channels, m.groups

    def edge(self, src: str, dst: str, path: _Path) -> None:
        """Record src -> dst (weight names or markers), checking that channels line up."""
        flatten = None
        if src not in MARKERS and dst not in MARKERS:
            skind, _, sout, _ = self.size_of[src]
            dkind, din, _, _ = self.size_of[dst]
            ok = True
            if skind == "conv" and dkind == "linear":
                ok = path.flat and din % sout == 0
                flatten = din // sout if ok else None
            elif dkind == "conv":
                ok = not path.flat and sout == din
            else:
                ok = sout == din
            if not ok:
                self.notes.append(f"cannot match the output channels of {src} to the input of "
                                  f"{dst}; treating the connection as opaque")
                self.outputs[src].setdefault(EXTERNAL, Edge(src, EXTERNAL, path.bns))
                self.inputs[dst].setdefault(EXTERNAL, Edge(EXTERNAL, dst))
                return
        e = Edge(src, dst, path.bns, flatten)
        if dst not in MARKERS:
            self.inputs[dst].setdefault(src, e)
        if src not in MARKERS:
            self.outputs[src].setdefault(dst, e)

    def enter(self, weight_name: str, state: dict[str, _Path] | None) -> dict[str, _Path]:
        """A prunable layer consumes ``state``; its output starts a fresh path."""
        if weight_name not in self.order:
            self.order.append(weight_name)
        for src, path in (state or {EXTERNAL: _Path()}).items():
            self.edge(src, weight_name, path)
        return {weight_name: _Path()}

    def leave(self, state: dict[str, _Path] | None, dst: str) -> None:
        """The signal in ``state`` reaches the model output or an opaque operation."""
        for src, path in (state or {}).items():
            if src not in MARKERS:
                self.edge(src, dst, path)

    def batchnorm(self, name: str, bn: nn.Module,
                  state: dict[str, _Path] | None) -> dict[str, _Path] | None:
        if not state:
            return state
        if len(state) == 1:
            (src, path), = state.items()
            if (src not in MARKERS and path.direct and not path.bns
                    and bn.num_features == self.size_of[src][2]):
                self.bn.setdefault(src, name)
        return {s: replace(p, bns=p.bns + (name,), direct=False) for s, p in state.items()}

    def activation(self, name: str, state: dict[str, _Path] | None) -> dict[str, _Path] | None:
        if not state:
            return state
        for src, path in state.items():
            if src not in MARKERS and path.act_ok:
                self.act.setdefault(src, name)
        return {s: replace(p, direct=False, act_ok=False) for s, p in state.items()}

    def build(self, traced: bool, reason: str = "", source: str = "fx") -> LayerGraph:
        order = self.order + [w for w in self.by_weight if w not in self.order]
        out = {}
        for w in order:
            mname, _ = self.by_weight[w]
            kind, din, dout, groups = self.size_of[w]
            ins, outs = self.inputs[w], self.outputs[w]
            if not ins:  # never called in the traced forward (or unreachable): no neighbours
                ins = {EXTERNAL: Edge(EXTERNAL, w)}
            if not outs:
                outs = {EXTERNAL: Edge(w, EXTERNAL)}
            bn = self.bn.get(w)
            if bn is not None and any(e.bns[:1] != (bn,) for e in outs.values()):
                bn = None  # a branch bypasses the BN (pre-activation shortcut): not this layer's
            out[w] = Layer(w, mname, kind, din, dout, groups, tuple(ins.values()),
                           tuple(outs.values()), bn, self.act.get(w))
        return LayerGraph(MappingProxyType(out), traced, reason, tuple(dict.fromkeys(self.notes)),
                          source)


def _shape_args(node) -> tuple:
    """The shape of a view/reshape call, whether passed unpacked or as one sequence."""
    args = node.args[1:] if node.op == "call_method" or node.target is torch.reshape else ()
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    if "shape" in node.kwargs:
        return tuple(node.kwargs["shape"])
    return tuple(args)


def _flatten_dims(node) -> tuple:
    args = list(node.args[1:])
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start, end


def _reduce_spatial(node) -> bool:
    """True for mean/sum/amax over spatial axes only (a global pool)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return bool(dims) and all(isinstance(d, int) and d >= 2 for d in dims)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, but a torch.nn container that holds prunable layers (e.g.
    ``nn.TransformerEncoderLayer``) is traced through instead of kept as one opaque leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_layer(m):
            return True
        if any(is_layer(s) for s in m.modules()):
            return False
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model`` as an fx GraphModule, prunable layers as leaves (see :class:`_Tracer`)."""
    return torch.fx.GraphModule(model, _Tracer().trace(model))


def fx_inputs(gm: torch.fx.GraphModule, x) -> tuple:
    """Positional arguments for ``torch.fx.Interpreter(gm).run`` from model inputs ``x`` (a
    tensor, a tuple, or a mapping matched to the placeholders by name, defaults filled in)."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    out = []
    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        name = p.target.lstrip("*")
        out.append(x[name] if name in x else (p.args[0] if p.args else None))
    return tuple(out)


def _trace_graph(model: nn.Module) -> LayerGraph:
    gm = trace(model)
    b = _Builder(model)
    states: dict = {}

    def st(a):
        return states.get(a) if isinstance(a, torch.fx.Node) else None

    def main(node) -> dict[str, _Path] | None:
        for a in (*node.args, *node.kwargs.values()):
            s = st(a)
            if s:
                return s
        return None

    def union(node) -> dict[str, _Path] | None:
        merged: dict[str, _Path] = {}
        for a in node.all_input_nodes:
            for src, path in (states.get(a) or {}).items():
                merged.setdefault(src, path)
        return merged or None

    def opaque(node) -> dict[str, _Path] | None:
        merged = union(node)
        if merged is None:  # constants and sizes only: no signal involved
            return None
        b.leave(merged, EXTERNAL)
        return {EXTERNAL: _Path()}

    def update(s, **kw):
        return {k: replace(p, **kw) for k, p in s.items()} if s else s

    for node in gm.graph.nodes:
        op, target = node.op, node.target
        if op == "placeholder":
            states[node] = {INPUT: _Path()}
        elif op == "get_attr":
            states[node] = None
        elif op == "output":
            b.leave(union(node), OUTPUT)
        elif op == "call_module":
            m = gm.get_submodule(target)
            s = main(node)
            if target in b.layers:
                states[node] = b.enter(b.layers[target][0], s)
            elif isinstance(m, BN_MODULES):
                states[node] = b.batchnorm(target, m, s)
            elif isinstance(m, ACT_MODULES):
                states[node] = b.activation(node.name, s)
            elif isinstance(m, PASS_MODULES):
                states[node] = s
            elif isinstance(m, _POOL_MODULES + _NORM_MODULES):
                states[node] = update(s, direct=False, act_ok=False)
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                states[node] = update(s, flat=True, direct=False, act_ok=False)
            else:
                states[node] = opaque(node)
        else:  # call_function / call_method
            method = target if op == "call_method" else None
            s = main(node)
            if s is None and op == "call_function" and target is not getattr:
                states[node] = union(node)  # arithmetic on sizes/constants
                if states[node] is not None:
                    states[node] = opaque(node)
            elif method in _NONTENSOR_METHODS or target is getattr:
                states[node] = None
            elif target in ACT_FUNCS or method in ACT_METHODS:
                states[node] = b.activation(node.name, s)
            elif target in PASS_FUNCS or method in PASS_METHODS:
                states[node] = s
            elif target in _POOL_FUNCS:
                states[node] = update(s, direct=False, act_ok=False)
            elif target in _ADD_FUNCS or method in _ADD_METHODS:
                states[node] = update(union(node), direct=False)
            elif target in _MUL_FUNCS or method in _MUL_METHODS:
                states[node] = update(union(node), direct=False, act_ok=False)
            elif (target in _REDUCE_FUNCS or method in _REDUCE_METHODS) and _reduce_spatial(node):
                # a global pool; without keepdim it leaves (N, C): features = channels
                keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                states[node] = update(s, direct=False, act_ok=False, flat=not keep)
            elif (target is torch.flatten or method == "flatten") \
                    and _flatten_dims(node) == (1, -1):
                states[node] = update(s, flat=True, direct=False, act_ok=False)
            elif (target is torch.reshape or method in ("view", "reshape")) \
                    and len(_shape_args(node)) == 2:
                states[node] = update(s, flat=True, direct=False, act_ok=False)
            else:
                states[node] = opaque(node)
    return b.build(traced=True)


def _chain_graph(model: nn.Module, reason: str) -> LayerGraph:
    """Fallback: prunable layers as a chain in registration order, BNs/activations between."""
    b = _Builder(model)
    leaves = [(n, m) for n, m in model.named_modules()
              if is_layer(m) or not any(True for _ in m.children())]
    state: dict[str, _Path] | None = {INPUT: _Path()}
    for name, m in leaves:
        if name in b.layers:
            state = b.enter(b.layers[name][0], state)
        elif isinstance(m, BN_MODULES):
            state = b.batchnorm(name, m, state)
        elif isinstance(m, ACT_MODULES):
            state = b.activation(name, state)
        elif isinstance(m, PASS_MODULES):
            pass
        elif isinstance(m, nn.Flatten):
            state = {k: replace(p, flat=True, direct=False, act_ok=False) for k, p in state.items()}
        else:
            state = {k: replace(p, direct=False, act_ok=False) for k, p in state.items()}
    b.leave(state, OUTPUT)
    return b.build(traced=False, reason=reason, source="chain")


# Autograd node names (without the trailing version digit) by what they do to channels.
_AG_ACT = {"ReluBackward", "GeluBackward", "TanhBackward", "SigmoidBackward", "SiluBackward",
           "EluBackward", "LeakyReluBackward", "HardtanhBackward", "SoftplusBackward",
           "MishBackward", "HardswishBackward", "HardsigmoidBackward", "ThresholdBackward",
           "PreluKernelBackward", "PreluBackward", "RreluWithNoiseBackward", "LogSigmoidBackward",
           "CeluBackward", "SeluBackward", "Relu6Backward"}
_AG_PASS = {"CloneBackward", "ToCopyBackward", "AliasBackward", "NativeDropoutBackward",
            "DropoutBackward", "FeatureDropoutBackward", "ContiguousBackward"}
_AG_POOL = {"MaxPool1DWithIndicesBackward", "MaxPool2DWithIndicesBackward",
            "MaxPool3DWithIndicesBackward", "AvgPool2DBackward", "AvgPool3DBackward",
            "AvgPool1DBackward", "AdaptiveAvgPool2DBackward", "AdaptiveAvgPool3DBackward",
            "AdaptiveMaxPool2DBackward", "AdaptiveMaxPool3DBackward", "SqueezeBackward",
            "UnsqueezeBackward"}
_AG_NORM = {"NativeLayerNormBackward", "NativeGroupNormBackward"}
_AG_BN = {"NativeBatchNormBackward", "CudnnBatchNormBackward", "MiopenBatchNormBackward"}
_AG_ADD = {"AddBackward", "SubBackward"}
_AG_MUL = {"MulBackward", "DivBackward", "NegBackward"}
_AG_REDUCE = {"MeanBackward", "SumBackward", "AmaxBackward"}
_AG_SELECT = {"SelectBackward", "SliceBackward"}
_AG_VIEW = {"ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "ReshapeBackward"}


def _ag_kind(node) -> str:
    return node.name().rstrip("0123456789")


def _ag_out_shape(node) -> tuple | None:
    meta = getattr(node, "_input_metadata", None)
    return tuple(meta[0].shape) if meta else None


def _autograd_graph(model: nn.Module, example, forward, reason: str) -> LayerGraph:
    """The layer graph read from the autograd graph of one forward pass on ``example``.

    For models torch.fx cannot trace (HuggingFace models, data-dependent control flow): hooks
    record which autograd node each prunable layer and BatchNorm produced; the nodes are then
    visited inputs-first and the signal of every producer is followed through the same rules as
    the fx walk (activations, BatchNorm, pooling, norms, residual adds, flatten; anything else,
    e.g. attention's matrix products or a concatenation, is opaque).
    """
    from prunelab import batches as B

    b = _Builder(model)
    produced: dict = {}   # autograd node -> ("layer", weight, input tensor) | ("bn", name, module)
    inputs: set[int] = set()

    def leafy(t):
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.detach().requires_grad_(True)
            inputs.add(id(t))
        return t

    x = B.map_tensors(example, leafy)
    internal: set = set()  # autograd nodes a layer made inside its own call

    def inside(out_fn, args) -> None:
        """Mark the nodes between a layer's inputs and its output (a Linear on (N, T, F) runs
        view -> mm -> view; a Conv1D addmm and a view): they are the layer, not the network,
        and read as opaque they would cut its input off from its producers."""
        stops = {a.grad_fn for a in args if isinstance(a, Tensor) and a.grad_fn is not None}
        stack = [nxt for nxt, _ in out_fn.next_functions if nxt is not None]
        while stack:
            node = stack.pop()
            if node in stops or node in internal or _ag_kind(node) == "AccumulateGrad" \
                    or node in produced:
                continue
            internal.add(node)
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)

    handles = []
    for mname, m in model.named_modules():
        if mname in b.layers:
            def post(mod, args, out, w=b.layers[mname][0]):
                if w not in b.order:
                    b.order.append(w)  # execution order, as the fx walk records it
                if isinstance(out, Tensor) and out.grad_fn is not None:
                    produced[out.grad_fn] = ("layer", w, args[0] if args else None)
                    inside(out.grad_fn, args)
        elif isinstance(m, BN_MODULES):
            def post(mod, args, out, name=mname):
                if isinstance(out, Tensor) and out.grad_fn is not None:
                    produced[out.grad_fn] = ("bn", name, mod)
        else:
            continue
        handles.append(m.register_forward_hook(post))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), B.evaluating(model):
            z = forward(model, x)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    if not isinstance(z, Tensor) or z.grad_fn is None:
        raise ValueError(f"the output of {type(model).__name__} does not depend on any "
                         f"parameter; no layer graph can be read from it")
    # Topological order, inputs first (iterative post-order DFS over next_functions).
    order, seen, stack = [], set(), [(z.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                stack.append((nxt, False))
    states: dict = {}

    def union(node) -> dict[str, _Path] | None:
        merged: dict[str, _Path] = {}
        for nxt, _ in node.next_functions:
            for src, path in (states.get(nxt) or {}).items():
                merged.setdefault(src, path)
        return merged or None

    def update(s, **kw):
        return {k: replace(p, **kw) for k, p in s.items()} if s else s

    def state_of(t) -> dict[str, _Path] | None:
        if not isinstance(t, Tensor):
            return None
        if t.grad_fn is not None:
            return states.get(t.grad_fn)
        return {INPUT: _Path()} if id(t) in inputs else None

    for i, node in enumerate(order):
        kind = _ag_kind(node)
        if node in produced:
            tag = produced[node]
            if tag[0] == "layer":
                states[node] = b.enter(tag[1], state_of(tag[2]))
            else:
                states[node] = b.batchnorm(tag[1], tag[2], union(node))
            continue
        if kind == "AccumulateGrad":
            states[node] = {INPUT: _Path()} if id(node.variable) in inputs else None
            continue
        if node in internal:
            states[node] = None
            continue
        s = union(node)
        if s is None:
            states[node] = None
        elif kind in _AG_ACT:
            states[node] = b.activation(f"{kind}#{i}", s)
        elif kind in _AG_PASS:
            states[node] = s
        elif kind in _AG_POOL or kind in _AG_NORM or kind in _AG_BN:
            states[node] = update(s, direct=False, act_ok=False)
        elif kind in _AG_ADD:
            states[node] = update(s, direct=False)
        elif kind in _AG_MUL:
            states[node] = update(s, direct=False, act_ok=False)
        elif kind in _AG_REDUCE or kind in _AG_SELECT:
            # A pool over positions (spatial mean, mean over tokens, the CLS token's select)
            # keeps the channels; over the channel axis it is opaque.
            sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()) or ())
            dims = getattr(node, "_saved_dim", None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            nd = len(sizes)
            dims = tuple(d % nd for d in dims) if nd else ()
            after = _ag_out_shape(node)

            def channel(src: str) -> int:
                return 1 if b.size_of[src][0] == "conv" else nd - 1
            if dims and 0 not in dims and all(channel(src) not in dims
                                              for src in s if src not in MARKERS):
                flat = after is not None and len(after) == 2 and nd > 2
                states[node] = update(s, direct=False, act_ok=False, flat=flat)
            else:
                b.leave(s, EXTERNAL)
                states[node] = {EXTERNAL: _Path()}
        elif kind in _AG_VIEW:
            before = tuple(getattr(node, "_saved_self_sym_sizes", ()) or ())
            after = _ag_out_shape(node)
            if after is not None and before == after:
                states[node] = s
            elif after is not None and len(after) == 2 and len(before) > 2 \
                    and after[0] == before[0]:
                states[node] = update(s, flat=True, direct=False, act_ok=False)
            else:
                b.leave(s, EXTERNAL)
                states[node] = {EXTERNAL: _Path()}
        else:
            b.leave(s, EXTERNAL)
            states[node] = {EXTERNAL: _Path()}
    b.leave(states.get(z.grad_fn), OUTPUT)
    return b.build(traced=False, reason=reason, source="autograd")


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_FROZEN_MAX = 256  # container attributes longer than this enter the key by type and length


def _ident(obj):
    """``obj`` by identity, without keeping it alive or trusting a reusable ``id``."""
    try:
        hash(obj)
        return weakref.ref(obj)
    except TypeError:  # no weak references (or unhashable): its id, as good as it gets
        return ("id", id(obj))


def _frozen(v):
    """A hashable stand-in for an attribute value that can steer ``forward``.

    Scalars and hashable tuples as they are; lists, dicts and sets (and tuples holding them)
    recursively; functions (e.g. an activation held as ``self.act = torch.relu``) by identity;
    any other object as ``...`` (present, contents not compared).
    """
    if isinstance(v, _SCALARS):
        return v
    if type(v) is tuple:
        try:
            hash(v)  # sizes such as kernel_size: as they are
            return v
        except TypeError:
            pass
    if isinstance(v, (tuple, list, set, frozenset, dict)):
        if len(v) > _FROZEN_MAX:
            return (type(v), len(v))
        if isinstance(v, dict):
            return (dict, tuple((_frozen(k), _frozen(x)) for k, x in v.items()))
        items = (_frozen(x) for x in v)
        return (type(v), frozenset(items) if isinstance(v, (set, frozenset)) else tuple(items))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                      functools.partial)):
        return _ident(v)
    return ...


def structure_key(model: nn.Module) -> tuple:
    """A cheap hashable key of everything the traced graph can depend on.

    Per module: its name and type, the ``forward`` its class has now (a method patched onto
    the class counts), any instance-level ``forward``, the shapes of its parameters (which
    decide what is Linear-like, :func:`linear_like`) and its public plain attributes (sizes
    such as ``in_features`` — the graph reads layer sizes from them — and flags like ``stride``
    or a block's ``preactivated_shortcut``, lists/dicts of such values, functions held as
    attributes) that steer ``forward``. Two models with the same key trace to the same graph,
    whatever their weights; a model edited in place (a module swapped, resized or added, an
    attribute or a ``forward`` changed) gets a new key. Functions enter by weak reference, so
    a key keeps nothing alive and an id reused after garbage collection cannot match.
    Not covered: module hooks and globals a ``forward`` reads.
    """
    key = []
    for name, m in model.named_modules():
        d = m.__dict__
        attrs = tuple([(k, v if isinstance(v, _SCALARS) else _frozen(v)) for k, v in d.items()
                       if k not in _MODULE_INTERNALS and k[0] != "_"])
        shapes = tuple([(k, None if p is None else p.shape) for k, p in m._parameters.items()])
        fwd = d.get("forward")
        cls = type(m)
        cfwd = cls.forward
        try:
            hash(cfwd)  # a function (lives as long as its class)
        except TypeError:
            cfwd = ("id", id(cfwd))
        key.append((name, cls, cfwd, attrs, shapes, None if fwd is None else _ident(fwd)))
    return tuple(key)


_GRAPHS: OrderedDict[tuple, LayerGraph] = OrderedDict()
_GRAPHS_MAX = 64


def _build_graph(model: nn.Module, example=None, forward=None) -> LayerGraph:
    plain = plain_copy(model) if is_masked(model) else model
    try:
        graph = _trace_graph(plain)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: fall back
        reason = f"{type(err).__name__}: {err}".split("\n")[0][:300]
        if example is not None:
            graph = _autograd_graph(plain, example, forward, reason)
        else:
            graph = _chain_graph(plain, reason)
    for note in graph.notes:
        warnings.warn(f"prunelab.graph: {note}", stacklevel=3)
    return graph


def layer_graph(model: nn.Module, example=None, *, forward=None) -> LayerGraph:
    """How the prunable layers of ``model`` connect: from ``torch.fx.symbolic_trace``, else from
    the autograd graph of one forward pass on ``example``.

    For every prunable weight: the prunable layers whose outputs feed its input (``prev``:
    through activations, BatchNorm, pooling, dropout, flatten/view, identities and residual
    adds, where several producers can meet) and those that consume its output (``next``), the
    BatchNorm directly after it (``bn``), the features per channel at a conv -> flatten -> Linear
    boundary (``flatten``) and the activation gating its outputs (``act``). A model with
    parametrizations (masks) is traced through a plain copy.

    A model torch.fx cannot trace (HuggingFace models, data-dependent control flow) is read from
    the autograd graph of ``forward(model, example)`` (``source="autograd"``; ``example``: the
    model inputs, a tensor, mapping or tuple; ``forward`` defaults to calling the model and
    taking its logits). Without an example it falls back to a chain in registration order, with
    a warning saying so, ``traced=False`` and ``source="chain"``.

    Graphs are cached by :func:`structure_key` (and the source), so repeated calls on (copies of)
    the same architecture cost a key computation, not a trace.
    """
    if forward is None:
        from prunelab import batches as B

        def forward(m, x):
            return B.output_tensor(B.call(m, x))
    key = structure_key(model)
    graph = _GRAPHS.get(key)
    if graph is not None and graph.source == "chain" and example is not None:
        graph = _GRAPHS.get((key, "autograd"))
        if graph is None:
            graph = _build_graph(model, example, forward)
            _GRAPHS[(key, "autograd")] = graph
    if graph is None:
        graph = _build_graph(model, example, forward)
        _GRAPHS[key] = graph
        while len(_GRAPHS) > _GRAPHS_MAX:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key if key in _GRAPHS else (key, "autograd"))
    if graph.source == "chain":
        warnings.warn(f"prunelab.graph: torch.fx cannot trace {type(model).__name__} "
                      f"({graph.reason}); treating its prunable layers as a chain in "
                      f"registration order, so neighbour-based criteria (the LAP family) may pick "
                      f"the wrong neighbours in branching models; pass an example batch "
                      f"(batch=) to read the graph from one forward pass instead", stacklevel=2)
    return graph
