"""The convolutional MetaVAE (docs/reproduction.md §3.4) and the convolutional VAE, built from the core
`MetaVAE` class with injected conv parts and a batched bank of K convolutional decoders.

* query encoder: the shared `ConvEncoder` (4096 features for 28x28 or 32x32 images);
* summary: mean over the context set of MLP(ConvEncoder(x)) with the MLP 4096-4096-400-400
  (LeakyReLU 0.2) -- pooled by the *set size* (the reference divides by the batch size);
* head: fc_h Lin(4096 -> 400) on the query features and fc_c Lin(400 -> 400) on the summary,
  concatenated (800) -> ELU -> FCResBlock(800, 6) -> Lin(800 -> 2 z_dim);
* decoders, K of them: Lin(z -> 400) -> Lin(400 -> 400) -> ELU -> Lin(400 -> 4096) -> conv trunk,
  all K evaluated at once (batched linear layers, grouped convolutions).
The encoder module is one object used for queries and context elements (parameters counted once).
Init: PyTorch defaults (as the reference's MetaVAE). Normalisation: GroupNorm/LayerNorm instead of
BatchNorm, see `metavae.nets.conv`.

The conv VAE is the same network without a summary and with one shared decoder; its head is
fc_h Lin(4096 -> 400) -> ELU -> FCResBlock(400, 6) -> Lin(400 -> 2 z_dim) (the reference has no
conv VAE; we drop the summary branch and keep fc_h's width, as the MLP VAE drops the summary input).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..distributions import Bernoulli, make_latent
from ..nets.conv import DEFAULT_CHANNELS, GROUPS, ConvDecoderTrunk, ConvEncoder, FCResBlock, image_shape
from ..nets.mlp import BatchedLinear, check_bank_rows, mlp
from .base import apply_init, check_init, check_pooling, set_pool
from .metavae import MetaVAE


class ConvHead(nn.Module):
    """q(z | D, x) parameters from cat([query features (F), summary (S)]): fc_h and fc_c applied to
    their parts, concatenated, ELU, FCResBlock, linear output. With ``summary_dim=0`` (a VAE) only
    fc_h is used."""

    def __init__(self, feature_dim: int, summary_dim: int, hidden: int, n_params: int, res_layers: int = 6):
        super().__init__()
        self.feature_dim, self.summary_dim = feature_dim, summary_dim
        self.fc_h = nn.Linear(feature_dim, hidden)
        self.fc_c = nn.Linear(summary_dim, hidden) if summary_dim else None
        width = hidden * (2 if summary_dim else 1)
        self.act = nn.ELU()
        self.res = FCResBlock(width, res_layers)
        self.out = nn.Linear(width, n_params)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.fc_h(h[..., : self.feature_dim])
        if self.fc_c is not None:
            a = torch.cat([a, self.fc_c(h[..., self.feature_dim:])], dim=-1)
        return self.out(self.res(self.act(a)))


class ConvDecoderBank(nn.Module):
    """K decoders p_k(x | z): (K, ..., z) -> (K, ..., likelihood params), one batched call."""

    def __init__(self, n: int, z_dim: int, hidden: int, event_shape, params_per_value: int = 1,
                 channels: Sequence[int] = DEFAULT_CHANNELS, groups: int = GROUPS):
        super().__init__()
        self.n = n
        self.trunk = ConvDecoderTrunk(n, event_shape, params_per_value, channels, groups)
        self.fc = nn.ModuleList([BatchedLinear(n, z_dim, hidden), BatchedLinear(n, hidden, hidden),
                                 BatchedLinear(n, hidden, self.trunk.in_features)])
        self.act = nn.ELU()

    def forward(self, z: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        K, mid = z.shape[0], z.shape[1:-1]
        check_bank_rows(self.n, K, dist)
        h = z.reshape(K, -1, z.shape[-1])
        h = self.fc[1](self.fc[0](h, dist), dist)  # Lin -> Lin (no activation between, as the reference)
        h = self.fc[2](self.act(h), dist)
        return self.trunk(h, dist).reshape(K, *mid, -1)


def build_conv_metavae(
    event_shape: Sequence[int],
    n_decoders: int,
    z_dim: int = 40,
    latent: str = "gaussian",
    likelihood=None,
    hidden: int = 400,
    summary_widths: Sequence[int] | None = None,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    res_layers: int = 6,
    groups: int = GROUPS,
    use_context: bool = True,
    init: str = "default",
    free_bits: float = 0.0,
    pooling: str = "mean",
) -> MetaVAE:
    """The conv MetaVAE of docs/reproduction.md §3.4 (``use_context=False``: the conv VAE, one decoder).

    ``summary_widths`` (earlier ``summary``) lists the summary MLP's sizes after the conv features
    (default (F, 400, 400) with F = 4096); ``hidden`` is one width (fc_h, fc_c, the decoders' linear
    layers); ``channels`` the conv trunk's three stage widths (default (64, 128, 256)).
    Parameters (K decoders): 1,921,536 encoder + 18,580,512 summary + 5,717,680 head
    + K * 3,900,065 -- docs/reproduction.md §12 exactly (K = 9: 61,320,313).
    ``init``: ``default`` (PyTorch's, as the reference) or ``xavier`` (the baselines'), see `apply_init`.
    ``pooling``: ``mean`` (the paper's) or ``attention`` (a Set Transformer over the summary features).
    """
    check_init(init)
    check_pooling(pooling)
    if n_decoders < 1:
        raise ValueError(f"need at least one decoder, got n_decoders={n_decoders}")
    likelihood = likelihood if likelihood is not None else Bernoulli()
    img = image_shape(event_shape)
    D = img[0] * img[1] * img[2]
    lat = make_latent(latent, z_dim)
    encoder = ConvEncoder(event_shape, channels, groups)
    F_ = encoder.out_features
    summary_sizes = list(summary_widths) if summary_widths is not None else [F_, hidden, hidden]
    set_net = None
    if use_context:
        set_net = set_pool(nn.Sequential(encoder, mlp([F_, *summary_sizes], "leaky_relu")), summary_sizes[-1], pooling,
                           len(event_shape))
    head = ConvHead(F_, summary_sizes[-1] if use_context else 0, hidden, lat.n_params, res_layers)
    decoder = ConvDecoderBank(n_decoders, z_dim, hidden, event_shape, likelihood.n_params(D) // D, channels, groups)
    config = dict(
        kind="conv_metavae", event_shape=list(event_shape), n_decoders=n_decoders, z_dim=z_dim, latent=latent,
        likelihood=likelihood.name, likelihood_variance=getattr(likelihood, "variance", None), hidden=hidden,
        summary_widths=summary_sizes, channels=list(channels), res_layers=res_layers, groups=groups,
        use_context=use_context,
        init=init, free_bits=free_bits, pooling=pooling,
    )
    model = MetaVAE(event_shape, head, decoder, lat, likelihood, summary=set_net, query_encoder=encoder, config=config,
                    free_bits=free_bits)
    return apply_init(model, init)


def build_conv_vae(event_shape: Sequence[int], **kwargs) -> MetaVAE:
    """The conv VAE: no context, one shared conv decoder."""
    return build_conv_metavae(event_shape, n_decoders=1, use_context=False, **kwargs)


build_conv_vae.forwards_to = build_conv_metavae  # its **kwargs' defaults, for `registry.builder_params`
