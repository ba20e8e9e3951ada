"""`metavae run mnist-generation` end to end on tiny models and a sliver of the shared MNIST."""
import torch

from metavae.cli import main
from metavae.paper import get_experiment
from metavae.models import make_model


def _fake_runs(root):
    torch.manual_seed(0)
    small = {"metavae": dict(z_dim=4, hidden_widths=(32,), summary_widths=(32,)),
             "vhe": dict(c_dim=4, z_dim=4, hidden=16, decoder_hidden=32)}
    for name, kw in small.items():
        model = make_model(name, "mlp", (28, 28), n_distributions=2, **kw)
        folder = root / name / "seed-0" / "checkpoints"
        folder.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "model_config": model.config}, folder / "best.pt")
        (folder.parent / "metrics.json").write_text("{}")  # a finished run
    unfinished = root / "ns" / "seed-0" / "checkpoints"  # still training: ignored
    unfinished.mkdir(parents=True)
    torch.save({"model": {}, "model_config": {}}, unfinished / "best.pt")


def test_scores_every_row_and_adapting_beats_the_nearest_decoder(shared_mnist, tmp_path):
    _fake_runs(tmp_path / "runs")
    out = tmp_path / "gen"
    args = ["run", "mnist-generation", "--quiet", "--data-dir", str(shared_mnist), "--out", str(out),
            "--set", f"runs={tmp_path / 'runs'}", "--set", "values=[20]", "--set", "contexts=[5,20]",
            "--set", "test_images=16", "--set", "k=4", "--set", "adapt_steps=60", "--set", "adapt_lr=0.01",
            "--set", "scratch_steps=5", "--set", "samples=3"]
    assert main(args) == 0
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["missing"] == ["ns"]
    ll = m["log_likelihood"]
    assert set(ll) == {"vhe", "metavae-adapt", "metavae-nearest", "vae-scratch"}
    for n in ("5", "20"):
        assert ll["metavae-adapt"][n]["mean"] > ll["metavae-nearest"][n]["mean"]  # adapting helps on test images
    assert (out / "samples.png").is_file() and "N = 20" in (out / "report.md").read_text()


def test_missing_runs_and_seen_values_are_one_line_errors(shared_mnist, tmp_path, capsys):
    assert main(["run", "mnist-generation", "--out", str(tmp_path / "o"), "--set", f"runs={tmp_path}"]) == 2
    assert "no trained models under" in capsys.readouterr().err
    _fake_runs(tmp_path / "runs")
    assert main(["run", "mnist-generation", "--out", str(tmp_path / "o2"), "--data-dir", str(shared_mnist),
                 "--set", f"runs={tmp_path / 'runs'}", "--set", "values=[5]"]) == 2
    assert "not unseen rotations" in capsys.readouterr().err


def test_registered():
    assert get_experiment("mnist-generation").options == {"data_dir"}
