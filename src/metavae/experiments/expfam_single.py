"""Experiment `expfam-single`: see :mod:`metavae.experiments.expfam`."""
from .expfam import OPTIONS, PRESETS, ExpfamConfig  # noqa: F401
from .expfam import run_single as run

DESCRIPTION = "Sufficient statistics, one family at a time (Fig. 3): MetaVAE over 30 vs a VAE on one, parameter sweeps"

__all__ = ["DESCRIPTION", "OPTIONS", "PRESETS", "ExpfamConfig", "run"]
