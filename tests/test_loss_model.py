"""OBD, LM, QM (LM paper Eqs. 3, 5, 6) against plain-autograd formulas and the true loss change."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import prunelab.criteria as C
from prunelab import graph as G
from prunelab.criteria import loss_model as LM


# ----------------------------------------------------------------------------- references
def reference(model, x, y):
    """(gradient, GGN diagonal) of the mean cross-entropy from autograd and explicit Jacobians."""
    names = G.prunable_names(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    weights = {n: params[n] for n in names}
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        grad = dict(zip(names, torch.autograd.grad(loss, [G.weight(model, n) for n in names])))

    def logits(w, xi):
        return functional_call(model, {**params, **w}, (xi[None],))[0]

    ggn = {n: torch.zeros_like(w) for n, w in weights.items()}
    for xi in x:
        jac = jacrev(logits)(weights, xi)
        p = logits(weights, xi).softmax(0)
        h = torch.diag(p) - torch.outer(p, p)
        for n in names:
            j = jac[n].reshape(len(p), -1)
            ggn[n] += torch.einsum("ck,cd,dk->k", j, h, j).reshape(ggn[n].shape) / len(x)
    return grad, ggn


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(),
                         nn.Linear(5, 3)).double().eval()


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double().eval()


def data(shape=(6,), n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


def with_zeros(model):
    """Prune a few weights by hand: the criteria see already-pruned weights as zeros."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for w in G.weights(model).values():
            w.view(-1)[::4] = 0
    return model


def loss_at(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# ----------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("build,shape", [(mlp, (6,)), (convnet, (1, 4, 4))])
def test_scores_equal_their_formulas(build, shape):
    model = with_zeros(build())
    x, y = data(shape)
    grad, ggn = reference(model, x, y)
    weights = {n: w.detach() for n, w in G.weights(model).items()}
    expected = {
        "obd": {n: 0.5 * ggn[n] * w**2 for n, w in weights.items()},
        "lm": {n: -grad[n] * w for n, w in weights.items()},
        "qm": {n: -grad[n] * w + 0.5 * ggn[n] * w**2 for n, w in weights.items()},
    }
    for name, fn in [("obd", LM.obd), ("lm", LM.lm), ("qm", LM.qm)]:
        signed = {} if name == "obd" else {"signed": True}
        res = fn(model, batch=(x, y), masks=None, seed=0, sparsity=None, scope="global", **signed)
        assert isinstance(res, C.ScoreResult)
        assert res.examples == len(x)
        assert list(res.scores) == G.prunable_names(model)
        for n, want in expected[name].items():
            torch.testing.assert_close(res.scores[n], want, rtol=1e-10, atol=1e-14)
            assert (res.scores[n][weights[n] == 0] == 0).all()  # already pruned: score 0


def test_public_api_and_absolute_values():
    model = mlp()
    x, y = data()
    grad, ggn = reference(model, x, y)
    scores = C.score(model, "qm", batch=(x, y))
    signed = C.score(model, "qm", batch=(x, y), signed=True)
    lm_abs = C.score(model, "lm", batch=(x, y))
    lm_signed = C.score(model, "lm", batch=(x, y), signed=True)
    for n, w in G.weights(model).items():
        w = w.detach()
        want = -grad[n] * w + 0.5 * ggn[n] * w**2
        assert scores[n].dtype == torch.float32
        torch.testing.assert_close(signed[n], want.float(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(scores[n], signed[n].abs())
        torch.testing.assert_close(lm_abs[n], lm_signed[n].abs())
    # Signed scores really are signed: some removals are predicted to lower the loss.
    assert any((s < 0).any() for s in signed.values())
    assert any((s < 0).any() for s in lm_signed.values())
    assert all((s >= 0).all() for s in C.score(model, "obd", batch=(x, y)).values())
    result = C.compute(model, "qm", batch=(x, y))
    assert result.examples == len(x)


def test_monte_carlo_option_passes_through():
    model = mlp()
    x, y = data()
    a = C.score(model, "obd", batch=(x, y), mc_samples=1, seed=5)
    b = C.score(model, "obd", batch=(x, y), mc_samples=1, seed=5)
    exact = C.score(model, "obd", batch=(x, y))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], exact[n]) for n in a)
    q = C.score(model, "qm", batch=(x, y), mc_samples=4, seed=0, chunk=3)
    assert set(q) == set(exact)


@pytest.mark.parametrize("name", ["obd", "lm", "qm"])
def test_data_dependent_without_batch_raises(name):
    with pytest.raises(ValueError, match="data-dependent"):
        C.score(mlp(), name)


@pytest.mark.parametrize("name", ["obd", "lm", "qm"])
def test_model_is_not_modified(name):
    model = mlp()
    x, y = data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn = getattr(LM, name)
    fn(model, batch=(x, y), masks=None, seed=0, sparsity=None, scope="global")
    C.score(model, name, batch=(x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- loss change
def true_changes(model, x, y, picks):
    """L(θ − θ_k e_k) − L(θ) for each (name, flat index) in ``picks``."""
    base = loss_at(model, x, y)
    out = []
    for n, i in picks:
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            G.weight(pruned, n).view(-1)[i] = 0
        out.append(loss_at(pruned, x, y) - base)
    return torch.tensor(out, dtype=torch.float64)


def smallest_weights(model, count):
    flat = [(n, i, abs(float(v))) for n, w in G.weights(model).items()
            for i, v in enumerate(w.detach().view(-1))]
    flat.sort(key=lambda t: t[2])
    return [(n, i) for n, i, _ in flat[:count]]


def predicted(model, x, y, picks, name):
    s = getattr(LM, name)(model, batch=(x, y), masks=None, seed=0, sparsity=None,
                          scope="global", signed=True).scores
    return torch.tensor([float(s[n].view(-1)[i]) for n, i in picks], dtype=torch.float64)


def test_qm_predicts_the_loss_change_to_second_order():
    # Softmax regression: the GGN equals the Hessian, so QM errs only at third order.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double().eval()
    x, y = data()
    picks = smallest_weights(model, 6)
    true = true_changes(model, x, y, picks)
    qm_err = (predicted(model, x, y, picks, "qm") - true).abs()
    lm_err = (predicted(model, x, y, picks, "lm") - true).abs()
    assert (qm_err < 0.05 * lm_err).all()

    # A tiny MLP trained for a few steps (not converged, GGN ≠ Hessian): QM is still closer
    # than LM on average over the smallest weights.
    x, y = data(n=32)
    model = mlp(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    picks = smallest_weights(model, 12)
    true = true_changes(model, x, y, picks)
    qm_err = (predicted(model, x, y, picks, "qm") - true).abs()
    lm_err = (predicted(model, x, y, picks, "lm") - true).abs()
    assert qm_err.mean() < lm_err.mean()
