"""The checkpoint format: what ``last.pt`` holds, how it is read safely, and the checks that a
resume continues the same run (same run record, same model, same training settings)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..io import safe_load
from ..models.registry import complete_config
from .config import RUNTIME_FIELDS, TrainConfig

CHECKPOINT_VERSION = 2  # 2: loadable with weights_only=True; records the run it belongs to


def load_checkpoint(path: Path, key: str | None = "model") -> dict:
    """A checkpoint read by `metavae.io.safe_load`; one holding no ``key`` is refused as foreign."""
    path = Path(path)
    ckpt = safe_load(path)  # to the CPU: RNG states must stay CPU tensors; load_state_dict moves weights
    if not isinstance(ckpt, dict) or (key is not None and key not in ckpt):
        raise ValueError(f"cannot read checkpoint {path}: not a metavae checkpoint")
    return ckpt


def flatten(d: dict, prefix: str = "") -> dict:
    """{"settings": {"lr": 1}} -> {"settings.lr": 1}: differences named by their full key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(ckpt: dict, path: Path, run_info: dict, run_info_defaults: dict, model_config: dict,
                    config: TrainConfig) -> None:
    """Raise one clear error unless ``ckpt`` continues this run: the format this code writes, the same
    run record (a key the checkpoint predates matches its default in ``run_info_defaults``), the same
    model configuration and the same training settings but for `RUNTIME_FIELDS`."""
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')}, this metavae "
                         f"writes {CHECKPOINT_VERSION}; use another --out or delete it to start afresh")
    a, b = flatten(ckpt.get("run_info", {})), flatten(run_info)
    for k, v in run_info_defaults.items():
        if k not in a and b.get(k) == v:
            a[k] = v
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff[:6])
        raise ValueError(f"checkpoint {path} belongs to another run ({detail[:600]}); "
                         "use another --out or delete it to start afresh")
    if complete_config(ckpt.get("model_config")) != complete_config(model_config):
        raise ValueError(f"checkpoint {path} was written by a different model configuration; "
                         "use another --out or delete it to start afresh")
    # settings added after the checkpoint was written compare at their defaults
    saved = {k: v for k, v in {**asdict(TrainConfig()), **ckpt["train_config"]}.items() if k not in RUNTIME_FIELDS}
    now = {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"checkpoint {path} used other training settings ({', '.join(diff)})")
