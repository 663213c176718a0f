"""Masks: exact counts, scopes, schedules, interop, persistence, and enforcement in training."""
import copy
import math

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from prunelab import masks as M
from prunelab.train import Recipe, fit


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8),
                         nn.ReLU(), nn.Linear(8, 3))


def tiny_conv(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def mag(model):
    return {f"{n}.weight": m.weight.detach().abs() for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


score_tensors = st.lists(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, 3.25]), min_size=1, max_size=20),
    min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(layers=score_tensors, s=st.floats(0.0, 0.999))
@example(layers=[[0.0, 0.0]], s=0.5)  # the tie case that breaks threshold pruners
def test_global_prunes_exactly_floor(layers, s):
    scores = {f"l{i}.weight": torch.tensor(v) for i, v in enumerate(layers)}
    d = sum(len(v) for v in layers)
    masks = M.select(scores, s, scope="global")
    assert sum(int((~m).sum()) for m in masks.values()) == M.n_pruned(s, d)
    assert M.n_pruned(s, d) in (math.floor(s * d), round(s * d))
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    pruned = torch.cat([scores[n][~m] for n, m in masks.items()])
    if len(kept) and len(pruned):
        assert kept.min() >= pruned.max()  # never keeps a lower score than one it prunes


@settings(max_examples=100, deadline=None)
@given(layers=score_tensors, s=st.floats(0.0, 0.999))
def test_ranking_matches_select(layers, s):
    scores = {f"l{i}.weight": torch.tensor(v) for i, v in enumerate(layers)}
    for scope in ("global", "layerwise", "normalized"):
        a = M.select(scores, s, scope=scope)
        b = M.Ranking(scores, scope=scope).masks(s)
        assert all(torch.equal(a[n], b[n]) for n in a), scope


def test_floor_is_robust_to_float_roundoff():
    assert M.n_pruned(0.29, 100) == 29
    assert M.n_pruned(0.7, 10) == 7
    assert M.n_pruned(0.999, 10) == 9


def test_layerwise_and_explicit_layer_sparsity():
    scores = mag(tiny_mlp())
    masks = M.select(scores, 0.5, scope="layerwise")
    for n, m in masks.items():
        assert int((~m).sum()) == M.n_pruned(0.5, m.numel())
    explicit = M.select(scores, layer_sparsity={"1.weight": 0.9})
    assert int((~explicit["1.weight"]).sum()) == M.n_pruned(0.9, 12 * 16)
    assert explicit["3.weight"].all() and explicit["5.weight"].all()
    with pytest.raises(ValueError, match="nope.weight"):
        M.select(scores, layer_sparsity={"nope.weight": 0.5})


def test_normalized_scope_divides_by_frobenius_norm():
    scores = {"a.weight": torch.tensor([1.0, 2.0, 3.0]), "b.weight": torch.tensor([10.0, 20.0, 40.0])}
    m = M.select(scores, 0.5, scope="normalized")
    # after normalisation: a = [.27,.53,.80], b = [.22,.44,.87]: prune b0, a0, b1
    assert m["a.weight"].tolist() == [False, True, True]
    assert m["b.weight"].tolist() == [False, False, True]


def test_previous_masks_stay_pruned():
    scores = {"a.weight": torch.tensor([5.0, 4.0, 3.0, 2.0])}
    prev = {"a.weight": torch.tensor([False, True, True, True])}
    m = M.select(scores, 0.5, previous=prev)
    assert m["a.weight"].tolist() == [False, True, True, False]


def test_global_magnitude_mask_equals_torch_global_unstructured():
    model = tiny_conv()
    ours = M.select(mag(model), 0.7, scope="global")
    ref = copy.deepcopy(model)
    params = [(ref[0], "weight"), (ref[4], "weight")]
    # torch rounds a float amount, we floor: hand it our exact count as an int
    k = M.n_pruned(0.7, sum(m.numel() for m in ours.values()))
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=k)
    assert torch.equal(ours["0.weight"], ref[0].weight_mask.bool())
    assert torch.equal(ours["4.weight"], ref[4].weight_mask.bool())


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.0, 1.5, True, "0.5", None, float("inf")])
def test_bad_sparsity_is_rejected_with_its_value(bad):
    with pytest.raises(ValueError, match="sparsity"):
        M.select({"a.weight": torch.ones(4)}, bad)


