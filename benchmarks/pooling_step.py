"""Training-step time of the MLP MetaVAE with mean against attention pooling, with and without a
context pool, timed interleaved in one process (README "Attention against mean pooling").

    OMP_NUM_THREADS=1 python benchmarks/pooling_step.py [--steps 6] [--out benchmarks/pooling_step.json]

K=10 rotated-MNIST-sized distributions, B=100 queries each, N=10 context images per query; the pool
is P=50 images per distribution (`PooledContext`, as `context_pool=50` draws). Random binary images:
the cost does not depend on the pixels. Medians over the timed steps (the first is a warm-up).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metavae.data.meta import PooledContext
from metavae.models import make_model
from metavae.objectives import meta_elbo
from metavae.training import make_optimizer

K, B, N, P = 10, 100, 10, 50


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("pooling_step.json"))
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(K, B, 28, 28, generator=g).round()
    sets = torch.rand(K, B, N, 28, 28, generator=g).round()
    pool = torch.rand(K, P, 28, 28, generator=g).round()
    index = torch.stack([torch.stack([torch.randperm(P, generator=g)[:N] for _ in range(B)]) for _ in range(K)])
    contexts = {"no pool": sets, f"pool {P}": PooledContext(pool, index)}
    runs = {}
    for pooling in ("mean", "attention"):
        torch.manual_seed(0)
        model = make_model("metavae", "mlp", (28, 28), n_distributions=K, z_dim=40, pooling=pooling)
        runs[pooling] = (model, make_optimizer(model.parameters(), 2e-4))
    times = {(p, c): [] for p in runs for c in contexts}
    for _ in range(args.steps + 1):  # one step of each configuration in turn: drift hits all alike
        for (pooling, name), ts in times.items():
            model, opt = runs[pooling]
            t = time.perf_counter()
            loss = -meta_elbo(model, x, contexts[name])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t)
    rows = {f"{p}, {c}": round(statistics.median(ts[1:]) * 1e3, 1) for (p, c), ts in times.items()}
    ratios = {c: round(rows[f"attention, {c}"] / rows[f"mean, {c}"], 2) for c in contexts}
    result = {"K": K, "B": B, "N": N, "P": P, "threads": torch.get_num_threads(), "steps": args.steps,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "step_ms": rows, "attention_over_mean": ratios}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, ms in rows.items():
        print(f"{name:22s} {ms:8.1f} ms/step")
    print(f"attention / mean: {ratios}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
