"""Lookahead pruning (Park et al. 2020): Eq. 4/5 ground truth, BN (Eq. 8), variants, contracts.

Naive references below loop over entries in Python; they never call prunelab's lookahead code.
"""
import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab.criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab import models
from prunelab.criteria import lookahead as L
from prunelab.criteria import lookahead_variants as LV


def seeded(seed=0):
    torch.manual_seed(seed)


def f64(model):
    return model.double().eval()


# ------------------------------------------------------------------ Eq. 4 == Eq. 5, linear
def linear_block(seed=0):
    seeded(seed)
    return f64(nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False),
                             nn.Linear(3, 2, bias=False)))


def brute_eq4(mats, i, ones_in=7, ones_out=6):
    """||W_{i+1} W_i W_{i-1} - W_{i+1} W_i|w=0 W_{i-1}||_F for every entry of mats[i], with
    W_0 and W_{L+1} all-ones (any width)."""
    w0 = torch.ones(mats[0].shape[1], ones_in, dtype=torch.float64)
    wl = torch.ones(ones_out, mats[-1].shape[0], dtype=torch.float64)
    full = [w0, *mats, wl]
    j = i + 1
    prev, cur, nxt = full[j - 1], full[j], full[j + 1]
    base = nxt @ cur @ prev
    out = torch.empty_like(cur)
    for k in range(cur.shape[0]):
        for c in range(cur.shape[1]):
            z = cur.clone()
            z[k, c] = 0
            out[k, c] = torch.linalg.matrix_norm(base - nxt @ z @ prev)
    return out


def test_eq5_equals_eq4_distortion_on_a_linear_block():
    m = linear_block()
    mats = [m[i].weight.detach() for i in range(3)]
    s = L.lap(m)
    torch.testing.assert_close(s["1.weight"], brute_eq4(mats, 1), rtol=1e-10, atol=1e-12)
    # first/last layer: the all-ones neighbour is a constant factor (sqrt of its width)
    for i, name, const in ((0, "0.weight", math.sqrt(7)), (2, "2.weight", math.sqrt(6))):
        torch.testing.assert_close(s[name] * const, brute_eq4(mats, i), rtol=1e-10, atol=1e-12)


def test_relu_and_bias_do_not_change_lap():
    seeded(1)
    m = f64(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    mats = [m[i].weight.detach() for i in (0, 2, 4)]
    torch.testing.assert_close(L.lap(m)["2.weight"], brute_eq4(mats, 1))


# --------------------------------------------------------------------------- conv blocks
def conv_operator(block, in_shape):
    """The matrix of a linear conv block, from its action on the input basis."""
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *in_shape)
    with torch.no_grad():
        return block(basis).reshape(d, -1).T


def conv_brute(block, mid, in_shape):
    base = conv_operator(block, in_shape)
    w = mid.weight
    out = torch.empty_like(w)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in w.shape]):
        idx = tuple(idx.tolist())
        with torch.no_grad():
            keep = w[idx].item()
            w[idx] = 0
            out[idx] = torch.linalg.matrix_norm(base - conv_operator(block, in_shape))
            w[idx] = keep
    return out


def test_conv_eq5_is_exact_with_pointwise_neighbours():
    # 1x1 neighbours only mix channels, so zeroing one tap of the 3x3 middle conv changes the
    # operator by a rank-structured block with exactly P = 4*4 copies of Eq. 5's rank-one term.
    seeded(2)
    block = f64(nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.Conv2d(3, 4, 3, bias=False),
                              nn.Conv2d(4, 2, 1, bias=False)))
    brute = conv_brute(block, block[1], (2, 6, 6))
    torch.testing.assert_close(L.lap(block)["1.weight"] * 4.0, brute, rtol=1e-10, atol=1e-12)


