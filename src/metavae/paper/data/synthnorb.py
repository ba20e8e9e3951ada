"""synthnorb: an offline, procedurally rendered stand-in for smallNORB with the same structure.

Why: the official smallNORB files cannot be downloaded here. synthnorb lets the NORB protocol
(docs/reproduction.md §5.2) run end to end; it is *different data* and every report must say which it used.

What it is, mirroring smallNORB:
* 5 categories of toy-like objects built from primitives: animal (four-legged), human (standing
  figure), airplane, truck, car; 10 instances each, instances 4,6,7,8,9 train and 0,1,2,3,5 test.
  Instances differ in proportions and pose (leg length, neck angle, arm pose, wing span and
  sweep, cargo size, cabin position, ...), so the test toys are new shapes.
* 9 camera elevations 30-70 deg by 5, 18 turntable azimuths 0-340 deg by 20, 6 lighting
  conditions, 2 cameras (a stereo pair with a small toe-in baseline).
* Rendering: per pixel ray casting of analytic primitives (ellipsoids and boxes; exact
  ray-quadric / slab intersections, vectorized over views x primitives x pixels), on a ground
  plane, with Lambertian shading from four directional lights fixed in the room plus ambient,
  and cast shadows (shadow rays against every primitive) on the object and the ground. The six
  lighting conditions differ in which lights are on, their intensities and the ambient level.
  Rendered at 64x64 (2x2 supersampling; 96x96 when 96x96 output is asked for), quantized to
  uint8, resized to 32x32 with the same PIL-exact BILINEAR resize as real smallNORB, plus a
  little deterministic sensor noise (+-2 grey levels, triangular).
* Hard in the way NORB is: the category is in the shape only. Every instance draws its albedo
  (per part) from the same distribution whatever its category, and is scaled so that its mean
  silhouette area over a set of views is a random target from one common range, so neither
  brightness nor apparent size gives the category away (tests/test_norb.py checks this).
  Version 2 raised the contrast (ground albedo 0.55 -> 0.3, toys 0.45-0.95 instead of 0.22-0.88:
  lighter than the ground, as NORB's painted toys) and the size (mean area 9-16%, was 8-15%).

Determinism: instance shapes come from ``numpy.random.default_rng([seed, category, instance])``,
noise from an integer hash of (seed, image id, pixel); all per-pixel arithmetic is elementwise
float32 (no reductions whose order depends on batch shapes), so a subset renders the same bytes
as the full set, run after run. The full set is cached on disk per (split, camera), keyed by
`VERSION` and the generation parameters, and written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .norb import (CATEGORIES, INFO_COLUMNS, TEST_INSTANCES, TRAIN_INSTANCES, NorbData, NorbPart,
                   camera_select, group_names, norb_cache_dir, resize_images)
from ...io import atomic_save, atomic_write_bytes

__all__ = [
    "AZIMUTHS",
    "ELEVATIONS",
    "LIGHTING",
    "LIGHTS",
    "VERSION",
    "build_object",
    "load_synthnorb",
    "render_synthnorb",
    "save_example_grid",
    "synthnorb_cache_path",
]

logger = logging.getLogger(__name__)

# Bump when the pixels change, so stale caches are never reused.
VERSION = 2

ELEVATIONS = tuple(range(30, 75, 5))  # degrees above the horizontal, index e -> 30 + 5e
AZIMUTHS = tuple(range(0, 360, 20))  # turntable angle, index a -> 20a
N_PAIRS = 5 * 5 * 9 * 18 * 6  # 24300 per split, as in smallNORB

# Directional lights fixed in the room: (azimuth relative to the camera, elevation), degrees.
LIGHTS = ((-55.0, 40.0), (65.0, 30.0), (160.0, 65.0), (-110.0, 15.0))
# Lighting conditions: (ambient, intensity of each light).
LIGHTING = (
    (0.25, (0.95, 0.00, 0.00, 0.00)),
    (0.25, (0.00, 0.95, 0.00, 0.00)),
    (0.35, (0.55, 0.55, 0.00, 0.00)),
    (0.20, (0.00, 0.00, 1.15, 0.00)),
    (0.40, (0.35, 0.00, 0.35, 0.35)),
    (0.15, (0.00, 0.20, 0.00, 1.10)),
)

_CAM_DIST = 6.0
_TAN_HALF = 0.24  # half field of view: the frame spans about +-1.45 units at the target
_AZ0 = 35.0  # camera azimuth (deg) at turntable azimuth 0: a front three-quarter view
_BASELINE = 0.45  # stereo baseline (units; toe-in towards the target)
_GROUND_ALBEDO = 0.3
_NOISE = 2.0  # half-width (grey levels) of the triangular sensor noise, added at the output size
_GAMMA = 1 / 1.6
_AREA_RANGE = (0.09, 0.16)  # mean silhouette area (fraction of the frame) drawn per instance
_EPS = 2e-3


# --------------------------------------------------------------------------- primitives


@dataclass
class _Prim:
    box: bool
    center: np.ndarray  # (3,)
    frame: np.ndarray  # (3, 3), columns: the local axes in object coordinates
    half: np.ndarray  # (3,) radii (ellipsoid) or half extents (box)
    albedo: float = 1.0


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(x_axis, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    x = _unit(x_axis)
    y = np.cross(up, x)
    if np.linalg.norm(y) < 1e-6:
        y = np.cross((1.0, 0.0, 0.0) if abs(x[0]) < 0.9 else (0.0, 1.0, 0.0), x)
    y = _unit(y)
    return np.stack([x, y, np.cross(x, y)], axis=1)


def _ell(center, half, frame=None) -> _Prim:
    return _Prim(False, np.asarray(center, float), np.eye(3) if frame is None else frame, np.asarray(half, float))


def _box(center, half) -> _Prim:
    return _Prim(True, np.asarray(center, float), np.eye(3), np.asarray(half, float))


def _seg(p0, p1, r, r2=None, up=(0.0, 0.0, 1.0), overlap=0.35) -> _Prim:
    """An ellipsoid along the segment p0-p1 (a limb), radii r and r2 across it."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    half_len = np.linalg.norm(p1 - p0) / 2 + overlap * r
    r2 = r if r2 is None else r2
    return _Prim(False, (p0 + p1) / 2, _frame(p1 - p0, up), np.array([half_len, r, r2]))


