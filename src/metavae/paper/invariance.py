"""Transformation invariance (paper section "Learning Invariant Representations"): the machinery
shared by transformed MNIST and small NORB.

Each value of one transformation axis (a rotation angle, a NORB lighting condition, ...) defines a
distribution. A model is trained on the *seen* values; its representation is judged on the
*unseen* ones by a linear probe (class labels from embeddings) and, for Table 1, by how far an
image's embedding moves when only the transformation changes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.meta import MetaDataset, Part, PooledContext, as_float
from ..models import make_model
from ..models.registry import kind as model_kind
from ..models.registry import model_kinds
from ..models.base import INITS, POOLINGS
from ..probes import STANDARDISED_CS, standardised_probes
from ..settings import config, flat, group, setting
from ..training import Trainer, TrainConfig, load_checkpoint, seed_everything

# Two linear probes read every embedding (docs/reproduction.md §13):
# * reference: one-vs-rest liblinear logistic regression with sklearn's historic defaults (C=1, L2,
#   tol 1e-4, max_iter 100), what the authors' sklearn (<= 0.21, 2019) ran for LogisticRegression().
#   Kept for comparability with the paper; its fixed L2 penalty punishes embeddings of small scale.
# * standardised: features standardised on the probe's train embeddings, multinomial logistic
#   regression with C chosen by 3-fold cross-validation on those train embeddings only. Invariant to
#   the embedding's scale, so it compares models whose latents have different spreads.
PROBES = ("reference", "standardised")
PROBE = "one-vs-rest liblinear logistic regression, C=1, tol=1e-4, max_iter=100 (sklearn <= 0.21 defaults)"
# Probes of a learning curve's points between its ends (the untrained and the selected weights get
# both): the standardised probe does not depend on the embedding's scale, which drifts as training
# goes on, and the pinned liblinear fits were the largest part of a MetaVAE's evaluation before
# (docs/performance.md §6).
CURVE_PROBES = ("standardised",)
STANDARDISED_PROBE = ("features standardised on the train embeddings; multinomial logistic regression, C from "
                      "{0.01, 0.1, 1, 10} by 3-fold cross-validation on the train embeddings")

@config
class ImageData:
    """Which images a run trains and probes on."""
    train_images: int | None = setting(5000, help="images per transformation value (null: the whole split)")
    test_images: int | None = setting(1000, help="test images per value (null: the whole split)")
    seen: int | None = setting(None, help="train on K of the split's seen values, spread out, at the same steps and "
                                          "images per step")


@config
class ImageModel:
    """What every model of the comparison is built with (each kind takes those its builder has)."""
    z_dim: int = setting(40, help="latent dimensions")
    init: str = setting("default", choices=INITS, help="MetaVAE and VAE only: default (PyTorch's, the reference) or "
                                                      "xavier (the baselines', always used by NS/VHE)")
    free_bits: float = setting(0.0, zero=True, help="MetaVAE and VAE training only: each latent dim's KL counts as "
                                                    ">= this many nats")
    pooling: str = setting("mean", choices=POOLINGS, help="MetaVAE, NS and VHE: how the context set is pooled, mean "
                                                          "(the paper's) or attention")


@config
class ImageEvaluation:
    """How the trained weights are scored; a finished run may be re-scored under other values."""
    embed_chunk: int = setting(100, help="images embedded together; the NS uses each chunk as its set")
    selection: str = setting("best", choices=("best", "reference"), help="best: lowest val loss, mean c; reference: "
                                                                         "the reference's highest val loss, sampled c")
    test_context_sizes: tuple = setting((), empty=True, help="also probe the selected weights with contexts of these "
                                                             "sizes")


@config
class InvarianceConfig:
    """An image experiment's settings in four groups (data, train, model, evaluation), each setting
    reached by its plain name (``--set z_dim=8``) or its group's (``--set model.z_dim=8``)."""
    data: ImageData = group(ImageData(), *(f.name for f in dataclasses.fields(ImageData)))
    # contexts drawn from context_pool images per distribution and step (speed; every model); the reference's pick
    # (worst.pt) kept beside the best
    train: TrainConfig = group(TrainConfig(epochs=5, batch_size=100, context_size=10, lr=2e-4, keep_worst=True),
                               "epochs", "batch_size", "context_size", "lr", "context_pool", "amp",
                               nonzero=("context_size",))
    model: ImageModel = group(ImageModel(), *(f.name for f in dataclasses.fields(ImageModel)))
    evaluation: ImageEvaluation = group(ImageEvaluation(), *(f.name for f in dataclasses.fields(ImageEvaluation)))

    def check(self) -> None:
        if self.seen is not None and self.seen < 1:
            raise ValueError(f"setting 'seen' must be at least 1, got {self.seen}")
        if any(not isinstance(n, int) or n < 1 for n in self.test_context_sizes):
            raise ValueError(f"setting 'test_context_sizes' must list sizes >= 1, got {list(self.test_context_sizes)}")
        if self.context_pool is not None and self.context_pool < self.context_size:
            raise ValueError(f"context_pool ({self.context_pool}) must hold at least context_size "
                             f"({self.context_size}) images")


