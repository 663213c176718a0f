"""Shared test set-up: everything is built in code, seeded, offline."""
import os

import pytest
import torch

# Small models run fastest on one thread, and a second busy core (another job on this shared
# machine) would otherwise stall OpenMP's spinning workers.
torch.set_num_threads(1)
os.environ.setdefault("PRUNELAB_DOWNLOAD", "0")


@pytest.fixture
def tmp_zoo(tmp_path):
    return tmp_path / "zoo"
