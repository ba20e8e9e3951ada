"""Trains a tiny MetaVAE with an exactly-enumerated latent (no sampling noise), so a run on one
process and a torchrun run on several must follow the same loss trajectory. Used by test_ddp.py."""
import json
import sys
from pathlib import Path

import torch

from metavae import Gaussian, MetaDataset, Trainer, TrainConfig, build_mlp_metavae, seed_everything
from metavae.training import is_main_process

out, epochs = Path(sys.argv[1]), int(sys.argv[2])
subset = int(sys.argv[3]) if len(sys.argv) > 3 else None  # distributions_per_step
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
dists = [torch.randn(200, 3, generator=g) * 0.5 + k for k in range(4)]
data = MetaDataset(dists, seed=0)
seed_everything(0)
model = build_mlp_metavae((3,), 4, z_dim=3, latent="categorical", likelihood=Gaussian(0.3), hidden_widths=(16,),
                          summary_widths=(16, 16))
cfg = TrainConfig(epochs=epochs, batch_size=8, context_size=5, lr=3e-3, steps_per_epoch=10, seed=1,
                  distributions_per_step=subset, grad_clip=10.0 if subset else None)
hist = Trainer(model, data, cfg, out_dir=out / "ckpt", progress=False).fit()
if is_main_process():
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    json.dump({"train_loss": [h["train_loss"] for h in hist], "val_loss": [h["val_loss"] for h in hist],
               "weights": weights.tolist()}, open(out / "result.json", "w"))
