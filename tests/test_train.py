"""Training loops: determinism, early stopping, evaluation, recipes."""
import pytest
import torch
from torch import nn

from prunelab.train import Recipe, evaluate, finetune, fit


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_same_seed_same_weights_bit_for_bit(data):
    rec = Recipe(optimizer="sgd", lr=0.05, epochs=3, batch_size=32, weight_decay=1e-4)
    a, b = model(), model()
    fit(a, data, recipe=rec, seed=7, progress=False)
    fit(b, data, recipe=rec, seed=7, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = model()
    fit(c, data, recipe=rec, seed=8, progress=False)
    assert not torch.equal(a[1].weight, c[1].weight)


def test_fit_learns_and_history_is_tidy(data):
    m = model()
    before = evaluate(m, data)["loss"]
    res = fit(m, data, recipe=Recipe(lr=1e-2, epochs=5, batch_size=32), val=data, progress=False)
    assert list(res.history.columns) == ["epoch", "step", "lr", "train_loss", "train_accuracy",
                                         "val_loss", "val_accuracy", "seconds"]
    assert len(res.history) == 5 and evaluate(m, data)["loss"] < before


def test_early_stopping_restores_best(data):
    m = model()
    x, y = data
    noisy_val = (x[:50], torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(0)))
    res = fit(m, data, recipe=Recipe(lr=0.05, epochs=40, batch_size=16, patience=2),
              val=noisy_val, progress=False)
    assert res.stopped_early
    best = res.history.val_loss.min()
    assert evaluate(m, noisy_val)["loss"] == pytest.approx(best, rel=1e-5)


def test_step_schedule_and_max_steps(data):
    m = model()
    res = fit(m, data, recipe=Recipe(optimizer="sgd", lr=0.1, epochs=4, batch_size=100,
                                     milestones=(2,), gamma=0.1), progress=False)
    assert res.history.lr.tolist() == pytest.approx([0.1, 0.01, 0.01, 0.01])
    res = fit(model(), data, recipe=Recipe(epochs=10, batch_size=100, max_steps=5), progress=False)
    assert res.history.step.iloc[-1] == 5


def test_finetune_copies_by_default(data):
    m = model()
    w = m[1].weight.clone()
    res = finetune(m, data, recipe=Recipe(epochs=1), progress=False)
    assert torch.equal(m[1].weight, w) and res.model is not m


@pytest.mark.parametrize("bad", [dict(optimizer="rmsprop"), dict(lr=0), dict(lr=float("nan")),
                                 dict(weight_decay=-1), dict(patience=0), dict(epochs=0)])
def test_bad_recipes(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        Recipe(**bad)


def test_recipe_roundtrip():
    r = Recipe(optimizer="sgd", milestones=(3, 6))
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.from_dict({"lr": 1, "nope": 2})


def test_early_stopping_needs_val(data):
    with pytest.raises(ValueError, match="validation"):
        fit(model(), data, recipe=Recipe(patience=2), progress=False)


# ------------------------------------------------------------ regularizer (polarization etc.)

def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_regularizer_none_is_bit_identical_to_no_regularizer(data):
    rec = Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=32, weight_decay=1e-4)
    a, b = model(), model()
    ra = fit(a, data, recipe=rec, seed=3, val=data, progress=False)
    rb = fit(b, data, recipe=rec, seed=3, val=data, progress=False, regularizer=None)
    assert _same_weights(a, b)
    cols = [c for c in ra.history.columns if c != "seconds"]
    assert list(ra.history.columns) == list(rb.history.columns)
    assert ra.history[cols].equals(rb.history[cols])


def test_regularizer_gradient_enters_the_step(data):
    # (wd/2)·Σθ² as a regularizer is SGD's weight_decay=wd
    wd = 1e-2
    a, b = model(), model()
    fit(a, data, recipe=Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=32,
                               weight_decay=wd), progress=False)
    fit(b, data, recipe=Recipe(optimizer="sgd", lr=0.05, epochs=2, batch_size=32),
        progress=False,
        regularizer=lambda m: 0.5 * wd * sum((p ** 2).sum() for p in m.parameters()))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[1].weight, model()[1].weight)


