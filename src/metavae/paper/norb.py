"""Small NORB (paper Figure 7, Tables 1 and 2): experiments norb-elevation, norb-azimuth,
norb-lighting. Each trains one convolutional model (``--model``) on the seen groups of one
meta-split (``--split``, docs/reproduction.md §5.2) and scores a linear probe on the unseen groups; a MetaVAE
on the interleaved split also measures Table 1's invariance distances.

Data: the real smallNORB read from ``--data-dir`` when given, otherwise ``synthnorb``, the
offline, procedurally rendered stand-in with NORB's structure (`metavae.paper.data.synthnorb`). The
two are *different data*: every metrics.json says which (``"data"``) and every report says so in
its title.

Images per group. A group (one value of the axis) holds 48600 / n_groups images per split (both
cameras): 5400 per elevation, 2700 per azimuth, 8100 per lighting. A preset may keep fewer
(``train_images``/``test_images`` per group); the kept images are chosen by their *other*
factors, (category, instance, camera and the two other axes), the same choice in every group,
balanced over the five categories and fixed by `DATA_SEED` (not the run's seed), so every model
and every run of one axis sees the same images and every group holds the same toys in the same
poses, only the axis value differs.

Table 1 (docs/reproduction.md §7.1 leaves NORB's base and image correspondence open; we state ours): for
each embedded axis, the base group is `BASE_GROUP` (elevation 50deg, the middle one; azimuth 0deg;
lighting 0), and the test image of group v showing toy (category, instance) from camera c with the
two other factors f is paired with the base-group test image with the same (category, instance,
camera, f) (`metavae.paper.data.norb.correspondence`). Distance = mean over pairs of
||mu(x_v) - mu(x_base)||_2, each image embedded with a context of 10 images of its own group's
test set; averaged over the non-base groups.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data.norb import (AXES, BASE_GROUP, CATEGORIES, IMAGE_SIZE, INFO_COLUMNS, N_CAMERAS, N_GROUPS, RAW_SIZE,
                         TEST_INSTANCES, TRAIN_INSTANCES, NorbData, NorbPart, group_key, correspondence, get_split,
                         group_names, group_values, norb_meta, resolve_split)
from .data.norb_loader import load_norb
from .data.transforms import data_fingerprint
from ..io import atomic_write_text
from ..models.registry import kind, model_names
from .base import Experiment
from .common import markdown_table, render_report, sci, write_metrics, write_report
from ..settings import config, flat, group, setting
from .invariance import (PROBE, PROBES, STANDARDISED_PROBE, ImageModel, InvarianceConfig, accuracy_figure, evaluate_run,
                         find_runs, fmt_seeds, gather_tables, invariance_distances, model_arguments, run_label,
                         snapshot_model, table2_models, train_on_seen, untrained_distances)

COLLAPSED_SPREAD = 0.1  # a MetaVAE embedding spread below this: the posterior collapsed onto the prior
DATA_SEED = 0  # which images a preset's per-group subset keeps (fixed across runs and models)
DATA_LABEL = {"smallnorb": "real smallNORB", "synthnorb": "synthnorb, the synthetic stand-in, NOT real smallNORB"}
TABLE2_MODELS = ("metavae", "vhe-vampprior", "vhe", "ns")
PAPER_TABLE2 = {  # mean unseen accuracy, contiguous split (paper Table 2, real smallNORB); NS not in Table 2
    "elevation": {"metavae": 0.601, "vhe-vampprior": 0.337, "vhe": 0.309, "ns": None},
    "azimuth": {"metavae": 0.592, "vhe-vampprior": 0.313, "vhe": 0.286, "ns": None},
    "lighting": {"metavae": 0.548, "vhe-vampprior": 0.357, "vhe": 0.306, "ns": None},
}
PAPER_TABLE1 = {  # rows = trained on, columns = embedded (paper Table 1, real smallNORB)
    "elevation": {"elevation": 0.39, "azimuth": 1.16, "lighting": 1.27},
    "azimuth": {"elevation": 1.42, "azimuth": 0.44, "lighting": 1.26},
    "lighting": {"elevation": 1.69, "azimuth": 1.27, "lighting": 0.26},
}
logger = logging.getLogger(__name__)
CORRESPONDENCE = ("a test image of group v is paired with the base group's test image of the same toy (category, "
                  "instance), camera and the two other factors")


@config
class NorbModel(ImageModel):
    """`ImageModel` plus the conv models' sizes."""
    channels: tuple = setting((64, 128, 256), help="conv stage widths (encoder and decoder trunks)")
    hidden: int = setting(400, help="width of the fully connected layers")
    c_dim: int = setting(300, help="NS / VHE context latent dimensions")


