"""Structured (channel / neuron) criteria and the polarization regularizer: prunelab.structured."""
import math

import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import structured, units
from prunelab.train import Recipe, fit


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _net(seed=0):
    """conv(pad) -> BN -> ReLU -> conv -> BN -> ReLU -> flatten -> fc -> ReLU -> fc, float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # non-trivial, distinct γ and eval statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g,
                                               dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


BATCH = _batch()
LAYERS = ["0", "3", "7"]  # default: every prunable layer but the last


# ------------------------------------------------------------------------------ registry

def test_names_and_registry():
    assert structured.names() == list(structured.CRITERIA)
    assert set(structured.CRITERIA) == {"random", "mp-l1", "mp-l2", "lap-l1", "lap-l2", "hrank",
                                        "bn-scale"}
    cites = {"random": "Park et al. 2020", "mp-l1": "Li et al.", "mp-l2": "Li et al. 2017",
             "lap-l1": "Park et al. 2020", "lap-l2": "Park et al. 2020", "hrank": "Lin et al.",
             "bn-scale": "Liu et al."}
    for name, fn in structured.CRITERIA.items():
        assert callable(fn) and cites[name] in fn.__doc__, name
    assert "Zhuang et al." in structured.CRITERIA["bn-scale"].__doc__


@pytest.mark.parametrize("fn", [structured.score, structured.prune])
def test_unknown_criterion_lists_valid_names(fn):
    with pytest.raises(ValueError, match="unknown structured criterion 'mp'") as info:
        fn(_net(), "mp", count=1) if fn is structured.prune else fn(_net(), "mp")
    for name in structured.CRITERIA:
        assert name in str(info.value)


@pytest.mark.parametrize("criterion", structured.CRITERIA)
def test_scores_are_per_unit_and_leave_the_model_alone(criterion):
    model = _net()
    model.train()
    before = _state(model)
    scores = structured.score(model, criterion, batch=BATCH)
    expected = ["0", "3"] if criterion in ("hrank", "bn-scale") else LAYERS
    assert list(scores) == expected
    for name, s in scores.items():
        assert s.shape == (model.get_submodule(name).weight.shape[0],)
        assert s.dtype == torch.float64 and torch.isfinite(s).all()
    assert _same_state(model, before) and model.training


# ---------------------------------------------------------------- brute-force ground truth

@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_mp_is_the_channel_norm_of_the_incoming_weights(norm):
    model = _net()
    scores = structured.score(model, f"mp-{norm}")
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach()
        for k in range(w.shape[0]):
            values = [abs(float(v)) for v in w[k].reshape(-1)]
            want = sum(values) if norm == "l1" else math.sqrt(sum(v * v for v in values))
            assert float(scores[name][k]) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_lap_aggregates_the_per_weight_lap_scores_of_each_unit(norm):
    model = _net()
    per_weight = pl.score(model, "lap")  # Eq. 5 / Eq. 8 with the BNs
    scores = structured.score(model, f"lap-{norm}")
    for name in LAYERS:
        s = per_weight[f"{name}.weight"].double()
        for k in range(s.shape[0]):
            values = [float(v) for v in s[k].reshape(-1)]
            want = sum(values) if norm == "l1" else math.sqrt(sum(v * v for v in values))
            assert float(scores[name][k]) == pytest.approx(want, rel=1e-6)


def test_lap_l1_by_hand_on_a_two_layer_mlp():
    # first layer: W_0 is all-ones (factor 1), so L(w_kj) = |w_kj| · ||W_2[:, k]||
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    s1 = structured.score(model, "lap-l1")["0"]
    s2 = structured.score(model, "lap-l2")["0"]
    for k in range(5):
        out = math.sqrt(sum(float(w2[r, k]) ** 2 for r in range(3)))
        row = [abs(float(w1[k, j])) * out for j in range(4)]
        assert float(s1[k]) == pytest.approx(sum(row), rel=1e-6)
        assert float(s2[k]) == pytest.approx(math.sqrt(sum(v * v for v in row)), rel=1e-6)


def test_hrank_is_the_mean_matrix_rank_of_each_feature_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 2))
    with torch.no_grad():
        model[0].weight[0].zero_()   # constant map (bias only): rank 1
        model[0].weight[1].zero_()
        model[0].bias[1] = 0.0       # all-zero map: rank 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 7, 7, generator=g)
    x[3] = torch.outer(torch.randn(7, generator=g), torch.randn(7, generator=g))  # low-rank image
    scores = structured.score(model, "hrank", batch=(x, torch.zeros(6, dtype=torch.long)))
    assert list(scores) == ["0", "2"]
    with torch.no_grad():
        maps = {"0": model[0](x), "2": model[2](model[1](model[0](x)))}
    for name, fm in maps.items():
        for c in range(fm.shape[1]):
            want = sum(int(torch.linalg.matrix_rank(fm[i, c])) for i in range(len(x))) / len(x)
            assert float(scores[name][c]) == want
    assert scores["0"][0] == 1.0 and scores["0"][1] == 0.0 and scores["0"][2] > 1.0
    # an input tensor alone is enough
    assert torch.equal(structured.score(model, "hrank", batch=x)["0"], scores["0"])


def test_hrank_needs_a_batch_and_conv2d_layers():
    with pytest.raises(ValueError, match="data-dependent"):
        structured.score(_net(), "hrank")
    with pytest.raises(ValueError, match=r"Conv2d layers .*'7'"):
        structured.score(_net(), "hrank", layers=["0", "7"], batch=BATCH)


def test_bn_scale_is_abs_gamma_of_the_following_batchnorm():
    model = _net()
    scores = structured.score(model, "bn-scale")
    assert torch.equal(scores["0"], model[1].weight.detach().abs())
    assert torch.equal(scores["3"], model[4].weight.detach().abs())
    with pytest.raises(ValueError, match=r"BatchNorm directly after.*'7'"):
        structured.score(model, "bn-scale", layers=["7"])
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="has\\s+none"):
        structured.score(mlp, "bn-scale")


def test_random_is_seed_deterministic():
    model = _net()
    a = structured.score(model, "random", seed=5)
    b = structured.score(model, "random", seed=5)
    c = structured.score(model, "random", seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    ra = structured.prune(model, "random", fraction=0.5, seed=5)
    rb = structured.prune(model, "random", fraction=0.5, seed=5)
    assert ra.pruned == rb.pruned
    with pytest.raises(ValueError, match="seed"):
        structured.score(model, "random", seed=1.5)


# ------------------------------------------------------------------------------ pruning

@pytest.mark.parametrize("criterion", structured.CRITERIA)
def test_prune_removes_the_lowest_scores_and_keeps_the_model(criterion):
    model = _net()
    before = _state(model)
    res = structured.prune(model, criterion, count=2, batch=BATCH, seed=1)
    scores = structured.score(model, criterion, batch=BATCH, seed=1)
    assert res.score == criterion and list(res.pruned) == list(scores)
    for name, s in scores.items():
        assert res.pruned[name] == sorted(torch.sort(s, stable=True).indices[:2].tolist())
        torch.testing.assert_close(res.scores[name], s)
    assert _same_state(model, before)
    assert res.model is not model


def test_prune_physical_and_mean_replacement():
    model = _net()
    x, _ = BATCH
    masked = structured.prune(model, "lap-l2", fraction=0.5)
    physical = structured.prune(model, "lap-l2", fraction=0.5, physical=True)
    assert physical.model[0].out_channels == 2 and physical.model[7].out_features == 3
    masked.model.eval(), physical.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(physical.model(x), masked.model(x))
    mr = structured.prune(model, "mp-l1", count=1, batch=BATCH, mean_replacement=True)
    assert mr.mean_replacement and set(mr.means) == set(LAYERS)
    with pytest.raises(ValueError, match="batch"):
        structured.prune(model, "mp-l1", count=1, mean_replacement=True)


# ------------------------------------------------------------------ polarization (Eq. 2)

def _set_gammas(model, values):
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn, v in zip(bns, values):
            bn.weight.copy_(torch.tensor(v, dtype=bn.weight.dtype))
    return bns


def test_polarization_equals_the_formula_and_its_gradient():
    model = _net()
    g1, g2 = [0.5, -0.2, 1.0, 0.1], [0.3, 0.0, 0.9, 1.4, -0.6, 0.25]
    bns = _set_gammas(model, [g1, g2])
    t = 1.2

    def rs(g):
        mean = sum(g) / len(g)
        return sum(t * abs(v) - abs(v - mean) for v in g)

    value = structured.polarization(model, t)
    assert value.dim() == 0
    assert float(value.detach()) == pytest.approx(rs(g1) + rs(g2), rel=1e-12)
    assert float(structured.polarization(model, t, scope="global").detach()) == pytest.approx(
        rs(g1 + g2), rel=1e-12)

    grads = torch.autograd.grad(value, [bn.weight for bn in bns])
    for bn, grad in zip(bns, grads):  # autograd of Eq. 2 written out element by element
        g = bn.weight.detach().clone().requires_grad_(True)
        mean = g.sum() / g.numel()
        explicit = sum(t * g[i].abs() - (g[i] - mean).abs() for i in range(g.numel()))
        (want,) = torch.autograd.grad(explicit, [g])
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


def test_polarization_bad_input():
    with pytest.raises(ValueError, match="no affine\\s+BatchNorm"):
        structured.polarization(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="t must be"):
        structured.polarization(_net(), float("nan"))
    with pytest.raises(ValueError, match="scope"):
        structured.polarization_regularizer(1e-4, scope="network")
    with pytest.raises(ValueError, match="lam"):
        structured.polarization_regularizer(-1.0)


def _tiny_bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_training_with_the_polarization_regularizer_polarizes_gamma():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    recipe = Recipe(optimizer="adam", lr=0.05, epochs=10, batch_size=32, max_steps=40)
    plain, polar = _tiny_bn_net(0), _tiny_bn_net(0)
    fit(plain, (x, y), recipe=recipe, progress=False)
    res = fit(polar, (x, y), recipe=recipe, progress=False,
              regularizer=structured.polarization_regularizer(0.1))
    reg = res.history.train_regularizer
    assert reg.iloc[-1] < reg.iloc[0] - 1.0
    with torch.no_grad():
        assert float(structured.polarization(polar)) < float(structured.polarization(plain)) - 5
    near_zero = [int((torch.cat(list(structured.gammas(m).values())) < 0.5).sum())
                 for m in (plain, polar)]
    assert near_zero[1] >= near_zero[0] + 3


# ------------------------------------------------------------------ threshold and pruning

def test_threshold_finds_the_gap_of_a_bimodal_distribution():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(30, generator=g) * 0.05
    high = 0.6 + torch.rand(33, generator=g) * 0.6
    gammas = torch.cat([low, high, torch.tensor([5.0])])  # a lone outlier is not a cluster
    th = structured.polarization_threshold(gammas[torch.randperm(64, generator=g)])
    assert th == pytest.approx((float(low.max()) + float(high.min())) / 2)
    # without the minimum cluster size the outlier's gap would win
    assert structured.polarization_threshold(gammas, min_fraction=0.0) > 1.2
    split = {"a": -gammas[:20], "b": gammas[20:]}  # signs ignored, mappings pooled
    assert structured.polarization_threshold(split) == pytest.approx(th)
    model = _tiny_bn_net(0)
    _set_gammas(model, [gammas[:8].tolist(), gammas[30:38].tolist()])
    assert 0.05 <= structured.polarization_threshold(model) <= 0.6


@pytest.mark.parametrize("bad", [torch.tensor([1.0]), torch.ones(10),
                                 torch.tensor([0.1, float("nan")])])
def test_threshold_bad_input(bad):
    with pytest.raises(ValueError):
        structured.polarization_threshold(bad)


def test_prune_by_threshold_prunes_below_and_never_a_whole_layer():
    model = _net()
    _set_gammas(model, [[0.01, 0.9, -0.02, 1.1], [0.5, 0.03, 0.7, -0.8, 0.001, 1.0]])
    before = _state(model)
    res = structured.prune_by_threshold(model, 0.1)
    assert res.pruned == {"0": [0, 2], "3": [1, 4]} and res.score == "bn-scale"
    assert set(res.masks) == {"3.weight", "7.weight"}
    assert _same_state(model, before)
    # the same as one call that prunes both layers at once, mean replacement included
    res = structured.prune_by_threshold(model, 0.1, batch=BATCH, mean_replacement=True,
                                        physical=True)
    once = units.prune(model, count=2, score="bn-scale", layers=["0", "3"], batch=BATCH,
                       unit_scores=structured.score(model, "bn-scale"), mean_replacement=True,
                       physical=True)
    assert res.pruned == once.pruned
    res.model.eval(), once.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.model(BATCH[0]), once.model(BATCH[0]), rtol=0, atol=1e-12)
    for k in once.means:
        torch.testing.assert_close(res.means[k], once.means[k])
    with pytest.raises(ValueError, match=r"every unit of layer '0'.*largest \|γ\| is 1\.1"):
        structured.prune_by_threshold(model, 1.2)
    with pytest.raises(ValueError, match="threshold must be"):
        structured.prune_by_threshold(model, -1.0)
    assert _same_state(model, before)


def test_masked_models_are_scored_by_their_effective_weights():
    model = _net()
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.5
             for n, p in model.named_parameters() if n in ("0.weight", "3.weight", "7.weight",
                                                          "9.weight")}
    masked = pl.masks.apply(model, masks)
    for criterion in ("mp-l1", "mp-l2", "lap-l1", "lap-l2", "hrank"):
        got = structured.score(masked, criterion, batch=BATCH)
        want = structured.score(pl.graph.plain_copy(masked), criterion, batch=BATCH)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-12)
    w = model[0].weight.detach() * masks["0.weight"]
    torch.testing.assert_close(structured.score(masked, "mp-l1")["0"],
                               w.abs().reshape(4, -1).sum(1))
    res = structured.prune(masked, "mp-l2", count=1)
    assert res.pruned == {k: [int(torch.argmin(v))] for k, v in
                          structured.score(masked, "mp-l2").items()}


def test_compare_rows_match_prune_calls():
    import prunelab as pl

    bundle = pl.data.load("digits")
    model = pl.models.build("small_conv", bundle, seed=0, padding="same", width=0.25).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = bundle.batch("train", n=64, seed=0)
    ev = bundle.batch("val", n=100, seed=0)
    frame = structured.compare(model, criteria=["mp-l1", "lap-l2"], fractions=[0.25, 0.5],
                               batch=batch, eval_data=ev)
    assert len(frame) == 1 + 2 * 2 * 2 and frame.criterion.iloc[0] == "dense"
    row = frame[(frame.criterion == "lap-l2") & (frame.fraction == 0.5)
                & frame.mean_replacement].iloc[0]
    ref = structured.prune(model, "lap-l2", fraction=0.5, batch=batch, mean_replacement=True)
    want = pl.train.evaluate(ref.model, ev)["loss"] - pl.train.evaluate(model, ev)["loss"]
    assert row.penalty == pytest.approx(want, abs=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown"):
        structured.compare(model, criteria=["nope"], batch=batch, eval_data=ev)
