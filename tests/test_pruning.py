"""The pruning loop: stages, schedules, λ, validation, and never touching the caller's model."""
import copy
import math

import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import masks as M
from prunelab.train import Recipe


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 4))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return x, y


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stages_history_and_exact_sparsity(data):
    model = tiny()
    before = state(model)
    r = pl.prune(model, "mp", sparsity=0.9, stages=4, schedule="exponential", batch=data)
    assert same(before, state(model))  # inplace=False by default
    h = r.history
    assert list(h.columns) == ["stage", "target_sparsity", "sparsity", "loss", "delta_loss",
                               "step_norm", "seconds", "examples"]
    assert list(h.stage) == [1, 2, 3, 4]
    d = sum(m.numel() for m in r.masks.values())
    for target, actual in zip(h.target_sparsity, h.sparsity):
        assert actual == pytest.approx(M.n_pruned(target, d) / d)
    assert h.sparsity.iloc[-1] == pytest.approx(M.n_pruned(0.9, d) / d)
    assert (h.delta_loss >= 0).all() and (h.step_norm > 0).all()
    assert M.sparsity(M.current(r.model)) == pytest.approx(h.sparsity.iloc[-1])
    x, y = data
    assert r.history.loss.iloc[-1] == pytest.approx(pl.metrics.loss(r.model, data), rel=1e-6)
    assert pl.metrics.delta_loss(model, r.model, data) == pytest.approx(h.delta_loss.iloc[-1],
                                                                       rel=1e-6)


def test_pruned_stays_pruned_across_stages(data):
    r1 = pl.prune(tiny(), "random", sparsity=0.5, stages=1, seed=1)
    r2 = pl.prune(r1.model, "random", sparsity=0.8, stages=3, seed=2)
    for n in r1.masks:
        assert not (r2.masks[n] & ~r1.masks[n]).any()
    with pytest.raises(ValueError, match="already has sparsity"):
        pl.prune(r2.model, "mp", sparsity=0.5)


def test_linear_schedule_prunes_equal_counts(data):
    r = pl.prune(tiny(), "mp", sparsity=0.6, stages=3, schedule="linear")
    d = sum(m.numel() for m in r.masks.values())
    pruned = [round(s * d) for s in r.history.sparsity]
    steps = [b - a for a, b in zip([0] + pruned, pruned)]
    assert max(steps) - min(steps) <= 1


def test_huge_lambda_gives_magnitude_mask(data):
    model = tiny()
    mp = pl.prune(model, "mp", sparsity=0.7, batch=data)
    for crit in ("random",):
        r = pl.prune(model, crit, sparsity=0.7, lam=1e12, batch=data)
        assert all(torch.equal(r.masks[n], mp.masks[n]) for n in mp.masks)


def test_lambda_adds_half_lambda_theta_squared(data):
    model = tiny()
    base = pl.score(model, "random", seed=3)
    pen = pl.score(model, "random", seed=3, lam=0.5)
    for n, w in pl.graph.weights(model).items():
        # scores are float32 whatever the model's dtype (criteria.check_scores)
        assert torch.allclose(pen[n], base[n] + 0.25 * w.detach().float() ** 2)


BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=math.nan), "sparsity"),
    (dict(sparsity=0.5, stages=0), "stages"),
    (dict(sparsity=0.5, stages=2.5), "stages"),
    (dict(sparsity=0.5, lam=-1.0), "lam"),
    (dict(sparsity=0.5, lam=math.inf), "lam"),
    (dict(sparsity=0.5, schedule="cosine"), "schedule"),
    (dict(sparsity=0.5, scope="layer"), "scope"),
    (dict(layer_sparsity={"nope.weight": 0.5}), "nope.weight"),
    (dict(layer_sparsity={"1.weight": 1.5}), "1.weight"),
    (dict(), "sparsity"),
    (dict(sparsity=0.5, finetune=Recipe()), "train_data"),
]


@pytest.mark.parametrize("kwargs,word", BAD)
def test_invalid_input_raises_and_leaves_model(kwargs, word, data):
    model = tiny()
    before = state(model)
    with pytest.raises(ValueError, match=word):
        pl.prune(model, "mp", batch=data, **kwargs)
    assert same(before, state(model))


