"""Rotation, scale and shear of whole MNIST splits, bit-exact with the reference's PIL pipeline.

The reference (docs/reproduction.md §5.1) transforms one PIL image at a time. We transform a whole split as
one tensor op instead, but reproduce PIL's integer arithmetic so the pixels are the same:

* rotation and shear are nearest-neighbour affine maps. PIL samples each output pixel centre
  through the inverse matrix in 16.16 fixed point; we compute that source-index map once per
  (axis, value, size) with the same integer arithmetic and apply it to every image by gathering.
* scale is crop + BILINEAR resize. PIL resizes in two separable passes (horizontal, then
  vertical) with 22-bit integer weights and a uint8 rounding between passes; we build the same
  integer weight matrices (the crop folded in) and apply them as two exact float64 matmuls.

Float inputs use the same maps with unrounded weights (what PIL does for mode "F").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ...io import atomic_save

__all__ = [
    "AXES",
    "GRIDS",
    "SPLITS",
    "SPLIT_ALIASES",
    "FORMAT_VERSION",
    "apply_transform",
    "canonical_value",
    "data_fingerprint",
    "get_split",
    "resolve_split",
    "rotation_coefficients",
    "scale_box",
    "shear_coefficients",
    "transform_split",
]

logger = logging.getLogger(__name__)

AXES = ("rotation", "scale", "shear")

# Bump when the pixels a transform produces change, so stale caches are never reused.
FORMAT_VERSION = 1

_ANGLES = tuple(range(-180, 180, 20))
GRIDS: dict[str, tuple] = {
    "rotation": _ANGLES,
    "scale": tuple(round(0.5 + 0.1 * i, 1) for i in range(15)),
    "shear": _ANGLES,
}


def _angle_splits() -> dict[str, tuple[tuple, tuple]]:
    sparse_seen = (-160, -80, 0, 80, 160)
    return {
        "interleaved": (_ANGLES[0::2], _ANGLES[1::2]),
        "sparse": (sparse_seen, tuple(v for v in _ANGLES if v not in sparse_seen)),
        "contiguous": (_ANGLES[:10], _ANGLES[10:]),
    }


def _scale_splits() -> dict[str, tuple[tuple, tuple]]:
    grid = GRIDS["scale"]
    sparse_seen = (0.6, 1.0, 1.4, 1.8)
    return {
        "interleaved": (grid[0::2], grid[1::2]),
        "sparse": (sparse_seen, tuple(v for v in grid if v not in sparse_seen)),
        "contiguous": (grid[:8], grid[8:]),
    }


# SPLITS[axis][split] = (seen values, unseen values), docs/reproduction.md §5.1 (paper names).
SPLITS: dict[str, dict[str, tuple[tuple, tuple]]] = {
    "rotation": _angle_splits(),
    "scale": _scale_splits(),
    "shear": _angle_splits(),
}

# The reference code's names for the same splits.
SPLIT_ALIASES = {"standard": "interleaved", "disjoint": "contiguous"}


# --------------------------------------------------------------------------- names and values


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown transformation axis {axis!r}; expected one of {AXES}")
    return axis


def resolve_split(name: str) -> str:
    """Map a split name (paper's or reference code's, any case) to the paper's name."""
    key = str(name).strip().lower()
    key = SPLIT_ALIASES.get(key, key)
    if key not in SPLITS["rotation"]:
        known = sorted(SPLITS["rotation"]) + sorted(SPLIT_ALIASES)
        raise ValueError(f"unknown meta-split {name!r}; expected one of {known}")
    return key


def get_split(axis: str, split: str) -> tuple[tuple, tuple]:
    """(seen, unseen) value lists of one axis under one meta-split."""
    return SPLITS[_check_axis(axis)][resolve_split(split)]


