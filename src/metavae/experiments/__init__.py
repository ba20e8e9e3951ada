"""The paper's experiments, each a module with presets, ``run`` and a report.

An experiment module defines ``DESCRIPTION`` (one line), ``PRESETS`` (name -> config
dataclass; the first is the default), ``OPTIONS`` (the CLI options it accepts beyond the
common ones) and ``run(config, out, device, seed, progress, **options) -> metrics``.
Modules are imported lazily so ``metavae list`` stays instant.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = {
    "mog": "metavae.experiments.mog",
}


def get_experiment(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))} (see `metavae list`)")
    return importlib.import_module(EXPERIMENTS[name])


def list_experiments() -> list[tuple[str, str]]:
    return [(name, get_experiment(name).DESCRIPTION) for name in EXPERIMENTS]