def test_unknown_criterion_and_missing_batch(data):
    model = tiny()
    with pytest.raises(ValueError, match="valid names"):
        pl.prune(model, "magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match="'snip'.*batch"):
        pl.prune(model, "snip", sparsity=0.5)
    with pytest.raises(ValueError, match="valid names"):
        pl.score(model, "nope")


def test_nan_weights_rejected_and_model_unchanged(data):
    model = tiny()
    with torch.no_grad():
        model[3].weight[0, 0] = math.nan
    before = state(model)
    with pytest.raises(ValueError, match="3.weight"):
        pl.prune(model, "mp", sparsity=0.5)
    with pytest.raises(ValueError, match="3.weight"):
        pl.score(model, "mp")
    assert all(torch.equal(before[k], v) or torch.isnan(v).any() for k, v in state(model).items())


def test_inplace_prunes_the_model_itself(data):
    model = tiny()
    r = pl.prune(model, "mp", sparsity=0.5, inplace=True)
    assert r.model is model
    assert M.sparsity(M.current(model)) == pytest.approx(0.5, abs=1e-3)


def test_finetune_keeps_exact_sparsity(data):
    model = tiny()
    recipe = Recipe(optimizer="sgd", lr=0.1, epochs=2, batch_size=50)
    r = pl.prune(model, "mp", sparsity=0.8, stages=2, batch=data, finetune=recipe,
                 train_data=data, finetune_stages=True)
    assert r.finetune is not None and len(r.finetune.history) == 2
    effective = pl.graph.weights(r.model)
    for n, m in r.masks.items():
        assert (effective[n][~m] == 0).all()
    assert M.sparsity(r.masks) == pytest.approx(0.8, abs=1e-2)


def test_callback_can_stop_early(data):
    r = pl.prune(tiny(), "mp", sparsity=0.9, stages=10, callback=lambda row: row["stage"] == 3)
    assert r.interrupted and len(r.history) == 3


def test_score_honours_attached_masks_and_leaves_model(data):
    model = tiny()
    pruned = pl.prune(model, "mp", sparsity=0.5).model
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    s = pl.score(pruned, "mp")
    for n, m in M.current(pruned).items():
        assert (s[n][~m] == 0).all()
    after = pruned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    pruned(torch.randn(2, 10))  # still usable: scoring did not strip its masks


def test_same_seed_same_masks(data):
    a = pl.prune(tiny(), "random", sparsity=0.7, stages=3, seed=4)
    b = pl.prune(tiny(), "random", sparsity=0.7, stages=3, seed=4)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


@pytest.mark.parametrize("crit", ["lm", "qm", "snip"])
def test_stage_losses_match_a_direct_measurement(crit, data):
    r = pl.prune(tiny(), crit, sparsity=0.8, stages=4, batch=data)
    replay = pl.prune(tiny(), crit, sparsity=0.8, stages=4, batch=data, callback=lambda row: None)
    assert r.history.loss.tolist() == pytest.approx(replay.history.loss.tolist(), rel=1e-5)
    assert r.history.delta_loss.notna().all()


def test_obs_update_is_applied_to_the_kept_weights(data):
    # L-OBS minimises each layer's output reconstruction error (checked in test_obs.py); here we
    # check that the engine applies the update: same masks, kept weights moved, pruned exactly 0.
    model = tiny()
    with_update = pl.prune(model, "obs", sparsity=0.5, scope="layerwise", batch=data)
    without = pl.prune(model, "obs", sparsity=0.5, scope="layerwise", batch=data, obs_update=False)
    for n, m in without.masks.items():
        assert torch.equal(with_update.masks[n], m)
        w_up, w_plain = pl.graph.weight(with_update.model, n), pl.graph.weight(without.model, n)
        assert (w_up[~m] == 0).all() and (w_plain[~m] == 0).all()
        assert not torch.allclose(w_up[m], w_plain[m])
    assert torch.equal(pl.graph.weight(model, "1.weight"), tiny().get_submodule("1").weight)


def _interrupt_at(stage):
    def callback(row):
        if row["stage"] == stage:
            raise KeyboardInterrupt  # Jupyter's Interrupt during stage 3
    return callback


def test_interrupt_propagates_and_leaves_the_caller_model(data):
    model = tiny()
    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        pl.prune(model, "mp", sparsity=0.9, stages=10, batch=data, inplace=True,
                 callback=_interrupt_at(3))
    assert same(before, state(model)) and not M.current(model)


def test_interrupt_returns_partial_result_with_on_interrupt_return(data):
    model = tiny()
    r = pl.prune(model, "mp", sparsity=0.9, stages=10, batch=data, callback=_interrupt_at(3),
                 on_interrupt="return")
    assert r.interrupted and len(r.history) == 3 and r.finetune is None
    assert M.sparsity(r.masks) == pytest.approx(r.history["sparsity"].iloc[-1])
    with pytest.raises(ValueError, match="on_interrupt"):
        pl.prune(tiny(), "mp", sparsity=0.5, on_interrupt=False)


def test_interrupt_during_stage_finetuning_stops_pruning(data, monkeypatch):
    import prunelab.train as T
    recipe = Recipe(optimizer="sgd", lr=0.1, epochs=2, batch_size=50)
    calls = []

    def step_callback(model, step):
        calls.append(step)
        raise KeyboardInterrupt
    real_fit = pl.pruning.fit
    monkeypatch.setattr(pl.pruning, "fit", lambda *a, **k: real_fit(*a, **k,
                                                                     step_callback=step_callback))
    with pytest.raises(KeyboardInterrupt):
        pl.prune(tiny(), "mp", sparsity=0.8, stages=3, batch=data, finetune=recipe,
                 train_data=data, finetune_stages=True)
    assert len(calls) == 1  # the next stages did not run
    r = pl.prune(tiny(), "mp", sparsity=0.8, stages=3, batch=data, finetune=recipe,
                 train_data=data, finetune_stages=True, on_interrupt="return")
    assert r.interrupted and len(r.history) == 0 and len(calls) == 2 and T.fit is real_fit


def test_prune_result_has_a_short_repr_and_an_html_history(data):
    r = pl.prune(tiny(), "lm", sparsity=0.9, stages=4, batch=data)
    text = repr(r)
    assert len(text) < 200, text
    loss0, last = r.extra["loss0"], r.history["loss"].iloc[-1]
    assert text == (f"PruneResult(criterion='lm', sparsity={M.sparsity(r.masks):.4g} (target 0.9), "
                    f"stages=4/4, loss={loss0:.4g} → {last:.4g}, interrupted=False)")
    html = r._repr_html_()
    assert "PruneResult" in html and "history (per stage)" in html
    assert html.count("<tr>") == 5 + 4  # summary rows, one history row a stage
    stopped = pl.prune(tiny(), "mp", sparsity=0.9, stages=10, callback=lambda row: True)
    assert repr(stopped).endswith("stages=1/10, interrupted=True)")


def _reference_lm_stages(model, x, y, sparsity, stages, schedule, lam, signed, masks=None):
    """LM paper Algorithm 1 with the lm criterion, written out slowly: at every stage the
    gradient of the mean cross-entropy of the masked model, scores |g·θ| (or −g·θ) + λ/2·θ²,
    one stable ascending sort over all weights with the pruned ones first (ties by global
    index), the n_pruned(target) lowest pruned, pruned stays pruned, pruned weights zeroed.
    Returns the final masks, the step norms ‖Δθ‖ per stage and the number of stages whose cut
    fell inside a run of ties."""
    model = copy.deepcopy(model)
    names = pl.graph.prunable_names(model)
    ws = [pl.graph.weight(model, n) for n in names]
    keep = torch.cat([(masks[n] if masks and n in masks else torch.ones_like(w, dtype=torch.bool))
                      .flatten() for n, w in zip(names, ws)])
    with torch.no_grad():
        for w, m in zip(ws, keep.split([w.numel() for w in ws])):
            w.mul_(m.view_as(w))
    start = 1 - int(keep.sum()) / keep.numel()
    tie_cuts, step_norms = 0, []
    for target in pl.selection.schedule(sparsity, stages, schedule, start=start):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), ws)
        parts = []
        for w, g in zip(ws, grads):
            change = -(g * w).detach()
            s = (change if signed else change.abs()).float()
            if lam > 0:
                s = s + 0.5 * lam * w.detach().float() ** 2
            parts.append(s.flatten())
        flat = torch.where(keep, torch.cat(parts).double(), -math.inf)
        k = M.n_pruned(target, flat.numel())
        order = torch.sort(flat, stable=True).indices
        if 0 < k < flat.numel() and flat[order[k - 1]] == flat[order[k]] > -math.inf:
            tie_cuts += 1
        cut = torch.ones_like(keep)
        cut[order[:k]] = False
        theta = torch.cat([w.detach().flatten() for w in ws]).double()
        step_norms.append(float(theta[keep & ~cut].square().sum().sqrt()))  # ‖Δθ‖, Δθ = −θ
        keep &= cut
        with torch.no_grad():
            for w, m in zip(ws, keep.split([w.numel() for w in ws])):
                w.mul_(m.view_as(w))
    return dict(zip(names, (m.view_as(w) for m, w in zip(keep.split([w.numel() for w in ws]),
                                                           ws)))), step_norms, tie_cuts


