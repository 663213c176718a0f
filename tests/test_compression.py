"""Deep Compression storage accounting (Han et al. 2016): Huffman, relative indices, k-means
weight sharing, the per-layer storage report and the quantised copy."""
import numpy as np
import pytest
import torch
from torch import nn

from prunelab import compression as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab import models

CLRS = {"a": 45, "b": 13, "c": 12, "d": 16, "e": 9, "f": 5}


def _prefix_free(code: dict) -> bool:
    words = sorted(code.values())
    return all(not words[i + 1].startswith(words[i]) for i in range(len(words) - 1))


# ----------------------------------------------------------------------------- Huffman
def test_huffman_code_length_matches_hand_example():
    # CLRS 16.3: merge f+e=14, c+b=25, 14+d=30, 25+30=55, a+55=100 ->
    # a at depth 1, b c d at depth 3, e f at depth 4: 45 + 3·(13+12+16) + 4·(9+5) = 224
    code = C.huffman_code(CLRS)
    assert {s: len(b) for s, b in code.items()} == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 4,
                                                   "f": 4}
    assert C.huffman_bits(CLRS) == 224
    assert _prefix_free(code)
    assert C.huffman_code(dict(reversed(list(CLRS.items())))) == code  # insertion order irrelevant
    assert C.huffman_code(CLRS) == code


def test_huffman_ties_deterministic_and_edge_cases():
    counts = {3: 1, 1: 1, 2: 1, 0: 1}
    code = C.huffman_code(counts)
    assert sorted(len(b) for b in code.values()) == [2, 2, 2, 2] and _prefix_free(code)
    assert C.huffman_code(dict(sorted(counts.items()))) == code
    assert C.huffman_code({"x": 7}) == {"x": "0"} and C.huffman_bits({"x": 7}) == 7
    assert C.huffman_code({}) == {} and C.huffman_bits({"a": 0, "b": 0}) == 0
    assert set(C.huffman_code({"a": 0, "b": 2, "c": 1})) == {"b", "c"}
    with pytest.raises(ValueError, match="non-negative"):
        C.huffman_code({"a": -1})


def test_huffman_is_optimal_vs_fixed_length():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        counts = {i: int(c) for i, c in enumerate(rng.integers(1, 100, n))}
        code = C.huffman_code(counts)
        assert _prefix_free(code)
        assert sum(2.0 ** -len(b) for b in code.values()) == pytest.approx(1.0)  # full tree
        assert C.huffman_bits(counts) <= sum(counts.values()) * int(np.ceil(np.log2(n)))


# ----------------------------------------------------------------------------- relative indices
def test_relative_indices_hand_example_with_fillers():
    # 3 bits -> largest difference 7. Kept at 1, 4, 19: gaps 1, 3, 15; 15 = 7 + 7 + 1 -> 2 fillers
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[1, 4, 19]] = True
    diffs, n_filler = C.relative_indices(mask, 3)
    assert n_filler == 2
    assert diffs.tolist() == [1, 3, 7, 7, 1]
    assert np.cumsum(diffs)[[0, 1, 4]].tolist() == [1, 4, 19]  # positions are recovered
    # a gap that is an exact multiple of 7 needs one filler fewer than its quotient
    mask = torch.zeros(30, dtype=torch.bool)
    mask[[0, 14]] = True
    diffs, n_filler = C.relative_indices(mask, 3)
    assert (diffs.tolist(), n_filler) == ([0, 7, 7], 1)
    assert C.relative_indices(np.zeros(5, bool), 3)[1] == 0
    with pytest.raises(ValueError, match="index_bits"):
        C.relative_indices(mask, 0)


def test_relative_indices_roundtrip_random():
    rng = np.random.default_rng(1)
    m = rng.random(5000) < 0.03
    for bits in (2, 4, 8):
        diffs, n_filler = C.relative_indices(m, bits)
        assert diffs.max() <= 2 ** bits - 1 and diffs.size == m.sum() + n_filler
        pos = np.cumsum(diffs)
        assert set(np.flatnonzero(m)) <= set(pos.tolist()) and len(set(pos.tolist())) == pos.size


# ----------------------------------------------------------------------------- k-means
def test_kmeans_exact_when_enough_bits_and_deterministic():
    vals = torch.tensor([0.5, -1.25, 0.5, 3.0, 0.1, -1.25, 0.1, 7.0], dtype=torch.float32)
    cent, assign = C.kmeans_share(vals, 3)  # 5 distinct values <= 8 centroids
    assert len(cent) <= 8
    np.testing.assert_array_equal(cent[assign], vals.double().numpy())
    c2, a2 = C.kmeans_share(vals, 3)
    np.testing.assert_array_equal(cent, c2)
    np.testing.assert_array_equal(assign, a2)


