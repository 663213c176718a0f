"""GGN diagonal for every loss of the Round-2 contract, against explicit Jacobians (torch.func).

G = 1/U Σ_n J_nᵀ H_n J_n with H_n the Hessian of the per-unit loss w.r.t. the output of example n
(U: examples, or non-ignored tokens for per-token cross-entropy), J_n from ``jacrev``.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from prunelab import batches as B
from prunelab import graph as G
from prunelab.criteria.ggn import ggn_diagonal, loss_grad_ggn


def reference(model, x, y, loss_of_one, units, forward=None):
    """diag(1/U Σ_n J_nᵀ H_n J_n), the mean loss and its gradient, from explicit derivatives."""
    names = G.prunable_names(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    weights = {n: params[n] for n in names}
    forward = forward or (lambda out: out)

    def out_of(w, xi):
        args, kwargs = ((), xi) if isinstance(xi, dict) else ((xi,), {})
        return forward(functional_call(model, {**params, **w}, args, kwargs))[0]

    diag = {n: torch.zeros_like(w) for n, w in weights.items()}
    total = 0.0
    grad = {n: torch.zeros_like(w) for n, w in weights.items()}
    for i in range(len(y)):
        xi = B.take(x, slice(i, i + 1))
        yi = y[i]
        jac = jacrev(lambda w: out_of(w, xi))(weights)
        zi = out_of(weights, xi)
        h = hessian(lambda z: loss_of_one(z, yi))(zi).reshape(zi.numel(), zi.numel())
        g_out = torch.func.grad(lambda z: loss_of_one(z, yi))(zi).reshape(-1)
        total += float(loss_of_one(zi, yi))
        for n in names:
            j = jac[n].reshape(zi.numel(), -1)
            diag[n] += torch.einsum("ck,cd,dk->k", j, h, j).reshape(diag[n].shape)
            grad[n] += (g_out @ j).reshape(grad[n].shape)
    return ({n: d / units for n, d in diag.items()}, total / units,
            {n: g / units for n, g in grad.items()})


def check(res, ref, rtol=1e-6, atol=1e-9):
    diag, loss, grad = ref
    assert res.loss == pytest.approx(loss, rel=1e-9, abs=1e-12)
    for n in diag:
        torch.testing.assert_close(res.ggn[n], diag[n], rtol=rtol, atol=atol)
        torch.testing.assert_close(res.grad[n], grad[n], rtol=rtol, atol=atol)


class TokenModel(nn.Module):
    """Embedding -> Linear -> tanh -> Linear over (N, T) token ids: per-token logits."""

    def __init__(self, vocab=7, width=5, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mid(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h)}


def test_per_token_cross_entropy_with_ignore_index_equals_explicit_jacobians():
    torch.manual_seed(0)
    model = TokenModel().double()
    ids = torch.randint(0, 7, (4, 3))
    mask = torch.ones(4, 3)
    mask[1, 2] = 0
    y = torch.randint(0, 4, (4, 3))
    y[1, 2] = -100  # a padded token: ignored by the loss and the GGN
    y[3, 0] = -100
    x = {"input_ids": ids, "attention_mask": mask.double()}
    units = int((y != -100).sum())

    def one(z, yi):  # z: (T, C) of one example; sum over its valid tokens
        valid = yi != -100
        return F.cross_entropy(z[valid], yi[valid], reduction="sum")

    ref = reference(model, x, y, one, units, forward=lambda out: out["logits"])
    res = loss_grad_ggn(model, (x, y))
    check(res, ref)
    assert res.loss == pytest.approx(float(F.cross_entropy(
        model(**x)["logits"].reshape(-1, 4), y.reshape(-1), ignore_index=-100)))


def test_mse_equals_explicit_jacobians_both_engines():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    ref = reference(model, x, y, lambda z, yi: F.mse_loss(z, yi), len(y))
    for method in ("auto", "autograd"):
        check(loss_grad_ggn(model, (x, y), loss="mse", method=method), ref)


def test_callable_loss_equals_explicit_jacobians():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))

    def smooth(z, t):  # label smoothing: convex in z, a mean over examples
        return F.cross_entropy(z, t, label_smoothing=0.1)

    ref = reference(model, x, y, lambda z, yi: smooth(z[None], yi[None]), len(y))
    check(loss_grad_ggn(model, (x, y), loss=smooth), ref)


def test_monte_carlo_is_unbiased_for_tokens_and_mse():
    torch.manual_seed(3)
    model = TokenModel().double()
    x = torch.randint(0, 7, (3, 2))
    y = torch.randint(0, 4, (3, 2))
    y[0, 1] = -100
    fwd = lambda m, ids: m(ids)  # noqa: E731
    exact = ggn_diagonal(model, (x, y), output=lambda o: o["logits"])
    mc = ggn_diagonal(model, (x, y), output=lambda o: o["logits"], mc_samples=4000, seed=0)
    for n in exact:
        torch.testing.assert_close(mc[n], exact[n], rtol=0.15, atol=2e-3)
    del fwd
    reg = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    xr, yr = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    exact = ggn_diagonal(reg, (xr, yr), loss="mse")
    mc = ggn_diagonal(reg, (xr, yr), loss="mse", mc_samples=4000, seed=0)
    for n in exact:
        torch.testing.assert_close(mc[n], exact[n], rtol=0.15, atol=2e-3)


def test_wide_vocabulary_points_to_monte_carlo():
    model = TokenModel(vocab=5, width=3, classes=3000)
    x = torch.randint(0, 5, (2, 4))
    y = torch.randint(0, 3000, (2, 4))
    with pytest.raises(ValueError, match="mc_samples=1"):
        ggn_diagonal(model, (x, y))
    ggn_diagonal(model, (x, y), mc_samples=1)  # affordable


def test_bad_targets_and_outputs_name_the_problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ggn_diagonal(model, (x, torch.tensor([0, 1, 2, 3, 0])), method="autograd")
    with pytest.raises(TypeError, match="needs floating targets"):
        ggn_diagonal(model, (x, torch.zeros(5, 3, dtype=torch.long)), loss="mse")
    with pytest.raises(TypeError, match="output="):
        ggn_diagonal(nn.Sequential(nn.Linear(3, 3), Wrap()), (x, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="not a mean over examples"):
        ggn_diagonal(model, (x, torch.zeros(5, dtype=torch.long)),
                     loss=lambda z, t: F.cross_entropy(z, t, reduction="sum"))


class Wrap(nn.Module):
    def forward(self, h):
        return {"scores": h}
