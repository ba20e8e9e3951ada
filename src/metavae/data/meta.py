"""Families of distributions as data: one tensor per distribution, vectorized context sampling.

A `MetaDataset` holds K distributions, each split into train/val/test parts. Every part is
stored as one padded tensor ``(K, max_n, *event)`` plus per-distribution lengths, so that a
query batch ``(K, B, *event)`` and its context sets ``(K, B, N, *event)`` are gathered with a
single indexing operation for all distributions at once: no per-item Python in the hot path.

Two options for large families:
  * ``dists=`` on `MetaDataset.sample` / `epoch`: a batch of S of the K distributions (rows in the
    order given, ``batch.dist`` naming them), at a cost that does not depend on K;
  * ``storage="mapped"``: each distribution stays the array it was given (e.g. a `numpy.memmap`
    of one ``.npy`` file, as `metavae.data.files.read_family` opens them) and a batch reads only
    its rows, so a family larger than memory trains with bounded resident memory (`MappedPart`).
    Parts are index arrays into those arrays, and batches equal the padded storage's for the same
    seed and generator.
"""
from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..devices import resolve_device

logger = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
STORAGES = ("padded", "mapped")
FINITE_CHECK_CHUNK = 1 << 24  # values per chunk when checking a large array for NaN/inf
MAPPED_RELEASE_BYTES = 256 << 20  # mapped storage: drop this process's mapped pages after ~this much was mapped
_FAULT_AROUND = 64 << 10  # Linux maps up to 64 KB around a faulting file page (fault_around_bytes)
# Values above this overflow float32 arithmetic (a square exceeds float32's 3.4e38): refused as too
# large, before training could report the overflow as divergence.
MAX_MAGNITUDE = 1e18
# Per-point features kept for a whole part (`Part.point_features`: validation) stay below this.
FEATURE_BYTES = 1 << 30