def test_train_loss_stays_the_data_loss_with_a_regularizer(data):
    rec = Recipe(lr=1e-2, epochs=2, batch_size=32)
    a, b = model(), model()
    ra = fit(a, data, recipe=rec, progress=False)
    rb = fit(b, data, recipe=rec, progress=False, regularizer=lambda m: torch.tensor(100.0))
    assert _same_weights(a, b)  # a constant adds no gradient
    assert rb.history.train_loss.tolist() == ra.history.train_loss.tolist()
    assert list(rb.history.columns) == ["epoch", "step", "lr", "train_loss", "train_accuracy",
                                        "train_regularizer", "seconds"]
    assert rb.history.train_regularizer.tolist() == [100.0, 100.0]
    with pytest.raises(ValueError, match="scalar tensor"):
        fit(model(), data, recipe=rec, progress=False, regularizer=lambda m: torch.ones(2))


def test_recipe_total_steps_counts_what_fit_runs():
    import math

    assert Recipe(batch_size=100, epochs=3).total_steps(997) == 30  # ceil(997/100) = 10 a epoch
    assert Recipe(batch_size=100, epochs=3, max_steps=7).total_steps(997) == 7
    assert Recipe(batch_size=64, epochs=2, max_steps=1000).total_steps(100) == 4
    for n, bs, ep in ((1, 1, 1), (65, 64, 5), (1000, 1000, 2)):
        assert Recipe(batch_size=bs, epochs=ep).total_steps(n) == math.ceil(n / bs) * ep
    x, y = torch.randn(37, 3), torch.randint(0, 2, (37,))
    model = torch.nn.Linear(3, 2)
    steps = []
    recipe = Recipe(lr=1e-3, batch_size=8, epochs=2)
    fit(model, (x, y), recipe=recipe, progress=False, step_callback=lambda m, s: steps.append(s))
    assert len(steps) == recipe.total_steps(37)


def _interrupt_at(step_no):
    def step_callback(model, step):
        if step == step_no:
            raise KeyboardInterrupt  # Jupyter's Interrupt after this optimiser step
    return step_callback


def test_interrupt_propagates_and_keeps_the_weights_reached(data):
    rec = Recipe(optimizer="sgd", lr=0.05, epochs=3, batch_size=32)
    m = model()
    with pytest.raises(KeyboardInterrupt):
        fit(m, data, recipe=rec, seed=3, progress=False, step_callback=_interrupt_at(4))
    assert not m.training  # cleaned up: eval mode
    ref = model()  # the same 4 steps, run to the end of max_steps=4
    fit(ref, data, recipe=Recipe(optimizer="sgd", lr=0.05, epochs=3, batch_size=32, max_steps=4),
        seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(),
                                                 ref.state_dict().values()))


def test_interrupt_returns_with_on_interrupt_return(data):
    rec = Recipe(optimizer="sgd", lr=0.05, epochs=3, batch_size=32)
    m = model()
    res = fit(m, data, recipe=rec, val=data, seed=3, progress=False,
              step_callback=_interrupt_at(20), on_interrupt="return")
    assert res.interrupted and res.model is m and len(res.history) == 1  # epoch 1 had 10 steps
    with pytest.raises(ValueError, match="on_interrupt.*'ignore'"):
        fit(model(), data, recipe=rec, progress=False, on_interrupt="ignore")


def test_evaluate_returns_a_dict_that_renders(data):
    import json
    import pickle

    from prunelab.results import Summary

    m = model()
    ev = evaluate(m, data)
    assert isinstance(ev, dict) and isinstance(ev, Summary)
    plain = dict(ev)
    assert ev == plain and set(plain) == {"loss", "accuracy", "error", "n"}
    assert ev["error"] == pytest.approx(1 - ev["accuracy"]) and ev["n"] == 300
    assert repr(ev) == (f"Evaluation(loss={ev['loss']:.4g}, accuracy={ev['accuracy']:.4g}, "
                        f"error={ev['error']:.4g}, n=300)")
    html = ev._repr_html_()
    assert html.count("<tr>") == 4 and "Evaluation" in html
    assert json.loads(json.dumps(ev)) == plain
    again = pickle.loads(pickle.dumps(ev))
    assert again == ev and repr(again) == repr(ev)


def test_fit_result_has_a_short_repr_and_an_html_history(data):
    res = fit(model(), data, recipe=Recipe(lr=1e-2, epochs=3, batch_size=100), val=data,
              progress=False)
    text = repr(res)
    h = res.history
    assert text.startswith("FitResult(epochs=3, steps=9, train_loss=") and len(text) < 200
    assert f"{h.train_loss.iloc[0]:.4g} → {h.train_loss.iloc[-1]:.4g}" in text
    assert "interrupted=False" in text and "stopped_early=False" in text
    html = res._repr_html_()
    # summary rows, then one history row an epoch
    assert "history (per epoch)" in html and html.count("<tr>") == 7 + 3
