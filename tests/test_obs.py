"""Optimal Brain Surgeon: layerwise (L-OBS) scores and updates against brute-force least squares."""
import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab.criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.criteria import obs as O


def linear_layer(d_in=6, d_out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False)).double()


def correlated_inputs(n=200, d=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
    return x, torch.randint(0, 4, (n,), generator=gen)


def best_reconstruction(x, w_row, keep):
    """min over w' with w'_P = 0 of ‖X(w' − w)‖², by least squares on the kept inputs."""
    target = x @ w_row
    cols = keep.nonzero().flatten()
    w_new = torch.zeros_like(w_row)
    if len(cols):
        w_new[cols] = torch.linalg.lstsq(x[:, cols], target[:, None]).solution.flatten()
    return w_new, float(((x @ w_new - target) ** 2).sum())


def test_row_scores_are_the_true_minimal_reconstruction_error():
    """Brute force over every single weight: score = min ‖XᵀΔw‖²/(2N), so the order is exact."""
    model, (x, y) = linear_layer(), correlated_inputs()
    n = len(x)
    result = C.compute(model, "obs", batch=(x, y), damp=0.0)
    w = model[0].weight.detach()
    h = x.T @ x / n
    hinv = torch.linalg.inv(h)
    torch.testing.assert_close(result.scores["0.weight"],
                               (w ** 2 / (2 * hinv.diagonal())).float(), rtol=1e-5, atol=0)
    brute = torch.zeros_like(w)
    for q, j in itertools.product(range(w.shape[0]), range(w.shape[1])):
        keep = torch.ones(w.shape[1], dtype=torch.bool)
        keep[j] = False
        brute[q, j] = best_reconstruction(x, w[q], keep)[1] / (2 * n)
    torch.testing.assert_close(result.scores["0.weight"].double(), brute, rtol=1e-5, atol=0)
    assert torch.equal(torch.argsort(result.scores["0.weight"].flatten()),
                       torch.argsort(brute.flatten().float()))
    assert result.examples == n and result.info["block"] == "row"


def test_row_update_is_the_optimal_multi_weight_surgery():
    """Per row, with pruned set P: error = N·w_Pᵀ(H⁻¹_PP)⁻¹w_P, optimal, below plain masking."""
    model, (x, y) = linear_layer(d_in=8, d_out=5), correlated_inputs(d=8)
    n = len(x)
    w = model[0].weight.detach().clone()
    result = C.compute(model, "obs", batch=(x, y), damp=0.0)
    # Rows with 1, 3, 6, 8 (all) and 0 pruned weights: both solve routes and the trivial ones.
    keep = torch.ones_like(w, dtype=torch.bool)
    for q, pruned in enumerate([[2], [0, 4, 7], [0, 1, 2, 3, 5, 6], list(range(8)), []]):
        keep[q, pruned] = False
    new = result.update({"0.weight": keep})["0.weight"]
    assert new.dtype == w.dtype and (new[~keep] == 0).all()
    hinv = torch.linalg.inv(x.T @ x / n)
    for q in range(w.shape[0]):
        p = (~keep[q]).nonzero().flatten()
        err = float(((x @ (new[q] - w[q])) ** 2).sum())
        optimum, best = best_reconstruction(x, w[q], keep[q])
        torch.testing.assert_close(new[q], optimum, rtol=1e-8, atol=1e-10)
        if len(p):
            predicted = n * float(w[q, p] @ torch.linalg.solve(hinv[p][:, p], w[q, p]))
            assert err == pytest.approx(predicted, rel=1e-8)
            plain = float(((x @ (w[q] * keep[q] - w[q])) ** 2).sum())
            assert err <= plain + 1e-12 and (err < plain or len(p) == 8)
        else:
            assert err == 0.0


def test_previously_pruned_weights_are_constraints():
    """Zero weights stay zero; scores are the minimal error with them held at zero."""
    model, (x, y) = linear_layer(d_in=7, d_out=3, seed=2), correlated_inputs(d=7, seed=3)
    n = len(x)
    with torch.no_grad():
        model[0].weight[0, [1, 4]] = 0.0
        model[0].weight[2, [0, 2, 3, 5, 6]] = 0.0
    w = model[0].weight.detach().clone()
    alive = w != 0
    result = C.compute(model, "obs", batch=(x, y % 3), damp=0.0)  # labels fit 3 outputs
    scores = result.scores["0.weight"].double()
    assert (scores[~alive] == 0).all()
    for q, j in alive.nonzero().tolist():
        keep = alive[q].clone()
        keep[j] = False
        brute = best_reconstruction(x, w[q], keep)[1] / (2 * n)
        assert float(scores[q, j]) == pytest.approx(brute, rel=1e-5)
    everything = torch.ones_like(w, dtype=torch.bool)
    everything[1, 3] = False
    new = result.update({"0.weight": everything})["0.weight"]
    assert (new[~alive] == 0).all() and new[1, 3] == 0
    torch.testing.assert_close(new[1], best_reconstruction(x, w[1], everything[1])[0])
    torch.testing.assert_close(new[0], w[0])  # nothing new pruned in row 0: unchanged


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
    nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(2, 1), bias=False),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False),
    nn.Conv1d(4, 6, 4, padding="same", bias=False),
    nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, bias=False),
], ids=["grouped-strided", "same-dilated", "reflect", "conv1d", "conv3d"])
def test_conv_rows_through_im2col(conv):
    """Patches reproduce the convolution, and N·ΔwᵀHΔw = ‖conv(x, Δw)‖² per group."""
    torch.manual_seed(0)
    conv = conv.double()
    shape = {1: (5, 4, 11), 2: (5, 4, 9, 8), 3: (5, 2, 5, 6, 7)}[conv.weight.dim() - 2]
    x = torch.randn(*shape, dtype=torch.float64)
    p = O.patches(conv, x)
    rows = conv.weight.detach().reshape(conv.weight.shape[0], -1)
    g, per = p.shape[1], rows.shape[0] // p.shape[1]
    rebuilt = torch.cat([torch.einsum("cd,ndl->ncl", rows[i * per:(i + 1) * per], p[:, i])
                         for i in range(g)], 1)
    torch.testing.assert_close(rebuilt, conv(x).reshape(rebuilt.shape))
    model = nn.Sequential(conv)
    h = O.input_second_moments(model, x)["0.weight"]
    assert h.shape == (g, rows.shape[1], rows.shape[1])
    delta = torch.randn_like(conv.weight)
    out = conv._conv_forward(x, delta, None)
    dr = delta.reshape(rows.shape)
    for i in range(g):
        quad = float(sum(dr[c] @ h[i] @ dr[c] for c in range(i * per, (i + 1) * per)))
        energy = float((out[:, i * per:(i + 1) * per] ** 2).sum())
        assert len(x) * quad == pytest.approx(energy, rel=1e-10)


