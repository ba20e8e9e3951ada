"""Transformed MNIST (paper Figure 7, Tables 1 and 2): experiments mnist-rotate, mnist-scale,
mnist-shear. Each trains one model (``--model``) on the seen values of one meta-split
(``--split``) and scores a linear probe on the unseen values; a MetaVAE on the interleaved split
also measures Table 1's invariance distances."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from pathlib import Path


from .data import transforms as T
from .data.mnist import load_mnist, mnist_cache_dir
from ..models.registry import model_names
from ..io import atomic_write_text
from . import regimes
from .base import Experiment
from .common import config_dict, markdown_table, render_report, write_metrics, write_report
from .invariance import (CONTROLS, PROBE, PROBES, STANDARDISED_PROBE, VARIANT_SETTINGS, InvarianceConfig, accuracy_figure,
                         evaluate_run, find_runs, fmt_seeds, gather_tables, invariance_distances, learning_curve_figure,
                         make_control, probe_unseen, run_label, snapshot_model, summarise_probes, table2_models,
                         train_on_seen, untrained_distances)

AXES = {"rotate": "rotation", "scale": "scale", "shear": "shear"}  # experiment key -> transforms axis
BASE = {"rotation": 0, "scale": 1.0, "shear": 0}  # the untransformed value of each axis
PAPER_TABLE2 = {  # mean unseen accuracy, contiguous split (paper Table 2)
    "rotate": {"metavae": 0.885, "vhe-vampprior": 0.830, "vhe": 0.793, "ns": None},
    "scale": {"metavae": 0.893, "vhe-vampprior": 0.767, "vhe": 0.463, "ns": None},
    "shear": {"metavae": 0.844, "vhe-vampprior": 0.679, "vhe": 0.602, "ns": None},
}
PAPER_TABLE1 = {
    "rotate": {"rotate": 1.65, "scale": 4.44, "shear": 4.09},
    "scale": {"rotate": 5.44, "scale": 2.16, "shear": 4.92},
    "shear": {"rotate": 3.79, "scale": 4.89, "shear": 1.47},
}
PRESETS = {
    "quick": InvarianceConfig(),
    # sized for a 2-core CPU: the whole split, the context pool, 10 epochs (MetaVAE ~15 min, VHE ~3x)
    "long": InvarianceConfig(train_images=None, test_images=None, epochs=10, context_pool=50),
    "paper": InvarianceConfig(train_images=None, test_images=None, epochs=100),
}
OPTIONS = {"model", "split", "data_dir"}
# sha256 of the pixels of the first `IDENTIFY_IMAGES` images of the official MNIST train and test
# files: a --data-dir whose images start with them is MNIST (whole or a prefix, gzip or not);
# anything else is labelled as its folder's data, never as MNIST.
IDENTIFY_IMAGES = 1000
OFFICIAL_PREFIX_SHA256 = {
    "train": "2304e0137aea1f236247daacc2dcaf275996895e40c4bb0760c448434d361d1a",
    "test": "f8f3c5a608a9f7d4bd5e9d69b90c53932b8b99371d9db26121b42f62f3abcd56",
}


def data_label(data_dir, train_images, test_images) -> str:
    """"mnist" for the cache (md5-checked downloads) or a folder holding the official images (by
    `OFFICIAL_PREFIX_SHA256`); otherwise "idx:FOLDER", so that other IDX data are never reported as MNIST."""
    if data_dir is None:
        return "mnist"
    import hashlib

    def official(images, split) -> bool:
        head = np.ascontiguousarray(np.asarray(images[:IDENTIFY_IMAGES]))
        return len(images) >= IDENTIFY_IMAGES and hashlib.sha256(head.tobytes()).hexdigest() == OFFICIAL_PREFIX_SHA256[split]

    if official(train_images, "train") and official(test_images, "test"):
        return "mnist"
    return f"idx:{Path(data_dir).expanduser().resolve().name}"


# Settings that make a run a variant of its model in the tables (beside invariance.VARIANT_SETTINGS):
# an unpooled run or a run on fewer seen values is not another seed of the default run.
LABELLED_SETTINGS = VARIANT_SETTINGS + ("context_pool", "seen")


def label_reference(cfg: InvarianceConfig) -> InvarianceConfig:
    """The preset a run's label is relative to: runs on the whole split against the long preset
    (its context pool is the default there), subsets against the quick preset."""
    return PRESETS["long"] if cfg.train_images is None else PRESETS["quick"]


def seen_subset(seen, cfg: InvarianceConfig) -> tuple:
    """(the ``cfg.seen`` = K seen values to train on, the config to train with). The K values are
    spread out over the split's seen values (the centre of each of K equal strata); batch size and
    epochs grow by len(seen) / K, so that a run on fewer values takes the same number of steps of
    the same number of images as the run on all of them (the regime map, docs/regimes.md)."""
    seen = tuple(seen)
    if cfg.seen is None or cfg.seen == len(seen):
        return seen, cfg
    if cfg.seen > len(seen):
        raise ValueError(f"setting 'seen' is {cfg.seen}, but this split has only {len(seen)} seen values")
    n, k = len(seen), cfg.seen
    subset = tuple(seen[int((i + 0.5) * n / k)] for i in range(k))
    factor = n / k
    return subset, dataclasses.replace(cfg, batch_size=round(cfg.batch_size * factor), epochs=round(cfg.epochs * factor))


def requested_config(m: dict) -> dict:
    """The config a run's metrics.json says it was asked for. A run on K of the split's seen values
    records that config and, under ``trained_with``, the scaled batch size and epochs it trained with
    (`seen_subset`); runs made before then recorded the scaled values as their config, which a rerun
    or a resumed queue would take for other settings (or scale again): they are undone here."""
    cfg = dict(m.get("config") or {})
    if "trained_with" in m or not cfg.get("seen") or not m.get("split_seen") or cfg["seen"] == len(m["split_seen"]):
        return cfg
    factor = len(m["split_seen"]) / cfg["seen"]
    cfg["batch_size"], cfg["epochs"] = round(cfg["batch_size"] / factor), round(cfg["epochs"] / factor)
    return cfg


def probe_context_sizes(model, data: dict, unseen, cfg: InvarianceConfig, seed: int, device, progress) -> dict:
    """Both probes' mean unseen accuracy with test contexts of each size in ``cfg.test_context_sizes``
    (the trained weights unchanged): how much the embedding gains from a larger set D."""
    out = {}
    for n in cfg.test_context_sizes:
        per = summarise_probes(probe_unseen(model, data, unseen, dataclasses.replace(cfg, context_size=n), seed,
                                            device, progress))
        out[str(n)] = {"mean_unseen_accuracy": per["mean_unseen_accuracy"], "embedding_std": per["embedding_std"]}
    return out


def _load(data_dir, cfg: InvarianceConfig):
    """The (truncated) splits and the data's label (`data_label`, said when it is not MNIST)."""
    (tr_x, tr_y), (te_x, te_y) = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    label = data_label(data_dir, tr_x, te_x)
    if label != "mnist":
        import sys

        print(f"metavae: notice: the images in {data_dir} are not MNIST's (their pixels differ from the official "
              f"files'); the run is labelled {label!r}, not MNIST", file=sys.stderr)
    if cfg.train_images is not None:
        tr_x, tr_y = tr_x[: cfg.train_images], tr_y[: cfg.train_images]
    if cfg.test_images is not None:
        te_x, te_y = te_x[: cfg.test_images], te_y[: cfg.test_images]
    return (tr_x, tr_y), (te_x, te_y), label