def test_nan_scores_are_rejected_by_name():
    with pytest.raises(ValueError, match="b.weight"):
        M.select({"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, math.nan])}, 0.5)


def test_bad_scope_rejected():
    with pytest.raises(ValueError, match="scope"):
        M.select({"a.weight": torch.ones(4)}, 0.5, scope="layer")


def test_exponential_schedule_keeps_same_fraction_each_stage():
    targets = M.schedule(0.99, 7, "exponential")
    density = [1.0] + [1 - t for t in targets]
    ratios = [b / a for a, b in zip(density, density[1:])]
    assert all(abs(r - ratios[0]) < 1e-9 for r in ratios)
    assert targets[-1] == 0.99
    lin = M.schedule(0.9, 3, "linear")
    assert lin == pytest.approx([0.3, 0.6, 0.9])
    with pytest.raises(ValueError, match="stages"):
        M.schedule(0.9, 0)
    with pytest.raises(ValueError, match="schedule"):
        M.schedule(0.9, 3, "cosine")


def test_lap_layer_sparsity_rule():
    model = tiny_mlp()
    rule = M.lap_layer_sparsity(model, tau=2, p=0.0, q=0.5)
    assert rule["1.weight"] == pytest.approx(1 - 0.25)
    assert rule["5.weight"] == pytest.approx(1 - 0.75 ** 2)


def test_apply_is_a_copy_and_forward_is_masked():
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    masks = M.select(mag(model), 0.8)
    pruned = M.apply(model, masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not M.current(model)
    for n, m in masks.items():
        w = pruned.get_submodule(n.rsplit(".", 1)[0]).weight
        assert (w[~m] == 0).all()
    assert M.sparsity(M.current(pruned)) == pytest.approx(M.sparsity(masks))


def test_masks_survive_deepcopy_state_dict_and_files(tmp_path):
    model = tiny_conv()
    masks = M.select(mag(model), 0.6)
    pruned = M.apply(model, masks)
    x = torch.randn(5, 1, 6, 6)
    pruned.eval()
    expected = pruned(x)
    clone = copy.deepcopy(pruned)
    assert torch.equal(clone(x), expected)
    # checkpoint = plain state dict + masks; rebuilt on an unmodified copy of the model
    torch.save(M.dense_state_dict(pruned), tmp_path / "w.pt")
    M.save(masks, tmp_path / "m.safetensors")
    fresh = tiny_conv(seed=123)
    M.load_dense(fresh, torch.load(tmp_path / "w.pt", weights_only=True))
    rebuilt = M.apply(fresh, M.load(tmp_path / "m.safetensors")).eval()
    assert torch.equal(rebuilt(x), expected)
    # torch.save of the parametrized model's state_dict round-trips too
    torch.save(pruned.state_dict(), tmp_path / "sd.pt")
    other = M.apply(tiny_conv(seed=5), {n: torch.ones_like(m) for n, m in masks.items()})
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(other.eval()(x), expected)


def test_torch_prune_interop_roundtrip():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.5)
    exported = M.to_torch_prune(M.apply(model, masks))
    back = M.from_torch_prune(exported)
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    x = torch.randn(4, 12)
    assert torch.allclose(exported(x), M.apply(model, masks)(x))


def test_masks_enforced_after_every_optimizer_step():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.9)
    pruned = M.apply(model, masks)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    violations = []

    def check(m, step):
        for n, mask in masks.items():
            w = m.get_submodule(n.rsplit(".", 1)[0]).weight
            if (w[~mask] != 0).any():
                violations.append((step, n))

    for opt in ("sgd", "adam"):
        fit(pruned, (x, y), recipe=Recipe(optimizer=opt, lr=0.05, epochs=3, batch_size=16,
                                          weight_decay=1e-3), step_callback=check, progress=False)
    assert not violations
    assert M.sparsity(M.current(pruned)) == pytest.approx(M.sparsity(masks))
    baked = M.remove(pruned)
    total = sum(baked.get_submodule(n.rsplit(".", 1)[0]).weight.numel() for n in masks)
    zeros = sum(int((baked.get_submodule(n.rsplit(".", 1)[0]).weight == 0).sum()) for n in masks)
    assert zeros / total >= M.sparsity(masks)


def test_ablations():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.5, scope="layerwise")
    sh = M.shuffle(masks, seed=1)
    for n in masks:
        assert int(sh[n].sum()) == int(masks[n].sum())
    assert any(not torch.equal(sh[n], masks[n]) for n in masks)
    assert all(torch.equal(a, b) for a, b in zip(M.shuffle(masks, 1).values(), sh.values()))
    inv = M.select(M.invert(mag(model)), 0.5, scope="layerwise")
    for n in masks:
        assert not (inv[n] & masks[n]).any()
    pruned = M.apply(model, masks)
    re = M.reinitialize(pruned, seed=3)
    assert M.sparsity(M.current(re)) == M.sparsity(masks)
    assert not torch.equal(re[1].weight, pruned[1].weight)
    assert torch.equal(M.reinitialize(pruned, seed=3)[1].weight, re[1].weight)


