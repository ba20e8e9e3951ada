"""Training: one `Trainer` for every model, its settings, checkpoints and multi-process runs.

- `config.py`: `TrainConfig`, the settings (checked when built);
- `trainer.py`: `Trainer` (Adam, epochs, validation, best/last checkpoints, exact resume);
- `checkpoint.py`: the checkpoint format, safe loading and the "same run?" check on resume;
- `rng.py`: seeding and the RNG states a checkpoint carries;
- `distributed.py`: devices and torchrun (DDP) processes;
- `precision.py`: ``amp="bf16"`` (bf16 matmuls, float32 losses) on the CPU and CUDA;
- `optim.py`: `make_optimizer` (Adam, fused where available), `RowAdam` (per-decoder state for
  ``distributions_per_step``), the gradient clip and `optimizer_step` (one update, shared with
  decoder adaptation, `metavae.models.decoder_bank`);
- `progress.py`: the training loops' progress bar.
"""
from .checkpoint import CHECKPOINT_VERSION, load_checkpoint
from .config import TrainConfig
from .distributed import distributed_env, is_main_process, resolve_device
from .rng import seed_everything
from .optim import make_optimizer
from .trainer import Trainer

__all__ = ["CHECKPOINT_VERSION", "TrainConfig", "Trainer", "distributed_env", "is_main_process", "load_checkpoint",
           "make_optimizer", "resolve_device", "seed_everything"]
