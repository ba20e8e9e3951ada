"""The paper authors' MetaVAE training step on rotated MNIST, re-implemented for timing.

    python benchmarks/reference_step.py [--steps 5]

Why this exists: the project's reference figure is ~580 ms per step for the authors' code, but that figure was
measured on another machine. `benchmarks/bench.py` compares our step with this one, measured on
the same machine, so the comparison is like for like. The code here is written from scratch.
It copies the *computational pattern* of github.com/mhw32/meta-inference-public (MLP MetaVAE,
`MetaAgent.train_one_epoch`, rotation split "standard", so K=9, B=100, N=10, 28x28). See
`docs/reproduction.md` §1 and §2.

What one step does, following their code:
1. Queries (`src/datasets/mnist.py`, `BagOfDatasets`, DataLoader collate): all K datasets use the
   same shuffled batch of indices. Each of the K*B images is transformed one at a time:
   uint8 digit -> `Image.fromarray` -> CenterCrop(28) (a PIL crop; Resize(28) is a no-op) ->
   `Image.rotate(angle)` (NEAREST) -> ToTensor (uint8 -> float / 255, shape (1,28,28)).
   The images are then stacked together with the labels.
2. Contexts (`sample_minibatch_from_cache`), inside the per-dataset loop: each query gets its own
   `np.random.choice(arange(len(cache)), 10, replace=False)`. Legacy numpy permutes the *whole*
   index range for each call, so the cost grows with the cache length. The rows are gathered and
   stacked, then passed through `torch.from_numpy`. Their train caches hold 60,000 images, so the
   caches here are tiled up to `cache_len` rows (default 60,000).
3. Model (`src/models/meta.py`, `shared.py`, `objectives/elbo.py`): the summary MLP
   784-784-400-400 (LeakyReLU 0.2) is called once per context slot (a loop over N, as in
   `MeanMLPEncoder`). The outputs are summed and divided by B (their pooling bug). Then the
   inference net [x, summary] 1184-400-400-80 (ReLU), a single reparameterised z, decoder k
   40-400-400-784 (ReLU, sigmoid), Bernoulli log-likelihood with the mean clamped to
   [1e-7, 1-1e-7], and analytic KL. Step loss = sum_k batch-mean loss_k / K, followed by
   zero_grad (zeroing, as in torch of 2019), one backward, one plain Adam step (lr 2e-4,
   single-tensor), and `loss.item()`.

Deliberately left out:
- The 4 DataLoader workers. Step 1 runs in the main process and is timed in series. Workers
  would overlap step 1 with the model only if spare cores existed. On a 2-core machine, where
  torch's intra-op threads already use the cores, they cannot add compute. So the serial time is
  an upper bound for step 1. Step 2 ran in the main process in their code too.
- GPU / `.to(device)`, tqdm and logging, validation, checkpointing.
- Real MNIST: the digits are random uint8 images with MNIST's shape. Timing does not depend on
  the pixel values, except that PIL's rotate is data independent anyway.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

K, B, N, Z, H, D = 9, 100, 10, 40, 400, 784
ANGLES = list(range(-180, 180, 40))  # their DEFAULT_ROTATIONS ("standard" split): 9 angles
LR = 2e-4


def load_image(digit: torch.Tensor, angle: int) -> torch.Tensor:
    """One `__getitem__` image: PIL crop + rotate + ToTensor, one image at a time."""
    img = Image.fromarray(digit.numpy())
    img = img.crop((0, 0, 28, 28))  # CenterCrop(28) on a 28x28 image
    img = img.rotate(angle)  # NEAREST, no expand, black fill
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.view(28, 28, 1).permute(2, 0, 1).contiguous().float().div(255)


def load_batch(digits, labels, idx):
    """BagOfDatasets[idx] for a batch of indices plus default_collate: K (images, labels) pairs."""
    items = [[(load_image(digits[j], a), int(labels[j])) for a in ANGLES] for j in idx.tolist()]
    return [(torch.stack([it[k][0] for it in items]), torch.tensor([it[k][1] for it in items]))
            for k in range(K)]


def sample_contexts(cache: np.ndarray, batch_size: int, n: int) -> torch.Tensor:
    """Their per-query context draw: a full-range choice without replacement for each query."""
    replace = len(cache) < n
    sets = [cache[np.random.choice(np.arange(len(cache)), replace=replace, size=n)]
            for _ in range(batch_size)]
    return torch.from_numpy(np.stack(sets))


def mlp(sizes, act):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class ReferenceMetaVAE(nn.Module):
    def __init__(self, n_datasets: int = K):
        super().__init__()
        self.summary = mlp([D, D, H, H], lambda: nn.LeakyReLU(0.2, inplace=True))
        self.encoder = mlp([D + H, H, H, 2 * Z], nn.ReLU)
        self.decoders = nn.ModuleList(mlp([Z, H, H, D], nn.ReLU) for _ in range(n_datasets))

    def loss(self, x: torch.Tensor, ctx: torch.Tensor, k: int) -> torch.Tensor:
        b = x.size(0)
        x, ctx = x.view(b, D), ctx.view(b, ctx.size(1), D)
        pooled = 0
        for i in range(ctx.size(1)):  # one MLP call per context slot, as MeanMLPEncoder does
            pooled = pooled + self.summary(ctx[:, i])
        pooled = pooled / float(b)  # their pooling divides by the batch size
        mu, logvar = self.encoder(torch.cat([x, pooled], dim=1)).chunk(2, dim=1)
        z = torch.randn_like(mu).mul(torch.exp(0.5 * logvar)).add_(mu)
        x_mu = torch.sigmoid(self.decoders[k](z)).clamp(1e-7, 1 - 1e-7)
        nll = -(x * torch.log(x_mu) + (1 - x) * torch.log(1 - x_mu)).sum(dim=-1)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(dim=1)
        return (nll + kl).mean()


def reference_step_time(steps: int = 5, n_images: int = 6000, seed: int = 0,
                        cache_len: int | None = 60_000) -> dict:
    """Time the authors' step: medians of step, data (steps 1-2) and model (step 3) time in ms.

    `n_images` random digits per dataset are the query pool. Each dataset's float32 cache
    (cache_len, 1, 28, 28) is built from them before timing, as theirs is, and tiled to
    `cache_len` rows (None means n_images). The context draw costs O(cache length) per query.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 256, (n_images, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    caches = []
    for a in ANGLES:
        c = torch.stack([load_image(d, a) for d in digits]).numpy()
        caches.append(np.resize(c, (cache_len or n_images, 1, 28, 28)))
    model = ReferenceMetaVAE(K)
    optim = torch.optim.Adam(model.parameters(), lr=LR, foreach=False, fused=False)
    order: list[torch.Tensor] = []

    def step():
        nonlocal order
        t0 = time.perf_counter()
        if not order:  # RandomSampler: a fresh permutation each epoch
            order = list(torch.randperm(n_images, generator=g).split(B))
        batch = load_batch(digits, labels, order.pop(0))
        data_t = time.perf_counter() - t0
        loss = 0
        for k in range(K):
            x_k = batch[k][0].float()
            t = time.perf_counter()
            ctx_k = sample_contexts(caches[k], len(x_k), N).float()
            data_t += time.perf_counter() - t
            loss = loss + model.loss(x_k, ctx_k, k)
        loss = loss / float(K)
        optim.zero_grad(set_to_none=False)
        loss.backward()
        optim.step()
        loss.item()
        return time.perf_counter() - t0, data_t

    for _ in range(2):
        step()
    times = [step() for _ in range(steps)]
    total = [t for t, _ in times]
    return {
        "step_ms": 1e3 * statistics.median(total),
        "data_ms": 1e3 * statistics.median(d for _, d in times),
        "model_ms": 1e3 * statistics.median(t - d for t, d in times),
        "paper_epoch_s": statistics.fmean(total) * 60_000 / B,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--n-images", type=int, default=6000)
    p.add_argument("--cache-len", type=int, default=60_000,
                   help="rows per context cache (their train split: 60000); 0 = n-images")
    a = p.parse_args(argv)
    print(json.dumps(reference_step_time(a.steps, a.n_images, cache_len=a.cache_len or None),
                     indent=2))


if __name__ == "__main__":
    main()
