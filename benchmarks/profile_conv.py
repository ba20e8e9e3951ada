"""Profile one full-width convolutional MetaVAE training step (channels 64/128/256, 32x32, N=10; K=3 unless told).

    python benchmarks/profile_conv.py [--amp bf16] [--channels-last] [--batch 32] [--pool P] [--distributions K] [--rows 25]

One warm-up step, then one step under torch.profiler; prints the operators by self CPU time
(docs/performance.md quotes its output).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--amp", choices=("bf16",), default=None)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch", type=int, default=32, help="queries per distribution")
    ap.add_argument("--pool", type=int, default=None, help="context_pool (default: none, B*N context images)")
    ap.add_argument("--distributions", type=int, default=3, help="K, the training distributions")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    data = bench.make_data(args.distributions, (1, 32, 32), 2000, device)
    torch.manual_seed(0)
    step = bench.Stepper(bench.conv_model(args.distributions), data, args.batch, 10, device, args.pool, args.amp,
                         args.channels_last)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        seconds = time.perf_counter() - t
    print(f"one step: {seconds:.2f} s (amp={args.amp}, channels_last={args.channels_last}, B={args.batch}, "
          f"pool={args.pool}, K={args.distributions}, {torch.get_num_threads()} threads)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
    return 0


if __name__ == "__main__":
    sys.exit(main())
