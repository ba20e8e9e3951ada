"""Families of distributions as data: one tensor per distribution, vectorized context sampling.

A `MetaDataset` holds K distributions, each split into train/val/test parts. Every part is
stored as one padded tensor ``(K, max_n, *event)`` plus per-distribution lengths, so that a
query batch ``(K, B, *event)`` and its context sets ``(K, B, N, *event)`` are gathered with a
single indexing operation for all distributions at once: no per-item Python in the hot path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


@dataclass
class PooledContext:
    """Context sets drawn from one pool per distribution: ``pool`` (K, P, *event) holds P distinct
    points, ``index`` (K, B, N) picks each query's N pool members (distinct per query). A model
    embeds the P pool points once per step instead of B*N context points."""

    pool: torch.Tensor
    index: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "PooledContext":
        return PooledContext(self.pool.to(device, non_blocking=non_blocking),
                             self.index.to(device, non_blocking=non_blocking))

    def check_queries(self, x: torch.Tensor) -> None:
        """Raise unless ``index`` picks sets for exactly the (K, B) queries ``x`` (K, B, *event)."""
        if self.index.shape[:2] != tuple(x.shape[:2]):
            raise ValueError(f"context pool index {tuple(self.index.shape)} does not match queries {tuple(x.shape)}")

    def select(self, queries: slice) -> "PooledContext":
        return PooledContext(self.pool, self.index[:, queries])

    def materialize(self) -> torch.Tensor:
        """The explicit context sets (K, B, N, *event), for models that need them."""
        K, B, N = self.index.shape
        rows = torch.arange(K, device=self.index.device).view(K, 1)
        return self.pool[rows, self.index.reshape(K, B * N)].reshape(K, B, N, *self.pool.shape[2:])


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


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 tensors are images in [0, 255] stored compactly; models see floats in [0, 1]."""
    if x.dtype == torch.uint8:
        return torch.div(x, 255.0)  # float32; one pass instead of convert-then-divide
    return x if x.is_floating_point() else x.float()