def test_conv_eq5_controls_the_distortion_with_3x3_neighbours():
    # Exact: ||ΔT||² = P·w²·Σ_{r,c} ||W3[r,k] ⋆ W1[j,c]||² (full 2-D convolution of kernels).
    # Eq. 5 drops the cross terms of the kernel convolution (the paper's "handled similarly"):
    # Young's inequality bounds the truth by sqrt(P·9)·Eq.5, which is what we can promise.
    seeded(3)
    block = f64(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Conv2d(3, 4, 3, bias=False),
                              nn.Conv2d(4, 2, 3, bias=False)))
    in_shape = (2, 8, 8)
    brute = conv_brute(block, block[1], in_shape)
    w1, w2, w3 = (block[i].weight.detach() for i in range(3))
    p = 2 * 2  # output positions of the block: 8 -> 6 -> 4 -> 2
    exact = torch.empty_like(w2)
    for k in range(4):
        for j in range(3):
            # full convolution of every (W3[r,k], W1[j,c]) pair
            a = w3[:, k][:, None]            # (2, 1, 3, 3)
            b = w1[j][:, None]               # (2, 1, 3, 3)
            conv = F.conv2d(F.pad(a, (2, 2, 2, 2)), b.flip(-1, -2))  # (r, c, 5, 5)
            exact[k, j] = (w2[k, j].abs() * math.sqrt(p) * conv.square().sum().sqrt())
    torch.testing.assert_close(exact, brute, rtol=1e-10, atol=1e-12)
    lap = L.lap(block)["1.weight"]
    assert (brute <= math.sqrt(p * 9) * lap * (1 + 1e-9)).all()


# ------------------------------------------------------------------ batch normalisation
def set_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=g))  # negative γ too
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)
        bn.running_mean.copy_(torch.randn(n, generator=g))


def bn_scale(bn):
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


def test_eq8_is_the_distortion_of_the_block_with_bn_scales():
    seeded(4)
    m = f64(nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(),
                          nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2)))
    for i, b in ((1, 1), (4, 2), (7, 3)):
        set_bn(m[i], b)
    w1, w2, w3 = m[0].weight.detach(), m[3].weight.detach(), m[6].weight.detach()
    a1, a2 = torch.diag(bn_scale(m[1])), torch.diag(bn_scale(m[4]))
    # W_{i+1} diag(a_i) W_i diag(a_{i-1}) W_{i-1}: the BN after W_{i+1} is outside the block
    base = w3 @ a2 @ w2 @ a1 @ w1
    brute = torch.empty_like(w2)
    for k in range(3):
        for j in range(4):
            z = w2.clone()
            z[k, j] = 0
            brute[k, j] = torch.linalg.matrix_norm(base - w3 @ a2 @ z @ a1 @ w1)
    torch.testing.assert_close(L.lap(m)["3.weight"], brute, rtol=1e-10, atol=1e-12)


class ConvBNNet(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda n: nn.Identity())
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), norm(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3, padding=1), norm(5)
        self.c3, self.b3 = nn.Conv2d(5, 3, 3, padding=1), norm(3)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = F.max_pool2d(torch.relu(self.b3(self.c3(x))), 2)
        return self.fc(torch.flatten(x, 1))


def conv_bn_net(seed=5):
    seeded(seed)
    m = ConvBNNet()
    for i, bn in enumerate((m.b1, m.b2, m.b3)):
        set_bn(bn, seed + i)
    return f64(m)


def folded(m):
    """The same function with each BN's scale folded into the conv before it (shift dropped:
    LAP reads weights only)."""
    out = ConvBNNet(bn=False).double().eval()
    with torch.no_grad():
        for c, b in (("c1", "b1"), ("c2", "b2"), ("c3", "b3")):
            a = bn_scale(getattr(m, b))
            getattr(out, c).weight.copy_(getattr(m, c).weight * a.view(-1, 1, 1, 1))
        out.fc.weight.copy_(m.fc.weight)
    return out


def test_fold_mode_equals_lap_of_the_bn_folded_network():
    m = conv_bn_net()
    got = L.lap(m, bn="fold")
    want = L.lap(folded(m), bn="none")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


