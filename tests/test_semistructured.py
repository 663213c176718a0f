"""N:M semi-structured sparsity (prunelab.semistructured)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelab import semistructured as N


def brute(scores, n, m, previous=None):
    """Per group: sort by (alive, score, index), prune the m - n first; the dead stay dead."""
    flat = scores.reshape(scores.shape[0], -1).tolist()
    alive = (previous.reshape(scores.shape[0], -1).tolist() if previous is not None
             else [[True] * len(r) for r in flat])
    out = []
    for row, live in zip(flat, alive):
        keep = []
        for g in range(0, len(row), m):
            idx = sorted(range(m), key=lambda i: (live[g + i], row[g + i], i))
            kept = set(idx[m - n:])
            keep += [i in kept and live[g + i] for i in range(m)]
        out.append(keep)
    return torch.tensor(out).reshape(scores.shape)


nm = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8)])


@st.composite
def case(draw):
    n, m = draw(nm)
    rows = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 4))
    # few distinct values: many ties, also zeros, negatives and -inf (what a criterion gives the
    # weights it pruned itself: a live -inf still ranks above a weight pruned before)
    vals = draw(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0, -math.inf]),
                         min_size=rows * groups * m,
                         max_size=rows * groups * m))
    s = torch.tensor(vals, dtype=torch.float64).reshape(rows, groups * m)
    prev = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=s.numel(),
                                              max_size=s.numel())))
    prev = None if prev is None else torch.tensor(prev).reshape(s.shape)
    return s, n, m, prev


@settings(max_examples=200, deadline=None)
@given(case())
def test_pattern_and_brute_force(c):
    s, n, m, prev = c
    mask = N.nm_select(s, n, m)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert (mask.reshape(s.shape[0], -1, m).sum(-1) == n).all()   # exactly n per group
    assert torch.equal(mask, brute(s, n, m))
    N.check_nm(mask, n, m)
    if prev is not None:
        after = N.nm_select(s, n, m, previous=prev)
        assert not (after & ~prev).any()                            # pruned stays pruned
        alive = prev.reshape(s.shape[0], -1, m).sum(-1)
        kept = after.reshape(s.shape[0], -1, m).sum(-1)
        assert torch.equal(kept, alive.clamp(max=n))               # fewer alive: keeps those
        assert torch.equal(after, brute(s, n, m, prev))


def test_tie_break_prunes_lower_index_first():
    s = torch.zeros(1, 8)
    assert N.nm_select(s, 2, 4).tolist() == [[False, False, True, True] * 2]
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert N.nm_select(s, 2, 4).tolist() == [[True, False, True, False]]


def test_conv_groups_run_along_flattened_in_times_kernel():
    torch.manual_seed(0)
    s = torch.rand(3, 2, 2, 2)                      # (out, in, kh, kw): 8 per row = 2 groups
    mask = N.nm_select({"conv.weight": s}, 2, 4)["conv.weight"]
    assert mask.shape == s.shape
    assert (mask.reshape(3, 2, 4).sum(-1) == 2).all()
    torch.testing.assert_close(mask.reshape(3, 8), brute(s.reshape(3, 8), 2, 4))


def test_dict_and_previous_dict():
    torch.manual_seed(0)
    scores = {"a.weight": torch.rand(4, 8), "b.weight": torch.rand(2, 4)}
    first = N.nm_select(scores, 3, 4)
    second = N.nm_select(scores, 2, 4, previous=first)
    for k in scores:
        assert not (second[k] & ~first[k]).any()
        assert (second[k].reshape(second[k].shape[0], -1, 4).sum(-1) == 2).all()


def test_stage_ns():
    assert N.stage_ns(2, 4, 1) == [2]
    assert N.stage_ns(2, 4, 2) == [3, 2]
    assert N.stage_ns(1, 8, 7) == [7, 6, 5, 4, 3, 2, 1]
    ns = N.stage_ns(2, 8, 5, "exponential")
    assert ns[-1] == 2 and all(a >= b for a, b in zip(ns, ns[1:]))
    with pytest.raises(ValueError, match="schedule"):
        N.stage_ns(2, 4, 2, "cosine")


@pytest.mark.parametrize("spec,expected", [("2:4", (2, 4)), (" 1 : 8 ", (1, 8)), ("4:8", (4, 8))])
def test_parse_nm(spec, expected):
    assert N.parse_nm(spec) == expected
    assert N.is_nm(spec)


@pytest.mark.parametrize("spec,match", [
    ("4:4", r"m must be larger than n"), ("5:4", r"m must be larger than n"),
    ("0:4", r"n must be at least 1"), ("2/4", r"'n:m'"), ("a:b", r"'n:m'"), ("2:4:8", r"'n:m'"),
    ((2, 4), r"'n:m'"), ("", r"'n:m'"), ("-1:4", r"'n:m'"),
])
def test_parse_nm_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        N.parse_nm(spec)
    assert not N.is_nm("global")


def test_bad_inputs_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 'fc.weight': its input dimension \(6\) is not "
                                         r"divisible by m = 4"):
        N.nm_select({"fc.weight": torch.rand(3, 6)}, 2, 4)
    with pytest.raises(ValueError, match=r"'conv.weight'.*\(18 = 2 x 3 x 3\).*m = 4"):
        N.nm_select({"conv.weight": torch.rand(3, 2, 3, 3)}, 2, 4)
    with pytest.raises(ValueError, match=r"'b'.*at least 2 dimensions"):
        N.nm_select({"b": torch.rand(8)}, 2, 4)
    with pytest.raises(ValueError, match=r"1 <= n < m"):
        N.nm_select(torch.rand(2, 4), 4, 4)
    with pytest.raises(ValueError, match=r"NaN"):
        N.nm_select(torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]), 2, 4)
    with pytest.raises(ValueError, match=r"previous\['a'\] has shape"):
        N.nm_select({"a": torch.rand(2, 4)}, 2, 4, previous={"a": torch.ones(2, 8, dtype=bool)})
    with pytest.raises(ValueError, match=r"layer 'x': row 0, group 0 keeps 3 of 4"):
        N.check_nm({"x": torch.tensor([[True, True, True, False]])}, 2, 4)


def test_float64_and_integer_scores():
    s = torch.arange(8, dtype=torch.int64).reshape(1, 8)
    assert N.nm_select(s, 1, 4).tolist() == [[False, False, False, True] * 2]
    assert N.nm_select(s.double(), 1, 4).tolist() == [[False, False, False, True] * 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is tested without CUDA")
def test_export_refuses_on_cpu_with_a_clear_message():
    lin = torch.nn.Linear(8, 4)
    mask = N.nm_select(lin.weight.abs(), 2, 4)
    with pytest.raises(RuntimeError, match=r"layer '<tensor>' is on 'cpu'.*"
                                           r"to_sparse_semi_structured.*CUDA GPUs only.*no CUDA "
                                           r"device is present"):
        N.to_semi_structured(lin.weight, mask)
    model = torch.nn.Sequential(lin)
    with pytest.raises(RuntimeError, match=r"layer '0.weight' is on 'cpu'"):
        N.to_semi_structured(model, {"0.weight": mask})
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 2))
    with pytest.raises(ValueError, match=r"only nn.Linear weights"):
        N.to_semi_structured(conv, {"0.weight": torch.ones(2, 2, 2, 2, dtype=torch.bool)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_on_cuda():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64).half().cuda()
    mask = N.nm_select(lin.weight.abs(), 2, 4)
    model = torch.nn.Sequential(lin)
    sparse = N.to_semi_structured(model, {"0.weight": mask})
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    dense = torch.nn.functional.linear(x, lin.weight * mask, lin.bias)
    torch.testing.assert_close(sparse(x), dense, atol=1e-2, rtol=1e-2)
