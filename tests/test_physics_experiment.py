"""Meta-compiled inference for the inclined plane: the model, its inputs, training and the CLI output."""

import json
import math

import pytest
import torch
from torch import distributions as D

from metavae.cli import main
from metavae.paper.data import physics as P
from metavae.data.meta import MetaDataset
from metavae.paper import get_experiment
from metavae.paper import physics as X
from metavae.paper.models.compiled import build_compiled_inference
from metavae.training import Trainer, TrainConfig, seed_everything


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the model
def test_nll_is_gaussian_negative_log_density():
    torch.manual_seed(0)
    model = build_compiled_inference(2, z_dim=1, hidden_widths=(8,), summary_widths=(8,))
    x, ctx = torch.randn(3, 5, 2), torch.randn(3, 1, 7, 2)
    params = model.encode(x, ctx)
    assert params.shape == (3, 5, 2)
    mu, logvar = params[..., :1], params[..., 1:]
    z = torch.rand(3, 5, 1)
    ref = -D.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).squeeze(-1)
    assert torch.allclose(model.nll(params, z), ref, atol=1e-5)
    assert torch.allclose(model.embed(x, ctx), mu)
    lo, hi = model.logvar_range
    assert bool(((logvar > lo) & (logvar < hi)).all())


def test_loss_needs_labels_and_no_decoder():
    model = build_compiled_inference(2, hidden_widths=(8,), summary_widths=None)
    assert not model.uses_context
    data = MetaDataset([torch.randn(20, 2)], labels=[torch.rand(20, 1)], seed=0)
    out = model.loss(data.sample(4, 0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and "mse" in out
    unlabelled = MetaDataset([torch.randn(20, 2)], seed=0).sample(4, 0)
    with pytest.raises(ValueError, match="labels"):
        model.loss(unlabelled)
    with pytest.raises(NotImplementedError):
        model.decode(torch.zeros(1, 1, 1))


# ----------------------------------------------------------------------------- inputs
def test_features_flag_censored_times():
    x = torch.tensor([0.5, P.CENSORED_TIME, 2.0])
    f = X.features(x)
    assert f.shape == (3, 2) and f.dtype == torch.float32
    assert torch.allclose(f[:, 0], torch.tensor([4.0, 0.0, 0.25]))
    assert f[:, 1].tolist() == [0.0, 1.0, 0.0]


def test_standardisation_removes_the_plane_length():
    """1/t^2 scales as 1/L: features of one plane at two lengths standardise to the same values
    (noise-free, continuous times), and censored elements stay (0, 1)."""
    pre = X.StandardizeOnContext()
    mu = torch.rand(2, 40, generator=gen(1))
    A = 30.0
    a = P.acceleration(A, mu)
    feats = []
    for L in (2.0, 13.0):
        t = torch.where(a > 0, torch.sqrt(2 * L / a.clamp(min=1e-9)), torch.full_like(a, P.CENSORED_TIME))
        feats.append(X.features(t.float()))
    (q1, c1), (q2, c2) = [pre(f[:, :5], f[:, None, 5:]) for f in feats]
    assert torch.allclose(q1, q2, atol=1e-4) and torch.allclose(c1, c2, atol=1e-4)
    censored = feats[0][..., 1] == 1
    assert bool(censored.any())
    assert bool((q1[..., 0][censored[:, :5]] == 0).all())
    # Standardised over the sliding elements of the set: mean 0, std 1.
    sliding = ~censored[0, 5:]
    v = c1[0, 0][sliding, 0]
    assert float(v.mean()) == pytest.approx(0, abs=1e-5) and float(v.std()) == pytest.approx(1, abs=1e-4)


def test_standardisation_with_an_all_censored_context_is_finite():
    pre = X.StandardizeOnContext()
    ctx = X.features(torch.full((1, 1, 6), P.CENSORED_TIME))
    q, c = pre(X.features(torch.tensor([[0.7, P.CENSORED_TIME]])), ctx)
    assert bool(torch.isfinite(q).all()) and bool(torch.isfinite(c).all())


# ----------------------------------------------------------------------------- learning
def test_short_training_on_two_simulators_beats_the_prior_mean():
    """A few hundred steps on 2 simulators: the posterior-mean MSE on fresh simulations of them
    falls far below that of the prior mean (1/12), using observations only as context."""
    cfg = X.PhysicsConfig(train_samples=400, val_samples=100, context_size=64, batch_size=32, hidden=(32, 32),
                          summary=(32, 32))
    sims = [(4, 30), (8, 50)]
    data = X.simulator_dataset(sims, cfg, gen(0))
    seed_everything(0)
    model = X.build_physics_model(cfg)
    tc = TrainConfig(epochs=1, batch_size=32, context_size=64, lr=3e-3, steps_per_epoch=150, shared_context=True,
                     grad_clip=10.0, seed=0)
    Trainer(model, data, tc, progress=False).fit()
    model.eval()
    x, mu, _ = P.simulate_many(sims, 500, gen(5))
    pool, _, _ = P.simulate_many(sims, 200, gen(6))
    pred = X.predict(model, x, pool, 64, 5, gen(7))
    mse = float(((pred - mu) ** 2).mean())
    prior_mse = float(((mu - (P.MU_LOW + P.MU_HIGH) / 2) ** 2).mean())
    assert prior_mse == pytest.approx(1 / 12, rel=0.15)
    assert mse < 0.25 * prior_mse, (mse, prior_mse)


# ----------------------------------------------------------------------------- the experiment
TINY = ["train_samples=40", "val_samples=20", "test_samples=20", "eval_pool=30", "eval_contexts=2",
        "context_size=8", "batch_size=8", "epochs=1", "baseline_epochs=1", "steps_per_epoch=3",
        "hidden=[8]", "summary=[8]"]


def test_the_evaluation_pool_keeps_its_earlier_name():
    """`eval_pool` was `context_pool` (a training pool elsewhere, TrainConfig.context_pool): the old
    --set key and an old metrics.json config still read."""
    from metavae.settings import config_from_dict, resolve_preset

    assert resolve_preset(X.PRESETS, None, {"context_pool": "30"}).eval_pool == 30
    old = {**X.config_dict(X.PRESETS["quick"]), "context_pool": 7}
    del old["eval_pool"]
    assert config_from_dict(X.PhysicsConfig, old) == X.PhysicsConfig(eval_pool=7)


def test_cli_run_writes_metrics_in_the_issue_layout(tmp_path, capsys):
    assert get_experiment("physics").presets
    args = ["run", "physics", "--out", str(tmp_path), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["mse"]) == {"metavae", "vae", "prior_mean", "bayes"}
    assert set(m["ratio_to_bayes"]) == {"metavae", "vae", "prior_mean"}
    assert m["mse"]["prior_mean"] == pytest.approx(1 / 12, abs=0.01)  # guessing the prior mean of U(0, 1)
    assert m["simulators"] == {"test": 304, "of_which_training": 25} and m["unseen_only"]["simulators"] == 279
    assert len(m["grid"]) == len(P.TEST_SIMULATORS) == 304
    assert all(len(row) == 5 for row in m["grid"])
    assert {(row[0], row[1]) for row in m["grid"]} == set(P.TEST_SIMULATORS)
    assert all(math.isfinite(v) for row in m["grid"] for v in row)
    for key in ("metavae", "vae"):
        assert m["ratio_to_bayes"][key] == pytest.approx(m["mse"][key] / m["mse"]["bayes"])
    assert m["region"]["A"] == [20, 70] and "pass" in m["region"]
    for name in ("report.md", "heatmaps.png", "mse_vs_angle.png", "ratio_to_bayes.png"):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    assert "Differences from the paper/reference" in report and "observations only" in report
    assert report == X._report(m).rstrip() + "\n"  # rebuilt from metrics.json alone (templates/physics.md)
    assert (tmp_path / "checkpoints" / "metavae" / "best.pt").exists()