def test_density_frame():
    masks = {"a.weight": torch.tensor([True, False]), "b.weight": torch.tensor([True, True])}
    df = M.density(masks)
    assert list(df.layer) == ["a.weight", "b.weight", "total"]
    assert df.density.tolist() == [0.5, 1.0, 0.75]


def reference_select(scores, s, previous):
    """Stable-sort reference: previously pruned first, then by score, ties by index."""
    flat = torch.cat([sc.flatten() for sc in scores.values()]).double()
    prev = torch.cat([previous[n].flatten() for n in scores])
    flat = torch.where(prev, flat, torch.full_like(flat, -math.inf))
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones_like(prev)
    keep[order[:M.n_pruned(s, flat.numel())]] = False
    return keep & prev


@settings(max_examples=150, deadline=None)
@given(layers=score_tensors, s=st.floats(0.0, 0.999), seed=st.integers(0, 10**6),
       dead=st.floats(0.0, 0.95))
def test_select_with_previous_matches_reference(layers, s, seed, dead):
    scores = {f"l{i}.weight": torch.tensor(v) for i, v in enumerate(layers)}
    g = torch.Generator().manual_seed(seed)
    previous = {n: torch.rand(v.shape, generator=g) >= dead for n, v in scores.items()}
    got = torch.cat([m.flatten() for m in M.select(scores, s, previous=previous).values()])
    assert torch.equal(got, reference_select(scores, s, previous))
    ranked = M.Ranking(scores, previous=previous).masks(s)
    assert torch.equal(torch.cat([m.flatten() for m in ranked.values()]), got)


@pytest.mark.parametrize("mechanism", M.MECHANISMS)
def test_reinitialize_draws_from_the_models_own_initialiser(mechanism):
    from prunelab import models

    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(200,), num_classes=10, hidden=(400,), seed=0)
    assert getattr(model, models.INIT_ATTRIBUTE) == "glorot_normal"
    masks = M.select(mag(model), 0.5, scope="layerwise")
    keep = masks["fc1.weight"]

    def drawn(net):  # the re-drawn values: the dense original, or the kept entries
        if mechanism == "parametrize":
            return net.fc1.parametrizations["weight"].original.detach()
        assert (net.fc1.weight[~keep] == 0).all()
        return net.fc1.weight.detach()[keep]

    re = M.reinitialize(M.apply(model, masks, mechanism=mechanism), seed=5)
    assert M.mechanism(re) == mechanism
    # xavier normal: std = sqrt(2 / (fan_in + fan_out)); PyTorch's default (kaiming uniform,
    # a=sqrt(5)) has std 1/sqrt(3 fan_in), clearly different here
    assert float(drawn(re).std()) == pytest.approx((2 / (200 + 400)) ** 0.5, rel=0.03)
    assert float(re.fc1.bias.detach().abs().max()) == 0.0
    assert torch.equal(M.current(re)["fc1.weight"], keep)
    default = M.reinitialize(M.apply(model, masks, mechanism=mechanism), seed=5,
                             init="kaiming_normal")
    assert float(drawn(default).std()) == pytest.approx((2 / 200) ** 0.5, rel=0.03)
    with pytest.raises(ValueError, match="unknown init 'nope'"):
        M.reinitialize(model, init="nope")


