"""The baselines (NS, VHE, VHE+VampPrior, VAE) and the conv MetaVAE: parameter counts, objectives
term by term against torch.distributions, the VampPrior density, the 1/N weight, deterministic
embeddings, sets of one element, the batched conv decoder bank, and training on rotated MNIST."""
from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from metavae.data.meta import Batch, MetaDataset
from metavae.models import MODEL_NAMES, build_model, make_model
from metavae.models.conv_metavae import ConvDecoderBank
from metavae.distributions import gaussian_kl
from metavae.models.hierarchical import mixture_log_prob
from metavae.nets.conv import ConvEncoder, FCResBlock
from metavae.training import TrainConfig, Trainer

FLAT = (784,)
IMG = (28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """Small-tensor steps gain nothing from a second thread, and on a shared 2-core machine two
    spinning threads per process multiply the wall time; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def small(name: str, arch: str) -> dict:
    """Small widths for fast tests (the layer *structure* is the paper's)."""
    if name in ("metavae", "vae", "metavae-nocontext"):
        kw = dict(z_dim=8, hidden_widths=(32, 32), summary_widths=(32, 32)) if arch == "mlp" else dict(z_dim=8, hidden=32,
                                                                                         summary_widths=(32, 32))
    else:
        kw = dict(c_dim=12, z_dim=8, hidden=32)
        if arch == "mlp":
            kw["decoder_hidden"] = 64
        if name == "vhe-vampprior":
            kw.update(n_components=7, n_pseudo=3)
    if arch == "conv":
        kw["channels"] = (4, 8, 8)
    return kw


def small_model(name: str, arch: str, K: int = 3, **extra):
    if name == "metavae-nocontext" and arch == "conv":
        pytest.skip("metavae-nocontext is built for the MLP architecture only (make_model refuses conv)")
    event = FLAT if arch == "mlp" else IMG
    return make_model(name, arch, event, K, **{**small(name, arch), **extra})


def random_batch(model, K=3, B=4, N=5, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ev = model.event_shape
    x = torch.rand(K, B, *ev, generator=g)
    ctx = torch.rand(K, 1 if shared else B, N, *ev, generator=g) if model.uses_context else None
    return Batch(x, ctx, None, torch.arange(K))


# --- parameter counts (docs/reproduction.md §12) ----------------------------------------------------------
def test_mlp_parameter_counts_match_protocol():
    with torch.device("meta"):
        counts = {name: n_params(make_model(name, "mlp", FLAT, 9)) for name in MODEL_NAMES}
    assert counts["metavae"] == 6_176_976  # docs/reproduction.md §12, K = 9
    assert counts["vhe"] == 8_284_104
    assert counts["ns"] == 8_284_104  # same as VHE
    assert counts["vhe-vampprior"] == 12_204_104  # + 500 * 10 * 784
    assert counts["vae"] == 997_664  # ours: MetaVAE's head without the summary input, one decoder


def test_conv_parameter_counts_match_protocol():
    with torch.device("meta"):
        m9 = make_model("metavae", "conv", (1, 32, 32), 9)
        # docs/reproduction.md §12 ConvMetaVAE: encoder 1,921,536; summary 18,580,512; head 5,717,680; decoder 3,900,065
        assert n_params(m9.query_encoder) == 1_921_536
        assert n_params(m9.summary) - n_params(m9.query_encoder) == 18_580_512  # encoder shared, counted once
        assert n_params(m9.head) == 5_717_680
        assert n_params(m9.decoder) == 9 * 3_900_065
        assert n_params(m9) == 61_320_313  # docs/reproduction.md §12: K=9 61,320,313
        assert n_params(make_model("metavae", "conv", (1, 32, 32), 3)) == 37_919_923  # docs/reproduction.md §12: K=3
        assert n_params(make_model("metavae", "conv", (1, 32, 32), 5)) == 45_720_053  # docs/reproduction.md §12: K=5
        vhe = n_params(make_model("vhe", "conv", (1, 32, 32), 3))
        assert vhe == 16_577_161  # docs/reproduction.md §12: VHE-conv ~16,577,161 (GroupNorm/LayerNorm = BN's affine count)
        assert n_params(make_model("ns", "conv", (1, 32, 32), 3)) == vhe + 6  # docs/reproduction.md §12: NS-conv = VHE-conv + 6
        vp = make_model("vhe-vampprior", "conv", (1, 32, 32), 3)
        assert n_params(vp) == vhe + 5_120_000  # docs/reproduction.md §12: 500 components (+5.12M, the paper's "5.1M")
        vp10 = make_model("vhe-vampprior", "conv", (1, 32, 32), 3, n_components=10)
        assert n_params(vp10) == vhe + 102_400  # docs/reproduction.md §12: the reference's silent 10 components
        # ours, no reference counterpart: conv VAE = encoder + fc_h + FCResBlock(400, 6) + out + one decoder
        assert n_params(make_model("vae", "conv", (1, 32, 32), 3)) == 8_459_681
        # 28x28 events: the same trunk (28 -> 4x4 features; decoder output centre-cropped)
        assert n_params(make_model("metavae", "conv", IMG, 9)) == 61_320_313


# --- densities and objectives against torch.distributions ------------------------------------
def _normal(params):
    mu, logvar = params.chunk(2, dim=-1)
    return td.Independent(td.Normal(mu, torch.exp(0.5 * logvar)), 1)


def test_gaussian_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(5, 6, 2 * 7, generator=g), torch.randn(5, 6, 2 * 7, generator=g)
    ref = td.kl_divergence(_normal(q), _normal(p))
    torch.testing.assert_close(gaussian_kl(*q.chunk(2, -1), *p.chunk(2, -1)), ref)
    std = td.Independent(td.Normal(torch.zeros(7), torch.ones(7)), 1)
    torch.testing.assert_close(gaussian_kl(*q.chunk(2, -1)), td.kl_divergence(_normal(q), std))


def test_mixture_density_against_brute_force_logsumexp():
    g = torch.Generator().manual_seed(2)
    M, D = 50, 30
    mu = torch.randn(M, D, generator=g)
    logvar = torch.empty(M, D).uniform_(-9.0, 1.0, generator=g)  # sigma down to 0.011: cancellation-prone
    c = torch.cat([mu[:7] + 0.01 * torch.randn(7, D, generator=g), torch.randn(11, D, generator=g)]).reshape(3, 6, D)
    ours = mixture_log_prob(c, mu, logvar)
    cd, mud, lvd = c.double().unsqueeze(-2), mu.double(), logvar.double()
    comp = -0.5 * ((cd - mud) ** 2 / lvd.exp() + lvd + math.log(2 * math.pi)).sum(-1)
    brute = torch.logsumexp(comp, dim=-1) - math.log(M)
    torch.testing.assert_close(ours.double(), brute, rtol=1e-6, atol=1e-4)
    mix = td.MixtureSameFamily(td.Categorical(logits=torch.zeros(M)),
                               td.Independent(td.Normal(mu, torch.exp(0.5 * logvar)), 1))
    torch.testing.assert_close(ours, mix.log_prob(c), rtol=1e-4, atol=1e-2)


def test_vampprior_kl_has_correct_constants():
    """With every component equal to q(c|D) the single-sample KL estimate is exactly 0 (the
    reference's constant from a size-1 axis would give about -274.8 at c_dim = 300)."""
    model = small_model("vhe-vampprior", "mlp", c_dim=300)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 600, generator=g) * 0.5
    model.prior_components = lambda: q[:1].expand(9, -1)  # 9 identical components = q of row 0
    eps = torch.randn(4, 300, generator=g)
    c_mu, c_logvar = q[:1].chunk(2, -1)
    c = c_mu + torch.exp(0.5 * c_logvar) * eps
    kl = model.context_kl(c_mu, c_logvar, c, eps)
    torch.testing.assert_close(kl, torch.zeros(4), atol=2e-3, rtol=0)


def _expected_loss(model, batch, seed):
    """The objective recomputed from the model's networks with torch.distributions, drawing the
    same noise in the same order as the model (c first, then z)."""
    x, ctx = batch.x, batch.context
    K, B = x.shape[:2]
    torch.manual_seed(seed)
    ns = type(model).__name__ == "NeuralStatistician"
    hx = model.element_features(x)
    cp = model.statistic(hx).unsqueeze(1) if ns else model.context_params(ctx)
    qc = _normal(cp)
    eps_c = torch.randn(K, 1 if ns else B, model.c_dim)
    c = qc.base_dist.loc + qc.base_dist.scale * eps_c
    qz = _normal(model.inference(hx, c))
    z = qz.base_dist.loc + qz.base_dist.scale * torch.randn(K, B, model.z_dim)
    pz = _normal(model.latent_prior(c))
    lik = td.Independent(td.Bernoulli(logits=model.obs_decoder(z, c), validate_args=False), 1)
    rec = lik.log_prob(x.flatten(2))
    kl_z = td.kl_divergence(qz, pz)
    if model.vampprior is None:
        kl_c = td.kl_divergence(qc, td.Independent(td.Normal(torch.zeros(model.c_dim), 1.0), 1))
    else:
        comp = model.prior_components()
        mix = td.MixtureSameFamily(td.Categorical(logits=torch.zeros(len(comp))), _normal(comp))
        kl_c = qc.log_prob(c) - mix.log_prob(c)
    if ns:
        return ((-rec + kl_z).mean(1) + kl_c.reshape(K) / B).mean()  # per-element set ELBO
    return (-rec + kl_z + kl_c.expand(K, B) / ctx.shape[2]).mean()  # Eq. 13, 1/N


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", ["ns", "vhe", "vhe-vampprior"])
def test_objective_term_by_term_against_torch_distributions(name, arch):
    torch.manual_seed(0)
    model = small_model(name, arch)
    for shared in (False, True):
        batch = random_batch(model, shared=shared)
        torch.manual_seed(11)
        out = model.loss(batch)
        expected = _expected_loss(model, batch, 11)
        torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-3)
        w = out["kl_c_weight"]
        assert w == (1 / batch.x.shape[1] if name == "ns" else 1 / batch.context.shape[2])
        torch.testing.assert_close(out.loss.detach(), out["nll"] + out["kl_z"] + w * out["kl_c"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["vhe", "vhe-vampprior"])
def test_context_kl_weight_is_one_over_n(name):
    """Duplicating every context set leaves q(c|D), the samples and every term unchanged but
    doubles N: the loss changes by exactly KL_c (1/5 - 1/10)."""
    torch.manual_seed(0)
    model = small_model(name, "mlp").double()  # float64: the losses are ~1e4 at init, their difference ~1
    b5 = random_batch(model, N=5)
    b5 = Batch(b5.x.double(), b5.context.double(), None, b5.dist)
    b10 = Batch(b5.x, torch.cat([b5.context, b5.context], dim=2), None, b5.dist)
    torch.manual_seed(5)
    o5 = model.loss(b5)
    torch.manual_seed(5)
    o10 = model.loss(b10)
    torch.testing.assert_close(o5["kl_c"], o10["kl_c"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(o5.loss - o10.loss, o5["kl_c"] * (1 / 5 - 1 / 10), rtol=1e-9, atol=1e-8)
    assert float(o5["kl_c"]) > 1.0  # the test has teeth: the weight moves the loss
    model.context_kl_weight = 1.0  # the reference's objective: N no longer matters
    torch.manual_seed(5)
    r5 = model.loss(b5)
    torch.manual_seed(5)
    r10 = model.loss(b10)
    torch.testing.assert_close(r5.loss, r10.loss, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("name,arch", [("vhe", "mlp"), ("vhe-vampprior", "conv")])
def test_vhe_pooled_context_gives_the_loss_of_explicit_sets(name, arch):
    """With a `PooledContext` the VHE embeds each pool point once; the loss (same noise) equals the
    loss on the materialised sets, N included in the 1/N weight."""
    from metavae.data.meta import PooledContext

    torch.manual_seed(0)
    model = small_model(name, arch).double()
    K, B, N, P = 3, 4, 5, 9
    x = torch.rand(K, B, *model.event_shape, dtype=torch.float64)
    pool = torch.rand(K, P, *model.event_shape, dtype=torch.float64)
    index = torch.rand(K, B, P).argsort(-1)[..., :N]
    pooled = Batch(x, PooledContext(pool, index), None, torch.arange(K))
    plain = Batch(x, pooled.context.materialize(), None, torch.arange(K))
    torch.manual_seed(3)
    a = model.loss(pooled)
    torch.manual_seed(3)
    b = model.loss(plain)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-9, atol=1e-8)
    assert a["kl_c_weight"] == 1 / N
    with pytest.raises(ValueError, match="context pool index"):
        model.loss(Batch(x[:, :2], pooled.context, None, torch.arange(K)))


def test_ns_kl_weight_is_one_over_set_size():
    torch.manual_seed(0)
    model = small_model("ns", "mlp").double()
    batch = random_batch(model, B=8)
    batch = Batch(batch.x.double(), None, None, batch.dist)
    torch.manual_seed(3)
    out = model.loss(batch)
    assert out["kl_c_weight"] == 1 / 8
    model.set_kl_weight = 1.0  # the reference: B times heavier
    torch.manual_seed(3)
    ref = model.loss(batch)
    torch.testing.assert_close(ref.loss - out.loss, out["kl_c"] * (1 - 1 / 8), rtol=1e-9, atol=1e-8)


# --- embeddings -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", ["ns", "vhe", "vhe-vampprior"])
def test_embeddings_deterministic_and_use_mean_of_c(name, arch):
    model = small_model(name, arch)
    batch = random_batch(model, B=5, N=4, seed=1)
    ctx = batch.context if batch.context is not None else torch.rand(3, 5, 4, *model.event_shape)
    torch.manual_seed(0)
    e1 = model.embed(batch.x, ctx)
    torch.manual_seed(1)
    model.eval()
    e2 = model.embed(batch.x, ctx)
    model.train()
    assert torch.equal(e1, e2) and e1.shape == (3, 5, model.z_dim)
    c_mu = model.context_params(ctx)[..., : model.c_dim]
    torch.testing.assert_close(e1, model.inference(model.element_features(batch.x), c_mu)[..., : model.z_dim])
    # batch-composition independence: one query alone == the same query inside the batch
    torch.testing.assert_close(model.embed(batch.x[1, 2], ctx[1, 2]), e1[1, 2], rtol=1e-5, atol=1e-5)


def test_ns_embeds_the_query_batch_as_one_set_when_no_context():
    model = small_model("ns", "conv")
    x = torch.rand(3, 6, *IMG)
    own = model.embed(x)  # each row's 6 queries are the set
    explicit = model.embed(x, x.unsqueeze(1))  # the same sets given as shared contexts
    torch.testing.assert_close(own, explicit)
    assert model.embed(x[0, 0]).shape == (model.z_dim,)  # one point: a set of one


# --- sets of one element, normalisation -------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", ["metavae", "ns", "vhe", "vhe-vampprior", "vae"])
def test_set_of_one_element_train_and_eval(name, arch):
    model = small_model(name, arch, K=1)
    # NS: the set is the batch -> B = 1; the others: context sets of N = 1
    batch = random_batch(model, K=1, B=1, N=1)
    model.train()
    out = model.loss(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    ctx = batch.context if model.uses_context else None
    e_train = model.embed(batch.x, ctx)
    model.eval()
    e_eval = model.embed(batch.x, ctx)
    with torch.no_grad():
        torch.manual_seed(0)
        l_eval = model.loss(batch).loss
        torch.manual_seed(0)
        model.train()
        l_train = model.loss(batch).loss
    assert torch.equal(e_train, e_eval)  # no BatchNorm: training and evaluation are the same function
    torch.testing.assert_close(l_eval, l_train)


def test_conv_parts_shapes_and_fcresblock():
    enc = ConvEncoder(IMG, channels=(4, 8, 8))
    assert enc(torch.rand(5, *IMG)).shape == (5, 8 * 4 * 4)
    assert ConvEncoder((1, 32, 32), channels=(4, 8, 8))(torch.rand(2, 1, 32, 32)).shape == (2, 128)
    bank32 = ConvDecoderBank(2, z_dim=5, hidden=16, event_shape=(1, 32, 32), channels=(4, 8, 8))
    assert bank32(torch.randn(2, 3, 5)).shape == (2, 3, 1024)
    block = FCResBlock(6, 3)
    x = torch.randn(4, 6)
    torch.testing.assert_close(block(x[:1]), block(x)[:1])  # per-sample normalisation


def test_conv_decoder_bank_matches_members_one_by_one():
    """K decoders packed as grouped convolutions == each member applied alone; ``dist`` picks."""
    torch.manual_seed(0)
    bank = ConvDecoderBank(4, z_dim=5, hidden=16, event_shape=IMG, channels=(4, 8, 8))
    z = torch.randn(3, 2, 6, 5)
    dist = torch.tensor([2, 0, 3])
    out = bank(z, dist)
    assert out.shape == (3, 2, 6, 784)
    for row, k in enumerate(dist.tolist()):
        alone = bank(z[row:row + 1], torch.tensor([k]))
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    full = bank(torch.randn(4, 3, 5))  # every member in order, no dist
    assert full.shape == (4, 3, 784)
    with pytest.raises(ValueError, match="decoders"):
        bank(torch.randn(3, 2, 5))


# --- factory and rebuild ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", list(MODEL_NAMES))
def test_build_model_rebuilds_from_config(name, arch):
    model = small_model(name, arch)
    twin = build_model(model.config)
    assert type(twin) is type(model) and twin.config == model.config
    twin.load_state_dict(model.state_dict())
    batch = random_batch(model)
    ctx = batch.context if model.uses_context else None
    torch.testing.assert_close(twin.embed(batch.x, ctx), model.embed(batch.x, ctx))


def test_make_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown model"):
        make_model("nope", "mlp", FLAT, 3)
    with pytest.raises(ValueError, match="unknown architecture"):
        make_model("vhe", "transformer", FLAT, 3)
    with pytest.raises(ValueError, match="context"):
        small_model("vhe", "mlp").loss(Batch(torch.rand(3, 4, 784), None, None, torch.arange(3)))


# --- training on rotated MNIST through the core Trainer ---------------------------------------
@pytest.fixture(scope="module")
def rotated_mnist(shared_mnist):
    from metavae.paper.data.mnist import load_mnist
    from metavae.paper.data.transforms import apply_transform

    images, _ = load_mnist(shared_mnist, "test", download=False)
    images = images[:600]
    rots = [apply_transform(images, "rotation", a) for a in (-80, 0, 80)]
    return MetaDataset.from_parts(train=[r[:500] for r in rots], val=[r[500:] for r in rots])


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("name", list(MODEL_NAMES))
def test_loss_falls_on_rotated_mnist(rotated_mnist, name, arch):
    data = rotated_mnist
    if arch == "mlp":
        data = MetaDataset.from_parts(train=[t.reshape(-1, 784) for t in _parts(data, "train")],
                                      val=[t.reshape(-1, 784) for t in _parts(data, "val")])
    torch.manual_seed(0)
    model = small_model(name, arch, K=3)
    # conv backward passes are slow on CPU: fewer, smaller steps there (the structure is what is tested)
    steps, B, N = (60, 16, 5) if arch == "mlp" else (30, 8, 3)
    cfg = TrainConfig(epochs=1, batch_size=B, context_size=N, lr=1e-3, steps_per_epoch=steps, val_steps=3, seed=0)
    trainer = Trainer(model, data, cfg, out_dir=None, progress=False)
    before = trainer.validate()
    trainer.fit(resume=False)
    after = trainer.validate()
    print(f"{name}/{arch}: val loss {before:.1f} -> {after:.1f} ({100 * (1 - after / before):.0f}% lower)")
    assert after < 0.9 * before


def _parts(data, part):
    p = data.part(part)
    return [p.data[k, : int(n)] for k, n in enumerate(p.lengths)]
