"""Distribution families of the sufficient-statistics demo (docs/reproduction.md §8)."""

import math

import pytest
import torch
from torch import distributions as D

from metavae.paper.data import exponential_families as E


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Parameter pairs per family: both ends of the sweep and a middle value.
PARAMS = {
    "gaussian": [[-5.0, 0.3], [4.0, -9.5]],
    "lognormal": [[-2.0, 0.5], [1.9, -3.5]],
    "exponential": [[0.5, 1.4], [3.0, 5.0]],
    "weibull": [[0.5, 1.0], [2.5, 5.0]],
    "laplace": [[0.5, 1.7], [3.0, 5.0]],
    "beta": [[0.5, 1.0], [2.0, 5.0]],
}


def test_registry():
    assert set(E.FAMILIES) == set(E.TRAIN_FAMILIES) | set(E.UNSEEN_FAMILIES)
    assert all(E.FAMILIES[f].trainable for f in E.TRAIN_FAMILIES)
    assert not any(E.FAMILIES[f].trainable for f in E.UNSEEN_FAMILIES)
    assert E.FAMILIES["gaussian"].sweep == (-10.0, 10.0) and E.FAMILIES["gaussian"].train_range == (-5.0, 5.0)
    assert E.FAMILIES["lognormal"].sweep == (-4.0, 4.0) and E.FAMILIES["lognormal"].train_range == (-2.0, 2.0)
    assert E.FAMILIES["exponential"].train_range == (0.5, 3.0)
    assert all(E.FAMILIES[f].sweep == (0.5, 5.0) for f in E.UNSEEN_FAMILIES)
    assert E.get_family("beta") is E.FAMILIES["beta"]
    with pytest.raises(ValueError, match="unknown family"):
        E.get_family("poisson")


@pytest.mark.parametrize("name", sorted(E.FAMILIES))
def test_sample_moments_match_closed_form(name):
    fam = E.FAMILIES[name]
    params = torch.tensor(PARAMS[name], dtype=torch.float64)
    n = 40_000
    x = fam.sample(params, n, gen(1), dtype=torch.float64)
    assert x.shape == (2, n, 2)
    mean, var = fam.mean(params), fam.variance(params)
    emp_mean = x.mean(1)
    dev2 = (x - emp_mean[:, None]) ** 2
    emp_var = dev2.mean(1)
    se_mean = torch.sqrt(var / n)
    se_var = dev2.std(1) / math.sqrt(n)  # plug-in SE of the variance estimate (uses the 4th moment)
    assert bool(((emp_mean - mean).abs() < 5 * se_mean).all()), (emp_mean, mean)
    assert bool(((emp_var - var).abs() < 5 * se_var).all()), (emp_var, var)


@pytest.mark.parametrize("name", ["exponential", "weibull", "lognormal", "beta"])
def test_sample_support(name):
    x = E.FAMILIES[name].sample(torch.tensor(PARAMS[name]), 5000, gen(2))
    assert bool((x >= 0).all()) and bool(torch.isfinite(x).all())
    if name == "beta":
        assert bool((x <= 1).all())


