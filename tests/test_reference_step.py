"""benchmarks/reference_step.py: the authors' step pattern that `make bench` times as the baseline.
It must be the same model size as ours (else the speed-up would compare different work)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reference_step as R  # noqa: E402

from metavae import build_mlp_metavae  # noqa: E402


def test_reference_model_has_our_parameter_count_and_steps():
    ours = sum(p.numel() for p in build_mlp_metavae((784,), R.K).parameters())
    out = R.reference_step_time(steps=1, n_images=150, cache_len=None)
    assert out["parameters"] == ours == 6_176_976
    assert out["step_ms"] > 0 and 0 < out["data_ms"] < out["step_ms"]
    assert out["paper_epoch_s"] > 0


def test_reference_context_draw_is_per_query_without_replacement():
    import numpy as np

    cache = np.arange(30, dtype=np.float32).reshape(30, 1, 1, 1)
    sets = R.sample_contexts(cache, 7, 10)
    assert sets.shape == (7, 10, 1, 1, 1)
    for s in sets.reshape(7, 10):
        assert len(set(s.tolist())) == 10
