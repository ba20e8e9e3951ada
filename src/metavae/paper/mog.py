"""Demo: clustering mixtures of Gaussians (paper section "Demo: Clustering Mixtures of Gaussians").

Each distribution is an equal mix of two isotropic 2-D Gaussians (variance 0.1, means
U(-5, 5)^2). z in {0, 1} is summed out exactly. MetaVAEs amortized over 10, 20 and 50 training
mixtures (one decoder each) and a VAE trained on one mixture are scored on the same 1000
unseen mixtures: clustering error up to label permutation of argmax q(z | D, x).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import mog
from ..data.meta import MetaDataset
from ..distributions import Gaussian
from ..models import build_mlp_metavae
from ..models.base import POOLINGS
from ..training import TrainConfig, resolve_device, seed_everything
from .base import Experiment
from .common import config_dict, point_cloud_train, markdown_table, render_report, train_shared, write_metrics, write_report
from ..plots import save_figure
from ..settings import config, setting

DESCRIPTION = "Mixture-of-Gaussians clustering: MetaVAE over 10/20/50 mixtures vs a VAE, on 1000 unseen mixtures"
PAPER = {"vae": 0.279, "metavae_10": 0.212, "metavae_20": 0.158, "metavae_50": 0.099}
OPTIONS: set[str] = set()
VAL_FRACTION = TEST_FRACTION = 0.1  # of each training mixture's points


@config
class MogConfig:
    train_mixtures: tuple = (10, 20, 50)  # MetaVAE sizes; nested (the first 10 are among the 20, ...)
    points_per_mixture: int = 1000  # split 80/10/10 into train/val/test
    test_mixtures: int = 1000
    test_points: int = 200  # points clustered per unseen mixture
    # |D| 64 points of the same mixture, 64 queries per mixture and step
    train: TrainConfig = point_cloud_train(context_size=64, batch_size=64, epochs=5,
                                           steps_per_epoch=300, lr=2e-3, grad_clip=10.0)
    hidden: tuple = (64, 64)
    summary: tuple = (64, 64, 64)
    center: bool = True  # translation-invariant inference (query and context minus the context mean)
    pooling: str = setting("mean", choices=POOLINGS, help="how the MetaVAE summarises D: mean (the paper's) or "
                                                          "attention (a Set Transformer)")


EVALUATION_ONLY = ("epochs", "test_mixtures", "test_points")  # a resume may change these
PRESETS = {
    "quick": MogConfig(),
    "paper": MogConfig(epochs=20, lr=1e-3),
}


def build_mog_model(train_points: torch.Tensor, cfg: MogConfig, use_context: bool):
    """A model with one decoder per training mixture, decoders initialised from their data."""
    model = build_mlp_metavae(
        (2,), len(train_points), z_dim=2, latent="categorical", likelihood=Gaussian(mog.VARIANCE),
        hidden_widths=cfg.hidden, summary_widths=cfg.summary, decoder_widths=(), use_context=use_context,
        center=cfg.center and use_context, decoder_scale=mog.MEAN_RANGE, pooling=cfg.pooling,
    )
    _init_decoders(model.decoder.bank.layers[0], train_points, mog.MEAN_RANGE)
    return model


@torch.no_grad()
def _init_decoders(layer, points: torch.Tensor, scale: float) -> None:
    """Method-of-moments start for each decoder's two means: the mixture's mean -/+ its principal
    axis times sqrt(top eigenvalue - component variance), the axis oriented along one shared
    direction u = (1, 1)/sqrt(2).

    With both means equal q(z|x) gets no gradient and training can stall at that fixed point (we
    saw it happen with random init); a shared orientation gives the encoder one consistent
    labelling rule to learn across mixtures. Only each mixture's own training points are used.
    """
    center = points.mean(1)  # (K, 2)
    cov = torch.einsum("kni,knj->kij", points - center[:, None], points - center[:, None]) / points.shape[1]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    axis = evecs[..., -1]
    u = torch.tensor([1.0, 1.0]) / 2**0.5
    axis = axis * torch.where(axis @ u >= 0, 1.0, -1.0).unsqueeze(-1)
    half = (evals[:, -1] - mog.VARIANCE).clamp_min(1e-2).sqrt().unsqueeze(-1)
    layer.weight.copy_(torch.stack([-half * axis, half * axis], dim=1) / scale)
    layer.bias.copy_(center.unsqueeze(1) / scale)


@torch.no_grad()
def _break_symmetry(layer, spread: float) -> None:
    """Start every decoder with its two component means apart along one shared direction u.

    With both means equal, q(z|x) gets no gradient and training can stall at that fixed point
    (we saw it). A *shared* direction also makes the labelling the encoder must learn the same
    rule in every mixture ("z = 1 is the component further along u"), one it can generalize.
    """
    u = torch.tensor([1.0, 1.0]) / 2**0.5
    layer.weight.copy_(torch.stack([-u, u]).mul(spread).expand_as(layer.weight))
    layer.bias.zero_()


@torch.no_grad()
def _predict(model, x, context):
    """Cluster labels for x (M, n, 2) given one context set per mixture (M, N, 2)."""
    ctx = context.unsqueeze(1) if model.uses_context else None
    return model.embed(x, ctx).argmax(-1)


def run(cfg: MogConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    pool = max(cfg.train_mixtures)
    means = mog.sample_means(pool, gen)
    x, y = mog.sample_points(means, cfg.points_per_mixture, gen)
    # Unseen mixtures come from their own stream, so they never depend on the training settings.
    tgen = torch.Generator().manual_seed(seed + 10_000)
    test_means = mog.sample_means(cfg.test_mixtures, tgen)
    tx, ty = mog.sample_points(test_means, cfg.test_points, tgen)
    ctx_idx = torch.rand(cfg.test_mixtures, cfg.test_points, generator=tgen).argsort(-1)[:, : cfg.context_size]
    tctx = tx.gather(1, ctx_idx.unsqueeze(-1).expand(-1, -1, 2))

    models = {}
    for i, k in enumerate(sorted(cfg.train_mixtures)):
        seed_everything(seed + 1 + i)
        data = MetaDataset(list(x[:k]), labels=list(y[:k]), val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION,
                           seed=seed)
        model = build_mog_model(data.part("train").data, cfg, True)
        models[f"metavae_{k}"] = train_shared("mog", f"metavae_{k}", model, data, cfg, out, device, seed, progress,
                                              evaluation_only=EVALUATION_ONLY)
    seed_everything(seed)
    data = MetaDataset([x[0]], labels=[y[0]], val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION, seed=seed)
    vae = build_mog_model(data.part("train").data, cfg, False)
    models["vae"] = train_shared("mog", "vae", vae, data, cfg, out, device, seed, progress,
                                 evaluation_only=EVALUATION_ONLY)

    errors, preds = {}, {}
    for name, m in models.items():
        m.to("cpu").eval()
        preds[name] = _predict(m, tx, tctx)
        errors[name] = float(mog.clustering_error(preds[name], ty).mean())
    bayes = float(mog.clustering_error(mog.bayes_labels(tx, test_means), ty).mean())
    order = ["vae"] + [f"metavae_{k}" for k in sorted(cfg.train_mixtures)]
    metrics = {
        "error": {n: errors[n] for n in order},
        "paper": dict(PAPER),
        "bayes_floor": bayes,
        "config": config_dict(cfg),
        "seed": seed,
        "device": str(dev),
        "test_mixtures": cfg.test_mixtures,
        "test_points_per_mixture": cfg.test_points,
    }
    write_metrics(out, metrics)
    _figures(out, tx, test_means, preds, errors, bayes, cfg)
    write_report(out, _report(metrics, cfg))
    return metrics


def _figures(out, tx, test_means, preds, errors, bayes, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = f"metavae_{max(cfg.train_mixtures)}"
    n_show = min(6, len(tx))  # no more panels than unseen mixtures
    fig, axes = plt.subplots(2, n_show, figsize=(3 * n_show, 6), squeeze=False)
    for row, name in enumerate(["vae", big]):
        for j in range(n_show):
            ax = axes[row, j]
            ax.scatter(tx[j, :, 0], tx[j, :, 1], c=preds[name][j], cmap="coolwarm", s=6, vmin=0, vmax=1)
            ax.scatter(test_means[j, :, 0], test_means[j, :, 1], marker="x", c="k", s=60)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=12)
    fig.suptitle("Unseen mixtures coloured by inferred cluster (x: true means)")
    save_figure(fig, out / "clusters.png")

    names = list(errors)
    fig, ax = plt.subplots(figsize=(7, 4))
    pos = range(len(names))
    ax.bar([p - 0.2 for p in pos], [PAPER.get(n, float("nan")) * 100 for n in names], width=0.4, label="paper",
           color="#bbbbbb")
    ax.bar([p + 0.2 for p in pos], [errors[n] * 100 for n in names], width=0.4, label="ours", color="#3b6fb6")
    ax.axhline(bayes * 100, color="k", ls="--", lw=1, label=f"Bayes floor ({bayes * 100:.2f}%)")
    ax.set_xticks(list(pos), names)
    ax.set_ylabel("clustering error on unseen mixtures (%)")
    ax.legend()
    save_figure(fig, out / "error.png")


def _report(metrics, cfg) -> str:
    """report.md (templates/mog.md) from the errors and the config."""
    e, p = metrics["error"], metrics["paper"]
    rows = [[n, f"{p[n] * 100:.1f}%" if n in p else "-", f"{e[n] * 100:.2f}%"] for n in e]
    rows.append(["Bayes-optimal (true means known)", "-", f"{metrics['bayes_floor'] * 100:.2f}%"])
    split = "/".join(f"{round(100 * f)}" for f in (1 - VAL_FRACTION - TEST_FRACTION, VAL_FRACTION, TEST_FRACTION))
    return render_report("mog", cfg=cfg, table=markdown_table(["model", "paper", "ours"], rows), variance=mog.VARIANCE,
                         half=mog.MEAN_RANGE, split=split, nesting=_nesting(sorted(cfg.train_mixtures)),
                         summary=list(cfg.summary), hidden=list(cfg.hidden))


def _nesting(sizes: list) -> str:
    """How the MetaVAEs' training sets nest: "the 10 mixtures are among the 20, which are among the 50"."""
    return f"the {sizes[0]} mixtures" + "".join(f"{' are' if i == 0 else ', which are'} among the {k}"
                                                for i, k in enumerate(sizes[1:]))


