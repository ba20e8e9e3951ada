"""Likelihoods p(x|z) and latent families q(z|.), p(z) used by every model.

Decoders output a flat parameter vector per point; a likelihood turns it into log p(x|z)
summed over the event. Latents give the two things the objectives need:
  * `draw`: points z with weights w (summing to 1) so that E_q[f(z)] ~ sum_s w_s f(z_s);
    Gaussians draw reparameterized samples, small categoricals enumerate their support
    exactly (no relaxation, no gradient variance);
  * `importance`: points z with log-corrections c so that log p(x) ~ logsumexp_s(log p(x|z_s) + c_s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# --- the Gaussian formulas, written once -------------------------------------------------------
def standard_kl_per_dim(mu, logvar) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, 1)) per dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mu_q, logvar_q, mu_p=None, logvar_p=None) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) of diagonal Gaussians, summed over the last
    dim; the prior defaults to N(0, I)."""
    if mu_p is None:
        return standard_kl_per_dim(mu_q, logvar_q).sum(-1)
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0).sum(-1)


def gaussian_log_prob(x, mu, logvar) -> torch.Tensor:
    """log N(x; mu, diag(e^logvar)) summed over the last dim, with the full constant."""
    return -0.5 * ((x - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


# --- likelihoods ---------------------------------------------------------------------------
class Bernoulli:
    """Bernoulli on [0, 1] values (cross-entropy on grey levels, as the paper). Decoders emit logits,
    which is exact where the reference clamps sigmoid means to [1e-7, 1 - 1e-7]."""

    name = "bernoulli"

    def n_params(self, event_numel: int) -> int:
        return event_numel

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.expand_as(params)
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


LOGVAR_BOUND = 9.0  # a learned variance stays within exp(+-9), about [1e-4, 8e3]


class Gaussian:
    """Diagonal Gaussian with a fixed variance, or (``variance=None``) one learned per output."""

    name = "gaussian"

    def __init__(self, variance: float | None = 1.0):
        if variance is not None and not variance > 0:
            raise ValueError(f"Gaussian likelihood variance must be positive, got {variance}")
        self.variance = variance

    def n_params(self, event_numel: int) -> int:
        return event_numel if self.variance is not None else 2 * event_numel

    def _split(self, params):
        if self.variance is not None:
            return params, torch.full_like(params, math.log(self.variance))
        mean, raw = params.chunk(2, dim=-1)
        # softly bounded to (-LOGVAR_BOUND, LOGVAR_BOUND): an unbounded learned variance can collapse
        # onto a point (log-density -> inf) or explode in the first steps and end training in NaN
        return mean, LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = self._split(params)
        return gaussian_log_prob(x, mean, logvar)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self._split(params)[0]


def draw(likelihood, params: torch.Tensor, mean: bool = False, generator=None) -> torch.Tensor:
    """Points from decoder outputs: a draw from p(x | z) (Bernoulli: 0/1 values), or with ``mean=True``
    the likelihood's mean. Sampling is the default: means spread less than the data do."""
    if mean:
        return likelihood.mean(params)
    where = generator.device if generator is not None else params.device  # a CPU generator for CUDA params

    def noise(fn, shape):
        return fn(shape, generator=generator, dtype=params.dtype, device=where).to(params.device)

    if likelihood.name == "bernoulli":
        return (noise(torch.rand, params.shape) < torch.sigmoid(params)).to(params.dtype)
    mu, logvar = likelihood._split(params)
    return mu + torch.exp(0.5 * logvar) * noise(torch.randn, mu.shape)


def make_likelihood(name: str, variance: float | None = None):
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(variance)
    raise ValueError(f"unknown likelihood '{name}'; choose 'bernoulli' or 'gaussian'")


# --- latents -------------------------------------------------------------------------------
class GaussianLatent:
    """q(z|.) = N(mu, diag(exp(logvar))), p(z) = N(0, I)."""

    enumerable = False

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"latent dimension must be >= 1, got {dim}")
        self.dim = dim
        self.n_params = 2 * dim

    def split(self, params):
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    def mean(self, params):
        return self.split(params)[0]

    def kl(self, params):
        return self.kl_per_dim(params).sum(-1)

    def kl_per_dim(self, params):
        return standard_kl_per_dim(*self.split(params))

    def _sample(self, params, n):
        mu, logvar = self.split(params)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(*mu.shape[:-1], n, self.dim, dtype=mu.dtype, device=mu.device)
        return mu.unsqueeze(-2) + std.unsqueeze(-2) * eps, eps, logvar

    def draw(self, params, n: int = 1):
        z, _, _ = self._sample(params, n)
        return z, torch.full(z.shape[:-1], 1.0 / n, dtype=z.dtype, device=z.device)

    def importance(self, params, n: int):
        z, eps, logvar = self._sample(params, n)
        log_q = -0.5 * (eps.pow(2) + logvar.unsqueeze(-2) + LOG_2PI).sum(-1)
        log_p = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        return z, log_p - log_q - math.log(n)


class CategoricalLatent:
    """A discrete z with few values, summed out exactly; p(z) uniform. z is one-hot."""

    enumerable = True

    def __init__(self, n_values: int):
        if n_values < 2:
            raise ValueError(f"a categorical latent needs at least 2 values, got {n_values}")
        self.dim = self.n_params = n_values

    def mean(self, params):
        return torch.softmax(params, dim=-1)

    def kl(self, params):
        log_q = torch.log_softmax(params, dim=-1)
        return (log_q.exp() * (log_q + math.log(self.dim))).sum(-1)

    def _support(self, params):
        eye = torch.eye(self.dim, dtype=params.dtype, device=params.device)
        return eye.expand(*params.shape[:-1], self.dim, self.dim)

    def draw(self, params, n: int = 1):
        return self._support(params), torch.softmax(params, dim=-1)

    def importance(self, params, n: int = 1):
        z = self._support(params)
        return z, torch.full(z.shape[:-1], -math.log(self.dim), dtype=z.dtype, device=z.device)


def make_latent(kind: str, dim: int):
    if kind == "gaussian":
        return GaussianLatent(dim)
    if kind == "categorical":
        return CategoricalLatent(dim)
    raise ValueError(f"unknown latent '{kind}'; choose 'gaussian' or 'categorical'")
