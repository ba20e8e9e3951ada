"""`TrainConfig`: the Trainer's settings, checked when built so a bad value fails before any data loads.
Each is declared here once (`metavae.settings.setting`); the experiments and `metavae train` nest a
`TrainConfig` holding their defaults and expose the fields they let ``--set`` change."""
from __future__ import annotations

from dataclasses import dataclass

from ..settings import check_settings, setting


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(10, help="training epochs")
    batch_size: int = setting(100, help="queries per distribution and step")
    context_size: int = setting(10, zero=True, help="|D|: points of the same distribution each query's encoder sees")
    lr: float = setting(2e-4, help="Adam step size")
    steps_per_epoch: int | None = setting(None, help="steps per epoch (null: one pass over the largest distribution)")
    val_steps: int | None = setting(None, help="validation steps per epoch (null: one pass over the val part)")
    exclude_query: bool = setting(False, help="draw contexts from the other points only")
    shared_context: bool = setting(False, help="one context set per distribution and step, shared by its queries")
    context_pool: int | None = setting(None, help="draw each query's context from this many points embedded once "
                                                  "per step (null: from the whole distribution)")
    grad_clip: float | None = setting(None, help="gradient norm clip (null: none)")
    seed: int = setting(0, zero=True, help="random seed of the batches and the init")
    device: str = setting("cpu", help="cpu or cuda[:N]")
    amp: str | None = setting(None, choices=("bf16",), help="bf16: bfloat16 matmuls, float32 losses "
                                                            "(training/precision.py); null: float32")
    compile: bool = setting(False, help="torch.compile the loss (pays a one-off compile time)")
    patience: int | None = setting(None, help="stop after this many epochs without a lower validation loss "
                                              "(null: never)")
    tensorboard: str | None = setting(None, help="a folder for TensorBoard event files (needs the tensorboard package)")
    snapshot_steps: tuple = setting((), zero=True, empty=True, help="also keep the weights after these steps "
                                                                    "(0: at init), for learning curves")
    keep_worst: bool = setting(False, help="also keep worst.pt, the highest-validation-loss epoch (the reference's pick)")
    # Train S of the K distributions per step, drawn at random without replacement (None: all K). Decoders
    # not drawn get no update at all (training/optim.py RowAdam); the default epoch becomes K/S times as
    # many steps, so each distribution is drawn about as often as in a full-K epoch.
    distributions_per_step: int | None = setting(None, help="train this many of the K distributions per step "
                                                            "(null: all)")

    def __post_init__(self):
        check_settings(self)


# Settings a resumed run may change between launches; every other one must match the checkpoint's.
RUNTIME_FIELDS = ("epochs", "device", "amp", "compile", "snapshot_steps", "keep_worst", "tensorboard", "patience")
