"""Transformation invariance (paper section "Learning Invariant Representations"): the machinery
shared by transformed MNIST and small NORB.

Each value of one transformation axis (a rotation angle, a NORB lighting condition, ...) defines a
distribution. A model is trained on the *seen* values; its representation is judged on the
*unseen* ones by a linear probe (class labels from embeddings) and, for Table 1, by how far an
image's embedding moves when only the transformation changes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.meta import MetaDataset, Part, as_float
from ..models import make_model
from ..train import Trainer, TrainConfig, seed_everything

# The probe: one-vs-rest liblinear logistic regression with sklearn's historic defaults (C=1, L2,
# tol 1e-4, max_iter 100). That is what the authors' sklearn (<= 0.21, 2019) ran for
# LogisticRegression(); newer sklearn silently switched to lbfgs/multinomial, so we pin it.
PROBE = "one-vs-rest liblinear logistic regression, C=1, tol=1e-4, max_iter=100 (sklearn <= 0.21 defaults)"


@dataclass(frozen=True)
class InvarianceConfig:
    train_images: int | None = 5000  # per transformation value (None: the whole split)
    test_images: int | None = 1000
    epochs: int = 5
    batch_size: int = 100
    context_size: int = 10
    z_dim: int = 40
    lr: float = 2e-4
    context_pool: int | None = None  # contexts drawn from P images per distribution and step (speed; every model)
    embed_chunk: int = 100  # images embedded together; the NS uses each chunk as its set
    init: str = "default"  # MetaVAE (and VAE) init: "default" (PyTorch's, the reference) or "xavier" (the baselines')
    selection: str = "best"  # "best": lowest val loss, mean c; "reference": the reference's highest val loss, sampled c


# Settings that change only the evaluation: a finished run may be re-scored under other values.
EVALUATION_ONLY = ("embed_chunk", "selection", "epochs")
# Weights kept for learning curves: after these fractions of the run's steps (0: untrained).
SNAPSHOT_FRACTIONS = (0.0, 1 / 16, 1 / 4, 1.0)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> tuple:
    """(train accuracy, test accuracy) of the pinned linear probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    clf = OneVsRestClassifier(LogisticRegression(solver="liblinear", C=1.0, tol=1e-4, max_iter=100))
    clf.fit(train_x, train_y)
    return float(clf.score(train_x, train_y)), float(clf.score(test_x, test_y))


@torch.no_grad()
def embed_images(model, images: torch.Tensor, context_size: int, generator: torch.Generator,
                 chunk: int = 100, device="cpu") -> torch.Tensor:
    """Embeddings (n, dz) of ``images`` (n, *event) of one distribution, each image with a context
    set of ``context_size`` images drawn without replacement from the same tensor (the query may
    be among them, as in the reference). Models without separate contexts (the Neural
    Statistician) embed each chunk of ``chunk`` images in order as one set, as the reference did."""
    model.eval()
    part = Part([images], None, "embed").to(device)
    uses_context = getattr(model, "uses_context", True)
    out = []
    for start in range(0, len(images), chunk):
        idx = torch.arange(start, min(start + chunk, len(images)), device=part.data.device).unsqueeze(0)
        x = as_float(part.gather(idx))
        ctx = as_float(part.gather(part.sample_context(idx, context_size, generator))) if uses_context else None
        out.append(model.embed(x, ctx)[0].float().cpu())
    return torch.cat(out)


def probe_unseen(model, data: dict, unseen: Sequence, cfg: InvarianceConfig, seed: int, device, progress=True,
                 spread: dict | None = None):
    """Linear-probe test accuracy per unseen value: embed the value's train part (contexts from its
    train part) and test part (contexts from its test part), fit on train, score on test.
    ``spread``, if given, receives per value the mean over dimensions of the standard deviation of
    the test embeddings across images (about 1 for a latent dimension in use under an N(0, I)
    prior; near 0 when the posterior has collapsed onto the prior)."""
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed + 5)
    acc = {}
    for v in tqdm(unseen, desc="probe", disable=not progress, leave=False):
        (tr_x, tr_y), (te_x, te_y) = data[v]
        ztr = embed_images(model, tr_x, cfg.context_size, gen, cfg.embed_chunk, device)
        zte = embed_images(model, te_x, cfg.context_size, gen, cfg.embed_chunk, device)
        acc[v] = fit_probe(ztr.numpy(), tr_y.numpy(), zte.numpy(), te_y.numpy())[1]
        if spread is not None:
            spread[v] = float(zte.std(dim=0).mean())
    return acc


def invariance_distances(model, test_by_axis: dict, base: dict, cfg: InvarianceConfig, seed: int, device,
                         pairs: dict | None = None) -> dict:
    """Table 1: for each axis, the mean over non-base values v of the mean over test images of
    ||mu(T_v x) - mu(T_base x)||_2, each embedding with a context from its own value's test set.

    Without ``pairs``, ``test_by_axis[axis][v]`` are the same images (same order) under value v
    (transformed MNIST). With ``pairs[axis][v] = (iv, ib)``, index tensors into value v's and the
    base value's images, the groups may hold different images and row iv[j] of v corresponds to
    row ib[j] of the base (small NORB: same toy, camera and other factors); every group is
    embedded whole (its contexts drawn from all of it), then the pairs are compared."""
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    out = {}
    for axis, by_value in test_by_axis.items():
        ref = embed_images(model, by_value[base[axis]], cfg.context_size, gen, cfg.embed_chunk, device)
        dists = []
        for v, imgs in by_value.items():
            if v == base[axis]:
                continue
            z = embed_images(model, imgs, cfg.context_size, gen, cfg.embed_chunk, device)
            if pairs is None:
                dists.append((z - ref).norm(dim=1).mean())
            else:
                iv, ib = pairs[axis][v]
                if len(iv) == 0:
                    raise ValueError(f"Table 1: no image of {axis} value {v} corresponds to one of the base value")
                dists.append((z[iv] - ref[ib]).norm(dim=1).mean())
        out[axis] = float(torch.stack(dists).mean())
    return out


