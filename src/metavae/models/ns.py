"""The Neural Statistician (Edwards and Storkey 2017), MLP (docs/reproduction.md §4.1) and conv (3.6).

q(c | D) from a pooled statistic network, q(z | x, c), p(z | c), p(x | z, c); one decoder shared by
every distribution. As in the reference, **a set is the per-distribution batch**: the B queries of
distribution k form the set D_k (the model takes no separate context, ``uses_context = False``),
c is sampled once per set and z once per element.

Objective: the set ELBO of Edwards and Storkey,
  L(D) = sum_{x in D} [ E log p(x | z, c) - KL(q(z|x,c) || p(z|c)) ] - KL(q(c|D) || p(c)),
**normalised per element**: loss = mean_k [ -L(D_k) / |D_k| ]
                                 = mean_k [ mean_j (-log p(x_j|z_j,c) + KL_z,j) + KL_c / B ].
This is the exact set ELBO divided by the set size, so it is comparable to the per-point losses
of the other models. The reference weights KL_c by 1 instead of 1/B, B times heavier than the
ELBO (``set_kl_weight=1.0`` reproduces it).

Embedding: ``embed(x, context)`` returns mu_z(x, E[c | D]) with the *mean* of q(c | D)
(deterministic; the reference samples c). With ``context=None`` the set is the queries
themselves along their last leading dim (x (K, B, *event): the B points of each row form one
set), which is how the reference embeds (a loader batch as one set); a context may also be given
explicitly, as for the VHE.

Other differences from the reference: the conv NS's q(c|D) *is* regularised (the reference's
conv forward returned p(z|c) in its place); the conv "global" BatchNorm1d(1) layers are scalar
affine maps (see `ScalarAffine`) and the other BatchNorms GroupNorm/LayerNorm (`metavae.nets.conv`).
Parameter counts equal the VHE's (MLP 8,284,104; conv 16,577,161 + 6).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .hierarchical import HierarchicalVAE, build_hierarchical
from .base import LossOutput


class NeuralStatistician(HierarchicalVAE):
    """Each distribution's batch is one set; the per-element-normalised set ELBO."""

    uses_context = False  # the set is the query batch itself: the trainer draws no context sets

    def __init__(self, *args, set_kl_weight: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_kl_weight = set_kl_weight  # None: 1/|D| (the set ELBO per element); 1.0: the reference

    def loss(self, batch) -> LossOutput:
        """mean_k [ mean_j (-log p(x_j | z_j, c_k) + KL_z,j) + w KL(q(c_k|D_k) || p(c)) ], w = 1/B.
        ``batch.context`` is ignored: D_k is the batch's B queries of distribution k."""
        x = batch.x
        K, B = x.shape[:2]
        hx = self.element_features(x)  # (K, B, F): used for both q(c | D) and q(z | x, c)
        c_params = self.statistic(hx).unsqueeze(1)  # (K, 1, 2c)
        c, eps, c_mu, c_logvar = self.sample_c(c_params, (K, 1))
        rec, kl_z = self.local_terms(x, hx, c)
        kl_c = self.context_kl(c_mu, c_logvar, c, eps).reshape(K)
        w = self.set_kl_weight if self.set_kl_weight is not None else 1.0 / B
        loss = ((-rec + kl_z).mean(dim=1) + w * kl_c).mean()
        return LossOutput(loss=loss, nll=-rec.detach().mean(), kl_z=kl_z.detach().mean(),
                          kl_c=kl_c.detach().mean(), kl_c_weight=w)

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None, sample_c: bool = False) -> torch.Tensor:
        """(mu_z, logvar_z) at c = E[c | D] (one sample of q(c | D) with ``sample_c``); D = ``context``
        or, if None, the queries' last leading dim."""
        if context is not None:
            return super().encode(x, context, sample_c)
        ne = len(self.event_shape)
        if x.dim() < ne or tuple(x.shape[x.dim() - ne:]) != self.event_shape:
            raise ValueError(f"queries must end in the event shape {self.event_shape}, got shape {tuple(x.shape)}")
        single = x.dim() == ne
        if single:  # one point: a set of one
            x = x.unsqueeze(0)
        hx = self.element_features(x)
        c_params = self.statistic(hx)
        c = self.sample_c(c_params, c_params.shape[:-1])[0] if sample_c else c_params[..., : self.c_dim]
        params = self.inference(hx, c.unsqueeze(-2))
        return params.squeeze(0) if single else params


def build_ns(event_shape: Sequence[int], set_kl_weight: float | None = None, **kwargs) -> NeuralStatistician:
    """The Neural Statistician (docs/reproduction.md §4.1 MLP: 8,284,104 parameters; 3.6 conv: 16,577,167);
    ``kwargs``: see `build_hierarchical`. ``prior="vampprior"`` is available but not part of the paper's comparison."""
    return build_hierarchical(NeuralStatistician, "ns", event_shape, set_kl_weight=set_kl_weight, **kwargs)


build_ns.forwards_to = build_hierarchical  # its **kwargs' defaults, for `registry.builder_params`


__all__ = ["NeuralStatistician", "build_ns"]
