"""The reproduction's commands, added to `metavae` through the ``metavae.commands`` entry point:
``list``, ``run EXPERIMENT``, ``report FAMILY`` and ``reproduce TABLE``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..io import RunFolder
from ..settings import parse_overrides, resolve_preset
from . import get_experiment, get_report, list_experiments, reproduce
from .common import collect_metrics


def add_commands(sub) -> dict:
    """Add the paper's subcommands to ``sub``; return {name: handler(args) -> exit status}."""
    sub.add_parser("list", help="name every experiment and what it reproduces")
    r = sub.add_parser("run", help="train, evaluate and report one experiment")
    r.add_argument("experiment")
    r.add_argument("--preset", default=None, help="quick (default; minutes on a laptop CPU) or another of the "
                   "experiment's presets (e.g. long, paper, full); an unknown name lists them")
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
    rep.add_argument("benchmark", help="the family of experiments (mnist or norb), or pages: the results pages "
                     "of the documentation from their templates (--runs defaults to results, --out to docs)")
    rep.add_argument("--runs", type=Path, default=Path("runs"), help="folder holding the runs (default runs)")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default RUNS/BENCHMARK-report)")
    rep.add_argument("--collect", type=Path, default=None, metavar="DIR",
                     help="first copy every finished run's metrics.json (small JSON only) under RUNS into DIR, "
                          "then report from DIR (how results/ is filled)")
    rep.add_argument("--templates", type=Path, default=Path("docs/templates"),
                     help="with pages: the folder of page templates")
    reproduce.add_parser(sub)
    return {"list": list_command, "run": run_command, "report": report_command, "reproduce": reproduce_command}


def list_command(args) -> int:
    for name, desc in list_experiments():
        print(f"{name:16s} {desc}")
    return 0


def reproduce_command(args) -> int:
    return reproduce.command(args, parse_overrides(args.set))


def run_command(args) -> int:
    exp = get_experiment(args.experiment)
    options = {k: getattr(args, k) for k in ("model", "split", "data_dir") if getattr(args, k) is not None}
    unsupported = sorted(set(options) - exp.options)
    if unsupported:
        flags = ", ".join("--" + u.replace("_", "-") for u in unsupported)
        raise ValueError(f"experiment '{args.experiment}' does not take {flags}")
    cfg = resolve_preset(exp.presets, args.preset, parse_overrides(args.set))
    out = args.out or (exp.default_out(**options) if exp.default_out else Path("runs") / args.experiment)
    t0 = time.time()
    with RunFolder(out):  # writable, ours alone, no stale temporaries: checked before any data loads
        metrics = exp.run(cfg, out=out, device=args.device, seed=args.seed, progress=not args.quiet, **options)
    print((out / "report.md").read_text() if (out / "report.md").exists() else json.dumps(metrics, indent=2))
    print(f"[metavae] {args.experiment} finished in {time.time() - t0:.0f} s; results in {out}/", file=sys.stderr)
    return 0


def report_command(args) -> int:
    if args.benchmark == "pages":
        return pages_command(args)
    runs = args.runs
    if args.collect is not None:
        n = collect_metrics(runs, args.collect)
        print(f"[metavae] copied {n} metrics.json file(s) into {args.collect}", file=sys.stderr)
        runs = args.collect
    result = get_report(args.benchmark)(runs, args.out)
    out = args.out or runs / f"{args.benchmark}-report"
    print((out / "report.md").read_text())
    if result["missing"]:
        print(f"[metavae] {len(result['missing'])} run(s) missing; see the report", file=sys.stderr)
    return 0


def pages_command(args) -> int:
    """`metavae report pages`: every results page from its template (`metavae.paper.pages`)."""
    from .pages import write_pages

    results = args.runs if args.runs != Path("runs") else Path("results")
    for page in write_pages(args.templates, args.out or Path("docs"), results):
        print(f"wrote {page}")
    return 0
