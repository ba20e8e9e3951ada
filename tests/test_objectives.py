"""ELBO / MetaELBO / importance-weighted log p(x) against hand computations and brute force."""
import math

import pytest
import torch

from metavae import Gaussian, build_mlp_metavae, elbo, iw_log_likelihood, meta_elbo
from metavae.data.meta import Batch
from metavae.distributions import LOGVAR_BOUND


def _tiny_categorical_model():
    """1-D x, z in {0,1}; q(z|x) logits = [0, x]; decoder k has means (mu_k0, mu_k1), variance 0.5."""
    m = build_mlp_metavae((1,), 2, z_dim=2, latent="categorical", likelihood=Gaussian(0.5), hidden_widths=(),
                          decoder_widths=(), use_context=False)
    with torch.no_grad():
        m.head[0].weight.copy_(torch.tensor([[0.0], [1.0]]))
        m.head[0].bias.zero_()
        layer = m.decoder.layers[0]
        layer.weight.copy_(torch.tensor([[[-1.0], [1.0]], [[0.0], [3.0]]]))  # (K, z=2, x=1)
        layer.bias.zero_()
    return m


def _hand_elbo(x, means, var=0.5):
    q1 = math.exp(x) / (1 + math.exp(x))
    q = [1 - q1, q1]
    loglik = [-0.5 * ((x - mu) ** 2 / var + math.log(2 * math.pi * var)) for mu in means]
    kl = sum(qi * math.log(qi / 0.5) for qi in q)
    return sum(qi * li for qi, li in zip(q, loglik)) - kl


def test_meta_elbo_matches_hand_computation():
    m = _tiny_categorical_model()
    xs = [[0.3, -1.2, 2.0], [0.5, 1.5, -0.7]]  # K=2 distributions, B=3 points
    x = torch.tensor(xs).unsqueeze(-1)
    means = [(-1.0, 1.0), (0.0, 3.0)]
    per_dist = [sum(_hand_elbo(v, means[k]) for v in xs[k]) / 3 for k in range(2)]
    expected = sum(per_dist) / 2
    got = meta_elbo(m, x, None, torch.arange(2)).detach()
    assert float(got) == pytest.approx(expected, abs=1e-5)
    # the model's training loss is exactly the negative MetaELBO
    assert float(m.loss(Batch(x, None, None, torch.arange(2)))["loss"].detach()) == pytest.approx(-expected, abs=1e-5)


def test_meta_elbo_weighs_distributions_equally():
    m = _tiny_categorical_model()
    x = torch.tensor([[0.3, -1.2], [0.5, 1.5]]).unsqueeze(-1)
    per_point = elbo(m, x, None, torch.arange(2))
    got = meta_elbo(m, x, None, torch.arange(2)).detach()
    assert float(got) == pytest.approx(float(per_point.detach().mean(1).mean()), abs=1e-6)


def test_exact_enumeration_equals_brute_force():
    torch.manual_seed(0)
    m = build_mlp_metavae((3,), 2, z_dim=4, latent="categorical", likelihood=Gaussian(0.3), hidden_widths=(8,),
                          summary_widths=(8, 8), decoder_widths=(5,))
    x, ctx = torch.randn(2, 5, 3), torch.randn(2, 5, 6, 3)
    got = elbo(m, x, ctx, torch.arange(2))
    exact_lpx = iw_log_likelihood(m, x, ctx, torch.arange(2))
    q = torch.softmax(m.encode(x, ctx), -1)
    brute = torch.zeros(2, 5)
    lpx_terms = []
    for v in range(4):  # each latent value in turn, by hand
        z = torch.zeros(2, 5, 1, 4)
        z[..., v] = 1.0
        ll = m.likelihood.log_prob(m.decode(z, torch.arange(2)), x.unsqueeze(2)).squeeze(-1)
        brute += q[..., v] * (ll - torch.log(q[..., v] * 4))
        lpx_terms.append(ll + math.log(1 / 4))
    assert torch.allclose(got, brute, atol=1e-5)
    assert torch.allclose(exact_lpx, torch.logsumexp(torch.stack(lpx_terms), 0), atol=1e-5)
    assert (exact_lpx >= got - 1e-5).all()  # log p(x) >= ELBO


def test_importance_weighted_bound_is_above_elbo_and_tightens():
    torch.manual_seed(0)
    m = build_mlp_metavae((6,), 1, z_dim=3, likelihood=Gaussian(0.2), hidden_widths=(16,), summary_widths=(16, 16),
                          decoder_widths=(16,))
    x, ctx = torch.randn(1, 400, 6), torch.randn(1, 400, 5, 6)
    with torch.no_grad():
        e = elbo(m, x, ctx, n_samples=200).mean()
        iw = {k: iw_log_likelihood(m, x, ctx, k=k).mean() for k in (1, 10, 100)}
    assert float(iw[1]) == pytest.approx(float(e), abs=0.1 * abs(float(e)) ** 0.5 + 0.05)
    assert iw[10] > e and iw[100] > iw[10] > iw[1]


def test_gaussian_kl_matches_torch_distributions():
    from metavae import GaussianLatent

    lat = GaussianLatent(4)
    params = torch.randn(7, 8)
    mu, logvar = params.chunk(2, -1)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    assert torch.allclose(lat.kl(params), torch.distributions.kl_divergence(q, p).sum(-1), atol=1e-5)


def test_bernoulli_log_prob_matches_torch():
    from metavae import Bernoulli

    logits, x = torch.randn(5, 10), torch.rand(5, 10).round()
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    assert torch.allclose(Bernoulli().log_prob(logits, x), ref, atol=1e-5)


def test_learned_variance_gaussian():
    g = Gaussian(None)
    params = torch.randn(3, 8)
    x = torch.randn(3, 4)
    mean, raw = params.chunk(2, -1)
    logvar = LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)  # the learned log-variance is softly bounded
    ref = torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(-1)
    assert torch.allclose(g.log_prob(params, x), ref, atol=1e-5)
    huge = torch.cat([torch.zeros(1, 4), torch.full((1, 4), -1e4)], -1)  # would be a point mass unbounded
    assert torch.isfinite(g.log_prob(huge, torch.ones(1, 4))).all()


def test_free_bits_floor_the_kl_per_dimension_and_only_in_training():
    torch.manual_seed(0)
    model = build_mlp_metavae((3,), 2, z_dim=4, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(1.0), free_bits=5.0)
    x, ctx = torch.randn(2, 6, 3), torch.randn(2, 6, 4, 3)
    batch = Batch(x, ctx, None, torch.arange(2))
    params = model.encode(x, ctx)
    kl_dim = model.latent.kl_per_dim(params).mean(dim=(0, 1))
    assert (kl_dim < 5.0).all()  # a fresh model sits below the floor on every dimension
    torch.manual_seed(1)
    plain = -meta_elbo(model, x, ctx, batch.dist)
    torch.manual_seed(1)
    floored = model.train().loss(batch)["loss"]
    assert float(floored) == pytest.approx(float(plain + 4 * 5.0 - kl_dim.sum()), rel=1e-5)
    grads = torch.autograd.grad(floored, model.head[-1].weight)[0]
    assert torch.isfinite(grads).all()
    torch.manual_seed(1)
    assert float(model.eval().loss(batch)["loss"]) == pytest.approx(float(plain), rel=1e-6)  # validation: the true bound
