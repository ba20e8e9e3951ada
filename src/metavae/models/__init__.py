"""Models, the registry of model kinds, and one file format for trained models.

``make_model(name, arch, event_shape, n_distributions, **kw)`` builds every model of the paper's
comparison by name -- ``metavae | ns | vhe | vhe-vampprior | vae`` -- in an ``mlp`` or ``conv``
architecture. Every model has ``loss(batch)`` (a `LossOutput`), ``embed(x, context)`` (posterior
mean of z), ``uses_context``, ``config`` and ``save(path)``; ``build_model(model.config)``
rebuilds it and ``load(path)`` reads a saved model (or a Trainer checkpoint) back.
"""
from .conv_metavae import build_conv_metavae, build_conv_vae
from .homoencoder import HierarchicalVAE, HomoEncoder, build_homoencoder
from .metavae import LossOutput, MetaVAE, build_mlp_metavae, build_vae
from .registry import ARCHS, KINDS, MODEL_NAMES, build_model, load, make_model, save_model
from .statistician import NeuralStatistician, build_statistician

__all__ = [
    "LossOutput", "MetaVAE", "HierarchicalVAE", "HomoEncoder", "NeuralStatistician", "build_mlp_metavae", "build_vae",
    "build_conv_metavae", "build_conv_vae", "build_homoencoder", "build_statistician", "build_model", "make_model",
    "load", "save_model", "KINDS", "MODEL_NAMES", "ARCHS",
]
