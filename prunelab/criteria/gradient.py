"""Gradient-based criteria: SNIP, GraSP, SynFlow, Taylor-FO and gradient magnitude.

All data-dependent scores use the mean cross-entropy of the batch, L = (1/N) Σ_n ℓ(f(x_n), y_n),
and its gradient g = ∂L/∂θ with respect to the prunable weights (Linear/Conv ``weight``).
Higher scores are kept. Every criterion works on the plain copy it is handed through
``torch.autograd.grad`` only: no ``.backward()``, no ``.grad`` left behind, the model bit-identical.

Sign conventions (our "keep the highest" rule must reproduce each paper's pruning decision):

- SNIP keeps the largest |g ⊙ θ| (Lee et al. 2019, Eq. 5): unchanged.
- GraSP (Wang et al. 2020, Eq. 8) computes S(−θ) = −θ ⊙ Hg, the predicted change of the gradient
  norm gᵀg when a weight is removed, and removes the weights with the *highest* S ("we prefer to
  first remove those weights whose removal will not reduce the gradient flow"; Algorithm 1 keeps
  S < τ with τ the (1−p) percentile, as the authors' code does). Our score is therefore
  −S = θ ⊙ Hg: keeping its highest values removes exactly the weights GraSP removes. The
  registry's "−θ ⊙ Hg" names the paper's S; ``absolute=True`` gives |θ ⊙ Hg|, the magnitude
  variant that Frankle et al. (2021, App. H) found to work better.
- SynFlow keeps the largest |θ ⊙ ∂R/∂θ| (Tanaka et al. 2020, Eq. 2 and Algorithm 1).
- Taylor-FO keeps the largest (g ⊙ θ)² (Molchanov et al. 2019, Eq. 8); grad-mag the largest |g|
  (Blalock et al. 2020; their global and layerwise variants differ in the mask scope only).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from prunelab import batches as B
from prunelab import graph as G
from prunelab import selection as S

Scores = G.Scores
Masks = G.Masks

SCOPES = S.SCOPES
_SMALL_NET = 4_000_000  # prunable weights up to which SynFlow's rounds run on one thread


# ----------------------------------------------------------------------------- shared helpers
@contextmanager
def single_threaded(enabled: bool = True) -> Iterator[None]:
    """Run a stretch of many small tensor ops on one intra-op thread, then restore the setting.

    Small ops (a batch-1 forward, a 40×40 Cholesky) gain nothing from a second thread, and on a
    shared machine every wake-up of a busy core costs a scheduler slice: measured here, 100
    SynFlow rounds of a 40-300-100-10 MLP took 0.2 s on one thread and 6.7 s on two.
    """
    before = torch.get_num_threads()
    if enabled and before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _alive(model: nn.Module, masks: Masks | None) -> dict[str, Tensor]:
    """Weights not pruned yet: non-zero (the engine zeroes pruned weights) and kept by ``masks``."""
    out = {}
    for n, w in G.weights(model).items():
        a = w.detach() != 0
        if masks and n in masks:
            a &= masks[n].to(device=a.device, dtype=torch.bool)
        out[n] = a
    return out


def _loss(model: nn.Module, batch, temperature: float = 1.0,
          objective: B.Objective | None = None) -> Tensor:
    """The objective's mean loss (cross-entropy by default) of ``output / temperature``."""
    obj = objective or B.Objective()
    x, y = batch
    z = obj.forward(model, x)
    obj.check(z, y)
    return obj.value(z / temperature if temperature != 1.0 else z, y)


