"""The inference-gap experiment and inference-time refinement (docs/gap.md): exact zeros, quadrature
against closed forms, refinement that raises the ELBO, and a tiny run of the whole experiment."""
import dataclasses
import json
import math

import pytest
import torch
from torch import distributions as D

from metavae.distributions import CategoricalLatent, Gaussian, GaussianLatent, gaussian_log_prob
from metavae.paper import gap as G
from metavae.settings import resolve_preset
from metavae.models import build_mlp_metavae
from metavae.objectives import decoder_log_lik, elbo, elbo_of
from metavae.refine import (GaussHermiteLatent, GradientEncoder, iterate_learned, refine, refined_encode,
                            train_gradient_encoder)

VAR = 0.5  # observation variance of the Gaussian-Gaussian toy model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Sized for one core: on a busy machine a second thread only waits (4x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian_toy(V=6, d=2, P=4, seed=0):
    """z ~ N(0, I_d), x_v | z ~ N(z, VAR I_d) for v = 1..V: the exact posterior and log p(x) in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(P, 1, d, generator=g) + VAR**0.5 * torch.randn(P, V, d, generator=g)).double()
    post_var = 1 / (1 + V / VAR)
    post_mean = x.sum(1) / VAR * post_var  # (P, d)
    cov = VAR * torch.eye(V, dtype=torch.float64) + torch.ones(V, V, dtype=torch.float64)
    log_px = D.MultivariateNormal(torch.zeros(V, dtype=torch.float64), cov).log_prob(x.transpose(1, 2)).sum(-1)

    def log_lik(z):  # z (P, S, d) -> (P, S)
        return gaussian_log_prob(x.unsqueeze(1), z.unsqueeze(2), torch.full_like(x, math.log(VAR)).unsqueeze(1)).sum(-1)

    exact = torch.cat([post_mean, torch.full_like(post_mean, math.log(post_var))], -1)
    return x, log_lik, log_px, exact


def test_mog_gap_is_zero_at_the_exact_posterior_and_equals_the_kl_elsewhere():
    means = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    x = torch.tensor([[[-1.2, 0.1], [0.05, -0.3], [0.9, 0.2]]], dtype=torch.float64)
    log_joint = G.mog_log_joint(x, means)
    log_px, lik, lat = log_joint.logsumexp(-1), G.mog_log_lik(x, means), CategoricalLatent(2)
    cov = 0.1 * torch.eye(2, dtype=torch.float64)
    components = torch.stack([D.MultivariateNormal(m, cov).log_prob(x) for m in means[0]], -1)
    assert torch.allclose(log_px, torch.logsumexp(components + math.log(0.5), -1))
    exact_gap = log_px - elbo_of(lat, log_joint, lik)
    assert exact_gap.abs().max() < 1e-12 and G.categorical_kl(log_joint, log_joint).abs().max() < 1e-12
    logits = torch.tensor([[[0.3, -0.2], [2.0, 0.0], [-1.0, 1.0]]], dtype=torch.float64)
    gap, kl = log_px - elbo_of(lat, logits, lik), G.categorical_kl(logits, log_joint)
    assert (gap > 0).all() and torch.allclose(gap, kl, atol=1e-10)


def test_forward_kl_gap_is_kl_to_the_moment_matched_gaussian():
    # p uniform on [0, 1]: KL(p || q) - KL(p || q*) by numerical integration equals the closed form.
    z = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    mean, var = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1 / 12, dtype=torch.float64)

    def cross_entropy(m, logvar):  # -E_p[log q]
        return -torch.trapezoid(gaussian_log_prob(z[:, None], m, torch.tensor(logvar)), z)

    q = torch.tensor([0.3, math.log(0.2)], dtype=torch.float64)
    numeric = cross_entropy(q[0], float(q[1])) - cross_entropy(mean, math.log(1 / 12))
    assert torch.allclose(G.forward_kl_gap(mean, var, q), numeric, atol=1e-8)
    assert float(G.forward_kl_gap(mean, var, torch.stack([mean, var.log()]))) == pytest.approx(0, abs=1e-12)


def test_grid_quadrature_matches_the_gaussian_closed_form():
    x, log_lik, log_px, exact = gaussian_toy(d=2)
    mu, sd = exact[:, :2], torch.exp(0.5 * exact[:, 2:])
    log_joint = lambda z: gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) + log_lik(z)  # noqa: E731
    value, edge = G.log_marginal_grid(log_joint, mu - 10 * sd, mu + 10 * sd, 121)
    assert torch.allclose(value, log_px, atol=1e-8) and (edge < -40).all()


def test_gauss_hermite_elbo_is_exact_and_the_gap_closes_at_the_exact_posterior():
    x, log_lik, log_px, exact = gaussian_toy(d=2)
    lat = GaussHermiteLatent(2, 8)
    assert torch.allclose(lat.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (log_px - elbo_of(lat, exact, log_lik)).abs().max() < 1e-9  # q = exact posterior: gap 0
    start = torch.zeros_like(exact)  # the prior
    assert (log_px - elbo_of(lat, start, log_lik) > 1).all()
    best, last_gain = G.best_gaussian(lat, start, log_lik, 400)
    assert (log_px - elbo_of(lat, best, log_lik)).abs().max() < 1e-4 and last_gain < 1e-4


def test_refinement_raises_the_elbo_gaussian_and_categorical():
    x, log_lik, log_px, exact = gaussian_toy(d=2)
    lat = GaussHermiteLatent(2, 8)
    start = torch.zeros_like(exact)
    gaps = [log_px - elbo_of(lat, refine(lat, start, log_lik, k, 0.05), log_lik) for k in (0, 10, 100)]
    assert (gaps[0] > gaps[1]).all() and (gaps[1] > gaps[2]).all() and (gaps[2] >= -1e-9).all()
    # Monte Carlo gradients (the model's own latent) also move q towards the posterior.
    torch.manual_seed(0)
    noisy = refine(GaussianLatent(2), start, log_lik, 100, 0.05, n_samples=4)
    assert (elbo_of(lat, noisy, log_lik) > elbo_of(lat, start, log_lik)).all()
    means = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    xm = torch.tensor([[[-0.8, 0.0], [0.7, 0.1]]], dtype=torch.float64)
    logits = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]], dtype=torch.float64)
    cat, lik = CategoricalLatent(2), G.mog_log_lik(xm, means)
    assert (elbo_of(cat, refine(cat, logits, lik, 20, 0.5), lik) > elbo_of(cat, logits, lik)).all()
    with pytest.raises(ValueError, match="optimizer"):
        refine(cat, logits, lik, 1, 0.1, optimizer="lbfgs")


def test_refined_encode_raises_the_models_own_elbo_and_leaves_its_weights_alone():
    torch.manual_seed(0)
    model = build_mlp_metavae((2,), 2, z_dim=2, latent="categorical", likelihood=Gaussian(0.1), hidden_widths=(8,),
                              summary_widths=(8,))
    x, ctx, dist = torch.randn(2, 5, 2), torch.randn(2, 1, 7, 2), torch.arange(2)
    params = refined_encode(model, x, ctx, dist, steps=30, lr=0.5)
    refined = elbo_of(model.latent, params, lambda z: decoder_log_lik(model, x, z, dist))
    with torch.no_grad():
        amortized = elbo(model, x, ctx, dist)
    assert refined.mean() > amortized.mean() + 0.1 and (refined >= amortized - 1e-4).all()
    assert all(p.grad is None for p in model.parameters())


def test_gradient_encoder_keeps_stationary_points_and_learns_to_step():
    x, log_lik, log_px, exact = gaussian_toy(d=1, P=32)
    lat = GaussHermiteLatent(1, 8)
    enc = GradientEncoder(2).double()
    assert torch.equal(enc(exact, torch.zeros_like(exact)), exact)  # zero gradient: no move
    start = torch.zeros_like(exact)
    before = [p for p in iterate_learned(enc, lat, start, log_lik, 3)][-1]
    losses = train_gradient_encoder(enc, lat, start, log_lik, iters=60, unroll=3, lr=1e-2)
    after = [p for p in iterate_learned(enc, lat, start, log_lik, 3)][-1]
    assert losses[-1] < losses[0]
    assert elbo_of(lat, after, log_lik).mean() > elbo_of(lat, before, log_lik).mean()


TINY = dict(mog_train_mixtures=(2, 3), mog_epochs=1, mog_steps_per_epoch=20, mog_unseen_mixtures=5, mog_points=10,
            expfam_families="gaussian,exponential", expfam_distributions_per_family=3, expfam_epochs=1,
            expfam_steps_per_epoch=10, expfam_unseen_distributions=3, expfam_queries=4, best_steps=400,
            learned_iters=5, physics_epochs=1, physics_steps_per_epoch=10, physics_queries=5, refine_steps=(1, 10))


def test_tiny_run_writes_everything_and_its_refinement_closes_the_gap(tmp_path):
    cfg = dataclasses.replace(G.PRESETS["quick"], **TINY)
    m = G.run(cfg, tmp_path, "cpu", 0, False)
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "report.md", "gap.png", "mog", "expfam", "physics"}
    assert json.loads((tmp_path / "metrics.json").read_text())["answer"] == json.loads(json.dumps(m["answer"]))
    assert set(m["mog"]["models"]) == {"vae", "metavae_2", "metavae_3"}
    assert set(m["expfam"]["models"]) == {"vae_exponential", "metavae_exponential", "vae_gaussian", "metavae_gaussian",
                                          "metavae_many"}
    assert sorted(m["answer"]["expfam_exponential"]["unseen"]) == [1, 3, 9]
    assert sorted(m["answer"]["mog"]["unseen"]) == [1, 2, 3] and sorted(m["answer"]["physics"]["unseen"]) == [1, 25]
    assert set(m["physics"]["models"]) == {"vae", "metavae", "prior"}
    c = m["checks"]
    assert c["mog_kl_minus_elbo_gap_max_abs"] < 1e-8 and c["mog_exact_q_gap_max_abs"] < 1e-8
    assert c["expfam_min_gap"] > -1e-6 and c["expfam_grid_edge_max"] < -20
    assert c["expfam_gaussian_approximation_gap_max"] < 1e-3  # Gaussian posterior: ~0 (a short best-q fit here)
    for r in m["mog"]["models"].values():
        for s in ("seen", "unseen"):
            assert r[s]["kl"] >= 0 and r[s]["refined"][10] <= r[s]["kl"]
    for r in m["expfam"]["models"].values():
        for s in (s for f in r["families"].values() for s in f.values()):
            assert s["approximation_gap"] > -1e-6 and s["amortization_gap"] > -1e-6
            assert s["refined"][10] <= s["amortization_gap"] + 1e-9
    for r in m["physics"]["models"].values():
        assert r["unseen"]["mean"] >= 0
    assert "| metavae_3 | 3 | unseen |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("key, value, message", [
    ("parts", "mog,fluids", "setting 'parts'"),
    ("expfam_families", "weibull", "setting 'expfam_families'"),
    ("mog_points", "0", "must be positive"),
    ("refine_steps", "[]", "must not be empty"),
])
def test_bad_settings_are_one_clear_error(key, value, message):
    with pytest.raises(ValueError, match=message):
        resolve_preset(G.PRESETS, None, {key: value})


def test_iw_of_equals_the_model_bound_and_tightens_the_elbo():
    """`iw_of` (any likelihood) is `iw_log_likelihood` (a model's decoder) under the same draws, and
    with k = 1 it is a one-sample ELBO: on the Gaussian toy its mean sits between ELBO and log p(x)."""
    from metavae.objectives import iw_log_likelihood, iw_of

    torch.manual_seed(0)
    model = build_mlp_metavae((3,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0)).double()
    x, ctx = torch.randn(2, 5, 3).double(), torch.randn(2, 5, 4, 3).double()
    torch.manual_seed(1)
    a = iw_log_likelihood(model, x, ctx, k=7)
    torch.manual_seed(1)
    b = iw_of(model.latent, model.encode(x, ctx), lambda z: decoder_log_lik(model, x, z, None), k=7)
    torch.testing.assert_close(a, b)
    x, log_lik, log_px, exact = gaussian_toy(P=200)
    latent = GaussianLatent(2)
    params = torch.zeros_like(exact)  # q = the prior, far from the exact posterior
    torch.manual_seed(0)
    low, iw = elbo_of(latent, params, log_lik, 100).mean(), iw_of(latent, params, log_lik, 1000).mean()
    assert float(low) + 1.0 < float(iw) <= float(log_px.mean()) + 0.05


def _fake_run(folder, seed=0):
    """A finished mnist-rotate MetaVAE run (untrained weights) in the layout `find_model` reads."""
    from metavae.paper.data import transforms as T
    from metavae.models import make_model

    seen, unseen = T.get_split("rotation", "interleaved")
    torch.manual_seed(seed)
    model = make_model("metavae", "mlp", (28, 28), n_distributions=len(seen), z_dim=4)
    (folder / "checkpoints").mkdir(parents=True)
    model.save(folder / "checkpoints" / "best.pt")
    (folder / "metrics.json").write_text(json.dumps({"model": "metavae", "axis": "rotate", "split": "interleaved",
                                                     "seen": list(seen), "unseen": list(unseen), "seed": seed,
                                                     "epochs_trained": 0}))


def test_mnist_gap_decomposes_the_gap_on_seen_and_adapted_unseen_values(shared_mnist, tmp_path, monkeypatch):
    from metavae.cli import main

    monkeypatch.setenv("METAVAE_DATA", str(tmp_path / "cache"))
    _fake_run(tmp_path / "runs" / "metavae" / "seed-0")
    out = tmp_path / "gap"
    settings = ["values=1", "test_images=12", "pool_images=30", "best_steps=80", "iw_k=200", "adapt_steps=30",
                "elbo_samples=50", "refine_steps=[1,10]"]
    assert main(["run", "mnist-gap", "--data-dir", str(shared_mnist), "--out", str(out), "--quiet",
                 "--set", f"runs={tmp_path / 'runs'}"] + [a for s in settings for a in ("--set", s)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["groups"]) == {"seen", "unseen-adapted", "unseen-nearest"}
    for g in m["groups"].values():
        assert g["images"] == 12
        assert g["elbo_best"]["mean"] > g["elbo_amortized"]["mean"]  # optimising each image's q helps
        assert g["log_px"]["mean"] > g["elbo_best"]["mean"] - 0.5  # IW-200 from the best q bounds above its ELBO
        assert g["left_after_10"]["mean"] < g["left_after_1"]["mean"]
    # the adapted decoder fits the unseen value better than the nearest training decoder it started from
    assert m["groups"]["unseen-adapted"]["log_px"]["mean"] > m["groups"]["unseen-nearest"]["log_px"]["mean"]
    assert (out / "gap.png").exists() and "amortization gap" in (out / "report.md").read_text()
    assert main(["run", "mnist-gap", "--out", str(out), "--quiet", "--set", f"runs={tmp_path / 'none'}"]) == 2
