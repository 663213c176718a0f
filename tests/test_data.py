"""Tests of prunelab.data: readers on real-format files written here, splits, batches, downloads.

The readers live in prunelab.data_readers, downloads in prunelab.download; they are tested here
through ``data.load``, with the fixtures of this file. Nothing touches the network:
``download.fetch`` is replaced by a guard (or by a local copy), and
``paths.DATASETS`` / ``paths.SYSTEM_DATASETS`` point into tmp_path unless a test says otherwise.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import os
import pickle
import random
import shutil
import struct
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab import data, data_readers, download, paths

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
# Downloads (through a monkeypatched _fetch)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local folder standing in for the upstream hosts; returns (folder, fetched urls)."""
    folder = tmp_path / "server"
    folder.mkdir()
    fetched: list[str] = []

    def fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        shutil.copyfile(folder / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(download, "fetch", fetch)
    return folder, fetched


def test_download_idx_with_checksums(server, monkeypatch):
    folder, fetched = server
    arrays = fake_mnist(folder, gz=True)
    monkeypatch.setitem(download.MD5, "fashion-mnist",
                        {p.name: md5(p) for p in folder.iterdir()})
    b = data.load("fashion-mnist", download=True, val_size=10)
    assert len(b.train) == N_TRAIN - 10
    assert sorted(fetched) == sorted(data.URLS["fashion-mnist"] + f"{s}.gz"
                                     for s in data.IDX_FILES)
    dest = paths.DATASETS / "fashion-mnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in data.IDX_FILES)
    np.testing.assert_array_equal(b.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_download_enabled_by_environment(server, monkeypatch):
    folder, fetched = server
    fake_mnist(folder, gz=True)
    monkeypatch.setitem(download.MD5, "mnist", {})  # no checksum: structure is verified instead
    monkeypatch.setenv("PRUNELAB_DOWNLOAD", "1")
    assert len(data.load("mnist", val_size=10).test) == N_TEST
    assert all(url.startswith(data.URLS["mnist"]) for url in fetched) and len(fetched) == 4


def test_download_only_fetches_missing_files(server, monkeypatch):
    folder, fetched = server
    arrays = fake_mnist(folder, gz=True)
    write_idx(paths.DATASETS / "mnist" / "train-images-idx3-ubyte",
              arrays["train-images-idx3-ubyte"])
    monkeypatch.setitem(download.MD5, "mnist", {})
    data.load("mnist", download=True, val_size=10)
    assert len(fetched) == 3 and not any("train-images" in url for url in fetched)


def test_download_bad_checksum_leaves_nothing(server, monkeypatch):
    folder, _ = server
    fake_mnist(folder, gz=True)
    monkeypatch.setitem(download.MD5, "mnist",
                        {f"{s}.gz": "0" * 32 for s in data.IDX_FILES})
    with pytest.raises(ValueError, match="MD5"):
        data.load("mnist", download=True)
    assert list((paths.DATASETS / "mnist").iterdir()) == []


def test_download_malformed_without_checksum_leaves_nothing(server, monkeypatch):
    folder, _ = server
    fake_mnist(folder, gz=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    monkeypatch.setitem(download.MD5, "mnist", {})
    with pytest.raises(ValueError, match="malformed"):
        data.load("mnist", download=True)
    assert not any(p.name.startswith("train-images") or p.suffix == ".part"
                   for p in (paths.DATASETS / "mnist").iterdir())


def test_download_network_error_is_not_available(monkeypatch):
    def fail(url, dest):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(download, "fetch", fail)
    with pytest.raises(data.DatasetNotAvailable, match="no route to host"):
        data.load("mnist", download=True)
    assert list((paths.DATASETS / "mnist").iterdir()) == []


def test_download_cifar10_archive(server, monkeypatch, tmp_path):
    folder, fetched = server
    arrays = fake_cifar(tmp_path / "build", "cifar10")
    archive = make_tar(arrays["folder"], folder / "cifar-10-python.tar.gz")
    monkeypatch.setitem(download.MD5, "cifar10", {archive.name: md5(archive)})
    b = data.load("cifar10", download=True, val_size=20)
    assert fetched == [data.URLS["cifar10"]]
    assert b.meta["source"] == str(paths.DATASETS / "cifar10" / "cifar-10-batches-py")
    np.testing.assert_array_equal(b.test.tensors[1].numpy(), arrays["y_test"])


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


def _tar_with(archive: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return archive


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../escaped.txt"),
    tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt"),
    tarfile.TarInfo("/tmp/prunelab-test-escaped.txt"),
    _symlink("cifar-10-batches-py/link", "/etc/passwd"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_unsafe_tarball_is_refused(tmp_path, member):
    archive = _tar_with(paths.DATASETS / "cifar10" / "cifar-10-python.tar.gz", member)
    with pytest.raises(ValueError, match="refusing"):
        data.load("cifar10")
    assert not (paths.DATASETS / "escaped.txt").exists()
    assert not (paths.DATASETS / "cifar10" / "cifar-10-batches-py").exists()
    assert not Path("/tmp/prunelab-test-escaped.txt").exists()
    assert archive.exists()


def test_corrupt_tarball_raises():
    archive = paths.DATASETS / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        data.load("cifar10")


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
