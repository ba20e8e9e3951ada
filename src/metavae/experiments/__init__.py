"""The paper's experiments, each a module with presets, ``run`` and a report.

An experiment module defines ``DESCRIPTION`` (one line), ``PRESETS`` (name -> config
dataclass; the first is the default), ``OPTIONS`` (the CLI options it accepts beyond the
common ones) and ``run(config, out, device, seed, progress, **options) -> metrics``.
An entry is a module path, or ``module:attribute`` where one module serves several experiments.
Modules are imported lazily so ``metavae list`` stays instant.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = {
    "mog": "metavae.experiments.mog",
    "mnist-rotate": "metavae.experiments.mnist:rotate",
    "mnist-scale": "metavae.experiments.mnist:scale",
    "mnist-shear": "metavae.experiments.mnist:shear",
    "norb-elevation": "metavae.experiments.norb:elevation",
    "norb-azimuth": "metavae.experiments.norb:azimuth",
    "norb-lighting": "metavae.experiments.norb:lighting",
    "physics": "metavae.experiments.physics",
    "expfam-single": "metavae.experiments.expfam_single",
    "expfam-many": "metavae.experiments.expfam_many",
}


def get_experiment(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))} (see `metavae list`)")
    module, _, attr = EXPERIMENTS[name].partition(":")
    found = importlib.import_module(module)
    return getattr(found, attr) if attr else found


REPORTS = {"mnist": "metavae.experiments.mnist", "norb": "metavae.experiments.norb"}


def get_report(name: str):
    """The ``report(runs, out)`` function that gathers finished runs of one benchmark."""
    if name not in REPORTS:
        raise ValueError(f"unknown report '{name}'; known: {', '.join(sorted(REPORTS))}")
    return importlib.import_module(REPORTS[name]).report


def list_experiments() -> list[tuple[str, str]]:
    return [(name, get_experiment(name).DESCRIPTION) for name in EXPERIMENTS]