# ----------------------------------------------------------------- mechanisms (issue 16, item 3)
from prunelab import _masking  # noqa: E402
from prunelab import graph as G  # noqa: E402

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=1e-2),
}


def effective(model, masks):
    return {n: G.weight(model, n) for n in masks}


def train_steps(model, opt, masks, steps=6, dtype=None, seed=0):
    """``steps`` steps; asserts the pruned entries are exactly 0 after each optimiser step.
    Inputs are in ``dtype``, by default the model's."""
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, w in effective(model, masks).items():
            assert (w[~masks[n]] == 0).all(), n
            assert w[masks[n]].ne(0).all(), n  # kept entries do train


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_pruned_weights_stay_exactly_zero_under_every_optimizer(optimizer, dtype):
    model = tiny_mlp().to(dtype)
    masks = M.select(mag(model), 0.7)
    pruned = M.apply(model, masks)  # default mechanism; the optimiser is made afterwards
    assert M.mechanism(pruned) == "hooks"
    train_steps(pruned, OPTIMIZERS[optimizer](pruned.parameters()), masks, dtype=dtype)
    # a deep copy (tensor hooks are not copied: the first forward re-wires them) and the
    # original, trained further, both stay pruned
    clone = copy.deepcopy(pruned)
    train_steps(clone, OPTIMIZERS[optimizer](clone.parameters()), masks, dtype=dtype, seed=1)
    train_steps(pruned, OPTIMIZERS[optimizer](pruned.parameters()), masks, dtype=dtype, seed=2)
    assert all(torch.equal(M.current(clone)[n], masks[n]) for n in masks)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adamw"])
def test_both_mechanisms_train_to_the_same_weights(optimizer):
    model = tiny_mlp().double()
    masks = M.select(mag(model), 0.6)
    nets = {mech: M.apply(model, masks, mechanism=mech) for mech in M.MECHANISMS}
    for mech, net in nets.items():
        assert M.mechanism(net) == mech
        train_steps(net, OPTIMIZERS[optimizer](net.parameters()), masks, dtype=torch.float64)
    a, b = (effective(nets[m], masks) for m in M.MECHANISMS)
    for n in masks:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-14)
    assert list(nets["hooks"].state_dict()) == list(model.state_dict())  # plain keys


def test_hooks_mechanism_keeps_names_identity_and_plain_state_dict():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.5)
    before = {n: p for n, p in model.named_parameters()}
    M.apply(model, masks, inplace=True)
    assert {n: p for n, p in model.named_parameters()} == before  # same objects, plain names
    plain = tiny_mlp(seed=3)
    plain.load_state_dict(model.state_dict())  # strict: no extra keys
    x = torch.randn(5, 12)
    assert torch.equal(plain(x), model(x))
    assert not G.is_masked(plain) and G.is_masked(model)
    assert G.is_parametrized is G.is_masked
    baked = M.remove(model, inplace=True)
    assert baked is model and not G.is_masked(model) and not M.current(model)
    assert {n: p for n, p in model.named_parameters()} == before
    assert all(not m._forward_pre_hooks and not m._load_state_dict_post_hooks
               for m in model.modules())


def test_loading_dense_weights_keeps_the_model_pruned_but_a_manual_write_does_not():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.8)
    pruned = M.apply(model, masks)
    pruned.load_state_dict(model.state_dict())  # dense weights in: re-zeroed by a load hook
    assert all((w[~masks[n]] == 0).all() for n, w in effective(pruned, masks).items())
    M.load_dense(pruned, model.state_dict())
    assert all((w[~masks[n]] == 0).all() for n, w in effective(pruned, masks).items())
    # documented limitation of the hooks mechanism: a raw in-place write is not undone ...
    with torch.no_grad():
        pruned[1].weight.copy_(model[1].weight)
    assert (pruned[1].weight[~masks["1.weight"]] != 0).any()
    # ... write_weight (or re-applying the masks) is the way to write into a masked weight
    M.write_weight(pruned[1], "weight", model[1].weight)
    assert (pruned[1].weight[~masks["1.weight"]] == 0).all()
    # parametrize re-masks at every forward: its effective weight ignores the original's zeros
    par = M.apply(model, masks, mechanism="parametrize")
    assert (par[1].parametrizations["weight"].original[~masks["1.weight"]] != 0).any()
    assert (par[1].weight[~masks["1.weight"]] == 0).all()


