"""File readers of the datasets :func:`prunelab.data.load` knows: IDX files (MNIST,
Fashion-MNIST), CIFAR's python pickles (read with a restricted unpickler that builds only numpy
arrays and builtin containers), MNIST-1D's generated ``.npz`` cache and scikit-learn's digits.

Each dataset reader returns the official train and test arrays (:class:`Raw`); holding out the
validation split and standardising is :mod:`prunelab.data`'s job. Files are searched under
``paths.DATASETS / name``, then ``paths.SYSTEM_DATASETS / name``; missing files are downloaded
(:mod:`prunelab.download`) only when asked. Only numpy, torch and the standard library are
imported at module level.
"""
from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from prunelab import paths
from prunelab.download import URLS, DatasetNotAvailable, download_file, publish, safe_extract


__all__ = ["IDX_FILES", "MNIST1D_FILE", "FASHION_CLASSES", "DIGIT_CLASSES", "DIGITS_TEST_SIZE",
           "DIGITS_SPLIT_SEED", "UnsafePickleError", "Raw", "search_dirs", "generate_mnist1d",
           "mnist1d_arrays", "read_mnist1d", "read_digits", "read_idx", "idx_files",
           "read_idx_dataset", "read_cifar", "not_available_message"]


def __dir__():
    return sorted(__all__)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST1D_FILE = "mnist1d-5000-seed42.npz"

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]

# sklearn's digits come as one pool of 1,797 images; this fixed split makes its test set the
# same for every ``seed`` (``seed`` only moves the validation hold-out).
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a Python object outside the small set a dataset file may contain."""


class Raw(NamedTuple):
    """Official train and test arrays of a dataset, before the val hold-out and scaling."""

    x_train: np.ndarray  # (n, *input_shape), any numeric dtype
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str
    pixel_scale: float  # multiplies raw values (e.g. 1/255) before standardising
    extra: dict[str, Any]


def search_dirs(name: str) -> list[Path]:
    """Returns the folders searched for ``name``, in order (read at call time for tests)."""
    return [Path(paths.DATASETS) / name, Path(paths.SYSTEM_DATASETS) / name]


# --------------------------------------------------------------------------------------------
# mnist1d and digits (generated / bundled, never downloaded)
# --------------------------------------------------------------------------------------------


def generate_mnist1d() -> dict[str, np.ndarray]:
    """Returns MNIST-1D's x, y, x_test, y_test from the mnist1d generator (5000 samples, seed 42)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 5000
    args.train_split = 0.8
    args.seed = 42
    # make_dataset reseeds numpy's and python's global RNGs; callers must not notice.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def mnist1d_arrays() -> tuple[dict[str, np.ndarray], Path]:
    """Returns the MNIST-1D arrays and their cache file, generating the file if needed."""
    cache = Path(paths.DATASETS) / "mnist1d" / MNIST1D_FILE
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                return {k: npz[k] for k in ("x", "y", "x_test", "y_test")}, cache
        except (OSError, ValueError, KeyError, zlib.error, EOFError):
            pass  # a damaged cache is regenerated below
    arrays = generate_mnist1d()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        publish(tmp, cache)
    except OSError as e:  # a read-only data folder costs a regeneration next time, no more
        print(f"prunelab: could not cache MNIST-1D at {cache}: {e}", file=sys.stderr)
    return arrays, cache


def read_mnist1d(download: bool) -> Raw:
    """MNIST-1D (5000 samples, seed 42) from its ``.npz`` cache, generated when missing."""
    arrays, cache = mnist1d_arrays()
    return Raw(
        x_train=arrays["x"], y_train=arrays["y"], x_test=arrays["x_test"],
        y_test=arrays["y_test"], classes=DIGIT_CLASSES, source=str(cache), pixel_scale=1.0,
        extra={"generator": "mnist1d.data.make_dataset(num_samples=5000, seed=42)"},
    )


