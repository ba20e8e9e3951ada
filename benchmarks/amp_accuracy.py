"""Accuracy of ``amp="bf16"`` against fp32 at the same seeds (docs/performance.md quotes its output).

    python benchmarks/amp_accuracy.py mog --seeds 0,1,2,3,4 [--out DIR]
    python benchmarks/amp_accuracy.py mnist --seeds 0,1 --data-dir ../shared/data/mnist [--out DIR]

``mog``: the demo (`metavae run mog`, quick preset), whose configs declare no ``amp``: the run uses
a subclass of its config that adds one, which `experiments.common.train_shared` passes to the
Trainer. ``mnist``: `metavae run mnist-rotate --preset quick --model metavae --split contiguous`,
with ``--set amp=bf16`` for the bf16 run (the run's label says which precision it trained in).
Each line printed is one run's JSON; fp32 and bf16 alternate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def mog(seed: int, amp, out: Path) -> dict:
    from metavae.paper import mog as M

    @dataclasses.dataclass(frozen=True)
    class MogAmp(M.MogConfig):
        amp: str | None = None

    t = time.time()
    m = M.run(MogAmp(amp=amp), out, seed=seed, progress=False)
    return {"seed": seed, "amp": amp or "fp32", "seconds": round(time.time() - t, 1), **m["error"],
            "bayes": m["bayes_floor"]}


def mnist(seed: int, amp, out: Path, data_dir: str) -> dict:
    from metavae.paper import mnist as M
    from metavae.settings import resolve_preset

    t = time.time()
    cfg = dataclasses.replace(resolve_preset(M.PRESETS, "quick"), amp=amp)  # InvarianceConfig.amp -> TrainConfig
    m = M.make_run("rotate")(cfg, out, seed=seed, progress=False, model="metavae", split="contiguous",
                             data_dir=data_dir)
    if (m["label"] == "metavae (amp bf16)") != (amp == "bf16"):
        raise SystemExit(f"the run's label {m['label']!r} does not match amp={amp}: the setting did not reach it")
    return {"seed": seed, "amp": amp or "fp32", "seconds": round(time.time() - t, 1),
            "train_seconds": m["train_seconds"], "best_val_loss": min(h["val_loss"] for h in m["history"]),
            "mean_unseen_accuracy": m["mean_unseen_accuracy"], "embedding_std": m["embedding_std"],
            "untrained": m["untrained"]["mean_unseen_accuracy"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", choices=("mog", "mnist"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/amp-accuracy"))
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="which to run (e.g. bf16 alone, when only the bf16 path changed)")
    args = ap.parse_args(argv)
    precisions = args.precisions.split(",")
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        ap.error(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for amp in [None if p == "fp32" else p for p in precisions]:
            out = args.out / args.experiment / (amp or "fp32") / f"seed{seed}"
            row = mog(seed, amp, out) if args.experiment == "mog" else mnist(seed, amp, out, args.data_dir)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
