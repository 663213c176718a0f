"""GGN diagonal (LM paper App. A) against explicit per-example Jacobians, both engines."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from prunelab import graph as G
from prunelab.criteria.ggn import ggn_diagonal, loss_grad_ggn, output_factor


# ----------------------------------------------------------------------------- reference
def ggn_reference(model, x, y):
    """diag of (1/N) Σ_n J_nᵀ (diag p − p pᵀ) J_n from explicit Jacobians, plus loss and grad."""
    names = G.prunable_names(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    weights = {n: params[n] for n in names}

    def logits(w, xi):
        return functional_call(model, {**params, **w}, (xi[None],))[0]

    diag = {n: torch.zeros_like(w) for n, w in weights.items()}
    for xi in x:
        jac = jacrev(logits)(weights, xi)
        p = logits(weights, xi).softmax(0)
        h = torch.diag(p) - torch.outer(p, p)
        for n in names:
            j = jac[n].reshape(len(p), -1)
            diag[n] += torch.einsum("ck,cd,dk->k", j, h, j).reshape(diag[n].shape)
    loss = F.cross_entropy(functional_call(model, params, (x,)), y)
    grad = _grad(model, x, y)
    return {n: d / len(x) for n, d in diag.items()}, float(loss), grad


def _grad(model, x, y):
    names = G.prunable_names(model)
    ws = [G.weight(model, n) for n in names]
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        return dict(zip(names, torch.autograd.grad(loss, ws)))


# ----------------------------------------------------------------------------- models
class ResidualBlock(nn.Module):
    """y = relu(bn(conv(relu(conv(x))))) + relu(conv(x)), then a linear head: fx-traceable."""

    def __init__(self, inplace=False):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = self.relu(self.stem(x))
        h = self.relu(self.bn(self.conv(h))) + h
        return self.head(h.flatten(1))


class Shared(nn.Module):
    """One Linear applied twice: its per-example gradient is the sum of both uses."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


