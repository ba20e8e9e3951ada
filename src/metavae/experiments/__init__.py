"""The paper's experiments: each module (or folder) holds its own configs, models it alone uses,
``run`` and report, and declares an `Experiment` record (`base.py`) listed below.

An entry is ``module:attribute`` naming that record. Modules are imported lazily so ``metavae
list`` stays quick and a broken experiment cannot stop the others from running.
"""
from __future__ import annotations

import importlib

from .base import Experiment

EXPERIMENTS = {
    "mog": "metavae.experiments.mog:EXPERIMENT",
    "mnist-rotate": "metavae.experiments.mnist:rotate",
    "mnist-scale": "metavae.experiments.mnist:scale",
    "mnist-shear": "metavae.experiments.mnist:shear",
    "mnist-generation": "metavae.experiments.generation:EXPERIMENT",
    "mnist-gap": "metavae.experiments.mnist_gap:EXPERIMENT",
    "norb-elevation": "metavae.experiments.norb:elevation",
    "norb-azimuth": "metavae.experiments.norb:azimuth",
    "norb-lighting": "metavae.experiments.norb:lighting",
    "physics": "metavae.experiments.physics:EXPERIMENT",
    "expfam-single": "metavae.experiments.expfam:single",
    "expfam-many": "metavae.experiments.expfam:many",
    "gap": "metavae.experiments.gap:EXPERIMENT",
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))} (see `metavae list`)")
    module, _, attr = EXPERIMENTS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def report_families() -> list[str]:
    """The names ``metavae report`` takes: the families (``mnist`` of ``mnist-rotate``) with a report."""
    families = {}
    for name in EXPERIMENTS:
        family = name.split("-")[0]
        if family not in families:
            families[family] = get_experiment(name).report is not None
    return sorted(f for f, has in families.items() if has)


def get_report(family: str):
    """The ``report(runs, out)`` function that gathers the finished runs of one family."""
    first = next((n for n in EXPERIMENTS if n.split("-")[0] == family), None)
    report = None if first is None else get_experiment(first).report
    if report is None:
        raise ValueError(f"unknown report '{family}'; known: {', '.join(report_families())}")
    return report


def list_experiments() -> list[tuple[str, str]]:
    return [(name, get_experiment(name).description) for name in EXPERIMENTS]
