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
from pathlib import Path

import numpy as np
import torch

from .data.files import Family, family_fingerprint, read_family, read_npy, read_npz_with_labels
from .data.files import read_points as read_array
from .data.meta import MetaDataset
from .distributions import make_likelihood
from .io import atomic_write_text, write_json
from .models import kind as model_kind
from .models import load, make_model
from .settings import config, flat, group, setting
from .training import Trainer, TrainConfig, seed_everything
from .training.distributed import available_memory

logger = logging.getLogger(__name__)


@config
class FileTrainConfig:
    """`metavae train` settings (``--set key=value``). Flat points train MLPs; images (H, W) or
    (C, H, W) of at least 16x16 train the convolutional model (``--arch``)."""

    # context_pool: the conv model's only; patience: early stopping on the validation loss
    train: TrainConfig = group(TrainConfig(epochs=50, batch_size=32, context_size=10, lr=1e-3, context_pool=64,
                                           patience=10, grad_clip=10.0),
                               "epochs", "batch_size", "context_size", "lr", "context_pool", "patience", "grad_clip",
                               "seed", "amp", nonzero=("context_size",))
    z_dim: int = setting(4, help="latent dimensions (categorical: the number of values)")
    hidden_widths: tuple = setting((128, 128), help="MLP layer widths of the encoder head and decoders "
                                                    "(old name: hidden)")
    summary_widths: tuple = setting((128, 128), help="layer widths of the context-set network (old name: summary)")
    likelihood: str = setting("auto", choices=("auto", "gaussian", "bernoulli"),
                              help="auto: bernoulli for values in [0, 1] (after scaling), gaussian otherwise")
    scale: str = setting("auto", choices=("auto", "standard", "unit", "none"),
                         help="auto: unit for uint8 or [0, 1] data, standard (per-feature z-score) otherwise")
    latent: str = setting("gaussian", choices=("gaussian", "categorical"),
                          help="categorical: a discrete z with z_dim values (clusters), summed out exactly")
    free_bits: float = setting(0.0, zero=True, help="nats per latent dim below which the KL is not penalised (0: off)")
    channels: tuple = setting((16, 32, 64), help="conv model: the three stage widths")
    conv_hidden: int = setting(128, help="conv model: fully connected width")
    val_fraction: float = setting(0.1, help="of each distribution's points, for validation and early stopping")

    ALIASES: typing.ClassVar[dict] = {"hidden": "hidden_widths", "summary": "summary_widths"}  # older keys

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"setting 'val_fraction' must be in (0, 1), got {self.val_fraction}")
        if self.latent == "categorical" and self.z_dim < 2:
            raise ValueError("latent=categorical needs z_dim >= 2 (the number of values)")


ARCH_CHOICES = ("auto", "mlp", "conv")


def choose_arch(arch: str, event_shape) -> str:
    """``auto``: conv for images (H, W) or (C, H, W) of at least 16x16, MLP otherwise."""
    if arch not in ARCH_CHOICES:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCH_CHOICES)}")
    ev = tuple(event_shape)
    image = len(ev) in (2, 3) and min(ev[-2:]) >= 16 and (len(ev) == 2 or ev[0] <= 4)
    if arch == "conv" and not image:
        raise ValueError(f"--arch conv needs images (H, W) or (C, H, W) of at least 16x16, got points of shape {ev}")
    return ("conv" if image else "mlp") if arch == "auto" else arch


def _float64_notice(family: Family) -> list[str]:
    if any(np.asarray(p[:1]).dtype == np.float64 for p in family.points):
        return ["float64 data cast to float32 (the models' precision)"]
    return []


