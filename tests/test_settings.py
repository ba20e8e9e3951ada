"""One settings path (src/metavae/settings.py): each setting declared once, reached by --set under its
plain or dotted name, checked by its declaration, recorded in the flat form metrics.json keeps."""
import dataclasses

import pytest

from metavae.cli import _settings_help
from metavae.paper import gap, generation, mnist, mnist_gap, mog, norb
from metavae.paper import get_experiment, list_experiments
from metavae.settings import check_settings, config, flat, group, resolve_preset, setting
from metavae.training import TrainConfig
from metavae.workflows import FileTrainConfig


def _config_classes() -> set:
    classes = {TrainConfig, FileTrainConfig, gap.GapConfig, mnist_gap.MnistGapConfig, generation.GenerationConfig,
               norb.NorbConfig}
    for name, _ in list_experiments():
        classes |= {type(cfg) for cfg in get_experiment(name).presets.values()}
    return classes


@pytest.mark.parametrize("name", ["epochs", "batch_size", "lr", "steps_per_epoch", "grad_clip", "amp"])
def test_a_training_setting_is_declared_in_one_dataclass(name):
    owners = [c.__name__ for c in _config_classes() if name in c.__dict__.get("__annotations__", {})]
    assert owners == ["TrainConfig"]


def test_a_flat_or_dotted_key_reaches_the_nested_field():
    for key in ("batch_size", "train.batch_size"):
        cfg = resolve_preset(mog.PRESETS, None, {key: "8"})
        assert cfg.train.batch_size == cfg.batch_size == 8
    cfg = resolve_preset(mnist.PRESETS, "quick", {"amp": "bf16", "context_pool": "20"})
    assert (cfg.train.amp, cfg.train.context_pool, cfg.train.keep_worst) == ("bf16", 20, True)
    # presets and dataclasses.replace name a setting as --set does
    assert dataclasses.replace(cfg, epochs=3, z_dim=2).train.epochs == 3
    assert norb.PRESETS["hour"].train.amp == "bf16"


def test_an_unknown_or_unexposed_key_is_one_error_listing_the_settings():
    for key in ("surprise", "train.shared_context", "shared_context"):
        with pytest.raises(ValueError, match=r"unknown setting .*settings: batch_size, center, context_size"):
            resolve_preset(mog.PRESETS, None, {key: "1"})


@config
class _TwoGroups:
    fit: TrainConfig = group(TrainConfig(lr=0.1), "lr", "epochs")
    tune: TrainConfig = group(TrainConfig(lr=0.01), "lr")
    rate: float = setting(0.0, zero=True)
    mode: str = setting("a", choices=("a", "b"))
    sizes: tuple = setting((), empty=True)


def test_an_ambiguous_key_names_its_choices_and_a_dotted_key_settles_it():
    with pytest.raises(ValueError, match=r"'lr' is ambiguous; name one of fit\.lr, tune\.lr"):
        resolve_preset({"x": _TwoGroups()}, None, {"lr": "1"})
    cfg = resolve_preset({"x": _TwoGroups()}, None, {"tune.lr": "1", "epochs": "2"})
    assert (cfg.fit.lr, cfg.tune.lr, cfg.epochs) == (0.1, 1.0, 2)
    assert flat(cfg) == {"fit.lr": 0.1, "epochs": 2, "tune.lr": 1.0, "rate": 0.0, "mode": "a", "sizes": ()}
    with pytest.raises(AttributeError):
        cfg.lr
    with pytest.raises(TypeError, match="ambiguous"):
        _TwoGroups(lr=1.0)


def test_a_field_and_a_group_setting_of_one_name_are_refused():
    with pytest.raises(TypeError, match="lr both a field and a group's setting"):
        @config
        class Clash:
            train: TrainConfig = group(TrainConfig(), "lr")
            lr: float = 1.0


def test_ranges_and_choices_come_from_the_declaration():
    check_settings(_TwoGroups())  # rate 0 (zero=True), sizes () (empty=True)
    with pytest.raises(ValueError, match="setting 'mode' must be one of a, b, got 'c'"):
        resolve_preset({"x": _TwoGroups()}, None, {"mode": "c"})
    with pytest.raises(ValueError, match="setting 'rate' must be >= 0"):
        resolve_preset({"x": _TwoGroups()}, None, {"rate": "-1"})
    assert TrainConfig(context_size=0, snapshot_steps=(0, 4)).context_size == 0  # declared zero=True
    with pytest.raises(ValueError, match="setting 'batch_size' must be positive, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="setting 'snapshot_steps' must hold integers >= 0"):
        TrainConfig(snapshot_steps=(-1,))
    # an experiment's group refuses what its models cannot take (no context)
    with pytest.raises(ValueError, match="setting 'context_size' must be positive, got 0"):
        resolve_preset(mog.PRESETS, None, {"context_size": "0"})
    with pytest.raises(ValueError, match="setting 'amp' must be one of bf16 or null"):
        resolve_preset(mnist.PRESETS, None, {"amp": "fp16"})


def test_recorded_settings_keep_their_flat_form():
    """A checkpoint's run identity and metrics.json's config are this dict; a resume compares it."""
    assert flat(mnist.PRESETS["quick"]) == {
        "train_images": 5000, "test_images": 1000, "epochs": 5, "batch_size": 100, "context_size": 10, "z_dim": 40,
        "lr": 2e-4, "context_pool": None, "embed_chunk": 100, "init": "default", "selection": "best", "free_bits": 0.0,
        "pooling": "mean", "amp": None, "seen": None, "test_context_sizes": ()}
    assert set(flat(FileTrainConfig())) == {
        "epochs", "batch_size", "context_size", "lr", "z_dim", "hidden_widths", "summary_widths", "likelihood", "scale",
        "latent", "free_bits", "channels", "conv_hidden", "context_pool", "val_fraction", "patience", "grad_clip", "seed",
        "amp"}


def test_train_help_lists_every_setting_with_its_declared_help():
    text = _settings_help()
    for key in flat(FileTrainConfig()):
        assert f"{key}=" in text
    assert "batch_size=32: queries per distribution and step" in text
    assert "likelihood=\"auto\": auto: bernoulli" in text