@pytest.mark.parametrize("case", [
    dict(stages=140, schedule="exponential", sparsity=0.99, lam=0.0, signed=False),
    dict(stages=60, schedule="linear", sparsity=0.95, lam=1e-2, signed=True),
    dict(stages=30, schedule="exponential", sparsity=0.9, lam=0.0, signed=False, masked=True,
         dtype=torch.float64),
])
def test_many_stages_give_the_masks_of_a_straightforward_loop(case):
    # The MLP of the LM paper on 14x14 inputs: ~90k weights, above the selection's sampled
    # bracket (StagedSelection.BRACKET_MIN) in the early stages. Blank border rows (as in
    # MNIST) give their weights zero gradients: thousands of scores tied at 0, cut by index.
    case = dict(case)
    dtype, masked = case.pop("dtype", torch.float32), case.pop("masked", False)
    model = pl.models.build("mlp", input_shape=(1, 14, 14), num_classes=10, seed=0).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 14, 14, generator=g, dtype=dtype)
    x[:, :, :4] = 0
    y = torch.randint(0, 10, (200,), generator=g)
    masks = None
    if masked:  # masks attached before: what they prune stays pruned
        masks = {n: torch.rand(w.shape, generator=g) > 0.3
                 for n, w in pl.graph.weights(model).items()}
        model = M.apply(model, masks)
    r = pl.prune(model, "lm", batch=(x, y), **case)
    plain = M.remove(model) if masked else model
    ref, step_norms, tie_cuts = _reference_lm_stages(plain, x, y, masks=masks, **case)
    for n in ref:
        assert torch.equal(r.masks[n], ref[n]), n
        if masks:
            assert not (r.masks[n] & ~masks[n]).any()
    assert r.history.sparsity.iloc[-1] == M.sparsity(ref)
    assert r.history.step_norm.tolist() == pytest.approx(step_norms, rel=1e-5, abs=1e-9)
    if case["lam"] == 0:  # (λ/2·θ² separates the zero-gradient weights)
        assert tie_cuts > 0  # the index tie-break decided some stages


