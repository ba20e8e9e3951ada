"""ELBO, MetaELBO and the importance-weighted estimate of log p(x), for any model with
``encode``, ``decode``, ``latent`` and ``likelihood`` (MetaVAE, and the VAE as its no-context case).

Shapes: x (K, B, *event), context (K, B, N, *event) or None; results are per point, (K, B).
"""
from __future__ import annotations

import torch


def decoder_log_lik(model, x, z, dist):
    """log p(x | z_s) for every drawn z: z (K, B, S, dz) -> (K, B, S)."""
    params = model.decode(z, dist)
    return model.likelihood.log_prob(params, x.flatten(2).unsqueeze(2))


def expected_log_lik(latent, params, log_lik, n_samples: int = 1) -> torch.Tensor:
    """E_q[log p(x|z)] per point for q = ``latent`` with ``params``; ``log_lik(z)`` maps the drawn
    points (..., S, dz) to (..., S). Any likelihood works, not only a model's decoder."""
    z, w = latent.draw(params, n_samples)
    return (w * log_lik(z)).sum(-1)


def elbo_of(latent, params, log_lik, n_samples: int = 1) -> torch.Tensor:
    """E_q[log p(x|z)] - KL(q || p(z)) per point for given parameters of q: the one ELBO formula,
    which `elbo` applies to an encoder's output and `refine` optimises per point."""
    return expected_log_lik(latent, params, log_lik, n_samples) - latent.kl(params)


def elbo(model, x, context=None, dist=None, n_samples: int = 1) -> torch.Tensor:
    """E_q[log p(x|z)] - KL(q(z|D,x) || p(z)), per point (K, B)."""
    params = model.encode(x, context)
    return elbo_of(model.latent, params, lambda z: decoder_log_lik(model, x, z, dist), n_samples)


def free_bits_meta_elbo(model, x, context=None, dist=None, free_bits: float = 0.0) -> torch.Tensor:
    """The MetaELBO with "free bits" (Kingma et al. 2016): each latent dimension's KL, averaged
    over the batch, counts as at least ``free_bits`` nats, so the optimiser gains nothing by
    pushing a dimension's posterior onto the prior below that: a remedy for posterior collapse.
    A training objective (a lower bound only when no dimension sits below the floor)."""
    params = model.encode(x, context)
    rec = expected_log_lik(model.latent, params, lambda z: decoder_log_lik(model, x, z, dist))
    kl = model.latent.kl_per_dim(params).mean(dim=(0, 1)).clamp_min(free_bits).sum()
    return rec.mean(dim=1).mean(dim=0) - kl


def meta_elbo(model, x, context=None, dist=None, n_samples: int = 1) -> torch.Tensor:
    """The MetaELBO: the mean over distributions of each distribution's mean ELBO under its
    own decoder. A scalar to maximise."""
    return elbo(model, x, context, dist, n_samples).mean(dim=1).mean(dim=0)


def iw_log_likelihood(model, x, context=None, dist=None, k: int = 10) -> torch.Tensor:
    """The k-sample importance-weighted lower bound on log p(x) (Burda et al.), per point (K, B).
    It is >= the ELBO and tightens as k grows; with an enumerable latent it is exact."""
    params = model.encode(x, context)
    return iw_of(model.latent, params, lambda z: decoder_log_lik(model, x, z, dist), k)


def iw_of(latent, params, log_lik, k: int = 10) -> torch.Tensor:
    """The k-sample importance-weighted bound with q = ``latent`` with ``params`` as the proposal,
    for any likelihood ``log_lik(z)`` (as `elbo_of`): log (1/k) sum_s p(x|z_s) p(z_s) / q(z_s)."""
    z, corr = latent.importance(params, k)
    return torch.logsumexp(log_lik(z) + corr, dim=-1)
