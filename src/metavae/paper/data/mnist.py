"""MNIST from the official IDX files: a strict reader, a local-folder loader and a checked download.

The reference used torchvision's MNIST; we read the same official files ourselves so the package
needs no torchvision, and so a local folder holding any consistent IDX pair (e.g. a subset of the
training set) works offline.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...io import DownloadError, cache_root

__all__ = [
    "FILES",
    "MD5",
    "MIRRORS",
    "DownloadError",
    "download_file",
    "load_mnist",
    "mnist_cache_dir",
    "read_idx",
]

logger = logging.getLogger(__name__)

# Official (stem) names per split: (images, labels).
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# md5 of the official gzip files, checked after every download.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Tried in order; the first whose file has the right md5 wins.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# IDX magic -> number of dimensions; both hold unsigned bytes.
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- IDX reading


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic (whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (labels 0x801, images 0x803), gzip or plain, strictly.

    Truncated data and trailing bytes are both errors: either means a damaged or wrong file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no complete header)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(f"{path}: bad IDX magic 0x{magic:08x}; expected 0x00000801 (uint8 labels) "
                         f"or 0x00000803 (uint8 images)")
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected, got = int(np.prod(shape)), len(data) - header
    if got < expected:
        raise ValueError(f"{path}: truncated IDX data: header promises shape {shape} "
                         f"({expected} bytes) but only {got} bytes follow")
    if got > expected:
        raise ValueError(f"{path}: {got - expected} unexpected trailing bytes after the "
                         f"{expected} bytes of shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


# --------------------------------------------------------------------------- download


def mnist_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where downloads go: <cache_dir or $METAVAE_DATA or ~/.cache/metavae>/mnist."""
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "mnist"


def fetch_url(url: str, dest: str | os.PathLike) -> None:
    """Download url to dest (every data set's downloader uses it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "metavae"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _fetch(url: str, dest: str | os.PathLike) -> None:
    """MNIST's download step: module-level so tests can monkeypatch it and stay offline."""
    fetch_url(url, dest)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(filename: str, dest_dir: str | os.PathLike, mirrors=MIRRORS,
                  md5: str | None = None) -> Path:
    """Fetch one official file into dest_dir, md5-checked, via a temp file and atomic rename.

    A partial or wrong file never appears under the final name; each mirror is tried in turn.
    """
    if md5 is None and filename not in MD5:
        raise ValueError(f"no known md5 for {filename!r}; known files: {sorted(MD5)}")
    return fetch_verified(filename, dest_dir, mirrors, md5 or MD5[filename], _fetch)


def fetch_verified(filename: str, dest_dir: str | os.PathLike, mirrors: Sequence[str], expected: str,
                   fetch) -> Path:
    """Try each mirror in turn: download to a temp file, check its md5, rename it into place.
    Shared by every data set's downloader (MNIST, smallNORB); ``fetch(url, dest)`` does the I/O."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    failures = []
    for mirror in mirrors:
        url = mirror + filename
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s", url)
            fetch(url, tmp)
            got = _md5(tmp)
            if got != expected:
                failures.append(f"{url}: md5 mismatch (got {got}, expected {expected})")
                continue
            os.replace(tmp, dest)
            return dest
        except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts; IncompleteRead
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(f"could not download {filename} into {dest_dir}: " + "; ".join(failures))


# --------------------------------------------------------------------------- loading


def _find(folder: Path, stem: str) -> Path | None:
    """The file for an official stem: gzip or plain, hyphen or dot before 'idx'."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def _locate(folder: Path, stem: str, download: bool, from_cache: bool) -> Path:
    found = _find(folder, stem)
    if found is not None and from_cache and found.name in MD5 and _md5(found) != MD5[found.name]:
        # our own cache is re-checked on every read: a damaged or replaced file is fetched again
        logger.warning("cached %s fails its md5 check; %s", found, "downloading it again" if download else "ignored")
        if not download:
            raise ValueError(f"cached MNIST file {found} is damaged (md5 mismatch); delete it or allow the download")
        found.unlink()
        found = None
    if found is not None:
        return found
    if from_cache and download:
        return download_file(stem + ".gz", folder)
    hint = "pass download=True" if from_cache else "or use data_dir=None to download into the cache"
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {folder} ({hint})")


def load_mnist(data_dir: str | os.PathLike | None = None, split: str = "train",
               download: bool = True, cache_dir: str | os.PathLike | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 28, 28), labels int64 (n,)) of one MNIST split.

    With data_dir, read the IDX pair found there (any consistent pair, never written to);
    without, use the cache folder (see `mnist_cache_dir`) and download missing official files.
    """
    if split not in FILES:
        raise ValueError(f"unknown MNIST split {split!r}; expected 'train' or 'test'")
    from_cache = data_dir is None
    folder = mnist_cache_dir(cache_dir) if from_cache else Path(data_dir).expanduser()
    image_path, label_path = (_locate(folder, stem, download, from_cache) for stem in FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise ValueError(f"{image_path}: expected an image file (3-D IDX), got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{label_path}: expected a label file (1-D IDX), got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"inconsistent MNIST {split} pair: {image_path} holds {len(images)} images "
                         f"but {label_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        i = int(np.argmax(labels > 9))
        raise ValueError(f"{label_path}: label {int(labels[i])} at index {i} is not a digit 0-9; "
                         f"{int((labels > 9).sum())} such label(s). Is this an MNIST label file?")
    logger.info("read %d MNIST %s images (%dx%d) from %s", len(images), split,
                images.shape[1], images.shape[2], folder)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