class Tokens(nn.Module):
    """A Linear on (N, T, features): its weight is shared across the T positions."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.view(-1, 3, 4))).flatten(1))


def _randomise_bn(model):
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


MODELS = {
    "mlp-tanh": (lambda: nn.Sequential(nn.Linear(6, 7, bias=False), nn.Tanh(),
                                       nn.Linear(7, 5, bias=False), nn.Tanh(),
                                       nn.Linear(5, 3, bias=False)), (6,), True),
    "mlp-relu-bias": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(),
                                            nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
                      (2, 3), True),
    "conv2d-pool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding="same",
                                                                     groups=2, bias=False),
                                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)),
                    (2, 8, 8), True),
    "conv2d-stride-dilation": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, dilation=2,
                                                               padding=2), nn.Sigmoid(),
                                                     nn.Conv2d(3, 2, (2, 3), padding="same"),
                                                     nn.GELU(), nn.AdaptiveAvgPool2d(2),
                                                     nn.Flatten(), nn.Linear(8, 3)),
                               (1, 9, 9), True),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, dilation=2), nn.ReLU(), nn.MaxPool1d(2),
                                     nn.Conv1d(4, 3, 2, stride=2), nn.Tanh(), nn.Flatten(),
                                     nn.Linear(3 * 3, 3)), (2, 16), True),
    "batchnorm": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3),
                                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                                        nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)),
                  (2, 6, 6), True),
    "mlp-inplace": (lambda: nn.Sequential(nn.Linear(6, 7), nn.ELU(inplace=True), nn.Linear(7, 6),
                                          nn.LeakyReLU(0.1, inplace=True), nn.Dropout(0.5),
                                          nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
                    (6,), True),
    "residual": (ResidualBlock, (2, 4, 4), False),
    "residual-inplace-relu": (lambda: ResidualBlock(inplace=True), (2, 4, 4), False),
    "shared-weights": (Shared, (5,), False),
    "linear-positions": (Tokens, (12,), False),
    "conv-reflect": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"),
                                           nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7, 3)),
                     (2, 7), False),
}


def build(name, seed=0):
    factory, shape, is_chain = MODELS[name]
    torch.manual_seed(seed)
    model = _randomise_bn(factory().double()).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(5, *shape, generator=gen, dtype=torch.float64)
    out = model(x)
    y = torch.randint(0, out.shape[1], (5,), generator=gen)
    return model, x, y, is_chain


def _methods(name):
    return ["chain", "autograd"] if MODELS[name][2] else ["autograd"]


CASES = [(name, method) for name in MODELS for method in _methods(name)]


# ----------------------------------------------------------------------------- exactness
@pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")
@pytest.mark.parametrize("name,method", CASES)
def test_exact_ggn_matches_explicit_jacobians(name, method):
    model, x, y, _ = build(name)
    ref, ref_loss, ref_grad = ggn_reference(model, x, y)
    res = loss_grad_ggn(model, (x, y), method=method)
    assert list(res.ggn) == G.prunable_names(model)
    assert res.examples == len(x)
    assert res.loss == pytest.approx(ref_loss, rel=1e-12)
    for n in ref:
        assert res.ggn[n].shape == ref[n].shape
        torch.testing.assert_close(res.ggn[n], ref[n], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(res.grad[n], ref_grad[n], rtol=1e-10, atol=1e-13)
    assert (torch.cat([g.flatten() for g in res.ggn.values()]) >= 0).all()


@pytest.mark.parametrize("name", ["mlp-tanh", "conv2d-pool", "residual"])
def test_chunks_give_the_same_numbers(name):
    model, x, y, _ = build(name)
    whole = loss_grad_ggn(model, (x, y))
    for chunk in (1, 2):
        part = loss_grad_ggn(model, (x, y), chunk=chunk)
        assert part.loss == pytest.approx(whole.loss, rel=1e-12)
        for n in whole.ggn:
            torch.testing.assert_close(part.ggn[n], whole.ggn[n], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(part.grad[n], whole.grad[n], rtol=1e-10, atol=1e-14)


def test_ggn_diagonal_is_the_ggn_of_loss_grad_ggn():
    model, x, y, _ = build("mlp-relu-bias")
    a = ggn_diagonal(model, (x, y))
    b = loss_grad_ggn(model, (x, y), grad=False)
    assert b.grad == {}
    for n in a:
        assert torch.equal(a[n], b.ggn[n])


def test_output_factor_squares_to_the_softmax_hessian():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 4
    z[0, 0] = 40.0  # a near one-hot prediction: the Householder step must stay stable
    y = torch.randint(0, 5, (7,), generator=gen)
    v, k, loss = output_factor(z, y, None, grad=True)
    assert k == 4 and v.shape == (5, 7, 5)  # C − 1 factor columns plus the gradient
    p = z.softmax(1)
    for n in range(7):
        r = v[:k, n].T  # (C, C − 1)
        torch.testing.assert_close(r @ r.T, torch.diag(p[n]) - torch.outer(p[n], p[n]),
                                   rtol=0, atol=1e-14)
    torch.testing.assert_close(v[k], p - F.one_hot(y, 5).double())
    assert float(loss) == pytest.approx(float(F.cross_entropy(z, y, reduction="sum")))


def test_soft_labels():
    model, x, y, _ = build("mlp-tanh")
    probs = F.one_hot(y, 3).double()
    hard = loss_grad_ggn(model, (x, y))
    soft = loss_grad_ggn(model, (x, probs))
    assert soft.loss == pytest.approx(hard.loss, rel=1e-12)
    for n in hard.ggn:
        torch.testing.assert_close(soft.ggn[n], hard.ggn[n])
        torch.testing.assert_close(soft.grad[n], hard.grad[n])


def test_frozen_weights_still_scored():
    model, x, y, _ = build("residual")
    ref, _, _ = ggn_reference(model, x, y)
    frozen = copy.deepcopy(model).requires_grad_(False)
    for method in ("autograd", "auto"):
        got = ggn_diagonal(frozen, (x, y), method=method)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-13)


def test_float32_close_to_float64():
    model, x, y, _ = build("conv2d-pool")
    ref = ggn_diagonal(model, (x, y))
    got = ggn_diagonal(model.float(), (x.float(), y))
    for n in ref:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=1e-7)


def test_batch_follows_the_model_dtype():
    """A batch in another floating dtype than the model is cast to the model's (as on a device)."""
    model, x, y, _ = build("conv2d-pool")
    ref = ggn_diagonal(model, (x, y))
    for m, xx in ((model, x.float()), (copy.deepcopy(model).float(), x)):
        dtype = next(m.parameters()).dtype
        got = loss_grad_ggn(m, (xx, y))
        for n in ref:
            assert got.ggn[n].dtype == dtype
            torch.testing.assert_close(got.ggn[n].double(), ref[n], rtol=1e-4, atol=1e-7)
    soft = F.one_hot(y, int(y.max()) + 1).float()  # float32 probabilities, float64 model
    got = ggn_diagonal(model, (x, soft))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])


