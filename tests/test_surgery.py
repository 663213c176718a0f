"""Structural removal (prunelab.surgery): the smaller model equals the masked one on any graph."""
import copy

import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import surgery as S

from surgery_models import (ConvBNFlat, Concat, Depthwise, EncoderClassifier, Grouped, HFLayer,
                            ResNetish, hf_layer_sdpa, init, mlp)


def _x(shape, dtype=None, seed=0):
    """Inputs in ``dtype``, by default the one the test models are built in (float64 proxy)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype or torch.get_default_dtype())


def _ids():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 11, (3, 6), generator=g),
            "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])}


# name, model factory, example factory (dtype -> input), selection, expand, hand-counted params
CASES = {
    "mlp": (mlp, lambda dt: _x((5, 12), dt), {"1": [0, 3, 5], "3": [2]}, False,
            (12 * 13 + 13) + (13 * 9 + 9) + (9 * 3 + 3)),
    "conv-bn-flatten-linear": (
        lambda: init(ConvBNFlat()), lambda dt: _x((3, 3, 8, 8), dt),
        {"conv1": [1, 2], "conv2": [0, 5]}, False,
        (3 * 6 * 9 + 6) + 2 * 6 + 6 * 4 * 9 + 2 * 4 + (4 * 16 * 5 + 5)),
    "resnet-bn-residual": (
        lambda: init(ResNetish()), lambda dt: _x((3, 3, 8, 8), dt),
        {"stem": [2, 4], "block1.conv1": [1]}, True,
        # residual stream 8 -> 6 channels, block1's inner width 8 -> 7
        3 * 6 * 9 + 12 + (6 * 7 * 9 + 14 + 7 * 6 * 9 + 12) + (6 * 8 * 9 + 16 + 8 * 6 * 9 + 12)
        + (6 * 4 + 4)),
    "concat": (
        lambda: init(Concat()), lambda dt: _x((3, 3, 8, 8), dt),
        {"stem": [2], "a": [1], "b": [0, 4], "mix": [3]}, False,
        # stem 6->5; cat = a 3 + b 3 + stem 5 = 11; mix 7->6
        (3 * 5 * 9 + 5) + 10 + (5 * 3 + 3) + (5 * 3 * 9 + 3) + 22 + (11 * 6 + 6) + (6 * 3 + 3)),
    "depthwise": (
        lambda: init(Depthwise()), lambda dt: _x((3, 3, 8, 8), dt),
        {"pw1": [2, 7], "dw": [2, 7]}, False,
        (3 * 6 + 6) + 12 + (6 * 9 + 6) + 12 + (6 * 6 + 6) + (6 * 2 + 2)),
    "grouped-whole-groups": (
        lambda: Grouped().eval(), lambda dt: _x((3, 3, 8, 8), dt),
        {"c1": [2, 3], "g": [3, 4, 5]}, False,
        (3 * 6 + 6) + (9 * 2 * 9 + 9) + (9 * 4 + 4)),
    "transformer-encoder": (
        lambda: EncoderClassifier().eval(), lambda dt: _x((3, 6, 5), dt),
        {"encoder.layers.0.self_attn": [1], "encoder.layers.1.linear1": [0, 5, 7]}, False,
        sum(p.numel() for p in EncoderClassifier().parameters())
        - (3 * 4 * 16 + 3 * 4 + 16 * 4) - 3 * (16 + 1) - 3 * 16),
    "hf-attention": (
        lambda: HFLayer().eval(), lambda dt: _ids(),
        {"attention.self": [0, 2], "intermediate": [1, 2]}, False,
        # 2 of 4 heads: 8 rows (+ bias) of query, key, value; 8 columns of the output dense
        sum(p.numel() for p in HFLayer().parameters()) - 3 * 8 * (16 + 1) - 8 * 16
        - 2 * (16 + 1) - 2 * 16),
    "hf-attention-sdpa": (
        lambda: hf_layer_sdpa().eval(), lambda dt: _ids(), {"attention.self": [3]}, False,
        sum(p.numel() for p in HFLayer().parameters()) - 3 * 4 * (16 + 1) - 4 * 16),
}


def _out(y):
    return y["logits"] if isinstance(y, dict) else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_smaller_model_equals_masked_model(case, dtype):
    make, example, sel, expand, hand = CASES[case]
    torch.manual_seed(0)
    model = make().to(dtype)
    before = copy.deepcopy(model.state_dict())
    x = example(dtype)
    res = S.remove(model, sel, x, expand=expand)
    ref = S.masked(model, sel, x, expand=expand)
    with torch.no_grad():
        a, b = _out(S.call(res.model, x)), _out(S.call(ref, x))
        dense = _out(S.call(model, x))
    assert a.dtype == dtype
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(b, dense)                 # something was really removed
    assert res.params_after == sum(p.numel() for p in res.model.parameters()) == hand
    assert res.params_before == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():          # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_masked_model_is_the_zeroed_consumer_columns():
    """The equality target written by hand: consumers' input columns zeroed (units.py)."""
    model = mlp()
    x = _x((5, 12))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[3].weight[:, [0, 3, 5]] = 0
        ref[5].weight[:, [2]] = 0
    res = S.remove(model, {"1": [0, 3, 5], "3": [2]}, x)
    torch.testing.assert_close(res.model(x), ref(x), atol=1e-6, rtol=0)
    assert res.model[1].weight.shape == (13, 12) and res.model[3].weight.shape == (9, 13)
    assert res.model[1].out_features == 13 and res.model[5].in_features == 9


def test_residual_groups_and_expand():
    model = init(ResNetish())
    dg = S.dependencies(model, _x((2, 3, 8, 8)))
    members = set(dg.group_of("stem", 3).members)
    assert members == {("stem", 3), ("block1.conv2", 3), ("block2.conv2", 3)}
    assert set(dg.group_of("block1.conv1", 5).members) == {("block1.conv1", 5)}
    with pytest.raises(ValueError, match=r"'block1.conv2'.*breaks a dependency group.*expand=True"):
        S.remove(model, {"block1.conv2": [3]}, _x((2, 3, 8, 8)))
    whole = {"stem": [3], "block1.conv2": [3], "block2.conv2": [3]}
    res = S.remove(model, whole, _x((2, 3, 8, 8)))
    assert res.removed == whole


def test_concat_offsets():
    model = init(Concat())
    res = S.remove(model, {"stem": [2], "b": [4]}, _x((2, 3, 8, 8)))
    # cat = [a 0..3 | b 4..8 | stem 9..14]: columns 4 + 4 = 8 (b's 4) and 9 + 2 = 11 (stem's 2)
    assert res.plan.cols["mix"] == [8, 11] and res.plan.norms["bn_cat"] == [8, 11]


def test_depthwise_follows_its_input():
    model = init(Depthwise())
    dg = S.dependencies(model, _x((2, 3, 8, 8)))
    assert set(dg.group_of("pw1", 4).members) == {("pw1", 4), ("dw", 4)}
    res = S.remove(model, {"pw1": [4]}, _x((2, 3, 8, 8)), expand=True)
    assert res.model.dw.groups == res.model.dw.in_channels == res.model.dw.out_channels == 7


