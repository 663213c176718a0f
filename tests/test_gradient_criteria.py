"""SNIP, GraSP, SynFlow, Taylor-FO and gradient magnitude against autograd references and theory."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import prunelab.criteria as C
from prunelab import graph as G
from prunelab import masks as M
from prunelab.criteria import gradient as GR

GRADIENT_CRITERIA = ["snip", "grasp", "synflow", "taylor-fo", "grad-mag"]


# ----------------------------------------------------------------------------- fixtures
def mlp(seed=0, bias=True, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16, bias=bias), nn.ReLU(), nn.Linear(16, 8, bias=bias),
                         nn.Tanh(), nn.Linear(8, 3, bias=bias)).to(dtype)


def relu_mlp(seed=0, widths=(12, 16, 8, 3)):
    """Bias-free ReLU MLP: the setting of Tanaka et al.'s conservation theorems."""
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def conv_net(seed=0, bias=False, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 5, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
               nn.Flatten(), nn.Linear(5 * 3 * 3, 3, bias=bias)]
    model = nn.Sequential(*layers).double()
    model.input_shape = (2, 8, 8)
    return model


def batch(n=32, shape=(12,), classes=3, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=dtype),
            torch.randint(0, classes, (n,), generator=gen))


def loss_of_weights(model, x, y, temperature=1.0):
    """Mean cross-entropy as a function of the prunable weights only (the reference)."""
    names = G.prunable_names(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(*ws):
        out = functional_call(model, {**params, **dict(zip(names, ws))}, (x,))
        return F.cross_entropy(out / temperature, y)

    return names, tuple(params[n] for n in names), f


def reference_grad(model, x, y):
    names, ws, f = loss_of_weights(model, x, y)
    ws = tuple(w.clone().requires_grad_(True) for w in ws)
    return dict(zip(names, torch.autograd.grad(f(*ws), ws)))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())


def top_k_mask(scores, sparsity, lower_index_pruned_first=True):
    """Exact global thresholding with either tie-break, independent of prunelab.masks."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    n = flat.numel()
    k = M.n_pruned(sparsity, n)
    index = torch.arange(n, dtype=torch.float64)
    order = sorted(range(n), key=lambda i: (float(flat[i]),
                                            index[i] if lower_index_pruned_first else -index[i]))
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[:k]] = False
    parts = keep.split([s.numel() for s in scores.values()])
    return {name: p.view_as(s) for (name, s), p in zip(scores.items(), parts)}


# ----------------------------------------------------------------------------- first order
def test_snip_equals_abs_grad_times_weight():
    model, (x, y) = mlp(), batch()
    g = reference_grad(model, x, y)
    scores = C.score(model, "snip", batch=(x, y))
    for n, w in G.weights(model).items():
        torch.testing.assert_close(scores[n], (g[n] * w).abs().float(), rtol=1e-5, atol=1e-9)


def test_taylor_fo_and_gradient_magnitude_match_reference():
    model, (x, y) = mlp(seed=3), batch(seed=4)
    g = reference_grad(model, x, y)
    taylor = C.compute(model, "taylor-fo", batch=(x, y)).scores
    mag = C.score(model, "grad-mag", batch=(x, y))
    for n, w in G.weights(model).items():
        torch.testing.assert_close(taylor[n], ((g[n] * w) ** 2).float(), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(mag[n], g[n].abs().float(), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- GraSP
@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_hg_equals_autograd_hvp(temperature):
    model, (x, y) = mlp(seed=5), batch(seed=6)
    names, ws, f = loss_of_weights(model, x, y, temperature)
    g = torch.func.grad(f, argnums=tuple(range(len(ws))))(*ws)
    _, hvp = torch.autograd.functional.hvp(f, ws, v=tuple(t.detach() for t in g))
    hg = GR.hessian_gradient_product(model, (x, y), temperature=temperature)
    for n, ref in zip(names, hvp):
        torch.testing.assert_close(hg[n], ref, rtol=1e-9, atol=1e-13)
    scores = C.score(model, "grasp", batch=(x, y), temperature=temperature)
    for n, ref in zip(names, hvp):
        torch.testing.assert_close(scores[n], (G.weight(model, n) * ref).float(),
                                   rtol=1e-5, atol=1e-12)


def test_grasp_hg_of_a_pruned_network_uses_only_alive_gradients():
    model, (x, y) = mlp(seed=7), batch(seed=8)
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(w.shape, generator=gen) > 0.4 for n, w in G.weights(model).items()}
    pruned = G.plain_copy(model, masks)
    names, ws, f = loss_of_weights(pruned, x, y)
    g = torch.func.grad(f, argnums=tuple(range(len(ws))))(*ws)
    v = tuple(gi * masks[n] for n, gi in zip(names, g))
    _, hvp = torch.autograd.functional.hvp(f, ws, v=v)
    hg = GR.hessian_gradient_product(pruned, (x, y))
    for n, ref in zip(names, hvp):
        torch.testing.assert_close(hg[n], ref, rtol=1e-9, atol=1e-13)
    scores = C.score(model, "grasp", batch=(x, y), masks=masks)
    for n in names:
        assert (scores[n][~masks[n]] == 0).all()


def test_grasp_keeps_what_the_paper_keeps():
    """GraSP removes the top-p fraction of S = −θ⊙Hg (Wang et al. Alg. 1); so must we."""
    model, (x, y) = mlp(seed=9), batch(seed=10)
    hg = GR.hessian_gradient_product(model, (x, y))
    paper_s = torch.cat([(-G.weight(model, n) * hg[n]).flatten() for n in hg])
    p = 0.7
    k = M.n_pruned(p, paper_s.numel())
    removed_by_paper = set(torch.topk(paper_s, k).indices.tolist())
    ours = M.select(C.score(model, "grasp", batch=(x, y)), p)
    kept = torch.cat([m.flatten() for m in ours.values()])
    assert set((~kept).nonzero().flatten().tolist()) == removed_by_paper
    absolute = C.score(model, "grasp", batch=(x, y), absolute=True)
    for n in hg:
        torch.testing.assert_close(absolute[n], (G.weight(model, n) * hg[n]).abs().float())


# ----------------------------------------------------------------------------- SynFlow theory
def test_synflow_objective_is_eq2_and_layers_conserve_it():
    """R = 1ᵀ|W3||W2||W1|1 (Eq. 2); each layer's scores sum to R (Theorem 2)."""
    model = relu_mlp(seed=1)
    scores = GR.synflow_scores(model)
    ws = list(G.weights(model).values())
    r = torch.ones(1, 12, dtype=torch.float64)
    for w in ws:
        r = r @ w.detach().abs().T
    flow = float(r.sum())
    for n, s in scores.items():
        assert s.dtype == torch.float64 and (s >= 0).all()
        assert math.isclose(float(s.sum()), flow, rel_tol=1e-12)
    # scores = |θ ⊙ ∂R/∂θ| with ∂R/∂W_l = (|W_{l+1..L}|ᵀ 1)(|W_{1..l-1}| 1)ᵀ
    a = [w.detach().abs() for w in ws]
    left = torch.ones(3, dtype=torch.float64) @ a[2]
    right = a[0] @ torch.ones(12, dtype=torch.float64)
    torch.testing.assert_close(scores["2.weight"], torch.outer(left, right) * a[1])