def test_conv_update_reduces_the_output_error():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).double()
    x, y = torch.randn(64, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (64,))
    result = C.compute(model, "obs", batch=(x, y))
    masks = M.select(result.scores, 0.6, scope="layerwise")
    new = result.update(masks)
    w = model[0].weight.detach()
    assert (new["0.weight"][~masks["0.weight"]] == 0).all()
    err_obs = (model[0]._conv_forward(x, new["0.weight"] - w, None) ** 2).sum()
    err_mask = (model[0]._conv_forward(x, w * masks["0.weight"] - w, None) ** 2).sum()
    assert err_obs < err_mask


def per_example_grads(model, x, y, name):
    weight = G.weight(model, name)
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.autograd.grad(loss, weight)[0].flatten())
    return torch.stack(rows)


def test_fisher_block_scores_and_update():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    result = C.compute(model, "obs", batch=(x, y), block="fisher", damp=1e-3)
    masks = {n: torch.rand(w.shape) > 0.5 for n, w in G.weights(model).items()}
    new = result.update(masks)
    for n, w in G.weights(model).items():
        g = per_example_grads(model, x, y, n)
        fisher = g.T @ g / len(x)
        fisher += result.info["damping"][n] * torch.eye(len(fisher), dtype=fisher.dtype)
        assert result.info["damping"][n] == pytest.approx(1e-3 * float(fisher.diagonal().mean()),
                                                          rel=1e-2)
        finv = torch.linalg.inv(fisher)
        wf = w.detach().flatten()
        torch.testing.assert_close(result.scores[n].double().flatten(),
                                   wf ** 2 / (2 * finv.diagonal()), rtol=1e-5, atol=1e-12)
        keep = masks[n].flatten()
        k, p = keep.nonzero().flatten(), (~keep).nonzero().flatten()
        ref = torch.zeros_like(wf)
        ref[k] = wf[k] + torch.linalg.solve(fisher[k][:, k], fisher[k][:, p] @ wf[p])
        torch.testing.assert_close(new[n].flatten(), ref, rtol=1e-8, atol=1e-12)


