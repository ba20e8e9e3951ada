"""Settings: a preset (a config dataclass) with ``--set key=value`` overrides, each checked by name,
declared type and range before anything loads. One path for the experiments and `metavae train`.

A setting is declared once, as a field with its type, range and help (`setting`); the Trainer's
are `TrainConfig`'s, nested in each experiment's config as a `group` that names the ones the
experiment exposes. ``--set batch_size=8`` (or ``train.batch_size=8``) reaches the nested field;
`flat` is the flat ``{key: value}`` view that metrics.json records and a resume compares."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing


def setting(default=dataclasses.MISSING, *, help: str = "", zero: bool = False, empty: bool = False,
            choices: tuple = ()):
    """A config field with its range and help, read by `check_settings` and ``--help``: numbers
    positive (``zero``: or 0), tuples of such integers non-empty (``empty``: may be empty), strings
    among ``choices`` (None too where the type allows it)."""
    return dataclasses.field(default=default, metadata={"help": help, "zero": zero, "empty": empty,
                                                        "choices": tuple(choices)})


def group(default, *settings: str, nonzero: tuple = ()):
    """A nested config (a `TrainConfig` holding the experiment's defaults) whose fields ``settings``
    are the experiment's own settings under their plain names; its other fields are fixed by the
    experiment. ``nonzero``: settings the experiment needs positive where the nested class allows 0."""
    return dataclasses.field(default=default, metadata={"group": tuple(settings), "nonzero": tuple(nonzero)})


def config(cls):
    """``dataclass(frozen=True)`` with the flat view of its groups: ``Cfg(batch_size=8)``,
    ``dataclasses.replace(cfg, batch_size=8)`` and ``cfg.batch_size`` reach ``cfg.train.batch_size``,
    so presets and readers name a setting as ``--set`` does."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    clash = [k for k, paths in _declarations(cls).items() if (k,) in paths and len(paths) > 1]
    if clash:
        raise TypeError(f"{cls.__name__}: {', '.join(clash)} both a field and a group's setting")
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        nested: dict = {}
        for key in [k for k in kw if k not in cls.__dataclass_fields__]:
            paths = _declarations(cls).get(key, [])
            if len(paths) > 1:
                raise TypeError(f"{cls.__name__}: '{key}' is ambiguous; name one of "
                                f"{', '.join('.'.join(p) for p in paths)}")
            if paths:
                nested.setdefault(paths[0][0], {})[key] = kw.pop(key)
        for name, values in nested.items():
            kw[name] = dataclasses.replace(kw.get(name, _default(cls.__dataclass_fields__[name])), **values)
        init(self, *args, **kw)

    def __getattr__(self, name):
        paths = _declarations(cls).get(name)
        if name.startswith("__") or not paths or len(paths) > 1 or len(paths[0]) != 2:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, paths[0][0]), name)

    cls.__init__, cls.__getattr__ = __init__, __getattr__
    return cls


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@functools.lru_cache(maxsize=None)
def _declarations(cls) -> dict:
    """{plain name: [path]} of every setting of a config class: ``("lr",)`` for its own field,
    ``("train", "lr")`` for a group's; a name with two paths is ambiguous."""
    out: dict = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            for name in f.metadata["group"]:
                out.setdefault(name, []).append((f.name, name))
        else:
            out.setdefault(f.name, []).append((f.name,))
    return out


def _path(cls, key: str) -> tuple:
    """The field a ``--set`` key names: a plain name that one setting has, or ``group.name``."""
    if "." in key:
        path = tuple(key.split("."))
        if path in [p for ps in _declarations(cls).values() for p in ps]:
            return path
    paths = _declarations(cls).get(key, [])
    if len(paths) == 1:
        return paths[0]
    if paths:
        raise ValueError(f"setting '{key}' is ambiguous; name one of {', '.join('.'.join(p) for p in paths)}")
    raise ValueError(f"unknown setting '{key}' for this experiment; settings: "
                     f"{', '.join(sorted(k for k, _ in _settings(cls)))}")


def _field(cls, path: tuple) -> tuple:
    """(declared type, field metadata) of the field at ``path``."""
    for name in path[:-1]:
        cls = _default(cls.__dataclass_fields__[name]).__class__
    return _hints(cls)[path[-1]], cls.__dataclass_fields__[path[-1]].metadata


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _settings(cls) -> tuple[tuple[str, tuple], ...]:
    """(key, path) of every setting in declaration order; the key is the plain name, or the dotted
    path where two groups expose that name."""
    names = _declarations(cls)
    out = []
    for f in dataclasses.fields(cls):
        for path in [(f.name, n) for n in f.metadata["group"]] if "group" in f.metadata else [(f.name,)]:
            out.append((path[-1] if len(names[path[-1]]) == 1 else ".".join(path), path))
    return tuple(out)


def flat(cfg) -> dict:
    """Every setting of ``cfg`` by its key (`_settings`), a group's exposed fields in place of the
    group: the form metrics.json records and a resume compares (`dataclasses.asdict` of a class
    without groups)."""
    return {key: copy.deepcopy(_value(cfg, path)) for key, path in _settings(type(cfg))}


def describe(cfg) -> list[tuple[str, object, str]]:
    """(key, value, declared help) of every setting of ``cfg``, for ``--help``."""
    return [(key, _value(cfg, path), _field(type(cfg), path)[1].get("help", "")) for key, path in _settings(type(cfg))]


def resolve_preset(presets: dict, name: str | None, overrides: dict | None = None):
    """The named preset (default: the first), with ``key=value`` overrides checked by name, type and
    range (`check_settings`) before anything is loaded."""
    name = name or next(iter(presets))
    if name not in presets:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(presets)}")
    cfg = presets[name]
    for key, value in renamed(type(cfg), overrides or {}).items():
        path = _path(type(cfg), key)
        value = _coerce(value, _field(type(cfg), path)[0], key)
        if len(path) == 1:
            cfg = dataclasses.replace(cfg, **{path[0]: value})
        else:
            cfg = dataclasses.replace(cfg, **{path[0]: dataclasses.replace(getattr(cfg, path[0]), **{path[1]: value})})
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
    known = {key for key, _ in _settings(cls)} | {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in renamed(cls, values).items() if k in known})


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


def check_settings(cfg) -> None:
    """Every setting of a config dataclass (a group's exposed ones by their plain names) against its
    declaration (`setting`): the type, numbers positive or >= 0, tuples of such integers non-empty
    unless declared ``empty``, strings among the declared ``choices``; then the class's own ``check()``."""
    for key, path in _settings(type(cfg)):
        hint, meta = _field(type(cfg), path)
        nonzero = len(path) == 2 and path[1] in type(cfg).__dataclass_fields__[path[0]].metadata["nonzero"]
        _check(key, _value(cfg, path), hint, meta, nonzero)
    if hasattr(cfg, "check"):
        cfg.check()


def _value(cfg, path: tuple):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _check(key: str, value, hint, meta, nonzero: bool = False) -> None:
    base, optional = _parts(hint)
    if value is None:
        if not optional:
            raise ValueError(f"setting '{key}' cannot be null")
        return
    _coerce(value, hint, key)  # the type
    zero = meta.get("zero", False) and not nonzero
    if base in (int, float):
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise ValueError(f"setting '{key}' must be {'>= 0' if zero else 'positive'}, got {value}")
    elif base is tuple:
        if not value and not meta.get("empty", False):
            raise ValueError(f"setting '{key}' must not be empty")
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1)]
        if bad:
            raise ValueError(f"setting '{key}' must hold {'integers >= 0' if zero else 'positive integers'}, "
                             f"got {list(value)}")
    elif base is str and meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"]) + (" or null" if optional else "")
        raise ValueError(f"setting '{key}' must be one of {allowed}, got {value!r}")


def parse_overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as {key: value string}; dashes in keys read as underscores."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got '{pair}'")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out
