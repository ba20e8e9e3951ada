"""Inference-time refinement of an amortized q (docs/gap.md §3-§4).

An encoder's q(z | D, x) is one network's guess for every point; the ELBO of each point can still be
raised by optimising that point's q directly. Starting the optimisation from the encoder's guess
(semi-amortized inference) keeps most of amortization's speed and removes part of its gap.

Two ways to take the steps, both costing one gradient of the ELBO per step:
  * `refine` / `iterate`: gradient ascent (Adam or plain SGD) on each point's ELBO with respect to
    q's parameters: mean and log-variance for `GaussianLatent`, logits for `CategoricalLatent`;
  * `GradientEncoder`: a small learned network that reads q's parameters and that gradient and
    decides how far to step ("gradient encoding"); fitted with `train_gradient_encoder`.

Library code: a likelihood is any function ``log_lik(z)`` mapping drawn points z (..., S, dz) to
log p(x | z) (..., S), and the ELBO is `objectives.elbo_of`, the formula training uses.
`refined_encode` wires a MetaVAE-like model's encoder and decoder into it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import objectives
from .distributions import GaussianLatent
from .nets.mlp import mlp

OPTIMIZERS = ("adam", "sgd")
LogLik = Callable[[torch.Tensor], torch.Tensor]


class GaussHermiteLatent(GaussianLatent):
    """A diagonal Gaussian q whose `draw` is a Gauss-Hermite product rule instead of random samples.

    ``n ** dim`` fixed points with weights summing to 1, so E_q[f], hence the ELBO and its gradient,
    carries no sampling noise, and is exact for polynomials in z of degree < 2n. Cost grows as
    ``n ** dim``: for low-dimensional latents (measuring gaps, refining a few coordinates)."""

    def __init__(self, dim: int, n: int = 20):
        super().__init__(dim)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Gauss-Hermite rule needs n >= 1 points per dimension, got {n!r}")
        t, w = np.polynomial.hermite.hermgauss(n)  # for the weight exp(-t^2)
        t = torch.tensor(t * math.sqrt(2.0))
        w = torch.tensor(w / math.sqrt(math.pi))
        self.nodes = torch.cartesian_prod(*[t] * dim).reshape(-1, dim)  # standard-normal nodes (n^dim, dim)
        self.weights = torch.cartesian_prod(*[w] * dim).reshape(-1, dim).prod(-1)

    def draw(self, params, n: int = 1):
        """Quadrature points z (..., n^dim, dim) and weights; ``n`` (samples) is ignored."""
        mu, logvar = self.split(params)
        nodes = self.nodes.to(mu)
        z = mu.unsqueeze(-2) + torch.exp(0.5 * logvar).unsqueeze(-2) * nodes
        return z, self.weights.to(mu).expand(z.shape[:-1])


def elbo_and_grad(latent, params: torch.Tensor, log_lik: LogLik, n_samples: int = 1) -> tuple:
    """(ELBO per point, its gradient with respect to ``params``): one gradient evaluation, the
    unit in which refinement's cost is counted. Nothing else receives gradients."""
    with torch.enable_grad():
        p = params.detach().requires_grad_(True)
        value = objectives.elbo_of(latent, p, log_lik, n_samples)
        (grad,) = torch.autograd.grad(value.sum(), p)  # points are independent: the sum's gradient is per point
    return value.detach(), grad


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")