# Settings that change only the evaluation: a finished run may be re-scored under other values.
EVALUATION_ONLY = tuple(f.name for f in dataclasses.fields(ImageEvaluation)) + ("epochs",)
# Weights kept for learning curves: untrained, at the end of the epochs nearest these fractions of the
# run, and at its end. At an epoch's end the validation loss is the one training computed (same fixed
# draws), so a curve point costs its probes only (docs/reproduction.md §13).
SNAPSHOT_FRACTIONS = (1 / 16, 1 / 4)


def snapshot_epochs(epochs: int, fractions: Sequence = SNAPSHOT_FRACTIONS) -> list:
    """The epochs (1 .. epochs - 1) whose ends are kept for a learning curve: each fraction's
    nearest epoch, at least the first, moved one later where an earlier fraction took it
    (10 epochs: 1 and 3; 5: 1 and 2; 100: 6 and 25; 1: none)."""
    chosen = []
    for f in fractions:
        e = max(int(np.floor(f * epochs + 0.5)), 1, chosen[-1] + 1 if chosen else 1)
        if e < epochs:
            chosen.append(e)
    return chosen


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of the pinned reference probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    clf = OneVsRestClassifier(LogisticRegression(solver="liblinear", C=1.0, tol=1e-4, max_iter=100))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def fit_probes_many(problems: Sequence, reference: bool = True) -> list:
    """Test accuracy under both probes for each ``(train_x, train_y, test_x, test_y)``:
    [{"reference": a, "standardised": b, "standardised_C": C}] (no "reference" without ``reference``).
    The standardised probes of all problems are one batched solve (`metavae.probes`); the reference
    probe stays liblinear."""
    problems = [(np.asarray(a, dtype=np.float64), np.asarray(b), np.asarray(c, dtype=np.float64), np.asarray(d))
                for a, b, c, d in problems]
    standardised = standardised_probes(problems, STANDARDISED_CS)
    return [({"reference": fit_probe(*p)} if reference else {}) | {"standardised": acc, "standardised_C": c}
            for p, (c, acc) in zip(problems, standardised)]


def fit_probes(train_x, train_y, test_x, test_y) -> dict:
    """`fit_probes_many` for one problem."""
    return fit_probes_many([(train_x, train_y, test_x, test_y)])[0]


# Queries a model encodes in one forward pass when it embeds (contexts are still drawn chunk by chunk,
# so the draws, and the embeddings, are those of one pass per chunk): larger products run faster.
EMBED_BATCH = 1000


