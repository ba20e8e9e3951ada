"""The registry of model kinds: each kind's declared capabilities are what its models do, a new kind
is one record (make_model, save / load, the own-data workflow's checks read it), and clashing
records are refused."""
import pytest
import torch

from metavae.models import build_mlp_metavae, load, make_model, registry
from metavae.models.registry import Kind, model_kinds, register

SMALL = {"mlp": (4,), "conv": (1, 16, 16)}


def small(kind: Kind, arch: str, **kw):
    """A tiny model of ``kind``: arguments by what its builder takes, as the own-data workflow does."""
    if kind.takes("c_dim"):
        kw.update(c_dim=3, z_dim=2, hidden=8)
        if arch == "mlp":
            kw.update(decoder_hidden=8)
        if kind.takes("n_components"):
            kw.update(n_components=2, n_pseudo=2)
    else:
        kw.update(z_dim=2, summary_widths=(8,), **({"hidden_widths": (8,)} if arch == "mlp" else {"hidden": 8}))
    if arch == "conv":
        kw.update(channels=(4, 4, 4), groups=2)
    torch.manual_seed(0)
    return make_model(kind.name, arch, SMALL[arch], 3, **kw).eval()


CASES = [(k.name, a) for k in model_kinds() for a in k.archs]


@pytest.fixture
def restore_registry():
    """Registering in a test must not leak into the others: the tables are restored in place."""
    tables = (registry._KINDS, registry.KINDS, registry.OLD_KINDS)
    saved = [dict(t) for t in tables]
    yield
    for t, s in zip(tables, saved):
        t.clear()
        t.update(s)


@pytest.mark.parametrize("name, arch", CASES)
def test_declared_capabilities_are_what_the_models_do(name, arch):
    kind = registry.kind(name)
    model = small(kind, arch)
    ctx = torch.rand(5, *SMALL[arch])
    assert model.uses_context == kind.uses_context
    assert (getattr(model, "n_decoders", 1) == 3) == kind.decoder_bank  # one decoder per distribution
    if kind.samples_unseen:
        assert model.sample(2, context=ctx).shape == (2, *SMALL[arch])
    else:
        with pytest.raises((ValueError, TypeError)):
            model.sample(2, context=ctx)
    if kind.pooling:
        assert small(kind, arch, pooling="attention").config["pooling"] == "attention"
    else:  # its builder may take the argument, but there is no set to pool
        assert not model.uses_context and getattr(model, "summary", None) is None
    assert kind.merges_family == (not (kind.uses_context or kind.decoder_bank or kind.pooling))
    assert model.config["kind"] in kind.files and registry.kind(name).title


def test_make_model_refuses_an_architecture_the_kind_lacks():
    with pytest.raises(ValueError, match="built for the mlp architecture only"):
        make_model("metavae-nocontext", "conv", (1, 16, 16), 2)
    with pytest.raises(ValueError, match="needs n_distributions >= 1"):
        make_model("metavae", "mlp", (4,), 0)


def build_toy(event_shape, n_decoders: int = 1, z_dim: int = 2, likelihood=None, wide: bool = False):
    """A new kind's builder: a MetaVAE under a config kind of its own."""
    model = build_mlp_metavae(event_shape, n_decoders, z_dim=z_dim, likelihood=likelihood,
                              hidden_widths=(16 if wide else 8,), summary_widths=(8,))
    model.config = dict(kind="toy", event_shape=list(event_shape), n_decoders=n_decoders, z_dim=z_dim,
                        likelihood=model.likelihood.name, likelihood_variance=None, wide=wide)
    return model


def test_a_new_kind_is_one_record(tmp_path, restore_registry):
    from metavae.workflows import FileTrainConfig, _build

    register(Kind("toy", "the toy: a test's kind", builders={"mlp": build_toy}, files={"toy": build_toy},
                  old_files={"toy-v0": "toy"}, uses_context=True, decoder_bank=True))
    assert "toy" in registry.model_names() and registry.kind("toy").takes("wide")
    model = make_model("toy", "mlp", (3,), 4, wide=True)
    assert model.n_decoders == 4 and model.config["kind"] == "toy"
    model.save(tmp_path / "m.pt")
    back = load(tmp_path / "m.pt")
    assert back.config == model.config and back.n_decoders == 4
    assert registry.complete_config({"kind": "toy-v0", "event_shape": [3]})["wide"] is False  # the old name, today's defaults
    with pytest.raises(ValueError, match="no context set to pool|takes no other latent|pooling"):
        # the workflow asks the record, not a list of names: no `pooling` capability, no attention
        _build("toy", (3,), 2, FileTrainConfig(), pooling="attention")


def test_clashing_records_are_refused(restore_registry):
    with pytest.raises(ValueError, match="already registered"):
        register(Kind("vae", "the VAE: again", builders={"mlp": build_toy}))
    with pytest.raises(ValueError, match="already mean another builder"):
        register(Kind("toy2", "toy2: a clash", files={"mlp_metavae": build_toy}))
    assert registry.KINDS["mlp_metavae"] is build_mlp_metavae


def test_a_file_only_kind_is_not_a_model_name(restore_registry):
    register(Kind("filed", "filed: a kind its experiment builds", files={"filed": build_toy}))
    assert "filed" not in registry.model_names() and registry.known_kind("filed") == "filed"
    with pytest.raises(ValueError, match="unknown model 'filed'"):
        make_model("filed", "mlp", (3,))


@pytest.mark.parametrize("config_kind", ["mlp_metavae", "conv_metavae"])
def test_files_written_before_the_width_renames_load(tmp_path, config_kind):
    """The MetaVAE builders' ``hidden`` / ``summary`` / ``decoder_hidden`` (layer widths) are now
    ``hidden_widths`` / ``summary_widths`` / ``decoder_widths``: a file with the old names loads to
    the same model, and an old checkpoint's config still matches today's (resume)."""
    arch = "mlp" if config_kind == "mlp_metavae" else "conv"
    model = small(registry.kind("metavae"), arch)
    old = dict(model.config)
    for new_name, old_name in (("hidden_widths", "hidden"), ("summary_widths", "summary"), ("decoder_widths", "decoder_hidden")):
        if new_name in old:
            old[old_name] = old.pop(new_name)
    assert "summary" in old and "summary_widths" not in old
    torch.save({"format": "metavae-model", "format_version": 1, "config": old,
                "state_dict": model.state_dict(), "extra": {}}, tmp_path / "old.pt")
    back = load(tmp_path / "old.pt")
    assert back.config == model.config
    x = torch.rand(3, *SMALL[arch])
    ctx = torch.rand(5, *SMALL[arch])
    torch.testing.assert_close(back.embed(x, ctx), model.embed(x, ctx))
    assert registry.complete_config(old) == registry.complete_config(model.config)
