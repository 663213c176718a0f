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


# ------------------------------------------------------------------ MaskedCopy (slider engine)
def _check_copy(live, ranking, s, reference_model, x):
    """The live copy equals the model with the ranking's masks at ``s`` attached."""
    want = ranking.masks(s)
    assert _same(live.masks, want), s
    assert live.kept == [int(want[n].sum()) for n in live.names], s
    ref = M.apply(reference_model, want)
    for n in live.names:
        assert torch.equal(live.weights[n], pl.graph.weight(ref, n).detach()), (n, s)
    with torch.no_grad():
        assert torch.equal(live.model(x), ref(x))


# moves down and up, small (written incrementally) and large (a full pass), repeated values
SPARSITIES = [0.5, 0.55, 0.9, 0.91, 0.2, 0.25, 0.25, 0.999, 0.0, 0.6, 0.58, 0.97, 0.3]


@pytest.mark.parametrize("scope", M.SCOPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_copy_equals_the_ranking_masks_at_every_move(scope, dtype):
    net = _net().to(dtype)
    x = _batch()[0].to(dtype)
    live = E.MaskedCopy(net)
    ranking = E.Pruner(net, "random", scope=scope, seed=1).ranking
    changes = []
    for s in SPARSITIES:
        changes.append(live.show(ranking, s))
        _check_copy(live, ranking, s, net, x)
    assert changes[6] is False and all(changes[:6]) and all(changes[7:])  # 0.25 twice
    # a second ranking (another scope) takes over from any state
    other = E.Pruner(net, "mp", scope="layerwise").ranking
    assert live.show(other, 0.7)
    _check_copy(live, other, 0.7, net, x)
    assert live.weights["fc1.weight"].dtype == dtype


def test_masked_copy_keeps_attached_masks_and_leaves_the_model_alone():
    net = pl.prune(_net(), "random", sparsity=0.5, scope="layerwise", seed=3).model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _batch()[0]
    live = E.MaskedCopy(net)
    old = M.current(net)
    assert _same(live.masks, old)
    # layerwise below the attached sparsity: restored entries keep the attached mask
    for scope in ("layerwise", "global"):
        ranking = E.Pruner(net, "mp", scope=scope).ranking
        for s in (0.5, 0.8, 0.52, 0.1, 0.95, 0.6):
            if scope == "global" and s < 0.5:
                continue
            live.show(ranking, s)
            _check_copy(live, ranking, s, net, x)
            assert all(not (live.masks[n] & ~old[n]).any() for n in old)
    assert _same(before, net.state_dict())
    assert not any(p.requires_grad for p in live.model.parameters())


def test_masked_copy_show_masks_then_a_ranking_again():
    net, x = _net(), _batch()[0]
    live = E.MaskedCopy(net)
    ranking = E.Pruner(net, "mp").ranking
    live.show(ranking, 0.6)
    nm = M.select(pl.score(net, "mp"), None, scope="2:4")
    live.show_masks(nm)
    assert _same(live.masks, nm)
    ref = M.apply(net, nm)
    assert all(torch.equal(live.weights[n], pl.graph.weight(ref, n)) for n in live.names)
    assert live.kept == [int(m.sum()) for m in nm.values()]
    assert live.show(ranking, 0.6)  # same ranking and target as before: still rewritten
    _check_copy(live, ranking, 0.6, net, x)


def test_masked_copy_with_tied_weights_takes_the_full_pass():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    net = Tied()
    live = E.MaskedCopy(net)
    scores = {n: torch.rand(6, 6) for n in ("a.weight", "b.weight")}
    scores["b.weight"] = scores["a.weight"]
    ranking = M.Ranking(scores, scope="layerwise")
    for s in (0.3, 0.35, 0.8):
        assert live.show(ranking, s)
        assert _same(live.masks, ranking.masks(s))
        assert torch.equal(live.weights["a.weight"],
                           net.a.weight.detach() * ranking.masks(s)["a.weight"])


def test_masked_copy_refuses_a_model_without_prunable_weights():
    with pytest.raises(ValueError, match="no prunable weights"):
        E.MaskedCopy(torch.nn.Sequential(torch.nn.ReLU()))