def read_digits(download: bool) -> Raw:
    """scikit-learn's 8x8 digits, with a fixed test split of ``DIGITS_TEST_SIZE`` images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = np.asarray(digits.data), np.asarray(digits.target)
    perm = torch.randperm(
        len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    ).numpy()
    test_idx = np.sort(perm[:DIGITS_TEST_SIZE])
    train_idx = np.sort(perm[DIGITS_TEST_SIZE:])
    return Raw(
        x_train=x[train_idx], y_train=y[train_idx], x_test=x[test_idx], y_test=y[test_idx],
        classes=DIGIT_CLASSES, source="sklearn.datasets.load_digits", pixel_scale=1 / 16,
        extra={"digits_test_indices": test_idx, "digits_split_seed": DIGITS_SPLIT_SEED},
    )


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, str] = {
    0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Returns the array stored in an IDX file (plain or gzip-compressed), in native byte order.

    Format: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian int32 per dimension,
    then the big-endian data.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a well-formed IDX file; the message names it and says why.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, whatever the name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file: {len(raw)} bytes, shorter than the header")
    if raw[:2] != b"\x00\x00":
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(the first two bytes must be zero)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x} in the magic number")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes after the data"
        raise ValueError(
            f"{path}: {what}: dims {list(dims)} of {dtype.name} need {expected} data bytes, "
            f"found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a writable native-order copy


def idx_files(folder: Path) -> dict[str, Path] | None:
    """Returns the four IDX files in ``folder`` (each plain or ``.gz``), or None if any is missing."""
    found: dict[str, Path] = {}
    for stem in IDX_FILES:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[stem] = candidate
                break
        else:
            return None
    return found


def read_idx_dataset(name: str, download: bool, classes: list[str]) -> Raw:
    """MNIST-like dataset ``name`` from its four IDX files, downloaded if allowed and missing."""
    files = None
    for folder in search_dirs(name):
        files = idx_files(folder)
        if files:
            break
    if files is None:
        if not download:
            raise DatasetNotAvailable(not_available_message(name))
        files = _download_idx(name)
    x_train = read_idx(files["train-images-idx3-ubyte"])
    y_train = read_idx(files["train-labels-idx1-ubyte"])
    x_test = read_idx(files["t10k-images-idx3-ubyte"])
    y_test = read_idx(files["t10k-labels-idx1-ubyte"])
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise ValueError(
                f"{name}: {split} images must be (n, 28, 28) and labels (n,), got "
                f"{images.shape} and {labels.shape} in {files[f'{split}-images-idx3-ubyte'].parent}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {len(images)} {split} images but {len(labels)} labels in "
                f"{files[f'{split}-images-idx3-ubyte'].parent}"
            )
    return Raw(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes,
        source=str(files["train-images-idx3-ubyte"].parent), pixel_scale=1 / 255, extra={},
    )


def _download_idx(name: str) -> dict[str, Path]:
    """Downloads the missing IDX files of ``name`` into ``paths.DATASETS / name``."""
    folder = Path(paths.DATASETS) / name
    for stem in IDX_FILES:
        if (folder / stem).is_file() or (folder / f"{stem}.gz").is_file():
            continue  # keep what an earlier, interrupted download already got
        filename = f"{stem}.gz"
        download_file(name, URLS[name] + filename, folder / filename, verify=read_idx,
                      unavailable=not_available_message(name))
    files = idx_files(folder)
    assert files is not None
    return files


# --------------------------------------------------------------------------------------------
# CIFAR (python pickles)
# --------------------------------------------------------------------------------------------


class _CifarLayout(NamedTuple):
    folder: str
    archive: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_CIFAR: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 moved the implementation; importing numpy.core there warns
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds builtin containers and numpy arrays, and refuses every other class.

    A pickle can call any importable function while loading; CIFAR's files only need the
    globals numpy uses to rebuild an ndarray, so those four are the whole allow-list.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # keys of the py2-era files are bytes
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise UnsafePickleError(
                f"{self.path}: refusing to unpickle {module}.{name}: a CIFAR batch holds only "
                "dicts, lists, bytes, str, ints and numpy arrays, so this file is not a genuine "
                "CIFAR file (it may be malicious)"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def _unpickle(path: Path) -> dict:
    """Returns the dict in a CIFAR pickle, read with :class:`_RestrictedUnpickler`."""
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # garbage bytes fail in many ways (KeyError, struct.error, ...)
            raise ValueError(f"{path}: not a readable CIFAR pickle ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(d: dict, key: str, path: Path) -> Any:
    """Returns ``d[key]``, whether the file's keys are bytes (python 2 pickles) or str."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: missing key {key!r} (found {sorted(map(repr, d))})")


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = _get(d, "data", path)
    labels = np.asarray(_get(d, label_key, path))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        shape = getattr(data, "shape", None)
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got {shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values), i.e. 3x32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_complete(folder: Path, layout: _CifarLayout) -> bool:
    return all((folder / f).is_file() for f in (*layout.train, layout.test, layout.meta))


