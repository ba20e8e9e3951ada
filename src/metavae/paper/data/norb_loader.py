"""What the NORB experiments read: real smallNORB (`metavae.paper.data.norb`) when a folder is given,
else its rendered stand-in (`metavae.paper.data.synthnorb`). A module of its own so that the reader and
the renderer need not import each other."""
from __future__ import annotations

import os

from .norb import IMAGE_SIZE, NorbData, load_smallnorb
from .synthnorb import load_synthnorb


def load_norb(data_dir: str | os.PathLike | None = None, *, source: str = "auto",
              download: bool = False, cache_dir: str | os.PathLike | None = None,
              cameras: str = "all", image_size: int = IMAGE_SIZE, **synth_kwargs) -> NorbData:
    """What the NORB experiments read: real smallNORB from ``data_dir`` when given, else synthnorb.

    ``source``: "auto" (as above), "smallnorb" (real; from data_dir, or the cache with an optional
    download) or "synthnorb" (the offline stand-in, generated once and cached).
    """
    if source == "auto":
        source = "smallnorb" if data_dir is not None else "synthnorb"
    if source == "smallnorb":
        return load_smallnorb(data_dir, download=download, cache_dir=cache_dir, cameras=cameras,
                              image_size=image_size)
    if source == "synthnorb":
        if data_dir is not None:
            raise ValueError("data_dir points at real smallNORB files; it cannot be used with source='synthnorb'")
        return load_synthnorb(cache_dir=cache_dir, cameras=cameras, image_size=image_size, **synth_kwargs)
    raise ValueError(f"unknown NORB source {source!r}; expected 'auto', 'smallnorb' or 'synthnorb'")
