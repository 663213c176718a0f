"""Tests of prunelab.download: checked atomic downloads (through a monkeypatched
``download.fetch``, never the network) and safe tar extraction."""
from __future__ import annotations

import io
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from prunelab import data, download, paths

from data_files import (N_TEST, N_TRAIN, fake_cifar, fake_mnist, make_tar, md5, write_idx)
from data_files import isolated  # noqa: F401  (the autouse fixture of these tests)


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
