"""The two trace paths of prunelab.depgraph (meta tensors, then the real example) agree."""
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import depgraph as D

from test_surgery import CASES, _ids, _SliceAssign, _x

aten = torch.ops.aten


def assert_same_graph(a: D.DependencyGraph, b: D.DependencyGraph) -> None:
    """Every result of the trace is the same: groups, blocked reasons and the plan's inputs."""
    assert a.producers == b.producers
    assert {k: p.kind for k, p in a.prods.items()} == {k: p.kind for k, p in b.prods.items()}
    assert [(g.members, g.blocked) for g in a.groups] == [(g.members, g.blocked) for g in b.groups]
    assert a.blocked == b.blocked
    for store in ("consumers", "norms"):
        sa, sb = getattr(a, store), getattr(b, store)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (store, k)
    assert a.consumer_kind == b.consumer_kind
    assert a.grouped.keys() == b.grouped.keys()
    for k, g in a.grouped.items():
        h = b.grouped[k]
        assert g.groups == h.groups and torch.equal(g.inputs, h.inputs)
        assert torch.equal(g.outputs, h.outputs)
    assert len(a.splits) == len(b.splits)
    for (la, na, sa), (lb, nb, sb) in zip(a.splits, b.splits):
        assert torch.equal(la, lb) and (na, sa) == (nb, sb)
    assert a.matmul_ids == b.matmul_ids and a.hf_heads == b.hf_heads


def _both(model, x):
    on_meta = D.dependencies(model, x, meta=True)
    real = D.dependencies(model, x, meta=False)
    assert on_meta.meta and not real.meta
    return on_meta, real


@pytest.mark.parametrize("case", list(CASES))
def test_meta_and_real_traces_give_the_same_groups(case):
    make, example, *_ = CASES[case]
    torch.manual_seed(0)
    model, x = make(), example(torch.float32)
    on_meta, real = _both(model, x)
    assert_same_graph(on_meta, real)
    assert D.dependencies(model, x).meta        # the default takes the meta path here


@pytest.mark.parametrize("arch", pl.models.names())
def test_meta_and_real_traces_of_the_model_zoo(arch):
    model = pl.models.build(arch, input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
    assert_same_graph(*_both(model, _x((2, 3, 32, 32))))


def test_float64_and_channels_last_take_the_meta_path_too():
    model = pl.models.build("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
    x = _x((2, 3, 32, 32))
    ref = D.dependencies(model, x, meta=False)
    assert_same_graph(D.dependencies(model.double(), x.double(), meta=True), ref)
    cl = model.float().to(memory_format=torch.channels_last)
    assert_same_graph(D.dependencies(cl, x.to(memory_format=torch.channels_last), meta=True), ref)


class _ReadsValues(nn.Module):
    """Data-dependent control flow: meta tensors have no values, so the real example is traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > -1e9:
            h = torch.relu(h)
        return self.fc(h.mean((2, 3)))


class _WritesAttribute(nn.Module):
    """An in-place write into a tensor that is no activation: its meta twin would diverge."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.scratch = torch.zeros(3, 6)

    def forward(self, x):
        self.scratch[:, :] = self.a(x)
        return self.b(self.scratch)


def test_models_that_read_values_fall_back_to_the_real_example():
    model, x = _ReadsValues(), _x((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"cannot trace _ReadsValues.*meta tensors"):
        D.dependencies(model, x, meta=True)
    dg = D.dependencies(model, x)
    assert not dg.meta
    assert_same_graph(dg, D.dependencies(model, x, meta=False))
    assert set(dg.group_of("conv", 1).members) == {("conv", 1)}

    model = _WritesAttribute()
    with pytest.raises(ValueError, match=r"writes into a tensor that is not an activation"):
        D.dependencies(model, _x((3, 4)), meta=True)
    assert not D.dependencies(model, _x((3, 4))).meta


def test_unfollowable_and_unbatched_models_agree_on_both_paths():
    assert_same_graph(*_both(_SliceAssign(), _x((3, 4))))
    seq = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    assert_same_graph(*_both(seq, _x((6, 5))[0]))


def test_bert_falls_back_and_agrees():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: the tiny BertModel test is skipped")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=24,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 7)),
         "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    dg = D.dependencies(model, x)        # HF reads the mask's values: the real path
    assert not dg.meta and dg.hf_heads
    assert_same_graph(dg, D.dependencies(model, x, meta=False))


def test_hf_layer_on_meta_equals_real_with_the_mask():
    from surgery_models import HFLayer
    x = _ids()
    assert_same_graph(*_both(HFLayer().eval(), x))


# -------------------------------------------- the shape rules against torch's own meta kernels

def _t(shape, dtype=torch.float32, **kw):
    return torch.ones(shape, dtype=dtype, **kw)


OPS = {
    "relu": (aten.relu.default, lambda: (_t((2, 3, 4, 5)),)),
    "add-broadcast": (aten.add.Tensor, lambda: (_t((2, 3, 4, 5)), _t((3, 1, 1)))),
    "add-alpha": (aten.add.Tensor, lambda: (_t((2, 3)), _t((2, 3)), ), {"alpha": 2}),
    "half+0-dim-float": (aten.add.Tensor, lambda: (_t((2, 3), torch.float16), _t(()))),
    "long*float": (aten.mul.Tensor, lambda: (_t((2, 3), torch.long), _t((3,)))),
    "int*scalar": (aten.mul.Scalar, lambda: (_t((2, 3), torch.int32), 2.5)),
    "gt-bool": (aten.gt.Tensor, lambda: (_t((2, 3)), _t((2, 1)))),
    "where-f64-f32": (aten.where.self, lambda: (_t((2, 3), torch.bool), _t((2, 3), torch.float64),
                                                _t((3,)))),
    "div-int-by-zero-free": (aten.div.Tensor, lambda: (_t((4,), torch.long), _t((4,), torch.long))),
    "gelu": (aten.gelu.default, lambda: (_t((2, 7, 16)),)),
    "batch_norm": (aten.native_batch_norm.default,
                   lambda: (_t((2, 4, 3, 3)), _t(4), _t(4), _t(4), _t(4), False, 0.1, 1e-5)),
    "batch_norm-legit": (aten._native_batch_norm_legit_no_training.default,
                         lambda: (_t((2, 4, 3)), _t(4), _t(4), _t(4), _t(4), 0.1, 1e-5)),
    "addmm": (aten.addmm.default, lambda: (_t(5), _t((3, 4)), _t((4, 5)))),
    "addmm-2d-bias": (aten.addmm.default, lambda: (_t((3, 1)), _t((3, 4)), _t((4, 5)))),
    "mm": (aten.mm.default, lambda: (_t((3, 4), torch.float64), _t((4, 2), torch.float64))),
    "bmm": (aten.bmm.default, lambda: (_t((2, 3, 4)), _t((2, 4, 6)))),
    "conv2d": (aten.convolution.default, lambda: (_t((2, 4, 9, 7)), _t((6, 4, 3, 3)), _t(6),
                                                 [1, 1], [1, 1], [1, 1], False, [0, 0], 1)),
    "conv2d-strided-dilated-grouped": (
        aten.convolution.default, lambda: (_t((2, 4, 9, 8)), _t((6, 2, 3, 2)), None, [2, 3],
                                           [0, 1], [2, 1], False, [0, 0], 2)),
    "conv1d": (aten.convolution.default, lambda: (_t((2, 3, 11)), _t((5, 3, 4)), _t(5), [2], [1],
                                                 [1], False, [0], 1)),
    "conv3d-f64": (aten.convolution.default,
                   lambda: (_t((1, 2, 5, 6, 7), torch.float64), _t((3, 2, 3, 3, 3), torch.float64),
                            None, [1, 1, 1], [0, 1, 2], [1, 1, 1], False, [0, 0, 0], 1)),
    "mean-dims": (aten.mean.dim, lambda: (_t((2, 3, 4, 5)), [2, 3])),
    "mean-keepdim-negative": (aten.mean.dim, lambda: (_t((2, 3, 4)), [-1], True)),
    "sum-int": (aten.sum.dim_IntList, lambda: (_t((2, 3), torch.int32), [1])),
    "sum-dtype": (aten.sum.dim_IntList, lambda: (_t((2, 3)), [0]), {"dtype": torch.float64}),
    "amax": (aten.amax.default, lambda: (_t((2, 3, 4)), [1])),
    "relu-transposed": (aten.relu.default, lambda: (_t((4, 6)).t(),)),
    "mul-transposed": (aten.mul.Scalar, lambda: (_t((2, 6, 4)).transpose(1, 2), 0.5)),
    "gelu-permuted": (aten.gelu.default, lambda: (_t((2, 3, 4, 5)).permute(0, 2, 1, 3),)),
    "layer_norm": (aten.native_layer_norm.default, lambda: (_t((2, 6, 16)), [16], _t(16), _t(16),
                                                            1e-5)),
    "layer_norm-2d-no-affine": (aten.native_layer_norm.default,
                                lambda: (_t((3, 4, 5), torch.float64), [4, 5], None, None, 1e-5)),
    "softmax": (aten._softmax.default, lambda: (_t((2, 4, 6)), -1, False)),
    "safe_softmax": (aten._safe_softmax.default, lambda: (_t((2, 4, 6)), -1)),
    "log_softmax": (aten._log_softmax.default, lambda: (_t((2, 4, 6), torch.float64), 1, False)),
    # not the plain case: deferred to the meta kernel, which must still be what comes out
    "mul-sliced": (aten.mul.Scalar, lambda: (_t((6, 4))[::2], 0.5)),
    "mul-transposed-size-1": (aten.mul.Scalar, lambda: (_t((2, 1, 4)).transpose(0, 2), 0.5)),
    "safe_softmax-to-f64": (aten._safe_softmax.default, lambda: (_t((2, 4)), -1, torch.float64)),
    "conv-transposed": (aten.convolution.default, lambda: (_t((2, 4, 5, 5)), _t((4, 3, 3, 3)),
                                                          None, [2, 2], [1, 1], [1, 1], True,
                                                          [1, 1], 1)),
    "amax-all": (aten.amax.default, lambda: (_t((2, 3, 4)),)),
    "batch_norm-channels-last": (aten.native_batch_norm.default,
                                 lambda: (_t((2, 4, 3, 3)).to(memory_format=torch.channels_last),
                                          _t(4), _t(4), _t(4), _t(4), False, 0.1, 1e-5)),
    "addmm-beta": (aten.addmm.default, lambda: (_t(5), _t((3, 4)), _t((4, 5))), {"beta": 0.5}),
}


@pytest.mark.parametrize("op", list(OPS))
def test_shape_rules_match_the_meta_kernels(op):
    func, make, *kw = OPS[op]
    kwargs = kw[0] if kw else {}
    args = make()
    meta_args = [D._twin(a) if isinstance(a, torch.Tensor) else a for a in args]
    ref = func(*meta_args, **kwargs)
    with D._OnMeta():
        out = func(*args, **kwargs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = out if isinstance(out, tuple) else (out,)
    main, ref_main = outs[0], refs[0]
    assert main.is_meta and len(outs) == len(refs)
    assert (main.shape, main.dtype, main.stride()) == (ref_main.shape, ref_main.dtype,
                                                         ref_main.stride())
    rule = D._FAST_META.get(func, (D._pointwise_meta,))[0]
    deferred = op in ("batch_norm-channels-last", "addmm-beta",
                      "conv-transposed", "amax-all", "mul-sliced", "mul-transposed-size-1",
                      "safe_softmax-to-f64")
    assert (rule(func, meta_args, kwargs) is None) is deferred  # the rule itself answered
    real = func(*args, **kwargs)          # and what the real kernel gives
    real = real[0] if isinstance(real, tuple) else real
    assert (main.shape, main.dtype) == (real.shape, real.dtype)
