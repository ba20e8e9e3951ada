"""Inclined-plane simulator and its exact Bayes posterior (docs/reproduction.md §9)."""

import math

import pytest
import torch

from metavae.paper.data import physics as P


def reference_simulate(mu, length, phi, dt=0.005):
    """Literal scalar copy of the reference loop (Pyro's inclined_plane.py), without noise."""
    acceleration = P.G * math.sin(phi) - P.G * math.cos(phi) * mu
    if acceleration <= 0.0:
        return 1.0e5
    T = velocity = displacement = 0.0
    while displacement < length:
        displacement += velocity * dt
        velocity += acceleration * dt
        T += dt
    return T


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- descent time
def test_hand_computed_descent_time():
    # L=2, A=30, mu=0: a = 4.9; need 4.9 * 0.005^2 * n(n-1)/2 >= 2, i.e. n(n-1) >= 32653.06.
    # 181*180 = 32580 is short, 182*181 = 32942 reaches: 182 steps, T = 0.91 s.
    assert P.acceleration(30, 0.0).item() == pytest.approx(4.9)
    assert P.descent_steps(2, 30, 0.0).item() == 182
    assert P.descent_time(2, 30, 0.0).item() == pytest.approx(0.91, abs=1e-12)
    assert reference_simulate(0.0, 2, math.pi / 6) == pytest.approx(0.91, abs=1e-9)
    # The continuous answer sqrt(2L/a) = 0.9035 is about one dt shorter.
    gap = 0.91 - math.sqrt(2 * 2 / 4.9)
    assert 0 < gap < 2 * P.DT


@pytest.mark.parametrize("L,A,mu", [(1, 5, 0.01), (10, 45, 0.5), (19, 80, 0.99), (7, 33, 0.3)])
def test_closed_form_matches_reference_loop(L, A, mu):
    ref = reference_simulate(mu, L, math.radians(A))
    assert P.descent_time(L, A, mu).item() == pytest.approx(ref, abs=1e-9)
    assert P.descent_time_stepwise(L, A, mu).item() == pytest.approx(ref, abs=1e-9)


def test_stepwise_equals_closed_form_on_random_planes():
    g = gen(1)
    n = 1000
    L = torch.randint(1, 20, (n,), generator=g).double() + torch.rand(n, generator=g, dtype=torch.float64)
    A = 5 + 75 * torch.rand(n, generator=g, dtype=torch.float64)
    tan = torch.tan(torch.deg2rad(A))
    # Half of the runs slide (mu below 0.9 tan A keeps the loop short); the other half are censored.
    mu = torch.rand(n, generator=g, dtype=torch.float64) * torch.where(torch.arange(n) % 2 == 0, 0.9 * tan, 1.0)
    mu = torch.where(torch.arange(n) % 2 == 1, tan + (1 - tan).clamp(min=0.01) * mu, mu)
    stepwise = P.descent_time_stepwise(L, A, mu)
    closed = P.descent_time(L, A, mu)
    assert torch.allclose(stepwise, closed, rtol=0, atol=1e-9)
    steps = P.descent_steps(L, A, mu)
    assert torch.equal(steps > 0, mu < tan)
    assert torch.allclose(steps.double() * P.DT, closed.where(steps > 0, torch.zeros_like(closed)), atol=1e-12)


def test_censoring_when_friction_exceeds_tan_angle():
    A = 20.0
    tan = math.tan(math.radians(A))
    mu = torch.tensor([0.5 * tan, 0.999 * tan, 1.001 * tan, 0.9, 1.0], dtype=torch.float64)
    T = P.descent_time(6, A, mu)
    assert torch.equal(T == P.CENSORED_TIME, torch.tensor([False, False, True, True, True]))
    assert torch.equal(P.descent_time_stepwise(6, A, mu) == P.CENSORED_TIME, T == P.CENSORED_TIME)


def test_descent_time_broadcasts_and_is_fast():
    L = torch.tensor([[2.0], [10.0]])
    mu = torch.rand(100_000, generator=gen(2))
    T = P.descent_time(L, 45, mu)
    assert T.shape == (2, 100_000)
    assert bool((T[1] >= T[0]).all())  # a longer plane never takes fewer steps


@pytest.mark.parametrize("L,A", [(-1, 30), (0, 30), (5, 0), (5, 90), (5, -10), (5, 120)])
def test_bad_planes_raise(L, A):
    with pytest.raises(ValueError):
        P.descent_time(L, A, 0.1)
    with pytest.raises(ValueError):
        P.simulate(L, A, 10)


def test_bad_counts_and_shapes_raise():
    with pytest.raises(ValueError, match="positive int"):
        P.simulate(5, 30, 0)
    with pytest.raises(ValueError, match="scalar"):
        P.simulate([5, 6], 30, 10)
    with pytest.raises(ValueError, match="pairs"):
        P.simulate_many([(1, 2, 3)], 10)
    with pytest.raises(ValueError, match="scalar"):
        P.posterior_mean(torch.ones(3), [5, 6], 30)