def canonical_value(axis: str, value: float) -> float | int:
    """The dictionary key for a value: 0.7999999999999999 -> 0.8, -160.0 -> -160.

    The reference's `np.arange` grids hold float approximations; rounding them (only when they
    are within 1e-9 of a round number) gives stable cache keys and, as docs/reproduction.md §5.1 tabulates,
    the same rounded crop boxes, hence the same pixels.
    """
    _check_axis(axis)
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{axis} value must be finite, got {value!r}")
    if axis == "scale":
        if v <= 0:
            raise ValueError(f"scale (crop factor) must be > 0, got {value!r}")
        r = round(v, 1)
        return r if abs(v - r) < 1e-9 else v
    r = round(v)
    return int(r) if abs(v - r) < 1e-9 else v


# --------------------------------------------------------------------------- affine coefficients


def rotation_coefficients(angle: float, width: int, height: int) -> list[float]:
    """Inverse affine matrix of PIL `Image.rotate(angle)` (counter-clockwise, about the centre)."""
    cx, cy = width / 2, height / 2
    a = -math.radians(angle % 360.0)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0,
         round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return m


def shear_coefficients(shear: float, width: int, height: int) -> list[float]:
    """Inverse affine matrix of torchvision<=0.4 `F.affine(img, 0, (0, 0), 1, shear)`.

    Old torchvision puts the centre at (w/2 + 0.5, h/2 + 0.5) and uses a matrix that, for a
    scalar shear s, is an x-shear by -sin(s) combined with a vertical scaling by cos(s): this is
    what the reference ran (docs/reproduction.md §5.1), so ±180 flips the digit vertically.
    """
    if abs(math.cos(math.radians(shear))) < 1e-6:
        raise ValueError(f"shear {shear!r} degrees is degenerate (cos = 0 squashes the image to a line)")
    cx, cy = width * 0.5 + 0.5, height * 0.5 + 0.5
    angle, sh, scale = 0.0, math.radians(shear), 1.0
    d = math.cos(angle + sh) * math.cos(angle) + math.sin(angle + sh) * math.sin(angle)
    m = [math.cos(angle + sh), math.sin(angle + sh), 0, -math.sin(angle), math.cos(angle), 0]
    m = [scale / d * v for v in m]
    m[2] += m[0] * (-cx - 0) + m[1] * (-cy - 0)
    m[5] += m[3] * (-cx - 0) + m[4] * (-cy - 0)
    m[2] += cx
    m[5] += cy
    return m


# --------------------------------------------------------------------------- PIL nearest sampling


def _fix16(v: float) -> int:
    """PIL's FIX(): round to 16.16 fixed point, as C's FLOOR(v * 65536 + 0.5)."""
    return math.floor(v * 65536.0 + 0.5)


