"""Inclined-plane simulator of the classical-mechanics demo (docs/reproduction.md §9) and its exact Bayes posterior.

A box with friction ``mu ~ U(0.0001, 1)`` slides down a plane of length ``L`` and angle ``A``
degrees; the observation is its noisy descent time. The reference (adapted from Pyro's
``inclined_plane.py``) integrates the motion with Euler steps of ``dt = 0.005``:
``position += v*dt; v += a*dt; T += dt`` until ``position >= L``. After ``n`` steps the
position is exactly ``a*dt**2*n*(n-1)/2``, so the descent time is ``dt`` times the smallest such
``n`` reaching ``L``. That closed form is what we use (:func:`descent_time`); the stepwise loop is
kept (:func:`descent_time_stepwise`) to prove the two agree. The continuous-time answer
``sqrt(2L/a)`` is shorter by about ``dt`` (one wasted first step with ``v = 0`` plus rounding up).

Boxes with ``a <= 0`` (``mu >= tan A``) never slide: their time is :data:`CENSORED_TIME` with no
noise. Because the discrete time is a step function of ``mu``, the Bayes posterior is computed
exactly over the ``mu``-intervals sharing one step count (:func:`posterior_moments`), not on a grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

G = 9.8
DT = 0.005
NOISE_STD = 0.02
MU_LOW, MU_HIGH = 0.0001, 1.0
CENSORED_TIME = 1e5

TRAIN_SIMULATORS: list[tuple[int, int]] = [(L, A) for L in (2, 4, 6, 8, 10) for A in (20, 30, 40, 50, 60)]
# The reference grid is arange(1, 20) x arange(5, 85, 5); the paper's "L in [1,20], A in [5,85]" is looser.
TEST_SIMULATORS: list[tuple[int, int]] = [(L, A) for L in range(1, 20) for A in range(5, 85, 5)]
BASELINE_SIMULATOR: tuple[int, int] = (10, 45)

_F64 = torch.float64


# ----------------------------------------------------------------------------- validation
def _as_f64(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=_F64)


def _check_plane(L, A) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate lengths (> 0) and angles (strictly inside (0, 90) degrees); return float64 tensors."""
    L_t, A_t = _as_f64(L), _as_f64(A)
    if not bool(torch.all(L_t > 0)):
        raise ValueError(f"plane length L must be positive, got {L}")
    if not bool(torch.all((A_t > 0) & (A_t < 90))):
        raise ValueError(f"plane angle A must lie strictly between 0 and 90 degrees, got {A}")
    return L_t, A_t


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"number of simulations n must be a positive int, got {n!r}")
    return n


# ----------------------------------------------------------------------------- mechanics
def acceleration(A, mu) -> torch.Tensor:
    """Acceleration ``g sin(phi) - g cos(phi) mu`` along the plane (``A`` in degrees)."""
    phi = torch.deg2rad(_as_f64(A))
    return G * torch.sin(phi) - G * torch.cos(phi) * _as_f64(mu)


