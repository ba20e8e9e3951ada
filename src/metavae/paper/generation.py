"""Generation and likelihood for rotations never seen in training (`metavae run mnist-generation`).

Models trained by `metavae run mnist-rotate` (any preset; the long one is what means something)
are given a context of N images (N = 5, 20, 100) of an unseen rotation and scored by the
importance-weighted log-likelihood (k samples) of held-out *test* images of that rotation:

* NS and VHE: their shared decoder conditioned on q(c | D) (`log_prob(x, context)`);
* MetaVAE + adapt: a new decoder fitted to the N images with the encoder frozen (`MetaVAE.adapt`,
  which keeps the weights that score best on a fifth of the images held out);
* MetaVAE, nearest decoder: the training decoder with the highest ELBO on the N images, unchanged
  (what adaptation starts from: the gain of adapting over picking);
* VAE from scratch on the same N images: the no-transfer control.

Contexts come from MNIST's training images, test points from its test images, both rotated by
the unseen value; every model sees the same images. Numbers: mean and std over test images.
"""
from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import transforms as T
from ..data.meta import MetaDataset, as_float
from .data.mnist import load_mnist, mnist_cache_dir
from ..models import build_vae, load
from ..training import Trainer, TrainConfig, resolve_device, seed_everything
from .base import Experiment
from .common import config_dict, markdown_table, render_report, write_metrics, write_report
from ..settings import config, group
from ..plots import save_figure

TRAINED = ("ns", "vhe", "metavae")  # run folders looked for under `runs`
ROWS = ("ns", "vhe", "metavae-adapt", "metavae-nearest", "vae-scratch")


@config
class GenerationConfig:
    runs: str = "runs/mnist-rotate/contiguous"  # holds MODEL/SEED/checkpoints/best.pt (or MODEL/checkpoints/)
    seed_folder: str = "seed-0"
    values: tuple = (20, 60, 100, 140)  # unseen rotations (the contiguous split's are 20..160)
    contexts: tuple = (5, 20, 100)
    test_images: int = 200  # scored per value
    k: int = 100  # importance samples
    adapt_steps: int = 300
    adapt_lr: float = 1e-3
    scratch_steps: int = 300  # the VAE from scratch: Adam steps on the N context images
    scratch_lr: float = 1e-3
    # the scratch VAE's training (one epoch of scratch_steps, no context); batch_size is adapt's too
    train: TrainConfig = group(TrainConfig(epochs=1, batch_size=50, context_size=0), "batch_size")
    samples: int = 8  # per model in the figure
    chunk: int = 50  # test images scored at once (memory: k x chunk decoder passes)


PRESETS = {"quick": GenerationConfig(), "full": GenerationConfig(values=(20, 40, 60, 80, 100, 120, 140, 160),
                                                                    test_images=500)}


def find_model(runs: Path, name: str, seed_folder: str) -> Path | None:
    """The best checkpoint of a *finished* run (one that wrote metrics.json): a run still training
    has a best.pt too, and scoring it would report a model nobody can name."""
    for folder in (runs / name / seed_folder, runs / name):
        if (folder / "checkpoints" / "best.pt").is_file() and (folder / "metrics.json").is_file():
            return folder / "checkpoints" / "best.pt"
    return None


def adapted_copy(model, points: torch.Tensor, steps: int, lr: float, batch_size: int, context_size: int,
                 seed: int) -> tuple:
    """(a copy of the MetaVAE ``model`` with a decoder fitted to ``points`` by `MetaVAE.adapt`, its
    index), in eval mode. Each call starts from the trained model alone, so adaptations never share
    decoders; ``steps=0`` gives the nearest training decoder, unchanged."""
    copied = copy.deepcopy(model)
    d = copied.adapt(points, steps=steps, lr=lr, batch_size=batch_size, context_size=context_size, seed=seed)
    return copied.eval(), d


