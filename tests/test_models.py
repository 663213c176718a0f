"""Tests for prunelab.models: every architecture on every dataset shape, tracing, seeding, sizes."""
from __future__ import annotations

import ast
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.fx
from torch import nn

import prunelab as pl
from prunelab import models as M

SHAPES = {
    "mnist1d": (1, 40),
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar": (3, 32, 32),
}
# Paper-size nets are exercised on every shape at a quarter width (same layer structure, 1/16 of
# the parameters) and once at full width in test_full_size_parameter_counts.
BIG = {"vgg11", "vgg16", "vgg19", "vgg11_nobn", "resnet18", "preact_resnet18", "wrn16_8"}
CONV_TYPES = (nn.Conv1d, nn.Conv2d)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and robust when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _forward(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, *shape))


# ------------------------------------------------------------------------------------ registry
def test_registry_names():
    assert M.names() == sorted(M.MODELS)
    assert set(M.names()) == {
        "mlp", "fcn", "conv6", "lenet5", "small_conv", "medium_conv", "vgg11", "vgg16", "vgg19",
        "vgg11_nobn", "resnet18", "preact_resnet18", "wrn16_8", "vit",
    }
    assert pl.models is M


# ------------------------------------------------------------------- every model, every shape
@pytest.mark.parametrize("dataset", list(SHAPES))
@pytest.mark.parametrize("name", sorted(M.MODELS))
def test_builds_runs_and_traces(name: str, dataset: str):
    shape = SHAPES[dataset]
    kwargs = {"width": 0.25} if name in BIG else {}
    model = M.build(name, input_shape=shape, num_classes=7, seed=0, **kwargs)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), y)
    # Every Linear/Conv appears as its own call_module node (nothing is hidden in a leaf).
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    prunable = {n for n, m in model.named_modules() if isinstance(m, M.PRUNABLE_TYPES)}
    assert prunable <= called

    # 1-D data gets the 1-D layers, images the 2-D ones.
    dims = len(shape) - 1
    conv_types = {type(m) for m in model.modules() if isinstance(m, CONV_TYPES)}
    if conv_types:
        assert conv_types == {nn.Conv1d if dims == 1 else nn.Conv2d}
    # Activations are modules, never in-place (hooks must see them).
    assert all(not getattr(m, "inplace", False) for m in model.modules())


def test_smallest_shapes():
    """Pools are clamped and tiny valid convs padded, so any size >= 1 works (module docstring)."""
    for name in M.names():
        for shape in [(1, 1), (2, 1, 1), (1, 3, 5)]:
            model = M.build(name, input_shape=shape, num_classes=4, width=0.125)
            assert _forward(model, shape).shape == (2, 4), (name, shape)


def test_train_mode_forward_and_backward():
    model = M.build("preact_resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0,
                    width=0.125)
    assert model.training
    out = model(torch.randn(3, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- determinism
def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,kwargs", [("mlp", {}), ("conv6", {}),
                                         ("resnet18", {"width": 0.25})])
def test_same_seed_bit_identical(name, kwargs):
    a = M.build(name, input_shape=(1, 8, 8), num_classes=10, seed=3, **kwargs)
    b = M.build(name, input_shape=(1, 8, 8), num_classes=10, seed=3, **kwargs)
    c = M.build(name, input_shape=(1, 8, 8), num_classes=10, seed=4, **kwargs)
    assert _state_equal(a, b)
    assert not _state_equal(a, c)