def pooling_table(folder) -> str:
    """Mean vs attention pooling from finished runs under ``folder`` (one subfolder per run, each
    with metrics.json and, per MetaVAE, its epoch log ``NAME.jsonl`` or ``checkpoints/NAME/metrics.jsonl``):
    clustering error and training seconds of each MetaVAE."""
    import json

    rows = []
    for run in sorted(Path(folder).iterdir()):
        if not (run / "metrics.json").is_file():
            continue
        m = json.loads((run / "metrics.json").read_text())
        cells = [f"`{run.name}`", m["config"].get("pooling", "mean"), m["config"]["epochs"]]
        for name in sorted(k for k in m["error"] if k.startswith("metavae_")):
            log = run / f"{name}.jsonl"
            log = log if log.is_file() else run / "checkpoints" / name / "metrics.jsonl"
            seconds = sum(json.loads(line)["seconds"] for line in log.read_text().splitlines() if line.strip())
            cells.append(f"{100 * m['error'][name]:.2f}% ({seconds:.0f} s)")
        rows.append(cells)
    return markdown_table(["run", "pooling", "epochs", "MetaVAE 10", "MetaVAE 20", "MetaVAE 50"], rows)


EXPERIMENT = Experiment(name="mog", description=DESCRIPTION, presets=PRESETS, run=run, options=OPTIONS)
