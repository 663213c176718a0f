"""Sweeps over your own models, data, loss and device (DESIGN.md "Round 2").

Everything is built here: a small MLP factory "pretrained" for a few deterministic steps on a
bundle made from tensors, an MSE regression variant, and the device / resources plumbing.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prunelab import executors as X
from prunelab import masks as M
from prunelab import experiments as E
from prunelab import metrics
from prunelab.store import Store, config_key


class TensorBundle:
    """A from-tensors bundle: train/val/test Datasets and ``batch(split, n, seed)``."""

    def __init__(self, x, y, name="blobs"):
        self.name = name
        n = len(y)
        a, b = n // 2, (3 * n) // 4
        self.train = TensorDataset(x[:a], y[:a])
        self.val = TensorDataset(x[a:b], y[a:b])
        self.test = TensorDataset(x[b:], y[b:])
        self.input_shape = tuple(x.shape[1:])
        self.num_classes = int(y.max()) + 1 if not y.is_floating_point() else None

    def batch(self, split, n=None, seed=0):
        x, y = getattr(self, split).tensors
        rows = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        return x[rows], y[rows]


def _blobs(n=240, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, 8, generator=g, dtype=torch.float32) * 2.0
    return centres[y] + torch.randn(n, 8, generator=g, dtype=torch.float32), y


def _regression(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float32)
    w = torch.randn(8, 1, generator=g, dtype=torch.float32)
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float32)


BLOBS = TensorBundle(*_blobs())
REGRESSION = TensorBundle(*_regression(), name="wave")


def _pretrain(model, bundle, loss, seed, steps=60):
    """Float32 data (as data sets are), initialised and pretrained in float32 so every dtype run
    prunes the same network; returned in the default dtype (float64 under the GPU proxy)."""
    x, y = bundle.train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(y), (32,), generator=g)
        opt.zero_grad()
        loss(model(x[rows]), y[rows]).backward()
        opt.step()
    return model.to(torch.get_default_dtype()).eval()


def make_tiny(seed):
    """Module level (so it pickles): an 8-32-3 MLP pretrained on BLOBS."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32, dtype=torch.float32), nn.Tanh(),
                          nn.Linear(32, 3, dtype=torch.float32))
    return _pretrain(model, BLOBS, F.cross_entropy, seed)


def make_regressor(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32, dtype=torch.float32), nn.Tanh(),
                          nn.Linear(32, 1, dtype=torch.float32))
    return _pretrain(model, REGRESSION, F.mse_loss, seed)


NON_TIMING = [c for c in E.MEASURED if c not in E.TIMINGS]


@pytest.fixture
def store(tmp_path):
    return tmp_path / "custom.sqlite"


def test_custom_model_and_dataset_sweep_inline(store):
    sweep = E.Sweep(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS}, criterion=["mp", "qm"],
                    sparsity=[0.5, 0.8], finetune={"epochs": 1}, examples=64)
    assert len(sweep) == 4
    frame = sweep.run(store, executor="inline", progress=False)
    assert frame.attrs["ran"] == 4 and not frame.attrs["interrupted"]
    assert set(frame["arch"]) == {"tiny"} and set(frame["dataset"]) == {"blobs"}
    assert "loss" not in frame.columns and "device" not in frame.columns
    assert frame["key"].tolist() == sweep.keys()
    assert [config_key(c) for c in sweep.configs()] == sweep.keys()
    # the same names give the same keys (a rerun skips every run)
    again = E.Sweep(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS},
                    criterion=["mp", "qm"], sparsity=[0.5, 0.8], finetune={"epochs": 1},
                    examples=64)
    assert again.keys() == sweep.keys()
    assert again.run(store, executor="inline", progress=False).attrs["skipped"] == 4
    # measured against a direct computation on the factory's model and the bundle's batch
    model = make_tiny(0)
    batch = BLOBS.batch("train", n=64, seed=0)
    assert frame["loss_dense"].tolist() == [metrics.loss(model, batch)] * 4
    n = 8 * 32 + 32 * 3  # prunable weights
    assert frame["sparsity_actual"].tolist() == [M.n_pruned(s, n) / n for s in (0.5, 0.8) * 2]
    assert frame["finetune_epochs"].tolist() == [1] * 4
    assert (frame["loss_pruned"] - frame["loss_dense"]).abs().tolist() == \
        pytest.approx(frame["delta_loss"].tolist())
    # a custom model has no recorded recipe: Recipe() defaults plus the override
    assert '"epochs": 1' in frame["finetune_recipe"].iloc[0]
    assert all(isinstance(v, float) for v in frame["loss_ft"])
    # the factory's model was copied: a second call gives the same parameters untouched
    again_model = make_tiny(0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again_model.parameters()))


