"""The architectures of the source papers, built for any dataset shape.

``build(name, bundle)`` returns a freshly initialised ``nn.Module`` for a registered architecture;
``names()`` lists the registry. A *bundle* is any object with ``input_shape`` (no batch dimension)
and ``num_classes`` -- normally a :mod:`prunelab.data` bundle, but this module never imports it.

Sources (``/work/shared/seeds``):

* LAP  -- Park et al., *Lookahead: a far-sighted alternative of magnitude-based pruning*,
  ICLR 2020, Sec. 3 and App. A: FCN, Conv-6, VGG-{11,16,19} (+BN, one FC), ResNet-18, WRN-16-8.
* MRP  -- *Mean Replacement Pruning*, ICLR 2019 submission, App. 6.3: small_conv, medium_conv,
  vgg_11.
* LM   -- *Revisiting Loss Modelling for Unstructured Pruning*, App. B: MLP 784-300-100-10 tanh,
  BN-free VGG11, PreActResNet18.

Besides them, ``vit`` is a small ViT-style transformer (Round 2: a transformer next to the MLP in
the notebooks), written with ``nn.Linear`` query/key/value/out projections like HuggingFace's.

Every other model is an ``nn.Sequential`` (subclass) of named children made of standard layers
(``nn.Linear``, ``nn.Conv1d/2d``, ``nn.BatchNorm1d/2d``, ``nn.MaxPool1d/2d``,
``nn.AdaptiveAvgPool1d/2d``, ``nn.Flatten``, activation modules with ``inplace=False``), with no
data-dependent control flow, so ``torch.fx.symbolic_trace`` works and forward hooks see every
activation. Inputs of shape ``(C, L)`` get the ``Conv1d``/``BatchNorm1d``/``MaxPool1d`` version of
the convolutional models; ``(C, H, W)`` the 2-D one.

Shape adaptation (only bites below the papers' resolutions, e.g. 8x8 digits): while a model is
built a zero tensor is pushed through it (a dry run under ``torch.no_grad``, BN in eval mode), and

1. a 2x2 max-pool is dropped along any axis whose extent is already 1 (it is never pooled below
   size 1; a pool with nothing left to pool is omitted altogether);
2. an unpadded ("valid") convolution whose input is smaller than its kernel along an axis gets
   "same" zero padding, ``(k - 1) // 2``, along that axis;
3. fixed-flatten classifiers (Conv-6, LeNet-5, small/medium_conv, VGG) take their input width from
   the dry run; the residual nets end in adaptive average pooling to size 1.

At 28x28, 32x32 and length 40 rules 1-2 never fire, so those shapes get the papers' networks
(e.g. VGG on length 40 pools 40 -> 20 -> 10 -> 5 -> 2 -> 1 with all five pools). Consequently
every model accepts any ``(C, L)``/``(C, H, W)`` with all sizes >= 1; other shapes raise
``ValueError``.

Initialisation (biases 0, BatchNorm weight 1 / bias 0):

* ``"glorot_normal"`` (``nn.init.xavier_normal_``) for mlp, fcn, conv6, lenet5, small_conv,
  medium_conv and the BN VGGs: LAP App. A says Glorot & Bengio (2010) for all but ResNets/WRN,
  and the LAP authors' code draws it with ``xavier_normal_``; MRP and the LM MLP give no variant.
* ``"kaiming_normal"`` (``nn.init.kaiming_normal_``, fan-in, ReLU gain; He et al. 2015) for
  resnet18, preact_resnet18, wrn16_8 (LAP: "except for ResNets and WRN") and vgg11_nobn
  (LM App. B: "VGG11 and PreActResNet18 are initialized following He et al. (2015)").

Every constructor takes ``init=`` to override this, ``activation=`` and ``width=`` (a multiplier of
all hidden widths/channels).

Over 500 lines because the eleven architectures of the papers each need their own
constructor; they share the init, width and shape checks above.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MODELS",
    "PRUNABLE_TYPES",
    "BasicBlock",
    "ConvNet",
    "MLP",
    "PreActBlock",
    "ResNet",
    "Transformer",
    "build",
    "count_parameters",
    "names",
]



def __dir__():
    return sorted(__all__)

Padding = Literal["valid", "same"]

#: Activation names accepted by every constructor's ``activation=``.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
#: Initialisation schemes accepted by every constructor's ``init=``.
INITS: tuple[str, ...] = ("glorot_normal", "glorot_uniform", "kaiming_normal")
#: Layer types whose ``weight`` counts as prunable.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_GAP: dict[int, type[nn.Module]] = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --------------------------------------------------------------------------------------------
# Model classes: thin nn.Sequential subclasses, so the type says which family a model belongs to.
# --------------------------------------------------------------------------------------------
class _Model(nn.Sequential):
    """Sequential of named children that remembers the shapes it was built for."""

    input_shape: tuple[int, ...]
    num_classes: int

    def __init__(self, layers: OrderedDict[str, nn.Module], input_shape: tuple[int, ...],
                 num_classes: int) -> None:
        super().__init__(layers)
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)


class MLP(_Model):
    """Fully connected network: ``flatten -> (fc, act)* -> fc``."""


class ConvNet(_Model):
    """Plain convolutional network: ``features`` (conv/BN/act/pool) then ``classifier``."""


class ResNet(_Model):
    """Residual network: ``stem -> layer1 .. layerN -> head`` (global average pool, one fc)."""


class BasicBlock(nn.Module):
    """Post-activation basic block of He et al. (2016a), CIFAR variant.

    ``conv3x3-BN-act-conv3x3-BN``, added to the shortcut (identity, or 1x1 conv + BN when the
    shape changes), then ``act``.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: int,
                 activation: str) -> None:
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.act1 = _activation(activation)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(OrderedDict(
                conv=conv(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=bn(out_channels),
            ))
        else:
            self.shortcut = nn.Identity()
        self.act2 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        out = self.shortcut(x) + residual
        return self.act2(out)


class PreActBlock(nn.Module):
    """Pre-activation block of He et al. (2016b); with dropout, the WRN block.

    ``BN-act-conv3x3-BN-act-[dropout]-conv3x3`` plus the shortcut. The stride sits on the first
    conv. An identity shortcut takes the raw input ``x``; a projection shortcut (1x1 conv, used when
    the shape changes) takes the pre-activated input, as in He et al. (2016b) and Zagoruyko &
    Komodakis (2016). Which one is fixed at construction (``preactivated_shortcut``), so the traced
    graph is static.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: int,
                 activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        self.bn1 = bn(in_channels)
        self.act1 = _activation(activation)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.act2 = _activation(activation)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.preactivated_shortcut = stride != 1 or in_channels != out_channels
        if self.preactivated_shortcut:
            self.shortcut: nn.Module = conv(in_channels, out_channels, 1, stride=stride,
                                            bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        identity = pre if self.preactivated_shortcut else x
        residual = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(pre)))))
        out = self.shortcut(identity) + residual
        return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose from {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def _scale(n: int, width: float) -> int:
    """``n`` units scaled by the width multiplier, at least 1."""
    return max(1, int(round(n * width)))


def _check_args(name: str, input_shape: Iterable[int], num_classes: int, *, spatial: bool,
                width: float = 1.0, init: str = "glorot_normal") -> tuple[int, ...]:
    """Validate the common constructor arguments; return ``input_shape`` as a tuple of ints."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"{name}: input_shape must be a tuple of ints, got {input_shape!r}") \
            from None
    if spatial:
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(
                f"{name}: cannot take input_shape {shape}; it needs (C, L) for 1-D signals or "
                f"(C, H, W) for images with every size >= 1 (minimum (1, 1) or (1, 1, 1))"
            )
    elif len(shape) < 1 or min(shape) < 1:
        raise ValueError(
            f"{name}: cannot take input_shape {shape}; it needs at least one dimension and every "
            f"size >= 1 (minimum (1,))"
        )
    if int(num_classes) < 1:
        raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"{name}: width must be > 0, got {width}")
    if init not in INITS:
        raise ValueError(f"{name}: unknown init {init!r}; choose from {', '.join(INITS)}")
    return shape