def _build(model_name: str, event_shape, n: int, cfg: FileTrainConfig, pooling: str = "mean",
           likelihood: str = "gaussian", arch: str = "mlp"):
    """``model_name`` under ``cfg``: arguments are chosen by what its `Kind` takes and can do, not by name.
    A kind with a context latent c (``c_dim``: the NS, the VHE) takes one hidden width and its
    summary width as c; the MetaVAE's builders take the layer widths."""
    kind = model_kind(model_name)
    lik = make_likelihood(likelihood, None)  # Gaussian: a learned variance; Bernoulli takes none
    if pooling != "mean" and not kind.pooling:
        raise ValueError(f"--pooling {pooling}: {kind.title} has no context set to pool")
    if cfg.latent != "gaussian" and not kind.takes("latent"):
        raise ValueError(f"latent={cfg.latent}: {model_name} takes no other latent (the MetaVAE and the VAE do)")
    if cfg.free_bits and not kind.takes("free_bits"):
        raise ValueError(f"free_bits: {model_name} takes none (the MetaVAE and the VAE do)")
    kw = dict(z_dim=cfg.z_dim, likelihood=lik)
    if kind.takes("latent"):
        kw.update(latent=cfg.latent, free_bits=cfg.free_bits)
    if kind.pooling:
        kw.update(pooling=pooling)
    if arch == "conv":
        kw.update(channels=cfg.channels, hidden=cfg.conv_hidden, groups=_groups(cfg.channels))
    if kind.takes("c_dim"):
        kw.update(c_dim=cfg.summary_widths[-1])
        if arch != "conv":
            kw.update(hidden=cfg.hidden_widths[0], decoder_hidden=cfg.hidden_widths[-1])
    else:
        if arch != "conv":
            kw.update(hidden_widths=cfg.hidden_widths)
        if kind.uses_context:
            kw.update(summary_widths=cfg.summary_widths)
    return make_model(model_name, arch, event_shape, n, **kw)


def _groups(channels) -> int:
    """GroupNorm groups that divide every stage width (at most 8)."""
    import math

    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(d for d in (8, 4, 2, 1) if g % d == 0)


