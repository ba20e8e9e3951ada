"""The reference's selection of a baseline's weights, taken apart: a finished transformed-MNIST run
of a model with a context latent c (VHE, VHE+VampPrior, NS), probed four ways on its unseen values:

    checkpoint  best.pt (lowest validation loss, ours) or worst.pt (highest, the reference's pick)
    c           the mean of q(c | D) (ours) or one sample of it (the reference's embeddings)

so the two bugs of the reference's evaluation (docs/reproduction.md §13) are measured alone and
together. Every cell uses the same contexts (the run's evaluation generator) and both probes.

    python benchmarks/reference_bugs.py RUN_FOLDER --data-dir DIR [--out results/.../reference_bugs.json]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metavae.models import load
from metavae.paper import mnist
from metavae.paper.invariance import PROBES, InvarianceConfig, embed_images, fit_probes_many

sys.path.insert(0, str(Path(__file__).parent))
from rescore_probe import run_parser  # noqa: E402

CELLS = {"best, mean c": ("best.pt", False), "best, sampled c": ("best.pt", True),
         "worst, mean c": ("worst.pt", False), "worst, sampled c": ("worst.pt", True)}


def _data(m: dict, data_dir) -> tuple:
    cfg = InvarianceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()})
    axis = mnist.AXES[m["axis"]]
    (tr_x, tr_y), (te_x, te_y), _ = mnist._load(data_dir, cfg)
    unseen = [float(v) if axis == "scale" else int(v) for v in m["unseen"]]
    return cfg, unseen, mnist._transformed(tr_x, axis, unseen), tr_y, mnist._transformed(te_x, axis, unseen), te_y


def cell(model, cfg, seed: int, unseen, train, tr_y, test, te_y, sample_c: bool) -> dict:
    """Both probes per unseen value, embedded as `probe_unseen` does (same generator stream)."""
    gen = torch.Generator().manual_seed(seed + 5)
    problems = []
    for v in unseen:
        ztr = embed_images(model, train[v], cfg.context_size, gen, cfg.embed_chunk, sample_c=sample_c)
        zte = embed_images(model, test[v], cfg.context_size, gen, cfg.embed_chunk, sample_c=sample_c)
        problems.append((ztr.numpy(), tr_y.numpy(), zte.numpy(), te_y.numpy()))
    per = fit_probes_many(problems)
    return {"accuracy": {p: {str(v): r[p] for v, r in zip(unseen, per)} for p in PROBES},
            "mean_unseen_accuracy": {p: float(np.mean([r[p] for r in per])) for p in PROBES}}


def measure(run: Path, data_dir) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    cfg, unseen, train, tr_y, test, te_y = _data(m, data_dir)
    out = {"run": str(run), "model": m["model"], "label": m.get("label"), "axis": m["axis"], "split": m["split"],
           "seed": m["seed"], "cells": {}}
    for name, (file, sample_c) in CELLS.items():
        t0 = time.time()
        torch.manual_seed(m["seed"])  # the draws of c come from the global stream: the same in every run of this
        model = load(run / "checkpoints" / file)
        out["cells"][name] = dict(cell(model, cfg, m["seed"], unseen, train, tr_y, test, te_y, sample_c),
                                  checkpoint=file, sample_c=sample_c, seconds=round(time.time() - t0, 1))
        print(f"{name}: {out['cells'][name]['mean_unseen_accuracy']}", flush=True)
    base = out["cells"]["best, mean c"]["mean_unseen_accuracy"]
    out["minus_ours"] = {name: {p: c["mean_unseen_accuracy"][p] - base[p] for p in PROBES}
                         for name, c in out["cells"].items()}
    return out


def main() -> None:
    args = run_parser(__doc__).parse_args()
    result = measure(args.run, args.data_dir)
    out = args.out or args.run / "reference_bugs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["minus_ours"], indent=2))


if __name__ == "__main__":
    main()
