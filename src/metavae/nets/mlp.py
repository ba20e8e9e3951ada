"""Plain MLPs, and a bank of K MLPs evaluated in one batched call (one per distribution).

Bank parameters are stored (K, ...) with one row per training distribution. A batch that holds a
subset of the distributions (``TrainConfig(distributions_per_step=S)``) gathers only those rows;
inside `sparse_bank_gradients` the gradient of such a gather is a sparse tensor holding only the
selected rows (`gather_rows`), so a step's cost and memory do not grow with K, and an optimizer
that reads the rows (`metavae.training.optim.RowAdam`) updates only the distributions in the step.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], act: str = "relu", final_act: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with an activation between them (and after, if asked)."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_act:
            layers.append(activation(act))
    return nn.Sequential(*layers)


# inside `sparse_bank_gradients`: row gathers of bank parameters give sparse gradients (per thread/context)
_SPARSE = contextvars.ContextVar("metavae_sparse_bank_gradients", default=False)


@contextlib.contextmanager
def sparse_bank_gradients(enabled: bool = True):
    """Within this block a bank's row gather (``dist`` naming a subset of its members) records a
    sparse gradient (only the gathered rows) instead of a dense (K, ...) one with zeros elsewhere.
    The forward pass must run inside the block; the backward may run after it."""
    token = _SPARSE.set(enabled)
    try:
        yield
    finally:
        _SPARSE.reset(token)


class _GatherRows(torch.autograd.Function):
    """``weight.index_select(0, rows)`` whose gradient is a sparse COO tensor with one sparse dim."""

    @staticmethod
    def forward(ctx, weight, rows):
        ctx.save_for_backward(rows)
        ctx.shape = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.shape, check_invariants=False), None


def gather_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight[rows]``: rows of a bank parameter, one per distribution in the batch. Sparse-gradient
    inside `sparse_bank_gradients` (when autograd records), otherwise exactly ``weight[rows]``."""
    if _SPARSE.get() and weight.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(weight, rows.to(weight.device))
    return weight[rows]


def bank_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module``'s decoder banks with more than one member: dim 0 indexes the
    training distributions (`BatchedLinear`, and the conv banks of `metavae.nets.conv`)."""
    seen = set()
    for m in module.modules():
        if getattr(m, "bank_rows", False) and getattr(m, "n", 1) > 1:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def fp32_output_layer(layer, h: torch.Tensor, *args):
    """``layer(h, *args)``, computed in float32 when autocast is on (a decoder's last layer: its
    outputs are a likelihood's parameters, which bf16 would round to 1/256 of their size); exactly
    ``layer(h, *args)`` otherwise."""
    if not torch.is_autocast_enabled(h.device.type):
        return layer(h, *args)
    low = torch.get_autocast_dtype(h.device.type)
    with torch.autocast(device_type=h.device.type, enabled=False):
        if isinstance(layer, BatchedLinear):
            return layer.fp32_out(h, low, *args)
        return layer(h.float(), *args)


class _Fp32OutBaddbmm(torch.autograd.Function):
    """``baddbmm(b, h, w)`` computed in float32, its two gradient products in ``low`` (bf16).

    The forward is a likelihood's parameters and stays float32 (`fp32_output_layer`); the
    gradients are as precise as every other layer's under autocast, whose backward products
    run in bf16. On the MLP MetaVAE (K=9, B=100, pool 50) the bf16 step is 1.05x faster for it
    (`benchmarks/output_layer_backward.py`, docs/performance.md §5)."""

    @staticmethod
    def forward(ctx, b, h, w, low):
        ctx.save_for_backward(h, w)
        ctx.low = low
        return torch.baddbmm(b, h.float(), w)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        g = grad.to(ctx.low)
        gb = grad.sum(1, keepdim=True) if ctx.needs_input_grad[0] else None
        gh = torch.bmm(g, w.to(ctx.low).transpose(1, 2)).to(h.dtype) if ctx.needs_input_grad[1] else None
        gw = torch.bmm(h.to(ctx.low).transpose(1, 2), g).float() if ctx.needs_input_grad[2] else None
        return gb, gh, gw, None


class BatchedLinear(nn.Module):
    """K independent linear layers stored as one (K, in, out) weight.

    Applied to a (K, M, in) input with one `baddbmm`, so K per-distribution decoders cost one
    kernel call instead of a Python loop over distributions. With K=1 the single layer is
    shared by every distribution (broadcast), which is how a plain VAE's decoder is built.
    """

    bank_rows = True  # dim 0 of every parameter is the distribution (see `bank_parameters`)

    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        """h: (K, M, in) -> (K, M, out); ``dist`` picks which members serve the K rows."""
        w, b = self._members(h, dist)
        return torch.baddbmm(b, h, w)

    def _members(self, h: torch.Tensor, dist: torch.Tensor | None):
        """The weight and bias serving the K rows of ``h``."""
        w, b = self.weight, self.bias
        if self.n == 1:
            return w.expand(h.shape[0], -1, -1), b.expand(h.shape[0], -1, -1)
        if dist is not None:
            return gather_rows(w, dist), gather_rows(b, dist)
        return w, b

    def fp32_out(self, h: torch.Tensor, low: torch.dtype, dist: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` with a float32 output and ``low``-precision gradient products (`fp32_output_layer`)."""
        w, b = self._members(h, dist)
        return _Fp32OutBaddbmm.apply(b, h, w, low)

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


def check_bank_rows(n: int, rows: int, dist) -> None:
    """A bank of ``n`` decoders serves a batch of ``rows`` distributions in order, unless ``dist``
    names the member for each row."""
    if n > 1 and dist is None and rows != n:
        raise ValueError(
            f"batch holds {rows} distributions but the model has {n} decoders; "
            "pass the distributions' indices (batch.dist) to pick decoders"
        )


class BatchedMLP(nn.Module):
    """K MLPs of identical shape evaluated together: (K, ..., in) -> (K, ..., out)."""

    def __init__(self, n: int, sizes: Sequence[int], act: str = "relu"):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"a decoder needs at least input and output sizes, got {list(sizes)}")
        self.n = n
        self.layers = nn.ModuleList(BatchedLinear(n, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = activation(act)

    def forward(self, z: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        K, mid = z.shape[0], z.shape[1:-1]
        check_bank_rows(self.n, K, dist)
        h = z.reshape(K, -1, z.shape[-1])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i < last:
                h = self.act(layer(h, dist))
            else:  # the likelihood's parameters: float32 under autocast
                h = fp32_output_layer(layer, h, dist)
        return h.reshape(K, *mid, h.shape[-1])


class ScaledBank(nn.Module):
    """A decoder bank whose outputs are multiplied by a constant ``scale``: parameters in units of
    ``scale``, so Adam moves the outputs ``scale`` times faster than the other weights (used where
    decoder outputs must travel far, e.g. mixture means, at a learning rate the encoder needs)."""

    def __init__(self, bank: nn.Module, scale: float):
        super().__init__()
        self.bank, self.scale, self.n = bank, float(scale), bank.n

    def forward(self, z: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        return self.bank(z, dist) * self.scale
