"""Your data: pl.data.from_tensors / from_datasets give a Bundle usable like a registered one."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunelab as pl


def test_from_tensors_splits_validation_off_train_reproducibly():
    x, y = torch.randn(100, 3), torch.randint(0, 4, (100,))
    a = pl.data.from_tensors((x, y), seed=1)
    b = pl.data.from_tensors((x, y), seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (90, 10, 10)
    assert a.input_shape == (3,) and a.num_classes == int(y.max()) + 1
    assert torch.equal(a.batch("train", 7, seed=3)[0], b.batch("train", 7, seed=3)[0])
    rows = set(a.meta["val_indices"])
    assert len(rows) == 10  # held out: not in train any more
    xt = a.train.tensors[0]
    assert not any(torch.equal(xt[i], x[r]) for r in rows for i in range(len(xt)))


def test_from_datasets_with_mappings_and_regression():
    items = [{"input_ids": torch.full((4,), i % 7), "labels": torch.tensor(i % 2)}
             for i in range(40)]
    bundle = pl.data.from_datasets(DataLoader(items, batch_size=8), name="text")
    x, y = bundle.batch("train", 5)
    assert set(x) == {"input_ids"} and x["input_ids"].shape == (5, 4) and bundle.name == "text"
    reg = pl.data.from_tensors((torch.randn(30, 2), torch.randn(30, 3)),
                               val=TensorDataset(torch.randn(6, 2), torch.randn(6, 3)))
    assert reg.num_classes == 3 and len(reg.val) == 6


def test_custom_bundle_trains_prunes_and_evaluates():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    y = (x[:, 0] > 0).long()
    bundle = pl.data.from_tensors((x, y))
    model = pl.models.build("mlp", bundle, hidden=(16,), seed=0)
    pl.train.fit(model, bundle.train, recipe=pl.train.Recipe(epochs=30, lr=1e-2),
                 val=bundle.val, progress=False)
    assert pl.train.evaluate(model, bundle.test)["accuracy"] >= 0.8
    res = pl.prune(model, "qm", sparsity=0.5, batch=bundle.batch("train", 64))
    assert res.history["sparsity"].iloc[-1] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kwargs, match", [
    (dict(train=(torch.randn(3, 2), torch.zeros(4, dtype=torch.long))), "same length"),
    (dict(train=(torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), val_fraction=1.5),
     "val_fraction"),
    (dict(train=(torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), num_classes=0),
     "num_classes"),
    (dict(train=(torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), name=""), "name"),
    (dict(train=42), "train must be"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pl.data.from_tensors(**kwargs)