def _position(a: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Exact Euler position after ``n`` steps from rest: the sum of ``v_k dt`` for ``k < n``."""
    return a * DT**2 * n * (n - 1) / 2


def descent_steps(L, A, mu) -> torch.Tensor:
    """Number of Euler steps the reference takes to reach ``L`` (int64; 0 where the box never slides).

    Solves ``a dt^2 n(n-1)/2 >= L`` for the smallest ``n``; one correction each way absorbs the
    rounding of the square root, so the result equals the loop's count.
    """
    L_t, A_t = _check_plane(L, A)
    a = acceleration(A_t, mu)
    L_t, a = torch.broadcast_tensors(L_t, a)
    sliding = a > 0
    a_safe = torch.where(sliding, a, torch.ones_like(a))
    c = 2 * L_t / (a_safe * DT**2)
    n = torch.ceil((1 + torch.sqrt(1 + 4 * c)) / 2)
    n = n + (_position(a_safe, n) < L_t).to(_F64)
    n = n - ((n > 1) & (_position(a_safe, n - 1) >= L_t)).to(_F64)
    return torch.where(sliding, n, torch.zeros_like(n)).to(torch.int64)


def descent_time(L, A, mu) -> torch.Tensor:
    """Noise-free descent time ``dt * steps`` (float64), :data:`CENSORED_TIME` where ``a <= 0``."""
    n = descent_steps(L, A, mu)
    return torch.where(n > 0, n.to(_F64) * DT, torch.full(n.shape, CENSORED_TIME, dtype=_F64))


def descent_time_stepwise(L, A, mu, max_steps: int = 1_000_000) -> torch.Tensor:
    """The reference's Euler loop, vectorized over runs (slow: cost grows with the longest descent).

    Kept as the ground truth for :func:`descent_time`. Runs still moving are compacted each step;
    ``T`` accumulates ``dt`` exactly as the reference does (so it may differ from ``n*dt`` by ulps).
    """
    L_t, A_t = _check_plane(L, A)
    a = acceleration(A_t, mu)
    L_t, a = torch.broadcast_tensors(L_t, a)
    L_flat, a_flat = L_t.reshape(-1), a.reshape(-1)
    out = torch.full(a_flat.shape, CENSORED_TIME, dtype=_F64)
    idx = torch.nonzero(a_flat > 0).squeeze(1)
    pos = torch.zeros(idx.numel(), dtype=_F64)
    vel = torch.zeros_like(pos)
    acc, length = a_flat[idx], L_flat[idx]
    T, steps = 0.0, 0
    while idx.numel():
        if steps >= max_steps:
            raise RuntimeError(f"descent needs more than max_steps={max_steps} steps")
        pos += vel * DT
        vel += acc * DT
        T += DT
        steps += 1
        done = pos >= length
        if bool(done.any()):
            out[idx[done]] = T
            keep = ~done
            idx, pos, vel, acc, length = idx[keep], pos[keep], vel[keep], acc[keep], length[keep]
    return out.reshape(a.shape)


# ----------------------------------------------------------------------------- simulation
def _simulate(L: torch.Tensor, A: torch.Tensor, shape, generator, dtype):
    mu = MU_LOW + (MU_HIGH - MU_LOW) * torch.rand(shape, generator=generator, dtype=_F64)
    T = descent_time(L, A, mu)
    censored = T == CENSORED_TIME
    noise = NOISE_STD * torch.randn(shape, generator=generator, dtype=_F64)
    x = torch.where(censored, T, T + noise)
    return x.to(dtype), mu.to(dtype), censored


def simulate(L: float, A: float, n: int, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one simulator ``n`` times: ``(x, mu, censored)``, each of shape ``(n,)``.

    ``x`` is the observed time (``T + 0.02 N(0,1)``, or exactly :data:`CENSORED_TIME` when
    ``censored``); ``mu`` is the true friction. Computed in float64, returned as ``dtype``
    (1e5 is exact in float32, so ``x == CENSORED_TIME`` still identifies censored runs).
    """
    L_t, A_t = _check_plane(L, A)
    if L_t.ndim or A_t.ndim:
        raise ValueError("simulate takes one scalar (L, A); use simulate_many for several simulators")
    return _simulate(L_t, A_t, (_check_count(n),), generator, dtype)


def simulate_many(simulators: Sequence[tuple[float, float]], n: int, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run every ``(L, A)`` simulator ``n`` times at once: ``(x, mu, censored)`` of shape ``(K, n)``."""
    if len(simulators) == 0:
        raise ValueError("simulators must be a non-empty sequence of (L, A) pairs")
    planes = _as_f64(simulators)
    if planes.ndim != 2 or planes.shape[1] != 2:
        raise ValueError(f"simulators must be (L, A) pairs, got shape {tuple(planes.shape)}")
    L_t, A_t = _check_plane(planes[:, :1], planes[:, 1:])
    return _simulate(L_t, A_t, (len(planes), _check_count(n)), generator, dtype)


# ----------------------------------------------------------------------------- exact Bayes posterior
def _scalar_plane(L, A) -> tuple[float, float]:
    L_t, A_t = _check_plane(L, A)
    if L_t.ndim or A_t.ndim:
        raise ValueError("the posterior is for one simulator: pass scalar L and A")
    return float(L_t), float(A_t)


def _censored_interval(A: float) -> tuple[float, float]:
    """Prior support of ``mu`` that never slides: ``[tan A, 1]`` clipped to ``[MU_LOW, MU_HIGH]``."""
    lo = min(max(math.tan(math.radians(A)), MU_LOW), MU_HIGH)
    return lo, MU_HIGH


def censored_mse_floor(A: float) -> float:
    """Lower bound on any estimator's MSE from censoring: ``P(censored) * Var(mu | censored)``.

    Censored runs carry no information beyond ``mu >= tan A``, so the best guess is the
    midpoint of ``[tan A, 1]`` with error variance ``(1 - tan A)^2 / 12`` (docs/reproduction.md §9).
    """
    _scalar_plane(1.0, A)
    lo, hi = _censored_interval(A)
    return (hi - lo) / (MU_HIGH - MU_LOW) * (hi - lo) ** 2 / 12


def _step_intervals(L: float, n: torch.Tensor, a_min: float, a_max: float):
    """Acceleration interval ``[a_n, a_{n-1})`` giving exactly ``n`` steps, clipped to the prior range.

    ``a_k = 2L / (dt^2 k (k-1))`` is the smallest acceleration that covers ``L`` in ``k`` steps.
    Returns the clipped endpoints and lengths (0 outside the prior or for ``n < 2``).
    """
    a_lo = (2 * L / (DT**2 * n * (n - 1))).clamp(min=a_min)
    a_hi = (2 * L / (DT**2 * (n - 1) * (n - 2))).clamp(max=a_max)
    a_hi = torch.where(n <= 2, torch.full_like(a_hi, a_max), a_hi)
    length = torch.where(n >= 2, (a_hi - a_lo).clamp(min=0), torch.zeros_like(a_lo))
    return a_lo, a_hi, length


def posterior_moments(x_obs, L: float, A: float, n_sigma: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior mean and variance of ``mu`` given observed times ``x_obs`` for one simulator.

    The prior on ``mu`` is uniform, hence uniform on ``a`` (an affine map). For a sliding box
    ``p(x | n) = N(x; n dt, 0.02^2)``, so the posterior is a mixture of uniform pieces, one per
    step count ``n``, weighted by piece length times that Gaussian. Only pieces within
    ``n_sigma`` noise std of ``x`` matter (the rest weigh < exp(-n_sigma^2/2)); the window is
    moved onto the feasible step counts so even implausible ``x`` get the nearest ones.
    An observation equal to :data:`CENSORED_TIME` gives the prior restricted to ``[tan A, 1]``.
    Returns float64 tensors shaped like ``x_obs``; NaN where ``x`` is impossible (sliding when no
    box can slide).
    """
    L, A = _scalar_plane(L, A)
    x = _as_f64(x_obs)
    flat = x.reshape(-1)
    mean = torch.empty_like(flat)
    var = torch.empty_like(flat)
    censored = flat == CENSORED_TIME
    lo, hi = _censored_interval(A)
    mean[censored], var[censored] = (lo + hi) / 2, (hi - lo) ** 2 / 12
    sliding = ~censored
    if bool(sliding.any()):
        mean[sliding], var[sliding] = _sliding_moments(flat[sliding], L, A, n_sigma)
    return mean.reshape(x.shape), var.reshape(x.shape)


def _sliding_moments(x: torch.Tensor, L: float, A: float, n_sigma: float):
    phi = math.radians(A)
    g_sin, g_cos = G * math.sin(phi), G * math.cos(phi)
    a_max = g_sin - g_cos * MU_LOW
    if a_max <= 0:
        nan = torch.full_like(x, float("nan"))
        return nan, nan
    a_min = max(g_sin - g_cos * MU_HIGH, 0.0)
    n_first = float(descent_steps(L, A, MU_LOW))
    n_last = float(descent_steps(L, A, MU_HIGH)) if a_min > 0 else float("inf")
    half = math.ceil(n_sigma * NOISE_STD / DT)
    offsets = torch.arange(-half, half + 1, dtype=_F64)
    centre = torch.round(x / DT).clamp(min=n_first, max=n_last)
    # Pieces depend on the window centre only: build them once per distinct centre, then gather.
    centres, inverse = torch.unique(centre, return_inverse=True)
    a_lo, a_hi, length = _step_intervals(L, centres[:, None] + offsets, a_min, a_max)
    mid = ((g_sin - (a_lo + a_hi) / 2) / g_cos)[inverse]  # piece midpoints in mu
    width_var = ((length / g_cos) ** 2 / 12)[inverse]
    z = (x[:, None] - (centre[:, None] + offsets) * DT) / NOISE_STD
    w = torch.softmax(torch.log(length)[inverse] - 0.5 * z**2, dim=1)
    mean = (w * mid).sum(1)
    var = (w * (width_var + (mid - mean[:, None]) ** 2)).sum(1)
    return mean, var


def posterior_mean(x_obs, L: float, A: float, n_sigma: float = 10.0) -> torch.Tensor:
    """Bayes-optimal (squared-error) estimate ``E[mu | x]`` for one simulator; see :func:`posterior_moments`."""
    return posterior_moments(x_obs, L, A, n_sigma)[0]


def bayes_mse(L: float, A: float, n: int, generator: torch.Generator | None = None) -> float:
    """Monte Carlo MSE of the exact posterior mean on ``n`` fresh simulations: the floor for any method."""
    x, mu, _ = simulate(L, A, n, generator, dtype=_F64)
    return float(((posterior_mean(x, L, A) - mu) ** 2).mean())