def _grads(model: nn.Module, batch, *, create_graph: bool = False, temperature: float = 1.0,
           objective: B.Objective | None = None) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Names, weights and g = ∂L/∂weight of the mean loss on ``batch``."""
    names = G.prunable_names(model)
    weights = [G.weight(model, n) for n in names]
    loss = _loss(model, batch, temperature, objective)
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
    # A weight the loss does not reach (an MHA projection used by a fused kernel, a head on
    # another output) has gradient zero.
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    return names, weights, grads


def _require_batch(batch, name: str):
    if batch is None:
        raise ValueError(f"criterion {name!r} is data-dependent: pass batch=(x, y)")
    return batch


# ----------------------------------------------------------------------------- first order
def snip(model: nn.Module, *, batch=None, objective=None, **_) -> Scores:
    """Connection sensitivity |g ⊙ θ| (Lee et al. 2019, Eq. 5 as restated by Wang et al. Eq. 5)."""
    batch = _require_batch(batch, "snip")
    with parametrize.cached():
        names, weights, grads = _grads(model, batch, objective=objective)
    return {n: (g * w).detach().abs() for n, w, g in zip(names, weights, grads)}


def taylor_fo(model: nn.Module, *, batch=None, objective=None, **_) -> Scores:
    """First-order Taylor importance (g ⊙ θ)² (Molchanov et al. 2019, Eq. 8), one batch."""
    batch = _require_batch(batch, "taylor-fo")
    with parametrize.cached():
        names, weights, grads = _grads(model, batch, objective=objective)
    return {n: (g * w).detach() ** 2 for n, w, g in zip(names, weights, grads)}


def gradient_magnitude(model: nn.Module, *, batch=None, objective=None, **_) -> Scores:
    """Gradient magnitude |g| (Blalock et al. 2020, "gradient magnitude" baseline)."""
    batch = _require_batch(batch, "grad-mag")
    with parametrize.cached():
        names, _, grads = _grads(model, batch, objective=objective)
    return {n: g.detach().abs() for n, g in zip(names, grads)}


# ----------------------------------------------------------------------------- GraSP
def hessian_gradient_product(model: nn.Module, batch, *, masks: Masks | None = None,
                             temperature: float = 1.0,
                             objective: B.Objective | None = None) -> dict[str, Tensor]:
    """Hg over the prunable weights, by double backward (Wang et al. 2020, Algorithm 2).

    Hg = ∂/∂θ [stop_grad(g)ᵀ g]: the gradient in the product is detached, so one extra backward
    pass gives the Hessian-vector product at v = g. The gradient of already pruned weights
    (zero or masked out) is zeroed in v: they cannot move, so they do not contribute to the
    gradient flow gᵀg of the pruned network.

    Args:
        model: the network; not modified.
        batch: (x, y); the loss is the mean cross-entropy of ``model(x) / temperature``.
        masks: extra masks (True = kept).
        temperature: logit temperature T; the GraSP authors' code uses T = 200, the paper 1.

    Returns:
        ``{name: Hg}`` shaped like each prunable weight.
    """
    alive = _alive(model, masks)
    with parametrize.cached(), _double_backward_attention():
        names, weights, grads = _grads(model, batch, create_graph=True, temperature=temperature,
                                       objective=objective)
        flow = sum((g.detach() * alive[n] * g).sum() for n, g in zip(names, grads))
        hg = torch.autograd.grad(flow, weights, allow_unused=True)
    return {n: (h.detach() if h is not None else torch.zeros_like(w))
            for n, w, h in zip(names, weights, hg)}


@contextlib.contextmanager
def _double_backward_attention():
    """Scaled-dot-product attention on its math kernel: the fused kernels (flash, memory-
    efficient) have no second derivative, which GraSP's Hg needs (same numbers, slower)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to switch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def grasp(model: nn.Module, *, batch=None, masks: Masks | None = None,
          temperature: float = 1.0, absolute: bool = False, objective=None, **_) -> Scores:
    """GraSP keep-score θ ⊙ Hg = −S(−θ) (Wang et al. 2020, Eq. 8 and Algorithm 1).

    GraSP removes the weights with the highest S(−θ) = −θ ⊙ Hg (their removal increases, or
    least decreases, the gradient flow); negating it lets "keep the highest" make the same
    choice. No normalisation (the authors divide by |Σ S|, which does not change the order).

    Args:
        temperature: logit temperature (1 as in the paper; the authors' code uses 200).
        absolute: score |θ ⊙ Hg| instead (Frankle et al. 2021, App. H).
    """
    batch = _require_batch(batch, "grasp")
    hg = hessian_gradient_product(model, batch, masks=masks, temperature=temperature,
                                  objective=objective)
    out = {}
    for n, h in hg.items():
        s = G.weight(model, n).detach() * h
        out[n] = s.abs() if absolute else s
    return out


