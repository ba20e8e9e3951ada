"""Convolutional parts shared by every convolutional model (docs/reproduction.md §3.1-3.3).

One encoder trunk (`ConvEncoder`), one decoder trunk (`ConvDecoderTrunk`) and the residual
block (`FCResBlock`), used by the conv MetaVAE, VAE, Neural Statistician and Variational
Homoencoder alike (the reference keeps a near-copy per model).

* `ConvEncoder`: 9 blocks of [Conv 3x3, padding 1 -> norm -> ELU] with channels
  c1, c1, c1 (stride 2), c2, c2, c2 (stride 2), c3, c3, c3 (stride 2); default (64, 128, 256).
  32x32 and 28x28 inputs both end at 4x4, i.e. 256*4*4 = 4096 features.
* `ConvDecoderTrunk`: features -> (c3, 4, 4) -> [Conv3 c3, norm, ELU] x2 -> [ConvT 2x2/2 c3] ->
  [Conv3 c3->c2] -> [Conv3 c2] -> [ConvT c2] -> [Conv3 c2->c1] -> [Conv3 c1] -> [ConvT c1] ->
  Conv 1x1 -> likelihood parameters (logits for the Bernoulli; the reference's sigmoid is left to
  the likelihood). The trunk always produces 8x the start size (32x32 for a 4x4 start); a 28x28
  event is the centre crop of that output (2 pixels cut on every side).
  The trunk can hold a *bank* of ``n`` independent decoders (one per training distribution, as the
  MetaVAE needs) evaluated in one call: the K rows are packed along channels and every layer is a
  grouped convolution with ``groups=K`` -- no Python loop over distributions.
* `FCResBlock(dim, n)`: n x [Linear -> norm], ELU between layers; output ELU(block(x) + x).

Normalisation: GroupNorm / LayerNorm instead of BatchNorm (a documented deviation)
-----------------------------------------------------------------------------------
The reference uses BatchNorm and *skips* it whenever a batch has one row, so the function a set
goes through depends on how many sets or elements share the call: the conv Neural Statistician's
statistic network sees only K rows per step (K = 3 sets for NORB) in training but one set at
evaluation, where every post-pool BatchNorm is skipped. We normalise every sample on its own:
``GroupNorm(32, C)`` after each convolution (32 groups, or gcd(32, C) for narrow layers) and
``LayerNorm(dim)`` where the reference has ``BatchNorm1d(dim)``. Consequences:

* training and evaluation compute the same function (no running statistics, no mode switch);
* the output for one element never depends on the other elements in the call, so a set of one
  element, a batch of one set, query and context batches passed separately, and the VampPrior's
  pseudo-inputs are all handled identically (with BatchNorm the pseudo-inputs would pollute the
  running statistics and K = 3 sets would give useless batch statistics);
* embeddings are deterministic and independent of how evaluation chunks the data;
* parameter counts are unchanged: GroupNorm/LayerNorm have the same 2*C affine parameters as
  BatchNorm (BatchNorm's running statistics are buffers, not parameters).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import BatchedLinear, fp32_output_layer, gather_rows

DEFAULT_CHANNELS = (64, 128, 256)
GROUPS = 32
_CHANNELS_LAST = contextvars.ContextVar("metavae_channels_last", default=False)  # set by `channels_last`


@contextlib.contextmanager
def channels_last(enabled: bool = True):
    """Within this block the conv trunks run on channels-last (NHWC) activations. Same function, other
    summation order: results agree to float rounding, not bit for bit. On the 2-core AVX512 CPU of
    docs/performance.md §4 it measured 1-5% slower than the default layout (oneDNN reorders to its
    own blocked layout either way), so nothing enables it by default; GPUs may differ."""
    token = _CHANNELS_LAST.set(enabled)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if _CHANNELS_LAST.get() else x


def norm_groups(channels: int, groups: int = GROUPS) -> int:
    """Number of GroupNorm groups for a layer: ``groups``, or fewer if it does not divide C."""
    return math.gcd(channels, groups)


def image_shape(event_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of an image event given as (H, W) or (C, H, W)."""
    ev = tuple(int(s) for s in event_shape)
    if len(ev) == 2:
        return (1, *ev)
    if len(ev) == 3:
        return ev
    raise ValueError(f"a convolutional model needs an image event (H, W) or (C, H, W), got {ev}")


def encoded_size(size: int) -> int:
    """Spatial size after the encoder's three stride-2 convolutions (32 -> 4, 28 -> 4)."""
    for _ in range(3):
        size = (size - 1) // 2 + 1
    return size


