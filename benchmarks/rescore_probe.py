"""Re-score a finished transformed-MNIST run's selected checkpoint with the standardised probe three
ways: scikit-learn one fit at a time as the old code did (max_iter=300, tol=1e-4), the batched
torch solve (metavae.probes), and scikit-learn converged (max_iter=10000, tol=1e-6).

    python benchmarks/rescore_probe.py runs/mnist-rotate/contiguous/metavae --data-dir DIR [--out FILE.json]

Embeds every unseen value exactly as the run's evaluation did (same contexts, same generator), then
times each probe on the same embeddings and writes per-value chosen C and accuracy each way, the
largest absolute differences and the seconds each took (default: RUN/rescore_probe.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from metavae.paper import mnist
from metavae.paper.invariance import InvarianceConfig, embed_images
from metavae.models import load
from metavae.probes import sklearn_standardised_probe, standardised_probes


def embed_unseen(run: Path, data_dir, whole: bool = False, checkpoint: str = "best.pt") -> tuple:
    """The run's metrics and {value: (train z, train y, test z, test y)} from its best checkpoint
    (or ``checkpoint``, a path under checkpoints/; ``whole``: every image of the split, as the long
    preset probes, instead of the run's own count)."""
    m = json.loads((run / "metrics.json").read_text())
    cfg = InvarianceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()})
    if whole:
        cfg = dataclasses.replace(cfg, train_images=None, test_images=None)
    axis = mnist.AXES[m["axis"]]
    (tr_x, tr_y), (te_x, te_y), _ = mnist._load(data_dir, cfg)
    unseen = [float(v) if axis == "scale" else int(v) for v in m["unseen"]]
    train_t, test_t = mnist._transformed(tr_x, axis, unseen), mnist._transformed(te_x, axis, unseen)
    model = load(run / "checkpoints" / checkpoint)
    gen = torch.Generator().manual_seed(m["seed"] + 5)  # probe_unseen's stream
    out = {}
    for v in unseen:
        ztr = embed_images(model, train_t[v], cfg.context_size, gen, cfg.embed_chunk)
        zte = embed_images(model, test_t[v], cfg.context_size, gen, cfg.embed_chunk)
        out[v] = (ztr.double().numpy(), tr_y.numpy(), zte.double().numpy(), te_y.numpy())
    return m, out


def rescore(run: Path, data_dir, whole: bool = False, converged: bool = True) -> dict:
    """Both probes on the same embeddings, timed."""
    t0 = time.time()
    m, problems = embed_unseen(run, data_dir, whole)
    embed_s = time.time() - t0
    t0 = time.time()
    old = {v: sklearn_standardised_probe(*p) for v, p in problems.items()}
    old_s = time.time() - t0
    t0 = time.time()
    new = dict(zip(problems, standardised_probes(list(problems.values()))))
    new_s = time.time() - t0
    t0 = time.time()
    conv = {v: sklearn_standardised_probe(*p, max_iter=10000, tol=1e-6) if converged else (float("nan"),) * 2
            for v, p in problems.items()}
    conv_s = time.time() - t0
    rows = {str(v): {"sklearn_C": old[v][0], "sklearn": old[v][1], "torch_C": new[v][0], "torch": new[v][1],
                     "sklearn_converged_C": conv[v][0], "sklearn_converged": conv[v][1],
                     "in_metrics_json": None if whole else m["accuracy"]["standardised"].get(str(v))} for v in problems}
    return {"run": str(run), "model": m["model"], "axis": m["axis"], "split": m["split"], "seed": m["seed"],
            "train_images_per_value": len(next(iter(problems.values()))[0]), "values": rows,
            "max_abs_difference": max(abs(r["sklearn"] - r["torch"]) for r in rows.values()),
            "max_abs_difference_converged": max(abs(r["sklearn_converged"] - r["torch"]) for r in rows.values()),
            "same_C": all(r["sklearn_C"] == r["torch_C"] for r in rows.values()),
            "same_C_converged": all(r["sklearn_converged_C"] == r["torch_C"] for r in rows.values()),
            "seconds": {"embed": round(embed_s, 2), "sklearn": round(old_s, 2), "torch": round(new_s, 2),
                        "sklearn_converged": round(conv_s, 2)}}


def run_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a script that re-measures one finished run: RUN, --data-dir, --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    return p


def main() -> None:
    p = run_parser(__doc__)
    p.add_argument("--whole", action="store_true", help="probe every image of the split (the long preset's size)")
    p.add_argument("--no-converged", action="store_true", help="skip the (slow) converged scikit-learn fits")
    args = p.parse_args()
    result = rescore(args.run, args.data_dir, args.whole, not args.no_converged)
    out = args.out or args.run / "rescore_probe.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
