"""Contract suite over the public entry points (issues 13 and 14), in the spirit of
scikit-learn's check_estimator: every registered unit score (``units.names()``) and structured
criterion (``structured.names()``) runs over the models of ``contract_models`` — a new score or
criterion is checked without writing a test — and the other entry points that take a model or
data (connectivity, metrics, lottery, at_init, collapse, masks) run on a few models each,
including a DataLoader batch and a float64 model.

Each call either works — exact counts, finite outputs, the caller's model untouched (tensors,
grads, requires_grad, every module's own training flag with norm layers left in eval by the
caller, hooks, parametrizations) — or is a documented limitation raising ValueError/TypeError
that names the function or layer and the reason.

The bad-input table at the end lists the kinds of issue 13 as (call, exception, message regex):
every rejection is a ValueError or TypeError naming the argument and the value.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab as pl
from prunelab import batches as B
from prunelab import graph as G
from prunelab import masks as M
from prunelab import selection as S
from prunelab import structured, units
from tests.contract_models import assert_unchanged, make, mixed_modes, snapshot

# ----------------------------------------------------------------------------- unit scores
# The layers each model's units are pruned in (None: the default, every prunable layer but the
# last), and the documented limitations: model -> phrase of the ValueError.
UNIT_LAYERS = {"mlp": None, "float64": None, "regression": None, "convbn": None,
               "residual": ["a"], "tokens": None}
UNIT_LIMITS = {
    "residual-default": "also receives",             # a residual add feeds the consumer
    "encoder": "cannot see through",                 # attention / fused encoder layers
    "bert": "cannot see through",
    "mha": "cannot see through",                     # inp feeds nn.MultiheadAttention; the
    # autograd walk of a Linear on (N, T, F) inputs sees its internal reshapes as opaque
    "gpt2": "not an nn.Linear/nn.Conv weight",       # HuggingFace Conv1D stores (in, out)
}
UNIT_MODELS = [*UNIT_LAYERS, *UNIT_LIMITS]
UNIT_CASES = [(m, s) for m in UNIT_MODELS for s in units.names()]


def _model(name):
    return make("residual" if name == "residual-default" else name)


def _out(model, x):
    with B.evaluating(model), torch.no_grad():
        return B.output_tensor(B.call(model, x))


@pytest.mark.parametrize("model_name, score", UNIT_CASES, ids=[f"{m}-{s}" for m, s in UNIT_CASES])
def test_unit_score_works_or_is_a_documented_limitation(model_name, score):
    model, batch, kw = _model(model_name)
    mixed_modes(model)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_name in UNIT_LIMITS:
            with pytest.raises(ValueError, match=UNIT_LIMITS[model_name]) as err:
                units.prune(model, count=1, score=score, batch=batch, **kw)
            assert "units" in str(err.value) and "layer" in str(err.value)
            assert_unchanged(before, model)
            return
        layers = UNIT_LAYERS[model_name]
        res = units.prune(model, count=2, score=score, batch=batch, layers=layers, **kw)
        phys = units.prune(model, count=2, score=score, batch=batch, layers=layers,
                           physical=True, **kw)
        s = units.score(model, score.removeprefix("bp_"), batch=batch, layers=layers, **kw)
    assert_unchanged(before, model)
    assert res.examples == len(batch[1])
    for name, idx in res.pruned.items():
        sc = res.scores[name]
        assert sc.shape == (res.sizes[name],) and torch.isfinite(sc).all()
        assert len(idx) == 2  # exact count
        # the lowest scores, ties by the lower index
        assert idx == sorted(torch.sort(sc, stable=True).indices[:2].tolist())
        if score.removeprefix("bp_") != "rand":
            assert torch.equal(s[name], sc)
    # pruned units' columns are exactly zero in every consumer
    for wname, mask in res.masks.items():
        assert mask.dtype == torch.bool and mask.shape == G.weight(res.model, wname).shape
        assert torch.all(G.weight(res.model, wname)[~mask] == 0)
        assert G.weight(res.model, wname).dtype == G.weight(model, wname).dtype
    # masked and physical removal compute the same function; outputs are finite
    x = batch[0]
    a, b = _out(res.model, x), _out(phys.model, x)
    assert torch.isfinite(a).all() and a.dtype == _out(model, x).dtype
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert res.mean_replacement == score.startswith("bp_")


def test_unit_scores_read_a_dataloader_like_tensors_and_take_loss_callables():
    model, (x, y), _ = make("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    for score in ("abs_mrs", "rs"):
        a = units.score(model, score, batch=(x, y))
        b = units.score(model, score, batch=loader)
        c = units.score(model, score, batch=TensorDataset(x, y))
        d = units.score(model, score, batch=(x, y),
                        loss=lambda z, t: nn.functional.cross_entropy(z, t))
        e = units.score(model, score, batch=(x, y), loss_fn=nn.functional.cross_entropy)
        for n in a:
            for other in (b, c, d, e):
                torch.testing.assert_close(a[n], other[n])


def test_float64_units_match_float32():
    m32, (x, y), _ = make("mlp")
    m64, _, _ = make("float64")
    for score in ("norm", "abs_mrs", "bp_mrs"):
        a = units.prune(m32, count=2, score=score, batch=(x, y))
        b = units.prune(m64, count=2, score=score, batch=(x.double(), y))
        assert a.pruned == b.pruned
        assert all(p.dtype == torch.float64 for p in b.model.parameters())


# ----------------------------------------------------------------------------- structured
STRUCT_LAYERS = {"mlp": None, "float64": None, "regression": None, "convbn": None,
                 "residual": ["a"], "tokens": None}
STRUCT_LIMITS = {
    **{(m, "hrank"): "applies to Conv2d layers" for m in ("mlp", "float64", "regression",
                                                           "tokens")},
    **{(m, "bn-scale"): "BatchNorm directly after" for m in ("mlp", "float64", "regression",
                                                              "tokens")},
    **{("residual-default", c): "also receives" for c in structured.names()},
    **{("encoder", c): "cannot see through" for c in structured.names()},
    **{("bert", c): "cannot see through" for c in structured.names()},
    **{("mha", c): "cannot see through" for c in structured.names()},
    **{("gpt2", c): "not an nn.Linear/nn.Conv weight" for c in structured.names()},
}
STRUCT_CASES = [(m, c)
                for m in [*STRUCT_LAYERS, "residual-default", "encoder", "bert", "mha", "gpt2"]
                for c in structured.names()]


@pytest.mark.parametrize("model_name, criterion", STRUCT_CASES,
                         ids=[f"{m}-{c}" for m, c in STRUCT_CASES])
def test_structured_criterion_works_or_is_a_documented_limitation(model_name, criterion):
    model, batch, kw = _model(model_name)
    mixed_modes(model)
    before = snapshot(model)
    limit = STRUCT_LIMITS.get((model_name, criterion))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if limit is not None:
            with pytest.raises(ValueError, match=limit) as err:
                structured.prune(model, criterion, count=1, batch=batch, **kw)
            assert criterion in str(err.value) or "layer" in str(err.value)
            assert_unchanged(before, model)
            return
        layers = STRUCT_LAYERS[model_name]
        for bp in (False, True):
            res = structured.prune(model, criterion, count=1, batch=batch, layers=layers,
                                   mean_replacement=bp, **kw)
            assert_unchanged(before, model)
            assert res.mean_replacement is bp
            for name, idx in res.pruned.items():
                assert len(idx) == 1 and torch.isfinite(res.scores[name]).all()
            assert torch.isfinite(_out(res.model, batch[0])).all()


@pytest.mark.parametrize("model_name", ["mlp", "float64", "convbn"])
def test_structured_compare_with_dataloaders_keeps_the_callers_modes(model_name):
    model, (x, y), _ = make(model_name)
    mixed_modes(model)
    before = snapshot(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    frame = structured.compare(model, criteria=("random", "mp-l1"), fractions=(0.4,),
                               batch=loader, eval_data=loader)
    assert_unchanged(before, model)
    assert len(frame) == 1 + 2 * 2 and np.isfinite(frame["loss"]).all()
    assert (frame["pruned"].iloc[1:] > 0).all()


def test_structured_compare_regression_loss():
    model, batch, kw = make("regression")
    frame = structured.compare(model, criteria=("mp-l2",), fractions=(0.25,), batch=batch,
                               eval_data=batch, **kw)
    assert np.isfinite(frame["loss"]).all() and frame["accuracy"].isna().all()


# ----------------------------------------------------------------------------- entry points
def _loader(batch, size=5):
    x, y = batch
    return DataLoader(TensorDataset(x, y), batch_size=size)


PATH_MODELS = ["mlp", "float64", "regression", "tokens", "convbn"]


@pytest.mark.parametrize("model_name", PATH_MODELS)
def test_interpolate_on_models_and_dataloaders(model_name):
    a, batch, kw = make(model_name)
    b, _, _ = make(model_name)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mixed_modes(a)
    sa, sb = snapshot(a), snapshot(b)
    data = batch if model_name == "tokens" else _loader(batch)
    bn = batch if model_name == "convbn" else None
    frame = pl.connectivity.interpolate(a, b, data, steps=[0, 0.5, 1], bn_data=bn, **kw)
    assert_unchanged(sa, a)
    assert_unchanged(sb, b)
    assert list(frame["t"]) == [0, 0.5, 1] and np.isfinite(frame["loss"]).all()
    if model_name not in ("regression", "convbn"):  # exact endpoints (BN is recomputed)
        assert frame["loss"].iloc[0] == pytest.approx(pl.metrics.loss(a, batch, **kw), rel=1e-6)


@pytest.mark.parametrize("model_name", ["mlp", "float64", "regression"])
def test_plane_on_models_and_dataloaders(model_name):
    a, batch, kw = make(model_name)
    b, _, _ = make(model_name)
    c, _, _ = make(model_name)
    with torch.no_grad():
        for p, q in zip(b.parameters(), c.parameters()):
            p.add_(0.1)
            q.add_(torch.linspace(-0.2, 0.3, q.numel()).reshape(q.shape).to(q.dtype))
    sa = snapshot(a)
    frame = pl.connectivity.plane(a, b, c, _loader(batch), grid=3, **kw)
    assert_unchanged(sa, a)
    assert len(frame) == 9 and np.isfinite(frame["loss"]).all()
    u, v = frame.attrs["points"]["b"]
    assert v == 0.0 and u > 0


def test_hrank_reads_tensors_datasets_and_dataloaders_alike():
    model, (x, y), _ = make("convbn")
    mixed_modes(model)
    before = snapshot(model)
    ref = structured.score(model, "hrank", batch=(x, y))
    for batch in (x, TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)):
        got = structured.score(model, "hrank", batch=batch)
        assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert_unchanged(before, model)


@pytest.mark.parametrize("model_name", ["mlp", "float64", "regression", "tokens"])
def test_curves_fit_frame_and_ensemble(model_name):
    a, batch, kw = make(model_name)
    b, _, _ = make(model_name)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    sa = snapshot(a)
    curve = pl.curves.bezier(a, b)
    data = batch if model_name == "tokens" else _loader(batch)
    hist = pl.curves.fit_bend(curve, data, steps=3, batch_size=6, **kw)
    assert len(hist) == 3 and np.isfinite(hist["loss"]).all()
    frame = pl.curves.curve_frame(curve, data, steps=3, **kw)
    assert_unchanged(sa, a)
    assert np.isfinite(frame["loss"]).all() and len(frame) == 3
    assert all(v.dtype == p.dtype for v, p in zip(curve.theta.values(), a.parameters()))
    if model_name != "regression":
        err = pl.curves.ensemble_error(a, curve.point(0.5), data)
        assert 0.0 <= err <= 1.0


@pytest.mark.parametrize("model_name", ["mlp", "float64", "regression", "tokens", "convbn"])
def test_metrics_loss_and_delta_loss(model_name):
    model, batch, kw = make(model_name)
    mixed_modes(model)
    before = snapshot(model)
    data = batch if model_name == "tokens" else _loader(batch)
    full = pl.metrics.loss(model, batch, **kw)
    assert math.isfinite(full) and pl.metrics.loss(model, data, **kw) == pytest.approx(full)
    pruned = pl.prune(model, "mp", sparsity=0.5, **kw).model
    d = pl.metrics.delta_loss(model, pruned, data, **kw)
    assert_unchanged(before, model)
    assert d == pytest.approx(abs(pl.metrics.loss(pruned, batch, **kw) - full), rel=1e-5)


@pytest.mark.parametrize("model_name", ["mlp", "float64"])
def test_lottery_imp_on_a_custom_bundle(model_name):
    model, (x, y), _ = make(model_name)
    bundle = pl.data.from_tensors(train=(x, y), val=(x[:6], y[:6]), test=(x[6:], y[6:]))
    before = snapshot(model)
    recipe = pl.train.Recipe(epochs=1, batch_size=6, lr=0.05)
    res = pl.lottery.imp(model, bundle, rounds=2, recipe=recipe, prune_fraction=0.5)
    assert_unchanged(before, model)
    names = G.prunable_names(model)
    numel = sum(G.weight(model, n).numel() for n in names)
    for r, masks in enumerate(res.masks):
        assert sum(int((~m).sum()) for m in masks.values()) == S.n_pruned(1 - 0.5 ** r, numel)
    assert np.isfinite(res.rounds["test_loss"]).all()
    assert all(p.dtype == next(model.parameters()).dtype for p in res.model.parameters())


@pytest.mark.parametrize("model_name", ["mlp", "float64", "regression"])
def test_at_init_ablate_with_a_dataloader(model_name):
    model, batch, kw = make(model_name)
    before = snapshot(model)
    ab = pl.at_init.ablate(model, "snip", sparsity=0.5, batch=_loader(batch),
                           ablations=("original", "shuffled", "inverted"), **kw)
    assert_unchanged(before, model)
    numel = sum(G.weight(model, n).numel() for n in G.prunable_names(model))
    assert set(ab.masks) == {"original", "shuffled", "inverted"}
    for masks in ab.masks.values():  # global scope: the total count is exact
        assert sum(int((~m).sum()) for m in masks.values()) == S.n_pruned(0.5, numel)
        assert all(m.dtype == torch.bool for m in masks.values())


@pytest.mark.parametrize("model_name", ["mlp", "float64", "regression"])
def test_collapse_layer_density(model_name):
    model, batch, kw = make(model_name)
    mixed_modes(model)
    before = snapshot(model)
    frame = pl.collapse.layer_density(model, ["mp", "snip"], [1, 2, 10], batch=_loader(batch),
                                      **kw)
    assert_unchanged(before, model)
    total = frame.groupby(["criterion", "compression"]).apply(
        lambda f: f["kept"].sum() / f["numel"].sum(), include_groups=False)
    numel = sum(G.weight(model, n).numel() for n in G.prunable_names(model))
    for (_, rho), density in total.items():
        assert density * numel == numel - S.n_pruned(1 - 1 / rho, numel)


@pytest.mark.parametrize("model_name", ["mlp", "float64", "convbn"])
def test_masks_apply_density_save_load_round_trip(model_name, tmp_path):
    model, batch, _ = make(model_name)
    before = snapshot(model)
    masks = pl.prune(model, "mp", sparsity=0.5, scope="layerwise").masks
    masked = M.apply(model, masks)
    assert_unchanged(before, model)
    frame = M.density(masks)
    assert frame["kept"].iloc[-1] == sum(int(m.sum()) for m in masks.values())
    M.save(masks, tmp_path / "m.safetensors")
    back = M.load(tmp_path / "m.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[n], masks[n]) for n in masks)
    assert all(torch.equal(M.current(masked)[n], masks[n]) for n in masks)
    for n in masks:
        assert G.weight(masked, n).dtype == G.weight(model, n).dtype


def test_to_torch_prune_in_a_fresh_process():
    code = ("import torch, prunelab as pl\nfrom torch import nn\n"
            "m = nn.Sequential(nn.Linear(4, 3))\n"
            "mask = {'0.weight': torch.tensor([[True, False] * 2] * 3)}\n"
            "t = pl.masks.to_torch_prune(m, mask)\n"
            "assert torch.equal(pl.masks.from_torch_prune(t)['0.weight'], mask['0.weight'])\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_torch_prune_gives_the_same_function_and_prunes():
    import torch.nn.utils.prune as tp

    model, (x, y), _ = make("mlp")
    tp.l1_unstructured(model[0], "weight", 0.5)
    tp.random_unstructured(model[2], "weight", 0.3)
    assert M.has_torch_prune(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = M.import_torch_prune(model)
    assert not M.has_torch_prune(plain) and M.has_torch_prune(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(_out(plain, x), _out(model, x))
    assert torch.equal(M.current(plain)["0.weight"], model[0].weight_mask.bool())
    res = pl.prune(plain, "mp", sparsity=0.6)
    assert M.sparsity(res.masks) == pytest.approx(0.6, abs=0.01)
    assert torch.all(res.masks["0.weight"] <= model[0].weight_mask.bool())  # pruned stays pruned
    assert M.import_torch_prune(plain) is plain
    bias = nn.Sequential(nn.Linear(3, 2))
    tp.l1_unstructured(bias[0], "bias", 0.5)
    with pytest.raises(ValueError, match=r"0\.bias carries a torch.nn.utils.prune mask"):
        M.import_torch_prune(bias)


# ----------------------------------------------------------------------------- numeric edges
finite_or_inf = st.floats(allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_or_inf, min_size=1, max_size=40), st.floats(0, 0.99))
def test_select_exact_counts_with_ties_and_infinities(values, sparsity):
    scores = {"w": torch.tensor(values, dtype=torch.float32)}
    mask = S.select(scores, sparsity)["w"]
    k = S.n_pruned(sparsity, len(values))
    assert int((~mask).sum()) == k
    if 0 < k < len(values):  # every pruned score <= every kept score
        assert scores["w"][~mask].max() <= scores["w"][mask].min()


@settings(max_examples=30, deadline=None)
@given(st.lists(finite_or_inf, min_size=1, max_size=20), st.integers(0, 19))
def test_select_refuses_nan(values, at):
    s = torch.tensor(values, dtype=torch.float32)
    s[at % len(values)] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S.select({"w": s}, 0.5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, -1.0, math.inf, -math.inf, 2.5]),
                min_size=6, max_size=6), st.integers(0, 5))
def test_unit_scores_given_with_ties_and_infinities(values, count):
    model, _, _ = make("mlp")
    given_scores = {"0": torch.tensor(values), "2": torch.arange(5.0)}
    res = units.prune(model, count={"0": count, "2": 1}, score="given",
                      unit_scores=given_scores)
    order = torch.sort(torch.tensor(values, dtype=torch.float64), stable=True).indices
    assert res.pruned["0"] == sorted(order[:count].tolist())
    assert res.pruned["2"] == [0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.sampled_from([0.0, 1.0, 2.0, -1.0, math.nan]))
def test_masks_with_other_values_are_refused(rows, cols, value):
    model = nn.Sequential(nn.Linear(cols, rows))
    mask = torch.full((rows, cols), value)
    if value in (0.0, 1.0):
        with pytest.raises(ValueError, match="bool"):
            M.apply(model, {"0.weight": mask})
        assert pl.score(model, "mp", masks={"0.weight": mask})["0.weight"].shape == (rows, cols)
    else:
        for call in (lambda: M.apply(model, {"0.weight": mask}),
                     lambda: pl.score(model, "mp", masks={"0.weight": mask})):
            with pytest.raises(ValueError, match="mask of 0.weight"):
                call()


# ----------------------------------------------------------------------------- bad inputs
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


X = torch.randn(32, 8)
Y = torch.randint(0, 3, (32,))
FRAME = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [1.0, 3, 2, 4]})


def _nan_weight(net):
    with torch.no_grad():
        net[0].weight[2, 3] = float("nan")
    return net


def _garbage(tmp_path):
    p = tmp_path / "masks.safetensors"
    p.write_bytes(b"not a safetensors file")
    return p


def _pruning_checks_prunable() -> bool:
    import inspect

    from prunelab import pruning
    return "check_prunable" in inspect.getsource(pruning)


NAN_X = X.clone()
NAN_X[0, 0] = float("nan")
BAD = [
    # (id, call(net, tmp_path), exception, message regex)
    ("units labels out of range", lambda n, t: units.prune(n, fraction=.3, batch=(X, Y + 10)),
     ValueError, r"labels must lie in \[0, 3\).*\[10, 12\]"),
    ("units wrong feature width", lambda n, t: units.prune(n, fraction=.3, batch=(X[:, :5], Y)),
     ValueError, r"batch: the model cannot run on these inputs \(shapes \(32, 5\)\)"),
    ("units integer inputs", lambda n, t: units.prune(n, fraction=.3, batch=(X.long(), Y)),
     ValueError, r"cannot run on these inputs"),
    ("units float labels", lambda n, t: units.prune(n, fraction=.3, batch=(X, Y.float())),
     TypeError, "class indices must be integers"),
    ("units empty batch", lambda n, t: units.prune(n, fraction=.3, batch=(X[:0], Y[:0])),
     ValueError, r"batch is empty \(0 examples\)"),
    ("units bp_ NaN batch", lambda n, t: units.prune(n, fraction=.3, score="bp_norm",
                                                      batch=(NAN_X, Y)),
     ValueError, "batch inputs contain NaN or inf"),
    ("units NaN weight", lambda n, t: units.prune(_nan_weight(n), fraction=.3, score="norm"),
     ValueError, r"layer\(s\) \['0'\] contain NaN"),
    ("units unknown score", lambda n, t: units.prune(n, fraction=.3, score="l1"),
     ValueError, "unknown unit score 'l1'; valid names: rand"),
    ("units fraction 1.5", lambda n, t: units.prune(n, fraction=1.5), ValueError,
     r"fraction must be in \(0, 1\), got 1.5"),
    ("units loss and loss_fn", lambda n, t: units.prune(n, fraction=.3, batch=(X, Y), loss="mse",
                                                         loss_fn=nn.functional.mse_loss),
     ValueError, "loss= or loss_fn="),
    ("units DataLoader of dicts without targets",
     lambda n, t: units.score(n, "rs", batch=DataLoader([{"x": X[i]} for i in range(4)])),
     ValueError, "no targets"),
    ("structured labels out of range",
     lambda n, t: structured.prune(n, "mp-l1", fraction=.3, batch=(X, Y + 10),
                                   mean_replacement=True),
     ValueError, r"labels must lie in \[0, 3\)"),
    ("structured bp without targets",
     lambda n, t: structured.prune(n, "mp-l1", fraction=.3, batch=X, mean_replacement=True),
     ValueError, "mean replacement needs batch=.*input tensor without targets"),
    ("structured unknown criterion", lambda n, t: structured.prune(n, "l3", fraction=.3),
     ValueError, "unknown structured criterion 'l3'; valid names: random"),
    ("interpolate labels out of range",
     lambda n, t: pl.connectivity.interpolate(n, n, (X, Y + 10), steps=3),
     ValueError, r"labels must lie in \[0, 3\)"),
    ("interpolate wrong width",
     lambda n, t: pl.connectivity.interpolate(n, n, (X[:, :5], Y), steps=3),
     ValueError, r"data: the model cannot run on these inputs \(shapes \(32, 5\)\)"),
    ("interpolate NaN step",
     lambda n, t: pl.connectivity.interpolate(n, n, (X, Y), steps=[0, float("nan"), 1]),
     ValueError, r"steps must hold finite t values, got nan"),
    ("interpolate bool steps", lambda n, t: pl.connectivity.interpolate(n, n, (X, Y), steps=True),
     TypeError, "steps must be an int >= 2"),
    ("interpolate NaN data",
     lambda n, t: pl.connectivity.interpolate(n, n, (NAN_X, Y), steps=2),
     ValueError, "data inputs contain NaN"),
    ("metrics.loss labels out of range", lambda n, t: pl.metrics.loss(n, (X, Y + 10)),
     ValueError, r"labels must lie in \[0, 3\)"),
    ("spearman n_boot=0", lambda n, t: pl.metrics.spearman(FRAME, "a", "b", n_boot=0),
     ValueError, r"n_boot .* must be an int >= 1, got 0"),
    ("spearman n_boot=True", lambda n, t: pl.metrics.spearman(FRAME, "a", "b", n_boot=True),
     ValueError, r"n_boot .* got True"),
    ("spearman ci=1", lambda n, t: pl.metrics.spearman(FRAME, "a", "b", ci=1),
     ValueError, r"ci must be a number in \(0, 1\), got 1"),
    ("score mask (1,8) broadcast",
     lambda n, t: pl.score(n, "mp", masks={"0.weight": torch.ones(1, 8, dtype=torch.bool)}),
     ValueError, r"mask of 0.weight has shape \(1, 8\), the weight has \(6, 8\)"),
    ("score mask float 2.0",
     lambda n, t: pl.score(n, "mp", masks={"0.weight": torch.full((6, 8), 2.0)}),
     ValueError, "mask of 0.weight must be bool"),
    ("misspelt option signd", lambda n, t: pl.score(n, "lm", batch=(X, Y), signd=True),
     TypeError, r"unknown option\(s\) \['signd'\]; its options: \['signed'\]"),
    ("misspelt option mc_sample", lambda n, t: pl.score(n, "qm", batch=(X, Y), mc_sample=1),
     TypeError, r"unknown option\(s\) \['mc_sample'\]"),
    ("sparsity=True", lambda n, t: pl.prune(n, "mp", sparsity=True), ValueError,
     r"sparsity must be a number in \[0, 1\), got True"),
    ("layer_sparsity=0.5", lambda n, t: pl.prune(n, "mp", sparsity=.5, layer_sparsity=0.5),
     ValueError, r"layer_sparsity must be a mapping .* got 0.5"),
    ("no prunable layers (check)", lambda n, t: S.check_prunable(nn.Sequential(nn.ReLU())),
     ValueError, "has no prunable weights: no nn.Linear or nn.Conv"),
    pytest.param("no prunable layers (prune)",
                 lambda n, t: pl.prune(nn.Sequential(nn.ReLU()), "mp", sparsity=.5),
                 ValueError, "has no prunable weights",
                 marks=pytest.mark.skipif(not _pruning_checks_prunable(),
                                          reason="pruning.py does not call "
                                                 "masks.check_prunable yet (integrator)")),
    ("masks.apply(list)", lambda n, t: M.apply(n, [torch.ones(6, 8, dtype=torch.bool)]),
     TypeError, "masks must be a dict weight name -> bool tensor .* got list"),
    ("masks.apply(float mask)", lambda n, t: M.apply(n, {"0.weight": torch.ones(6, 8, dtype=torch.float32)}),
     ValueError, "mask of 0.weight must be a bool tensor, got torch.float32"),
    ("masks.apply(unknown layer)",
     lambda n, t: M.apply(n, {"9.weight": torch.ones(6, 8, dtype=torch.bool)}),
     ValueError, r"masks name unknown layers \['9.weight'\]"),
    ("masks.save(list)", lambda n, t: M.save([1], t / "m.safetensors"), TypeError,
     "masks must be a dict"),
    ("masks.load(garbage)", lambda n, t: M.load(_garbage(t)), ValueError,
     r"masks.safetensors' is not a safetensors mask file"),
    ("masks.load(missing)", lambda n, t: M.load(t / "nope.safetensors"), FileNotFoundError,
     "no mask file"),
    ("masks.density(list)", lambda n, t: M.density([1]), TypeError, "masks must be a dict"),
    ("storage_report mask 2.0",
     lambda n, t: pl.compression.storage_report(n, masks={"0.weight": torch.full((6, 8), 2.0)}),
     ValueError, "mask of 0.weight must be bool .* or hold only 0 and 1"),
    ("storage_report masks list", lambda n, t: pl.compression.storage_report(n, masks=[1]),
     TypeError, "masks must be a dict"),
    ("units per-token labels out of range",
     lambda n, t: units.prune(make("tokens")[0], count=1,
                              batch=({"input_ids": torch.zeros(4, 3, dtype=torch.long)},
                                     torch.full((4, 3), 9))),
     ValueError, r"labels must lie in \[0, 4\)"),
    ("imp prune_fraction=True",
     lambda n, t: pl.lottery.imp(n, None, rounds=1, recipe=pl.train.Recipe(),
                                 prune_fraction=True),
     ValueError, r"prune_fraction must be in \(0, 1\), got True"),
    ("imp loss='hinge'",
     lambda n, t: pl.lottery.imp(n, None, rounds=1, recipe=pl.train.Recipe(), loss="hinge"),
     ValueError, "loss must be one of"),
    ("layer_density misspelt option",
     lambda n, t: pl.collapse.layer_density(n, ["mp"], [2], iteration=3),
     TypeError, r"unknown option\(s\) \['iteration'\]"),
]


@pytest.mark.parametrize("name, call, exc, pattern", BAD,
                         ids=[c.values[0] if hasattr(c, "marks") else c[0] for c in BAD])
def test_bad_input_is_refused_naming_the_value(name, call, exc, pattern, tmp_path):
    net = _net()
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as err:
            call(net, tmp_path)
    assert type(err.value) is exc or isinstance(err.value, exc)
    assert re.search(pattern, str(err.value)), str(err.value)
    if "NaN weight" not in name:
        assert_unchanged(before, net)


def test_numpy_scalars_are_accepted_like_python_numbers():
    net = _net()
    a = pl.prune(net, "mp", sparsity=np.float32(0.5), stages=np.int64(3))
    b = pl.prune(net, "mp", sparsity=0.5, stages=3)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    r = units.prune(net, count=np.int64(1), score="norm")
    assert all(len(v) == 1 for v in r.pruned.values())
    r = units.prune(net, fraction=np.float32(0.4), score="norm")
    assert r.pruned == units.prune(net, fraction=0.4, score="norm").pruned
    frame = pl.connectivity.interpolate(net, net, (X, Y), steps=np.int64(3))
    assert len(frame) == 3
    rho = pl.metrics.spearman(FRAME, "a", "b", n_boot=np.int64(50), seed=np.int64(1))
    assert rho["low"] <= rho["high"]
