"""Trainer: loss falls, best checkpoint = lowest val loss, atomic files, exact resume, errors."""
import json

import pytest
import torch

from metavae import MetaDataset, Trainer, TrainConfig, build_mlp_metavae, seed_everything
from metavae.training import resolve_device


def _data():
    g = torch.Generator().manual_seed(0)
    dists = [torch.randn(120, 4, generator=g) * 0.3 + k for k in range(3)]
    return MetaDataset(dists, seed=0)


def _model():
    seed_everything(0)
    return build_mlp_metavae((4,), 3, z_dim=2, hidden_widths=(16,), summary_widths=(16, 16), likelihood=None)


def _cfg(epochs, **kw):
    base = dict(epochs=epochs, batch_size=16, context_size=5, lr=3e-3, steps_per_epoch=6, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def _gaussian_model():
    from metavae import Gaussian

    seed_everything(0)
    return build_mlp_metavae((4,), 3, z_dim=2, hidden_widths=(16,), summary_widths=(16, 16), likelihood=Gaussian(0.1))


def test_loss_falls_and_files_are_written(tmp_path):
    hist = Trainer(_gaussian_model(), _data(), _cfg(4), out_dir=tmp_path, progress=False).fit()
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    best = min(lines, key=lambda r: r["val_loss"])
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == best["epoch"]  # lowest, not highest
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = Trainer(_gaussian_model(), _data(), _cfg(3), out_dir=tmp_path / "a", progress=False)
    straight.fit()
    # "crash" after 2 epochs: a new process would build a fresh model and trainer, then resume
    Trainer(_gaussian_model(), _data(), _cfg(2), out_dir=tmp_path / "b", progress=False).fit()
    seed_everything(123)  # whatever the new process's RNG state, the checkpoint restores it
    resumed = Trainer(_gaussian_model(), _data(), _cfg(3), out_dir=tmp_path / "b", progress=False)
    resumed.fit()
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["state"]["history"][-1]["train_loss"] == b["state"]["history"][-1]["train_loss"]


def test_resume_refuses_other_settings(tmp_path):
    Trainer(_gaussian_model(), _data(), _cfg(1), out_dir=tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="other training settings \\(lr\\)"):
        Trainer(_gaussian_model(), _data(), _cfg(2, lr=1e-2), out_dir=tmp_path, progress=False).fit()


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*last.pt: corrupt"):
        Trainer(_gaussian_model(), _data(), _cfg(1), out_dir=tmp_path, progress=False).fit()


@pytest.mark.parametrize("name,match", [("tpu", "unsupported device|unknown device"), ("banana", "unknown device")])
def test_unknown_device(name, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_cuda_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"context_size": -1}, "context_size")])
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**{"epochs": 1, **kw})


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("storage", ["padded", "mapped"])
@pytest.mark.parametrize("per_step", [None, 2])
def test_validation_from_features_computed_once_equals_encoding_every_set(pooling, storage, per_step):
    """The val loss with each val point's summary features computed once (`Part.point_features`)
    equals the loss that encodes every set's members: the same draws, the same sums. Distributions
    of unequal sizes (padded slots), in chunks of distributions (distributions_per_step) or not."""
    g = torch.Generator().manual_seed(1)
    dists = [torch.randn(60 + 25 * k, 4, generator=g) * 0.3 + k for k in range(3)]
    data = MetaDataset([d.numpy() for d in dists] if storage == "mapped" else dists, val_fraction=0.5, seed=0,
                       storage=storage)
    seed_everything(0)
    model = build_mlp_metavae((4,), 3, z_dim=2, hidden_widths=(16,), summary_widths=(16, 16), likelihood=None,
                              pooling=pooling)
    trainer = Trainer(model, data, _cfg(1, distributions_per_step=per_step), progress=False)
    assert trainer._val_context_features() is not None
    cached = trainer.validate()
    trainer._val_context_features = lambda: None
    assert cached == pytest.approx(trainer.validate(), rel=1e-5)


def test_point_features_cover_every_point_and_leave_padding_zero():
    g = torch.Generator().manual_seed(2)
    data = MetaDataset([torch.randn(n, 3, generator=g) for n in (10, 23)], val_fraction=0.0, test_fraction=0.0)
    part = data.part("train")
    feats = part.point_features(lambda x: x * 2, chunk=4)
    assert feats.shape == (2, 23, 3)
    assert torch.equal(feats[1], part.data[1] * 2) and torch.equal(feats[0, :10], part.data[0, :10] * 2)
    assert not feats[0, 10:].any()
    assert part.point_features(lambda x: None) is None


@pytest.mark.parametrize("kind", ["vhe", "vhe-vampprior", "metavae"])
def test_image_models_validate_from_features_as_from_sets(kind):
    """The same check for the image models (uint8 points): the VHEs' statistic features and the
    MetaVAE's summary features computed once per val image."""
    from metavae.models import make_model

    g = torch.Generator().manual_seed(3)
    dists = [torch.randint(0, 256, (40 + 10 * k, 1, 8, 8), dtype=torch.uint8, generator=g) for k in range(3)]
    data = MetaDataset(dists, val_fraction=0.5, seed=0)
    seed_everything(0)
    trainer = Trainer(make_model(kind, event_shape=(1, 8, 8), n_distributions=3, z_dim=4), data, _cfg(1),
                      progress=False)
    assert trainer._val_context_features() is not None
    cached = trainer.validate()
    trainer._val_context_features = lambda: None
    assert cached == pytest.approx(trainer.validate(), rel=1e-5)


def test_validation_is_a_function_of_the_weights(tmp_path):
    """validate() draws from a fixed seed: the best weights, reloaded, give the val loss their epoch
    recorded (why an evaluation reuses the history's val loss for a snapshot at an epoch's end)."""
    trainer = Trainer(_gaussian_model(), _data(), _cfg(3), out_dir=tmp_path, progress=False)
    hist = trainer.fit()
    assert trainer.validate() == min(h["val_loss"] for h in hist)
    assert trainer.validate() == trainer.validate()


def test_point_features_beyond_the_budget_are_not_kept():
    """A part whose features would exceed the budget gives None: validation then encodes each set."""
    data = MetaDataset([torch.randn(50, 3) for _ in range(2)], val_fraction=0.0, test_fraction=0.0)
    part = data.part("train")
    assert part.point_features(lambda x: x, max_bytes=2 * 50 * 3 * 4) is not None
    assert part.point_features(lambda x: x, max_bytes=2 * 50 * 3 * 4 - 1) is None
