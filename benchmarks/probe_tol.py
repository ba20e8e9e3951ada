"""The standardised probe at two stopping tolerances on the same embeddings: how far the answer
moves when the batched solve stops at scikit-learn's own gradient test (tol 1e-4, the default
since this round) instead of 1e-5 (before), and what each costs.

    python benchmarks/probe_tol.py RUN --data-dir DIR [--out FILE.json]

Embeds every unseen value from the run's selected weights and from its untrained (step-0)
snapshot, exactly as its evaluation did (`rescore_probe.embed_unseen`), then solves all problems
at each tolerance, one thread. Combined with `rescore_probe_rotate_long_*.json` (tol 1e-5 against
scikit-learn run to convergence) this bounds the distance from converged scikit-learn.
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

TOLS = (1e-5, 1e-4)


def main() -> None:
    args = run_parser(__doc__).parse_args()
    torch.set_num_threads(1)
    problems = {}
    for tag, ckpt in (("selected", "best.pt"), ("untrained", "snapshots/step-0000000.pt")):
        m, per_value = embed_unseen(args.run, args.data_dir, checkpoint=ckpt)
        problems.update({f"{tag} {v}": prob for v, prob in per_value.items()})
    solved, seconds = {}, {}
    for tol in TOLS:
        t0 = time.time()
        solved[tol] = dict(zip(problems, standardised_probes(list(problems.values()), tol=tol)))
        seconds[str(tol)] = round(time.time() - t0, 1)
    rows = {k: {f"C at {tol}": solved[tol][k][0] for tol in TOLS} | {f"accuracy at {tol}": solved[tol][k][1] for tol in TOLS}
            for k in problems}
    lo, hi = TOLS
    result = {"run": str(args.run), "model": m["model"], "axis": m["axis"], "seed": m["seed"], "problems": rows,
              "max_abs_difference": max(abs(solved[lo][k][1] - solved[hi][k][1]) for k in problems),
              "same_C": sum(solved[lo][k][0] == solved[hi][k][0] for k in problems), "n_problems": len(problems),
              "seconds": seconds}
    out = args.out or args.run / "probe_tol.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))


if __name__ == "__main__":
    main()