@config
class NorbConfig(InvarianceConfig):
    """`InvarianceConfig` with the conv models' sizes in its model group. ``train_images``/
    ``test_images`` are per group (None: the whole group); ``table1_images`` per group for Table 1
    (None: test_images)."""

    model: NorbModel = group(NorbModel(), *(f.name for f in dataclasses.fields(NorbModel)))
    n_components: int = 500  # VampPrior components (paper; the reference conv code used 10); the VHE+VampPrior only
    table1_images: int | None = None
    cameras: str = setting("all", choices=("all", "left", "right"), help="the cameras whose images are kept")


PRESETS = {
    # Narrow nets and 2000 images per group: `metavae run norb-lighting --preset quick` takes a few
    # minutes on 2 CPU cores. lr 1e-3 because it takes ~300 steps, not the paper's ~25000.
    # init="xavier" and free_bits=0.5 keep the conv MetaVAE's latent in use at this budget: with the
    # reference's init and the plain ELBO it collapsed onto the prior (embedding spread 0.005-0.009; see
    # the README). They apply to the MetaVAE and its control, the conv VAE, alike.
    "quick": NorbConfig(train_images=2000, test_images=500, table1_images=200, epochs=5, batch_size=32,
                        context_size=10, z_dim=40, lr=1e-3, context_pool=64, channels=(8, 16, 32), hidden=128,
                        c_dim=128, n_components=10, init="xavier", free_bits=0.5),
    # Full width (the paper's 64/128/256 convs, hidden 400) for 20 epochs, sized to train in about an
    # hour on a 2-core CPU: bf16 (about 2x on the conv step, docs/performance.md §4), a context pool,
    # and 500 images per group (16 steps per epoch); a step costs K, the seen groups (lighting 3,
    # elevation 5, azimuth 9). The reference's init: at full width the baselines' xavier init
    # diverged at lr 1e-3 (loss 1.6e3, then 8e9 at step 2, in fp32 and bf16 alike); free bits as quick.
    "hour": NorbConfig(train_images=500, test_images=250, table1_images=100, epochs=20, batch_size=32,
                       context_size=10, z_dim=40, lr=1e-3, context_pool=64, init="default", free_bits=0.5,
                       amp="bf16"),
    # The paper's protocol (docs/reproduction.md §0, 3): full groups, full-width convs, batch 32, 100 epochs.
    "paper": NorbConfig(train_images=None, test_images=None, epochs=100, batch_size=32, context_size=10, z_dim=40,
                        lr=2e-4),
}
OPTIONS = {"model", "split", "data_dir"}


def model_kwargs(model: str, cfg: NorbConfig) -> dict:
    """The `make_model` arguments beyond the model group (which `train_on_seen` passes as it is):
    the VampPrior's components, for the VHE+VampPrior only (the plain VHE's builder takes the
    argument too, and its saved config must not change)."""
    return {"n_components": cfg.n_components} if model == "vhe-vampprior" else {}


def data_name(data_dir) -> str:
    return "smallnorb" if data_dir is not None else "synthnorb"


def default_out(axis: str, model: str, split: str, data_dir=None) -> Path:
    return Path("runs") / f"norb-{axis}" / data_name(data_dir) / resolve_split(split) / model


