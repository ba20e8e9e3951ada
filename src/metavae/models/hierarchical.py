"""What the Neural Statistician (`ns.py`) and the Variational Homoencoder (`vhe.py`) share: a
global latent c per set and a local latent z per element,
  q(c | D)      statistic network: mean-pooled element features -> (mu_c, logvar_c)
  q(z | x, c)   inference network
  p(z | c)      latent decoder
  p(x | z, c)   observation decoder, one shared by every distribution,
their networks (`build_parts`), one builder (`build_hierarchical`) and an optional VampPrior on c.

VampPrior (``prior="vampprior"``): p(c) = (1/M) sum_m q(c | U_m), U_m a learned pseudo-dataset of
``n_pseudo`` pseudo-inputs (M = 500 components of 10, MLP and conv alike: the reference's conv
version silently used 10), pseudo-inputs hardtanh(0, 1) of weights initialised N(0.05, 0.01^2)
and encoded by the model's own statistic network. KL(q(c|D) || p(c)) is the single-sample estimate
log q(c|D) - log p(c) at the sampled c, with the normalising constants of the full c dimension
(the reference's helper took the constant from a size-1 axis, an offset of about -274.8 nats).

Differences from the reference, all deliberate:
  * ``embed`` uses the *mean* of q(c|D), so embeddings are deterministic (the reference samples c);
  * conv variants: GroupNorm/LayerNorm instead of BatchNorm (see `metavae.nets.conv`);
  * the MLP VHE's statistic network is affine in the elements (Lin(784->400), no nonlinearity,
    then mean): we take the mean first and apply the same affine map after, identical in value
    and parameters, ten times cheaper for N = 10;
  * likelihoods take logits (exact) where the reference clamps sigmoid means.
Init as the reference: Xavier-normal weights with gain sqrt(2), zero biases.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.meta import PooledContext, map_points
from ..distributions import LOG_2PI, Bernoulli, GaussianLatent, draw, gaussian_kl, gaussian_log_prob
from ..nets.conv import DEFAULT_CHANNELS, GROUPS, ConvDecoderTrunk, ConvEncoder, FCResBlock, image_shape, reference_init
from ..nets.sets import AttentionPool, MeanPool
from .base import Saveable, check_pooling


# --- densities -----------------------------------------------------------------------------
def mixture_log_prob(c: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/M) sum_m N(c; mu_m, diag(e^logvar_m)) for c (..., D) and M components (M, D).

    The quadratic form is expanded into two matrix products, c^2 . prec^T - 2 c . (mu prec)^T +
    sum mu^2 prec, so the (points x M x D) tensor is never built (900 x 500 x 300 floats at K=9,
    B=100); they are accumulated in float64, where the expansion loses nothing that matters.
    """
    shape, D, M = c.shape[:-1], c.shape[-1], mu.shape[0]
    c2 = c.reshape(-1, D).double()
    mu, logvar = mu.double(), logvar.double()
    prec = torch.exp(-logvar)
    quad = (c2 * c2) @ prec.T - 2.0 * (c2 @ (mu * prec).T) + (mu * mu * prec).sum(-1)
    log_comp = -0.5 * (quad + logvar.sum(-1) + D * LOG_2PI)
    return (torch.logsumexp(log_comp, dim=-1) - math.log(M)).to(c.dtype).reshape(shape)


# --- small modules -------------------------------------------------------------------------
class TwoInput(nn.Module):
    """body(ELU(cat[fc_a(a), fc_b(b)])), b broadcast over a's leading dims (e.g. one c per set)."""

    def __init__(self, a_dim: int, b_dim: int, hidden: int, body: nn.Module):
        super().__init__()
        self.fc_a, self.fc_b, self.act, self.body = nn.Linear(a_dim, hidden), nn.Linear(b_dim, hidden), nn.ELU(), body

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.fc_a(a), self.fc_b(b)
        lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return self.body(self.act(torch.cat([a.expand(*lead, -1), b.expand(*lead, -1)], dim=-1)))


