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

Every dtype is converted to one the models read (`model_dtype`: float16, big-endian, bool and
integers become float32; uint8 stays uint8, read as pixels in [0, 255] and scaled to [0, 1] in
training and in `read_points` alike) or refused in one line naming the file; so is anything
that is not an array of numbers (a text member of an .npz, a garbage file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .meta import FINITE_CHECK_CHUNK, as_float, check_points

if TYPE_CHECKING:
    import torch


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


def model_dtype(a: np.ndarray, where: str) -> np.ndarray:
    """``a`` in a dtype the models read: native float32/float64 and uint8 as they are (a memory
    map stays one), every other real dtype converted (float16, big-endian, bool, integers: to
    float32; the magnitude check of `check_points` then refuses integers too large for float32
    arithmetic); complex, text, dates and objects refused, naming ``where``."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{where}: not an array of numbers (a {type(a).__name__})")
    dt = a.dtype
    if (dt.kind == "f" and dt.itemsize in (4, 8) and dt.isnative) or dt == np.uint8:
        return a
    if dt.kind in "biuf":
        target = np.float64 if dt.kind == "f" and dt.itemsize > 4 else np.float32
        return np.asarray(a, dtype=target)
    raise ValueError(f"{where}: values of type {dt} are not real numbers; the models read floats, ints or bools")


def _check(names, arrays, source, files=None) -> list:
    """The arrays in model dtypes, after the checks that name a bad distribution and its file."""
    if not arrays:
        raise ValueError(f"{source}: holds no distributions")
    shapes, out = {}, []
    for i, (name, a) in enumerate(zip(names, arrays)):
        where = files[i] if files else f"{source}, distribution {name!r}"
        a = model_dtype(a, where)
        if a.ndim < 2:
            raise ValueError(f"{where}: distribution {name!r} is {a.ndim}-D (shape {a.shape}); give points as rows "
                             "(n, features), e.g. a.reshape(-1, 1) for scalars")
        shapes.setdefault(tuple(a.shape[1:]), []).append(name)
        check_points(a, str(files[i]) if files else source, repr(name))  # empty, zero-width, NaN/inf, magnitudes
        out.append(a)
    if len(shapes) > 1:
        desc = "; ".join(f"{list(s)} for {', '.join(map(repr, ns[:3]))}" for s, ns in shapes.items())
        raise ValueError(f"{source}: distributions disagree on the point shape (ragged): {desc}")
    return out


def _load_npy(f: Path, mmap_mode=None) -> np.ndarray:
    """One .npy file, memory-mapped on request; any unreadable file is one ValueError naming it."""
    try:
        return np.load(f, mmap_mode=mmap_mode, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... for one cause: a bad file
        raise ValueError(f"{f}: not a readable .npy file ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _load_npz(path: Path) -> tuple[list, list]:
    """Names and arrays of an .npz archive; a corrupt archive or a member that is not an array
    (text, a pickled object) is one ValueError naming the file and the member."""
    import zipfile

    if not zipfile.is_zipfile(path):  # numpy would try other formats (even pickle) on a non-zip file
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive: corrupt, truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as z:
            names, arrays = list(z.files), []
            for n in names:
                a = z[n]
                if not isinstance(a, np.ndarray):
                    raise ValueError(f"{path}: member {n!r} is not an array (.npz members must be arrays saved "
                                     "by np.savez)")
                arrays.append(a)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:120]})") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, zlib.error...: a corrupt or truncated archive
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: corrupt or truncated)") from None
    return names, arrays


def read_family(path, dist_column: str = "distribution", label_column: str | None = None) -> Family:
    """Read one family of data sets (see the module docstring for the layouts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    files = None
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise ValueError(f"{path}: a data directory must hold one .npy file per distribution; found none")
        names = [f.stem for f in files]
        arrays = [_load_npy(f, mmap_mode="r") for f in files]
        family = Family(names, arrays, None, str(path))
    elif path.suffix == ".npz":
        names, arrays = _load_npz(path)
        family = Family(names, arrays, None, str(path))
    elif path.suffix in (".csv", ".parquet", ".pq"):
        family = _read_table(path, dist_column, label_column)
    else:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .npz, a directory of .npy files, "
                         ".csv or .parquet")
    family.points = _check(family.names, family.points, family.source, files)
    return family


def read_points(path, what: str, event_shape) -> "torch.Tensor":
    """One array of points (n, *event_shape) for `embed`, `sample` and `adapt`: a .npy file (or an
    .npz holding one array), dtypes converted as for training and scaled as training scales them
    (uint8 pixels / 255: `as_float`), checked like a training distribution."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    if path.suffix == ".npz":
        names, arrays = _load_npz(path)
        if len(arrays) != 1:
            raise ValueError(f"{path}: the {what} file must hold one array of points; this .npz holds "
                             f"{len(arrays)} ({', '.join(names[:5])}); save one with np.save")
        a = arrays[0]
    else:
        a = _load_npy(path)
    a = model_dtype(a, str(path))
    if a.ndim != len(event_shape) + 1 or tuple(a.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{path}: {what} must have shape (n, {', '.join(map(str, event_shape))}) for this model, "
                         f"got {a.shape}")
    from .meta import checked_points

    return as_float(checked_points(a, what, path.name))


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
    names_col = _names_column(path, table, dist_column)
    names, points, labels = [], [], []
    for name, rows in table.groupby(names_col, sort=True):
        names.append(str(name))
        points.append(rows[features].to_numpy())
        if label_column is not None:
            labels.append(rows[label_column].to_numpy())
    return Family(names, points, labels if label_column is not None else None, str(path), list(map(str, features)))


def _names_column(path: Path, table, dist_column: str) -> np.ndarray:
    """The distribution column as text: 'NA', '' and 'None' are names like any other; a row with
    no name at all (a CSV row that ends before the column, a Parquet null or NaN) is refused with
    a count, never dropped."""
    if path.suffix == ".csv":
        col = _csv_column(path, dist_column)
        if len(col) != len(table):
            raise ValueError(f"{path}: {len(col)} rows name a distribution but the table has {len(table)} rows "
                             "(blank or malformed lines?)")
        missing = np.array([v is None for v in col], dtype=bool)
    else:
        col = table[dist_column].to_numpy()
        missing = table[dist_column].isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(f"{path}: {int(missing.sum())} row(s) have no {dist_column!r} (the first is data row "
                         f"{first + 1}); every row must name its distribution")
    return np.array([str(v) for v in col], dtype=object)


def _csv_column(path: Path, column: str) -> list:
    """One CSV column read verbatim (Python's csv module: no NA parsing), None where a row ends
    before it; blank lines are skipped, as pandas skips them."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if column not in header:
            raise ValueError(f"{path}: no column {column!r} in the header")
        i = header.index(column)
        return [row[i] if len(row) > i else None for row in rows if row]


def family_fingerprint(family: Family) -> dict:
    """What identifies a family's data, for a resume to check it trains on the same: names,
    shapes, dtypes and a sha256 of the values (read in chunks, so a mapped family stays bounded)."""
    import hashlib

    digest = hashlib.sha256()
    for name, a in zip(family.names, family.points):
        digest.update(f"{name}\0{a.shape}\0{a.dtype}\0".encode())
        step = max(1, FINITE_CHECK_CHUNK // max(1, int(np.prod(a.shape[1:]))))
        for start in range(0, len(a), step):
            digest.update(np.ascontiguousarray(a[start:start + step]).tobytes())
    return {"names": list(family.names), "shapes": [list(a.shape) for a in family.points],
            "dtypes": [str(a.dtype) for a in family.points], "sha256": digest.hexdigest()}


def read_npy(path) -> Family:
    """One .npy file as a family of one distribution (named by the file's stem), read and checked
    as a training family's files are (dtypes converted, one line for a bad file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return Family([path.stem], _check([path.stem], [_load_npy(path)], str(path)), None, str(path))


def read_npz_with_labels(path, label_column: str) -> Family:
    """An .npz whose arrays ``LABEL/NAME`` hold the labels of distribution ``NAME`` (images keep their
    shape, which a table would flatten): ``np.savez(f, **{"d0": x0, "label/d0": y0, ...})``."""
    path = Path(path).expanduser()
    keys, arrays = _load_npz(path)
    by_key, prefix = dict(zip(keys, arrays)), f"{label_column}/"
    names = [k for k in keys if not k.startswith(prefix)]
    missing = [n for n in names if prefix + n not in by_key]
    if missing:
        raise ValueError(f"{path}: --label-column {label_column}: no array {prefix}{missing[0]} with the labels "
                         f"of {missing[0]!r} (an .npz keeps labels as arrays named {prefix}NAME)")
    points, labels = _check(names, [by_key[n] for n in names], str(path)), [by_key[prefix + n] for n in names]
    for n, x, y in zip(names, points, labels):
        if y.shape != (len(x),):
            raise ValueError(f"{path}: {prefix}{n} must hold one label per point ({len(x)}), got shape {y.shape}")
    return Family(names, points, labels, str(path))
