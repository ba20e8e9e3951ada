"""Models, and rebuilding one from the ``config`` stored in its checkpoint."""
from ..distributions import make_likelihood
from .metavae import LossOutput, MetaVAE, build_mlp_metavae, build_vae

BUILDERS = {"mlp_metavae": build_mlp_metavae}


def build_model(config: dict):
    """Rebuild a model from ``model.config`` (as saved in checkpoints)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in BUILDERS:
        raise ValueError(f"unknown model kind '{kind}' in config; known: {sorted(BUILDERS)}")
    if "likelihood" in cfg:
        cfg["likelihood"] = make_likelihood(cfg.pop("likelihood"), cfg.pop("likelihood_variance", None))
    return BUILDERS[kind](**cfg)


__all__ = ["LossOutput", "MetaVAE", "build_mlp_metavae", "build_vae", "build_model", "BUILDERS"]
