"""Devices and torchrun: which device, which rank, the process group, and the memory a step needs.

Under torchrun every rank draws the same global batch from the same generator and trains on its
slice of it (`Batch.shard`), so DDP's gradient average equals the one-process gradient.

A step gathers B queries and B context sets of N points for each of K distributions, plus the
random keys that draw them; a batch_size of a billion would otherwise allocate until the kernel's
OOM killer ends the process with no message. `check_step_memory` estimates a lower bound (inputs,
sampling keys and a few activations' worth of the same size) before anything is allocated, so
refusing what exceeds the memory available never refuses a step that would fit."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..devices import resolve_device  # noqa: F401  (the trainer and the package import it from here)


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def is_main_process() -> bool:
    """Only rank 0 writes files (checkpoints, metrics, reports) in a multi-process run."""
    return distributed_env()[0] == 0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group once (gloo on CPU, nccl on CUDA); (rank, world) to use."""
    rank, _, world = distributed_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def process_device(device: torch.device) -> torch.device:
    """One GPU per process under torchrun: a bare 'cuda' becomes this process's local GPU."""
    _, local_rank, world = distributed_env()
    if world > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


class LossModule(torch.nn.Module):
    """DDP synchronises gradients only through ``forward``: route ``model.loss`` through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


# --- memory ----------------------------------------------------------------------------------
FLOAT = 4  # bytes: the models compute in float32
ACTIVATION_FACTOR = 3  # forward activations and their gradients: at least a few copies of the inputs


def available_memory() -> int | None:
    """Bytes the kernel says can still be allocated (MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def device_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: `available_memory`)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    return available_memory() if device.type == "cpu" else None


def step_bytes(k: int, batch_size: int, context_size: int, event_size: int, n_max: int,
               shared_context: bool = False, context_pool: int | None = None) -> int:
    """A lower bound on one step's memory: queries and context points in float32 (times
    `ACTIVATION_FACTOR`), the index tensors and the random keys that draw the context sets."""
    sets = 1 if shared_context else batch_size
    points = k * (batch_size + (context_pool or 0) + sets * context_size * (0 if context_pool else 1))
    from ..data.meta import samples_by_keys

    keys = k * batch_size * (n_max if samples_by_keys(n_max, context_size) else context_size) * FLOAT
    index = k * batch_size * max(context_size, 1) * 8
    return points * event_size * FLOAT * ACTIVATION_FACTOR + keys + index


def check_step_memory(dataset, config, context_size: int, device: torch.device, k: int) -> None:
    """Refuse a training configuration whose step cannot fit in the memory available, naming the
    settings to lower, before any of it is allocated."""
    free = device_memory(device)
    if free is None:
        return
    part = dataset.part("train")
    event = math.prod(dataset.event_shape)
    need = step_bytes(k, config.batch_size, context_size, event, part.n_max, config.shared_context,
                      config.context_pool)
    if need > free:
        raise ValueError(f"one training step needs at least {need / 1e9:.3g} GB (batch_size={config.batch_size} queries "
                         f"x {k} distributions, context_size={context_size}, {event} values per point) but "
                         f"{free / 1e9:.3g} GB are available on {device}; lower batch_size (or context_size)")