# --- data -----------------------------------------------------------------------------------
def subset_mask(part: NorbPart, axis: str, n: int | None, seed: int = DATA_SEED) -> torch.Tensor:
    """Rows of ``part`` to keep so that every ``axis`` group holds (at most) ``n`` images, the same
    (category, instance, camera, two other factors) in every group, balanced over categories.

    The kept keys are a seeded random draw, round robin over the categories; keys present in more
    groups come first (all keys are in every group of the official data and of synthnorb, so this
    only matters for a partial copy)."""
    if n is None:
        return torch.ones(len(part), dtype=torch.bool)
    key = group_key(part.info, axis)
    uniq, inverse = torch.unique(key, return_inverse=True)
    if n >= len(uniq):
        return torch.ones(len(part), dtype=torch.bool)
    cat = torch.zeros(len(uniq), dtype=torch.long)
    cat[inverse] = part.labels
    groups = torch.bincount(inverse, minlength=len(uniq))  # a key occurs once per group that holds it
    perm = torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))
    rank = torch.empty(len(uniq), dtype=torch.long)
    for c in cat.unique():
        members = perm[cat[perm] == c]
        rank[members] = torch.arange(len(members))
    order = (groups.max() - groups) * (8 * len(uniq) + 8) + rank * 8 + cat  # round robin over the categories
    keep = torch.zeros(len(uniq), dtype=torch.bool)
    keep[torch.argsort(order)[:n]] = True
    return keep[inverse]


def _sub(part: NorbPart, mask: torch.Tensor) -> NorbPart:
    return NorbPart(part.images[mask], part.info[mask])


def subset(data: NorbData, axis: str, train_images: int | None, test_images: int | None) -> NorbData:
    return NorbData(data.name, _sub(data.train, subset_mask(data.train, axis, train_images)),
                    _sub(data.test, subset_mask(data.test, axis, test_images)), data.source, data.meta)


def _groups(ds, part: str) -> list:
    """[(images (n, 1, S, S) uint8, labels (n,))] per distribution of a MetaDataset part."""
    p = ds.part(part)
    return [(p.data[k, :n], p.labels[k, :n]) for k, n in enumerate(p.lengths.tolist())]


def table1_groups(data: NorbData, cfg: NorbConfig) -> tuple[dict, dict, dict]:
    """(test_by_axis, pairs, n_images): every group of every axis (test split, ``table1_images``
    per group) and, per non-base group, its image pairs with the base group."""
    n = cfg.table1_images if cfg.table1_images is not None else cfg.test_images
    test_by_axis, pairs, sizes = {}, {}, {}
    for axis in AXES:
        part = _sub(data.test, subset_mask(data.test, axis, n))
        col = part.info[:, INFO_COLUMNS.index(axis)]
        groups = {g: torch.nonzero(col == g).flatten() for g in range(N_GROUPS[axis])}
        test_by_axis[axis] = {g: part.images[idx].unsqueeze(1) for g, idx in groups.items()}
        base = groups[BASE_GROUP[axis]]
        pairs[axis] = {g: correspondence(part.info[idx], part.info[base], axis)
                       for g, idx in groups.items() if g != BASE_GROUP[axis]}
        sizes[axis] = {"images_per_group": len(base),
                       "pairs_per_group": min(len(p[0]) for p in pairs[axis].values())}
    return test_by_axis, pairs, sizes


