"""Loss landscapes along filter-normalised random directions (Li et al. 2018, Sec. 4)."""
import math

import pandas as pd
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import landscape as L
from prunelab import masks as M
from prunelab.metrics import loss as metrics_loss


def net(seed=0, dtype=None):
    """Initialised in float32 (the same numbers in every run), then cast to ``dtype``: by default
    the one test models are built in (float64 under the GPU proxy)."""
    torch.manual_seed(seed)
    f32 = {"dtype": torch.float32}
    return nn.Sequential(nn.Conv2d(1, 4, 3, **f32), nn.BatchNorm2d(4, **f32), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 8, **f32), nn.Tanh(),
                         nn.Linear(8, 3, **f32)).to(dtype or torch.get_default_dtype())


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 6, 6, generator=g, dtype=torch.float32)  # data sets are float32
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_norms_match_the_weights_and_biases_bn_are_ignored(dtype):
    model = net(dtype=dtype)
    d = L.direction(model, seed=3)
    params = dict(model.named_parameters())
    assert d.keys() == params.keys()
    for name, p in params.items():
        assert d[name].dtype == dtype and d[name].shape == p.shape
        if p.dim() <= 1:  # biases and BatchNorm γ, β: "ignore biasbn"
            assert torch.count_nonzero(d[name]) == 0
        else:
            got = d[name].reshape(len(p), -1).norm(dim=1)
            want = p.detach().reshape(len(p), -1).norm(dim=1)
            torch.testing.assert_close(got, want)
            assert not torch.allclose(d[name], p.detach())  # random, not θ itself


def test_determinism_per_seed(data):
    model = net()
    a, b, c = L.direction(model, seed=1), L.direction(model, seed=1), L.direction(model, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert torch.equal(L.directions(model, 2, seed=1)[0]["4.weight"], a["4.weight"])
    f1, f2 = L.line(model, data, steps=5, seed=1), L.line(model, data, steps=5, seed=1)
    pd.testing.assert_frame_equal(f1, f2)
    assert not f1.equals(L.line(model, data, steps=5, seed=2))


def test_alpha_zero_is_the_model_loss_and_the_caller_model_is_untouched(data):
    model = net()
    model[1].train()  # the caller's mode is kept too
    before = state(model)
    frame = L.line(model, data, steps=5, span=0.5, batch_size=16)
    assert list(frame.columns) == ["alpha", "loss", "accuracy"]
    assert frame["alpha"].tolist() == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    at0 = frame.loc[frame.alpha == 0].iloc[0]
    assert at0["loss"] == pytest.approx(metrics_loss(model, data), rel=1e-5)
    x = data[0].to(next(model.parameters()).dtype)
    acc = float((model.eval()(x).argmax(1) == data[1]).float().mean())
    model[1].train()
    assert at0["accuracy"] == pytest.approx(acc)
    assert frame["loss"].iloc[[0, -1]].gt(at0["loss"]).any()  # it moved away from θ
    surf = L.surface(model, data, n=3, span=0.5)
    assert list(surf.columns) == ["alpha", "beta", "loss", "accuracy"] and len(surf) == 9
    centre = surf[(surf.alpha == 0) & (surf.beta == 0)]["loss"].item()
    assert centre == pytest.approx(at0["loss"], rel=1e-5)
    # β = 0 row of the surface is the line (δ is the first direction of the same seed)
    row = surf[surf.beta == 0].sort_values("alpha")["loss"].to_numpy()
    assert row == pytest.approx(L.line(model, data, steps=3, span=0.5)["loss"].to_numpy(),
                                rel=1e-5)
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())
    assert model[1].training and not model[0].training


def test_a_pruned_model_stays_in_its_sparse_subspace(data):
    model = net()
    pruned = pl.prune(model, "mp", sparsity=0.6).model
    masks = M.current(pruned)
    before = state(pruned)
    for d in L.directions(pruned, 2, seed=0):
        for name, m in masks.items():
            assert torch.count_nonzero(d[name][~m]) == 0
            w = pl.graph.weight(pruned, name).detach()
            torch.testing.assert_close(d[name].reshape(len(w), -1).norm(dim=1),
                                       w.reshape(len(w), -1).norm(dim=1))
    frame = L.line(pruned, data, steps=3)
    assert frame["loss"].iloc[1] == pytest.approx(metrics_loss(pruned, data), rel=1e-5)
    assert all(torch.equal(v, state(pruned)[k]) for k, v in before.items())
    assert M.current(pruned).keys() == masks.keys()


def test_a_fully_pruned_filter_gets_direction_zero():
    model = net()
    mask = torch.ones_like(model[4].weight, dtype=torch.bool)
    mask[2] = False
    d = L.direction(M.apply(model, {"4.weight": mask}), seed=0)
    assert torch.count_nonzero(d["4.weight"][2]) == 0 and torch.isfinite(d["4.weight"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quadratic_model_matches_the_closed_form(dtype):
    """Linear least squares: L(θ + αd) = mean((Xθ − y + αXd)²) = a α² + b α + c exactly."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=dtype)
    y = torch.randn(40, 1, generator=g, dtype=dtype)
    model = nn.Linear(6, 1, bias=False).to(dtype)
    d = L.direction(model, seed=7)["weight"]
    r, q = x @ model.weight.detach().T - y, x @ d.T
    a, b, c = (q ** 2).mean(), 2 * (r * q).mean(), (r ** 2).mean()
    frame = L.line(model, (x, y), steps=9, span=2.0, seed=7, loss="mse")
    alpha = torch.tensor(frame["alpha"].to_numpy(), dtype=dtype)
    want = (a * alpha ** 2 + b * alpha + c).tolist()
    assert frame["loss"].tolist() == pytest.approx(want, rel=1e-5 if dtype == torch.float32
                                                   else 1e-12)
    assert frame["accuracy"].isna().all()  # no accuracy for regression


def test_compare_puts_dense_and_pruned_side_by_side(data):
    model = net()
    pruned = pl.prune(model, "mp", sparsity=0.8).model
    frame = L.compare(model, pruned, data, steps=3, seed=0)
    assert list(frame.columns) == ["network", "alpha", "loss", "accuracy"]
    assert frame["network"].tolist() == ["dense"] * 3 + ["pruned"] * 3
    pd.testing.assert_frame_equal(frame[frame.network == "pruned"].drop(columns="network")
                                  .reset_index(drop=True), L.line(pruned, data, steps=3, seed=0))
    surf = L.compare(model, pruned, data, dims=2, n=2, names=("a", "b"))
    assert list(surf.columns) == ["network", "alpha", "beta", "loss", "accuracy"]
    assert len(surf) == 8 and set(surf.network) == {"a", "b"}


@pytest.mark.parametrize("call,match", [
    (lambda m, d: L.line(m, d, steps=1), "steps must be an int >= 2, got 1"),
    (lambda m, d: L.line(m, d, span=0), "span must be .*got 0"),
    (lambda m, d: L.line(m, d, span=math.inf), "span must be .*got inf"),
    (lambda m, d: L.surface(m, d, n=2.5), "n must be an int >= 2, got 2.5"),
    (lambda m, d: L.direction(m, seed=-1), "seed must be an int >= 0, got -1"),
    (lambda m, d: L.compare(m, m, d, dims=3), "dims must be 1 .* got 3"),
    (lambda m, d: L.line(m, (d[0], d[1][:5])), "same length"),
])
def test_bad_arguments_are_refused(data, call, match):
    with pytest.raises(ValueError, match=match):
        call(net(), data)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        L.line("mlp", data)
