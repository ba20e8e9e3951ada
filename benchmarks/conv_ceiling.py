"""Where the conv MetaVAE step's time goes: its convolutions against everything else, per precision.

    python benchmarks/conv_ceiling.py [--batch 32] [--pool 64] [--distributions 3] [--steps 2] [--out FILE]

The issue's goal is the full-width conv step at 0.6 of the matmul peak. This splits one real
training step (`bench.Stepper`, the NORB `hour` preset's step by default: K=3, B=32, N=10, a
context pool of 64) into the time spent *inside* convolution kernels (forward and backward,
torch.profiler's self time of every ``*conv*`` operator) and the rest (ELU, GroupNorm, autocast's
casts, the fully connected layers, Adam), and counts the convolutions' FLOPs apart from the others
(FlopCounterMode's per-operator counts). So the fraction of peak the step could reach if every
non-convolution operator took no time is measured, not guessed: ``conv_fraction_of_peak`` is the
convolution kernels' own FLOP/s over the peak of the row's precision. The fp32 and bf16
``torch.mm`` peaks are measured just before and after, as in `bench.py`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

from metavae.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent


def _is_conv(name: str) -> bool:
    return "conv" in name.lower()


def split_step(step: bench.Stepper, repeats: int) -> dict:
    """Median over ``repeats`` profiled steps of (step seconds, seconds inside conv kernels); the
    step's FLOPs from one counted step, convolutions apart."""
    with FlopCounterMode(display=False) as fc:
        step()
    counts = fc.get_flop_counts().get("Global", {})
    conv_flops = sum(v for k, v in counts.items() if _is_conv(str(k)))
    total_flops = sum(counts.values())
    walls, convs = [], []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
        events = prof.key_averages()
        convs.append(sum(e.self_cpu_time_total for e in events if _is_conv(e.key)) / 1e6)
    step_s, conv_s = statistics.median(walls), statistics.median(convs)
    return {"step_s": round(step_s, 3), "conv_s": round(conv_s, 3), "conv_share_of_time": round(conv_s / step_s, 3),
            "gflop_per_step": round(total_flops / 1e9, 1), "conv_gflop": round(conv_flops / 1e9, 1),
            "conv_share_of_flops": round(conv_flops / total_flops, 3),
            "step_gflops": round(total_flops / step_s / 1e9, 1), "conv_gflops": round(conv_flops / conv_s / 1e9, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="queries per distribution")
    ap.add_argument("--pool", type=int, default=64, help="context_pool (0: none, B*N context images)")
    ap.add_argument("--distributions", type=int, default=3, help="K")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per precision (median)")
    ap.add_argument("--out", type=Path, default=HERE / "conv_ceiling.json")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    data = bench.make_data(args.distributions, (1, 32, 32), 2000, device)
    pool = args.pool or None
    steppers = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        steppers[amp or "fp32"] = bench.Stepper(bench.conv_model(args.distributions), data, args.batch, 10, device,
                                                pool, amp)
        steppers[amp or "fp32"]()  # warm-up
    before = bench.peaks(device)
    rows = {name: split_step(s, args.steps) for name, s in steppers.items()}
    after = bench.peaks(device)
    for name, r in rows.items():
        pk = (before[name] + after[name]) / 2 / 1e9
        r.update(peak_gflops=round(pk, 1), peak_gflops_before_after=[round(before[name] / 1e9, 1),
                                                                      round(after[name] / 1e9, 1)],
                 step_fraction_of_peak=round(r["step_gflops"] / pk, 3),
                 conv_fraction_of_peak=round(r["conv_gflops"] / pk, 3),
                 # the step with every non-convolution operator free: the most the step could reach
                 ceiling_fraction_of_peak=round(r["gflop_per_step"] / r["conv_s"] / pk, 3))
        print(f"{name}: step {r['step_s']:.2f} s at {r['step_fraction_of_peak']:.2f} of the {name} peak "
              f"({pk:.0f} GFLOP/s); convolutions {r['conv_share_of_time']:.0%} of the time and "
              f"{r['conv_share_of_flops']:.0%} of the FLOPs, their kernels at {r['conv_fraction_of_peak']:.2f} "
              f"of the peak; the rest free: {r['ceiling_fraction_of_peak']:.2f}", flush=True)
    out = {"config": {"K": args.distributions, "B": args.batch, "N": 10, "context_pool": pool,
                      "threads": torch.get_num_threads(), "profiled_steps": args.steps},
           "cpu": bench.cpu_bf16_support(), "rows": rows}
    atomic_write_text(json.dumps(out, indent=1) + "\n", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