def iterate(latent, params: torch.Tensor, log_lik: LogLik, steps: int, lr: float, n_samples: int = 1,
            optimizer: str = "adam") -> Iterator[torch.Tensor]:
    """Yield q's parameters after each of ``steps`` ascent steps on every point's ELBO, starting from
    ``params`` (left unchanged). Adam scales each parameter on its own, so each point gets its own
    step sizes; with a Gaussian latent the ELBO is a ``n_samples`` Monte Carlo estimate (exact with
    `GaussHermiteLatent` or a `CategoricalLatent`)."""
    _check_steps(steps)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    p = params.detach().clone().requires_grad_(True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([p], lr=lr)
    for _ in range(steps):
        _, grad = elbo_and_grad(latent, p, log_lik, n_samples)
        p.grad = -grad  # the optimisers minimise
        opt.step()
        yield p.detach().clone()


def refine(latent, params: torch.Tensor, log_lik: LogLik, steps: int, lr: float, n_samples: int = 1,
           optimizer: str = "adam") -> torch.Tensor:
    """q's parameters after ``steps`` gradient steps on each point's ELBO from ``params`` (see `iterate`)."""
    out = params.detach()
    for out in iterate(latent, params, log_lik, steps, lr, n_samples, optimizer):
        pass
    return out


def refined_encode(model, x: torch.Tensor, context=None, dist=None, steps: int = 10, lr: float = 0.05,
                   n_samples: int = 1, latent=None, optimizer: str = "adam") -> torch.Tensor:
    """``model.encode(x, context)`` refined by ``steps`` ELBO steps under the model's own decoders
    ``dist`` (as `objectives.elbo`; ``latent`` overrides how E_q is taken, e.g. `GaussHermiteLatent`).

    The ELBO needs a decoder for x's distribution: a MetaVAE has one per *training* distribution
    only, so for an unseen distribution bring its likelihood and call `refine` instead."""
    with torch.no_grad():
        params = model.encode(x, context)
    return refine(latent or model.latent, params, lambda z: objectives.decoder_log_lik(model, x, z, dist),
                  steps, lr, n_samples, optimizer)


class GradientEncoder(nn.Module):
    """A learned update for q's parameters (gradient encoding): lambda <- lambda + eta * grad.

    The step size eta = exp(net([lambda, s(grad)])), one per parameter, is read from q's current
    parameters and the ELBO's gradient, with s(g) = sign(g) log(1 + |g|) so that gradients of any
    scale reach the net in a usable range. Because the update is a multiple of the gradient, every
    stationary point of the ELBO stays a fixed point; the net only learns how far to trust each
    gradient, which a fixed learning rate cannot do when curvature differs between points. No
    parameter moves by more than ``max_step`` per update: a trust region, so that a state unlike
    those it was trained on (a far worse start, a huge gradient) cannot make the update explode."""

    def __init__(self, n_params: int, hidden: Sequence[int] = (32, 32), init_step: float = 1e-2,
                 log_step_bound: float = 9.0, max_step: float = 1.0):
        super().__init__()
        if not (0 < init_step and abs(math.log(init_step)) < log_step_bound):
            raise ValueError(f"init_step must be in (exp(-{log_step_bound}), exp({log_step_bound})), got {init_step}")
        self.net = mlp([2 * n_params, *hidden, n_params], "relu")
        self.bound, self.max_step = float(log_step_bound), float(max_step)
        with torch.no_grad():  # start as plain gradient ascent with step init_step
            last = self.net[-1]
            last.weight.mul_(0.1)
            last.bias.fill_(self._unbound(math.log(init_step)))

    def _unbound(self, value: float) -> float:
        return self.bound * math.atanh(value / self.bound)

    def forward(self, params: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([params, grad.sign() * grad.abs().log1p()], dim=-1).to(self.net[0].weight.dtype)
        log_step = self.bound * torch.tanh(self.net(feats) / self.bound)  # softly bounded to (-9, 9)
        step = torch.exp(log_step).to(params.dtype) * grad
        return params + step.clamp(-self.max_step, self.max_step)


def iterate_learned(encoder: GradientEncoder, latent, params: torch.Tensor, log_lik: LogLik, steps: int,
                    n_samples: int = 1) -> Iterator[torch.Tensor]:
    """Yield q's parameters after each of ``steps`` learned updates (one ELBO gradient each)."""
    _check_steps(steps)
    p = params.detach()
    for _ in range(steps):
        _, grad = elbo_and_grad(latent, p, log_lik, n_samples)
        with torch.no_grad():
            p = encoder(p, grad)
        yield p


def train_gradient_encoder(encoder: GradientEncoder, latent, params: torch.Tensor, log_lik: LogLik, iters: int,
                           unroll: int = 5, lr: float = 1e-3, n_samples: int = 1) -> list[float]:
    """Fit ``encoder`` on training points (their amortized ``params`` and ``log_lik``) by maximising
    the mean ELBO after each of ``unroll`` updates from the amortized start. Each update is trained
    on the ELBO it produces, with its input gradient taken as data (no second derivatives). Only the
    encoder's weights change. Returns the loss (minus the mean ELBO over the unroll) per iteration."""
    _check_steps(iters)
    _check_steps(unroll)
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    weights = list(encoder.parameters())
    losses = []
    for _ in range(iters):
        p, loss = params.detach(), 0.0
        for _ in range(unroll):
            _, grad = elbo_and_grad(latent, p, log_lik, n_samples)
            with torch.enable_grad():
                p = encoder(p, grad)
                step_loss = -objectives.elbo_of(latent, p, log_lik, n_samples).mean() / unroll
                for w, g in zip(weights, torch.autograd.grad(step_loss, weights)):
                    w.grad = g if w.grad is None else w.grad + g
            loss += float(step_loss.detach())
            p = p.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses
