"""Settings: a preset (a config dataclass) with ``--set key=value`` overrides, each checked by name,
declared type and range before anything loads. One path for the experiments and `metavae train`."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing


def resolve_preset(presets: dict, name: str | None, overrides: dict | None = None):
    """The named preset (default: the first), with ``key=value`` overrides checked by name, type and
    range (`check_settings`) before anything is loaded."""
    name = name or next(iter(presets))
    if name not in presets:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(presets)}")
    cfg = presets[name]
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in renamed(type(cfg), overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown setting '{key}' for this experiment; settings: {', '.join(sorted(fields))}")
        cfg = dataclasses.replace(cfg, **{key: _coerce(value, hints[key], key)})
    check_settings(cfg)
    return cfg


def renamed(cls, values: dict) -> dict:
    """``values`` with a setting's earlier names (the class's ``ALIASES``, old name -> new) read as
    the new ones, so old ``--set`` keys and old metrics.json configs keep working."""
    aliases = getattr(cls, "ALIASES", {})
    return {aliases.get(k, k): v for k, v in values.items()}


def config_from_dict(cls, values: dict):
    """The config ``cls`` from a metrics.json ``config`` (lists back to tuples, earlier names renamed,
    keys the class no longer has dropped): how a report rebuilds its settings from results."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in renamed(cls, values).items() if k in fields})


def _parts(hint) -> tuple[type, bool]:
    """(the base type, whether None is allowed) of a field's annotation: ``int | None`` -> (int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = [a for a in args if a is not type(None)]
        return (typing.get_origin(base[0]) or base[0]), len(base) < len(args)
    return (typing.get_origin(hint) or hint), False


def _coerce(value, hint, key):
    """A ``--set`` string parsed as JSON and checked against the field's declared type: bool is not
    an int, ints are not floats unless the field is a float, ``null`` only where None is allowed."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
    base, optional = _parts(hint)
    if base is tuple and isinstance(value, str) and isinstance(parsed, (str, int)):
        try:  # "256,256" (or "8") as a list, as well as "[256,256]"
            parsed = json.loads(f"[{value}]")
        except json.JSONDecodeError:
            pass
    if parsed is None:
        if optional:
            return None
        raise ValueError(f"setting '{key}' cannot be null (it expects a {base.__name__})")
    if base is tuple and isinstance(parsed, list):
        parsed = tuple(parsed)
    if base is float and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    if base is str and not isinstance(value, str):
        parsed = value
    wrong = not isinstance(parsed, base) or (base in (int, float) and isinstance(parsed, bool))
    if wrong:
        article = "an" if base.__name__[0] in "aeiou" else "a"
        form = " (a list: 256,256 or [256,256])" if base is tuple else ""
        raise ValueError(f"setting '{key}' expects {article} {base.__name__}{' or null' if optional else ''}{form}, "
                         f"got {value!r}")
    return parsed


# Fields whose values may be zero (all other numbers must be positive) or an empty tuple.
MAY_BE_ZERO = {"ridge", "seed", "free_bits"}
MAY_BE_EMPTY = {"query", "test_context_sizes"}


def check_settings(cfg) -> None:
    """Every field of an experiment's config dataclass against its declared type and range: numbers
    positive (`MAY_BE_ZERO` non-negative), tuples of positive ints non-empty (`MAY_BE_EMPTY` aside),
    strings among the class's ``CHOICES`` where it declares them, and the class's own ``check()``."""
    hints = typing.get_type_hints(type(cfg))
    choices = getattr(type(cfg), "CHOICES", {})
    for f in dataclasses.fields(cfg):
        key, value = f.name, getattr(cfg, f.name)
        base, optional = _parts(hints[key])
        if value is None:
            if not optional:
                raise ValueError(f"setting '{key}' cannot be null")
            continue
        _coerce(value, hints[key], key)  # the type
        if base in (int, float):
            if not math.isfinite(value) or value < 0 or (value == 0 and key not in MAY_BE_ZERO):
                raise ValueError(f"setting '{key}' must be {'>= 0' if key in MAY_BE_ZERO else 'positive'}, got {value}")
        elif base is tuple:
            if not value and key not in MAY_BE_EMPTY:
                raise ValueError(f"setting '{key}' must not be empty")
            bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise ValueError(f"setting '{key}' must hold positive integers, got {list(value)}")
        elif base is str and key in choices and value not in choices[key]:
            allowed = ", ".join(choices[key]) + (" or null" if optional else "")
            raise ValueError(f"setting '{key}' must be one of {allowed}, got {value!r}")
    if hasattr(cfg, "check"):
        cfg.check()


def parse_overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as {key: value string}; dashes in keys read as underscores."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got '{pair}'")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out
