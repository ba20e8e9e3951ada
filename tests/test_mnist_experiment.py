"""Transformed-MNIST experiments end to end on a sliver of the shared MNIST, and the report."""
import json

import numpy as np
import pytest

from metavae.cli import main
from metavae.experiments.invariance import fit_probe

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
    assert (out / "accuracy.png").exists() and (out / "probe_vs_steps.png").exists()
    assert (out / "checkpoints" / "best.pt").exists() and (out / "checkpoints" / "worst.pt").exists()


def test_interleaved_metavae_measures_table1_and_report_gathers(shared_mnist, tmp_path):
    runs = tmp_path / "runs"
    out = runs / "mnist-rotate" / "interleaved" / "metavae"
    assert main(["run", "mnist-rotate", "--split", "standard", "--data-dir", str(shared_mnist), "--out", str(out)]
                + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "interleaved" and set(m["invariance_distance"]) == {"rotate", "scale", "shear"}
    assert all(d > 0 for d in m["invariance_distance"].values())
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
    assert fit_probe(good[:1500], y[:1500], good[1500:], y[1500:])[1] > 0.9
    assert fit_probe(noise[:1500], y[:1500], noise[1500:], y[1500:])[1] < 0.2
