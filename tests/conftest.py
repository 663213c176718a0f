"""Shared test set-up: everything is built in code, seeded, offline."""
import os

import pytest
import torch

# Small models run fastest on one thread, and a second busy core (another job on this shared
# machine) would otherwise stall OpenMP's spinning workers.
torch.set_num_threads(1)
os.environ.setdefault("PRUNELAB_DOWNLOAD", "0")

# PRUNELAB_TEST_DTYPE=float64: the float64 proxy for a GPU (issue 14). Every model built by the
# tests is then float64 while datasets stay float32, so a tensor created without the dtype (or
# device) of its neighbours fails, as it would on a device.
if os.environ.get("PRUNELAB_TEST_DTYPE") == "float64":
    torch.set_default_dtype(torch.float64)


@pytest.fixture
def tmp_zoo(tmp_path):
    return tmp_path / "zoo"


# ----------------------------------------------------------------------- mode connectivity
@pytest.fixture(scope="module")
def digits():
    """The digits bundle with its train and test tensors."""
    import prunelab as pl

    b = pl.data.load("digits")
    return b, b.train.tensors, b.test.tensors


@pytest.fixture(scope="module")
def pair(digits):
    """Two small ReLU MLPs trained on digits from different seeds (init and data order)."""
    import prunelab as pl
    from prunelab.train import Recipe, fit

    b, tr, _ = digits
    models = []
    for s in (0, 1):
        m = pl.models.build("mlp", b, hidden=(32,), activation="relu", seed=s)
        fit(m, tr, recipe=Recipe(lr=1e-2, epochs=20), seed=s, progress=False)
        models.append(m.eval())
    return models


def bn_net(seed):
    """A small MLP with BatchNorm (its statistics must be recomputed along a path)."""
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(),
                         nn.Linear(24, 10))
