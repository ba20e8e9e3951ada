"""Models, a factory for the paper's comparison, and rebuilding one from its ``config``.

``make_model(name, arch, event_shape, n_distributions, **kw)`` builds every model of the paper's
comparison by name -- ``metavae | ns | vhe | vhe-vampprior | vae`` -- in an ``mlp`` or ``conv``
architecture (the experiments' ``--model`` option). Every model has ``loss(batch)`` (a
`LossOutput`), ``embed(x, context)`` (posterior mean of z), ``uses_context`` and ``config``;
``build_model(model.config)`` rebuilds it (as saved in checkpoints).
"""
from ..distributions import make_likelihood
from .conv_metavae import build_conv_metavae, build_conv_vae
from .expfam import build_expfam_metavae
from .homoencoder import HierarchicalVAE, HomoEncoder, build_homoencoder
from .metavae import LossOutput, MetaVAE, build_mlp_metavae, build_vae
from .statistician import NeuralStatistician, build_statistician

BUILDERS = {
    "mlp_metavae": build_mlp_metavae,
    "conv_metavae": build_conv_metavae,
    "homoencoder": build_homoencoder,
    "statistician": build_statistician,
    "expfam_metavae": build_expfam_metavae,
}

MODEL_NAMES = ("metavae", "ns", "vhe", "vhe-vampprior", "vae")
ARCHS = ("mlp", "conv")


def make_model(name: str, arch: str = "mlp", event_shape=(28, 28), n_distributions: int = 1, **kw):
    """A model of the comparison by name.

    ``n_distributions`` is the number of training distributions K: the MetaVAE gets one decoder
    per distribution; the other models share one decoder and ignore it. ``kw`` goes to the builder
    (e.g. ``z_dim``, ``hidden``, ``c_dim``, ``channels`` for conv, ``n_components`` for the VampPrior).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; choose from {', '.join(MODEL_NAMES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHS)}")
    event_shape = tuple(event_shape)
    if name == "metavae":
        if n_distributions < 1:
            raise ValueError(f"the MetaVAE needs n_distributions >= 1, got {n_distributions}")
        build = build_mlp_metavae if arch == "mlp" else build_conv_metavae
        return build(event_shape, n_decoders=n_distributions, **kw)
    if name == "vae":
        return (build_vae if arch == "mlp" else build_conv_vae)(event_shape, **kw)
    if name == "ns":
        return build_statistician(event_shape, arch=arch, **kw)
    prior = "vampprior" if name == "vhe-vampprior" else "gaussian"
    return build_homoencoder(event_shape, arch=arch, prior=prior, **kw)


def build_model(config: dict):
    """Rebuild a model from ``model.config`` (as saved in checkpoints)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in BUILDERS:
        raise ValueError(f"unknown model kind '{kind}' in config; known: {sorted(BUILDERS)}")
    if "likelihood" in cfg:
        cfg["likelihood"] = make_likelihood(cfg.pop("likelihood"), cfg.pop("likelihood_variance", None))
    return BUILDERS[kind](**cfg)


__all__ = [
    "LossOutput", "MetaVAE", "HierarchicalVAE", "HomoEncoder", "NeuralStatistician", "build_mlp_metavae", "build_vae",
    "build_conv_metavae", "build_conv_vae", "build_homoencoder", "build_statistician", "build_model", "make_model",
    "BUILDERS", "MODEL_NAMES", "ARCHS",
]
