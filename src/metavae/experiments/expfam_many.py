"""Experiment `expfam-many`: see :mod:`metavae.experiments.expfam`."""
from .expfam import OPTIONS, PRESETS, ExpfamConfig  # noqa: F401
from .expfam import run_many as run

DESCRIPTION = "Sufficient statistics over 3 families vs single-family MetaVAEs, on held-out and unseen families (Fig. 4)"

__all__ = ["DESCRIPTION", "OPTIONS", "PRESETS", "ExpfamConfig", "run"]
