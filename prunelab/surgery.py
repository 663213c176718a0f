"""Physical removal of channels, units and attention heads over any graph (structural pruning).

From a selection ``{module name: indices of output channels / units / heads to drop}`` (the
``pruned`` field of :func:`prunelab.units.prune` / :func:`prunelab.structured.prune`, or a user's
dict of lists) :func:`remove` returns a physically smaller *copy* of the model whose outputs equal
those of the *masked* model (:func:`masked`): the same model with every removed channel's
outgoing effect zeroed (its producer's rows and bias entries and every consumer's input columns set
to 0, as :mod:`prunelab.units` does), optionally with mean replacement (MRP Eq. 4).

The dependency groups and the plan come from :mod:`prunelab.depgraph` (one traced forward pass,
union-find over channel labels); this module applies the plan. Its names (:func:`dependencies`,
:func:`call`, :class:`DependencyGraph`, :class:`Plan`, :func:`plan`) are re-exported here.

Mean replacement (MRP Eq. 4): with ``mean_replacement=True`` and a ``batch``, each consumer layer's
bias gets ``W[:, removed] @ mean(input[removed])`` (conv consumers: the channel mean over examples
and positions times the kernel sum, as :mod:`prunelab.units`); channels consumed by a matrix
product (attention scores) are only zeroed. The equality target is then the masked model with the
same fold (:func:`masked` with the same arguments).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunelab.depgraph import (HEAD_SIZE, HEADS, DependencyGraph, Group, Plan, call,
                               dependencies, example_input, output_tensors, plan)
from prunelab.graph import is_masked, plain_copy

__all__ = ["DependencyGraph", "Group", "Plan", "PrunedMultiheadAttention", "SurgeryResult", "call",
           "dependencies", "masked", "plan", "remove"]



def __dir__():
    return sorted(__all__)


# ============================================================================== applying it


def _keep(n: int, rm: list[int], device) -> Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[rm] = False
    return keep


def _fresh(t: Tensor, like: Tensor) -> nn.Parameter:
    """``t`` (a slice of ``like``) as a parameter with its own storage, in ``like``'s memory
    format: indexing the input dimension returns NCHW, and a channels-last model must stay
    channels-last (its convolutions skip the layout reorders; measured in bench_surgery)."""
    fmt = torch.contiguous_format
    if like.dim() in (4, 5) and not like.is_contiguous():
        cl = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        fmt = cl if like.is_contiguous(memory_format=cl) else fmt
    out = t.contiguous(memory_format=fmt)
    return nn.Parameter(out.clone() if out.data_ptr() == like.data_ptr() else out)


def _means(model: nn.Module, pl: Plan, batch) -> dict[str, Tensor]:
    """Mean of each consumer's input column / channel on ``batch`` (MRP Eq. 4)."""
    x = example_input(None, batch, model)
    sums: dict[str, Tensor] = {}
    hooks = []
    for name in pl.cols:
        mod = model.get_submodule(name)

        def hook(m, args, name=name):
            a = args[0].detach()
            if isinstance(m, nn.Linear):
                sums[name] = a.reshape(-1, a.shape[-1]).mean(0)
            else:
                sums[name] = a.transpose(0, 1).reshape(a.shape[1], -1).mean(1)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return sums


@torch.no_grad()
def _fold(model: nn.Module, pl: Plan, means: dict[str, Tensor]) -> None:
    for name, rm in pl.cols.items():
        mod = model.get_submodule(name)
        w = mod.weight
        mu = means[name].to(w)
        idx = torch.tensor(rm, device=w.device)
        contrib = (w.index_select(1, idx) * mu[idx].reshape(1, -1, *([1] * (w.dim() - 2))))
        contrib = contrib.flatten(1).sum(1)
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        mod.bias.add_(contrib)


