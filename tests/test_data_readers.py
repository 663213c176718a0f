"""Tests of prunelab.data_readers: IDX, CIFAR pickles (restricted unpickler), MNIST-1D's npz,
through ``data.load`` on real-format files written by tests/data_files.py."""
from __future__ import annotations

import gzip
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab import data, data_readers, download, paths

from data_files import (CIFAR10_NAMES, N_TEST, N_TRAIN, REAL_SYSTEM_DATASETS, fake_cifar,
                        fake_mnist, idx_bytes, make_tar, unscale, write_idx)
from data_files import isolated  # noqa: F401  (the autouse fixture of these tests)


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # writable, not a view of a read-only buffer


def _good_idx() -> bytes:
    return idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))


@pytest.mark.parametrize("content, reason", [
    (b"", "shorter than the header"),
    (b"\x00\x00", "shorter than the header"),
    (b"\x01\x00\x08\x03" + _good_idx()[4:], "bad magic"),
    (b"\x00\x00\x07\x03" + _good_idx()[4:], "dtype code 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (_good_idx()[:10], "truncated IDX header"),
    (_good_idx()[:-1], "truncated"),
    (_good_idx() + b"\x00", "trailing bytes"),
    (gzip.compress(_good_idx())[:-20], "gzip"),
])
def test_read_idx_rejects_malformed(tmp_path, content, reason):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST from IDX files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, gz", [("mnist", False), ("fashion-mnist", True)])
def test_load_idx_dataset(name, gz):
    arrays = fake_mnist(paths.DATASETS / name, gz=gz)
    b = data.load(name, val_size=20)
    assert (len(b.train), len(b.val), len(b.test)) == (N_TRAIN - 20, 20, N_TEST)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and len(b.classes) == 10
    assert b.meta["source"] == str(paths.DATASETS / name)
    x, y = b.test.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (N_TEST, 1, 28, 28)
    np.testing.assert_array_equal(y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    np.testing.assert_allclose(unscale(b, x)[:, 0], arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    # Train / val rows are the official training rows named by the recorded indices.
    for split, key in (("train", "train_indices"), ("val", "val_indices")):
        xs, ys = b.split(split).tensors
        rows = b.meta[key]
        np.testing.assert_array_equal(ys.numpy(), arrays["train-labels-idx1-ubyte"][rows])
        np.testing.assert_allclose(unscale(b, xs)[:, 0],
                                   arrays["train-images-idx3-ubyte"][rows], atol=1e-3)
    if name == "fashion-mnist":
        assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"


def test_idx_val_rows_not_in_train():
    fake_mnist(paths.DATASETS / "mnist", gz=False)
    b = data.load("mnist", val_size=30)
    train_rows = {row.numpy().tobytes() for row in b.train.tensors[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in b.val.tensors[0])
    idx = np.concatenate([b.meta["train_indices"], b.meta["val_indices"]])
    assert sorted(idx.tolist()) == list(range(N_TRAIN))


def test_local_folder_searched_before_system():
    fake_mnist(paths.DATASETS / "mnist", gz=False, seed=1)
    fake_mnist(paths.SYSTEM_DATASETS / "mnist", gz=True, seed=2)
    assert data.load("mnist", val_size=10).meta["source"] == str(paths.DATASETS / "mnist")


def test_system_folder_used_and_incomplete_local_skipped():
    arrays = fake_mnist(paths.SYSTEM_DATASETS / "fashion-mnist", gz=True)
    # An incomplete local copy (one file missing) must not shadow the system one.
    write_idx(paths.DATASETS / "fashion-mnist" / "train-images-idx3-ubyte",
              arrays["train-images-idx3-ubyte"])
    b = data.load("fashion-mnist", val_size=10)
    assert b.meta["source"] == str(paths.SYSTEM_DATASETS / "fashion-mnist")


def test_idx_inconsistent_files_raise():
    folder = paths.DATASETS / "mnist"
    arrays = fake_mnist(folder, gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:-1])
    with pytest.raises(ValueError, match="labels"):
        data.load("mnist", val_size=10)


def test_missing_fashion_mnist_explains_how_to_get_it():
    with pytest.raises(data.DatasetNotAvailable) as info:
        data.load("fashion-mnist")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message
    assert str(paths.DATASETS / "fashion-mnist") in message
    assert str(paths.SYSTEM_DATASETS / "fashion-mnist") in message
    assert "train-images-idx3-ubyte" in message


@pytest.mark.parametrize("name, needle", [("mnist", "t10k-labels-idx1-ubyte"),
                                          ("cifar10", "cifar-10-python.tar.gz"),
                                          ("cifar100", "cifar-100-python.tar.gz")])
def test_missing_other_datasets_explain_how_to_get_them(name, needle):
    with pytest.raises(data.DatasetNotAvailable) as info:
        data.load(name)
    message = str(info.value)
    assert "download=True" in message and needle in message
    assert "apt-get" not in message  # no Debian package to point at for these


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False], ids=["py2-pickles", "py3-pickles"])
def test_load_cifar10_folder(py2):
    arrays = fake_cifar(paths.DATASETS / "cifar10", "cifar10", py2=py2)
    b = data.load("cifar10", val_size=20)
    assert (len(b.train), len(b.val), len(b.test)) == (N_TRAIN - 20, 20, N_TEST)
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert b.classes == CIFAR10_NAMES
    x, y = b.test.tensors
    np.testing.assert_array_equal(y.numpy(), arrays["y_test"])
    raw = arrays["x_test"].reshape(-1, 3, 32, 32)  # channel-major rows
    np.testing.assert_allclose(unscale(b, x), raw, atol=1e-3)
    xt, yt = b.train.tensors
    np.testing.assert_array_equal(yt.numpy(), arrays["y"][b.meta["train_indices"]])
    # Channel 0 was darkened and channel 2 brightened: the recorded means follow the channels.
    assert b.meta["mean"][0] < b.meta["mean"][1] < b.meta["mean"][2]


def test_load_cifar100_from_tarball():
    build = paths.DATASETS.parent / "build"
    arrays = fake_cifar(build, "cifar100")
    make_tar(arrays["folder"], paths.DATASETS / "cifar100" / "cifar-100-python.tar.gz")
    b = data.load("cifar100", val_size=20)
    assert b.num_classes == 100 and len(b.classes) == 100 and b.classes[7] == "class007"
    assert b.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(b.test.tensors[1].numpy(), arrays["y_test"])
    extracted = paths.DATASETS / "cifar100" / "cifar-100-python"
    assert b.meta["source"] == str(extracted) and (extracted / "meta").is_file()
    assert not any(p.name.startswith(".extract-") for p in extracted.parent.iterdir())


def test_cifar_system_tarball_extracted_into_local_folder():
    arrays = fake_cifar(paths.DATASETS.parent / "build", "cifar10")
    make_tar(arrays["folder"], paths.SYSTEM_DATASETS / "cifar10" / "cifar-10-python.tar.gz")
    b = data.load("cifar10", val_size=20)
    assert b.meta["source"] == str(paths.DATASETS / "cifar10" / "cifar-10-batches-py")


def test_cifar_normalisation_per_channel():
    fake_cifar(paths.DATASETS / "cifar10", "cifar10")
    x = data.load("cifar10", val_size=20).train.tensors[0].double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-5)


