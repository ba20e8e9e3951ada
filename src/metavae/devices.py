"""Devices by name: the one check that a requested device exists, shared by data, models and training."""
from __future__ import annotations

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
