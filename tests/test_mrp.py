"""The MRP penalty study (penalties during training, layer sets, bp pairs): prunelab.mrp."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab import models, mrp, units


from tests.unit_models import CONV_BATCH, MLP_BATCH  # noqa: E402
from tests.unit_models import batch as _batch  # noqa: E402
from tests.unit_models import conv as _conv  # noqa: E402
from tests.unit_models import mlp as _mlp  # noqa: E402
from tests.unit_models import same_state as _same_state  # noqa: E402
from tests.unit_models import state as _state  # noqa: E402


# ------------------------------------------------------- PenaltyRecorder (MRP Sec. 4.1-4.4)

def _digits_run(recorder, seed=0):
    import prunelab as pl
    from prunelab import train

    torch.set_num_threads(1)
    bundle = pl.data.load("digits")
    model = models.build("mlp", bundle, hidden=(32, 16), activation="relu", seed=seed)
    train.fit(model, bundle.train.tensors,
              recipe=train.Recipe(lr=1e-2, epochs=4, batch_size=64), progress=False,
              step_callback=recorder, seed=seed)
    return model


@pytest.fixture(scope="module")
def recorded():
    import prunelab as pl

    sample = pl.data.load("digits").batch("train", 200, seed=1)
    rec = mrp.PenaltyRecorder(sample, every=8, fraction=0.25, finetune_steps=3,
                                finetune_lr=0.05)
    model = _digits_run(rec)
    return rec, model


def test_recorder_rows_for_every_tag_at_each_measurement(recorded):
    rec, _ = recorded
    f = rec.frame()
    assert list(f.columns) == mrp.PenaltyRecorder.COLUMNS
    steps = sorted(f.step.unique())
    assert steps == list(range(8, 8 * len(steps) + 1, 8)) and len(steps) == 8  # 64 steps
    for step, g in f.groupby("step"):
        assert sorted(g.score) == sorted(units.SCORES)
    assert (f.bp == f.score.str.startswith("bp_")).all()
    assert (f.layers == "fc1,fc2").all()
    assert (f.pruned == 8 + 4).all() and (f.units == 32 + 16).all()
    assert f[["penalty", "penalty_ft", "loss_dense"]].notna().all().all()
    assert (f.penalty - (f.loss_pruned - f.loss_dense)).abs().max() < 1e-12
    # the dense loss is the same for every tag at one measurement
    assert (f.groupby("step").loss_dense.nunique() == 1).all()


def test_recorder_does_not_perturb_training(recorded):
    _, model = recorded
    plain = _digits_run(None)
    a, b = model.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recorder_leaves_model_mode_grads_and_rng_alone():
    model = _mlp()
    model.train()
    F.cross_entropy(model(MLP_BATCH[0]), MLP_BATCH[1]).backward()
    state, grads = _state(model), [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    rec = mrp.PenaltyRecorder(MLP_BATCH, every=2, fraction=0.25, finetune_steps=2)
    rec(model, 1)
    assert rec.frame().empty
    rec(model, 2)
    assert len(rec.frame()) == 12
    assert model.training and _same_state(model, state)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)


def test_recorder_consistency_monotone_and_rand_least_consistent(recorded):
    rec, _ = recorded
    c = rec.consistency()
    assert list(c.columns) == ["step", "score", "fraction_ever_selected"]
    assert ((c.fraction_ever_selected >= 0) & (c.fraction_ever_selected <= 1)).all()
    for tag, g in c.groupby("score"):
        v = g.sort_values("step").fraction_ever_selected.to_numpy()
        assert (v[1:] >= v[:-1]).all(), tag
        assert v[0] == pytest.approx(12 / 48)  # first measurement: exactly the pruned units
    last = c[c.step == c.step.max()].set_index("score").fraction_ever_selected
    assert last["rand"] > last["abs_mrs"]
    # agrees with the accumulated sets in recorder.selected
    for tag in units.SCORES:
        n = sum(len(s) for s in rec.selected[tag].values())
        assert last[tag] == pytest.approx(n / 48)
    by_layer = rec.consistency(by_layer=True)
    assert set(by_layer.layer) == set(rec.selected["rand"])
    late = rec.consistency(since=40)
    assert late.step.min() == 40
    late_last = late[late.step == late.step.max()].set_index("score").fraction_ever_selected
    assert (late_last <= last[late_last.index] + 1e-12).all()  # fewer measurements, fewer units


def test_recorder_mean_replacement_lowers_mean_penalty(recorded):
    rec, _ = recorded
    mean = rec.frame().groupby("score").penalty.mean()
    wins = sum(mean[f"bp_{s}"] < mean[s] for s in units.BASE_SCORES)
    assert wins >= 4, mean.to_dict()  # majority of the 6 base scores (6/6 in practice)


def test_penalty_profile_one_curve_per_tag(recorded):
    rec, _ = recorded
    for value in ("penalty", "penalty_ft"):
        p = mrp.penalty_profile(rec.frame(), value=value)
        assert sorted(p.method.unique()) == sorted(units.SCORES)
        assert ((p.fraction >= 0) & (p.fraction <= 1)).all()
        assert (p.groupby("method").size() == 101).all()
        assert (p[p.tau == 1.0].fraction == 0).all()


def test_recorder_subset_of_scores_and_layers_and_validation():
    rec = mrp.PenaltyRecorder(MLP_BATCH, every=1, fraction=0.25, scores=["rand", "bp_norm"],
                                layers="fc1")
    model = _mlp()
    rec(model, 1)
    rec(model, 2)
    f = rec.frame()
    assert list(f.score) == ["rand", "bp_norm"] * 2 and (f.layers == "fc1").all()
    assert f.penalty_ft.isna().all()
    # rand draws a new set at each measurement (seed + step)
    picks = [p for s, t, p in rec.history if t == "rand"]
    assert picks[0] != picks[1]
    assert set(rec.selected["rand"]["fc1"]) == set(picks[0]["fc1"]) | set(picks[1]["fc1"])
    for bad in (dict(every=0), dict(fraction=1.0), dict(scores=["nope"]),
                dict(finetune_steps=-1), dict(finetune_lr=0.0)):
        with pytest.raises(ValueError):
            mrp.PenaltyRecorder(MLP_BATCH, **bad)


def test_recorder_rows_equal_independent_prune_calls():
    # the recorder shares one forward/backward across the 12 scores; each row must equal a
    # separate units.prune call on the same model
    model = _conv(bn=True).eval()
    rec = mrp.PenaltyRecorder(CONV_BATCH, every=1, fraction=0.25)
    rows = {r["score"]: r for r in rec.measure(model, 3)}
    dense = mrp._loss(model, CONV_BATCH, F.cross_entropy)
    for tag in units.SCORES:
        res = units.prune(model, fraction=0.25, score=tag, batch=CONV_BATCH, seed=3)
        pen = mrp._loss(res.model, CONV_BATCH, F.cross_entropy) - dense
        assert rows[tag]["penalty"] == pytest.approx(pen, abs=1e-12), tag


def test_layer_sets_of_conv_and_mlp():
    conv = _conv()
    sets = mrp.layer_sets(conv)
    convs = [n for n, m in conv.named_modules() if isinstance(m, nn.Conv2d)]
    dense = [n for n, m in conv.named_modules() if isinstance(m, nn.Linear)]
    assert sets["all"] == convs + dense[:-1]
    assert sets["firstconv"] == [convs[0]] and sets["lastconv"] == [convs[-1]]
    assert sets["midconv"] == [convs[1]] and sets["firstdense"] == [dense[0]]
    assert set(mrp.layer_sets(_mlp())) == {"all", "firstdense"}


def test_bp_pairs_hand_example():
    import pandas as pd

    rows = []
    for step, (w, b) in enumerate([(0.5, 0.2), (0.1, 0.3), (0.4, 0.4)]):
        rows += [{"step": step, "layers": "fc1", "score": "norm", "base": "norm", "bp": False,
                  "penalty": w},
                 {"step": step, "layers": "fc1", "score": "bp_norm", "base": "norm", "bp": True,
                  "penalty": b}]
    pairs = mrp.bp_pairs(pd.DataFrame(rows))
    assert pairs["without"].tolist() == [0.5, 0.1, 0.4]
    assert pairs["with"].tolist() == [0.2, 0.3, 0.4]
    assert pairs["below"].tolist() == [True, False, False]  # a tie is not below y = x
    with pytest.raises(ValueError, match="lacks column"):
        mrp.bp_pairs(pd.DataFrame({"x": [1]}))


def test_penalty_study_frame_activations_and_finetune_batches():
    import prunelab as pl

    bundle = pl.data.load("digits")
    model = models.build("mlp", bundle, hidden=(16, 8), activation="relu", seed=0)
    before = _state(model)
    recipe = pl.train.Recipe(lr=1e-2, epochs=1, batch_size=64, max_steps=12)
    study = mrp.penalty_study(model, bundle, recipe=recipe, fractions=(0.25, 0.5), every=6,
                                sample=100, scores=["norm", "bp_norm", "abs_mrs"],
                                finetune_steps=2, seed=3)
    assert _same_state(model, before)  # the caller's model is not trained
    f = study.frame
    assert list(f.columns[:3]) == ["seed", "layer_set", "fraction"]
    assert len(f) == 2 * 2 * 2 * 3  # layer sets x fractions x measurements x scores
    assert set(f.layer_set) == {"all", "firstdense"} and (f.seed == 3).all()
    assert f.penalty_ft.notna().all()
    pairs = mrp.bp_pairs(f)
    assert len(pairs) == 2 * 2 * 2 and set(pairs.base) == {"norm"}
    prof = mrp.penalty_profile(f)
    assert set(prof.method) == {"norm", "bp_norm", "abs_mrs"}
    act = study.activations("firstdense", 0.5)
    assert set(act.columns) == {"step", "score", "layer", "unit", "sq_activation"}
    assert len(act) == 2 * 3 * 8  # 2 steps x 3 scores x half of 16 units
    every_unit = study.activations("firstdense", 0.5, selected_only=False)
    assert len(every_unit) == 2 * 16 and (every_unit.sq_activation >= 0).all()
    assert not study.consistency("all", 0.25).empty
    with pytest.raises(ValueError, match="unknown layer set 'midconv'"):
        mrp.penalty_study(model, bundle, recipe=recipe, layer_sets=["midconv"])


def test_finetune_minibatches_same_for_every_score():
    # with finetune_batch_size the mini-batches depend on (seed, step) only
    model = _mlp().eval()
    batch = _batch((12,), n=40, classes=4)
    rec = mrp.PenaltyRecorder(batch, every=1, fraction=0.25, scores=["norm", "rand"],
                                finetune_steps=3, finetune_batch_size=8, finetune_lr=0.1)
    a = rec.measure(model, 5)
    rec2 = mrp.PenaltyRecorder(batch, every=1, fraction=0.25, scores=["norm"],
                                 finetune_steps=3, finetune_batch_size=8, finetune_lr=0.1)
    b = rec2.measure(model, 5)
    assert a[0]["loss_ft"] == b[0]["loss_ft"]
    with pytest.raises(ValueError, match="finetune_batch_size"):
        mrp.PenaltyRecorder(batch, finetune_batch_size=0)
