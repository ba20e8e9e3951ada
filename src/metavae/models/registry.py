"""The one registry of model kinds: build by name (`make_model`), rebuild from a config
(`build_model`), and save / load a trained model as one file (`save_model`, `load`).

Every model carries ``config``: its kind and the builder's arguments, plain JSON values. Parts a
config cannot describe by value (a preprocessing module, say) are named by their import path
inside the ``metavae`` package (`part_name`), so loading never imports anything else.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..distributions import make_likelihood
from .compiled import build_compiled_inference
from .conv_metavae import build_conv_metavae, build_conv_vae
from .expfam import build_expfam_metavae
from .metavae import build_mlp_metavae, build_vae
from .ns import build_ns
from .vhe import build_vhe

# kind (as written in ``config["kind"]``) -> the builder that takes the rest of the config
KINDS = {
    "mlp_metavae": build_mlp_metavae,
    "conv_metavae": build_conv_metavae,
    "vhe": build_vhe,
    "ns": build_ns,
    "expfam_metavae": build_expfam_metavae,
    "compiled_inference": build_compiled_inference,
}
# Kinds written by earlier versions, read as today's: model files and checkpoints keep loading.
OLD_KINDS = {"homoencoder": "vhe", "statistician": "ns"}

# The comparison's names (the experiments' and `metavae train`'s ``--model``).
MODEL_NAMES = ("metavae", "ns", "vhe", "vhe-vampprior", "vae", "metavae-nocontext")
ARCHS = ("mlp", "conv")

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
    kind = cfg.pop("kind", None)
    kind = OLD_KINDS.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} in config; known: {', '.join(sorted(KINDS))}")
    if "likelihood" in cfg:
        cfg["likelihood"] = make_likelihood(cfg.pop("likelihood"), cfg.pop("likelihood_variance", None))
    return KINDS[kind](**cfg)


def complete_config(config: dict) -> dict:
    """``config`` with every builder argument it omits set to the builder's default: a config
    saved before an argument existed then compares equal to today's config of the same model."""
    import inspect

    config = dict(config or {})
    if config.get("kind") in OLD_KINDS:
        config["kind"] = OLD_KINDS[config["kind"]]
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


def load(path, device: str | torch.device = "cpu"):
    """A model saved by `save_model` (or a Trainer checkpoint: ``best.pt``, ``last.pt``), rebuilt
    from its config, weights loaded, in eval mode. The file is read with ``weights_only=True``."""
    from ..io import safe_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    ck = safe_load(path, "model file")
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a metavae model file or checkpoint")
    if ck.get("format") == FORMAT:
        if ck.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: model format version {ck.get('format_version')}; this metavae reads "
                             f"version {FORMAT_VERSION}")
        config, state = ck["config"], ck["state_dict"]
    elif "model" in ck and "model_config" in ck:
        config, state = ck["model_config"], ck["model"]
    else:
        raise ValueError(f"{path}: not a metavae model file or checkpoint")
    model = build_model(config)
    model.load_state_dict(state)
    model.extra = dict(ck.get("extra", {}))
    return model.to(device).eval()

