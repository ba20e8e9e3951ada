"""`TrainConfig`: the Trainer's settings, checked when built so a bad value fails before any data loads."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 100
    context_size: int = 10
    lr: float = 2e-4
    steps_per_epoch: int | None = None  # default: one pass over the largest distribution
    val_steps: int | None = None  # default: one pass over the val part
    exclude_query: bool = False  # draw contexts from the other points only
    shared_context: bool = False  # one context set per distribution and step, shared by its B queries
    context_pool: int | None = None  # draw each query's context from P points embedded once per step
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None  # "bf16": bfloat16 matmuls, float32 losses (training/precision.py); CPU or CUDA
    compile: bool = False  # torch.compile the loss (pays a one-off compile time)
    patience: int | None = None  # early stopping: stop after this many epochs without a lower val loss
    tensorboard: str | None = None  # a folder for TensorBoard event files (needs the tensorboard package)
    snapshot_steps: tuple = ()  # also keep the weights after these steps (0: at init), for learning curves
    keep_worst: bool = False  # also keep worst.pt, the highest-validation-loss epoch (the reference's pick)
    # Train S of the K distributions per step, drawn at random without replacement (None: all K). Decoders
    # not drawn get no update at all (training/optim.py RowAdam); the default epoch becomes K/S times as
    # many steps, so each distribution is drawn about as often as in a full-K epoch.
    distributions_per_step: int | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "context_size", "steps_per_epoch", "val_steps", "context_pool", "patience",
                     "distributions_per_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_size < 0:
            raise ValueError(f"context_size must be >= 0, got {self.context_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        for name in ("steps_per_epoch", "val_steps", "context_pool", "patience", "distributions_per_step"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be positive or None (no clipping), got {self.grad_clip}")


# Settings a resumed run may change between launches; every other one must match the checkpoint's.
RUNTIME_FIELDS = ("epochs", "device", "amp", "compile", "snapshot_steps", "keep_worst", "tensorboard", "patience")