def test_masks_survive_pickle_dtype_change_and_unfreezing(tmp_path):
    model = tiny_mlp()
    masks = M.select(mag(model), 0.7)
    pruned = M.apply(model, masks)
    torch.save(pruned, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    train_steps(loaded, OPTIMIZERS["adam"](loaded.parameters()), masks)
    doubled = copy.deepcopy(pruned).double()
    assert all(b.dtype == torch.float64 for m in doubled.modules() for b in m.buffers())
    train_steps(doubled, OPTIMIZERS["sgd-momentum"](doubled.parameters()), masks,
                dtype=torch.float64)
    frozen = copy.deepcopy(pruned).requires_grad_(False)
    frozen(torch.randn(2, 12))  # a forward while frozen: no hook can be registered yet
    frozen.requires_grad_(True)
    train_steps(frozen, OPTIMIZERS["rmsprop"](frozen.parameters()), masks)


def test_swap_mode_conversion_rewires_the_gradient_hook():
    model = M.apply(tiny_mlp(), M.select(mag(tiny_mlp()), 0.5))
    masks = M.current(model)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    train_steps(model, OPTIMIZERS["sgd-momentum"](model.parameters()), masks,
                dtype=torch.float64)


def test_switching_mechanisms_and_exports_keep_the_masks():
    model = tiny_mlp()
    masks = M.select(mag(model), 0.6)
    hooked = M.apply(model, masks)
    par = M.to_parametrize(hooked)
    assert M.mechanism(par) == "parametrize" and M.mechanism(hooked) == "hooks"
    back = M.apply(par, M.current(par))
    assert M.mechanism(back) == "hooks"
    x = torch.randn(7, 12)
    for net in (par, back, M.to_torch_prune(hooked), G.plain_copy(hooked), M.remove(par)):
        assert torch.equal(net(x), hooked(x))
    for net in (par, back):
        assert all(torch.equal(M.current(net)[n], masks[n]) for n in masks)
    assert torch.equal(M.from_torch_prune(M.to_torch_prune(hooked))["3.weight"], masks["3.weight"])
    imported = M.import_torch_prune(M.to_torch_prune(par))
    assert M.mechanism(imported) == "hooks" and torch.equal(imported(x), hooked(x))
    plain = G.plain_copy(hooked)
    assert not G.is_masked(plain) and not any(_masking.names(m) for m in plain.modules())
    with pytest.raises(ValueError, match="mechanism must be one of"):
        M.apply(model, masks, mechanism="prune")


def test_any_parameter_name_can_be_held_masked():
    """Keyed by (module, tensor name): e.g. ``in_proj_weight`` of nn.MultiheadAttention."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    keep = torch.rand(attn.in_proj_weight.shape) > 0.5
    _masking.attach(attn, "in_proj_weight", keep)
    assert set(M.current(attn)) == {"in_proj_weight"}
    opt = torch.optim.AdamW(attn.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(4):
        x = torch.randn(3, 5, 8)
        opt.zero_grad()
        attn(x, x, x)[0].square().mean().backward()
        opt.step()
        assert (attn.in_proj_weight[~keep] == 0).all()
    assert (copy.deepcopy(attn).in_proj_weight[~keep] == 0).all()
    M.remove(attn, inplace=True)
    assert not M.current(attn) and not G.is_masked(attn)


def test_masked_models_from_prune_use_hooks_and_fine_tune_exactly_sparse():
    import prunelab as pl

    model = tiny_mlp()
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    result = pl.prune(model, "mp", sparsity=0.8)
    assert M.mechanism(result.model) == "hooks" and not G.is_masked(model)
    # the caller's model gets no buffers and no hooks, on modules or on parameters
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._load_state_dict_post_hooks
               for m in model.modules())
    masks = result.masks
    fit(result.model, (x, y), recipe=Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=16,
                                            weight_decay=1e-3), progress=False)
    assert all((w[~masks[n]] == 0).all() for n, w in effective(result.model, masks).items())