class _RunsCommand:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("payload", ["system", "exec"])
def test_malicious_cifar_pickle_is_refused(tmp_path, payload):
    folder = fake_cifar(paths.DATASETS / "cifar10", "cifar10")["folder"]
    marker = tmp_path / "pwned"
    evil = (_RunsCommand(os.system, f"touch {marker}") if payload == "system"
            else _RunsCommand(exec, f"open({str(marker)!r}, 'w').close()"))
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f, protocol=4)
    with pytest.raises(data.UnsafePickleError, match=f"refusing to unpickle .*{payload}") as info:
        data.load("cifar10", val_size=20)
    assert "data_batch_3" in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_cifar_pickle_with_wrong_content_raises():
    folder = fake_cifar(paths.DATASETS / "cifar10", "cifar10")["folder"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\(n, 3072\)"):
        data.load("cifar10", val_size=20)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", val_size=20)


# --------------------------------------------------------------------------------------------
# mnist1d
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist1d_root(tmp_path_factory) -> Path:
    """A datasets folder with the MNIST-1D cache generated once for the whole session."""
    root = tmp_path_factory.mktemp("mnist1d-datasets")
    old = paths.DATASETS
    paths.DATASETS = root
    try:
        data_readers.mnist1d_arrays()
    finally:
        paths.DATASETS = old
    return root


def test_mnist1d_shapes(mnist1d_root, monkeypatch):
    monkeypatch.setattr(paths, "DATASETS", mnist1d_root)
    b = data.load("mnist1d")
    assert (len(b.train), len(b.val), len(b.test)) == (3500, 500, 1000)
    assert b.input_shape == (1, 40) and b.num_classes == 10 and b.classes == list("0123456789")
    x, y = b.batch("train", n=1000, seed=0)
    assert x.shape == (1000, 1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(b.test.tensors[1].tolist()) == set(range(10))
    with np.load(mnist1d_root / "mnist1d" / data.MNIST1D_FILE, allow_pickle=False) as npz:
        assert npz["x"].shape == (4000, 40) and npz["x_test"].shape == (1000, 40)


def test_mnist1d_regenerates_identically_and_keeps_global_rng(mnist1d_root, monkeypatch):
    monkeypatch.setattr(paths, "DATASETS", mnist1d_root)
    first = data.load("mnist1d")
    cache = mnist1d_root / "mnist1d" / data.MNIST1D_FILE
    cache.unlink()
    data.clear_cache()
    np.random.seed(1234)
    random.seed(1234)
    np_state, py_state = np.random.get_state(), random.getstate()
    second = data.load("mnist1d")  # regenerates: make_dataset reseeds the global RNGs
    assert cache.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert cache.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's owner-only mode
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state
    assert second is not first
    for split in data.SPLITS:
        for a, b in zip(first.split(split).tensors, second.split(split).tensors):
            assert torch.equal(a, b)


def test_mnist1d_damaged_cache_is_regenerated(mnist1d_root, monkeypatch, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(mnist1d_root, root)
    good = np.load(root / "mnist1d" / data.MNIST1D_FILE)["x"]
    monkeypatch.setattr(data_readers, "generate_mnist1d",
                        lambda: {"x": good, "y": np.zeros(4000, np.int64),
                                 "x_test": good[:1000], "y_test": np.zeros(1000, np.int64)})
    (root / "mnist1d" / data.MNIST1D_FILE).write_bytes(b"not a zip")
    monkeypatch.setattr(paths, "DATASETS", root)
    arrays, _ = data_readers.mnist1d_arrays()
    np.testing.assert_array_equal(arrays["x"], good)
    with np.load(root / "mnist1d" / data.MNIST1D_FILE, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["x"], good)


# --------------------------------------------------------------------------------------------
# Real Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------


def test_real_fashion_mnist(monkeypatch):
    folder = REAL_SYSTEM_DATASETS / "fashion-mnist"
    if data_readers.idx_files(folder) is None:
        pytest.skip(f"real Fashion-MNIST not in {folder}: "
                    "sudo apt-get install dataset-fashion-mnist (or make sysdeps)")
    monkeypatch.setattr(paths, "SYSTEM_DATASETS", REAL_SYSTEM_DATASETS)
    b = data.load("fashion-mnist")
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert b.classes[0] == "T-shirt/top"
    assert b.meta["source"] == str(folder)
    assert torch.bincount(b.test.tensors[1]).tolist() == [1000] * 10  # balanced test set
    x, y = b.batch("train", n=1000, seed=0)
    assert x.shape == (1000, 1, 28, 28) and y.dtype == torch.int64
    assert abs(b.meta["mean"][0] - 0.286) < 0.01 and abs(b.meta["std"][0] - 0.353) < 0.01