def test_eq8_equals_folded_lap_where_the_next_layer_has_no_bn():
    # Eq. 8 differs from the folded network only by the BN after W_{i+1}; c3's consumer (fc)
    # has none, so there the two agree; elsewhere they differ.
    m = conv_bn_net()
    eq8, fold = L.lap(m), L.lap(m, bn="fold")
    torch.testing.assert_close(eq8["c3.weight"], fold["c3.weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eq8["fc.weight"], fold["fc.weight"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(eq8["c1.weight"], fold["c1.weight"])


def test_eq8_conv_flatten_boundary_by_hand():
    m = conv_bn_net()
    w2, w3, wf = m.c2.weight.detach(), m.c3.weight.detach(), m.fc.weight.detach()
    a2, a3 = bn_scale(m.b2), bn_scale(m.b3)
    s = L.lap(m)
    # c3 output channel k feeds fc columns 4k..4k+3; a3 scales them (Eq. 8's a_i)
    nxt = wf.view(4, 3, 4).square().sum(dim=(0, 2)).sqrt() * a3.abs()
    prev = (w2.square().sum(dim=(1, 2, 3)) * a2.square()).sqrt()
    want = w3.abs() * nxt.view(3, 1, 1, 1) * prev.view(1, 5, 1, 1)
    torch.testing.assert_close(s["c3.weight"], want)
    # fc input feature f comes from channel f // 4 of c3 (and its BN)
    prev_fc = (w3.square().sum(dim=(1, 2, 3)) * a3.square()).sqrt().repeat_interleave(4)
    torch.testing.assert_close(s["fc.weight"], wf.abs() * prev_fc)


def test_bn_none_ignores_bn():
    m = conv_bn_net()
    plain = ConvBNNet(bn=False).double()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("b")})
    for n, s in L.lap(m, bn="none").items():
        torch.testing.assert_close(s, L.lap(plain)[n])


# --------------------------------------------------------------------------- residuals
class Merge(nn.Module):
    """x -> a -> b; x -> c; d(b + c) -> e: d has two producers with different inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4, False), nn.Linear(4, 5, False)
        self.c = nn.Linear(3, 5, False)
        self.d, self.e = nn.Linear(5, 4, False), nn.Linear(4, 2, False)

    def forward(self, x):
        return self.e(torch.relu(self.d(self.b(torch.relu(self.a(x))) + self.c(x))))


def test_several_producers_sum_squared_norms_as_the_concatenated_operator():
    seeded(6)
    m = f64(Merge())
    wb, wc, wd, we = (getattr(m, n).weight.detach() for n in "bcde")
    stacked = torch.cat([wb, wc], dim=1)  # producers act on different inputs: [W_b, W_c]
    base = we @ wd @ stacked
    brute = torch.empty_like(wd)
    for k in range(4):
        for j in range(5):
            z = wd.clone()
            z[k, j] = 0
            brute[k, j] = torch.linalg.matrix_norm(base - we @ z @ stacked)
    torch.testing.assert_close(L.lap(m)["d.weight"], brute, rtol=1e-10, atol=1e-12)


class Split(nn.Module):
    """z -> a -> (b, c): a has two consumers, outputs returned separately."""

    def __init__(self):
        super().__init__()
        self.z, self.a = nn.Linear(3, 4, False), nn.Linear(4, 5, False)
        self.b, self.c = nn.Linear(5, 2, False), nn.Linear(5, 3, False)

    def forward(self, x):
        h = self.a(torch.relu(self.z(x)))
        return self.b(h), self.c(h)


def test_several_consumers_sum_squared_norms_as_the_stacked_operator():
    seeded(7)
    m = f64(Split())
    wz, wa, wb, wc = (getattr(m, n).weight.detach() for n in "zabc")
    stacked = torch.cat([wb, wc], dim=0)
    base = stacked @ wa @ wz
    brute = torch.empty_like(wa)
    for k in range(5):
        for j in range(4):
            z = wa.clone()
            z[k, j] = 0
            brute[k, j] = torch.linalg.matrix_norm(base - stacked @ z @ wz)
    torch.testing.assert_close(L.lap(m)["a.weight"], brute, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------ LFP and LBP
def test_lfp_looks_at_the_next_layer_and_lbp_at_the_previous():
    m = linear_block()
    w1, w2, w3 = (m[i].weight.detach() for i in range(3))
    lfp, lbp, lap = L.lfp(m), L.lbp(m), L.lap(m)
    # Sec. 2.3: LFP = "only considering the succeeding layer", LBP = the preceding one
    torch.testing.assert_close(lfp["1.weight"], w2.abs() * w3.norm(dim=0).unsqueeze(1))
    torch.testing.assert_close(lbp["1.weight"], w2.abs() * w1.norm(dim=1))
    torch.testing.assert_close(lfp["2.weight"], w3.abs())  # last layer: MP
    torch.testing.assert_close(lbp["0.weight"], w1.abs())  # first layer: MP
    for n in lap:
        torch.testing.assert_close(lfp[n] * lbp[n], lap[n] * m.get_submodule(n[0]).weight.abs())


def test_one_sided_variants_with_bn():
    m = conv_bn_net()
    lap, lfp, lbp = L.lap(m), L.lfp(m), L.lbp(m)
    w = {n: G.weight(m, n).detach().abs() for n in lap}
    for n in lap:
        torch.testing.assert_close(lfp[n] * lbp[n], lap[n] * w[n])


# -------------------------------------------------------- naive reference for chain models
class ChainNet(nn.Module):
    """conv(groups) -> conv -> flatten -> linear -> linear, for the naive references."""

    def __init__(self, groups=2):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(6, 3, 2)
        self.fc1 = nn.Linear(3 * 2 * 2, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.c3(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def chain_layers(model):
    """(name, weight) in order, plus (fpc, groups) per layer, without prunelab's graph."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append((f"{name}.weight", m))
    return out


