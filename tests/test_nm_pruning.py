"""N:M sparsity through the pruning path: ``pl.prune(model, c, scope="2:4")`` (issue 16).

Every unstructured criterion picks, in each group of m consecutive weights along a layer's input
dimension, its n highest scores (λ and stages included); checked against the criterion's own
scores fed to :func:`prunelab.semistructured.nm_select` by hand.
"""
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import criteria as C
from prunelab import selection as S
from prunelab import semistructured as N
from prunelab.config import PruneConfig

CRITERIA = ["mp", "lap", "qm", "snip", "random"]


def fcn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(dtype)


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=g, dtype=dtype), torch.randint(0, 4, (64,), generator=g)


def by_hand(model, criterion, n, m, *, lam=0.0, seed=0, batch=None, masks=None):
    scores = C.compute(model, criterion, batch=batch, lam=lam, seed=seed, masks=masks,
                       sparsity=1 - n / m, scope="layerwise").scores
    return N.nm_select(scores, n, m, previous=masks)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_shot_is_the_criterions_top_n_of_every_m(criterion, dtype):
    model, batch = fcn(dtype), data(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = pl.prune(model, criterion, scope="2:4", batch=batch)
    N.check_nm(r.masks, 2, 4)                                   # exactly 2 of every 4, every layer
    assert set(r.masks) == {"0.weight", "2.weight", "4.weight"}
    expected = by_hand(model, criterion, 2, 4, batch=batch)
    for k in expected:
        assert torch.equal(r.masks[k].cpu(), expected[k])
        w = pl.graph.weight(r.model, k)                          # the masked model's weight
        assert w.dtype == dtype
        N.check_nm({k: w != 0}, 2, 4, exact=False)
    assert r.history.sparsity.tolist() == [0.5] and r.config["sparsity"] == 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched


@pytest.mark.parametrize("criterion", ["mp", "lap", "qm", "random"])
def test_stages_step_n_down_and_pruned_stays_pruned(criterion):
    model, batch = fcn(), data()
    staged = pl.prune(model, criterion, scope="2:4", stages=3, schedule="linear", batch=batch)
    assert N.stage_ns(2, 4, 3, "linear") == [3, 3, 2]
    assert staged.history.target_sparsity.tolist() == [0.25, 0.25, 0.5]
    N.check_nm(staged.masks, 2, 4)
    # the same stages by hand: re-score the masked model with the criterion (seed + i) each time
    masks = None
    firsts = []
    for i, n in enumerate([3, 3, 2]):
        work = model if masks is None else pl.masks.apply(model, masks)
        masks = by_hand(work, criterion, n, 4, seed=i, batch=batch, masks=masks)
        N.check_nm(masks, n, 4)
        firsts.append(masks)
    for k in masks:
        assert torch.equal(staged.masks[k], masks[k])
        assert not (masks[k] & ~firsts[0][k]).any()             # what stage 1 pruned stays pruned
        assert not (masks[k] & ~firsts[1][k]).any()
    # stages reach a different 2:4 choice than one shot for a data-dependent criterion
    if criterion == "qm":
        one = pl.prune(model, "qm", scope="2:4", batch=batch).masks
        assert any(not torch.equal(one[k], masks[k]) for k in masks)


def test_exponential_schedule_and_more_stages_than_steps():
    model, batch = fcn(), data()
    r = pl.prune(model, "mp", scope="1:4", stages=5, batch=batch)
    ns = N.stage_ns(1, 4, 5, "exponential")
    assert r.history.target_sparsity.tolist() == pytest.approx([1 - n / 4 for n in ns])
    N.check_nm(r.masks, 1, 4)


def test_lambda_changes_the_choice_and_large_lambda_gives_mp():
    model, batch = fcn(), data()
    mp = pl.prune(model, "mp", scope="2:4").masks
    qm = pl.prune(model, "qm", scope="2:4", batch=batch).masks
    big = pl.prune(model, "qm", scope="2:4", batch=batch, lam=1e8).masks
    assert any(not torch.equal(qm[k], mp[k]) for k in mp)       # λ = 0: QM's own pattern
    assert all(torch.equal(big[k], mp[k]) for k in mp)          # λ → ∞: ranks as |θ|
    mid = pl.prune(model, "qm", scope="2:4", batch=batch, lam=1.0)
    assert torch.equal(mid.masks["0.weight"],
                       by_hand(model, "qm", 2, 4, lam=1.0, batch=batch)["0.weight"])


def test_conv_groups_along_in_times_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    x, y = torch.randn(8, 4, 6, 6), torch.randint(0, 3, (8,))
    r = pl.prune(model, "lap", scope="2:4", batch=(x, y))
    N.check_nm(r.masks, 2, 4)
    assert (r.masks["0.weight"].reshape(6, -1, 4).sum(-1) == 2).all()


def test_indivisible_layer_is_an_error_unless_left_out_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))   # 6 % 4 != 0
    with pytest.raises(ValueError, match=r"layer '0.weight': its input dimension \(6\) is not "
                                         r"divisible by m = 4"):
        pl.prune(model, "mp", scope="2:4")
    r = pl.prune(model, "mp", scope="2:4", nm_layers=["2.weight"])
    N.check_nm({"2.weight": r.masks["2.weight"]}, 2, 4)
    assert r.masks["0.weight"].all()                            # left dense, by name
    assert r.config["nm_layers"] == ["2.weight"]
    with pytest.raises(ValueError, match=r"nm_layers names unknown layers \['fc.weight'\]"):
        pl.prune(model, "mp", scope="2:4", nm_layers=["fc.weight"])
    with pytest.raises(ValueError, match=r"nm_layers is for an N:M scope.*'global'"):
        pl.prune(model, "mp", sparsity=0.5, nm_layers=["2.weight"])
    with pytest.raises(ValueError, match=r"nm_layers must be a non-empty list"):
        pl.prune(model, "mp", scope="2:4", nm_layers="2.weight")