@torch.no_grad()
def embed_images(model, images: torch.Tensor, context_size: int, generator: torch.Generator,
                 chunk: int = 100, device="cpu", sample_c: bool = False) -> torch.Tensor:
    """Embeddings (n, dz) of ``images`` (n, *event) of one distribution, each image with a context
    set of ``context_size`` images drawn without replacement from the same tensor (the query may
    be among them, as in the reference). Models without separate contexts (the Neural
    Statistician) embed each chunk of ``chunk`` images in order as one set, as the reference did.
    ``sample_c``: models with a context latent c embed with one sample of q(c | D), as the reference's
    baselines did, instead of its mean."""
    model.eval()
    part = Part([images], None, "embed").to(device)
    uses_context = getattr(model, "uses_context", True)
    # Models that pool per-element features (the MetaVAE, the VHEs) encode each image once for every
    # context it joins: the same contexts, the same sums, ~N times less work (docs/performance.md).
    cached = uses_context and not sample_c and getattr(model, "pool_features", None) is not None
    features = part.point_features(model.pool_features, max_bytes=None) if cached else None
    chunks = [torch.arange(s, min(s + chunk, len(images)), device=part.data.device).unsqueeze(0)
              for s in range(0, len(images), chunk)]
    contexts = [part.sample_context(idx, context_size, generator) for idx in chunks] if uses_context else None
    # a set-less model's chunk is its set; a sampled c draws from the global stream as it did, chunk by chunk
    per_pass = max(1, EMBED_BATCH // chunk) if uses_context and not sample_c else 1
    out = []
    for g in range(0, len(chunks), per_pass):
        idx = torch.cat(chunks[g:g + per_pass], dim=1)
        x = as_float(part.gather(idx))
        if not uses_context:
            ctx = None
        else:
            members = torch.cat(contexts[g:g + per_pass], dim=1)
            ctx = PooledContext(None, members, features) if features is not None else as_float(part.gather(members))
        z = model.embed(x, ctx, sample_c=True) if sample_c else model.embed(x, ctx)
        out.append(z[0].float().cpu())
    return torch.cat(out)


def probe_unseen(model, data: dict, unseen: Sequence, cfg: InvarianceConfig, seed: int, device, progress=True,
                 sample_c: bool = False, reference: bool = True) -> dict:
    """Both probes per unseen value: embed the value's train part (contexts from its train part) and
    test part (contexts from its test part), fit on train, score on test. Every value is embedded
    first, then all are probed in one batched solve. Per value:
    {"reference", "standardised", "standardised_C", "spread"}; ``spread`` is the mean over
    dimensions of the standard deviation of the test embeddings across images (about 1 for a
    latent dimension in use under an N(0, I) prior; near 0 when the posterior has collapsed).
    ``reference=False``: the standardised probe only."""
    from tqdm.auto import tqdm

    gen = torch.Generator(device=device).manual_seed(seed + 5)
    embedded, spread = {}, {}
    for v in tqdm(unseen, desc="embed", disable=not progress, leave=False):
        (tr_x, tr_y), (te_x, te_y) = data[v]
        ztr = embed_images(model, tr_x, cfg.context_size, gen, cfg.embed_chunk, device, sample_c)
        zte = embed_images(model, te_x, cfg.context_size, gen, cfg.embed_chunk, device, sample_c)
        embedded[v] = (ztr.numpy(), tr_y.numpy(), zte.numpy(), te_y.numpy())
        spread[v] = float(zte.std(dim=0).mean())
    probes = fit_probes_many(list(embedded.values()), reference)
    return {v: dict(r, spread=spread[v]) for v, r in zip(embedded, probes)}


def summarise_probes(per_value: dict) -> dict:
    """{"accuracy": {probe: {value: acc}}, "mean_unseen_accuracy": {probe: mean}, "spread": ...}."""
    keys = [str(v) for v in per_value]
    acc = {p: {str(v): r[p] for v, r in per_value.items()} for p in PROBES}
    return {"accuracy": acc, "mean_unseen_accuracy": {p: float(np.mean([acc[p][k] for k in keys])) for p in PROBES},
            "standardised_C": {str(v): r["standardised_C"] for v, r in per_value.items()},
            "spread": {str(v): r["spread"] for v, r in per_value.items()},
            "embedding_std": float(np.mean([r["spread"] for r in per_value.values()]))}


def curve_values(unseen: Sequence, n: int = 3) -> list:
    """The few unseen values a learning curve is scored on: first, middle and last."""
    unseen = list(unseen)
    return sorted({unseen[0], unseen[len(unseen) // 2], unseen[-1]}, key=unseen.index)[:n]


def snapshot_model(model, trainer, step: int = 0):
    """A copy of ``model`` holding the weights the trainer kept at ``step`` (0: untrained, the same
    seed and init), in eval mode; None where that snapshot was not kept."""
    import copy

    path = trainer.snapshot_path(step)
    if path is None or not path.exists():
        return None
    snap = copy.deepcopy(model)
    snap.load_state_dict(load_checkpoint(path)["model"])
    return snap.eval()


def evaluate_run(model, trainer, data: dict, unseen: Sequence, cfg: InvarianceConfig, seed: int, device,
                 progress: bool = True) -> dict:
    """Everything a run's metrics.json says about its representation, each number beside the same
    model's own controls:

    * the selected weights (``cfg.selection``: ``best`` = lowest val loss, embeddings at the mean of
      q(c | D); ``reference`` = the reference's pick, highest val loss, sampled c) on every unseen value;
    * ``untrained``: the step-0 snapshot (same seed, same init) on every unseen value;
    * ``learning_curve``: validation loss and probes on `curve_values` at each snapshot: both
      probes untrained and at the selected weights, `CURVE_PROBES` at the others;
    * ``reference_selection`` (models with a context latent c, when the headline is ``best``):
      the reference's pick, to show how much the reference's baseline numbers owe to it.
    ``eval_seconds``: the wall time of all of it (beside the run's ``train_seconds``).
    The model is left holding the selected weights."""
    t0 = time.time()
    hierarchical = hasattr(model, "c_dim")
    selected = model.state_dict()
    if cfg.selection == "reference":
        worst = load_checkpoint(trainer.out / "worst.pt")
        model.load_state_dict(worst["model"])
        selected = model.state_dict()
    selected_probes = probe_unseen(model, data, unseen, cfg, seed, device, progress,
                                   sample_c=hierarchical and cfg.selection == "reference")
    result = summarise_probes(selected_probes)
    result["selection"] = cfg.selection
    saved = {k: v.detach().clone() for k, v in selected.items()}
    curve, values = [], curve_values(unseen)
    # the snapshots the folder holds: a run made under an earlier snapshot rule keeps its own curve
    total = trainer.state.step
    kept = [step for step in trainer.kept_snapshots() if step <= total]
    # a snapshot at an epoch's end has that epoch's val loss already (validation draws from a fixed seed)
    validated = {h["step"]: h["val_loss"] for h in trainer.state.history if h.get("val_loss") is not None}
    # the snapshot holding the selected (best) weights is scored by the headline's probes already
    best_step = next((h["step"] for h in trainer.state.history if h["epoch"] == trainer.state.best_epoch), None)
    for step in kept:
        model.load_state_dict(load_checkpoint(trainer.snapshot_path(step))["model"])
        point = {"step": step, "fraction": step / total if total else 0.0,
                 "val_loss": validated[step] if step in validated else trainer.validate()}
        if step == 0:
            untrained = summarise_probes(probe_unseen(model, data, unseen, cfg, seed, device, progress))
            result["untrained"] = untrained
            scored = {p: {v: untrained["accuracy"][p][str(v)] for v in values} for p in PROBES}
        elif cfg.selection == "best" and step == best_step:
            scored = {p: {v: selected_probes[v][p] for v in values} for p in PROBES}
        else:  # between the ends the scale-invariant probe only (`CURVE_PROBES`)
            per = probe_unseen(model, data, values, cfg, seed, device, progress, reference=False)
            scored = {p: {v: per[v][p] for v in values} for p in CURVE_PROBES}
        point["accuracy"] = {p: {str(v): a for v, a in by_value.items()} for p, by_value in scored.items()}
        point["mean_accuracy"] = {p: float(np.mean(list(by_value.values()))) for p, by_value in scored.items()}
        curve.append(point)
    result["learning_curve"] = curve
    if hierarchical and cfg.selection == "best" and trainer.out is not None and (trainer.out / "worst.pt").exists():
        worst = load_checkpoint(trainer.out / "worst.pt")
        model.load_state_dict(worst["model"])
        ref = summarise_probes(probe_unseen(model, data, unseen, cfg, seed, device, progress, sample_c=True))
        result["reference_selection"] = {"epoch": worst["epoch"], "val_loss": worst["val_loss"],
                                         "accuracy": ref["accuracy"], "mean_unseen_accuracy": ref["mean_unseen_accuracy"]}
    model.load_state_dict(saved)
    result["eval_seconds"] = round(time.time() - t0, 1)
    return result


def learning_curve_figure(path: Path, curves: dict, title: str) -> None:
    """probe_vs_steps.png: both probes' mean accuracy on the curve values, and validation loss,
    against training steps. ``curves``: {label: learning_curve list}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for i, (label, curve) in enumerate(curves.items()):
        steps = [max(p["step"], 1) for p in curve]
        for ax, probe in zip(axes[:2], PROBES):  # a probe not measured at a point (`CURVE_PROBES`) skips it
            xs, ys = zip(*[(s, p["mean_accuracy"][probe]) for s, p in zip(steps, curve) if probe in p["mean_accuracy"]])
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=label)
        axes[2].plot(steps, [p["val_loss"] for p in curve], "o-", color=f"C{i % 10}", label=label)
    axes[2].set_yscale("log")  # an untrained decoder's loss can be 100x the trained one's
    for ax, name in zip(axes, [f"{PROBES[0]} probe accuracy", f"{PROBES[1]} probe accuracy", "validation loss (nats)"]):
        ax.set_xscale("log")
        ax.set_xlabel("training step (step 0 drawn at 1)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


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


class PixelControl(torch.nn.Module):
    """A control that needs no training: the raw pixels in [0, 1] (``dim=None``) or a fixed random
    Gaussian projection of them to ``dim`` features (N(0, 1) weights, seed 0), read by the same
    probes on the same images as the trained models."""

    uses_context = False

    def __init__(self, event_shape, dim: int | None = None):
        super().__init__()
        D, self.event_dim = int(np.prod(event_shape)), len(event_shape)
        weight = None if dim is None else torch.randn(D, dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("weight", weight)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, context=None) -> torch.Tensor:
        flat = x.flatten(start_dim=x.dim() - self.event_dim).float()
        return flat if self.weight is None else flat @ self.weight


CONTROLS = ("pixels", "random-projection")  # `--model` values that are controls, not trained models


def make_control(name: str, event_shape, z_dim: int) -> PixelControl:
    return PixelControl(event_shape, None if name == "pixels" else z_dim)


# Each model kind's init stream is offset from the run seed, so that kinds sharing parts (the VHE
# and the VHE+VampPrior) do not start from bit-identical weights.
INIT_STREAM = {"metavae": 0, "vae": 0, "metavae-nocontext": 0, "ns": 0, "vhe": 0, "vhe-vampprior": 7919}


def training_settings(cfg: InvarianceConfig) -> dict:
    """The settings that change a run's trained weights (what a resume must match)."""
    return {k: v for k, v in flat(cfg).items() if k not in EVALUATION_ONLY}


def model_arguments(model_name: str, arch: str, cfg: InvarianceConfig, extra: dict | None = None) -> dict:
    """`make_model`'s arguments for ``model_name`` under ``cfg``: the model group as it is, each
    setting its kind's builder takes (pooling where it is not mean, every builder's default), then
    ``extra``. A pooling the kind cannot use is an error, not a silent default."""
    kind = model_kind(model_name)
    if cfg.pooling != "mean" and not kind.pooling:
        pooled = ", ".join(k.name for k in model_kinds() if k.pooling)
        raise ValueError(f"pooling={cfg.pooling!r} needs a model that pools a context set ({pooled}), not {model_name!r}")
    args = {k: v for k, v in dataclasses.asdict(cfg.model).items()
            if kind.takes(k, arch) and (k != "pooling" or v != "mean")}
    return {**args, **(extra or {})}


def train_on_seen(model_name: str, arch: str, train_sets: list, val_sets: list, names: list, cfg: InvarianceConfig,
                  out: Path, seed: int, device: str, progress: bool, model_kwargs: dict | None = None,
                  run_info: dict | None = None):
    """Build ``model_name`` and train it through the one Trainer on the seen distributions, with
    the seen values' test parts as validation (the reference's protocol). ``model_kwargs`` go to
    `make_model` (e.g. conv ``channels``, ``hidden``, ``c_dim``, ``n_components``). Keeps
    snapshots at 0, at the ends of `snapshot_epochs` and at the end (learning curves) and the reference's pick.
    Returns (model with the best weights, history, seconds, trainer)."""
    data = MetaDataset.from_parts(train=train_sets, val=val_sets, names=names)
    seed_everything(seed + INIT_STREAM.get(model_name, 0))
    event = tuple(train_sets[0].shape[1:])
    model = make_model(model_name, arch=arch, event_shape=event, n_distributions=len(train_sets),
                       **model_arguments(model_name, arch, cfg, model_kwargs))
    per_epoch = data.steps_per_epoch(cfg.batch_size)
    snapshots = [0] + [e * per_epoch for e in snapshot_epochs(cfg.epochs)] + [cfg.epochs * per_epoch]
    tc = replace(cfg.train, seed=seed, device=device, snapshot_steps=tuple(sorted(set(snapshots))))
    info = dict(run_info or {}, model=model_name, arch=arch, seed=seed, settings=training_settings(cfg))
    t0 = time.time()
    defaults = {f"settings.{k}": v for k, v in training_settings(type(cfg)()).items()}
    trainer = Trainer(model, data, tc, out_dir=out / "checkpoints", progress=progress, desc=model_name, run_info=info,
                      run_info_defaults=defaults)
    history = trainer.fit()
    return model, history, time.time() - t0, trainer


def accuracy_figure(path: Path, panels: list, title: str) -> None:
    """Figure 7 style: one panel per (axis, split); accuracy per value for each model, seen values
    shaded. ``panels``: [{"title", "values", "seen", "curves": {model: {value: acc}}}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

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


def over_seeds(values: list) -> dict | None:
    """{"mean", "std", "n"} of the finite numbers in ``values`` (std 0 for one seed); None if none."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)}


def table2_entry(runs: list) -> dict | None:
    """One Table 2 cell from a model's runs (one per seed): both probes, the untrained control and
    the reference's selection where present, each as mean, std and number of seeds."""
    if not runs:
        return None
    entry = {p: over_seeds([r["mean_unseen_accuracy"][p] for r in runs]) for p in PROBES}
    for extra in ("untrained", "reference_selection"):
        if any(extra in r for r in runs):
            entry[extra] = {p: over_seeds([r[extra]["mean_unseen_accuracy"][p] for r in runs if extra in r])
                            for p in PROBES}
    entry["seeds"] = sorted(r.get("seed", 0) for r in runs)
    entry["epochs_trained"] = sorted({r.get("epochs_trained", r.get("epochs")) for r in runs})
    entry["train_seconds"] = over_seeds([r.get("train_seconds_total", r.get("train_seconds")) for r in runs])
    entry["embedding_std"] = over_seeds([r.get("embedding_std") for r in runs])
    return entry


def table2_models(found: dict, models) -> tuple:
    """``models`` and then every variant label among the runs ``found`` ('metavae (amp bf16)'),
    controls left out (`gather_tables` adds them)."""
    return tuple(models) + tuple(sorted({k[2] for k in found if k[2] not in tuple(models) + CONTROLS}))


def gather_tables(found: dict, axes, models, experiment: str, out: Path, flag: str = "") -> tuple:
    """Table 2 (contiguous mean unseen accuracy per axis and model, `table2_entry`, controls
    included where their runs exist) and Table 1 (the interleaved MetaVAE's invariance distances
    per axis, mean over seeds) from finished runs ``found[(axis, split, model)] = [metrics, ...]``,
    written as table1.json / table2.json; also the commands that would make the missing runs."""
    from ..io import atomic_write_text

    table2, table1, missing = {}, {}, []
    variant_only = not any("(" not in k[2] and k[2] not in CONTROLS for k in found)
    for axis in axes:
        table2[axis] = {}
        for model in tuple(models) + CONTROLS:
            runs = found.get((axis, "contiguous", model), [])
            table2[axis][model] = table2_entry(runs)
            # variants ("metavae (amp bf16)") are optional; in a table made of variants only (a `reproduce
            # --set amp=bf16` folder) a model's variant run stands in for its default one
            variant = variant_only and any(k[:2] == (axis, "contiguous") and k[2].startswith(model + " (")
                                           for k in found)
            if not runs and not variant and model not in CONTROLS and "(" not in model:
                missing.append(f"metavae run {experiment}-{axis} --split contiguous --model {model}{flag}")
        runs = [r for r in found.get((axis, "interleaved", "metavae"), []) if r.get("invariance_distance")]
        table1[axis] = ({a: float(np.mean([r["invariance_distance"][a] for r in runs])) for a in runs[0]["invariance_distance"]}
                        if runs else None)
        if not runs:
            missing.append(f"metavae run {experiment}-{axis} --split interleaved --model metavae{flag}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(table1, indent=2) + "\n", out / "table1.json")
    atomic_write_text(json.dumps(table2, indent=2) + "\n", out / "table2.json")
    return table1, table2, missing


def untrained_distances(found: dict, axis: str) -> dict | None:
    """Table 1's control: the interleaved MetaVAE runs' untrained distances, averaged over seeds."""
    runs = [r["untrained"]["invariance_distance"] for r in found.get((axis, "interleaved", "metavae"), [])
            if (r.get("untrained") or {}).get("invariance_distance")]
    return {a: float(np.mean([r[a] for r in runs])) for a in runs[0]} if runs else None


VARIANT_SETTINGS = ("init", "free_bits", "selection", "pooling", "amp")  # settings that make a run a variant of its model


def run_label(model: str, cfg, default_cfg, variants: tuple = VARIANT_SETTINGS) -> str:
    """The model's name in tables, with the ``variants`` settings that differ from ``default_cfg``
    (the experiment's reference preset): 'metavae (init xavier)'. Runs of one label are averaged
    over seeds, so every setting that changes the trained weights on purpose must be a variant.
    A control (`CONTROLS`) trains nothing, so no training setting makes it a variant: the pixels of
    a queue run with ``--set amp=bf16`` are the same pixels."""
    if model in CONTROLS:
        return model
    extras = [f"{k} {getattr(cfg, k, None)}" for k in variants if getattr(cfg, k, None) != getattr(default_cfg, k, None)]
    return model + (f" ({', '.join(extras)})" if extras else "")


def find_runs(root: Path, data_names) -> dict:
    """Every finished run under ``root`` (any depth) whose metrics.json names one of ``data_names``:
    {(axis, split, model): [metrics, ...]} (one per seed; ``_path`` added)."""
    found: dict = {}
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(m, dict) or m.get("data") not in data_names or "axis" not in m:
            continue
        if not isinstance(m.get("mean_unseen_accuracy"), dict):  # written before the two probes: re-run it
            continue
        m["_path"] = str(path.parent)
        found.setdefault((m["axis"], m["split"], m.get("label", m["model"])), []).append(m)
    return found


def fmt_seeds(entry: dict | None, digits: int = 3) -> str:
    """'0.885 +- 0.004 (3)' for a mean over seeds, '0.885' for one seed, '-' for none."""
    if entry is None:
        return "-"
    if entry["n"] == 1:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f} ({entry['n']})"
