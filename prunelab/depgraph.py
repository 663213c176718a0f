"""Dependency groups of a model's channels, units and heads, from one traced forward pass.

Which channels must be removed together (Fang et al. 2023, "DepGraph: Towards Any Structural
Pruning", Sec. 3: a residual add ties the channels of every summand, a concatenation offsets
them, a normalisation carries them, a depthwise conv ties its input and output), found by label
propagation over the ATen operations of one forward pass, and what a selection of channels then
implies for every layer (:func:`plan`). :mod:`prunelab.surgery` applies that plan (a physically
smaller copy, or the masked model it must equal).

Over 500 lines because the label rule of each ATen operation family (views and concatenations,
point-wise ties, reductions, pools, matrix products, attention, normalisation), the union-find the
rules feed, the meta-tensor pass that runs them without arithmetic and the closure of a selection
under its groups are one algorithm: a rule only makes sense with the groups it builds and the
constraints :func:`plan` checks on them.

How the dependencies are found (:func:`dependencies`)
    One forward pass of the example is traced at the ATen level (a ``TorchDispatchMode``: the same
    operations autograd records as ``grad_fn`` nodes, but with their arguments and output shapes,
    so models ``torch.fx`` cannot trace — data-dependent control flow, HuggingFace-style modules —
    are followed). Every output channel of a Linear/Conv/Embedding gets an integer *label*; a label
    tensor shaped like each activation is carried along by replaying every view, reshape, permute,
    cat, split, slice, expand and clone on the labels. Point-wise ops with two labelled operands
    (residual adds, gating products) tie their labels position by position: the union-find classes
    are the *dependency groups* (all members of a sum lose the same channels). Concatenations keep
    each input's labels at their offsets; flatten into a Linear gives each channel its block of
    columns; BatchNorm carries labels through and has its entries sliced; a depthwise conv ties its
    output channel to its input channel; a matrix product ties the labels of its contracted
    dimension (query and key units of one attention head, also inside
    ``scaled_dot_product_attention``). Anything that mixes channels — LayerNorm over them,
    softmax over them, an unknown operation, the model output, a model input added to a channel
    — *blocks* the labels it sees: a selection touching a blocked group raises ``ValueError``
    naming the layer and the reason.

    The labels depend only on shapes and on the sequence of operations, so the pass first runs on
    *meta* tensors (no arithmetic: ~10 ms for a ResNet-18 whose real forward costs ~20 ms on one
    thread); a forward that reads values (``.item()``, ``if x.any()``, HuggingFace's mask checks)
    or writes into a tensor that is no activation raises there, and the real example is traced
    instead. Both paths give the same groups (tests/test_depgraph.py).

Groups and selections
    A selection must name every member of a group with the same channels (``expand=False``, the
    default, raises ``ValueError`` naming the layer and the group otherwise, so a residual stream is
    never pruned by surprise); ``expand=True`` removes the union over the group instead. A grouped
    conv accepts only whole groups (input and output channels of the same groups). Attention heads:
    a key naming an ``nn.MultiheadAttention`` or a module with ``num_attention_heads`` /
    ``attention_head_size`` (HuggingFace style: ``query``/``key``/``value`` Linear children) selects
    heads; their q/k/v rows and the output projection's columns go, and the head counts are updated.
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _pop_mode, _push_mode

from prunelab import batches as B
from prunelab.graph import is_masked, plain_copy

__all__ = ["CONST", "FIXED", "HEADS", "HEAD_SIZE", "Group", "DependencyGraph", "Plan", "call",
           "dependencies", "example_input", "output_tensors", "plan"]



def __dir__():
    return sorted(__all__)

_FIXED_REASON = ("it is combined with channels that cannot be removed (a model input or the "
                 "output of an opaque operation)")
CONST = -1  # a constant (parameter, literal): no channel
FIXED = -2  # a channel that cannot be removed (model input, output of an opaque op)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Attribute names of an attention module's head count and head size (HuggingFace conventions).
HEADS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZE = ("attention_head_size", "head_dim", "head_size")
_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))

# ATen ops replayed on the labels as they are (shape and indexing only)
_STRUCTURAL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand",
    "cat", "split", "split_with_sizes", "slice", "select", "unsqueeze", "squeeze", "clone",
    "contiguous", "_to_copy", "detach", "alias", "unbind", "chunk", "narrow", "flatten",
    "unflatten", "lift_fresh", "movedim", "repeat", "stack", "expand_as",
    "view_as", "squeeze_", "unsqueeze_", "transpose_", "t_",
}
_REDUCE = {"mean", "sum", "amax", "amin"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
         "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
         "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d",
         "adaptive_max_pool2d", "adaptive_max_pool1d", "constant_pad_nd", "reflection_pad2d",
         "replication_pad2d", "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool1d"}
_MATMUL = {"mm", "bmm"}


# ============================================================================== the trace


@dataclass
class _Producer:
    module: str
    kind: str          # "linear", "conv", "embedding", "heads"
    ids: Tensor        # label of each output channel / head


@dataclass
class _Grouped:
    module: str
    groups: int
    inputs: Tensor     # labels of the input channels
    outputs: Tensor    # labels of the output channels


@dataclass
class Group:
    """One dependency group: channels that must be removed together.

    Attributes:
        members: ``(module, channel)`` pairs (module = the producing layer; for attention heads
            the attention module and the head). A residual stream of width C gives C groups,
            each holding one channel of every layer whose outputs are summed.
        blocked: Why the group cannot be removed, or ``""``.
    """

    members: list[tuple[str, int]]
    blocked: str = ""


class DependencyGraph:
    """The dependency groups of one model, from one traced forward pass (see module docstring).

    Attributes:
        producers: module name -> number of removable outputs (channels, units or heads).
        groups: every :class:`Group` with at least one member.
    """

    def __init__(self, model: nn.Module, example, *, meta: bool = False):
        self._root = torch.arange(0)    # label -> smallest label of its group
        self._n = 0                      # labels in use
        self._starts: list[int] = []   # first label of each producer, in creation order
        self._names: list[str] = []
        self.blocked: dict[int, str] = {}
        self.prods: dict[str, _Producer] = {}
        self.consumers: dict[str, Tensor] = {}    # module -> label of each input column/channel
        self.consumer_kind: dict[str, str] = {}
        self.norms: dict[str, Tensor] = {}        # BatchNorm -> label of each channel
        self.grouped: dict[str, _Grouped] = {}
        self.splits: list[tuple[Tensor, int, int]] = []   # (labels of a split dim, blocks, size)
        self.matmul_ids: set[int] = set()         # labels contracted by a matrix product
        self.hf_heads: dict[str, tuple[list[str], int, int]] = {}  # attn module -> qkv, H, d
        #: True when the trace ran on meta tensors (shapes only), False on the example's values
        self.meta = meta
        _trace(self, model, example, meta)
        self._finish()

    # ------------------------------------------------------------------ union-find
    def new_ids(self, module: str, n: int) -> Tensor:
        start = self._n
        self._n += n
        if self._n > len(self._root):  # capacity doubles: amortised O(1) per label
            cap = max(2 * len(self._root), self._n, 64)
            self._root = torch.cat([self._root, torch.arange(len(self._root), cap)])
        self._starts.append(start)
        self._names.append(module)
        return torch.arange(start, start + n)

    def owner(self, i: int) -> tuple[str, int]:
        """(module, output index) of label ``i``."""
        k = bisect.bisect_right(self._starts, i) - 1
        return self._names[k], i - self._starts[k]

    def find(self, i: int) -> int:
        """The root (smallest label) of ``i``'s group."""
        return int(self._root[i])

    def _merge(self, x: Tensor, y: Tensor) -> None:
        """Union of the classes of ``x[k]`` and ``y[k]`` for every k, vectorised.

        ``_root`` always maps a label to the smallest label of its class: each round points
        every larger root at the smallest partner, then pointer jumping flattens the chains
        (they only go down, so they end).
        """
        root = self._root
        while True:
            rx, ry = root[x], root[y]
            diff = rx != ry
            if not diff.any():
                break
            lo, hi = torch.minimum(rx[diff], ry[diff]), torch.maximum(rx[diff], ry[diff])
            step = torch.arange(len(root))
            step.scatter_reduce_(0, hi, lo, reduce="amin")
            root = step[root]
            while True:
                jumped = root[root]
                if torch.equal(jumped, root):
                    break
                root = jumped
        self._root = root

    def union(self, a: Tensor, b: Tensor) -> None:
        """Tie the labels of ``a`` and ``b`` position by position (same shape)."""
        ca, cb = _compact(a), _compact(b)
        if ca is not None and cb is not None:
            a, b = ca, cb
        elif a.dim() >= 3:  # conv activations: labels are constant over positions, pair per channel
            fa, fb = a.flatten(2), b.flatten(2)
            if torch.equal(fa, fa[..., :1].expand(fa.shape)) and \
                    torch.equal(fb, fb[..., :1].expand(fb.shape)):
                a, b = fa[..., 0], fb[..., 0]
        a, b = a.reshape(-1), b.reshape(-1)
        both = (a >= 0) & (b >= 0)
        if both.any():
            self._merge(a[both], b[both])
        fixed = torch.cat([a[(a >= 0) & (b == FIXED)], b[(b >= 0) & (a == FIXED)]])
        if len(fixed):
            self.block(fixed, _FIXED_REASON)

    def block(self, labels: Tensor, reason: str) -> None:
        for i in torch.unique(labels[labels >= 0]).tolist():
            self.blocked.setdefault(i, reason)

    # ------------------------------------------------------------------ results
    def _finish(self) -> None:
        self.producers = {m: len(p.ids) for m, p in self.prods.items()}

    @functools.cached_property
    def members(self) -> dict[int, list[int]]:
        roots = self._root[: self._n]
        order = torch.argsort(roots, stable=True)
        keys, counts = torch.unique_consecutive(roots[order], return_counts=True)
        return {int(k): ids.tolist() for k, ids in zip(keys, torch.split(order, counts.tolist()))}

    @functools.cached_property
    def groups(self) -> list[Group]:
        """Every dependency group (computed on first use)."""
        out = []
        for ids in self.members.values():
            reason = next((self.blocked[i] for i in ids if i in self.blocked), "")
            out.append(Group([self.owner(i) for i in ids], reason))
        return out

    def group_of(self, module: str, channel: int) -> Group:
        """The group holding output ``channel`` of ``module``."""
        root = self.find(int(self.prods[module].ids[channel]))
        ids = self.members[root]
        reason = next((self.blocked[i] for i in ids if i in self.blocked), "")
        return Group([self.owner(i) for i in ids], reason)