def naive_lap(weights, groups, fpc_after):
    """Eq. 5 by loops. weights: list of tensors in chain order; groups[i]; fpc_after[i] is the
    features per channel between layer i and i+1 (1 unless a conv feeds a Linear)."""
    scores = []
    n = len(weights)
    for i, w in enumerate(weights):
        s = torch.empty_like(w)
        out_ch, in_g = w.shape[:2]
        g = groups[i]
        for k in range(out_ch):
            nxt = 1.0
            if i + 1 < n:
                wn, gn, f = weights[i + 1], groups[i + 1], fpc_after[i]
                tot = 0.0
                for col in range(k * f, (k + 1) * f):  # consumer input features of channel k
                    ing = wn.shape[1]
                    for r in range(wn.shape[0]):
                        grp = r // (wn.shape[0] // gn)
                        local = col - grp * ing
                        if 0 <= local < ing:
                            tot += float(wn[r, local].square().sum())
                nxt = math.sqrt(tot)
            for jl in range(in_g):
                j = (k // (out_ch // g)) * in_g + jl  # actual input channel / feature
                prv = 1.0
                if i > 0:
                    f = fpc_after[i - 1]
                    prv = math.sqrt(float(weights[i - 1][j // f].square().sum()))
                s[k, jl] = w[k, jl].abs() * nxt * prv
        scores.append(s)
    return scores


def test_vectorised_lap_matches_the_naive_loops_with_groups_and_flatten():
    seeded(8)
    m = f64(ChainNet())
    layers = chain_layers(m)
    ws = [mod.weight.detach() for _, mod in layers]
    want = naive_lap(ws, [1, 2, 1, 1, 1], [1, 1, 4, 1, 1])
    got = L.lap(m)
    for (name, _), w in zip(layers, want):
        torch.testing.assert_close(got[name], w)


def n_pruned(s, n):
    return M.n_pruned(s, n)


def naive_ordered(model, targets, backward=False, steps=1, groups=(1, 2, 1, 1, 1),
                  fpc=(1, 1, 4, 1, 1)):
    """Sec. 2.3 by loops: each round, each layer in order is pruned to its round's count by
    naive LAP against the current neighbours; dead entries first, ties by lower index."""
    layers = chain_layers(model)
    ws = [mod.weight.detach().clone() for _, mod in layers]
    names = [n for n, _ in layers]
    order = list(range(len(ws)))[::-1] if backward else list(range(len(ws)))
    dead0 = [int((w == 0).sum()) for w in ws]
    alive = [w != 0 for w in ws]
    for t in range(1, steps + 1):
        for i in order:
            goal = n_pruned(targets[names[i]], ws[i].numel())
            k = goal if goal <= dead0[i] else dead0[i] + (goal - dead0[i]) * t // steps
            s = naive_lap(ws, list(groups), list(fpc))[i].flatten().tolist()
            a = alive[i].flatten().tolist()
            rank = sorted(range(len(s)), key=lambda e: (a[e], s[e], e))
            keep = torch.ones(len(s), dtype=torch.bool)
            keep[rank[:k]] = False
            alive[i] = keep.view_as(ws[i])
            ws[i] = ws[i] * alive[i]
    return {n: a for n, a in zip(names, alive)}


@pytest.mark.parametrize("fn,backward", [(LV.lap_forward, False), (LV.lap_backward, True)])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9, {"c2.weight": 0.7, "fc1.weight": 0.4}])
def test_ordered_variants_reproduce_the_naive_procedure(fn, backward, target):
    seeded(9)
    m = f64(ChainNet())
    with torch.no_grad():  # some weights already pruned: they must go first
        m.fc1.weight[:, :3] = 0
        m.c2.weight[0] = 0
    names = G.prunable_names(m)
    targets = target if isinstance(target, dict) else dict.fromkeys(names, target)
    targets = {n: targets.get(n, 0.0) for n in names}
    scores = fn(m, sparsity=target, scope="layerwise")
    want = naive_ordered(m, targets, backward=backward)
    got = M.select(scores, layer_sparsity=targets)
    for n in names:
        assert torch.equal(got[n], want[n]), n
        assert torch.equal(torch.isfinite(scores[n]), want[n]), n


@pytest.mark.parametrize("fn,backward", [(LV.lap_forward_seq, False), (LV.lap_backward_seq, True)])
@pytest.mark.parametrize("target,steps", [(0.5, 5), (0.8, 5), (0.9, 3)])
def test_sequential_variants_reproduce_the_naive_procedure(fn, backward, target, steps):
    seeded(10)
    m = f64(ChainNet())
    names = G.prunable_names(m)
    targets = dict.fromkeys(names, target)
    scores = fn(m, sparsity=target, scope="layerwise", steps=steps)
    want = naive_ordered(m, targets, backward=backward, steps=steps)
    got = M.select(scores, target, scope="layerwise")
    for n in names:
        assert torch.equal(got[n], want[n]), n


def test_sequential_differs_from_one_shot_ordering():
    seeded(11)
    m = f64(ChainNet())
    one = LV.lap_forward(m, sparsity=0.9, scope="layerwise")
    seq = LV.lap_forward_seq(m, sparsity=0.9, scope="layerwise")
    assert any(not torch.equal(torch.isfinite(one[n]), torch.isfinite(seq[n])) for n in one)


@pytest.mark.parametrize("name", ["lap-forward", "lap-backward", "lap-forward-seq",
                                  "lap-backward-seq"])
def test_ordered_variants_need_layerwise_targets(name):
    m = linear_block()
    with pytest.raises(ValueError, match="layerwise"):
        C.score(m, name, sparsity=0.5)  # scope defaults to global
    with pytest.raises(ValueError, match="layerwise"):
        C.score(m, name, scope="layerwise")  # no sparsity
    with pytest.raises(ValueError, match="unknown layers"):
        C.score(m, name, sparsity={"nope.weight": 0.5}, scope="layerwise")
    with pytest.raises(ValueError, match="sparsity"):
        C.score(m, name, sparsity=1.5, scope="layerwise")


# ------------------------------------------------------------------------------ LAP-act
def relu_mlp(seed=12):
    seeded(seed)
    return f64(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                             nn.Linear(4, 3)))


def test_lap_act_with_every_unit_active_is_lap():
    m = relu_mlp()
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
    x = torch.rand(32, 6, dtype=torch.float64)
    got = LV.lap_act(m, batch=(x, torch.zeros(32, dtype=torch.long)))
    for n, s in L.lap(m).items():
        torch.testing.assert_close(got[n], s)


def test_lap_act_matches_rescaled_weights_by_hand():
    m = relu_mlp()
    x = torch.randn(200, 6, dtype=torch.float64)
    with torch.no_grad():
        h1 = m[0](x)
        h2 = m[2](torch.relu(h1))
    p1, p2 = (h1 > 0).double().mean(0), (h2 > 0).double().mean(0)
    # App. F Eq. 19: Ŵ_i[j, :] = sqrt(p_j) W_i[j, :], last layer (no ReLU) unscaled
    w = [m[0].weight * p1.sqrt().unsqueeze(1), m[2].weight * p2.sqrt().unsqueeze(1), m[4].weight]
    want = naive_lap([t.detach() for t in w], [1, 1, 1], [1, 1, 1])
    got = LV.lap_act(m, batch=(x, torch.zeros(200, dtype=torch.long)))
    for n, ww in zip(["0.weight", "2.weight", "4.weight"], want):
        torch.testing.assert_close(got[n], ww)


def test_lap_act_conv_sums_square_roots_over_positions():
    seeded(13)
    m = f64(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)))
    x = torch.randn(100, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        z1 = m[0](x)
        z2 = m[2](torch.relu(z1))
    s1 = (z1 > 0).double().mean(0).sqrt().sum(dim=(1, 2))  # Σ over positions of sqrt(p)
    s2 = (z2 > 0).double().mean(0).sqrt().sum(dim=(1, 2))
    w = [m[0].weight * s1.view(-1, 1, 1, 1), m[2].weight * s2.view(-1, 1, 1, 1), m[5].weight]
    want = naive_lap([t.detach() for t in w], [1, 1, 1], [1, 4, 1])
    got = LV.lap_act(m, batch=(x, torch.zeros(100, dtype=torch.long)))
    for n, ww in zip(["0.weight", "2.weight", "5.weight"], want):
        torch.testing.assert_close(got[n], ww)


def test_lap_act_needs_data():
    with pytest.raises(ValueError, match="batch"):
        C.score(relu_mlp(), "lap-act")


# ------------------------------------------------------------------------------ LAP-all
def test_lap_all_is_the_whole_network_distortion_of_a_linear_mlp():
    seeded(14)
    m = f64(nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False),
                          nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)))
    mats = [m[i].weight.detach() for i in range(4)]
    got = LV.lap_all(m, input_shape=(4,))
    for i, name in enumerate(["0.weight", "1.weight", "2.weight", "3.weight"]):
        pre = torch.eye(4, dtype=torch.float64)
        for w in mats[:i]:
            pre = w @ pre
        post = torch.eye(2, dtype=torch.float64)
        for w in mats[:i:-1]:
            post = post @ w
        base = post @ mats[i] @ pre
        brute = torch.empty_like(mats[i])
        for k in range(mats[i].shape[0]):
            for j in range(mats[i].shape[1]):
                z = mats[i].clone()
                z[k, j] = 0
                brute[k, j] = torch.linalg.matrix_norm(base - post @ z @ pre)
        torch.testing.assert_close(got[name], brute, rtol=1e-10, atol=1e-12)


