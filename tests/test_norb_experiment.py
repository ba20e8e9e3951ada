"""Small NORB experiments end to end on a tiny rendered synthnorb subset, and `metavae report norb`.

The experiments read the whole synthnorb (generated once, minutes); here `load_norb` is replaced
by a small sub-grid rendered in a few seconds: one toy per category and split, one camera, every
lighting, and two sweeps (every elevation at azimuth 40deg, every azimuth at elevation 40deg), so
every group of every axis exists and has partners in Table 1's base groups, and the example grid
(elevation 40deg, azimuth 40deg, lighting 0 held fixed) finds its images.
"""
import json

import numpy as np
import pytest
import torch

from metavae.paper.data.norb_loader import load_norb
from metavae.cli import main
from metavae.paper.data import norb
from metavae.paper.data import synthnorb as S
from metavae.paper import get_experiment, list_experiments
from metavae.paper import norb as E

TINY = ["--quiet", "--set", "train_images=40", "--set", "test_images=30", "--set", "table1_images=20",
        "--set", "epochs=1", "--set", "batch_size=8", "--set", "context_size=4", "--set", "channels=[4,8,8]",
        "--set", "hidden=16", "--set", "c_dim=8", "--set", "z_dim=4", "--set", "n_components=2",
        "--set", "context_pool=8"]


def _render(instance: int):
    """One toy per category: an elevation sweep at azimuth 40deg and an azimuth sweep at elevation
    40deg, every lighting, rendered without supersampling (fast)."""
    elev = S.render_synthnorb(range(5), [instance], range(9), [2], range(6), render_size=32)
    azim = S.render_synthnorb(range(5), [instance], [2], [a for a in range(18) if a != 2], range(6), render_size=32)
    return norb.NorbPart(torch.cat([elev[0], azim[0]]), torch.cat([elev[1], azim[1]]))


@pytest.fixture(scope="module")
def tiny_synthnorb():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return norb.NorbData("synthnorb", _render(norb.TRAIN_INSTANCES[0]), _render(norb.TEST_INSTANCES[0]),
                             source="synthnorb test sub-grid")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _tiny_data(tiny_synthnorb, monkeypatch):
    calls = []

    def fake_load(data_dir=None, **kw):
        calls.append(data_dir)
        if data_dir is not None:
            return load_norb(data_dir, **kw)  # the real reader, with its errors
        return tiny_synthnorb
    monkeypatch.setattr(E, "load_norb", fake_load)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield calls
    torch.set_num_threads(before)


def test_registered_with_presets_and_options():
    names = [n for n, _ in list_experiments()]
    assert {"norb-elevation", "norb-azimuth", "norb-lighting"} <= set(names)
    exp = get_experiment("norb-azimuth")
    assert set(exp.presets) == {"quick", "hour", "paper"} and exp.options == {"model", "split", "data_dir"}
    paper = exp.presets["paper"]
    assert (paper.batch_size, paper.context_size, paper.z_dim, paper.lr, paper.epochs) == (32, 10, 40, 2e-4, 100)
    assert paper.channels == (64, 128, 256) and paper.train_images is None
    assert str(exp.default_out(model="vhe", split="disjoint")) == "runs/norb-azimuth/synthnorb/contiguous/vhe"
    assert "smallnorb" in str(exp.default_out(data_dir="/x"))


def test_subset_keeps_the_same_toys_and_poses_in_every_group(tiny_synthnorb):
    part = tiny_synthnorb.train
    mask = E.subset_mask(part, "lighting", 40)
    kept = norb.NorbPart(part.images[mask], part.info[mask])
    col = kept.column("lighting")
    assert torch.bincount(col).tolist() == [40] * 6
    assert torch.bincount(kept.labels[col == 0]).tolist() == [8] * 5  # balanced over categories
    ia, ib = norb.correspondence(kept.info[col == 3], kept.info[col == 0], "lighting")
    assert len(ia) == 40  # every image has its partner in the base group
    assert E.subset_mask(part, "lighting", None).all() and torch.equal(mask, E.subset_mask(part, "lighting", 40))


