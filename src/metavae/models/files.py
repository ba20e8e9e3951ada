"""One file format for trained models: `save_model` writes weights, the config that rebuilds them and
versions; `load` reads a model file (or a Trainer checkpoint) back.

A model file names no code: parts a config cannot describe by value are names in the registry's
table of allowed parts. `load` checks a file's config (known keys, value types) and its tensors
(names, shapes, finite values) against the model the config rebuilds before building it, so a
malformed or hostile file is one clear error.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .._version import __version__
from ..io import atomic_save, safe_load
from .registry import ALLOWED_PARTS, KINDS, PART_FIELDS, build_model, builder_params, current_names, known_kind

FORMAT = "metavae-model"
FORMAT_VERSION = 1

def _checked_config(model) -> dict:
    """The model's config, after checking that it rebuilds a model with the same tensors: a part
    the config does not describe is found at save time, not when someone tries to load."""
    config = dict(getattr(model, "config", None) or {})
    if not config:
        raise ValueError(f"cannot save this {type(model).__name__}: it was assembled by hand, so no config "
                         "describes how to rebuild it; build it with one of the builders (e.g. build_mlp_metavae)")
    rebuilt = build_model(config)
    mine, theirs = model.state_dict(), rebuilt.state_dict()
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    shapes = sorted(k for k in set(mine) & set(theirs) if mine[k].shape != theirs[k].shape)
    if missing or extra or shapes:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}" for what, keys in
                           (("not in its config", missing), ("only in its config", extra), ("other shapes", shapes))
                           if keys)
        raise ValueError(f"cannot save this {type(model).__name__}: its config does not rebuild it ({detail}); "
                         "a part was replaced after building")
    return config


def save_model(model, path, extra: dict | None = None) -> Path:
    """One file: weights, the config that rebuilds the model, the package and format versions, and
    ``extra`` (plain values). Loads with ``torch.load(path, weights_only=True)``."""
    config = _checked_config(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "metavae_version": __version__,
                        "config": config, "state_dict": state, "extra": dict(extra or {})}, Path(path))


_SCALARS = (bool, int, float, str, type(None))
_MAX_INT = 1 << 31  # no size, count or index of a model comes near; a bigger one is not a model's


def _value_error(key, value, default) -> str | None:
    """Why ``value`` cannot be config field ``key`` whose builder default is ``default`` (None: fine).
    Types follow the default: a saved config holds JSON values of the builder's own types."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if any(not isinstance(v, _SCALARS) for v in items):
        return "not a plain value or list of plain values"
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > _MAX_INT for v in items):
        return "an integer out of range"
    if key == "event_shape":
        ok = isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        return None if ok else "not a list of positive integers"
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "not true/false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "not an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "not a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "not a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) or value is None else "not a list"
    return None


def check_config(config, source) -> dict:
    """``config`` if it is one a builder wrote: a mapping with a known kind, only the builder's own
    keys, each of its type. Anything else is one ValueError naming ``source`` and the field."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model config is a {type(config).__name__}, not a mapping")
    kind = known_kind(config.get("kind"))
    if kind is None:
        raise ValueError(f"{source}: unknown model kind {config.get('kind')!r}; known: {', '.join(sorted(KINDS))}")
    config = current_names(config)  # arguments renamed since the file was written
    params = builder_params(KINDS[kind])
    extra_keys = {"kind", "likelihood_variance"} if "likelihood" in params else {"kind"}
    unknown = sorted(str(k) for k in config if k not in params and k not in extra_keys)
    if unknown:
        raise ValueError(f"{source}: the model config has unknown field(s) {', '.join(unknown[:5])} for kind {kind}")
    for key, value in config.items():
        if key == "kind":
            continue
        why = _value_error(key, value, params.get(key))
        if why is None and key == "likelihood" and value is not None and value not in ("gaussian", "bernoulli"):
            why = "not 'gaussian' or 'bernoulli'"
        if key in PART_FIELDS and value is not None and (not isinstance(value, str) or value not in ALLOWED_PARTS):
            why = "not an allowed part (model files name no code; allowed: " + ", ".join(sorted(ALLOWED_PARTS)) + ")"
        if why is not None:
            raise ValueError(f"{source}: model config field {key!r} = {str(value)[:60]!r} is {why}")
    return dict(config)


def check_state(state, source) -> dict:
    """``state`` if it is a state dict: tensor values under string names, every float finite."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source}: holds no weights (the state dict is {'empty' if isinstance(state, dict) else type(state).__name__})")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: weight {str(k)[:60]!r} is not a named tensor")
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{source}: weight {k!r} holds {bad} non-finite value(s) (NaN or inf); "
                             "the model cannot be used")
    return state


def _rebuild(config: dict, state: dict, source):
    """The model ``config`` builds, after checking on the meta device (no memory) that it has
    exactly ``state``'s tensor names and shapes: a file whose config and weights disagree, or
    whose sizes were edited, is refused before anything real is allocated."""
    def build():
        try:
            return build_model(config)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, AssertionError,
                ZeroDivisionError) as e:
            raise ValueError(f"{source}: the model config does not build a model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None

    with torch.device("meta"):
        skeleton = build()
    theirs = skeleton.state_dict()
    missing, extra = sorted(set(theirs) - set(state)), sorted(set(state) - set(theirs))
    shapes = sorted(k for k in set(state) & set(theirs) if tuple(state[k].shape) != tuple(theirs[k].shape))
    if missing or extra or shapes:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
                           for what, keys in (("missing", missing), ("unexpected", extra),
                                              ("other shapes", shapes)) if keys)
        raise ValueError(f"{source}: its weights do not fit the model its config describes ({detail})")
    model = build()
    model.load_state_dict(state)
    return model


def check_extra(extra, source) -> dict:
    """``extra`` (the values saved beside the weights) if plain: a mapping, distribution names a list of strings."""
    if not isinstance(extra, dict):
        raise ValueError(f"{source}: the saved 'extra' values are a {type(extra).__name__}, not a mapping")
    names = extra.get("distributions")
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{source}: the saved distribution names are {str(names)[:60]!r}, not a list of names")
    return dict(extra)


def load(path, device: str | torch.device = "cpu"):
    """A model saved by `save_model` (or a Trainer checkpoint: ``best.pt``, ``last.pt``), rebuilt
    from its config, weights loaded, in eval mode. The file is read with ``weights_only=True`` and
    checked (`check_config`, `check_state`, `_rebuild`) before a real model is built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    ck = safe_load(path, "model file", hint=None)
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a metavae model file or checkpoint")
    if ck.get("format") == FORMAT:
        if ck.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: model format version {ck.get('format_version')}; this metavae reads "
                             f"version {FORMAT_VERSION}")
        config, state = ck.get("config"), ck.get("state_dict")
    elif "model" in ck and "model_config" in ck:
        config, state = ck["model_config"], ck["model"]
    else:
        raise ValueError(f"{path}: not a metavae model file or checkpoint")
    config, state = check_config(config, path), check_state(state, path)
    extra = check_extra(ck.get("extra", {}), path)
    model = _rebuild(config, state, path)
    model.extra = extra
    return model.to(device).eval()