def test_lap_all_middle_of_three_layers_is_lap_and_ignores_activations():
    m = relu_mlp()
    x = torch.randn(8, 6, dtype=torch.float64)
    got = LV.lap_all(m, batch=(x, torch.zeros(8, dtype=torch.long)))
    torch.testing.assert_close(got["2.weight"], L.lap(m)["2.weight"])
    # the first layer looks through both later layers: ||(W3 W2)[:, k]||
    w1, w2, w3 = (m[i].weight.detach() for i in (0, 2, 4))
    torch.testing.assert_close(got["0.weight"], w1.abs() * (w3 @ w2).norm(dim=0).unsqueeze(1))


def test_lap_all_runs_on_conv_nets():
    m = conv_bn_net()
    s = LV.lap_all(m, input_shape=(2, 8, 8))
    assert set(s) == set(G.prunable_names(m)) and all(torch.isfinite(v).all() for v in s.values())


# ------------------------------------------------------------------------------ OBD+LAP
@pytest.mark.skipif(importlib.util.find_spec("prunelab.criteria.ggn") is None,
                    reason="prunelab.criteria.ggn (ggn_diagonal) is not written yet")
def test_obd_lap_is_lap_of_obd_magnitudes():
    from prunelab.criteria.ggn import ggn_diagonal

    m = relu_mlp().float()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    ggn = ggn_diagonal(m, (x, y))
    w = [(0.5 * ggn[n]).sqrt() * G.weight(m, n).detach().abs()
         for n in ("0.weight", "2.weight", "4.weight")]
    want = naive_lap(w, [1, 1, 1], [1, 1, 1])
    got = LV.obd_lap(m, batch=(x, y))
    for n, ww in zip(["0.weight", "2.weight", "4.weight"], want):
        torch.testing.assert_close(got[n], ww, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------- contracts, registry
def tiny_models():
    seeded(15)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
                        nn.Linear(8, 3))
    conv = models.build("conv6", input_shape=(3, 8, 8), num_classes=3, bn=True, width=0.125)
    res = models.build("resnet18", input_shape=(3, 8, 8), num_classes=3, width=0.0625)
    out = []
    for m, shape in ((mlp, (1, 3, 4)), (conv, (3, 8, 8)), (res, (3, 8, 8))):
        m.eval()
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                set_bn(mod, 3)
        out.append((m, shape))
    return out


