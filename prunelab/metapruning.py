"""MetaPruning: a PruningNet and an evolutionary search over channel numbers.

Liu et al., *MetaPruning: Meta Learning for Automatic Neural Network Channel Pruning*, ICCV 2019
(lecture slides, seed 001). The steps of the paper, at the scale of a small conv net:

1. **Search space** (:class:`ChannelSpace`): a plain conv net ``conv-BN-ReLU[-pool]`` x L then one
   linear classifier, whose *network encoding vector* is the number of output channels of each
   conv, ``c = (c_1, ..., c_L)`` with ``1 <= c_l <= C_l`` (the widest net's widths).
   :meth:`ChannelSpace.build` builds the physically smaller network of an encoding directly
   (``prunelab.models.ConvNet`` with per-layer widths).
2. **PruningNet** (:class:`PruningNet`, paper Sec. 3.1, Fig. 2-3): per conv/linear layer one
   *block* of two fully-connected layers that maps the layer's part of the encoding -- the
   channel numbers of its input and output, ``(c_{l-1}/C_{l-1}, c_l/C_l)`` -- to the weight of
   the *widest* layer, ``C_l x C_{l-1} x k x k``, which is cropped to ``c_l x c_{l-1} x k x k``
   (Sec. 3.1: "the generated weight matrices are cropped to match the input and output channels").
   It is trained end to end with a new random encoding per mini-batch (Sec. 3.1, "stochastic
   structure sampling"), so it learns to generate weights for every encoding.
3. **BatchNorm**: the PruningNet's BatchNorms normalise with the statistics of the current batch
   and have no affine parameters; the statistics of a candidate are recomputed on a few training
   batches before it is evaluated (:func:`recalibrate_bn`; as the authors' search code does), so
   every candidate gets its own BN statistics.
4. **Evolutionary search** (:func:`search`, paper Sec. 3.2, Algorithm 1): a population of random
   encodings that satisfy the constraint (FLOPs <= budget), fitness = validation accuracy of the
   network with PruningNet-generated weights after BN recalibration, the top-K encodings seen so
   far as parents, mutation (each gene re-drawn with a probability) and crossover (each gene from
   one of two parents); a candidate over the budget is rejected and resampled, never evaluated
   nor returned.
5. The best encoding is built physically smaller, initialised from the generated weights
   (:meth:`PruningNet.materialize`) and fine-tuned, or trained from scratch (:func:`build_pruned`).

:func:`compare` puts MetaPruning beside uniform width scaling and LAP-ℓ1 / MP-ℓ1 channel pruning
(:mod:`prunelab.structured`) at equal FLOPs; :func:`summary` gives mean ± std per method and
budget. The figures are ``pl.plots.search_progress`` / ``pl.plots.accuracy_vs_flops`` and
``pl.figures.accuracy_vs_flops``.

Over 500 lines because the search space, the PruningNet that generates its weights, the BN
recalibration, the search and the equal-FLOPs comparison are one method (Liu et al. Algorithm 1)
sharing the encoding and its validation.

FLOPs are multiply-adds of the conv and linear layers (BN, activations, pooling and bias additions
are not counted): ``P_l · c_l · c_{l-1} · k^d`` for a conv with ``P_l`` output positions, ``in ·
out`` for the classifier (:meth:`ChannelSpace.flops`, :func:`count_flops` on any model).
"""
from __future__ import annotations

import copy
import math
import numbers
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from prunelab import models, structured, train, units

__all__ = [
    "ChannelSpace", "PruningNet", "SearchResult", "Comparison", "default_space",
    "count_flops", "recalibrate_bn", "train_pruningnet", "candidate_fitness",
    "candidate_accuracy", "search",
    "build_pruned", "channel_prune", "compare", "summary",
]



def __dir__():
    return sorted(__all__)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_FCONV = {1: F.conv1d, 2: F.conv2d}
_FPOOL = {1: F.max_pool1d, 2: F.max_pool2d}
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


# ============================================================================ the search space

