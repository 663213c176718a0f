"""Layer-collapse diagnostics (Tanaka et al. 2020): ρ_max, collapse detection, critical compression
by bisection, conservation of synaptic saliency."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import collapse as K
from prunelab import masks as M
from prunelab.explore import Pruner


def _two_layer(n_in=10, n_hidden=6, n_out=3):
    """Linear(10→6) with |w| in [1, 2], Linear(6→3) with |w| in [0.1, 0.5]: global MP empties
    layer 2 before touching layer 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
    with torch.no_grad():
        w1, w2 = net[0].weight, net[2].weight
        w1.copy_((1 + torch.rand_like(w1)) * torch.sign(torch.randn_like(w1)))
        w2.copy_((0.1 + 0.4 * torch.rand_like(w2)) * torch.sign(torch.randn_like(w2)))
    return net


def _bias_free_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 12, bias=False),
                         nn.ReLU(), nn.Linear(12, 3, bias=False))


def _bias_free_convnet():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 5, bias=False))
    return net


def test_max_compression_is_n_over_l():
    net = _two_layer()  # biases are not prunable: N = 10·6 + 6·3 = 78 weights, L = 2 layers
    assert K.max_compression(net) == pytest.approx(78 / 2)
    m = pl.models.build("vgg11", input_shape=(3, 32, 32), num_classes=10, seed=0, width=0.25)
    ws = [p for n, p in m.named_parameters() if n in pl.graph.prunable_names(m)]
    assert K.max_compression(m) == pytest.approx(sum(w.numel() for w in ws) / len(ws))


def test_collapsed_on_hand_made_masks():
    masks = {"a.weight": torch.tensor([[True, False], [False, False]]),
             "b.weight": torch.zeros(3, 2, dtype=torch.bool),
             "c.weight": torch.ones(2, dtype=torch.bool),
             "d.weight": torch.zeros(1, 4, dtype=torch.bool)}
    assert K.collapsed(masks) == ["b.weight", "d.weight"]
    assert K.collapsed({"a.weight": torch.ones(2, 2, dtype=torch.bool)}) == []


def test_layer_density_matches_masks_density_and_prune():
    net = _two_layer()
    rhos = [1.0, 2.0, 78 / 60, 5.0]
    df = K.layer_density(net, ["mp", "synflow"], rhos, iterations=5)
    assert len(df) == 2 * len(rhos) * 2
    assert list(df.columns) == ["criterion", "scope", "compression", "density_target", "layer",
                                "numel", "kept", "density", "collapsed"]
    for (crit, rho), part in df.groupby(["criterion", "compression"]):
        kw = {"iterations": 5} if crit == "synflow" else {}
        masks = pl.prune(net, crit, sparsity=1 - 1 / rho, **kw).masks
        ref = M.density(masks).set_index("layer")
        for _, row in part.iterrows():
            assert row.kept == ref.loc[row.layer, "kept"]
            assert row.numel == ref.loc[row.layer, "numel"]
            assert row.density == pytest.approx(ref.loc[row.layer, "density"])
            assert row.collapsed == (row.kept == 0)
        total_kept = part.kept.sum()
        assert total_kept == 78 - M.n_pruned(1 - 1 / rho, 78)
    mp = df[df.criterion == "mp"].set_index(["compression", "layer"])
    # ρ = 78/60 prunes 18 weights = all of layer 2 under global MP: collapse exactly there.
    assert bool(mp.loc[(78 / 60, "2.weight"), "collapsed"])
    assert not bool(mp.loc[(1.0, "2.weight"), "collapsed"])
    assert not df[df.criterion == "synflow"].collapsed.any()


def test_critical_compression_bisection_finds_known_threshold():
    net = _two_layer()
    # Global MP prunes the 18 small weights of layer 2 first: collapse iff floor(N − N/ρ) >= 18,
    # i.e. ρ >= N / n1 = 78 / 60.
    threshold = 78 / 60
    tol = 1e-3
    r = K.critical_compression_search(net, "mp", tol=tol)
    assert r["lo"] < threshold <= r["hi"]
    assert r["hi"] / r["lo"] <= 1 + tol
    assert r["critical"] == r["lo"]
    assert r["collapsed_layers"] == ["2.weight"]
    assert r["max_compression"] == pytest.approx(39.0)
    expected_probes = 2 + math.ceil(math.log2(math.log(39.0) / math.log1p(tol)))
    assert r["evaluations"] <= expected_probes + 1
    assert K.critical_compression(net, "mp", tol=tol) == r["critical"]
    # SynFlow (iterative, positive, conservative) reaches max compression here (Theorem 3).
    s = K.critical_compression_search(net, "synflow", iterations=20)
    assert s["critical"] == pytest.approx(39.0) and s["hi"] is None and s["evaluations"] == 1