class _DryRun:
    """Collects layers while pushing a zero example through them to track the activation shape."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        self.dims = len(input_shape) - 1
        self.x = torch.zeros(1, *input_shape)
        self.layers: OrderedDict[str, nn.Module] = OrderedDict()
        self._counts: dict[str, int] = {}

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[2:])

    @property
    def numel(self) -> int:
        return int(self.x[0].numel())

    def add(self, prefix: str, module: nn.Module) -> None:
        """Append ``module`` as ``{prefix}{k}`` (k counts per prefix) and run the dry example."""
        k = self._counts[prefix] = self._counts.get(prefix, 0) + 1
        self.layers[f"{prefix}{k}"] = module
        training = module.training
        module.eval()
        with torch.no_grad():
            self.x = module(self.x)
        module.train(training)

    def conv(self, out_channels: int, kernel: int, padding: Padding, bias: bool = True) -> None:
        """Stride-1 conv; a "valid" conv gets "same" padding on axes smaller than its kernel."""
        same = (kernel - 1) // 2
        pads = tuple(same if padding == "same" or n < kernel else 0 for n in self.spatial)
        pad: int | tuple[int, ...] = pads[0] if len(set(pads)) == 1 else pads
        self.add("conv", _CONV[self.dims](self.channels, out_channels, kernel, padding=pad,
                                          bias=bias))

    def maxpool(self) -> None:
        """2x2 (or 2) max-pool, dropped along axes of extent 1, omitted when nothing is left."""
        kernels = tuple(2 if n >= 2 else 1 for n in self.spatial)
        if max(kernels) == 1:
            return
        k: int | tuple[int, ...] = kernels[0] if len(set(kernels)) == 1 else kernels
        self.add("pool", _MAXPOOL[self.dims](kernel_size=k, stride=k))


def _conv_features(run: _DryRun, cfg: Sequence[int | tuple[int, int] | str], *, width: float,
                   padding: Padding, bn: bool, activation: str, bias: bool = True) -> nn.Sequential:
    """Feature extractor from a VGG-style config: ``c`` or ``(c, k)`` = conv, ``"M"`` = max-pool."""
    for item in cfg:
        if item == "M":
            run.maxpool()
            continue
        channels, kernel = item if isinstance(item, tuple) else (item, 3)
        run.conv(_scale(int(channels), width), int(kernel), padding, bias=bias)
        if bn:
            run.add("bn", _BN[run.dims](run.channels))
        run.add("act", _activation(activation))
    return nn.Sequential(run.layers)


def _fc_stack(in_features: int, hidden: Sequence[int], num_classes: int,
              activation: str) -> OrderedDict[str, nn.Module]:
    """``fc1, act1, ..., fc{n}``: the hidden layers then the output layer."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    sizes = [in_features, *hidden]
    for i in range(len(hidden)):
        layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1])
        layers[f"act{i + 1}"] = _activation(activation)
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(sizes[-1], num_classes)
    return layers


