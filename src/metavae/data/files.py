"""A user's family of data sets from files: one array of points per distribution.

Accepted layouts (`read_family`):
  * ``family.npz``: one array per distribution, the array names naming the distributions;
  * a directory of ``.npy`` files: one per distribution, the file stems naming them (opened
    memory-mapped, so only what is used is read; ``MetaDataset(family.points, storage="mapped")``
    trains on them without loading them, for families larger than memory);
  * ``table.csv`` / ``table.parquet``: one row per point, a column naming the distribution
    (``dist_column``), the other numeric columns the point's features; optionally a column of
    labels (``label_column``), kept aside for read-outs. Read with pandas (pyarrow for Parquet).
Every distribution must hold at least one point of the same shape; the checks that name a bad
distribution (empty, ragged, non-finite values) are those of `MetaDataset`, plus the shape check here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .meta import check_points


@dataclass
class Family:
    names: list[str]
    points: list[np.ndarray]
    labels: list[np.ndarray] | None = None
    source: str = ""
    features: list[str] | None = None  # a table's feature columns, in order (kept in the model file)

    @property
    def event_shape(self) -> tuple:
        return tuple(self.points[0].shape[1:])


def _check(names, arrays, source) -> None:
    if not arrays:
        raise ValueError(f"{source}: holds no distributions")
    shapes = {}
    for name, a in zip(names, arrays):
        if a.ndim == 1:
            raise ValueError(f"{source}: distribution {name!r} is 1-D (shape {a.shape}); give points as rows "
                             "(n, features), e.g. a.reshape(-1, 1) for scalars")
        shapes.setdefault(tuple(a.shape[1:]), []).append(name)
        check_points(a, source, repr(name))  # empty, non-numeric, NaN/inf: named here (a memmap: in chunks)
    if len(shapes) > 1:
        desc = "; ".join(f"{list(s)} for {', '.join(map(repr, ns[:3]))}" for s, ns in shapes.items())
        raise ValueError(f"{source}: distributions disagree on the point shape (ragged): {desc}")


def read_family(path, dist_column: str = "distribution", label_column: str | None = None) -> Family:
    """Read one family of data sets (see the module docstring for the layouts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise ValueError(f"{path}: a data directory must hold one .npy file per distribution; found none")
        names = [f.stem for f in files]
        try:
            arrays = [np.load(f, mmap_mode="r", allow_pickle=False) for f in files]
        except ValueError as e:
            raise ValueError(f"{path}: cannot read a .npy file ({e})") from None
        family = Family(names, arrays, None, str(path))
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                arrays = [z[n] for n in names]
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from None
        family = Family(names, arrays, None, str(path))
    elif path.suffix in (".csv", ".parquet", ".pq"):
        family = _read_table(path, dist_column, label_column)
    else:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .npz, a directory of .npy files, "
                         ".csv or .parquet")
    _check(family.names, family.points, family.source)
    return family


def _read_table(path: Path, dist_column: str, label_column: str | None) -> Family:
    try:
        import pandas as pd
    except ImportError:
        raise ValueError("reading CSV or Parquet needs pandas (and pyarrow for Parquet): "
                         "pip install -e '.[data]' in a clone of metavae") from None
    try:
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except ImportError as e:
        raise ValueError(f"reading {path.name} needs pyarrow: pip install -e '.[data]' in a clone of metavae ({e})") from None
    except Exception as e:  # pandas raises many parser errors; each is a bad file
        raise ValueError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None
    if dist_column not in table.columns:
        raise ValueError(f"{path}: no column {dist_column!r} naming the distribution; columns: "
                         f"{', '.join(map(str, table.columns))} (choose one with --dist-column)")
    if label_column is not None and label_column not in table.columns:
        raise ValueError(f"{path}: no label column {label_column!r}")
    features = [c for c in table.columns if c not in (dist_column, label_column)]
    bad = [c for c in features if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise ValueError(f"{path}: feature columns must be numeric; not numeric: {', '.join(map(str, bad))}")
    if not features:
        raise ValueError(f"{path}: no feature columns besides {dist_column!r}")
    names, points, labels = [], [], []
    for name, rows in table.groupby(dist_column, sort=True):
        names.append(str(name))
        points.append(rows[features].to_numpy())
        if label_column is not None:
            labels.append(rows[label_column].to_numpy())
    return Family(names, points, labels if label_column is not None else None, str(path), list(map(str, features)))