def _hf_attention(m: nn.Module):
    """(qkv child names, heads, head size) of a HuggingFace-style self-attention module."""
    d = m.__dict__  # plain attributes only: cheap enough to ask every module
    heads = next((d[a] for a in HEADS if isinstance(d.get(a), int)), None)
    size = next((d[a] for a in HEAD_SIZE if isinstance(d.get(a), int)), None)
    if heads is None or size is None or isinstance(m, nn.MultiheadAttention):
        return None
    for names in _QKV:
        if all(isinstance(m._modules.get(n), nn.Linear) for n in names):
            return list(names), heads, size
    return None


output_tensors = B.tensors_in  # every tensor of an input or an output, nested


def call(model: nn.Module, x):
    """``model(x)`` under DESIGN.md's input contract: a tensor, a mapping (``**x``) or a tuple."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def example_input(example, batch, model: nn.Module | None = None):
    """The inputs to trace with: ``example``, else the inputs of ``batch``; on the model's device
    and in its dtype when ``model`` is given (floating tensors; token ids keep theirs)."""
    if example is None and batch is not None:
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
    if example is None:
        raise ValueError("an example input is needed to trace the model: pass example=x "
                         "(a tensor, a tuple of tensors or a mapping of tensors) or batch=(x, y)")
    return example if model is None else B.to_model(example, model)


class _Tracer(TorchDispatchMode):
    def __init__(self, dg: DependencyGraph, on_meta: _OnMeta | None = None):
        super().__init__()
        self.dg = dg
        self.on_meta = on_meta  # runs the operations on meta tensors when given
        self.labels: dict[int, tuple[Tensor, Tensor]] = {}  # id(tensor) -> (tensor, labels)
        self.depth = 0
        self.paused = False

    def get(self, t) -> Tensor | None:
        if not isinstance(t, Tensor):
            return None
        hit = self.labels.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def put(self, t: Tensor, lab: Tensor) -> None:
        self.labels[id(t)] = (t, lab)

    def full(self, t: Tensor, value: int = CONST) -> Tensor:
        return torch.full(t.shape, value, dtype=torch.long)

    def lab_or_const(self, t: Tensor) -> Tensor:
        lab = self.get(t)
        return self.full(t) if lab is None else lab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.on_meta.run(func, args, kwargs) if self.on_meta else func(*args, **kwargs)
        if self.depth:
            return out
        flat_in = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, Tensor)]
        labs = [self.get(a) for a in flat_in]
        if all(lab is None for lab in labs):
            return out
        name = func.overloadpacket.__name__
        outs = [o for o in _flat([out]) if isinstance(o, Tensor)]
        try:
            if name.endswith("_") and self.get(args[0]) is None:
                raise _Opaque("an in-place write of channels into another tensor")
            self._rule(func, name, args, kwargs, out, outs)
        except Exception as why:  # noqa: BLE001 - whatever we cannot follow blocks its channels
            for lab in labs:
                if lab is not None:
                    self.dg.block(lab, f"it flows into {name} ({why})")
            for o in outs:
                self.put(o, self.full(o, FIXED))
        return out

    def _rule(self, func, name, args, kwargs, out, outs):
        dg = self.dg
        if name in _STRUCTURAL:
            largs = _map(args, self.lab_or_const)
            lkw = _map(kwargs, self.lab_or_const)
            if name == "_to_copy":
                lkw = {k: v for k, v in lkw.items() if k not in ("dtype", "device", "layout")}
            if name in ("view", "_unsafe_view", "reshape", "_reshape_alias"):
                self._split(args[0], out)
                # views are defined on the logical (row-major) order: labels may live elsewhere
                largs = (largs[0].contiguous(), *largs[1:])
            res = func(*largs, **lkw)
            for o, r in zip(outs, [r for r in _flat([res]) if isinstance(r, Tensor)]):
                self.put(o, r.to(torch.long))
            return
        if torch.Tag.pointwise in func.tags or name in ("where", "masked_fill", "copy_",
                                                        "fill_", "zero_", "dropout"):
            o = outs[0]
            labs = []
            for a in _flat(args) + _flat(list(kwargs.values())):
                lab = self.get(a) if isinstance(a, Tensor) else None
                if lab is not None:
                    if lab.dim() > o.dim() or any(
                            ls not in (1, os) for ls, os in zip(reversed(lab.shape),
                                                                reversed(o.shape))):
                        raise _Opaque("broadcast that shrinks a channel dimension")
                    labs.append(lab.expand(o.shape))
            small = [_compact(lab) for lab in labs]
            if len(labs) > 1 and all(c is not None for c in small):
                labs = small  # constant over positions: combine one label per channel
            acc = labs[0]
            for lab in labs[1:]:
                if lab is acc or torch.equal(lab, acc):
                    continue
                dg.union(acc, lab)
                acc = torch.where(acc >= 0, acc, torch.where(lab >= 0, lab,
                                                             torch.minimum(acc, lab)))
            acc = acc.expand(o.shape)
            for o2 in outs:
                if o2.shape == o.shape:
                    self.put(o2, acc)
            return
        if name in _REDUCE:
            lab = self.lab_or_const(args[0])
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                dims = list(range(lab.dim()))
            dims = [dims] if isinstance(dims, int) else list(dims)
            keep = args[2] if len(args) > 2 and isinstance(args[2], bool) else kwargs.get(
                "keepdim", False)
            small = _compact(lab)
            if small is not None and {d % lab.dim() for d in dims} >= set(range(2, lab.dim())):
                lab = small  # every position reduced: one label per channel is enough
            lo, hi = lab.amin(dims, keepdim=keep), lab.amax(dims, keepdim=keep)
            if not torch.equal(lo, hi):
                raise _Opaque("a reduction over channels")
            self.put(outs[0], lo)
            return
        if name in _POOL:
            lab = self.lab_or_const(args[0])
            lab = _compact(lab) if _compact(lab) is not None else lab
            per = lab.flatten(2) if lab.dim() > 2 else lab.unsqueeze(-1)
            if not torch.equal(per.amin(-1), per.amax(-1)):
                raise _Opaque("pooling across channels")
            ch = per[..., 0]
            for o in outs:
                self.put(o, ch.reshape(*ch.shape, *([1] * (o.dim() - 2))).expand(o.shape))
            return
        if name in _MATMUL:
            a, b = self.lab_or_const(args[0]), self.lab_or_const(args[1])
            # a[..., i, j] @ b[..., j, k]: labels constant along the free dimension are
            # contracted (tied to the other side's), labels constant along j pass to the output
            ka, fa = _matmul_side(a, contracted=-1, free=-2)
            kb, fb = _matmul_side(b, contracted=-2, free=-1)
            if (ka is None) != (kb is None):
                raise _Opaque("channels contracted against a fixed matrix (a functional linear "
                              "layer outside a module?)")
            if ka is not None:
                dg.union(ka, kb)
                dg.matmul_ids.update(torch.unique(ka[ka >= 0]).tolist())
            if fa is not None and fb is not None:
                raise _Opaque("channels on both sides of a matrix product")
            o = outs[0]
            if fa is not None:
                lab = fa.unsqueeze(-1).expand(o.shape).clone()
            elif fb is not None:
                lab = fb.unsqueeze(-2).expand(o.shape).clone()
            else:
                fixed = bool((a == FIXED).any() or (b == FIXED).any())
                lab = self.full(o, FIXED if fixed else CONST)
            self.put(o, lab)
            return
        if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
            # softmax(q kᵀ) v over (..., T, d): q's and k's last dims are contracted (tied), the
            # output carries v's last dim; masks and scales are per position, not per channel
            q, k, v = (self.lab_or_const(a) for a in args[:3])
            kq, _ = _matmul_side(q, contracted=-1, free=-2)
            kk, _ = _matmul_side(k, contracted=-1, free=-2)
            if (kq is None) != (kk is None):
                raise _Opaque("query/key channels contracted against fixed ones")
            if kq is not None:
                dg.union(kq, kk)
                dg.matmul_ids.update(torch.unique(kq[kq >= 0]).tolist())
            kv, _ = _matmul_side(v, contracted=-1, free=-2)
            o = outs[0]
            lab = (kv.unsqueeze(-2).expand(o.shape) if kv is not None
                   else self.full(o, FIXED if bool((v == FIXED).any()) else CONST))
            self.put(o, lab)
            return
        raise _Opaque("an operation prunelab does not know to be channel-wise")

    def _split(self, src: Tensor, out: Tensor) -> None:
        """Record a view that splits a labelled last dimension into (blocks, size): heads."""
        lab = self.get(src)
        if lab is None or out.dim() != src.dim() + 1 or src.dim() == 0:
            return
        if tuple(out.shape[:-2]) == tuple(src.shape[:-1]) and out.shape[-2] > 1:
            last = lab.reshape(-1, src.shape[-1])[0]
            if (last >= 0).any():
                self.dg.splits.append((last.clone(), int(out.shape[-2]), int(out.shape[-1])))


class _Opaque(Exception):
    pass


class _NotOnMeta(Exception):
    pass


class _OnMeta(TorchDispatchMode):
    """Every operation on the meta device: output shapes and dtypes, no arithmetic.

    The labels depend only on the shapes and the sequence of operations, so the trace needs no
    values; a forward that reads values (``.item()``, ``if x.any()``, ``torch.nonzero``) raises on
    meta tensors, and :func:`dependencies` then traces the real example. Parameters, buffers and
    constants get a meta twin when an operation reads them; factories (``torch.zeros(n)``) make
    meta tensors. An in-place write into a real tensor raises (its twin would diverge from it).
    """

    def __init__(self):
        super().__init__()
        self.twins: dict[int, tuple[Tensor, Tensor]] = {}  # id(real tensor) -> (it, meta twin)

    def meta(self, t):
        if not isinstance(t, Tensor) or t.is_meta:
            return t
        hit = self.twins.get(id(t))
        if hit is None or hit[0] is not t:
            hit = self.twins[id(t)] = (t, _twin(t))
        return hit[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.run(func, args, kwargs or {})

    def run(self, func, args, kwargs):
        """``func`` on the meta twins of its arguments."""
        known = _FAST_META.get(func)
        if known is None:
            known = _FAST_META[func] = _meta_rule(func)
        rule, writes = known
        for i, name in writes:
            v = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(v, Tensor) and not v.is_meta:
                raise _NotOnMeta(f"{func} writes into a tensor that is not an activation")
        meta = self.meta
        args = tuple(meta(a) if isinstance(a, Tensor) else
                     _map(a, meta) if isinstance(a, (list, tuple)) else a for a in args)
        if kwargs:
            kwargs = _map(kwargs, meta)
            if "device" in kwargs:  # a factory (or a copy to a device): stay on meta
                kwargs["device"] = torch.device("meta")
        out = rule(func, args, kwargs) if rule is not None else None
        return func(*args, **kwargs) if out is None else out


def _twin(t: Tensor) -> Tensor:
    """A meta tensor with ``t``'s shape, strides and dtype (``t.to("meta")`` makes a sliced
    tensor contiguous, and the real kernels see the strides)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _meta_rule(func) -> tuple:
    """(shape rule or None, [(position, name) of each argument ``func`` writes into])."""
    schema = func._schema
    writes = [(i, a.name) for i, a in enumerate(schema.arguments)
              if a.alias_info is not None and a.alias_info.is_write]
    tags = func.tags
    pointwise = torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags
    return (_pointwise_meta if pointwise and not writes else None), writes