class ConvEncoder(nn.Module):
    """(M, *event) images -> (M, c3 * s * s) features; docs/reproduction.md §3.1 with GroupNorm (see module doc)."""

    def __init__(self, event_shape: Sequence[int], channels: Sequence[int] = DEFAULT_CHANNELS, groups: int = GROUPS):
        super().__init__()
        self.image_shape = image_shape(event_shape)
        if len(channels) != 3:
            raise ValueError(f"the conv trunk has three stages; give 3 channel counts, got {list(channels)}")
        c_in, h, w = self.image_shape
        layers: list[nn.Module] = []
        for c in channels:
            for stride in (1, 1, 2):
                layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(norm_groups(c, groups), c),
                           nn.ELU()]
                c_in = c
        self.net = nn.Sequential(*layers)
        self.out_spatial = (encoded_size(h), encoded_size(w))
        self.out_features = channels[-1] * self.out_spatial[0] * self.out_spatial[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_layout(x.reshape(-1, *self.image_shape))).flatten(1)


# --- a bank of n convolutional decoders evaluated as grouped convolutions --------------------
class BankConv2d(nn.Module):
    """``n`` independent Conv2d (or ConvTranspose2d) layers of one shape.

    Inputs are *packed*: g rows of the bank side by side along channels, (M, g * c_in, H, W), and
    the layer is one grouped convolution with ``groups=g``. With n = 1 the single layer is shared
    and g must be 1 (rows are folded into the batch dimension instead). ``dist`` (g,) picks which
    members serve the g rows. Default init equals PyTorch's Conv2d/ConvTranspose2d init per member.
    """

    bank_rows = True  # dim 0 of every parameter is the distribution (see `nets.mlp.bank_parameters`)

    def __init__(self, n: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
                 transpose: bool = False):
        super().__init__()
        self.n, self.c_in, self.c_out, self.kernel = n, c_in, c_out, kernel
        self.stride, self.padding, self.transpose = stride, padding, transpose
        shape = (n, c_in, c_out, kernel, kernel) if transpose else (n, c_out, c_in, kernel, kernel)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(n, c_out))
        # PyTorch's default: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in)), fan_in = size(1) * k * k
        bound = 1.0 / math.sqrt(shape[2] * kernel * kernel)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def _select(self, g: int, dist):
        w, b = self.weight, self.bias
        if self.n == 1:
            return w[0], b[0]
        if dist is not None:
            w, b = gather_rows(w, dist), gather_rows(b, dist)
        return w.reshape(g * w.shape[1], *w.shape[2:]), b.reshape(-1)

    def forward(self, h: torch.Tensor, dist: torch.Tensor | None = None, g: int = 1) -> torch.Tensor:
        w, b = self._select(g, dist)
        if self.transpose:
            return F.conv_transpose2d(h, w, b, stride=self.stride, padding=self.padding, groups=g)
        return F.conv2d(h, w, b, stride=self.stride, padding=self.padding, groups=g)

    def extra_repr(self) -> str:
        kind = "transpose, " if self.transpose else ""
        return f"n={self.n}, {kind}{self.c_in}->{self.c_out}, kernel={self.kernel}, stride={self.stride}"


class BankGroupNorm(nn.Module):
    """GroupNorm with per-member affine parameters for packed bank inputs (see `BankConv2d`)."""

    bank_rows = True

    def __init__(self, n: int, channels: int, groups: int = GROUPS, eps: float = 1e-5):
        super().__init__()
        self.n, self.channels, self.groups, self.eps = n, channels, norm_groups(channels, groups), eps
        self.weight = nn.Parameter(torch.ones(n, channels))
        self.bias = nn.Parameter(torch.zeros(n, channels))

    def forward(self, h: torch.Tensor, dist: torch.Tensor | None = None, g: int = 1) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.n == 1:
            w, b = w[0], b[0]
        else:
            if dist is not None:
                w, b = gather_rows(w, dist), gather_rows(b, dist)
            w, b = w.reshape(-1), b.reshape(-1)
        # groups never straddle two members: member k owns channels [k*C, (k+1)*C)
        return F.group_norm(h, g * self.groups, w, b, self.eps)


