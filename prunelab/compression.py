"""Deep Compression storage accounting (Han et al. 2016): prune -> quantise -> Huffman code.

The pipeline, per prunable layer:

1. **Sparse storage** with *relative index encoding*: each kept weight is stored with the
   distance to the previous kept one (the first with its flat position) in ``index_bits`` bits.
   A distance larger than the largest representable one (``2**index_bits - 1``) is bridged with
   *filler* entries: a stored zero weight ``2**index_bits - 1`` positions further on
   (:func:`relative_indices`).
2. **Weight sharing**: the kept weights are clustered with 1-D k-means into at most
   ``2**bits`` centroids (linear initialisation over [min, max], as the paper recommends), each
   stored entry keeps a ``bits``-bit centroid index, and the codebook costs 32 bits per centroid
   (:func:`kmeans_share`).
3. **Huffman coding** of the centroid indices (filler entries as one extra symbol) and of the
   index differences (:func:`huffman_code`).

:func:`storage_report` tabulates the bits of every stage; it never touches the model.
:func:`quantized_copy` returns a copy whose weights are replaced by their shared centroids.
"""
from __future__ import annotations

import copy
import heapq

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from prunelab import graph as G
from prunelab import masks as M

__all__ = ["storage_report", "kmeans_share", "quantized_copy", "huffman_code", "huffman_bits",
           "relative_indices", "FLOAT_BITS"]


def __dir__():
    return sorted(__all__)


FLOAT_BITS = 32
_FILLER = -1  # the symbol of a filler entry in the Huffman-coded weight stream


# ----------------------------------------------------------------------------- Huffman
def _symbol_order(symbols) -> list:
    """Symbols sorted (by value when comparable, else by ``repr``): the tie-break order."""
    try:
        return sorted(symbols)
    except TypeError:
        return sorted(symbols, key=repr)


def huffman_code(symbol_counts: dict) -> dict:
    """A Huffman code ``{symbol: bit string}`` for ``{symbol: count}``.

    Deterministic: ties between equal counts are broken by symbol order (then by creation order
    of merged nodes), and the first node popped becomes the ``'0'`` branch. Symbols with count 0
    get no code; a single symbol gets the 1-bit code ``'0'``. Negative counts raise ValueError.
    """
    for s, c in symbol_counts.items():
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"count of symbol {s!r} must be a non-negative integer, got {c!r}")
    live = [s for s in _symbol_order(symbol_counts) if symbol_counts[s] > 0]
    if not live:
        return {}
    if len(live) == 1:
        return {live[0]: "0"}
    # heap entries: (count, tie, tree); tree is a symbol index (leaf) or a (left, right) pair
    heap = [(int(symbol_counts[s]), i, ("leaf", i)) for i, s in enumerate(live)]
    heapq.heapify(heap)
    tie = len(live)
    while len(heap) > 1:
        c0, _, t0 = heapq.heappop(heap)
        c1, _, t1 = heapq.heappop(heap)
        heapq.heappush(heap, (c0 + c1, tie, ("node", t0, t1)))
        tie += 1
    codes: dict = {}
    stack = [(heap[0][2], "")]
    while stack:
        tree, prefix = stack.pop()
        if tree[0] == "leaf":
            codes[live[tree[1]]] = prefix
        else:
            stack.append((tree[2], prefix + "1"))
            stack.append((tree[1], prefix + "0"))
    return {s: codes[s] for s in live}


def huffman_bits(counts: dict) -> int:
    """Total length in bits of the Huffman-coded stream with these symbol counts."""
    code = huffman_code(counts)
    return int(sum(int(counts[s]) * len(b) for s, b in code.items()))


