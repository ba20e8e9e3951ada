"""A user's own files: readers, their errors, early stopping, TensorBoard, and generation for a
context's distribution."""
import json

import numpy as np
import pytest
import torch

from metavae import Gaussian, MetaDataset, TrainConfig, Trainer, build_mlp_metavae
from metavae.cli import main
from metavae.data.files import read_family
from metavae.models import build_vhe
from metavae.models import load as load_model


def _table(tmp_path, suffix):
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"patient": np.repeat(["a", "b", "c"], 30), "x": rng.normal(size=90),
                         "y": rng.normal(size=90), "label": np.tile([0, 1], 45)})
    path = tmp_path / f"t{suffix}"
    rows.to_csv(path, index=False) if suffix == ".csv" else rows.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_group_rows_by_the_distribution_column(tmp_path, suffix):
    fam = read_family(_table(tmp_path, suffix), dist_column="patient", label_column="label")
    assert fam.names == ["a", "b", "c"] and fam.event_shape == (2,) and [len(p) for p in fam.points] == [30] * 3
    assert fam.labels is not None and set(np.concatenate(fam.labels)) == {0, 1}
    with pytest.raises(ValueError, match="no column 'site'.*--dist-column"):
        read_family(_table(tmp_path, suffix), dist_column="site")


def test_a_folder_of_npy_files_is_read_memory_mapped(tmp_path):
    for k in range(3):
        np.save(tmp_path / f"d{k}.npy", np.full((10, 2), k, dtype=np.float32))
    fam = read_family(tmp_path)
    assert fam.names == ["d0", "d1", "d2"] and isinstance(fam.points[0], np.memmap)


def test_train_from_a_folder_mapped_equals_padded_and_auto_maps_a_family_too_big_for_memory(tmp_path, capsys,
                                                                                              monkeypatch):
    """`metavae train --storage mapped` trains the same weights as padded storage; ``auto`` maps a
    folder of .npy files that exceeds a quarter of free memory, and refuses what it cannot map."""
    import json

    from metavae import workflows

    rng = np.random.default_rng(0)
    for k in range(3):
        np.save(tmp_path / f"d{k}.npy", (rng.normal(size=(60, 3)) + k).astype(np.float32))
    outs = {}
    for storage in ("padded", "mapped"):
        outs[storage] = tmp_path / storage
        assert main(["train", "--data", str(tmp_path), "--out", str(outs[storage]), "--storage", storage,
                     "--set", "epochs=2", "--set", "batch_size=8", "--set", "context_size=4", "--set", "scale=none",
                     "--quiet"]) == 0
        assert json.loads((outs[storage] / "metrics.json").read_text())["storage"] == storage
    a, b = load_model(outs["padded"] / "model.pt"), load_model(outs["mapped"] / "model.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    monkeypatch.setattr(workflows, "available_memory", lambda: 4 * 3 * 60 * 3 * 4 - 1)  # the family is just too big
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "auto"), "--set", "epochs=1",
                 "--set", "batch_size=8", "--set", "context_size=4", "--set", "scale=none", "--quiet"]) == 0
    assert json.loads((tmp_path / "auto" / "metrics.json").read_text())["storage"] == "mapped"
    assert "reading it memory-mapped" in capsys.readouterr().err
    np.savez(tmp_path / "f.npz", a=np.zeros((60, 3)), b=np.ones((60, 3)))
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "z"), "--storage", "mapped",
                 "--set", "context_size=4", "--quiet"]) == 2
    assert "--storage mapped reads a folder of .npy files" in capsys.readouterr().err


