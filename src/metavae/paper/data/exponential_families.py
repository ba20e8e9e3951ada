"""Distribution families of the sufficient-statistics demo (docs/reproduction.md §8).

Every distribution draws 2-D samples whose two coordinates are independent, each with its own
parameter, so a distribution is described by a parameter pair ``params[m] = (theta_1, theta_2)``.
Three families are meta-trained (Gaussian, log-normal, exponential); three more are only seen at
test time (Weibull, Laplace, symmetric Beta).

Training priors follow the reference code (``src/datasets/expfam.py``), noting where the paper
differs:

* Gaussian ``N(mu, 0.1)`` (variance 0.1), ``mu ~ U(-5, 5)^2``.
* log-normal ``exp(N(mu, 0.1))``, ``mu ~ U(-2, 2)^2`` (the reference's train_many uses U(-5, 5),
  contradicting the paper; we keep the paper's range).
* exponential ``Exp(rate)``, ``rate ~ U(0.5, 3)^2``: the paper writes U(0, 3), but rates near 0
  give unbounded samples (mean 1/rate), so we keep the reference's 0.5.

Sampling uses only ``torch.rand``/``torch.randn`` with an explicit ``torch.Generator`` so that
data sets are reproducible without touching the global RNG (``torch.distributions`` cannot take a
generator). Draws are computed in float64 and returned as float32 by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

VARIANCE = 0.1  # fixed (log-space) variance of the Gaussian and log-normal families
STD = math.sqrt(VARIANCE)
N_SAMPLES = 10_000  # draws per distribution in the reference
N_TRAIN = 8_000  # first 8000 draws train, last 2000 test
N_DISTRIBUTIONS = 30  # distributions per family in the paper
VECTOR_SIZE = 20  # draws per "random vector" (the paper's 20-D vector)

_F64 = torch.float64
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- samplers
def _uniform(shape, generator) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=_F64)


def _std_exponential(shape, generator) -> Tensor:
    """Exp(1) by inversion; ``1 - U`` lies in (0, 1], so the log is finite."""
    return -torch.log1p(-_uniform(shape, generator))


def _std_gamma(alpha: Tensor, generator) -> Tensor:
    """Gamma(alpha, 1) by Marsaglia-Tsang rejection (boosted by ``U^(1/alpha)`` for alpha < 1).

    Needed because ``torch._standard_gamma`` only uses the global RNG.
    """
    boost = alpha < 1
    d = torch.where(boost, alpha + 1, alpha) - 1 / 3
    c = 1 / torch.sqrt(9 * d)
    out = torch.empty_like(alpha)
    todo = torch.ones_like(alpha, dtype=torch.bool)
    while bool(todo.any()):
        idx = torch.nonzero(todo.reshape(-1)).squeeze(1)
        d_i, c_i = d.reshape(-1)[idx], c.reshape(-1)[idx]
        z = torch.randn(idx.shape, generator=generator, dtype=_F64)
        u = _uniform(idx.shape, generator)
        v = (1 + c_i * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z**2 + d_i - d_i * v + d_i * torch.log(v.clamp(min=1e-300)))
        out.view(-1)[idx[ok]] = (d_i * v)[ok]
        todo.view(-1)[idx[ok]] = False
    u = _uniform(alpha.shape, generator)
    return torch.where(boost, out * u ** (1 / alpha.clamp(min=1e-12)), out)


def _expand(params: Tensor, n: int) -> Tensor:
    """(M, 2) parameters -> (M, n, 2), one per draw."""
    return params[:, None, :].expand(-1, n, -1)


def _sample_gaussian(p, n, g):
    return _expand(p, n) + STD * torch.randn((p.shape[0], n, 2), generator=g, dtype=_F64)


def _sample_lognormal(p, n, g):
    return torch.exp(_sample_gaussian(p, n, g))


def _sample_exponential(p, n, g):
    return _std_exponential((p.shape[0], n, 2), g) / _expand(p, n)


def _sample_weibull(p, n, g):
    return _std_exponential((p.shape[0], n, 2), g) ** (1 / _expand(p, n))


def _sample_laplace(p, n, g):
    """Laplace(0, b) as ``b`` times a difference of two Exp(1) draws (no edge cases at U=0)."""
    shape = (p.shape[0], n, 2)
    return _expand(p, n) * (_std_exponential(shape, g) - _std_exponential(shape, g))


def _sample_beta(p, n, g):
    a = _expand(p, n).contiguous()
    x, y = _std_gamma(a, g), _std_gamma(a, g)
    return x / (x + y)


# ----------------------------------------------------------------------------- decoder densities
def _log_prob_gaussian(x: Tensor, z: Tensor) -> Tensor:
    """log N(x; z, 0.1) with the correct scale sqrt(0.1) (the reference used 0.5 * 0.1)."""
    return -0.5 * ((x - z) / STD) ** 2 - math.log(STD) - 0.5 * math.log(2 * math.pi)


def _log_prob_lognormal(x: Tensor, z: Tensor) -> Tensor:
    """log-density of exp(N(z, 0.1)); -inf for x <= 0."""
    pos = x > 0
    log_x = torch.log(torch.where(pos, x, torch.ones_like(x)))
    lp = _log_prob_gaussian(log_x, z) - log_x
    return torch.where(pos, lp, torch.full_like(lp, -math.inf))


def _log_prob_exponential(x: Tensor, z: Tensor) -> Tensor:
    """log Exp(x; rate = exp(z)) = z - exp(z) x; -inf for x < 0. The log link keeps rate > 0."""
    lp = z - torch.exp(z) * x
    return torch.where(x >= 0, lp, torch.full_like(lp, -math.inf))


# ----------------------------------------------------------------------------- moments
def _weibull_mean(k):
    return torch.exp(torch.lgamma(1 + 1 / k))


def _weibull_variance(k):
    return torch.exp(torch.lgamma(1 + 2 / k)) - _weibull_mean(k) ** 2


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One family: sampler, prior, closed-form moments and (for trained families) decoder density.

    ``param_range`` is the valid parameter domain, ``train_range`` the meta-train prior
    (``None`` for families never trained on) and ``sweep`` the evaluation range of Fig. 3/4.
    ``to_latent``/``from_latent`` map the parameter to the decoder latent ``z`` and back
    (identity except the exponential, whose ``z`` is the log-rate).
    """

    name: str
    param_name: str
    param_range: tuple[float, float]
    train_range: tuple[float, float] | None
    sweep: tuple[float, float]
    _sampler: Callable
    _mean: Callable
    _variance: Callable
    _log_prob: Callable | None = None
    to_latent: Callable[[Tensor], Tensor] = lambda p: p
    from_latent: Callable[[Tensor], Tensor] = lambda z: z

    @property
    def trainable(self) -> bool:
        return self.train_range is not None

    def check_params(self, params) -> Tensor:
        """Return ``params`` as float64 ``(M, 2)``; raise ``ValueError`` on shape or domain errors."""
        p = torch.as_tensor(params, dtype=_F64)
        if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
            raise ValueError(f"{self.name}: params must have shape (M, 2) with M >= 1, got {tuple(p.shape)}")
        lo, hi = self.param_range
        if not bool(torch.all((p > lo) & (p < hi))):
            raise ValueError(f"{self.name}: {self.param_name} must lie in ({lo}, {hi}), got {p.tolist()}")
        return p

    def sample(self, params, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` i.i.d. 2-D draws from each of the ``M`` distributions: shape ``(M, n, 2)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"number of draws n must be a positive int, got {n!r}")
        return self._sampler(self.check_params(params), n, generator).to(dtype)

    def prior_sample(self, M: int, generator: torch.Generator | None = None,
                     low: float | None = None, high: float | None = None) -> Tensor:
        """``(M, 2)`` parameters, uniform on ``[low, high]^2`` (default: the meta-train prior)."""
        if isinstance(M, bool) or not isinstance(M, int) or M <= 0:
            raise ValueError(f"number of distributions M must be a positive int, got {M!r}")
        if low is None or high is None:
            if self.train_range is None:
                raise ValueError(f"{self.name} is not a meta-train family: pass low and high explicitly")
            low, high = self.train_range
        if not low < high:
            raise ValueError(f"need low < high, got [{low}, {high}]")
        return self.check_params(low + (high - low) * _uniform((M, 2), generator))

    def sweep_values(self, num: int) -> Tensor:
        """``num`` evenly spaced parameter values over the evaluation sweep (float64)."""
        return torch.linspace(*self.sweep, num, dtype=_F64)

    def mean(self, params) -> Tensor:
        """Closed-form per-coordinate mean, shape ``(M, 2)`` (float64)."""
        return self._mean(self.check_params(params))

    def variance(self, params) -> Tensor:
        """Closed-form per-coordinate variance, shape ``(M, 2)`` (float64)."""
        return self._variance(self.check_params(params))

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """Elementwise ``log p(x | z)`` for the parameter-free decoder (broadcast; sum coordinates yourself).

        ``z`` is the latent: the Gaussian mean, the log-normal log-space mean or the exponential log-rate.
        """
        if self._log_prob is None:
            raise ValueError(f"{self.name} has no decoder density (only gaussian, lognormal, exponential do)")
        return self._log_prob(x, z)


_POSITIVE = (0.0, math.inf)
_REAL = (-math.inf, math.inf)

FAMILIES: dict[str, Family] = {
    "gaussian": Family(
        "gaussian", "mean", _REAL, (-5.0, 5.0), (-10.0, 10.0),
        _sample_gaussian, lambda p: p.clone(), lambda p: torch.full_like(p, VARIANCE), _log_prob_gaussian,
    ),
    "lognormal": Family(
        "lognormal", "log-space mean", _REAL, (-2.0, 2.0), (-4.0, 4.0),
        _sample_lognormal,
        lambda p: torch.exp(p + VARIANCE / 2),
        lambda p: math.expm1(VARIANCE) * torch.exp(2 * p + VARIANCE),
        _log_prob_lognormal,
    ),
    "exponential": Family(
        "exponential", "rate", _POSITIVE, (0.5, 3.0), (0.5, 5.0),
        _sample_exponential, lambda p: 1 / p, lambda p: 1 / p**2, _log_prob_exponential,
        to_latent=torch.log, from_latent=torch.exp,
    ),
    "weibull": Family(
        "weibull", "shape", _POSITIVE, None, (0.5, 5.0),
        _sample_weibull, _weibull_mean, _weibull_variance,
    ),
    "laplace": Family(
        "laplace", "scale", _POSITIVE, None, (0.5, 5.0),
        _sample_laplace, torch.zeros_like, lambda p: 2 * p**2,
    ),
    "beta": Family(
        "beta", "alpha", _POSITIVE, None, (0.5, 5.0),
        _sample_beta, lambda p: torch.full_like(p, 0.5), lambda p: 1 / (4 * (2 * p + 1)),
    ),
}
TRAIN_FAMILIES: tuple[str, ...] = ("gaussian", "lognormal", "exponential")
UNSEEN_FAMILIES: tuple[str, ...] = ("weibull", "laplace", "beta")


def get_family(name: str) -> Family:
    """Look up a family by name with a helpful error."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from {sorted(FAMILIES)}") from None


def make_random_vectors(samples: Tensor, vector_size: int = VECTOR_SIZE,
                        generator: torch.Generator | None = None) -> Tensor:
    """Group i.i.d. draws ``(M, n, 2)`` into random vectors ``(M, n // vector_size, vector_size, 2)``.

    With a ``generator`` the draws of each distribution are shuffled first, so the remainder that
    does not fill a vector is dropped at random rather than always from the end.
    """
    if samples.ndim != 3 or samples.shape[2] != 2:
        raise ValueError(f"samples must have shape (M, n, 2), got {tuple(samples.shape)}")
    if isinstance(vector_size, bool) or not isinstance(vector_size, int) or vector_size <= 0:
        raise ValueError(f"vector_size must be a positive int, got {vector_size!r}")
    M, n, _ = samples.shape
    if n < vector_size:
        raise ValueError(f"need at least vector_size={vector_size} draws per distribution, got {n}")
    if generator is not None:
        order = torch.argsort(torch.rand((M, n), generator=generator), dim=1)
        samples = torch.gather(samples, 1, order[:, :, None].expand(-1, -1, 2))
    k = n // vector_size
    return samples[:, : k * vector_size].reshape(M, k, vector_size, 2)
