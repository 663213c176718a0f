"""prunelab.graph.layer_graph: neighbours from torch.fx, BN, flatten, residuals, fallbacks."""
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunelab import graph as G
from prunelab import models


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


class ConvBN(nn.Module):
    """conv-BN-relu-pool, conv-BN-relu, flatten via view, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc1, self.fc2 = nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 2)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class Residual(nn.Module):
    """stem -> (a, b) in parallel, summed -> c; plus an identity shortcut around c."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        s = self.bn_a(self.a(h)) + self.b(h)
        s = torch.relu(s)
        out = torch.relu(self.c(s)) + s
        return self.head(out.mean((2, 3)))


def test_mlp_chain():
    g = G.layer_graph(mlp())
    assert g.traced
    assert g.names == ["1.weight", "4.weight", "6.weight"] == G.prunable_names(mlp())
    assert g["1.weight"].prev == () and g["1.weight"].external_in
    assert g["1.weight"].next == ("4.weight",)
    assert g["4.weight"].prev == ("1.weight",) and g["4.weight"].next == ("6.weight",)
    assert g["6.weight"].next == () and g["6.weight"].external_out
    assert all(g[n].bn is None and g[n].flatten is None for n in g)
    assert g["1.weight"].act is not None and g["6.weight"].act is None
    layer = g["4.weight"]
    assert layer.kind == "linear" and (layer.in_size, layer.out_size) == (8, 6)


def test_conv_bn_flatten_into_linear():
    g = G.layer_graph(ConvBN())
    assert g.names == ["c1.weight", "c2.weight", "fc1.weight", "fc2.weight"]
    assert g["c1.weight"].bn == "b1" and g["c2.weight"].bn == "b2"
    assert g["fc1.weight"].bn is None
    assert g["c2.weight"].next == ("fc1.weight",) and g["fc1.weight"].prev == ("c2.weight",)
    # 8x8 input, two 2x2 pools: every channel of c2 becomes 4*4 = 16 features of fc1
    assert g["c2.weight"].flatten == 16 and g["fc1.weight"].flatten == 16
    (edge,) = g["fc1.weight"].inputs
    assert edge.bns == ("b2",) and edge.flatten == 16
    (edge,) = g["c2.weight"].inputs
    assert edge.src == "c1.weight" and edge.bns == ("b1",) and edge.flatten is None


def test_registered_conv6_with_bn():
    m = models.build("conv6", input_shape=(3, 32, 32), num_classes=10, bn=True, width=0.25)
    g = G.layer_graph(m)
    assert g.traced and len(g) == 9
    assert g["features.conv6.weight"].next == ("classifier.fc1.weight",)
    assert g["features.conv6.weight"].flatten == 16  # 4x4 after three pools of 32x32
    assert g["features.conv3.weight"].bn == "features.bn3"


def test_residual_sum_has_both_producers():
    g = G.layer_graph(Residual())
    assert set(g["c.weight"].prev) == {"a.weight", "b.weight"}
    assert set(g["a.weight"].next) == {"c.weight", "head.weight"}  # via the identity shortcut
    assert g["stem.weight"].next == ("a.weight", "b.weight")
    assert g["a.weight"].bn == "bn_a" and g["b.weight"].bn is None
    bns = {e.src: e.bns for e in g["c.weight"].inputs}
    assert bns == {"a.weight": ("bn_a",), "b.weight": ()}
    assert set(g["head.weight"].prev) == {"c.weight", "a.weight", "b.weight"}
    assert g["head.weight"].flatten == 1  # a global mean: one feature per channel
    # the ReLU after the add gates both producers
    assert g["a.weight"].act == g["b.weight"].act


def test_registered_resnets():
    m = models.build("resnet18", input_shape=(3, 16, 16), num_classes=10, width=0.125)
    g = G.layer_graph(m)
    assert set(g["layer1.1.conv1.weight"].prev) == {"stem.conv.weight", "layer1.0.conv2.weight"}
    assert set(g["layer2.0.shortcut.conv.weight"].next) == set(g["layer2.0.conv2.weight"].next)
    pre = models.build("preact_resnet18", input_shape=(3, 16, 16), num_classes=10, width=0.125)
    g = G.layer_graph(pre)
    # the stem feeds bn1 of block 1 *and* the identity shortcut: bn1 cannot be folded into it
    assert g["stem.conv.weight"].bn is None
    assert g["layer1.0.conv1.weight"].bn == "layer1.0.bn2"


def test_conv1d_net():
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.MaxPool1d(2),
                      nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5, 3))
    g = G.layer_graph(m)
    assert g.names == ["0.weight", "4.weight", "7.weight"]
    assert g["0.weight"].bn == "1" and g["0.weight"].next == ("4.weight",)
    assert g["4.weight"].flatten == 5 and g["7.weight"].prev == ("4.weight",)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.bn(self.a(x))
        if h.sum() > 0:  # data-dependent control flow
            h = torch.relu(h)
        return self.b(h)


def test_untraceable_model_falls_back_to_a_chain_with_a_warning():
    with pytest.warns(UserWarning, match="cannot trace Untraceable.*chain in registration order"):
        g = G.layer_graph(Untraceable())
    assert not g.traced and "control flow" in g.reason
    assert g["a.weight"].next == ("b.weight",) and g["b.weight"].prev == ("a.weight",)
    assert g["a.weight"].bn == "bn"
    with pytest.warns(UserWarning, match="cannot trace"):  # cached, still warned
        G.layer_graph(Untraceable())