def _animal(rng) -> list[_Prim]:
    L, H = rng.uniform(0.4, 0.7), rng.uniform(0.17, 0.3)
    W = H * rng.uniform(0.75, 1.1)
    leg, lr = rng.uniform(0.3, 0.65), rng.uniform(0.05, 0.09)
    zb = leg + 0.7 * H
    prims = [_ell((0, 0, zb), (L, W, H))]
    stride = rng.uniform(-0.15, 0.15)
    for sx in (1, -1):
        for sy in (1, -1):
            top = (sx * 0.62 * L, sy * 0.55 * W, zb - 0.3 * H)
            foot = (sx * 0.62 * L + sx * sy * stride, sy * 0.6 * W, 0.6 * lr)
            prims.append(_seg(top, foot, lr))
    a = math.radians(rng.uniform(20, 80))
    nl = rng.uniform(0.15, 0.45)
    base = np.array([0.8 * L, 0, zb + 0.3 * H])
    tip = base + nl * np.array([math.cos(a), 0, math.sin(a)])
    prims.append(_seg(base, tip, rng.uniform(0.07, 0.12)))
    hs = rng.uniform(0.14, 0.26)
    pitch = math.radians(rng.uniform(-10, 45))
    axis = np.array([math.cos(pitch), 0, -math.sin(pitch)])
    prims.append(_ell(tip + hs * 0.55 * axis, (hs, hs * rng.uniform(0.5, 0.7), hs * 0.6), _frame(axis)))
    er = hs * rng.uniform(0.25, 0.5)  # ears
    for s in (1, -1):
        prims.append(_seg(tip + np.array([0, s * hs * 0.3, hs * 0.3]),
                          tip + np.array([-0.3 * er, s * hs * 0.45, hs * 0.3 + 2 * er]), 0.45 * er, 0.2 * er,
                          up=(1.0, 0.0, 0.0), overlap=0.0))
    b = math.radians(rng.uniform(-50, 50))
    tail0 = np.array([-0.95 * L, 0, zb + 0.2 * H])
    prims.append(_seg(tail0, tail0 + rng.uniform(0.12, 0.45) * np.array([-math.cos(b), 0, math.sin(b)]),
                      rng.uniform(0.025, 0.05)))
    return prims


def _human(rng) -> list[_Prim]:
    height = rng.uniform(1.5, 1.9)
    legl = height * rng.uniform(0.42, 0.5)
    hip, lr = rng.uniform(0.07, 0.12), rng.uniform(0.055, 0.08)
    spread, stride = rng.uniform(0.0, 0.1), rng.uniform(-0.15, 0.15)
    prims = []
    for s in (1, -1):
        prims.append(_seg((0, s * hip, legl), (s * stride, s * (hip + spread), 0.6 * lr), lr))
    tl, tw, td = height * rng.uniform(0.13, 0.16), rng.uniform(0.14, 0.22), rng.uniform(0.08, 0.13)
    prims.append(_ell((0, 0, legl + tl * 0.95), (td, tw, tl)))
    prims.append(_ell((0, 0, legl + 0.02), (td * 1.05, tw * 0.9, 0.1)))
    hr = height * rng.uniform(0.055, 0.075)
    prims.append(_ell((0, 0, legl + 2 * tl + hr * 0.9), (hr * 0.95, hr * 0.9, hr * 1.1)))
    arm, ar = height * rng.uniform(0.28, 0.38), rng.uniform(0.04, 0.06)
    for s in (1, -1):
        ab = math.radians(rng.uniform(5, 80))
        fw = math.radians(rng.uniform(-45, 45))
        shoulder = np.array([0, s * tw * 0.95, legl + 2 * tl * 0.88])
        d = np.array([math.sin(fw) * math.cos(ab), s * math.sin(ab), -math.cos(fw) * math.cos(ab)])
        prims.append(_seg(shoulder, shoulder + arm * d, ar))
    return prims


