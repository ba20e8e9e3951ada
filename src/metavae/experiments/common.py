"""What every experiment writes: metrics.json, report.md, figures; and preset handling."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

from ..io import atomic_write, atomic_write_text, write_json
from ..training import is_main_process


def resolve_preset(presets: dict, name: str | None, overrides: dict | None = None):
    """The named preset (default: the first), with ``key=value`` overrides checked by name, type and
    range (`check_settings`) before anything is loaded."""
    name = name or next(iter(presets))
    if name not in presets:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(presets)}")
    cfg = presets[name]
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown setting '{key}' for this experiment; settings: {', '.join(sorted(fields))}")
        cfg = dataclasses.replace(cfg, **{key: _coerce(value, hints[key], key)})
    check_settings(cfg)
    return cfg


def _parts(hint) -> tuple[type, bool]:
    """(the base type, whether None is allowed) of a field's annotation: ``int | None`` -> (int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = [a for a in args if a is not type(None)]
        return (typing.get_origin(base[0]) or base[0]), len(base) < len(args)
    return (typing.get_origin(hint) or hint), False


def _coerce(value, hint, key):
    """A ``--set`` string parsed as JSON and checked against the field's declared type: bool is not
    an int, ints are not floats unless the field is a float, ``null`` only where None is allowed."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
    base, optional = _parts(hint)
    if base is tuple and isinstance(value, str) and isinstance(parsed, (str, int)):
        try:  # "256,256" (or "8") as a list, as well as "[256,256]"
            parsed = json.loads(f"[{value}]")
        except json.JSONDecodeError:
            pass
    if parsed is None:
        if optional:
            return None
        raise ValueError(f"setting '{key}' cannot be null (it expects a {base.__name__})")
    if base is tuple and isinstance(parsed, list):
        parsed = tuple(parsed)
    if base is float and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    if base is str and not isinstance(value, str):
        parsed = value
    wrong = not isinstance(parsed, base) or (base in (int, float) and isinstance(parsed, bool))
    if wrong:
        article = "an" if base.__name__[0] in "aeiou" else "a"
        form = " (a list: 256,256 or [256,256])" if base is tuple else ""
        raise ValueError(f"setting '{key}' expects {article} {base.__name__}{' or null' if optional else ''}{form}, "
                         f"got {value!r}")
    return parsed


# Fields whose values may be zero (all other numbers must be positive) or an empty tuple.
MAY_BE_ZERO = {"ridge", "seed", "free_bits"}
MAY_BE_EMPTY = {"query", "test_context_sizes"}


def check_settings(cfg) -> None:
    """Every field of an experiment's config dataclass against its declared type and range: numbers
    positive (`MAY_BE_ZERO` non-negative), tuples of positive ints non-empty (`MAY_BE_EMPTY` aside),
    strings among the class's ``CHOICES`` where it declares them, and the class's own ``check()``."""
    hints = typing.get_type_hints(type(cfg))
    choices = getattr(type(cfg), "CHOICES", {})
    for f in dataclasses.fields(cfg):
        key, value = f.name, getattr(cfg, f.name)
        base, optional = _parts(hints[key])
        if value is None:
            if not optional:
                raise ValueError(f"setting '{key}' cannot be null")
            continue
        _coerce(value, hints[key], key)  # the type
        if base in (int, float):
            if not math.isfinite(value) or value < 0 or (value == 0 and key not in MAY_BE_ZERO):
                raise ValueError(f"setting '{key}' must be {'>= 0' if key in MAY_BE_ZERO else 'positive'}, got {value}")
        elif base is tuple:
            if not value and key not in MAY_BE_EMPTY:
                raise ValueError(f"setting '{key}' must not be empty")
            bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise ValueError(f"setting '{key}' must hold positive integers, got {list(value)}")
        elif base is str and key in choices and value not in choices[key]:
            allowed = ", ".join(choices[key]) + (" or null" if optional else "")
            raise ValueError(f"setting '{key}' must be one of {allowed}, got {value!r}")
    if hasattr(cfg, "check"):
        cfg.check()


def train_shared(experiment: str, name: str, model, data, cfg, out: Path, device: str, seed: int, progress: bool,
                 epochs: int | None = None, evaluation_only: tuple = ()):
    """Train one model of a point-cloud experiment (mog, physics, expfam) through the one Trainer:
    one shared context set per distribution and step, the experiment config's training fields,
    checkpoints under ``out/checkpoints/name``, and a run identity (experiment, model, seed, every
    setting but ``evaluation_only``) that a resume must match. Returns the model on the CPU, in eval mode."""
    from ..training import Trainer, TrainConfig

    # ``amp`` / ``distributions_per_step``: taken from the experiment config where it declares them
    tc = TrainConfig(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, context_size=cfg.context_size,
                     lr=cfg.lr, steps_per_epoch=cfg.steps_per_epoch, shared_context=True, grad_clip=cfg.grad_clip,
                     seed=seed, device=device, amp=getattr(cfg, "amp", None),
                     distributions_per_step=getattr(cfg, "distributions_per_step", None))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in evaluation_only}
    info = {"experiment": experiment, "model": name, "seed": seed, "settings": settings}
    # a setting added after a checkpoint was written matches it at the setting's default
    defaults = {f"settings.{k}": v for k, v in dataclasses.asdict(type(cfg)()).items() if k in settings}
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


def replace_block(path: Path, name: str, content: str) -> None:
    """Put ``content`` between the ``<!-- name -->`` and ``<!-- /name -->`` lines of a markdown file."""
    path = Path(path)
    text = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(f"{head}{start}\n{content.strip()}\n{end}{tail}", path)


def write_report(out: Path, text: str) -> Path:
    path = Path(out) / "report.md"
    if is_main_process():
        atomic_write_text(text.rstrip() + "\n", path)
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    """Atomic PNG write (a crash never leaves half a picture)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if is_main_process():
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