def test_parametrized_model_is_traced_through_a_plain_copy():
    class Mask(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.register_buffer("m", m)

        def forward(self, w):
            return w * self.m

    m = ConvBN()
    parametrize.register_parametrization(m.c2, "weight", Mask(torch.ones_like(m.c2.weight)))
    assert G.is_parametrized(m)
    g = G.layer_graph(m)
    assert g.traced and g.names == ["c1.weight", "c2.weight", "fc1.weight", "fc2.weight"]
    assert g["c2.weight"].flatten == 16 and g["c2.weight"].bn == "b2"
    assert G.is_parametrized(m)  # untouched


def test_cache_is_structural_and_invalidated_by_a_different_model():
    a, b = mlp(), mlp()
    assert G.layer_graph(a) is G.layer_graph(b)  # same architecture, other weights
    c = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    assert G.layer_graph(c).names == ["1.weight", "3.weight"]
    m = models.build("resnet18", input_shape=(3, 8, 8), num_classes=4, width=0.125)
    p = models.build("preact_resnet18", input_shape=(3, 8, 8), num_classes=4, width=0.125)
    assert G.layer_graph(m) is not G.layer_graph(p)


class Skippable(nn.Module):
    """a -> relu -> b (+ the relu output when ``skip``) -> c; ``order`` and ``act`` steer it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.skip = True
        self.act = torch.relu
        self.cfg = ([1, 2], {"k": [3]})  # an unhashable tuple: the key must still hash

    def forward(self, x):
        h = self.act(self.a(x))
        z = self.b(h)
        if self.skip:
            z = z + h
        return self.c(z)


def test_cache_never_returns_a_graph_of_the_model_before_an_in_place_edit():
    m = Skippable()
    g = G.layer_graph(m)
    assert set(g["c.weight"].prev) == {"a.weight", "b.weight"}
    m.skip = False  # a flag read by forward
    assert G.layer_graph(m)["c.weight"].prev == ("b.weight",)
    m.skip = True
    assert G.layer_graph(m) is g  # the same structure again: the cached graph
    m.act = lambda t: torch.cat([t[:, :2], t[:, 2:]], 1)  # a function held as an attribute
    assert G.layer_graph(m)["b.weight"].prev == ()  # cat is opaque
    m.act = torch.relu
    m.b = nn.Sequential(nn.Linear(4, 4), nn.Tanh())  # a module swapped for a block
    g2 = G.layer_graph(m)
    assert "b.0.weight" in g2 and "b.weight" not in g2
    m.skip, m.a, m.b = False, nn.Linear(4, 6), nn.Linear(6, 4)  # resized
    assert G.layer_graph(m)["a.weight"].out_size == 6
    m.cfg[1]["k"].append(4)  # a container attribute edited in place changes the key
    key = G.structure_key(m)
    m.cfg[0].append(5)
    assert G.structure_key(m) != key


def test_cache_sees_a_forward_patched_on_the_class_or_the_instance():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    def opaque(self, x):
        return self.b(torch.cat([self.a(x)[:, :2], x[:, :2]], 1))

    m = Two()
    g = G.layer_graph(m)
    assert g["b.weight"].prev == ("a.weight",)
    key = G.structure_key(m)
    m.forward = types.MethodType(opaque, m)  # on the instance (what the autograd path runs)
    assert G.structure_key(m) != key
    del m.forward
    assert G.structure_key(m) == key and G.layer_graph(m) is g
    Two.forward = opaque  # on the class (a notebook patching a model class)
    assert G.layer_graph(Two())["b.weight"].prev == ()
    assert G.layer_graph(m)["b.weight"].prev == ()


def test_different_models_never_share_a_graph():
    def make(cls_name, act):
        def forward(self, x):
            return self.b(act(self.a(x)))

        cls = type(cls_name, (nn.Module,), {"forward": forward})
        m = cls()
        m.a, m.b = nn.Linear(4, 4), nn.Linear(4, 2)
        return m

    relu, cat = make("Net", torch.relu), make("Net", lambda t: torch.cat([t[:, :2], t[:, 2:]], 1))
    assert G.structure_key(relu) != G.structure_key(cat)  # same names, types' names, sizes
    assert G.layer_graph(relu)["b.weight"].prev == ("a.weight",)
    assert G.layer_graph(cat)["b.weight"].prev == ()
    wide = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    narrow = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert G.layer_graph(wide)["0.weight"].out_size == 6
    assert G.layer_graph(narrow)["0.weight"].out_size == 3


def test_structure_key_keeps_no_forward_alive():
    import gc
    import weakref

    m = mlp()

    def fwd(x):
        return x

    m.forward = fwd
    key = G.structure_key(m)
    ref = weakref.ref(fwd)
    del m.forward, fwd
    gc.collect()
    assert ref() is None  # the key did not keep it alive ...
    m.forward = lambda x: x  # ... and a new function, even at the same address, is not it
    assert G.structure_key(m) != key


def test_opaque_ops_cut_the_neighbourhood():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    g = G.layer_graph(Cat())
    assert g["c.weight"].prev == () and g["c.weight"].external_in
    assert g["a.weight"].next == () and g["a.weight"].external_out


def test_graph_is_fast_when_cached():
    m = models.build("vgg11", input_shape=(3, 32, 32), num_classes=10)
    G.layer_graph(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = G.layer_graph(m)
    assert len(g) == 9 and g.traced


def test_prunable_types_defined_once():
    import ast
    from pathlib import Path

    from prunelab import graph, models

    assert graph.PRUNABLE_TYPES is models.PRUNABLE_TYPES
    pkg = Path(graph.__file__).parent
    defined = [p.name for p in pkg.rglob("*.py")
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, (ast.Assign, ast.AnnAssign))
               and "PRUNABLE_TYPES" in [getattr(t, "id", None) for t in
                                        (node.targets if isinstance(node, ast.Assign)
                                         else [node.target])]]
    assert defined == ["models.py"]