def data_record(data_dir, train_images, test_images) -> dict:
    """Where a run's images came from and which they were: the folder, counts and sha256 of the
    exact pixels used (a run can be traced to its data; a resume on other data is refused)."""
    return {"source": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else str(mnist_cache_dir()),
            "train_images": len(train_images), "test_images": len(test_images),
            "train_sha256": T.data_fingerprint(train_images), "test_sha256": T.data_fingerprint(test_images)}


def _transformed(images, axis, values):
    """{value: (n, 28, 28) uint8}, computed once per value and cached on disk."""
    return T.transform_split(images, axis, values, cache_dir=mnist_cache_dir() / "transforms")


def _by_value(accuracy: dict, axis: str) -> dict:
    """{"-20": a} -> {-20: a} (values as the grid holds them)."""
    return {float(v) if axis == "scale" else int(float(v)): a for v, a in accuracy.items()}


def default_out(key: str, model: str, split: str) -> Path:
    return Path("runs") / f"mnist-{key}" / T.resolve_split(split) / model


def make_run(key: str):
    axis = AXES[key]

    def run(cfg: InvarianceConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True,
            model: str = "metavae", split: str = "contiguous", data_dir=None) -> dict:
        if model not in model_names() + CONTROLS:
            raise ValueError(f"unknown model '{model}'; choose from {', '.join(model_names() + CONTROLS)}")
        split = T.resolve_split(split)
        seen, unseen = T.get_split(axis, split)
        split_seen, requested = list(seen), cfg
        seen, cfg = seen_subset(seen, cfg)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (tr_x, tr_y), (te_x, te_y), label = _load(data_dir, cfg)
        train_t, test_t = _transformed(tr_x, axis, seen + unseen), _transformed(te_x, axis, seen + unseen)
        data = {v: ((train_t[v], tr_y), (test_t[v], te_y)) for v in unseen}
        record = data_record(data_dir, tr_x, te_x)
        metrics = {"model": model, "label": run_label(model, cfg, label_reference(cfg), LABELLED_SETTINGS), "split": split,
                   "axis": key, "data": label, "data_record": record, "seen": list(seen), "unseen": list(unseen),
                   "train_images_per_value": len(tr_x), "test_images_per_value": len(te_x), "seed": seed,
                   "probes": {"reference": PROBE, "standardised": STANDARDISED_PROBE}, "config": config_dict(requested)}
        if cfg.seen is not None:
            metrics["split_seen"] = split_seen
            metrics["trained_with"] = {"batch_size": cfg.batch_size, "epochs": cfg.epochs}
        if model in CONTROLS:  # no training: the same probes on the same images
            control = make_control(model, tuple(tr_x.shape[1:]), cfg.z_dim)
            metrics.update(summarise_probes(probe_unseen(control, data, unseen, cfg, seed, device, progress)),
                           epochs=0, epochs_trained=0, train_seconds=0.0)
        else:
            info = {"experiment": f"mnist-{key}", "split": split, "data": record}  # the pixels' hashes: a resume checks them
            trained, history, seconds, trainer = train_on_seen(
                model, "mlp", [train_t[v] for v in seen], [test_t[v] for v in seen], [str(v) for v in seen], cfg,
                out, seed, device, progress, run_info=info)
            trained.to(device)
            metrics.update(evaluate_run(trained, trainer, data, unseen, cfg, seed, device, progress))
            if cfg.test_context_sizes and getattr(trained, "uses_context", False) and model != "ns":
                metrics["by_test_context_size"] = probe_context_sizes(trained, data, unseen, cfg, seed, device, progress)
            metrics.update(epochs=cfg.epochs, epochs_trained=history[-1]["epoch"] if history else 0,
                           best_epoch=trainer.state.best_epoch, train_seconds=round(seconds, 1),
                           train_seconds_total=round(sum(h["seconds"] for h in history), 1), history=history)
            learning_curve_figure(out / "probe_vs_steps.png", {model: metrics["learning_curve"]},
                                  f"{_title(label)} {key}, {split}: {model}, seed {seed}")
            if split == "interleaved" and model == "metavae":  # Table 1 (the reference forces 'standard')
                test_by_axis = {a: _transformed(te_x, a, T.GRIDS[a]) for a in AXES.values()}
                d = invariance_distances(trained, test_by_axis, BASE, cfg, seed, device)
                metrics["invariance_distance"] = {k: d[a] for k, a in AXES.items()}
                untrained = snapshot_model(trained, trainer, 0)  # the control: same seed and init, step 0
                if untrained is not None and "untrained" in metrics:
                    d0 = invariance_distances(untrained, test_by_axis, BASE, cfg, seed, device)
                    metrics["untrained"]["invariance_distance"] = {k: d0[a] for k, a in AXES.items()}
        write_metrics(out, metrics)
        accuracy_figure(out / "accuracy.png", [{
            "title": f"{key}, {split}", "values": T.GRIDS[axis], "seen": seen,
            "curves": {f"{model} ({p})": _by_value(metrics["accuracy"][p], axis) for p in PROBES}}],
            f"{_title(label)} {key}: linear-probe accuracy on unseen values, {model}")
        write_report(out, _report(metrics))
        return metrics

    return run


