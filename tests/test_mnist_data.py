"""IDX reading, local loading and the (offline, monkeypatched) download of MNIST."""

import gzip
import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metavae.paper.data import mnist

TRAIN_LABEL_COUNTS = [2406, 2770, 2381, 2524, 2386, 2181, 2401, 2524, 2328, 2444]


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _small_pair(n_images=5, n_labels=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    return images, rng.integers(0, 10, n_labels, dtype=np.uint8)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any real fetch in these tests is a bug."""
    def refuse(url, dest):
        raise AssertionError(f"test tried to reach the network: {url}")
    monkeypatch.setattr(mnist, "_fetch", refuse)


# --------------------------------------------------------------------------- shared real files


def test_shared_train_and_test_counts(shared_mnist, caplog):
    folder = shared_mnist
    with caplog.at_level(logging.INFO, logger="metavae.paper.data.mnist"):
        x, y = mnist.load_mnist(folder, "train", download=False)
    assert x.shape == (24345, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (24345,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    assert "24345" in caplog.text
    xt, yt = mnist.load_mnist(folder, "test", download=False)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert int(yt.min()) == 0 and int(yt.max()) == 9


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    images, labels = _small_pair()
    # gzip is detected from the magic bytes, not the name: no .gz suffix here
    assert np.array_equal(mnist.read_idx(_write_idx(tmp_path / "img", images, compress)), images)
    assert np.array_equal(mnist.read_idx(_write_idx(tmp_path / "lab", labels, compress)), labels)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        mnist.read_idx(tmp_path / "nope.gz")


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes((0x0802).to_bytes(4, "big") + bytes(12))
    with pytest.raises(ValueError, match=r"bad.*magic 0x00000802"):
        mnist.read_idx(path)


def test_read_idx_truncated_plain(tmp_path):
    images, _ = _small_pair()
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(images)[:-10])
    with pytest.raises(ValueError, match=r"short.*truncated"):
        mnist.read_idx(path)
    path.write_bytes(_idx_bytes(images)[:9])  # cut inside the header
    with pytest.raises(ValueError, match="truncated"):
        mnist.read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    images, _ = _small_pair()
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_idx_bytes(images))[:-20])
    with pytest.raises(ValueError, match=r"short\.gz.*truncated"):
        mnist.read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    _, labels = _small_pair()
    path = tmp_path / "long"
    path.write_bytes(_idx_bytes(labels) + b"xx")
    with pytest.raises(ValueError, match="2 unexpected trailing bytes"):
        mnist.read_idx(path)


# --------------------------------------------------------------------------- load_mnist (local)


def test_load_local_mixed_gzip_and_plain(tmp_path, caplog):
    images, labels = _small_pair(7, 7)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)
    with caplog.at_level(logging.INFO, logger="metavae.paper.data.mnist"):
        x, y = mnist.load_mnist(tmp_path, "test")
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    assert "read 7 MNIST test images" in caplog.text


def test_load_local_inconsistent_counts(tmp_path):
    images, labels = _small_pair(5, 4)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    message = r"train-images-idx3-ubyte holds 5 images.*train-labels-idx1-ubyte holds 4"
    with pytest.raises(ValueError, match=message):
        mnist.load_mnist(tmp_path, "train")


def test_load_local_swapped_files(tmp_path):
    images, labels = _small_pair()
    _write_idx(tmp_path / "train-images-idx3-ubyte", labels, compress=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", images, compress=False)
    with pytest.raises(ValueError, match="expected an image file"):
        mnist.load_mnist(tmp_path, "train")


def test_load_local_missing_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist.load_mnist(tmp_path, "train", download=True)


def test_load_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'valid'"):
        mnist.load_mnist(tmp_path, "valid")


# --------------------------------------------------------------------------- download (offline)


def _copying_fetch(source_dir: Path, calls: list):
    def fetch(url, dest):
        calls.append(url)
        shutil.copyfile(source_dir / url.rsplit("/", 1)[-1], dest)
    return fetch


def test_shared_test_files_are_official(shared_mnist):
    folder = shared_mnist
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == mnist.MD5[name]


def test_download_into_cache(shared_mnist, tmp_path, monkeypatch):
    folder = shared_mnist
    calls = []
    monkeypatch.setattr(mnist, "_fetch", _copying_fetch(folder, calls))
    x, y = mnist.load_mnist(split="test", cache_dir=tmp_path)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    cached = sorted(p.name for p in (tmp_path / "mnist").iterdir())
    assert cached == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # no temp files left
    assert calls[0] == mnist.MIRRORS[0] + "t10k-images-idx3-ubyte.gz" and len(calls) == 2
    mnist.load_mnist(split="test", cache_dir=tmp_path)  # second load: cache hit, no fetch
    assert len(calls) == 2


def test_download_uses_env_cache(shared_mnist, tmp_path, monkeypatch):
    folder = shared_mnist
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path))
    monkeypatch.setattr(mnist, "_fetch", _copying_fetch(folder, []))
    mnist.load_mnist(split="test")
    assert (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_download_md5_mismatch(tmp_path, monkeypatch):
    def corrupt(url, dest):
        Path(dest).write_bytes(b"not mnist")
    monkeypatch.setattr(mnist, "_fetch", corrupt)
    with pytest.raises(mnist.DownloadError, match=r"t10k-images-idx3-ubyte\.gz.*md5 mismatch"):
        mnist.load_mnist(split="test", cache_dir=tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []  # bad file deleted, nothing half-written


def test_download_falls_back_to_next_mirror(shared_mnist, tmp_path, monkeypatch):
    folder = shared_mnist
    calls = []
    good = _copying_fetch(folder, calls)

    def flaky(url, dest):
        if url.startswith("https://first/"):
            raise OSError("connection refused")
        good(url, dest)
    monkeypatch.setattr(mnist, "_fetch", flaky)
    mirrors = ("https://first/", "https://second/")
    path = mnist.download_file("t10k-labels-idx1-ubyte.gz", tmp_path, mirrors=mirrors)
    assert path.read_bytes() == (folder / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_download_disabled(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        mnist.load_mnist(split="test", cache_dir=tmp_path, download=False)