def init_checksum(model) -> float:
    """A fingerprint of a model's weights, to check that an untrained rebuild matches training's init."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def untrained_copy(model):
    """The model as it was before training: rebuilt from the config and seed saved at training time
    (the init is deterministic given both); None where the file records neither."""
    from .models.registry import build_model

    extra = getattr(model, "extra", {})
    if "init_config" not in extra or "init_seed" not in extra:
        return None
    seed_everything(int(extra["init_seed"]))
    fresh = build_model(extra["init_config"]).eval()
    if "init_checksum" in extra and not np.isclose(init_checksum(fresh), extra["init_checksum"], rtol=1e-5):
        print("metavae: notice: the untrained rebuild differs from training's init (another torch version?)",
              file=sys.stderr)
    return fresh.to(next(model.parameters()).device)


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
                   progress: bool = True, pooling: str = "mean", storage: str = "auto", arch: str = "auto",
                   device: str = "cpu", summary: str | None = None) -> dict:
    """Train ``model_name`` on every distribution in ``data_path``; writes ``out/model.pt`` (the
    `save_model` format, with the distribution names, the fitted `Scaler`, a table's feature names and
    what rebuilds the untrained init), ``metrics.json``, ``metrics.jsonl`` and ``loss.png``.
    ``storage``: see `choose_storage`; ``summary``: the old name of ``pooling``. Returns the metrics."""
    family = read_points(data_path, dist_column, label_column)
    return train_family(family, out, model_name, cfg, tensorboard, progress, summary or pooling, storage, arch, device)


def train_family(family: Family, out, model_name: str = "metavae", cfg: FileTrainConfig = FileTrainConfig(),
                 tensorboard=None, progress: bool = True, pooling: str = "mean", storage: str = "auto",
                 arch: str = "auto", device: str = "cpu") -> dict:
    """`train_on_files` on a family already in memory (the scikit-learn estimator's way in)."""
    from .settings import check_settings
    from .preprocess import choose_likelihood

    check_settings(cfg)
    kind = model_kind(model_name)
    out = Path(out)
    notices = _float64_notice(family)  # printed as one line with the likelihood's, before training
    only = kind.archs[0] if len(kind.archs) == 1 else None  # a kind built in one architecture only
    arch = choose_arch(only if arch == "auto" and only else arch, family.event_shape)
    if kind.merges_family and len(family.names) > 1:
        logger.info(f"{kind.title} pools every distribution into one (it has one decoder and no context)")
    _check_validation_size(family, cfg)
    points, scaler, storage = _model_points(family, cfg, kind, storage)
    likelihood = choose_likelihood(cfg.likelihood, points if storage != "mapped" else family.points, quiet=True)
    if cfg.likelihood == "auto":
        why = "values in [0, 1]" if likelihood == "bernoulli" else "real values outside [0, 1]"
        notices.append(f"likelihood={likelihood} ({why}; --set likelihood=gaussian|bernoulli to choose)")
    if notices:
        print("metavae: notice: " + "; ".join(notices), file=sys.stderr)
    data = MetaDataset(points, val_fraction=cfg.val_fraction, test_fraction=0.0, seed=cfg.seed,
                       names=family.names if not kind.merges_family else ["all"], storage=storage)
    seed_everything(cfg.seed)
    model = _build(model_name, family.event_shape, len(data), cfg, pooling, likelihood, arch)
    init = {"init_config": dict(model.config), "init_seed": cfg.seed, "init_checksum": init_checksum(model)}
    tc = dataclasses.replace(cfg.train, device=device, tensorboard=str(tensorboard) if tensorboard else None,
                             context_pool=cfg.context_pool if arch == "conv" and kind.uses_context else None)
    source = str(Path(family.source).expanduser().resolve()) if family.source else ""
    info = {"data": {"source": source, "names": family.names,
                     "points": [len(p) for p in family.points], "fingerprint": family_fingerprint(family)},
            "model": model_name, "pooling": pooling, "arch": arch, "likelihood": likelihood, "scale": scaler.kind,
            "settings": {k: v for k, v in flat(cfg).items() if k not in ("epochs", "patience")}}
    t0 = time.time()
    trainer = Trainer(model, data, tc, out_dir=out / "checkpoints", progress=progress, desc=model_name, run_info=info)
    history = trainer.fit()
    model.save(out / "model.pt", distributions=list(data.names), data=info["data"]["source"], model_name=model_name,
               preprocess=scaler.state(), feature_names=family.features, arch=arch, likelihood=likelihood,
               context_size=cfg.context_size, **init)
    metrics = {"model": model_name, "arch": arch, "likelihood": likelihood, "scale": scaler.kind, "pooling": pooling,
               "data": info["data"], "storage": storage, "event_shape": list(family.event_shape),
               "epochs_trained": trainer.state.epoch, "stopped_early": trainer.stopped_early,
               "best_epoch": trainer.state.best_epoch, "best_val_loss": trainer.state.best_val,
               "train_seconds": round(time.time() - t0, 1), "settings": flat(cfg), "history": history}
    _write_outputs(out, metrics, model_name)
    return metrics


def _check_validation_size(family: Family, cfg: FileTrainConfig) -> None:
    """Every distribution's validation part must hold a context set: its queries' contexts come from it."""
    sizes = [len(p) for p in family.points]
    k = int(np.argmin(sizes))
    n_val = int(round(sizes[k] * cfg.val_fraction))
    if min(n_val, sizes[k] - n_val) < cfg.context_size:
        raise ValueError(f"distribution {family.names[k]!r} has {sizes[k]} points: its validation part "
                         f"(val_fraction={cfg.val_fraction}) would hold {n_val}, fewer than context_size="
                         f"{cfg.context_size}; lower context_size, raise val_fraction or drop it")


def _model_points(family: Family, cfg: FileTrainConfig, kind, storage: str) -> tuple:
    """(the points the model trains on, the fitted `Scaler`, the storage): scaled in memory, or the
    files as they are where a mapped family needs no map (the dataset reads uint8 as x/255 itself)."""
    from .preprocess import fit_scaler

    scaler = fit_scaler(family.points, cfg.scale)  # on every point: validation is for early stopping only
    uint8 = all(np.asarray(p[:0]).dtype == np.uint8 for p in family.points)
    passthrough = scaler.kind == "none" or (uint8 and bool((scaler.offset == 0).all() and (scaler.scale == 1).all()))
    storage = choose_storage("padded" if storage == "auto" and (kind.merges_family or not passthrough) else storage,
                             family)
    if storage == "mapped" and kind.merges_family:
        raise ValueError(f"--storage mapped keeps one array per distribution; {kind.title} pools them into one "
                         "(use --storage padded)")
    if storage == "mapped" and not passthrough:
        raise ValueError(f"--storage mapped reads the files as they are, but scale={scaler.kind} maps them: use "
                         "--set scale=none (or unit for uint8 images), or --storage padded")
    if storage == "mapped":
        return family.points, scaler, storage
    points = [scaler.to_model(np.array(p) if isinstance(p, np.memmap) else p) for p in family.points]
    return ([torch.cat(points)] if kind.merges_family else points), scaler, storage


def _write_outputs(out: Path, metrics: dict, model_name: str) -> None:
    """metrics.json, the per-epoch metrics.jsonl and loss.png beside the saved model."""
    write_json(metrics, out / "metrics.json")
    atomic_write_text("".join(json.dumps(h) + "\n" for h in metrics["history"]), out / "metrics.jsonl")
    _loss_plot(out / "loss.png", metrics["history"], model_name)


def _loss_plot(path: Path, history: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

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


def read_points(path, dist_column: str = "distribution", label_column: str | None = None, model=None) -> Family:
    """What `train` reads (.npz, a folder of .npy, CSV/Parquet), or one .npy array (one distribution
    named by the file's stem); with ``model``, checked against its point shape and a table's feature names."""
    path = Path(path).expanduser()
    if path.suffix == ".npy" and model is not None:  # dtypes converted, uint8 / 255, as training reads
        family = Family([path.stem], [read_array(path, "points", model.event_shape).numpy()], None, str(path))
    elif path.suffix == ".npy":
        family = read_npy(path)
    elif path.suffix == ".npz" and label_column is not None:
        family = read_npz_with_labels(path, label_column)
    else:
        family = read_family(path, dist_column, label_column)
    if model is not None:
        _check_against(family, model)
    return family


def _check_against(family: Family, model) -> None:
    want = list(getattr(model, "extra", {}).get("feature_names") or [])
    if family.features is not None and want and family.features != want:
        extra = [c for c in family.features if c not in want]
        missing = [c for c in want if c not in family.features]
        detail = "; ".join(f"{what}: {', '.join(cols[:8])}" for what, cols in
                           (("not in the model", extra), ("missing", missing)) if cols) or "other order"
        raise ValueError(f"{family.source}: its feature columns differ from the model's ({detail}); the model "
                         f"reads {', '.join(want[:8])}")
    if tuple(family.event_shape) != tuple(model.event_shape):
        raise ValueError(f"{family.source}: points of shape {family.event_shape}, but the model reads points of shape "
                         f"{tuple(model.event_shape)}")


def _one_set(path, model, scaler, what: str, dist_column: str = "distribution",
             label_column: str | None = None) -> torch.Tensor:
    """One distribution's points from ``path`` in model units (a file with several is refused)."""
    fam = read_points(path, dist_column, label_column, model=model)
    if len(fam.names) != 1:
        raise ValueError(f"{path}: the {what} must be one distribution's points; this file holds {len(fam.names)} "
                         f"({', '.join(fam.names[:5])})")
    return scaler.to_model(fam.points[0]).to(next(model.parameters()).device)


def load_fitted(model_path, device: str = "cpu"):
    """A saved model and its preprocessing (`Scaler`; the identity for older model files)."""
    from .preprocess import Scaler

    model = load(model_path, device)
    return model, Scaler.of(model)


@torch.no_grad()
def embed_points(model, x: torch.Tensor, context: torch.Tensor | None, batch: int = 1024) -> np.ndarray:
    """Posterior means of model-unit points ``x`` with one shared context set, in batches."""
    uses = getattr(model, "uses_context", True)
    if uses and context is None:
        raise ValueError("this model embeds a point given a context set: pass --context FILE (points of the "
                         "queries' distribution) or --data FILE (each distribution its own context)")
    device = next(model.parameters()).device
    out = [model.embed(x[i:i + batch].to(device), context if uses else None).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


def draw_context(points: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` points (all, if fewer) drawn without replacement: a distribution's own context set."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(points), generator=g)[:size]
    return points[idx]


def embed_family(model, scaler, family: Family, context=None, context_size: int | None = None, seed: int = 0,
                 progress: bool = False) -> list[np.ndarray]:
    """Every point of every distribution embedded with a context set drawn from its own distribution
    (``context_size`` points, default training's), or with the one ``context`` set (model units)."""
    from tqdm.auto import tqdm

    size = context_size or int(getattr(model, "extra", {}).get("context_size", 10))
    device = next(model.parameters()).device
    out = []
    for k, p in enumerate(tqdm(family.points, desc="embed", disable=not progress, leave=False)):
        x = scaler.to_model(p)
        ctx = context if context is not None else draw_context(x, size, seed + k).to(device)
        out.append(embed_points(model, x, ctx))
    return out


def write_embeddings(path, family: Family, z: list[np.ndarray], dist_column: str = "distribution",
                     label_column: str | None = None) -> None:
    """``.npz``: one (n, d) array per distribution; ``.csv``/``.parquet``: the distribution column, the
    label column (if the data had one), then z_0..z_{d-1}; ``.npy``: every point's row, in order."""
    from .io import atomic_write

    path = Path(path)
    if path.suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, **dict(zip(family.names, z))))
    elif path.suffix in (".csv", ".parquet", ".pq"):
        import pandas as pd

        frames = []
        for k, (name, zk) in enumerate(zip(family.names, z)):
            cols = {dist_column: [name] * len(zk)}
            if family.labels is not None:
                cols[label_column or "label"] = family.labels[k]
            cols.update({f"z_{j}": zk[:, j] for j in range(zk.shape[1])})
            frames.append(pd.DataFrame(cols))
        table = pd.concat(frames, ignore_index=True)
        if path.suffix == ".csv":
            atomic_write(path, lambda f: f.write(table.to_csv(index=False).encode()))
        else:
            atomic_write(path, lambda f: table.to_parquet(f, index=False))
    elif path.suffix == ".npy":
        _save_npy(path, np.concatenate(z))
    else:
        raise ValueError(f"{path}: write embeddings to .npz, .csv, .parquet or .npy")


def embed_files(model_path, query_path=None, context_path=None, out_path=None, device: str = "cpu",
                refine_steps: int = 0, dist: str | None = None, lr: float = 0.05, data_path=None,
                dist_column: str = "distribution", label_column: str | None = None,
                context_size: int | None = None, seed: int = 0, progress: bool = False):
    """Posterior means, in one call. With ``data_path`` (any layout `train` reads): every point of
    every distribution, each with a context drawn from its own distribution (or ``context_path``'s one
    set), written by `write_embeddings`; returns the list of arrays. With ``query_path``: the queries
    all with ``context_path``'s set, saved as .npy; returns (n, z_dim). ``refine_steps`` (MetaVAE):
    each query's q refined by that many ELBO steps under decoder ``dist`` (`metavae.refine`)."""
    model, scaler = load_fitted(model_path, device)
    uses = getattr(model, "uses_context", True)
    if (query_path is None) == (data_path is None):
        raise ValueError("pass either --data FILE (every distribution in it) or --query FILE")
    if uses and context_path is None and data_path is None:
        raise ValueError("this model embeds a point given a context set: pass --context FILE (points of the "
                         "queries' distribution) or --data FILE (each distribution its own context)")
    ctx = _one_set(context_path, model, scaler, "context", dist_column, label_column) if uses and context_path else None
    if data_path is not None:
        if refine_steps:
            raise ValueError("--refine-steps works with --query and --context")
        family = read_points(data_path, dist_column, label_column, model=model)
        z = embed_family(model, scaler, family, ctx, context_size, seed, progress)
        if out_path is not None:
            write_embeddings(out_path, family, z, dist_column, label_column)
        return z
    q = _one_set(query_path, model, scaler, "query", dist_column, label_column)
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
        z = embed_points(model, q, ctx)
    if out_path is not None:
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


@torch.no_grad()
def log_prob_data(model, x, context=None, dist: str | int | None = None, k: int = 100) -> torch.Tensor:
    """Importance-weighted log p(x) per point for points in the data's units: the model's stored
    scaler applied to ``x`` and ``context``, the result in data units (minus the map's log-Jacobian
    for a Gaussian likelihood). ``dist``: a MetaVAE's decoder (name or index); NS/VHE need ``context``."""
    from .preprocess import Scaler, data_log_prob

    scaler = Scaler.of(model)
    device = next(model.parameters()).device
    xm = scaler.to_model(x).to(device)
    ctx = None if context is None else scaler.to_model(context).to(device)
    if hasattr(model, "c_dim"):
        lp = model.log_prob(xm, ctx, k=k)
    else:
        lp = model.log_prob(xm, ctx, dist=decoder_index(model, dist if dist is not None else 0), k=k)
    return data_log_prob(lp, scaler, model.likelihood.name)


def sample_model(model, scaler, n: int, context: torch.Tensor | None = None, dist: str | None = None,
                 seed: int = 0, mean: bool = False) -> torch.Tensor:
    """``n`` points in the data's units: draws from p(x | z) (``mean=True``: the decoder's means) for
    the distribution of ``context`` (model units; NS, VHE) or training distribution ``dist`` (MetaVAE)."""
    if n < 1:
        raise ValueError(f"-n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if hasattr(model, "c_dim"):
        if context is None:
            raise ValueError("this model generates for a context set: pass --context")
        x = model.sample(n, context, mean=mean, generator=gen)
    else:
        if context is not None:
            model.sample(n, context=context)  # the MetaVAE explains why it cannot
        if dist is None:
            names = list(getattr(model, "extra", {}).get("distributions", []))
            raise ValueError("the MetaVAE samples from one training distribution's decoder: pass --dist NAME "
                             f"(one of {', '.join(names[:10]) or 'its indices'})")
        x = model.sample(n, dist=decoder_index(model, dist), mean=mean, generator=gen)
    return scaler.to_data(x).cpu()


def sample_files(model_path, out_path, n: int, context_path=None, dist: str | None = None, seed: int = 0,
                 device: str = "cpu", mean: bool = False, dist_column: str = "distribution",
                 label_column: str | None = None) -> np.ndarray:
    """`sample_model` from a model file, written to ``out_path`` (.npy; .csv/.parquet with the
    model's feature names as columns)."""
    model, scaler = load_fitted(model_path, device)
    context = None if context_path is None else _one_set(context_path, model, scaler, "context", dist_column,
                                                         label_column)
    x = sample_model(model, scaler, n, context, dist, seed, mean).numpy()
    write_points(out_path, x, getattr(model, "extra", {}).get("feature_names"))
    return x


def write_points(path, x: np.ndarray, features=None) -> None:
    """Points to .npy, or to a .csv/.parquet table (columns: the model's feature names, else x_0..)."""
    from .io import atomic_write

    path = Path(path)
    if path.suffix in (".csv", ".parquet", ".pq"):
        import pandas as pd

        flat = x.reshape(len(x), -1)
        cols = list(features) if features and len(features) == flat.shape[1] else [f"x_{j}" for j in
                                                                                   range(flat.shape[1])]
        table = pd.DataFrame(flat, columns=cols)
        if path.suffix == ".csv":
            atomic_write(path, lambda f: f.write(table.to_csv(index=False).encode()))
        else:
            atomic_write(path, lambda f: table.to_parquet(f, index=False))
    else:
        _save_npy(path, x)


def adapt_files(model_path, data_path, out_path, name: str | None = None, steps: int = 500, seed: int = 0,
                progress: bool = True, device: str = "cpu", dist_column: str = "distribution",
                label_column: str | None = None) -> list[int]:
    """Fit a MetaVAE decoder for each unseen distribution in ``data_path`` (any layout `train` reads;
    encoder frozen, `MetaVAE.adapt`) and save the grown model as ``out_path``; the new decoders'
    indices. ``name`` (one distribution only; default: its name, for a .npy the file's stem) is how
    `metavae sample --dist` finds it."""
    model, scaler = load_fitted(model_path, device)
    if not hasattr(model, "adapt"):
        raise ValueError(f"adapt fits a decoder for a MetaVAE; {type(model).__name__} needs none: it generates "
                         "for a context set directly (metavae sample --context)")
    family = read_points(data_path, dist_column, label_column, model=model)
    if name is not None and len(family.names) > 1:
        raise ValueError(f"--name names one distribution; {data_path} holds {len(family.names)}")
    names = list(model.extra.get("distributions", [str(k) for k in range(model.n_decoders)]))
    new = [name] if name else list(family.names)
    for nm in new:
        if nm in names:
            raise ValueError(f"the model already has a distribution named {nm!r}; pass another --name")
    ks = []
    for nm, p in zip(new, family.points):
        ks.append(model.adapt(scaler.to_model(p).to(device), steps=steps, seed=seed, progress=progress))
        names.append(nm)
    model.save(out_path, **{**model.extra, "distributions": names})
    return ks


def _save_npy(path, array: np.ndarray) -> None:
    from .io import atomic_write

    atomic_write(Path(path), lambda f: np.save(f, array))