class ScalarAffine(nn.Module):
    """y = w x + b with scalar w, b: stands in for the conv Neural Statistician's "global"
    BatchNorm1d(1) layers, which are such a map at evaluation; 2 parameters each, as BatchNorm(1).
    (A per-sample normalisation over the 80 or 600 parameter outputs would constrain the posterior
    family, so we keep only the affine part; see `metavae.nets.conv` on normalisation.)"""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class TrunkHead(nn.Module):
    """Adapts the conv decoder trunk (first dim = rows) to any (..., features) input."""

    def __init__(self, trunk: ConvDecoderTrunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        return self.trunk(h.reshape(1, -1, h.shape[-1])).reshape(*lead, -1)


class VampPrior(nn.Module):
    """Pseudo-datasets U (M, P, *event): hardtanh(0, 1) of weights initialised N(mean, std^2).
    The weights are the reference's bias-free Lin(M -> P*D) applied to an identity (same values,
    same parameter count, no matrix product)."""

    def __init__(self, n_components: int, n_pseudo: int, event_shape: Sequence[int], mean: float = 0.05,
                 std: float = 0.01):
        super().__init__()
        if n_components < 1 or n_pseudo < 1:
            raise ValueError(f"VampPrior needs >= 1 component and pseudo-input, got {n_components}, {n_pseudo}")
        self.n_components, self.n_pseudo = n_components, n_pseudo
        self.weight = nn.Parameter(torch.empty(n_components, n_pseudo, *event_shape))
        self.mean, self.std = mean, std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(self.mean, self.std)

    def pseudo_inputs(self) -> torch.Tensor:
        return F.hardtanh(self.weight, 0.0, 1.0)


# --- the shared model ----------------------------------------------------------------------
def context_sets(x: torch.Tensor, context: torch.Tensor, event_shape: tuple):
    """Check shapes; return (lead, sets, context reshaped to (*sets, N, *event)).

    ``context`` is a set per query (*lead, N, *event), sets shared along dims of size 1, or one
    set (N, *event) for every query."""
    ne = len(event_shape)
    if x.dim() < ne or tuple(x.shape[x.dim() - ne:]) != event_shape:
        raise ValueError(f"queries must end in the event shape {event_shape}, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[: x.dim() - ne])
    if context.dim() < ne + 1 or tuple(context.shape[context.dim() - ne:]) != event_shape:
        raise ValueError(f"context must be (..., N, *{event_shape}), got shape {tuple(context.shape)}")
    c_lead = tuple(context.shape[: context.dim() - ne])
    if len(c_lead) == 1:
        c_lead = (1,) * len(lead) + c_lead
    sets = c_lead[:-1]
    if len(sets) != len(lead) or any(s not in (1, q) for s, q in zip(sets, lead)):
        raise ValueError(
            f"context shape {tuple(context.shape)} does not match queries {tuple(x.shape)}: expected "
            f"{lead + ('N',) + event_shape} (a set per query), sizes of 1 to share a set, or {('N',) + event_shape}"
        )
    if c_lead[-1] < 1:
        raise ValueError("a context set needs at least one element")
    return lead, sets, context.reshape(*sets, c_lead[-1], *event_shape)


class HierarchicalVAE(Saveable, nn.Module):
    """A global c per set and a local z per element (the common part of NS and VHE)."""

    uses_context = True
    n_decoders = 1

    def __init__(self, event_shape, features, statistic, inference, latent_prior, obs_decoder, likelihood,
                 c_dim: int, z_dim: int, vampprior: VampPrior | None = None, config: dict | None = None):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.features, self.statistic, self.inference = features, statistic, inference
        self.latent_prior, self.obs_decoder, self.vampprior = latent_prior, obs_decoder, vampprior
        self.likelihood, self.c_dim, self.z_dim = likelihood, c_dim, z_dim
        self.latent = GaussianLatent(z_dim)  # z parameters are (mu, logvar), as the MetaVAE's
        self.config = dict(config or {})

    # -- parts ------------------------------------------------------------------------------
    def element_features(self, x: torch.Tensor) -> torch.Tensor:
        """(*lead, *event) -> (*lead, F)."""
        lead = x.shape[: x.dim() - len(self.event_shape)]
        return self.features(x.reshape(-1, *self.event_shape)).reshape(*lead, -1)

    def context_params(self, context: torch.Tensor) -> torch.Tensor:
        """Parameters (mu_c, logvar_c) of q(c | D): sets (*sets, N, *event) -> (*sets, 2 c_dim)."""
        return self.statistic(self.element_features(context))

    def pooled_context_params(self, context: PooledContext) -> torch.Tensor:
        """q(c | D) parameters (K, B, 2 c_dim) of sets drawn from a pool: the element features run
        once per pool point (`MeanPool.pooled`), or not at all where the context carries them
        (`pool_features`)."""
        if context.features is not None:
            return self.statistic.pooled(None, context.index, context.features)
        return self.statistic.pooled(self.element_features(context.pool), context.index)

    @torch.no_grad()
    def pool_features(self, pool: torch.Tensor, chunk: int = 1024) -> torch.Tensor | None:
        """The statistic network's per-element features (K, P, F) of pool points (K, P, *event)
        (`PooledContext.features`), as `MetaVAE.pool_features`: each point encoded once, however many
        sets it joins. None where the statistic needs the sets themselves or the model takes no context."""
        if not self.uses_context or not hasattr(self.statistic, "pooled"):
            return None
        return map_points(lambda x: self.statistic.pre(self.element_features(x)), pool, chunk)

    def prior_components(self) -> torch.Tensor:
        """VampPrior components (M, 2 c_dim): the statistic network on each pseudo-dataset."""
        return self.context_params(self.vampprior.pseudo_inputs())

    def context_kl(self, c_mu, c_logvar, c=None, eps=None) -> torch.Tensor:
        """KL(q(c|D) || p(c)): analytic for p(c) = N(0, I) (shape of the sets); for the VampPrior
        the single-sample estimate log q(c|D) - log p(c) at c = mu + sigma * eps (shape of c)."""
        if self.vampprior is None:
            return gaussian_kl(c_mu, c_logvar)
        log_q = -0.5 * (eps.pow(2) + c_logvar + LOG_2PI).sum(-1)
        comp_mu, comp_logvar = self.prior_components().chunk(2, dim=-1)
        return log_q - mixture_log_prob(c, comp_mu, comp_logvar)

    def sample_c(self, c_params: torch.Tensor, shape) -> tuple:
        """c = mu + sigma * eps with eps of ``shape`` (+ c_dim): one sample per query or per set."""
        c_mu, c_logvar = c_params.chunk(2, dim=-1)
        eps = torch.randn(*shape, self.c_dim, dtype=c_mu.dtype, device=c_mu.device)
        return c_mu + torch.exp(0.5 * c_logvar) * eps, eps, c_mu, c_logvar

    def local_terms(self, x: torch.Tensor, hx: torch.Tensor, c: torch.Tensor) -> tuple:
        """log p(x | z, c) and KL(q(z|x,c) || p(z|c)) per query, z one reparameterised sample."""
        mu, logvar = self.inference(hx, c).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        p_mu, p_logvar = self.latent_prior(c).chunk(2, dim=-1)
        kl_z = gaussian_kl(mu, logvar, p_mu, p_logvar)
        flat = x.flatten(start_dim=x.dim() - len(self.event_shape))
        rec = self.likelihood.log_prob(self.obs_decoder(z, c), flat)
        return rec, kl_z

    # -- inference --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None, sample_c: bool = False) -> torch.Tensor:
        """Parameters (mu_z, logvar_z) of q(z | x, c) at c = the *mean* of q(c | D): deterministic.
        ``sample_c``: at one sample of q(c | D) per set instead, as the reference's embeddings."""
        if context is None:
            raise ValueError(f"{type(self).__name__} needs a context set D for every query; got context=None")
        if isinstance(context, PooledContext) and not hasattr(self.statistic, "pooled"):
            context = context.materialize()
        if isinstance(context, PooledContext):
            context.check_queries(x)
            c_params = self.pooled_context_params(context)
        else:
            c_params = self.context_params(context_sets(x, context, self.event_shape)[2])
        c = self.sample_c(c_params, c_params.shape[:-1])[0] if sample_c else c_params[..., : self.c_dim]
        return self.inference(self.element_features(x), c)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, context: torch.Tensor | None = None, sample_c: bool = False) -> torch.Tensor:
        """The posterior mean mu_z(x, c) (*lead, z_dim) at c = E[c | D] (or a sample, ``sample_c``)."""
        return self.latent.mean(self.encode(x, context, sample_c))

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor, mean: bool = False, generator=None) -> torch.Tensor:
        """``n`` new points (n, *event) of the distribution that ``context`` (N, *event) was drawn
        from, unseen in training or not: c from q(c | D) (one sample; ``mean=True``: its mean),
        z ~ p(z | c), then a draw from p(x | z, c) (``mean=True``: the decoder's mean)."""
        ev = self.event_shape
        if context.dim() != len(ev) + 1 or tuple(context.shape[1:]) != ev:
            raise ValueError(f"context must be one set (N, *{ev}), got shape {tuple(context.shape)}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        c_params = self.context_params(context.unsqueeze(0))[0]
        c = c_params[: self.c_dim] if mean else self.sample_c(c_params, ())[0]
        c = c.expand(n, self.c_dim)
        p_mu, p_logvar = self.latent_prior(c).chunk(2, dim=-1)
        eps = torch.randn(p_mu.shape, generator=generator, dtype=p_mu.dtype, device=p_mu.device)
        params = self.obs_decoder(p_mu + torch.exp(0.5 * p_logvar) * eps, c)
        return draw(self.likelihood, params, mean, generator).reshape(n, *ev)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, context: torch.Tensor, k: int = 100, generator=None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x | D) = log E_{c ~ q(c|D)} p(x | c) for points x
        (n, *event) of the distribution that ``context`` (N, *event) was drawn from: k draws of
        c ~ q(c | D) and z ~ q(z | x, c), weights p(x | z, c) p(z | c) / q(z | x, c). Per point (n,);
        a stochastic lower bound that tightens as k grows (q(c | D) stands in for p(c | D))."""
        ev = self.event_shape
        if context.dim() != len(ev) + 1 or tuple(context.shape[1:]) != ev:
            raise ValueError(f"context must be one set (N, *{ev}), got shape {tuple(context.shape)}")
        if x.dim() != len(ev) + 1 or tuple(x.shape[1:]) != ev:
            raise ValueError(f"x must be points (n, *{ev}), got shape {tuple(x.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(x)
        c_mu, c_logvar = self.context_params(context.unsqueeze(0))[0].chunk(2, dim=-1)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=c_mu.dtype, device=c_mu.device)

        c = (c_mu + torch.exp(0.5 * c_logvar) * randn(k, n, self.c_dim))  # (k, n, c_dim)
        hx = self.element_features(x).unsqueeze(0).expand(k, n, -1)
        q_mu, q_logvar = self.inference(hx, c).chunk(2, dim=-1)
        z = q_mu + torch.exp(0.5 * q_logvar) * randn(*q_mu.shape)
        p_mu, p_logvar = self.latent_prior(c).chunk(2, dim=-1)
        flat = x.flatten(start_dim=1).unsqueeze(0).expand(k, n, -1)
        log_w = (self.likelihood.log_prob(self.obs_decoder(z, c), flat) + gaussian_log_prob(z, p_mu, p_logvar)
                 - gaussian_log_prob(z, q_mu, q_logvar))
        return torch.logsumexp(log_w, dim=0) - math.log(k)

    def extra_repr(self) -> str:
        prior = "vampprior" if self.vampprior is not None else "gaussian"
        return f"c_dim={self.c_dim}, z_dim={self.z_dim}, prior={prior}"


# --- builders ------------------------------------------------------------------------------
def _attention_statistic(mean_pool: MeanPool, width: int) -> nn.Module:
    """``mean_pool``'s networks around a Set Transformer pool (`AttentionPool`) in place of the mean:
    its per-element part, widened to ``width`` features where it has none (the MLP VHE's)."""
    pre = mean_pool.pre
    if isinstance(pre, nn.Identity):  # the MLP VHE pools before its first Lin: attend after it instead
        first, *rest = mean_pool.post
        pre, post = first, nn.Sequential(*rest)
    else:
        post = mean_pool.post
    return nn.Sequential(AttentionPool(pre, width, heads=4), post)


def build_parts(event_shape, arch: str, c_dim: int, z_dim: int, hidden: int, hidden_statistic: int | None,
                decoder_hidden: int, channels, groups: int, likelihood, statistician: bool,
                pooling: str = "mean") -> dict:
    """The networks of NS / VHE (docs/reproduction.md §3.5-3.6 for conv, 4.1-4.2 for MLP); with
    ``pooling="attention"`` the statistic network pools by attention instead of the mean."""
    D = math.prod(event_shape)
    n_out = likelihood.n_params(D)
    hs = hidden_statistic or hidden
    lin, elu = nn.Linear, nn.ELU
    if arch == "mlp":
        features = nn.Flatten()
        Fd = D
        if statistician:  # PrePool Lin + ELU per element, mean, PostPool Lin
            statistic = MeanPool(nn.Sequential(lin(Fd, hs), elu()), lin(hs, 2 * c_dim))
        else:  # affine PrePool: pool first, then the same Lin, then PostPool (identical values)
            statistic = MeanPool(nn.Identity(), nn.Sequential(lin(Fd, hs), lin(hs, 2 * c_dim)))
        inference = TwoInput(Fd, c_dim, hidden, nn.Sequential(lin(2 * hidden, hidden), elu(), lin(hidden, 2 * z_dim)))
        latent_prior = nn.Sequential(lin(c_dim, hidden), elu(), lin(hidden, hidden), elu(), lin(hidden, 2 * z_dim))
        obs = TwoInput(z_dim, c_dim, hidden, nn.Sequential(lin(2 * hidden, decoder_hidden), elu(),
                                                           lin(decoder_hidden, n_out)))
    elif arch == "conv":
        img = image_shape(event_shape)
        features = ConvEncoder(event_shape, channels, groups)
        Fd = features.out_features
        extra = (lambda: [ScalarAffine()]) if statistician else (lambda: [])
        statistic = MeanPool(
            nn.Sequential(lin(Fd, hs), nn.LayerNorm(hs), elu()),
            nn.Sequential(lin(hs, hs), nn.LayerNorm(hs), elu(), lin(hs, hs), nn.LayerNorm(hs), elu(),
                          lin(hs, 2 * c_dim), *extra()),
        )
        inference = TwoInput(Fd, c_dim, hidden, nn.Sequential(FCResBlock(2 * hidden, 6), lin(2 * hidden, 2 * z_dim),
                                                              *extra()))
        latent_prior = nn.Sequential(lin(c_dim, hidden), elu(), FCResBlock(hidden, 3), lin(hidden, 2 * z_dim), *extra())
        trunk = ConvDecoderTrunk(1, img, n_out // D, channels, groups)
        obs = TwoInput(z_dim, c_dim, hidden, nn.Sequential(lin(2 * hidden, 2 * hidden), elu(),
                                                           lin(2 * hidden, trunk.in_features), TrunkHead(trunk)))
    else:
        raise ValueError(f"unknown architecture '{arch}'; choose 'mlp' or 'conv'")
    if pooling == "attention":
        statistic = _attention_statistic(statistic, hs)
    return dict(features=features, statistic=statistic, inference=inference, latent_prior=latent_prior,
                obs_decoder=obs)


def build_hierarchical(cls, kind: str, event_shape: Sequence[int], arch: str = "mlp", prior: str = "gaussian",
                       c_dim: int = 300, z_dim: int = 40, hidden: int = 400, hidden_statistic: int | None = None,
                       decoder_hidden: int = 4096, channels: Sequence[int] = DEFAULT_CHANNELS, groups: int = GROUPS,
                       n_components: int = 500, n_pseudo: int = 10, pseudo_mean: float = 0.05,
                       pseudo_std: float = 0.01, likelihood=None, pooling: str = "mean", **objective):
    """One builder for the models with a context latent c (`VariationalHomoencoder`, `NeuralStatistician`):
    the parts of `build_parts`, the reference's init, an optional VampPrior over c, and the config
    (``kind`` plus every argument) that rebuilds it. ``objective``: the class's own weight argument."""
    if prior not in ("gaussian", "vampprior"):
        raise ValueError(f"unknown prior '{prior}'; choose 'gaussian' or 'vampprior'")
    check_pooling(pooling)
    likelihood = likelihood if likelihood is not None else Bernoulli()
    parts = build_parts(tuple(event_shape), arch, c_dim, z_dim, hidden, hidden_statistic, decoder_hidden, channels,
                        groups, likelihood, statistician=kind == "ns", pooling=pooling)
    config = dict(
        kind=kind, event_shape=list(event_shape), arch=arch, prior=prior, c_dim=c_dim, z_dim=z_dim,
        hidden=hidden, hidden_statistic=hidden_statistic, decoder_hidden=decoder_hidden, channels=list(channels),
        groups=groups, n_components=n_components, n_pseudo=n_pseudo, pseudo_mean=pseudo_mean, pseudo_std=pseudo_std,
        likelihood=likelihood.name, likelihood_variance=getattr(likelihood, "variance", None), pooling=pooling,
        **objective,
    )
    model = cls(event_shape, **parts, likelihood=likelihood, c_dim=c_dim, z_dim=z_dim, config=config, **objective)
    reference_init(model)
    if prior == "vampprior":
        model.vampprior = VampPrior(n_components, n_pseudo, event_shape, pseudo_mean, pseudo_std)
    return model
