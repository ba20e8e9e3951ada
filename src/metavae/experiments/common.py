"""What every experiment writes: metrics.json, report.md, figures; and preset handling."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..train import atomic_write_text, is_main_process


def resolve_preset(presets: dict, name: str | None, overrides: dict | None = None):
    """The named preset (default: the first), with ``key=value`` overrides checked by name."""
    name = name or next(iter(presets))
    if name not in presets:
        raise ValueError(f"unknown preset '{name}'; choose from {', '.join(presets)}")
    cfg = presets[name]
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown setting '{key}' for this experiment; settings: {', '.join(fields)}")
        cfg = dataclasses.replace(cfg, **{key: _coerce(value, getattr(cfg, key), key)})
    return cfg


def _coerce(value, current, key):
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(current, tuple) and isinstance(parsed, list):
        parsed = tuple(parsed)
    if isinstance(current, float) and isinstance(parsed, int):
        parsed = float(parsed)
    if current is not None and not isinstance(parsed, type(current)):
        raise ValueError(f"setting '{key}' expects a {type(current).__name__}, got {value!r}")
    return parsed


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_metrics(out: Path, metrics: dict) -> Path:
    """metrics.json (NaN/inf become null, so the file is valid JSON); rank 0 only under torchrun."""
    path = Path(out) / "metrics.json"
    if is_main_process():
        atomic_write_text(json.dumps(_clean(metrics), indent=2) + "\n", path)
    return path


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
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    plt.close(fig)
    return path


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