def test_critical_compression_input_checks():
    net = _two_layer()
    with pytest.raises(ValueError, match="unknown criterion"):
        K.critical_compression(net, "nope")
    with pytest.raises(ValueError, match=">= 1"):
        K.layer_density(net, "mp", [0.5])
    with pytest.raises(ValueError, match="hi"):
        K.critical_compression(net, "mp", lo=10.0, hi=2.0)
    with pytest.raises(ValueError, match="data-dependent"):
        K.layer_density(net, "snip", [2.0])


@pytest.mark.parametrize("make", [_bias_free_mlp, _bias_free_convnet])
def test_conservation_law_holds_for_synflow_on_bias_free_relu_net(make):
    net = make()
    table = K.conservation_table(net, input_shape=(3, 8, 8) if make is _bias_free_convnet else None)
    sums = table.score_sum.to_numpy()
    np.testing.assert_allclose(sums, sums[0], rtol=1e-10)  # Theorem 2
    assert (table.sum_rel_dev < 1e-10).all()
    hidden = table.iloc[:-1]
    assert (hidden.units > 0).all()
    assert (hidden.unit_max_rel_diff < 1e-10).all()  # Theorem 1
    assert math.isnan(table.iloc[-1].unit_max_rel_diff)


def test_conservation_with_masks_and_with_biases():
    net = _bias_free_mlp()
    masks = M.select({n: w.abs() for n, w in pl.graph.weights(net).items()}, 0.5)
    table = K.conservation_table(net, masks)
    assert (table.sum_rel_dev < 1e-10).all()
    assert (table.unit_max_rel_diff.iloc[:-1] < 1e-10).all()
    torch.manual_seed(0)
    biased = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    dev = K.conservation_table(biased)  # |b| feeds flow in: the law breaks, reported not hidden
    assert dev.sum_rel_dev.max() > 1e-6


def test_fig1_synflow_critical_compression_beats_snip_and_grasp():
    """SynFlow paper Fig. 1 on an untrained VGG-11 at width 0.25 (64 random CIFAR-shaped inputs,
    random labels, iterative SynFlow with 20 rounds instead of 100 to fit the test budget)."""
    model = pl.models.build("vgg11", input_shape=(3, 32, 32), num_classes=10, seed=0, width=0.25)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    tol = 0.05
    res = {c: K.critical_compression_search(model, c, batch=batch, tol=tol,
                                            **({"iterations": 20} if c == "synflow" else {}))
           for c in ("snip", "grasp", "synflow")}
    print({c: (round(r["critical"], 1), r["evaluations"]) for c, r in res.items()},
          "rho_max", round(K.max_compression(model), 1))
    assert res["synflow"]["critical"] >= res["snip"]["critical"]
    assert res["synflow"]["critical"] >= res["grasp"]["critical"]


def test_layer_density_honours_masks_already_attached():
    net = _two_layer()
    pruned = pl.prune(net, "random", sparsity=0.5, seed=3).model
    df = K.layer_density(pruned, "mp", [4.0]).set_index("layer")
    ref = M.density(pl.prune(pruned, "mp", sparsity=0.75).masks).set_index("layer")
    for n in ("0.weight", "2.weight"):
        assert df.loc[n, "kept"] == ref.loc[n, "kept"]
    old = M.current(pruned)
    new = Pruner(pruned, "mp", batch=None, scope="global", seed=0).masks(1 - 1 / 4.0)
    assert all(not (new[n] & ~old[n]).any() for n in old)  # pruned stays pruned


def test_lazy_top_level_name():
    assert pl.collapse.critical_compression is K.critical_compression


def _toy_bundle():
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    ds = [TensorDataset(x[i:i + 100], y[i:i + 100]) for i in (0, 100, 200)]
    return pl.data.Bundle("toy", *ds, input_shape=(10,), num_classes=3, classes=["0", "1", "2"])


def test_accuracy_vs_compression_rows_and_collapse():
    net, bundle = _two_layer(), _toy_bundle()
    rhos = [1.0, 2.0, 78 / 60]
    df = K.accuracy_vs_compression(net, bundle, ["mp", "snip"], rhos)
    assert len(df) == 2 * len(rhos)
    dense = pl.train.evaluate(net, bundle.test)
    first = df[(df.criterion == "mp") & (df.compression == 1.0)].iloc[0]
    assert first.accuracy == pytest.approx(dense["accuracy"])
    assert first.n_collapsed == 0 and first.density == 1.0
    last = df[(df.criterion == "mp") & (df.compression == 78 / 60)].iloc[0]
    assert last.collapsed_layers == "2.weight"
    masks = pl.prune(net, "mp", sparsity=0.5).masks
    want = pl.train.evaluate(M.apply(net, masks), bundle.test)
    mid = df[(df.criterion == "mp") & (df.compression == 2.0)].iloc[0]
    assert mid.loss == pytest.approx(want["loss"])
    tuned = K.accuracy_vs_compression(net, bundle, "mp", [2.0],
                                      finetune=pl.train.Recipe(epochs=1, batch_size=50))
    assert bool(tuned.finetuned.iloc[0]) and 0.0 <= tuned.accuracy.iloc[0] <= 1.0
