"""Mode connectivity: straight segments, barriers, Bezier / polygonal-chain curves, planes.

All models are trained here, on the small ``digits`` dataset (no zoo seeds >= 1 needed).
"""
import copy

import pandas as pd
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import connectivity as C
from prunelab.train import Recipe, evaluate, fit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    b = pl.data.load("digits")
    return b, b.train.tensors, b.test.tensors


@pytest.fixture(scope="module")
def pair(digits):
    """Two small ReLU MLPs trained on digits from different seeds (init and data order)."""
    b, tr, _ = digits
    models = []
    for s in (0, 1):
        m = pl.models.build("mlp", b, hidden=(32,), activation="relu", seed=s)
        fit(m, tr, recipe=Recipe(lr=1e-2, epochs=20), seed=s, progress=False)
        models.append(m.eval())
    return models


def _bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, 10))


# ----------------------------------------------------------------------------- straight line
def test_endpoints_exact_mlp(digits, pair):
    _, tr, te = digits
    a, b = pair
    f = C.interpolate(a, b, te, steps=5)
    assert list(f.columns) == ["t", "loss", "error"] and len(f) == 5
    assert f["t"].iloc[0] == 0.0 and f["t"].iloc[-1] == 1.0
    assert f["loss"].iloc[0] == evaluate(a, te)["loss"]
    assert f["loss"].iloc[-1] == evaluate(b, te)["loss"]
    assert f["error"].iloc[0] == evaluate(a, te)["error"]
    # named splits
    g = C.interpolate(a, b, {"train": tr, "test": te}, steps=3)
    assert set(g["split"]) == {"train", "test"} and len(g) == 6
    end = g[(g.t == 1.0) & (g.split == "train")]["loss"].item()
    assert end == evaluate(b, tr)["loss"]
    assert C.interpolate(a, b, {"train": tr, "test": te}, steps=3, splits=["test"])["split"] \
        .unique().tolist() == ["test"]


def test_endpoints_exact_pruned_mlp(digits, pair):
    _, _, te = digits
    a, b = pair
    ma = pl.masks.select({n: w.abs() for n, w in pl.graph.weights(a).items()}, 0.7)
    mb = pl.masks.select({n: w.abs() for n, w in pl.graph.weights(b).items()}, 0.5)
    pa, pb = pl.masks.apply(a, ma), pl.masks.apply(b, mb)
    f = C.interpolate(pa, pb, te, steps=3)
    assert f["loss"].iloc[0] == evaluate(pa, te)["loss"]
    assert f["loss"].iloc[-1] == evaluate(pb, te)["loss"]


def test_bn_endpoints_exact_after_same_recomputation(digits):
    """With BatchNorm every point (the endpoints too) gets statistics recomputed on bn_data, so
    the endpoints are compared with the endpoint models after the same recomputation."""
    _, tr, te = digits
    nets = []
    for s in (0, 1):
        m = _bn_net(s)
        fit(m, tr, recipe=Recipe(lr=1e-2, epochs=3), seed=s, progress=False)
        nets.append(m.eval())
    with pytest.raises(ValueError, match="bn_data"):
        C.interpolate(nets[0], nets[1], te, steps=3)
    f = C.interpolate(nets[0], nets[1], te, steps=3, bn_data=tr)
    for net, row in zip(nets, (0, -1)):
        ref = C.recompute_bn(copy.deepcopy(net), tr)
        assert f["loss"].iloc[row] == evaluate(ref, te)["loss"]
    # the originals are untouched and recompute_bn restores momentum
    assert nets[0][2].momentum == 0.1


def test_masks_respected_along_segment(pair):
    a, b = pair
    scores = {n: w.abs() + w2.abs() for (n, w), w2 in
              zip(pl.graph.weights(a).items(), pl.graph.weights(b).values())}
    masks = pl.masks.select(scores, 0.8)
    pa, pb = pl.masks.apply(a, masks), pl.masks.apply(b, masks)
    for t in (0.0, 0.3, 0.5, 1.0):
        w = pl.graph.weights(C.lerp_model(pa, pb, t))
        for n, m in masks.items():
            assert (w[n][~m] == 0).all()
    # a trained bend also keeps the shared pruned entries at zero
    cv = C.bezier(pa, pb)
    with torch.no_grad():
        for v in cv.theta.values():
            v.add_(1.0)
    for t in (0.25, 0.5):
        w = pl.graph.weights(cv.point(t))
        for n, m in masks.items():
            assert (w[n][~m] == 0).all()


