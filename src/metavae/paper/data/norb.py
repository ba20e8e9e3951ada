"""smallNORB: the official binary matrix files, checked download, grouping and meta-splits.

docs/reproduction.md §5.2. The official data are six files, ``smallnorb-5x46789x9x18x6x2x96x96-training-
{dat,cat,info}.mat`` and ``smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat`` (each
also distributed gzipped). Each split holds 24300 stereo pairs of 96x96 uint8 images, a category
(0 animal, 1 human, 2 airplane, 3 truck, 4 car) per pair and an info row per pair:
[instance 0-9, elevation 0-8, azimuth 0,2,...,34, lighting 0-5]. Train uses instances 4,6,7,8,9,
test 0,1,2,3,5.

Binary matrix format (all header fields little-endian int32):
``magic, ndim, dim_0, ..., dim_{max(ndim,3)-1}``, then the data, row-major. At least three dims
are always stored; for 1-D/2-D matrices the unused trailing ones are 1. The magic gives the
element type (0x1E3D4C55 uint8 for 'dat', 0x1E3D4C54 int32 for 'cat' and 'info').

Like the reference we use both cameras (mode "all": the 24300 left images, then the 24300 right
ones, image i taking the label and info of pair i mod 24300) and resize 96 -> 32 with PIL's
BILINEAR filter. We do the resize as two exact integer matmuls over the whole split (PIL's own
antialiased triangle-filter weights, PIL's rounding; the helpers of `transforms`), which equals
``Image.resize((32, 32), BILINEAR)`` pixel for pixel (tested). It is *not* the same as
``F.interpolate(..., mode="bilinear", antialias=True)`` to the bit (that rounds once, in float);
they differ by at most 1 grey level.

Per-image info is kept as group indices, one row per image, columns `INFO_COLUMNS`:
category, instance, elevation index e (30+5e degrees), azimuth index a (20a degrees; file value
2a), lighting 0-5, camera (0 left, 1 right). A group index is a value's position among the
sorted unique values over train+test, which for the official files is exactly this fixed map
(we use the map, so a subset of the files groups the same way).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...io import atomic_write_bytes, cache_root
from . import mnist as _mnist
from ...data.meta import MetaDataset
from .transforms import round_pass, scale_matrices, resolve_split  # same split names

__all__ = [
    "AXES",
    "BASE_GROUP",
    "CATEGORIES",
    "FILES",
    "INFO_COLUMNS",
    "MAGIC",
    "MD5",
    "MD5_UNCOMPRESSED",
    "MIRRORS",
    "N_GROUPS",
    "SPLITS",
    "TEST_INSTANCES",
    "TRAIN_INSTANCES",
    "NorbData",
    "NorbMeta",
    "NorbPart",
    "correspondence",
    "download_file",
    "get_split",
    "group_names",
    "group_values",
    "load_smallnorb",
    "norb_cache_dir",
    "norb_groups",
    "norb_meta",
    "read_matrix",
    "resize_images",
    "resolve_split",
    "write_matrix",
]

logger = logging.getLogger(__name__)

CATEGORIES = ("animal", "human", "airplane", "truck", "car")
TRAIN_INSTANCES = (4, 6, 7, 8, 9)
TEST_INSTANCES = (0, 1, 2, 3, 5)
AXES = ("elevation", "azimuth", "lighting")
INFO_COLUMNS = ("category", "instance", "elevation", "azimuth", "lighting", "camera")
_COL = {name: i for i, name in enumerate(INFO_COLUMNS)}
_RADIX = (5, 10, 9, 18, 6, 2)  # number of values per info column
N_GROUPS = {"elevation": 9, "azimuth": 18, "lighting": 6}
N_CAMERAS = 2  # a stereo pair
RAW_SIZE, IMAGE_SIZE = 96, 32  # pixels per side: the files' images, and what the experiments read

# docs/reproduction.md §5.2: (seen, unseen) group indices per axis and meta-split (paper names).
SPLITS: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "elevation": {
        "interleaved": ((0, 2, 4, 6, 8), (1, 3, 5, 7)),
        "sparse": ((1, 4, 7), (0, 2, 3, 5, 6, 8)),
        "contiguous": ((0, 1, 2, 3, 4), (5, 6, 7, 8)),
    },
    "azimuth": {
        "interleaved": (tuple(range(0, 18, 2)), tuple(range(1, 18, 2))),
        "sparse": ((0, 4, 8, 12, 16), tuple(a for a in range(18) if a % 4)),
        "contiguous": (tuple(range(9)), tuple(range(9, 18))),
    },
    "lighting": {
        "interleaved": ((0, 2, 4), (1, 3, 5)),
        "sparse": ((1, 4), (0, 2, 3, 5)),
        "contiguous": ((0, 1, 2), (3, 4, 5)),
    },
}

# A suggestion for Table 1 (docs/reproduction.md §7.1 leaves NORB's base group open): the middle elevation,
# azimuth 0 and lighting 0. The experiment decides and must say which it used.
BASE_GROUP = {"elevation": 4, "azimuth": 0, "lighting": 0}

_STEMS = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training",
          "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
KINDS = ("dat", "cat", "info")
# FILES[split][kind] = official file name without ".gz".
FILES = {split: {kind: f"{stem}-{kind}.mat" for kind in KINDS} for split, stem in _STEMS.items()}

# md5 of the official gzip files (checked after every download), and of the plain files.
MD5 = {
    "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz": "66054832f9accfe74a0f4c36a75bc0a2",
    "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz": "23c8b86101fbf0904a000b43d3ed2fd9",
    "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat.gz": "51dee1210a742582ff607dfd94e332e3",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz": "e4ad715691ed5a3a5f138751a4ceb071",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz": "5aa791cd7e6016cf957ce9bdb93b8603",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat.gz": "a9454f3864d7fd4bb3ea7fc3eb84924e",
}
MD5_UNCOMPRESSED = {
    "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat": "8138a0902307b32dfa0025a36dfa45ec",
    "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat": "fd5120d3f770ad57ebe620eb61a0b633",
    "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat": "19faee774120001fc7e17980d6960451",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat": "e9920b7f7b2869a8f1a12e945b2c166c",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat": "fd5120d3f770ad57ebe620eb61a0b633",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat": "7c5b871cc69dcadec1bf6a18141f5edc",
}
MIRRORS = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)

# Binary matrix magic -> numpy dtype (little-endian). 0x1E3D4C52 ("packed") is not supported.
MAGIC = {
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C55: np.dtype("u1"),
    0x1E3D4C56: np.dtype("<i2"),
}
_MAGIC_OF = {v: k for k, v in MAGIC.items()}
_MAX_NDIM = 16


# --------------------------------------------------------------------------- the binary format


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _read_exact(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def read_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read one smallNORB binary matrix file, gzip or plain (detected by content), strictly.

    Unknown magic, a bad ndim or dims, truncated data and trailing bytes are all errors that name
    the file. Large files are streamed into a preallocated array (no second copy in memory).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"smallNORB file not found: {path}")
    try:
        with _open(path) as f:
            dtype, shape = _read_header(f, path)
            out = _read_body(f, path, dtype, shape)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return out if dtype.isnative or dtype.itemsize == 1 else out.astype(dtype.newbyteorder("="))


def _read_header(f, path: Path) -> tuple[np.dtype, tuple]:
    """The element type and shape a matrix file's header declares, checked."""
    head = _read_exact(f, 8)
    if len(head) < 8:
        raise ValueError(f"{path}: truncated header ({len(head)} bytes; need at least 8 "
                         f"for magic and ndim)")
    magic, ndim = struct.unpack("<ii", head)
    magic &= 0xFFFFFFFF
    if magic not in MAGIC:
        what = " (packed matrices are not supported)" if magic == 0x1E3D4C52 else ""
        known = ", ".join(f"0x{m:08X} ({d.name})" for m, d in MAGIC.items())
        raise ValueError(f"{path}: unknown binary-matrix magic 0x{magic:08X}{what}; "
                         f"expected one of {known}. Is this a smallNORB .mat file?")
    if not 1 <= ndim <= _MAX_NDIM:
        raise ValueError(f"{path}: corrupt header: ndim = {ndim} (expected 1..{_MAX_NDIM})")
    n_fields = max(3, ndim)
    raw = _read_exact(f, 4 * n_fields)
    if len(raw) < 4 * n_fields:
        raise ValueError(f"{path}: truncated header: ndim = {ndim} needs {n_fields} "
                         f"dimension fields, only {len(raw) // 4} present")
    fields = struct.unpack(f"<{n_fields}i", raw)
    shape = fields[:ndim]
    if any(d < 0 for d in shape):
        raise ValueError(f"{path}: corrupt header: negative dimension in {shape}")
    if any(d != 1 for d in fields[ndim:]):
        logger.warning("%s: unused dimension fields %s are not 1 (ignored)", path, fields[ndim:])
    return MAGIC[magic], shape


