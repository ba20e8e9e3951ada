"""What every model shares: the loss record (`LossOutput`), ``save`` (`Saveable`), and the builders'
choices of init and context pooling. It imports no model and no registry, so any model can use it."""
from __future__ import annotations

import torch
from torch import nn

from ..nets.sets import AttentionPool, MeanPool
from . import files

INITS = ("default", "xavier")
POOLINGS = ("mean", "attention")


class LossOutput(dict):
    """A training loss and the numbers worth logging beside it."""

    @property
    def loss(self) -> torch.Tensor:
        return self["loss"]


class Saveable:
    """``model.save(path, **extra)``: one file that `metavae.load` rebuilds (`models.files`)."""

    def save(self, path, **extra):
        return files.save_model(self, path, extra)


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


def apply_init(model: nn.Module, init: str) -> nn.Module:
    """``default``: PyTorch's per-layer defaults, as the reference's MetaVAE. ``xavier``: the
    reference's baselines' init (Xavier-normal, gain sqrt 2, zero bias; `reference_init`). The
    choice matters for unscaled read-outs: on rotated MNIST the untrained default MetaVAE's posterior
    means spread 0.016 across images, the Xavier-initialised VHE's 0.69 (`untrained.embedding_std`
    under results/mnist; docs/reproduction.md §1.4)."""
    check_init(init)
    if init == "xavier":
        from ..nets.conv import reference_init

        reference_init(model)
    return model


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


def set_pool(element: nn.Module, width: int, pooling: str, event_dim: int) -> nn.Module:
    """The summary h(D) over a context set: ``element`` embeds each member to ``width`` features,
    then the mean (the paper's) or a Set Transformer (`AttentionPool`, 4 heads) pools them."""
    check_pooling(pooling)
    if pooling == "mean":
        return MeanPool(element, event_dim=event_dim)
    return AttentionPool(element, width, heads=4, event_dim=event_dim)