def init_weight_(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Draw a Linear/Conv weight in place by ``scheme`` (one of :data:`INITS`)."""
    if scheme == "glorot_normal":
        return nn.init.xavier_normal_(weight)
    if scheme == "glorot_uniform":
        return nn.init.xavier_uniform_(weight)
    if scheme == "kaiming_normal":
        return nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
    raise ValueError(f"unknown init {scheme!r}; choose from {', '.join(INITS)}")


#: Attribute set on every built model: the name of its weight initialiser (read by
#: :func:`prunelab.masks.reinitialize` to re-draw weights from the same distribution).
INIT_ATTRIBUTE = "prunelab_init"


def _init_weights(model: nn.Module, scheme: str) -> None:
    """Weights of Linear/Conv by ``scheme``, their biases 0; BatchNorm weight 1, bias 0."""
    setattr(model, INIT_ATTRIBUTE, scheme)
    for m in model.modules():
        if isinstance(m, PRUNABLE_TYPES):
            init_weight_(m.weight, scheme)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BN_TYPES) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _convnet(name: str, input_shape: Iterable[int], num_classes: int, *,
             cfg: Sequence[int | tuple[int, int] | str], hidden: Sequence[int], padding: Padding,
             bn: bool, activation: str, width: float, init: str) -> ConvNet:
    shape = _check_args(name, input_shape, num_classes, spatial=True, width=width, init=init)
    if padding not in ("valid", "same"):
        raise ValueError(f"{name}: padding must be 'valid' or 'same', got {padding!r}")
    run = _DryRun(shape)
    features = _conv_features(run, cfg, width=width, padding=padding, bn=bn,
                              activation=activation)
    classifier = OrderedDict(flatten=nn.Flatten())
    classifier.update(_fc_stack(run.numel, [_scale(h, width) for h in hidden], num_classes,
                                activation))
    model = ConvNet(OrderedDict(features=features, classifier=nn.Sequential(classifier)),
                    shape, num_classes)
    _init_weights(model, init)
    return model


def _mlp(name: str, input_shape: Iterable[int], num_classes: int, *, hidden: Sequence[int],
         activation: str, width: float, init: str) -> MLP:
    shape = _check_args(name, input_shape, num_classes, spatial=False, width=width, init=init)
    layers = OrderedDict(flatten=nn.Flatten())
    layers.update(_fc_stack(math.prod(shape), [_scale(h, width) for h in hidden], num_classes,
                            activation))
    model = MLP(layers, shape, num_classes)
    _init_weights(model, init)
    return model


def _resnet(name: str, input_shape: Iterable[int], num_classes: int, *, preact: bool,
            stem_channels: int, channels: Sequence[int], strides: Sequence[int],
            blocks_per_stage: int, activation: str, dropout: float, width: float,
            init: str) -> ResNet:
    shape = _check_args(name, input_shape, num_classes, spatial=True, width=width, init=init)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    _activation(activation)  # validate early
    dims = len(shape) - 1
    conv, bn = _CONV[dims], _BN[dims]
    stem_out = _scale(stem_channels, width)
    stem: OrderedDict[str, nn.Module] = OrderedDict(
        conv=conv(shape[0], stem_out, 3, stride=1, padding=1, bias=False))
    if not preact:
        stem["bn"] = bn(stem_out)
        stem["act"] = _activation(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(stem))
    in_ch = stem_out
    for i, (c, stride) in enumerate(zip(channels, strides)):
        out_ch = _scale(c, width)
        blocks = []
        for j in range(blocks_per_stage):
            s = stride if j == 0 else 1
            if preact:
                blocks.append(PreActBlock(dims, in_ch, out_ch, s, activation, dropout))
            else:
                blocks.append(BasicBlock(dims, in_ch, out_ch, s, activation))
            in_ch = out_ch
        layers[f"layer{i + 1}"] = nn.Sequential(*blocks)
    head: OrderedDict[str, nn.Module] = OrderedDict()
    if preact:  # pre-activation nets end with BN-act before pooling (He et al. 2016b, WRN)
        head["bn"] = bn(in_ch)
        head["act"] = _activation(activation)
    head["pool"] = _GAP[dims](1)
    head["flatten"] = nn.Flatten()
    head["fc"] = nn.Linear(in_ch, num_classes)
    layers["head"] = nn.Sequential(head)
    model = ResNet(layers, shape, num_classes)
    _init_weights(model, init)
    return model


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------
_VGG_CFG: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def mlp(input_shape: Iterable[int], num_classes: int, *, hidden: Sequence[int] = (300, 100),
        activation: str = "tanh", width: float = 1.0, init: str = "glorot_normal") -> MLP:
    """MLP 784-300-100-10 with tanh (LM paper, App. B "Network Architectures").

    Args:
        input_shape: Input shape without batch dimension; flattened.
        num_classes: Output units.
        hidden: Hidden widths (default the paper's 300, 100).
        activation: ``"tanh"`` (paper), ``"relu"`` or ``"sigmoid"``.
        width: Multiplier of the hidden widths.
        init: Weight initialisation; Glorot as in the LM paper.
    """
    return _mlp("mlp", input_shape, num_classes, hidden=hidden, activation=activation,
                width=width, init=init)


def fcn(input_shape: Iterable[int], num_classes: int, *, hidden: Sequence[int] = (500,) * 4,
        activation: str = "relu", width: float = 1.0, init: str = "glorot_normal") -> MLP:
    """FCN: four hidden layers of 500 units (LAP Sec. 3 and App. A; Fig. 3 varies activation).

    Args:
        input_shape: Input shape without batch dimension; flattened.
        num_classes: Output units.
        hidden: Hidden widths (default 4 x 500).
        activation: ``"relu"`` (paper default), ``"tanh"`` or ``"sigmoid"`` (LAP Sec. 3.1).
        width: Multiplier of the hidden widths.
        init: Weight initialisation; Glorot normal as in LAP App. A and the authors' code.
    """
    return _mlp("fcn", input_shape, num_classes, hidden=hidden, activation=activation,
                width=width, init=init)


def conv6(input_shape: Iterable[int], num_classes: int, *, bn: bool = False,
          activation: str = "relu", width: float = 1.0, init: str = "glorot_normal") -> ConvNet:
    """Conv-6 of Frankle & Carbin (2019), as used in LAP Sec. 3 / App. A.

    Conv3x3 (padding 1) ``64, 64, M, 128, 128, M, 256, 256, M`` then FC ``256, 256, out``; 4096
    flattened features on 32x32. The LAP footnote omits the last pool, but Frankle & Carbin and
    the LAP authors' code have it.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        bn: Add BatchNorm after each conv (not in the paper).
        activation: Activation after every hidden layer.
        width: Multiplier of all channels and hidden units.
        init: Weight initialisation; Glorot normal (LAP App. A).
    """
    return _convnet("conv6", input_shape, num_classes,
                    cfg=[64, 64, "M", 128, 128, "M", 256, 256, "M"], hidden=(256, 256),
                    padding="same", bn=bn, activation=activation, width=width, init=init)


def lenet5(input_shape: Iterable[int], num_classes: int, *, padding: Padding = "valid",
           bn: bool = False, activation: str = "relu", width: float = 1.0,
           init: str = "glorot_normal") -> ConvNet:
    """LeNet-5 (LeCun et al., 1998) with max-pooling and ReLU, as in the LAP authors' code.

    Conv5x5 ``6, M, 16, M`` (unpadded), then FC ``120, 84, out``: 400 features on 32x32, 256 on
    28x28 (pass ``padding="same"`` for the padded-MNIST variant).

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        padding: ``"valid"`` (classic) or ``"same"`` for both convs.
        bn: Add BatchNorm after each conv.
        activation: Activation after every hidden layer.
        width: Multiplier of all channels and hidden units.
        init: Weight initialisation; Glorot normal.
    """
    return _convnet("lenet5", input_shape, num_classes, cfg=[(6, 5), "M", (16, 5), "M"],
                    hidden=(120, 84), padding=padding, bn=bn, activation=activation,
                    width=width, init=init)


def small_conv(input_shape: Iterable[int], num_classes: int, *, padding: Padding = "valid",
               bn: bool = False, activation: str = "relu", width: float = 1.0,
               init: str = "glorot_normal") -> ConvNet:
    """SMALL_CONV of the MRP paper, App. 6.3.

    Conv ``32 (5x5), M, 64 (3x3), M, 128 (3x3), M`` then Dense ``512, 128`` and an output layer.
    App. 6.3 writes "Padding=Same" only for its VGG_11, so these convs are unpadded ("valid",
    TensorFlow's default); on 32x32 that flattens to 128*2*2 = 512, the width of the first Dense.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        padding: ``"valid"`` (default) or ``"same"``.
        bn: Add BatchNorm after each conv.
        activation: Activation after every hidden layer.
        width: Multiplier of all channels and hidden units.
        init: Weight initialisation; Glorot normal.
    """
    return _convnet("small_conv", input_shape, num_classes,
                    cfg=[(32, 5), "M", (64, 3), "M", (128, 3), "M"], hidden=(512, 128),
                    padding=padding, bn=bn, activation=activation, width=width, init=init)


def medium_conv(input_shape: Iterable[int], num_classes: int, *, padding: Padding = "valid",
                bn: bool = False, activation: str = "relu", width: float = 1.0,
                init: str = "glorot_normal") -> ConvNet:
    """MEDIUM_CONV of the MRP paper, App. 6.3 (the network of its Fig. 2).

    Conv ``64 (5x5), M, 128 (3x3), M, 256 (3x3), M`` then Dense ``1024, 256`` and an output layer;
    unpadded like :func:`small_conv` (256*2*2 = 1024 features on 32x32).

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        padding: ``"valid"`` (default) or ``"same"``.
        bn: Add BatchNorm after each conv.
        activation: Activation after every hidden layer.
        width: Multiplier of all channels and hidden units.
        init: Weight initialisation; Glorot normal.
    """
    return _convnet("medium_conv", input_shape, num_classes,
                    cfg=[(64, 5), "M", (128, 3), "M", (256, 3), "M"], hidden=(1024, 256),
                    padding=padding, bn=bn, activation=activation, width=width, init=init)


def _vgg(name: str, input_shape: Iterable[int], num_classes: int, *, bn: bool, activation: str,
         width: float, init: str) -> ConvNet:
    return _convnet(name, input_shape, num_classes, cfg=_VGG_CFG[name], hidden=(),
                    padding="same", bn=bn, activation=activation, width=width, init=init)


def vgg11(input_shape: Iterable[int], num_classes: int, *, bn: bool = True,
          activation: str = "relu", width: float = 1.0, init: str = "glorot_normal") -> ConvNet:
    """VGG-11 for CIFAR as in LAP App. A / App. B: BN after every conv, ONE linear classifier.

    Conv3x3 (padding 1, with bias as in the LAP authors' code), five max-pools, flatten (512 on
    32x32), ``Linear(512, out)``.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        bn: BatchNorm after each conv (LAP: yes).
        activation: Activation after every BN.
        width: Multiplier of all channels.
        init: Weight initialisation; Glorot normal (LAP App. A).
    """
    return _vgg("vgg11", input_shape, num_classes, bn=bn, activation=activation, width=width,
                init=init)


def vgg16(input_shape: Iterable[int], num_classes: int, *, bn: bool = True,
          activation: str = "relu", width: float = 1.0, init: str = "glorot_normal") -> ConvNet:
    """VGG-16 with BN and one linear classifier (LAP App. A, App. B). Arguments as :func:`vgg11`."""
    return _vgg("vgg16", input_shape, num_classes, bn=bn, activation=activation, width=width,
                init=init)


def vgg19(input_shape: Iterable[int], num_classes: int, *, bn: bool = True,
          activation: str = "relu", width: float = 1.0, init: str = "glorot_normal") -> ConvNet:
    """VGG-19 with BN and one linear classifier (LAP Sec. 3.3, App. A); see :func:`vgg11`."""
    return _vgg("vgg19", input_shape, num_classes, bn=bn, activation=activation, width=width,
                init=init)


def vgg11_nobn(input_shape: Iterable[int], num_classes: int, *, activation: str = "relu",
               width: float = 1.0, init: str = "kaiming_normal") -> ConvNet:
    """BN-free VGG11 of the LM paper (App. B), He-initialised; also MRP's vgg_11 (App. 6.3).

    VGG-11 convs (3x3, padding 1, bias) with ReLU and five max-pools, then FC ``512, 512, out``.
    The LM paper does not list the classifier, but its stated size, 9.7M parameters, fits two
    512-unit hidden layers (9.75M; a single FC layer gives 9.23M), which is exactly MRP's vgg_11.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        activation: Activation after every hidden layer.
        width: Multiplier of all channels and hidden units.
        init: Weight initialisation; Kaiming normal (He et al. 2015), as the LM paper states.
    """
    return _convnet("vgg11_nobn", input_shape, num_classes, cfg=_VGG_CFG["vgg11"],
                    hidden=(512, 512), padding="same", bn=False, activation=activation,
                    width=width, init=init)


def resnet18(input_shape: Iterable[int], num_classes: int, *, activation: str = "relu",
             width: float = 1.0, init: str = "kaiming_normal") -> ResNet:
    """CIFAR ResNet-18 (He et al. 2016a), as used in LAP Sec. 3.3.

    3x3 stem (64, stride 1, no max-pool), four stages of two :class:`BasicBlock` with
    64/128/256/512 channels and strides 1/2/2/2, global average pool, one linear layer
    (11,173,962 parameters for CIFAR-10).

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        activation: Activation of the blocks and stem.
        width: Multiplier of all channels.
        init: Weight initialisation; Kaiming normal (LAP App. A: not Glorot for ResNets).
    """
    return _resnet("resnet18", input_shape, num_classes, preact=False, stem_channels=64,
                   channels=(64, 128, 256, 512), strides=(1, 2, 2, 2), blocks_per_stage=2,
                   activation=activation, dropout=0.0, width=width, init=init)


def preact_resnet18(input_shape: Iterable[int], num_classes: int, *, activation: str = "relu",
                    width: float = 1.0, init: str = "kaiming_normal") -> ResNet:
    """PreActResNet18 (He et al. 2016b), as used in the LM paper (Sec. 4, App. B).

    Like :func:`resnet18` but with :class:`PreActBlock` and a bare conv stem; the final BN-ReLU
    before pooling of He et al. (2016b) is kept (some CIFAR code omits it).

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        activation: Activation of the blocks and head.
        width: Multiplier of all channels.
        init: Weight initialisation; Kaiming normal (LM App. B: He et al. 2015).
    """
    return _resnet("preact_resnet18", input_shape, num_classes, preact=True, stem_channels=64,
                   channels=(64, 128, 256, 512), strides=(1, 2, 2, 2), blocks_per_stage=2,
                   activation=activation, dropout=0.0, width=width, init=init)


def wrn16_8(input_shape: Iterable[int], num_classes: int, *, depth: int = 16,
            widen_factor: int = 8, dropout: float = 0.0, activation: str = "relu",
            width: float = 1.0, init: str = "kaiming_normal") -> ResNet:
    """Wide ResNet WRN-16-8 (Zagoruyko & Komodakis, 2016), as used in LAP Sec. 3.3.

    3x3 stem with 16 channels, three groups of ``(depth - 4) / 6`` (= 2) pre-activation blocks
    with ``16k, 32k, 64k`` channels (k = ``widen_factor``) and strides 1/2/2, dropout between the
    convs of a block (default 0), final BN-ReLU, global average pool, one linear layer.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        depth: Network depth, ``6n + 4``.
        widen_factor: k.
        dropout: Dropout probability inside blocks.
        activation: Activation of the blocks and head.
        width: Extra multiplier of all channels.
        init: Weight initialisation; Kaiming normal (LAP App. A: not Glorot for WRN).
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wrn16_8: depth must be 6n + 4 with n >= 1, got {depth}")
    k = int(widen_factor)
    if k < 1:
        raise ValueError(f"wrn16_8: widen_factor must be >= 1, got {widen_factor}")
    return _resnet("wrn16_8", input_shape, num_classes, preact=True, stem_channels=16,
                   channels=(16 * k, 32 * k, 64 * k), strides=(1, 2, 2),
                   blocks_per_stage=(depth - 4) // 6, activation=activation, dropout=dropout,
                   width=width, init=init)


# --------------------------------------------------------------------------------------------
# A small transformer (Round 2): so notebooks can show a transformer next to the MLP.
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value``/``out`` Linear layers
    (the layout of HuggingFace BERT and ViT), so every projection is a prunable ``nn.Linear``
    that forward hooks see (Vaswani et al. 2017, Sec. 3.2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t = h.size(0), h.size(1)  # size(), not shape unpacking: torch.fx traces it
        d = self.out.in_features
        q = self.query(h).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.key(h).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.value(h).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block (ViT, Dosovitskiy et al. 2021, Eq. 2-3):
    ``h + attn(LN(h))``, then ``h + fc2(GELU(fc1(LN(h))))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.act, self.fc2 = (nn.LayerNorm(dim), nn.Linear(dim, hidden),
                                                    nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.fc2(self.act(self.fc1(self.norm2(h))))


class Patches(nn.Module):
    """Cut ``(N, C, L)`` or ``(N, C, H, W)`` into non-overlapping patches: ``(N, T, C·p^d)``."""

    def __init__(self, patch: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.patch, self.input_shape = patch, tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, shape = self.patch, self.input_shape
        if len(shape) == 2:
            c, length = shape
            x = x.reshape(-1, c, length // p, p).permute(0, 2, 1, 3)
            return x.reshape(-1, length // p, c * p)
        c, hh, ww = shape
        x = x.reshape(-1, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, (hh // p) * (ww // p), c * p * p)


class Transformer(nn.Module):
    """ViT-style classifier: patch embedding, a learned class token and positions, pre-norm
    encoder blocks, a final LayerNorm and a Linear head on the class token."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, *, patch: int, dim: int,
                 depth: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.input_shape, self.num_classes = tuple(input_shape), int(num_classes)
        dims = len(input_shape) - 1
        tokens = math.prod(s // patch for s in input_shape[1:])
        self.patches = Patches(patch, input_shape)
        self.embed = nn.Linear(input_shape[0] * patch ** dims, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.patches(x))
        h = torch.cat([self.cls.expand(h.size(0), -1, -1), h], dim=1) + self.pos
        h = self.norm(self.blocks(h))
        return self.head(h[:, 0])


def vit(input_shape: Iterable[int], num_classes: int, *, patch: int | None = None,
        dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
        width: float = 1.0, init: str = "glorot_uniform") -> Transformer:
    """A small ViT (Dosovitskiy et al. 2021) for MNIST-1D's 40 positions or small images.

    ``(C, L)`` inputs are cut into ``L / patch`` segments, ``(C, H, W)`` into ``patch x patch``
    squares (``patch=None``: the largest of 4, 2, 1 dividing every axis); each patch is embedded
    by a Linear layer, a class token and learned positions are added, ``depth`` pre-norm blocks
    with ``heads`` heads and an MLP of ``mlp_ratio · dim`` GELU units follow, and a Linear head
    reads the class token. Attention uses separate query/key/value/out Linear layers (the
    HuggingFace layout), so heads and MLP units are prunable like any Linear.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: Output units.
        patch: Patch size along every spatial axis; must divide each.
        dim: Token width (scaled by ``width``, rounded to a multiple of ``heads``).
        depth: Number of encoder blocks.
        heads: Attention heads.
        mlp_ratio: Hidden units of each block's MLP per token feature.
        width: Multiplier of ``dim`` and the MLP width.
        init: Weight initialisation of the Linear layers (Glorot uniform, as ViT's code).
    """
    shape = _check_args("vit", input_shape, num_classes, spatial=True, width=width, init=init)
    if patch is None:
        patch = next(p for p in (4, 2, 1) if all(s % p == 0 for s in shape[1:]))
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 \
            or any(s % patch for s in shape[1:]):
        raise ValueError(f"vit: patch must be a positive int dividing every spatial size of "
                         f"{shape}, got {patch!r}")
    for name, value in (("depth", depth), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"vit: {name} must be an int >= 1, got {value!r}")
    d = max(heads, int(round(dim * width / heads)) * heads)
    model = Transformer(shape, num_classes, patch=patch, dim=d, depth=depth, heads=heads,
                        hidden=max(1, int(round(mlp_ratio * d))))
    _init_weights(model, init)
    nn.init.normal_(model.pos, std=0.02)
    nn.init.normal_(model.cls, std=0.02)
    return model


#: The registry: name -> constructor ``(input_shape, num_classes, **kwargs) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "fcn": fcn,
    "conv6": conv6,
    "lenet5": lenet5,
    "small_conv": small_conv,
    "medium_conv": medium_conv,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg11_nobn": vgg11_nobn,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wrn16_8": wrn16_8,
    "vit": vit,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def names() -> list[str]:
    """Sorted names of the registered architectures."""
    return sorted(MODELS)


def build(name: str, bundle: Any = None, *, input_shape: Iterable[int] | None = None,
          num_classes: int | None = None, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised registered architecture.

    Args:
        name: A key of :data:`MODELS` (see :func:`names`).
        bundle: Any object with ``input_shape`` (no batch dimension) and ``num_classes``.
        input_shape: Instead of ``bundle``: e.g. ``(1, 40)``, ``(3, 32, 32)``.
        num_classes: Instead of ``bundle``.
        seed: If given, weights are drawn under ``torch.random.fork_rng`` after
            ``torch.manual_seed(seed)``: same seed, bit-identical weights, global RNG untouched.
        **kwargs: Passed to the constructor (``width``, ``activation``, ``bn``, ``init``, ...).

    Returns:
        The model in training mode.

    Raises:
        ValueError: Unknown ``name``, missing/conflicting shape arguments, or a shape or argument
            the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    if bundle is not None:
        if input_shape is not None or num_classes is not None:
            raise ValueError(f"{name}: pass either a bundle or input_shape/num_classes, not both")
        try:
            input_shape, num_classes = bundle.input_shape, bundle.num_classes
        except AttributeError:
            raise ValueError(
                f"{name}: bundle {bundle!r} needs input_shape and num_classes attributes"
            ) from None
    if input_shape is None or num_classes is None:
        raise ValueError(f"{name}: give a bundle or both input_shape and num_classes")
    factory = MODELS[name]
    if seed is None:
        return factory(input_shape, num_classes, **kwargs)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return factory(input_shape, num_classes, **kwargs)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of ``model``.

    Returns:
        ``{"total", "trainable", "prunable"}``; prunable = elements of the ``weight`` of every
        Linear/Conv layer (biases and BatchNorm excluded). Shared tensors count once. This is
        the default for prunelab's own architectures; for a model with attention projections,
        Linear-like layers or a ``prunable=`` choice count
        ``prunelab.graph.prunable_names(model, prunable)`` (this module sits below the graph).
    """
    params = {id(p): p for p in model.parameters()}
    prunable = {id(m.weight): m.weight for m in model.modules()
                if isinstance(m, PRUNABLE_TYPES) and isinstance(m.weight, torch.Tensor)}
    return {
        "total": sum(p.numel() for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "prunable": sum(w.numel() for w in prunable.values()),
    }