def test_seeded_build_leaves_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    M.build("conv6", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    # Without a seed, build draws from (and advances) the global RNG like any nn.Module.
    torch.manual_seed(5)
    a = M.build("mlp", input_shape=(1, 40), num_classes=10)
    torch.manual_seed(5)
    b = M.build("mlp", input_shape=(1, 40), num_classes=10)
    assert _state_equal(a, b)
    assert not torch.equal(torch.get_rng_state(), before)


def test_bundle_equals_explicit_shape():
    bundle = SimpleNamespace(input_shape=(1, 40), num_classes=10, name="mnist1d")
    a = pl.models.build("mlp", bundle, seed=0)
    b = pl.models.build("mlp", input_shape=(1, 40), num_classes=10, seed=0)
    assert _state_equal(a, b)
    assert a.input_shape == (1, 40) and a.num_classes == 10


# ------------------------------------------------------------------------- parameter counts
def _conv(cin: int, cout: int, k: int, bias: bool = True, dims: int = 2) -> int:
    return cin * cout * k**dims + (cout if bias else 0)


def _linear(i: int, o: int) -> int:
    return i * o + o


def test_mlp_count():
    counts = M.count_parameters(M.build("mlp", input_shape=(1, 28, 28), num_classes=10))
    assert counts["total"] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert counts["prunable"] == 784 * 300 + 300 * 100 + 100 * 10
    assert counts["trainable"] == counts["total"]


def test_fcn_count():
    counts = M.count_parameters(M.build("fcn", input_shape=(784,), num_classes=10))
    assert counts["total"] == _linear(784, 500) + 3 * _linear(500, 500) + _linear(500, 10)
    assert counts["total"] == 1_149_010
    assert counts["prunable"] == 784 * 500 + 3 * 500 * 500 + 500 * 10


def test_conv6_count_on_cifar():
    model = M.build("conv6", input_shape=(3, 32, 32), num_classes=10)
    chans = [3, 64, 64, 128, 128, 256, 256]
    convs = sum(_conv(a, b, 3) for a, b in zip(chans, chans[1:]))
    fcs = _linear(256 * 4 * 4, 256) + _linear(256, 256) + _linear(256, 10)
    assert M.count_parameters(model)["total"] == convs + fcs == 2_262_602
    assert model.classifier.fc1.in_features == 4096


def _vgg_count(cfg: list, bn: bool, fc: list[int]) -> int:
    total, cin = 0, 3
    for c in cfg:
        if c != "M":
            total += _conv(cin, c, 3) + (2 * c if bn else 0)
            cin = c
    sizes = [512, *fc, 10]
    return total + sum(_linear(a, b) for a, b in zip(sizes, sizes[1:]))


def _preact_count(stem: int, widths: list[int], blocks: int) -> int:
    total, cin = _conv(3, stem, 3, bias=False), stem
    for w in widths:
        for _ in range(blocks):
            total += 2 * cin + _conv(cin, w, 3, False) + 2 * w + _conv(w, w, 3, False)
            total += _conv(cin, w, 1, False) if cin != w else 0  # projection shortcut
            cin = w
    return total + 2 * cin + _linear(cin, 10)


def test_full_size_parameter_counts():
    """Full-width CIFAR-10 builds: counts from the layer shapes, and the published ones.

    (Forward passes are covered at quarter width by test_builds_runs_and_traces.)
    """
    cfg = M._VGG_CFG
    expected = {
        "vgg11": _vgg_count(cfg["vgg11"], True, []),
        "vgg16": _vgg_count(cfg["vgg16"], True, []),
        "vgg19": _vgg_count(cfg["vgg19"], True, []),
        "vgg11_nobn": _vgg_count(cfg["vgg11"], False, [512, 512]),
        "resnet18": 11_173_962,  # the usual CIFAR ResNet-18
        "preact_resnet18": _preact_count(64, [64, 128, 256, 512], 2),
        "wrn16_8": _preact_count(16, [128, 256, 512], 2),
    }
    assert expected["wrn16_8"] == 10_961_370  # "11.0M" in Zagoruyko & Komodakis, Table 1
    assert abs(expected["vgg11_nobn"] - 9.7e6) < 0.1e6  # "9.7M for VGG11" (LM paper, Sec. 4)
    for name, total in expected.items():
        model = M.build(name, input_shape=(3, 32, 32), num_classes=10)
        assert M.count_parameters(model)["total"] == total, name


def test_prunable_excludes_bias_and_bn():
    model = M.build("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, M.PRUNABLE_TYPES))
    assert M.count_parameters(model)["prunable"] == weights
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
             for p in m.parameters())
    assert M.count_parameters(model)["total"] == weights + bn + 10  # fc bias


# ------------------------------------------------------------------------ architecture detail
def test_shape_adaptation():
    def pools(model):
        return sum(isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) for m in model.modules())

    assert pools(M.build("vgg11", input_shape=(3, 32, 32), num_classes=10, width=0.25)) == 5
    assert pools(M.build("vgg11", input_shape=(1, 40), num_classes=10, width=0.25)) == 5
    digits = M.build("vgg11", input_shape=(1, 8, 8), num_classes=10, width=0.25)
    assert pools(digits) == 3  # 8 -> 4 -> 2 -> 1, the last two pools are dropped
    assert digits.classifier.fc1.in_features == 128

    # LeNet-5: 16*5*5 on 32x32, 16*4*4 on 28x28; on 8x8 the second conv gets "same" padding.
    assert M.build("lenet5", input_shape=(3, 32, 32), num_classes=10).classifier.fc1.in_features \
        == 400
    assert M.build("lenet5", input_shape=(1, 28, 28), num_classes=10).classifier.fc1.in_features \
        == 256
    small = M.build("lenet5", input_shape=(1, 8, 8), num_classes=10)
    assert small.features.conv1.padding == (0, 0) and small.features.conv2.padding == (2, 2)

    # MRP: unpadded convs flatten to exactly the width of the first Dense layer on CIFAR.
    assert M.build("small_conv", input_shape=(3, 32, 32), num_classes=10) \
        .classifier.fc1.in_features == 512
    assert M.build("medium_conv", input_shape=(3, 32, 32), num_classes=10) \
        .classifier.fc1.in_features == 1024

    # Non-square input: pool only along the axis that still has room.
    model = M.build("conv6", input_shape=(1, 1, 16), num_classes=3)
    assert _forward(model, (1, 1, 16)).shape == (2, 3)
    assert model.classifier.fc1.in_features == 256 * 1 * 2