def test_custom_model_on_a_registered_dataset_name_is_allowed_but_not_the_reverse():
    sweep = E.Sweep(arch={"tiny-digits": make_tiny}, dataset="digits", finetune=None)
    assert sweep.configs()[0]["arch"] == "tiny-digits"
    with pytest.raises(ValueError, match="arch 'mlp' is registered.*your dataset 'blobs'"):
        E.Sweep(arch="mlp", dataset={"blobs": BLOBS})


def test_mse_regression_sweep(store):
    sweep = E.Sweep(arch={"reg": make_regressor}, dataset={"wave": REGRESSION},
                    criterion=["mp", "obd", "qm"], sparsity=0.6, finetune=None, examples=80,
                    loss="mse")
    assert all(c["loss"] == "mse" for c in sweep.configs())
    frame = sweep.run(store, executor="inline", progress=False)
    assert list(frame.columns[:len(E.FIELDS) + 1]) == [*E.FIELDS, "loss"]
    assert set(frame["loss"]) == {"mse"}
    x, y = REGRESSION.batch("train", n=80, seed=0)
    model = make_regressor(0)
    with torch.no_grad():
        expected = float((model(x.to(next(model.parameters()).dtype)) - y).square().mean())
    assert frame["loss_dense"].tolist() == pytest.approx([expected] * 3, rel=1e-6)
    assert frame["val_error"].isna().all() and frame["test_error_dense"].isna().all()
    assert frame["val_loss"].notna().all() and (frame["delta_loss"] > 0).all()
    # the loss is part of the key: the same grid under cross-entropy is a different run
    ce = E.Sweep(arch={"reg": make_regressor}, dataset={"wave": REGRESSION},
                 criterion=["mp", "obd", "qm"], sparsity=0.6, finetune=None, examples=80)
    assert not set(ce.keys()) & set(sweep.keys())


def test_mse_sweep_fine_tunes_with_mse(store):
    sweep = E.Sweep(arch={"reg": make_regressor}, dataset={"wave": REGRESSION},
                    criterion="mp", sparsity=0.6, finetune={"epochs": 2}, examples=80,
                    loss="mse")
    frame = sweep.run(store, executor="inline", progress=False)
    assert frame["loss_ft"].iloc[0] < frame["loss_pruned"].iloc[0]  # MSE went down
    assert math.isnan(frame["val_error_ft"].iloc[0])


def test_device_cpu_sweep_matches_the_default_and_is_keyed(store):
    grid = dict(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS}, criterion=["mp", "lm"],
                sparsity=0.7, finetune=None, examples=64)
    default, cpu = E.Sweep(**grid), E.Sweep(**grid, device="cpu")
    assert all(c["device"] == "cpu" for c in cpu.configs())
    assert all("device" not in c for c in default.configs())
    assert not set(default.keys()) & set(cpu.keys())
    a = default.run(store, executor="inline", progress=False)
    b = cpu.run(store, executor="inline", progress=False)
    assert list(b.columns[:len(E.FIELDS) + 1]) == [*E.FIELDS, "device"]
    assert b["device"].tolist() == ["cpu", "cpu"]
    assert a[NON_TIMING].equals(b[NON_TIMING])  # bit-identical on the CPU
    assert len(Store(store)) == 4


