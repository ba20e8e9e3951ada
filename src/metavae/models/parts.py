"""Parts a model config names instead of describing by value (e.g. a preprocessing module).

A saved config holds the part's name; loading looks that name up in the registry's explicit table
of allowed parts (`registry.ALLOWED_PARTS`) and never imports a path read from a file, so a model
file cannot make metavae call anything but a part class built for the purpose.
"""
from __future__ import annotations

import torch

from .registry import ALLOWED_PARTS, load_extensions


def _allowed() -> dict:
    load_extensions()  # parts other packages register (the paper's physics standardisers)
    return ALLOWED_PARTS


def part_name(module: torch.nn.Module | None) -> str | None:
    """The table's name of ``module``'s class; a class not in the table cannot be saved, because
    it could not be loaded back."""
    if module is None:
        return None
    cls = type(module)
    names = [n for n, c in _allowed().items() if c is cls]
    if not names:
        raise ValueError(f"part {cls.__module__}:{cls.__qualname__} is not a registered part; register it with "
                         "metavae.models.registry.register_part to save models that use it")
    return names[0]


def build_part(name: str | None) -> torch.nn.Module | None:
    """The part a config names, built with no arguments (its tensors come from the state dict);
    a name not in the table is refused before anything is imported."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in _allowed():
        raise ValueError(f"model config names part {name!r}, which is not an allowed part; allowed: "
                         f"{', '.join(sorted(_allowed())) or 'none'}")
    return _allowed()[name]()
