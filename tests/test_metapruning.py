"""MetaPruning (Liu et al. 2019): PruningNet, BN recalibration, evolutionary search, FLOPs."""
import random

import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import metapruning as mp

SMALL = mp.ChannelSpace((1, 8, 8), 4, widths=(3, 5, 4), pool_after=(1, 3))


def _data(n=64, seed=0, shape=(1, 8, 8), classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_match_a_hand_count_on_a_two_layer_conv_net():
    # conv1 1->4 (3x3, same) on 6x6: 36 positions * 4 * 1 * 9 = 1296; pool -> 3x3;
    # conv2 4->3 on 3x3: 9 * 3 * 4 * 9 = 972; fc: 3 channels * 9 positions * 5 classes = 135
    space = mp.ChannelSpace((1, 6, 6), 5, widths=(4, 3), pool_after=(1,))
    assert space.flops() == 1296 + 972 + 135
    assert mp.count_flops(space.build(seed=0), space.input_shape) == 2403
    # encoding (2, 1): 36*2*1*9 + 9*1*2*9 + 1*9*5
    assert space.flops((2, 1)) == 648 + 162 + 45
    assert mp.count_flops(space.build((2, 1), seed=0), space.input_shape) == 855


def test_count_flops_of_any_model_by_hand():
    # valid 3x3 conv 2->3 on 5x5 gives 3x3 outputs: 9 * 3 * 2 * 9 = 486; linear 27 -> 4: 108
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    assert mp.count_flops(net, (2, 5, 5)) == 486 + 108
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))  # 25 pos * 4 out * 2 in/group
    assert mp.count_flops(grouped, (4, 5, 5)) == 200


def test_space_flops_agree_with_counted_flops_of_built_networks():
    rng = random.Random(0)
    for space in (SMALL, mp.ChannelSpace((2, 16), 3, widths=(4, 6), pool_after=(1, 2)),
                  mp.ChannelSpace((1, 7, 5), 3, widths=(2, 3, 2), pool_after=(1, 2, 3))):
        for _ in range(10):
            enc = space.random(rng)
            assert space.flops(enc) == mp.count_flops(space.build(enc, seed=0), space.input_shape)


def test_uniform_scaling_meets_the_budget():
    full = SMALL.flops()
    assert SMALL.flops(SMALL.smallest) / full < 0.15
    for frac in (0.15, 0.3, 0.5, 0.8):
        enc = SMALL.uniform(frac * full)
        assert SMALL.flops(enc) <= frac * full
        ratios = [c / w for c, w in zip(enc, SMALL.widths)]
        assert max(ratios) - min(ratios) < 0.5  # one multiplier for all layers, up to rounding
    assert SMALL.uniform(full) == SMALL.full
    with pytest.raises(ValueError, match="smallest network"):
        SMALL.uniform(SMALL.flops(SMALL.smallest) - 1)


# ----------------------------------------------------------------------------- encodings

@pytest.mark.parametrize("enc,match", [
    ((0, 5, 4), "features.conv1.*0"),
    ((3, 6, 4), "features.conv2.*6.*1..5"),
    ((3, 5), "2 channel numbers, expected 3.*features.conv1, features.conv2, features.conv3"),
    ((3, 5, 4, 1), "4 channel numbers, expected 3"),
    ((3, 2.0, 4), "features.conv2.*not an integer"),
    ((3, 5, 2.5), "features.conv3.*not an integer"),
    ((True, 5, 4), "features.conv1.*not an integer"),
    ((3, "5", 4), "features.conv2.*not an integer"),
    ((3, 5, -1), "features.conv3"),
    (7, "sequence"),
])
def test_bad_encodings_raise_naming_the_layer(enc, match):
    pnet = mp.PruningNet(SMALL, hidden=4)
    for call in (SMALL.check, SMALL.flops, SMALL.build, pnet.generate, pnet.materialize):
        with pytest.raises(ValueError, match=match):
            call(enc)