def test_run_one_takes_device_loss_and_custom_entries():
    row = E.run_one(dict(arch="reg", dataset="wave", criterion="obd", sparsity=0.5,
                         finetune=None, examples=40, loss="mse", device="cpu"),
                    factories={"reg": make_regressor}, bundles={"wave": REGRESSION})
    assert row["loss"] == "mse" and row["device"] == "cpu" and row["arch"] == "reg"
    assert all(isinstance(row[c], (float, int)) for c in NON_TIMING
               if c not in ("finetune_recipe", "torch_version"))


def test_default_sweep_keys_are_unchanged():
    # Keys computed by main before Round 2 (ee799e2): loss/device must not enter default keys.
    sweep = E.Sweep(arch="mlp", dataset="digits", criterion=["mp", "qm"], sparsity=[0.5, 0.9],
                    finetune=[None, {"epochs": 1}], stages=[1, 3])
    assert sweep.keys()[:3] == [
        "81de09e8a63e071545592b4f9743887580fca357f14f34626ea20e2e8b5107d0",
        "2cd7a0893939f8007e66f08e13249e0f341244d6b8a32bc069a772db2eeb1d24",
        "72fd1cc36bf60e2ceaab84d477652bfd8312223acbb00b227af46b0ef1853a22"]
    assert E.Sweep(arch="mlp", dataset="digits", loss="cross_entropy", device=None,
                   criterion=["mp", "qm"], sparsity=[0.5, 0.9], finetune=[None, {"epochs": 1}],
                   stages=[1, 3]).keys() == sweep.keys()


class NoBatch:
    train = val = test = TensorDataset(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch={"tiny": 3}, dataset={"blobs": BLOBS}), "arch 'tiny': expected a callable"),
    (dict(arch={"mlp": make_tiny}), "arch 'mlp' is a registered architecture"),
    (dict(arch={"": make_tiny}), "custom names must be non-empty"),
    (dict(arch={"tiny": make_tiny}, dataset={"MNIST1D": BLOBS}),
     "dataset 'MNIST1D' is a registered dataset"),
    (dict(arch={"tiny": make_tiny}, dataset={"b": NoBatch()}), r"NoBatch lacks \['batch'\]"),
    (dict(arch={"tiny": make_tiny}, dataset={"b": object()}), "lacks"),
    (dict(arch="tiny"), "unknown arch 'tiny'"),
    (dict(loss=F.mse_loss), "callable 'mse_loss'.*no name the store can key"),
    (dict(loss="huber"), "loss must be one of"),
    (dict(device="gpu"), "device must be None or a torch device name"),
    (dict(device=3.5), "device must be None"),
    (dict(colour="red"), "unknown sweep field"),
])
def test_bad_custom_entries_are_refused_when_the_sweep_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        E.Sweep(**kwargs)


def test_custom_entries_that_cannot_reach_workers_are_refused_before_running(store):
    sweep = E.Sweep(arch={"tiny": lambda seed: make_tiny(seed)}, dataset={"blobs": BLOBS},
                    finetune=None, examples=32)
    with pytest.raises(ValueError, match=r"arch 'tiny'.*executor='inline'"):
        sweep.run(store, executor="local", workers=2, progress=False)
    assert not store.exists() or len(Store(store)) == 0
    # workers=0/1 and "inline" run here: the lambda is fine
    assert sweep.run(store, executor="inline", progress=False).attrs["ran"] == 1


def test_a_cuda_device_this_machine_lacks_is_refused_before_running(store):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sweep = E.Sweep(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS}, device="cuda:0",
                    finetune=None, examples=32)
    assert sweep.configs()[0]["device"] == "cuda:0"
    with pytest.raises(ValueError, match="no CUDA device on this machine"):
        sweep.run(store, executor="inline", progress=False)


def test_resources_are_checked_and_only_for_dask(store):
    sweep = E.Sweep(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS}, finetune=None)
    with pytest.raises(ValueError, match="resources= is for Dask"):
        sweep.run(store, executor="local", resources={"GPU": 1}, progress=False)
    for bad in ({}, {"GPU": 0}, {"GPU": True}, ["GPU"]):
        with pytest.raises(ValueError, match="resources must"):
            X.check_executor("dask", None, bad)
    assert X.kind("local", 0, 5) == "inline" and X.kind("local", 2, 5) == "local"
    assert X.kind("inline", 4, 5) == "inline" and X.kind("dask", 1, 5) == "dask"


