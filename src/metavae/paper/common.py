"""What every experiment writes: metrics.json, report.md, figures; and preset handling."""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from ..io import atomic_write_text, write_json
from ..settings import flat
from ..training import is_main_process


# The training settings the point-cloud experiments (mog, physics, expfam) expose to --set; the rest
# of their TrainConfig is fixed by `train_shared`.
POINT_CLOUD_SETTINGS = ("context_size", "batch_size", "epochs", "steps_per_epoch", "lr", "grad_clip")


def point_cloud_train(**defaults):
    """An experiment's ``train`` group: TrainConfig(**defaults) with `POINT_CLOUD_SETTINGS` exposed
    and a context required (point-cloud queries are always inferred from a context set)."""
    from ..settings import group
    from ..training import TrainConfig

    return group(TrainConfig(**defaults), *POINT_CLOUD_SETTINGS, nonzero=("context_size",))


def train_shared(experiment: str, name: str, model, data, cfg, out: Path, device: str, seed: int, progress: bool,
                 epochs: int | None = None, evaluation_only: tuple = ()):
    """Train one model of a point-cloud experiment (mog, physics, expfam) through the one Trainer:
    one shared context set per distribution and step, the experiment config's training fields,
    checkpoints under ``out/checkpoints/name``, and a run identity (experiment, model, seed, every
    setting but ``evaluation_only``) that a resume must match. Returns the model on the CPU, in eval mode."""
    from ..training import Trainer

    tc = dataclasses.replace(cfg.train, epochs=epochs or cfg.train.epochs, shared_context=True, seed=seed,
                             device=device)
    settings = {k: v for k, v in flat(cfg).items() if k not in evaluation_only}
    info = {"experiment": experiment, "model": name, "seed": seed, "settings": settings}
    # a setting added after a checkpoint was written matches it at the setting's default
    defaults = {f"settings.{k}": v for k, v in flat(type(cfg)()).items() if k in settings}
    Trainer(model, data, tc, out_dir=Path(out) / "checkpoints" / name, progress=progress, desc=name,
            run_info=info, run_info_defaults=defaults).fit()
    return model.to("cpu").eval()


def write_metrics(out: Path, metrics: dict) -> Path:
    """metrics.json (NaN/inf become null, so the file is valid JSON); rank 0 only under torchrun."""
    path = Path(out) / "metrics.json"
    if is_main_process():
        write_json(metrics, path)
    return path


def collect_metrics(runs: Path, dest: Path) -> int:
    """Copy every ``metrics.json`` under ``runs`` to the same relative path under ``dest`` (results
    are small JSON; checkpoints and caches never travel). Returns how many were copied."""
    runs, dest, n = Path(runs), Path(dest), 0
    for path in sorted(runs.rglob("metrics.json")):
        if "checkpoints" in path.parts or dest in path.parents:
            continue
        atomic_write_text(path.read_text(), dest / path.relative_to(runs))
        n += 1
    return n


def write_report(out: Path, text: str) -> Path:
    path = Path(out) / "report.md"
    if is_main_process():
        atomic_write_text(text.rstrip() + "\n", path)
    return path


def render_report(template: str, **values) -> str:
    """The report template ``templates/<template>.md`` (shipped as package data) filled with ``values``
    by ``str.format``: the prose lives in the template, every number in it comes from ``values``."""
    return resources.files(__package__).joinpath("templates", f"{template}.md").read_text().format(**values)


def sci(x: float) -> str:
    """A number as papers write a step size or a sentinel: 2e-4, 1e5."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def config_dict(cfg) -> dict:
    return flat(cfg)
