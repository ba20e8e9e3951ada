"""The paper preset's MLP epoch (K=9, B=100, N=10; 600 steps) before and after a change, in raw seconds.

    python benchmarks/epoch_before_after.py --before OLD_SRC [--steps 150] [--block 25]

``OLD_SRC`` is a folder holding an older copy of the ``metavae`` package (e.g. ``git worktree add
/tmp/old <commit>`` then ``/tmp/old/src``). It is imported as a second package beside today's, and
three configurations are timed in one process, interleaved in blocks of ``block`` steps: the old
code in fp32, today's fp32 and today's bf16 (``amp="bf16"``'s policy). Prints the raw seconds of
``steps`` steps and their scaling to a 600-step epoch (docs/performance.md §5).
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

K, B, N = 9, 100, 10
EPOCH_STEPS = 600


def _import_copy(src: Path, name: str):
    """The package ``src/metavae`` imported as ``name`` (its imports are relative)."""
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(src / "metavae", tmp / name)
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def _stepper(pkg, amp: bool):
    g = torch.Generator().manual_seed(0)
    dists = [torch.randint(0, 256, (6000, 784), generator=g, dtype=torch.uint8) for _ in range(K)]
    data = pkg.MetaDataset(dists, val_fraction=0, test_fraction=0)
    torch.manual_seed(0)
    model = pkg.build_mlp_metavae((784,), K)
    opt = importlib.import_module(f"{pkg.__name__}.training").make_optimizer(model.parameters(), 2e-4)
    gen = torch.Generator().manual_seed(0)
    if amp:
        from metavae.training.precision import bf16_autocast

    def step():
        batch = data.sample(B, N, generator=gen)
        if amp:
            with bf16_autocast(model, "cpu"):
                loss = model.loss(batch)["loss"]
        else:
            loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="folder holding the old metavae package")
    ap.add_argument("--steps", type=int, default=EPOCH_STEPS)
    ap.add_argument("--block", type=int, default=25)
    args = ap.parse_args(argv)
    import metavae

    old = _import_copy(args.before, "metavae_before")
    runs = {"before_fp32": _stepper(old, False), "after_fp32": _stepper(metavae, False),
            "after_bf16": _stepper(metavae, True)}
    for s in runs.values():
        s()
    secs = {k: 0.0 for k in runs}
    blocks = {k: [] for k in runs}
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for k, s in runs.items():
            t = time.perf_counter()
            for _ in range(n):
                s()
            blocks[k].append(round(time.perf_counter() - t, 2))
            secs[k] += blocks[k][-1]
        done += n
        print(done, {k: round(v, 1) for k, v in secs.items()}, flush=True)
    print(json.dumps({"steps": args.steps, "threads": torch.get_num_threads(),
                      "seconds": {k: round(v, 1) for k, v in secs.items()},
                      "epoch_600_s": {k: round(v * EPOCH_STEPS / args.steps, 1) for k, v in secs.items()},
                      "blocks": blocks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
