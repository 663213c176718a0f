"""PruneConfig: validated once where it enters (pl.prune, Sweep, run_one), trusted below."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunelab.criteria as C
from prunelab import experiments as E
from prunelab import pruning as P
from prunelab.config import PruneConfig, check_recipe_fields
from prunelab.store import config_key


def test_numpy_scalars_are_accepted_and_canonical():
    cfg = PruneConfig("mp", sparsity=np.float32(0.9), stages=np.int64(3), lam=np.float32(0.1),
                      seed=np.int64(2))
    assert (cfg.sparsity, cfg.stages, cfg.lam, cfg.seed) == (0.9, 3, 0.1, 2)
    assert type(cfg.sparsity) is float and type(cfg.stages) is int and type(cfg.seed) is int
    assert cfg == PruneConfig("mp", sparsity=0.9, stages=3, lam=0.1, seed=2)


@pytest.mark.parametrize("field,value,range_", [
    ("sparsity", True, r"\[0, 1\)"), ("sparsity", math.nan, r"\[0, 1\)"),
    ("sparsity", 1.0, r"\[0, 1\)"), ("sparsity", "0.5", r"\[0, 1\)"),
    ("stages", True, ">= 1"), ("stages", 0, ">= 1"), ("stages", 2.5, ">= 1"),
    ("lam", -1.0, ">= 0"), ("lam", math.inf, ">= 0"), ("lam", True, ">= 0"),
    ("lam", np.float64(math.nan), ">= 0"),
    ("seed", -1, ">= 0"), ("seed", False, ">= 0"),
    ("scope", "everywhere", "global"), ("schedule", "cosine", "exponential"),
])
def test_bad_values_name_argument_value_and_range(field, value, range_):
    kwargs = {"sparsity": 0.5, field: value}
    with pytest.raises(ValueError, match=range_) as info:
        PruneConfig("mp", **kwargs)
    assert field in str(info.value) and repr(value) in str(info.value)


def test_layer_sparsity_needs_a_mapping_and_valid_fractions():
    with pytest.raises(ValueError, match="layer_sparsity must be a mapping.*0.5.*layerwise"):
        PruneConfig("mp", layer_sparsity=0.5)
    with pytest.raises(ValueError, match=r"layer_sparsity\['0.weight'\]"):
        PruneConfig("mp", layer_sparsity={"0.weight": 1.5})
    with pytest.raises(ValueError, match="sparsity= .* or layer_sparsity="):
        PruneConfig("mp")
    cfg = PruneConfig("mp", layer_sparsity={"0.weight": np.float32(0.5)})
    assert cfg.layer_sparsity == {"0.weight": 0.5} and cfg.stage_scope == "layerwise"


def test_unknown_criterion_loss_device_options_and_frozen():
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        PruneConfig("nope", sparsity=0.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        PruneConfig("mp", sparsity=0.5, loss="cpu")
    with pytest.raises(ValueError, match="device must be None or a torch device"):
        PruneConfig("mp", sparsity=0.5, device="gpu")
    with pytest.raises(TypeError, match=r"criterion 'lm' got unknown option\(s\) \['signd'\]; "
                                        r"its options: \['signed'\]"):
        PruneConfig("lm", sparsity=0.5, options={"signd": True})
    assert PruneConfig("mp", sparsity=0.5, loss="mse", device="cpu").objective.name == "mse"
    cfg = PruneConfig("mp", sparsity=0.5)
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.9
    with pytest.raises(ValueError, match="sparsity"):
        cfg.replace(sparsity=2.0)


def test_from_kwargs_splits_fields_and_options():
    cfg = PruneConfig.from_kwargs("lm", sparsity=0.8, lam=1, stages=2, signed=True)
    assert cfg.options == {"signed": True} and cfg.lam == 1.0 and cfg.stages == 2
    assert cfg.to_dict()["sparsity"] == 0.8


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def test_prune_validates_once_and_stages_trust_the_config(monkeypatch):
    calls = []
    real = C.check_lam

    def counting(lam):
        calls.append(lam)
        return real(lam)

    monkeypatch.setattr(C, "check_lam", counting)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    res = P.prune(mlp(), "lm", sparsity=np.float32(0.6), stages=np.int64(4), lam=0.5,
                  batch=(x, y))
    assert len(res.history) == 4 and len(calls) == 1  # once at entry, never per stage
    assert res.config["sparsity"] == 0.6 and res.config["stages"] == 4
    with pytest.raises(ValueError, match="layer_sparsity must be a mapping"):
        P.prune(mlp(), "mp", layer_sparsity=0.5)


def test_prune_with_a_config_equals_prune():
    cfg = PruneConfig("mp", sparsity=0.7, stages=2, schedule="linear")
    a = P.prune_with(mlp(), cfg)
    b = P.prune(mlp(), "mp", sparsity=0.7, stages=2, schedule="linear")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.config == b.config


# Keys computed with main's code before this change (commit 737632d):
#   config_key(E.normalize_config({}))  and  config_key(E.normalize_config(NON_DEFAULT))
# run in /work/main; existing stores must resume, so plain-value keys may never change.
DEFAULT_KEY = "a8d0613d42ebb5a38df2de7d004a877eeda03bf9e270e4b2f1257fc6b1fc7974"
NON_DEFAULT = dict(criterion="lap", sparsity=0.95, stages=3, lam=0.5, schedule="linear",
                   scope="layerwise", finetune={"epochs": 2}, examples=500, seed=1)
NON_DEFAULT_KEY = "1333462240e64ba1f25b36e98fc4f489abe1b4d2a22ef85a233da6a3a4d134aa"


def test_sweep_keys_of_plain_values_are_unchanged():
    assert config_key(E.normalize_config({})) == DEFAULT_KEY
    assert config_key(E.normalize_config(NON_DEFAULT)) == NON_DEFAULT_KEY
    assert E.Sweep().keys() == [DEFAULT_KEY]
    assert E.Sweep(**NON_DEFAULT).keys() == [NON_DEFAULT_KEY]


def test_sweep_keys_canonicalise_numpy_numbers():
    # main gave np.float32(0.9) a different key (0.899999976158); now the same as 0.9
    assert E.Sweep(sparsity=np.float32(0.9)).keys() == [DEFAULT_KEY]
    assert E.Sweep(sparsity=np.float64(0.9), stages=np.int64(1), seed=np.int64(0),
                   lam=np.float32(0.0)).keys() == [DEFAULT_KEY]
    assert E.Sweep(**{**NON_DEFAULT, "sparsity": np.float32(0.95), "lam": np.float32(0.5),
                      "finetune": {"epochs": np.int64(2)}}).keys() == [NON_DEFAULT_KEY]


@pytest.mark.parametrize("overrides,shown", [
    ({"epochs": 0}, "epochs"), ({"epochs": 1.5}, "epochs"), ({"epochs": True}, "epochs"),
    ({"batch_size": 0}, "batch_size"), ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"), ({"lr": 0}, "lr"), ({"lr": math.nan}, "lr"),
    ({"weight_decay": -1}, "weight_decay"), ({"gamma": 0}, "gamma"),
    ({"patience": 0}, "patience"), ({"max_steps": 2.5}, "max_steps"),
    ({"milestones": [0]}, "milestones"), ({"milestones": 3}, "milestones"),
    ({"optimizer": "lbfgs"}, "optimizer"), ({"epoch": 1}, "epoch"),
])
def test_sweep_finetune_dict_is_fully_validated(overrides, shown):
    with pytest.raises(ValueError, match=shown) as info:
        E.Sweep(finetune=overrides)
    assert "finetune" in str(info.value)


def test_recipe_fields_canonical():
    got = check_recipe_fields({"epochs": np.int64(2), "lr": np.float32(0.05), "momentum": 0,
                               "patience": None, "milestones": (np.int64(3), 5)})
    assert got == {"epochs": 2, "lr": 0.05, "momentum": 0.0, "patience": None,
                   "milestones": [3, 5]}
    assert type(got["epochs"]) is int
