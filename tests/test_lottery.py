"""Lottery tickets: IMP with rewinding (Frankle et al. Algorithm 2) and instability vs the
rewinding step k (Frankle et al. 2020, Figs. 2-6), on a tiny problem."""
import copy

import pandas as pd
import pytest
import torch

import prunelab as pl
from prunelab import connectivity as C
from prunelab import lottery as L
from prunelab import masks as M
from prunelab.lottery import imp
from prunelab.train import Recipe, evaluate, fit


@pytest.fixture(scope="module")
def setup():
    bundle = pl.data.load("digits")
    model = pl.models.build("mlp", bundle, seed=0)
    return model, bundle


RECIPE = Recipe(optimizer="adam", lr=3e-3, epochs=2, batch_size=100)


def test_imp_rounds_rewind_and_masks(setup):
    model, bundle = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = imp(model, bundle, rounds=3, recipe=RECIPE, prune_fraction=0.5, rewind_step=5,
              reinit_control=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tickets = res.rounds[res.rounds.control == "ticket"]
    assert list(tickets["round"]) == [0, 1, 2, 3]
    assert tickets.density.tolist() == pytest.approx([1, 0.5, 0.25, 0.125], abs=2e-3)
    assert len(res.rounds[res.rounds.control == "reinit"]) == 3
    for a, b in zip(res.masks, res.masks[1:]):  # nested: pruned stays pruned
        assert all(not (b[n] & ~a[n]).any() for n in a)
    # the rewind point is θ_k: a few steps away from θ_0, not the trained weights
    w0, wk = model.fc1.weight, res.rewind_state["fc1.weight"]
    assert not torch.equal(w0, wk) and (w0 - wk).norm() < 0.5 * w0.norm()
    assert tickets.test_accuracy.iloc[0] > 0.8


def test_rewind_zero_is_frankle_carbin(setup):
    model, bundle = setup
    res = imp(model, bundle, rounds=1, recipe=RECIPE, prune_fraction=0.2, rewind_step=0)
    assert torch.equal(res.rewind_state["fc1.weight"], model.fc1.weight)
    assert M.sparsity(res.masks[1]) == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("kw", [dict(rounds=-1), dict(prune_fraction=1.0), dict(rewind_step=10**6),
                                dict(scope="nope"), dict(scope="2:4"), dict(seed=1.5)])
def test_bad_arguments(setup, kw):
    model, bundle = setup
    args = dict(rounds=1, recipe=RECIPE) | kw
    with pytest.raises(ValueError):
        imp(model, bundle, **args)


# ------------------------------------------- instability vs the rewinding step k (Frankle 2020)
@pytest.fixture(scope="module")
def digits():
    b = pl.data.load("digits")
    return b, b.train.tensors, b.test.tensors


@pytest.mark.parametrize("kw, error, match", [
    (dict(scope="2:4"), ValueError, r"scope='2:4'.*keeps exactly 2 of every 4.*density 0\.5"),
    (dict(scope="1:8", prune_fraction=0.5), ValueError, r"'1:8'.*prune_fraction=0\.5"),
    (dict(scope="4:2"), ValueError, "m must be larger than n"),
    (dict(scope="all"), ValueError, "scope must be one of"),
    (dict(recipe={"epochs": 1}), TypeError, "recipe must be a prunelab.train.Recipe, got dict"),
    (dict(reinit_control=1), TypeError, "reinit_control must be True or False"),
    (dict(seed="0"), ValueError, "seed must be an integer"),
])
def test_options_are_refused_before_any_training(setup, monkeypatch, kw, error, match):
    """Issue 16: imp(..., scope="2:4") failed only after the dense training; now every option
    is checked at entry."""
    model, bundle = setup
    monkeypatch.setattr(L, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(error, match=match):
        imp(model, bundle, **(dict(rounds=1, recipe=RECIPE) | kw))


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_bundle_without_a_reported_split_is_refused_at_entry(setup, monkeypatch, split):
    model, bundle = setup
    monkeypatch.setattr(L, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    parts = {s: getattr(bundle, s) for s in ("train", "val", "test")}
    parts[split] = None
    partial = pl.data.Bundle(name="partial", input_shape=bundle.input_shape,
                             num_classes=bundle.num_classes, classes=bundle.classes, **parts)
    with pytest.raises(ValueError, match=f"bundle.{split} must be a non-empty Dataset, got "
                                         "NoneType"):
        imp(model, partial, rounds=1, recipe=RECIPE)


def test_instability_runs(digits):
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    before = copy.deepcopy(init.state_dict())
    res = L.instability(init, b, k_steps=5, recipe=Recipe(lr=1e-2, epochs=2), seeds=(0, 1),
                        steps=5)
    assert res.barrier == C.barrier(res.frame, metric="error")
    assert len(res.frame) == 5
    for k, v in init.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="k_steps"):
        L.instability(init, b, k_steps=10_000, recipe=Recipe(epochs=1))


def test_instability_curve(digits):
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    before = copy.deepcopy(init.state_dict())
    recipe = Recipe(lr=1e-2, epochs=1, batch_size=100)  # T = ceil(997 / 100) = 10 steps
    barriers, paths = L.instability_curve(init, b, ks=[10, 0, 4, 4], recipe=recipe, steps=5)
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
    ref = L.instability(init, b, k_steps=4, recipe=recipe, steps=5)
    assert barriers.set_index("k").loc[4, "barrier"] == ref.barrier
    pd.testing.assert_frame_equal(
        paths[paths["k"] == 4].drop(columns="k").reset_index(drop=True), ref.frame)
    for k, v in init.state_dict().items():
        assert torch.equal(v, before[k])
    for bad in ([11], [-1], [], [2.5]):
        with pytest.raises(ValueError, match="ks"):
            L.instability_curve(init, b, ks=bad, recipe=recipe)
    with pytest.raises(ValueError, match="metric"):
        L.instability_curve(init, b, ks=[0], recipe=recipe, metric="accuracy")


def test_sparse_instability_rewinds_the_magnitude_ticket_of_theta_t(digits):
    """Frankle et al. Figs. 5-6: the two copies start from m ⊙ θ_k, m = magnitude mask of θ_T."""
    b, _, _ = digits
    init = pl.models.build("mlp", b, hidden=(16,), activation="relu", seed=0)
    recipe = Recipe(lr=1e-2, epochs=1, batch_size=100)  # T = 10 steps
    barriers, paths = L.instability_curve(init, b, ks=[0, 4], recipe=recipe, steps=5,
                                          sparsity=0.8)
    # the mask by hand: phase 1 (seed 0) to T, global magnitude of θ_T
    theta_t = copy.deepcopy(init)
    fit(theta_t, b.train.tensors, recipe=recipe, seed=0, progress=False)
    masks = pl.prune(theta_t, "mp", sparsity=0.8).masks
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert barriers["density"].tolist() == [kept, kept] and abs(kept - 0.2) < 1e-3
    # same numbers with the mask passed explicitly
    same, same_paths = L.instability_curve(init, b, ks=[0, 4], recipe=recipe, steps=5,
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
    dense, _ = L.instability_curve(init, b, ks=[4], recipe=recipe, steps=5)
    assert dense["error_a"].iloc[0] != row["error_a"] or dense["error_b"].iloc[0] != row["error_b"]
    with pytest.raises(ValueError, match="not both"):
        L.instability_curve(init, b, ks=[0], recipe=recipe, sparsity=0.5, masks=masks)
    with pytest.raises(ValueError, match="sparsity"):
        L.instability_curve(init, b, ks=[0], recipe=recipe, sparsity=1.5)


def test_instability_reraises_an_interrupt_caught_by_fit(monkeypatch):
    import prunelab.lottery as CN

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
