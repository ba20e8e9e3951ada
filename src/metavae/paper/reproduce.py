"""`metavae reproduce TABLE`: every run one of the paper's tables needs, as one resumable queue.

A table is a family (``mnist``, ``norb``), a split and the models of its rows: Table 2 is the
contiguous split, every Table 2 model (plus the controls where the family has them), Table 1 the
interleaved MetaVAE. Each run is a ``metavae run`` subprocess with one thread, writing into
``RUNS/EXPERIMENT/SPLIT/MODEL/seed-S`` (controls, which no seed changes: ``.../MODEL``), the layout
``metavae report`` reads. A run whose metrics.json is there is done; an interrupted run resumes from
its checkpoints when the queue is started again. The queue ends by running the family's report.
Every launch adds its wall time, and each run's, to ``RUNS/reproduce-TABLE.json`` (`Ledger`), so a
table made over several launches still has its whole wall time and per-run times.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import get_experiment, get_report
from ..settings import resolve_preset
from .invariance import CONTROLS, training_settings
from .mnist import requested_config

# Table -> (family, axes' experiments, split, models, controls)
TABLES = {
    "mnist-table2": ("mnist", ("mnist-rotate", "mnist-scale", "mnist-shear"), "contiguous",
                     ("metavae", "vhe-vampprior", "vhe", "ns"), CONTROLS),
    "mnist-table1": ("mnist", ("mnist-rotate", "mnist-scale", "mnist-shear"), "interleaved", ("metavae",), ()),
    "norb-table2": ("norb", ("norb-elevation", "norb-azimuth", "norb-lighting"), "contiguous",
                    ("metavae", "vhe-vampprior", "vhe", "ns"), ()),
    "norb-table1": ("norb", ("norb-elevation", "norb-azimuth", "norb-lighting"), "interleaved", ("metavae",), ()),
}
RESULTS = Path(__file__).resolve().parents[3] / "results"  # the committed runs' metrics.json (estimates)


@dataclass
class Task:
    """One run of the queue: its folder, the command that makes it, and the settings it must hold."""

    name: str
    out: Path
    argv: list
    settings: dict = field(default_factory=dict)
    key: tuple = ()  # (experiment, split, model): what estimates are looked up by
    defaults: dict = field(default_factory=dict)  # the settings' defaults: what a run made before a setting existed used


def plan(table: str, runs: Path, preset: str | None = None, seeds=(0,), overrides: dict | None = None,
         data_dir: Path | None = None) -> list:
    """The table's runs in queue order (seeds outermost, so that one seed of the whole table is done
    first), each a `Task` with its `metavae run` command."""
    if table not in TABLES:
        raise ValueError(f"unknown table '{table}'; choose from {', '.join(TABLES)}")
    _, experiments, split, models, controls = TABLES[table]
    tasks = []
    for i, seed in enumerate(seeds):
        for name in experiments:
            exp = get_experiment(name)
            cfg = resolve_preset(exp.presets, preset, overrides)
            defaults = _plain(training_settings(type(cfg)()))
            for model in models + (controls if i == 0 else ()):
                control = model in CONTROLS
                out = Path(runs) / name / split / model / ("" if control else f"seed-{seed}")
                argv = [sys.executable, "-m", "metavae.cli", "run", name, "--split", split, "--model", model,
                        "--seed", str(0 if control else seed), "--out", str(out), "--quiet"]
                argv += (["--preset", preset] if preset else []) + (["--data-dir", str(data_dir)] if data_dir else [])
                argv += [a for k, v in (overrides or {}).items() for a in ("--set", f"{k}={v}")]
                label = f"{name} {split} {model}" + ("" if control else f" seed {seed}")
                settings = _plain(dict(training_settings(cfg), epochs=cfg.epochs))
                tasks.append(Task(label, out, argv, settings, (name, split, model), defaults))
    return tasks


def _plain(settings: dict) -> dict:
    """Settings as metrics.json stores them (tuples become lists), so they compare equal."""
    return json.loads(json.dumps(settings))


def matches(config: dict, settings: dict, defaults: dict | None = None) -> bool:
    """Whether a metrics.json ``config`` was trained under ``settings``. A setting the config
    predates is taken at its default (``defaults``; the setting did not exist, so the run had the
    behaviour its default keeps), and ignored where no default is known."""
    defaults = defaults or {}
    return all((config[k] if k in config else defaults[k]) == v for k, v in settings.items()
               if k in config or k in defaults)


def finished(task: Task) -> bool:
    """The run's metrics.json is there, complete, under the queue's settings; a metrics.json of other
    settings is refused rather than silently counted or overwritten."""
    path = task.out / "metrics.json"
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(m, dict) or not isinstance(m.get("mean_unseen_accuracy"), dict):
        return False
    if not matches(requested_config(m), task.settings, task.defaults):
        raise ValueError(f"{path} holds a run of other settings than this queue's; choose another --runs")
    return True


DATA_FAMILY = {"mnist": "mnist", "smallnorb": "norb", "synthnorb": "norb"}  # metrics.json "data" -> experiment family


def committed_seconds(results: Path = RESULTS) -> list:
    """[(key, config, seconds, eval known)] of every committed run: its training time over all
    launches plus its evaluation time where metrics.json records it."""
    out = []
    for path in sorted(Path(results).rglob("metrics.json")) if Path(results).is_dir() else []:
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(m, dict) or "axis" not in m:
            continue  # not an invariance run (a variant, "metavae (amp bf16)", is told apart by its config)
        family = DATA_FAMILY.get(m.get("data"))
        if family is None:  # another data set (e.g. "idx:FOLDER"): its times say nothing of this queue
            continue
        train = m.get("train_seconds_total", m.get("train_seconds"))
        if train is None:
            continue
        key = (f"{family}-{m['axis']}", m.get("split"), m["model"])
        out.append((key, requested_config(m), float(train) + float(m.get("eval_seconds") or 0.0),
                    "eval_seconds" in m))
    return out


def estimate(task: Task, committed: list) -> tuple | None:
    """(seconds, whether evaluation is included, whether taken from other axes) from the committed runs
    of the same experiment, split, model and settings (mean over seeds); failing those, from the same
    family, split, model and settings on its other axes; None where there is neither, or only a
    control whose evaluation time was not recorded. Where some of those runs record their evaluation
    time, only they count: they are the newer code's, whose training and evaluation are both faster."""
    family = task.key[0].split("-")[0]
    for other_axes in (False, True):
        times = [(s, e) for key, config, s, e in committed
                 if (key[0].split("-")[0] == family and key[1:] == task.key[1:] if other_axes else key == task.key)
                 and matches(config, task.settings, task.defaults)]
        times = [t for t in times if t[1]] or times
        if times and not (task.key[2] in CONTROLS and not all(e for _, e in times)):
            return sum(s for s, _ in times) / len(times), all(e for _, e in times), other_axes
    return None


