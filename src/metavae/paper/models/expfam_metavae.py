"""MetaVAE parts for the sufficient-statistics demo (docs/reproduction.md §8).

A data point is a *random vector*: ``V`` i.i.d. 2-D draws ``(V, 2)`` of one distribution. The
decoders have no parameters: each is the known likelihood of its distribution's family, with the
latent ``z`` (2-D, one entry per coordinate) as the family's parameter in its natural link (the
Gaussian mean, the log-normal log-space mean, the exponential log-rate), so
``log p(x | z) = sum over the V draws and 2 coordinates of log p_family(x_vd | z_d)``, with the
correct scale (the reference's Gaussian/log-normal scale 0.5 * variance is a bug).

The encoder follows the reference's ``AmortizedDVAE``: a per-draw MLP averaged over the V draws
summarises the query (and, with the same weights, every context vector); a second MLP, mean
pooled over the context vectors, summarises D; the head maps both to q(z | D, x).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..data.exponential_families import VECTOR_SIZE, get_family
from ... import objectives
from ...distributions import GaussianLatent
from ...nets.mlp import mlp
from ...nets.sets import MeanPool
from ...models.base import LossOutput
from ...models.metavae import MetaVAE

# Fisher information of one draw about the latent: 1 / 0.1 for the Gaussian mean and the log-normal
# log-space mean, 1 for the exponential log-rate. Weighting a distribution's ELBO by its inverse
# puts every family's loss on the same curvature in z (see ExpFamMetaVAE).
FISHER_PER_DRAW = {"gaussian": 1 / 0.1, "lognormal": 1 / 0.1, "exponential": 1.0}


class FamilyParams(NamedTuple):
    """What a known-likelihood decoder emits: the latent and, per row, the family index."""

    z: torch.Tensor  # (K, ..., 2)
    family: torch.Tensor  # (K,) long, indices into ExpFamLikelihood.families


class KnownLikelihoodDecoder(nn.Module):
    """A bank of ``n`` parameter-free decoders: member ``k`` is the likelihood of family ``families[k]``.

    ``forward(z, dist)`` passes ``z`` through and attaches each row's family, so the standard
    ELBO code (decode, then ``likelihood.log_prob``) works unchanged.
    """

    def __init__(self, member_families: Sequence[str], families: Sequence[str]):
        super().__init__()
        self.families = tuple(families)
        unknown = sorted(set(member_families) - set(self.families))
        if unknown:
            raise ValueError(f"decoder families {unknown} are not among the likelihood's {self.families}")
        self.n = len(member_families)
        ids = torch.tensor([self.families.index(f) for f in member_families], dtype=torch.long)
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, z: torch.Tensor, dist: torch.Tensor | None = None) -> FamilyParams:
        if dist is None:
            if self.n != 1 and z.shape[0] != self.n:
                raise ValueError(f"batch holds {z.shape[0]} distributions but the bank has {self.n} decoders")
            ids = self.ids.expand(z.shape[0]) if self.n == 1 else self.ids
        else:
            ids = self.ids[dist.to(self.ids.device)] if self.n > 1 else self.ids.expand(len(dist))
        return FamilyParams(z, ids)


class ExpFamLikelihood:
    """``log p(x | z)`` of a random vector under its row's family, summed over draws and coordinates."""

    name = "expfam"

    def __init__(self, families: Sequence[str], vector_size: int = VECTOR_SIZE):
        self.families = tuple(families)
        for f in self.families:
            if get_family(f)._log_prob is None:
                raise ValueError(f"family '{f}' has no known likelihood to decode with")
        self.vector_size = vector_size

    def n_params(self, event_numel: int) -> int:
        return 2

    def log_prob(self, params: FamilyParams, x: torch.Tensor) -> torch.Tensor:
        """params.z (K, ..., S, 2); x (K, ..., 1, V*2) flat or (K, ..., 1, V, 2) -> (K, ..., S).

        Each row k is scored by its own family only (no other family's density, with its
        restricted support, is ever evaluated on it)."""
        z, ids = params
        if x.shape[-1] != 2 or x.dim() == z.dim():
            x = x.reshape(*x.shape[:-1], self.vector_size, 2)
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows (distributions) but z has {z.shape[0]}")
        out = z.new_empty(z.shape[:-1])
        ids = ids.to(z.device)
        for i, name in enumerate(self.families):
            rows = ids == i
            if bool(rows.any()):
                lp = get_family(name).log_prob(x[rows], z[rows].unsqueeze(-2))  # (k, ..., S, V, 2)
                out[rows] = lp.sum((-1, -2))
        return out

    def mean(self, params: FamilyParams) -> torch.Tensor:
        return params.z


class VectorSummary(nn.Module):
    """(M, V, 2) -> (M, F): a per-draw MLP averaged over the V draws of a random vector,
    the learned statistic (1/V) sum_v phi(x_v)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=-2)


class CoordinateStatistic(nn.Module):
    """(M, V, C) -> (M, C * F): the per-draw MLP applied to each coordinate on its own (shared
    weights), averaged over the V draws; coordinate-major features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(-1)).mean(dim=-3).flatten(-2)