# ----------------------------------------------------------------------------- SynFlow
def _input_shape(model: nn.Module, batch, input_shape) -> tuple[int, ...]:
    """Shape of one input: option > batch > ``model.input_shape`` > first Linear's in_features."""
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if batch is not None:
        x = batch[0]
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            raise ValueError("synflow feeds an all-ones input in place of the data, so it needs a "
                             "model whose input is one float tensor; this batch's inputs are "
                             f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype} "
                             "(token ids or several inputs): synflow cannot score this model")
        return tuple(x.shape[1:])
    if getattr(model, "input_shape", None) is not None:
        return tuple(int(s) for s in model.input_shape)
    names = G.prunable_names(model)
    if names and G.split_name(names[0])[1] == "weight" \
            and (isinstance(G.module_of(model, names[0]), nn.Linear)
                 or G.linear_like(G.module_of(model, names[0])) is not None):
        first = G.layout(model, names[0])
        return (G.weight(model, names[0]).shape[first.in_dim],)
    raise ValueError("synflow needs the input shape: pass input_shape=(C, H, W) (or a batch, "
                     "whose values are ignored)")


class _SynFlowNet:
    """A float64 copy of a network with every parameter and buffer replaced by its absolute value.

    This is the linearisation of Tanaka et al.'s code (``linearize``: ``param.abs_()`` over the
    whole state dict, model in eval mode) so that R = Σ f(1) over an all-ones input equals
    1ᵀ(Π_l |θ^[l]|)1 (Eq. 2) for a bias-free ReLU net. Float64, because R grows like the product
    of the layers' |W| row sums and overflows float32 on deep nets. ``bias="zero"`` instead zeroes
    biases, BN shifts and running means, so R is exactly Eq. 2 with BN acting as the positive scale
    |γ|/σ.
    """

    def __init__(self, model: nn.Module, shape: tuple[int, ...], bias: str = "abs") -> None:
        if bias not in ("abs", "zero"):
            raise ValueError(f"bias must be 'abs' (as in the SynFlow code) or 'zero', got {bias!r}")
        net = G.plain_copy(model).double().eval()
        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                if t.is_floating_point():
                    t.abs_()
            if bias == "zero":
                for m in net.modules():
                    for attr in ("bias", "running_mean"):
                        t = getattr(m, attr, None)
                        if isinstance(t, Tensor):
                            t.zero_()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.names = G.prunable_names(net)
        self.weights = [G.weight(net, n).requires_grad_(True) for n in self.names]
        self.original = [w.detach().clone() for w in self.weights]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.ones = torch.ones((1, *shape), dtype=torch.float64, device=device)

    def __call__(self, alive: Mapping[str, Tensor] | None = None
                 ) -> tuple[float, dict[str, Tensor]]:
        """(R, {name: |θ ⊙ ∂R/∂θ|}) of the network masked with ``alive`` (float64)."""
        with torch.no_grad():
            for n, w, w0 in zip(self.names, self.weights, self.original):
                w.copy_(w0 * alive[n] if alive is not None else w0)
        flow = B.output_tensor(self.net(self.ones)).sum()
        grads = torch.autograd.grad(flow, self.weights, allow_unused=True)
        scores = {}
        for n, w, g in zip(self.names, self.weights, grads):
            scores[n] = (g * w).detach().abs() if g is not None else torch.zeros_like(w.detach())
        return float(flow.detach()), scores


