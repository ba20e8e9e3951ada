"""The CLI and the mixture-of-Gaussians experiment end to end (tiny settings)."""
import json

import pytest
import torch

from metavae.cli import main
from metavae.paper.data import mog


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    assert "mog" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "mog", "--device", "banana"], "unknown device"),
        (["run", "mog", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "mog", "--set", "epochz=3"], "unknown setting 'epochz'"),
        (["run", "mog", "--set", "epochs=many"], "expects an int"),
        (["run", "mog", "--split", "sparse"], "does not take --split"),
    ],
)
def test_bad_arguments_fail_clearly(argv, match, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_mog_tiny_run_writes_everything_and_resumes(tmp_path):
    args = ["run", "mog", "--out", str(tmp_path), "--quiet", "--set", "epochs=1", "--set", "steps_per_epoch=40",
            "--set", "train_mixtures=[2,4]", "--set", "test_mixtures=50", "--set", "points_per_mixture=300",
            "--set", "context_size=24"]
    assert main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["error"]) == {"vae", "metavae_2", "metavae_4"}
    assert m["paper"]["metavae_50"] == 0.099
    assert 0 <= m["bayes_floor"] < 0.05
    # no classifier beats the Bayes-optimal one beyond sampling noise (an error computed as 0 would fail)
    assert all(v >= m["bayes_floor"] - 0.02 for v in m["error"].values())
    for f in ("report.md", "clusters.png", "error.png", "checkpoints/metavae_4/best.pt", "checkpoints/vae/last.pt"):
        assert (tmp_path / f).exists(), f
    stamp = (tmp_path / "checkpoints/metavae_4/last.pt").stat().st_mtime_ns
    assert main(args) == 0  # a rerun resumes: nothing left to train, same results
    assert (tmp_path / "checkpoints/metavae_4/last.pt").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "metrics.json").read_text())["error"] == m["error"]


def test_clustering_error_is_permutation_invariant():
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    assert torch.equal(mog.clustering_error(1 - labels, labels), torch.zeros(2))
    assert torch.allclose(mog.clustering_error(torch.tensor([[0, 0, 0, 1]] * 2), labels), torch.tensor([0.25, 0.25]))


def test_bayes_floor_matches_the_issue():
    g = torch.Generator().manual_seed(0)
    means = mog.sample_means(2000, g)
    x, y = mog.sample_points(means, 200, g)
    floor = float(mog.clustering_error(mog.bayes_labels(x, means), y).mean())
    assert 0.003 < floor < 0.01  # "about 0.6%"
