"""Sufficient-statistics demo: known-likelihood decoders, read-outs, training and the metrics layout."""

import json
import math

import pytest
import torch
from torch import distributions as D

from metavae.cli import main
from metavae.paper.data import exponential_families as E
from metavae.data.meta import MetaDataset
from metavae.paper import expfam as X
from metavae.paper import get_experiment
from metavae.paper.models.expfam_metavae import ExpFamLikelihood, FamilyParams, KnownLikelihoodDecoder, build_expfam_metavae
from metavae.objectives import elbo
from metavae.training import Trainer, TrainConfig, seed_everything

FAMS = list(E.TRAIN_FAMILIES)
TORCH = {
    "gaussian": lambda z: D.Normal(z, math.sqrt(E.VARIANCE)),
    "lognormal": lambda z: D.LogNormal(z, math.sqrt(E.VARIANCE)),
    "exponential": lambda z: D.Exponential(torch.exp(z)),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- decoders
def test_decoder_log_likelihood_equals_torch_distributions():
    """Rows of three families in one batch: each scored by its own family, summed over 20 draws x 2 coords."""
    lik = ExpFamLikelihood(FAMS)
    g = gen(0)
    x = torch.stack([E.FAMILIES[f].sample(torch.tensor([[0.7, 1.3]] * 4), 20, g, dtype=torch.float64) for f in FAMS])
    z = 0.5 * torch.randn(3, 4, 5, 2, generator=g, dtype=torch.float64)  # (K, B, S, 2)
    ours = lik.log_prob(FamilyParams(z, torch.tensor([0, 1, 2])), x.flatten(2).unsqueeze(2))
    assert ours.shape == (3, 4, 5)
    for k, f in enumerate(FAMS):
        ref = TORCH[f](z[k, :, :, None, :]).log_prob(x[k, :, None]).sum((-1, -2))
        assert torch.allclose(ours[k], ref, atol=1e-9), f
    # Unflattened draws give the same numbers.
    assert torch.allclose(lik.log_prob(FamilyParams(z, torch.tensor([0, 1, 2])), x.unsqueeze(2)), ours)


def test_gaussian_decoder_has_the_correct_scale():
    """At z = x the per-draw density is that of N(0, 0.1) at 0 (not the reference's 0.5 * var scale)."""
    lik = ExpFamLikelihood(["gaussian"])
    x = torch.full((1, 1, 1, 20, 2), 0.3)
    lp = lik.log_prob(FamilyParams(torch.full((1, 1, 1, 2), 0.3), torch.tensor([0])), x)
    assert float(lp) == pytest.approx(40 * -0.5 * math.log(2 * math.pi * E.VARIANCE), rel=1e-6)


def test_decoder_bank_picks_each_distributions_family():
    dec = KnownLikelihoodDecoder(["gaussian", "exponential", "gaussian"], FAMS)
    assert dec.n == 3 and len(list(dec.parameters())) == 0
    z = torch.zeros(3, 2, 2)
    assert dec(z).family.tolist() == [0, 2, 0]
    assert dec(z[:2], torch.tensor([1, 2])).family.tolist() == [2, 0]
    with pytest.raises(ValueError, match="not among"):
        KnownLikelihoodDecoder(["weibull"], FAMS)
    with pytest.raises(ValueError, match="no known likelihood"):
        ExpFamLikelihood(["laplace"])


def test_metavae_elbo_with_known_decoders_is_finite_and_shaped():
    torch.manual_seed(0)
    model = build_expfam_metavae(["gaussian", "lognormal", "exponential"], draw_features=(8,), meta_summary=(8,),
                                 hidden_widths=(8,))
    data = MetaDataset([E.make_random_vectors(E.FAMILIES[f].sample(torch.tensor([[0.5, 1.0]]), 200, gen(1)))[0]
                        for f in FAMS], seed=0)
    batch = data.sample(4, 3, shared_context=True)
    e = elbo(model, batch.x, batch.context, batch.dist)
    assert e.shape == (3, 4) and bool(torch.isfinite(e).all())
    assert torch.isfinite(model.loss(batch).loss)


@pytest.mark.parametrize("per_coordinate", [True, False])
def test_balanced_loss_is_the_fisher_weighted_mean_of_the_elbos(per_coordinate):
    torch.manual_seed(1)
    members = ["gaussian", "exponential"]
    model = build_expfam_metavae(members, draw_features=(8,), meta_summary=(8,), hidden_widths=(8,), balance=True,
                                 per_coordinate=per_coordinate)
    data = MetaDataset([E.make_random_vectors(E.FAMILIES[f].sample(torch.tensor([[0.5, 1.0]]), 200, gen(4)))[0]
                        for f in members], seed=0)
    batch = data.sample(4, 3, shared_context=True)
    torch.manual_seed(2)
    loss = model.loss(batch).loss
    torch.manual_seed(2)
    per_dist = elbo(model, batch.x, batch.context, batch.dist).mean(1)
    w = torch.tensor([0.1, 1.0])  # 1 / Fisher information per draw: Gaussian 1 / 0.1, exponential 1
    assert torch.allclose(loss, -(w * per_dist).sum() / w.sum(), atol=1e-5)
    assert model.encode(batch.x, batch.context).shape == (2, 4, 4)


# ----------------------------------------------------------------------------- read-out
def test_linear_read_out_recovers_a_linear_map():
    g = gen(2)
    s = torch.randn(200, 4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 2, generator=g, dtype=torch.float64)
    y = s @ W + torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = X.fit_linear(s, y, ridge=0.0)
    assert torch.allclose(X.apply_linear(w, s), y, atol=1e-8)


def test_exact_posterior_of_the_gaussian_is_the_shrunk_sample_mean():
    cfg = X.ExpfamConfig(sweep_points=3, sweep_vectors=200, readout_distributions=2, readout_vectors=2, context_size=1)
    ev = X.Evaluator(["gaussian"], cfg, seed=0)
    curve = X.exact_posterior_curve(ev, "gaussian")
    # Variance of the mean of 20 draws of variance 0.1 is 0.005; shrinkage by 20 / 20.1 adds (v / 201)^2.
    values = ev.data["gaussian"]["values"].numpy()
    expected = 0.1 / 20 * (20 / 20.1) ** 2 + (values / 201) ** 2
    assert curve == pytest.approx(expected, rel=0.25)


# ----------------------------------------------------------------------------- learning
def test_short_training_learns_the_gaussian_mean():
    """A few hundred steps over 8 Gaussians: held-out means are inferred far better than by guessing 0."""
    cfg = X.ExpfamConfig(distributions_per_family=8, draws_per_distribution=2000, draw_features=(32, 32),
                         meta_summary=(32, 32), hidden=(32, 32), batch_size=16, context_size=5)
    g = gen(3)
    params = E.FAMILIES["gaussian"].prior_sample(8, g)
    train, val = X._family_data("gaussian", params, cfg, g)
    seed_everything(0)
    model = build_expfam_metavae(["gaussian"] * 8, draw_features=cfg.draw_features, meta_summary=cfg.meta_summary,
                                 hidden_widths=cfg.hidden)
    tc = TrainConfig(epochs=1, batch_size=16, context_size=5, lr=3e-3, steps_per_epoch=200, shared_context=True,
                     grad_clip=10.0, seed=0)
    Trainer(model, X._dataset(train, val, None), tc, progress=False).fit()
    model.eval()
    test = E.FAMILIES["gaussian"].prior_sample(10, g, -4.0, 4.0)
    q, ctx = X.draw_queries("gaussian", test, 10, 5, g)
    est = model.embed(q, ctx)
    mse = float(((est - test[:, None, :].float()) ** 2).mean())
    assert mse < 0.05 and mse < 0.05 * float((test**2).mean()), mse


# ----------------------------------------------------------------------------- the experiments
TINY = ["distributions_per_family=3", "draws_per_distribution=400", "context_size=2", "batch_size=4", "epochs=1",
        "steps_per_epoch=2", "draw_features=[8]", "meta_summary=[8]", "hidden=[8]", "sweep_points=6",
        "sweep_vectors=3", "readout_distributions=3", "readout_vectors=3"]


def _run(name, out):
    args = ["run", name, "--out", str(out), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def _check_split(block, has_outside):
    assert set(block) == {"inside", "outside"}
    assert math.isfinite(block["inside"])
    assert (block["outside"] is not None and math.isfinite(block["outside"])) == has_outside


def test_single_family_run_writes_the_issue_layout(tmp_path):
    assert get_experiment("expfam-single").presets
    m = _run("expfam-single", tmp_path)
    assert set(m["mse"]) == {"metavae", "vae"}
    for model in m["mse"].values():
        assert set(model) == set(FAMS)
        for block in model.values():
            _check_split(block, True)
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "report.md").exists()
    assert "Differences from the paper/reference" in (tmp_path / "report.md").read_text()


def test_many_family_run_writes_the_issue_layout(tmp_path):
    m = _run("expfam-many", tmp_path)
    assert set(m["mse"]) == {"many", "single_gaussian", "single_lognormal", "single_exponential"}
    for model in m["mse"].values():
        assert set(model) == set(E.TRAIN_FAMILIES) | set(E.UNSEEN_FAMILIES)
        for f, block in model.items():
            _check_split(block, E.FAMILIES[f].trainable)
    assert set(m["many_beats_every_single_on_unseen"]) == set(E.UNSEEN_FAMILIES)
    # Read-out: the model's own decoder where it has one, the linear map otherwise.
    assert m["readout"]["many"]["gaussian"] == "decoder"
    assert m["readout"]["single_gaussian"]["gaussian"] == "decoder"
    assert m["readout"]["single_gaussian"]["lognormal"].startswith("linear map")
    assert all(m["readout"][k]["weibull"].startswith("linear map") for k in m["readout"])
    assert (tmp_path / "many_vs_single.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "linear map" in report and "Differences from the paper/reference" in report
