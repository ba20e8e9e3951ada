"""The paper's experiments: each module (or folder) holds its own configs, models it alone uses,
``run`` and report, and declares an `Experiment` record (`base.py`) listed below.

An entry is ``module:attribute`` naming that record. Modules are imported lazily so ``metavae
list`` stays quick and a broken experiment cannot stop the others from running.
"""
from __future__ import annotations

import importlib

from .base import Experiment

EXPERIMENTS = {
    "mog": "metavae.paper.mog:EXPERIMENT",
    "mnist-rotate": "metavae.paper.mnist:rotate",
    "mnist-scale": "metavae.paper.mnist:scale",
    "mnist-shear": "metavae.paper.mnist:shear",
    "mnist-generation": "metavae.paper.generation:EXPERIMENT",
    "mnist-gap": "metavae.paper.mnist_gap:EXPERIMENT",
    "norb-elevation": "metavae.paper.norb:elevation",
    "norb-azimuth": "metavae.paper.norb:azimuth",
    "norb-lighting": "metavae.paper.norb:lighting",
    "physics": "metavae.paper.physics:EXPERIMENT",
    "expfam-single": "metavae.paper.expfam:single",
    "expfam-many": "metavae.paper.expfam:many",
    "gap": "metavae.paper.gap:EXPERIMENT",
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
