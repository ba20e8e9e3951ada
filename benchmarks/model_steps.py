"""Every model's training step at the transformed-MNIST long preset against the MetaVAE's, timed
interleaved in one process (docs/regimes.md, "Step cost"), with each step's FLOPs (so a ratio of
times can be read as architecture, FLOPs, or implementation, GFLOP/s) and a profile of the slowest.

    OMP_NUM_THREADS=1 python benchmarks/model_steps.py [--steps 6] [--out results/mnist/model_steps.json]

(`metavae report mnist --runs results/mnist` puts the table in regimes.md.)

K=10 distributions of 28x28 binary images, B=100 queries each, N=10 context images per query drawn
from a pool of P=50 per distribution (`context_pool=50`, what the long preset trains with); the
models' default (paper) sizes. One step of each model in turn, so that drift on a shared machine
hits all alike; medians over the timed steps (the first is a warm-up). The NS takes no context:
its set is the batch of B queries itself (`NeuralStatistician`), so the pool does not apply to it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench import Stepper, make_data
from metavae.io import atomic_write_text
from metavae.models import make_model

K, B, N, P = 10, 100, 10, 50
MODELS = ("metavae", "metavae-nocontext", "vae", "vhe", "vhe-vampprior", "ns")


def profile(stepper, rows: int = 8) -> list:
    """The ``rows`` torch ops that take the most self CPU time in one step: where the step goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        stepper()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in events]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "results" / "mnist" / "model_steps.json")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    steppers = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = make_model(name, "mlp", (28, 28), n_distributions=K, z_dim=40)
        data = make_data(K, (28, 28), 400, device)
        pool = P if getattr(model, "uses_context", False) else None
        steppers[name] = Stepper(model, data, B, N, device, pool=pool)
    for _ in range(args.steps + 1):
        for s in steppers.values():
            s.timed()
    ms = {name: round(statistics.median(s.times[1:]) * 1e3, 1) for name, s in steppers.items()}
    gflop = {name: round(s.flops() / 1e9, 1) for name, s in steppers.items()}
    base = ms.get("metavae")
    result = {"K": K, "B": B, "N": N, "P": P, "threads": torch.get_num_threads(), "steps": args.steps,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "step_ms": ms,
              "over_metavae": {n: round(v / base, 2) for n, v in ms.items()} if base else None,
              "gflop_per_step": gflop, "flop_over_metavae": {n: round(v / gflop["metavae"], 2) for n, v in gflop.items()}
              if "metavae" in gflop else None, "gflop_per_s": {n: round(gflop[n] / ms[n] * 1e3, 1) for n in ms},
              "profile": {n: profile(steppers[n]) for n in ("metavae", "vhe", "ns") if n in steppers}}
    atomic_write_text(json.dumps(result, indent=2) + "\n", args.out)
    for name, v in ms.items():
        ratio = f"{v / base:5.2f}x the MetaVAE's time" if base else ""
        print(f"{name:18s} {v:8.1f} ms/step  {ratio}  {gflop[name]:6.1f} GFLOP  {gflop[name] / v * 1e3:5.1f} GFLOP/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
