"""The regime map's settings (seen=K, the no-context ablation, test context sizes) and its report."""
import dataclasses

import pytest
import torch

from metavae.paper import regimes
from metavae.paper.invariance import InvarianceConfig
from metavae.paper.mnist import LABELLED_SETTINGS, PRESETS, label_reference, seen_subset
from metavae.paper.invariance import run_label
from metavae.models import make_model

SEEN = (-180, -160, -140, -120, -100, -80, -60, -40, -20, 0)


@pytest.mark.parametrize("k, expected", [(1, (-80,)), (2, (-140, -40)), (5, (-160, -120, -80, -40, 0)), (10, SEEN)])
def test_seen_subset_spreads_the_values_and_keeps_steps_and_images_per_step(k, expected):
    cfg = dataclasses.replace(PRESETS["long"], seen=k)
    subset, train_cfg = seen_subset(SEEN, cfg)
    assert subset == expected
    assert train_cfg.batch_size * k == cfg.batch_size * len(SEEN)  # images per step
    assert train_cfg.epochs * cfg.batch_size == cfg.epochs * train_cfg.batch_size  # steps: epochs x images / batch


def test_seen_beyond_the_split_is_refused():
    with pytest.raises(ValueError, match="only 10 seen values"):
        seen_subset(SEEN, dataclasses.replace(PRESETS["long"], seen=11))


def test_nocontext_metavae_has_k_decoders_and_no_summary():
    m = make_model("metavae-nocontext", event_shape=(4,), n_distributions=3, z_dim=2, hidden_widths=(8,))
    assert m.n_decoders == 3 and not m.uses_context
    assert m.embed(torch.rand(5, 4)).shape == (5, 2)  # q(z | x): no context needed


def test_unpooled_and_subset_runs_are_variants_not_seeds_of_the_default_run():
    long = PRESETS["long"]
    assert run_label("metavae", long, label_reference(long), LABELLED_SETTINGS) == "metavae"
    unpooled = dataclasses.replace(long, context_pool=None)
    assert run_label("metavae", unpooled, label_reference(unpooled), LABELLED_SETTINGS) == "metavae (context_pool None)"
    subset = dataclasses.replace(long, seen=2)
    assert run_label("vhe", subset, label_reference(subset), LABELLED_SETTINGS) == "vhe (seen 2)"
    assert run_label("metavae", InvarianceConfig(), label_reference(InvarianceConfig()), LABELLED_SETTINGS) == "metavae"
    bf16 = dataclasses.replace(long, amp="bf16")
    assert run_label("metavae", bf16, label_reference(bf16), LABELLED_SETTINGS) == "metavae (amp bf16)"
    # the controls train nothing: a training setting does not make them a variant
    assert [run_label(c, bf16, label_reference(bf16), LABELLED_SETTINGS) for c in ("pixels", "random-projection")] == \
        ["pixels", "random-projection"]


def _run(model, acc, seen=None, seed=0):
    return {"model": model, "seed": seed, "config": {"seen": seen}, "seen": list(range(seen or 10)),
            "mean_unseen_accuracy": {"reference": acc - 0.01, "standardised": acc}}


def test_report_builds_k_table_and_words_the_verdict_by_the_numbers(tmp_path):
    found = {("rotate", "contiguous", "metavae"): [_run("metavae", 0.90)],
             ("rotate", "contiguous", "vhe"): [_run("vhe", 0.895)],
             ("rotate", "contiguous", "metavae (seen 2)"): [_run("metavae", 0.85, 2)],
             ("rotate", "contiguous", "vhe (seen 2)"): [_run("vhe", 0.80, 2)],
             ("rotate", "contiguous", "vhe (seen 2, amp bf16)"): [_run("vhe", 0.10, 2)],  # another variant: not mapped
             ("rotate", "contiguous", "vae (seen 2)"): [_run("vae", 0.87, 2)],
             ("rotate", "contiguous", "pixels"): [_run("pixels", 0.92)]}
    data = regimes.write(found, tmp_path)
    assert data["k"]["metavae"]["2"]["standardised"]["mean"] == pytest.approx(0.85)
    assert data["k"]["vhe"]["2"]["standardised"]["mean"] == pytest.approx(0.80)
    assert data["k"]["vae"]["2"]["standardised"]["mean"] == pytest.approx(0.87)
    text = (tmp_path / "regimes.md").read_text()
    assert "K=2: metavae 0.850 against vhe 0.800: **higher**" in text
    assert "K=2: metavae 0.850 against vae (no context, same K) 0.870: **lower**" in text
    assert "K=2: vhe 0.800 against vae (no context, same K) 0.870: **lower**" in text
    assert "| 2 | 0.840 | 0.850 | 0.790 | 0.800 | 0.860 | 0.870 | higher | lower |" in text
    assert "K=10: metavae 0.900 against vhe 0.895: **level**" in text
    assert "metavae 0.900 against pixels 0.920: **lower**" in text
    assert (tmp_path / "regimes.png").stat().st_size > 0


def test_regime_runs_stay_out_of_table2():
    assert regimes.is_regime_label("metavae (seen 5)") and not regimes.is_regime_label("metavae (amp bf16)")


@pytest.mark.parametrize("unpooled, word", [(0.905, "level"), (0.93, "higher"), (0.87, "lower")])
def test_pooling_verdict_is_worded_by_the_numbers(tmp_path, unpooled, word):
    found = {("rotate", "contiguous", "metavae"): [_run("metavae", 0.90, seed=s) for s in range(2)],
             ("rotate", "contiguous", "metavae (context_pool None)"): [_run("metavae", unpooled)]}
    data = regimes.write(found, tmp_path)
    assert data["pooling"]["metavae"]["verdict"] == word and "vhe" not in data["pooling"]
    text = (tmp_path / "regimes.md").read_text()
    assert f"metavae with each query's own contexts {unpooled:.3f}" in text and f"**{word}**" in text


def test_a_variant_only_table_does_not_list_the_default_runs_as_missing(tmp_path):
    from metavae.paper.invariance import gather_tables

    acc = {"mean_unseen_accuracy": {"reference": 0.8, "standardised": 0.9}, "seed": 0}
    models = ("metavae", "vhe", "ns", "metavae (amp bf16)", "vhe (amp bf16)")
    only_bf16 = {("rotate", "contiguous", "metavae (amp bf16)"): [acc], ("rotate", "contiguous", "vhe (amp bf16)"): [acc],
                 ("rotate", "contiguous", "pixels"): [acc]}
    _, table2, missing = gather_tables(only_bf16, ("rotate",), models, "mnist", tmp_path)
    contiguous = [m for m in missing if "contiguous" in m]
    assert contiguous == ["metavae run mnist-rotate --split contiguous --model ns"]  # the bf16 runs stand in
    assert table2["rotate"]["metavae"] is None and table2["rotate"]["metavae (amp bf16)"] is not None
    # beside default runs a variant is optional and stands in for nothing: the default metavae is missing
    mixed = {("rotate", "contiguous", "metavae (amp bf16)"): [acc], ("rotate", "contiguous", "vhe"): [acc]}
    _, _, missing = gather_tables(mixed, ("rotate",), models, "mnist", tmp_path)
    assert [m for m in missing if "contiguous" in m] == [f"metavae run mnist-rotate --split contiguous --model {m}"
                                                        for m in ("metavae", "ns")]
