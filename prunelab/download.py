"""Downloads and archive extraction for the dataset readers (:mod:`prunelab.data_readers`).

Every download is atomic (a temporary file renamed into place) and checked: by the upstream MD5
where one is known (:data:`MD5`), else by the reader's own structural check. Tar archives are
extracted by :func:`safe_extract`, which refuses members that could land outside the target.
Standard library only.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable

__all__ = ["DatasetNotAvailable", "URLS", "MD5", "fetch", "md5", "download_file", "publish",
           "safe_extract"]



def __dir__():
    return sorted(__all__)

# Upstream locations of the files ``download=True`` fetches.
URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

# MD5 of the upstream files (the values torchvision checks). They identify downloads only:
# Debian's dataset-fashion-mnist recompresses the .gz files, so local files are never hashed.
# A file missing here is verified by its structure instead.
MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
}


class DatasetNotAvailable(FileNotFoundError):
    """A dataset's files are not on this machine and downloading was not allowed."""



def fetch(url: str, dest: Path) -> None:
    """Writes the body of ``url`` to ``dest`` (tests replace this to avoid the network)."""
    request = urllib.request.Request(url, headers={"User-Agent": "prunelab"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def md5(path: Path) -> str:
    """Hex MD5 of the file at ``path`` (identifies a download; not a security check)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(name: str, url: str, dest: Path, verify: Callable[[Path], Any], *,
                  unavailable: str = "") -> None:
    """Downloads ``url`` to ``dest`` atomically, checking its MD5 (:data:`MD5` of dataset
    ``name``), or ``verify`` without one. ``unavailable`` is the help text appended to the
    :class:`DatasetNotAvailable` of a failed fetch.

    Raises:
        DatasetNotAvailable: The fetch failed.
        ValueError: The file arrived but is not the expected one; nothing is left behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"prunelab: downloading {url} -> {dest}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            fetch(url, tmp)
        except OSError as e:  # URLError and socket timeouts are OSErrors
            raise DatasetNotAvailable(
                f"downloading {url} failed ({e}).\n" + unavailable
            ) from e
        expected = MD5.get(name, {}).get(dest.name)
        if expected is not None:
            got = md5(tmp)
            if got != expected:
                raise ValueError(
                    f"{url}: MD5 {got} does not match the expected {expected}; "
                    "the download is corrupt or the upstream file changed"
                )
        else:
            try:
                verify(tmp)
            except ValueError as e:
                raise ValueError(f"{url}: downloaded file is malformed: {e}") from None
        publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, dest: Path) -> None:
    """Renames a finished temporary file onto ``dest`` with ordinary permissions."""
    # tempfile creates files readable by their owner only; a shared data folder needs the
    # permissions any other new file would get under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extracts a tar archive into ``dest``, refusing members that could land outside it.

    Members with absolute paths or ``..`` components, links and device files are rejected
    before anything is written. Extraction goes to a temporary folder inside ``dest`` whose
    top-level entries are then renamed into place, so an interrupted run leaves no half tree.

    Raises:
        ValueError: Unsafe member, or an unreadable archive.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name.replace("\\", "/")).parts
                if m.name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
                    raise ValueError(f"{archive}: refusing unsafe member path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise ValueError(
                        f"{archive}: refusing member {m.name!r}: only regular files and "
                        "folders are extracted (found a link or special file)"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                # The "data" filter (Python >= 3.11.4) is a second line of defence.
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
                for child in tmp.iterdir():
                    target = dest / child.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(child, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: not a readable tar archive ({e})") from None