def test_barrier_hand_made_frame():
    f = pd.DataFrame({"t": [1.0, 0.0, 0.5, 0.25], "loss": [0.4, 0.2, 1.3, 0.7],
                      "error": [0.1, 0.1, 0.1, 0.1]})
    assert C.barrier(f) == pytest.approx(1.3 - 0.3)
    assert C.barrier(f, metric="error") == pytest.approx(0.0)
    g = pd.concat([f.assign(split="train"), f.assign(split="test", loss=f.loss * 2)])
    with pytest.raises(ValueError, match="split"):
        C.barrier(g)
    assert C.barrier(g, split="test") == pytest.approx(2.0)


# ----------------------------------------------------------------------------- curves
@pytest.mark.parametrize("make", [C.bezier, C.polychain])
def test_midpoint_bend_is_the_segment(pair, digits, make):
    a, b = pair
    _, _, te = digits
    cv = make(a, b, bend_init="midpoint")
    x = te[0][:50]
    for t in (0.0, 0.1, 0.37, 0.5, 0.8, 1.0):
        line = C.lerp_model(a, b, t)
        w = cv.weights(t)
        for n, p in line.named_parameters():
            torch.testing.assert_close(w[n], p, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(cv.point(t)(x), line(x), rtol=0, atol=1e-5)
    f, g = C.curve_frame(cv, te, steps=5), C.interpolate(a, b, te, steps=5)
    assert f["loss"].iloc[0] == g["loss"].iloc[0] and f["loss"].iloc[-1] == g["loss"].iloc[-1]
    assert f["loss"].to_numpy() == pytest.approx(g["loss"].to_numpy(), abs=1e-5)


def test_trained_bezier_has_lower_barrier_than_segment(digits, pair):
    """Garipov et al. Fig. 2: two independently trained MLPs joined by a trained Bezier curve."""
    _, tr, te = digits
    a, b = pair
    line = C.interpolate(a, b, tr, steps=11)
    cv = C.bezier(a, b)
    hist = C.fit_bend(cv, tr, steps=300, lr=1e-2, batch_size=128, seed=0)
    assert len(hist) == 300 and hist["t"].between(0, 1).all()
    curve = C.curve_frame(cv, tr, steps=11)
    b_line, b_curve = C.barrier(line), C.barrier(curve)
    print(f"digits train-loss barrier: segment {b_line:.4f}, trained Bezier {b_curve:.4f}")
    assert b_line > 0.1
    assert b_curve < 0.5 * b_line
    # endpoints fixed by training the bend only
    assert curve["loss"].iloc[0] == line["loss"].iloc[0]
    assert curve["loss"].iloc[-1] == line["loss"].iloc[-1]
    err = C.ensemble_error(a, cv.point(0.5), te)
    assert 0.0 <= err <= 0.2
    # plane through a, b and the curve midpoint
    p = C.plane(a, b, cv.point(0.5), te, grid=3, margin=0.0)
    assert list(p.columns) == ["u", "v", "loss", "error"] and len(p) == 9
    pts = p.attrs["points"]
    assert pts["a"] == (0.0, 0.0) and pts["b"][1] == 0.0 and pts["c"][1] > 0
    assert p["loss"].notna().all()


def test_instability_runs(digits):
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    before = copy.deepcopy(init.state_dict())
    res = C.instability(init, b, k_steps=5, recipe=Recipe(lr=1e-2, epochs=2), seeds=(0, 1),
                        steps=5)
    assert res.barrier == C.barrier(res.frame, metric="error")
    assert len(res.frame) == 5
    for k, v in init.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="k_steps"):
        C.instability(init, b, k_steps=10_000, recipe=Recipe(epochs=1))


