"""The first training steps of the full-width conv MetaVAE (channels 64/128/256, hidden 400, K=3,
B=32, context pool 64, free bits 0.5) on synthnorb, under one init, learning rate and precision:
the losses it prints show whether training diverges (why the NORB `hour` preset uses the
reference's init; docs/performance.md §4).

    OMP_NUM_THREADS=1 python benchmarks/conv_init_steps.py --init xavier --lr 1e-3 --amp bf16 --steps 6
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from metavae import MetaDataset, seed_everything  # noqa: E402
from metavae.paper.data.norb_loader import load_norb  # noqa: E402
from metavae.models import make_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", choices=("default", "xavier"), default="default")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--amp", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    images = load_norb(None).train.images[: 3 * 300].reshape(3, 300, 1, 32, 32)
    data = MetaDataset(list(images), seed=0)
    seed_everything(0)
    model = make_model("metavae", arch="conv", event_shape=(1, 32, 32), n_distributions=3, z_dim=40,
                       init=args.init, free_bits=0.5)
    step = bench.Stepper(model, data, 32, 10, torch.device("cpu"), pool=64, amp=None if args.amp == "fp32" else "bf16",
                         lr=args.lr)
    losses = [round(float(step()), 1) for _ in range(args.steps)]
    print(f"init={args.init} lr={args.lr} {args.amp}: loss per step {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