def _airplane(rng) -> list[_Prim]:
    fl, fr = rng.uniform(0.8, 1.15), rng.uniform(0.1, 0.17)
    zf = rng.uniform(0.12, 0.3) + fr
    prims = [_ell((0, 0, zf), (fl, fr, fr * rng.uniform(0.9, 1.2)))]
    span, chord = rng.uniform(0.65, 1.15), rng.uniform(0.15, 0.3)
    sweep, dihedral = math.radians(rng.uniform(-5, 35)), math.radians(rng.uniform(-3, 10))
    root = np.array([rng.uniform(-0.15, 0.2) * fl, 0, zf + rng.uniform(-0.6, 0.4) * fr])
    tips = []
    for s in (1, -1):
        d = np.array([-math.sin(sweep), s * math.cos(sweep) * math.cos(dihedral), math.sin(dihedral)])
        tips.append(d)
        prims.append(_seg(root, root + span * d, chord, 0.03, overlap=0.0))
    zt = zf + rng.uniform(0.0, 0.8) * fr
    hs = rng.uniform(0.22, 0.45)
    prims.append(_seg((-0.88 * fl, -hs, zt), (-0.88 * fl, hs, zt), rng.uniform(0.08, 0.13), 0.02, overlap=0.0))
    fin_top = np.array([-0.95 * fl - rng.uniform(0.0, 0.12), 0, zf + rng.uniform(0.22, 0.42)])
    prims.append(_seg((-0.82 * fl, 0, zf), fin_top, rng.uniform(0.08, 0.13), 0.02, up=(0.0, 1.0, 0.0), overlap=0.0))
    er, el, at = rng.uniform(0.04, 0.08), rng.uniform(0.1, 0.2), rng.uniform(0.3, 0.5)
    for d in tips:
        prims.append(_ell(root + span * at * d + np.array([0.05, 0, -0.06 - er]), (el, er, er)))
    return prims


def _wheel(x, y, r) -> _Prim:
    return _ell((x, y, r), (r, 0.06, r))


def _truck(rng) -> list[_Prim]:
    rw, bw = rng.uniform(0.13, 0.19), rng.uniform(0.26, 0.37)
    cl, ch = rng.uniform(0.45, 0.75), rng.uniform(0.22, 0.42)
    cx = -rng.uniform(0.1, 0.25)
    floor = rw + 0.06
    kl, kh = rng.uniform(0.17, 0.26), ch * rng.uniform(0.6, 0.95)
    kx = cx + cl + rng.uniform(0.03, 0.1) + kl
    front, rear = kx + kl, cx - cl
    prims = [_box((cx, 0, floor + ch), (cl, bw, ch)),
             _box((kx, 0, floor + kh), (kl, bw * rng.uniform(0.85, 1.0), kh)),
             _box(((front + rear) / 2, 0, rw + 0.02), ((front - rear) / 2, bw * 0.85, 0.05))]
    xs = (kx, cx - 0.55 * cl + 1.1 * rw, cx - 0.55 * cl - 1.1 * rw)
    for x in xs:
        for s in (1, -1):
            prims.append(_wheel(x, s * bw * 0.95, rw))
    return prims


def _car(rng) -> list[_Prim]:
    L, bw = rng.uniform(0.7, 1.0), rng.uniform(0.3, 0.42)
    bh, rw = rng.uniform(0.1, 0.17), rng.uniform(0.12, 0.17)
    zb = 0.9 * rw + bh
    prims = [_box((0, 0, zb), (L, bw, bh)),
             _ell((rng.uniform(-0.3, 0.1) * L, 0, zb + bh * 0.5),
                  (rng.uniform(0.45, 0.7) * L, bw * rng.uniform(0.75, 0.92), bh * 0.5 + rng.uniform(0.1, 0.2)))]
    for x in (0.65 * L, -0.65 * L):
        for s in (1, -1):
            prims.append(_wheel(x, s * bw * 0.97, rw))
    return prims


_BUILDERS = (_animal, _human, _airplane, _truck, _car)


