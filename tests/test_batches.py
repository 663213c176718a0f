"""The Round-2 contract for calling models on data: inputs, outputs, losses, data sources."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prunelab import batches as B
from prunelab import metrics
from prunelab.train import Recipe, evaluate, fit


class Out(nn.Module):
    """Wraps a net and returns its logits in the shape asked for."""

    def __init__(self, kind):
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        z = self.net(x)
        return {"tensor": z, "tuple": (z, z.sum()), "mapping": {"logits": z, "h": x},
                "object": SimpleNamespace(logits=z, loss=None), "other": {"scores": z}}[self.kind]


@pytest.mark.parametrize("kind", ["tensor", "tuple", "mapping", "object"])
def test_every_output_kind_gives_the_logits(kind):
    torch.manual_seed(0)
    model = Out(kind)
    x = torch.randn(5, 4)
    ref = model.net(x)
    torch.testing.assert_close(B.output_tensor(model(x)), ref)


def test_unknown_output_says_how_to_adapt():
    model = Out("other")
    with pytest.raises(TypeError, match=r"keys \['scores'\].*output="):
        B.output_tensor(model(torch.randn(2, 4)))
    z = B.output_tensor(model(torch.randn(2, 4)), lambda o: o["scores"])
    assert z.shape == (2, 3)
    with pytest.raises(TypeError, match="returned dict, expected a tensor"):
        B.output_tensor(model(torch.randn(2, 4)), lambda o: o)


class Kw(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.lin(input_ids.to(self.lin.weight.dtype))
        return h if attention_mask is None else h * attention_mask[:, :1]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, a, b):
        return self.lin(a + b)


def test_inputs_tensor_mapping_tuple():
    x = torch.randn(4, 3)
    assert B.call(Kw(), {"input_ids": x}).shape == (4, 2)
    assert B.call(Two(), (x, x)).shape == (4, 2)
    assert B.length({"input_ids": x, "attention_mask": torch.ones(4, 3)}) == 4
    assert B.take((x, x), slice(1, 3))[0].shape == (2, 3)
    with pytest.raises(TypeError, match="tensor, a mapping"):
        B.call(Kw(), 3.0)


def test_as_batch_reads_every_source_up_to_n():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    for data in [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3)]:
        xb, yb = B.as_batch(data, n=7)
        torch.testing.assert_close(xb, x[:7])
        torch.testing.assert_close(yb, y[:7])
    xb, yb = B.as_batch(DataLoader(TensorDataset(x, y), batch_size=4))
    assert len(yb) == 10


class DictData(Dataset):
    """HuggingFace-style items: mappings with input_ids, attention_mask and labels."""

    def __init__(self, n=6, with_labels=True):
        self.n, self.with_labels = n, with_labels

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {"input_ids": torch.full((3,), i), "attention_mask": torch.ones(3)}
        if self.with_labels:
            item["labels"] = torch.tensor(i % 2)
        return item


def test_mapping_batches_split_inputs_and_labels():
    x, y = B.as_batch(DataLoader(DictData(), batch_size=4), n=5)
    assert set(x) == {"input_ids", "attention_mask"} and len(y) == 5
    x, y = B.as_batch(DictData())
    assert x["input_ids"].shape == (6, 3) and y.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"keys \['attention_mask', 'input_ids'\] and no targets"):
        B.as_batch(DataLoader(DictData(with_labels=False), batch_size=2))


def test_sequences_of_different_lengths_are_padded_with_ignore_index():
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)}
    b = {"input_ids": torch.ones(1, 5, dtype=torch.long), "labels": torch.ones(1, 5, dtype=torch.long)}
    x, y = B.as_batch(DataLoader([a, b], batch_size=None))
    assert x["input_ids"].shape == (3, 5) and y.shape == (3, 5)
    assert int(x["input_ids"][0, 4]) == 0 and int(y[0, 4]) == -100


def test_bad_sources_name_the_argument():
    with pytest.raises(TypeError, match="data must be"):
        B.as_batch(42)
    with pytest.raises(ValueError, match="same length"):
        B.as_batch((torch.randn(3, 2), torch.zeros(4)))
    with pytest.raises(ValueError, match="empty"):
        B.as_batch((torch.randn(0, 2), torch.zeros(0)))
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        B.as_batch(DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))


def test_objective_validation_and_checks():
    with pytest.raises(ValueError, match="loss must be one of"):
        B.objective("hinge")
    with pytest.raises(TypeError, match="loss must be"):
        B.objective(3)
    obj = B.objective()
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[0, 7\]"):
        obj.check(z, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(TypeError, match="class indices must be integers"):
        obj.check(z, torch.zeros(4))
    with pytest.raises(ValueError, match="loss='mse'"):
        obj.check(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    bad = B.objective(lambda o, t: (o - t).square())
    with pytest.raises(ValueError, match="scalar tensor"):
        bad.value(torch.randn(2, 2), torch.randn(2, 2))


def test_per_token_loss_and_accuracy_ignore_padding():
    z = torch.randn(2, 3, 4)
    y = torch.tensor([[0, 1, -100], [3, -100, -100]])
    obj = B.objective()
    obj.check(z, y)
    want = F.cross_entropy(z.reshape(-1, 4), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(obj.value(z, y), want)
    assert obj.units(z, y) == 3
    hit, cnt = obj.correct(z, y)
    assert cnt == 3 and hit == int(((z.argmax(-1) == y) & (y != -100)).sum())


def test_evaluate_follows_the_model_dtype_and_restores_each_module_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    model[1].eval()  # the caller froze BN statistics
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ev32 = evaluate(model, (x, y))
    ev64 = evaluate(model.double(), (x, y))  # float32 data into a float64 model
    assert ev64["loss"] == pytest.approx(ev32["loss"], rel=1e-5)
    assert model.training and not model[1].training and model[2].training
    assert metrics.loss(model, DataLoader(TensorDataset(x, y), batch_size=7)) == pytest.approx(
        ev64["loss"])
    assert not model[1].training and model[2].training


def test_regression_with_mse_trains_and_evaluates():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    before = evaluate(model, (x, y), loss="mse")
    assert math.isnan(before["accuracy"])
    res = fit(model, (x, y), recipe=Recipe(lr=1e-2, epochs=30, batch_size=16), loss="mse",
              progress=False)
    after = evaluate(model, (x, y), loss="mse")
    assert after["loss"] < 0.2 * before["loss"]
    assert math.isnan(res.history["train_accuracy"].iloc[-1])
    assert after["loss"] == pytest.approx(float(F.mse_loss(model(x), y)), rel=1e-6)


def test_fit_on_a_dataloader_of_mappings_with_a_wrapped_output():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).mean(1)
            return SimpleNamespace(logits=self.head(h))

    res = fit(Net(), DataLoader(DictData(), batch_size=3), recipe=Recipe(epochs=40, lr=0.05),
              progress=False)
    assert res.history["train_accuracy"].iloc[-1] == 1.0


def test_recipe_device_is_validated_and_kept_out_of_old_manifests():
    assert "device" not in Recipe().to_dict()
    assert Recipe(device="cpu").to_dict()["device"] == "cpu"
    assert Recipe.from_dict(Recipe(device="cpu").to_dict()).device == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        Recipe(device="gpu0")
