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
    model = build_mlp_metavae((2,), 3, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0))
    cfg = TrainConfig(epochs=30, batch_size=8, context_size=4, steps_per_epoch=2, patience=2)
    trainer = Trainer(model, _data(), cfg, out_dir=tmp_path, progress=False)
    losses = iter([5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 9.0, 9.0])  # best at epoch 4, then two epochs worse
    trainer.validate = lambda: next(losses)
    history = trainer.fit()
    assert trainer.stopped_early and [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert trainer.state.best_epoch == 4 and torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 4


def test_tensorboard_receives_the_losses(tmp_path):
    model = build_mlp_metavae((2,), 3, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0))
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

    model = build_mlp_metavae((2,), 3, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0),
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
    model = build_mlp_metavae((5,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0),
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


# --- issue 27: real samples, kept preprocessing, images, tables in and out, evaluate -------------------------
def _train(tmp_path, data, *extra, name="run"):
    out = tmp_path / name
    assert main(["train", "--data", str(data), "--out", str(out), "--quiet", *extra]) == 0
    return out


def test_samples_spread_like_the_data_and_mean_says_so(tmp_path, capsys):
    """On a Gaussian family the model fits (unit spread about each distribution's mean), drawn
    samples' per-feature spread is within 25% of the data's; --mean gives the (narrower) means."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", **{f"d{k}": rng.normal(size=(200, 3)) + 3 * rng.normal(size=3) for k in range(2)})
    out = _train(tmp_path, tmp_path / "f.npz", "--set", "epochs=10", "--set", "patience=null", "--set", "z_dim=2",
                 "--set", "hidden_widths=32,32", "--set", "summary_widths=32", "--set", "lr=5e-3")
    data = np.load(tmp_path / "f.npz")["d0"]
    assert main(["sample", "--model", str(out / "model.pt"), "--dist", "d0", "-n", "2000",
                 "--out", str(tmp_path / "s.npy")]) == 0
    assert "draws from p(x | z)" in capsys.readouterr().out
    ratio = np.load(tmp_path / "s.npy").std(0) / data.std(0)
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
    assert main(["sample", "--model", str(out / "model.pt"), "--dist", "d0", "-n", "2000", "--mean",
                 "--out", str(tmp_path / "m.npy")]) == 0
    assert "decoder means (--mean)" in capsys.readouterr().out
    assert np.all(np.load(tmp_path / "m.npy").std(0) < 0.75 * data.std(0))


def test_an_unscaled_table_trains_finitely_and_samples_near_its_context(tmp_path):
    """Features x1000 with offset 5000: the kept standard scaler makes training finite, samples come
    back in the data's units, and the model file stores it as plain values (weights_only)."""
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = pd.concat([pd.DataFrame({"site": f"s{k}", "mass": 5000 + 1000 * (rng.normal(size=200) + k),
                                    "length": 5000 + 1000 * (rng.normal(size=200) - k)}) for k in range(3)])
    rows.to_csv(tmp_path / "t.csv", index=False)
    out = _train(tmp_path, tmp_path / "t.csv", "--dist-column", "site", "--set", "epochs=8", "--set", "lr=3e-3",
                 "--set", "hidden_widths=32,32", "--set", "summary_widths=32")
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["best_val_loss"]) and m["scale"] == "standard" and m["likelihood"] == "gaussian"
    ck = torch.load(out / "model.pt", weights_only=True)
    assert ck["extra"]["feature_names"] == ["mass", "length"] and ck["extra"]["preprocess"]["kind"] == "standard"
    assert main(["sample", "--model", str(out / "model.pt"), "--dist", "s2", "-n", "500",
                 "--out", str(tmp_path / "s.csv")]) == 0
    got = pd.read_csv(tmp_path / "s.csv")
    mine = rows[rows.site == "s2"][["mass", "length"]]
    assert list(got.columns) == ["mass", "length"]
    assert np.all(np.abs(got.mean() - mine.mean()) < 0.5 * mine.std())


