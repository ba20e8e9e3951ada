"""Eager against torch.compile (inductor: fused GroupNorm+ELU and casts) on the full-width conv
MetaVAE step (channels 64/128/256, 32x32, K=3, N=10), bf16, one step of each in turn.

    OMP_NUM_THREADS=1 python benchmarks/conv_compile.py [--batch 32] [--pool 64] [--steps 3]

Prints the compile time and the median step of each (docs/performance.md §4 quotes its output).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from metavae.training.distributed import LossModule  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=64, help="context_pool (0: none, B*N context images)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    data = bench.make_data(3, (1, 32, 32), 2000, device)
    steppers = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = bench.conv_model(3)
        loss_fn = torch.compile(LossModule(model)) if compiled else None
        steppers["compiled" if compiled else "eager"] = bench.Stepper(model, data, args.batch, 10, device,
                                                                      args.pool or None, "bf16", loss_fn=loss_fn)
    for name, step in steppers.items():
        t = time.perf_counter()
        step()
        print(f"{name}: first step (compile included) {time.perf_counter() - t:.1f} s", flush=True)
        step()
    for _ in range(args.steps):
        for step in steppers.values():
            step.timed()
    for name, step in steppers.items():
        print(f"{name}: median step {statistics.median(step.times) * 1e3:.0f} ms over {args.steps} "
              f"(B={args.batch}, pool={args.pool}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