def _title(label: str) -> str:
    """What a figure or report calls the data: MNIST only when it is."""
    return "MNIST" if label == "mnist" else f"IDX data from {label.removeprefix('idx:')}"


def _report(m: dict) -> str:
    """A run's report.md (templates/mnist-run.md and its sections) from its metrics."""
    acc, mean = m["accuracy"], m["mean_unseen_accuracy"]
    untrained = m.get("untrained")
    headers = ["unseen value"] + [f"{p} probe" for p in PROBES] + ([f"untrained, {p}" for p in PROBES] if untrained else [])
    rows = [[v] + [f"{acc[p][v]:.3f}" for p in PROBES]
            + ([f"{untrained['accuracy'][p][v]:.3f}" for p in PROBES] if untrained else []) for v in acc["reference"]]
    rows.append(["**mean**"] + [f"**{mean[p]:.3f}**" for p in PROBES]
                + ([f"{untrained['mean_unseen_accuracy'][p]:.3f}" for p in PROBES] if untrained else []))
    paper = PAPER_TABLE2[m["axis"]].get(m["model"]) if m["split"] == "contiguous" and m.get("data", "mnist") == "mnist" else None
    trained = m["model"] not in CONTROLS
    trained_text = render_report("mnist-run-trained", m=m, n_seen=len(m["seen"]),
                                 minutes=m["train_seconds_total"] / 60) + "\n" if trained else ""
    return render_report("mnist-run", m=m, title=_title(m.get("data", "mnist")), control="" if trained else " (control)",
                         n_unseen=len(m["unseen"]), paper=f" (paper Table 2: {paper})" if paper is not None else "",
                         trained=trained_text, table=markdown_table(headers, rows), sections=_run_sections(m),
                         probe=PROBE, standardised=STANDARDISED_PROBE).rstrip("\n")


