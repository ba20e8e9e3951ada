"""The progress bar of every training loop (the `Trainer`'s epochs, decoder adaptation's steps)."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """A bar of ``total`` steps that stays quiet off a terminal (one refresh per 30 s in logs)."""
    return tqdm(total=total, initial=min(initial, total), desc=desc, disable=not enabled, dynamic_ncols=True,
                leave=False, mininterval=0.2 if sys.stderr.isatty() else 30.0)
