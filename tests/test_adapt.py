"""MetaVAE generation and likelihood for unseen distributions: `adapt` fits a decoder with the
encoder frozen; `log_prob` and `sample` then work for it, and it is saved with the model."""
import math

import pytest
import torch

import metavae
from metavae.distributions import Gaussian
from metavae.models import build_mlp_metavae


def _model(n_decoders=3, z_dim=2):
    torch.manual_seed(0)
    return build_mlp_metavae((2,), n_decoders, z_dim=z_dim, hidden_widths=(16,), summary_widths=(16,), likelihood=Gaussian(0.1))


def _unseen(n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * 0.3 + torch.tensor([4.0, -3.0])


def test_adapt_fits_a_new_decoder_and_leaves_the_rest_untouched(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pts = _unseen()
    start = model.adapt(pts, steps=0)  # the nearest training decoder, copied
    d = model.adapt(pts, steps=300, lr=1e-2)
    assert (start, d, model.n_decoders) == (3, 4, 5)
    after = model.state_dict()
    for k, v in before.items():  # the encoder and the training decoders are unchanged
        assert torch.equal(v, after[k][: v.shape[0]] if k.startswith("decoder") else after[k]), k
    ctx, test = pts[:20], _unseen(100, seed=2)
    assert model.log_prob(test, ctx, dist=d, k=20).mean() > model.log_prob(test, ctx, dist=start, k=20).mean() + 5
    draws = model.sample(2000, dist=d, mean=False, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(draws.mean(0), pts.mean(0), atol=0.15)  # it generates the unseen distribution
    model.save(tmp_path / "m.pt")
    back = metavae.load(tmp_path / "m.pt")
    assert back.n_decoders == 5
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(back.sample(7, dist=d, generator=g()), model.sample(7, dist=d, generator=g()))


def test_log_prob_matches_quadrature_on_a_one_dimensional_latent():
    """log p_k(x) = log int p_k(x|z) N(z; 0, 1) dz by a fine grid; the k=4000 importance-weighted
    estimate is a lower bound in expectation and close to it."""
    model = _model(n_decoders=2, z_dim=1).eval()
    x, ctx = _unseen(5), _unseen(10, seed=3)
    z = torch.linspace(-8, 8, 4001).reshape(1, -1, 1)
    with torch.no_grad():
        params = model.decode(z, torch.tensor([1]))[0]  # (G, 2)
        log_px_z = model.likelihood.log_prob(params.unsqueeze(0), x.unsqueeze(1))  # (n, G)
    log_prior = -0.5 * z.reshape(-1) ** 2 - 0.5 * math.log(2 * math.pi)
    dz = float(z[0, 1, 0] - z[0, 0, 0])
    exact = torch.logsumexp(log_px_z + log_prior, dim=1) + math.log(dz)
    torch.manual_seed(0)
    estimate = model.log_prob(x, ctx, dist=1, k=4000)
    assert torch.all(estimate <= exact + 0.05) and torch.allclose(estimate, exact, atol=0.5)


def test_bad_adapt_and_log_prob_calls_say_what_is_wrong():
    model = _model()
    with pytest.raises(ValueError, match="steps >= 0"):
        model.adapt(_unseen(), steps=-1)
    with pytest.raises(ValueError, match="event shape"):
        model.adapt(torch.randn(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        model.adapt(torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="dist must name a decoder 0..2"):
        model.log_prob(_unseen(4), _unseen(5), dist=3)
    with pytest.raises(ValueError, match="context must be one set"):
        model.log_prob(_unseen(4), None)
    with pytest.raises(ValueError, match="has no context"):
        metavae.build_vae((2,), z_dim=2, hidden_widths=(8,)).adapt(_unseen())


def test_adapt_command_names_the_new_decoder_and_refuses_what_it_cannot(tmp_path, capsys):
    import numpy as np

    from metavae.cli import main
    from metavae.models import build_vhe

    model = _model()
    model.save(tmp_path / "m.pt", distributions=["a", "b", "c"])
    np.save(tmp_path / "new.npy", _unseen(60).numpy())
    args = ["adapt", "--model", str(tmp_path / "m.pt"), "--data", str(tmp_path / "new.npy"), "--steps", "5", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "m2.pt")]) == 0
    assert "fitted decoder 3 for new" in capsys.readouterr().out
    assert metavae.load(tmp_path / "m2.pt").extra["distributions"] == ["a", "b", "c", "new"]
    assert main(["sample", "--model", str(tmp_path / "m2.pt"), "--dist", "new", "-n", "5",
                 "--out", str(tmp_path / "s.npy")]) == 0
    assert main(args[:3] + ["--data", str(tmp_path / "new.npy"), "--name", "b", "--out", str(tmp_path / "x.pt")]) == 2
    assert "already has a distribution named 'b'" in capsys.readouterr().err
    build_vhe((2,), c_dim=2, z_dim=1, hidden=8, decoder_hidden=8).save(tmp_path / "v.pt")
    assert main(["adapt", "--model", str(tmp_path / "v.pt"), "--data", str(tmp_path / "new.npy"),
                 "--out", str(tmp_path / "y.pt")]) == 2
    assert "generates for a context set directly" in capsys.readouterr().err


def test_embed_refines_under_a_named_decoder_and_raises_the_elbo(tmp_path, capsys):
    import numpy as np

    from metavae import objectives
    from metavae.cli import main

    model = _model()
    pts = _unseen(80)
    d = model.adapt(pts, steps=100, lr=1e-2)
    model.save(tmp_path / "m.pt", distributions=["a", "b", "c", "new"])
    np.save(tmp_path / "q.npy", pts[:30].numpy())
    np.save(tmp_path / "c.npy", pts[30:].numpy())
    base = ["embed", "--model", str(tmp_path / "m.pt"), "--query", str(tmp_path / "q.npy"),
            "--context", str(tmp_path / "c.npy")]
    assert main(base + ["--out", str(tmp_path / "z0.npy")]) == 0
    assert main(base + ["--out", str(tmp_path / "z1.npy"), "--refine-steps", "30", "--dist", "new"]) == 0
    z0, z1 = np.load(tmp_path / "z0.npy"), np.load(tmp_path / "z1.npy")
    assert z0.shape == z1.shape == (30, 2) and not np.allclose(z0, z1)
    assert main(base + ["--out", str(tmp_path / "z2.npy"), "--refine-steps", "3"]) == 2
    assert "needs --dist" in capsys.readouterr().err
    # the refined means are nearer the ELBO's optimum: the ELBO at them (variances kept) is higher
    from metavae.refine import refined_encode

    x, ctx = pts[:30].unsqueeze(0), pts[30:]
    with torch.no_grad():
        p0 = model.encode(x, ctx)
    p1 = refined_encode(model, x, ctx, torch.tensor([d]), steps=30)
    torch.manual_seed(0)
    e0 = objectives.elbo_of(model.latent, p0, lambda z: objectives.decoder_log_lik(model, x, z, torch.tensor([d])), 64)
    torch.manual_seed(0)
    e1 = objectives.elbo_of(model.latent, p1, lambda z: objectives.decoder_log_lik(model, x, z, torch.tensor([d])), 64)
    assert float(e1.mean()) > float(e0.mean())
