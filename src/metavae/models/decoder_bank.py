"""Decoder-bank surgery: fit a new decoder for a distribution unseen in training (`adapt`) under a
MetaVAE's frozen encoder, and grow the bank by it. The loop takes its steps through the training
loop's parts (`training.optim.make_optimizer`, `optimizer_step`, `training.progress`)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import objectives
from ..data.meta import MetaDataset, checked_points
from ..nets.mlp import BatchedLinear
from ..training.optim import make_optimizer, optimizer_step
from ..training.progress import progress_bar

ADAPT_CHECK_EVERY = 10  # steps between checks of an adapting decoder on the held-out points


def adapt(model, points: torch.Tensor, steps: int = 500, lr: float = 1e-3, batch_size: int = 64,
          context_size: int = 10, holdout: float = 0.2, seed: int = 0, progress: bool = False) -> int:
    """`MetaVAE.adapt`: fit a decoder for ``points`` (n, *event) with the encoder frozen, append it to
    ``model``'s bank and return its index (see the method for the arguments)."""
    if steps < 0 or batch_size < 1 or context_size < 1 or not lr > 0 or not 0 <= holdout < 1:
        raise ValueError(f"adapt needs steps >= 0, batch_size >= 1, context_size >= 1, lr > 0 and 0 <= holdout "
                         f"< 1; got steps={steps}, batch_size={batch_size}, context_size={context_size}, lr={lr}, "
                         f"holdout={holdout}")
    if not model.uses_context:
        raise ValueError("adapt fits a decoder under a MetaVAE's context-aware encoder; this model has no "
                         "context (a plain VAE): train a VAE on the points instead")
    _check_linear_bank(model.decoder)
    points = checked_points(points, "adapt", "points")  # shape and values: one clear error
    if tuple(points.shape[1:]) != model.event_shape:
        raise ValueError(f"points must be (n, *{model.event_shape}), got event shape {tuple(points.shape[1:])}")
    device = next(model.parameters()).device
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))
    n_out = min(len(points) - 1, max(1, round(holdout * len(points)))) if holdout > 0 else 0
    held, fit = points[order[:n_out]].to(device), points[order[n_out:]].to(device)
    context_size = min(context_size, len(fit))  # a context is drawn from the training points
    was_training = model.training
    model.eval()
    member = _bank_member(model.decoder, _nearest_decoder(model, fit, batch_size, context_size, seed))
    _fit_member(_FrozenEncoder(model, member), fit, held, steps, lr, batch_size, context_size, seed, progress)
    _append_member(model.decoder, member)
    model.config["n_decoders"] = model.n_decoders
    model.train(was_training)
    return model.n_decoders - 1


@torch.no_grad()
def _nearest_decoder(model, points: torch.Tensor, batch_size: int, context_size: int, seed: int) -> int:
    """The training decoder with the highest ELBO on one batch of ``points``."""
    gen = torch.Generator(device=points.device).manual_seed(seed)
    batch = MetaDataset.from_parts(train=[points]).sample(batch_size, context_size, generator=gen)
    x = batch.x.expand(model.n_decoders, *batch.x.shape[1:])
    ctx = None if batch.context is None else batch.context.expand(model.n_decoders, *batch.context.shape[1:])
    return int(objectives.elbo(model, x, ctx).mean(1).argmax())


class _FrozenEncoder:
    """The objectives' view of a MetaVAE whose encoder is fixed and whose decoder is ``decoder``
    (one bank member): q's parameters carry no gradient, so only the decoder learns."""

    def __init__(self, model, decoder: nn.Module):
        self.model, self.decoder = model, decoder
        self.latent, self.likelihood = model.latent, model.likelihood

    def encode(self, x, context=None):
        with torch.no_grad():
            return self.model.encode(x, context)

    def decode(self, z, dist=None):
        return self.decoder(z)


def _check_linear_bank(bank: nn.Module) -> None:
    banked = {id(p) for m in bank.modules() if isinstance(m, BatchedLinear) for p in m.parameters()}
    if not banked or any(id(p) not in banked for p in bank.parameters()):
        raise ValueError(f"adapt needs a decoder bank of BatchedLinear layers (the MLP MetaVAE's); "
                         f"{type(bank).__name__} is not one")


def _fit_member(frozen: _FrozenEncoder, fit: torch.Tensor, held: torch.Tensor, steps: int, lr: float,
                batch_size: int, context_size: int, seed: int, progress: bool) -> None:
    """Adam (the Trainer's) on ``frozen.decoder`` (one bank member) for ``steps`` steps of the ELBO on
    ``fit``; with ``held`` points, keep the weights that score best on them (the start included)."""
    data = MetaDataset.from_parts(train=[fit])
    gen = torch.Generator(device=fit.device).manual_seed(seed)
    ctx = fit[:context_size]  # the held-out points' one context set

    def held_out_elbo() -> float:
        devices = [fit.device] if fit.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # the same latent draws at every check (and training's streams untouched)
            return float(objectives.elbo(frozen, held.unsqueeze(0), ctx, n_samples=8).mean())

    member = frozen.decoder
    best = held_out_elbo() if len(held) else None
    best_state = {k: v.clone() for k, v in member.state_dict().items()}
    opt = make_optimizer(member.parameters(), lr)
    bar = progress_bar(steps, "adapt", progress)
    for step in range(1, steps + 1):
        batch = data.sample(batch_size, context_size, generator=gen)
        optimizer_step(opt, -objectives.meta_elbo(frozen, batch.x, batch.context), member.parameters())
        bar.update(1)
        if best is not None and (step % ADAPT_CHECK_EVERY == 0 or step == steps):
            score = held_out_elbo()
            if score > best:
                best, best_state = score, {k: v.clone() for k, v in member.state_dict().items()}
    bar.close()
    if best is not None:
        member.load_state_dict(best_state)


def _bank_member(bank: nn.Module, k: int) -> nn.Module:
    """A one-member copy of decoder bank ``bank``'s member ``k`` (its own parameters)."""
    member = copy.deepcopy(bank)
    for m in member.modules():
        if isinstance(m, BatchedLinear):
            m.weight = nn.Parameter(m.weight.data[k:k + 1].clone())
            m.bias = nn.Parameter(m.bias.data[k:k + 1].clone())
        if hasattr(m, "n"):
            m.n = 1
    return member


def _append_member(bank: nn.Module, member: nn.Module) -> None:
    """Grow ``bank`` by the one-member bank ``member`` (the same architecture), as its last member."""
    n = bank.n + 1
    for mine, theirs in zip(bank.modules(), member.modules()):
        if isinstance(mine, BatchedLinear):
            mine.weight = nn.Parameter(torch.cat([mine.weight.data, theirs.weight.data.to(mine.weight)]))
            mine.bias = nn.Parameter(torch.cat([mine.bias.data, theirs.bias.data.to(mine.bias)]))
        if hasattr(mine, "n"):
            mine.n = n