def test_grouped_conv_needs_whole_groups():
    with pytest.raises(ValueError, match=r"grouped conv 'g' \(groups=4\).*whole groups"):
        S.remove(Grouped().eval(), {"g": [3]}, _x((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"grouped conv 'g'.*whole groups"):
        S.remove(Grouped().eval(), {"c1": [2, 3]}, _x((2, 3, 8, 8)))
    res = S.remove(Grouped().eval(), {"c1": [2, 3], "g": [3, 4, 5]}, _x((2, 3, 8, 8)))
    assert res.model.g.groups == 3 and res.model.g.in_channels == 6


def test_mha_heads_with_padding_mask_and_weights():
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    x = _x((3, 6, 5))
    res = S.remove(model, {"encoder.layers.1.self_attn": [0, 3]}, x)
    ref = S.masked(model, {"encoder.layers.1.self_attn": [0, 3]}, x)
    attn = res.model.encoder.layers[1].self_attn
    assert isinstance(attn, S.PrunedMultiheadAttention) and attn.num_heads == 2
    assert attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])
    with torch.no_grad():
        a = res.model.head(res.model.encoder(res.model.embed(x), src_key_padding_mask=pad).mean(1))
        b = ref.head(ref.encoder(ref.embed(x), src_key_padding_mask=pad).mean(1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the module alone, against nn.MultiheadAttention with the heads' rows zeroed
    mha = model.encoder.layers[1].self_attn
    h = _x((3, 6, 16))
    with torch.no_grad():
        out, w = attn(h, h, h, need_weights=True, average_attn_weights=False)
        out_ref, w_ref = ref.encoder.layers[1].self_attn(h, h, h, need_weights=True,
                                                          average_attn_weights=False)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, w_ref[:, [1, 2]], atol=1e-6, rtol=0)
    assert mha.num_heads == 4  # caller's module untouched


def test_hf_attention_heads_bookkeeping_and_partial_heads():
    model = HFLayer().eval()
    res = S.remove(model, {"attention.self": [1]}, _ids())
    att = res.model.attention.self
    assert att.num_attention_heads == 3 and att.all_head_size == 12
    assert att.query.weight.shape == (12, 16) and res.model.attention.output.dense.in_features == 12
    # query and key units are tied by the product q·k; the value's by the reshape into heads
    with pytest.raises(ValueError, match=r"whole (heads|blocks)"):
        S.remove(model, {"attention.self.query": [0], "attention.self.key": [0]}, _ids())
    with pytest.raises(ValueError, match=r"breaks a dependency group"):
        S.remove(model, {"attention.self.query": [0, 1, 2, 3]}, _ids())


def test_bert_from_config():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: the tiny BertModel test is skipped")
    for attn in ("eager", "sdpa"):
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=24,
                                      attn_implementation=attn)
        torch.manual_seed(0)
        model = transformers.BertModel(cfg).eval()
        x = {"input_ids": torch.randint(0, 50, (2, 7)),
             "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
        sel = {"encoder.layer.0.attention.self": [1], "encoder.layer.1.intermediate.dense": [0, 3]}
        res = S.remove(model, sel, x)
        ref = S.masked(model, sel, x)
        assert res.params_after == res.params_before - 3 * 4 * 17 - 4 * 16 - 2 * 17 - 2 * 16
        with torch.no_grad():
            torch.testing.assert_close(res.model(**x).last_hidden_state,
                                       ref(**x).last_hidden_state, atol=1e-5, rtol=0)


def test_mean_replacement_folds_means_into_consumer_biases():
    """MRP Eq. 4: b_consumer += W_consumer[:, removed] · mean(removed activations)."""
    model = init(ConvBNFlat())
    x = _x((16, 3, 8, 8))
    sel = {"conv1": [1, 2], "conv2": [0, 5]}
    res = S.remove(model, sel, batch=(x, None), mean_replacement=True)
    acts = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: acts.__setitem__(n, a[0])) for n in ("conv2", "fc")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    mu2 = acts["conv2"].mean((0, 2, 3))
    b2 = (model.conv2.weight[:, [1, 2]].sum((2, 3)) * mu2[[1, 2]]).sum(1)
    cols = [c * 16 + p for c in (0, 5) for p in range(16)]
    bfc = model.fc.bias + model.fc.weight[:, cols] @ acts["fc"].mean(0)[cols]
    keep = [k for k in range(6) if k not in (0, 5)]
    torch.testing.assert_close(res.model.conv2.bias, b2[keep])   # conv2 had no bias: one is made
    torch.testing.assert_close(res.model.fc.bias, bfc.detach())
    ref = S.masked(model, sel, batch=(x, None), mean_replacement=True)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), ref(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mean_replacement=True needs batch"):
        S.remove(model, sel, x, mean_replacement=True)


def test_accepts_unit_prune_results_and_masked_models():
    model = init(ConvBNFlat())
    x = _x((8, 3, 8, 8))
    chosen = pl.units.prune(model, fraction=0.25, score="norm", layers=["conv1", "conv2"])
    res = S.remove(model, chosen, x)
    assert res.removed == chosen.pruned
    torch.testing.assert_close(res.model(x), chosen.model(x), atol=1e-5, rtol=0)
    masked = pl.prune(model, "mp", sparsity=0.5).model        # parametrized masks are honoured
    res = S.remove(masked, {"conv2": [1]}, x)
    ref = S.masked(masked, {"conv2": [1]}, x)
    torch.testing.assert_close(res.model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sel,match", [
    ({"1": list(range(16))}, r"selection\['1'\] removes all 16 .*cannot be emptied"),
    ({"1": [16]}, r"selection\['1'\]: indices \[16\] out of range for 16"),
    ({"1": [-1]}, r"out of range"),
    ({"1": ["a"]}, r"must be indices"),
    ({"nope": [0]}, r"'nope', which is not a removable layer"),
    ({"5": [0]}, r"channel 0 of layer '5' cannot be removed: it reaches the model output"),
])
def test_bad_selections(sel, match):
    with pytest.raises(ValueError, match=match):
        S.remove(mlp(), sel, _x((2, 12)))


