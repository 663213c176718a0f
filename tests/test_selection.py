"""The one selection rule (prunelab.selection): exact counts, ties by index, every path uses it."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunelab.criteria as C
from prunelab import masks as M
from prunelab import selection as S
from prunelab.criteria import gradient as GR
from prunelab.criteria import lookahead_variants as LV


@pytest.mark.parametrize("s", [0.0001, 0.5, 0.9, 0.9999])
def test_sampled_selection_on_large_inputs_is_exact(s):
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(2_500_000, generator=g) * 50).round()  # many ties at every threshold
    k = M.n_pruned(s, big.numel())
    assert S._kth_smallest(big, k) == torch.kthvalue(big, k).values
    keep = M.select({"w.weight": big}, s)["w.weight"]
    assert int((~keep).sum()) == k
    assert big[keep].min() >= big[~keep].max()


def test_masks_reexports_the_selection_names():
    for name in ("select", "Ranking", "schedule", "check_sparsity", "check_scope", "n_pruned",
                 "lap_layer_sparsity", "SCOPES"):
        assert getattr(M, name) is getattr(S, name), name


def test_prune_lowest_exact_with_ties_by_index_any_shape_and_dtype():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([[3.0, 1.0, 1.0], [1.0, -math.inf, 2.0]], dtype=dtype)
        keep = S.prune_lowest(x, 3)
        # -inf first, then the two lowest-index 1.0 entries; the third 1.0 survives.
        assert keep.tolist() == [[True, False, False], [True, False, True]]
        assert S.prune_lowest(x, 0).all() and not S.prune_lowest(x, 6).any()


def test_numpy_scalars_and_bad_values():
    assert S.check_sparsity(np.float32(0.9)) == 0.9  # read at its own precision
    assert S.check_sparsity(np.float64(0.25)) == 0.25
    assert S.check_sparsity(np.int64(0)) == 0.0
    for bad in (True, float("nan"), 1.0, -0.1, "0.5", None):
        with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
            S.check_sparsity(bad)


def test_pruned_counts_per_layer_and_uniform():
    numels = {"a": 10, "b": 100}
    assert S.pruned_counts(numels, 0.29) == {"a": 2, "b": 29}
    assert S.pruned_counts(numels, {"b": 0.5}) == {"a": 0, "b": 50}
    with pytest.raises(ValueError, match="unknown layers"):
        S.pruned_counts(numels, {"c": 0.5})
    with pytest.raises(ValueError, match=r"sparsity\['a'\]"):
        S.pruned_counts(numels, {"a": 1.5})


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def counting(monkeypatch):
    calls = []
    real = S.prune_lowest

    def spy(flat, k):
        calls.append(k)
        return real(flat, k)

    monkeypatch.setattr(S, "prune_lowest", spy)
    return calls


@pytest.mark.parametrize("sparsity,scope", [(0.7, "global"), (0.6, "layerwise"),
                                            ({"0.weight": 0.5, "4.weight": 0.3}, "global")])
def test_synflow_inner_loop_goes_through_selection(monkeypatch, sparsity, scope):
    calls = counting(monkeypatch)
    model = net()
    res = GR.synflow(model, sparsity=sparsity, scope=scope, iterations=5, input_shape=(6,))
    assert calls, "iterative SynFlow must cut with selection.prune_lowest"
    if isinstance(sparsity, dict):
        mask = S.select(res.scores, layer_sparsity=sparsity)
    else:
        mask = S.select(res.scores, sparsity, scope=scope)
    for n, m in res.info["masks"].items():
        assert torch.equal(mask[n], m), n


@pytest.mark.parametrize("name", ["lap-forward", "lap-backward", "lap-forward-seq"])
def test_ordered_lap_goes_through_selection(monkeypatch, name):
    calls = counting(monkeypatch)
    model = net()
    scores = C.get(name)(model, sparsity=0.6, scope="layerwise")
    assert calls, f"{name} must cut with selection.prune_lowest"
    mask = S.select(scores, 0.6, scope="layerwise")
    counts = LV.layer_targets(model, 0.6, "layerwise", name)
    for n, m in mask.items():
        assert int((~m).sum()) == counts[n] == S.n_pruned(0.6, m.numel())
        # the procedure's own pruned entries are exactly those at -inf
        assert torch.equal(~m, torch.isneginf(scores[n]))


def test_select_goes_through_prune_lowest(monkeypatch):
    calls = counting(monkeypatch)
    S.select({"a.weight": torch.arange(10.0)}, 0.3)
    assert calls == [3]


@pytest.mark.parametrize("kind", ["continuous", "ties", "dead"])
def test_global_selection_of_large_parts_equals_the_concatenated_selection(kind):
    """Above 2M entries the global cut brackets the threshold part by part instead of
    concatenating; the masks must be those of prune_lowest on the concatenation."""
    import math

    g = torch.Generator().manual_seed(1)
    if kind == "continuous":
        parts = [torch.rand(1500, 1000, generator=g), torch.rand(700_000, generator=g)]
    elif kind == "ties":
        parts = [torch.randint(0, 50, (1_200_000,), generator=g).float(),
                 torch.randint(0, 50, (1000, 900), generator=g).float()]
    else:
        a = torch.rand(3_000_000, generator=g)
        a[:500_000] = -math.inf  # pruned in an earlier stage
        parts = [a, torch.rand(100_000, generator=g)]
    n = sum(p.numel() for p in parts)
    flat = torch.cat([p.reshape(-1) for p in parts])
    for frac in (0.01, 0.5, 0.99):
        k = int(frac * n)
        want = S.prune_lowest(flat, k).split([p.numel() for p in parts])
        got = S.prune_lowest_parts(parts, k)
        assert all(torch.equal(x.reshape(-1), y) for x, y in zip(got, want))
        assert sum(int((~x).sum()) for x in got) == k
