"""Transformed-MNIST experiments end to end on a sliver of the shared MNIST, and the report."""
import json

import numpy as np
import pytest
import torch

from metavae.cli import main
from metavae.paper.invariance import fit_probe

TINY = ["--quiet", "--set", "train_images=300", "--set", "test_images=200", "--set", "epochs=1",
        "--set", "batch_size=50"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path / "cache"))  # transform cache stays in the test's folder


def test_contiguous_run_writes_metrics_in_the_issue_layout(shared_mnist, tmp_path):
    out = tmp_path / "runs" / "mnist-scale" / "contiguous" / "metavae"
    assert main(["run", "mnist-scale", "--data-dir", str(shared_mnist), "--out", str(out)] + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    for probe in ("reference", "standardised"):
        assert set(m["accuracy"][probe]) == {"1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "1.9"}
        assert m["mean_unseen_accuracy"][probe] == pytest.approx(np.mean(list(m["accuracy"][probe].values())))
        assert set(m["untrained"]["accuracy"][probe]) == set(m["accuracy"][probe])
    assert (m["model"], m["split"], m["axis"]) == ("metavae", "contiguous", "scale")
    assert m["epochs_trained"] == 1 and m["data_record"]["train_images"] == 300
    assert len(m["data_record"]["train_sha256"]) == 64
    steps = [p["step"] for p in m["learning_curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 2  # the untrained model is the first point
    last = m["learning_curve"][-1]  # the final snapshot holds the selected (best, only) epoch's weights:
    assert last["step"] == m["history"][-1]["step"] and last["val_loss"] == m["history"][-1]["val_loss"]
    for probe, acc in last["accuracy"].items():
        assert acc == {v: m["accuracy"][probe][v] for v in acc}  # scored once, by the headline's probes
    assert (out / "accuracy.png").exists() and (out / "probe_vs_steps.png").exists()
    assert (out / "checkpoints" / "best.pt").exists() and (out / "checkpoints" / "worst.pt").exists()


def test_curve_snapshots_are_epoch_ends_whose_validation_training_already_ran(shared_mnist, tmp_path, monkeypatch):
    from metavae.paper.invariance import snapshot_epochs
    from metavae.training.trainer import Trainer

    assert snapshot_epochs(10) == [1, 3] and snapshot_epochs(5) == [1, 2] and snapshot_epochs(100) == [6, 25]
    assert snapshot_epochs(1) == [] and snapshot_epochs(2) == [1]
    calls = []
    validate = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self: calls.append(self.state.step) or validate(self))
    out = tmp_path / "three-epochs"
    args = [a if a != "epochs=1" else "epochs=3" for a in TINY]
    assert main(["run", "mnist-shear", "--data-dir", str(shared_mnist), "--out", str(out)] + args) == 0
    m = json.loads((out / "metrics.json").read_text())
    per_epoch = m["history"][0]["step"]
    assert [p["step"] for p in m["learning_curve"]] == [0, per_epoch, 2 * per_epoch, 3 * per_epoch]
    # both probes at the ends (untrained, selected), the scale-invariant one in between (CURVE_PROBES)
    assert [sorted(p["mean_accuracy"]) for p in m["learning_curve"]] == [["reference", "standardised"],
                                                                          ["standardised"], ["standardised"],
                                                                          ["reference", "standardised"]]
    by_step = {h["step"]: h["val_loss"] for h in m["history"]}
    assert all(p["val_loss"] == by_step[p["step"]] for p in m["learning_curve"][1:])
    # three epochs' validations in training, then one in evaluation (the untrained weights, loaded after training)
    assert len(calls) == 4 and calls.count(3 * per_epoch) == 2 and calls[-1] == 3 * per_epoch
    # a run made under the earlier rule (a snapshot inside an epoch) keeps its points when re-scored
    snaps = out / "checkpoints" / "snapshots"
    (snaps / f"step-{per_epoch + 1:07d}.pt").write_bytes((snaps / f"step-{per_epoch:07d}.pt").read_bytes())
    assert main(["run", "mnist-shear", "--data-dir", str(shared_mnist), "--out", str(out)] + args) == 0
    curve = json.loads((out / "metrics.json").read_text())["learning_curve"]
    assert [p["step"] for p in curve] == [0, per_epoch, per_epoch + 1, 2 * per_epoch, 3 * per_epoch]
    assert curve[2]["accuracy"] == curve[1]["accuracy"]  # the same weights, the same probes


def test_a_run_on_fewer_seen_values_records_the_config_it_was_asked_for(shared_mnist, tmp_path):
    out = tmp_path / "seen2"
    assert main(["run", "mnist-rotate", "--model", "metavae-nocontext", "--data-dir", str(shared_mnist),
                 "--out", str(out), "--set", "seen=2"] + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["seen"]) == 2 and len(m["split_seen"]) == 10
    assert (m["config"]["epochs"], m["config"]["batch_size"], m["config"]["seen"]) == (1, 50, 2)  # as asked
    assert m["trained_with"] == {"batch_size": 250, "epochs": 5} and m["epochs_trained"] == 5  # what it took


def test_interleaved_metavae_measures_table1_and_report_gathers(shared_mnist, tmp_path):
    runs = tmp_path / "runs"
    out = runs / "mnist-rotate" / "interleaved" / "metavae"
    assert main(["run", "mnist-rotate", "--split", "standard", "--data-dir", str(shared_mnist), "--out", str(out)]
                + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "interleaved" and set(m["invariance_distance"]) == {"rotate", "scale", "shear"}
    assert all(d > 0 for d in m["invariance_distance"].values())
    assert set(m["untrained"]["invariance_distance"]) == {"rotate", "scale", "shear"}
    assert m["untrained"]["invariance_distance"] != m["invariance_distance"]  # the step-0 weights, not the trained
    assert main(["report", "mnist", "--runs", str(runs)]) == 0
    t1 = json.loads((runs / "mnist-report" / "table1.json").read_text())
    t2 = json.loads((runs / "mnist-report" / "table2.json").read_text())
    assert t1["rotate"] == m["invariance_distance"] and t1["scale"] is None
    assert {"metavae", "vhe-vampprior", "vhe", "ns"} <= set(t2["rotate"]) and t2["rotate"]["metavae"] is None
    report = (runs / "mnist-report" / "report.md").read_text()
    assert "metavae run mnist-shear --split contiguous --model vhe" in report  # names what is missing


def test_unknown_model_or_split_fails_clearly(shared_mnist, tmp_path, capsys):
    assert main(["run", "mnist-shear", "--model", "gan", "--data-dir", str(shared_mnist), "--out", str(tmp_path)]) == 2
    assert "unknown model 'gan'" in capsys.readouterr().err
    assert main(["run", "mnist-shear", "--split", "diagonal", "--data-dir", str(shared_mnist),
                 "--out", str(tmp_path)]) == 2
    assert "diagonal" in capsys.readouterr().err


def test_missing_data_dir_fails_clearly(tmp_path, capsys):
    assert main(["run", "mnist-rotate", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)] + TINY) == 2
    assert "nowhere" in capsys.readouterr().err


def test_probe_separates_separable_embeddings_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 2000)
    good = np.eye(10)[y] * 5 + rng.normal(size=(2000, 10))
    noise = rng.normal(size=(2000, 10))
    assert fit_probe(good[:1500], y[:1500], good[1500:], y[1500:]) > 0.9
    assert fit_probe(noise[:1500], y[:1500], noise[1500:], y[1500:]) < 0.2


def test_reference_probe_punishes_small_scale_and_standardised_does_not():
    """The same separable features at scale 1 and 0.003: the reference probe's fixed L2 penalty loses
    most of the accuracy at the small scale; the standardised probe does not care."""
    from metavae.paper.invariance import fit_probes

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)
    z = np.eye(10)[y] @ rng.normal(size=(10, 20)) + 0.8 * rng.normal(size=(3000, 20))
    big = fit_probes(z[:2000], y[:2000], z[2000:], y[2000:])
    small = fit_probes(0.003 * z[:2000], y[:2000], 0.003 * z[2000:], y[2000:])
    assert big["reference"] > 0.8 and big["standardised"] > 0.8
    assert small["reference"] < big["reference"] - 0.3
    assert abs(small["standardised"] - big["standardised"]) < 0.01


def test_table1_distances_on_a_hand_built_embedding():
    """An embedding that moves by exactly d(v) = |v| / 10 along one axis under value v: Table 1 is
    the mean of d over the non-base values."""
    import torch

    from metavae.paper.invariance import InvarianceConfig, invariance_distances

    class Shift(torch.nn.Module):
        uses_context = False

        def embed(self, x, context=None):
            return torch.cat([x.flatten(start_dim=-2)[..., :1], torch.zeros(*x.shape[:-2], 1)], -1)

    base = torch.zeros(30, 28, 28)
    by_value = {v: base + v / 10 for v in (-20, 0, 20, 40)}  # the first pixel carries the shift
    d = invariance_distances(Shift(), {"rotation": by_value}, {"rotation": 0}, InvarianceConfig(), 0, "cpu")
    assert d["rotation"] == pytest.approx((2 + 2 + 4) / 3, rel=1e-6)


def test_attention_pooling_setting_trains_a_set_transformer_and_names_the_variant(shared_mnist, tmp_path, capsys):
    import metavae

    out = tmp_path / "att"
    assert main(["run", "mnist-scale", "--data-dir", str(shared_mnist), "--out", str(out), "--set", "pooling=attention"]
                + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["label"] == "metavae (pooling attention)" and m["config"]["pooling"] == "attention"
    assert metavae.load(out / "checkpoints" / "best.pt").config["pooling"] == "attention"
    assert main(["run", "mnist-scale", "--model", "vae", "--data-dir", str(shared_mnist), "--out", str(tmp_path / "v"),
                 "--set", "pooling=attention"] + TINY) == 2
    assert "needs a model that pools a context set" in capsys.readouterr().err


def test_embedding_with_the_pool_features_computed_once_is_the_same(monkeypatch):
    """embed_images encodes each image once for every context it joins (`MetaVAE.pool_features`):
    the same contexts (same generator draws) and the same embeddings as encoding every context."""
    from metavae.models import make_model
    from metavae.paper.invariance import embed_images

    torch.manual_seed(0)
    model = make_model("metavae", event_shape=(1, 8, 8), n_distributions=3, z_dim=4).eval()
    images = torch.randint(0, 256, (257, 1, 8, 8), dtype=torch.uint8)
    cached = embed_images(model, images, 10, torch.Generator().manual_seed(3), chunk=50)
    monkeypatch.setattr(type(model), "pool_features", lambda self, pool, chunk=1024: None)
    plain = embed_images(model, images, 10, torch.Generator().manual_seed(3), chunk=50)
    assert cached.shape == (257, 4)
    assert torch.allclose(cached, plain, atol=1e-6), float((cached - plain).abs().max())
    other = embed_images(model, images, 10, torch.Generator().manual_seed(4), chunk=50)
    assert not torch.allclose(other, plain, atol=1e-6)  # the contexts matter: the comparison can fail


@pytest.mark.parametrize("kind,cached", [("metavae", True), ("metavae", False), ("vhe", True), ("ns", False)])
def test_embedding_many_chunks_per_pass_is_the_same(monkeypatch, kind, cached):
    """embed_images encodes up to EMBED_BATCH queries per forward pass, with the contexts still drawn
    chunk by chunk: the embeddings of one chunk per pass, to float rounding."""
    from metavae.models import make_model
    from metavae.models.hierarchical import HierarchicalVAE
    from metavae.models.metavae import MetaVAE
    from metavae.paper import invariance

    torch.manual_seed(0)
    model = make_model(kind, event_shape=(1, 8, 8), n_distributions=3, z_dim=4).eval()
    if not cached:
        for cls in (MetaVAE, HierarchicalVAE):
            monkeypatch.setattr(cls, "pool_features", lambda self, pool, chunk=1024: None)
    images = torch.randint(0, 256, (257, 1, 8, 8), dtype=torch.uint8)
    batched = invariance.embed_images(model, images, 5, torch.Generator().manual_seed(3), chunk=20)
    monkeypatch.setattr(invariance, "EMBED_BATCH", 20)
    one_by_one = invariance.embed_images(model, images, 5, torch.Generator().manual_seed(3), chunk=20)
    assert batched.shape == (257, 4)
    assert torch.allclose(batched, one_by_one, atol=1e-5), float((batched - one_by_one).abs().max())


@pytest.mark.parametrize("kind", ["vhe", "vhe-vampprior"])
def test_hierarchical_embedding_with_pool_features_is_the_same(monkeypatch, kind):
    """The VHEs' q(c | D) from statistic features computed once per image (`pool_features`) gives
    the embeddings of encoding every context set."""
    from metavae.models import make_model
    from metavae.models.hierarchical import HierarchicalVAE
    from metavae.paper.invariance import embed_images

    torch.manual_seed(0)
    model = make_model(kind, event_shape=(1, 8, 8), n_distributions=3, z_dim=4).eval()
    images = torch.randint(0, 256, (157, 1, 8, 8), dtype=torch.uint8)
    cached = embed_images(model, images, 5, torch.Generator().manual_seed(3), chunk=50)
    monkeypatch.setattr(HierarchicalVAE, "pool_features", lambda self, pool, chunk=1024: None)
    plain = embed_images(model, images, 5, torch.Generator().manual_seed(3), chunk=50)
    assert torch.allclose(cached, plain, atol=1e-5), float((cached - plain).abs().max())
    assert not torch.allclose(embed_images(model, images, 5, torch.Generator().manual_seed(4), chunk=50), plain, atol=1e-5)