# --- one run --------------------------------------------------------------------------------
def make_run(axis: str):
    def run(cfg: NorbConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True,
            model: str = "metavae", split: str = "contiguous", data_dir=None) -> dict:
        if model not in model_names():
            raise ValueError(f"unknown model '{model}'; choose from {', '.join(model_names())}")
        split = resolve_split(split)
        seen, unseen = get_split(axis, split)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        full = load_norb(data_dir, cameras=cfg.cameras)
        data = subset(full, axis, cfg.train_images, cfg.test_images)
        meta = norb_meta(data, axis, split)
        values, names = group_values(axis), group_names(axis)
        train, val = _groups(meta.dataset, "train"), _groups(meta.dataset, "test")
        smallest = min(len(x) for x, _ in train)
        if cfg.context_pool is not None and cfg.context_pool > smallest:  # a pool cannot exceed a group
            cfg = replace(cfg, context_pool=smallest)
        kw = model_kwargs(model, cfg)
        info = {"experiment": f"norb-{axis}", "split": split, "data": _data_record(full)}
        trained, history, seconds, trainer = train_on_seen(
            model, "conv", [x for x, _ in train], [x for x, _ in val], [names[g] for g in seen], cfg, out, seed,
            device, progress, model_kwargs=kw, run_info=info)
        trained.to(device)
        utrain, utest = _groups(meta.unseen_dataset, "train"), _groups(meta.unseen_dataset, "test")
        probe_data = {values[g]: (utrain[i], utest[i]) for i, g in enumerate(unseen)}
        metrics = evaluate_run(trained, trainer, probe_data, [values[g] for g in unseen], cfg, seed, device, progress)
        metrics.update({
            "data_record": info["data"], "model": model, "label": run_label(model, cfg, next(iter(PRESETS.values()))), "split": split, "axis": axis, "data": full.name, "data_source": full.source,
            "seen": [values[g] for g in seen], "unseen": [values[g] for g in unseen],
            "seen_groups": list(seen), "unseen_groups": list(unseen),
            "train_images_per_value": len(train[0][0]), "test_images_per_value": len(val[0][0]),
            # summed over the epochs' records, so a resumed run reports its whole training time
            "epochs": cfg.epochs, "epochs_trained": history[-1]["epoch"] if history else 0,
            "train_seconds": round(sum(h.get("seconds", 0.0) for h in history) or seconds, 1),
            "seed": seed, "probes": {"reference": PROBE, "standardised": STANDARDISED_PROBE},
            "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in model_arguments(model, "conv", cfg, kw).items()},
            "n_parameters": sum(p.numel() for p in trained.parameters()),
            "config": flat(cfg), "history": history,
        })
        if split == "interleaved" and model == "metavae":  # Table 1 (the reference forces 'standard')
            _add_table1(metrics, trained, trainer, full, cfg, seed, device)
        write_metrics(out, metrics)
        accuracy_figure(out / "accuracy.png", [{
            "title": f"{axis}, {split}", "values": values, "seen": metrics["seen"],
            "curves": {f"{model} ({p})": {int(float(v)): a for v, a in metrics["accuracy"][p].items()} for p in PROBES}}],
            f"NORB {axis} on {full.name}: linear-probe accuracy on unseen groups, {model}")
        has_examples = _example_grid(out / "examples.png", full)
        write_report(out, _report(metrics, has_examples))
        return metrics

    return run


def _data_record(full: NorbData) -> dict:
    """What data a run used (name, source, sizes, fingerprints): part of its identity and metrics."""
    return {"name": full.name, "source": str(full.source), "train_images": int(len(full.train.images)),
            "test_images": int(len(full.test.images)), "train_sha256": data_fingerprint(full.train.images),
            "test_sha256": data_fingerprint(full.test.images)}


def _add_table1(metrics: dict, trained, trainer, full: NorbData, cfg: NorbConfig, seed: int, device) -> None:
    """Table 1's row: the mean distance of each axis's embeddings to the base group's, for the
    trained model and its untrained control (same seed and init, step 0)."""
    test_by_axis, pairs, sizes = table1_groups(full, cfg)
    metrics["invariance_distance"] = invariance_distances(trained, test_by_axis, BASE_GROUP, cfg, seed,
                                                          device, pairs=pairs)
    untrained = snapshot_model(trained, trainer, 0)
    if untrained is not None and "untrained" in metrics:
        metrics["untrained"]["invariance_distance"] = invariance_distances(
            untrained, test_by_axis, BASE_GROUP, cfg, seed, device, pairs=pairs)
    metrics["table1"] = {"base_group": {a: group_names(a)[BASE_GROUP[a]] for a in AXES},
                         "correspondence": CORRESPONDENCE, "groups": sizes}


def _example_grid(path: Path, data: NorbData) -> bool:
    """The data along each axis (one figure per axis), from the data this run used. A figure that
    cannot be drawn (a partial copy of the data) is logged, never fatal: the numbers are written."""
    from .data.synthnorb import save_example_grid

    try:
        save_example_grid(path, data)
    except (ValueError, RuntimeError, IndexError) as exc:
        logger.warning("no example grid for %s: %s", data.name, exc)
        return False
    return True


def _title_data(name: str) -> str:
    return DATA_LABEL.get(name, name)


