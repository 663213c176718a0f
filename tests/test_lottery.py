"""Lottery tickets: IMP with rewinding (Frankle et al. Algorithm 2) on a tiny problem."""
import pytest
import torch

import prunelab as pl
from prunelab import masks as M
from prunelab.lottery import imp
from prunelab.train import Recipe


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
                                dict(scope="nope")])
def test_bad_arguments(setup, kw):
    model, bundle = setup
    args = dict(rounds=1, recipe=RECIPE) | kw
    with pytest.raises(ValueError):
        imp(model, bundle, **args)