def test_uint8_family_embeds_identically_from_uint8_and_float_over_255(tmp_path):
    rng = np.random.default_rng(2)
    imgs = {f"d{k}": rng.integers(0, 256, size=(60, 6), dtype=np.uint8) for k in range(3)}
    np.savez(tmp_path / "f.npz", **imgs)
    out = _train(tmp_path, tmp_path / "f.npz", "--set", "epochs=1", "--set", "context_size=4")
    m = json.loads((out / "metrics.json").read_text())
    assert m["scale"] == "unit" and m["likelihood"] == "bernoulli"
    np.save(tmp_path / "q8.npy", imgs["d0"])
    np.save(tmp_path / "qf.npy", imgs["d0"] / 255.0)
    for q in ("q8", "qf"):
        assert main(["embed", "--model", str(out / "model.pt"), "--query", str(tmp_path / f"{q}.npy"), "--context",
                     str(tmp_path / "q8.npy"), "--out", str(tmp_path / f"z{q}.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "zq8.npy"), np.load(tmp_path / "zqf.npy"), atol=1e-5)


def test_bernoulli_on_data_outside_unit_range_is_refused(tmp_path, capsys):
    from metavae.models import make_model

    np.savez(tmp_path / "f.npz", **{f"d{k}": np.random.default_rng(k).normal(size=(60, 2)) for k in range(2)})
    assert main(["train", "--data", str(tmp_path / "f.npz"), "--out", str(tmp_path / "o"), "--set",
                 "likelihood=bernoulli", "--set", "scale=none", "--set", "context_size=4", "--quiet"]) == 2
    assert "likelihood=bernoulli needs values in [0, 1]" in capsys.readouterr().err
    from metavae.data.files import Family
    from metavae.workflows import FileTrainConfig, train_family

    fam = Family(["a", "b"], [np.random.default_rng(k).normal(size=(60, 2)) for k in range(2)])
    with pytest.raises(ValueError, match="likelihood=bernoulli needs values in"):  # the Python way in refuses too
        train_family(fam, tmp_path / "p", cfg=FileTrainConfig(likelihood="bernoulli", scale="none", context_size=4),
                     progress=False)
    with pytest.raises(ValueError, match="needs event_shape"):
        make_model("vhe")
    assert make_model("vae", "mlp", (2,), likelihood="gaussian").likelihood.name == "gaussian"


def test_an_image_npz_trains_the_conv_model_by_default(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "img.npz", **{f"d{k}": rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8)
                                      for k in range(2)})
    out = _train(tmp_path, tmp_path / "img.npz", "--set", "epochs=1", "--set", "context_size=3",
                 "--set", "channels=4,4,4", "--set", "conv_hidden=16", "--set", "summary_widths=[16]",
                 "--set", "context_pool=8", "--set", "free_bits=0.1")
    m = json.loads((out / "metrics.json").read_text())
    assert m["arch"] == "conv" and m["likelihood"] == "bernoulli" and m["scale"] == "unit"
    assert load_model(out / "model.pt").config["kind"] == "conv_metavae"
    assert load_model(out / "model.pt").config["free_bits"] == 0.1
    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", str(tmp_path / "img.npz"),
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (tmp_path / "ev" / "reconstructions.png").stat().st_size > 0 and (tmp_path / "ev" / "samples.png").exists()
    assert np.isfinite(ev["model"]["log_likelihood"]) and ev["controls"]["raw"]["dim"] == 256


def test_csv_in_csv_out_for_embed_and_other_columns_are_refused(tmp_path, capsys):
    import pandas as pd

    path = _table(tmp_path, ".csv")
    out = _train(tmp_path, path, "--dist-column", "patient", "--label-column", "label", "--set", "epochs=1",
                 "--set", "context_size=2", "--set", "hidden_widths=16,16", "--set", "latent=categorical")
    assert main(["embed", "--model", str(out / "model.pt"), "--data", str(path), "--dist-column", "patient",
                 "--label-column", "label", "--out", str(tmp_path / "z.csv"), "--quiet"]) == 0
    z = pd.read_csv(tmp_path / "z.csv")
    assert list(z.columns) == ["patient", "label", "z_0", "z_1", "z_2", "z_3"] and len(z) == 90
    assert main(["embed", "--model", str(out / "model.pt"), "--data", str(path), "--dist-column", "patient",
                 "--out", str(tmp_path / "z.npz"), "--quiet"]) == 2  # 'label' is now a feature the model lacks
    assert "not in the model: label" in capsys.readouterr().err
    assert main(["embed", "--model", str(out / "model.pt"), "--data", str(path), "--dist-column", "patient",
                 "--label-column", "label", "--out", str(tmp_path / "z.npz"), "--quiet"]) == 0
    assert sorted(np.load(tmp_path / "z.npz").files) == ["a", "b", "c"]
    new = pd.read_csv(path).replace({"patient": {"a": "d", "b": "e"}})
    new[new.patient.isin(["d", "e"])].to_csv(tmp_path / "new.csv", index=False)
    assert main(["adapt", "--model", str(out / "model.pt"), "--data", str(tmp_path / "new.csv"), "--dist-column",
                 "patient", "--steps", "3", "--out", str(tmp_path / "adapted.pt"), "--quiet"]) == 2
    assert "not in the model: label" in capsys.readouterr().err  # the label column is not a feature
    assert main(["adapt", "--model", str(out / "model.pt"), "--data", str(tmp_path / "new.csv"), "--dist-column",
                 "patient", "--label-column", "label", "--steps", "3", "--out", str(tmp_path / "adapted.pt"), "--quiet"]) == 0
    assert load_model(tmp_path / "adapted.pt").extra["distributions"] == ["a", "b", "c", "d", "e"]


def test_embed_without_a_context_on_a_metavae_is_one_line_and_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "f.npz", **{f"d{k}": rng.normal(size=(50, 2)) for k in range(2)})
    out = _train(tmp_path, tmp_path / "f.npz", "--set", "epochs=1", "--set", "context_size=4")
    np.save(tmp_path / "q.npy", rng.normal(size=(5, 2)))
    capsys.readouterr()
    assert main(["embed", "--model", str(out / "model.pt"), "--query", str(tmp_path / "q.npy"),
                 "--out", str(tmp_path / "z.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --context FILE" in err


def test_evaluate_writes_the_model_beside_every_control(tmp_path, capsys):
    rng = np.random.default_rng(5)
    import pandas as pd

    frames = []
    for k in range(3):
        y = rng.integers(0, 2, 120)
        x = np.where(y[:, None] == 1, 2.0, -2.0) + rng.normal(size=(120, 3))
        frames.append(pd.DataFrame({"g": f"g{k}", "a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y}))
    pd.concat(frames).to_csv(tmp_path / "t.csv", index=False)
    out = _train(tmp_path, tmp_path / "t.csv", "--dist-column", "g", "--label-column", "y", "--set", "epochs=2")
    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", str(tmp_path / "t.csv"), "--dist-column",
                 "g", "--label-column", "y", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["controls"]) == {"raw", "pca", "random_projection", "untrained"}
    for rep in [m["model"], *m["controls"].values()]:
        assert 0 <= rep["probe_accuracy"] <= 1 and rep["kmeans_ari"] is not None
    assert m["controls"]["raw"]["probe_accuracy"] > 0.9  # separable labels: the control works
    assert np.isfinite(m["model"]["log_likelihood"]) and len(m["kl_per_dim"]) == 4
    assert "| untrained |" in (tmp_path / "ev" / "report.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("On linear-probe accuracy the embedding")


def test_untrained_rebuild_is_training_s_init(tmp_path):
    from metavae.workflows import init_checksum, untrained_copy

    rng = np.random.default_rng(6)
    np.savez(tmp_path / "f.npz", **{f"d{k}": rng.normal(size=(50, 2)) for k in range(2)})
    out = _train(tmp_path, tmp_path / "f.npz", "--set", "epochs=1", "--set", "context_size=4", "--set", "seed=3")
    model = load_model(out / "model.pt")
    fresh = untrained_copy(model)
    assert init_checksum(fresh) == pytest.approx(model.extra["init_checksum"], rel=1e-6)
    assert init_checksum(fresh) != pytest.approx(init_checksum(model), rel=1e-6)


def test_help_shows_defaults_and_settings_accept_both_list_forms(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: auto)" in text and "hidden_widths=[128, 128]" in text and "--pooling" in text
    from metavae.cli import _train_overrides

    assert _train_overrides(["hidden=256,256", "summary_widths=[8]"]) == {"hidden_widths": "[256,256]",
                                                                          "summary_widths": "[8]"}


def test_the_estimator_sits_in_a_sklearn_pipeline():
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from metavae.estimator import MetaVAEEmbedding

    rng = np.random.default_rng(7)
    groups = np.repeat(["a", "b", "c"], 60)
    y = rng.integers(0, 2, 180)
    X = 2.0 * y[:, None] + rng.normal(size=(180, 3)) + np.repeat(rng.normal(size=(3, 3)), 60, axis=0)
    emb = MetaVAEEmbedding(epochs=1, z_dim=3, context_size=4, hidden_widths=(16,), summary_widths=(16,))
    assert emb.get_params()["z_dim"] == 3 and clone(emb).get_params() == emb.get_params()
    pipe = Pipeline([("embed", emb), ("probe", LogisticRegression())])
    pipe.fit(X, y, embed__groups=groups)
    z = pipe.named_steps["embed"].transform(X, groups)
    assert z.shape == (180, 3) and np.isfinite(z).all()
    assert pipe.predict(X).shape == (180,)


def test_log_prob_in_data_units_carries_the_jacobian(tmp_path):
    """The same points scaled by 1000 score log(1000) per feature lower in data units."""
    from metavae.workflows import log_prob_data

    rng = np.random.default_rng(8)
    fam = {f"d{k}": rng.normal(size=(60, 2)) + k for k in range(2)}
    np.savez(tmp_path / "a.npz", **fam)
    np.savez(tmp_path / "b.npz", **{k: 1000 * v for k, v in fam.items()})
    lps = []
    for name in ("a", "b"):
        out = _train(tmp_path, tmp_path / f"{name}.npz", "--set", "epochs=1", "--set", "context_size=4", name=name)
        model = load_model(out / "model.pt")
        x = fam["d0"] * (1000 if name == "b" else 1)
        torch.manual_seed(0)
        lps.append(log_prob_data(model, x[:10], x[10:30], dist="d0", k=5))
    np.testing.assert_allclose(lps[1].numpy(), lps[0].numpy() - 2 * np.log(1000), atol=1e-3)


def test_an_image_npz_carries_labels_as_label_slash_name_arrays(tmp_path):
    from metavae.workflows import read_points

    rng = np.random.default_rng(9)
    arrays = {}
    for k in range(2):
        arrays[f"d{k}"] = rng.random((30, 4, 4)).astype(np.float32)
        arrays[f"y/d{k}"] = rng.integers(0, 2, 30)
    np.savez(tmp_path / "f.npz", **arrays)
    fam = read_points(tmp_path / "f.npz", label_column="y")
    assert fam.names == ["d0", "d1"] and fam.event_shape == (4, 4) and len(fam.labels[1]) == 30
    out = _train(tmp_path, tmp_path / "f.npz", "--label-column", "y", "--set", "epochs=1", "--set", "context_size=3")
    assert json.loads((out / "metrics.json").read_text())["data"]["names"] == ["d0", "d1"]
    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", str(tmp_path / "f.npz"), "--label-column",
                 "y", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["model"]["probe_accuracy"] is not None
    del arrays["y/d1"]
    np.savez(tmp_path / "g.npz", **arrays)
    with pytest.raises(ValueError, match="no array y/d1"):
        read_points(tmp_path / "g.npz", label_column="y")
