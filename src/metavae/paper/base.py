"""`Experiment`: the one record of what `metavae run NAME` runs and `metavae report` gathers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Experiment:
    """``run(config, out, device, seed, progress, **options) -> metrics`` trains, evaluates and
    writes ``metrics.json`` and ``report.md`` into ``out``; ``presets`` maps a name to a config
    dataclass (the first is the default); ``options`` are the CLI flags it takes beyond the common
    ones (``model``, ``split``, ``data_dir``); ``default_out(**options)`` names its folder when
    ``--out`` is not given; ``report(runs, out)`` gathers the finished runs of its family (the
    experiments whose names start with ``FAMILY-``) into the paper's tables."""

    name: str
    description: str
    presets: dict
    run: Callable
    options: frozenset = frozenset()
    default_out: Callable | None = None
    report: Callable | None = None

    def __post_init__(self):
        object.__setattr__(self, "options", frozenset(self.options))
