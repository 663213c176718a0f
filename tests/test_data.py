"""Tests of prunelab.data: the registry, splits, batches, loaders, normalisation, the cache.

The readers (tests/test_data_readers.py) and downloads (tests/test_download.py) have their own
files; all share tests/data_files.py. Nothing touches the network: ``download.fetch`` is
replaced by a guard, and ``paths.DATASETS`` / ``paths.SYSTEM_DATASETS`` point into tmp_path
unless a test says otherwise.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab import data, data_readers, download, paths

from data_files import fake_mnist, unscale
from data_files import isolated  # noqa: F401  (the autouse fixture of these tests)


# --------------------------------------------------------------------------------------------
# Registry, import cost
# --------------------------------------------------------------------------------------------


def test_names_sorted_and_complete():
    assert data.names() == sorted(
        ["mnist1d", "digits", "fashion-mnist", "mnist", "cifar10", "cifar100"]
    )


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="imagenet") as info:
        data.load("imagenet")
    for name in data.names():
        assert name in str(info.value)


@pytest.mark.parametrize("module", [data, data_readers, download], ids=lambda m: m.__name__)
def test_imports_only_torch_numpy_stdlib_and_paths(module):
    # Checked on the source, not in a subprocess: importing torch again would cost seconds.
    tree = ast.parse(Path(module.__file__).read_text())
    top = set()
    for node in tree.body:  # module level only: sklearn and mnist1d are imported in functions
        if isinstance(node, ast.Import):
            top |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            top.add(node.module if node.level == 0 else f"prunelab.{node.module}")
    allowed = {"numpy", "torch", "prunelab"}
    ours = {"prunelab", "prunelab.paths", "prunelab.data_readers", "prunelab.download"}
    bad = {m for m in top
           if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in allowed}
    assert not bad, f"module-level imports beyond torch/numpy/stdlib/paths: {sorted(bad)}"
    assert {m for m in top if m.startswith("prunelab")} <= ours
    anywhere = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    anywhere |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.split(".")[0] == "torchvision" for m in anywhere)


# --------------------------------------------------------------------------------------------
# digits: splits, batches, loaders, normalisation, cache, argument checks
# --------------------------------------------------------------------------------------------


def test_digits_shapes():
    b = data.load("digits")
    assert (len(b.train), len(b.val), len(b.test)) == (997, 300, 500)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and len(b.classes) == 10
    assert b.train.tensors[0].shape == (997, 1, 8, 8)
    assert b.meta["pixel_scale"] == 1 / 16
    # The train/test split of sklearn's pool is fixed: the validation seed does not move it.
    other = data.load("digits", seed=5)
    np.testing.assert_array_equal(b.meta["digits_test_indices"], other.meta["digits_test_indices"])
    np.testing.assert_allclose(unscale(b, b.test.tensors[0]), unscale(other, other.test.tensors[0]),
                               atol=1e-4)


def test_digits_val_disjoint_from_train():
    b = data.load("digits")
    train, val = set(b.meta["train_indices"].tolist()), set(b.meta["val_indices"].tolist())
    assert not train & val and train | val == set(range(1297))
    assert len(val) == 300


def test_digits_normalisation():
    b = data.load("digits")
    x = b.train.tensors[0].double()
    assert abs(x.mean().item()) < 1e-5
    assert abs(x.std(unbiased=False).item() - 1) < 1e-5
    assert len(b.meta["mean"]) == len(b.meta["std"]) == 1
    for split in ("val", "test"):
        xs = b.split(split).tensors[0]
        assert xs.dtype == torch.float32 and torch.isfinite(xs).all()
        assert abs(xs.mean().item()) < 0.2  # same distribution, standardised with train stats


def test_batch_deterministic():
    b = data.load("digits")
    x1, y1 = b.batch("train", n=100, seed=0)
    x2, y2 = b.batch("train", n=100, seed=0)
    x3, _ = b.batch("train", n=100, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (100, 1, 8, 8) and x1.is_contiguous() and y1.is_contiguous()
    rows = torch.randperm(997, generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(x1, b.train.tensors[0][rows])


def test_batch_whole_split_and_limits():
    b = data.load("digits")
    x, y = b.batch("val")
    assert torch.equal(x, b.val.tensors[0]) and torch.equal(y, b.val.tensors[1])
    assert b.batch("test", n=500)[0].shape[0] == 500
    assert b.batch("test", n=np.int64(3))[0].shape[0] == 3


@pytest.mark.parametrize("split, n, match", [
    ("valid", 10, "'valid'"),
    ("TRAIN", 10, "'TRAIN'"),
    ("train", 0, r"n=0 .*1\.\.997"),
    ("train", 998, r"n=998 .*1\.\.997"),
    ("val", -1, r"n=-1 .*1\.\.300"),
    ("train", 2.5, "n must be an int"),
    ("train", True, "n must be an int"),
])
def test_batch_errors(split, n, match):
    b = data.load("digits")
    with pytest.raises(ValueError, match=match):
        b.batch(split, n=n)


def test_loader():
    b = data.load("digits")
    plain = list(b.loader("test", batch_size=64))
    assert len(plain) == 8 and plain[-1][0].shape[0] == 500 - 7 * 64
    assert torch.equal(torch.cat([x for x, _ in plain]), b.test.tensors[0])
    first = [y for _, y in b.loader("train", 100, shuffle=True, seed=3)]
    again = [y for _, y in b.loader("train", 100, shuffle=True, seed=3)]
    other = [y for _, y in b.loader("train", 100, shuffle=True, seed=4)]
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert sorted(torch.cat(first).tolist()) == sorted(b.train.tensors[1].tolist())
    with pytest.raises(ValueError, match="batch_size"):
        b.loader("train", 0)
    with pytest.raises(ValueError, match="'dev'"):
        b.loader("dev", 10)


def test_load_is_cached():
    a = data.load("digits")
    assert data.load("digits") is a
    assert data.load("Digits", val_size=300, seed=0) is a  # same arguments once resolved
    c = data.load("digits", seed=1)
    assert c is not a
    assert not np.array_equal(a.meta["val_indices"], c.meta["val_indices"])
    assert "digits" in repr(a) and "train=997" in repr(a)


def test_val_size_override_and_zero():
    b = data.load("digits", val_size=97)
    assert (len(b.train), len(b.val)) == (1200, 97)
    full = data.load("digits", val_size=0)
    assert (len(full.train), len(full.val)) == (1297, 0)
    with pytest.raises(ValueError, match="1..0"):
        full.batch("val", n=1)


@pytest.mark.parametrize("val_size", [-1, 1297, 5000, 1.5, True, "10"])
def test_invalid_val_size(val_size):
    with pytest.raises(ValueError, match="val_size"):
        data.load("digits", val_size=val_size)


def test_name_aliases():
    fake_mnist(paths.DATASETS / "fashion-mnist", gz=True)
    assert data.load("Fashion_MNIST", val_size=10) is data.load("fashion-mnist", val_size=10)
