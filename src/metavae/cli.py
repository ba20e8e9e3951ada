"""`metavae list | run EXPERIMENT [options]`: every experiment of the paper by one command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .experiments import get_experiment, get_report, list_experiments
from .experiments.common import resolve_preset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metavae", description="Meta-amortized variational inference (MetaVAE).")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="name every experiment and what it reproduces")
    r = sub.add_parser("run", help="train, evaluate and report one experiment")
    r.add_argument("experiment")
    r.add_argument("--preset", default=None, help="quick (default; minutes on a laptop CPU) or paper")
    r.add_argument("--out", type=Path, default=None, help="output folder (default runs/EXPERIMENT)")
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default=None, help="model to train, where the experiment offers several")
    r.add_argument("--split", default=None, help="meta-split: interleaved, sparse or contiguous")
    r.add_argument("--data-dir", type=Path, default=None, help="local copy of the experiment's data")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset setting, e.g. --set epochs=3 (repeatable)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="gather finished runs into the paper's tables and figures")
    rep.add_argument("benchmark", help="mnist or norb")
    rep.add_argument("--runs", type=Path, default=Path("runs"), help="folder holding the runs (default runs)")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default RUNS/BENCHMARK-report)")
    return p


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got '{pair}'")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def run_command(args) -> int:
    exp = get_experiment(args.experiment)
    options = {k: getattr(args, k) for k in ("model", "split", "data_dir") if getattr(args, k) is not None}
    unsupported = sorted(set(options) - set(exp.OPTIONS))
    if unsupported:
        flags = ", ".join("--" + u.replace("_", "-") for u in unsupported)
        raise ValueError(f"experiment '{args.experiment}' does not take {flags}")
    cfg = resolve_preset(exp.PRESETS, args.preset, _overrides(args.set))
    default = getattr(exp, "default_out", None)
    out = args.out or (default(**options) if default else Path("runs") / args.experiment)
    t0 = time.time()
    metrics = exp.run(cfg, out=out, device=args.device, seed=args.seed, progress=not args.quiet, **options)
    print((out / "report.md").read_text() if (out / "report.md").exists() else json.dumps(metrics, indent=2))
    print(f"[metavae] {args.experiment} finished in {time.time() - t0:.0f} s; results in {out}/", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            for name, desc in list_experiments():
                print(f"{name:16s} {desc}")
            return 0
        if args.command == "report":
            result = get_report(args.benchmark)(args.runs, args.out)
            out = args.out or args.runs / f"{args.benchmark}-report"
            print((out / "report.md").read_text())
            if result["missing"]:
                print(f"[metavae] {len(result['missing'])} run(s) missing; see the report", file=sys.stderr)
            return 0
        return run_command(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"metavae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
