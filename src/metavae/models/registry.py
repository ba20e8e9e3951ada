"""The one registry of model kinds: build by name (`make_model`), rebuild from a config
(`build_model`), and save / load a trained model as one file (`save_model`, `load`).

Every model carries ``config``: its kind and the builder's arguments, plain JSON values. Parts a
config cannot describe by value (a preprocessing module, say) are named by an entry of
`ALLOWED_PARTS`, an explicit table: a model file names no code. `load` checks a file's config
(known keys, value types) and its tensors (names, shapes, finite values) against the model the
config rebuilds before building it, so a malformed or hostile file is one clear error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..distributions import make_likelihood
from .conv_metavae import build_conv_metavae, build_conv_vae
from .metavae import build_mlp_metavae, build_vae
from .ns import build_ns
from .vhe import build_vhe

# kind (as written in ``config["kind"]``) -> the builder that takes the rest of the config
KINDS = {
    "mlp_metavae": build_mlp_metavae,
    "conv_metavae": build_conv_metavae,
    "vhe": build_vhe,
    "ns": build_ns,
}
# Kinds written by earlier versions, read as today's: model files and checkpoints keep loading.
OLD_KINDS = {"homoencoder": "vhe", "statistician": "ns"}

# The comparison's names (the experiments' and `metavae train`'s ``--model``).
MODEL_NAMES = ("metavae", "ns", "vhe", "vhe-vampprior", "vae", "metavae-nocontext")
ARCHS = ("mlp", "conv")

# The parts a config may name (`parts.build_part`), and the class each name builds: only these are
# ever built from a file. Packages add theirs with `register_part`.
ALLOWED_PARTS: dict = {}


def register_kind(kind: str, builder) -> None:
    """Add a model kind that another package builds (the paper's expfam and compiled-inference
    models): ``builder(**config)`` rebuilds it from a saved config."""
    KINDS[kind] = builder


def register_part(name: str, cls: type, *old_names: str) -> None:
    """Allow part class ``cls`` in model configs under ``name`` (and ``old_names``, names earlier
    versions wrote): only registered classes are ever built from a file."""
    for n in (name, *old_names):
        ALLOWED_PARTS[n] = cls


def load_extensions() -> None:
    """Import every ``metavae.models`` entry point once: packages that register kinds and parts
    (the paper's reproduction is one) are loaded when a file names a kind not yet known."""
    from importlib.metadata import entry_points

    global _EXTENSIONS_LOADED
    if not _EXTENSIONS_LOADED:
        _EXTENSIONS_LOADED = True
        for ep in entry_points(group="metavae.models"):
            ep.load()


_EXTENSIONS_LOADED = False


def known_kind(kind) -> str | None:
    """``kind`` as today's name if it is registered (loading extensions for an unknown one), else None."""
    kind = OLD_KINDS.get(kind, kind)
    if isinstance(kind, str) and kind not in KINDS:
        load_extensions()
    return kind if isinstance(kind, str) and kind in KINDS else None

PART_FIELDS = ("preprocess",)  # config fields that name a part of ALLOWED_PARTS (or hold None)

FORMAT = "metavae-model"
FORMAT_VERSION = 1


def make_model(name: str, arch: str = "mlp", event_shape=None, n_distributions: int = 1, **kw):
    """A model of the comparison by name, for points of ``event_shape`` (required: no image default).
    ``likelihood`` (an object or ``"gaussian"``/``"bernoulli"``) defaults to the paper's Bernoulli,
    which refuses values outside [0, 1]; pass ``likelihood="gaussian"`` for real-valued data.

    ``n_distributions`` is the number of training distributions K: the MetaVAE (and its ablation
    ``metavae-nocontext``, the same K decoders with q(z | x)) gets one decoder per distribution;
    the other models share one decoder and ignore it. ``kw`` goes to the builder
    (e.g. ``z_dim``, ``hidden``, ``c_dim``, ``channels`` for conv, ``n_components`` for the VampPrior).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODEL_NAMES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHS)}")
    if event_shape is None:
        raise ValueError("make_model needs event_shape: the shape of one point, e.g. (3,) or (1, 28, 28)")
    event_shape = tuple(event_shape)
    if isinstance(kw.get("likelihood"), str):
        kw["likelihood"] = make_likelihood(kw["likelihood"], None)  # a Gaussian's variance is learned
    if name == "metavae":
        if n_distributions < 1:
            raise ValueError(f"the MetaVAE needs n_distributions >= 1, got {n_distributions}")
        build = build_mlp_metavae if arch == "mlp" else build_conv_metavae
        return build(event_shape, n_decoders=n_distributions, **kw)
    if name == "vae":
        return (build_vae if arch == "mlp" else build_conv_vae)(event_shape, **kw)
    if name == "metavae-nocontext":  # the ablation: K decoders, q(z | x) (no summary network)
        if arch != "mlp":
            raise ValueError("metavae-nocontext is built for the MLP architecture only")
        return build_mlp_metavae(event_shape, n_decoders=max(1, n_distributions), use_context=False, **kw)
    if name == "ns":
        return build_ns(event_shape, arch=arch, **kw)
    prior = "vampprior" if name == "vhe-vampprior" else "gaussian"
    return build_vhe(event_shape, arch=arch, prior=prior, **kw)


def build_model(config: dict):
    """Rebuild a model from ``model.config`` (as saved in checkpoints and model files)."""
    cfg = dict(config or {})
    raw = cfg.pop("kind", None)
    kind = known_kind(raw)
    if kind is None:
        kind = raw
        raise ValueError(f"unknown model kind {kind!r} in config; known: {', '.join(sorted(KINDS))}")
    if "likelihood" in cfg:
        cfg["likelihood"] = make_likelihood(cfg.pop("likelihood"), cfg.pop("likelihood_variance", None))
    return KINDS[kind](**cfg)


def complete_config(config: dict) -> dict:
    """``config`` with every builder argument it omits set to the builder's default: a config
    saved before an argument existed then compares equal to today's config of the same model."""
    import inspect

    config = dict(config or {})
    if known_kind(config.get("kind")) is not None:
        config["kind"] = known_kind(config["kind"])
    builder = KINDS.get(config.get("kind"))
    if builder is None:
        return config
    # a builder that passes **kwargs on (build_vhe, build_ns -> build_hierarchical) names where
    for fn in (builder, getattr(builder, "forwards_to", None)):
        for name, p in (inspect.signature(fn).parameters.items() if fn is not None else ()):
            if name not in config and p.default is not inspect.Parameter.empty and p.kind in (
                    p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                default = p.default
                config[name] = list(default) if isinstance(default, tuple) else default
    return config


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
    from .. import __version__
    from ..io import atomic_save

    config = _checked_config(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "metavae_version": __version__,
                        "config": config, "state_dict": state, "extra": dict(extra or {})}, Path(path))


def _builder_params(kind: str) -> dict:
    """{argument: default (or inspect.Parameter.empty)} of a kind's builder and what it forwards to."""
    import inspect

    params = {}
    builder = KINDS[kind]
    for fn in (getattr(builder, "forwards_to", None), builder):
        for name, p in (inspect.signature(fn).parameters.items() if fn is not None else ()):
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params[name] = p.default
    return params


_SCALARS = (bool, int, float, str, type(None))
_MAX_INT = 1 << 31  # no size, count or index of a model comes near; a bigger one is not a model's


def _value_error(key, value, default) -> str | None:
    """Why ``value`` cannot be config field ``key`` whose builder default is ``default`` (None: fine).
    Types follow the default: a saved config holds JSON values of the builder's own types."""
    import inspect

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
    params = _builder_params(kind)
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
    from ..io import safe_load

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
