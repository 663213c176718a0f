"""The shared engine of the explorer and the collapse sweeps: prunelab.explore."""
import pytest
import torch

import prunelab as pl
from prunelab import explore as E
from prunelab import masks as M


def _net(seed=0):
    return pl.models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(24, 16),
                           seed=seed).eval()


def _batch(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_once():
    assert E.ranks_once("mp") and E.ranks_once("snip")
    assert not E.ranks_once("mp", stages=2)
    assert not E.ranks_once("synflow")  # prunes toward the target inside the criterion
    with pytest.raises(ValueError, match="valid names"):
        E.ranks_once("nope")


@pytest.mark.parametrize("criterion", ["mp", "snip", "random"])
@pytest.mark.parametrize("scope", M.SCOPES)
def test_one_shot_masks_equal_one_shot_prune(criterion, scope):
    net, batch = _net(), _batch()
    pruner = E.Pruner(net, criterion, batch=batch, scope=scope, seed=2, lam=1e-3)
    assert pruner.one_shot
    for s in (0.1, 0.5, 0.93):
        ref = pl.prune(net, criterion, sparsity=s, scope=scope, batch=batch, seed=2, lam=1e-3)
        assert _same(pruner.masks(s), ref.masks), (criterion, scope, s)
    assert pruner.evaluations == 3
    # written into the caller's buffers, no new tensors
    out = {k: torch.ones_like(v) for k, v in ref.masks.items()}
    got = pruner.masks(0.93, out=out)
    assert all(got[k] is out[k] for k in out) and _same(out, ref.masks)


def test_run_equals_prune_and_iterative_masks():
    net, batch = _net(), _batch()
    staged = E.Pruner(net, "mp", batch=batch, seed=0).run(0.9, stages=3, schedule="linear")
    ref = pl.prune(net, "mp", sparsity=0.9, stages=3, schedule="linear", batch=batch)
    assert _same(staged.masks, ref.masks) and len(staged.history) == 3
    syn = E.Pruner(net, "synflow", seed=0, iterations=5)
    assert not syn.one_shot
    with pytest.raises(ValueError, match="no one-shot ranking"):
        syn.ranking
    assert _same(syn.masks(0.8), pl.prune(net, "synflow", sparsity=0.8, iterations=5).masks)


def test_callback_stops_a_run():
    seen = []
    res = E.Pruner(_net(), "mp").run(0.9, stages=4, callback=lambda row: seen.append(row) or True)
    assert len(seen) == 1 and res.interrupted


def test_attached_masks_stay_pruned_and_model_is_untouched():
    net = pl.prune(_net(), "random", sparsity=0.5, seed=3).model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    old = M.current(net)
    new = E.Pruner(net, "mp").masks(0.75)
    assert all(not (new[n] & ~old[n]).any() for n in old)
    assert _same(before, net.state_dict())


def test_obs_needs_a_run():
    net, batch = _net(), _batch()
    with pytest.raises(E.NeedsRun):
        E.one_shot_scores(net, "obs", batch=batch, allow_update=False)
    scores = E.one_shot_scores(net, "obs", batch=batch)  # allowed: the scores alone
    assert set(scores) == set(pl.graph.prunable_names(net))


def test_bad_scope_and_criterion():
    with pytest.raises(ValueError, match="scope"):
        E.Pruner(_net(), "mp", scope="everywhere")
    with pytest.raises(ValueError, match="valid names"):
        E.Pruner(_net(), "nope")
