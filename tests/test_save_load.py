"""One save/load for every model kind: round trips give identical outputs; what cannot be rebuilt
is refused at save time; experiment checkpoints load too."""
import pytest
import torch

import metavae
from metavae.distributions import Gaussian
from metavae.models import KINDS, build_conv_metavae, build_vhe, build_mlp_metavae, build_ns, load
from metavae.paper.models.compiled import build_compiled_inference
from metavae.paper.models.expfam_metavae import build_expfam_metavae


def _mog_model():
    from metavae.paper.mog import MogConfig, build_mog_model as _model

    return _model(torch.randn(3, 40, 2), MogConfig(), True)


def _physics_models():
    from metavae.data.meta import MetaDataset
    from metavae.paper.physics import PhysicsConfig, build_physics_model as _model

    cfg = PhysicsConfig()
    data = MetaDataset.from_parts(train=[torch.stack([torch.rand(30), torch.zeros(30)], -1)])
    return _model(cfg), _model(cfg, data)


CASES = {
    "mlp_metavae": lambda: build_mlp_metavae((6,), 3, z_dim=2, hidden_widths=(8,), summary_widths=(8,), likelihood=Gaussian(None)),
    "mlp_metavae_xavier": lambda: build_mlp_metavae((6,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,), init="xavier"),
    "vae": lambda: metavae.build_vae((6,), z_dim=2, hidden_widths=(8,)),
    "mog": _mog_model,
    "conv_metavae": lambda: build_conv_metavae((28, 28), 2, z_dim=3, hidden=8, channels=(2, 4, 4), res_layers=1,
                                               groups=1),
    "vhe": lambda: build_vhe((6,), c_dim=3, z_dim=2, hidden=8, decoder_hidden=8),
    "vhe_vampprior": lambda: build_vhe((6,), prior="vampprior", c_dim=3, z_dim=2, hidden=8, decoder_hidden=8,
                                               n_components=2, n_pseudo=2),
    "vhe_conv": lambda: build_vhe((28, 28), arch="conv", c_dim=3, z_dim=2, hidden=8, channels=(2, 4, 4),
                                          groups=1),
    "ns": lambda: build_ns((6,), c_dim=3, z_dim=2, hidden=8, decoder_hidden=8),
    "expfam": lambda: build_expfam_metavae(["gaussian", "exponential"], draw_features=(4,), meta_summary=(4,),
                                           hidden_widths=(8,)),
    "physics_metavae": lambda: _physics_models()[0],
    "physics_vae": lambda: _physics_models()[1],
    "compiled_plain": lambda: build_compiled_inference(2, summary_widths=(8,), hidden_widths=(8,)),
}


def _inputs(model):
    ev = model.event_shape
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, *ev, generator=g)
    if len(ev) == 2 and ev[-1] == 2 and ev[0] == 20:  # expfam vectors: positive values keep every family valid
        x = x + 0.1
    ctx = torch.rand(4, 5, *ev, generator=g) + (0.1 if ev[0] == 20 else 0)
    return x, ctx if getattr(model, "uses_context", True) else None


def test_every_kind_is_covered():
    kinds = {f().config["kind"] for f in CASES.values()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    model.save(tmp_path / "m.pt", note="hello")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # the file is tensors and plain data only
    assert raw["format"] == "metavae-model" and raw["metavae_version"] == metavae.__version__
    back = metavae.load(tmp_path / "m.pt")
    assert type(back) is type(model) and back.extra == {"note": "hello"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x, ctx = _inputs(model)
    assert torch.equal(model.embed(x, ctx), back.embed(x, ctx))


@pytest.mark.parametrize("old, case", [("homoencoder", "vhe"), ("statistician", "ns")])
def test_files_written_under_an_old_kind_name_still_load(old, case, tmp_path):
    """The VHE and NS kinds were once called "homoencoder" and "statistician"."""
    from metavae.models.registry import complete_config

    model = CASES[case]().eval()
    model.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["config"]["kind"] = old
    del raw["config"]["pooling"]  # written before the setting existed
    torch.save(raw, tmp_path / "old.pt")
    back = metavae.load(tmp_path / "old.pt")
    assert type(back) is type(model) and complete_config(raw["config"]) == complete_config(model.config)
    x, ctx = _inputs(model)
    assert torch.equal(model.embed(x, ctx), back.embed(x, ctx))


def test_hand_assembled_or_modified_models_are_refused_at_save_time(tmp_path):
    from torch import nn

    from metavae import MetaVAE
    from metavae.distributions import GaussianLatent
    from metavae.nets.mlp import BatchedMLP

    hand = MetaVAE((3,), nn.Linear(3, 4), BatchedMLP(1, [2, 3]), GaussianLatent(2), Gaussian(1.0))
    with pytest.raises(ValueError, match="assembled by hand"):
        hand.save(tmp_path / "a.pt")
    model = build_mlp_metavae((6,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    model.summary = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Linear(5, 8))  # a custom summary net
    with pytest.raises(ValueError, match="config does not rebuild it"):
        model.save(tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()


def test_parts_outside_the_package_are_never_imported(tmp_path):
    from metavae.models import build_model

    config = dict(build_compiled_inference(2, summary_widths=None).config, preprocess="os:system")
    with pytest.raises(ValueError, match="not an allowed part"):
        build_model(config)


def test_experiment_checkpoints_load(tmp_path):
    from metavae.cli import main

    out = tmp_path / "mog"
    assert main(["run", "mog", "--out", str(out), "--quiet", "--set", "epochs=1", "--set", "steps_per_epoch=2",
                 "--set", "test_mixtures=3", "--set", "train_mixtures=[2]", "--set", "points_per_mixture=100",
                 "--set", "test_points=20", "--set", "context_size=8"]) == 0
    model = load(out / "checkpoints" / "metavae_2" / "best.pt")
    assert model.n_decoders == 2 and model.config["decoder_scale"] == 5.0
    with pytest.raises(ValueError, match="not a metavae model"):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
        load(tmp_path / "x.pt")


@pytest.mark.parametrize("name, arch", [("ns", "mlp"), ("vhe", "mlp"), ("vhe", "conv"), ("metavae", "conv")])
def test_attention_pooling_round_trips_and_is_permutation_invariant(name, arch, tmp_path):
    from metavae.models import make_model
    from metavae.nets.sets import AttentionPool

    torch.manual_seed(0)
    shape = (28, 28) if arch == "conv" else (6,)
    kw = dict(channels=(2, 4, 4), groups=1) if arch == "conv" else dict(decoder_hidden=8)
    kw.update(n_distributions=2, summary_widths=(8, 8)) if name == "metavae" else kw.update(c_dim=3)
    model = make_model(name, arch, shape, z_dim=2, hidden=8, pooling="attention", **kw).eval()
    assert any(isinstance(m, AttentionPool) for m in model.modules()) and model.config["pooling"] == "attention"
    model.save(tmp_path / "m.pt")
    back = metavae.load(tmp_path / "m.pt")
    x, ctx = torch.rand(4, *shape), torch.rand(4, 5, *shape)
    assert torch.equal(model.embed(x, ctx), back.embed(x, ctx))
    torch.testing.assert_close(model.embed(x, ctx), model.embed(x, ctx[:, torch.randperm(5)]))