LAP_FAMILY = ["lap", "lfp", "lbp", "lap-forward", "lap-backward", "lap-forward-seq",
              "lap-backward-seq", "lap-act", "lap-all", "obd+lap"]


@pytest.mark.parametrize("i", range(3), ids=["mlp", "conv6-bn", "resnet"])
def test_every_variant_runs_through_score_and_leaves_the_model_unchanged(i):
    m, shape = tiny_models()[i]
    x, y = torch.randn(16, *shape), torch.randint(0, 3, (16,))
    before = copy.deepcopy(m.state_dict())
    for name in LAP_FAMILY:
        spec = C.spec(name)
        kw = dict(sparsity=0.6, scope="layerwise") if spec.uses_target else {}
        if name == "obd+lap" and importlib.util.find_spec("prunelab.criteria.ggn") is None:
            continue
        s = C.score(m, name, batch=(x, y), **kw)
        assert set(s) == set(G.prunable_names(m))
        fn = C.get(name)  # and directly, without the registry's copy
        fn(m, batch=(x, y), masks=None, seed=0, sparsity=kw.get("sparsity"),
           scope=kw.get("scope", "global"))
        after = m.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert not any(p.grad is not None for p in m.parameters())


def test_pruned_neighbours_count_as_zero():
    m = linear_block()
    with torch.no_grad():
        m[2].weight[:, 1] = 0  # output neuron 1 of the middle layer feeds nothing any more
    s = L.lap(m)["1.weight"]
    assert (s[1] == 0).all() and (s[0] > 0).all()
    masks = {"2.weight": torch.ones(2, 3, dtype=torch.bool)}
    masks["2.weight"][:, 2] = False  # registry masks are applied before scoring
    s = C.score(m, "lap", masks=masks)["1.weight"]
    assert (s[2] == 0).all()


