"""Mixtures of two isotropic 2-D Gaussians (the paper's clustering demo), generated on the fly."""
from __future__ import annotations

import torch

VARIANCE = 0.1  # isotropic covariance of each component (paper)
MEAN_RANGE = 5.0  # component means ~ U(-5, 5)^2


def sample_means(n_mixtures: int, generator: torch.Generator, dim: int = 2) -> torch.Tensor:
    """Component means (M, 2 components, dim) drawn from U(-5, 5)^dim."""
    return (torch.rand((n_mixtures, 2, dim), generator=generator) * 2 - 1) * MEAN_RANGE


def sample_points(means: torch.Tensor, n: int, generator: torch.Generator, variance: float = VARIANCE):
    """n points per mixture with equal mixing weights: x (M, n, dim) and true component labels (M, n)."""
    M, _, dim = means.shape
    labels = (torch.rand((M, n), generator=generator) < 0.5).long()
    centers = means.gather(1, labels.unsqueeze(-1).expand(M, n, dim))
    x = centers + variance**0.5 * torch.randn((M, n, dim), generator=generator)
    return x, labels


def bayes_labels(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The Bayes-optimal assignment given the true means: the nearer component (equal weights and
    isotropic equal covariances make the posterior a function of distance alone)."""
    d = ((x.unsqueeze(2) - means.unsqueeze(1)) ** 2).sum(-1)  # (M, n, 2)
    return d.argmin(-1)


def clustering_error(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-mixture error up to label permutation: min over the two matchings. (M, n) -> (M,)."""
    wrong = (pred != labels).float().mean(-1)
    return torch.minimum(wrong, 1 - wrong)