# ----------------------------------------------------------------------------- indices
def relative_indices(mask_flat, index_bits: int) -> tuple[np.ndarray, int]:
    """Relative index encoding of the kept positions of a flat mask (Han et al., Fig. 2).

    Returns ``(diffs, n_filler)``: one difference per *stored* entry (kept weights and fillers,
    in order), each in ``[0, 2**index_bits - 1]``. The first difference is measured from
    position 0 (so it equals the first kept position); each later one from the previous stored
    entry. When a gap exceeds ``D = 2**index_bits - 1``, filler entries (stored zero weights)
    are inserted every ``D`` positions, so a gap ``g`` costs ``ceil(g / D) - 1`` fillers.
    """
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)) \
            or index_bits < 1:
        raise ValueError(f"index_bits must be a positive integer, got {index_bits!r}")
    m = mask_flat.detach().cpu().numpy() if isinstance(mask_flat, Tensor) else np.asarray(mask_flat)
    if m.ndim != 1:
        raise ValueError(f"mask_flat must be 1-D, got shape {m.shape}")
    pos = np.flatnonzero(m.astype(bool))
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    gaps = np.diff(pos, prepend=0).astype(np.int64)
    d = (1 << int(index_bits)) - 1
    fill = np.maximum(-(-gaps // d) - 1, 0)  # ceil(g / D) - 1; 0 for g = 0 (first at position 0)
    n_filler = int(fill.sum())
    if n_filler == 0:
        return gaps, 0
    out = np.empty(gaps.size + n_filler, dtype=np.int64)
    k = 0
    for g, f in zip(gaps.tolist(), fill.tolist()):
        out[k:k + f] = d
        k += f
        out[k] = g - f * d
        k += 1
    return out, n_filler


# ----------------------------------------------------------------------------- k-means
def kmeans_share(values, bits: int, *, iters: int = 30,
                 init: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means (Lloyd) into at most ``2**bits`` shared values.

    Returns ``(centroids, assignments)``: float64 centroids (ascending for the linear init) and,
    per value, the int64 index of its centroid. With at most ``2**bits`` distinct values the
    centroids are exactly those values (zero distortion, the k-means optimum). Otherwise the
    centroids start linearly spaced over [min, max] (``init="linear"``) and Lloyd iterations run
    until the assignments stop changing or ``iters`` is reached; nearest-centroid ties go to
    the lower index and an empty cluster keeps its centroid.
    """
    if init != "linear":
        raise ValueError(f"init must be 'linear', got {init!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    v = values.detach().cpu().double().numpy() if isinstance(values, Tensor) \
        else np.asarray(values, dtype=np.float64)
    v = v.reshape(-1)
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf; cannot cluster them")
    if v.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    k = 1 << int(bits)
    uniq, inverse = np.unique(v, return_inverse=True)
    if uniq.size <= k:
        return uniq.astype(np.float64), inverse.reshape(-1).astype(np.int64)
    c = np.linspace(v.min(), v.max(), k)
    assign = _nearest(v, c)
    for _ in range(int(iters)):
        sums = np.bincount(assign, weights=v, minlength=k)
        cnt = np.bincount(assign, minlength=k)
        c = np.where(cnt > 0, sums / np.maximum(cnt, 1), c)
        new = _nearest(v, c)
        if np.array_equal(new, assign):
            break
        assign = new
    return c, assign.astype(np.int64)


def _nearest(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (lowest index on ties), in chunks to bound memory."""
    out = np.empty(v.size, dtype=np.int64)
    step = max(1, 2_000_000 // max(c.size, 1))
    for i in range(0, v.size, step):
        out[i:i + step] = np.abs(v[i:i + step, None] - c[None, :]).argmin(axis=1)
    return out


# ----------------------------------------------------------------------------- model level
def _kind(module: nn.Module) -> str:
    return "fc" if isinstance(module, nn.Linear) else "conv"


def _layer_masks(model: nn.Module, masks: M.Masks | None) -> dict[str, Tensor]:
    """Keep-mask per prunable weight: given, else attached, else the weight's nonzeros."""
    names = G.prunable_names(model)
    if masks is not None:
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict weight name -> bool tensor, got "
                            f"{type(masks).__name__}")
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise ValueError(f"masks name weights that are not prunable in this model: {unknown}")
    attached = M.current(model)
    out = {}
    for n in names:
        w = G.weight(model, n)
        if masks is not None and n in masks:
            m = masks[n]
        elif n in attached:
            m = attached[n]
        else:
            m = w.detach() != 0
        if not isinstance(m, Tensor):
            raise TypeError(f"mask of {n} must be a tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask of {n} has shape {tuple(m.shape)}, weight has "
                             f"{tuple(w.shape)}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"mask of {n} must be bool (True = kept) or hold only 0 and 1, got "
                             f"dtype {m.dtype} with other values")
        out[n] = m.detach().to(torch.bool).cpu()
    return out


def _check_bits(**kw) -> None:
    for k, b in kw.items():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16:
            raise ValueError(f"{k} must be an integer in [1, 16], got {b!r}")


@torch.no_grad()
def storage_report(model: nn.Module, *, masks: M.Masks | None = None, conv_bits: int = 8,
                   fc_bits: int = 5, conv_index_bits: int = 8, fc_index_bits: int = 5,
                   huffman: bool = True, quantize: bool = True,
                   iters: int = 30) -> pd.DataFrame:
    """Bits needed to store the prunable weights at each Deep Compression stage.

    One row per prunable layer (execution order of ``named_modules``) plus a ``"total"`` row,
    with columns ``layer, kind ("conv"/"fc"), numel, nonzero, stored`` (kept + filler entries),
    ``n_filler, weight_bits, index_bits, n_centroids, dense_bits`` (32·numel), ``sparse_bits``
    (32 bits per stored entry + its index), ``quantized_bits`` (``weight_bits`` per stored entry
    + its index + a 32-bit codebook entry per centroid), ``huffman_bits`` (Huffman-coded centroid
    indices, fillers as one more symbol, + Huffman-coded index differences + codebook), and
    ``sparse_ratio, quantized_ratio, huffman_ratio`` (dense_bits / bits of that stage).

    ``masks`` default to the masks attached to ``model``; layers without one keep their nonzero
    weights. ``quantize=False`` skips weight sharing (quantized_bits = sparse_bits, and Huffman
    codes the indices only); ``huffman=False`` skips the last stage (huffman_bits =
    quantized_bits). Biases and norm parameters are not counted. The model is not modified.
    """
    _check_bits(conv_bits=conv_bits, fc_bits=fc_bits, conv_index_bits=conv_index_bits,
                fc_index_bits=fc_index_bits)
    keep = _layer_masks(model, masks)
    rows = []
    for name, m in keep.items():
        kind = _kind(G.module_of(model, name))
        wbits = conv_bits if kind == "conv" else fc_bits
        ibits = conv_index_bits if kind == "conv" else fc_index_bits
        flat = m.reshape(-1)
        diffs, n_filler = relative_indices(flat, ibits)
        nnz = int(flat.sum())
        stored = nnz + n_filler
        dense = FLOAT_BITS * flat.numel()
        sparse = stored * (FLOAT_BITS + ibits)
        n_cent = 0
        if quantize and nnz:
            vals = G.weight(model, name).detach().reshape(-1).cpu()[flat]
            cent, assign = kmeans_share(vals, wbits, iters=iters)
            n_cent = int(cent.size)
            codebook = FLOAT_BITS * n_cent
            quant = stored * (wbits + ibits) + codebook
            w_counts = {int(s): int(c) for s, c in zip(*np.unique(assign, return_counts=True))}
            if n_filler:
                w_counts[_FILLER] = n_filler
            w_huff = huffman_bits(w_counts) + codebook
        else:
            quant = sparse
            w_huff = stored * FLOAT_BITS
        if huffman:
            i_counts = {int(s): int(c) for s, c in zip(*np.unique(diffs, return_counts=True))}
            huff = w_huff + huffman_bits(i_counts)
        else:
            huff = quant
        rows.append(dict(layer=name, kind=kind, numel=flat.numel(), nonzero=nnz, stored=stored,
                         n_filler=n_filler, weight_bits=wbits if quantize else FLOAT_BITS,
                         index_bits=ibits, n_centroids=n_cent, dense_bits=dense,
                         sparse_bits=sparse, quantized_bits=quant, huffman_bits=huff))
    cols = ["layer", "kind", "numel", "nonzero", "stored", "n_filler", "weight_bits",
            "index_bits", "n_centroids", "dense_bits", "sparse_bits", "quantized_bits",
            "huffman_bits"]
    df = pd.DataFrame(rows, columns=cols)
    total = {c: int(df[c].sum()) for c in ["numel", "nonzero", "stored", "n_filler",
                                           "n_centroids", "dense_bits", "sparse_bits",
                                           "quantized_bits", "huffman_bits"]}
    total.update(layer="total", kind="all", weight_bits=pd.NA, index_bits=pd.NA)
    df = pd.concat([df, pd.DataFrame([total], columns=cols)], ignore_index=True)
    for stage in ("sparse", "quantized", "huffman"):
        b = df[f"{stage}_bits"].astype(float)
        df[f"{stage}_ratio"] = df["dense_bits"].astype(float) / b.where(b > 0)
    return df


@torch.no_grad()
def quantized_copy(model: nn.Module, *, masks: M.Masks | None = None, conv_bits: int = 8,
                   fc_bits: int = 5, iters: int = 30, inplace: bool = False) -> nn.Module:
    """``model`` (a deep copy unless ``inplace``) with every kept weight replaced by its shared
    k-means centroid (:func:`kmeans_share`, ``conv_bits``/``fc_bits`` per layer kind).

    Pruned weights (per ``masks``, else the attached masks, else the zeros) are set to exactly 0;
    attached masks stay attached. Biases and norm parameters are untouched.
    """
    _check_bits(conv_bits=conv_bits, fc_bits=fc_bits)
    keep = _layer_masks(model, masks)
    out = model if inplace else copy.deepcopy(model)
    for name, m in keep.items():
        module = G.module_of(out, name)
        tname = G.split_name(name)[1]
        wbits = conv_bits if _kind(module) == "conv" else fc_bits
        target = G.weight(out, name)
        flat = m.reshape(-1)
        eff = G.weight(out, name).detach().reshape(-1).cpu()
        new = torch.zeros(flat.numel(), dtype=torch.float64)
        if int(flat.sum()):
            cent, assign = kmeans_share(eff[flat], wbits, iters=iters)
            new[flat] = torch.from_numpy(cent[assign])
        M.write_weight(module, tname, new.reshape(target.shape).to(target.dtype))
    return out
