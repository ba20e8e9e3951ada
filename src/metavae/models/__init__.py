"""Models, the registry of model kinds, and one file format for trained models.

``make_model(name, arch, event_shape, n_distributions, **kw)`` builds every registered kind by name
(`model_names`: ``metavae | ns | vhe | vhe-vampprior | vae | metavae-nocontext``) in the
architectures it has (``mlp``, ``conv``). Every model has ``loss(batch)`` (a `LossOutput`),
``embed(x, context)`` (posterior mean of z), ``uses_context``, ``config`` and ``save(path)``;
``build_model(model.config)`` rebuilds it and ``load(path)`` reads a saved model (or a Trainer
checkpoint) back. Modules: `base` (shared parts), `metavae` / `conv_metavae` / `hierarchical` / `ns` /
`vhe` (the models), `decoder_bank` (adapting a new decoder), `registry` (the kinds), `kinds` (the
library's records), `files` (save / load).
"""
from . import kinds  # noqa: F401  (registers the library's kinds)
from .base import LossOutput
from .conv_metavae import build_conv_metavae, build_conv_vae
from .files import load, save_model
from .hierarchical import HierarchicalVAE
from .metavae import MetaVAE, build_mlp_metavae, build_vae
from .ns import NeuralStatistician, build_ns
from .registry import KINDS, Kind, archs, build_model, kind, make_model, model_kinds, model_names, register
from .vhe import VariationalHomoencoder, build_vhe

MODEL_NAMES = model_names()  # the library's kinds; with other packages' too: model_names()
ARCHS = archs()

__all__ = [
    "LossOutput", "MetaVAE", "HierarchicalVAE", "VariationalHomoencoder", "NeuralStatistician", "build_mlp_metavae",
    "build_vae", "build_conv_metavae", "build_conv_vae", "build_vhe", "build_ns", "build_model", "make_model",
    "load", "save_model", "KINDS", "MODEL_NAMES", "ARCHS", "Kind", "kind", "model_kinds", "model_names", "register",
]