def fmt_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min"


def dry_run(tasks: list, jobs: int, committed: list) -> str:
    """The queue, one line per run: done or to do, the estimated time, the command; then the totals."""
    lines, total, unknown = [], 0.0, 0
    for i, t in enumerate(tasks, 1):
        done = finished(t)
        est = estimate(t, committed)
        if est is None:
            text = "unknown"
            unknown += 0 if done else 1
        else:
            text = (fmt_seconds(est[0]) + ("" if est[1] else " (train only)")
                    + (" (other axes)" if est[2] else ""))
            total += 0.0 if done else est[0]
        cmd = " ".join(a for a in t.argv[3:])
        lines.append(f"{i:3d}. [{'done' if done else 'to do'}] {t.name:44s} {text:>32s}   metavae {cmd}")
    todo = sum(not finished(t) for t in tasks)
    lines.append(f"{todo} of {len(tasks)} run(s) to do; estimated {fmt_seconds(total)} of runs"
                 + (f" plus {unknown} of unknown time" if unknown else "")
                 + f", about {fmt_seconds(total / max(1, min(jobs, todo)))} of wall time with --jobs {jobs}"
                 + " (estimates: the committed runs in results/, train_seconds + eval_seconds where recorded; "
                   "a run never committed on its axis, the same model on the others)")
    return "\n".join(lines)