def _affine_nearest_index(m: Sequence[float], width: int, height: int) -> np.ndarray:
    """Flat source index (or -1 = fill) per output pixel, as PIL's ImagingTransformAffine."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    if m[1] == 0 and m[3] == 0:  # PIL's ImagingScaleAffine path: no half-pixel offset
        xf, yf = m[2] + x * m[0], m[5] + y * m[4]
        xin = np.where(xf < 0, -1, np.trunc(xf)).astype(np.int64)
        yin = np.where(yf < 0, -1, np.trunc(yf)).astype(np.int64)
    elif _fits_fixed(m, width, height):  # PIL's affine_fixed: 16.16 integer arithmetic
        a0, a1, a3, a4 = (_fix16(m[i]) for i in (0, 1, 3, 4))
        a2 = _fix16(m[2] + m[0] * 0.5 + m[1] * 0.5)
        a5 = _fix16(m[5] + m[3] * 0.5 + m[4] * 0.5)
        xin = (a2 + y * a1 + x * a0) >> 16
        yin = (a5 + y * a4 + x * a3) >> 16
    else:  # PIL's float path; approximate (C adds step by step), unused at MNIST sizes
        xf = m[2] + m[1] * 0.5 + m[0] * 0.5 + y * m[1] + x * m[0]
        yf = m[5] + m[4] * 0.5 + m[3] * 0.5 + y * m[4] + x * m[3]
        xin = np.where(xf < 0, -1, np.trunc(xf)).astype(np.int64)
        yin = np.where(yf < 0, -1, np.trunc(yf)).astype(np.int64)
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    return np.where(inside, yin * width + xin, -1)


def _fits_fixed(m: Sequence[float], width: int, height: int) -> bool:
    """PIL uses fixed point only when every corner maps within ±32768."""
    corners = [(0, 0), (width, height), (0, height), (width, 0)]
    return all(abs(x * m[0] + y * m[1] + m[2]) < 32768.0 and abs(x * m[3] + y * m[4] + m[5]) < 32768.0
               for x, y in corners)


def _rotation_index(angle: float, width: int, height: int) -> np.ndarray:
    """PIL `rotate` including its exact fast paths (0, 180, and 90/270 on square images)."""
    a = angle % 360.0
    idx = np.arange(height * width, dtype=np.int64).reshape(height, width)
    if a == 0:
        return idx
    if a == 180:
        return idx[::-1, ::-1].copy()
    if a == 90 and width == height:
        return idx.T[::-1].copy()  # out[y, x] = in[x, W-1-y]
    if a == 270 and width == height:
        return idx.T[:, ::-1].copy()  # out[y, x] = in[H-1-x, y]
    return _affine_nearest_index(rotation_coefficients(angle, width, height), width, height)


@functools.lru_cache(maxsize=256)
def _gather_index(axis: str, value: float, height: int, width: int) -> torch.Tensor:
    """Flat gather index into an image followed by one zero pixel (index H*W = fill)."""
    if axis == "rotation":
        idx = _rotation_index(value, width, height)
    else:
        idx = _affine_nearest_index(shear_coefficients(value, width, height), width, height)
    idx = np.where(idx < 0, height * width, idx)
    return torch.from_numpy(idx.reshape(-1).astype(np.int64))


def _apply_nearest(flat: torch.Tensor, axis: str, value: float, height: int, width: int) -> torch.Tensor:
    idx = _gather_index(axis, value, height, width).to(flat.device)
    padded = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
    return padded.index_select(1, idx)


# --------------------------------------------------------------------------- PIL crop + BILINEAR


def scale_box(scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The reference's centred crop box for crop factor s, rounded as PIL's `crop` rounds it."""
    w, h = width * scale, height * scale
    i, j = (height - h) // 2, (width - w) // 2
    return tuple(int(round(v)) for v in (j, i, j + w, i + h))


def _bilinear_coeffs(in_size: int, out_size: int) -> np.ndarray:
    """PIL's `precompute_coeffs` for BILINEAR: (out, in) weights, antialiased when shrinking."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support, ss = 1.0 * filterscale, 1.0 / filterscale
    k = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(xmax)]
        total = 0.0
        for v in w:  # sequential sum, as in C
            total += v
        k[xx, xmin:xmin + xmax] = [v / total for v in w] if total != 0.0 else w
    return k


@functools.lru_cache(maxsize=256)
def scale_matrices(size: int, axis_len: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float weights, PIL's 22-bit integer weights / 2**22) of shape (size, axis_len), crop folded in.

    Crop pixels outside the image are 0, so their columns are simply dropped.
    """
    k = _bilinear_coeffs(hi - lo, size)
    kk = np.where(k < 0, np.trunc(-0.5 + k * (1 << 22)), np.trunc(0.5 + k * (1 << 22)))
    if (kk < 0).any() or kk.sum(axis=1).max() * 255 + (1 << 21) >= 256 << 22:
        raise AssertionError("bilinear weights would need clamping; round_pass assumes not")
    kk = kk * 2.0 ** -22  # exact (a power of two); folds PIL's final >> 22 into the weights
    full_f, full_i = np.zeros((size, axis_len)), np.zeros((size, axis_len))
    src = np.arange(lo, hi)
    ok = (src >= 0) & (src < axis_len)
    full_f[:, src[ok]] = k[:, ok]
    full_i[:, src[ok]] = kk[:, ok]
    return torch.from_numpy(full_f), torch.from_numpy(full_i)