@torch.no_grad()
def _zero(model: nn.Module, pl: Plan) -> None:
    for name, rm in pl.out.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.MultiheadAttention):
            e, d = mod.embed_dim, mod.head_dim
            rows = torch.tensor([s * e + h * d + j for s in range(3) for h in rm
                                 for j in range(d)])
            mod.in_proj_weight[rows] = 0
            if mod.in_proj_bias is not None:
                mod.in_proj_bias[rows] = 0
            mod.out_proj.weight[:, rows[: len(rows) // 3]] = 0
        elif isinstance(mod, nn.Embedding):
            mod.weight[:, rm] = 0
        else:
            mod.weight[rm] = 0
            if mod.bias is not None:
                mod.bias[rm] = 0
    for name, rm in pl.cols.items():
        mod = model.get_submodule(name)
        mod.weight[:, rm] = 0


@torch.no_grad()
def _shrink(model: nn.Module, pl: Plan) -> None:
    for name, rm in pl.out.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.MultiheadAttention):
            _set(model, name, PrunedMultiheadAttention.from_mha(mod, rm))
            continue
        dev = mod.weight.device
        if isinstance(mod, nn.Embedding):
            keep = _keep(mod.embedding_dim, rm, dev)
            mod.weight = _fresh(mod.weight[:, keep], mod.weight)
            mod.embedding_dim = int(keep.sum())
            continue
        keep = _keep(mod.weight.shape[0], rm, dev)
        mod.weight = _fresh(mod.weight[keep], mod.weight)
        if mod.bias is not None:
            mod.bias = _fresh(mod.bias[keep], mod.bias)
        if isinstance(mod, nn.Linear):
            mod.out_features = int(keep.sum())
        else:
            mod.out_channels = int(keep.sum())
            if mod.groups > 1 and name not in pl.grouped:  # depthwise
                mod.groups = mod.in_channels = mod.out_channels
    for name, n in pl.grouped.items():
        mod = model.get_submodule(name)
        mod.in_channels -= n * (mod.in_channels // mod.groups)
        mod.groups -= n
    for name, rm in pl.cols.items():
        mod = model.get_submodule(name)
        keep = _keep(mod.weight.shape[1], rm, mod.weight.device)
        mod.weight = _fresh(mod.weight[:, keep], mod.weight)
        if isinstance(mod, nn.Linear):
            mod.in_features = int(keep.sum())
        else:
            mod.in_channels = int(keep.sum())
    for name, rm in pl.norms.items():
        bn = model.get_submodule(name)
        keep = _keep(bn.num_features, rm, bn.running_mean.device if bn.running_mean is not None
                     else bn.weight.device)
        for attr in ("weight", "bias"):
            p = getattr(bn, attr)
            if p is not None:
                setattr(bn, attr, nn.Parameter(p[keep].clone()))
        for attr in ("running_mean", "running_var"):
            b = getattr(bn, attr)
            if b is not None:
                setattr(bn, attr, b[keep].clone())
        bn.num_features = int(keep.sum())
    for name, gone in pl.hf.items():
        mod = model.get_submodule(name)
        for a in HEADS:
            if isinstance(getattr(mod, a, None), int):
                setattr(mod, a, getattr(mod, a) - len(gone))
        size = next(getattr(mod, a) for a in HEAD_SIZE if isinstance(getattr(mod, a, None), int))
        heads = next(getattr(mod, a) for a in HEADS if isinstance(getattr(mod, a, None), int))
        if isinstance(getattr(mod, "all_head_size", None), int):
            mod.all_head_size = heads * size


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed (inner width ``heads × head_dim`` no longer
    equal to ``embed_dim``, which ``nn.MultiheadAttention`` cannot hold). Same call signature and
    outputs (attention weights averaged over the remaining heads when asked for, as the masked
    model cannot reproduce: a masked head still contributes its uniform weights there)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool,
                 dropout: float, batch_first: bool, dtype=None, device=None):
        super().__init__()
        inner = num_heads * head_dim
        kw = {"dtype": dtype, "device": device}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, bias=True, **kw)
        # read by nn.TransformerEncoderLayer's fast-path checks: say "no fast path"
        self.in_proj_bias = None
        self.in_proj_weight = None
        self._qkv_same_embed_dim = False

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention, gone: list[int]) -> PrunedMultiheadAttention:
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("heads of nn.MultiheadAttention can be removed only with kdim = vdim "
                             "= embed_dim, no add_bias_kv and no add_zero_attn")
        e, d, h = mha.embed_dim, mha.head_dim, mha.num_heads
        keep = [k for k in range(h) if k not in set(gone)]
        rows = torch.tensor([k * d + j for k in keep for j in range(d)],
                            device=mha.in_proj_weight.device)
        w = mha.in_proj_weight
        new = cls(e, len(keep), d, bias=mha.in_proj_bias is not None, dropout=mha.dropout,
                  batch_first=mha.batch_first, dtype=w.dtype, device=w.device)
        for s, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
            lin.weight.copy_(w[s * e + rows])
            if mha.in_proj_bias is not None:
                lin.bias.copy_(mha.in_proj_bias[s * e + rows])
        new.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        else:
            new.out_proj.bias.zero_()
        new.train(mha.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tq, n, _ = query.shape
        tk = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(tq, n * h, d).transpose(0, 1)
        k = self.k_proj(key).reshape(tk, n * h, d).transpose(0, 1)
        v = self.v_proj(value).reshape(tk, n * h, d).transpose(0, 1)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            if m.dim() == 3 and m.shape[0] not in (1, n * h):  # (N*H_orig, T, S): unsupported
                raise ValueError("a per-head attn_mask cannot be used after removing heads")
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool \
                else scores + m
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(n, 1, 1, tk)
            scores = scores.reshape(n, h, tq, tk)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool \
                else scores + kpm
            scores = scores.reshape(n * h, tq, tk)
        attn = torch.softmax(scores, -1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        ctx = torch.bmm(attn, v).transpose(0, 1).reshape(tq, n, h * d)
        out = self.out_proj(ctx)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.reshape(n, h, tq, tk)
            weights = weights.mean(1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


# ============================================================================== public API


@dataclass
class SurgeryResult:
    """What :func:`remove` did.

    Attributes:
        model: The smaller copy.
        removed: Module name -> removed output indices (channels / units / heads), after the
            groups were closed (``expand=True`` may add members).
        plan: The :class:`Plan` (rows, columns and entries removed per module).
        params_before, params_after: Parameter counts.
        max_diff: Largest absolute difference of the outputs of the smaller and the masked model
            on the example (``nan`` when ``verify=False``).
    """

    model: nn.Module
    removed: dict[str, list[int]]
    plan: Plan
    params_before: int
    params_after: int
    max_diff: float = float("nan")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prepare(model, selection, example, batch, expand, mean_replacement):
    if mean_replacement and batch is None:
        raise ValueError("mean_replacement=True needs batch=(x, y) (or x) for the means")
    base = plain_copy(model) if is_masked(model) else model
    example = example_input(example, batch, base)
    dg = dependencies(base, example)
    pl = plan(dg, selection, expand=expand)
    if mean_replacement and any(n in pl.out and dg.prods[n].kind == "heads" for n in pl.out):
        raise ValueError("mean_replacement=True is not supported for nn.MultiheadAttention heads "
                         "(its output projection is not called as a module)")
    means = _means(base, pl, batch) if mean_replacement else None
    return base, example, pl, means


def masked(model: nn.Module, selection, example=None, *, batch=None, expand: bool = False,
           mean_replacement: bool = False) -> nn.Module:
    """The masked model :func:`remove` is equal to: a copy with the removed channels' producer rows,
    biases and consumer columns zeroed (plus the MRP Eq. 4 bias fold with ``mean_replacement``)."""
    base, example, pl, means = _prepare(model, selection, example, batch, expand,
                                        mean_replacement)
    return _masked(base, pl, means)


def _masked(base, pl, means):
    out = copy.deepcopy(base)
    if means is not None:
        _fold(out, pl, means)
    _zero(out, pl)
    return out


def remove(model: nn.Module, selection, example=None, *, batch=None, expand: bool = False,
           mean_replacement: bool = False, verify: bool = True,
           atol: float = 1e-5) -> SurgeryResult:
    """A physically smaller copy of ``model`` without the selected channels, units or heads.

    Args:
        model: Any module; never modified (a masked model is read through its effective
            weights).
        selection: ``{module name: indices to remove}`` — output channels of a Conv, units of a
            Linear, columns of an Embedding, heads of an ``nn.MultiheadAttention`` or of a
            HuggingFace-style attention module — or a ``UnitPruneResult`` (its ``pruned``).
        example: A model input to trace (tensor, tuple or mapping); default ``batch[0]``.
        batch: ``(x, y)``; needed for ``mean_replacement``.
        expand: Remove whole dependency groups when the selection names only part of one;
            default ``False`` raises ``ValueError`` naming the layer and the group.
        mean_replacement: Fold the removed channels' batch means into the consumers' biases (MRP
            Eq. 4; see the module docstring).
        verify: Run the smaller and the masked model on the example and raise if their outputs
            differ by more than ``atol`` (relative to the output scale), which happens only when
            the model's own code computes shapes prunelab cannot update.

    Returns:
        :class:`SurgeryResult`.

    Raises:
        ValueError: Unknown layer, indices out of range, a layer emptied, a broken group (without
            ``expand``), a blocked group (LayerNorm, model output, opaque op), a grouped conv
            without whole groups, attention heads split, an untraceable model.
    """
    base, example, pl, means = _prepare(model, selection, example, batch, expand,
                                        mean_replacement)
    small = copy.deepcopy(base)
    if means is not None:
        _fold(small, pl, means)
    _shrink(small, pl)
    diff = float("nan")
    if verify:
        ref = _masked(base, pl, means)
        with torch.no_grad():
            try:
                a = [t for t in output_tensors(call(small, example)) if t.is_floating_point()]
            except Exception as err:
                raise ValueError(f"the smaller {type(model).__name__} fails on the example "
                                 f"({type(err).__name__}: {err}); its forward computes shapes "
                                 "from attributes prunelab does not update") from err
            b = [t for t in output_tensors(call(ref, example)) if t.is_floating_point()]
        diff = max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)
        scale = max((float(y.abs().max()) for y in b), default=1.0)
        if diff > atol * max(1.0, scale):
            raise ValueError(f"the smaller model's outputs differ from the masked model's by "
                             f"{diff:.3g}: its forward computes something prunelab cannot follow")
    removed = {n: list(v) for n, v in pl.out.items()}
    removed.update({n: list(v) for n, v in pl.hf.items()})
    return SurgeryResult(model=small, removed=removed, plan=pl, params_before=_count(base),
                         params_after=_count(small), max_diff=diff)