# Each model kind's init stream is offset from the run seed, so that kinds sharing parts (the VHE
# and the VHE+VampPrior) do not start from bit-identical weights.
INIT_STREAM = {"metavae": 0, "vae": 0, "ns": 0, "vhe": 0, "vhe-vampprior": 7919}


def training_settings(cfg: InvarianceConfig) -> dict:
    """The settings that change a run's trained weights (what a resume must match)."""
    return {k: v for k, v in asdict(cfg).items() if k not in EVALUATION_ONLY}


def train_on_seen(model_name: str, arch: str, train_sets: list, val_sets: list, names: list, cfg: InvarianceConfig,
                  out: Path, seed: int, device: str, progress: bool, model_kwargs: dict | None = None,
                  run_info: dict | None = None):
    """Build ``model_name`` and train it through the one Trainer on the seen distributions, with
    the seen values' test parts as validation (the reference's protocol). ``model_kwargs`` go to
    `make_model` (e.g. conv ``channels``, ``hidden``, ``c_dim``, ``n_components``). Keeps
    snapshots at `SNAPSHOT_FRACTIONS` of the run (learning curves) and the reference's pick.
    Returns (model with the best weights, history, seconds, trainer)."""
    data = MetaDataset.from_parts(train=train_sets, val=val_sets, names=names)
    seed_everything(seed + INIT_STREAM.get(model_name, 0))
    event = tuple(train_sets[0].shape[1:])
    kwargs = dict(model_kwargs or {})
    if model_name in ("metavae", "vae"):
        kwargs.setdefault("init", cfg.init)
    elif cfg.init != "default":
        raise ValueError(f"init={cfg.init!r} applies to the MetaVAE and the VAE; the {model_name} always uses the "
                         "reference's Xavier init")
    model = make_model(model_name, arch=arch, event_shape=event, n_distributions=len(train_sets), z_dim=cfg.z_dim,
                       **kwargs)
    steps = cfg.epochs * data.steps_per_epoch(cfg.batch_size)
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, context_size=cfg.context_size, lr=cfg.lr,
                     context_pool=cfg.context_pool, seed=seed, device=device, keep_worst=True,
                     snapshot_steps=tuple(sorted({round(f * steps) for f in SNAPSHOT_FRACTIONS})))
    info = dict(run_info or {}, model=model_name, arch=arch, seed=seed, settings=training_settings(cfg))
    t0 = time.time()
    trainer = Trainer(model, data, tc, out_dir=out / "checkpoints", progress=progress, desc=model_name, run_info=info)
    history = trainer.fit()
    return model, history, time.time() - t0, trainer


def accuracy_figure(path: Path, panels: list, title: str) -> None:
    """Figure 7 style: one panel per (axis, split); accuracy per value for each model, seen values
    shaded. ``panels``: [{"title", "values", "seen", "curves": {model: {value: acc}}}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .common import save_figure

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    order = ["metavae", "vhe-vampprior", "vhe", "ns", "vae"]
    names = order + sorted({n for panel in panels for n in panel["curves"]} - set(order))
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per model in every panel
    for ax, panel in zip(axes.flat, panels):
        values = list(panel["values"])
        pos = {v: i for i, v in enumerate(values)}
        for v in panel["seen"]:
            ax.axvspan(pos[v] - 0.5, pos[v] + 0.5, color="#dddddd", lw=0)
        for name, accs in sorted(panel["curves"].items(), key=lambda kv: names.index(kv[0])):
            xs = [pos[v] for v in values if v in accs]
            ax.plot(xs, [accs[v] for v in values if v in accs], "o-", ms=3, label=name, color=color[name])
        ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel("probe accuracy")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title + " (grey: seen values)")
    fig.tight_layout()
    save_figure(fig, path)


def gather_tables(found: dict, axes, models, experiment: str, out: Path, flag: str = "") -> tuple:
    """Table 2 (contiguous mean unseen accuracy per axis and model) and Table 1 (the interleaved
    MetaVAE's invariance distances per axis) from finished runs ``found[(axis, split, model)]``,
    written as table1.json / table2.json; also the commands that would make the missing runs."""
    from ..train import atomic_write_text

    table2, table1, missing = {}, {}, []
    for axis in axes:
        table2[axis] = {}
        for model in models:
            m = found.get((axis, "contiguous", model))
            table2[axis][model] = None if m is None else m["mean_unseen_accuracy"]
            if m is None:
                missing.append(f"metavae run {experiment}-{axis} --split contiguous --model {model}{flag}")
        m = found.get((axis, "interleaved", "metavae"))
        table1[axis] = None if m is None else m.get("invariance_distance")
        if m is None:
            missing.append(f"metavae run {experiment}-{axis} --split interleaved --model metavae{flag}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(table1, indent=2) + "\n", out / "table1.json")
    atomic_write_text(json.dumps(table2, indent=2) + "\n", out / "table2.json")
    return table1, table2, missing