def _bounds(prims: Sequence[_Prim]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for p in prims:
        ext = np.abs(p.frame) @ p.half  # exact for boxes, an upper bound for ellipsoids
        lo, hi = np.minimum(lo, p.center - ext), np.maximum(hi, p.center + ext)
    return lo, hi


@dataclass
class _Object:
    """One instance as arrays: A (P, 3, 3) world->unit-primitive map, centers (P, 3), ..."""

    category: int
    instance: int
    A: np.ndarray
    center: np.ndarray
    box: np.ndarray  # (P,) bool
    albedo: np.ndarray  # (P,)
    target: np.ndarray  # (3,) where the cameras look


def _arrays(prims: Sequence[_Prim], scale: float = 1.0):
    A = np.stack([np.diag(1 / (p.half * scale)) @ p.frame.T for p in prims])
    center = np.stack([p.center * scale for p in prims])
    return A, center


@lru_cache(maxsize=128)
def build_object(category: int, instance: int, seed: int = 0) -> _Object:
    """The toy (category 0-4, instance 0-9): primitives, albedos and size, all from the seed."""
    if not 0 <= category < 5 or not 0 <= instance < 10:
        raise ValueError(f"category must be in 0..4 and instance in 0..9, got {category}, {instance}")
    rng = np.random.default_rng([int(seed), category, instance, VERSION])
    prims = _BUILDERS[category](rng)
    base = rng.uniform(0.45, 0.95)  # lighter than the ground, like NORB's painted toys; no category cue
    albedo = np.clip(base * rng.uniform(0.75, 1.2, len(prims)), 0.06, 0.95)
    target_area = rng.uniform(*_AREA_RANGE)
    box = np.array([p.box for p in prims])
    lo, hi = _bounds(prims)
    tgt = np.array([0.0, 0.0, (lo[2] + hi[2]) / 2])
    # size: scale (about the ground point under the toy) to the target mean silhouette area
    A, c = _arrays(prims)
    area = _mean_area(A, c, box, tgt)
    scale = math.sqrt(target_area / area)
    A, c = _arrays(prims, scale)
    obj = _Object(category, instance, A.astype(np.float32), c.astype(np.float32), box,
                  albedo.astype(np.float32), (tgt * scale).astype(np.float32))
    return obj


# --------------------------------------------------------------------------- cameras and rays


def _cameras(target: np.ndarray, elev_deg: np.ndarray, azim_deg: np.ndarray, camera: int):
    """Per view: camera position, forward, right*tan, up*tan, and the 4 light directions."""
    el = np.radians(elev_deg)
    az = np.radians(_AZ0 + azim_deg)  # turning the toy by +a = moving camera and lights by +a
    back = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
    pos = target + _CAM_DIST * back
    right0 = np.stack([-np.sin(az), np.cos(az), np.zeros_like(az)], -1)  # horizontal, to the right
    if camera:
        pos = pos + _BASELINE / 2 * right0
    else:
        pos = pos - _BASELINE / 2 * right0
    fwd = target - pos
    fwd /= np.linalg.norm(fwd, axis=-1, keepdims=True)
    right = np.cross(fwd, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, fwd)
    lights = []
    for laz, lel in LIGHTS:
        a, e = az + math.radians(laz), math.radians(lel)
        lights.append(np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.full_like(a, math.sin(e))], -1))
    return pos, fwd, right * _TAN_HALF, up * _TAN_HALF, np.stack(lights, 1)


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[torch.Tensor, ...]:
    """Pixel-centre coordinates u (right), v (up) in [-1, 1], flattened, and u^2, uv, v^2."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(-c, c, indexing="ij")  # row 0 is the top of the image
    u, v = u.reshape(-1), v.reshape(-1)
    return u, v, u * u, u * v, v * v


def _mv(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (..., 3, 3) times x (..., 3), written out elementwise (order fixed, batch-shape free)."""
    return torch.stack([A[..., i, 0] * x[..., 0] + A[..., i, 1] * x[..., 1] + A[..., i, 2] * x[..., 2]
                        for i in range(3)], -1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _poly(coefs: Sequence[torch.Tensor], basis: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k coefs[k][..., None] * basis[k] (basis[0] = 1), as separate multiplies and adds."""
    out = coefs[0][..., None] + coefs[1][..., None] * basis[0]
    for k in range(2, len(coefs)):
        out += coefs[k][..., None] * basis[k - 1]
    return out


def _trace(A, c, box, cam, F, R, U, lights, size: int, shadows: bool = True):
    """Ray cast V views of one kind of object (P primitives, the same `box` layout).

    A (V, P, 3, 3) maps object coordinates into each primitive's frame, where an ellipsoid is the
    unit sphere and a box the cube [-1, 1]^3; c (V, P, 3) centres; box (P,) bool; cam/F/R/U
    (V, 3) camera position, forward and the right/up image-plane steps; lights (V, K, 3) unit
    directions towards the lights. With the ray x = cam + t (F + u R + v U), a primitive sees
    o + t (dF + u dR + v dU), so the ray-sphere quadratic's coefficients are polynomials in the
    pixel coordinates (u, v) with per-(view, primitive) coefficients.

    Returns hit (V, HW) (object, not ground), the winning primitive (V, HW), and per light the
    Lambert term times visibility (V, K, HW) (shadow rays against every primitive).
    """
    basis = _pixel_grid(size)
    u, v = basis[:2]
    inf = torch.tensor(float("inf"))
    o = _mv(A, cam[:, None] - c)  # (V, P, 3)
    dF, dR, dU = (_mv(A, x[:, None]) for x in (F, R, U))
    ell = [j for j in range(c.shape[1]) if not bool(box[j])]
    bx = [j for j in range(c.shape[1]) if bool(box[j])]
    best_t, best_j, rays = None, None, {}
    if ell:
        te, rays["ellipsoids"] = _ellipsoid_entry(o[:, ell], dF[:, ell], dR[:, ell], dU[:, ell], basis, inf)
        best_t, j = te.min(1)
        best_j = torch.tensor(ell)[j]
    if bx:
        tb, rays["boxes"] = _box_entry(o[:, bx], dF[:, bx], dR[:, bx], dU[:, bx], u, v, inf)
        tb_min, j = tb.min(1)
        jb = torch.tensor(bx)[j]
        if best_t is None:
            best_t, best_j = tb_min, jb
        else:
            take = tb_min < best_t
            best_t, best_j = torch.where(take, tb_min, best_t), torch.where(take, jb, best_j)
    dz = F[:, 2, None] + R[:, 2, None] * u + U[:, 2, None] * v
    tg = torch.where(dz < 0, -cam[:, 2, None] / dz, inf)  # the ground plane z = 0
    hit = best_t < tg
    if not shadows:
        return hit, None, None
    thit = torch.where(hit, best_t, tg)
    arg = torch.where(hit, best_j, 0)
    n = _normals(A, c, box, (cam, F, R, U), u, v, hit, thit, arg, bool(bx))
    return hit, arg, _shading(n, hit, thit, A, lights, rays, ell, bx, u, v)


def _ellipsoid_entry(oe, Fe, Re, Ue, basis, inf):
    """Where each ray enters each ellipsoid (V, Pe, HW; inf where it misses), and the ray-sphere
    quadratic's pieces, which the shadow rays reuse."""
    u, v, uu, uv, vv = basis
    qa = _poly([_dot(Fe, Fe), 2 * _dot(Fe, Re), 2 * _dot(Fe, Ue), _dot(Re, Re), 2 * _dot(Re, Ue), _dot(Ue, Ue)],
               (u, v, uu, uv, vv))  # |d|^2
    qb = _poly([_dot(oe, Fe), _dot(oe, Re), _dot(oe, Ue)], (u, v))  # o.d (half the linear coefficient)
    qc = _dot(oe, oe) - 1  # (V, Pe)
    disc = qb * qb - qa * qc[..., None]
    te = (-qb - disc.sqrt()) / qa  # NaN where the ray misses
    return torch.where(te > 0, te, inf), dict(oe=oe, Fe=Fe, Re=Re, Ue=Ue, qa=qa, qb=qb, qc=qc)


def _slabs(origin, direction):
    """The ray parameters (near, far) between which rays origin[i] + s direction[i] (i = x, y, z)
    are inside the cube [-1, 1]^3: the slab method, one axis at a time."""
    near, far = None, None
    for i in range(3):
        inv = 1 / direction[i]
        s1, s2 = (-1 - origin[i]) * inv, (1 - origin[i]) * inv
        lo, hi = torch.minimum(s1, s2), torch.maximum(s1, s2)
        near = lo if near is None else torch.maximum(near, lo)
        far = hi if far is None else torch.minimum(far, hi)
    return near, far


def _box_entry(ob, Fb, Rb, Ub, u, v, inf):
    """Where each ray enters each box (V, Pb, HW; inf where it misses), and the rays in the boxes'
    frames, which the shadow rays reuse."""
    dl_b = [(Fb[:, :, i, None] + Rb[:, :, i, None] * u) + Ub[:, :, i, None] * v for i in range(3)]
    tn, tf = _slabs([ob[..., i, None] for i in range(3)], dl_b)
    return torch.where((tn <= tf) & (tn > 0), tn, inf), dict(ob=ob, dl_b=dl_b)


def _normals(A, c, box, camera, u, v, hit, thit, arg, has_boxes: bool):
    """Unit normals (V, HW, 3) at the visible points: the gradient of the winning primitive's
    implicit function, mapped back by A^T; straight up on the ground."""
    cam, F, R, U = camera
    vi = torch.arange(c.shape[0])[:, None]
    Aw = A[vi, arg]  # (V, HW, 3, 3)
    dw = [F[:, i, None] + R[:, i, None] * u + U[:, i, None] * v for i in range(3)]
    x = torch.stack([cam[:, i, None] + thit * dw[i] - c[vi, arg, i] for i in range(3)], -1)
    q = _mv(Aw, x)  # hit point in the winner's unit frame
    g = q
    if has_boxes:
        qa_ = q.abs()
        m = torch.where(qa_[..., 0] >= qa_[..., 1], 0, 1)
        m = torch.where(qa_.gather(-1, m[..., None]).squeeze(-1) >= qa_[..., 2], m, 2)
        onehot = torch.nn.functional.one_hot(m, 3).to(q.dtype) * torch.sign(q)
        g = torch.where(box[arg][..., None], onehot, q)
    n = torch.stack([Aw[..., 0, i] * g[..., 0] + Aw[..., 1, i] * g[..., 1] + Aw[..., 2, i] * g[..., 2]
                     for i in range(3)], -1)
    n = n / _dot(n, n).sqrt()[..., None]
    return torch.where(hit[..., None], n, torch.tensor([0.0, 0.0, 1.0]))


def _shading(n, hit, thit, A, lights, rays: dict, ell, bx, u, v):
    """Per light, the Lambert term times visibility (V, K, HW): shadow rays from every visible point
    towards every light, against every primitive."""
    # Their origins o + t d lie on or outside every primitive, so a ray meets a primitive ahead
    # iff the quadratic has real roots whose sum is positive (> eps): no square root needed.
    t_ = thit[:, None]
    if ell:
        e = rays["ellipsoids"]
        ce = e["qc"][..., None] + t_ * (2 * e["qb"] + t_ * e["qa"])  # |o + t d|^2 - 1
        Le = _mv(A[:, ell, None], lights[:, None])  # (V, Pe, K, 3)
    if bx:
        b = rays["boxes"]
        os_b = [b["ob"][..., i, None] + t_ * b["dl_b"][i] for i in range(3)]
        Lb = _mv(A[:, bx, None], lights[:, None])
    shade = []
    for k in range(lights.shape[1]):
        blocked = torch.zeros_like(hit)
        if ell:
            Lk = Le[:, :, k]
            aL = _dot(Lk, Lk)
            hb = (_poly([_dot(e["Fe"], Lk), _dot(e["Re"], Lk), _dot(e["Ue"], Lk)], (u, v)) * t_
                  + _dot(e["oe"], Lk)[..., None])
            disc = hb * hb - aL[..., None] * ce
            blocked |= ((disc > 0) & (hb < (-0.5 * _EPS) * aL[..., None])).any(1)
        if bx:
            sn, sf = _slabs(os_b, [Lb[:, :, k, i, None] for i in range(3)])
            blocked |= ((sn <= sf) & (sf > _EPS)).any(1)
        L = lights[:, k]
        ndl = (n[..., 0] * L[:, 0, None] + n[..., 1] * L[:, 1, None] + n[..., 2] * L[:, 2, None]).clamp_min(0)
        shade.append(torch.where(blocked, torch.zeros_like(ndl), ndl))
    return torch.stack(shade, 1)


def _views(objs: Sequence[_Object], elev: np.ndarray, azim: np.ndarray, camera: int):
    targets = np.stack([o.target for o in objs]).astype(np.float64)
    cam, F, R, U, L = _cameras(targets, elev, azim, camera)
    f = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    A = f(np.stack([o.A for o in objs]))
    c = f(np.stack([o.center for o in objs]))
    return A, c, torch.from_numpy(objs[0].box), f(cam), f(F), f(R), f(U), f(L)


def _mean_area(A: np.ndarray, c: np.ndarray, box: np.ndarray, target: np.ndarray, size: int = 32) -> float:
    """Mean object-pixel fraction over 3 elevations x 6 azimuths (camera 0), unscaled toy."""
    el, az = np.meshgrid(np.array([30.0, 50.0, 70.0]), np.arange(0.0, 360.0, 60.0), indexing="ij")
    el, az = el.reshape(-1), az.reshape(-1)
    cam, F, R, U, L = _cameras(target[None].repeat(len(el), 0), el, az, 0)
    f = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    V = len(el)
    hit = _trace(f(A)[None].expand(V, -1, -1, -1), f(c)[None].expand(V, -1, -1), torch.from_numpy(box),
                 f(cam), f(F), f(R), f(U), f(L), size, shadows=False)[0]
    return float(hit.float().mean())


def _hash_noise(ids: np.ndarray, n_pix: int, seed: int) -> np.ndarray:
    """Triangular noise in (-1, 1), (len(ids), n_pix), from a splitmix64 hash: chunking-free."""
    with np.errstate(over="ignore"):
        x = (ids.astype(np.uint64)[:, None] * np.uint64(n_pix) + np.arange(n_pix, dtype=np.uint64)[None])
        x = x + np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2 ** 64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    a = (x & np.uint64(0xFFFFFF)).astype(np.float32) / 2 ** 24
    b = ((x >> np.uint64(24)) & np.uint64(0xFFFFFF)).astype(np.float32) / 2 ** 24
    return a - b


def _render_views(objs, elev, azim, camera, lightings, render_size):
    """uint8 images (V, len(lightings), R, R) of the given views, before resizing and noise."""
    A, c, box, cam, F, R, U, L = _views(objs, elev, azim, camera)
    hit, arg, shade = _trace(A, c, box, cam, F, R, U, L, render_size)
    V = len(objs)
    alb = torch.from_numpy(np.stack([o.albedo for o in objs]))  # (V, P)
    albedo = torch.where(hit, alb.gather(1, arg), torch.tensor(_GROUND_ALBEDO))  # (V, HW)
    amb = torch.tensor([LIGHTING[l][0] for l in lightings])  # (Lc,)
    w = torch.tensor([LIGHTING[l][1] for l in lightings])  # (Lc, K)
    rad = amb[None, :, None].expand(V, -1, shade.shape[-1])
    for k in range(shade.shape[1]):  # summed in a fixed order (bit-stable under any batching)
        rad = rad + w[None, :, k, None] * shade[:, None, k]
    img = (albedo[:, None] * rad).clamp(0, 1).pow(_GAMMA)
    out = (img * 255).round().to(torch.uint8)
    return out.reshape(V, len(lightings), render_size, render_size)


def _add_noise(images: torch.Tensor, ids: np.ndarray, seed: int) -> torch.Tensor:
    """Deterministic sensor noise: integer steps of triangular noise in (-_NOISE, _NOISE) levels."""
    n_pix = images.shape[-1] * images.shape[-2]
    noise = torch.from_numpy(_hash_noise(ids.reshape(-1), n_pix, seed)).reshape(images.shape)
    return (images.float() + (_NOISE * noise).round()).clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- public rendering


def render_synthnorb(categories: Iterable[int] = range(5), instances: Iterable[int] = range(10),
                     elevations: Iterable[int] = range(9), azimuths: Iterable[int] = range(18),
                     lightings: Iterable[int] = range(6), cameras: Iterable[int] = (0,),
                     image_size: int = 32, render_size: int | None = None, seed: int = 0,
                     chunk: int = 12, progress: bool = False,
                     threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Render any sub-grid: (images (n, S, S) uint8, info (n, 6) int64 in `INFO_COLUMNS`).

    Arguments are indices (elevation 0-8, azimuth 0-17, lighting 0-5, camera 0/1, instance 0-9).
    Images are ordered by camera, category, instance, elevation, azimuth, lighting (lighting
    fastest): with all 5 categories, one split's 5 instances and everything else, one camera
    gives the 24300 images of that split in the order `load_synthnorb` stores them.

    ``threads``: torch intra-op threads while rendering (restored afterwards; None leaves them).
    The tensors are small (views x primitives x pixels of one chunk), so a second thread gains
    little and, on a busy shared machine, threads waiting on each other cost a lot: one thread
    is the default. The pixels do not depend on it (checked: 1 and 2 threads, identical bytes).
    """
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return render_synthnorb(categories, instances, elevations, azimuths, lightings, cameras, image_size,
                                    render_size, seed, chunk, progress, threads=None)
        finally:
            torch.set_num_threads(before)
    cats, insts, elevs, azims, lights, cams = _check_indices(categories, instances, elevations, azimuths, lightings,
                                                             cameras)
    render_size = _render_size(image_size, render_size)
    images, infos = [], []
    todo = [(cam, ci, ii) for cam in cams for ci in cats for ii in insts]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo) * len(elevs) * len(azims), desc="synthnorb views", unit="view")
    e_grid, a_grid = np.meshgrid(np.array(elevs), np.array(azims), indexing="ij")
    e_grid, a_grid = e_grid.reshape(-1), a_grid.reshape(-1)
    for cam, ci, ii in todo:
        obj = build_object(ci, ii, seed)
        for s in range(0, len(e_grid), chunk):
            e, a = e_grid[s:s + chunk], a_grid[s:s + chunk]
            img, info = _render_chunk(obj, (cam, ci, ii), e, a, lights, render_size, image_size, seed)
            images.append(img)
            infos.append(info)
            if bar is not None:
                bar.update(len(e))
    if bar is not None:
        bar.close()
    if not images:
        return torch.zeros((0, image_size, image_size), dtype=torch.uint8), torch.zeros((0, 6), dtype=torch.long)
    return torch.cat(images), torch.cat(infos)


def _check_indices(*indices) -> tuple[list[int], ...]:
    """categories, instances, elevations, azimuths, lightings, cameras as lists of ints, each in range."""
    lists = tuple(list(map(int, x)) for x in indices)
    for name, vals, hi in zip(("category", "instance", "elevation", "azimuth", "lighting", "camera"), lists,
                              (5, 10, 9, 18, 6, 2)):
        if any(not 0 <= x < hi for x in vals):
            raise ValueError(f"{name} indices must be in 0..{hi - 1}, got {vals}")
    return lists


def _render_chunk(obj, who: tuple, e, a, lights: list, render_size: int, image_size: int, seed: int):
    """The images (V * L, S, S) and info rows of one object (``who``: camera, category, instance)
    at the V views (elevation e, azimuth a) under each of the L lightings."""
    cam, ci, ii = who
    V, Lc = len(e), len(lights)
    # a global id per image (camera, category, instance, elevation, azimuth, lighting)
    ids = ((((cam * 5 + ci) * 10 + ii) * 9 + e[:, None]) * 18 + a[:, None]) * 6 + np.array(lights)[None]
    raw = _render_views([obj] * V, np.array(ELEVATIONS, float)[e], np.array(AZIMUTHS, float)[a],
                        cam, lights, render_size)
    small = resize_images(raw.reshape(V * Lc, render_size, render_size), image_size)
    info = np.zeros((V, Lc, 6), dtype=np.int64)
    info[..., 0], info[..., 1], info[..., 5] = ci, ii, cam
    info[..., 2], info[..., 3] = e[:, None], a[:, None]
    info[..., 4] = np.array(lights)[None]
    return _add_noise(small, ids, seed), torch.from_numpy(info.reshape(-1, 6))


# --------------------------------------------------------------------------- the cached data set


def _render_size(image_size: int, render_size: int | None) -> int:
    """Default: render at twice the output size (2x2 supersampling), at least 64, at most 96."""
    if render_size is None:
        render_size = image_size if image_size >= 64 else min(96, max(64, 2 * image_size))
    if render_size < image_size:
        raise ValueError(f"render_size {render_size} is smaller than image_size {image_size}")
    return int(render_size)


def _params(image_size: int, render_size: int | None, seed: int) -> dict:
    render_size = _render_size(image_size, render_size)
    return {"name": "synthnorb", "version": VERSION, "image_size": int(image_size),
            "render_size": int(render_size), "seed": int(seed)}


def synthnorb_cache_path(split: str, camera: int, image_size: int = 32, render_size: int | None = None, seed: int = 0,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of one (split, camera): <cache root>/synthnorb/v<VERSION>-<key>/<split>-cam<c>.pt."""
    params = _params(image_size, render_size, seed)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return norb_cache_dir(cache_dir, "synthnorb") / f"v{VERSION}-{key}" / f"{split}-cam{camera}.pt"


def _load_cached(path: Path, image_size: int):
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, info = blob["images"], blob["info"]
    except Exception as exc:  # a damaged cache is regenerated, never fatal
        logger.warning("ignoring unreadable synthnorb cache %s (%s)", path, exc)
        return None
    if (images.dtype != torch.uint8 or tuple(images.shape) != (N_PAIRS, image_size, image_size)
            or tuple(info.shape) != (N_PAIRS, len(INFO_COLUMNS))):
        logger.warning("ignoring synthnorb cache %s: unexpected shapes", path)
        return None
    return images, info


def load_synthnorb(cache_dir: str | os.PathLike | None = None, cameras: str = "all", image_size: int = 32,
                   render_size: int | None = None, seed: int = 0, use_cache: bool = True,
                   progress: bool = False, threads: int | None = 1) -> NorbData:
    """The whole synthnorb (24300 images per split and camera), generated once and cached.

    Same format as `norb.load_smallnorb`: mode "all" is the left block then the right block.
    """
    cams = camera_select(cameras)
    parts = {}
    for split, insts in (("train", TRAIN_INSTANCES), ("test", TEST_INSTANCES)):
        images, infos = [], []
        for cam in cams:
            path = synthnorb_cache_path(split, cam, image_size, render_size, seed, cache_dir)
            got = _load_cached(path, image_size) if use_cache else None
            if got is None:
                t0 = time.perf_counter()
                got = render_synthnorb(range(5), insts, cameras=(cam,), image_size=image_size,
                                       render_size=render_size, seed=seed, progress=progress, threads=threads)
                logger.info("rendered synthnorb %s camera %d in %.1f s", split, cam, time.perf_counter() - t0)
                if use_cache:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_save({"images": got[0], "info": got[1],
                                  "params": json.dumps(_params(image_size, render_size, seed))}, path)
            images.append(got[0])
            infos.append(got[1])
        parts[split] = NorbPart(torch.cat(images), torch.cat(infos))
    params = _params(image_size, render_size, seed)
    return NorbData("synthnorb", parts["train"], parts["test"],
                    source=f"synthnorb v{VERSION} (seed {seed}, rendered at {params['render_size']}px)",
                    meta={**params, "cameras": cameras})


# --------------------------------------------------------------------------- figure


_DEFAULTS = {"elevation": 2, "azimuth": 2, "lighting": 0}


def save_example_grid(path: str | os.PathLike, data: NorbData | None = None, categories: Sequence[int] = range(5),
                      instance_rank: int = 0, split: str = "train", camera: int = 0, seed: int = 0) -> Path:
    """PNG: for each axis (elevation, azimuth, lighting), one row per category, one column per
    value, the other factors fixed (elevation 40deg, azimuth 40deg, lighting 0).

    From ``data`` (real or synthetic) when given, else rendered on the fly (synthnorb, ``seed``).
    The toy shown per category is the ``instance_rank``-th instance of ``split``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    insts = TRAIN_INSTANCES if split == "train" else TEST_INSTANCES
    inst = insts[instance_rank]
    cats = list(categories)
    name = data.name if data is not None else "synthnorb"
    fig, axes = plt.subplots(3, 1, figsize=(14, 2.2 + 0.95 * len(cats) * 3),
                             gridspec_kw={"height_ratios": [1, 1, 1]})
    for ax, axis in zip(axes, ("elevation", "azimuth", "lighting")):
        n_vals = {"elevation": 9, "azimuth": 18, "lighting": 6}[axis]
        rows = [torch.cat(list(_axis_images(data, axis, n_vals, ci, inst, split, camera, seed)), 1) for ci in cats]
        mosaic = torch.cat(rows, 0).numpy()
        s = mosaic.shape[0] // len(cats)
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([s * (j + 0.5) for j in range(n_vals)])
        ax.set_xticklabels([n.split(" ")[1] for n in group_names(axis)], fontsize=7)
        ax.set_yticks([s * (j + 0.5) for j in range(len(cats))])
        ax.set_yticklabels([CATEGORIES[c] for c in cats], fontsize=8)
        others = ", ".join(f"{k} {group_names(k)[v].split(' ')[1]}" for k, v in _DEFAULTS.items() if k != axis)
        ax.set_title(f"{name}: {axis} varies ({others}; {split} instance {inst}, camera {camera})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), Path(path))


def _axis_images(data: NorbData | None, axis: str, n_vals: int, ci: int, inst: int, split: str, camera: int,
                 seed: int) -> torch.Tensor:
    """The images of one toy as ``axis`` takes each of its ``n_vals`` values, the other factors at
    `_DEFAULTS`: from ``data``, or rendered (synthnorb, ``seed``) when it is None."""
    if data is None:
        sel = {k: [v] for k, v in _DEFAULTS.items()}
        sel[axis] = list(range(n_vals))
        return render_synthnorb([ci], [inst], sel["elevation"], sel["azimuth"], sel["lighting"],
                                cameras=(camera,), seed=seed)[0]
    part = data.part(split)
    info = part.info
    mask = (info[:, 0] == ci) & (info[:, 1] == inst) & (info[:, 5] == camera)
    for k in ("elevation", "azimuth", "lighting"):
        if k != axis:
            mask &= info[:, INFO_COLUMNS.index(k)] == _DEFAULTS[k]
    idx = torch.nonzero(mask).flatten()
    idx = idx[torch.argsort(info[idx, INFO_COLUMNS.index(axis)])]
    return part.images[idx]