def _find_cifar(name: str, download: bool) -> Path:
    """Returns the folder holding ``name``'s pickles, extracting or downloading if needed."""
    layout = _CIFAR[name]
    for root in search_dirs(name):
        # The extracted folder, or its files copied straight into the dataset folder.
        for folder in (root / layout.folder, root):
            if _cifar_complete(folder, layout):
                return folder
        archive = root / layout.archive
        if archive.is_file():
            return _extract_cifar(name, archive)
    if not download:
        raise DatasetNotAvailable(not_available_message(name))
    archive = Path(paths.DATASETS) / name / layout.archive
    download_file(name, URLS[name], archive, verify=lambda p: _check_cifar_archive(p, layout),
                  unavailable=not_available_message(name))
    return _extract_cifar(name, archive)


def _check_cifar_archive(archive: Path, layout: _CifarLayout) -> None:
    """Raises ValueError unless ``archive`` is a tarball with the CIFAR files in it."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: not a readable tar archive ({e})") from None
    wanted = {f"{layout.folder}/{f}" for f in (*layout.train, layout.test, layout.meta)}
    if not wanted <= members:
        raise ValueError(f"{archive}: missing {sorted(wanted - members)}")


def _extract_cifar(name: str, archive: Path) -> Path:
    layout = _CIFAR[name]
    dest = Path(paths.DATASETS) / name
    safe_extract(archive, dest)
    folder = dest / layout.folder
    if not _cifar_complete(folder, layout):
        raise ValueError(
            f"{archive}: extracted, but {folder} lacks some of "
            f"{[*layout.train, layout.test, layout.meta]}"
        )
    return folder


def read_cifar(name: str, download: bool, num_classes: int) -> Raw:
    """CIFAR-10/100 (``name``) from its python pickles, extracted or downloaded if needed."""
    layout = _CIFAR[name]
    folder = _find_cifar(name, download)
    train = [_read_cifar_batch(folder / f, layout.label_key) for f in layout.train]
    x_test, y_test = _read_cifar_batch(folder / layout.test, layout.label_key)
    meta_path = folder / layout.meta
    label_names = _get(_unpickle(meta_path), layout.names_key, meta_path)
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in label_names]
    if len(classes) != num_classes:
        raise ValueError(f"{meta_path}: expected {num_classes} class names, got {len(classes)}")
    return Raw(
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test, y_test=y_test, classes=classes, source=str(folder),
        pixel_scale=1 / 255, extra={},
    )


def not_available_message(name: str) -> str:
    """Returns the help text of a DatasetNotAvailable: where we looked, how to get the files."""
    searched = "\n".join(f"  {d}" for d in search_dirs(name))
    local = Path(paths.DATASETS) / name
    if name in _CIFAR:
        layout = _CIFAR[name]
        wanted = f"{layout.folder}/ (extracted) or {layout.archive}"
        copy = f"copy {layout.archive} (or the extracted {layout.folder}/ folder) into {local}/"
    else:
        wanted = ", ".join(IDX_FILES) + " (each optionally .gz)"
        copy = f"copy the four IDX files ({', '.join(IDX_FILES)}, .gz or not) into {local}/"
    ways = []
    if name == "fashion-mnist":
        ways.append(
            "on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
            f"(installs {Path(paths.SYSTEM_DATASETS) / name})"
        )
    ways.append(copy)
    ways.append(
        f'download it: pl.data.load("{name}", download=True), or set PRUNELAB_DOWNLOAD=1 '
        f"(fetches {URLS[name]})"
    )
    return (
        f"dataset {name!r} is not available: looked for {wanted} in\n{searched}\n"
        "To get it, do one of:\n" + "\n".join(f"  - {w}" for w in ways)
    )