@pytest.mark.slow
def test_dask_resources_reach_client_map_and_gpu_workers_run_the_tasks(store, monkeypatch):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None, resources={"GPU": 1})
    client = distributed.Client(cluster)
    seen = []
    real_map = client.map

    def spy(*args, **kwargs):
        seen.append(kwargs.get("resources"))
        return real_map(*args, **kwargs)

    monkeypatch.setattr(client, "map", spy)
    try:
        sweep = E.Sweep(arch={"tiny": lambda seed: make_tiny(seed)}, dataset={"blobs": BLOBS},
                        criterion=["mp", "snip"], finetune=None, examples=32)
        frame = sweep.run(store, executor=client, resources={"GPU": 1}, progress=False)
    finally:
        client.close()
        cluster.close()
    assert seen == [{"GPU": 1}]  # the runs (a custom arch needs no zoo training)
    assert frame.attrs["ran"] == 2 and set(frame["arch"]) == {"tiny"}
    inline = sweep.run(store.with_name("inline.sqlite"), executor="inline", progress=False)
    assert frame[NON_TIMING].equals(inline[NON_TIMING])


@pytest.mark.slow
def test_local_workers_run_a_module_level_factory(store):
    sweep = E.Sweep(arch={"tiny": make_tiny}, dataset={"blobs": BLOBS},
                    criterion=["mp", "snip"], finetune=None, examples=32)
    local = sweep.run(store, executor="local", workers=2, progress=False)
    inline = sweep.run(store.with_name("inline.sqlite"), executor="inline", progress=False)
    assert local.attrs["ran"] == 2
    assert local[NON_TIMING].equals(inline[NON_TIMING])


def make_digits_mlp(seed):
    """A custom "pretrained" model for the registered digits dataset (untrained is enough)."""
    from prunelab import data, models

    return models.build("mlp", data.load("digits"), seed=seed).eval()


def test_custom_model_on_a_registered_dataset_runs(store):
    from prunelab import data

    sweep = E.Sweep(arch={"my-mlp": make_digits_mlp}, dataset="digits", criterion="snip",
                    sparsity=0.5, finetune=None, examples=50)
    frame = sweep.run(store, executor="inline", progress=False)
    assert frame["arch"].tolist() == ["my-mlp"] and frame["dataset"].tolist() == ["digits"]
    bundle = data.load("digits")
    expected = metrics.loss(make_digits_mlp(0), bundle.batch("train", n=50, seed=0))
    assert frame["loss_dense"].iloc[0] == expected