def test_large_blocks_fall_back_to_the_diagonal_with_a_warning():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 2, (30,))
    with pytest.warns(UserWarning, match="diagonal"):
        fisher = C.compute(model, "obs", batch=(x, y), block="fisher", max_block=20)
    assert fisher.info["diagonal"] == ["0.weight"]
    with pytest.warns(UserWarning, match="diagonal"):
        row = C.compute(model, "obs", batch=(x, y), max_row=5, damp=0.0)
    assert row.info["diagonal"] == ["0.weight"]
    h = (x.T @ x / len(x)).diagonal()
    torch.testing.assert_close(row.scores["0.weight"].double(),
                               0.5 * model[0].weight.detach() ** 2 * h, rtol=1e-5, atol=0)
    masks = M.select(row.scores, 0.5)
    new = row.update(masks)
    torch.testing.assert_close(new["0.weight"], model[0].weight.detach() * masks["0.weight"])


def test_damping_and_options_are_validated():
    model, (x, y) = linear_layer(d_in=6), correlated_inputs(n=4, d=6)  # N < d: H singular
    with pytest.raises(ValueError, match="damp"):
        C.compute(model, "obs", batch=(x, y), damp=0.0)
    result = C.compute(model, "obs", batch=(x, y))  # default damping makes it invertible
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    with pytest.raises(ValueError, match="damp"):
        C.compute(model, "obs", batch=(x, y), damp=-1.0)
    with pytest.raises(ValueError, match="block"):
        C.compute(model, "obs", batch=(x, y), block="kfac")
    with pytest.raises(ValueError, match="batch"):
        C.compute(model, "obs")
    layer_alias = C.compute(model, "obs", batch=(x, y), block="layer")
    assert torch.equal(layer_alias.scores["0.weight"], result.scores["0.weight"])


def test_mlp_40_300_100_10_with_1000_examples():
    """The size the notebooks use: fits in memory and runs in seconds; pruned stays exactly 0."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(),
                          nn.Linear(100, 10))
    x, y = torch.randn(1000, 40), torch.randint(0, 10, (1000,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    result = C.compute(model, "obs", batch=(x, y))
    masks = M.select(result.scores, 0.9, scope="layerwise")
    new = result.update(masks)
    seconds = time.perf_counter() - t0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    inputs = {}
    hooks = [G.module_of(model, n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n in masks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, w in G.weights(model).items():
        w = w.detach()
        assert new[n].shape == w.shape and new[n].dtype == w.dtype
        assert (new[n][~masks[n]] == 0).all() and torch.isfinite(new[n]).all()
        err_obs = float(((inputs[n] @ (new[n] - w).T) ** 2).sum())
        err_mask = float(((inputs[n] @ (w * masks[n] - w).T) ** 2).sum())
        assert err_obs < err_mask
    assert seconds < 60  # generous: a budget check, not a benchmark (a few seconds when idle)


@pytest.mark.parametrize("block", ["row", "fisher"])
def test_obs_leaves_the_model_untouched(block):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).double().eval()
    x, y = torch.randn(16, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = O.obs(model, batch=(x, y), block=block)  # directly on the module, not a copy
    result.update(M.select(result.scores, 0.5))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
