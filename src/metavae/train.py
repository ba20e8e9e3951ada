"""One Trainer for every model: Adam, epochs, validation, best/last checkpoints, exact resume.

A model only needs ``loss(batch) -> {"loss": scalar, ...}``. Every source of randomness
(parameter init aside) goes through states saved in the checkpoint: torch's global RNG (latent
samples), the data generator (queries and contexts), numpy and Python. A run killed mid-epoch
and restarted from its last checkpoint therefore ends with the same weights as one that was
never interrupted.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.meta import MetaDataset, PooledContext
from .io import atomic_save, atomic_write_text

CHECKPOINT_VERSION = 2  # 2: loadable with weights_only=True; records the run it belongs to


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N'; a clear error where the device is unknown or absent."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device '{name}': use cpu or cuda[:N]") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{name}': use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def is_main_process() -> bool:
    """Only rank 0 writes files (checkpoints, metrics, reports) in a multi-process run."""
    return distributed_env()[0] == 0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group once (gloo on CPU, nccl on CUDA); (rank, world) to use."""
    rank, _, world = distributed_env()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam with PyTorch's default betas/eps (the paper's optimiser). The fused kernel updates each
    parameter in one pass instead of about ten elementwise passes; for the 6.2M-parameter MLP
    MetaVAE on a CPU the unfused update was a large share of a training step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