def test_interrupt_inside_a_stage_returns_the_masks_of_the_stage_before(data, monkeypatch):
    # Interrupted after stage 3 chose its masks but before it finished (zeroing the weights):
    # the result is that of stage 2, as when the stage's masks were not yet taken over.
    stopped = pl.prune(tiny(), "lm", sparsity=0.9, stages=10, batch=data,
                       callback=lambda row: row["stage"] == 2)
    real_select, real_weight = pl.selection.StagedSelection.select, pl.pruning.G.weight
    calls = []

    def select(self, *a, **k):
        calls.append(1)
        return real_select(self, *a, **k)

    def weight(model, name):
        if len(calls) == 3 and not raised:
            raised.append(name)
            raise KeyboardInterrupt
        return real_weight(model, name)
    raised = []
    monkeypatch.setattr(pl.selection.StagedSelection, "select", select)
    monkeypatch.setattr(pl.pruning.G, "weight", weight)
    r = pl.prune(tiny(), "lm", sparsity=0.9, stages=10, batch=data, on_interrupt="return")
    monkeypatch.undo()
    assert r.interrupted and len(r.history) == 2 and len(calls) == 3 and raised
    for n in stopped.masks:
        assert torch.equal(r.masks[n], stopped.masks[n])
    assert M.sparsity(r.masks) == pytest.approx(r.history["sparsity"].iloc[-1])