def test_numpy_and_tensor_encodings_are_accepted():
    np = pytest.importorskip("numpy")
    assert SMALL.check(np.array([1, 2, 3])) == (1, 2, 3)
    assert SMALL.check(torch.tensor([3, 5, 4])) == (3, 5, 4)


# ----------------------------------------------------------------------------- PruningNet

def test_pruningnet_generates_the_right_shapes_for_every_encoding():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    x, _ = _data(6)
    count = 0
    for c1 in range(1, 4):
        for c2 in range(1, 6):
            for c3 in range(1, 5):
                enc = (c1, c2, c3)
                weights = pnet.generate(enc)
                target = SMALL.build(enc, seed=0).state_dict()
                for name, w in weights.items():
                    assert w.shape == target[name].shape, (enc, name)
                assert pnet(x, enc).shape == (6, 4)
                count += 1
    assert count == 3 * 5 * 4


def test_materialized_network_computes_what_the_pruningnet_computes():
    """The plain smaller network holds exactly the generated weights: with BN on batch
    statistics (train mode) it gives the PruningNet's logits."""
    pnet = mp.PruningNet(SMALL, hidden=8, seed=1)
    x, _ = _data(16)
    for enc in ((3, 5, 4), (1, 2, 3), (2, 1, 1)):
        net = pnet.materialize(enc).train()
        assert SMALL.encoding_of(net) == enc
        torch.testing.assert_close(net(x), pnet(x, enc))


def test_generation_is_differentiable_and_crops_the_widest_weight():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    x, y = _data(8)
    loss = nn.functional.cross_entropy(pnet(x, (2, 3, 1)), y)
    loss.backward()
    assert all(p.grad is not None for p in pnet.blocks[0].parameters())
    # the classifier block's output is cropped to the first c_L channels' columns
    full = pnet.blocks[-1](torch.tensor([1 / 4, 1.0])).reshape(4, 4, -1)
    torch.testing.assert_close(pnet.generate((2, 3, 1))["classifier.fc1.weight"],
                               full[:, :1].reshape(4, -1))


def test_pruningnet_float64():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0).double()
    x, y = _data(32)
    assert pnet(x, (2, 2, 2)).dtype == torch.float64
    net = pnet.materialize((2, 2, 2))
    assert next(net.parameters()).dtype == torch.float64
    acc = mp.candidate_accuracy(pnet, (2, 2, 2), calib=x, val=(x, y))
    assert 0.0 <= acc <= 1.0


def test_pruningnet_training_is_deterministic_for_a_seed():
    x, y = _data(64)
    recipe = pl.train.Recipe(epochs=2, batch_size=16)
    nets = []
    for _ in range(2):
        pnet = mp.PruningNet(SMALL, hidden=8, seed=3)
        mp.train_pruningnet(pnet, (x, y), recipe=recipe, seed=5, progress=False)
        nets.append(pnet)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_full_width_pruningnet_trains_to_the_dense_accuracy_class():
    """With the encoding fixed to the full width the PruningNet trains one network; on digits
    it reaches the accuracy class of the same network trained directly (smoke bound)."""
    bundle = pl.data.load("digits")
    space = mp.default_space(bundle, widths=(8, 16, 16, 16))
    recipe = pl.train.Recipe(epochs=8, batch_size=64, lr=2e-3)
    dense = space.build(seed=0)
    pl.train.fit(dense, bundle.train, recipe=recipe, seed=0, progress=False)
    dense_acc = pl.train.evaluate(dense, bundle.test)["accuracy"]
    pnet = mp.PruningNet(space, seed=0)
    mp.train_pruningnet(pnet, bundle.train, recipe=recipe, seed=0, encoding=space.full,
                        progress=False)
    net = mp.build_pruned(pnet, space.full, calib=bundle.train.tensors[0][:300])
    acc = pl.train.evaluate(net, bundle.test)["accuracy"]
    assert dense_acc > 0.9
    assert acc > 0.9 and acc > dense_acc - 0.05, (acc, dense_acc)