def test_blocked_groups_name_the_layer_and_the_reason():
    x = _ids()
    with pytest.raises(ValueError, match=r"'embeddings'.*LayerNorm 'attention.output.LayerNorm'"):
        S.remove(HFLayer().eval(), {"embeddings": [0]}, x)
    with pytest.raises(ValueError, match=r"'stem' .*model input"):
        S.remove(_InputResidual().eval(), {"stem": [0]}, _x((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"'conv'.*flows into"):
        S.remove(_Softmaxed(), {"conv": [0]}, _x((2, 3, 4, 4)))


def test_untraceable_model():
    with pytest.raises(ValueError, match=r"cannot trace _Broken.*RuntimeError: boom"):
        S.dependencies(_Broken(), _x((2, 3)))
    with pytest.raises(ValueError, match=r"example input is needed"):
        S.dependencies(mlp())


class _InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.stem(x) + x).mean((2, 3)))


class _Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).softmax(1).mean((2, 3)))


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


# ----------------------------------------------------------------- side by side with Torch-Pruning

def _tp_prune(tp, model, x, layer, idxs, fn):
    model = copy.deepcopy(model)
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    dg.get_pruning_group(model.get_submodule(layer), fn, idxs=idxs).prune()
    return model


@pytest.mark.parametrize("case", ["resnet", "concat", "encoder"])
def test_same_as_torch_pruning(case):
    tp = pytest.importorskip("torch_pruning", reason="torch_pruning is not installed (test extra)")
    torch.manual_seed(0)
    model, x, layer, idxs, fn = {
        "resnet": (init(ResNetish()), _x((2, 3, 8, 8)), "stem", [2, 4], tp.prune_conv_out_channels),
        "concat": (init(Concat()), _x((2, 3, 8, 8)), "stem", [1, 2], tp.prune_conv_out_channels),
        "encoder": (EncoderClassifier().eval(), _x((2, 6, 5)), "encoder.layers.1.linear1",
                    [0, 5, 7], tp.prune_linear_out_channels),
    }[case]
    theirs = _tp_prune(tp, model, x, layer, idxs, fn)
    ours = S.remove(model, {layer: idxs}, x, expand=True)
    assert ours.params_after == sum(p.numel() for p in theirs.parameters())
    assert ours.params_after < ours.params_before
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), theirs(x), atol=1e-5, rtol=0)


