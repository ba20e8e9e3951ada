"""Evaluation helpers that only call ``model.embed``: the representation is the product."""
from __future__ import annotations

import torch

from .data.meta import Part, as_float


@torch.no_grad()
def embed_part(model, part: Part, context_size: int, generator: torch.Generator | None = None,
               chunk: int = 256, exclude_query: bool = False) -> torch.Tensor:
    """Embeddings (K, max_n, dz) of every point of every distribution of a part, each with its own
    context set drawn from the same distribution and part. Slots past the end of a shorter
    distribution repeat its last point; use ``part.lengths`` to ignore them."""
    model.eval()
    K, n_max = part.data.shape[:2]
    uses_context = getattr(model, "uses_context", True)
    device = part.data.device
    outs = []
    for start in range(0, n_max, chunk):
        pos = torch.arange(start, min(start + chunk, n_max), device=device).unsqueeze(0).expand(K, -1)
        idx = torch.minimum(pos, (part.lengths - 1).unsqueeze(1))
        x = as_float(part.gather(idx))
        ctx = None
        if uses_context:
            ctx = as_float(part.gather(part.sample_context(idx, context_size, generator, exclude_query)))
        outs.append(model.embed(x, ctx))
    return torch.cat(outs, dim=1)
