"""Evaluation time of a finished transformed-MNIST run two ways, measured back to back in one
process on copies of the run (training is finished, so `metavae run` only evaluates; the run's own
recorded config is used, so any preset or --set variant re-evaluates):

    python benchmarks/eval_time.py RUN --data-dir DIR [--compare probe|embedding|validation] [--set KEY=VALUE] [--out FILE.json]

``probe`` (default): "old" is scikit-learn one fit at a time (max_iter=300, as before), "new" the
batched torch solve. ``embedding``: "old" encodes every context image for every query it joins,
"new" encodes each image once (`pool_features`), both with the torch probe and the validation
of every set. ``validation``: "old" validates a snapshot by encoding every val set, "new" from
features computed once per val image (`Trainer._val_context_features`), both with the above.
Writes each way's eval_seconds, the seconds inside the standardised probe, the reference probe, the
embeddings and validation, and the run's train_seconds_total, hence the evaluation / training ratio
each way. The run's training time was measured at another time, under other load; ``--train-estimate STEPS`` also
times STEPS training steps of the run's model at its shapes right after (`bench.Stepper`) and
estimates its training as steps x the median step + epochs x the new way's mean validation: an
evaluation / training ratio measured under the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import metavae
from metavae.models import MetaVAE
from metavae.models.hierarchical import HierarchicalVAE
from metavae.training.trainer import Trainer
from metavae.paper import get_experiment, invariance
from metavae.paper.mnist import requested_config
from metavae.settings import config_from_dict, parse_overrides, resolve_preset
from metavae.probes import sklearn_standardised_probe, standardised_probes


def old_probes(problems, cs):
    return [sklearn_standardised_probe(*p, cs=cs) for p in problems]


def evaluate(run: Path, data_dir, probe, cached: bool = True, cached_validation: bool = True,
             overrides: dict | None = None) -> dict:
    """Re-run the finished run (a copy) with ``probe`` as the standardised probe (``cached``: pool
    features computed once per value; ``cached_validation``: val features once per image); its timings."""
    m = json.loads((run / "metrics.json").read_text())
    exp = get_experiment(f"mnist-{m['axis']}")
    spent = {"probe": 0.0, "validation": 0.0, "reference": 0.0, "embedding": 0.0}
    calls = dict.fromkeys(spent, 0)

    def timed(key, fn):
        def wrapped(*a, **kw):
            t0 = time.time()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.time() - t0
                calls[key] += 1
        return wrapped

    patches = [(invariance, "standardised_probes", timed("probe", probe)),
               (Trainer, "validate", timed("validation", Trainer.validate)),
               (invariance, "fit_probe", timed("reference", invariance.fit_probe)),
               (invariance, "embed_images", timed("embedding", invariance.embed_images))]
    if not cached:
        patches += [(cls, "pool_features", lambda self, pool, chunk=1024: None) for cls in (MetaVAE, HierarchicalVAE)]
    if not cached_validation:
        patches.append((Trainer, "_val_context_features", lambda self: None))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        shutil.copytree(run, out)
        for owner, name, value in patches:
            setattr(owner, name, value)
        try:
            t0 = time.time()
            cfg = resolve_preset({"run": config_from_dict(invariance.InvarianceConfig, requested_config(m))}, "run",
                                 overrides)
            metrics = exp.run(cfg, out=out, seed=m["seed"],
                              progress=False, model=m["model"], split=m["split"], data_dir=data_dir)
            wall = time.time() - t0
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)
    return {"eval_seconds": metrics["eval_seconds"], "standardised_probe_seconds": round(spent["probe"], 1),
            "validation_seconds": round(spent["validation"], 1), "validations": calls["validation"],
            "reference_probe_seconds": round(spent["reference"], 1), "reference_probes": calls["reference"],
            "embedding_seconds": round(spent["embedding"], 1),
            "wall_seconds": round(wall, 1), "train_seconds_total": metrics["train_seconds_total"],
            "eval_over_train": round(metrics["eval_seconds"] / metrics["train_seconds_total"], 3),
            "mean_unseen_accuracy": metrics["mean_unseen_accuracy"],
            "learning_curve_val_loss": [p["val_loss"] for p in metrics["learning_curve"]]}


def train_estimate(run: Path, validation_seconds: float, steps: int) -> dict:
    """The run's training time estimated under the current load: ``steps`` timed steps of its model
    at its shapes (long preset: K distributions x B queries, N contexts from its pool), median x the
    run's steps, plus its epochs x ``validation_seconds`` (one validation, measured the new way)."""
    import statistics
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import Stepper, make_data
    from metavae.models import make_model

    m = json.loads((run / "metrics.json").read_text())
    cfg = m["config"]
    B = m.get("trained_with", {}).get("batch_size", cfg["batch_size"])  # a run on K seen values: the scaled batch
    K, (N, pool) = len(m["seen"]), (cfg["context_size"], cfg.get("context_pool"))
    torch.manual_seed(0)
    model = make_model(m["model"], "mlp", (28, 28), n_distributions=K, z_dim=cfg["z_dim"])
    stepper = Stepper(model, make_data(K, (28, 28), 400, torch.device("cpu")), B, N, torch.device("cpu"),
                      pool=pool if getattr(model, "uses_context", False) else None)
    for _ in range(steps + 1):
        stepper.timed()
    step = statistics.median(stepper.times[1:])
    total_steps, epochs = m["history"][-1]["step"], len(m["history"])
    seconds = total_steps * step + epochs * validation_seconds
    return {"timed_steps": steps, "median_step_seconds": round(step, 4), "steps": total_steps, "epochs": epochs,
            "validation_seconds_each": round(validation_seconds, 2), "train_seconds": round(seconds, 1)}


def library_commit() -> str | None:
    """The commit of the checkout the measured library was imported from (None outside git)."""
    import subprocess

    done = subprocess.run(["git", "-C", str(Path(metavae.__file__).parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--compare", choices=("probe", "embedding", "validation", "none"), default="probe",
                   help="what the old way lacks; none: the current code only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an evaluation-only setting to change, e.g. test_context_sizes=[] (repeatable)")
    p.add_argument("--train-estimate", type=int, default=0, metavar="STEPS",
                   help="also time STEPS training steps now and estimate the training time under the same load")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: what each run of a `metavae reproduce` queue gets)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sets = parse_overrides(args.set)
    ways = {"probe": ((old_probes, True, True), (standardised_probes, True, True)),
            "embedding": ((standardised_probes, False, False), (standardised_probes, True, False)),
            "validation": ((standardised_probes, True, False), (standardised_probes, True, True)),
            "none": ((standardised_probes, True, True),)}[args.compare]
    result = {"run": str(args.run), "compare": args.compare, "threads": torch.get_num_threads(), "settings": sets,
              "loadavg_at_start": list(os.getloadavg()), "library": str(Path(metavae.__file__).parent),
              "commit": library_commit()}
    if args.compare != "none":
        result["old"] = evaluate(args.run, args.data_dir, *ways[0], overrides=sets)
    result["new"] = evaluate(args.run, args.data_dir, *ways[-1], overrides=sets)
    if "old" in result:
        result["same_accuracy"] = result["old"]["mean_unseen_accuracy"] == result["new"]["mean_unseen_accuracy"]
    if args.train_estimate:
        new = result["new"]
        est = train_estimate(args.run, new["validation_seconds"] / max(new["validations"], 1), args.train_estimate)
        est["eval_over_train"] = {way: round(result[way]["eval_seconds"] / est["train_seconds"], 3)
                                  for way in ("old", "new") if way in result}
        result["train_estimate"] = est
    out = args.out or args.run / "eval_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