def _report(m: dict, has_examples: bool = True) -> str:
    """A run's report.md (templates/norb-run.md and its sections) from its metrics."""
    acc, un = m["accuracy"], m.get("untrained")
    rows = [[v] + [f"{acc[p][v]:.3f}" for p in PROBES] + ([f"{un['accuracy'][p][v]:.3f}" for p in PROBES] if un else [])
            for v in acc["reference"]]
    real = m["data"] == "smallnorb"
    paper = PAPER_TABLE2[m["axis"]].get(m["model"]) if m["split"] == "contiguous" else None
    paper_txt = "" if paper is None else PAPER_NOTE.format(paper=paper, data="" if real else OTHER_DATA)
    table = markdown_table([f"unseen {m['axis']}"] + [f"{p} probe" for p in PROBES]
                           + ([f"untrained, {p}" for p in PROBES] if un else []), rows)
    sections = ([render_report("norb-run-examples", data=m["data"])] if has_examples else []) + \
        ([_table1_section(m)] if "invariance_distance" in m else [])
    return render_report("norb-run", m=m, title=_title_data(m["data"]), synthetic_note="" if real else SYNTHETIC_NOTE,
                         n_unseen=len(m["unseen"]), paper=paper_txt, n_seen=len(m["seen"]),
                         seen=", ".join(map(str, m["seen"])), table=table, spread=_spread_text(m),
                         sections="".join("\n\n" + s.rstrip("\n") for s in sections),
                         differences="\n".join(differences(m))).rstrip("\n")


# the per-run report's conditional sentences (str.format templates)
SYNTHETIC_NOTE = (" synthnorb is a procedurally rendered stand-in with NORB's structure; its numbers are not comparable "
                  "to the paper's, which are on real smallNORB.")
PAPER_NOTE = " (paper Table 2: {paper}{data})"
OTHER_DATA = ", on real smallNORB: different data"
SPREAD = ("Embedding spread: the per-dimension standard deviation of the embeddings across the unseen test "
          "images, averaged over dimensions and groups, is {spread:.3g}.")
SPREAD_PRIOR = (" Under the MetaVAE's N(0, I) prior a latent dimension in use has a spread of about 1; near 0 means "
                "the posterior collapsed onto the prior and the probe reads only residual signal.")
COLLAPSED = " **The representation has collapsed.**"


def _table1_section(m: dict) -> str:
    d, t1 = m["invariance_distance"], m["table1"]
    d0 = (m.get("untrained") or {}).get("invariance_distance") or {}
    table = markdown_table(["embedded axis", f"ours ({m['data']})", "untrained", "paper (real smallNORB)",
                            "images/group"],
                           [[a, f"{d[a]:.3f}", f"{d0[a]:.3f}" if a in d0 else "-", PAPER_TABLE1[m["axis"]][a],
                             t1["groups"][a]["images_per_group"]] for a in AXES])
    return render_report("norb-run-table1", base_groups=", ".join(t1["base_group"].values()),
                         correspondence=t1["correspondence"], context_size=m["config"]["context_size"], table=table)


def _spread_text(m: dict) -> str:
    text = SPREAD.format(spread=m["embedding_std"])
    if m["model"] not in ("metavae", "vae"):  # p(z | c) is learned: no fixed scale to compare with
        return text
    return text + SPREAD_PRIOR + (COLLAPSED if m["embedding_std"] < COLLAPSED_SPREAD else "")


# the conditional bullets of "Differences from the paper and the reference" (str.format templates)
DIFFERENCE_NOTES = {
    "synthnorb": "- **Data: synthnorb, not smallNORB** (the official files cannot be downloaded here): same structure "
                 "({categories} categories x {instances} instances, {elevation} elevations, {azimuth} azimuths, "
                 "{lighting} lightings, {cameras} cameras, {size}x{size}), different images.",
    "reduced": "- Reduced preset (paper's values in brackets): conv widths {channels} [{paper.channels}], hidden "
               "{cfg[hidden]} [{paper.hidden}], c_dim {cfg[c_dim]} [{paper.c_dim}], {cfg[train_images]} train / "
               "{cfg[test_images]} test images per group [all], {cfg[epochs]} epochs [{paper.epochs}], lr {cfg[lr]} "
               "[{paper_lr}]. A subset keeps the same toys, poses and cameras in every group, balanced over the "
               "categories.",
    "vampprior": "- VampPrior with {cfg[n_components]} components (paper 500, reference conv code 10).",
    "pool": "- Training contexts drawn from a shared pool of {cfg[context_pool]} images per group and step (each "
            "query's {cfg[context_size]} context images are still a uniform draw; a speed option).",
    "table1": "- Table 1: base groups and image correspondence are our choice (the reference's distance code is not "
              "public): {base_groups}; {correspondence}.",
}