# ----------------------------------------------------------------------------- Monte-Carlo
def test_monte_carlo_mean_approaches_exact():
    model, x, y, _ = build("mlp-tanh")
    exact = ggn_diagonal(model, (x, y))
    mc = ggn_diagonal(model, (x, y), mc_samples=2000, seed=0)
    for n in exact:
        scale = exact[n].abs().max()
        assert (mc[n] - exact[n]).abs().max() < 0.1 * scale


def test_monte_carlo_is_reproducible_and_seeded():
    model, x, y, _ = build("conv2d-pool")
    a = ggn_diagonal(model, (x, y), mc_samples=2, seed=3)
    b = ggn_diagonal(model, (x, y), mc_samples=2, seed=3)
    c = ggn_diagonal(model, (x, y), mc_samples=2, seed=4)
    chunked = ggn_diagonal(model, (x, y), mc_samples=2, seed=3, chunk=2)
    auto = ggn_diagonal(model, (x, y), mc_samples=2, seed=3, method="autograd")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for n in a:  # labels are drawn up front: chunking and engine do not change them
        torch.testing.assert_close(chunked[n], a[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(auto[n], a[n], rtol=1e-10, atol=1e-14)


def test_monte_carlo_gradient_is_exact():
    model, x, y, _ = build("mlp-relu-bias")
    _, _, ref_grad = ggn_reference(model, x, y)
    res = loss_grad_ggn(model, (x, y), mc_samples=1, seed=0)
    for n in ref_grad:
        torch.testing.assert_close(res.grad[n], ref_grad[n], rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- hygiene
@pytest.mark.parametrize("name,method", [("batchnorm", "chain"), ("residual", "autograd")])
def test_model_is_not_modified(name, method):
    model, x, y, _ = build(name)
    model.train()  # evaluated in eval mode, the caller's mode restored afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_grad_ggn(model, (x, y), method=method)
    loss_grad_ggn(model, (x, y), mc_samples=1, method=method)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_arguments():
    model, x, y, _ = build("mlp-tanh")
    with pytest.raises(ValueError, match="mc_samples"):
        ggn_diagonal(model, (x, y), mc_samples=-1)
    with pytest.raises(ValueError, match="chunk"):
        ggn_diagonal(model, (x, y), chunk=0)
    with pytest.raises(ValueError, match="method"):
        ggn_diagonal(model, (x, y), method="backpack")
    with pytest.raises(ValueError, match="same non-zero length"):
        ggn_diagonal(model, (x, y[:2]))
    res, *_ = build("residual")
    with pytest.raises(ValueError, match="chain"):
        ggn_diagonal(res, build("residual")[1:3], method="chain")
    scalar = nn.Sequential(nn.Linear(6, 1)).double()
    with pytest.raises(ValueError, match="logits"):
        ggn_diagonal(scalar, (x, torch.zeros(5, dtype=torch.long)))


# ----------------------------------------------------------------------------- internals
def test_pair_expansion_equals_per_example_gradients():
    from prunelab.criteria.ggn import _square_sum_pairs, _square_sum_per_example

    gen = torch.Generator().manual_seed(0)
    b = torch.randn(3, 6, 2, 4, 5, generator=gen, dtype=torch.float64)  # (k, N, g, Og, P)
    u = torch.randn(6, 2, 7, 5, generator=gen, dtype=torch.float64)  # (N, g, Kg, P)
    want = torch.einsum("jngop,ngkp->jngok", b, u).square().sum((0, 1))
    torch.testing.assert_close(_square_sum_per_example(b, u), want)
    torch.testing.assert_close(_square_sum_pairs(b, u), want)


def test_automatic_chunks_follow_the_memory_budget(monkeypatch):
    import prunelab.criteria.ggn as ggn

    model, x, y, _ = build("conv2d-pool")
    whole = loss_grad_ggn(model, (x, y), chunk=len(x))
    monkeypatch.setattr(ggn, "_CHUNK_BUDGET_BYTES", 1)
    assert ggn._auto_chunk(model, x, ggn._chain(model), 0, True) == 1
    part = loss_grad_ggn(model, (x, y))
    for n in whole.ggn:
        torch.testing.assert_close(part.ggn[n], whole.ggn[n], rtol=1e-10, atol=1e-14)
    mlp, x, _, _ = build("mlp-relu-bias")
    assert ggn._dense_chain_sizes(ggn._chain(mlp), x) == ggn._probe_sizes(mlp, x)[0]


@pytest.mark.parametrize("method", ["chain", "autograd"])
def test_masks_attached_as_parametrizations_are_honoured(method):
    from prunelab import masks as M

    model, x, y, _ = build("conv2d-pool")
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(w.shape, generator=gen) > 0.5 for n, w in G.weights(model).items()}
    masked = M.apply(model, masks)
    want = loss_grad_ggn(G.plain_copy(masked), (x, y))
    got = loss_grad_ggn(masked, (x, y), method=method)
    for n in want.ggn:
        torch.testing.assert_close(got.ggn[n], want.ggn[n], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got.grad[n], want.grad[n], rtol=1e-10, atol=1e-14)


def test_float_targets_must_be_probabilities():
    model, x, _, _ = build("mlp-tanh")
    with pytest.raises(ValueError, match="probabilities"):
        ggn_diagonal(model, (x, torch.zeros(5, dtype=torch.float64)))


# ----------------------------------------------------------------------------- token sequences
def _tiny_vit():
    import prunelab as pl

    torch.manual_seed(0)
    # (1, 8) inputs cut into 2 patches of 4 plus a class token: 3 positions per Linear call
    return pl.models.build("vit", input_shape=(1, 8), num_classes=5, patch=4, dim=8, depth=1,
                           heads=2).double().eval()


@pytest.mark.parametrize("pairs", [True, False])
def test_vit_exact_ggn_matches_explicit_jacobians(monkeypatch, pairs):
    """A transformer (LayerNorm, attention, GELU, residual adds, a class token: the autograd
    engine) with each Linear contracted over position pairs or by per-example gradients."""
    import prunelab.criteria.ggn as ggn

    monkeypatch.setattr(ggn, "_pairs_cheaper", lambda *a: pairs)
    model = _tiny_vit()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=gen)
    ref, ref_loss, ref_grad = ggn_reference(model, x, y)
    res = loss_grad_ggn(model, (x, y))
    assert res.loss == pytest.approx(ref_loss, rel=1e-12)
    assert set(res.ggn) == set(ref)
    for n in ref:
        torch.testing.assert_close(res.ggn[n], ref[n], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(res.grad[n], ref_grad[n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_token_linear_contraction_equals_per_example_gradients(monkeypatch, pairs, k):
    """Both contractions of _TokenLinear, column by column, against explicit per-example
    gradients Σ_n Σ_j (Σ_p b_j[n,p] a[n,p]ᵀ)², and the gradient column against Σ bᵀa."""
    import prunelab.criteria.ggn as ggn

    monkeypatch.setattr(ggn, "_pairs_cheaper", lambda *a: pairs)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 2, 3, 4, generator=gen, dtype=torch.float64)  # (N, 2x3 positions, K)
    b = torch.randn(k + 1, 7, 2, 3, 5, generator=gen, dtype=torch.float64)  # (cols, N, .., O)
    acc = ggn._TokenLinear(a, 5, k, grad=True)
    assert acc.pairs is pairs
    for j in range(k + 1):
        acc.add(j, b[j])
    diag, gsum = acc.result()
    want = torch.einsum("jnpo,npi->jnoi", b[:k].reshape(k, 7, 6, 5), a.reshape(7, 6, 4))
    torch.testing.assert_close(diag, want.square().sum((0, 1)))
    torch.testing.assert_close(gsum, torch.einsum("npo,npi->oi", b[k].reshape(7, 6, 5),
                                                  a.reshape(7, 6, 4)))


def test_pairs_chosen_where_cheaper():
    """Exact (k = 9) on a width-64 Linear at 8 positions: pairs; Monte-Carlo (k = 1), a 5-input
    patch embedding or 64 positions: per-example gradients."""
    from prunelab.criteria.ggn import _pairs_cheaper

    assert _pairs_cheaper(8, 9, 64, 64)
    assert not _pairs_cheaper(8, 1, 64, 64)
    assert not _pairs_cheaper(8, 9, 64, 5)
    assert not _pairs_cheaper(64, 9, 64, 64)


def test_per_example_chunks_give_the_same_numbers(monkeypatch):
    import prunelab.criteria.ggn as ggn

    gen = torch.Generator().manual_seed(0)
    b = torch.randn(2, 9, 1, 4, 5, generator=gen, dtype=torch.float64)
    u = torch.randn(9, 1, 3, 5, generator=gen, dtype=torch.float64)
    whole = ggn._square_sum_per_example(b, u)
    monkeypatch.setattr(ggn, "_PER_EXAMPLE_CHUNK", 4 * 3 * 2)  # 2 examples per chunk, 9 = 4x2+1
    torch.testing.assert_close(ggn._square_sum_per_example(b, u), whole)
