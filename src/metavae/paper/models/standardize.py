"""The physics experiment's preprocessing parts, kept inside its models (and their files):
standardising the observed 1/t^2 feature on the context, or by fixed constants for the baseline."""
from __future__ import annotations

import torch
from torch import nn


class StandardizeOnContext(nn.Module):
    """Standardise feature 0 of the query and of its context by the mean and standard deviation of
    the context's uncensored elements (flag, feature 1, = 0); censored elements keep 0. Parameter-free.

    1/t^2 scales as 1/L, so this removes the plane's length. And because mu ~ U(0, min(1, tan A)) on
    the boxes that slide and 1/t^2 is affine in mu, the standardised value alone gives the friction
    relative to the sliding range: what is left to learn is that range (from the censored fraction)
    and how much to shrink where the timing noise matters.
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None):
        if context is None:
            return x, None
        v, flag = context[..., 0], context[..., 1]
        w = 1 - flag
        n = w.sum(-1)
        mean = (v * w).sum(-1) / n.clamp(min=1)
        var = (w * (v - mean.unsqueeze(-1)) ** 2).sum(-1) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.sqrt().clamp(min=1e-6), torch.ones_like(var))
        xq = torch.stack([(x[..., 0] - mean) / std * (1 - x[..., 1]), x[..., 1]], dim=-1)
        xc = torch.stack([(v - mean.unsqueeze(-1)) / std.unsqueeze(-1) * w, flag], dim=-1)
        return xq, xc


class FixedStandardize(nn.Module):
    """The no-context baseline's version: feature 0 standardised with constants (its training
    simulator's uncensored mean and standard deviation), stored as buffers."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):  # defaults: rebuilt from a config, then loaded
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor, context=None):
        return torch.stack([(x[..., 0] - self.mean) / self.std * (1 - x[..., 1]), x[..., 1]], dim=-1), None