def _run_sections(m: dict) -> str:
    """The run report's optional sections: learning curve, the reference's selection, Table 1's row."""
    sections = []
    if m.get("learning_curve"):
        sections.append(render_report("mnist-run-curve", table=markdown_table(
            ["step", "fraction", "val loss"] + [f"{p} probe" for p in PROBES],
            [[c["step"], f"{c['fraction']:.3f}", f"{c['val_loss']:.2f}"]
             + [f"{c['mean_accuracy'][p]:.3f}" if p in c["mean_accuracy"] else "-" for p in PROBES]
             for c in m["learning_curve"]])))
    if m.get("reference_selection"):
        sections.append(render_report("mnist-run-selection", r=m["reference_selection"]))
    if "invariance_distance" in m:
        d = m["invariance_distance"]
        sections.append(render_report("mnist-run-table1", table=markdown_table(
            ["embedded axis", "ours", "paper"], [[a, f"{d[a]:.3f}", PAPER_TABLE1[m["axis"]][a]] for a in AXES])))
    return "".join("\n\n" + s.rstrip("\n") for s in sections)


# --- `metavae report mnist` ----------------------------------------------------------------
TABLE2_MODELS = ("metavae", "vhe-vampprior", "vhe", "ns")


def report(runs: Path = Path("runs"), out: Path | None = None) -> dict:
    """Gather finished runs (any depth under ``runs``; several seeds of one model are averaged)
    into Table 1, Table 2 with both probes and the controls, Figure 7 and the learning curves."""
    runs = Path(runs)
    out = Path(out) if out is not None else runs / "mnist-report"
    found = find_runs(runs, ("mnist",))
    models = tuple(m for m in table2_models(found, TABLE2_MODELS) if not regimes.is_regime_label(m))
    table1, table2, missing = gather_tables(found, AXES, models, "mnist", out, " --data-dir DIR --preset long")
    panels = []
    for key, axis in AXES.items():
        for split in ("interleaved", "sparse", "contiguous"):
            curves = {}
            for (k, s_, model), ms in found.items():
                if k == key and s_ == split:
                    per_value = [_by_value(m["accuracy"]["standardised"], axis) for m in ms]
                    curves[model] = {v: float(np.mean([pv[v] for pv in per_value])) for v in per_value[0]}
            if curves:
                panels.append({"title": f"{key}, {split}", "values": T.GRIDS[axis], "seen": T.get_split(axis, split)[0],
                               "curves": curves})
    if panels:
        accuracy_figure(out / "figure7.png", panels,
                        "Figure 7: standardised-probe accuracy per transformation value (mean over seeds)")
    curves = {f"{model}, {key}, seed {m['seed']}": m["learning_curve"]
              for (key, split, model), ms in sorted(found.items()) if split == "contiguous"
              for m in ms[:1] if m.get("learning_curve")}
    if curves:
        learning_curve_figure(out / "probe_vs_steps.png", curves, "Learning curves, contiguous split (first seed)")
    _write_summary(out, table1, table2, found, missing, models)
    regime = regimes.write(found, out, runs)
    return {"table1": table1, "table2": table2, "missing": missing, "regimes": regime}


