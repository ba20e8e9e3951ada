"""The bf16 MLP MetaVAE step with its decoder bank's float32 last layer differentiated in float32
(the policy before) and with its two gradient products in bf16 (`nets.mlp._Fp32OutBaddbmm`, now),
timed in interleaved blocks of 5 steps in one process (docs/performance.md §5 quotes its output).

    OMP_NUM_THREADS=2 python benchmarks/output_layer_backward.py [--blocks 12] [--pool 50]

K=9, B=100, N=10 and the long preset's context pool of 50, as the epoch section of `bench.py`.
Both steppers start from the same weights and batches; the forward is the same float32 product.
Writes `benchmarks/output_layer_backward.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from metavae import build_mlp_metavae  # noqa: E402
from metavae.nets import mlp  # noqa: E402


def float32_backward(layer, h, low, dist=None):
    """The policy before: the whole last layer, forward and backward, in float32."""
    return layer(h.float(), dist)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12, help="timed blocks of 5 steps per variant (after one warm-up)")
    ap.add_argument("--pool", type=int, default=50)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    data = bench.make_data(9, (784,), 6000, device)
    variants = {"float32 backward": float32_backward, "bf16 backward": mlp.BatchedLinear.fp32_out}
    steppers = {}
    for name in variants:
        torch.manual_seed(0)
        steppers[name] = bench.Stepper(build_mlp_metavae((784,), 9).to(device), data, 100, 10, device, args.pool, "bf16")
    seconds = {name: 0.0 for name in variants}
    try:
        for block in range(args.blocks + 1):
            for name, step in steppers.items():
                mlp.BatchedLinear.fp32_out = variants[name]
                t = time.perf_counter()
                for _ in range(5):
                    step()
                if block:  # block 0 warms up
                    seconds[name] += time.perf_counter() - t
    finally:
        mlp.BatchedLinear.fp32_out = variants["bf16 backward"]
    steps = 5 * args.blocks
    out = {"K": 9, "B": 100, "N": 10, "context_pool": args.pool, "threads": torch.get_num_threads(),
           "steps_each": steps, "peaks_gflops_after": {k: round(v / 1e9, 1) for k, v in bench.peaks(device).items()},
           "step_ms": {name: round(s / steps * 1e3, 1) for name, s in seconds.items()}}
    out["speedup"] = round(out["step_ms"]["float32 backward"] / out["step_ms"]["bf16 backward"], 3)
    print(json.dumps(out, indent=1))
    Path(__file__).with_name("output_layer_backward.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