def test_instability_curve(digits):
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    before = copy.deepcopy(init.state_dict())
    recipe = Recipe(lr=1e-2, epochs=1, batch_size=100)  # T = ceil(997 / 100) = 10 steps
    barriers, paths = C.instability_curve(init, b, ks=[10, 0, 4, 4], recipe=recipe, steps=5)
    assert list(barriers.columns) == ["k", "barrier", "metric", "split", "error_a", "error_b",
                                      "path_max", "total_steps", "density"]
    assert (barriers["density"] == 1.0).all()
    assert barriers["k"].tolist() == [0, 4, 10] and (barriers["total_steps"] == 10).all()
    assert list(paths.columns) == ["k", "t", "loss", "error"] and len(paths) == 3 * 5
    assert not barriers.attrs["interrupted"]
    # k = T: both copies are the phase-1 network itself, identical endpoints, no barrier
    last = barriers.set_index("k").loc[10]
    assert last["barrier"] == 0.0 and last["error_a"] == last["error_b"]
    assert paths[paths["k"] == 10]["error"].nunique() == 1
    for k, g in paths.groupby("k"):
        assert barriers.set_index("k").loc[k, "barrier"] == C.barrier(g, metric="error")
    # exactly instability() at the same k (phase 1 snapshotted instead of re-run)
    ref = C.instability(init, b, k_steps=4, recipe=recipe, steps=5)
    assert barriers.set_index("k").loc[4, "barrier"] == ref.barrier
    pd.testing.assert_frame_equal(
        paths[paths["k"] == 4].drop(columns="k").reset_index(drop=True), ref.frame)
    for k, v in init.state_dict().items():
        assert torch.equal(v, before[k])
    for bad in ([11], [-1], [], [2.5]):
        with pytest.raises(ValueError, match="ks"):
            C.instability_curve(init, b, ks=bad, recipe=recipe)
    with pytest.raises(ValueError, match="metric"):
        C.instability_curve(init, b, ks=[0], recipe=recipe, metric="accuracy")


def test_sparse_instability_rewinds_the_magnitude_ticket_of_theta_t(digits):
    """Frankle et al. Figs. 5-6: the two copies start from m ⊙ θ_k, m = magnitude mask of θ_T."""
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    recipe = Recipe(lr=1e-2, epochs=1, batch_size=100)  # T = 10 steps
    barriers, paths = C.instability_curve(init, b, ks=[0, 4], recipe=recipe, steps=5,
                                          sparsity=0.8)
    # the mask by hand: phase 1 (seed 0) to T, global magnitude of θ_T
    theta_t = copy.deepcopy(init)
    fit(theta_t, b.train.tensors, recipe=recipe, seed=0, progress=False)
    masks = pl.prune(theta_t, "mp", sparsity=0.8).masks
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert barriers["density"].tolist() == [kept, kept] and abs(kept - 0.2) < 1e-3
    # same numbers with the mask passed explicitly
    same, same_paths = C.instability_curve(init, b, ks=[0, 4], recipe=recipe, steps=5,
                                           masks=masks)
    pd.testing.assert_frame_equal(barriers, same)
    pd.testing.assert_frame_equal(paths, same_paths)
    # and the endpoints of k = 4 are the rewound subnetwork trained by hand with the mask held
    start = copy.deepcopy(init)
    fit(start, b.train.tensors, recipe=recipe.replace(max_steps=4), seed=0, progress=False)
    ends = []
    for s in (0, 1):
        m = pl.masks.apply(start, masks)
        fit(m, b.train.tensors, recipe=recipe.replace(max_steps=6), seed=s, progress=False)
        for n, w in pl.masks.remove(m).named_parameters():
            if n in masks:
                assert (w[~masks[n]] == 0).all()
        ends.append(evaluate(m, b.test)["error"])
    row = barriers.set_index("k").loc[4]
    assert row["error_a"] == pytest.approx(ends[0]) and row["error_b"] == pytest.approx(ends[1])
    # differs from the dense run
    dense, _ = C.instability_curve(init, b, ks=[4], recipe=recipe, steps=5)
    assert dense["error_a"].iloc[0] != row["error_a"] or dense["error_b"].iloc[0] != row["error_b"]
    with pytest.raises(ValueError, match="not both"):
        C.instability_curve(init, b, ks=[0], recipe=recipe, sparsity=0.5, masks=masks)
    with pytest.raises(ValueError, match="sparsity"):
        C.instability_curve(init, b, ks=[0], recipe=recipe, sparsity=1.5)


def test_instability_reraises_an_interrupt_caught_by_fit(monkeypatch):
    import prunelab.connectivity as CN

    calls = []

    class Interrupted:
        interrupted = True

    def fake_fit(model, data, *, recipe, seed, progress):
        calls.append(seed)
        return Interrupted()

    monkeypatch.setattr(CN, "fit", fake_fit)
    bundle = pl.data.load("digits")
    model = pl.models.build("mlp", bundle, seed=0)
    with pytest.raises(KeyboardInterrupt, match="no barrier"):
        CN.instability(model, bundle, k_steps=2, recipe=pl.train.Recipe(epochs=1, max_steps=4))
    assert calls == [0]
