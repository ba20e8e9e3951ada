"""Devices and torchrun: which device, which rank, and the process group.

Under torchrun every rank draws the same global batch from the same generator and trains on its
slice of it (`Batch.shard`), so DDP's gradient average equals the one-process gradient."""
from __future__ import annotations

import os

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; a clear error where the device is unknown or absent."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device '{name}': use cpu or cuda[:N]") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}': use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


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