def _read_body(f, path: Path, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """The matrix the header promised, streamed into one preallocated array; nothing may follow it."""
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    # before allocating: deflate cannot expand data more than ~1032x, so a header that
    # promises more than the file can hold is corrupt, whatever memory the machine has
    limit = path.stat().st_size * (1032 if _is_gzip(path) else 1)
    if need > limit:
        raise ValueError(f"{path}: corrupt header: shape {tuple(shape)} of {dtype.name} needs {need:,} "
                         f"bytes but the file can hold at most {limit:,}")
    out = np.empty(shape, dtype=dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < out.nbytes:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if got < out.nbytes:
        raise ValueError(f"{path}: truncated data: header promises shape {tuple(shape)} "
                         f"of {dtype.name} ({out.nbytes} bytes) but only {got} bytes follow")
    if f.read(1):
        raise ValueError(f"{path}: unexpected trailing bytes after the {out.nbytes} bytes "
                         f"of shape {tuple(shape)}")
    return out


def write_matrix(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an array in the binary matrix format (gzip when ``compress`` or a ".gz" name), atomically."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    key = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if key not in _MAGIC_OF:
        raise TypeError(f"no binary-matrix type for {array.dtype}; use one of "
                        f"{[d.name for d in MAGIC.values()]}")
    if array.ndim < 1:
        raise ValueError("write_matrix needs at least a 1-D array")
    dims = list(array.shape) + [1] * (3 - array.ndim)
    header = struct.pack(f"<ii{len(dims)}i", _MAGIC_OF[key], array.ndim, *dims)
    data = header + array.astype(key, copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(data, path)


# --------------------------------------------------------------------------- download


def norb_cache_dir(cache_dir: str | os.PathLike | None = None, name: str = "smallnorb") -> Path:
    """<cache_dir or $METAVAE_DATA or ~/.cache/metavae>/<name>: the same root as MNIST's cache."""
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / name


def _fetch(url: str, dest: str | os.PathLike) -> None:
    """Download url to dest. Module-level so tests can monkeypatch it and stay offline."""
    _mnist.fetch_url(url, dest)


def download_file(filename: str, dest_dir: str | os.PathLike, mirrors: Sequence[str] = MIRRORS,
                  md5: str | None = None) -> Path:
    """Fetch one official file into dest_dir, md5-checked, via a temp file and atomic rename."""
    if md5 is None and filename not in MD5:
        raise ValueError(f"no known md5 for {filename!r}; known files: {sorted(MD5)}")
    return _mnist.fetch_verified(filename, dest_dir, mirrors, md5 or MD5[filename], _fetch)


def _locate(folder: Path, name: str, download: bool, from_cache: bool) -> Path:
    for candidate in (name + ".gz", name):
        if (folder / candidate).is_file():
            return folder / candidate
    if from_cache and download:
        return download_file(name + ".gz", folder)
    hint = "pass download=True" if from_cache else "or use data_dir=None to download into the cache"
    raise FileNotFoundError(f"smallNORB file {name}[.gz] not found in {folder} ({hint})")


# --------------------------------------------------------------------------- resizing


def resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize (..., H, W) images to (..., size, size) with PIL's BILINEAR filter, as one tensor op.

    PIL's BILINEAR is a triangle filter whose support widens with the reduction factor (so it is
    antialiased: 96 -> 32 averages over about 6x6 source pixels). uint8 input gives PIL's exact
    pixels (its 22-bit integer weights and its rounding after each separable pass); float input
    uses the unrounded weights.
    """
    height, width = images.shape[-2:]
    lead = images.shape[:-2]
    if (height, width) == (size, size):
        return images.clone()
    wf, wi = scale_matrices(size, width, 0, width)
    hf, hi = scale_matrices(size, height, 0, height)
    flat = images.reshape(-1, height, width)
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        return (hf.to(images) @ flat @ wf.to(images).T).reshape(*lead, size, size)
    wi, hi = wi.to(images.device), hi.to(images.device)
    out = torch.empty((flat.shape[0], size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, flat.shape[0], chunk):
        x = flat[start:start + chunk].to(torch.float64)
        tmp = round_pass(x @ wi.T)  # horizontal pass, rounded to uint8 as PIL does
        out[start:start + chunk] = round_pass(hi @ tmp)
    return out.reshape(*lead, size, size)


# --------------------------------------------------------------------------- the data


@dataclass
class NorbPart:
    """One split (train or test): images (n, S, S) uint8 and info (n, 6) int64 (`INFO_COLUMNS`)."""

    images: torch.Tensor
    info: torch.Tensor

    def __post_init__(self):
        if self.images.dim() != 3 or self.info.shape != (len(self.images), len(INFO_COLUMNS)):
            raise ValueError(f"NorbPart wants images (n, S, S) and info (n, {len(INFO_COLUMNS)}); "
                             f"got {tuple(self.images.shape)} and {tuple(self.info.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        return self.info[:, 0]

    def column(self, name: str) -> torch.Tensor:
        return self.info[:, _COL[name]]


@dataclass
class NorbData:
    """Both splits of smallNORB or of the synthetic stand-in, in the same format.

    ``name`` is "smallnorb" or "synthnorb"; ``source`` says where it came from (folder or
    generator parameters), for reports.
    """

    name: str
    train: NorbPart
    test: NorbPart
    source: str = ""
    meta: dict = field(default_factory=dict)

    def part(self, name: str) -> NorbPart:
        if name not in ("train", "test"):
            raise KeyError(f"no part {name!r}; NORB has 'train' and 'test'")
        return getattr(self, name)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def camera_select(cameras: str) -> tuple[int, ...]:
    options = {"all": (0, 1), "left": (0,), "right": (1,)}
    if cameras not in options:
        raise ValueError(f"unknown camera mode {cameras!r}; expected one of {sorted(options)}")
    return options[cameras]


def _to_info(cat: np.ndarray, info: np.ndarray, cat_path: Path, info_path: Path) -> np.ndarray:
    """(n, 5) [category, instance, elevation idx, azimuth idx, lighting], checked."""
    checks = [(cat, "category", 0, 4, cat_path)]
    cols = [("instance", 0, 9), ("elevation", 0, 8), ("azimuth", 0, 34), ("lighting", 0, 5)]
    checks += [(info[:, j], name, lo, hi, info_path) for j, (name, lo, hi) in enumerate(cols)]
    for values, name, lo, hi, path in checks:
        bad = (values < lo) | (values > hi)
        if bad.any():
            raise ValueError(f"{path}: {name} value {int(values[bad][0])} outside {lo}..{hi}")
    if (info[:, 2] % 2).any():
        raise ValueError(f"{info_path}: azimuth values must be even (0, 2, ..., 34)")
    out = np.empty((len(cat), 5), dtype=np.int64)
    out[:, 0] = cat
    out[:, 1:] = info
    out[:, 3] //= 2
    return out


def _read_split(folder: Path, split: str, download: bool, from_cache: bool, cameras: tuple[int, ...],
                image_size: int) -> NorbPart:
    paths = {kind: _locate(folder, FILES[split][kind], download, from_cache) for kind in KINDS}
    dat, cat, info = (read_matrix(paths[k]) for k in KINDS)
    if dat.dtype != np.uint8 or dat.ndim != 4 or dat.shape[1] != 2:
        raise ValueError(f"{paths['dat']}: expected a uint8 (pairs, 2, H, W) image matrix, "
                         f"got {dat.dtype.name} {dat.shape}")
    if cat.ndim != 1 or cat.dtype.kind != "i":
        raise ValueError(f"{paths['cat']}: expected a 1-D integer category matrix, got {cat.dtype.name} {cat.shape}")
    if info.ndim != 2 or info.shape[1] != 4 or info.dtype.kind != "i":
        raise ValueError(f"{paths['info']}: expected an integer (pairs, 4) info matrix, "
                         f"got {info.dtype.name} {info.shape}")
    n = len(dat)
    if len(cat) != n or len(info) != n:
        raise ValueError(f"inconsistent smallNORB {split} files: {paths['dat'].name} holds {n} pairs, "
                         f"{paths['cat'].name} {len(cat)} categories, {paths['info'].name} {len(info)} rows")
    base = torch.from_numpy(_to_info(cat, info, paths["cat"], paths["info"]))
    pairs = torch.from_numpy(dat)
    images, infos = [], []
    for c in cameras:  # left block, then right block: image i <-> pair i mod n
        images.append(resize_images(pairs[:, c], image_size))
        infos.append(torch.cat([base, torch.full((n, 1), c, dtype=torch.long)], 1))
    logger.info("read %d smallNORB %s pairs (%dx%d) from %s", n, split, dat.shape[2], dat.shape[3], folder)
    return NorbPart(torch.cat(images), torch.cat(infos))


def load_smallnorb(data_dir: str | os.PathLike | None = None, download: bool = True,
                   cache_dir: str | os.PathLike | None = None, cameras: str = "all",
                   image_size: int = IMAGE_SIZE) -> NorbData:
    """The real smallNORB, both splits, resized to ``image_size`` (PIL BILINEAR, exact).

    With ``data_dir``, read the six files found there (gzip or plain, never written to); without,
    use the cache folder (`norb_cache_dir`) and download missing official files (md5-checked).
    ``cameras``: "all" (left block then right block, as the reference), "left" or "right".
    """
    cams = camera_select(cameras)
    from_cache = data_dir is None
    folder = norb_cache_dir(cache_dir) if from_cache else Path(data_dir).expanduser()
    parts = {s: _read_split(folder, s, download, from_cache, cams, image_size) for s in ("train", "test")}
    return NorbData("smallnorb", parts["train"], parts["test"], source=str(folder),
                    meta={"cameras": cameras, "image_size": image_size})


# --------------------------------------------------------------------------- groups and splits


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown NORB axis {axis!r}; expected one of {AXES}")
    return axis


def get_split(axis: str, split: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(seen, unseen) group indices of one axis under one meta-split (docs/reproduction.md §5.2)."""
    return SPLITS[_check_axis(axis)][resolve_split(split)]


def group_values(axis: str) -> tuple[int, ...]:
    """The physical value of each group index: degrees for elevation/azimuth, 0-5 for lighting."""
    _check_axis(axis)
    if axis == "elevation":
        return tuple(30 + 5 * e for e in range(9))
    if axis == "azimuth":
        return tuple(20 * a for a in range(18))
    return tuple(range(6))


def group_names(axis: str) -> list[str]:
    unit = "" if axis == "lighting" else "deg"
    return [f"{axis} {v}{unit}" for v in group_values(axis)]


def _group_index(part: NorbPart, axis: str, g: int) -> torch.Tensor:
    return torch.nonzero(part.info[:, _COL[axis]] == g).flatten()


def norb_groups(data: NorbData, axis: str, groups: Sequence[int] | None = None,
                test_part: str = "test") -> tuple[MetaDataset, dict[str, list[torch.Tensor]]]:
    """One distribution per group of ``axis`` (all groups, or ``groups`` in that order).

    Each group's train part holds the NORB train images whose ``axis`` index is the group (other
    factors vary freely, as in the reference), its ``test_part`` ("test", or "val" for a trainer
    that validates on "val") the NORB test images. Images are (1, S, S) uint8, labels the
    categories. Returns (dataset, info) with ``info[part][k]`` the (n_k, 6) info rows of group k's
    images in the same order (for Table 1 correspondence, see `correspondence`).
    """
    _check_axis(axis)
    if test_part not in ("test", "val"):
        raise ValueError(f"test_part must be 'test' or 'val', got {test_part!r}")
    groups = tuple(range(N_GROUPS[axis])) if groups is None else tuple(int(g) for g in groups)
    bad = [g for g in groups if not 0 <= g < N_GROUPS[axis]]
    if bad:
        raise ValueError(f"{axis} group indices must be in 0..{N_GROUPS[axis] - 1}, got {bad}")
    tensors: dict[str, list] = {"train": [], test_part: []}
    labels: dict[str, list] = {"train": [], test_part: []}
    info: dict[str, list] = {"train": [], test_part: []}
    for src, dst in (("train", "train"), ("test", test_part)):
        part = data.part(src)
        for g in groups:
            idx = _group_index(part, axis, g)
            if len(idx) == 0:
                raise ValueError(f"{data.name} {src} split has no image in {axis} group {g}")
            tensors[dst].append(part.images[idx].unsqueeze(1))
            labels[dst].append(part.labels[idx])
            info[dst].append(part.info[idx])
    names = [group_names(axis)[g] for g in groups]
    ds = MetaDataset.from_parts(train=tensors["train"], train_labels=labels["train"],
                                **{test_part: tensors[test_part], f"{test_part}_labels": labels[test_part]},
                                names=names)
    return ds, info


@dataclass
class NorbMeta:
    """A NORB meta-split: seen groups to train on, unseen groups to evaluate on."""

    data: str  # "smallnorb" | "synthnorb"
    axis: str
    split: str  # paper name: interleaved | sparse | contiguous
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    dataset: MetaDataset  # seen groups, in `seen` order
    unseen_dataset: MetaDataset  # unseen groups, in `unseen` order
    info: dict[str, list[torch.Tensor]]  # per part, per seen group: (n_k, 6) info rows
    unseen_info: dict[str, list[torch.Tensor]]


def norb_meta(data: NorbData, axis: str, split: str, test_part: str = "test") -> NorbMeta:
    """The (axis, split) meta-dataset of docs/reproduction.md §5.2, for real or synthetic NORB alike."""
    split = resolve_split(split)
    seen, unseen = get_split(axis, split)
    ds, info = norb_groups(data, axis, seen, test_part)
    uds, uinfo = norb_groups(data, axis, unseen, test_part)
    return NorbMeta(data.name, axis, split, seen, unseen, ds, uds, info, uinfo)


def group_key(info: torch.Tensor, skip: str) -> torch.Tensor:
    key = torch.zeros(len(info), dtype=torch.long)
    for j, radix in enumerate(_RADIX):
        if INFO_COLUMNS[j] != skip:
            key = key * radix + info[:, j]
    return key


def correspondence(info_a: torch.Tensor, info_b: torch.Tensor, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (ia, ib) of images that show the same thing except along ``axis``.

    Rows match when category, instance, camera and the two other factors agree, e.g. group
    "elevation 45deg" against a base group "elevation 50deg": same toy, azimuth, lighting and
    camera. Rows of ``info_b`` must be unique on those columns (true within one group); rows of
    ``info_a`` without a partner are left out.
    """
    _check_axis(axis)
    ka, kb = group_key(info_a, axis), group_key(info_b, axis)
    order = torch.argsort(kb)
    kb_sorted = kb[order]
    if len(kb_sorted) > 1 and (kb_sorted[1:] == kb_sorted[:-1]).any():
        raise ValueError("info_b has repeated rows on the matching columns; pass one group's info")
    pos = torch.searchsorted(kb_sorted, ka).clamp_max(max(len(kb_sorted) - 1, 0))
    hit = kb_sorted[pos] == ka if len(kb_sorted) else torch.zeros_like(ka, dtype=torch.bool)
    ia = torch.nonzero(hit).flatten()
    return ia, order[pos[ia]]