def test_graph_cache_follows_the_model():
    a = linear_block()
    b = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2)).double()
    assert L.lap(a)["1.weight"].shape == (3, 4)
    assert L.lap(b)["1.weight"].shape == (2, 7)
    assert L.lap(a)["2.weight"].shape == (2, 3)


def test_untraceable_model_still_scores_as_a_chain():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return self.c(self.b(h))

    seeded(16)
    m = Branchy().double()
    with pytest.warns(UserWarning, match="chain"):
        s = L.lap(m)
    ref = nn.Sequential(m.a, m.b, m.c)
    torch.testing.assert_close(s["b.weight"], L.lap(ref)["1.weight"])


def test_unknown_bn_mode_is_rejected():
    with pytest.raises(ValueError, match="bn"):
        L.lap(linear_block(), bn="yes")


# ------------------------------------------- caches: a model edited in place, models side by side
class Gated(nn.Module):
    """a -> relu -> b, plus the relu output when ``skip``, -> c (float64)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(4, 5, bias=False), nn.Linear(5, 5, bias=False),
                                  nn.Linear(5, 3, bias=False))
        self.skip = True

    def forward(self, x):
        h = torch.relu(self.a(x))
        z = self.b(h)
        return self.c(z + h if self.skip else z)


def by_hand_c(m):
    """Eq. 5 for the last layer ``c``: its output is the model output (factor 1); its input is
    produced by b (and by a through the skip): squared row norms summed over the producers."""
    prev = m.b.weight.detach().square().sum(1)
    if m.skip:
        prev = prev + m.a.weight.detach().square().sum(1)
    return m.c.weight.detach().abs() * prev.sqrt()


def test_lap_follows_a_model_edited_in_place():
    seeded(20)
    m = f64(Gated())
    torch.testing.assert_close(L.lap(m)["c.weight"], by_hand_c(m), rtol=1e-12, atol=0)
    m.skip = False  # the graph changes: a no longer feeds c
    torch.testing.assert_close(L.lap(m)["c.weight"], by_hand_c(m), rtol=1e-12, atol=0)
    with torch.no_grad():  # weights are read afresh every call, also through .data
        m.b.weight.data.mul_(3.0)
        m.c.weight[0] = 0
    torch.testing.assert_close(L.lap(m)["c.weight"], by_hand_c(m), rtol=1e-12, atol=0)
    m.b = nn.Linear(5, 5, bias=False).double()  # a module swapped for another
    torch.testing.assert_close(C.score(m, "lap")["c.weight"], by_hand_c(m).float())


def test_models_sharing_a_graph_never_share_scores():
    seeded(21)
    a, b = f64(Gated()), f64(Gated())
    assert G.layer_graph(a) is G.layer_graph(b)  # one graph (and one plan) for both
    for m in (a, b, a, b):
        torch.testing.assert_close(L.lap(m)["c.weight"], by_hand_c(m), rtol=1e-12, atol=0)


def qkv_net(seed=22):
    """embed -> (q, k, v) -> opaque attention -> out: three layers share one producer."""

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 6)
            self.q, self.k, self.v, self.out = (nn.Linear(6, 6) for _ in range(4))

        def forward(self, x):
            h = self.embed(x)
            att = torch.softmax(self.q(h) @ self.k(h).transpose(-2, -1), dim=-1)
            return self.out(att @ self.v(h))

    seeded(seed)
    return f64(QKV())


def test_layers_fed_by_one_producer_share_its_norms_and_see_its_updates():
    m = qkv_net()
    la = L.Lookahead(m)
    rows = m.embed.weight.detach().square().sum(1).sqrt()
    for n in ("q", "k", "v"):  # next: opaque attention (factor 1); prev: embed's row norms
        want = getattr(m, n).weight.detach().abs() * rows
        torch.testing.assert_close(la.score(f"{n}.weight"), want, rtol=1e-12, atol=0)
    half = m.embed.weight.detach().clone()
    half[::2] = 0
    la.update("embed.weight", half)  # the ordered variants prune a producer in place
    for n in ("q", "k", "v"):
        want = getattr(m, n).weight.detach().abs() * half.square().sum(1).sqrt()
        torch.testing.assert_close(la.score(f"{n}.weight"), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("first", ["in_sq", "out_sq", "prev_sq", "next_sq"])
def test_norms_do_not_depend_on_the_order_they_are_asked_in(first):
    seeded(23)
    m = models.build("resnet18", input_shape=(3, 8, 8), num_classes=4, width=0.125).eval()
    g = G.layer_graph(m)
    ref = L.Lookahead(m, g)
    want = {n: (ref.out_sq(n), ref.prev_sq(n), ref.next_sq(n)) for n in g}
    la = L.Lookahead(m, g)
    for n in reversed(list(g)):
        getattr(la, first)(n)
    for n in g:
        for got, w in zip((la.out_sq(n), la.prev_sq(n), la.next_sq(n)), want[n]):
            assert torch.equal(got, w), n
    for n, s in L.Lookahead(m, g).scores().items():
        assert torch.equal(s, la.score(n)), n


def test_layers_fed_only_by_markers_keep_their_own_sizes():
    class TwoInputs(nn.Module):
        """a and b each read a model input plus an opaque op of it: two all-ones neighbours
        (Eq. 5's W_0 twice: factor sqrt(2)) over inputs of different widths."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

        def forward(self, x, z):
            return self.a(x + x.flip(1)) + self.b(z + z.flip(1))

    seeded(24)
    m = f64(TwoInputs())
    s = L.lap(m)
    for n in ("a", "b"):  # output: the model output (1) summed over both; input: sqrt(1 + 1)
        want = getattr(m, n).weight.detach().abs() * math.sqrt(2.0)
        torch.testing.assert_close(s[f"{n}.weight"], want, rtol=1e-12, atol=0)