def synflow_scores(model: nn.Module, masks: Masks | None = None, *,
                   input_shape: Sequence[int] | None = None,
                   bias: str = "abs") -> dict[str, Tensor]:
    """One round of SynFlow: |θ ⊙ ∂R/∂θ| in float64 (Tanaka et al. 2020, Eq. 2, Alg. 1 line 4).

    R = 1ᵀ(Π_l |θ^[l]|)1 is evaluated as the summed output for an all-ones input of a float64 copy
    whose parameters and buffers are all replaced by their absolute values, in eval mode (the
    authors' code). For a bias-free network with homogeneous activations the scores obey the
    conservation laws: per hidden unit (or conv channel) incoming = outgoing (Theorem 1), and
    every layer's scores sum to R (Theorem 2).

    Args:
        model: the network; not modified (parametrized masks are honoured).
        masks: extra masks (True = kept); masked weights score 0.
        input_shape: shape of one input; default ``model.input_shape`` or the first Linear's width.
        bias: ``"abs"`` (authors' code) or ``"zero"`` (Eq. 2 literally); see :class:`_SynFlowNet`.

    Returns:
        ``{name: float64 tensor}`` shaped like each prunable weight, unnormalised.
    """
    net = _SynFlowNet(model, _input_shape(model, None, input_shape), bias)
    alive = {n: m.to(torch.float64) for n, m in masks.items()} if masks else None
    if alive is not None:
        alive = {n: alive.get(n, torch.ones_like(w)) for n, w in zip(net.names, net.original)}
    return net(alive)[1]


def _separate(out: Tensor, kept: Tensor, dropped: Tensor) -> None:
    """Lower ``dropped`` entries that tie with or exceed the lowest kept one by one float step.

    Afterwards every kept entry is strictly above every dropped one, so any top-k with any
    tie-break reproduces the mask. Only exact ties at the threshold (typically zero scores of
    disconnected weights) are touched.
    """
    if not kept.any() or not dropped.any():
        return
    low = out[kept].min()
    bump = dropped & (out >= low)
    if bump.any():
        out[bump] = torch.nextafter(low, torch.tensor(-math.inf, dtype=out.dtype))


