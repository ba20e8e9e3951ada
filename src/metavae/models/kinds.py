"""The library's model kinds, one `registry.Kind` record each: what `make_model`, ``metavae train
--model``, `load` and the own-data workflow know about them. A new kind adds its module and one
record here (or registers from its own package, as the paper does: `metavae.paper.models`)."""
from __future__ import annotations

from functools import partial

from .conv_metavae import build_conv_metavae, build_conv_vae
from .metavae import build_mlp_metavae, build_vae
from .ns import build_ns
from .registry import Kind, register
from .vhe import build_vhe

METAVAE_FILES = {"mlp_metavae": build_mlp_metavae, "conv_metavae": build_conv_metavae}
# the MetaVAE builders' layer widths were once `hidden`, `summary`, `decoder_hidden` (`hidden` is one width)
METAVAE_RENAMED = {"mlp_metavae": {"hidden": "hidden_widths", "summary": "summary_widths",
                                   "decoder_hidden": "decoder_widths"},
                   "conv_metavae": {"summary": "summary_widths"}}
HIERARCHICAL = dict(pooling=True, samples_unseen=True)  # a context latent c, one shared decoder

register(Kind("metavae", "the MetaVAE: q(z | D, x), one decoder per training distribution",
              builders={"mlp": build_mlp_metavae, "conv": build_conv_metavae}, files=METAVAE_FILES,
              renamed=METAVAE_RENAMED, uses_context=True, decoder_bank=True, pooling=True))
register(Kind("ns", "the Neural Statistician: a context latent c per set (the batch), one shared decoder",
              builders={a: partial(build_ns, arch=a) for a in ("mlp", "conv")}, files={"ns": build_ns},
              old_files={"statistician": "ns"}, **HIERARCHICAL))
register(Kind("vhe", "the VHE: the Variational Homoencoder, q(c | D) per query's context set, one shared decoder",
              builders={a: partial(build_vhe, arch=a) for a in ("mlp", "conv")}, files={"vhe": build_vhe},
              old_files={"homoencoder": "vhe"}, uses_context=True, **HIERARCHICAL))
register(Kind("vhe-vampprior", "the VHE + VampPrior: the VHE with a VampPrior on c",
              builders={a: partial(build_vhe, arch=a, prior="vampprior") for a in ("mlp", "conv")},
              files={"vhe": build_vhe}, old_files={"homoencoder": "vhe"}, uses_context=True, **HIERARCHICAL))
register(Kind("vae", "the VAE: q(z | x), one decoder for the whole family",
              builders={"mlp": build_vae, "conv": build_conv_vae}, files=METAVAE_FILES, merges_family=True))
register(Kind("metavae-nocontext", "metavae-nocontext: the ablation, the MetaVAE's decoders with q(z | x) (no context)",
              builders={"mlp": partial(build_mlp_metavae, use_context=False)}, files=METAVAE_FILES,
              decoder_bank=True))
