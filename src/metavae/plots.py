"""Figures written safely: an atomic PNG write, by the main process only."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write
from .training import is_main_process


def save_figure(fig, path: Path) -> Path:
    """Atomic PNG write (a crash never leaves half a picture)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if is_main_process():
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path
