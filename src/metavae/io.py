"""Files: the one atomic writer, the one safe reader of torch files, and the lock that makes a run folder belong to one run.

Every file metavae writes goes through `atomic_write`: a temporary file in the target's folder,
flushed to disk, then renamed over the target, so a crash leaves the old file or the new one and
never half of one. Temporary names have a form only metavae makes (`is_temporary`: ``.NAME.`` then
mkstemp's 8 random characters then ``.metavae-tmp``); a failed write removes its own, and
`RunFolder` clears those a killed process left behind -- and nothing else, whatever its name.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

TMP_MARK = ".metavae-tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TMP_MARK))  # mkstemp's random part is 8 of [a-z0-9_]


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected md5."""


def is_temporary(path: Path) -> bool:
    """True for a regular file whose name `atomic_write` (or `RunFolder`'s probe) makes."""
    path = Path(path)
    return bool(_TEMPORARY.fullmatch(path.name)) and path.is_file() and not path.is_symlink()


def atomic_write(path: Path, write: Callable[[object], None], binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_MARK)
    except OSError as e:  # name the file the user asked for, not the temporary beside it
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return path


def atomic_save(obj, path: Path) -> Path:
    """``torch.save`` through `atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


RESTART_HINT = "delete it to start afresh"


def safe_load(path: Path, what: str = "checkpoint", hint: str | None = RESTART_HINT) -> object:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only, so a file planted
    in a run folder cannot run code), to the CPU; an unreadable or unsafe file raises one clear error.
    ``hint``: what to do about it (None for a user's own file, e.g. a model, which is never advised away)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or unsafe file names itself rather than dying deep in pickle
        why = "it holds objects other than tensors and plain data, refused unread" if "GLOBAL" in str(e) \
            else f"corrupt or truncated ({type(e).__name__})"
        raise ValueError(f"cannot read {what} {path}: {why}" + (f"; {hint}" if hint else "")) from None


def atomic_write_text(text: str, path: Path) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def clear_temporaries(folder: Path) -> int:
    """Remove the temporary files that killed writers left in ``folder`` and below (only names
    `is_temporary` accepts: a user's ``.notes.tmp.md`` stays); their count."""
    removed = 0
    for p in Path(folder).rglob(f".*{TMP_MARK}"):
        if is_temporary(p):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


class RunLocked(RuntimeError):
    """Another process holds the run folder."""


class RunFolder(contextlib.AbstractContextManager):
    """``with RunFolder(out):`` -- the folder exists and is writable (checked before any data is
    loaded), no other metavae run is writing into it (an OS lock held by rank 0, released even on
    kill -9), and temporary files of killed runs are cleared."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = None

    def __enter__(self) -> "RunFolder":
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-check.", suffix=TMP_MARK)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OSError(e.errno, f"output folder {self.path} is not writable ({os.strerror(e.errno or errno.EIO)})") \
                from None
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the folder belongs to rank 0's lock
            return self
        self._fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunLocked(f"output folder {self.path} is in use by another metavae run (pid {holder}); "
                            "wait for it or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        clear_temporaries(self.path)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None


# --- the data cache ------------------------------------------------------------------------
# Everything metavae keeps outside a run folder lives under one root: downloads (re-checked by
# md5 on every read) and derived caches (transformed MNIST, rendered synthnorb), which are
# recomputed on demand and so may be cleared at any time.
DERIVED_CACHES = ("mnist/transforms", "synthnorb")
DOWNLOAD_CACHES = ("mnist", "smallnorb")


def cache_root() -> Path:
    """$METAVAE_DATA, else ~/.cache/metavae."""
    return Path(os.environ.get("METAVAE_DATA") or Path.home() / ".cache" / "metavae").expanduser()


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files), len(files)


def cache_info() -> list[dict]:
    """One row per cache folder: its path, whether it is derived (safe to clear), bytes and files.
    Download folders count only their own files, not the derived caches inside them."""
    root, rows = cache_root(), []
    for name in DOWNLOAD_CACHES + DERIVED_CACHES:
        path = root / name
        size, count = _size(path)
        if name in DOWNLOAD_CACHES:
            for derived in DERIVED_CACHES:
                if derived.startswith(name + "/"):
                    d_size, d_count = _size(root / derived)
                    size, count = size - d_size, count - d_count
        rows.append({"name": name, "path": str(path), "derived": name in DERIVED_CACHES, "bytes": size, "files": count})
    return rows


def cache_clear(downloads: bool = False) -> int:
    """Delete the derived caches (and the downloads too with ``downloads``); bytes freed."""
    import shutil

    root, freed = cache_root(), 0
    names = DERIVED_CACHES + (DOWNLOAD_CACHES if downloads else ())
    for name in names:
        path = root / name
        if path.exists():
            freed += _size(path)[0]
            shutil.rmtree(path)
    return freed


def json_safe(obj):
    """``obj`` with NaN/inf floats as None and keys as text: what JSON can hold (json.dumps would
    write NaN, which no JSON reader accepts)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path) -> Path:
    """An indented JSON file of ``obj`` (`json_safe`), written atomically."""
    import json

    return atomic_write_text(json.dumps(json_safe(obj), indent=2) + "\n", Path(path))