@pytest.mark.parametrize("arrays,message", [
    ({"a": np.zeros((5, 2)), "b": np.zeros((5, 3))}, "ragged"),
    ({"a": np.zeros((5, 2)), "b": np.zeros((0, 2))}, "distribution 'b': no points"),
    ({"a": np.zeros((5, 2)), "b": np.array([[0.0, np.nan]] * 5)}, "distribution 'b': point 0 holds a non-finite"),
    ({"a": np.zeros(5)}, "is 1-D"),
])
def test_bad_families_name_the_distribution(tmp_path, arrays, message, capsys):
    np.savez(tmp_path / "f.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        read_family(tmp_path / "f.npz")
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert message.split(":")[0].split("'")[0] in capsys.readouterr().err


def test_unknown_format_and_missing_file(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("1 2 3")
    assert main(["train", "--data", str(tmp_path / "f.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown data format '.txt'" in capsys.readouterr().err
    assert main(["embed", "--model", str(tmp_path / "none.pt"), "--query", "q.npy", "--out", "z.npy"]) == 2
    assert "no model file" in capsys.readouterr().err


def _data():
    g = torch.Generator().manual_seed(0)
    return MetaDataset([torch.randn(80, 2, generator=g) + i for i in range(3)])


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    model = build_mlp_metavae((2,), 3, z_dim=2, hidden=(8,), summary=(8,), likelihood=Gaussian(1.0))
    cfg = TrainConfig(epochs=30, batch_size=8, context_size=4, steps_per_epoch=2, patience=2)
    trainer = Trainer(model, _data(), cfg, out_dir=tmp_path, progress=False)
    losses = iter([5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 9.0, 9.0])  # best at epoch 4, then two epochs worse
    trainer.validate = lambda: next(losses)
    history = trainer.fit()
    assert trainer.stopped_early and [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert trainer.state.best_epoch == 4 and torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 4


def test_tensorboard_receives_the_losses(tmp_path):
    model = build_mlp_metavae((2,), 3, z_dim=2, hidden=(8,), summary=(8,), likelihood=Gaussian(1.0))
    cfg = TrainConfig(epochs=2, batch_size=8, context_size=4, steps_per_epoch=2, tensorboard=str(tmp_path / "tb"))
    Trainer(model, _data(), cfg, progress=False).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "val_loss"}
    assert len(events.Scalars("val_loss")) == 2


def test_vhe_samples_follow_the_context_distribution():
    """Trained on 1-D Gaussians with means in [-4, 4], the VHE's samples for an unseen context sit
    near that context's mean: the sample means track the context means (correlation > 0.9)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = torch.linspace(-4, 4, 12)
    data = MetaDataset([m + 0.3 * torch.randn(200, 1, generator=g) for m in means])
    model = build_vhe((1,), c_dim=2, z_dim=1, hidden=32, decoder_hidden=32, likelihood=Gaussian(None))
    Trainer(model, data, TrainConfig(epochs=6, batch_size=32, context_size=10, lr=3e-3, steps_per_epoch=100),
            progress=False).fit()
    unseen = torch.tensor([-3.3, -1.7, 0.5, 2.2, 3.6])
    got = torch.stack([model.sample(200, m + 0.3 * torch.randn(20, 1, generator=g)).mean() for m in unseen])
    assert torch.corrcoef(torch.stack([got, unseen]))[0, 1] > 0.9
    assert (got - unseen).abs().mean() < 1.0


def test_attention_pooling_is_permutation_invariant_masks_padding_and_round_trips(tmp_path):
    from metavae import load
    from metavae.nets.sets import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(torch.nn.Linear(3, 8), 8, heads=2).eval()
    sets = torch.randn(4, 6, 3)
    perm = sets[:, torch.randperm(6)]
    torch.testing.assert_close(pool(sets), pool(perm))
    padded = torch.cat([sets, torch.randn(4, 3, 3) * 100], dim=1)  # three junk elements per set
    mask = torch.cat([torch.ones(4, 6), torch.zeros(4, 3)], dim=1).bool()
    torch.testing.assert_close(pool(padded, mask), pool(sets), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pool(padded), pool(sets), atol=1e-3)  # without the mask the junk counts

    model = build_mlp_metavae((2,), 3, z_dim=2, hidden=(8,), summary=(8,), likelihood=Gaussian(1.0),
                              pooling="attention")
    Trainer(model, _data(), TrainConfig(epochs=1, batch_size=8, context_size=4, steps_per_epoch=2),
            progress=False).fit()
    model.save(tmp_path / "m.pt")
    x, ctx = torch.randn(5, 2), torch.randn(7, 2)
    torch.testing.assert_close(load(tmp_path / "m.pt").embed(x, ctx), model.eval().embed(x, ctx))


def test_attention_pool_on_a_context_pool_equals_the_materialised_sets():
    """`AttentionPool.pooled` embeds the P pool points once; the summaries must not change."""
    from metavae.data.meta import PooledContext

    torch.manual_seed(0)
    model = build_mlp_metavae((5,), 2, z_dim=2, hidden=(8,), summary=(8,), likelihood=Gaussian(1.0),
                              pooling="attention")
    pool, x = torch.randn(2, 9, 5), torch.randn(2, 4, 5)
    index = torch.stack([torch.stack([torch.randperm(9)[:3] for _ in range(4)]) for _ in range(2)])
    context = PooledContext(pool, index)
    torch.testing.assert_close(model.encode(x, context), model.encode(x, context.materialize()))
    assert not torch.allclose(model.encode(x, context), model.encode(x, PooledContext(pool, index.flip(1))))


def test_train_with_attention_summary_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", **{f"d{k}": rng.normal(size=(40, 2)) + k for k in range(3)})
    assert main(["train", "--data", str(tmp_path / "small.npz"), "--out", str(tmp_path / "o0"), "--quiet"]) == 2
    assert "validation part (val_fraction=0.1) would hold 4, fewer than context_size=10" in capsys.readouterr().err
    np.savez(tmp_path / "f.npz", **{f"d{k}": rng.normal(size=(200, 2)) + k for k in range(3)})
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o"), "--summary", "attention",
                 "--set", "epochs=1", "--quiet"]) == 0
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o2"), "--summary", "attention",
                 "--model", "vhe", "--set", "epochs=1", "--quiet"]) == 0
    assert load_model(tmp_path / "o2" / "model.pt").config["pooling"] == "attention"
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o3"), "--summary", "attention",
                 "--model", "vae", "--quiet"]) == 2
    assert "the VAE has no context set to pool" in capsys.readouterr().err


def test_vhe_log_prob_matches_brute_force_quadrature():
    """On a 1-D VHE (c and z one-dimensional), log_prob with many importance samples equals
    log of the integral over c ~ q(c|D) and z ~ p(z|c) of p(x|z,c), computed on a grid."""
    torch.manual_seed(0)
    model = build_vhe((1,), c_dim=1, z_dim=1, hidden=8, decoder_hidden=8, likelihood=Gaussian(0.5)).eval()
    # points where this untrained q(z | x, c) is a usable proposal: far from it the importance
    # weights are heavy-tailed and any finite-k estimate is noisy (a property of the estimator)
    context, x = torch.randn(12, 1), torch.tensor([[0.3], [1.0], [2.0]])
    est = model.log_prob(x, context, k=40_000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c_mu, c_logvar = model.context_params(context.unsqueeze(0))[0].chunk(2, dim=-1)
        sc = torch.exp(0.5 * c_logvar)
        cs = torch.linspace(float(c_mu - 8 * sc), float(c_mu + 8 * sc), 401).reshape(-1, 1)
        zs = torch.linspace(-12, 12, 1201)
        log_qc = torch.distributions.Normal(c_mu, sc).log_prob(cs).squeeze(-1)  # (C,)
        p_mu, p_logvar = model.latent_prior(cs).chunk(2, dim=-1)  # (C, 1)
        log_pz = torch.distributions.Normal(p_mu, torch.exp(0.5 * p_logvar)).log_prob(zs)  # (C, Z)
        cz = cs.unsqueeze(1).expand(-1, len(zs), -1)
        mean = model.obs_decoder(zs.reshape(1, -1, 1).expand(len(cs), -1, -1), cz)  # (C, Z, 1)
        truth = []
        for xi in x[:, 0]:
            log_px = torch.distributions.Normal(mean[..., 0], 0.5 ** 0.5).log_prob(xi)
            inner = torch.logsumexp(log_px + log_pz, dim=1) + torch.log(zs[1] - zs[0])
            truth.append(torch.logsumexp(inner + log_qc, dim=0) + torch.log(cs[1, 0] - cs[0, 0]))
    torch.testing.assert_close(est, torch.stack(truth), atol=0.03, rtol=0)
    assert (model.log_prob(x, context, k=1, generator=torch.Generator().manual_seed(2)) < est + 1.0).all()


def test_train_from_files_takes_bf16_as_a_setting(tmp_path, capsys):
    """`metavae train --set amp=bf16` reaches the Trainer: the same seed's losses move off fp32's
    (a setting dropped on the way would reproduce them exactly) but stay close to them."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", **{f"d{k}": rng.normal(size=(200, 3)) + k for k in range(3)})
    runs = {}
    for amp in ("null", "bf16"):
        out = tmp_path / amp
        assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(out), "--set", "epochs=2",
                     "--set", f"amp={amp}", "--quiet"]) == 0
        runs[amp] = json.loads((out / "metrics.json").read_text())
    assert runs["bf16"]["settings"]["amp"] == "bf16" and runs["null"]["settings"]["amp"] is None
    fp32, bf16 = (np.array([h["train_loss"] for h in runs[a]["history"]]) for a in ("null", "bf16"))
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "x"), "--set", "amp=fp16"]) == 2
    assert "setting 'amp' must be one of bf16 or null, got 'fp16'" in capsys.readouterr().err