class _LossModule(torch.nn.Module):
    """DDP synchronises gradients only through ``forward``: route ``model.loss`` through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 100
    context_size: int = 10
    lr: float = 2e-4
    steps_per_epoch: int | None = None  # default: one pass over the largest distribution
    val_steps: int | None = None  # default: one pass over the val part
    exclude_query: bool = False  # draw contexts from the other points only
    shared_context: bool = False  # one context set per distribution and step, shared by its B queries
    context_pool: int | None = None  # draw each query's context from P points embedded once per step
    grad_clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None  # "bf16": autocast the forward pass to bfloat16
    compile: bool = False  # torch.compile the loss (pays a one-off compile time)
    patience: int | None = None  # early stopping: stop after this many epochs without a lower val loss
    tensorboard: str | None = None  # a folder for TensorBoard event files (needs the tensorboard package)
    snapshot_steps: tuple = ()  # also keep the weights after these steps (0: at init), for learning curves
    keep_worst: bool = False  # also keep worst.pt, the highest-validation-loss epoch (the reference's pick)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "context_size", "steps_per_epoch", "val_steps", "context_pool", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_size < 0:
            raise ValueError(f"context_size must be >= 0, got {self.context_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        for name in ("steps_per_epoch", "val_steps", "context_pool", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be positive or None (no clipping), got {self.grad_clip}")


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    worst_val: float = -math.inf
    worst_epoch: int = -1
    history: list = field(default_factory=list)


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"settings": {"lr": 1}} -> {"settings.lr": 1}: differences named by their full key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(path: Path, key: str | None = "model") -> dict:
    """A checkpoint read with ``weights_only=True``: tensors and plain containers only, so a file
    planted in a run folder cannot run code. Unreadable or foreign files raise one clear error."""
    path = Path(path)
    try:
        # to the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the device
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or unsafe file names itself rather than dying deep in pickle
        why = "it holds objects other than tensors and plain data, refused unread" if "GLOBAL" in str(e) \
            else f"corrupt or truncated ({type(e).__name__})"
        raise ValueError(f"cannot read checkpoint {path}: {why}; delete it to start afresh") from None
    if not isinstance(ckpt, dict) or (key is not None and key not in ckpt):
        raise ValueError(f"cannot read checkpoint {path}: not a metavae checkpoint")
    return ckpt


class Trainer:
    """Trains ``model`` on ``dataset`` (a MetaDataset) and writes into ``out_dir``: ``last.pt``
    (everything needed to resume), ``best.pt`` (lowest validation loss) and ``metrics.jsonl``
    (one line per epoch). With ``out_dir=None`` nothing is written and nothing resumes."""

    def __init__(self, model: torch.nn.Module, dataset: MetaDataset, config: TrainConfig, out_dir=None,
                 progress: bool = True, desc: str = "train", run_info: dict | None = None,
                 run_info_defaults: dict | None = None):
        """``run_info``: what this run belongs to (experiment, options, data fingerprint...). It is
        saved in ``last.pt``, and a resume whose ``run_info`` differs is refused, naming the keys.
        ``run_info_defaults`` ({"settings.free_bits": 0.0, ...}): a key a checkpoint lacks (it was
        written before the setting existed) matches when the run uses this default."""
        self.cfg = config
        self.run_info = json.loads(json.dumps(run_info or {}))  # plain JSON types: comparable after a reload
        self.run_info_defaults = json.loads(json.dumps(run_info_defaults or {}))
        device = resolve_device(config.device)
        _, local_rank, world = distributed_env()
        if world > 1 and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
        self.device = device
        self.rank, self.world = init_distributed(device)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes")
        self.model = model.to(self.device)
        self._step_module = _LossModule(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._step_module = torch.nn.parallel.DistributedDataParallel(self._step_module, device_ids=ids)
        if config.compile:
            self._step_module = torch.compile(self._step_module)
        self.data = dataset.to(self.device)
        self.out = Path(out_dir) if out_dir is not None else None
        self.progress, self.desc = progress and self.rank == 0, desc
        uses_context = getattr(model, "uses_context", True)
        self.context_size = config.context_size if uses_context else 0
        self.optimizer = make_optimizer(self.model.parameters(), config.lr)
        self.gen = torch.Generator(device=self.device)
        self.state = _State()
        self.steps_per_epoch = config.steps_per_epoch or dataset.steps_per_epoch(config.batch_size)
        self._fresh = True

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path | None:
        return None if self.out is None else self.out / "last.pt"

    @property
    def best_path(self) -> Path | None:
        return None if self.out is None else self.out / "best.pt"

    def _rng_state(self) -> dict:
        """Every RNG state as tensors, ints and tuples only, so checkpoints load with weights_only=True."""
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate(),
            "data": self.gen.get_state(),
        }

    def _set_rng_state(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        if s.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(s["python"])
        self.gen.set_state(s["data"])

    def _model_config(self) -> dict:
        return dict(getattr(self.model, "config", {}) or {})

    def save(self) -> None:
        if self.out is None or self.rank != 0:
            return
        atomic_save(
            {
                "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "state": asdict(self.state),
                "rng": self._rng_state(),
                "train_config": asdict(self.cfg),
                "model_config": self._model_config(),
                "run_info": self.run_info,
            },
            self.last_path,
        )
        self._write_log()

    def _write_log(self) -> None:
        """metrics.jsonl: one line per epoch of the checkpoint's history (rewritten whole, atomically)."""
        if self.out is None or self.rank != 0:
            return
        atomic_write_text("".join(json.dumps(h) + "\n" for h in self.state.history), self.out / "metrics.jsonl")

    def resume(self) -> bool:
        """Load ``last.pt`` if there is one; True if training continues from it."""
        if self.last_path is None or not self.last_path.exists():
            return False
        ckpt = load_checkpoint(self.last_path)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {self.last_path} has format version {ckpt.get('version')}, this metavae "
                             f"writes {CHECKPOINT_VERSION}; use another --out or delete it to start afresh")
        a, b = _flatten(ckpt.get("run_info", {})), _flatten(self.run_info)
        for k, v in self.run_info_defaults.items():
            if k not in a and b.get(k) == v:
                a[k] = v
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff[:6])
            raise ValueError(f"checkpoint {self.last_path} belongs to another run ({detail[:600]}); "
                             "use another --out or delete it to start afresh")
        from .models.registry import complete_config

        if complete_config(ckpt.get("model_config")) != complete_config(self._model_config()):
            raise ValueError(
                f"checkpoint {self.last_path} was written by a different model configuration; "
                "use another --out or delete it to start afresh"
            )
        runtime = ("epochs", "device", "amp", "compile", "snapshot_steps", "keep_worst", "tensorboard",
                   "patience")  # may change between launches
        # settings added after the checkpoint was written compare at their defaults
        saved = {k: v for k, v in {**asdict(TrainConfig()), **ckpt["train_config"]}.items() if k not in runtime}
        now = {k: v for k, v in asdict(self.cfg).items() if k not in runtime}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(f"checkpoint {self.last_path} used other training settings ({', '.join(diff)})")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = _State(**ckpt["state"])
        self._set_rng_state(ckpt["rng"])
        self._fresh = False
        self._write_log()  # a kill between the checkpoint and its log leaves the log behind: catch it up
        return True

    # -- loop -------------------------------------------------------------------------------
    def _train_batches(self):
        def epoch():
            return self.data.epoch(self.cfg.batch_size, self.context_size, "train", self.gen,
                                   self.cfg.exclude_query, self.cfg.shared_context, self.cfg.context_pool)

        it = epoch()
        for _ in range(self.steps_per_epoch):
            try:
                yield next(it)
            except StopIteration:  # steps_per_epoch longer than one pass: start another pass
                it = epoch()
                yield next(it)

    def _shard(self, batch):
        """This rank's contiguous slice of the B queries of every distribution. Every rank drew the
        same global batch from the same generator, so the ranks' slices partition it exactly and
        DDP's gradient average equals the single-process gradient of the global batch."""
        if self.world == 1:
            return batch
        b = batch.x.shape[1] // self.world
        sl = slice(self.rank * b, (self.rank + 1) * b)
        ctx = batch.context
        if isinstance(ctx, PooledContext):
            ctx = ctx.select(sl)
        elif ctx is not None and ctx.shape[1] != 1:  # a shared set (K, 1, N, ...) goes to every rank
            ctx = ctx[:, sl]
        labels = None if batch.labels is None else batch.labels[:, sl]
        return type(batch)(batch.x[:, sl], ctx, labels, batch.dist)

    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the val part, with contexts and latent noise from a fixed seed so that
        epochs are compared on the same draws (and training's random streams are untouched)."""
        if "val" not in self.data.parts:
            return None
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        total, n = 0.0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 2)
            batches = self.data.epoch(self.cfg.batch_size, self.context_size, "val", gen,
                                      shared_context=self.cfg.shared_context)
            for i, batch in enumerate(batches):
                if self.cfg.val_steps is not None and i >= self.cfg.val_steps:
                    break
                total += float(self.model.loss(batch)["loss"])
                n += 1
        self.model.train()
        return total / max(n, 1)

    def fit(self, resume: bool = True) -> list[dict]:
        """Train up to ``config.epochs`` epochs (continuing a saved run when ``resume``), then load
        the best weights by validation loss (the last ones if there is no val part)."""
        if resume:
            self.resume()
        if self._fresh:
            seed_everything(self.cfg.seed)
            self.gen.manual_seed(self.cfg.seed)
            self._fresh = False
            self._snapshot()
        writer = self._tensorboard()
        total = self.cfg.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=min(self.state.step, total), desc=self.desc, disable=not self.progress,
                   dynamic_ncols=True, leave=False, mininterval=0.2 if sys.stderr.isatty() else 30.0)
        running = None
        self.model.train()
        while self.state.epoch < self.cfg.epochs and not self.stopped_early:
            t0 = time.time()
            loss_sum = torch.zeros((), device=self.device)
            for i, batch in enumerate(self._train_batches()):
                with self._autocast():
                    loss = self._step_module(self._shard(batch))["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                self.optimizer.step()
                loss_sum += loss.detach().float()
                self.state.step += 1
                self._snapshot()
                bar.update(1)
                if i % 25 == 24 or i == self.steps_per_epoch - 1:  # host syncs only every few steps
                    value = float(loss_sum) / (i + 1)
                    if not math.isfinite(value):
                        raise FloatingPointError(f"loss became {value} by step {self.state.step}; lower the lr")
                    running = value
                    bar.set_postfix(epoch=self.state.epoch + 1, loss=f"{running:.4g}", refresh=False)
            if self.world > 1:  # log the global batch's loss, as a single process would
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= self.world
            epoch_loss = float(loss_sum)
            val = self.validate()
            record = {"epoch": self.state.epoch + 1, "step": self.state.step,
                      "train_loss": epoch_loss / self.steps_per_epoch, "val_loss": val,
                      "seconds": round(time.time() - t0, 3)}
            self.state.epoch += 1
            score = val if val is not None else record["train_loss"]
            if score < self.state.best_val:
                self.state.best_val, self.state.best_epoch = score, self.state.epoch
                if self.best_path is not None and self.rank == 0:
                    self._save_weights(self.best_path, epoch=self.state.epoch, val_loss=val)
                elif self.out is None:
                    self._best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.cfg.keep_worst and val is not None and val > self.state.worst_val:
                self.state.worst_val, self.state.worst_epoch = val, self.state.epoch
                if self.out is not None and self.rank == 0:
                    self._save_weights(self.out / "worst.pt", epoch=self.state.epoch, val_loss=val)
            record["best"] = self.state.best_epoch == self.state.epoch
            self.state.history.append(record)
            self.save()
            if writer is not None:
                for key in ("train_loss", "val_loss"):
                    if record[key] is not None:
                        writer.add_scalar(key, record[key], self.state.step)
                writer.flush()
            if self.world > 1:
                torch.distributed.barrier()  # every rank sees the new checkpoint before going on
        bar.close()
        if writer is not None:
            writer.close()
        self.load_best()
        return self.state.history

    @property
    def stopped_early(self) -> bool:
        """True once ``patience`` epochs have passed without a new lowest validation loss."""
        p = self.cfg.patience
        return p is not None and self.state.best_epoch >= 0 and self.state.epoch - self.state.best_epoch >= p

    def _tensorboard(self):
        if self.cfg.tensorboard is None or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("tensorboard logging needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(self.cfg.tensorboard)

    def snapshot_path(self, step: int) -> Path | None:
        return None if self.out is None else self.out / "snapshots" / f"step-{step:07d}.pt"

    def _snapshot(self) -> None:
        """The weights after ``state.step`` steps, when that step is one of ``snapshot_steps``."""
        if self.out is None or self.rank != 0 or self.state.step not in self.cfg.snapshot_steps:
            return
        self._save_weights(self.snapshot_path(self.state.step), step=self.state.step)

    def _save_weights(self, path: Path, **extra) -> None:
        """A weights-only file (best.pt, worst.pt, snapshots) that `metavae.load` rebuilds."""
        atomic_save({"model": self.model.state_dict(), "model_config": self._model_config(), **extra}, path)

    def load_best(self) -> None:
        if self.best_path is not None and self.best_path.exists():
            self.model.load_state_dict(load_checkpoint(self.best_path)["model"])
        elif getattr(self, "_best_weights", None) is not None:
            self.model.load_state_dict(self._best_weights)