class ConvDecoderTrunk(nn.Module):
    """(K, ..., c3*s*s) features -> (K, ..., out) likelihood parameters; docs/reproduction.md §3.2.

    ``n`` decoders (n = 1: one shared decoder). ``out_shape`` is the event (C, H, W) and
    ``params_per_value`` the likelihood's parameters per pixel (1 for a Bernoulli); the output
    is laid out as ``params_per_value`` blocks of C*H*W values (what the likelihoods expect).
    """

    def __init__(self, n: int, event_shape: Sequence[int], params_per_value: int = 1,
                 channels: Sequence[int] = DEFAULT_CHANNELS, groups: int = GROUPS):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"the conv trunk has three stages; give 3 channel counts, got {list(channels)}")
        self.n = n
        self.out_image = image_shape(event_shape)
        c_out, H, W = self.out_image
        self.start = (encoded_size(H), encoded_size(W))
        self.full = (8 * self.start[0], 8 * self.start[1])
        c1, c2, c3 = channels
        self.c0 = c3
        self.in_features = c3 * self.start[0] * self.start[1]
        self.out_channels = params_per_value * c_out
        spec = [  # (c_in, c_out, kernel, stride, padding, transpose)
            (c3, c3, 3, 1, 1, False), (c3, c3, 3, 1, 1, False), (c3, c3, 2, 2, 0, True),
            (c3, c2, 3, 1, 1, False), (c2, c2, 3, 1, 1, False), (c2, c2, 2, 2, 0, True),
            (c2, c1, 3, 1, 1, False), (c1, c1, 3, 1, 1, False), (c1, c1, 2, 2, 0, True),
        ]
        self.convs = nn.ModuleList(BankConv2d(n, a, b, k, s, p, t) for a, b, k, s, p, t in spec)
        self.norms = nn.ModuleList(BankGroupNorm(n, b, groups) for _, b, *_ in spec)
        self.out = BankConv2d(n, c1, self.out_channels, 1)
        self.act = nn.ELU()

    def forward(self, h: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
        K, mid = h.shape[0], h.shape[1:-1]
        if h.shape[-1] != self.in_features:
            raise ValueError(f"decoder trunk expects {self.in_features} features, got {h.shape[-1]}")
        if self.n > 1 and dist is None and K != self.n:
            raise ValueError(f"batch holds {K} distributions but the bank has {self.n} decoders; pass dist")
        M = math.prod(mid)
        s0, s1 = self.start
        if self.n == 1:  # one shared decoder: fold the K rows into the batch
            g, x = 1, h.reshape(K * M, self.c0, s0, s1)
        else:  # K decoders: pack the rows along channels, grouped convolutions
            g, x = K, h.reshape(K, M, self.c0, s0, s1).transpose(0, 1).reshape(M, K * self.c0, s0, s1)
        x = _layout(x)
        for conv, norm in zip(self.convs, self.norms):
            x = self.act(norm(conv(x, dist, g), dist, g))
        x = fp32_output_layer(self.out, x, dist, g)  # the likelihood's parameters: float32 under autocast
        _, H, W = self.out_image
        if (H, W) != self.full:  # e.g. 28x28 from the 32x32 canvas: centre crop
            top, left = (self.full[0] - H) // 2, (self.full[1] - W) // 2
            x = x[..., top:top + H, left:left + W]
        if self.n == 1:
            return x.reshape(K, *mid, -1)
        return x.reshape(M, K, self.out_channels * H * W).transpose(0, 1).reshape(K, *mid, -1)


class FCResBlock(nn.Module):
    """n x [Linear(dim, dim) -> LayerNorm(dim)] with ELU between layers; output ELU(block(x) + x).
    LayerNorm replaces the reference's BatchNorm1d (see the module docstring)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        if n < 1:
            raise ValueError(f"FCResBlock needs at least one layer, got n={n}")
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n))
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (lin, norm) in enumerate(zip(self.layers, self.norms)):
            h = norm(lin(h))
            if i < len(self.layers) - 1:
                h = self.act(h)
        return self.act(h + x)


def reference_init(module: nn.Module) -> nn.Module:
    """The reference's init for NS / VHE / VHE+VampPrior (docs/reproduction.md §1.4): Xavier-normal weights with
    gain sqrt(2) and zero bias for every Linear and (non-transposed) Conv2d, banked ones included;
    transposed convolutions and normalisation layers keep their defaults. The MetaVAE takes it with
    ``init="xavier"``; none of the baselines holds a `BatchedLinear` bank, so their init is unchanged."""
    gain = math.sqrt(2.0)
    for m in module.modules():
        if isinstance(m, BatchedLinear):  # a bank of K Linear layers: each member as nn.Linear above
            with torch.no_grad():
                m.weight.normal_(0.0, gain * math.sqrt(2.0 / (m.in_features + m.out_features)))
                m.bias.zero_()
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BankConv2d) and not m.transpose:
            receptive = m.kernel * m.kernel
            std = gain * math.sqrt(2.0 / ((m.c_in + m.c_out) * receptive))
            with torch.no_grad():
                m.weight.normal_(0.0, std)
                m.bias.zero_()
    return module
