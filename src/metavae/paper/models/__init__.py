"""Models only the paper's experiments use: the exponential-family MetaVAE and the compiled inference
network of the physics experiment. Both register their kinds with `metavae.models.registry`."""

from ...models.registry import register_kind, register_part
from .compiled import build_compiled_inference
from .expfam_metavae import build_expfam_metavae
from .standardize import FixedStandardize, StandardizeOnContext

register_kind("expfam_metavae", build_expfam_metavae)
register_kind("compiled_inference", build_compiled_inference)
# names earlier versions wrote into model files (the module's old homes) keep loading
register_part("metavae.paper.models.standardize:StandardizeOnContext", StandardizeOnContext,
              "metavae.experiments.physics:StandardizeOnContext")
register_part("metavae.paper.models.standardize:FixedStandardize", FixedStandardize,
              "metavae.experiments.physics:FixedStandardize")
