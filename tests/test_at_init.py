"""Pruning at initialisation: the compare grid and the *Missing the mark* ablations."""
import copy

import pandas as pd
import pytest
import torch

import prunelab as pl
from prunelab import at_init as A
from prunelab import masks as M
from prunelab.train import Recipe, fit

torch.set_num_threads(1)

HIDDEN = {"hidden": (32, 16)}
RECIPE = Recipe(epochs=1, lr=1e-3, batch_size=64, max_steps=8)
FAST = {"synflow": {"iterations": 5}}


@pytest.fixture(scope="module")
def bundle():
    return pl.data.load("digits")


@pytest.fixture(scope="module")
def init(bundle):
    return pl.models.build("mlp", bundle, seed=0, **HIDDEN)


@pytest.fixture(scope="module")
def reinit(bundle):
    return pl.models.build("mlp", bundle, seed=A.ABLATION_SEED_OFFSET, **HIDDEN)


@pytest.fixture(scope="module")
def batch(bundle):
    return bundle.batch("train", n=128, seed=0)


@pytest.fixture(scope="module")
def grid(bundle):
    return A.compare(bundle, criteria=("snip", "synflow", "mp"), scopes=("global", "layerwise"),
                     sparsities=(0.5, 0.9), ablations=A.ABLATIONS, seeds=(0,), recipe=RECIPE,
                     batch_size_for_scores=128, model_kwargs=HIDDEN, criterion_options=FAST)


def _kept(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def test_rows_columns_and_dense_reference(grid):
    assert list(grid.columns) == A.COLUMNS
    assert len(grid) == 3 * 2 * 2 * 4 + 1
    assert not grid.attrs["interrupted"]
    dense = grid[grid["criterion"] == "dense"]
    assert len(dense) == 1 and dense["sparsity"].iloc[0] == 0 and dense["density"].iloc[0] == 1
    runs = grid[grid["criterion"] != "dense"]
    keys = ["seed", "criterion", "scope", "sparsity", "ablation"]
    assert not runs.duplicated(keys).any()
    assert set(runs["ablation"]) == set(A.ABLATIONS)
    assert (grid["dataset"] == "digits").all() and (grid["arch"] == "mlp").all()
    assert grid["test_accuracy"].between(0, 1).all() and (grid["train_steps"] == 8).all()
    # the actual density is 1 - sparsity (exact counts; global total, layerwise per layer)
    assert ((runs["density"] - (1 - runs["sparsity"])).abs() < 1e-3).all()
    layerwise = runs[runs["scope"] == "layerwise"]
    assert ((layerwise["min_layer_density"] - (1 - layerwise["sparsity"])).abs() < 0.02).all()


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_density_per_scope(init, reinit, batch, scope):
    ab = A.ablate(init, "snip", sparsity=0.9, scope=scope, batch=batch, reinit=reinit)
    total = sum(m.numel() for m in ab.masks["original"].values())
    for name, masks in ab.masks.items():
        if scope == "global":  # same total; per-layer counts are the criterion's choice
            assert sum(_kept(masks).values()) == total - M.n_pruned(0.9, total), name
        else:  # every layer keeps the same count
            for n, m in masks.items():
                assert int(m.sum()) == m.numel() - M.n_pruned(0.9, m.numel()), (name, n)


def test_shuffled_same_layer_counts_other_positions(init, reinit, batch):
    ab = A.ablate(init, "snip", sparsity=0.8, batch=batch, reinit=reinit)
    orig, shuf = ab.masks["original"], ab.masks["shuffled"]
    assert _kept(orig) == _kept(shuf)
    assert any(not torch.equal(orig[n], shuf[n]) for n in orig)
    # the shuffle is seeded
    again = A.ablate(init, "snip", sparsity=0.8, batch=batch, ablations=("shuffled",))
    assert all(torch.equal(again.masks["shuffled"][n], shuf[n]) for n in shuf)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_inverted_keeps_the_lowest_ranked(init, batch, scope):
    ab = A.ablate(init, "snip", sparsity=0.7, scope=scope, batch=batch,
                  ablations=("original", "inverted"))
    inv, ranking = ab.masks["inverted"], ab.ranking
    assert all(torch.equal(ranking[n], ab.scores[n]) for n in ranking)  # one-shot: same scores
    groups = [[n] for n in inv] if scope == "layerwise" else [list(inv)]
    for g in groups:
        s = torch.cat([ranking[n].flatten() for n in g])
        keep = torch.cat([inv[n].flatten() for n in g])
        assert s[keep].max() <= s[~keep].min()
        orig = torch.cat([ab.masks["original"][n].flatten() for n in g])
        assert int(keep.sum()) == int(orig.sum())
        assert not (keep & orig).any()  # at 70 % sparsity the 30 % lowest and highest are disjoint


def test_inverted_synflow_ranks_with_one_shot_scores(init, batch):
    ab = A.ablate(init, "synflow", sparsity=0.9, batch=batch, ablations=("inverted",),
                  iterations=5)
    assert all(torch.isfinite(s).all() for s in ab.ranking.values())
    assert any(torch.isinf(s).any() for s in ab.scores.values())  # iterative: −inf for the early
    one_shot = pl.score(init, "synflow")
    assert all(torch.allclose(ab.ranking[n], one_shot[n]) for n in one_shot)
    assert M.sparsity(ab.masks["inverted"]) == pytest.approx(0.9, abs=1e-3)


def test_reinitialised_same_mask_new_weights(init, reinit, batch):
    ab = A.ablate(init, "mp", sparsity=0.9, batch=batch, reinit=reinit,
                  ablations=("original", "reinitialised"))
    orig, re = ab.masks["original"], ab.masks["reinitialised"]
    assert all(torch.equal(orig[n], re[n]) for n in orig)
    assert M.current(ab.models["reinitialised"]).keys() == orig.keys()
    plain_init, plain_re = G_weights(init), G_weights(M.remove(ab.models["reinitialised"]))
    fresh = G_weights(reinit)
    for n, m in orig.items():
        assert not torch.equal(plain_re[n][m], plain_init[n][m])
        assert torch.equal(plain_re[n][m], fresh[n][m])  # drawn by the architecture's initialiser
        assert (plain_re[n][~m] == 0).all()


def G_weights(model):
    return {n: w.detach() for n, w in pl.graph.weights(model).items()}


def test_pruned_weights_stay_zero_during_training(init, reinit, batch, bundle):
    ab = A.ablate(init, "grasp", sparsity=0.9, batch=batch, reinit=reinit)
    for name, model in ab.models.items():
        masks = ab.masks[name]

        def check(m, step, masks=masks):
            for n, w in pl.graph.weights(m).items():
                assert (w.detach()[~masks[n]] == 0).all(), (name, n, step)

        fit(model, bundle.train, recipe=RECIPE, seed=0, progress=False, step_callback=check)
        check(model, -1)


def test_caller_objects_untouched(init, reinit, batch, bundle):
    before = copy.deepcopy(init.state_dict())
    re_before = copy.deepcopy(reinit.state_dict())
    x_before = bundle.train.tensors[0].clone()
    ab = A.ablate(init, "snip", sparsity=0.9, batch=batch, reinit=reinit)
    fit(ab.models["original"], bundle.train, recipe=RECIPE, progress=False)
    for ref, now in ((before, init.state_dict()), (re_before, reinit.state_dict())):
        assert ref.keys() == now.keys() and all(torch.equal(ref[k], now[k]) for k in ref)
    assert not pl.graph.is_parametrized(init) and not pl.graph.is_parametrized(reinit)
    assert torch.equal(bundle.train.tensors[0], x_before)


def test_same_seed_same_frame(bundle):
    kw = dict(criteria=("snip", "random"), ablations=("original", "shuffled"), seeds=(3,),
              recipe=RECIPE, batch_size_for_scores=64, model_kwargs=HIDDEN)
    a, b = A.compare(bundle, **kw), A.compare(bundle, **kw)
    drop = list(A.TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))
    assert (a["seed"] == 3).all() and len(a) == 2 * 2 + 1


