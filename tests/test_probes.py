"""The batched standardised probe agrees with scikit-learn's one-by-one fits."""
import numpy as np
import pytest
import torch

from metavae import probes


def _problem(rng, n, d, k, signal, scale=1.0, test=300, mix=0.0):
    """Gaussian classes; ``mix`` correlates the features (as embeddings' are), which is what makes
    unpreconditioned L-BFGS slow."""
    mu = rng.normal(size=(k, d)) * signal
    y = rng.integers(0, k, size=n + test)
    x = (mu[y] + rng.normal(size=(n + test, d))) * scale * rng.uniform(0.2, 5.0, size=d) + rng.normal(size=d)
    x = x @ (np.eye(d) + mix * rng.normal(size=(d, d)))
    return x[:n], y[:n], x[n:], y[n:]


def test_batched_probe_matches_sklearn():
    rng = np.random.default_rng(0)
    cases = [_problem(rng, 300, 8, 5, 0.4), _problem(rng, 450, 8, 5, 1.5, scale=0.003),  # unequal sizes, tiny scale
             _problem(rng, 150, 30, 4, 0.3), _problem(rng, 600, 12, 6, 0.8),  # another d: its own chunk
             _problem(rng, 240, 8, 2, 0.5), _problem(np.random.default_rng(5), 300, 6, 5, 2.0, mix=2.0)]
    ours = probes.standardised_probes(cases)  # the last two: binomial; correlated features
    # scikit-learn converged: with the old probe's max_iter=300 it can stop short of the optimum
    ref = [probes.sklearn_standardised_probe(*c, max_iter=10000, tol=1e-8) for c in cases]
    assert [c for c, _ in ours] == [c for c, _ in ref]
    assert len({c for c, _ in ref}) > 1  # the cases exercise the choice of C, not one C everywhere
    for (_, a), (_, b) in zip(ours, ref):
        assert abs(a - b) <= 0.002


def test_chunking_gives_the_same_answer(monkeypatch):
    rng = np.random.default_rng(1)
    cases = [_problem(rng, 200, 6, 3, 0.7) for _ in range(3)]
    together = probes.standardised_probes(cases)
    monkeypatch.setattr(probes, "MEMORY", 1)  # one problem per chunk
    assert probes.standardised_probes(cases) == together


def test_batched_lbfgs_solves_each_row_independently():
    A = torch.tensor([[1.0, 10.0], [100.0, 1.0], [3.0, 3.0]], dtype=torch.float64)  # three quadratics
    target = torch.tensor([[1.0, -2.0], [0.5, 4.0], [-1.0, 0.0]], dtype=torch.float64)

    def fg(w, rows):
        diff = w - target[rows]
        return 0.5 * (A[rows] * diff ** 2).sum(1), A[rows] * diff, (A[rows] * diff).abs().amax(1)

    w = probes.batched_lbfgs(fg, torch.zeros(3, 2, dtype=torch.float64), tol=1e-10)
    assert torch.allclose(w, target, atol=1e-8)


def test_one_class_is_refused():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="two classes"):
        probes.standardised_probes([(x, np.zeros(10), x, np.zeros(10))])