def test_vgg_structure():
    model = M.build("vgg19", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 16
    assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Linear]  # ONE fc (LAP App. A)
    nobn = M.build("vgg11_nobn", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert sum(isinstance(m, nn.Linear) for m in nobn.modules()) == 3


def test_residual_blocks():
    model = M.build("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    blocks = [m for m in model.modules() if isinstance(m, M.BasicBlock)]
    assert len(blocks) == 8
    assert sum(isinstance(b.shortcut, nn.Identity) for b in blocks) == 5
    assert isinstance(model.head.pool, nn.AdaptiveAvgPool2d)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())  # CIFAR stem

    wrn = M.build("wrn16_8", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    blocks = [m for m in wrn.modules() if isinstance(m, M.PreActBlock)]
    assert len(blocks) == 6 and [b.conv2.out_channels for b in blocks[::2]] == [32, 64, 128]
    assert not any(isinstance(m, nn.Dropout) for m in wrn.modules())
    drop = M.build("wrn16_8", input_shape=(3, 32, 32), num_classes=10, width=0.125, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in drop.modules()) == 6


def test_activation_kwarg():
    def kinds(model):
        return {type(m) for m in model.modules() if type(m) in {nn.ReLU, nn.Tanh, nn.Sigmoid}}

    assert kinds(M.build("mlp", input_shape=(784,), num_classes=10)) == {nn.Tanh}
    assert kinds(M.build("fcn", input_shape=(784,), num_classes=10)) == {nn.ReLU}
    for act, cls in [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh)]:
        assert kinds(M.build("fcn", input_shape=(784,), num_classes=10, activation=act)) == {cls}
    assert kinds(M.build("conv6", input_shape=(1, 8, 8), num_classes=10,
                         activation="tanh")) == {nn.Tanh}
    wide = M.build("mlp", input_shape=(784,), num_classes=10, width=2.0)
    assert wide.fc1.out_features == 600 and wide.fc2.out_features == 200


def test_initialisation():
    torch.manual_seed(0)
    fcn = M.build("fcn", input_shape=(784,), num_classes=10)
    std = fcn.fc1.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (784 + 500)), rel=0.02)  # Glorot normal
    assert all(torch.count_nonzero(m.bias) == 0 for m in fcn.modules()
               if isinstance(m, nn.Linear))

    vgg = M.build("vgg11", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    conv = vgg.features.conv3  # 32 -> 64 channels, 3x3
    assert conv.weight.std().item() == pytest.approx(
        math.sqrt(2 / (9 * 32 + 9 * 64)), rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    bn = vgg.features.bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)

    res = M.build("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.5)
    conv = res.layer4[1].conv1  # 256 -> 256, 3x3, Kaiming fan-in
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)

    glorot = M.build("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.5,
                     init="glorot_uniform")
    assert glorot.layer4[1].conv1.weight.std().item() == pytest.approx(
        math.sqrt(2 / (9 * 256 + 9 * 256)), rel=0.02)


# ------------------------------------------------------------------------------------ errors
def test_unknown_name():
    with pytest.raises(ValueError, match="resnet1000") as err:
        M.build("resnet1000", input_shape=(3, 32, 32), num_classes=10)
    assert "conv6" in str(err.value) and "wrn16_8" in str(err.value)


@pytest.mark.parametrize("name,shape", [
    ("conv6", (3, 0, 32)),
    ("conv6", (40,)),
    ("resnet18", (1, 2, 3, 4)),
    ("vgg11", (0, 8, 8)),
    ("lenet5", ()),
    ("mlp", (0,)),
    ("fcn", ()),
])
def test_impossible_shapes(name, shape):
    with pytest.raises(ValueError, match=name) as err:
        M.build(name, input_shape=shape, num_classes=10)
    assert str(shape) in str(err.value) and "minimum" in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mlp"):
        M.build("mlp", input_shape=(1, 40), num_classes=0)
    with pytest.raises(ValueError, match="activation"):
        M.build("mlp", input_shape=(1, 40), num_classes=10, activation="swish")
    with pytest.raises(ValueError, match="init"):
        M.build("conv6", input_shape=(1, 40), num_classes=10, init="orthogonal")
    with pytest.raises(ValueError, match="depth"):
        M.build("wrn16_8", input_shape=(1, 40), num_classes=10, depth=15)
    with pytest.raises(ValueError, match="padding"):
        M.build("small_conv", input_shape=(1, 40), num_classes=10, padding="full")
    with pytest.raises(ValueError, match="num_classes"):
        M.build("mlp", input_shape=(1, 40))
    with pytest.raises(ValueError, match="not both"):
        M.build("mlp", SimpleNamespace(input_shape=(1, 40), num_classes=10), num_classes=3)
    with pytest.raises(ValueError, match="input_shape"):
        M.build("mlp", object())
    with pytest.raises(TypeError):
        M.build("mlp", input_shape=(1, 40), num_classes=10, bn=True)


# ---------------------------------------------------------------------------------- layering
def test_models_imports_only_torch_and_stdlib():
    tree = ast.parse(Path(M.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots - {"torch", "__future__"} <= set(sys.stdlib_module_names)