def differences(m: dict) -> list[str]:
    cfg, paper = m["config"], PRESETS["paper"]
    out = []
    if m["data"] != "smallnorb":
        out.append(DIFFERENCE_NOTES["synthnorb"].format(
            categories=len(CATEGORIES), instances=len(TRAIN_INSTANCES) + len(TEST_INSTANCES), cameras=N_CAMERAS,
            size=IMAGE_SIZE, **N_GROUPS))
    if not (cfg["train_images"] is None and tuple(cfg["channels"]) == paper.channels and cfg["hidden"] == paper.hidden):
        out.append(DIFFERENCE_NOTES["reduced"].format(cfg=cfg, channels=tuple(cfg["channels"]), paper=paper,
                                                      paper_lr=sci(paper.lr)))
    if m["model"] == "vhe-vampprior":
        out.append(DIFFERENCE_NOTES["vampprior"].format(cfg=cfg))
    if cfg.get("context_pool") and kind(m["model"]).uses_context:
        out.append(DIFFERENCE_NOTES["pool"].format(cfg=cfg))
    out += render_report("norb-differences", probe=PROBE, standardised=STANDARDISED_PROBE, raw=RAW_SIZE,
                         size=IMAGE_SIZE).rstrip("\n").split("\n")
    if "invariance_distance" in m:
        out.append(DIFFERENCE_NOTES["table1"].format(base_groups=", ".join(m["table1"]["base_group"].values()),
                                                     correspondence=CORRESPONDENCE))
    return out


# --- `metavae report norb` ------------------------------------------------------------------
def _find(runs: Path) -> dict:
    """{data: {(axis, split, model): [metrics, ...]}} (one per seed)."""
    found: dict = {}
    for key, ms in find_runs(runs, tuple(DATA_LABEL)).items():
        for m in ms:
            if m["axis"] in AXES:
                found.setdefault(m["data"], {}).setdefault(key, []).append(m)
    return found


def report(runs: Path = Path("runs"), out: Path | None = None) -> dict:
    """Gather finished runs into the NORB rows of Tables 1 and 2 and Figure 7, beside the paper's.

    The tables come from real smallNORB runs when there are any, else from synthnorb runs (and say
    so); runs of the other data, if any, get the same files in ``out/<data>/``."""
    runs = Path(runs)
    out = Path(out) if out is not None else runs / "norb-report"
    found = _find(runs)
    primary = "smallnorb" if "smallnorb" in found else "synthnorb"
    result = _report_one(found.get(primary, {}), primary, out)
    for other in found:
        if other != primary:
            _report_one(found[other], other, out / other)
    return result


def _report_one(found: dict, data: str, out: Path) -> dict:
    flag = "" if data == "synthnorb" else " --data-dir DIR"
    models = table2_models(found, TABLE2_MODELS)
    table1, table2, missing = gather_tables(found, AXES, models, "norb", out, flag)
    (out / "tables.json").write_text(json.dumps({
        "data": data, "data_label": DATA_LABEL[data], "table1": table1, "table2": table2,
        "paper_table1": PAPER_TABLE1, "paper_table2": PAPER_TABLE2, "paper_data": "smallnorb",
        "table1_base_group": {a: group_names(a)[BASE_GROUP[a]] for a in AXES},
        "table1_correspondence": CORRESPONDENCE, "missing": missing}, indent=2) + "\n")
    panels = []
    for axis in AXES:
        for split in ("interleaved", "sparse", "contiguous"):
            curves = {model: {int(float(v)): float(np.mean([m["accuracy"]["standardised"][v] for m in ms]))
                              for v in ms[0]["accuracy"]["standardised"]}
                      for (a_, s, model), ms in found.items() if a_ == axis and s == split}
            if curves:
                seen = [group_values(axis)[g] for g in get_split(axis, split)[0]]
                panels.append({"title": f"{axis}, {split}", "values": group_values(axis), "seen": seen,
                               "curves": curves})
    if panels:
        accuracy_figure(out / "figure7.png", panels,
                        f"Figure 7 (NORB) on {data}: linear-probe accuracy per group")
    examples = next((Path(m["_path"]) / "examples.png" for ms in found.values() for m in ms
                     if (Path(m["_path"]) / "examples.png").exists()), None)
    if examples is not None:
        shutil.copyfile(examples, out / "examples.png")
    _write_summary(out, data, table1, table2, found, missing, models)
    return {"table1": table1, "table2": table2, "missing": missing, "data": data}


