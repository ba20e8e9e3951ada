"""Set encoders: permutation-invariant summaries of a context set D."""
from __future__ import annotations

import torch
from torch import nn

from ..data.meta import gather_members, mean_members


class MeanPool(nn.Module):
    """h(D) = post( mean_{x in D} pre(x) ).

    Pools by the *set size*. The reference implementation divides the sum by the batch size
    instead, so its summary scales with N/B and changes between training and evaluation.
    ``event_dim`` is the number of trailing dims of one element (1 for vectors, 3 for images).
    """

    def __init__(self, pre: nn.Module, post: nn.Module | None = None, event_dim: int = 1):
        super().__init__()
        self.pre, self.post, self.event_dim = pre, post if post is not None else nn.Identity(), event_dim

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context: (..., N, *event) -> (..., features)."""
        lead = context.shape[: context.dim() - self.event_dim]
        if len(lead) < 1 or lead[-1] < 1:
            raise ValueError(f"a context set needs at least one element, got shape {tuple(context.shape)}")
        h = self.pre(context.reshape(-1, *context.shape[len(lead):]))
        h = h.reshape(*lead, *h.shape[1:]).mean(dim=len(lead) - 1)
        return self.post(h)

    def pooled(self, pool: torch.Tensor, index: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Summaries (K, B, S) of the sets ``pool[k, index[k, b]]``: ``pre`` runs once on the P pool
        points (K, P, *event), then each query averages the features of its N members.

        The average is a batched matmul with a (K, B, P) membership matrix of weights 1/N, and its
        backward another matmul: gathering the B*N member features and reducing them (backward: a
        scatter-add) made the pooled MLP MetaVAE step 169 ms instead of 142 ms on one CPU thread.
        ``features``: ``pre`` of the pool, already computed (a large pool, many batches of queries);
        the members are then averaged by one fused gather (`mean_members`), since a (K, B, P) matrix would
        be mostly zeros."""
        B, N = index.shape[1:]
        if features is not None:
            return self.post(mean_members(features, index))
        K, P = pool.shape[:2]
        h = self.pre(pool.reshape(K * P, *pool.shape[2:]))
        h = h.reshape(K, P, -1)
        weights = torch.zeros((K, B, P), dtype=h.dtype, device=h.device)
        weights.scatter_add_(2, index, torch.full(index.shape, 1.0 / N, dtype=h.dtype, device=h.device))
        return self.post(torch.bmm(weights, h))


class _SetAttentionBlock(nn.Module):
    """SAB(X) = LN(H + FF(H)), H = LN(X + MultiheadAttention(X, X, X)) (Lee et al. 2019)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x + self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0])
        return self.norm2(h + self.ff(h))


class AttentionPool(nn.Module):
    """A Set Transformer summary: h(D) = PMA(SAB^n(pre(D))) (Lee et al. 2019, "Set Transformer").

    ``pre`` embeds each element to ``dim`` features; ``n_blocks`` self-attention blocks let the
    elements interact; pooling by multihead attention (PMA) with one learned seed vector replaces
    the mean, so the summary can weigh elements unequally. Permutation invariant. ``mask`` (..., N),
    True for real elements, handles sets padded to a common size. Same interface as `MeanPool`."""

    def __init__(self, pre: nn.Module, dim: int, heads: int = 4, n_blocks: int = 1, event_dim: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} must be divisible by the {heads} heads")
        self.pre, self.event_dim = pre, event_dim
        self.blocks = nn.ModuleList(_SetAttentionBlock(dim, heads) for _ in range(n_blocks))
        self.seed = nn.Parameter(torch.randn(1, 1, dim) / dim ** 0.5)
        self.pma = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """context: (..., N, *event) -> (..., dim)."""
        lead = context.shape[: context.dim() - self.event_dim]
        if len(lead) < 1 or lead[-1] < 1:
            raise ValueError(f"a context set needs at least one element, got shape {tuple(context.shape)}")
        n = lead[-1]
        h = self.pre(context.reshape(-1, *context.shape[len(lead):])).reshape(-1, n, self.seed.shape[-1])
        pad = None
        if mask is not None:
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the sets {tuple(lead)}")
            if not bool(mask.any(dim=-1).all()):
                raise ValueError("every set needs at least one unmasked element")
            pad = ~mask.reshape(-1, n).bool()
        return self._attend(h, pad).reshape(*lead[:-1], -1)

    def _attend(self, h: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """(sets, N, dim) element features -> (sets, dim): the SABs, then PMA with the seed."""
        for block in self.blocks:
            h = block(h, pad)
        seed = self.seed.expand(h.shape[0], -1, -1)
        return self.norm(self.pma(seed, h, h, key_padding_mask=pad, need_weights=False)[0] + seed)

    def pooled(self, pool: torch.Tensor, index: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Summaries (K, B, dim) of the sets ``pool[k, index[k, b]]``: ``pre`` runs once on the P pool
        points (K, P, *event), as in `MeanPool.pooled`, or not at all where ``features`` holds it;
        each set's N member features are gathered and attended. Equal to ``forward`` on the
        materialised sets, at the pool's cost for ``pre``."""
        K, P = (pool if features is None else features).shape[:2]
        B, N = index.shape[1:]
        h = features if features is not None else self.pre(pool.reshape(K * P, *pool.shape[2:])).reshape(K, P, -1)
        members = gather_members(h, index).reshape(K * B, N, -1)
        return self._attend(members, None).reshape(K, B, -1)