def _env() -> dict:
    """A child's environment: one thread for each library that spawns them."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


class Ledger:
    """The queue's wall-clock record across launches, ``RUNS/reproduce-TABLE.json``: each launch
    (start, jobs, seconds, the seconds of each run it worked on, finished or stopped) and the sums:
    the table's wall time over all launches and each run's. An unreadable file is set aside
    (renamed ``.unreadable``) with a notice, not fatal: it only records times."""

    def __init__(self, runs: Path, table: str):
        self.path = Path(runs) / f"reproduce-{table}.json"
        self.data = {"table": table, "launches": []}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict) or not isinstance(data.get("launches"), list):
                    raise ValueError("not a reproduce ledger")
                self.data = data
            except (OSError, ValueError) as e:
                aside = self.path.with_name(self.path.name + ".unreadable")
                self.path.replace(aside)
                print(f"metavae: notice: {self.path} was unreadable ({e}); moved to {aside.name}, starting a new "
                      "record of this queue's times", file=sys.stderr)

    def begin(self, started: float, jobs: int) -> None:
        """Record a new launch (written at once, so that a launch killed before its end still counts)."""
        self.data["launches"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                                      "jobs": jobs, "seconds": 0.0, "runs": {}})
        self._write()

    def update(self, seconds: float, run_seconds: dict, tasks: list) -> None:
        """The current launch's seconds so far and each run's, and the sums over all launches."""
        launch = self.data["launches"][-1]
        launch["seconds"], launch["runs"] = round(seconds, 1), {k: round(v, 1) for k, v in run_seconds.items()}
        per_run = {}
        for launch in self.data["launches"]:
            for name, secs in launch["runs"].items():
                entry = per_run.setdefault(name, {"wall_seconds": 0.0, "launches": 0})
                entry["wall_seconds"] = round(entry["wall_seconds"] + secs, 1)
                entry["launches"] += 1
        for t in tasks:
            if t.name in per_run:
                try:
                    per_run[t.name]["finished"] = finished(t)
                except ValueError:  # a metrics.json of other settings: said when the queue starts
                    per_run[t.name]["finished"] = False
        self.data["runs"] = per_run
        self.data["wall_seconds"] = round(sum(launch["seconds"] for launch in self.data["launches"]), 1)
        self._write()

    def _write(self) -> None:
        from ..io import write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.data, self.path)


def run_queue(tasks: list, jobs: int = 1, progress: bool = True, poll: float = 0.5,
              on_progress=None, every: float = 60.0) -> list:
    """Run the tasks not yet finished, at most ``jobs`` at once, each logging to OUT/reproduce.log.
    Returns the names of the runs that failed. ``on_progress({run: wall seconds})`` gets the seconds of
    every run started so far (running ones' up to now) when a run ends, every ``every`` seconds and
    last when the queue stops. Interrupted, the running children are stopped (they resume from their
    checkpoints next time) and KeyboardInterrupt goes on up."""
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    todo = [t for t in tasks if not finished(t)]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="reproduce", unit="run", disable=not progress)
    running, failed, started, run_seconds = {}, [], {}, {}
    last = time.time()

    def report():  # running runs count up to now, stopped ones included
        nonlocal last
        last = time.time()
        if on_progress is not None:
            on_progress(dict(run_seconds, **{name: time.time() - started[name] for name in running}))

    try:
        while todo or running:
            while todo and len(running) < jobs:
                t = todo.pop(0)
                t.out.mkdir(parents=True, exist_ok=True)
                log = open(t.out / "reproduce.log", "ab")
                running[t.name] = (t, subprocess.Popen(t.argv, stdout=log, stderr=subprocess.STDOUT, env=_env()), log)
                started[t.name] = time.time()
                bar.set_postfix_str(", ".join(running))
            time.sleep(poll)
            for name, (t, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                run_seconds[name] = time.time() - started[name]
                if proc.returncode != 0 or not finished(t):
                    failed.append(name)
                    bar.write(f"[reproduce] {name} failed (exit {proc.returncode}); see {t.out / 'reproduce.log'}")
                bar.update(1)
                report()
            if time.time() - last >= every:
                report()
    finally:
        for name, (t, proc, log) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
        report()
        bar.close()
    return failed


def _stop_on_sigterm():
    """SIGTERM (a job scheduler, a session's end) stops the queue as Ctrl-C does: the children are
    stopped and the ledger written. Returns the function that puts the old handler back."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


def reproduce(table: str, runs: Path, preset: str | None = None, seeds=(0,), jobs: int = 1,
              overrides: dict | None = None, data_dir: Path | None = None, dry: bool = False,
              progress: bool = True) -> int:
    """The `metavae reproduce` command: plan, print or run the queue, then the family's report."""
    tasks = plan(table, runs, preset, seeds, overrides, data_dir)
    if dry:
        print(dry_run(tasks, jobs, committed_seconds()))
        return 0
    ledger, t0 = Ledger(runs, table), time.time()
    ledger.begin(t0, jobs)
    stop = _stop_on_sigterm()
    try:
        failed = run_queue(tasks, jobs, progress, on_progress=lambda secs: ledger.update(time.time() - t0, secs, tasks))
    finally:
        stop()
    n = len(ledger.data["launches"])
    print(f"[metavae] reproduce {table}: {len(tasks) - len(failed)} of {len(tasks)} run(s) finished; "
          f"this launch took {fmt_seconds(time.time() - t0)}, the queue {fmt_seconds(ledger.data['wall_seconds'])} "
          f"over {n} launch{'es' if n > 1 else ''} (each run's time: {ledger.path})", file=sys.stderr)
    family = TABLES[table][0]
    get_report(family)(runs, None)
    print((Path(runs) / f"{family}-report" / "report.md").read_text())
    if failed:
        raise ValueError(f"{len(failed)} run(s) failed ({', '.join(failed)}); rerun the same command to retry them")
    return 0


def add_parser(sub) -> None:
    """`metavae reproduce` in cli.py's subcommands."""
    p = sub.add_parser("reproduce", help="run every run one of the paper's tables needs (a resumable queue), "
                                         "then its report")
    p.add_argument("table", choices=tuple(TABLES))
    p.add_argument("--preset", default=None, help="the experiments' preset (default: their first, quick)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the trained models (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default 1)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the runs (default runs)")
    p.add_argument("--data-dir", type=Path, default=None, help="local copy of the data, passed to every run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset setting in every run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the queue and its estimated time; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def command(args, overrides: dict) -> int:
    """Run `metavae reproduce` from parsed arguments (``overrides``: the parsed --set pairs)."""
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers, got '{args.seeds}'") from None
    if not seeds:
        raise ValueError("--seeds names no seed")
    return reproduce(args.table, args.runs, args.preset, seeds, args.jobs, overrides, args.data_dir, args.dry_run,
                     progress=not args.quiet)