def round_pass(acc: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 in place, for weights pre-scaled by 2**-22: floor(acc + 1/2), exact in float64.

    No clamp is needed: bilinear weights are >= 0 and each row's integer weights sum to within a
    few units of 2**22, so results stay in 0..255 (checked when the weights are built).
    """
    return acc.add_(0.5).floor_()


_CHUNK = 2048


def _apply_scale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Crop box (rounded, zero outside), then PIL BILINEAR resize back to the input size."""
    height, width = images.shape[-2:]
    x0, y0, x1, y1 = scale_box(scale, width, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"scale {scale!r} gives an empty crop box {(x0, y0, x1, y1)} "
                         f"for {width}x{height} images")
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return images.clone()  # PIL's resize returns a copy when nothing changes
    wf, wi = scale_matrices(width, width, x0, x1)
    hf, hi = scale_matrices(height, height, y0, y1)
    if images.dtype != torch.uint8:
        wf, hf = wf.to(images), hf.to(images)
        return hf @ (images @ wf.T)
    wi, hi = wi.to(images.device), hi.to(images.device)
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], _CHUNK):  # chunks bound the float64 scratch memory
        x = images[start:start + _CHUNK].to(torch.float64)
        tmp = round_pass(x @ wi.T)  # horizontal pass, rounded to uint8 as PIL does
        out[start:start + _CHUNK] = round_pass(hi @ tmp)
    return out


# --------------------------------------------------------------------------- public API


def apply_transform(images: torch.Tensor, axis: str, value: float) -> torch.Tensor:
    """Transform every image of a batch (..., H, W), uint8 or float; same shape and dtype back.

    uint8 results equal PIL's, pixel for pixel (see the module docstring).
    """
    _check_axis(axis)
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise ValueError(f"images must be a tensor shaped (..., H, W), got {type(images).__name__}"
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    value = canonical_value(axis, value)
    shape = images.shape
    height, width = shape[-2:]
    n = math.prod(shape[:-2])
    if axis == "scale":
        return _apply_scale(images.reshape(n, height, width), value).reshape(shape)
    flat = images.reshape(n, height * width)
    return _apply_nearest(flat, axis, value, height, width).reshape(shape)


def data_fingerprint(images: torch.Tensor) -> str:
    """sha256 of dtype, shape and bytes: ties a cache entry to the exact source pixels."""
    arr = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{arr.dtype}|{tuple(arr.shape)}|".encode())
    h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cachegroup_key(axis: str, value: float | int, fingerprint: str) -> str:
    blob = json.dumps({"axis": axis, "value": repr(value), "data": fingerprint,
                       "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_cached(path: Path, like: torch.Tensor) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        out = torch.load(path, map_location=like.device, weights_only=True)
    except Exception as exc:  # a corrupt file is recomputed, not fatal
        logger.warning("ignoring unreadable transform cache %s (%s)", path, exc)
        return None
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype:
        logger.warning("ignoring transform cache %s: shape/dtype does not match the source", path)
        return None
    return out


def transform_split(images: torch.Tensor, axis: str, values: Iterable[float],
                    cache_dir: str | os.PathLike | None = None) -> dict:
    """{canonical value: transformed split} for each value, optionally cached on disk.

    One cache file per value, keyed by (axis, exact canonical value, source fingerprint,
    FORMAT_VERSION), so seen/unseen lists of different meta-splits share entries and a change of
    source data or transform code can never return stale pixels.
    """
    _check_axis(axis)
    keys = [canonical_value(axis, v) for v in values]
    if cache_dir is None:
        return {k: apply_transform(images, axis, k) for k in keys}
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = data_fingerprint(images)
    out = {}
    for k in keys:
        if k in out:
            continue
        path = folder / f"{axis}_{k}_{_cachegroup_key(axis, k, fingerprint)}.pt"
        cached = _load_cached(path, images)
        if cached is None:
            cached = apply_transform(images, axis, k)
            atomic_save(cached, path)
        out[k] = cached
    return out