# Shape rules for the commonest operations: torch's own meta kernels for them are Python
# decompositions (0.1-0.7 ms each, more than the real kernel on one example). Each returns what
# the meta kernel returns (shape, dtype, contiguous strides), or None to defer to it when its
# inputs are not the plain case (non-contiguous, mixed dtypes); tests/test_depgraph.py compares
# them with the meta kernels.
def _pointwise_meta(func, args, kwargs):
    ts = [a for a in _flat(list(args)) + _flat(list(kwargs.values())) if isinstance(a, Tensor)]
    if not ts:
        return None
    strides = None
    if len(ts) == 1 and not ts[0].is_contiguous():
        # one permuted operand (attention's transposes): the output keeps its strides
        if 1 in ts[0].shape or not _permuted_dense(ts[0]):
            return None
        strides = ts[0].stride()
    elif not all(t.is_contiguous() for t in ts):
        return None
    shape = _broadcast([t.shape for t in ts])
    if shape is None:
        return None
    try:  # the result dtype (type promotion, comparisons) from the real kernel on 1-element twins
        probe = func(*_map(args, _unit), **_map(kwargs, _unit))
    except Exception:  # noqa: BLE001 - the meta kernel decides
        return None
    if not isinstance(probe, Tensor):
        return None
    if strides is not None:
        return torch.empty_strided(shape, strides, dtype=probe.dtype, device="meta")
    return torch.empty(shape, dtype=probe.dtype, device="meta")