def _write_summary(out, table1, table2, found, missing, models):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows2 = []
    for key in AXES:
        for model in models + CONTROLS:
            e = table2[key].get(model)
            if e is None:  # not run yet: listed under "Missing runs"
                continue
            get = lambda name, p: fmt_seeds((e.get(name) or {}).get(p)) if e else "-"  # noqa: E731
            run = ""
            if e is not None and model not in CONTROLS:
                secs = e["train_seconds"]["mean"] if e["train_seconds"] else float("nan")
                run = f"{'/'.join(map(str, e['epochs_trained']))} ep, {secs / 60:.0f} min"
            rows2.append([key, model, fmt_seeds(e["reference"]) if e else "-", fmt_seeds(e["standardised"]) if e else "-",
                          get("untrained", "reference"), get("untrained", "standardised"),
                          get("reference_selection", "standardised"),
                          fmt(PAPER_TABLE2[key].get(model.split(" ")[0])) if model not in CONTROLS else "", run])
    untrained1 = {key: untrained_distances(found, key) for key in AXES}
    rows1 = [[key] + [f"{fmt((table1[key] or {}).get(a))} / {fmt((untrained1[key] or {}).get(a))} "
                      f"({PAPER_TABLE1[key][a]})" for a in AXES] for key in AXES]
    t2 = markdown_table(["axis", "model", "reference probe", "standardised probe", "untrained, reference",
                         "untrained, standardised", "reference's selection, standardised", "paper", "run"], rows2)
    t1 = markdown_table(["trained on"] + list(AXES), rows1)
    for name, table in (("table2.md", t2), ("table1.md", t1)):  # the README embeds these verbatim
        atomic_write_text(table + "\n", out / name)
    projection_dims = sorted({m["config"]["z_dim"] for (_, _, model), ms in found.items() if model == "random-projection"
                              for m in ms}) or [next(iter(PRESETS.values())).z_dim]
    text = render_report(
        "mnist-report", projection_dim="/".join(map(str, projection_dims)), table2=t2, table1=t1, probe=PROBE,
        standardised=STANDARDISED_PROBE,
        figure7="![figure 7](figure7.png)" if (out / "figure7.png").exists() else "",
        curves="![learning curves](probe_vs_steps.png)" if (out / "probe_vs_steps.png").exists() else "",
        missing="\n".join(f"- `{c}`" for c in missing) if missing else "None.")
    write_report(out, text)


def pooling_table(folder) -> str:
    """Mean vs attention pooling from finished transformed-MNIST runs under ``folder`` (one subfolder per
    run): training seconds, validation loss per epoch, and both probes beside the untrained model's."""
    rows = []
    for run in sorted(Path(folder).iterdir()):
        path = run / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        acc, untrained = m["mean_unseen_accuracy"], m["untrained"]["mean_unseen_accuracy"]
        rows.append([f"`{run.name}`", m["config"].get("pooling", "mean"), m["epochs_trained"],
                     f"{m['train_seconds_total']:.0f}", " / ".join(f"{h['val_loss']:.1f}" for h in m["history"]),
                     *[f"{acc[p]:.3f} ({untrained[p]:.3f})" for p in PROBES]])
    return markdown_table(["run", "pooling", "epochs", "train s", "val loss by epoch",
                           *[f"{p} probe (untrained)" for p in PROBES]], rows)


def _experiment(key: str) -> Experiment:
    return Experiment(
        name=f"mnist-{key}",
        description=f"Transformed MNIST, {key}: train on seen {AXES[key]} values, linear probe on unseen "
                    "(Fig. 7, Tables 1-2)",
        presets=PRESETS, options=OPTIONS, run=make_run(key), report=report,
        default_out=lambda model="metavae", split="contiguous", **_: default_out(key, model, split),
    )


rotate, scale, shear = (_experiment(k) for k in AXES)
