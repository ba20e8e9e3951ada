"""Parts a model config names instead of describing by value (e.g. a preprocessing module): their
import path inside the metavae package, so that loading a saved model never imports other code."""
from __future__ import annotations

import importlib

import torch


def part_name(module: torch.nn.Module | None) -> str | None:
    """'metavae.pkg.module:Class' for a part that `build_part` can rebuild (a class of the metavae
    package constructible with no arguments; its tensors come back from the state dict)."""
    if module is None:
        return None
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_part(name: str | None) -> torch.nn.Module | None:
    if name is None:
        return None
    module, _, attr = str(name).partition(":")
    if not (module == "metavae" or module.startswith("metavae.")) or not attr or "<" in attr:
        raise ValueError(f"cannot rebuild part {name!r}: only parts defined in the metavae package are loaded")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"cannot rebuild part {name!r}: {e}") from None