@dataclass(frozen=True)
class ChannelSpace:
    """A plain conv net family with one channel number per conv layer (the network encoding).

    Layers: for ``l = 1..L``: ``conv{l}`` (``k x k``, stride 1, "same" padding ``k // 2``, no
    bias), ``bn{l}``, ``act{l}`` (ReLU) and, when ``l`` is in ``pool_after``, a 2 x 2 max-pool
    (2 along 1-D signals; an axis of extent 1 is not pooled; a pool with nothing to pool is left
    out, as in :mod:`prunelab.models`); then ``flatten`` and one linear layer ``fc1``. Module names
    follow :mod:`prunelab.models` (``features.conv1`` ..., ``classifier.fc1``).

    Attributes:
        input_shape: ``(C, L)`` or ``(C, H, W)``, without the batch dimension.
        num_classes: Outputs of the classifier.
        widths: The widest net's channel numbers ``C_1..C_L`` (the upper bounds of the encoding).
        pool_after: 1-based conv indices followed by a max-pool.
        kernel: Odd kernel size of every conv.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 32, 64)
    pool_after: tuple[int, ...] = (2, 4)
    kernel: int = 3

    def __post_init__(self):
        try:
            shape = tuple(int(s) for s in self.input_shape)
        except TypeError:
            raise ValueError(f"input_shape must be a tuple of ints, got {self.input_shape!r}") \
                from None
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, L) or (C, H, W) with sizes >= 1, got "
                             f"{shape}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "num_classes", _positive_int(self.num_classes, "num_classes"))
        widths = tuple(self.widths)
        if not widths:
            raise ValueError("widths must name at least one conv layer, got ()")
        object.__setattr__(self, "widths", tuple(_positive_int(w, f"widths[{i}]")
                                                  for i, w in enumerate(widths)))
        pools = tuple(int(p) for p in self.pool_after)
        if any(not 1 <= p <= len(widths) for p in pools):
            raise ValueError(f"pool_after holds 1-based conv indices in 1..{len(widths)}, got "
                             f"{self.pool_after!r}")
        object.__setattr__(self, "pool_after", tuple(sorted(set(pools))))
        k = _positive_int(self.kernel, "kernel")
        if k % 2 == 0:
            raise ValueError(f"kernel must be odd (for 'same' padding), got {k}")

    # ------------------------------------------------------------------ derived geometry
    @property
    def dims(self) -> int:
        """Spatial dimensions: 1 for ``(C, L)`` signals, 2 for images."""
        return len(self.input_shape) - 1

    @property
    def layers(self) -> list[str]:
        """Module names of the encoded conv layers, one per gene of the encoding."""
        return [f"features.conv{i + 1}" for i in range(len(self.widths))]

    @property
    def classifier(self) -> str:
        """Module name of the linear classifier."""
        return "classifier.fc1"

    def _geometry(self) -> tuple[list[int], list[tuple[int, ...] | None], int]:
        """Output positions of each conv, the pool kernel after it (or None), final positions."""
        spatial = list(self.input_shape[1:])
        positions, pools = [], []
        for i in range(len(self.widths)):
            positions.append(math.prod(spatial))  # "same" padding, stride 1
            kernel = None
            if i + 1 in self.pool_after:
                ks = tuple(2 if n >= 2 else 1 for n in spatial)
                if max(ks) > 1:
                    kernel = ks
                    spatial = [n // k for n, k in zip(spatial, ks)]
            pools.append(kernel)
        return positions, pools, math.prod(spatial)

    # ------------------------------------------------------------------ encodings
    def check(self, encoding) -> tuple[int, ...]:
        """The encoding as a tuple of ints, or ``ValueError`` naming the offending layer.

        An encoding has one integer per conv layer (:attr:`layers`), ``1 <= c_l <= C_l``.
        """
        names = self.layers
        if isinstance(encoding, Tensor):
            encoding = encoding.tolist()
        if isinstance(encoding, (str, bytes)) or not isinstance(encoding, Iterable):
            raise ValueError(f"encoding must be a sequence of {len(names)} channel numbers (one "
                             f"per layer: {', '.join(names)}), got {encoding!r}")
        values = list(encoding)
        if len(values) != len(names):
            raise ValueError(f"encoding has {len(values)} channel numbers, expected {len(names)} "
                             f"(one per layer: {', '.join(names)})")
        out = []
        for name, v, top in zip(names, values, self.widths):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"layer {name!r}: channel number {v!r} is not an integer "
                                 f"(allowed: integers 1..{top})")
            if not 1 <= int(v) <= top:
                raise ValueError(f"layer {name!r}: channel number {int(v)} is out of range "
                                 f"(allowed: 1..{top}, the width of the widest network)")
            out.append(int(v))
        return tuple(out)

    @property
    def full(self) -> tuple[int, ...]:
        """The widest encoding, ``(C_1, ..., C_L)``."""
        return tuple(self.widths)

    @property
    def smallest(self) -> tuple[int, ...]:
        """One channel per layer: the encoding with the fewest FLOPs."""
        return (1,) * len(self.widths)

    def flops(self, encoding=None) -> int:
        """Multiply-adds of the conv and linear layers of ``encoding`` (default: the widest net).

        ``Σ_l P_l · c_l · c_{l-1} · k^d + c_L · P_out · num_classes`` with ``c_0`` the input
        channels, ``P_l`` the output positions of conv ``l`` and ``P_out`` the positions left
        after the last pool.
        """
        c = self.full if encoding is None else self.check(encoding)
        positions, _, final = self._geometry()
        kk = self.kernel ** self.dims
        total, prev = 0, self.input_shape[0]
        for p, ch in zip(positions, c):
            total += p * ch * prev * kk
            prev = ch
        return total + prev * final * self.num_classes

    def random(self, rng: random.Random) -> tuple[int, ...]:
        """An encoding with every ``c_l`` uniform in ``1..C_l`` (unconstrained)."""
        return tuple(rng.randint(1, w) for w in self.widths)

    def uniform(self, budget: float) -> tuple[int, ...]:
        """Uniform width scaling: ``c_l = max(1, round(α·C_l))`` for the largest ``α`` in (0, 1]
        whose FLOPs are ``<= budget`` (bisection on ``α``; FLOPs grow with ``α``).

        Raises:
            ValueError: ``budget`` below the FLOPs of the one-channel encoding.
        """
        budget = self._check_budget(budget)

        def enc(a: float) -> tuple[int, ...]:
            return tuple(max(1, min(w, int(math.floor(a * w + 0.5)))) for w in self.widths)

        if self.flops(self.full) <= budget:
            return self.full
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.flops(enc(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        return enc(lo)

    def _check_budget(self, budget) -> float:
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) \
                or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number of FLOPs, got {budget!r}")
        least = self.flops(self.smallest)
        if budget < least:
            raise ValueError(f"budget {budget!r} FLOPs is below the smallest network of the space "
                             f"(one channel per layer: {least} FLOPs)")
        return float(budget)

    # ------------------------------------------------------------------ networks
    def build(self, encoding=None, *, seed: int | None = None,
              init: str = "kaiming_normal") -> models.ConvNet:
        """The physically smaller plain network of ``encoding`` (default the widest), freshly
        initialised (``init`` of :data:`prunelab.models.INITS`; BN weight 1, bias 0)."""
        c = self.full if encoding is None else self.check(encoding)
        if init not in models.INITS:
            raise ValueError(f"unknown init {init!r}; choose from {', '.join(models.INITS)}")
        _, pools, final = self._geometry()
        d = self.dims
        features: OrderedDict[str, nn.Module] = OrderedDict()
        prev, npool = self.input_shape[0], 0
        for i, (ch, pool) in enumerate(zip(c, pools)):
            features[f"conv{i + 1}"] = _CONV[d](prev, ch, self.kernel, padding=self.kernel // 2,
                                                bias=False)
            features[f"bn{i + 1}"] = _BN[d](ch)
            features[f"act{i + 1}"] = nn.ReLU()
            if pool is not None:
                npool += 1
                k = pool[0] if len(set(pool)) == 1 else pool
                features[f"pool{npool}"] = _POOL[d](kernel_size=k, stride=k)
            prev = ch
        classifier = OrderedDict(flatten=nn.Flatten(),
                                 fc1=nn.Linear(prev * final, self.num_classes))
        net = models.ConvNet(OrderedDict(features=nn.Sequential(features),
                                         classifier=nn.Sequential(classifier)),
                             self.input_shape, self.num_classes)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(_check_seed(seed))
            setattr(net, models.INIT_ATTRIBUTE, init)
            for m in net.modules():
                if isinstance(m, (nn.Linear, *_CONV.values())):
                    models.init_weight_(m.weight, init)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        return net

    def encoding_of(self, model: nn.Module) -> tuple[int, ...]:
        """The encoding of a network built by :meth:`build` (or pruned from one physically)."""
        return self.check([model.get_submodule(n).out_channels for n in self.layers])


def default_space(bundle, *, widths: Sequence[int] = (16, 32, 32, 64),
                  pool_after: Sequence[int] = (2, 4), kernel: int = 3) -> ChannelSpace:
    """The :class:`ChannelSpace` of the notebook's conv net for a data bundle (any object with
    ``input_shape`` and ``num_classes``): four 3x3 convs 16-32-32-64 with pools after the second
    and fourth (8x8 digits -> 2x2, 28x28 Fashion-MNIST -> 7x7)."""
    return ChannelSpace(tuple(bundle.input_shape), int(bundle.num_classes), tuple(widths),
                        tuple(pool_after), kernel)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of every conv and linear layer of ``model`` for one input of ``input_shape``.

    Counted with forward hooks on one zero example (eval mode, modes restored): a conv adds
    ``output elements · (in_channels / groups) · prod(kernel_size)``, a linear layer ``output
    elements · in_features``. BatchNorm, activations, pooling and bias additions are not counted.
    """
    counts: list[int] = []

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            counts.append(out.numel() * module.in_features)
        else:
            counts.append(out.numel() * (module.in_channels // module.groups)
                          * math.prod(module.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    modes = [(m, m.training) for m in model.modules()]
    p = next(model.parameters(), None)
    x = torch.zeros(1, *[int(s) for s in input_shape],
                    device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None else None)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
        for h in handles:
            h.remove()
    return int(sum(counts))


# ============================================================================ PruningNet

class PruningNet(nn.Module):
    """The meta network of MetaPruning (Liu et al. 2019, Sec. 3.1, Fig. 3).

    One block per conv layer and one for the classifier; block ``l`` is two fully-connected
    layers with a ReLU between them, ``(c_{l-1}/C_{l-1}, c_l/C_l) -> hidden -> C_l·C_{l-1}·k^d``,
    whose output is reshaped to the widest layer's weight and cropped to its first ``c_l``
    output and ``c_{l-1}`` input channels (the classifier: the feature columns of the first
    ``c_L`` channels). The input of the first conv and the output of the classifier are fixed,
    so their ratio is 1. The classifier's bias is a plain parameter shared by all encodings.

    BatchNorm has no affine parameters and always normalises with the statistics of the batch in
    :meth:`forward` (the statistics differ per encoding); :meth:`materialize` gives a plain network
    whose BN statistics :func:`recalibrate_bn` recomputes.

    Args:
        space: The :class:`ChannelSpace` whose encodings it generates weights for.
        hidden: Units of each block's hidden layer (the authors use 32).
        seed: Seed of the initialisation (global RNG untouched); None draws from it.

    The last FC layer of a block starts with small weights and a bias drawn like a Kaiming-normal
    weight of the widest layer, so at initialisation every encoding gets (crops of) a standard
    initialisation; training then learns the dependence on the encoding.
    """

    def __init__(self, space: ChannelSpace, *, hidden: int = 32, seed: int | None = 0):
        super().__init__()
        if not isinstance(space, ChannelSpace):
            raise TypeError(f"space must be a ChannelSpace, got {type(space).__name__}")
        self.space = space
        self.hidden = _positive_int(hidden, "hidden")
        _, pools, final = space._geometry()
        self._pools = pools
        self._final = final
        ins = (space.input_shape[0],) + space.widths[:-1]
        self.shapes = [(w, c, *(space.kernel,) * space.dims) for w, c in zip(space.widths, ins)]
        self.shapes.append((space.num_classes, space.widths[-1] * final))
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(_check_seed(seed))
            self.blocks = nn.ModuleList()
            for shape in self.shapes:
                numel = math.prod(shape)
                block = nn.Sequential(nn.Linear(2, self.hidden), nn.ReLU(),
                                      nn.Linear(self.hidden, numel))
                with torch.no_grad():
                    w0 = torch.empty(shape)
                    models.init_weight_(w0, "kaiming_normal")
                    block[2].bias.copy_(w0.reshape(-1))
                    nn.init.normal_(block[2].weight,
                                    std=0.1 * float(w0.std()) / math.sqrt(self.hidden))
                self.blocks.append(block)
            self.bias = nn.Parameter(torch.zeros(space.num_classes))

    def _ratios(self, c: tuple[int, ...]) -> list[tuple[float, float]]:
        s = self.space
        full_in = (s.input_shape[0],) + s.widths
        ins = (s.input_shape[0],) + c
        outs = list(zip(c, s.widths)) + [(s.num_classes, s.num_classes)]
        return [(ins[i] / full_in[i], o / top) for i, (o, top) in enumerate(outs)]

    def generate(self, encoding) -> OrderedDict[str, Tensor]:
        """The weights of the network of ``encoding``, keyed like the state dict of
        ``space.build(encoding)`` (``features.conv1.weight`` ... ``classifier.fc1.weight`` and
        ``classifier.fc1.bias``); differentiable with respect to the PruningNet.

        Raises:
            ValueError: A bad encoding (naming the layer).
        """
        c = self.space.check(encoding)
        p = self.bias
        ratios = torch.tensor(self._ratios(c), device=p.device, dtype=p.dtype)
        out: OrderedDict[str, Tensor] = OrderedDict()
        ins = (self.space.input_shape[0],) + c
        for i, (block, shape) in enumerate(zip(self.blocks, self.shapes)):
            full = block(ratios[i]).reshape(shape)
            if i < len(c):
                out[f"{self.space.layers[i]}.weight"] = full[:c[i], :ins[i]]
            else:  # flatten is channel-major: the first c_L channels are the first columns
                cols = full.reshape(shape[0], self.space.widths[-1], self._final)
                out[f"{self.space.classifier}.weight"] = cols[:, :c[-1]].reshape(shape[0], -1)
        out[f"{self.space.classifier}.bias"] = self.bias
        return out

    def forward(self, x: Tensor, encoding) -> Tensor:
        """Logits of the network of ``encoding`` with generated weights; BN uses batch statistics
        (the PruningNet is trained this way, Sec. 3.1)."""
        weights = self.generate(encoding)
        s = self.space
        p = self.bias
        h = x.to(device=p.device, dtype=p.dtype)
        conv, pool = _FCONV[s.dims], _FPOOL[s.dims]
        for i, name in enumerate(s.layers):
            h = conv(h, weights[f"{name}.weight"], padding=s.kernel // 2)
            h = F.relu(F.batch_norm(h, None, None, training=True))
            if self._pools[i] is not None:
                k = self._pools[i] if s.dims == 2 else self._pools[i][0]
                h = pool(h, kernel_size=k, stride=k)
        return F.linear(h.flatten(1), weights[f"{s.classifier}.weight"],
                        weights[f"{s.classifier}.bias"])

    @torch.no_grad()
    def materialize(self, encoding) -> models.ConvNet:
        """The physically smaller plain network of ``encoding`` (``space.build``) holding the
        generated weights (copies), on the PruningNet's device and dtype, in eval mode. Its BN
        has weight 1, bias 0 and fresh running statistics: call :func:`recalibrate_bn` before
        evaluating it."""
        net = self.space.build(encoding, seed=0)
        p = self.bias
        net.to(device=p.device, dtype=p.dtype)
        state = net.state_dict()
        for k, v in self.generate(encoding).items():
            state[k] = v.detach().clone()
        net.load_state_dict(state)
        return net.eval()


# ============================================================================ BN recalibration

def _xy(data) -> tuple[Tensor, Tensor]:
    """(x, y) tensors from a (x, y) pair, a TensorDataset or any map-style Dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], torch.as_tensor(data[1])
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    if isinstance(data, Dataset):
        xs, ys = zip(*(data[i] for i in range(len(data))))
        return torch.stack(xs), torch.as_tensor(ys)
    raise TypeError(f"expected (x, y) tensors or a torch Dataset, got {type(data).__name__}")


def _inputs(data) -> Tensor:
    """The inputs of ``x``, ``(x, y)`` or a Dataset."""
    return data if isinstance(data, Tensor) else _xy(data)[0]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, *, batch_size: int = 100, inplace: bool = False
                   ) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``model`` on ``data``.

    The running statistics are reset and re-estimated as the exact average over the batches of
    ``data`` (``momentum=None``: the cumulative moving average), forward passes in train mode
    without gradients; MetaPruning recomputes them per candidate before evaluating it (Liu et
    al. 2019, Sec. 3.2: the weights come from the PruningNet, the statistics must match the
    candidate). Nothing else changes.

    Args:
        model: Any module; modified only with ``inplace=True``.
        data: Inputs ``x``, ``(x, y)`` or a Dataset; all of it is used.
        batch_size: Examples per forward pass.

    Returns:
        The recalibrated model (a copy unless ``inplace``), in eval mode.
    """
    net = model if inplace else copy.deepcopy(model)
    x = _inputs(data)
    if len(x) == 0:
        raise ValueError("data for BN recalibration is empty")
    bns = [m for m in net.modules() if isinstance(m, _BN_TYPES)]
    saved = [(m, m.momentum) for m in bns]
    modes = [(m, m.training) for m in net.modules()]
    p = next(net.parameters())
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        net.train()
        for i in range(0, len(x), batch_size):
            net(x[i:i + batch_size].to(device=p.device, dtype=p.dtype))
    finally:
        for m, mom in saved:
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return net.eval()


@torch.no_grad()
def candidate_fitness(pnet: PruningNet, encoding, *, calib, val,
                      batch_size: int = 1000) -> dict[str, float]:
    """Validation accuracy and mean cross-entropy of ``encoding`` with PruningNet-generated
    weights after BN recalibration on ``calib`` (the fitness of the evolutionary search, Liu et
    al. Sec. 3.2; the loss only breaks ties in accuracy).

    Returns:
        ``{"accuracy": float, "loss": float}``.
    """
    net = recalibrate_bn(pnet.materialize(encoding), calib, inplace=True)
    p = pnet.bias
    x, y = _xy(val)
    correct, total = 0, 0.0
    for i in range(0, len(y), batch_size):
        out = net(x[i:i + batch_size].to(device=p.device, dtype=p.dtype))
        yb = y[i:i + batch_size].to(out.device)
        correct += int((out.argmax(1) == yb).sum())
        total += float(F.cross_entropy(out, yb, reduction="sum"))
    n = max(len(y), 1)
    return {"accuracy": correct / n, "loss": total / n}


def candidate_accuracy(pnet: PruningNet, encoding, *, calib, val,
                       batch_size: int = 1000) -> float:
    """The accuracy of :func:`candidate_fitness`: validation accuracy with generated weights
    after BN recalibration (Liu et al. Sec. 3.2)."""
    return candidate_fitness(pnet, encoding, calib=calib, val=val,
                             batch_size=batch_size)["accuracy"]


# ============================================================================ training

class _Sampled(nn.Module):
    """The PruningNet behind a plain ``model(x)`` call: a new random encoding per call, so that
    :func:`prunelab.train.fit` trains it with one random encoding per mini-batch."""

    def __init__(self, pnet: PruningNet, sample: Callable[[], tuple[int, ...]]):
        super().__init__()
        self.pnet = pnet
        self.sample = sample

    def forward(self, x: Tensor) -> Tensor:
        return self.pnet(x, self.sample())


def train_pruningnet(pnet: PruningNet, data, *, recipe: train.Recipe, seed: int = 0,
                     encoding=None, progress: bool = True) -> train.FitResult:
    """Train the PruningNet in place, one random encoding per mini-batch (Liu et al. Sec. 3.1).

    Each mini-batch draws every ``c_l`` uniformly from ``1..C_l`` (stochastic structure
    sampling) from a generator seeded with ``seed``; ``encoding`` fixes one encoding instead
    (e.g. ``space.full``: then the PruningNet trains one network). The loop is
    :func:`prunelab.train.fit` (its data order is also seeded with ``seed``), so the result,
    progress bar and interrupt behaviour are those of ``fit``: on a Jupyter Interrupt the weights
    reached so far stay and ``result.interrupted`` is set.

    Returns:
        :class:`prunelab.train.FitResult` whose ``model`` is the PruningNet.
    """
    seed = _check_seed(seed)
    if encoding is not None:
        fixed = pnet.space.check(encoding)

        def sample() -> tuple[int, ...]:
            return fixed
    else:
        rng = random.Random(seed)

        def sample() -> tuple[int, ...]:
            return pnet.space.random(rng)

    x, y = _xy(data)
    result = train.fit(_Sampled(pnet, sample), (x, y), recipe=recipe, seed=seed,
                       progress=progress, desc="PruningNet")
    result.model = pnet
    return result


# ============================================================================ evolutionary search

@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        best: The most accurate encoding evaluated (None only if interrupted before any).
        best_accuracy: Its validation accuracy with generated weights.
        budget: The FLOPs budget; every evaluated candidate satisfies ``flops <= budget``.
        history: Tidy frame, one row per evaluated candidate: ``generation, origin`` (random,
            mutation, crossover), ``encoding`` (tuple), one column per layer, ``flops,
            accuracy``.
        generations: One row per completed generation: ``generation, best_accuracy`` (top-1 so
            far), ``generation_best, generation_mean, evaluated, seconds``.
        population: ``(encoding, accuracy)`` of the last generation evaluated, best first; after
            an interrupt, the part of the running generation evaluated so far.
        top: The top-K ``(encoding, accuracy)`` over everything evaluated, best first.
        interrupted: True when a KeyboardInterrupt stopped the search (the caller may re-raise).
        seconds: Wall time of the search.
    """

    best: tuple[int, ...] | None
    best_accuracy: float
    budget: float
    history: object
    generations: object
    population: list
    top: list
    interrupted: bool = False
    seconds: float = 0.0


def search(pnet: PruningNet, budget: float, *, calib, val, population: int = 50,
           top_k: int = 10, mutations: int = 25, crossovers: int = 25, generations: int = 20,
           mutation_prob: float = 0.1, seed: int = 0, max_tries: int = 10000,
           progress: bool = True) -> SearchResult:
    """Evolutionary search for the most accurate encoding with ``FLOPs <= budget``.

    Liu et al. 2019, Sec. 3.2 and Algorithm 1: ``G_0`` = ``population`` random encodings that
    satisfy the constraint; for each of ``generations`` iterations every new candidate is
    evaluated (:func:`candidate_fitness`: generated weights, BN recalibrated on ``calib``,
    accuracy on ``val``; ties in accuracy go to the lower validation loss), the top-``top_k``
    of all candidates so far become the parents,
    ``mutations`` children re-draw each gene of a random parent with probability
    ``mutation_prob`` and ``crossovers`` children take each gene from one of two random parents;
    a child over the budget, or already evaluated, is rejected and drawn again (at most
    ``max_tries`` draws per child). As in the authors' code, random candidates fill the
    population up when mutation and crossover fall short. Returns the top-1.

    Every candidate evaluated, and so the one returned, satisfies ``flops <= budget``.

    Interrupt: a KeyboardInterrupt (Jupyter's Interrupt) stops the search and returns what it
    has -- ``interrupted=True``, the candidates evaluated so far in ``history``/``population``/
    ``top`` and the best of them. The caller decides whether to re-raise::

        res = search(...)
        if res.interrupted:
            raise KeyboardInterrupt  # or keep res.population and continue

    Args:
        pnet: A trained :class:`PruningNet` (not modified).
        budget: Maximum FLOPs (multiply-adds, :meth:`ChannelSpace.flops`).
        calib: Training inputs ``x`` / ``(x, y)`` for BN recalibration (a few batches).
        val: ``(x, y)`` validation data for the fitness.
        population, top_k, mutations, crossovers, generations: Algorithm 1's P, K, M, S, N.
        mutation_prob: Probability of re-drawing each gene in a mutation.
        seed: Seed of all random draws; the same seed gives the same search.
        max_tries: Draws allowed for one candidate before giving up on it.
        progress: Progress bar over generations (tqdm.auto).

    Raises:
        ValueError: Bad settings, or a budget below the smallest network, or no random
            candidate within ``max_tries`` draws.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    space = pnet.space
    budget = space._check_budget(budget)
    for name, v in (("population", population), ("top_k", top_k), ("generations", generations),
                    ("max_tries", max_tries)):
        _positive_int(v, name)
    for name, v in (("mutations", mutations), ("crossovers", crossovers)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if isinstance(mutation_prob, bool) or not isinstance(mutation_prob, numbers.Real) \
            or not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob must be in [0, 1], got {mutation_prob!r}")
    rng = random.Random(_check_seed(seed))
    x_val, y_val = _xy(val)
    calib_x = _inputs(calib)

    seen: dict[tuple[int, ...], tuple[float, float]] = {}  # encoding -> (accuracy, loss)
    rows: list[dict] = []
    gen_rows: list[dict] = []
    top: list[tuple[tuple[int, ...], float]] = []
    current: list[tuple[tuple[int, ...], float]] = []
    pending: set[tuple[int, ...]] = set()

    def ranked() -> list[tuple[tuple[int, ...], float]]:
        # top-K over every candidate so far (the authors keep a global top-K); ties in accuracy,
        # common on small validation sets, go to the lower validation loss, then the encoding
        order = sorted(seen.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[0]))[:top_k]
        return [(c, acc) for c, (acc, _) in order]

    def ok(c: tuple[int, ...]) -> bool:
        return c not in seen and c not in pending and space.flops(c) <= budget

    def draw(make: Callable[[], tuple[int, ...]]) -> tuple[int, ...] | None:
        for _ in range(max_tries):
            c = make()
            if ok(c):
                pending.add(c)
                return c
        return None

    def random_child() -> tuple[int, ...]:
        return space.random(rng)

    def mutate() -> tuple[int, ...]:
        parent = rng.choice(top)[0]
        return tuple(rng.randint(1, w) if rng.random() < mutation_prob else g
                     for g, w in zip(parent, space.widths))

    def cross() -> tuple[int, ...]:
        a, b = rng.choice(top)[0], rng.choice(top)[0]
        return tuple(ga if rng.random() < 0.5 else gb for ga, gb in zip(a, b))

    interrupted = False
    t0 = time.perf_counter()
    bar = tqdm(total=generations, desc="search", disable=not progress, leave=False)
    try:
        for g in range(generations):
            pending.clear()
            children: list[tuple[tuple[int, ...], str]] = []
            if top:
                for _ in range(mutations):
                    c = draw(mutate)
                    if c is not None:
                        children.append((c, "mutation"))
                for _ in range(crossovers):
                    c = draw(cross)
                    if c is not None:
                        children.append((c, "crossover"))
            while len(children) < population:
                c = draw(random_child)
                if c is None:
                    if not seen and not children:
                        raise ValueError(
                            f"no random encoding within budget {budget:g} FLOPs after "
                            f"{max_tries} draws (the widest net has {space.flops()} FLOPs); "
                            "raise the budget or max_tries")
                    break
                children.append((c, "random"))
            current = []
            for c, origin in children:
                fit = candidate_fitness(pnet, c, calib=calib_x, val=(x_val, y_val))
                seen[c] = (fit["accuracy"], fit["loss"])
                current.append((c, fit["accuracy"]))
                rows.append({"generation": g, "origin": origin, "encoding": c,
                             **dict(zip(space.layers, c)), "flops": space.flops(c),
                             "accuracy": fit["accuracy"], "loss": fit["loss"]})
            top = ranked()
            accs = [a for _, a in current]
            gen_rows.append({"generation": g, "best_accuracy": top[0][1],
                             "generation_best": max(accs) if accs else float("nan"),
                             "generation_mean": sum(accs) / len(accs) if accs else float("nan"),
                             "evaluated": len(seen), "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(best=f"{top[0][1]:.3f}")
    except KeyboardInterrupt:
        interrupted = True
        top = ranked()
    finally:
        bar.close()
    history = pd.DataFrame(rows, columns=["generation", "origin", "encoding", *space.layers,
                                          "flops", "accuracy", "loss"])
    generations_frame = pd.DataFrame(gen_rows, columns=["generation", "best_accuracy",
                                                        "generation_best", "generation_mean",
                                                        "evaluated", "seconds"])
    best, best_acc = (top[0] if top else (None, float("nan")))
    return SearchResult(best=best, best_accuracy=best_acc, budget=budget, history=history,
                        generations=generations_frame,
                        population=sorted(current, key=lambda kv: -kv[1]), top=list(top),
                        interrupted=interrupted, seconds=time.perf_counter() - t0)


def build_pruned(pnet: PruningNet, encoding, *, init: str = "generated", calib=None,
                 seed: int = 0) -> models.ConvNet:
    """The network of ``encoding``, physically smaller, ready to be fine-tuned.

    ``init="generated"`` (default): the PruningNet's generated weights (MetaPruning's weights
    after the search), with BN statistics recalibrated on ``calib`` when given.
    ``init="scratch"``: a fresh initialisation of the same architecture (seed ``seed``), to be
    trained from scratch.
    """
    if init == "generated":
        net = pnet.materialize(encoding)
        return recalibrate_bn(net, calib, inplace=True) if calib is not None else net
    if init == "scratch":
        p = pnet.bias
        return pnet.space.build(encoding, seed=seed).to(device=p.device, dtype=p.dtype)
    raise ValueError(f"init must be 'generated' or 'scratch', got {init!r}")


def channel_prune(model: nn.Module, space: ChannelSpace, encoding, *,
                  criterion: str = "lap-l1") -> nn.Module:
    """Channel pruning of a trained widest network of ``space`` down to ``encoding``.

    In layer ``l`` the ``C_l - c_l`` channels with the lowest structured score are removed
    physically (:func:`prunelab.structured.score`, e.g. LAP-ℓ1 / MP-ℓ1 of Park et al. 2020,
    App. H; removal by :func:`prunelab.units.prune` with ``physical=True``), so the result has
    exactly the architecture and FLOPs of ``encoding``. ``model`` is not modified.
    """
    c = space.check(encoding)
    have = space.encoding_of(model)
    if have != space.full:
        raise ValueError(f"model has channels {have}, expected the widest network {space.full}")
    scores = structured.score(model, criterion, layers=space.layers)
    counts = {name: top - k for name, top, k in zip(space.layers, space.widths, c)}
    return units.prune(model, count=counts, score=criterion, unit_scores=scores,
                       physical=True).model


# ============================================================================ comparison

METHODS = ("metapruning", "uniform", "lap-l1", "mp-l1")


@dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        frame: Tidy, one row per (method, budget, seed): ``method, budget`` (fraction of the
            dense FLOPs), ``budget_flops, seed, flops, flops_fraction, encoding`` (str),
            ``params, accuracy`` (test), ``val_accuracy, seconds``; ``dense`` rows (budget 1)
            hold the widest trained net.
        searches: One row per (seed, budget, generation) of the searches (``best_accuracy``
            ...).
        timings: One row per (seed, step): ``step`` (dense, pruningnet, search@budget, ...)
            and ``seconds``.
        interrupted: True when a KeyboardInterrupt stopped the comparison; the frames hold the
            rows finished before it.
    """

    frame: object
    searches: object
    timings: object
    interrupted: bool = False

    def summary(self):
        """Mean ± std of the test accuracy per method × budget (:func:`summary`)."""
        return summary(self.frame)


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def compare(bundle, *, space: ChannelSpace | None = None,
            budgets: Sequence[float] = (0.25, 0.4, 0.6), seeds: Sequence[int] = (0, 1, 2),
            dense_recipe: train.Recipe | None = None,
            pruningnet_recipe: train.Recipe | None = None,
            finetune_recipe: train.Recipe | None = None, search_kwargs: dict | None = None,
            methods: Sequence[str] = METHODS, init: str = "generated", calib_size: int = 300,
            hidden: int = 32, progress: bool = True) -> Comparison:
    """MetaPruning vs uniform width scaling vs LAP-ℓ1 / MP-ℓ1 channel pruning at equal FLOPs.

    Per seed: the widest net of ``space`` is trained from scratch with ``dense_recipe``; a
    PruningNet is trained with ``pruningnet_recipe``. Per budget ``b`` (a fraction of the dense
    FLOPs, budget ``B = b · FLOPs(widest)``):

    - ``metapruning``: :func:`search` under ``B`` (fitness on ``bundle.val``, BN recalibrated on
      ``calib_size`` training examples), the best encoding built physically smaller from the
      generated weights (``init="generated"``) and fine-tuned with ``finetune_recipe``, or
      trained from scratch with ``dense_recipe`` (``init="scratch"``);
    - ``uniform``: :meth:`ChannelSpace.uniform` (the largest uniform width multiplier within
      ``B``) trained from scratch with ``dense_recipe``;
    - ``lap-l1`` / ``mp-l1``: the trained dense net pruned channel-wise to the same uniform
      encoding (same fraction of channels in every layer, as Park et al. App. H; FLOPs <= B) by
      the criterion's scores (:func:`channel_prune`), then fine-tuned with ``finetune_recipe``.

    Accuracy is on ``bundle.test``. Randomness comes from the seed (bit-identical on the CPU).
    A KeyboardInterrupt returns the rows finished so far with ``interrupted=True``.
    """
    import pandas as pd

    space = space or default_space(bundle)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid names: {', '.join(METHODS)}")
    if init not in ("generated", "scratch"):
        raise ValueError(f"init must be 'generated' or 'scratch', got {init!r}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 < b <= 1.0:
            raise ValueError(f"budgets are fractions of the dense FLOPs in (0, 1], got {b!r}")
    dense_recipe = dense_recipe or train.Recipe(epochs=30, batch_size=64, lr=2e-3)
    pruningnet_recipe = pruningnet_recipe or dense_recipe.replace(epochs=3 * dense_recipe.epochs)
    finetune_recipe = finetune_recipe or dense_recipe.replace(epochs=max(1, dense_recipe.epochs
                                                                         // 3), lr=5e-4)
    search_kwargs = dict(search_kwargs or {})
    search_kwargs.setdefault("progress", False)
    full = space.flops()
    trn, val, test = (_xy(getattr(bundle, s)) for s in ("train", "val", "test"))
    calib = trn[0][:calib_size]
    rows, srows, trows = [], [], []

    class _Stop(Exception):
        pass

    def fit(net, recipe, seed, desc):
        r = train.fit(net, trn, recipe=recipe, seed=seed, progress=progress, desc=desc)
        if r.interrupted:
            raise _Stop
        return net

    def record(method, b, seed, net, seconds):
        enc = space.encoding_of(net)
        flops = count_flops(net, space.input_shape)
        rows.append({"method": method, "budget": float(b), "budget_flops": int(b * full),
                     "seed": seed, "flops": flops, "flops_fraction": flops / full,
                     "encoding": "-".join(map(str, enc)), "params": _params(net),
                     "accuracy": train.evaluate(net, test)["accuracy"],
                     "val_accuracy": train.evaluate(net, val)["accuracy"], "seconds": seconds})

    interrupted = False
    try:
        for seed in seeds:
            t = time.perf_counter()
            dense = fit(space.build(seed=seed), dense_recipe, seed, f"dense s{seed}")
            trows.append({"seed": seed, "step": "dense", "seconds": time.perf_counter() - t})
            record("dense", 1.0, seed, dense, trows[-1]["seconds"])
            pnet = None
            if "metapruning" in methods:
                t = time.perf_counter()
                pnet = PruningNet(space, hidden=hidden, seed=seed)
                r = train_pruningnet(pnet, trn, recipe=pruningnet_recipe, seed=seed,
                                     progress=progress)
                if r.interrupted:
                    raise _Stop
                trows.append({"seed": seed, "step": "pruningnet",
                              "seconds": time.perf_counter() - t})
            for b in budgets:
                B = b * full
                uni = space.uniform(B)
                if "metapruning" in methods:
                    t = time.perf_counter()
                    res = search(pnet, B, calib=calib, val=val, seed=seed, **search_kwargs)
                    if res.interrupted:
                        raise _Stop
                    s_sec = time.perf_counter() - t
                    trows.append({"seed": seed, "step": f"search@{b:g}", "seconds": s_sec})
                    srows.append(res.generations.assign(seed=seed, budget=float(b)))
                    t = time.perf_counter()
                    net = build_pruned(pnet, res.best, init=init, calib=calib, seed=seed)
                    recipe = finetune_recipe if init == "generated" else dense_recipe
                    fit(net, recipe, seed, f"metapruning {b:g}")
                    record("metapruning", b, seed, net, s_sec + time.perf_counter() - t)
                if "uniform" in methods:
                    t = time.perf_counter()
                    net = fit(space.build(uni, seed=seed), dense_recipe, seed, f"uniform {b:g}")
                    record("uniform", b, seed, net, time.perf_counter() - t)
                for crit in ("lap-l1", "mp-l1"):
                    if crit in methods:
                        t = time.perf_counter()
                        net = fit(channel_prune(dense, space, uni, criterion=crit),
                                  finetune_recipe, seed, f"{crit} {b:g}")
                        record(crit, b, seed, net, time.perf_counter() - t)
    except (KeyboardInterrupt, _Stop):
        interrupted = True
    frame = pd.DataFrame(rows, columns=["method", "budget", "budget_flops", "seed", "flops",
                                        "flops_fraction", "encoding", "params", "accuracy",
                                        "val_accuracy", "seconds"])
    searches = (pd.concat(srows, ignore_index=True) if srows else
                pd.DataFrame(columns=["generation", "best_accuracy", "seed", "budget"]))
    timings = pd.DataFrame(trows, columns=["seed", "step", "seconds"])
    return Comparison(frame, searches, timings, interrupted)


def summary(frame, *, value: str = "accuracy"):
    """Mean ± std over seeds of ``value`` (and of the FLOPs fraction) per method × budget.

    Returns:
        Frame with columns ``method, budget, n, mean, std, flops_fraction, text`` (``text`` =
        ``"mean ± std"``), sorted by budget then method.
    """
    g = frame.groupby(["method", "budget"], sort=False)
    out = g[value].agg(["count", "mean", "std"]).rename(columns={"count": "n"}).reset_index()
    out["flops_fraction"] = g["flops_fraction"].mean().to_numpy()
    out["std"] = out["std"].fillna(0.0)
    out["text"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(out["mean"], out["std"])]
    return out.sort_values(["budget", "method"], kind="stable").reset_index(drop=True)
