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


# ----------------------------------------------------------------------------- staged selection
def _reference_select(scores, sparsity, previous):
    """select(scores, sparsity, previous=...) written out: previously pruned entries rank first
    (−inf), then a stable ascending sort over the concatenation (ties by global index), the
    n_pruned lowest pruned, and what ``previous`` pruned stays pruned."""
    names = list(scores)
    flat = torch.cat([torch.where(previous[n], scores[n].double(), -math.inf).flatten()
                      for n in names])
    k = S.n_pruned(sparsity, flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view(scores[n].shape) & previous[n]
        start += size
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_staged_selection_equals_select_stage_by_stage(dtype):
    # a layer above StagedSelection.BRACKET_MIN (the sampled bracket) and two small ones;
    # rounded scores give ties at every cut; some weights pruned before the first stage
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (300, 160), "b.weight": (40, 30), "c.weight": (3, 5)}
    assert math.prod(shapes["a.weight"]) > S.StagedSelection.BRACKET_MIN
    start = {n: torch.rand(s, generator=g) > 0.05 for n, s in shapes.items()}
    sel = S.StagedSelection(start)
    prev = {n: m.clone() for n, m in start.items()}
    total = sum(m.numel() for m in start.values())
    targets = S.schedule(0.995, 40, "exponential", start=1 - sum(
        int(m.sum()) for m in start.values()) / total)
    targets.insert(10, targets[9] - 0.01)  # a target below the current sparsity: no change
    for i, t in enumerate(targets):
        scores = {n: (torch.randn(s, generator=g, dtype=dtype) * (3 if i % 2 else 300)).round()
                  for n, s in shapes.items()}
        if i % 3 == 0:  # every third stage |scores| (like |ΔL|), the others signed
            scores = {n: s.abs() for n, s in scores.items()}
        ref = _reference_select(scores, t, prev)
        assert all(torch.equal(S.select(scores, t, previous=prev)[n], ref[n]) for n in ref)
        got = sel.select(scores, t)
        now = sel.pruned_now()
        for n in ref:
            assert torch.equal(got[n], ref[n]), (i, n)
            assert torch.equal(now[n], torch.nonzero((prev[n] & ~ref[n]).flatten()).flatten())
        assert sel.sparsity == pytest.approx(M.sparsity(ref)) and sel.sparsity == M.sparsity(ref)
        prev = {n: m.clone() for n, m in ref.items()}


def test_staged_selection_survivor_at_minus_inf_and_undo():
    # a survivor scored −inf ranks with the pruned entries (select's rule): delegated to select
    prev = {"w": torch.tensor([False, True, True, True, False, True])}
    scores = {"w": torch.tensor([5.0, -math.inf, 1.0, 2.0, 0.0, -math.inf])}
    sel = S.StagedSelection(prev)
    for t in (0.5, 0.67):
        want = S.select(scores, t, previous={"w": sel.masks["w"].clone()})
        before = sel.masks["w"].clone()
        got = sel.select(scores, t)["w"].clone()
        assert torch.equal(got, want["w"]) and sel.alive == int(got.sum())
        assert torch.equal(sel.undo()["w"], before) and sel.alive == int(before.sum())
        sel.select(scores, t)
        assert torch.equal(sel.undo()["w"], before) and torch.equal(sel.undo()["w"], before)


def test_staged_selection_rejects_empty_and_bad_sparsity():
    with pytest.raises(ValueError, match="empty"):
        S.StagedSelection({})
    sel = S.StagedSelection({"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="sparsity"):
        sel.select({"w": torch.zeros(4)}, 1.5)
