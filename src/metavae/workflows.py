"""A user's own family of data sets, end to end: train from files, embed, sample.

These are what `metavae train | embed | sample` run; each is also a plain function.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.files import Family, check_likelihood, family_fingerprint, read_family, read_points
from .data.meta import MetaDataset
from .distributions import make_likelihood
from .io import atomic_write_text
from .models import MODEL_NAMES, load, make_model
from .training import Trainer, TrainConfig, seed_everything
from .training.distributed import available_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileTrainConfig:
    """`metavae train` settings (``--set key=value``). The models are MLPs over flattened points."""

    epochs: int = 50
    batch_size: int = 32  # queries per distribution and step
    context_size: int = 10  # |D|
    lr: float = 1e-3
    z_dim: int = 4
    hidden: tuple = (128, 128)
    summary: tuple = (128, 128)
    likelihood: str = "gaussian"  # gaussian: a learned variance per feature; bernoulli: values in [0, 1]
    val_fraction: float = 0.1  # of each distribution's points, for validation and early stopping
    patience: int | None = 10  # stop after this many epochs without a lower validation loss (null: never)
    grad_clip: float | None = 10.0
    seed: int = 0
    amp: str | None = None  # "bf16": bfloat16 matmuls, float32 losses (TrainConfig.amp); None: fp32, the default

    CHOICES: typing.ClassVar[dict] = {"likelihood": ("gaussian", "bernoulli"), "amp": ("bf16",)}

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"setting 'val_fraction' must be in (0, 1), got {self.val_fraction}")


def _notice_float64(family: Family) -> None:
    if any(np.asarray(p[:1]).dtype == np.float64 for p in family.points):
        print("metavae: notice: float64 data cast to float32 (the models' precision)", file=sys.stderr)


def _build(model_name: str, event_shape, n: int, cfg: FileTrainConfig, pooling: str = "mean"):
    lik = make_likelihood(cfg.likelihood, None)  # Gaussian: a learned variance; Bernoulli takes none
    if pooling != "mean" and model_name == "vae":
        raise ValueError(f"--summary {pooling}: the VAE has no context set to pool")
    if model_name in ("metavae", "vae"):
        kw = dict(z_dim=cfg.z_dim, hidden=cfg.hidden, likelihood=lik)
        if model_name == "metavae":
            kw.update(summary=cfg.summary, pooling=pooling)
        return make_model(model_name, "mlp", event_shape, n, **kw)
    width = cfg.hidden[0]
    return make_model(model_name, "mlp", event_shape, n, z_dim=cfg.z_dim, c_dim=cfg.summary[-1], hidden=width,
                      decoder_hidden=cfg.hidden[-1], likelihood=lik, pooling=pooling)


def choose_storage(storage: str, family: Family) -> str:
    """``auto``: mapped for a folder of .npy files (memory-mapped by `read_family`) holding more than
    a quarter of the available memory, else padded. Both give the same batches for one seed, so
    the choice changes memory and speed only; ``mapped`` needs that folder layout."""
    mapped_arrays = all(isinstance(p, np.memmap) for p in family.points)
    if storage == "mapped" and not mapped_arrays:
        raise ValueError(f"--storage mapped reads a folder of .npy files (one per distribution); {family.source} "
                         "is not one")
    if storage != "auto":
        return storage
    free = available_memory()
    size = sum(int(p.nbytes) for p in family.points)
    if mapped_arrays and free is not None and size > free / 4:
        print(f"metavae: notice: the family is {size / 1e9:.1f} GB against {free / 1e9:.1f} GB of free memory: "
              "reading it memory-mapped (--storage padded to load it)", file=sys.stderr)
        return "mapped"
    return "padded"


def train_on_files(data_path, out, model_name: str = "metavae", cfg: FileTrainConfig = FileTrainConfig(),
                   dist_column: str = "distribution", label_column: str | None = None, tensorboard=None,
                   progress: bool = True, summary: str = "mean", storage: str = "auto") -> dict:
    """Train ``model_name`` on every distribution in ``data_path``; writes ``out/model.pt`` (the
    `save_model` format, distribution names included), ``metrics.json``, ``metrics.jsonl`` and
    ``loss.png``. ``storage``: see `choose_storage`. Returns the metrics."""
    from .experiments.common import check_settings

    check_settings(cfg)
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{model_name}'; choose from {', '.join(MODEL_NAMES)}")
    out = Path(out)
    family = read_family(data_path, dist_column, label_column)
    check_likelihood(family, cfg.likelihood)
    _notice_float64(family)
    if model_name == "vae" and len(family.names) > 1:
        logger.info("the VAE pools every distribution into one (it has one decoder and no context)")
    sizes = [len(p) for p in family.points]
    k = int(np.argmin(sizes))
    n_val = int(round(sizes[k] * cfg.val_fraction))  # contexts of validation queries come from the val part
    if min(n_val, sizes[k] - n_val) < cfg.context_size:
        raise ValueError(f"distribution {family.names[k]!r} has {sizes[k]} points: its validation part "
                         f"(val_fraction={cfg.val_fraction}) would hold {n_val}, fewer than context_size="
                         f"{cfg.context_size}; lower context_size, raise val_fraction or drop it")
    storage = choose_storage("padded" if storage == "auto" and model_name == "vae" else storage, family)
    if storage == "mapped" and model_name == "vae":
        raise ValueError("--storage mapped keeps one array per distribution; the VAE pools them into one "
                         "(use --storage padded)")
    if storage == "mapped":
        points = family.points
    else:
        # a read-only memmap is copied into memory (torch wants writable arrays); other arrays are shared
        points = [torch.as_tensor(np.array(p) if isinstance(p, np.memmap) else np.asarray(p)) for p in family.points]
        if model_name == "vae":
            points = [torch.cat(points)]
    data = MetaDataset(points, val_fraction=cfg.val_fraction, test_fraction=0.0, seed=cfg.seed,
                       names=family.names if model_name != "vae" else ["all"], storage=storage)
    seed_everything(cfg.seed)
    model = _build(model_name, family.event_shape, len(data), cfg, summary)
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, context_size=cfg.context_size, lr=cfg.lr,
                     grad_clip=cfg.grad_clip, patience=cfg.patience, seed=cfg.seed, amp=cfg.amp,
                     tensorboard=str(tensorboard) if tensorboard else None)
    info = {"data": {"source": str(Path(data_path).expanduser().resolve()), "names": family.names,
                     "points": [len(p) for p in family.points], "fingerprint": family_fingerprint(family)},
            "model": model_name, "summary": summary, "settings": {k: v for k, v in dataclasses.asdict(cfg).items()
                                              if k not in ("epochs", "patience")}}
    t0 = time.time()
    trainer = Trainer(model, data, tc, out_dir=out / "checkpoints", progress=progress, desc=model_name, run_info=info)
    history = trainer.fit()
    model.save(out / "model.pt", distributions=list(data.names), data=info["data"]["source"], model_name=model_name)
    metrics = {"model": model_name, "data": info["data"], "storage": storage, "event_shape": list(family.event_shape),
               "epochs_trained": trainer.state.epoch, "stopped_early": trainer.stopped_early,
               "best_epoch": trainer.state.best_epoch, "best_val_loss": trainer.state.best_val,
               "train_seconds": round(time.time() - t0, 1), "settings": dataclasses.asdict(cfg), "history": history}
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", out / "metrics.json")
    atomic_write_text("".join(json.dumps(h) + "\n" for h in history), out / "metrics.jsonl")
    _loss_plot(out / "loss.png", history, model_name)
    return metrics


def _loss_plot(path: Path, history: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiments.common import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    if any(h["val_loss"] is not None for h in history):
        ax.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (negative ELBO per point, nats)")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def _array(path, what: str, event_shape) -> torch.Tensor:
    return read_points(path, what, event_shape)  # converted and scaled as training reads the family


def embed_files(model_path, query_path, context_path, out_path, device: str = "cpu", refine_steps: int = 0,
                dist: str | None = None, lr: float = 0.05) -> np.ndarray:
    """Posterior means (n, z_dim) of the queries in ``query_path``, all with the context set in
    ``context_path`` (points of the same distribution), saved as ``out_path`` (.npy). With
    ``refine_steps`` (MetaVAE), each query's q is refined by that many ELBO steps under decoder
    ``dist`` (a training distribution's or an adapted one: `metavae.refine`)."""
    model = load(model_path, device)
    ev = model.event_shape
    uses_context = getattr(model, "uses_context", True)
    if uses_context and context_path is None:
        raise ValueError(f"this {type(model).__name__} encodes each query with a context set of its distribution: "
                         "pass --context points.npy")
    q = _array(query_path, "query", ev).to(device)
    ctx = _array(context_path, "context", ev).to(device) if uses_context else None
    if dist is not None and not refine_steps:
        raise ValueError("--dist names the decoder that --refine-steps refines under; pass --refine-steps K too")
    if refine_steps:
        from .refine import refined_encode

        if not hasattr(model, "adapt") or not getattr(model, "n_decoders", 0):
            raise ValueError(f"--refine-steps refines a MetaVAE's q under one of its decoders; a "
                             f"{type(model).__name__} has no per-distribution decoders to refine under")
        if dist is None:
            raise ValueError("--refine-steps needs --dist: the decoder (training or adapted distribution) whose ELBO "
                             "the steps climb")
        k = decoder_index(model, dist)
        params = refined_encode(model, q.unsqueeze(0), ctx, torch.tensor([k]), steps=refine_steps, lr=lr)[0]
        z = model.latent.mean(params).cpu().numpy()
    else:
        z = model.embed(q, ctx).cpu().numpy()
    _save_npy(out_path, z)
    return z


def decoder_index(model, dist: str) -> int:
    """A MetaVAE decoder named by its distribution's name (as saved with the model) or its index."""
    names = list(getattr(model, "extra", {}).get("distributions", []))
    k = names.index(dist) if dist in names else (int(dist) if str(dist).isdigit() else None)
    if k is None or not 0 <= k < model.n_decoders:
        raise ValueError(f"unknown distribution {dist!r}; the model's decoders: {', '.join(names[:10]) or 'indices'}"
                         f" (0..{model.n_decoders - 1})")
    return k


def sample_files(model_path, out_path, n: int, context_path=None, dist: str | None = None, seed: int = 0,
                 device: str = "cpu") -> np.ndarray:
    """``n`` new points for the distribution of the context set in ``context_path`` (models with a
    shared decoder: NS, VHE), or from training distribution ``dist`` (a name or index; MetaVAE)."""
    model = load(model_path, device)
    gen = torch.Generator().manual_seed(seed)
    context = None if context_path is None else _array(context_path, "context", model.event_shape).to(device)
    if hasattr(model, "c_dim"):
        if context is None:
            raise ValueError("this model generates for a context set: pass --context")
        x = model.sample(n, context, generator=gen)
    else:
        if context is not None:
            model.sample(n, context=context)  # the MetaVAE explains why it cannot
        if dist is None:
            names = list(getattr(model, "extra", {}).get("distributions", []))
            raise ValueError("the MetaVAE samples from one training distribution's decoder: pass --dist NAME "
                             f"(one of {', '.join(names[:10]) or 'its indices'})")
        x = model.sample(n, dist=decoder_index(model, dist), generator=gen)
    x = x.cpu().numpy()
    _save_npy(out_path, x)
    return x


def adapt_files(model_path, data_path, out_path, name: str | None = None, steps: int = 500, seed: int = 0,
                progress: bool = True, device: str = "cpu") -> int:
    """Fit a MetaVAE decoder for the unseen distribution whose points are in ``data_path`` (encoder
    frozen, `MetaVAE.adapt`) and save the grown model as ``out_path``; the new decoder's index.
    ``name`` (default: the file's stem) is how `metavae sample --dist` finds it."""
    model = load(model_path, device)
    if not hasattr(model, "adapt"):
        raise ValueError(f"adapt fits a decoder for a MetaVAE; {type(model).__name__} needs none: it generates "
                         "for a context set directly (metavae sample --context)")
    points = _array(data_path, "points", model.event_shape).to(device)
    names = list(model.extra.get("distributions", [str(k) for k in range(model.n_decoders)]))
    name = name or Path(data_path).stem
    if name in names:
        raise ValueError(f"the model already has a distribution named {name!r}; pass another --name")
    k = model.adapt(points, steps=steps, seed=seed, progress=progress)
    model.save(out_path, **{**model.extra, "distributions": names + [name]})
    return k


def _save_npy(path, array: np.ndarray) -> None:
    from .io import atomic_write

    atomic_write(Path(path), lambda f: np.save(f, array))
