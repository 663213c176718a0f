"""Mode connectivity: straight segments, barriers, Bezier / polygonal-chain curves, planes.

All models are trained here, on the small ``digits`` dataset (no zoo seeds >= 1 needed).
"""
import copy

import pandas as pd
import pytest
import torch

import prunelab as pl
from prunelab import connectivity as C
from prunelab import curves as CV
from prunelab.train import Recipe, evaluate, fit

torch.set_num_threads(1)


from tests.conftest import bn_net as _bn_net  # noqa: E402


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
    cv = CV.bezier(pa, pb)
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
