"""The one registry of model kinds. A kind registers itself once (`register`, one `Kind` record): the
name users type (``--model``, `make_model`), its builder for each architecture, the config kinds its
model files carry (with the names earlier versions wrote) and what it can do (``uses_context``,
``decoder_bank``, ...). Everything that asks "which models can ...?" reads these records, never a
list of names. The library's kinds are registered in `kinds.py`, the paper's in `metavae.paper.models`
(an entry point, loaded on first need by `load_extensions`).

This module imports no model, so a model may import it (`base.Saveable` saves through `files`, which
rebuilds through here) without an import circle.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

from ..distributions import make_likelihood


@dataclass(frozen=True)
class Kind:
    """One model kind. ``description``: "title: one line", the title naming it in messages.
    ``builders``: {arch: builder(event_shape, **kw)} (empty for a kind built only by
    its own experiment); ``files``: {config kind: builder(**config)}, how a saved model of the kind
    is rebuilt (kinds that share a builder, as the MetaVAE and the VAE, list the same one);
    ``old_files``: {config kind an earlier version wrote: today's}; ``renamed``: {config kind: {builder
    argument an earlier version wrote: today's name}}, so files saved before a rename keep loading.

    Capabilities (what callers check instead of names):
      * ``uses_context``: each query comes with a context set D that the model pools;
      * ``decoder_bank``: one decoder per training distribution (`make_model` passes K; ``adapt``,
        ``sample --dist``);
      * ``samples_unseen``: generates for the context set of an unseen distribution (shared decoder);
      * ``pooling``: takes ``pooling="attention"`` (it pools a set: the context, or the NS's batch);
      * ``merges_family``: sees one data set (no context, one decoder): training pools the family.
    What arguments a kind takes (``latent``, ``c_dim`` ...) is read from its builders (`takes`)."""

    name: str
    description: str
    builders: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    old_files: dict = field(default_factory=dict)
    renamed: dict = field(default_factory=dict)
    uses_context: bool = False
    decoder_bank: bool = False
    samples_unseen: bool = False
    pooling: bool = False
    merges_family: bool = False

    @property
    def title(self) -> str:
        return self.description.split(":")[0]

    @property
    def archs(self) -> tuple:
        return tuple(self.builders)

    def takes(self, argument: str, arch: str | None = None) -> bool:
        """True if the ``arch`` builder (default: every architecture's) takes ``argument`` (a keyword
        of its signature)."""
        builders = list(self.builders.values()) if arch is None else [self.builders[arch]] if arch in self.builders else []
        return bool(builders) and all(argument in builder_params(b) for b in builders)


_KINDS: dict[str, Kind] = {}  # name -> record, in registration order
# config kind (as written in ``config["kind"]``) -> the builder that takes the rest of the config
KINDS: dict[str, Callable] = {}
# config kinds written by earlier versions, read as today's: model files and checkpoints keep loading
OLD_KINDS: dict[str, str] = {}
RENAMED: dict[str, dict] = {}  # config kind -> {argument name an earlier version wrote: today's}

# The parts a config may name (`parts.build_part`), and the class each name builds: only these are
# ever built from a file. Packages add theirs with `register_part`.
ALLOWED_PARTS: dict = {}
PART_FIELDS = ("preprocess",)  # config fields that name a part of ALLOWED_PARTS (or hold None)


def register(kind: Kind) -> Kind:
    """Add ``kind``: its name, builders and config kinds become known to `make_model`, `load` and
    every capability check. A config kind two records list must have one builder."""
    if kind.name in _KINDS:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    for table, new in ((KINDS, kind.files), (OLD_KINDS, kind.old_files), (RENAMED, kind.renamed)):
        clash = [k for k, v in new.items() if table.get(k, v) != v]
        if clash:
            raise ValueError(f"model kind {kind.name!r}: config kind(s) {', '.join(clash)} already mean "
                             "another builder")
    _KINDS[kind.name] = kind
    KINDS.update(kind.files)
    OLD_KINDS.update(kind.old_files)
    RENAMED.update(kind.renamed)
    return kind


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


def model_kinds() -> tuple:
    """Every registered `Kind` that `make_model` builds (the ones with builders), in registration order."""
    return tuple(k for k in _KINDS.values() if k.builders)


def model_names() -> tuple:
    """The names `make_model` and ``metavae train --model`` take."""
    return tuple(k.name for k in model_kinds())


def archs() -> tuple:
    """Every architecture some kind is built in."""
    return tuple(dict.fromkeys(a for k in model_kinds() for a in k.archs))


def kind(name: str) -> Kind:
    """The record of model ``name``; an unknown name is one ValueError listing the known ones."""
    if name not in _KINDS or not _KINDS[name].builders:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(model_names())}")
    return _KINDS[name]


def known_kind(config_kind) -> str | None:
    """``config_kind`` as today's name if it is registered (loading extensions for an unknown one), else None."""
    config_kind = OLD_KINDS.get(config_kind, config_kind)
    if isinstance(config_kind, str) and config_kind not in KINDS:
        load_extensions()
        config_kind = OLD_KINDS.get(config_kind, config_kind)
    return config_kind if isinstance(config_kind, str) and config_kind in KINDS else None


def current_names(config: dict) -> dict:
    """``config`` with today's kind and argument names for the ones an earlier version wrote
    (`Kind.old_files`, `Kind.renamed`); a config of an unknown kind is returned as it is."""
    config = dict(config)
    config_kind = known_kind(config.get("kind"))
    if config_kind is None:
        return config
    config["kind"] = config_kind
    for old, new in RENAMED.get(config_kind, {}).items():
        if old in config and new not in config:
            config[new] = config.pop(old)
    return config


def builder_params(builder) -> dict:
    """{argument: default (or inspect.Parameter.empty)} of ``builder`` and of what it forwards its
    ``**kwargs`` to (a builder names that in ``forwards_to``, as `build_vhe` does)."""
    while isinstance(builder, functools.partial):
        builder = builder.func
    params = {}
    for fn in (getattr(builder, "forwards_to", None), builder):
        for name, p in (inspect.signature(fn).parameters.items() if fn is not None else ()):
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params[name] = p.default
    return params


def make_model(name: str, arch: str = "mlp", event_shape=None, n_distributions: int = 1, **kw):
    """A model of kind ``name`` (`model_names`), for points of ``event_shape`` (required: no image
    default). ``likelihood`` (an object or ``"gaussian"``/``"bernoulli"``) defaults to the paper's
    Bernoulli, which refuses values outside [0, 1]; pass ``likelihood="gaussian"`` for real-valued data.

    ``n_distributions`` is the number of training distributions K: a kind with a ``decoder_bank``
    (the MetaVAE, its ablation ``metavae-nocontext``) gets one decoder per distribution; the others
    share one decoder and ignore it. ``kw`` goes to the builder (e.g. ``z_dim``, ``hidden``,
    ``c_dim``, ``channels`` for conv, ``n_components`` for the VampPrior).
    """
    record = kind(name)
    if arch not in record.builders:
        known = archs()
        if arch in known:
            raise ValueError(f"{name} is built for the {' and '.join(record.archs)} architecture only")
        raise ValueError(f"unknown architecture '{arch}'; choose from {', '.join(known)}")
    if event_shape is None:
        raise ValueError("make_model needs event_shape: the shape of one point, e.g. (3,) or (1, 28, 28)")
    if isinstance(kw.get("likelihood"), str):
        kw["likelihood"] = make_likelihood(kw["likelihood"], None)  # a Gaussian's variance is learned
    if record.decoder_bank:
        if n_distributions < 1:
            raise ValueError(f"{name} needs n_distributions >= 1 (one decoder each), got {n_distributions}")
        kw["n_decoders"] = n_distributions
    return record.builders[arch](tuple(event_shape), **kw)


def build_model(config: dict):
    """Rebuild a model from ``model.config`` (as saved in checkpoints and model files)."""
    raw = (config or {}).get("kind")
    cfg = current_names(config or {})
    config_kind = known_kind(cfg.pop("kind", None))
    if config_kind is None:
        raise ValueError(f"unknown model kind {raw!r} in config; known: {', '.join(sorted(KINDS))}")
    if "likelihood" in cfg:
        cfg["likelihood"] = make_likelihood(cfg.pop("likelihood"), cfg.pop("likelihood_variance", None))
    return KINDS[config_kind](**cfg)


def complete_config(config: dict) -> dict:
    """``config`` with every builder argument it omits set to the builder's default: a config
    saved before an argument existed then compares equal to today's config of the same model."""
    config = current_names(config or {})
    config_kind = known_kind(config.get("kind"))
    if config_kind is None:
        return config
    for name, default in builder_params(KINDS[config_kind]).items():
        if name not in config and default is not inspect.Parameter.empty:
            config[name] = list(default) if isinstance(default, tuple) else default
    return config
