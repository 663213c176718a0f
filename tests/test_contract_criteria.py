"""Contract suite (issues 13 and 14), in the spirit of scikit-learn's check_estimator: every
registered criterion over the matrix of models of ``contract_models`` — a new criterion is checked
without writing a test.

For each (model, criterion): ``pl.prune`` (which scores through ``pl.score``'s path) either works
and then returns exact per-layer counts, bool masks beside the weights and a finite history,
leaving the caller's model exactly as it was (tensors, grads, requires_grad, per-module training
flags, hooks, parametrizations) — or it is a documented limitation (``LIMITS``) and raises a
ValueError/TypeError naming the criterion and the reason, also leaving the model untouched.
"""
import copy
import math
import warnings

import pytest
import torch

import prunelab as pl
from prunelab import batches as B
from prunelab import graph as G
from prunelab import selection as S
from tests.contract_models import LIMITS, MODELS, assert_unchanged, make, mixed_modes, snapshot

CASES = [(m, c) for m in MODELS for c in pl.criteria.names()]


@pytest.mark.parametrize("model_name, criterion", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_criterion_works_or_is_a_documented_limitation(model_name, criterion):
    model, batch, kw = make(model_name)
    mixed_modes(model)
    before = snapshot(model)
    limit = LIMITS.get((model_name, criterion))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if limit is not None:
            with pytest.raises((ValueError, TypeError), match=limit) as err:
                pl.prune(model, criterion, sparsity=0.5, scope="layerwise", batch=batch, **kw)
            assert criterion in str(err.value) or limit in str(err.value)
            assert_unchanged(before, model)
            return
        res = pl.prune(model, criterion, sparsity=0.5, scope="layerwise", batch=batch, **kw)
    assert_unchanged(before, model)
    names = G.prunable_names(model)
    assert set(res.masks) == set(names)
    for n in names:
        w = G.weight(model, n)
        m = res.masks[n]
        assert m.dtype == torch.bool and m.shape == w.shape and m.device == w.device
        assert int((~m).sum()) == S.n_pruned(0.5, w.numel()), n  # exact count per layer
    assert all(math.isfinite(v) for v in res.history["loss"])
    for n, s in res.scores.items():
        assert not torch.isnan(s).any()
        assert s.shape == G.weight(model, n).shape, n
    # the pruned copy computes with the masks: pruned weights are exactly zero
    for n in names:
        assert torch.all(G.weight(res.model, n)[~res.masks[n]] == 0)
    # ... and its output is that of a plain copy holding the manually masked tensors (any
    # tensor name: in_proj_weight, a transposed Conv1D weight)
    twin = copy.deepcopy(model)
    twin.load_state_dict(pl.masks.dense_state_dict(res.model))
    with torch.no_grad():
        for n, m in res.masks.items():
            G.weight(twin, n).mul_(m.to(G.weight(twin, n).dtype))
    x = batch[0]
    with B.evaluating(res.model), B.evaluating(twin), torch.no_grad():
        torch.testing.assert_close(B.output_tensor(B.call(res.model, x)),
                                   B.output_tensor(B.call(twin, x)))


@pytest.mark.parametrize("model_name", ["mlp", "tokens", "bert", "regression"])
def test_staged_prune_with_lambda_on_every_kind_of_model(model_name):
    model, batch, kw = make(model_name)
    before = snapshot(model)
    res = pl.prune(model, "qm", sparsity=0.8, stages=4, lam=1e-3, batch=batch, **kw)
    assert_unchanged(before, model)
    assert res.history["sparsity"].iloc[-1] == pytest.approx(0.8, abs=1e-2)
    assert list(res.history["stage"]) == [1, 2, 3, 4]


def test_float64_proxy_gives_the_float32_masks():
    """Device/dtype follow the parameters: a float64 copy prunes like the float32 model."""
    m32, (x, y), _ = make("mlp")
    m64 = m32.double()  # in place: rebuild the float32 one
    m32, _, _ = make("mlp")
    for c in ("mp", "lap", "snip", "qm", "obd", "synflow"):
        a = pl.prune(m32, c, sparsity=0.5, batch=(x, y)).masks
        b = pl.prune(m64, c, sparsity=0.5, batch=(x, y)).masks  # float32 data into float64
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(v.numel() for v in a.values())
        assert agree >= 0.97, (c, agree)
        for n in b:
            assert b[n].device == G.weight(m64, n).device


def test_bad_inputs_name_the_value():
    model, (x, y), _ = make("mlp")
    before = snapshot(model)
    cases = [
        (dict(batch=(x, y + 10)), ValueError, r"labels must lie in \[0, 3\)"),
        (dict(batch=(x[:, :5], y)), ValueError, r"cannot run on these inputs \(shapes \(12, 5\)\)"),
        (dict(batch=(x, y.float())), TypeError, "class indices must be integers"),
        (dict(batch=(x, y), signd=True), TypeError, r"unknown option\(s\) \['signd'\]"),
        (dict(batch=(x, y), mc_sample=1), TypeError, r"unknown option\(s\) \['mc_sample'\]"),
        (dict(batch=(x, y), loss="hinge"), ValueError, "loss must be one of"),
        (dict(batch=({"a": x}, y)), TypeError, "unexpected keyword"),
        (dict(batch=(x, y), output=lambda o: o["logits"]), TypeError, "output= failed"),
    ]
    for kwargs, err, match in cases:
        crit = "lm" if "signd" in kwargs else "qm"
        with pytest.raises(err, match=match):
            pl.prune(model, crit, sparsity=0.5, **kwargs)
        assert_unchanged(before, model)


def test_a_loss_returning_a_non_scalar_and_dict_loaders_without_targets():
    from torch.utils.data import DataLoader

    model, (x, y), _ = make("mlp")
    with pytest.raises(ValueError, match="scalar tensor"):
        pl.score(model, "lm", batch=(x, y), loss=lambda o, t: (o - 0).sum(1))
    loader = DataLoader([{"x": x[i]} for i in range(len(x))], batch_size=4)
    with pytest.raises(ValueError, match="no targets"):
        pl.score(model, "snip", batch=loader)


def test_a_batch_on_another_device_is_moved_and_a_mismatched_model_named():
    model, (x, y), _ = make("mlp")
    meta = torch.nn.Linear(8, 3, device="meta")
    with pytest.raises((ValueError, TypeError, RuntimeError, NotImplementedError)):
        pl.score(meta, "snip", batch=(x, y))
    # float64 inputs into a float32 model are cast to the model's dtype
    s = pl.score(model, "snip", batch=(x.double(), y))
    assert all(v.dtype == torch.float32 for v in s.values())