def test_train_mode_model_keeps_its_mode_and_statistics():
    model = init(ResNetish()).train()
    stats = copy.deepcopy(model.state_dict())
    res = S.remove(model, {"block1.conv1": [0, 1]}, _x((4, 3, 8, 8)))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k      # BatchNorm running statistics not updated
    assert res.model.block1.conv1.out_channels == 6


def test_dependencies_of_an_unbatched_sequence():
    """A (T, E) input is no batch: slicing it would still trace, and the groups are the same."""
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    res = S.remove(model, {"0": [1, 2]}, _x((6, 5))[0])
    assert res.model[2].in_features == 6


def test_mean_replacement_through_attention_and_ffn():
    torch.manual_seed(0)
    model = HFLayer().eval()
    x = {"input_ids": torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(2))}
    sel = {"attention.self": [1], "intermediate": [0, 4]}
    res = S.remove(model, sel, batch=(x, None), mean_replacement=True)
    ref = S.masked(model, sel, batch=(x, None), mean_replacement=True)
    plain = S.masked(model, sel, x)
    with torch.no_grad():
        a, b, c = (f(**x)["logits"] for f in (res.model, ref, plain))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(b, c)                  # the fold did something
    # the value units' means went into attention.output.dense's bias
    assert not torch.equal(res.model.attention.output.dense.bias,
                           model.attention.output.dense.bias)
    enc = EncoderClassifier().eval()
    with pytest.raises(ValueError, match="not supported for nn.MultiheadAttention heads"):
        S.remove(enc, {"encoder.layers.0.self_attn": [1]}, batch=(_x((4, 6, 5)), None),
                 mean_replacement=True)


class _SliceAssign(nn.Module):
    """Writes a layer's channels into a preallocated tensor: followed only as far as it is safe."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(4, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x):
        buf = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        buf[:, :] = self.a(x)
        return self.b(buf) + self.d(torch.relu(self.c(x)))[:, :1]


def test_unfollowable_ops_block_only_their_channels():
    model = _SliceAssign()
    x = _x((3, 4))
    with pytest.raises(ValueError, match=r"layer 'a' cannot be removed: it flows into copy_"):
        S.remove(model, {"a": [0]}, x)
    res = S.remove(model, {"c": [1, 3]}, x)               # the other branch is still removable
    assert res.model.d.in_features == 3


class _RowNorm(nn.Module):
    """LayerNorm over the width of a conv map: it does not mix channels, so they stay removable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.mix(torch.relu(self.norm(self.conv(x)))).mean((2, 3)))


def test_layernorm_blocks_only_the_channels_it_normalises():
    x = _x((2, 3, 8, 8))
    res = S.remove(_RowNorm(), {"conv": [0, 5]}, x)
    assert res.model.mix.in_channels == 4 and res.max_diff <= 1e-5


def test_channels_last_model_stays_channels_last():
    """Removed input columns and output rows keep the layout the caller chose (a channels-last
    conv net runs its convolutions without layout reorders: bench_surgery)."""
    cl = torch.channels_last
    model = init(ResNetish()).to(memory_format=cl)
    x = _x((2, 3, 8, 8)).to(memory_format=cl)
    res = S.remove(model, {"stem": [2, 4], "block1.conv1": [1]}, x, expand=True)
    for name, p in res.model.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=cl), name
        else:
            assert p.is_contiguous(), name
    ref = S.masked(model, {"stem": [2, 4], "block1.conv1": [1]}, x, expand=True)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), ref(x), atol=1e-5, rtol=0)
    plain = S.remove(init(ResNetish()), {"stem": [2, 4]}, x, expand=True).model
    assert all(p.is_contiguous() for p in plain.parameters())
    assert model.stem.weight.is_contiguous(memory_format=cl)      # the caller's model untouched