# ----------------------------------------------------------------------------- BN recalibration

def test_recalibrate_bn_computes_the_statistics_of_the_data_and_copies():
    net = SMALL.build(seed=0)
    x, _ = _data(50)
    before = net.features.bn1.running_mean.clone()
    out = mp.recalibrate_bn(net, x, batch_size=50)
    assert torch.equal(net.features.bn1.running_mean, before)  # caller's model untouched
    with torch.no_grad():
        h = out.features.conv1(x)
    torch.testing.assert_close(out.features.bn1.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(out.features.bn1.running_var, h.var((0, 2, 3), unbiased=True))
    assert out.features.bn1.momentum == net.features.bn1.momentum and not out.training


# ----------------------------------------------------------------------------- search

def _search(pnet, budget, **kw):
    x, y = _data(40, seed=1)
    defaults = dict(calib=x, val=(x, y), population=12, top_k=4, mutations=6, crossovers=6,
                    generations=4, progress=False)
    return mp.search(pnet, budget, **{**defaults, **kw})


@pytest.mark.parametrize("frac", [0.15, 0.3, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_never_evaluates_or_returns_a_candidate_over_budget(frac, seed):
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    budget = frac * SMALL.flops()
    res = _search(pnet, budget, seed=seed)
    assert res.best is not None and SMALL.flops(res.best) <= budget
    assert (res.history["flops"] <= budget).all() and len(res.history) > 0
    assert all(SMALL.flops(c) <= budget for c, _ in res.population + res.top)
    assert not res.history["encoding"].duplicated().any()
    assert res.best_accuracy == res.history["accuracy"].max()
    assert set(res.history["origin"]) >= {"random"}
    assert res.generations["best_accuracy"].is_monotonic_increasing


def test_search_uses_mutation_and_crossover_of_the_top_k(monkeypatch):
    # a fitness that separates every encoding, so the top-K are distinct parents
    monkeypatch.setattr(mp, "candidate_fitness",
                        lambda pnet, c, **kw: {"accuracy": random.Random(str(c)).random(),
                                               "loss": 0.0})
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    res = _search(pnet, 0.6 * SMALL.flops(), generations=3)
    later = res.history[res.history["generation"] > 0]
    assert {"mutation", "crossover"} <= set(later["origin"])
    # the returned encoding is the fittest of all evaluated; the top-K are the K fittest
    assert res.best_accuracy == res.history["accuracy"].max()
    best4 = res.history.nlargest(4, "accuracy")["accuracy"].tolist()
    assert [a for _, a in res.top] == best4


def test_search_is_deterministic_for_a_seed():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    a = _search(pnet, 0.4 * SMALL.flops(), seed=7, generations=2)
    b = _search(pnet, 0.4 * SMALL.flops(), seed=7, generations=2)
    assert a.history.equals(b.history) and a.best == b.best
    c = _search(pnet, 0.4 * SMALL.flops(), seed=8, generations=2)
    assert not a.history["encoding"].equals(c.history["encoding"])


def test_search_breaks_accuracy_ties_by_validation_loss(monkeypatch):
    # every candidate equally accurate: the returned one has the lowest validation loss
    monkeypatch.setattr(mp, "candidate_fitness",
                        lambda pnet, c, **kw: {"accuracy": 0.5,
                                               "loss": random.Random(str(c)).random()})
    res = _search(mp.PruningNet(SMALL, hidden=8, seed=0), 0.6 * SMALL.flops())
    assert res.best == res.history.loc[res.history["loss"].idxmin(), "encoding"]


def test_candidate_fitness_is_the_accuracy_and_loss_of_the_materialized_net():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    x, y = _data(40)
    fit = mp.candidate_fitness(pnet, (2, 3, 2), calib=x, val=(x, y), batch_size=7)
    ev = pl.train.evaluate(mp.build_pruned(pnet, (2, 3, 2), calib=x), (x, y))
    assert fit["accuracy"] == pytest.approx(ev["accuracy"])
    assert fit["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    assert mp.candidate_accuracy(pnet, (2, 3, 2), calib=x, val=(x, y)) == fit["accuracy"]


def test_search_bad_arguments():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    with pytest.raises(ValueError, match="smallest network"):
        _search(pnet, SMALL.flops(SMALL.smallest) - 1)
    with pytest.raises(ValueError, match="mutation_prob"):
        _search(pnet, SMALL.flops(), mutation_prob=1.5)
    with pytest.raises(ValueError, match="population"):
        _search(pnet, SMALL.flops(), population=0)


def test_interrupt_keeps_the_population_so_far(monkeypatch):
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    real = mp.candidate_fitness
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12 + 5:  # the 6th candidate of the second generation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mp, "candidate_fitness", flaky)
    res = _search(pnet, 0.5 * SMALL.flops())
    assert res.interrupted
    assert len(res.history) == 16 and len(res.generations) == 1
    assert len(res.population) == 4  # the part of generation 1 evaluated before the interrupt
    assert res.best is not None and res.best_accuracy == res.history["accuracy"].max()
    assert SMALL.flops(res.best) <= 0.5 * SMALL.flops()


# ----------------------------------------------------------------------------- pruned networks

def test_channel_prune_keeps_the_largest_l1_channels_and_does_not_touch_the_model():
    dense = SMALL.build(seed=0)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    enc = (2, 3, 2)
    net = mp.channel_prune(dense, SMALL, enc, criterion="mp-l1")
    assert SMALL.encoding_of(net) == enc
    assert mp.count_flops(net, SMALL.input_shape) == SMALL.flops(enc)
    w = dense.features.conv1.weight
    keep = sorted(torch.argsort(w.abs().sum((1, 2, 3)), descending=True)[:2].tolist())
    torch.testing.assert_close(net.features.conv1.weight, w[keep])
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="widest"):
        mp.channel_prune(net, SMALL, enc)


def test_build_pruned_scratch_and_generated():
    pnet = mp.PruningNet(SMALL, hidden=8, seed=0)
    x, _ = _data(20)
    gen = mp.build_pruned(pnet, (1, 2, 3), calib=x)
    scratch = mp.build_pruned(pnet, (1, 2, 3), init="scratch", seed=0)
    assert SMALL.encoding_of(gen) == SMALL.encoding_of(scratch) == (1, 2, 3)
    torch.testing.assert_close(gen.features.conv2.weight, pnet.generate((1, 2, 3))
                               ["features.conv2.weight"].detach())
    with pytest.raises(ValueError, match="init"):
        mp.build_pruned(pnet, (1, 2, 3), init="nope")


def test_compare_tiny_gives_a_tidy_frame_within_budgets():
    bundle = pl.data.load("digits")
    space = mp.default_space(bundle, widths=(4, 8, 8, 8))
    recipe = pl.train.Recipe(epochs=1, batch_size=100)
    res = mp.compare(bundle, space=space, budgets=(0.3, 0.6), seeds=(0,), dense_recipe=recipe,
                     search_kwargs=dict(population=6, top_k=3, mutations=3, crossovers=3,
                                        generations=2), progress=False)
    f = res.frame
    assert not res.interrupted
    assert set(f["method"]) == {"dense", *mp.METHODS}
    assert len(f) == 1 + 2 * 4
    pruned = f[f["method"] != "dense"]
    assert (pruned["flops"] <= pruned["budget_flops"]).all()
    s = mp.summary(f)
    assert {"method", "budget", "mean", "std", "text"} <= set(s.columns)
    assert len(res.searches) == 2 * 2
    import plotly.graph_objects as go
    assert isinstance(pl.plots.accuracy_vs_flops(f), go.Figure)
    assert isinstance(pl.plots.search_progress(res.searches), go.Figure)
    ax = pl.figures.accuracy_vs_flops(f)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == f["method"].nunique()  # every method, the dense reference included