def test_samples_match_torch_distributions_in_distribution():
    """Kolmogorov-Smirnov distance to torch.distributions' CDF for the families torch has."""
    n = 20_000
    cases = {
        "gaussian": lambda p: D.Normal(p, math.sqrt(0.1)),
        "lognormal": lambda p: D.LogNormal(p, math.sqrt(0.1)),
        "exponential": lambda p: D.Exponential(p),
        "laplace": lambda p: D.Laplace(0.0, p),
        "weibull": lambda p: D.Weibull(1.0, p),
    }
    for name, dist in cases.items():
        p = torch.tensor([[PARAMS[name][0][0], PARAMS[name][1][1]]], dtype=torch.float64)
        x = E.FAMILIES[name].sample(p, n, gen(3), dtype=torch.float64)[0]
        for j in range(2):
            xs = torch.sort(x[:, j]).values
            cdf = dist(p[0, j]).cdf(xs)
            ks = (cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max()
            assert float(ks) < 1.95 / math.sqrt(n), (name, j, float(ks))  # ~0.1% level


def test_beta_third_moment():
    # Beta(a, a): E[x^3] = (a+2)(a+1)a / ((2a+2)(2a+1)2a) pins down more than mean and variance.
    a = 0.5
    x = E.FAMILIES["beta"].sample(torch.tensor([[a, a]]), 100_000, gen(4), dtype=torch.float64)
    m3 = (a + 2) * (a + 1) / ((2 * a + 2) * (2 * a + 1) * 2)
    assert float((x**3).mean()) == pytest.approx(m3, abs=4 * float((x**3).std()) / math.sqrt(2e5))


def test_sampling_is_reproducible_and_float32():
    for name, fam in E.FAMILIES.items():
        p = torch.tensor(PARAMS[name])
        a, b, c = fam.sample(p, 50, gen(5)), fam.sample(p, 50, gen(5)), fam.sample(p, 50, gen(6))
        assert a.dtype == torch.float32 and a.shape == (2, 50, 2)
        assert torch.equal(a, b) and not torch.equal(a, c)
    pa = E.FAMILIES["gaussian"].prior_sample(30, gen(7))
    assert torch.equal(pa, E.FAMILIES["gaussian"].prior_sample(30, gen(7)))


@pytest.mark.parametrize("name", E.TRAIN_FAMILIES)
def test_prior_sample_within_train_range(name):
    fam = E.FAMILIES[name]
    p = fam.prior_sample(2000, gen(8))
    lo, hi = fam.train_range
    assert p.shape == (2000, 2)
    assert float(p.min()) >= lo and float(p.max()) <= hi
    assert float(p.mean()) == pytest.approx((lo + hi) / 2, abs=0.05 * (hi - lo))


def test_prior_sample_for_unseen_family_needs_range():
    with pytest.raises(ValueError, match="not a meta-train family"):
        E.FAMILIES["weibull"].prior_sample(5, gen(9))
    p = E.FAMILIES["weibull"].prior_sample(5, gen(9), low=0.5, high=5.0)
    assert p.shape == (5, 2)


def test_bad_params_raise():
    fam = E.FAMILIES["exponential"]
    with pytest.raises(ValueError, match="shape"):
        fam.sample(torch.ones(3), 10)
    with pytest.raises(ValueError, match="shape"):
        fam.sample(torch.ones(3, 3), 10)
    with pytest.raises(ValueError, match="rate"):
        fam.sample(torch.tensor([[1.0, -1.0]]), 10)
    with pytest.raises(ValueError, match="mean"):
        E.FAMILIES["gaussian"].mean(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="positive int"):
        fam.sample(torch.ones(1, 2), 0)
    with pytest.raises(ValueError, match="no decoder"):
        E.FAMILIES["laplace"].log_prob(torch.zeros(2), torch.zeros(2))


# ----------------------------------------------------------------------------- decoder densities
TORCH_DECODER = {
    "gaussian": lambda z: D.Normal(z, math.sqrt(0.1)),
    "lognormal": lambda z: D.LogNormal(z, math.sqrt(0.1)),
    "exponential": lambda z: D.Exponential(torch.exp(z)),
}


@pytest.mark.parametrize("name", E.TRAIN_FAMILIES)
def test_log_prob_matches_torch_distributions(name):
    fam = E.FAMILIES[name]
    z = fam.to_latent(torch.tensor(PARAMS[name], dtype=torch.float64))
    x = fam.sample(fam.from_latent(z), 100, gen(10), dtype=torch.float64)
    ours = fam.log_prob(x, z[:, None, :])
    ref = TORCH_DECODER[name](z[:, None, :]).log_prob(x)
    assert torch.allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("name,z", [("gaussian", 1.3), ("lognormal", 0.4), ("exponential", math.log(2.0))])
def test_log_prob_integrates_to_one(name, z):
    grid = torch.linspace(-20.0, 20.0, 400_001, dtype=torch.float64)
    p = torch.exp(E.FAMILIES[name].log_prob(grid, torch.tensor(z, dtype=torch.float64)))
    assert float(torch.trapezoid(p, grid)) == pytest.approx(1.0, abs=1e-3)


def test_log_prob_support_and_latent_maps():
    exp, logn = E.FAMILIES["exponential"], E.FAMILIES["lognormal"]
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert exp.log_prob(x, torch.tensor(0.0))[0] == -math.inf
    assert logn.log_prob(x, torch.tensor(0.0))[:2].eq(-math.inf).all()
    rate = torch.tensor([[0.7, 2.5]])
    assert torch.allclose(exp.from_latent(exp.to_latent(rate)), rate)
    g = E.FAMILIES["gaussian"]
    assert torch.equal(g.to_latent(rate), rate)
    # Correct scale: the density at the mean is 1 / sqrt(2 pi 0.1), not the reference's 0.5 * var.
    at_mean = float(g.log_prob(torch.tensor(0.0), torch.tensor(0.0)))
    assert at_mean == pytest.approx(-0.5 * math.log(2 * math.pi * 0.1))


# ----------------------------------------------------------------------------- random vectors
def test_make_random_vectors_groups_draws():
    samples = torch.arange(3 * 45 * 2, dtype=torch.float32).reshape(3, 45, 2)
    v = E.make_random_vectors(samples)
    assert v.shape == (3, 2, 20, 2)
    assert torch.equal(v[1, 1], samples[1, 20:40])
    shuffled = E.make_random_vectors(samples, 20, gen(11))
    assert shuffled.shape == (3, 2, 20, 2)
    # Shuffling keeps draws whole (both coordinates together) and inside their distribution.
    flat = shuffled.reshape(3, 40, 2)
    assert torch.equal(flat[..., 1] - flat[..., 0], torch.ones(3, 40))
    for m in range(3):
        assert set(flat[m, :, 0].tolist()) <= set(samples[m, :, 0].tolist())
    assert torch.equal(shuffled, E.make_random_vectors(samples, 20, gen(11)))


def test_make_random_vectors_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(M, n, 2\)"):
        E.make_random_vectors(torch.zeros(3, 40))
    with pytest.raises(ValueError, match="at least"):
        E.make_random_vectors(torch.zeros(3, 10, 2))
    with pytest.raises(ValueError, match="vector_size"):
        E.make_random_vectors(torch.zeros(3, 40, 2), 0)


def test_sweep_values():
    v = E.FAMILIES["exponential"].sweep_values(10)
    assert v[0] == 0.5 and v[-1] == 5.0 and v.shape == (10,)
