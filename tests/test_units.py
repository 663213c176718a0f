"""Unit pruning with mean replacement (MRP): prunelab.units."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab import models, units


from tests.unit_models import CONV_BATCH, MLP_BATCH  # noqa: E402
from tests.unit_models import batch as _batch  # noqa: E402
from tests.unit_models import conv as _conv  # noqa: E402
from tests.unit_models import mlp as _mlp  # noqa: E402
from tests.unit_models import same_state as _same_state  # noqa: E402
from tests.unit_models import state as _state  # noqa: E402


# ------------------------------------------------------------------------ MRP Sec. 3.3

@pytest.mark.parametrize("k", [1, 3])
def test_mean_replacement_is_optimal_bias_update_linear_regression(k):
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    mse = lambda out, t: 0.5 * ((out - t) ** 2).sum(1).mean()  # noqa: E731
    with torch.no_grad():  # start from the optimal output bias of the dense model
        model[1].bias.copy_((y - model[0](x) @ model[1].weight.T).mean(0))
    res = units.prune(model, count=k, score="bp_rand", layers=["0"], batch=(x, y),
                      loss_fn=mse, seed=3)
    (pruned,) = res.pruned.values()
    assert len(pruned) == k
    with torch.no_grad():
        h = model[0](x)
        w2 = model[1].weight
        keep = [i for i in range(6) if i not in pruned]
        # closed-form optimal bias (only the bias re-fitted on the batch), before and after
        b_dense = (y - h @ w2.T).mean(0)
        b_pruned = (y - h[:, keep] @ w2[:, keep].T).mean(0)
        optimal_change = b_pruned - b_dense
        mean_replacement = w2[:, pruned] @ h[:, pruned].mean(0)
        update = res.model[1].bias - model[1].bias
    torch.testing.assert_close(optimal_change, mean_replacement, rtol=0, atol=1e-12)
    torch.testing.assert_close(update, optimal_change, rtol=0, atol=1e-12)
    # so the pruned model's bias is optimal again: no bias shift lowers its loss
    b = res.model[1].bias.detach().clone().requires_grad_(True)
    out = F.linear(res.model[0](x)[:, keep].detach(), res.model[1].weight[:, keep].detach(), b)
    (grad,) = torch.autograd.grad(mse(out, y), [b])
    assert grad.abs().max() < 1e-12


# ------------------------------------------------------------------------ masked == physical

@pytest.mark.parametrize("score", ["norm", "bp_norm", "abs_mrs", "bp_abs_mrs"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_masked_equals_physical_mlp(score, activation):
    model = _mlp(activation)
    x, y = MLP_BATCH
    masked = units.prune(model, fraction=0.3, score=score, batch=(x, y))
    phys = units.prune(model, fraction=0.3, score=score, batch=(x, y), physical=True)
    assert masked.pruned == phys.pruned
    assert masked.pruned == {"fc1": masked.pruned["fc1"], "fc2": masked.pruned["fc2"]}
    assert phys.model.fc1.out_features == 10 - 3 and phys.model.fc2.in_features == 7
    assert phys.model.fc2.out_features == 8 - 2 and phys.model.fc3.in_features == 6
    torch.testing.assert_close(masked.model(x), phys.model(x), rtol=0, atol=1e-12)
    # sigmoid(0) = 0.5: zeroing consumer columns really removes the unit
    with torch.no_grad():
        for name, idx in masked.pruned.items():
            nxt = {"fc1": "fc2", "fc2": "fc3"}[name]
            assert masked.model.get_submodule(nxt).weight[:, idx].abs().max() == 0
            assert not masked.masks[f"{nxt}.weight"][:, idx].any()


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("score", ["rand", "bp_rand", "bp_mrs"])
def test_masked_equals_physical_conv(bn, score):
    model = _conv(bn=bn)
    x, y = CONV_BATCH
    masked = units.prune(model, fraction=0.25, score=score, batch=(x, y))
    phys = units.prune(model, fraction=0.25, score=score, batch=(x, y), physical=True)
    assert masked.pruned == phys.pruned
    assert set(masked.pruned) == {"features.conv1", "features.conv2", "features.conv3",
                                  "classifier.fc1", "classifier.fc2"}
    model.eval(), masked.model.eval(), phys.model.eval()
    torch.testing.assert_close(masked.model(x), phys.model(x), rtol=0, atol=1e-10)
    sizes = {n: len(i) for n, i in phys.pruned.items()}
    assert phys.model.features.conv1.out_channels == 4 - sizes["features.conv1"]
    assert phys.model.features.conv2.in_channels == 4 - sizes["features.conv1"]
    c3 = 16 - sizes["features.conv3"]
    assert phys.model.classifier.fc1.in_features == c3 * 2 * 2  # flatten block per channel
    if bn:
        assert phys.model.features.bn3.num_features == c3
    # the caller's model is untouched
    assert model.features.conv1.out_channels == 4


def test_mean_replacement_replaces_consumer_input_by_its_mean():
    """Eq. 4 in a valid-padded conv net is exact: the pruned channel (conv -> conv, and
    conv -> flatten -> Linear per position) reads as its batch mean."""
    model = _conv()
    x, y = CONV_BATCH
    res = units.prune(model, count=2, score="bp_rand", batch=(x, y),
                      layers=["features.conv2", "features.conv3", "classifier.fc1"])
    model.eval()
    means = {}

    def capture(name):
        def fn(module, args):
            means[name] = args[0].mean(0, keepdim=True)
        return fn

    hs = [model.get_submodule(c).register_forward_pre_hook(capture(c))
          for c in ("features.conv3", "classifier.fc1", "classifier.fc2")]
    model(x)
    for h in hs:
        h.remove()
    pr = res.pruned
    ref = copy.deepcopy(model)

    def conv_replace(idx, mean):
        def fn(module, args):
            z = args[0].clone()
            z[:, idx] = mean[:, idx].mean(dim=(2, 3), keepdim=True)  # per-channel mean
            return (z,)
        return fn

    def flat_replace(idx, block, mean):
        cols = torch.tensor([c * block + p for c in idx for p in range(block)])

        def fn(module, args):
            z = args[0].clone()
            z[:, cols] = mean[:, cols]  # per flattened position
            return (z,)
        return fn

    ref.features.conv3.register_forward_pre_hook(
        conv_replace(pr["features.conv2"], means["features.conv3"]))
    ref.classifier.fc1.register_forward_pre_hook(
        flat_replace(pr["features.conv3"], 4, means["classifier.fc1"]))
    ref.classifier.fc2.register_forward_pre_hook(
        flat_replace(pr["classifier.fc1"], 1, means["classifier.fc2"]))
    torch.testing.assert_close(res.model.eval()(x), ref(x), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------ scores

def test_score_registry_is_table1_with_docstrings():
    assert units.BASE_SCORES == tuple(units.UNIT_SCORES)
    assert set(units.UNIT_SCORES) == {"rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs"}
    assert units.names() == list(units.SCORES)
    assert units.SCORES == units.BASE_SCORES + tuple("bp_" + s for s in units.BASE_SCORES)
    for tag, fn in units.UNIT_SCORES.items():
        assert callable(fn) and "MRP Table 1" in fn.__doc__, tag
    for tag in units.SCORES:
        assert units.parse_score(tag) == (tag.removeprefix("bp_"), tag.startswith("bp_"))


@pytest.mark.parametrize("bad", ["nope", "bp_", "RS", 3])
def test_unknown_score_lists_valid_names(bad):
    with pytest.raises(ValueError, match="valid names") as info:
        units.parse_score(bad)
    assert all(tag in str(info.value) for tag in units.SCORES)
    with pytest.raises(ValueError, match="valid names"):
        units.score_units(_mlp(), units.layer_units(_mlp(), None), "bp_rs", None, 0)


def test_score_units_equals_score_with_shared_statistics():
    # the public building blocks give the same numbers as units.score
    model = _conv()
    chosen = units.layer_units(model, None)
    stats = units.unit_statistics(model, chosen, CONV_BATCH, F.cross_entropy, True)
    for base in units.BASE_SCORES:
        want = units.score(model, base, batch=CONV_BATCH, seed=4)
        got = units.score_units(model, chosen, base, stats, 4)
        assert list(got) == list(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (base, name)
    res = units.prune(model, fraction=0.25, score="bp_abs_mrs", stats=stats)
    ref = units.prune(model, fraction=0.25, score="bp_abs_mrs", batch=CONV_BATCH)
    assert res.pruned == ref.pruned
    torch.testing.assert_close(res.model(CONV_BATCH[0]), ref.model(CONV_BATCH[0]))


@pytest.mark.parametrize("score", units.SCORES)
def test_every_score_runs_and_is_deterministic(score):
    assert len(units.SCORES) == 12
    for model, batch in ((_mlp(), MLP_BATCH), (_conv(), CONV_BATCH)):
        a = units.prune(model, fraction=0.2, score=score, batch=batch, seed=5)
        b = units.prune(model, fraction=0.2, score=score, batch=batch, seed=5)
        for name, s in a.scores.items():
            assert s.shape == (a.sizes[name],) and torch.isfinite(s).all()
            assert torch.equal(s, b.scores[name])
            assert a.pruned[name] == sorted(a.pruned[name])
            assert a.pruned[name] == torch.sort(s, stable=True).indices[:len(a.pruned[name])].sort().values.tolist()
        assert a.mean_replacement == score.startswith("bp_")
        assert a.examples == batch[0].shape[0]
        tab = a.table()
        assert list(tab.columns[:4]) == ["layer", "units", "pruned", "fraction"]
        assert tab.pruned.tolist() == [len(a.pruned[n]) for n in tab.layer]


def _reference_taylor(model, layer, consumer, flat, batch, kind):
    """Brute force: d/dt_u of the loss when the consumer input of unit u becomes a + t_u·Δa."""
    x, y = batch
    model = copy.deepcopy(model).eval()
    n = model.get_submodule(layer).weight.shape[0]
    cap = {}
    h = model.get_submodule(consumer).register_forward_pre_hook(
        lambda m, args: cap.__setitem__("a", args[0].detach()))
    model(x)
    h.remove()
    a = cap["a"]
    conv = a.dim() > 2
    mean = a.mean(dim=(0, 2, 3), keepdim=True) if conv else a.mean(0, keepdim=True)
    delta = (mean - a) if kind == "mrs" else -a
    t = torch.zeros(n, dtype=torch.float64, requires_grad=True)

    def shift(m, args):
        if conv:
            return (args[0] + t[None, :, None, None] * delta,)
        return (args[0] + torch.repeat_interleave(t, flat) * delta,)

    model.get_submodule(consumer).register_forward_pre_hook(shift)
    signed = torch.autograd.grad(F.cross_entropy(model(x), y), [t])[0]
    absolute = torch.zeros(n, dtype=torch.float64)
    for i in range(x.shape[0]):  # E_i |per-example first-order change|
        gi = torch.autograd.grad(F.cross_entropy(model(x)[i:i + 1], y[i:i + 1]), [t])[0]
        # the shift of example i only matters for example i
        absolute += gi.abs() / x.shape[0]
    return signed, absolute


@pytest.mark.parametrize("kind", ["rs", "mrs"])
def test_taylor_scores_match_autograd_reference(kind):
    cases = [(_mlp(), MLP_BATCH, "fc1", "fc2", 1),
             (_conv(), CONV_BATCH, "features.conv2", "features.conv3", None),
             (_conv(), CONV_BATCH, "features.conv3", "classifier.fc1", 4)]
    for model, batch, layer, consumer, flat in cases:
        signed, absolute = _reference_taylor(model, layer, consumer, flat, batch, kind)
        s = units.score(model, kind, layers=[layer], batch=batch)[layer]
        a = units.score(model, f"abs_{kind}", layers=[layer], batch=batch)[layer]
        torch.testing.assert_close(s, signed, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(a, absolute, rtol=1e-9, atol=1e-13)


def test_norm_and_rand_scores():
    model = _mlp()
    s = units.score(model, "norm", layers=["fc1"])["fc1"]
    torch.testing.assert_close(s, model.fc1.weight.detach().norm(dim=1))
    r0 = units.score(model, "rand", seed=0)
    r1 = units.score(model, "rand", seed=1)
    assert not torch.equal(r0["fc1"], r1["fc1"])
    assert torch.equal(r0["fc1"], units.score(model, "rand", seed=0)["fc1"])


def test_mean_replacement_lowers_pruning_penalty_on_trained_mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g, dtype=torch.float64)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    model = models.build("mlp", input_shape=(12,), num_classes=4, hidden=(32,),
                         activation="relu", seed=0).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        dense = F.cross_entropy(model(x), y).item()
    wins = 0
    trials = 8
    for seed in range(trials):
        pen = {}
        for score in ("rand", "bp_rand"):
            res = units.prune(model, fraction=0.3, score=score, batch=(x, y), seed=seed)
            assert res.pruned["fc1"]
            with torch.no_grad():
                pen[score] = F.cross_entropy(res.model(x), y).item() - dense
        wins += pen["bp_rand"] < pen["rand"]
    assert wins > trials // 2


# ------------------------------------------------------------------------ options and errors

def test_inplace_and_default_layers():
    model = _mlp()
    before = _state(model)
    res = units.prune(model, count=2, score="bp_norm", batch=MLP_BATCH)
    assert set(res.pruned) == {"fc1", "fc2"}  # the output layer's units are the classes
    assert _same_state(model, before)
    res2 = units.prune(model, count=2, score="bp_norm", batch=MLP_BATCH, inplace=True)
    assert res2.model is model
    torch.testing.assert_close(model(MLP_BATCH[0]), res.model(MLP_BATCH[0]))


def test_per_layer_fraction_and_count():
    model = _mlp()
    res = units.prune(model, fraction={"fc1": 0.3, "fc2": 0.5}, score="bp_abs_mrs",
                      batch=MLP_BATCH)
    sizes = res.sizes
    assert {k: len(v) for k, v in res.pruned.items()} == {
        "fc1": 3, "fc2": 4}  # 0.3 of 10 and 0.5 of 8 units
    # the same as pruning each layer with its own count, all at once
    counts = {k: len(v) for k, v in res.pruned.items()}
    same = units.prune(model, count=counts, score="bp_abs_mrs", batch=MLP_BATCH,
                       layers=["fc2", "fc1"])
    assert same.pruned == res.pruned
    torch.testing.assert_close(same.model(MLP_BATCH[0]), res.model(MLP_BATCH[0]))
    only = units.prune(model, count={"fc2": 1}, score="norm")
    assert list(only.pruned) == ["fc2"] and len(only.pruned["fc2"]) == 1


def test_consumer_without_bias_gets_one():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2, bias=False)).double()
    x, y = _batch((4,), n=10, classes=2)
    res = units.prune(model, count=2, score="bp_rand", batch=(x, y), layers=["0"])
    assert res.model[2].bias is not None and model[2].bias is None
    phys = units.prune(model, count=2, score="bp_rand", batch=(x, y), layers=["0"],
                       physical=True)
    torch.testing.assert_close(res.model(x), phys.model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(fraction=0.0), "0.0"),
    (dict(fraction=1.0), "1.0"),
    (dict(fraction=-0.2), "-0.2"),
    (dict(fraction=1.5), "1.5"),
    (dict(fraction=0.1, count=1), "count=1"),
    (dict(count=-1), "-1"),
    (dict(fraction=0.1, score="abs_taylor"), "abs_taylor"),
    (dict(fraction=0.1, layers=["fc9"]), "fc9"),
    (dict(fraction=0.1, layers=["fc3"]), "fc3"),
    (dict(fraction=0.1, score="abs_mrs", batch=None), "abs_mrs"),
    (dict(fraction=0.1, score="bp_norm", batch=None), "bp_norm"),
    (dict(count=10, layers=["fc1"]), "fc1"),
    (dict(fraction=0.99, layers=["fc1"]), "fc1"),
    (dict(fraction={"fc1": 0.5, "fc2": 1.2}), r"fraction\['fc2'\]"),
    (dict(count={"fc1": 2, "fc2": True}), r"count\['fc2'\]"),
    (dict(fraction={"fc1": 0.5}, layers=["fc1", "fc2"]), "same layers"),
    (dict(count={}), "at least one layer"),
    (dict(count={"fc9": 1}), "fc9"),
])
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, needle):
    model = _mlp()
    before = _state(model)
    kwargs = {"batch": MLP_BATCH, **kwargs}
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("+", r"\+")):
        units.prune(model, inplace=True, **kwargs)
    assert _same_state(model, before)


def test_residual_add_raises():
    model = models.build("resnet18", input_shape=(3, 8, 8), num_classes=3, width=1 / 16, seed=0)
    x, y = _batch((3, 8, 8), n=2, classes=3)
    x = x.to(next(model.parameters()).dtype)
    with pytest.raises(ValueError, match="residual"):
        units.prune(model, count=1, score="norm", layers=["stem.conv"], physical=True)
    # a conv whose only consumer is the next conv of the block works, masked and physical
    name = "layer1.0.conv1"
    model.eval()
    masked = units.prune(model, count=1, score="bp_abs_rs", layers=[name], batch=(x, y))
    phys = units.prune(model, count=1, score="bp_abs_rs", layers=[name], batch=(x, y),
                       physical=True)
    torch.testing.assert_close(masked.model.eval()(x), phys.model.eval()(x), rtol=1e-5, atol=1e-5)


def test_given_unit_scores_prune_lowest_and_validate():
    model = _mlp()
    given = {"fc1": torch.arange(10.0).flip(0), "fc2": torch.tensor([5., 1, 7, 0, 3, 9, 8, 2])}
    res = units.prune(model, count=2, score="mine", unit_scores=given, layers=["fc1", "fc2"])
    assert res.pruned == {"fc1": [8, 9], "fc2": [1, 3]} and not res.mean_replacement
    bp = units.prune(model, count=2, score="mine", unit_scores=given, layers=["fc1", "fc2"],
                     batch=MLP_BATCH, mean_replacement=True)
    ref = units.prune(model, count=2, score="bp_rand", layers=["fc1", "fc2"], batch=MLP_BATCH)
    ref_state = units.prune(model, count=2, score="bp_rand", layers=["fc1", "fc2"],
                            batch=MLP_BATCH, unit_scores={k: torch.tensor(
                                [0. if i in ref.pruned[k] else 1. for i in range(n)])
                                for k, n in ref.sizes.items()}).model.state_dict()
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(v, ref_state[k])
    assert bp.mean_replacement and bp.means
    state = _state(model)
    with pytest.raises(ValueError, match="exactly the chosen layers"):
        units.prune(model, count=2, score="x", unit_scores={"fc1": given["fc1"]},
                    layers=["fc1", "fc2"])
    with pytest.raises(ValueError, match="has 3 values"):
        units.prune(model, count=1, score="x", unit_scores={"fc1": torch.ones(3)}, layers=["fc1"])
    assert _same_state(model, state)


# ------------------------------------------------------------ study helpers (MRP Sec. 4, App. 6.2)
