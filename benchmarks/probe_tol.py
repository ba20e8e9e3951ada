"""The standardised probe solved three ways on the same embeddings: how far the answer moves with the
stopping tolerance (scikit-learn's own gradient test, tol 1e-4, against 1e-5 before) and with the
precision of the products with the features (float32, the default, against float64), and what
each costs.

    python benchmarks/probe_tol.py RUN --data-dir DIR [--out FILE.json]

Embeds every unseen value from the run's selected weights and from its untrained (step-0)
snapshot, exactly as its evaluation did (`rescore_probe.embed_unseen`), then solves all problems
each way, one thread. ``max_abs_difference``: each way's largest test-accuracy move from the first
(float64, tol 1e-5, the closest to converged); ``rescore_probe.py`` compares the default way with
scikit-learn run to convergence directly.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rescore_probe import embed_unseen, run_parser  # noqa: E402

from metavae.probes import standardised_probes  # noqa: E402

WAYS = {"float64, tol 1e-5": (1e-5, torch.float64), "float64, tol 1e-4": (1e-4, torch.float64),
        "float32, tol 1e-4": (1e-4, torch.float32)}


def main() -> None:
    args = run_parser(__doc__).parse_args()
    torch.set_num_threads(1)
    problems = {}
    for tag, ckpt in (("selected", "best.pt"), ("untrained", "snapshots/step-0000000.pt")):
        m, per_value = embed_unseen(args.run, args.data_dir, checkpoint=ckpt)
        problems.update({f"{tag} {v}": prob for v, prob in per_value.items()})
    solved, seconds = {}, {}
    for way, (tol, precision) in WAYS.items():
        t0 = time.time()
        solved[way] = dict(zip(problems, standardised_probes(list(problems.values()), tol=tol, precision=precision)))
        seconds[way] = round(time.time() - t0, 1)
    first = next(iter(WAYS))
    rows = {k: {f"C, {way}": solved[way][k][0] for way in WAYS} | {f"accuracy, {way}": solved[way][k][1] for way in WAYS}
            for k in problems}
    result = {"run": str(args.run), "model": m["model"], "axis": m["axis"], "seed": m["seed"], "problems": rows,
              "reference_way": first, "n_problems": len(problems), "seconds": seconds,
              "max_abs_difference": {way: max(abs(solved[first][k][1] - solved[way][k][1]) for k in problems)
                                     for way in WAYS if way != first},
              "same_C": {way: sum(solved[first][k][0] == solved[way][k][0] for k in problems)
                         for way in WAYS if way != first}}
    out = args.out or args.run / "probe_tol.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))


if __name__ == "__main__":
    main()
