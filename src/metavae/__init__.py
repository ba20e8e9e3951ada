"""metavae: meta-amortized variational inference (Wu, Choi, Goodman, Ermon; AAAI 2020).

One encoder q(z | D, x) for a whole family of distributions; one decoder per training
distribution; the MetaELBO as the objective.
"""
from .data.meta import Batch, MetaDataset
from .distributions import Bernoulli, CategoricalLatent, Gaussian, GaussianLatent
from .models import MetaVAE, build_mlp_metavae, build_model, build_vae, load, make_model, save_model
from .objectives import elbo, iw_log_likelihood, meta_elbo
from ._version import __version__
from .training import Trainer, TrainConfig, seed_everything

__all__ = [
    "Batch", "MetaDataset", "Bernoulli", "Gaussian", "GaussianLatent", "CategoricalLatent", "MetaVAE",
    "build_mlp_metavae", "build_vae", "build_model", "make_model", "load", "save_model", "elbo", "meta_elbo", "iw_log_likelihood",
    "Trainer", "TrainConfig", "seed_everything",
]