def checked_points(points, part: str, dist: str) -> torch.Tensor:
    """One distribution's points as a tensor: numpy is accepted, float64 becomes float32 (the
    models' dtype; logged), and empty sets, non-numeric and non-finite values are refused with the
    part, distribution and index named."""
    t = torch.as_tensor(points)
    where = f"{part} part, distribution {dist}"
    if t.dim() == 0:
        raise ValueError(f"{where}: expected an array of points (n, ...), got a scalar")
    if len(t) == 0:
        raise ValueError(f"{where}: no points (every distribution needs at least one)")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{where}: expected real numbers, got {t.dtype}")
    if t.dtype == torch.float64:
        logger.info("%s: float64 cast to float32", where)
        t = t.float()
    if t.is_floating_point():
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{where}: point {i} holds a non-finite value (NaN or inf); "
                             f"{int(bad.sum())} such point(s) in all")
    return t


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
        return self.data.shape[0]

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
        self, query_idx: torch.Tensor, size: int, generator: torch.Generator | None, exclude_query: bool = False
    ) -> torch.Tensor:
        """Indices (K, B, size) of context points, drawn without replacement per query.

        Two exact, vectorized methods, chosen by cost: where the padded pool is small, random
        keys with ``topk`` (one kernel); where it is large (e.g. 60k MNIST images), Robert
        Floyd's algorithm, ``size`` iterations of a few tensor ops over every (distribution,
        query) pair. With ``exclude_query`` the query's own point is never drawn.
        """
        K, B = query_idx.shape
        pool = (self.lengths - int(exclude_query)).to(query_idx.device)
        if size > int(pool.min()):
            k = int(torch.argmin(pool))
            raise ValueError(
                f"context size {size} exceeds the {int(pool[k])} points available in distribution {k} "
                f"of the {self.name} part" + (" (the query itself is excluded)" if exclude_query else "")
            )
        n_max = self.data.shape[1]
        if n_max <= 4 * size * size:
            return self._sample_by_keys(query_idx, size, generator, exclude_query)
        return self._sample_floyd(query_idx, size, generator, exclude_query, pool)

    def _sample_by_keys(self, query_idx, size, generator, exclude_query):
        K, B = query_idx.shape
        n_max = self.data.shape[1]
        keys = torch.rand((K, B, n_max), generator=generator, device=self.data.device).to(query_idx.device)
        slots = torch.arange(n_max, device=query_idx.device)
        invalid = slots >= self.lengths.to(query_idx.device).view(K, 1, 1)
        if exclude_query:
            invalid = invalid | (slots == query_idx.unsqueeze(-1))
        return keys.masked_fill(invalid, 2.0).topk(size, dim=-1, largest=False, sorted=False).indices

    def _sample_floyd(self, query_idx, size, generator, exclude_query, pool):
        K, B = query_idx.shape
        chosen = torch.empty((K, B, size), dtype=torch.long, device=query_idx.device)
        u = torch.rand((size, K, B), generator=generator, device=self.data.device).to(query_idx.device)
        for i in range(size):
            j = (pool - size + i).view(K, 1)  # candidate range [0, j]
            t = (u[i] * (j + 1).to(u.dtype)).long().clamp_max(j.expand(K, B))
            taken = (chosen[..., :i] == t.unsqueeze(-1)).any(-1) if i else torch.zeros_like(t, dtype=torch.bool)
            chosen[..., i] = torch.where(taken, j.expand(K, B), t)
        if exclude_query:  # a subset of the other n-1 points: skip over the query's own index
            chosen += (chosen >= query_idx.unsqueeze(-1)).long()
        return chosen

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Points ``data[k, idx[k, ...]]`` for index tensors shaped (K, ...)."""
        K = idx.shape[0]
        flat = idx.reshape(K, -1)
        rows = torch.arange(K, device=idx.device).unsqueeze(1).expand_as(flat)
        out = self.data[rows, flat]
        return out.reshape(*idx.shape, *self.event_shape)

    def gather_labels(self, idx: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(idx.shape[0], device=idx.device).view(-1, *([1] * (idx.dim() - 1)))
        return self.labels[rows.to(self.labels.device), idx.to(self.labels.device)]

    def batch(self, query_idx: torch.Tensor, context_size: int, generator, exclude_query: bool = False,
              shared_context: bool = False, context_pool: int | None = None) -> Batch:
        """Queries at ``query_idx`` (K, B) with context sets (K, B, N, ...); with ``shared_context``
        one set per distribution (K, 1, N, ...) that all B queries share; with ``context_pool`` P a
        `PooledContext`: each query's N points are drawn from P pool points per distribution."""
        x = as_float(self.gather(query_idx))
        context = None
        if context_size > 0:
            if (shared_context or context_pool) and exclude_query:
                raise ValueError("exclude_query needs a context set per query drawn from the whole part; "
                                 "it cannot be combined with shared_context or a context pool")
            if shared_context and context_pool:
                raise ValueError("choose shared_context or a context pool, not both")
            if context_pool:
                context = self._pooled_context(query_idx, context_size, context_pool, generator)
            else:
                owner = query_idx[:, :1] if shared_context else query_idx
                context = as_float(self.gather(self.sample_context(owner, context_size, generator, exclude_query)))
        labels = None
        if self.labels is not None:
            labels = self.gather_labels(query_idx)
        return Batch(x, context, labels, torch.arange(self.n_distributions))  # dist stays on the CPU

    def _pooled_context(self, query_idx, size: int, context_pool: int, generator) -> PooledContext:
        if context_pool < size:
            raise ValueError(f"context pool {context_pool} is smaller than the context size {size}")
        K, B = query_idx.shape
        pool = self.sample_context(query_idx[:, :1], context_pool, generator).squeeze(1)  # (K, P) distinct
        keys = torch.rand((K, B, context_pool), generator=generator, device=self.data.device).to(query_idx.device)
        index = keys.topk(size, dim=-1, largest=False, sorted=False).indices  # N distinct members per query
        return PooledContext(as_float(self.gather(pool)), index)

    def permutations(self, generator: torch.Generator | None) -> torch.Tensor:
        """One random order per distribution (K, max_n); padded slots sort last."""
        keys = torch.rand(self.data.shape[:2], generator=generator, device=self.data.device)
        pad = torch.arange(self.data.shape[1], device=keys.device).unsqueeze(0) >= self.lengths.unsqueeze(1)
        return keys.masked_fill(pad, 2.0).argsort(dim=1)


