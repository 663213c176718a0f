"""Dataset files written for the tests of prunelab.data, data_readers and download (tiny
real-format IDX files, CIFAR pickles and tarballs), and the ``isolated`` fixture: both dataset
roots in tmp folders, downloads forbidden. Test modules import ``isolated`` to use it."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab import data, download, paths

REAL_SYSTEM_DATASETS = paths.SYSTEM_DATASETS
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
N_TRAIN, N_TEST = 120, 30


# --------------------------------------------------------------------------------------------
# Fixtures and file writers
# --------------------------------------------------------------------------------------------


def _no_network(url: str, dest: Path) -> None:
    raise AssertionError(f"test tried to download {url}")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Points both dataset roots at empty tmp folders and forbids real downloads."""
    monkeypatch.setattr(paths, "DATASETS", tmp_path / "datasets")
    monkeypatch.setattr(paths, "SYSTEM_DATASETS", tmp_path / "system")
    monkeypatch.delenv("PRUNELAB_DOWNLOAD", raising=False)
    monkeypatch.setattr(download, "fetch", _no_network)
    data.clear_cache()
    yield
    data.clear_cache()  # bundles can be large (real Fashion-MNIST): do not keep them around


_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
              np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fake_mnist(folder: Path, gz: bool, seed: int = 0, n_train: int = N_TRAIN,
               n_test: int = N_TEST) -> dict[str, np.ndarray]:
    """Writes the four IDX files of a tiny MNIST-like dataset; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz=gz)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Pickles bytes and str as python 2 strings, as in the real CIFAR files.

    Loaded with ``encoding="bytes"`` they come back as bytes, which is what the readers see on
    genuine files (keys like b"data", class names like b"airplane").
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string


def dump_cifar_pickle(obj: dict, path: Path, py2: bool) -> None:
    """Writes ``obj`` as a python-2-style protocol 2 pickle, or a protocol 4 python 3 one."""
    if py2:
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # Files written by numpy 1.x name the old module; numpy 2 writes numpy._core.
        path.write_bytes(
            buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        )
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)


def fake_cifar(root: Path, name: str, py2: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a tiny CIFAR-10/100 "python version" folder under ``root``; returns the arrays."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100
    x = rng.integers(0, 256, (N_TRAIN, 3072), dtype=np.uint8)
    # Distinct channel brightness, so channel-major order is checked by the per-channel means.
    x[:, :1024] //= 4
    x[:, 2048:] = 255 - x[:, 2048:] // 4
    y = rng.integers(0, n_classes, N_TRAIN)
    x_test = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8)
    y_test = rng.integers(0, n_classes, N_TEST)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, rows in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
            dump_cifar_pickle({b"batch_label": b"training batch %d of 5" % i,
                               b"labels": y[rows].tolist(), b"data": x[rows],
                               b"filenames": [b"img_%d.png" % r for r in rows]},
                              folder / f"data_batch_{i}", py2)
        dump_cifar_pickle({b"batch_label": b"testing batch 1 of 1", b"labels": y_test.tolist(),
                           b"data": x_test}, folder / "test_batch", py2)
        dump_cifar_pickle({b"num_cases_per_batch": N_TRAIN // 5, b"num_vis": 3072,
                           b"label_names": [n.encode() for n in CIFAR10_NAMES]},
                          folder / "batches.meta", py2)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump_cifar_pickle({b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
                           b"data": x}, folder / "train", py2)
        dump_cifar_pickle({b"fine_labels": y_test.tolist(),
                           b"coarse_labels": (y_test // 5).tolist(), b"data": x_test},
                          folder / "test", py2)
        dump_cifar_pickle({b"fine_label_names": [b"class%03d" % i for i in range(100)],
                           b"coarse_label_names": [b"super%02d" % i for i in range(20)]},
                          folder / "meta", py2)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test, "folder": folder}


def make_tar(folder: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def unscale(bundle: data.Bundle, x: torch.Tensor) -> np.ndarray:
    """Undoes the standardisation and pixel scaling: back to raw values."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.asarray(bundle.meta["mean"]).reshape(shape)
    std = np.asarray(bundle.meta["std"]).reshape(shape)
    return (x.double().numpy() * std + mean) / bundle.meta["pixel_scale"]