def test_runs_and_report_name_the_data_and_fill_tables(tmp_path):
    runs = tmp_path / "runs"
    out1 = runs / "norb-lighting" / "synthnorb" / "contiguous" / "vhe-vampprior"
    assert main(["run", "norb-lighting", "--model", "vhe-vampprior", "--out", str(out1)] + TINY) == 0
    m1 = json.loads((out1 / "metrics.json").read_text())
    assert m1["data"] == "synthnorb" and (m1["model"], m1["split"], m1["axis"]) == ("vhe-vampprior", "contiguous",
                                                                                   "lighting")
    assert m1["seen"] == [0, 1, 2]
    for probe in ("reference", "standardised"):
        assert set(m1["accuracy"][probe]) == {"3", "4", "5"}
        assert m1["mean_unseen_accuracy"][probe] == pytest.approx(np.mean(list(m1["accuracy"][probe].values())))
    assert "reference_selection" in m1 and "untrained" in m1  # the VHE+VP has a c: the reference's pick too
    assert m1["model_kwargs"] == {"z_dim": 4, "channels": [4, 8, 8], "hidden": 16, "c_dim": 8, "n_components": 2}
    assert m1["train_images_per_value"] == 40 and m1["test_images_per_value"] == 30
    assert "invariance_distance" not in m1
    for name in ("accuracy.png", "examples.png", "report.md", "checkpoints/best.pt"):
        assert (out1 / name).exists(), name
    assert "synthnorb" in (out1 / "report.md").read_text().splitlines()[0]  # the title says which data

    out2 = runs / "norb-lighting" / "synthnorb" / "interleaved" / "metavae"
    assert main(["run", "norb-lighting", "--split", "standard", "--out", str(out2)] + TINY) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["split"] == "interleaved" and set(m2["invariance_distance"]) == {"elevation", "azimuth", "lighting"}
    assert all(d > 0 for d in m2["invariance_distance"].values())
    d0 = m2["untrained"]["invariance_distance"]  # the control: the same model at step 0
    assert set(d0) == set(m2["invariance_distance"]) and d0 != m2["invariance_distance"]
    assert m2["table1"]["base_group"] == {"elevation": "elevation 50deg", "azimuth": "azimuth 0deg",
                                          "lighting": "lighting 0"}
    assert all(g["pairs_per_group"] >= 1 for g in m2["table1"]["groups"].values())

    assert main(["report", "norb", "--runs", str(runs)]) == 0
    rep = runs / "norb-report"
    t1 = json.loads((rep / "table1.json").read_text())
    t2 = json.loads((rep / "table2.json").read_text())
    assert set(t1) == {"elevation", "azimuth", "lighting"} and set(t2) == set(t1)
    assert t1["lighting"] == m2["invariance_distance"] and t1["elevation"] is None
    assert {"metavae", "vhe-vampprior", "vhe", "ns"} <= set(t2["lighting"])
    cell = t2["lighting"]["vhe-vampprior"]
    assert cell["standardised"] == {"mean": m1["mean_unseen_accuracy"]["standardised"], "std": 0.0, "n": 1}
    assert t2["lighting"]["metavae"] is None
    tables = json.loads((rep / "tables.json").read_text())
    assert tables["data"] == "synthnorb" and tables["paper_table2"]["lighting"]["metavae"] == 0.548
    text = (rep / "report.md").read_text()
    assert "synthnorb" in text.splitlines()[0] and "NOT" in text.splitlines()[0]
    assert "metavae run norb-lighting --split contiguous --model metavae" in text  # names what is missing
    assert "metavae run norb-azimuth --split interleaved --model metavae" in text
    light = f"{m2['invariance_distance']['lighting']:.3f} / {d0['lighting']:.3f} (0.26)"
    assert light in (rep / "table1.md").read_text()  # ours / untrained (paper)
    assert (rep / "figure7.png").exists() and (rep / "examples.png").exists()
    assert "amp bf16" not in (rep / "table2.md").read_text()

    variant = runs / "norb-lighting" / "synthnorb" / "contiguous" / "vhe-vampprior-bf16"  # a variant gets its row
    variant.mkdir(parents=True)
    (variant / "metrics.json").write_text(json.dumps({**m1, "label": "vhe-vampprior (amp bf16)"}))
    assert main(["report", "norb", "--runs", str(runs)]) == 0
    row = next(r for r in (rep / "table2.md").read_text().splitlines() if "(amp bf16)" in r)
    assert row.startswith("| lighting | vhe-vampprior (amp bf16) | ") and f"{cell['standardised']['mean']:.3f}" in row


def test_data_dir_reads_real_smallnorb_and_fails_clearly(tmp_path, capsys, _tiny_data):
    missing = tmp_path / "nowhere"
    assert main(["run", "norb-elevation", "--data-dir", str(missing), "--out", str(tmp_path / "o")] + TINY) == 2
    assert "nowhere" in capsys.readouterr().err and _tiny_data == [missing]
    assert main(["run", "norb-elevation", "--model", "gan", "--out", str(tmp_path / "o")] + TINY) == 2
    assert "unknown model 'gan'" in capsys.readouterr().err