def synflow(model: nn.Module, *, batch=None, masks: Masks | None = None, seed: int = 0,
            sparsity: float | Mapping[str, float] | None = None, scope: str = "global",
            iterations: int = 100, input_shape: Sequence[int] | None = None, bias: str = "abs",
            progress: bool = False, **_):
    """Iterative Synaptic Flow pruning scores (Tanaka et al. 2020, Algorithm 1), data-free.

    With a target ``sparsity`` the criterion runs SynFlow's inner loop: ``iterations`` rounds,
    each re-scoring the network masked by the previous round and keeping exactly
    k_r = round(a_0 · (k/a_0)^(r/R)) weights (the exponential schedule ρ^(−r/R) of Algorithm 1,
    generalised to start from the a_0 weights still alive; a_0 = D gives density (1−s)^(r/R)),
    lowest scores pruned, ties by index (lower first). The returned scores are those of the last
    round (normalised by its R), with −inf on weights pruned before it and exact ties at the
    threshold separated by one float step, so thresholding them at the same target with
    :func:`prunelab.masks.select` reproduces SynFlow's mask exactly. Weights already zero (pruned
    earlier) stay pruned. Without ``sparsity`` the scores are single-shot SynFlow (one round).

    Args:
        model: the network; not modified.
        batch: ignored apart from the input shape (SynFlow uses an all-ones input).
        masks: extra masks (True = kept) applied before scoring.
        seed: unused (SynFlow is deterministic).
        sparsity: total fraction to prune in [0, 1), or ``{name: fraction}`` per layer (layers
            not named keep all their alive weights); None for single-shot scores.
        scope: ``"global"``, ``"layerwise"`` or ``"normalized"`` (global after dividing each
            layer's scores by their norm, as :func:`prunelab.masks.select`; the returned scores
            are already normalised, so the engine's second division is a no-op up to round-off
            and the mask is reproduced up to that round-off).
        iterations: rounds R of the inner loop (100 in the paper).
        input_shape: shape of one input (default from ``batch`` or ``model.input_shape``).
        bias: ``"abs"`` (authors' code) or ``"zero"``; see :func:`synflow_scores`.
        progress: show a progress bar over the rounds.

    Returns:
        A :class:`~prunelab.criteria.ScoreResult` whose ``info`` holds ``masks`` (SynFlow's mask
        at the target, or None) and ``flow`` (R of each round).
    """
    from prunelab.criteria import ScoreResult

    S.check_scope(scope)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    net = _SynFlowNet(model, _input_shape(model, batch, input_shape), bias)
    names = net.names
    alive = _alive(model, masks)

    def normalised(flow: float, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        # R is the scale of every layer's scores (Theorem 2): dividing keeps float32 finite.
        return {n: s / flow if flow > 0 else s for n, s in raw.items()}

    if sparsity is None:
        flow, raw = net({n: a.double() for n, a in alive.items()})
        scores = {n: s.float() for n, s in normalised(flow, raw).items()}
        return ScoreResult(scores, info={"masks": None, "flow": [flow]})

    # Groups ranked together and the number each keeps at the target.
    if isinstance(sparsity, Mapping):
        groups = [[n] for n in names]
        counts = S.pruned_counts({n: alive[n].numel() for n in names}, sparsity)
        final = [alive[n].numel() - counts[n] if n in sparsity else int(alive[n].sum())
                 for n in names]
        per_layer_norm = False
    else:
        s = S.check_sparsity(sparsity)
        if scope == "layerwise":
            groups = [[n] for n in names]
        else:
            groups = [list(names)]
        final = [sum(alive[n].numel() for n in g) - S.n_pruned(s, sum(alive[n].numel() for n in g))
                 for g in groups]
        per_layer_norm = scope == "normalized"
    start = [sum(int(alive[n].sum()) for n in g) for g in groups]

    def ranked(raw: dict[str, Tensor]) -> dict[str, Tensor]:
        if not per_layer_norm:
            return raw
        out = {}
        for n, v in raw.items():
            norm = torch.linalg.vector_norm(v * alive[n])
            out[n] = v / norm if norm > 0 else v
        return out

    from tqdm.auto import tqdm

    flows: list[float] = []
    with single_threaded(sum(a.numel() for a in alive.values()) <= _SMALL_NET):
        for r in tqdm(range(1, iterations + 1), desc="synflow", disable=not progress,
                      leave=False):
            flow, raw = net({n: a.double() for n, a in alive.items()})
            flows.append(flow)
            raw = ranked(normalised(flow, raw))
            previous = dict(alive)
            for g, a0, k_end in zip(groups, start, final):
                if a0 <= k_end:
                    continue  # nothing left to prune in this group (never revive)
                k = round(a0 * (k_end / a0) ** (r / iterations))
                k = k_end if r == iterations else min(max(k, k_end), a0)
                flat = torch.cat([raw[n].flatten() for n in g])
                live = torch.cat([alive[n].flatten() for n in g])
                # The selection rule of prunelab.selection: the n − k lowest pruned, ties by
                # index, dead entries at −inf so they are never revived.
                keep = S.prune_lowest(flat.masked_fill(~live, -math.inf), flat.numel() - k)
                for n, m in zip(g, keep.split([alive[n].numel() for n in g])):
                    alive[n] = m.view_as(alive[n])

    # Last round's scores (computed on `previous`), −inf on weights pruned before it.
    scores = {n: raw[n].float().masked_fill(~previous[n], -math.inf) for n in names}
    for g in groups:
        out = torch.cat([scores[n].flatten() for n in g])
        kept = torch.cat([alive[n].flatten() for n in g])
        dropped = torch.cat([(previous[n] & ~alive[n]).flatten() for n in g])
        _separate(out, kept, dropped)
        for n, v in zip(g, out.split([scores[n].numel() for n in g])):
            scores[n] = v.view_as(scores[n])
    return ScoreResult(scores, info={"masks": {n: alive[n].clone() for n in names},
                                     "flow": flows})
