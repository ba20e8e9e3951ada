"""Models, the registry of model kinds, and one file format for trained models.

``make_model(name, arch, event_shape, n_distributions, **kw)`` builds every model of the paper's
comparison by name -- ``metavae | ns | vhe | vhe-vampprior | vae`` -- in an ``mlp`` or ``conv``
architecture. Every model has ``loss(batch)`` (a `LossOutput`), ``embed(x, context)`` (posterior
mean of z), ``uses_context``, ``config`` and ``save(path)``; ``build_model(model.config)``
rebuilds it and ``load(path)`` reads a saved model (or a Trainer checkpoint) back.
"""
from .conv_metavae import build_conv_metavae, build_conv_vae
from .hierarchical import HierarchicalVAE
from .metavae import LossOutput, MetaVAE, build_mlp_metavae, build_vae
from .registry import ARCHS, KINDS, MODEL_NAMES, build_model, load, make_model, save_model
from .ns import NeuralStatistician, build_ns
from .vhe import VariationalHomoencoder, build_vhe

__all__ = [
    "LossOutput", "MetaVAE", "HierarchicalVAE", "VariationalHomoencoder", "NeuralStatistician", "build_mlp_metavae", "build_vae",
    "build_conv_metavae", "build_conv_vae", "build_vhe", "build_ns", "build_model", "make_model",
    "load", "save_model", "KINDS", "MODEL_NAMES", "ARCHS",
]