def gather_members(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[k, index[k, b, n]]``: (K, P, ...) gathered by (K, B, N) indices -> (K, B, N, ...),
    the members of each query's set in a pool (its points, or their features)."""
    K, B, N = index.shape
    rows = torch.arange(K, device=index.device).view(K, 1)
    return values[rows, index.reshape(K, B * N)].reshape(K, B, N, *values.shape[2:])


def mean_members(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather_members(features, index).mean(2)`` for features (K, P, F): each query's mean member
    feature (K, B, F), as one fused gather-and-average (``embedding_bag``) that never materialises
    the (K, B, N, F) members: several times faster at evaluation's sizes, equal to float rounding."""
    K, P, F = features.shape
    B, N = index.shape[1:]
    flat = (index + torch.arange(K, device=index.device).view(K, 1, 1) * P).reshape(K * B, N)
    return torch.nn.functional.embedding_bag(flat, features.reshape(K * P, F), mode="mean").reshape(K, B, F)


@torch.no_grad()
def map_points(fn, points: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``fn`` (a per-point network: (M, *event) -> (M, F)) of points (K, P, *event) -> (K, P, F),
    ``chunk`` points at a time, uint8 images read as floats chunk by chunk (`as_float`)."""
    K, P = points.shape[:2]
    flat = points.reshape(K * P, *points.shape[2:])
    return torch.cat([fn(as_float(flat[i:i + chunk])) for i in range(0, K * P, chunk)]).reshape(K, P, -1)


@dataclass
class PooledContext:
    """Context sets drawn from one pool per distribution: ``pool`` (K, P, *event) holds P distinct
    points, ``index`` (K, B, N) picks each query's N pool members (distinct per query). A model
    embeds the P pool points once per step instead of B*N context points. ``features`` (K, P, F),
    when given, are the summary network's per-element features of the pool, computed once for
    many batches of queries (evaluation, validation: `MetaVAE.pool_features`); ``pool`` may then be
    None (the points themselves are not needed)."""

    pool: torch.Tensor | None
    index: torch.Tensor
    features: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "PooledContext":
        move = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking))
        return PooledContext(move(self.pool), move(self.index), move(self.features))

    def check_queries(self, x: torch.Tensor) -> None:
        """Raise unless ``index`` picks sets for exactly the (K, B) queries ``x`` (K, B, *event)."""
        if self.index.shape[:2] != tuple(x.shape[:2]):
            raise ValueError(f"context pool index {tuple(self.index.shape)} does not match queries {tuple(x.shape)}")

    def select(self, queries: slice) -> "PooledContext":
        return PooledContext(self.pool, self.index[:, queries], self.features)

    def materialize(self) -> torch.Tensor:
        """The explicit context sets (K, B, N, *event), for models that need them."""
        if self.pool is None:
            raise ValueError("these context sets carry only their features, not their points")
        return gather_members(self.pool, self.index)


@dataclass
class Batch:
    """A query batch with one context set per query, all distributions stacked on dim 0.

    ``x``: (K, B, *event); ``context``: (K, B, N, *event), (K, 1, N, *event) when the B queries
    share one set, a `PooledContext`, or None (no context, e.g. a VAE); ``labels``: (K, B, ...)
    or None; ``dist``: (K,) indices of the distributions in the dataset, used by models with one
    decoder per training distribution. It stays on the CPU, so choosing decoders needs no sync.
    """

    x: torch.Tensor
    context: torch.Tensor | None
    labels: torch.Tensor | None
    dist: torch.Tensor

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.x), move(self.context), move(self.labels), self.dist)  # dist: CPU, picks decoders

    def shard(self, rank: int, world: int) -> "Batch":
        """Process ``rank``'s contiguous slice of the B queries of every distribution. Every rank drew
        the same global batch from the same generator, so the slices partition it exactly and DDP's
        gradient average equals the one-process gradient of the global batch."""
        if world == 1:
            return self
        b = self.x.shape[1] // world
        sl = slice(rank * b, (rank + 1) * b)
        ctx = self.context
        if isinstance(ctx, PooledContext):
            ctx = ctx.select(sl)
        elif ctx is not None and ctx.shape[1] != 1:  # a shared set (K, 1, N, ...) goes to every rank
            ctx = ctx[:, sl]
        labels = None if self.labels is None else self.labels[:, sl]
        return Batch(self.x[:, sl], ctx, labels, self.dist)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 tensors are images in [0, 255] stored compactly; models see floats in [0, 1]."""
    if x.dtype == torch.uint8:
        return torch.div(x, 255.0)  # float32; one pass instead of convert-then-divide
    return x if x.is_floating_point() else x.float()


def check_points(points, part: str, dist: str) -> None:
    """Refuse a distribution's points that `checked_points` refuses (a scalar, no points, complex or
    bool values, NaN/inf), without converting or copying them: a memory-mapped array is read in
    chunks of `FINITE_CHECK_CHUNK` values, so checking a file larger than memory stays bounded."""
    where = f"{part} part, distribution {dist}"
    if isinstance(points, torch.Tensor):
        checked_points(points, part, dist)
        return
    a = points if isinstance(points, np.ndarray) else np.asarray(points)
    if a.ndim == 0:
        raise ValueError(f"{where}: expected an array of points (n, ...), got a scalar")
    if len(a) == 0:
        raise ValueError(f"{where}: no points (every distribution needs at least one)")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{where}: expected real numbers, got {torch.from_numpy(np.zeros(0, a.dtype)).dtype}")
    if not (np.issubdtype(a.dtype, np.number)):
        raise ValueError(f"{where}: expected real numbers, got {a.dtype}")
    _check_width(a.shape, where)
    if a.dtype != np.uint8:
        row = max(1, int(np.prod(a.shape[1:])))
        step = max(1, FINITE_CHECK_CHUNK // row)
        first, count, top = None, 0, 0.0
        for start in range(0, len(a), step):
            chunk = np.asarray(a[start:start + step]).reshape(-1, row)
            if np.issubdtype(a.dtype, np.floating):
                bad = ~np.isfinite(chunk).all(axis=1)
                if bad.any():
                    first = start + int(np.flatnonzero(bad)[0]) if first is None else first
                    count += int(bad.sum())
                    continue
            top = max(top, float(np.abs(chunk.astype(np.float64, copy=False)).max()))
        if first is not None:
            raise ValueError(f"{where}: point {first} holds a non-finite value (NaN or inf); "
                             f"{count} such point(s) in all")
        _check_magnitude(top, where)


def samples_by_keys(n_max: int, size: int) -> bool:
    """Which exact method draws context sets of ``size`` from up to ``n_max`` points: random keys
    over the whole padded pool (one float per point and query) where it is small, else Floyd's."""
    return n_max <= 4 * size * size


def _tensor(points, where: str) -> torch.Tensor:
    """``points`` as a tensor that needs no gradient (data are constants: a tensor that requires
    grad would make every step backpropagate into it), any numpy byte order accepted."""
    if isinstance(points, np.ndarray) and not points.dtype.isnative:
        points = points.astype(points.dtype.newbyteorder("="))  # torch reads native byte order only
    try:
        return torch.as_tensor(points).detach()
    except (TypeError, RuntimeError, ValueError) as e:
        raise TypeError(f"{where}: not an array of numbers ({str(e).splitlines()[0][:120]})") from None


def _check_width(shape, where: str) -> None:
    """Points with no values (shape (n, 0)) describe nothing a model could fit."""
    if len(shape) >= 2 and 0 in tuple(shape[1:]):
        raise ValueError(f"{where}: points of shape {tuple(shape[1:])} hold no values (a zero-width array)")


def _check_magnitude(top: float, where: str) -> None:
    if top > MAX_MAGNITUDE:
        raise ValueError(f"{where}: values up to {top:.3g} overflow float32 arithmetic (magnitudes must stay "
                         f"below {MAX_MAGNITUDE:.0e}); rescale the data, e.g. standardise each feature")


def checked_points(points, part: str, dist: str) -> torch.Tensor:
    """One distribution's points as a tensor: numpy is accepted, float64 becomes float32 (the
    models' dtype; logged), and empty sets, non-numeric and non-finite values are refused with the
    part, distribution and index named. Tensors that require grad are detached: data are constants."""
    where = f"{part} part, distribution {dist}"
    t = _tensor(points, where)
    if t.dim() == 0:
        raise ValueError(f"{where}: expected an array of points (n, ...), got a scalar")
    if len(t) == 0:
        raise ValueError(f"{where}: no points (every distribution needs at least one)")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{where}: expected real numbers, got {t.dtype}")
    _check_width(tuple(t.shape), where)
    if t.dtype == torch.float64:
        logger.info("%s: float64 cast to float32", where)
        t = t.float()
    elif t.is_floating_point() and t.dtype != torch.float32:  # float16, bfloat16: the models compute in float32
        t = t.float()
    if t.is_floating_point():
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{where}: point {i} holds a non-finite value (NaN or inf); "
                             f"{int(bad.sum())} such point(s) in all")
    if t.dtype != torch.uint8 and t.numel():
        _check_magnitude(float(t.abs().max().double()), where)
    return t


def _rows(dists, K: int) -> torch.Tensor:
    """``dists`` as a CPU long tensor of distinct distribution indices in [0, K)."""
    rows = torch.as_tensor(dists, dtype=torch.long).reshape(-1).cpu()
    if len(rows) == 0:
        raise ValueError("dists must name at least one distribution")
    if int(rows.min()) < 0 or int(rows.max()) >= K:
        raise ValueError(f"dists must be distribution indices in [0, {K}), got {rows.tolist()[:8]}")
    if len(torch.unique(rows)) != len(rows):
        raise ValueError("dists must not repeat a distribution")
    return rows


class Part:
    """One part (train, val or test) of every distribution: padded data, lengths, labels."""

    def __init__(self, tensors: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, name: str,
                 dist_names: Sequence[str] | None = None):
        tensors = [checked_points(t, name, dist_names[k] if dist_names else str(k)) for k, t in enumerate(tensors)]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"{name}: every distribution must have the same event shape, got {sorted(shapes)}")
        self.name = name
        self.event_shape = shapes.pop()
        self.lengths = torch.tensor([len(t) for t in tensors], dtype=torch.long)
        n_max = int(self.lengths.max())
        self.data = tensors[0].new_zeros((len(tensors), n_max, *self.event_shape))
        for k, t in enumerate(tensors):
            self.data[k, : len(t)] = t
        self.labels = None
        if labels is not None:  # class ids (padded with -1) or float targets (e.g. a true parameter)
            labels = [torch.as_tensor(y) for y in labels]
            dtype = torch.float32 if any(y.is_floating_point() for y in labels) else torch.long
            shapes = {tuple(y.shape[1:]) for y in labels}
            if len(shapes) != 1:
                raise ValueError(f"{name}: label tensors disagree on shape after the first dim: {sorted(shapes)}")
            self.labels = torch.full((len(tensors), n_max, *shapes.pop()), -1, dtype=dtype)
            for k, (t, y) in enumerate(zip(tensors, labels)):
                if len(y) != len(t):
                    raise ValueError(f"{name}: distribution {k} has {len(t)} points but {len(y)} labels")
                self.labels[k, : len(y)] = y.to(dtype)

    @property
    def n_distributions(self) -> int:
        return len(self.lengths)

    @property
    def n_max(self) -> int:
        """Points in the largest distribution (the padded length)."""
        return self.data.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def row_lengths(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.lengths if rows is None else self.lengths[rows.to(self.lengths.device)]

    def to(self, device) -> "Part":
        self.data = self.data.to(device)
        self.lengths = self.lengths.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self

    def select(self, dists: Sequence[int]) -> "Part":
        idx = torch.as_tensor(list(dists), dtype=torch.long)
        new = object.__new__(Part)
        new.name, new.event_shape = self.name, self.event_shape
        new.lengths = self.lengths[idx.to(self.lengths.device)]
        new.data = self.data[idx.to(self.data.device)][:, : int(new.lengths.max())]
        new.labels = None if self.labels is None else self.labels[idx.to(self.labels.device)][:, : new.data.shape[1]]
        return new

    # -- sampling ---------------------------------------------------------------------------
    def sample_context(
        self, query_idx: torch.Tensor, size: int, generator: torch.Generator | None, exclude_query: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Indices (K, B, size) of context points, drawn without replacement per query.

        Two exact, vectorized methods, chosen by cost: where the padded pool is small, random
        keys with ``topk`` (one kernel); where it is large (e.g. 60k MNIST images), Robert
        Floyd's algorithm, ``size`` iterations of a few tensor ops over every (distribution,
        query) pair. With ``exclude_query`` the query's own point is never drawn. ``rows``: which
        distributions the K rows of ``query_idx`` are (default: all, in order).
        """
        K, B = query_idx.shape
        lengths = self.row_lengths(rows)
        pool = (lengths - int(exclude_query)).to(query_idx.device)
        if size > int(pool.min()):
            k = int(torch.argmin(pool))
            name = k if rows is None else int(rows[k])
            raise ValueError(
                f"context size {size} exceeds the {int(pool[k])} points available in distribution {name} "
                f"of the {self.name} part" + (" (the query itself is excluded)" if exclude_query else "")
            )
        if samples_by_keys(self.n_max, size):
            return self._sample_by_keys(query_idx, size, generator, exclude_query, lengths)
        return self._sample_floyd(query_idx, size, generator, exclude_query, pool)

    def _sample_by_keys(self, query_idx, size, generator, exclude_query, lengths):
        K, B = query_idx.shape
        n_max = self.n_max
        keys = torch.rand((K, B, n_max), generator=generator, device=self.device).to(query_idx.device)
        slots = torch.arange(n_max, device=query_idx.device)
        invalid = slots >= lengths.to(query_idx.device).view(K, 1, 1)
        if exclude_query:
            invalid = invalid | (slots == query_idx.unsqueeze(-1))
        return keys.masked_fill(invalid, 2.0).topk(size, dim=-1, largest=False, sorted=False).indices

    def _sample_floyd(self, query_idx, size, generator, exclude_query, pool):
        K, B = query_idx.shape
        chosen = torch.empty((K, B, size), dtype=torch.long, device=query_idx.device)
        u = torch.rand((size, K, B), generator=generator, device=self.device).to(query_idx.device)
        for i in range(size):
            j = (pool - size + i).view(K, 1)  # candidate range [0, j]
            t = (u[i] * (j + 1).to(u.dtype)).long().clamp_max(j.expand(K, B))
            taken = (chosen[..., :i] == t.unsqueeze(-1)).any(-1) if i else torch.zeros_like(t, dtype=torch.bool)
            chosen[..., i] = torch.where(taken, j.expand(K, B), t)
        if exclude_query:  # a subset of the other n-1 points: skip over the query's own index
            chosen += (chosen >= query_idx.unsqueeze(-1)).long()
        return chosen

    def gather(self, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Points ``data[k, idx[k, ...]]`` for index tensors shaped (K, ...); row k of ``idx``
        belongs to distribution ``rows[k]`` (default: k)."""
        K = idx.shape[0]
        flat = idx.reshape(K, -1)
        if rows is None:
            r = torch.arange(K, device=idx.device).unsqueeze(1).expand_as(flat)
        else:
            r = rows.to(idx.device).unsqueeze(1).expand_as(flat)
        out = self.data[r, flat]
        return out.reshape(*idx.shape, *self.event_shape)

    def gather_labels(self, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            r = torch.arange(idx.shape[0], device=idx.device)
        else:
            r = rows.to(idx.device)
        r = r.view(-1, *([1] * (idx.dim() - 1)))
        return self.labels[r.to(self.labels.device), idx.to(self.labels.device)]

    def batch(self, query_idx: torch.Tensor, context_size: int, generator, exclude_query: bool = False,
              shared_context: bool = False, context_pool: int | None = None,
              rows: torch.Tensor | None = None, features: torch.Tensor | None = None) -> Batch:
        """Queries at ``query_idx`` (K, B) with context sets (K, B, N, ...); with ``shared_context``
        one set per distribution (K, 1, N, ...) that all B queries share; with ``context_pool`` P a
        `PooledContext`: each query's N points are drawn from P pool points per distribution.
        ``rows`` (K,): the distributions of the K rows (default: all, in order). ``features``
        (n_distributions, n_max, F): the summary network's features of every point of this part
        (`point_features`); the sets are then the same draws, carried as a `PooledContext` of
        indices into the part, so a model encodes each point once instead of once per set."""
        x = as_float(self.gather(query_idx, rows))
        context = None
        if context_size > 0:
            if (shared_context or context_pool) and exclude_query:
                raise ValueError("exclude_query needs a context set per query drawn from the whole part; "
                                 "it cannot be combined with shared_context or a context pool")
            if shared_context and context_pool:
                raise ValueError("choose shared_context or a context pool, not both")
            if context_pool:
                context = self._pooled_context(query_idx, context_size, context_pool, generator, rows)
            elif features is not None and not shared_context:
                idx = self.sample_context(query_idx, context_size, generator, exclude_query, rows)
                mine = features if rows is None else features[rows.to(features.device)]
                context = PooledContext(None, idx.to(mine.device), mine)
            else:
                owner = query_idx[:, :1] if shared_context else query_idx
                idx = self.sample_context(owner, context_size, generator, exclude_query, rows)
                context = as_float(self.gather(idx, rows))
        labels = None
        if self.labels is not None:
            labels = self.gather_labels(query_idx, rows)
        dist = torch.arange(self.n_distributions) if rows is None else rows.cpu()  # dist stays on the CPU
        return Batch(x, context, labels, dist)

    def _pooled_context(self, query_idx, size: int, context_pool: int, generator, rows=None) -> PooledContext:
        if context_pool < size:
            raise ValueError(f"context pool {context_pool} is smaller than the context size {size}")
        K, B = query_idx.shape
        pool = self.sample_context(query_idx[:, :1], context_pool, generator, rows=rows).squeeze(1)  # (K, P)
        keys = torch.rand((K, B, context_pool), generator=generator, device=self.device).to(query_idx.device)
        index = keys.topk(size, dim=-1, largest=False, sorted=False).indices  # N distinct members per query
        return PooledContext(as_float(self.gather(pool, rows)), index)

    @torch.no_grad()
    def point_features(self, fn, chunk: int = 2048, max_bytes: int | None = FEATURE_BYTES) -> torch.Tensor | None:
        """``fn`` of every point, distribution by distribution in chunks of ``chunk`` points:
        (n_distributions, n_max, F), zero in padded slots. ``fn`` maps points (1, M, *event) to
        features (1, M, F), or to None (then this returns None: the model keeps no such features).
        Reads through `gather`, so a memory-mapped part is never read whole. None too where the
        features would exceed ``max_bytes`` (a large part: its sets are then encoded as drawn)."""
        out = None
        for k, n in enumerate(self.lengths.tolist()):
            row = torch.tensor([k])
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(start + chunk, n)).unsqueeze(0)
                f = fn(as_float(self.gather(idx.to(self.device), row.to(self.device))))
                if f is None:
                    return None
                if out is None:
                    shape = (self.n_distributions, self.n_max, f.shape[-1])
                    if max_bytes is not None and math.prod(shape) * f.element_size() > max_bytes:
                        return None
                    out = f.new_zeros(shape)
                out[k, start:start + f.shape[1]] = f[0]
        return out

    def permutations(self, generator: torch.Generator | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One random order per distribution (K, max_n), or per distribution in ``rows``; padded
        slots sort last."""
        lengths = self.row_lengths(rows)
        keys = torch.rand((len(lengths), self.n_max), generator=generator, device=self.device)
        pad = torch.arange(self.n_max, device=keys.device).unsqueeze(0) >= lengths.to(keys.device).unsqueeze(1)
        return keys.masked_fill(pad, 2.0).argsort(dim=1)


class MappedPart(Part):
    """A part whose points stay where they are: one array per distribution (a `numpy.memmap` of a
    ``.npy`` file, or any array), plus, per distribution, the rows of that array that belong to this
    part. A batch reads only its own rows (a sorted fancy index per distribution), so resident
    memory is bounded by what a step touches, not by the family's size. Sampling draws exactly the
    random numbers the padded `Part` draws, so both storages give the same batches for one seed.
    Labels (small) are kept padded in memory. float64 points are read as float32.

    Pages of a memory map that a process has read count in its resident set (as file-backed,
    reclaimable memory) until the kernel reclaims them. So that the resident set stays bounded
    without relying on memory pressure, after about `MAPPED_RELEASE_BYTES` of reads the part drops
    its mapped pages (``madvise(MADV_DONTNEED)`` on read-only maps: the data stay in the page cache,
    a later read is a cheap minor fault). Read-only maps are also marked ``MADV_RANDOM`` (rows are
    drawn at random: no read-ahead of neighbouring rows from disk)."""

    def __init__(self, arrays: Sequence, index: Sequence, labels: Sequence | None, name: str,
                 dist_names: Sequence[str] | None = None):
        shapes = {tuple(a.shape[1:]) for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{name}: every distribution must have the same event shape, got {sorted(shapes)}")
        dtypes = {np.dtype(a.dtype) for a in arrays}
        if len(dtypes) != 1:
            raise ValueError(f"{name}: every distribution must have the same dtype for mapped storage, got "
                             f"{sorted(map(str, dtypes))}")
        self.name = name
        self.event_shape = shapes.pop()
        dtype = dtypes.pop()
        self.np_dtype = np.dtype(np.float32) if dtype == np.float64 else dtype
        self.arrays = list(arrays)
        self.index = [None if i is None else np.asarray(i, dtype=np.int64) for i in index]
        self.lengths = torch.tensor([len(a) if i is None else len(i) for a, i in zip(self.arrays, self.index)],
                                    dtype=torch.long)
        for k, n in enumerate(self.lengths.tolist()):
            if n == 0:
                raise ValueError(f"{name} part, distribution {dist_names[k] if dist_names else k}: no points")
        self._n_max = int(self.lengths.max())
        self._device = torch.device("cpu")
        self._read = 0  # bytes of pages touched since the last release (an upper estimate)
        self._needs = [_mapped_extent(a) for a in self.arrays]
        _advise(self.arrays, "MADV_RANDOM")
        self.labels = None
        if labels is not None:
            labels = [torch.as_tensor(y) for y in labels]
            ldtype = torch.float32 if any(y.is_floating_point() for y in labels) else torch.long
            lshapes = {tuple(y.shape[1:]) for y in labels}
            if len(lshapes) != 1:
                raise ValueError(f"{name}: label tensors disagree on shape after the first dim: {sorted(lshapes)}")
            self.labels = torch.full((len(labels), self._n_max, *lshapes.pop()), -1, dtype=ldtype)
            for k, y in enumerate(labels):
                if len(y) != int(self.lengths[k]):
                    raise ValueError(f"{name}: distribution {k} has {int(self.lengths[k])} points but {len(y)} labels")
                self.labels[k, : len(y)] = y.to(ldtype)

    @property
    def n_max(self) -> int:
        return self._n_max

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def data(self) -> torch.Tensor:
        """The whole part as one padded tensor (K, max_n, *event), read into memory: for small parts
        and inspection only (training never calls it)."""
        out = torch.zeros((self.n_distributions, self.n_max, *self.event_shape),
                          dtype=torch.from_numpy(np.zeros(0, self.np_dtype)).dtype)
        for k in range(self.n_distributions):
            n = int(self.lengths[k])
            out[k, :n] = self.gather(torch.arange(n).unsqueeze(0), torch.tensor([k]))[0].cpu()
        return out.to(self._device)

    def to(self, device) -> "MappedPart":
        """Batches are read on the CPU and moved to ``device``; the arrays stay where they are."""
        self._device = torch.device(device)
        self.lengths = self.lengths.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self

    def select(self, dists: Sequence[int]) -> "MappedPart":
        dists = [int(k) for k in dists]
        new = object.__new__(MappedPart)
        new.name, new.event_shape, new.np_dtype, new._device = self.name, self.event_shape, self.np_dtype, self._device
        new._read = 0
        new.arrays = [self.arrays[k] for k in dists]
        new.index = [self.index[k] for k in dists]
        new._needs = [self._needs[k] for k in dists]
        new.lengths = self.lengths[torch.as_tensor(dists, dtype=torch.long).to(self.lengths.device)]
        new._n_max = int(new.lengths.max())
        new.labels = None
        if self.labels is not None:
            idx = torch.as_tensor(dists, dtype=torch.long).to(self.labels.device)
            new.labels = self.labels[idx][:, : new._n_max]
        return new

    def gather(self, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        K = idx.shape[0]
        flat = idx.reshape(K, -1).cpu().numpy()
        ks = range(K) if rows is None else rows.cpu().tolist()
        out = np.empty((K, flat.shape[1], *self.event_shape), dtype=self.np_dtype)
        for s, k in enumerate(ks):
            self._check_file(k)
            where = flat[s] if self.index[k] is None else self.index[k][flat[s]]
            order = np.argsort(where, kind="stable")  # ascending file rows: sequential page reads
            out[s, order] = self.arrays[k][where[order]]
        row_bytes = out[0, :1].nbytes if out.size else 0
        self._read += flat.size * (row_bytes + _FAULT_AROUND)  # pages a row's read may map, at most
        if self._read > MAPPED_RELEASE_BYTES:
            self.release()
        t = torch.from_numpy(out)
        return t.reshape(*idx.shape, *self.event_shape).to(self._device)

    def _check_file(self, k: int) -> None:
        """Refuse to read distribution ``k``'s memory map if its file shrank under the run: a read
        past a file's end kills the process with SIGBUS, with no message."""
        need = self._needs[k]
        if need is None:
            return
        filename, size = need
        try:
            now = os.stat(filename).st_size
        except OSError as e:
            raise OSError(e.errno, f"{filename} vanished while training read it memory-mapped ({e.strerror})") from None
        if now < size:
            raise OSError(errno.EIO, f"{filename} shrank from {size} to {now} bytes while training read it "
                                     "memory-mapped; restore the file (or train with --storage padded)")

    def release(self) -> None:
        """Drop the pages of this part's read-only memory maps from the process's resident set."""
        self._read = 0
        _advise(self.arrays, "MADV_DONTNEED")


def _mapped_extent(a) -> tuple[str, int] | None:
    """(file, bytes the array needs of it) for a numpy memmap of a file; None for other arrays."""
    filename = getattr(a, "filename", None)
    if not isinstance(a, np.memmap) or not filename:
        return None
    return str(filename), int(getattr(a, "offset", 0)) + int(a.nbytes)


def _advise(arrays, advice: str) -> None:
    """``madvise`` the read-only memory maps among ``arrays`` (numpy memmaps opened with mode 'r')."""
    import mmap

    flag = getattr(mmap, advice, None)
    if flag is None:
        return
    seen = set()
    for a in arrays:
        mm = getattr(a, "_mmap", None)
        if mm is None or id(mm) in seen or getattr(a, "mode", None) not in ("r", "readonly") or not hasattr(mm, "madvise"):
            continue
        seen.add(id(mm))
        try:
            mm.madvise(flag)
        except (OSError, ValueError):
            pass


class MetaDataset:
    """K distributions, each with train/val/test parts; vectorized query and context sampling.

    Build from one tensor per distribution (split at random into parts) or from explicit parts
    with `MetaDataset.from_parts`. Rows of every tensor are i.i.d. draws of one distribution;
    the remaining dims are the event shape (e.g. ``(2,)`` or ``(1, 28, 28)``).

    ``storage="padded"`` (default) copies every part into one padded tensor. ``storage="mapped"``
    keeps each distribution the array it was given (numpy arrays, typically memory-mapped ``.npy``
    files from `metavae.data.files.read_family`) and reads only each batch's rows (`MappedPart`):
    for families larger than memory. Both give the same batches for the same seed and generator.
    """

    def __init__(
        self,
        distributions: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        names: Sequence[str] | None = None,
        storage: str = "padded",
    ):
        _check_storage(storage)
        if storage == "mapped":
            tensors = _check_arrays(distributions, "distributions")
        else:
            tensors = _check_distributions(distributions, "distributions")
        if labels is not None:
            if len(labels) != len(tensors):
                raise ValueError(f"got {len(tensors)} distributions but {len(labels)} label tensors")
            for k, (t, y) in enumerate(zip(tensors, labels)):
                if len(y) != len(t):
                    raise ValueError(f"distribution {k} has {len(t)} points but {len(y)} labels")
        for frac, what in ((val_fraction, "val_fraction"), (test_fraction, "test_fraction")):
            if not 0 <= frac < 1:
                raise ValueError(f"{what} must be in [0, 1), got {frac}")
        if val_fraction + test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave some training data")
        g = torch.Generator().manual_seed(seed)
        parts: dict[str, list] = {p: [] for p in PARTS}
        part_labels: dict[str, list] = {p: [] for p in PARTS}
        for k, t in enumerate(tensors):
            n = len(t)
            n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
            if n - n_val - n_test < 1 or (val_fraction > 0 and n_val < 1) or (test_fraction > 0 and n_test < 1):
                raise ValueError(f"distribution {k} has only {n} points: too few to split into parts")
            perm = torch.randperm(n, generator=g)
            cuts = {"train": perm[: n - n_val - n_test], "val": perm[n - n_val - n_test : n - n_test],
                    "test": perm[n - n_test :]}
            for p, idx in cuts.items():
                parts[p].append((t, idx.numpy()) if storage == "mapped" else t[idx])
                if labels is not None:
                    part_labels[p].append(torch.as_tensor(labels[k])[idx])
        self._init(parts, part_labels if labels is not None else None, names, storage)

    @classmethod
    def from_parts(
        cls,
        train: Sequence[torch.Tensor],
        val: Sequence[torch.Tensor] | None = None,
        test: Sequence[torch.Tensor] | None = None,
        train_labels=None,
        val_labels=None,
        test_labels=None,
        names: Sequence[str] | None = None,
        storage: str = "padded",
    ) -> "MetaDataset":
        """Parts given explicitly (e.g. MNIST's official train/test split per transformation);
        ``storage`` as for the constructor."""
        _check_storage(storage)
        self = object.__new__(cls)
        given = {"train": train, "val": val, "test": test}
        lab = {"train": train_labels, "val": val_labels, "test": test_labels}
        check = _check_arrays if storage == "mapped" else _check_distributions
        parts = {p: check(t, p) for p, t in given.items() if t is not None}
        for p, t in parts.items():
            if len(t) != len(parts["train"]):
                raise ValueError(f"{p} has {len(t)} distributions but train has {len(parts['train'])}")
        labels = {p: lab[p] for p in parts} if train_labels is not None else None
        if labels is not None and any(v is None for v in labels.values()):
            raise ValueError("labels must be given for every part or for none")
        if storage == "mapped":
            parts = {p: [(a, None) for a in t] for p, t in parts.items()}
        self._init(parts, labels, names, storage)
        return self

    def _init(self, parts, labels, names, storage: str = "padded") -> None:
        K = len(parts["train"])
        self.names = list(names) if names is not None else [str(k) for k in range(K)]
        if len(self.names) != K:
            raise ValueError(f"got {len(self.names)} names for {K} distributions")
        if storage == "mapped":
            def size(x):
                return len(x[0]) if x[1] is None else len(x[1])

            for p, t in parts.items():  # checks a padded Part makes when it copies the points
                for k, x in enumerate(t):
                    if size(x) == 0 and any(size(y) for y in t):
                        raise ValueError(f"{p} part, distribution {self.names[k]}: no points "
                                         "(every distribution needs at least one)")
            self.parts = {p: MappedPart([x[0] for x in t], [x[1] for x in t], None if labels is None else labels[p],
                                        p, self.names)
                          for p, t in parts.items() if any(size(x) for x in t)}
        else:
            self.parts = {p: Part(t, None if labels is None else labels[p], p, self.names)
                          for p, t in parts.items() if any(len(x) for x in t)}
        shapes = {p.event_shape for p in self.parts.values()}
        if len(shapes) != 1:
            raise ValueError(f"parts disagree on the event shape: {sorted(shapes)}")

    # -- introspection ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.parts["train"].n_distributions

    @property
    def event_shape(self) -> tuple:
        return self.parts["train"].event_shape

    @property
    def has_labels(self) -> bool:
        return self.parts["train"].labels is not None

    def part(self, name: str) -> Part:
        if name not in self.parts:
            raise KeyError(f"no '{name}' part; this dataset has {sorted(self.parts)}")
        return self.parts[name]

    def to(self, device) -> "MetaDataset":
        device = resolve_device(device)  # a device this machine lacks is a ValueError, not torch's assertion
        for p in self.parts.values():
            p.to(device)
        return self

    def select(self, dists: Sequence[int]) -> "MetaDataset":
        """A dataset over a subset of the distributions (e.g. the seen ones of a meta-split)."""
        new = object.__new__(MetaDataset)
        new.parts = {n: p.select(dists) for n, p in self.parts.items()}
        new.names = [self.names[k] for k in dists]
        return new

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {int(p.lengths.sum())}" for n, p in self.parts.items())
        return f"MetaDataset({len(self)} distributions, event {self.event_shape}, points {sizes})"

    # -- sampling ---------------------------------------------------------------------------
    def sample(
        self,
        batch_size: int,
        context_size: int,
        part: str = "train",
        generator: torch.Generator | None = None,
        exclude_query: bool = False,
        shared_context: bool = False,
        context_pool: int | None = None,
        dists: Sequence[int] | torch.Tensor | None = None,
    ) -> Batch:
        """One batch of B random queries per distribution with their context sets; with ``dists``
        only those distributions (rows in the order given; ``batch.dist`` names them), at a cost
        that depends on len(dists), not on the number of distributions."""
        p = self.part(part)
        if dists is None:
            u = torch.rand((len(p.lengths), batch_size), generator=generator, device=p.device)
            idx = (u * p.lengths.unsqueeze(1)).long()
            return p.batch(idx, context_size, generator, exclude_query, shared_context, context_pool)
        rows = _rows(dists, len(self))
        lengths = p.row_lengths(rows)
        u = torch.rand((len(rows), batch_size), generator=generator, device=p.device)
        idx = (u * lengths.to(u.device).unsqueeze(1)).long()
        return p.batch(idx, context_size, generator, exclude_query, shared_context, context_pool, rows)

    def steps_per_epoch(self, batch_size: int, part: str = "train", dists=None) -> int:
        lengths = self.part(part).lengths if dists is None else self.part(part).row_lengths(_rows(dists, len(self)))
        return -(-int(lengths.max()) // batch_size)

    def epoch(
        self,
        batch_size: int,
        context_size: int,
        part: str = "train",
        generator: torch.Generator | None = None,
        exclude_query: bool = False,
        shared_context: bool = False,
        context_pool: int | None = None,
        dists: Sequence[int] | torch.Tensor | None = None,
        context_features: torch.Tensor | None = None,
    ) -> Iterator[Batch]:
        """One pass over the largest distribution, each distribution in its own random order.

        Smaller distributions wrap around, so every step holds B queries from each of the K
        distributions (the MetaELBO weighs distributions equally). With ``dists``: over those
        distributions only (e.g. validation in chunks of distributions). ``context_features``: the
        part's `Part.point_features` (every distribution's), to carry the sets as their indices.
        """
        p = self.part(part)
        rows = None if dists is None else _rows(dists, len(self))
        perm = p.permutations(generator, rows)
        lengths = p.row_lengths(rows).to(perm.device).unsqueeze(1)
        for s in range(self.steps_per_epoch(batch_size, part, rows)):
            pos = torch.arange(s * batch_size, (s + 1) * batch_size, device=perm.device).unsqueeze(0)
            idx = perm.gather(1, pos % lengths)
            yield p.batch(idx, context_size, generator, exclude_query, shared_context, context_pool, rows,
                          context_features)


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(STORAGES)}")


def _check_arrays(arrays, what: str) -> list:
    """The checks of `_check_distributions` for mapped storage: numpy arrays, never copied
    (a memmap's values are read in chunks only by the NaN/inf check)."""
    if isinstance(arrays, (np.ndarray, torch.Tensor)):
        arrays = list(arrays)
    out = []
    if not arrays:
        raise ValueError(f"{what}: need at least one distribution")
    for k, a in enumerate(arrays):
        if isinstance(a, torch.Tensor):
            a = a.numpy()
        elif not isinstance(a, np.ndarray):
            a = np.asarray(a)
        if a.ndim < 2:
            raise ValueError(
                f"{what}: distribution {k} has shape {tuple(a.shape)}; expected (points, *event), "
                "e.g. (n, 2) for 2-D points (use a.reshape(-1, 1) for scalars)"
            )
        check_points(a, what, str(k))
        out.append(a)
    return out


def _check_distributions(tensors, what: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = list(tensors)
    tensors = [_tensor(t, f"{what}: distribution {k}") for k, t in enumerate(tensors)]
    if not tensors:
        raise ValueError(f"{what}: need at least one distribution")
    for k, t in enumerate(tensors):
        if t.dim() < 2:
            raise ValueError(
                f"{what}: distribution {k} has shape {tuple(t.shape)}; expected (points, *event), "
                "e.g. (n, 2) for 2-D points (use t.unsqueeze(-1) for scalars)"
            )
        if len(t) == 0:
            raise ValueError(f"{what}: distribution {k} is empty")
    return tensors