def _permuted_dense(t: Tensor) -> bool:
    """A permutation of a contiguous tensor (no gaps, no overlaps)."""
    expect = 1
    for st, n in sorted(zip(t.stride(), t.shape)):
        if st != expect:
            return False
        expect *= n
    return True


def _layer_norm_meta(func, args, kwargs):
    x, shape = args[0], args[1]
    if kwargs or not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64) or \
            any(isinstance(t, Tensor) and t.dtype != x.dtype for t in args[2:4]) or \
            tuple(x.shape[x.dim() - len(shape):]) != tuple(shape):
        return None
    stat = (*x.shape[:x.dim() - len(shape)], *(1,) * len(shape))
    return tuple(torch.empty(s, dtype=x.dtype, device="meta") for s in (x.shape, stat, stat))


def _softmax_meta(func, args, kwargs):
    x, last = args[0], args[2] if len(args) > 2 else kwargs.get("dtype")
    if not x.is_contiguous() or x.dtype not in (torch.float32, torch.float64) or \
            (last is not None and last is not False and last != x.dtype):
        return None  # half_to_float or a dtype change: the meta kernel decides
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _broadcast(shapes) -> tuple | None:
    """The broadcast of ``shapes`` (torch.broadcast_shapes on meta goes through Python refs);
    None when they do not broadcast (the meta kernel then raises torch's own error)."""
    first = tuple(shapes[0])
    if all(tuple(s) == first for s in shapes):
        return first
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for s in shapes:
        for i, d in enumerate(s, nd - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    return None
                out[i] = d
    return tuple(out)


def _reduce_meta(func, args, kwargs):
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not x.is_contiguous() or dims is None or x.dim() == 0:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return None
    gone = {d % x.dim() for d in dims}
    shape = [1 if i in gone else n for i, n in enumerate(x.shape) if keep or i not in gone]
    try:  # the result dtype (mean of ints raises, dtype=) from the real kernel on a 1-element twin
        probe = func(_unit(x), *args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - the meta kernel decides
        return None
    return torch.empty(shape, dtype=probe.dtype, device="meta")


def _conv_meta(func, args, kwargs):
    if len(args) != 9 or kwargs:
        return None
    x, w, b, stride, padding, dilation, transposed, _, groups = args
    if transposed or not (x.is_contiguous() and w.is_contiguous()) or x.dim() != w.dim() or \
            x.shape[1] != w.shape[1] * groups or len({t.dtype for t in (x, w, b)
                                                      if t is not None}) != 1:
        return None
    k = w.dim() - 2
    if not len(stride) == len(padding) == len(dilation) == k:
        return None
    size = [(n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in
            zip(x.shape[2:], w.shape[2:], stride, padding, dilation)]
    if min(size) <= 0:
        return None
    return torch.empty((x.shape[0], w.shape[0], *size), dtype=x.dtype, device="meta")


def _unit(t: Tensor) -> Tensor:
    return torch.ones((1,) * t.dim(), dtype=t.dtype)


def _batch_norm_meta(func, args, kwargs):
    x = args[0]
    training = args[5] if func is torch.ops.aten.native_batch_norm.default else False
    if training or not x.is_contiguous() or len({t.dtype for t in args[:5]
                                                if isinstance(t, Tensor)}) != 1:
        return None
    def new(shape):  # torch.empty on meta is C++; empty_like/clone go through Python refs
        return torch.empty(shape, dtype=x.dtype, device="meta")
    return new(x.shape), new((x.shape[1],)), new((x.shape[1],))


def _matmul_meta(func, args, kwargs):
    if func is torch.ops.aten.addmm.default:
        bias, a, b = args[:3]
        out = (a.shape[0], b.shape[1])
        if bias.dim() > 2 or _broadcast([bias.shape, out]) != out:
            return None
        ts = (bias, a, b)
    else:
        a, b = args[:2]
        ts = (a, b)
    if kwargs or len({t.dtype for t in ts}) != 1 or a.shape[-1] != b.shape[-2] or \
            a.shape[:-2] != b.shape[:-2]:
        return None
    return torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device="meta")


#: ATen op -> (shape rule or None, arguments it writes into); filled as operations are met
_FAST_META = {
    torch.ops.aten.native_batch_norm.default: (_batch_norm_meta, []),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (_batch_norm_meta, []),
    torch.ops.aten.addmm.default: (_matmul_meta, []),
    torch.ops.aten.mm.default: (_matmul_meta, []),
    torch.ops.aten.bmm.default: (_matmul_meta, []),
    torch.ops.aten.convolution.default: (_conv_meta, []),
    torch.ops.aten.native_layer_norm.default: (_layer_norm_meta, []),
    torch.ops.aten._softmax.default: (_softmax_meta, []),
    torch.ops.aten._safe_softmax.default: (_softmax_meta, []),
    torch.ops.aten._log_softmax.default: (_softmax_meta, []),
    torch.ops.aten.mean.dim: (_reduce_meta, []),
    torch.ops.aten.sum.dim_IntList: (_reduce_meta, []),
    torch.ops.aten.amax.default: (_reduce_meta, []),
    torch.ops.aten.amin.default: (_reduce_meta, []),
}


def _matmul_side(lab: Tensor, contracted: int, free: int):
    """(contracted labels, free labels) of one operand of a matrix product; None where absent."""
    if not (lab >= 0).any():
        return None, None
    if torch.equal(lab.amin(free), lab.amax(free)):
        return lab.select(free, 0), None
    if torch.equal(lab.amin(contracted), lab.amax(contracted)):
        return None, lab.select(contracted, 0)
    raise _Opaque("channels mixed by a matrix product")


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _flat(v)]
    return [x]


def _map(x, fn):
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def _compact(lab: Tensor) -> Tensor | None:
    """``lab`` as ``(N, C, 1, ...)`` when it is a stride-0 expansion over the positions."""
    nd = lab.dim()
    if nd < 3:
        return None
    stride, shape = lab.stride(), lab.shape
    for i in range(2, nd):
        if stride[i] and shape[i] != 1:
            return None
    # the first position as one view (a tuple of slices costs one dispatch per dimension)
    return lab.as_strided((*shape[:2], *(1,) * (nd - 2)), stride, lab.storage_offset())


def _channel_labels(lab: Tensor, dim: int, module: str, dg: DependencyGraph) -> Tensor:
    """One label per index of ``dim`` (constant over the other dimensions)."""
    small = _compact(lab) if dim == 1 else None
    if small is not None:  # constant over positions by construction: check the batch only
        lab = small.flatten(1)
    moved = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
    lo = moved[:, 0]
    if not torch.equal(moved, lo[:, None].expand(moved.shape)):
        dg.block(moved, f"layer {module!r} reads channels that vary along another dimension")
        return torch.full_like(lo, FIXED)
    return lo


def _record(dg: DependencyGraph, store: dict, module: str, lab: Tensor) -> None:
    old = store.get(module)
    if old is None:
        store[module] = lab
    else:  # a module called twice: its columns carry both inputs' channels
        dg.union(old, lab)
        store[module] = torch.where(old >= 0, old, lab)


def _trace(dg: DependencyGraph, model: nn.Module, example, meta: bool = False) -> None:
    on_meta = _OnMeta() if meta else None
    tracer = _Tracer(dg, on_meta)
    if meta:
        example = B.map_tensors(example, _twin)
    names = {}
    for name, m in model.named_modules():
        names[id(m)] = name
        att = _hf_attention(m)
        if att is not None:
            dg.hf_heads[name] = att

    known = {id(m) for m in model.modules()
             if isinstance(m, (nn.Linear, *_CONV, nn.Embedding, *_BN, nn.LayerNorm,
                               nn.MultiheadAttention))}

    def pre(mod, args):
        if id(mod) not in known:
            return
        tracer.depth += 1
        if tracer.depth == 1:
            # a known module is followed by its hooks: run its insides without the mode's cost
            _pop_mode()
            if on_meta is not None:  # the module's insides still run on meta tensors
                _push_mode(on_meta)
            tracer.paused = True

    def post(mod, args, kwargs, output):
        if id(mod) not in known:
            return
        if tracer.depth > 1:
            tracer.depth -= 1
            return
        if on_meta is not None:
            _pop_mode()
        try:
            _labels_after(mod, [*args, *kwargs.values()], output)
        finally:
            tracer.depth = 0
            _push_mode(tracer)
            tracer.paused = False

    def _labels_after(mod, xs, output):
        name = names[id(mod)]
        ins = [tracer.get(a) for a in xs]
        x, lab = xs[0] if xs else None, ins[0] if ins else None
        if lab is None and isinstance(x, Tensor):
            lab = tracer.full(x)
        if isinstance(mod, nn.Linear):
            _record(dg, dg.consumers, name, _channel_labels(lab, -1, name, dg))
            dg.consumer_kind[name] = "linear"
            ids = _producer(dg, name, "linear", mod.out_features)
            tracer.put(output, ids.expand(output.shape))
        elif isinstance(mod, _CONV):
            ch = _channel_labels(lab, 1, name, dg) if x.dim() == mod.weight.dim() else \
                _channel_labels(lab, 0, name, dg)
            dim = 1 if x.dim() == mod.weight.dim() else 0
            ids = _producer(dg, name, "conv", mod.out_channels)
            g = mod.groups
            if g == 1:
                _record(dg, dg.consumers, name, ch)
                dg.consumer_kind[name] = "conv"
            elif g == mod.in_channels == mod.out_channels:  # depthwise: channel c -> channel c
                if (ch < 0).any():
                    dg.block(ids[ch < 0], f"depthwise conv {name!r}: its input channels cannot "
                             "be removed with it")
                dg.union(ids, ch)
            else:
                dg.grouped[name] = _Grouped(name, g, ch, ids)
            shape = [1] * output.dim()
            shape[dim] = -1
            tracer.put(output, ids.reshape(shape).expand(output.shape))
        elif isinstance(mod, nn.Embedding):
            ids = _producer(dg, name, "embedding", mod.embedding_dim)
            tracer.put(output, ids.expand(output.shape))
        elif isinstance(mod, _BN):
            ch = _channel_labels(lab, 1, name, dg)
            _record(dg, dg.norms, name, ch)
            tracer.put(output, lab)
        elif isinstance(mod, nn.LayerNorm):
            flat = lab.flatten(-len(mod.normalized_shape))
            if torch.equal(flat, flat[..., :1].expand(flat.shape)):
                tracer.put(output, lab)  # channels outside the normalised dims pass through
            else:
                dg.block(lab, f"LayerNorm {name!r} normalises over these channels: removing "
                         "some would change its mean and variance")
                tracer.put(output, tracer.full(output, FIXED))
        elif isinstance(mod, nn.MultiheadAttention):
            for a in ins:
                if a is not None:
                    dg.block(a, f"nn.MultiheadAttention {name!r} needs embed_dim="
                             f"{mod.embed_dim} input channels (its heads can be removed)")
            _producer(dg, name, "heads", mod.num_heads)
            outs = output if isinstance(output, tuple) else (output,)
            for o in outs:
                if isinstance(o, Tensor):
                    tracer.put(o, tracer.full(o, FIXED))
        return output

    from torch.nn.modules.module import (register_module_forward_hook,
                                         register_module_forward_pre_hook)

    # two global hooks (removed below) instead of two per module: registration costs ~50 µs each
    handles = [register_module_forward_pre_hook(pre),
               register_module_forward_hook(post, with_kwargs=True)]
    try:
        for t in output_tensors(example):  # labels are made outside the mode
            tracer.put(t, tracer.full(t, FIXED))
        with tracer:
            try:
                output = call(model, example)
            finally:
                if tracer.paused:  # the forward raised inside a known module
                    if on_meta is not None:
                        _pop_mode()
                    _push_mode(tracer)
                    tracer.paused = False
    except Exception as err:
        raise ValueError(f"cannot trace {type(model).__name__} with one forward pass of the "
                         f"example: {type(err).__name__}: {err}") from err
    finally:
        for h in handles:
            h.remove()
    for t in output_tensors(output):
        lab = tracer.get(t)
        if lab is not None:
            dg.block(lab, "it reaches the model output")


def _producer(dg: DependencyGraph, name: str, kind: str, n: int) -> Tensor:
    if name not in dg.prods:
        dg.prods[name] = _Producer(name, kind, dg.new_ids(name, n))
    return dg.prods[name].ids


def dependencies(model: nn.Module, example=None, *, batch=None,
                 meta: bool | None = None) -> DependencyGraph:
    """The dependency groups of ``model`` from one traced forward pass of ``example``.

    The pass runs without gradients, in eval mode (BatchNorm statistics untouched; the modes are
    restored after) and without ``nn.TransformerEncoderLayer``'s fused inference path, on the
    first example of the batch (the whole input when that fails: an unbatched input), on meta
    tensors when the forward allows it (see the module docstring; ``.meta`` of the result says
    which path ran). The first call in a process also pays torch's one-time import of
    ``torch._dynamo`` (seconds), which any ``TorchDispatchMode`` triggers.

    Args:
        model: Any module; never modified.
        example: A model input (tensor, tuple, or mapping for ``model(**x)``).
        batch: ``(x, y)``, used for ``example`` when that is not given.
        meta: ``None`` (default): meta tensors, else the real example; ``True`` / ``False``:
            only that path (ValueError when it fails).

    Raises:
        ValueError: The model cannot be run on the example.
    """
    model = plain_copy(model) if is_masked(model) else model
    example = example_input(example, batch, model)
    training = [m for m in model.modules() if m.training]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # eval: BatchNorm statistics stay as they are; no fused nn.Transformer* inference path
        for m in training:
            m.training = False
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            first = _first(example)
            tries = [(first, m) for m in (True, False) if meta in (None, m)]
            if first is not example:  # not a batch after all (an unbatched input): trace it whole
                tries += [(example, m) for m in (True, False) if meta in (None, m)]
            for k, (x, on_meta) in enumerate(tries):
                try:
                    return DependencyGraph(model, x, meta=on_meta)
                except ValueError:
                    if k == len(tries) - 1:
                        raise
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in training:
            m.training = True


def _first(example):
    """The first example of a batch: labels do not depend on the batch size."""
    if isinstance(example, Tensor):
        return example[:1] if example.dim() > 1 else example
    if isinstance(example, Mapping):
        return {k: _first(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_first(v) for v in example)
    return example


# ============================================================================== the plan


@dataclass
class Plan:
    """What one removal does: per module, the output and input indices that go."""

    out: dict[str, list[int]] = field(default_factory=dict)     # producer rows / heads
    cols: dict[str, list[int]] = field(default_factory=dict)    # consumer input columns
    norms: dict[str, list[int]] = field(default_factory=dict)   # BatchNorm entries
    grouped: dict[str, int] = field(default_factory=dict)       # grouped conv -> groups removed
    hf: dict[str, list[int]] = field(default_factory=dict)      # HF attention -> heads removed
    matmul: set = field(default_factory=set)                    # removed labels read by matmul
    selection: dict[str, list[int]] = field(default_factory=dict)


def _indices(value, n: int, name: str, what: str) -> list[int]:
    if isinstance(value, Tensor):
        value = value.tolist()
    try:
        idx = sorted({int(i) for i in value})
    except (TypeError, ValueError):
        raise ValueError(f"selection[{name!r}] must be indices of {what}, got {value!r}") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"selection[{name!r}]: indices {bad} out of range for {n} {what}")
    return idx


def plan(dg: DependencyGraph, selection, *, expand: bool = False,
         model: nn.Module | None = None) -> Plan:
    """Resolve a selection into the rows, columns and entries to remove (see :func:`remove`)."""
    if hasattr(selection, "pruned") and not isinstance(selection, Mapping):
        selection = selection.pruned
    if not isinstance(selection, Mapping):
        raise ValueError("selection must be a mapping {module name: indices to remove} or a "
                         f"UnitPruneResult, got {type(selection).__name__}")
    chosen: set[int] = set()
    wanted: dict[str, list[int]] = {}
    for name, value in selection.items():
        if name in dg.hf_heads:
            qkv, heads, size = dg.hf_heads[name]
            idx = _indices(value, heads, name, "attention heads")
            rows = [h * size + j for h in idx for j in range(size)]
            for child in qkv:
                full = f"{name}.{child}"
                chosen.update(int(dg.prods[full].ids[r]) for r in rows)
                wanted[full] = rows
            continue
        if name not in dg.prods:
            raise ValueError(f"selection names {name!r}, which is not a removable layer of the "
                             f"traced model; removable: {sorted(dg.prods)[:20]}"
                             + (" ..." if len(dg.prods) > 20 else ""))
        p = dg.prods[name]
        what = "heads" if p.kind == "heads" else "output channels/units"
        idx = _indices(value, len(p.ids), name, what)
        if len(idx) == len(p.ids):
            raise ValueError(f"selection[{name!r}] removes all {len(p.ids)} {what}: a layer "
                             "cannot be emptied")
        chosen.update(int(p.ids[i]) for i in idx)
        wanted[name] = idx
    # close under the groups
    roots = {dg.find(i) for i in chosen}
    closed = {i for r in roots for i in dg.members[r]}
    for r in roots:
        reason = next((dg.blocked[i] for i in dg.members[r] if i in dg.blocked), "")
        if reason:
            mod, ch = next(dg.owner(i) for i in dg.members[r] if i in chosen)
            raise ValueError(f"channel {ch} of layer {mod!r} cannot be removed: {reason}")
    extra = closed - chosen
    if extra and not expand:
        mod, ch = dg.owner(min(extra))
        src = next(dg.owner(i) for i in chosen if dg.find(i) == dg.find(min(extra)))
        raise ValueError(f"removing channel {src[1]} of layer {src[0]!r} breaks a dependency "
                         f"group (a residual add, concatenation or depthwise conv): channel {ch} "
                         f"of layer {mod!r} must go with it; select the whole group or pass "
                         "expand=True")
    pl = Plan()
    for name, p in dg.prods.items():
        rm = [k for k, i in enumerate(p.ids.tolist()) if i in closed]
        if len(rm) == len(p.ids):
            raise ValueError(f"the selection (closed under its groups) removes every output of "
                             f"layer {name!r}: a layer cannot be emptied")
        if rm:
            pl.out[name] = rm
    for store, target in ((dg.consumers, pl.cols), (dg.norms, pl.norms)):
        for name, lab in store.items():
            rm = [k for k, i in enumerate(lab.tolist()) if i in closed]
            if rm:
                target[name] = rm
    for name, g in dg.grouped.items():
        rin = torch.tensor([i in closed for i in g.inputs.tolist()])
        rout = torch.tensor([i in closed for i in g.outputs.tolist()])
        gi, go = rin.reshape(g.groups, -1), rout.reshape(g.groups, -1)
        whole_in, whole_out = gi.all(1), go.all(1)
        if not (torch.equal(gi.any(1), whole_in) and torch.equal(go.any(1), whole_out)
                and torch.equal(whole_in, whole_out)):
            raise ValueError(f"grouped conv {name!r} (groups={g.groups}): only whole groups can "
                             "be removed (all input and all output channels of the same groups)")
        if whole_in.any():
            pl.grouped[name] = int(whole_in.sum())
    for parent, (qkv, heads, size) in dg.hf_heads.items():
        q = pl.out.get(f"{parent}.{qkv[0]}", [])
        sets = [set(pl.out.get(f"{parent}.{c}", [])) for c in qkv]
        gone = sorted({r // size for r in q})
        rows = {h * size + j for h in gone for j in range(size)}
        if any(s and s != rows for s in sets) or (rows and any(s != rows for s in sets)):
            raise ValueError(f"attention {parent!r}: remove whole heads (blocks of {size} rows "
                             f"of {', '.join(qkv)} together), not single units")
        if gone:
            pl.hf[parent] = gone
    for lab, blocks, size in dg.splits:
        rm = torch.tensor([i in closed for i in lab.tolist()]).reshape(blocks, size)
        if not torch.equal(rm.any(1), rm.all(1)):
            raise ValueError(f"a reshape splits the channels of layer "
                             f"{dg.owner(int(lab[lab >= 0][0]))[0]!r} into {blocks} blocks of "
                             f"{size} (attention heads): remove whole blocks")
    pl.matmul = closed & dg.matmul_ids
    pl.selection = {n: sorted(v) for n, v in wanted.items()}
    return pl
