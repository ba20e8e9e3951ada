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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.meta import MappedPart, MetaDataset
from ..io import atomic_save, atomic_write_text
from ..nets.mlp import bank_parameters, sparse_bank_gradients
from .checkpoint import CHECKPOINT_VERSION, check_resumable, load_checkpoint
from .config import TrainConfig
from .distributed import LossModule, check_step_memory, init_distributed, process_device, resolve_device
from .optim import RowAdam, make_optimizer, optimizer_step
from .precision import check_bf16, fp32_parameter_outputs
from .progress import progress_bar
from .rng import rng_state, seed_everything, set_rng_state


def _prefetched(batches):
    """``batches``, each drawn in a worker thread while the previous one trains (one ahead). The
    batches and the generator's state at the end are exactly those of drawing them inline: only the
    worker draws, in the same order, and never past the last batch."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for b in batches:
                if not put(b):
                    return
            put(end)
        except BaseException as e:  # handed to the training thread
            put(e)

    worker = threading.Thread(target=work, name="metavae-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


@dataclass
class _State:
    epoch: int = 0  # completed epochs
    step: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    worst_val: float = -math.inf
    worst_epoch: int = -1
    history: list = field(default_factory=list)


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
        self.device = process_device(resolve_device(config.device))
        self.rank, self.world = init_distributed(self.device)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes")
        self.n_dists = len(dataset)
        self.subset = config.distributions_per_step  # None: every distribution in every step
        if self.subset is not None:
            if self.subset > self.n_dists:
                raise ValueError(f"distributions_per_step {self.subset} exceeds the {self.n_dists} distributions "
                                 "of the training data")
        if config.amp == "bf16":
            check_bf16(self.device)
        self.context_size = config.context_size if getattr(model, "uses_context", True) else 0
        check_step_memory(dataset, config, self.context_size, self.device, self.subset or self.n_dists)
        self.model = model.to(self.device)
        self._step_module = LossModule(self.model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._step_module = torch.nn.parallel.DistributedDataParallel(self._step_module, device_ids=ids)
        if config.compile:
            self._step_module = torch.compile(self._step_module)
        self.data = dataset.to(self.device)
        self.out = Path(out_dir) if out_dir is not None else None
        self.progress, self.desc = progress and self.rank == 0, desc
        if self.subset is None:
            self.optimizer = make_optimizer(self.model.parameters(), config.lr)
        else:  # decoders of distributions not in a step must not move: Adam state per bank row
            self.optimizer = RowAdam(self.model.parameters(), bank_parameters(self.model), config.lr)
        self.gen = torch.Generator(device=self.device)
        self.state = _State()
        full = dataset.steps_per_epoch(config.batch_size)
        if self.subset is not None:  # as many draws per distribution as a full-K epoch, on average
            full = -(-full * self.n_dists // self.subset)
        self.steps_per_epoch = config.steps_per_epoch or full
        self._fresh = True
        self._best = None  # the best weights so far, on the CPU (no GPU memory); best.pt is their copy on disk

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path | None:
        return None if self.out is None else self.out / "last.pt"

    @property
    def best_path(self) -> Path | None:
        return None if self.out is None else self.out / "best.pt"

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
                "rng": rng_state(self.gen),
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
        check_resumable(ckpt, self.last_path, self.run_info, self.run_info_defaults, self._model_config(), self.cfg)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = _State(**ckpt["state"])
        set_rng_state(ckpt["rng"], self.gen)
        if self.state.best_epoch >= 0:
            self._restore_best(ckpt)
        self._fresh = False
        self._write_log()  # a kill between the checkpoint and its log leaves the log behind: catch it up
        return True

    def _restore_best(self, ckpt: dict) -> None:
        """The best weights so far from ``best.pt``. Where it is gone: ``last.pt``'s when the last epoch
        was the best (best.pt is written again); otherwise the best is moved to the last epoch (its
        validation loss from the history) and the run says so, so that the final weights and the
        reported best epoch always agree."""
        if self.best_path.exists():
            self._best = load_checkpoint(self.best_path)["model"]
            return
        self._best = {k: v.detach().to("cpu", copy=True) for k, v in ckpt["model"].items()}
        if self.state.best_epoch == self.state.epoch:
            if self.rank == 0:
                self._save_weights(self.best_path, epoch=self.state.epoch, val_loss=self.state.best_val)
            return
        last = self.state.history[-1] if self.state.history else {}
        lost = self.state.best_epoch
        score = last.get("val_loss") if last.get("val_loss") is not None else last.get("train_loss", math.inf)
        self.state.best_val, self.state.best_epoch = score, self.state.epoch
        if self.rank == 0:
            print(f"metavae: notice: {self.best_path} (the weights of epoch {lost}, the lowest validation loss) is "
                  f"missing; the best weights now are epoch {self.state.epoch}'s (the last saved), and the final "
                  "model holds them unless a later epoch does better", file=sys.stderr)

    # -- loop -------------------------------------------------------------------------------
    def _train_batches(self):
        batches = self._subset_batches() if self.subset is not None else self._epoch_batches()
        if isinstance(self.data.part("train"), MappedPart):  # rows read from disk: overlap them with the step
            yield from _prefetched(batches)
        else:
            yield from batches

    def _epoch_batches(self):
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

    def _subset_batches(self):
        """``distributions_per_step`` S: each step, S distributions drawn without replacement (in
        increasing order), B random queries from each (with replacement across steps)."""
        cfg = self.cfg
        for _ in range(self.steps_per_epoch):
            perm = torch.randperm(self.n_dists, generator=self.gen, device=self.gen.device)
            dists = perm[: self.subset].sort().values.cpu()
            yield self.data.sample(cfg.batch_size, self.context_size, "train", self.gen, cfg.exclude_query,
                                   cfg.shared_context, cfg.context_pool, dists=dists)

    def _autocast(self):
        """A training step's forward pass: bf16 autocast with ``amp="bf16"`` (float32 losses: see
        `precision`; `fit` holds the float32 output hooks), and sparse row gradients for the decoder
        banks when a step holds a subset of the distributions."""
        stack = contextlib.ExitStack()
        if self.cfg.amp == "bf16":
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        if self.subset is not None and self.world == 1 and not self.cfg.compile:
            # DDP all-reduces dense gradients only, and torch.compile traces no sparse autograd
            # Function: both take dense bank gradients, zero outside the step's rows, which the
            # optimizer is told (`RowAdam.rows`) so that it still updates only those rows.
            stack.enter_context(sparse_bank_gradients())
        return stack

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
        # With distributions_per_step S the val part is scored S distributions at a time (memory
        # bounded as a training step's); each chunk's losses weigh by its number of distributions.
        chunks = [None] if self.subset is None else [torch.arange(i, min(i + self.subset, self.n_dists))
                                                       for i in range(0, self.n_dists, self.subset)]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + 2)
            features = self._val_context_features()
            for dists in chunks:
                weight = 1 if dists is None else len(dists)
                batches = self.data.epoch(self.cfg.batch_size, self.context_size, "val", gen,
                                          shared_context=self.cfg.shared_context, dists=dists,
                                          context_features=features)
                for i, batch in enumerate(batches):
                    if self.cfg.val_steps is not None and i >= self.cfg.val_steps:
                        break
                    total += float(self.model.loss(batch)["loss"]) * weight
                    n += weight
        self.model.train()
        return total / max(n, 1)

    def _val_context_features(self) -> torch.Tensor | None:
        """Every val point's summary features, where the model pools per-point features
        (`MetaVAE.pool_features`) and each query draws its own set: the val sets are then summed
        from features computed once per point, the same draws and the same sums as encoding each
        set's members (to float rounding), about N times less encoding. None otherwise."""
        pool_features = getattr(self.model, "pool_features", None)
        if pool_features is None or self.context_size == 0 or self.cfg.shared_context:
            return None
        return self.data.part("val").point_features(pool_features)

    def fit(self, resume: bool = True) -> list[dict]:
        """Train up to ``config.epochs`` epochs (continuing a saved run when ``resume``), then load
        the best weights by validation loss (the last ones if there is no val part)."""
        if self.cfg.amp is None:
            return self._fit(resume)
        with fp32_parameter_outputs(self.model):  # losses in float32 under bf16 autocast (precision.py)
            return self._fit(resume)

    def _fit(self, resume: bool) -> list[dict]:
        self._start(resume)
        writer = self._tensorboard()
        total = self.cfg.epochs * self.steps_per_epoch
        bar = progress_bar(total, self.desc, self.progress, initial=self.state.step)
        self.model.train()
        while self.state.epoch < self.cfg.epochs and not self.stopped_early:
            t0 = time.time()
            epoch_loss = self._train_epoch(bar)
            self._end_epoch(epoch_loss, t0, writer)
        bar.close()
        if writer is not None:
            writer.close()
        self.load_best()
        return self.state.history

    def _start(self, resume: bool) -> None:
        """Continue the saved run when ``resume`` finds one; else seed a fresh run (once)."""
        if resume:
            self.resume()
        if self._fresh:
            seed_everything(self.cfg.seed)
            self.gen.manual_seed(self.cfg.seed)
            self._fresh = False
            self._snapshot()

    def _train_epoch(self, bar) -> float:
        """One epoch of optimizer steps; returns the summed loss (over every process under torchrun)."""
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(self._train_batches()):
            with self._autocast():
                loss = self._step_module(batch.shard(self.rank, self.world))["loss"]
            if self.subset is not None:  # torchrun or compile: dense row gradients, name the step's rows
                self.optimizer.rows = batch.dist
            optimizer_step(self.optimizer, loss, self.model.parameters(), self.cfg.grad_clip)
            loss_sum += loss.detach().float()
            self.state.step += 1
            self._snapshot()
            bar.update(1)
            if i % 25 == 24 or i == self.steps_per_epoch - 1:  # host syncs only every few steps
                value = float(loss_sum) / (i + 1)
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} by step {self.state.step}; lower the lr")
                bar.set_postfix(epoch=self.state.epoch + 1, loss=f"{value:.4g}", refresh=False)
        if self.world > 1:  # log the global batch's loss, as a single process would
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= self.world
        return float(loss_sum)

    def _end_epoch(self, epoch_loss: float, t0: float, writer) -> None:
        """Validate, keep the best (and worst) weights, log the epoch (begun at ``t0``) and save ``last.pt``."""
        val = self.validate()
        record = {"epoch": self.state.epoch + 1, "step": self.state.step,
                  "train_loss": epoch_loss / self.steps_per_epoch, "val_loss": val,
                  "seconds": round(time.time() - t0, 3)}
        self.state.epoch += 1
        score = val if val is not None else record["train_loss"]
        if score < self.state.best_val:
            self.state.best_val, self.state.best_epoch = score, self.state.epoch
            self._best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            if self.best_path is not None and self.rank == 0:
                self._save_weights(self.best_path, epoch=self.state.epoch, val_loss=val)
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

    def kept_snapshots(self) -> list:
        """The steps whose snapshots this run's folder holds (those of ``snapshot_steps`` reached, and
        any a run made under another snapshot rule kept), in order."""
        if self.out is None or not (self.out / "snapshots").is_dir():
            return []
        steps = (p.stem.removeprefix("step-") for p in (self.out / "snapshots").glob("step-*.pt"))
        return sorted(int(step) for step in steps if step.isdigit())

    def _snapshot(self) -> None:
        """The weights after ``state.step`` steps, when that step is one of ``snapshot_steps``."""
        if self.out is None or self.rank != 0 or self.state.step not in self.cfg.snapshot_steps:
            return
        self._save_weights(self.snapshot_path(self.state.step), step=self.state.step)

    def _save_weights(self, path: Path, **extra) -> None:
        """A weights-only file (best.pt, worst.pt, snapshots) that `metavae.load` rebuilds."""
        atomic_save({"model": self.model.state_dict(), "model_config": self._model_config(), **extra}, path)

    def load_best(self) -> None:
        """The weights of the lowest-validation-loss epoch (kept as they are when no epoch ran)."""
        if self._best is not None:
            self.model.load_state_dict(self._best)