def test_synflow_neuronwise_conservation_mlp():
    """Theorem 1: per hidden unit, Σ incoming scores = Σ outgoing scores."""
    model = relu_mlp(seed=2, widths=(10, 20, 15, 7, 4))
    s = list(GR.synflow_scores(model).values())
    for inc, out in zip(s[:-1], s[1:]):
        torch.testing.assert_close(inc.sum(1), out.sum(0), rtol=1e-12, atol=0)


def test_synflow_neuronwise_conservation_holds_per_conv_channel():
    """Theorem 1 for convolutions: a channel's shared incoming filter vs its outgoing weights."""
    model = conv_net(seed=3)
    s = GR.synflow_scores(model)
    c1, c2, fc = s["0.weight"], s["2.weight"], s["6.weight"]
    torch.testing.assert_close(c1.sum((1, 2, 3)), c2.sum((0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(c2.sum((1, 2, 3)), fc.view(3, 5, 3, 3).sum((0, 2, 3)),
                               rtol=1e-12, atol=0)
    totals = [float(v.sum()) for v in s.values()]
    assert max(totals) == pytest.approx(min(totals), rel=1e-12)  # Theorem 2


def test_synflow_single_shot_is_scores_over_r():
    model = relu_mlp(seed=4)
    raw = GR.synflow_scores(model)
    flow = float(raw["0.weight"].sum())
    result = C.compute(model, "synflow")
    assert result.info["masks"] is None
    for n in raw:
        torch.testing.assert_close(result.scores[n], (raw[n] / flow).float())


def test_synflow_has_no_overflow_on_a_deep_net():
    """20 layers of width 100 with N(0, 2²) weights: R ≈ 100·160²⁰ overflows float32."""
    torch.manual_seed(0)
    layers = []
    for _ in range(20):
        lin = nn.Linear(100, 100, bias=False)
        nn.init.normal_(lin.weight, std=2.0)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():  # the float32 computation this guards against
        net = copy.deepcopy(model).float()
        for p in net.parameters():
            p.abs_()
        assert not torch.isfinite(net(torch.ones(1, 100, dtype=torch.float32)).sum())
    one_shot = C.score(model, "synflow")
    for n, s in one_shot.items():
        assert torch.isfinite(s).all() and (s >= 0).all()
        assert float(s.double().sum()) == pytest.approx(1.0, rel=1e-4)  # Theorem 2, / R
    iterative = C.compute(model, "synflow", sparsity=0.9, iterations=10)
    finite = torch.cat([v[torch.isfinite(v)] for v in iterative.scores.values()])
    assert finite.numel() > 0 and not torch.isnan(finite).any()
    assert all(math.isfinite(f) for f in iterative.info["flow"])


# ----------------------------------------------------------------------------- iterative SynFlow
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_iterative_synflow_thresholds_to_its_own_mask_exactly(sparsity):
    model = mlp(seed=11, dtype=torch.float32)
    result = C.compute(model, "synflow", sparsity=sparsity, iterations=20)
    target = result.info["masks"]
    total = sum(m.numel() for m in target.values())
    assert total - sum(int(m.sum()) for m in target.values()) == M.n_pruned(sparsity, total)
    for rule in (M.select(result.scores, sparsity),
                 top_k_mask(result.scores, sparsity, lower_index_pruned_first=True),
                 top_k_mask(result.scores, sparsity, lower_index_pruned_first=False)):
        for n in target:
            assert torch.equal(rule[n], target[n]), n


def test_iterative_synflow_ties_at_the_threshold_are_separated():
    """A dead input unit makes many exact zero scores; any tie-break must give the same mask."""
    model = relu_mlp(seed=12, widths=(6, 8, 4))
    with torch.no_grad():
        model[0].weight[:4] = 0  # 4 of 8 hidden units receive nothing: their outgoing scores tie
    s = 0.4  # keep more weights than have positive scores
    result = C.compute(model, "synflow", sparsity=s, iterations=5)
    for rule in (M.select(result.scores, s), top_k_mask(result.scores, s, False)):
        for n, m in result.info["masks"].items():
            assert torch.equal(rule[n], m)


def test_iterative_synflow_matches_a_reference_loop():
    model = relu_mlp(seed=13, widths=(10, 12, 6))
    d, rounds, s = 10 * 12 + 12 * 6, 7, 0.8
    k_end = d - M.n_pruned(s, d)
    alive = {n: torch.ones_like(w, dtype=torch.bool) for n, w in G.weights(model).items()}
    a1, a2 = (w.detach().abs() for w in G.weights(model).values())
    for r in range(1, rounds + 1):
        w1, w2 = a1 * alive["0.weight"], a2 * alive["2.weight"]
        ones_out, ones_in = torch.ones(6, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
        s1 = torch.outer(ones_out @ w2, ones_in) * w1       # ∂R/∂W1 ⊙ |W1|
        s2 = torch.outer(ones_out, w1 @ ones_in) * w2
        flat = torch.cat([s1.flatten(), s2.flatten()])
        live = torch.cat([alive["0.weight"].flatten(), alive["2.weight"].flatten()])
        k = k_end if r == rounds else round(d * (k_end / d) ** (r / rounds))
        order = sorted(range(d), key=lambda i: (bool(live[i]), float(flat[i]), i))
        keep = torch.zeros(d, dtype=torch.bool)
        keep[order[d - k:]] = True
        alive = {"0.weight": keep[:120].view(12, 10), "2.weight": keep[120:].view(6, 12)}
    ours = C.compute(model, "synflow", sparsity=s, iterations=rounds).info["masks"]
    for n in alive:
        assert torch.equal(ours[n], alive[n])


def test_iterative_synflow_never_revives_and_keeps_pruned_weights_pruned():
    model = mlp(seed=14, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(w.shape, generator=gen) > 0.3 for n, w in G.weights(model).items()}
    pruned = M.apply(model, masks)  # masks attached as parametrizations, as the engine does
    before = snapshot(pruned)
    result = C.compute(pruned, "synflow", sparsity=0.8, iterations=10)
    assert_untouched(pruned, before)
    chosen = M.select(result.scores, 0.8, previous=masks)
    for n, m in masks.items():
        assert (result.scores[n][~m] == -math.inf).all()
        assert not (result.info["masks"][n] & ~m).any()
        assert torch.equal(chosen[n], result.info["masks"][n])


def test_iterative_synflow_is_data_free_and_deterministic():
    model = mlp(seed=15, dtype=torch.float32)
    a = C.compute(model, "synflow", sparsity=0.9, iterations=10, input_shape=(12,))
    b = C.compute(model, "synflow", sparsity=0.9, iterations=10,
                  batch=batch(dtype=torch.float32, seed=99))
    c = C.compute(model, "synflow", sparsity=0.9, iterations=10,
                  batch=(torch.full((5, 12), 7.0), torch.zeros(5, dtype=torch.long)), seed=3)
    for n in a.scores:
        assert torch.equal(a.scores[n], b.scores[n]) and torch.equal(a.scores[n], c.scores[n])


@pytest.mark.parametrize("scope", ["layerwise", "normalized"])
def test_iterative_synflow_scopes(scope):
    model = mlp(seed=16, dtype=torch.float32)
    result = C.compute(model, "synflow", sparsity=0.75, scope=scope, iterations=10)
    chosen = M.select(result.scores, 0.75, scope=scope)
    for n, m in result.info["masks"].items():
        if scope == "layerwise":
            assert m.numel() - int(m.sum()) == M.n_pruned(0.75, m.numel())
        assert torch.equal(chosen[n], m)


def test_iterative_synflow_per_layer_targets():
    model = mlp(seed=17, dtype=torch.float32)
    targets = {"0.weight": 0.9, "4.weight": 0.5}
    result = C.compute(model, "synflow", sparsity=targets, scope="layerwise", iterations=5)
    masks = result.info["masks"]
    assert masks["2.weight"].all()
    for n, s in targets.items():
        assert masks[n].numel() - int(masks[n].sum()) == M.n_pruned(s, masks[n].numel())
    chosen = M.select(result.scores, layer_sparsity=targets)
    for n in masks:
        assert torch.equal(chosen[n], masks[n])


def test_iterative_synflow_avoids_layer_collapse():
    """Iterative positive conserved scores keep every layer (Tanaka et al. Theorem 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    s = 1 - 60 / 43000  # keep 60 of 43,000 weights
    masks = C.compute(model, "synflow", sparsity=s, iterations=100).info["masks"]
    assert all(m.any() for m in masks.values())
    assert sum(float(v.sum()) for v in GR.synflow_scores(model, masks).values()) > 0


def test_synflow_scores_helper_accepts_masks_and_bias_modes():
    model = conv_net(seed=18, bias=True, bn=True)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    masks = {"0.weight": torch.rand(4, 2, 3, 3) > 0.5}
    for bias in ("abs", "zero"):
        s = GR.synflow_scores(model, masks, bias=bias)
        assert set(s) == set(G.prunable_names(model))
        assert (s["0.weight"][~masks["0.weight"]] == 0).all()
        assert all(torch.isfinite(v).all() for v in s.values())
    # With bias="zero" BN is a positive scale and Theorem 2 holds again across layers.
    totals = [float(v.sum()) for v in GR.synflow_scores(model, bias="zero").values()]
    assert max(totals) == pytest.approx(min(totals), rel=1e-10)
    with pytest.raises(ValueError, match="bias"):
        GR.synflow_scores(model, bias="keep")


# ----------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("name", GRADIENT_CRITERIA)
def test_criteria_leave_the_model_untouched(name):
    model, data = conv_net(seed=19, bias=True, bn=True), batch(shape=(2, 8, 8))
    before = snapshot(model)
    extra = {"sparsity": 0.5, "iterations": 5} if name == "synflow" else {}
    result = C.compute(model, name, batch=data, **extra)  # the public API
    assert set(result.scores) == set(G.prunable_names(model))
    assert_untouched(model, before)
    # Called directly on the very module (in eval mode, per the calling convention): still
    # bit-identical, no .grad.
    model.eval()
    before = snapshot(model)
    fn = C.get(name)
    out = fn(model, batch=data, masks=None, seed=0, sparsity=extra.get("sparsity"),
             scope="global", **({"iterations": 5} if name == "synflow" else {}))
    out = out.scores if isinstance(out, C.ScoreResult) else out
    assert set(out) == set(G.prunable_names(model))
    assert_untouched(model, before)


@pytest.mark.parametrize("name", ["snip", "grasp", "taylor-fo", "grad-mag"])
def test_data_dependent_criteria_need_a_batch(name):
    with pytest.raises(ValueError, match="batch"):
        C.score(mlp(), name)


def test_synflow_rejects_bad_options():
    model = mlp(dtype=torch.float32)
    with pytest.raises(ValueError, match="scope"):
        C.compute(model, "synflow", sparsity=0.5, scope="per-row")
    with pytest.raises(ValueError, match="iterations"):
        C.compute(model, "synflow", sparsity=0.5, iterations=0)
    with pytest.raises(ValueError, match="sparsity"):
        C.compute(model, "synflow", sparsity=1.5)
    with pytest.raises(ValueError, match="input_shape"):
        C.compute(nn.Sequential(nn.Conv2d(1, 2, 3)), "synflow")