def _scored(score, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([score(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def _scratch_vae(ctx: torch.Tensor, cfg: GenerationConfig, seed: int, device) -> torch.nn.Module:
    """The paper's MLP VAE (z 40, 400-400) trained on the context images alone."""
    torch.manual_seed(seed)
    vae = build_vae(tuple(ctx.shape[1:]))
    data = MetaDataset.from_parts(train=[ctx])
    Trainer(vae, data, replace(cfg.train, steps_per_epoch=cfg.scratch_steps, lr=cfg.scratch_lr, seed=seed,
                               device=str(device)), progress=False).fit()
    return vae.eval()


def score_value(models: dict, ctx_pool: torch.Tensor, test: torch.Tensor, cfg: GenerationConfig, seed: int,
                device) -> tuple[dict, dict]:
    """{context size: {row: per-image log-likelihoods}} and {row: samples} (at the middle context size)."""
    scores, samples = {}, {}
    show = cfg.contexts[len(cfg.contexts) // 2]
    for n in cfg.contexts:
        ctx = ctx_pool[:n]
        row = {}
        gen = torch.Generator().manual_seed(seed)
        for name in ("ns", "vhe"):
            if name in models:
                torch.manual_seed(seed)
                row[name] = _scored(lambda x, m=models[name]: m.log_prob(x, ctx, k=cfg.k), test, cfg.chunk)
                if n == show:
                    samples[name] = models[name].sample(cfg.samples, ctx, generator=gen)
        if "metavae" in models:
            for label, steps in (("metavae-nearest", 0), ("metavae-adapt", cfg.adapt_steps)):
                model, d = adapted_copy(models["metavae"], ctx, steps, cfg.adapt_lr, cfg.batch_size, min(10, n), seed)
                torch.manual_seed(seed)
                row[label] = _scored(lambda x: model.log_prob(x, ctx, dist=d, k=cfg.k), test, cfg.chunk)
                if n == show:
                    samples[label] = model.sample(cfg.samples, dist=d, mean=True, generator=gen)
        vae = _scratch_vae(ctx, cfg, seed, device)
        torch.manual_seed(seed)
        row["vae-scratch"] = _scored(lambda x: vae.log_prob(x, k=cfg.k), test, cfg.chunk)
        if n == show:
            samples["vae-scratch"] = vae.sample(cfg.samples, dist=0, generator=gen)
        scores[n] = row
    return scores, samples


def run(cfg: GenerationConfig, out: Path, device: str = "cpu", seed: int = 0, progress: bool = True,
        data_dir=None) -> dict:
    device = resolve_device(device)
    runs = Path(cfg.runs)
    paths = {m: find_model(runs, m, cfg.seed_folder) for m in TRAINED}
    if not any(paths.values()):
        raise ValueError(f"no trained models under {runs} (looked for {', '.join(TRAINED)}/{cfg.seed_folder}/"
                         "checkpoints/best.pt); train them with `metavae run mnist-rotate --model M --preset long`, "
                         "or --set runs=FOLDER")
    models = {m: load(p, device) for m, p in paths.items() if p is not None}
    unseen = T.get_split("rotation", "contiguous")[1]
    bad = [v for v in cfg.values if v not in unseen]
    if bad:
        raise ValueError(f"values {bad} are not unseen rotations of the contiguous split ({list(unseen)})")
    seed_everything(seed)
    (tr_x, _), (te_x, _) = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.permutation(len(tr_x))[: max(cfg.contexts)])
    cache = mnist_cache_dir() / "transforms"
    train_t = T.transform_split(tr_x[pick], "rotation", cfg.values, cache_dir=cache)
    test_t = T.transform_split(te_x[: cfg.test_images], "rotation", cfg.values, cache_dir=cache)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per_value, figure = {}, {}
    for i, v in enumerate(cfg.values):
        if progress:
            print(f"[mnist-generation] rotation {v} ({i + 1}/{len(cfg.values)})", flush=True)
        ctx_pool, test = as_float(train_t[v]).to(device), as_float(test_t[v]).to(device)
        scores, samples = score_value(models, ctx_pool, test, cfg, seed, device)
        per_value[v] = scores
        figure[v] = {"real": test[: cfg.samples].cpu(), **{k: s.cpu() for k, s in samples.items()}}
    table = {}
    for n in cfg.contexts:
        for row in ROWS:
            vals = [per_value[v][n][row] for v in cfg.values if row in per_value[v][n]]
            if vals:
                allv = torch.cat(vals)
                table.setdefault(row, {})[str(n)] = {"mean": float(allv.mean()), "std": float(allv.std()),
                                                    "per_value": {str(v): float(x.mean()) for v, x in
                                                                  zip(cfg.values, vals)}}
    metrics = {"experiment": "mnist-generation", "models": {m: str(p) for m, p in paths.items()},
               "missing": [m for m, p in paths.items() if p is None], "values": list(cfg.values),
               "contexts": list(cfg.contexts), "test_images_per_value": len(te_x[: cfg.test_images]),
               "log_likelihood": table, "seconds": round(time.time() - t0, 1), "seed": seed, "config": config_dict(cfg)}
    write_metrics(out, metrics)
    samples_figure(out / "samples.png", figure, cfg)
    write_report(out, report(metrics))
    return metrics


def likelihood_table(m: dict) -> str:
    headers = ["model"] + [f"N = {n}" for n in m["contexts"]]
    rows = [[row] + [f"{t[str(n)]['mean']:.1f} ± {t[str(n)]['std']:.1f}" if str(n) in t else "" for n in m["contexts"]]
            for row, t in m["log_likelihood"].items()]
    return markdown_table(headers, rows)


def report(m: dict) -> str:
    """report.md (templates/generation.md) from metrics.json."""
    missing = f"\n\nNot found (not scored): {', '.join(m['missing'])}." if m["missing"] else ""
    models = ", ".join(f"`{k}`: {v}" for k, v in m["models"].items() if v != "None")
    return render_report("generation", m=m, missing=missing, table=likelihood_table(m), models=models)


def samples_figure(path: Path, figure: dict, cfg: GenerationConfig) -> None:
    """One panel per rotation: a row of real test images, then a row of samples per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["real"] + [r for r in ROWS if any(r in f for f in figure.values())]
    fig, axes = plt.subplots(len(rows), len(figure), figsize=(2.6 * len(figure), 0.42 * len(rows) + 0.5),
                             squeeze=False)
    for j, (v, panel) in enumerate(figure.items()):
        for i, row in enumerate(rows):
            ax = axes[i, j]
            ax.axis("off")
            if row in panel:
                imgs = panel[row].reshape(-1, 28, 28)[: cfg.samples]
                ax.imshow(torch.cat(list(imgs), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.text(-5, 14, row, ha="right", va="center", fontsize=7)
            if i == 0:
                ax.set_title(f"rotation {v}", fontsize=8)
    fig.suptitle(f"Unseen rotations: real test images and samples (context N = {cfg.contexts[len(cfg.contexts) // 2]})",
                 fontsize=9)
    save_figure(fig, path)


EXPERIMENT = Experiment(
    name="mnist-generation", presets=PRESETS, run=run, options={"data_dir"},
    description="Generation and likelihood for unseen rotations: NS, VHE, MetaVAE + adapt, VAE from scratch "
                "(needs mnist-rotate runs)")