# ----------------------------------------------------------------------------- simulation
def test_simulate_shapes_censoring_and_noise():
    x, mu, cens = P.simulate(10, 20, 20_000, gen(3))
    assert x.shape == mu.shape == cens.shape == (20_000,)
    assert x.dtype == mu.dtype == torch.float32 and cens.dtype == torch.bool
    assert float(mu.min()) >= P.MU_LOW and float(mu.max()) <= P.MU_HIGH
    tan = math.tan(math.radians(20))
    assert bool((x[cens] == P.CENSORED_TIME).all()) and bool((x[~cens] < P.CENSORED_TIME / 2).all())
    # Censored fraction = P(mu >= tan 20) = 0.636 / 0.9999.
    assert float(cens.double().mean()) == pytest.approx((1 - tan) / (1 - P.MU_LOW), abs=0.015)
    # Noise is N(0, 0.02^2) around the step-count time.
    x64, mu64, c64 = P.simulate(10, 20, 20_000, gen(3), dtype=torch.float64)
    assert torch.equal(c64, cens) and torch.equal(c64, mu64 >= tan)
    resid = x64[~c64] - P.descent_time(10, 20, mu64[~c64])
    assert float(resid.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(resid.std()) == pytest.approx(P.NOISE_STD, rel=0.05)


def test_simulate_is_reproducible():
    a = P.simulate(4, 40, 500, gen(7))
    b = P.simulate(4, 40, 500, gen(7))
    c = P.simulate(4, 40, 500, gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_simulate_many_and_grids():
    assert len(P.TRAIN_SIMULATORS) == 25 and len(P.TEST_SIMULATORS) == 304
    assert P.TEST_SIMULATORS[0] == (1, 5) and P.TEST_SIMULATORS[-1] == (19, 80)
    assert set(P.TRAIN_SIMULATORS) <= set(P.TEST_SIMULATORS)
    assert P.BASELINE_SIMULATOR == (10, 45)
    x, mu, cens = P.simulate_many(P.TRAIN_SIMULATORS, 100, gen(4))
    assert x.shape == mu.shape == cens.shape == (25, 100)
    for k in (0, 13, 24):
        L, A = P.TRAIN_SIMULATORS[k]
        T = P.descent_time(L, A, mu[k].double())
        assert torch.equal(cens[k], T == P.CENSORED_TIME)
        assert torch.allclose(x[k][~cens[k]].double(), T[~cens[k]], atol=0.15)


# ----------------------------------------------------------------------------- Bayes posterior
def brute_force_posterior_mean(x, L, A, grid_size=400_001):
    """Riemann sums of mu * likelihood over a fine mu-grid (slow reference; x is a 1-D tensor)."""
    grid = torch.linspace(P.MU_LOW, P.MU_HIGH, grid_size, dtype=torch.float64)
    T = P.descent_time(L, A, grid)
    slides = T != P.CENSORED_TIME
    out = []
    for xi in x.tolist():
        if xi == P.CENSORED_TIME:
            w = (~slides).double()
        else:
            w = torch.where(slides, torch.exp(-0.5 * ((xi - T) / P.NOISE_STD) ** 2), 0.0)
        out.append(float((w * grid).sum() / w.sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("L,A", [(4, 30), (1, 70)])
def test_posterior_mean_matches_grid_integration(L, A):
    x, _, _ = P.simulate(L, A, 4, gen(5), dtype=torch.float64)
    if math.tan(math.radians(A)) < 1:  # censoring is possible
        x = torch.cat([x, torch.tensor([P.CENSORED_TIME])])
    assert torch.allclose(P.posterior_mean(x, L, A), brute_force_posterior_mean(x, L, A), rtol=0, atol=1e-5)


def test_posterior_of_censored_observation_is_midpoint():
    tan = math.tan(math.radians(20))
    mean, var = P.posterior_moments(torch.tensor([P.CENSORED_TIME]), 10, 20)
    assert mean.item() == pytest.approx((tan + 1) / 2)
    assert var.item() == pytest.approx((1 - tan) ** 2 / 12)


def test_posterior_mean_matches_monte_carlo_conditional_mean():
    """ABC check: E[mu | x in window] = E[E[mu | x] | x in window] for any window of x."""
    L, A = 4, 30
    x, mu, cens = P.simulate(L, A, 100_000, gen(6), dtype=torch.float64)
    m, var = P.posterior_moments(x, L, A)
    assert bool((var >= 0).all()) and bool(((m >= P.MU_LOW) & (m <= P.MU_HIGH)).all())
    resid = mu - m
    windows = [(1.25, 1.27), (1.6, 1.62), (2.2, 2.3), (3.0, 3.5), (5.0, 10.0), (P.CENSORED_TIME, P.CENSORED_TIME)]
    for lo, hi in windows:
        inside = (x >= lo) & (x <= hi)
        count = int(inside.sum())
        assert count > 200
        se = float(resid[inside].std()) / math.sqrt(count)
        assert abs(float(resid[inside].mean())) < 4 * se + 1e-6
    # Narrow window around one observation value: conditional mean of mu ~ posterior mean there.
    x0 = 1.6
    near = (x - x0).abs() < 0.002
    assert float(mu[near].mean()) == pytest.approx(P.posterior_mean(torch.tensor([x0]), L, A).item(), abs=2e-3)
    # The posterior variance is calibrated: E[(mu - m)^2] = E[Var(mu | x)].
    assert float((resid**2).mean()) == pytest.approx(float(var.mean()), rel=0.05)


def test_bayes_mse_respects_censoring_floor():
    floor = P.censored_mse_floor(20)
    tan = math.tan(math.radians(20))
    assert floor == pytest.approx((1 - tan) / (1 - P.MU_LOW) * (1 - tan) ** 2 / 12)
    assert floor == pytest.approx(0.64 * (1 - 0.364) ** 2 / 12, rel=0.01)
    mse = P.bayes_mse(10, 20, 20_000, gen(9))
    assert 0.95 * floor <= mse <= 1.1 * floor
    assert P.bayes_mse(10, 45, 5_000, gen(10)) < 1e-3
    assert P.censored_mse_floor(60) == 0.0
