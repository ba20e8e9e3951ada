"""MetaVAE shapes, context handling, embed for unseen distributions, parameter counts, errors."""
import pytest
import torch

from metavae import build_mlp_metavae, build_model, build_vae


def test_reference_parameter_count_k9():
    m = build_mlp_metavae((784,), 9)
    assert sum(p.numel() for p in m.parameters()) == 6_176_976  # docs/reproduction.md §12


def test_embed_is_posterior_mean_and_accepts_shared_or_per_query_context():
    torch.manual_seed(0)
    m = build_mlp_metavae((5,), 3, z_dim=4, hidden_widths=(8,), summary_widths=(8, 8))
    x, D = torch.randn(6, 5), torch.randn(10, 5)
    shared = m.embed(x, D)
    per_query = m.embed(x, D.expand(6, 10, 5))
    assert shared.shape == (6, 4) and torch.allclose(shared, per_query, atol=1e-6)
    assert torch.allclose(shared, m.encode(x, D).chunk(2, -1)[0])
    # the summary is invariant to the order of the context set
    assert torch.allclose(m.embed(x, D[torch.randperm(10)]), shared, atol=1e-5)


def test_decoders_are_batched_and_pick_by_distribution_index():
    torch.manual_seed(0)
    m = build_mlp_metavae((5,), 3, z_dim=4, hidden_widths=(8,), summary_widths=(8, 8))
    z = torch.randn(3, 7, 4)
    all_at_once = m.decode(z, torch.arange(3))
    for k in range(3):
        alone = m.decode(z[k : k + 1], torch.tensor([k]))
        assert torch.allclose(alone[0], all_at_once[k], atol=1e-6)


def test_vae_uses_no_context_and_one_shared_decoder():
    m = build_vae((5,), z_dim=3, hidden_widths=(8,))
    assert not m.uses_context and m.n_decoders == 1
    out = m.decode(torch.randn(4, 2, 3), torch.arange(4))  # broadcast to 4 distributions
    assert out.shape == (4, 2, 5)


def test_build_model_round_trips_config():
    m = build_mlp_metavae((5,), 2, z_dim=3, hidden_widths=(8,), summary_widths=(8, 8), center=True)
    m2 = build_model(m.config)
    m2.load_state_dict(m.state_dict())
    x, D = torch.randn(3, 5), torch.randn(4, 5)
    assert torch.allclose(m.embed(x, D), m2.embed(x, D))


@pytest.mark.parametrize(
    "x,ctx,match",
    [
        (torch.randn(4, 6), torch.randn(4, 3, 5), "event shape \\(5,\\)"),
        (torch.randn(4, 5), torch.randn(4, 3, 6), "context elements must have the queries' event shape"),
        (torch.randn(4, 5), torch.randn(3, 2, 5), "does not match queries"),
        (torch.randn(4, 5), None, "needs a context set"),
        (torch.randn(4, 5), torch.randn(4, 0, 5), "at least one element"),
    ],
)
def test_bad_shapes_fail_clearly(x, ctx, match):
    m = build_mlp_metavae((5,), 2, z_dim=3, hidden_widths=(8,), summary_widths=(8, 8))
    with pytest.raises(ValueError, match=match):
        m.embed(x, ctx)


def test_too_few_decoders_fail_clearly():
    m = build_mlp_metavae((5,), 2, z_dim=3, hidden_widths=(8,), summary_widths=(8, 8))
    with pytest.raises(ValueError, match="3 distributions but the model has 2 decoders"):
        m.decode(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="has no decoder"):
        m.decode(torch.randn(1, 2, 3), torch.tensor([5]))


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="unknown latent"):
        build_mlp_metavae((5,), 2, latent="poisson")
    with pytest.raises(ValueError, match="n_decoders"):
        build_mlp_metavae((5,), 0)


def test_pooled_context_gives_the_same_posterior_as_explicit_sets():
    from metavae import MetaDataset

    torch.manual_seed(0)
    m = build_mlp_metavae((5,), 2, z_dim=3, hidden_widths=(8,), summary_widths=(8, 8))
    ds = MetaDataset([torch.randn(100, 5), torch.randn(100, 5)], val_fraction=0, test_fraction=0)
    b = ds.sample(7, 4, generator=torch.Generator().manual_seed(1), context_pool=16)
    assert torch.allclose(m.encode(b.x, b.context), m.encode(b.x, b.context.materialize()), atol=1e-5)
