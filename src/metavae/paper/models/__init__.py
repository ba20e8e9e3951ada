"""Models only the paper's experiments use: the exponential-family MetaVAE and the compiled inference
network of the physics experiment. Both register their kinds with `metavae.models.registry` (built by
their experiments, not by `make_model`: no builders, only the config kinds their files carry)."""

from ...models.registry import Kind, register, register_part
from .compiled import build_compiled_inference
from .expfam_metavae import build_expfam_metavae
from .standardize import FixedStandardize, StandardizeOnContext

register(Kind("expfam_metavae", "the exponential-family MetaVAE (the expfam experiment)",
              files={"expfam_metavae": build_expfam_metavae},
              renamed={"expfam_metavae": {"hidden": "hidden_widths"}}))
register(Kind("compiled_inference", "the compiled inference network (the physics experiment)",
              files={"compiled_inference": build_compiled_inference},
              renamed={"compiled_inference": {"hidden": "hidden_widths", "summary": "summary_widths"}}))
# names earlier versions wrote into model files (the module's old homes) keep loading
register_part("metavae.paper.models.standardize:StandardizeOnContext", StandardizeOnContext,
              "metavae.experiments.physics:StandardizeOnContext")
register_part("metavae.paper.models.standardize:FixedStandardize", FixedStandardize,
              "metavae.experiments.physics:FixedStandardize")