def test_accuracy_curve_on_a_custom_bundle_with_loss_and_device():
    from prunelab.train import evaluate

    model = make_tiny(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frame = E.accuracy_curve(model, BLOBS, criteria=["mp", "qm"], sparsities=[0.5, 0.9],
                             batch_size=64)
    assert len(frame) == 2 * 3 and frame["criterion"].tolist() == ["mp"] * 3 + ["qm"] * 3
    dense = evaluate(model, BLOBS.test)
    assert frame.loc[0, "loss"] == dense["loss"] and frame.loc[0, "accuracy"] == dense["accuracy"]
    n = 8 * 32 + 32 * 3
    assert frame["sparsity"].tolist()[1:3] == [M.n_pruned(s, n) / n for s in (0.5, 0.9)]
    on_cpu = E.accuracy_curve(model, BLOBS, criteria=["mp", "qm"], sparsities=[0.5, 0.9],
                              batch_size=64, device="cpu")
    cols = ["criterion", "sparsity", "loss", "accuracy", "error"]
    assert on_cpu[cols].equals(frame[cols])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched

    reg = make_regressor(0)
    mse = E.accuracy_curve(reg, REGRESSION, criteria=["obd"], sparsities=[0.5], batch_size=64,
                           loss="mse")
    assert mse["error"].isna().all() and mse["accuracy"].isna().all()
    assert mse.loc[0, "loss"] == pytest.approx(evaluate(reg, REGRESSION.test, loss="mse")["loss"])
    assert mse.loc[1, "loss"] > mse.loc[0, "loss"]
    with pytest.raises(ValueError, match="split must be one of"):
        E.accuracy_curve(model, BLOBS, split="holdout")
    with pytest.raises(ValueError, match="device must be"):
        E.accuracy_curve(model, BLOBS, device="gpu")


def test_repr_shows_the_custom_names_and_settings():
    sweep = E.Sweep(arch={"reg": make_regressor}, dataset={"wave": REGRESSION}, loss="mse",
                    device="cpu", criterion=["mp", "obd"])
    text = repr(sweep)
    assert text.startswith("Sweep(2 runs; varied={'criterion': ['mp', 'obd']}")
    assert "'arch': 'reg'" in text and "'dataset': 'wave'" in text
    assert "'loss': 'mse'" in text and "'device': 'cpu'" in text


def make_embedder(seed):
    """Module level: token ids -> embedding -> mean -> Linear, for prunable={"embedding"}."""
    torch.manual_seed(seed)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    return Bag().eval()


TOKENS = TensorBundle(torch.randint(0, 16, (120, 5), generator=torch.Generator().manual_seed(1)),
                      torch.randint(0, 3, (120,), generator=torch.Generator().manual_seed(2)),
                      name="tokens")


def test_prunable_is_a_keyed_setting_that_reaches_the_pruning(store):
    grid = dict(arch={"bag": make_embedder}, dataset={"tokens": TOKENS}, criterion="mp",
                sparsity=0.5, finetune=None, examples=32)
    default = E.Sweep(**grid)
    both = E.Sweep(**grid, prunable=["linear", "embedding"])
    same = E.Sweep(**grid, prunable=("embedding", "linear"))
    assert all("prunable" not in c for c in default.configs())
    assert [c["prunable"] for c in both.configs()] == ["embedding+linear"]
    assert both.keys() == same.keys() and not set(both.keys()) & set(default.keys())
    a = default.run(store, executor="inline", progress=False)
    b = both.run(store, executor="inline", progress=False)
    assert "prunable" not in a.columns and b["prunable"].tolist() == ["embedding+linear"]
    # the runs pruned what they were told: compare with pl.prune on the same model and batch
    import prunelab as pl
    batch = TOKENS.batch("train", n=32, seed=0)
    for frame, prunable in ((a, None), (b, ("linear", "embedding"))):
        r = pl.prune(make_embedder(0), "mp", sparsity=0.5, batch=batch, prunable=prunable)
        assert frame["loss_pruned"].iloc[0] == pytest.approx(metrics.loss(r.model, batch))
    assert b["loss_pruned"].iloc[0] != pytest.approx(a["loss_pruned"].iloc[0])
    # a stored config carries the label back to run_one
    row = E.run_one(both.configs()[0], factories={"bag": make_embedder},
                    bundles={"tokens": TOKENS})
    assert row["prunable"] == "embedding+linear"
    assert row["loss_pruned"] == pytest.approx(b["loss_pruned"].iloc[0])


@pytest.mark.parametrize("prunable, match", [
    (lambda name, module, tensor: True, "callable.*cannot.*key|no name the store"),
    (["linear", "bogus"], None),
    ([3], "prunable must hold kinds"),
])
def test_bad_prunable_in_a_sweep_is_refused(prunable, match):
    grid = dict(arch={"bag": make_embedder}, dataset={"tokens": TOKENS}, finetune=None)
    if match is None:  # an unknown name can only be checked against the model, at run time
        sweep = E.Sweep(**grid, prunable=prunable, examples=8)
        with pytest.raises(ValueError, match="bogus"):
            E.run_one(sweep.configs()[0], factories={"bag": make_embedder},
                      bundles={"tokens": TOKENS})
        return
    with pytest.raises(ValueError, match=match):
        E.Sweep(**grid, prunable=prunable)