class MetaDataset:
    """K distributions, each with train/val/test parts; vectorized query and context sampling.

    Build from one tensor per distribution (split at random into parts) or from explicit parts
    with `MetaDataset.from_parts`. Rows of every tensor are i.i.d. draws of one distribution;
    the remaining dims are the event shape (e.g. ``(2,)`` or ``(1, 28, 28)``).
    """

    def __init__(
        self,
        distributions: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ):
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
                parts[p].append(t[idx])
                if labels is not None:
                    part_labels[p].append(torch.as_tensor(labels[k])[idx])
        self._init(parts, part_labels if labels is not None else None, names)

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
    ) -> "MetaDataset":
        """Parts given explicitly (e.g. MNIST's official train/test split per transformation)."""
        self = object.__new__(cls)
        given = {"train": train, "val": val, "test": test}
        lab = {"train": train_labels, "val": val_labels, "test": test_labels}
        parts = {p: _check_distributions(t, p) for p, t in given.items() if t is not None}
        for p, t in parts.items():
            if len(t) != len(parts["train"]):
                raise ValueError(f"{p} has {len(t)} distributions but train has {len(parts['train'])}")
        labels = {p: lab[p] for p in parts} if train_labels is not None else None
        if labels is not None and any(v is None for v in labels.values()):
            raise ValueError("labels must be given for every part or for none")
        self._init(parts, labels, names)
        return self

    def _init(self, parts, labels, names) -> None:
        K = len(parts["train"])
        self.names = list(names) if names is not None else [str(k) for k in range(K)]
        if len(self.names) != K:
            raise ValueError(f"got {len(self.names)} names for {K} distributions")
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
    ) -> Batch:
        """One batch of B random queries per distribution with their context sets."""
        p = self.part(part)
        u = torch.rand((len(p.lengths), batch_size), generator=generator, device=p.data.device)
        idx = (u * p.lengths.unsqueeze(1)).long()
        return p.batch(idx, context_size, generator, exclude_query, shared_context, context_pool)

    def steps_per_epoch(self, batch_size: int, part: str = "train") -> int:
        return -(-int(self.part(part).lengths.max()) // batch_size)

    def epoch(
        self,
        batch_size: int,
        context_size: int,
        part: str = "train",
        generator: torch.Generator | None = None,
        exclude_query: bool = False,
        shared_context: bool = False,
        context_pool: int | None = None,
    ) -> Iterator[Batch]:
        """One pass over the largest distribution, each distribution in its own random order.

        Smaller distributions wrap around, so every step holds B queries from each of the K
        distributions (the MetaELBO weighs distributions equally).
        """
        p = self.part(part)
        perm = p.permutations(generator)
        lengths = p.lengths.unsqueeze(1)
        for s in range(self.steps_per_epoch(batch_size, part)):
            pos = torch.arange(s * batch_size, (s + 1) * batch_size, device=perm.device).unsqueeze(0)
            idx = perm.gather(1, pos % lengths)
            yield p.batch(idx, context_size, generator, exclude_query, shared_context, context_pool)


def _check_distributions(tensors, what: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = list(tensors)
    tensors = [torch.as_tensor(t) for t in tensors]
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
