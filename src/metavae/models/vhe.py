"""The Variational Homoencoder (Hewitt et al. 2018), optionally with a VampPrior on c
(`hierarchical.py` holds what it shares with the Neural Statistician).

The objective is the paper's Eq. 13, per query x with its own context set D of N elements:
  loss(x, D) = -log p(x | z, c) + KL(q(z|x,c) || p(z|c)) + (1/N) KL(q(c|D) || p(c)),
with c ~ q(c|D) and z ~ q(z|x,c) one reparameterised sample each; averaged over the queries and
distributions. The reference drops the 1/N (``context_kl_weight=1.0`` reproduces it).
"""
from __future__ import annotations

from typing import Sequence

from ..data.meta import PooledContext
from .hierarchical import HierarchicalVAE, build_hierarchical
from .base import LossOutput


class VariationalHomoencoder(HierarchicalVAE):
    """The Variational Homoencoder: every query with its own context set; objective Eq. 13."""

    def __init__(self, *args, context_kl_weight: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.context_kl_weight = context_kl_weight  # None: 1/N (Eq. 13); 1.0: the reference

    def loss(self, batch) -> LossOutput:
        """Mean over the K x B queries of -log p(x|z,c) + KL_z + w KL_c, w = 1/N (Eq. 13).
        c is sampled per query (from its own set's q(c|D), or a shared set's). With a
        `PooledContext` the element features run once per pool point (`MeanPool.pooled`)."""
        x, context = batch.x, batch.context
        if context is None:
            raise ValueError("the VHE needs a context set per query: train with context_size >= 1")
        ne = len(self.event_shape)
        K, B = x.shape[:2]
        if isinstance(context, PooledContext) and not hasattr(self.statistic, "pooled"):
            context = context.materialize()  # attention pooling: the sets themselves
        if isinstance(context, PooledContext):  # element features once per pool point, then averaged
            context.check_queries(x)
            N = context.index.shape[2]
            c_params = self.pooled_context_params(context)
        else:
            if context.dim() != ne + 3:
                raise ValueError(f"batch context must be (K, B or 1, N, *event), got {tuple(context.shape)}")
            N = context.shape[2]
            c_params = self.context_params(context)
        c, eps, c_mu, c_logvar = self.sample_c(c_params, (K, B))
        rec, kl_z = self.local_terms(x, self.element_features(x), c)
        kl_c = self.context_kl(c_mu, c_logvar, c, eps).expand(K, B)
        w = self.context_kl_weight if self.context_kl_weight is not None else 1.0 / N
        loss = (-rec + kl_z + w * kl_c).mean()
        return LossOutput(loss=loss, nll=-rec.detach().mean(), kl_z=kl_z.detach().mean(),
                          kl_c=kl_c.detach().mean(), kl_c_weight=w)


def build_vhe(event_shape: Sequence[int], context_kl_weight: float | None = None, **kwargs) -> VariationalHomoencoder:
    """The VHE (``prior="gaussian"``) or VHE + VampPrior (``prior="vampprior"``); ``kwargs``: see
    `build_hierarchical`.

    MLP (docs/reproduction.md §4.2/4.3): 8,284,104 parameters; + 500*10*784 = 3,920,000 pseudo-input weights
    for the VampPrior (12,204,104), as docs/reproduction.md §12. Conv (3.5/3.7): 16,577,161; VampPrior +500*10*H*W
    (5,120,000 at 32x32). ``decoder_hidden`` is the MLP observation decoder's wide layer (4096).
    ``context_kl_weight``: None for Eq. 13's 1/N, 1.0 for the reference's objective.
    """
    return build_hierarchical(VariationalHomoencoder, "vhe", event_shape, context_kl_weight=context_kl_weight, **kwargs)


build_vhe.forwards_to = build_hierarchical  # its **kwargs' defaults, for `registry.builder_params`