def test_kmeans_lloyd_reduces_distortion():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(-1, 0.05, 300), rng.normal(0.2, 0.05, 50),
                        rng.normal(2, 0.05, 30)])
    cent, assign = C.kmeans_share(v, 2, iters=50)
    assert cent.size == 4 and assign.min() >= 0 and assign.max() < 4
    init = np.linspace(v.min(), v.max(), 4)
    d_init = ((v - init[np.abs(v[:, None] - init).argmin(1)]) ** 2).sum()
    assert ((v - cent[assign]) ** 2).sum() <= d_init
    c2, a2 = C.kmeans_share(v, 2, iters=50)
    np.testing.assert_array_equal(assign, a2)
    with pytest.raises(ValueError, match="init"):
        C.kmeans_share(v, 2, init="random")
    with pytest.raises(ValueError, match="bits"):
        C.kmeans_share(v, 0)


# ----------------------------------------------------------------------------- model level
@pytest.fixture(scope="module")
def pruned_mlp():
    torch.manual_seed(0)
    net = models.mlp((64,), 10, hidden=(128,))
    masks = M.select({n: w.detach().abs() for n, w in G.weights(net).items()}, 0.9,
                     scope="layerwise")
    return M.apply(net, masks), masks


def test_storage_report_pipeline(pruned_mlp):
    net, masks = pruned_mlp
    before = {k: v.clone() for k, v in net.state_dict().items()}
    df = C.storage_report(net)
    for k, v in net.state_dict().items():  # the model is unchanged, bit for bit
        assert torch.equal(v, before[k])
    layers = df[df.layer != "total"].set_index("layer")
    assert list(layers.index) == G.prunable_names(net)
    assert set(layers.kind) == {"fc"}
    for n, m in masks.items():
        assert layers.loc[n, "nonzero"] == int(m.sum())
        assert layers.loc[n, "numel"] == m.numel()
        assert layers.loc[n, "dense_bits"] == 32 * m.numel()
    for _, r in df.iterrows():  # 90 % sparse: every stage smaller than the last
        assert r.dense_bits >= r.sparse_bits >= r.quantized_bits >= r.huffman_bits > 0
        assert r.sparse_ratio <= r.quantized_ratio <= r.huffman_ratio
    total = df.set_index("layer").loc["total"]
    assert total.dense_bits == layers.dense_bits.sum()
    assert total.huffman_ratio == pytest.approx(total.dense_bits / total.huffman_bits)
    r = layers.iloc[0]
    assert r.sparse_bits == r.stored * (32 + 5)
    assert r.quantized_bits == r.stored * (5 + 5) + 32 * r.n_centroids and r.n_centroids <= 32
    # explicit masks give the same report as the attached ones; skipped stages carry over
    assert df.equals(C.storage_report(net, masks=masks))
    plain = C.storage_report(net, quantize=False, huffman=False)
    assert (plain.quantized_bits == plain.sparse_bits).all()
    assert (plain.huffman_bits == plain.sparse_bits).all()


def test_storage_report_conv_kind_and_errors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    df = C.storage_report(net)  # unpruned: dense weights, no mask attached
    assert df.kind.tolist() == ["conv", "fc", "all"]
    assert df.nonzero.tolist()[:2] == [8 * 3 * 9, 8 * 36 * 10]
    assert df.weight_bits.tolist()[:2] == [8, 5] and df.index_bits.tolist()[:2] == [8, 5]
    with pytest.raises(ValueError, match="not prunable"):
        C.storage_report(net, masks={"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        C.storage_report(net, masks={"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="fc_bits"):
        C.storage_report(net, fc_bits=0)


def test_quantized_copy(pruned_mlp):
    net, masks = pruned_mlp
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = C.quantized_copy(net, fc_bits=3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    for n, w in G.weights(q).items():
        kept = w[masks[n]]
        assert torch.unique(kept[kept != 0]).numel() <= 2 ** 3
        assert (w[~masks[n]] == 0).all()
        # each kept weight moved to a nearby centroid
        orig = G.weight(net, n)[masks[n]]
        assert (kept - orig).abs().max() < (orig.max() - orig.min()) / 2
    # plenty of bits: quantisation is lossless
    q8 = C.quantized_copy(net, fc_bits=12)
    for n, w in G.weights(q8).items():
        assert torch.equal(w, G.weight(net, n))
    x = torch.randn(4, 64)
    assert torch.equal(q8(x), net(x))