def test_blalock_grid(bundle):
    f = A.blalock(bundle, sparsities=(0.9,), recipe=RECIPE, batch_size_for_scores=64,
                  model_kwargs=HIDDEN, dense=False)
    assert set(zip(f["criterion"], f["scope"])) == {(c, s) for c in ("mp", "snip")
                                                    for s in ("global", "layerwise")}
    g = A.compare(bundle, criteria=("grad-mag",), scopes=("layerwise",), recipe=RECIPE,
                  batch_size_for_scores=64, model_kwargs=HIDDEN, dense=False)
    assert len(g) == 1 and g["density"].iloc[0] == pytest.approx(0.1, abs=1e-3)


def test_interrupt_returns_finished_rows(bundle, monkeypatch):
    calls = {"n": 0}
    real = A.evaluate

    def flaky(model, data, **kw):
        calls["n"] += 1
        if calls["n"] > 4:  # two runs (test + val each) finish, the third is interrupted
            raise KeyboardInterrupt
        return real(model, data, **kw)

    monkeypatch.setattr(A, "evaluate", flaky)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        f = A.compare(bundle, criteria=("mp",), ablations=("original", "shuffled"), recipe=RECIPE,
                      model_kwargs=HIDDEN)
    assert f.attrs["interrupted"] and len(f) == 2 and list(f.columns) == A.COLUMNS


@pytest.mark.parametrize("kw, match", [
    ({"criteria": ("snip", "nope")}, "unknown criterion 'nope'.*valid names"),
    ({"scopes": ("blockwise",)}, "unknown scopes.*global, layerwise"),
    ({"ablations": ("inverse",)}, "unknown ablations.*original, shuffled, inverted"),
    ({"sparsities": (1.0,)}, r"sparsity must be .*\[0, 1\), got 1.0"),
    ({"sparsities": (-0.1,)}, r"\[0, 1\), got -0.1"),
    ({"arch": "mlpx"}, "unknown arch 'mlpx'"),
    ({"batch_size_for_scores": 10**6}, "batch_size_for_scores must be an integer in 1..997"),
    ({"criterion_options": {"grasp": {}}}, "criteria not compared"),
    ({"seeds": (0.5,)}, "seeds must be"),
])
def test_validation(bundle, kw, match):
    with pytest.raises(ValueError, match=match):
        A.compare(bundle, **{"recipe": RECIPE, "criteria": ("mp",), **kw})


def test_ablate_validation(init, batch):
    with pytest.raises(ValueError, match="reinit="):
        A.ablate(init, "mp", sparsity=0.5)
    with pytest.raises(ValueError, match="unknown ablations"):
        A.ablate(init, "mp", sparsity=0.5, ablations=("flipped",))
    with pytest.raises(ValueError, match="data-dependent"):
        A.ablate(init, "snip", sparsity=0.5, ablations=("original",))
    other = pl.models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8,), seed=1)
    with pytest.raises(ValueError, match="another architecture"):
        A.ablate(init, "mp", sparsity=0.5, reinit=other, batch=batch)
