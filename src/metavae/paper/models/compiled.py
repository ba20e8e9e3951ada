"""Meta-compiled inference (Le, Baydin and Wood 2016, made meta by the paper's Eq. 14).

A simulator gives pairs (x, z) but no tractable likelihood, so there is no decoder and no ELBO:
the inference network q(z | D, x) is fitted directly by minimising ``-log q(z_true | D, x)`` over
simulated pairs, where D is a set of other *observations* of the same simulator (never its latent
values). With no summary network it is plain compiled inference q(z | x) for one simulator.

The class reuses the MetaVAE's encoder plumbing (query encoder, set summary, head; shared or
per-query context sets), so ``encode``/``embed`` take exactly the same shapes; it only replaces
the objective. Batches carry the true latent as float ``labels`` (K, B, dz) or (K, B).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...distributions import GaussianLatent, gaussian_log_prob
from ...nets.mlp import mlp
from ...nets.sets import MeanPool
from ...models.base import LossOutput
from ...models.metavae import MetaVAE
from ...models.parts import build_part, part_name

class CompiledInference(MetaVAE):
    """q(z | D, x) = N(mu, diag(sigma^2)) from ``head([query_encoder(x), summary(D)])``.

    ``preprocess(x, context) -> (x, context)`` (optional, parameter-free) runs before encoding,
    e.g. to express the query and its set relative to a statistic of the set. ``logvar_range``
    bounds the log-variance with a smooth squashing so the NLL cannot diverge on a near-zero
    variance early in training.
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        head: nn.Module,
        z_dim: int = 1,
        summary: nn.Module | None = None,
        query_encoder: nn.Module | None = None,
        preprocess: nn.Module | None = None,
        logvar_range: tuple[float, float] = (-14.0, 4.0),
        config: dict | None = None,
    ):
        super().__init__(event_shape, head, decoder=None, latent=GaussianLatent(z_dim), likelihood=None,
                         summary=summary, query_encoder=query_encoder, config=config)
        self.preprocess = preprocess
        lo, hi = logvar_range
        if not lo < hi:
            raise ValueError(f"logvar_range must be (low, high) with low < high, got {logvar_range}")
        self.logvar_range = (float(lo), float(hi))

    @property
    def n_decoders(self) -> int:
        return 0

    def decode(self, z, dist=None):
        raise NotImplementedError("compiled inference has no decoder: it is trained on (x, z) pairs")

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.preprocess is not None:
            x, context = self.preprocess(x, context if self.uses_context else None)
        params = super().encode(x, context)
        mu, raw = self.latent.split(params)
        lo, hi = self.logvar_range
        logvar = lo + (hi - lo) * torch.sigmoid(raw)
        return torch.cat([mu, logvar], dim=-1)

    def nll(self, params: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``-log q(z | .)`` per point: params (*lead, 2dz), z (*lead, dz) or (*lead,) when dz = 1."""
        mu, logvar = self.latent.split(params)
        z = z.reshape(mu.shape).to(mu.dtype)
        return -gaussian_log_prob(z, mu, logvar)

    def loss(self, batch) -> LossOutput:
        """Mean over distributions of the mean NLL of the true latents (the reference sums over
        simulators; the mean weighs them equally and keeps the scale independent of K)."""
        if batch.labels is None:
            raise ValueError("compiled inference needs the true latent of every query as batch labels")
        ctx = batch.context if self.uses_context else None
        params = self.encode(batch.x, ctx)
        per_point = self.nll(params, batch.labels)
        with torch.no_grad():
            mse = (self.latent.mean(params) - batch.labels.reshape(params.shape[:-1] + (-1,))).pow(2).mean()
        return LossOutput(loss=per_point.mean(dim=1).mean(dim=0), mse=mse)

    def log_likelihood(self, batch, k: int = 10):
        raise NotImplementedError("compiled inference defines no marginal likelihood")


def build_compiled_inference(
    event_dim: int,
    z_dim: int = 1,
    hidden_widths: Sequence[int] = (64, 64),
    summary_widths: Sequence[int] | None = (64, 64),
    query: Sequence[int] | None = None,
    act: str = "relu",
    summary_act: str = "relu",
    preprocess: nn.Module | str | None = None,
) -> CompiledInference:
    """An MLP compiled-inference network for flat events of size ``event_dim``.

    ``summary_widths=None`` gives plain compiled inference q(z | x) (no context); otherwise the set is
    summarised by mean pooling an MLP ``[event_dim, *summary_widths]``; ``hidden_widths``: the head's
    layers (earlier ``summary`` and ``hidden``: files keep loading, `metavae.paper.models`). ``query``
    optionally embeds the query with its own MLP ``[event_dim, *query]`` before the head (default: raw features).
    ``preprocess``: a module, or its `part_name` (as a saved config holds it).
    """
    if isinstance(preprocess, str):
        preprocess = build_part(preprocess)
    set_net = MeanPool(mlp([event_dim, *summary_widths], summary_act, final_act=False)) if summary_widths else None
    q_net = mlp([event_dim, *query], act, final_act=True) if query else None
    q_dim = query[-1] if query else event_dim
    s_dim = summary_widths[-1] if summary_widths else 0
    head = mlp([q_dim + s_dim, *hidden_widths, 2 * z_dim], act)
    config = dict(kind="compiled_inference", event_dim=event_dim, z_dim=z_dim, hidden_widths=list(hidden_widths),
                  summary_widths=list(summary_widths) if summary_widths else None,
                  query=list(query) if query else None, act=act,
                  summary_act=summary_act, preprocess=part_name(preprocess))
    return CompiledInference((event_dim,), head, z_dim=z_dim, summary=set_net, query_encoder=q_net,
                             preprocess=preprocess, config=config)