class PerCoordinate(nn.Module):
    """Apply ``net`` to each coordinate's block of a coordinate-major feature vector (..., C * F)."""

    def __init__(self, net: nn.Module, n_coords: int):
        super().__init__()
        self.net, self.n_coords = net, n_coords

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.reshape(*h.shape[:-1], self.n_coords, -1)
        return self.net(h).flatten(-2)


class CoordinateHead(nn.Module):
    """Head for coordinate-wise inference: [query features (C * F), summary (C * S)] -> per
    coordinate [q_c, s_c] -> ``net`` -> (mean_c, logvar_c), returned as (mean_1..C, logvar_1..C)."""

    def __init__(self, net: nn.Module, n_coords: int, query_dim: int):
        super().__init__()
        self.net, self.n_coords, self.query_dim = net, n_coords, query_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        C = self.n_coords
        q = h[..., : C * self.query_dim].reshape(*h.shape[:-1], C, self.query_dim)
        s = h[..., C * self.query_dim:].reshape(*h.shape[:-1], C, -1)
        out = self.net(torch.cat([q, s], dim=-1))  # (..., C, 2)
        return out.transpose(-1, -2).flatten(-2)


class ExpFamMetaVAE(MetaVAE):
    """The MetaVAE with an optional weight per training distribution in the MetaELBO.

    The loss is ``-sum_k w_k ELBO_k / sum_k w_k`` (the plain MetaELBO when all weights are equal).
    A weight scales a distribution's whole ELBO, so the best q(z | D, x) for each distribution is
    unchanged; it only rebalances the gradient between families whose likelihoods are sharper or
    flatter in z (a Gaussian with variance 0.1 pulls 10x harder per draw than an exponential).
    """

    def __init__(self, *args, weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weights", None if weights is None else torch.as_tensor(weights, dtype=torch.float32),
                             persistent=False)

    def loss(self, batch) -> LossOutput:
        ctx = batch.context if self.uses_context else None
        per_dist = objectives.elbo(self, batch.x, ctx, batch.dist).mean(dim=1)  # (K,)
        if self.weights is None:
            return LossOutput(loss=-per_dist.mean())
        w = self.weights[batch.dist.to(self.weights.device)]
        return LossOutput(loss=-(w * per_dist).sum() / w.sum(), elbo=per_dist.mean().detach())


def build_expfam_metavae(
    member_families: Sequence[str],
    families: Sequence[str] | None = None,
    vector_size: int = VECTOR_SIZE,
    draw_features: Sequence[int] = (64, 64),
    meta_summary: Sequence[int] = (64, 64, 64),
    hidden_widths: Sequence[int] = (128, 128),
    use_context: bool = True,
    per_coordinate: bool = True,
    balance: bool = False,
) -> ExpFamMetaVAE:
    """A MetaVAE (or, with ``use_context=False``, a VAE) with one known-likelihood decoder per
    training distribution; ``member_families[k]`` is distribution k's family.

    With ``per_coordinate`` (default) each of the two independent coordinates is inferred on its
    own by the same networks: the per-draw MLP sees one coordinate value, and the context summary
    and the head work per coordinate (each coordinate is a random vector with one free parameter,
    as the paper frames it). Otherwise the reference's layout: the per-draw MLP sees the 2-D draw
    and the head maps the joint features to both latents. With ``balance`` each distribution's
    ELBO is weighted by the inverse per-draw Fisher information of its family (:data:`FISHER_PER_DRAW`)."""
    families = tuple(families) if families is not None else tuple(dict.fromkeys(member_families))
    latent = GaussianLatent(2)
    f_dim = draw_features[-1]
    s_dim = meta_summary[-1] if use_context else 0
    summary = None
    if per_coordinate:
        phi = CoordinateStatistic(mlp([1, *draw_features], "leaky_relu", final_act=True))
        if use_context:
            summary = MeanPool(nn.Sequential(phi, PerCoordinate(mlp([f_dim, *meta_summary], "leaky_relu"), 2)),
                               event_dim=2)
        head = CoordinateHead(mlp([f_dim + s_dim, *hidden_widths, 2], "relu"), 2, f_dim)
    else:
        phi = VectorSummary(mlp([2, *draw_features], "leaky_relu", final_act=True))
        if use_context:
            summary = MeanPool(nn.Sequential(phi, mlp([f_dim, *meta_summary], "leaky_relu")), event_dim=2)
        head = mlp([f_dim + s_dim, *hidden_widths, latent.n_params], "relu")
    decoder = KnownLikelihoodDecoder(member_families, families)
    config = dict(kind="expfam_metavae", member_families=list(member_families), families=list(families),
                  vector_size=vector_size, draw_features=list(draw_features), meta_summary=list(meta_summary),
                  hidden_widths=list(hidden_widths), use_context=use_context, per_coordinate=per_coordinate,
                  balance=balance)
    weights = [1 / FISHER_PER_DRAW[f] for f in member_families] if balance else None
    return ExpFamMetaVAE((vector_size, 2), head, decoder, latent, ExpFamLikelihood(families, vector_size),
                         summary=summary, query_encoder=phi, config=config, weights=weights)