def test_bad_patterns_and_sparsities():
    model = fcn()
    for scope, match in [("4:2", "m must be larger than n"), ("4:4", "m must be larger than n"),
                         ("0:4", "n must be at least 1"), ("2:x", r"'2:x'"),
                         ("two", r"scope must be one of .* or an N:M pattern")]:
        with pytest.raises(ValueError, match=match):
            pl.prune(model, "mp", sparsity=0.5, scope=scope)
        with pytest.raises(ValueError, match=match):
            S.check_scope(scope)
    with pytest.raises(ValueError, match=r"scope='2:4' keeps 2 of every 4.*sparsity 0.5.*"
                                         r"sparsity=0.9"):
        pl.prune(model, "mp", sparsity=0.9, scope="2:4")
    with pytest.raises(ValueError, match=r"layer_sparsity cannot be combined with the N:M"):
        pl.prune(model, "mp", layer_sparsity={"0.weight": 0.5}, scope="2:4")
    assert PruneConfig("mp", scope="2:4").sparsity == 0.5
    assert PruneConfig("mp", sparsity=0.5, scope="2:4") == PruneConfig("mp", scope="2:4")
    assert PruneConfig("mp", scope="1:3", sparsity=2 / 3).stage_scope == "layerwise"
    assert PruneConfig("mp", scope="2:4").to_dict()["scope"] == "2:4"


def test_select_and_ranking():
    torch.manual_seed(0)
    scores = {"a": torch.rand(3, 8), "b": torch.rand(2, 4)}
    expected = N.nm_select(scores, 2, 4)
    for sparsity in (None, 0.5):
        out = S.select(scores, sparsity, scope="2:4")
        assert all(torch.equal(out[k], expected[k]) for k in scores)
    prev = N.nm_select(scores, 3, 4)
    out = S.select(scores, scope="2:4", previous=prev)
    assert all(torch.equal(out[k], N.nm_select(scores, 2, 4, prev)[k]) for k in scores)
    with pytest.raises(ValueError, match=r"sparsity 0.5; got sparsity=0.25"):
        S.select(scores, 0.25, scope="2:4")
    with pytest.raises(ValueError, match=r"layer_sparsity cannot be combined"):
        S.select(scores, scope="2:4", layer_sparsity={"a": 0.5})
    with pytest.raises(ValueError, match=r"Ranking cannot express the N:M scope '2:4'"):
        S.Ranking(scores, scope="2:4")
    with pytest.raises(ValueError, match=r"Ranking cannot express"):
        pl.masks.Ranking(scores, scope="1:2")


def test_on_an_already_pruned_model_what_was_pruned_stays_pruned():
    model, batch = fcn(), data()
    base = pl.prune(model, "mp", sparsity=0.7)
    r = pl.prune(base.model, "lap", scope="2:4", batch=batch)
    for k, m in r.masks.items():
        assert not (m & ~base.masks[k]).any()
        alive = base.masks[k].reshape(m.shape[0], -1, 4).sum(-1)
        assert torch.equal(m.reshape(m.shape[0], -1, 4).sum(-1), alive.clamp(max=2))
    N.check_nm(r.masks, 2, 4, exact=False)                      # at most 2: what hardware needs