def _write_summary(out, data, table1, table2, found, missing, models):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    real = data == "smallnorb"
    rows2 = []
    for axis in AXES:
        for model in models:
            if model not in TABLE2_MODELS and not table2[axis][model]:
                continue  # a variant is shown on the axes it was run on
            ms, e = found.get((axis, "contiguous", model), []), table2[axis][model]
            run = "" if not ms else (f"{ms[0]['epochs_trained']} ep, {ms[0]['train_images_per_value']} img/group, "
                                     f"spread {fmt_seeds(e['embedding_std'], 2)}")
            rows2.append([axis, model] + [fmt_seeds(e[p]) if e else "-" for p in PROBES]
                         + [fmt_seeds(e["untrained"]["standardised"]) if e and e.get("untrained") else "-",
                            fmt(PAPER_TABLE2[axis].get(model)), run])
    untrained1 = {axis: untrained_distances(found, axis) for axis in AXES}
    rows1 = [[axis] + [f"{fmt((table1[axis] or {}).get(a))} / {fmt((untrained1[axis] or {}).get(a))} "
                       f"({PAPER_TABLE1[axis][a]})" for a in AXES] for axis in AXES]
    ours = f"ours ({data})"
    t2 = markdown_table(["axis", "model", f"{ours}, reference probe", "standardised probe", "untrained, standardised",
                         "paper (real smallNORB)", "run"], rows2)
    t1 = markdown_table(["trained on"] + list(AXES), rows1)
    for name, table in (("table2.md", t2), ("table1.md", t1)):  # the README embeds table2.md verbatim
        atomic_write_text(table + "\n", out / name)
    spread1 = {a: float(np.mean([m["embedding_std"] for m in found[(a, "interleaved", "metavae")]])) for a in AXES
               if found.get((a, "interleaved", "metavae"))}
    collapsed = [a for a, v in spread1.items() if v < COLLAPSED_SPREAD]
    note1 = SPREAD1.format(spreads=", ".join(f"{a} {v:.2g}" for a, v in spread1.items())) if spread1 else ""
    if collapsed:
        note1 += COLLAPSED1.format(axes=", ".join(collapsed))
    text = render_report(
        "norb-report", title=_title_data(data), warning="" if real else SYNTHETIC_WARNING, table2=t2, ours=ours,
        table1=t1, note1=note1, base_groups=", ".join(group_names(a)[BASE_GROUP[a]] for a in AXES),
        correspondence=CORRESPONDENCE,
        figure7="![figure 7](figure7.png)" if (out / "figure7.png").exists() else "",
        examples=f"![{data} examples](examples.png)" if (out / "examples.png").exists() else "",
        missing="\n".join(f"- `{c}`" for c in missing) if missing else "None.")
    write_report(out, text)


# `metavae report norb`'s conditional sentences (str.format templates)
SPREAD1 = "Embedding spread of the Table 1 models: {spreads}."
COLLAPSED1 = (" **Collapsed ({axes}): those embeddings all sit near the prior mean, so their distances are small for "
              "that reason, not because of invariance.**")
SYNTHETIC_WARNING = (
    "**These numbers are on synthnorb, a procedurally rendered stand-in with NORB's structure, NOT on real "
    "smallNORB.** The paper's numbers beside them are on real smallNORB: different data, so the values are not "
    "comparable; only qualitative patterns (which model leads in Table 2, whether the diagonal of Table 1 is "
    "smallest) can be set side by side. Pass `--data-dir` with the official files to run on real smallNORB.")


def _experiment(axis: str) -> Experiment:
    return Experiment(
        name=f"norb-{axis}",
        description=f"Small NORB, {axis} (real smallNORB with --data-dir, else synthnorb): train on seen groups, "
                    "linear probe on unseen (Fig. 7, Tables 1-2)",
        presets=PRESETS, options=OPTIONS, run=make_run(axis), report=report,
        default_out=lambda model="metavae", split="contiguous", data_dir=None, **_: default_out(
            axis, model, split, data_dir),
    )


elevation, azimuth, lighting = (_experiment(a) for a in AXES)
