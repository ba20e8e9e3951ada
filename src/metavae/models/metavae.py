"""The MetaVAE: one inference network q(z | D, x) for a family of distributions, and one decoder
per training distribution. With no summary network it is a plain VAE, q(z | x), one decoder."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.meta import PooledContext, map_points
from ..distributions import Bernoulli, draw, make_latent
from ..nets.mlp import BatchedMLP, ScaledBank, mlp
from .. import objectives
from . import decoder_bank
from .base import LossOutput, Saveable, apply_init, check_init, check_pooling, set_pool


class MetaVAE(Saveable, nn.Module):
    """q(z | D, x) = head([query_encoder(x), summary(D)]); p_k(x | z) = decoder member k.

    Parts are injected, so the same class serves MLP and convolutional variants:
      * ``query_encoder``: (M, *event) -> (M, F) features of the query (default: flatten);
      * ``summary``: a set encoder (..., N, *event) -> (..., S), or None for a plain VAE;
      * ``head``: (M, F + S) -> latent parameters;
      * ``decoder``: a bank (K, ..., dz) -> (K, ..., likelihood params), one member per
        training distribution (or one shared member).
    With ``center`` the query and its context are expressed relative to the context's mean,
    which makes inference translation-invariant: an inductive bias for point-cloud families
    (e.g. clustering), where a distribution's location carries no information about z.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        head: nn.Module,
        decoder: nn.Module,
        latent,
        likelihood,
        summary: nn.Module | None = None,
        query_encoder: nn.Module | None = None,
        center: bool = False,
        config: dict | None = None,
        free_bits: float = 0.0,
    ):
        super().__init__()
        self.center = center
        self.free_bits = float(free_bits)  # training objective: see `objectives.free_bits_meta_elbo`
        self.event_shape = tuple(event_shape)
        self.query_encoder = query_encoder if query_encoder is not None else nn.Flatten()
        self.summary, self.head, self.decoder = summary, head, decoder
        self.latent, self.likelihood = latent, likelihood
        self.config = dict(config or {})  # how to rebuild this model (see `build_model`)

    @property
    def uses_context(self) -> bool:
        return self.summary is not None

    @property
    def n_decoders(self) -> int:
        return self.decoder.n

    # -- inference --------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple:
        ev = self.event_shape
        if tuple(x.shape[x.dim() - len(ev):]) != ev or x.dim() < len(ev):
            raise ValueError(f"queries must end in the event shape {ev}, got shape {tuple(x.shape)}")
        lead = tuple(x.shape[: x.dim() - len(ev)])
        if not self.uses_context:
            return lead, None
        if context is None:
            raise ValueError("this MetaVAE needs a context set D for every query; got context=None")
        if tuple(context.shape[context.dim() - len(ev):]) != ev:
            raise ValueError(
                f"context elements must have the queries' event shape {ev}, got context shape {tuple(context.shape)}"
            )
        c_lead = tuple(context.shape[: context.dim() - len(ev)])
        if len(c_lead) == 1:
            c_lead = (1,) * len(lead) + c_lead  # one set (N, *event) for every query
        sets = c_lead[:-1]
        if len(sets) != len(lead) or any(s not in (1, q) for s, q in zip(sets, lead)):
            raise ValueError(
                f"context shape {tuple(context.shape)} does not match queries {tuple(x.shape)}: expected "
                f"{lead + ('N',) + ev} (a set per query), sizes of 1 to share a set, or {('N',) + ev}"
            )
        return lead, sets

    def encode(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Parameters of q(z | D, x) for queries x (*lead, *event) -> (*lead, latent params)."""
        if isinstance(context, PooledContext):
            return self._encode_pooled(x, context)
        lead, sets = self._check(x, context)
        h = self.query_encoder(x.reshape(-1, *self.event_shape))
        if sets is not None:
            # Summarise each distinct set once, then broadcast it to the queries that share it.
            context = context.reshape(*sets, *context.shape[-len(self.event_shape) - 1:])
            if self.center:
                m = context.mean(dim=len(sets), keepdim=True)
                context = context - m
                h = self.query_encoder((x - m.squeeze(len(sets))).reshape(-1, *self.event_shape))
            s = self.summary(context)
            h = torch.cat([h, s.expand(*lead, s.shape[-1]).reshape(h.shape[0], -1)], dim=-1)
        params = self.head(h)
        return params.reshape(*lead, params.shape[-1])

    def _encode_pooled(self, x: torch.Tensor, context: PooledContext) -> torch.Tensor:
        if self.center or not hasattr(self.summary, "pooled"):
            return self.encode(x, context.materialize())
        context.check_queries(x)
        K, B = x.shape[:2]
        h = self.query_encoder(x.reshape(-1, *self.event_shape))
        s = self.summary.pooled(context.pool, context.index, context.features)
        params = self.head(torch.cat([h, s.reshape(K * B, -1)], dim=-1))
        return params.reshape(K, B, -1)

    @torch.no_grad()
    def pool_features(self, pool: torch.Tensor, chunk: int = 1024) -> torch.Tensor | None:
        """The summary network's per-element features (K, P, F) of pool points (K, P, *event), for
        embedding many queries whose contexts are drawn from that pool (`PooledContext.features`):
        each point is encoded once instead of once per context it joins. None where the summary
        needs the sets themselves (centred inference, or no pooled path)."""
        if self.center or not self.uses_context or not hasattr(self.summary, "pooled"):
            return None
        return map_points(self.summary.pre, pool, chunk)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The posterior mean of q(z | D, x): a representation that needs no decoder, so it works
        for distributions never seen in training. ``context`` is a set per query
        (*lead, N, *event), a set shared along dims of size 1, or one set (N, *event) for all."""
        return self.latent.mean(self.encode(x, context))

    # -- generation -------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters of p_k(x | z) for z (K, ..., dz); row k uses decoder dist[k]."""
        if dist is not None and self.n_decoders > 1:
            dist = dist.cpu()
            if len(dist) == self.n_decoders and torch.equal(dist, torch.arange(self.n_decoders)):
                dist = None  # every decoder in order: no weight gather needed
            elif int(dist.max()) >= self.n_decoders:
                raise ValueError(f"distribution index {int(dist.max())} has no decoder (model has {self.n_decoders})")
        return self.decoder(z, dist)

    @torch.no_grad()
    def sample(self, n: int, dist: int = 0, context=None, mean: bool = False, generator=None) -> torch.Tensor:
        """``n`` points (n, *event) drawn from training distribution ``dist``'s decoder: z ~ p(z),
        x ~ p(x | z). ``mean=True`` returns the decoder's means E[x | z] instead (smoother, less spread).

        The MetaVAE keeps one decoder per *training* distribution, so a context set of an unseen
        distribution does not define a generator: asking for one is an error, not a silent guess."""
        if context is not None:
            raise ValueError("the MetaVAE cannot generate for a context set: it has one decoder per training "
                             "distribution and none for unseen ones; fit one with adapt(points) (`metavae adapt`) "
                             "and pass dist=its index, or use a model with a shared decoder (--model ns or vhe)")
        if self.decoder is None:
            raise ValueError(f"{type(self).__name__} has no decoder to sample from")
        for name, v in (("n", n), ("dist", dist)):  # True is an int to Python, not a count or an index
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        if not 0 <= dist < self.n_decoders:
            raise ValueError(f"dist must name a training distribution 0..{self.n_decoders - 1}, got {dist}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if getattr(self.latent, "enumerable", False):
            k = torch.randint(self.latent.dim, (n,), generator=generator)
            z = torch.nn.functional.one_hot(k, self.latent.dim).float()
        else:
            z = torch.randn(n, self.latent.dim, generator=generator)
        params = self.decode(z.unsqueeze(0).to(next(self.parameters()).device), torch.tensor([dist]))[0]
        return draw(self.likelihood, params, mean, generator).reshape(n, *self.event_shape)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None, dist: int = 0, k: int = 100) -> torch.Tensor:
        """Importance-weighted estimate (k samples of q(z | D, x)) of log p_dist(x) under decoder
        ``dist`` (a training distribution's, or one `adapt` added), for points x (n, *event) with
        ``context`` (N, *event), points of their distribution, for the encoder. Per point (n,)."""
        ev = self.event_shape
        if x.dim() != len(ev) + 1 or tuple(x.shape[1:]) != ev:
            raise ValueError(f"x must be points (n, *{ev}), got shape {tuple(x.shape)}")
        if self.uses_context and (context is None or context.dim() != len(ev) + 1 or tuple(context.shape[1:]) != ev):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be one set (N, *{ev}) of the points' distribution, got {got}")
        if not 0 <= dist < self.n_decoders:
            raise ValueError(f"dist must name a decoder 0..{self.n_decoders - 1}, got {dist}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        ctx = context if self.uses_context else None
        return objectives.iw_log_likelihood(self, x.unsqueeze(0), ctx, torch.tensor([dist]), k)[0]

    def adapt(self, points: torch.Tensor, steps: int = 500, lr: float = 1e-3, batch_size: int = 64,
              context_size: int = 10, holdout: float = 0.2, seed: int = 0, progress: bool = False) -> int:
        """Fit a decoder for a distribution unseen in training, from its ``points`` (n, *event), and
        return its index: ``sample(n, dist=d)`` and ``log_prob(x, context, dist=d)`` then work for it,
        and it is saved with the model. The encoder stays frozen: q(z | D, x) is the amortized
        inference under test, only the new decoder learns (Adam, ``steps`` steps of the ELBO on B
        queries with contexts of ``context_size`` drawn from ``points``). The new decoder starts as
        the training decoder with the highest ELBO on the points, so ``steps=0`` picks the nearest.

        ``holdout``: this fraction of the points (at least one, when there are two or more) is kept
        out of training, and the decoder kept is the one with the highest ELBO on them among the start
        and every `ADAPT_CHECK_EVERY` steps: with few points long adaptation overfits (on 5 MNIST
        images of an unseen rotation, 300 steps without it scored 130 nats per test image below the
        start; README, "Generation and likelihood"). ``holdout=0`` trains on every point to the end."""
        return decoder_bank.adapt(self, points, steps, lr, batch_size, context_size, holdout, seed, progress)

    # -- objectives -------------------------------------------------------------------------
    def loss(self, batch) -> LossOutput:
        """Negative MetaELBO of a batch (the training and validation loss)."""
        ctx = batch.context if self.uses_context else None
        if self.free_bits > 0 and self.training:
            return LossOutput(loss=-objectives.free_bits_meta_elbo(self, batch.x, ctx, batch.dist, self.free_bits))
        return LossOutput(loss=-objectives.meta_elbo(self, batch.x, ctx, batch.dist))

    def log_likelihood(self, batch, k: int = 10) -> torch.Tensor:
        ctx = batch.context if self.uses_context else None
        return objectives.iw_log_likelihood(self, batch.x, ctx, batch.dist, k)


def build_mlp_metavae(
    event_shape: Sequence[int],
    n_decoders: int,
    z_dim: int = 40,
    latent: str = "gaussian",
    likelihood=None,
    hidden_widths: Sequence[int] = (400, 400),
    summary_widths: Sequence[int] | None = None,
    decoder_widths: Sequence[int] | None = None,
    summary_act: str = "leaky_relu",
    act: str = "relu",
    use_context: bool = True,
    center: bool = False,
    init: str = "default",
    free_bits: float = 0.0,
    decoder_scale: float | None = None,
    pooling: str = "mean",
) -> MetaVAE:
    """The paper's MLP MetaVAE (docs/reproduction.md §2) by default, for any flat event.

    Defaults for 784-dim images reproduce the reference's layer sizes: summary 784-784-400-400
    (LeakyReLU 0.2), inference 1184-400-400-2z, decoders z-400-400-784. ``summary_widths`` lists the
    summary net's layer sizes after the input (default ``(D, 400, 400)``), ``hidden_widths`` the
    inference head's and ``decoder_widths`` the decoders' (default: ``hidden_widths``). Earlier
    versions called them ``summary``, ``hidden`` and ``decoder_hidden`` (files keep loading:
    `models.kinds`). ``init``: see `apply_init`.
    ``decoder_scale``: decoder outputs in units of this constant (`ScaledBank`). ``pooling``: ``mean``
    (the paper's) or ``attention`` (a Set Transformer summary, `AttentionPool`).
    """
    check_init(init)
    if n_decoders < 1:
        raise ValueError(f"need at least one decoder, got n_decoders={n_decoders}")
    likelihood = likelihood if likelihood is not None else Bernoulli()
    D = int(torch.Size(event_shape).numel())
    lat = make_latent(latent, z_dim)
    summary_sizes = list(summary_widths) if summary_widths is not None else [D, 400, 400]
    check_pooling(pooling)
    set_net = None
    if use_context:  # each element is flattened, so any event shape (e.g. 28x28 images) works
        element = nn.Sequential(nn.Flatten(), mlp([D, *summary_sizes], summary_act))
        set_net = set_pool(element, summary_sizes[-1], pooling, len(event_shape))
    s_dim = summary_sizes[-1] if use_context else 0
    head = mlp([D + s_dim, *hidden_widths, lat.n_params], act)
    dec_widths = list(decoder_widths) if decoder_widths is not None else list(hidden_widths)
    decoder = BatchedMLP(n_decoders, [z_dim, *dec_widths, likelihood.n_params(D)], act)
    if decoder_scale is not None:
        decoder = ScaledBank(decoder, decoder_scale)
    config = dict(
        kind="mlp_metavae", event_shape=list(event_shape), n_decoders=n_decoders, z_dim=z_dim, latent=latent,
        likelihood=likelihood.name, likelihood_variance=getattr(likelihood, "variance", None),
        hidden_widths=list(hidden_widths), summary_widths=summary_sizes, decoder_widths=dec_widths,
        summary_act=summary_act, act=act, use_context=use_context,
        center=center, init=init, decoder_scale=decoder_scale, free_bits=free_bits, pooling=pooling,
    )
    model = MetaVAE(event_shape, head, decoder, lat, likelihood, summary=set_net, center=center and use_context,
                    config=config, free_bits=free_bits)
    return apply_init(model, init)


def build_vae(event_shape: Sequence[int], **kwargs) -> MetaVAE:
    """A plain VAE: the MetaVAE with no context and one shared decoder."""
    return build_mlp_metavae(event_shape, n_decoders=1, use_context=False, **kwargs)


build_vae.forwards_to = build_mlp_metavae  # its **kwargs' defaults, for `registry.builder_params`
