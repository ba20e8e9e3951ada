"""The fault suite of a user's own files (issue 28): model files, run folders, resumes, data files,
memory, mapped files, `embed`/`sample`, the Python API and the wording of errors.

Every case is a class of faults, parametrised over many instances. Each CLI case checks: exit
status 2, exactly one ``metavae: error:`` line and no traceback, and (the autouse fixture) that
the user's files and the ``$METAVAE_DATA`` cache are untouched. Offline, seconds per case.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metavae import MetaDataset, TrainConfig, Trainer, build_mlp_metavae
from metavae.cli import main
from metavae.data.files import read_family
from metavae.io import RunFolder, TMP_MARK, atomic_write_bytes
from metavae.models import load, make_model
from metavae.paper.models.compiled import build_compiled_inference

TINY = ["--quiet", "--set", "epochs=1", "--set", "hidden=[8]", "--set", "summary=[8]", "--set", "context_size=3",
        "--set", "batch_size=8", "--set", "z_dim=2"]
CACHE_FILES = ("mnist/train-images-idx3-ubyte.gz", "mnist/transforms/rotation.npy", "synthnorb/img.png")


def _tree(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def guarded(tmp_path, monkeypatch):
    """A populated $METAVAE_DATA and a folder of the user's files; both must be the same afterwards."""
    cache = tmp_path / "cache"
    for name in CACHE_FILES:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(name.encode() * 10)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.setenv("METAVAE_DATA", str(cache))
    monkeypatch.chdir(user)  # anything written into the working folder shows up as a change
    before = _tree(cache)
    yield user
    after = _tree(cache)  # derived caches may grow (transformed MNIST); nothing there may go or change
    assert {k: after.get(k) for k in before} == before, "the data cache lost or changed files"


def cli(argv) -> int:
    return main([str(a) for a in argv])


def _user_files(user: Path) -> dict:
    return _tree(user)


def one_line_error(capsys, argv, *needles) -> str:
    """Run the CLI; assert exit 2, one error line, no traceback; return the line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.startswith("metavae: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) <= 2, err  # at most one notice besides it
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _family(path: Path, k=3, n=60, d=4, seed=0, dtype="float32") -> Path:
    g = np.random.default_rng(seed)
    np.savez(path, **{f"d{i}": g.normal(i, 1, (n, d)).astype(dtype) for i in range(k)})
    return path


def _metavae(path: Path, k=3, d=4, **extra) -> Path:
    torch.manual_seed(0)
    model = build_mlp_metavae((d,), k, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    model.save(path, distributions=[f"d{i}" for i in range(k)], **extra)
    return path


# 1. a model file names no code ------------------------------------------------------------------
HOSTILE_PARTS = ["metavae.io:cache_clear", "metavae.cli:main", "metavae.paper.mnist:report", "os:system",
                 "builtins:eval", "metavae.io:clear_temporaries", "metavae.models.registry:load", "", 5, ["x"],
                 {"a": 1}, "metavae.paper.models.standardize:FixedStandardize.__init__"]


@pytest.mark.parametrize("part", HOSTILE_PARTS)
def test_a_model_file_naming_code_is_refused_before_it_runs(part, guarded, capsys):
    model = build_compiled_inference(4, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    model.save(guarded / "model.pt")
    ck = torch.load(guarded / "model.pt", weights_only=True)
    ck["config"]["preprocess"] = part
    torch.save(ck, guarded / "model.pt")
    np.save(guarded / "q.npy", np.zeros((3, 4), np.float32))
    before = _user_files(guarded)
    one_line_error(capsys, ["embed", "--model", guarded / "model.pt", "--query", guarded / "q.npy",
                            "--context", guarded / "q.npy", "--out", guarded / "z.npy"], "preprocess")
    assert _user_files(guarded) == before  # nothing written into the working folder either


def test_allowed_parts_still_round_trip(tmp_path):
    from metavae.paper.models.standardize import FixedStandardize
    from metavae.models.registry import ALLOWED_PARTS

    model = build_compiled_inference(2, z_dim=1, hidden_widths=(8,), summary_widths=None, preprocess=FixedStandardize(3.0, 2.0))
    assert model.config["preprocess"] in ALLOWED_PARTS  # the table names the physics parts, nothing else
    model.save(tmp_path / "m.pt")
    back = load(tmp_path / "m.pt")
    assert float(back.preprocess.mean) == 3.0 and float(back.preprocess.std) == 2.0


# 2. a tampered model file is one line -------------------------------------------------------------
def _drop_one(ck):
    ck["state_dict"].pop(next(iter(ck["state_dict"])))


def _nan(ck):
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][k] = ck["state_dict"][k].clone().fill_(float("nan"))


def _inf(ck):
    k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][k] = ck["state_dict"][k].clone().fill_(float("inf"))


TAMPERINGS = {
    "tensor removed": _drop_one,
    "extra tensor": lambda ck: ck["state_dict"].__setitem__("spare.weight", torch.zeros(3)),
    "empty state dict": lambda ck: ck.__setitem__("state_dict", {}),
    "no state dict": lambda ck: ck.pop("state_dict"),
    "state dict a list": lambda ck: ck.__setitem__("state_dict", [1, 2]),
    "a weight a string": lambda ck: ck["state_dict"].__setitem__(next(iter(ck["state_dict"])), "w"),
    "NaN weights": _nan,
    "inf weights": _inf,
    "hidden size edited": lambda ck: ck["config"].__setitem__("hidden", [16]),
    "hidden size huge": lambda ck: ck["config"].__setitem__("hidden", [10 ** 12]),
    "decoder count edited": lambda ck: ck["config"].__setitem__("n_decoders", 4),
    "z_dim edited": lambda ck: ck["config"].__setitem__("z_dim", 5),
    "z_dim a string": lambda ck: ck["config"].__setitem__("z_dim", "2"),
    "z_dim negative": lambda ck: ck["config"].__setitem__("z_dim", -1),
    "unknown config key": lambda ck: ck["config"].__setitem__("surprise", 1),
    "event_shape abc": lambda ck: ck["config"].__setitem__("event_shape", "abc"),
    "event_shape zero": lambda ck: ck["config"].__setitem__("event_shape", [0]),
    "unknown kind": lambda ck: ck["config"].__setitem__("kind", "trojan"),
    "unknown likelihood": lambda ck: ck["config"].__setitem__("likelihood", "poisson"),
    "unknown activation": lambda ck: ck["config"].__setitem__("act", "os.system"),
    "config a list": lambda ck: ck.__setitem__("config", [1, 2]),
    "config None": lambda ck: ck.__setitem__("config", None),
    "extra None": lambda ck: ck.__setitem__("extra", None),
    "distributions an int": lambda ck: ck["extra"].__setitem__("distributions", 5),
    "distributions of ints": lambda ck: ck["extra"].__setitem__("distributions", [1, 2, 3]),
    "format version": lambda ck: ck.__setitem__("format_version", 99),
}


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
@pytest.mark.parametrize("command", ["embed", "sample"])
def test_a_tampered_model_file_is_one_line(how, command, guarded, capsys):
    path = _metavae(guarded / "model.pt")
    ck = torch.load(path, weights_only=True)
    TAMPERINGS[how](ck)
    torch.save(ck, path)
    np.save(guarded / "q.npy", np.zeros((3, 4), np.float32))
    before = _user_files(guarded)
    argv = (["embed", "--query", guarded / "q.npy", "--context", guarded / "q.npy"] if command == "embed"
            else ["sample", "--dist", "d0", "-n", "2"])
    line = one_line_error(capsys, argv + ["--model", path, "--out", guarded / "out.npy"], str(path))
    assert "delete it" not in line  # it is the user's model
    assert _user_files(guarded) == before


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04 truncated zip", None])
def test_an_unreadable_model_file_is_not_advised_away(content, guarded, capsys):
    path = guarded / "model.pt"
    if content is None:  # a real model file, truncated
        _metavae(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    np.save(guarded / "q.npy", np.zeros((3, 4), np.float32))
    line = one_line_error(capsys, ["embed", "--model", path, "--query", guarded / "q.npy", "--context",
                                   guarded / "q.npy", "--out", guarded / "z.npy"], "model.pt")
    assert "delete" not in line and "afresh" not in line
    assert path.exists()


# 3. a run folder touches only what the run wrote ---------------------------------------------------
USER_NAMES = [".notes.tmp.md", "project/.env.tmp", "project/sub/.config.tmpl", ".x.tmp", ".last.pt.abc123.tmp",
              ".a.tmpfile", "checkpoints/.mine.tmp", ".metavae-tmp", "notes.metavae-tmp", ".b.metavae-tmp",
              ".c.toolong123.metavae-tmp", ".d.ABCDEFGH.metavae-tmp"]


def test_a_run_folder_keeps_the_users_files_whatever_their_names(guarded, capsys):
    out = guarded / "run"
    for name in USER_NAMES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    fd, ours = tempfile.mkstemp(dir=out / "project", prefix=".last.pt.", suffix=TMP_MARK)  # a killed writer's
    os.close(fd)
    _family(guarded / "a.npz")
    assert cli(["train", "--data", guarded / "a.npz", "--out", out] + TINY) == 0
    for name in USER_NAMES:
        assert (out / name).read_text() == name, name
    assert not Path(ours).exists()


def test_run_folder_clears_only_its_own_temporaries(tmp_path):
    atomic_write_bytes(b"x", tmp_path / "f.bin")  # leaves no temporary
    fd, ours = tempfile.mkstemp(dir=tmp_path, prefix=".f.bin.", suffix=TMP_MARK)
    os.close(fd)
    (tmp_path / ".f.bin.zzzzzzzz.tmp").write_text("a user's")
    with RunFolder(tmp_path):
        pass
    assert not Path(ours).exists() and (tmp_path / ".f.bin.zzzzzzzz.tmp").exists()


# 4. metavae train resumes only its own data and settings --------------------------------------------
def _other_values(p):
    _family(p, seed=1)


def _renamed(p):
    z = dict(np.load(p))
    z["e0"] = z.pop("d0")
    np.savez(p, **z)


def _float64(p):
    z = {k: v.astype(np.float64) for k, v in np.load(p).items()}
    np.savez(p, **z)


@pytest.mark.parametrize("change, extra, needle", [
    (_other_values, [], "sha256"),
    (_renamed, [], "names"),
    (_float64, [], "dtypes"),
    (None, ["--set", "lr=0.01"], "lr"),
    (None, ["--set", "val_fraction=0.2"], "val_fraction"),
    (None, ["--set", "likelihood=bernoulli"], "likelihood"),
])
def test_a_resume_on_other_data_or_settings_is_refused_naming_the_difference(change, extra, needle, guarded, capsys):
    data, out = _family(guarded / "a.npz"), guarded / "run"
    if needle == "likelihood":
        np.savez(data, **{f"d{i}": np.random.default_rng(i).uniform(0, 1, (60, 4)).astype("float32") for i in range(3)})
    assert cli(["train", "--data", data, "--out", out] + TINY) == 0
    weights = (out / "model.pt").read_bytes()
    if change is not None:
        change(data)
    capsys.readouterr()
    one_line_error(capsys, ["train", "--data", data, "--out", out] + TINY + ["--set", "epochs=2"] + extra,
                   "another run", needle)
    assert (out / "model.pt").read_bytes() == weights


def _fit(out, epochs):
    g = torch.Generator().manual_seed(0)
    data = MetaDataset([torch.randn(60, 2, generator=g) + i for i in range(2)])
    model = build_mlp_metavae((2,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    trainer = Trainer(model, data, TrainConfig(epochs=epochs, batch_size=8, context_size=4, steps_per_epoch=3),
                      out_dir=out, progress=False)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("best_is_last", [True, False])
def test_a_missing_best_pt_is_restored_or_said(best_is_last, tmp_path, capsys):
    out = tmp_path / "ck"
    _fit(out, 2)
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["state"]["best_epoch"] = 2 if best_is_last else 1
    torch.save(ck, out / "last.pt")
    (out / "best.pt").unlink()
    capsys.readouterr()
    trainer = _fit(out, 2)  # finished: nothing to train, model.pt would be written from these weights
    err = capsys.readouterr().err
    last = ck["model"]
    assert all(torch.equal(trainer.model.state_dict()[k], last[k]) for k in last)
    if best_is_last:
        assert (out / "best.pt").exists() and err == ""
    else:
        assert "best.pt" in err and "missing" in err and trainer.state.best_epoch == 2


# 5. reading a user's files --------------------------------------------------------------------------
CONVERTED = ["float16", ">f4", ">f8", "<f8", "bool", "int8", "int16", "int32", "int64", ">i4", "uint16", "uint32",
             "uint64", "uint8", "float32"]


def _typed(dtype, n=40, d=3, seed=0):
    g = np.random.default_rng(seed)
    return (g.uniform(0, 5, (n, d))).astype(dtype)


@pytest.mark.parametrize("dtype", CONVERTED)
@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_every_real_dtype_is_converted_and_trains(dtype, layout, tmp_path):
    arrays = {f"d{i}": _typed(dtype, seed=i) for i in range(2)}
    if layout == "npz":
        np.savez(tmp_path / "f.npz", **arrays)
        fam = read_family(tmp_path / "f.npz")
    else:
        (tmp_path / "f").mkdir()
        for k, v in arrays.items():
            np.save(tmp_path / "f" / f"{k}.npy", v)
        fam = read_family(tmp_path / "f")
    assert all(p.dtype in (np.float32, np.float64, np.uint8) and p.dtype.isnative for p in fam.points)
    data = MetaDataset([torch.as_tensor(np.asarray(p)) for p in fam.points], val_fraction=0.0, test_fraction=0.0)
    model = build_mlp_metavae((3,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    loss = model.loss(data.sample(4, 3))["loss"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", ">f4", "int16", "bool"])
def test_converted_dtypes_train_from_the_command_line(dtype, guarded, capsys):
    np.savez(guarded / "f.npz", **{f"d{i}": _typed(dtype, n=60, d=4, seed=i) for i in range(3)})
    assert cli(["train", "--data", guarded / "f.npz", "--out", guarded / "run"] + TINY) == 0


REFUSED = {
    "complex": lambda: np.ones((40, 3), np.complex64),
    "text": lambda: np.full((40, 3), "ab"),
    "bytes": lambda: np.full((40, 3), b"ab"),
    "dates": lambda: np.full((40, 3), np.datetime64("2020-01-01")),
    "timedeltas": lambda: np.full((40, 3), np.timedelta64(1, "s")),
    "void": lambda: np.zeros((40, 3), "V4"),
    "structured": lambda: np.zeros((40, 3), [("a", "f4"), ("b", "i4")]),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
@pytest.mark.parametrize("layout", ["npz", "folder"])
def test_dtypes_that_are_not_numbers_are_one_line_naming_the_file(kind, layout, guarded, capsys):
    good = {"d0": _typed("float32"), "d1": _typed("float32", seed=1)}
    if layout == "npz":
        path = guarded / "f.npz"
        np.savez(path, bad=REFUSED[kind](), **good)
        needle = "f.npz"
    else:
        path = guarded / "f"
        path.mkdir()
        for k, v in good.items():
            np.save(path / f"{k}.npy", v)
        np.save(path / "bad.npy", REFUSED[kind]())
        needle = "bad.npy"
    before = _user_files(guarded)
    one_line_error(capsys, ["train", "--data", path, "--out", guarded / "run"] + TINY, needle)
    assert {k: v for k, v in _user_files(guarded).items() if not k.startswith("run/")} == before


def _npz_bytes(tmp_path):
    return _family(tmp_path / "good.npz").read_bytes()


def _text_member(path):
    _family(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("README.txt", "notes")


def _npy_named_text(path):
    _family(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.npy", "not an array")


def _pickled_member(path):
    np.savez(path, a=np.ones((40, 3)), b=np.array([{"x": 1}] * 40, dtype=object))


BROKEN_NPZ = {
    "truncated": lambda p, good: p.write_bytes(good[: len(good) // 2]),
    "garbage": lambda p, good: p.write_bytes(os.urandom(2000)),
    "empty file": lambda p, good: p.write_bytes(b""),
    "zip header only": lambda p, good: p.write_bytes(b"PK\x03\x04" + b"\0" * 40),
    "a text member": lambda p, good: _text_member(p),
    "a text .npy member": lambda p, good: _npy_named_text(p),
    "a pickled member": lambda p, good: _pickled_member(p),
    "zero-width arrays": lambda p, good: np.savez(p, a=np.ones((40, 0)), b=np.ones((40, 0))),
    "zero-width middle dim": lambda p, good: np.savez(p, a=np.ones((40, 0, 3)), b=np.ones((40, 0, 3))),
    "no members": lambda p, good: np.savez(p),
    "1-D arrays": lambda p, good: np.savez(p, a=np.ones(40), b=np.ones(40)),
    "a scalar": lambda p, good: np.savez(p, a=np.float32(1.0)),
    "empty distribution": lambda p, good: np.savez(p, a=np.ones((0, 3)), b=np.ones((40, 3))),
}


@pytest.mark.parametrize("how", sorted(BROKEN_NPZ))
def test_a_broken_npz_is_one_line_naming_it(how, guarded, capsys):
    good = _npz_bytes(guarded.parent)
    path = guarded / "broken.npz"
    BROKEN_NPZ[how](path, good)
    one_line_error(capsys, ["train", "--data", path, "--out", guarded / "run"] + TINY, "broken.npz")


BROKEN_NPY = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:150]),
    "garbage": lambda p: p.write_bytes(os.urandom(500)),
    "empty": lambda p: p.write_bytes(b""),
    "zero-width": lambda p: np.save(p, np.ones((40, 0), np.float32)),
    "pickled": lambda p: np.save(p, np.array([{"x": 1}] * 40, dtype=object), allow_pickle=True),
    "an npz under .npy": lambda p: np.savez(open(p, "wb"), a=np.ones((4, 4))),
}


@pytest.mark.parametrize("how", sorted(BROKEN_NPY))
def test_a_broken_npy_in_a_folder_is_one_line_naming_it(how, guarded, capsys):
    folder = guarded / "f"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"d{i}.npy", _typed("float32", n=60, d=4, seed=i))
    BROKEN_NPY[how](folder / "d1.npy")
    one_line_error(capsys, ["train", "--data", folder, "--out", guarded / "run"] + TINY, "d1")


@pytest.mark.parametrize("names", [["a", "b", "NA"], ["a", "b", ""], ["a", "None", "b"], ["nan", "NULL", "n/a"],
                                   ["#N/A", "-nan", "null"]])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_every_distribution_name_in_a_table_is_a_name(names, suffix, tmp_path):
    import pandas as pd

    g = np.random.default_rng(0)
    rows = pd.DataFrame({"distribution": np.repeat(names, 20), "x": g.normal(size=60), "y": g.normal(size=60)})
    path = tmp_path / f"t{suffix}"
    rows.to_csv(path, index=False) if suffix == ".csv" else rows.to_parquet(path)
    fam = read_family(path)
    assert sorted(fam.names) == sorted(names) and [len(p) for p in fam.points] == [20, 20, 20]


@pytest.mark.parametrize("how", ["csv short rows", "parquet nulls", "parquet NaN"])
def test_a_row_without_a_distribution_name_is_an_error_with_a_count(how, guarded, capsys):
    import pandas as pd

    g = np.random.default_rng(0)
    if how == "csv short rows":  # the name column last, and two rows that stop before it
        path = guarded / "t.csv"
        path.write_text("x,y,distribution\n" + "".join(f"{g.normal()},{g.normal()},a\n" for _ in range(40))
                        + "".join(f"{g.normal()},{g.normal()},b\n" for _ in range(40)) + "0.5,0.5\n0.1,0.2\n")
    else:
        dist = ["a"] * 40 + ["b"] * 40 + [None] * 2 if how == "parquet nulls" else [1.0] * 40 + [2.0] * 40 + [np.nan] * 2
        path = guarded / "t.parquet"
        pd.DataFrame({"distribution": dist, "x": g.normal(size=82), "y": g.normal(size=82)}).to_parquet(path)
    one_line_error(capsys, ["train", "--data", path, "--out", guarded / "run"] + TINY, "2 row(s)", "distribution")


@pytest.mark.parametrize("make", [
    lambda: np.full((60, 4), 1e30),
    lambda: np.full((60, 4), 3e38, np.float32),
    lambda: np.full((60, 4), 2 ** 62, np.int64),
    lambda: np.full((60, 4), 2 ** 63, np.uint64),
    lambda: np.full((60, 4), -1e20),
    lambda: np.concatenate([np.zeros((59, 4)), np.full((1, 4), 1e25)]),
])
def test_magnitudes_that_overflow_float32_are_named_as_such(make, guarded, capsys):
    g = np.random.default_rng(0)
    np.savez(guarded / "f.npz", a=make(), b=g.normal(size=(60, 4)), c=g.normal(size=(60, 4)))
    line = one_line_error(capsys, ["train", "--data", guarded / "f.npz", "--out", guarded / "run"] + TINY +
                          ["--set", "lr=1e-6"], "overflow")
    assert "diverged" not in line


@pytest.mark.parametrize("low, high", [(-5, 5), (0, 1.5), (-0.1, 1)])
def test_bernoulli_on_data_outside_the_unit_interval_is_refused(low, high, guarded, capsys):
    g = np.random.default_rng(0)
    np.savez(guarded / "f.npz", **{f"d{i}": g.uniform(low, high, (60, 4)).astype("float32") for i in range(3)})
    one_line_error(capsys, ["train", "--data", guarded / "f.npz", "--out", guarded / "run"] + TINY +
                   ["--set", "likelihood=bernoulli"], "bernoulli", "[0, 1]")


def test_a_uint8_family_embeds_as_it_trained(guarded, capsys):
    g = np.random.default_rng(0)
    np.savez(guarded / "f.npz", **{f"d{i}": g.integers(0, 256, (60, 4), dtype=np.uint8) for i in range(3)})
    assert cli(["train", "--data", guarded / "f.npz", "--out", guarded / "run"] + TINY) == 0
    points = np.load(guarded / "f.npz")["d0"][:10]
    np.save(guarded / "q.npy", points)
    np.save(guarded / "qf.npy", points.astype(np.float32) / 255)
    for q in ("q", "qf"):
        assert cli(["embed", "--model", guarded / "run" / "model.pt", "--query", guarded / f"{q}.npy",
                     "--context", guarded / f"{q}.npy", "--out", guarded / f"z_{q}.npy"]) == 0
    np.testing.assert_allclose(np.load(guarded / "z_q.npy"), np.load(guarded / "z_qf.npy"), rtol=1e-5, atol=1e-6)


# 6. memory and mapped files ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting", [["--set", "batch_size=200000"], ["--set", "batch_size=20000", "--set",
                                                                            "context_size=40"]])
def test_a_step_too_big_for_memory_is_refused_naming_the_setting(setting, guarded, capsys, monkeypatch):
    import metavae.training.distributed as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 50 << 20)  # a small machine: 50 MB free
    _family(guarded / "a.npz", n=500)
    one_line_error(capsys, ["train", "--data", guarded / "a.npz", "--out", guarded / "run"] + TINY + setting,
                   "batch_size", "available")


def test_a_billion_queries_are_refused_before_allocating(guarded, capsys):
    _family(guarded / "a.npz")
    one_line_error(capsys, ["train", "--data", guarded / "a.npz", "--out", guarded / "run"] + TINY +
                   ["--set", "batch_size=1000000000"], "batch_size")


SHRINK = """
import sys, numpy as np
from metavae.cli import EXPECTED, describe
from metavae.data.files import read_family
from metavae.data.meta import MetaDataset
fam = read_family(sys.argv[1])
data = MetaDataset(fam.points, val_fraction=0.0, test_fraction=0.0, storage="mapped")
data.sample(8, 3)
with open(sys.argv[1] + "/d1.npy", "r+b") as f:
    f.truncate(int(sys.argv[2]))
try:
    for _ in range(20):
        data.sample(64, 3)
except EXPECTED as e:
    print("metavae: error: " + describe(e), file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("keep", [128, 1000, 4096])
def test_a_mapped_file_that_shrinks_is_one_clear_error(keep, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"d{i}.npy", _typed("float32", n=4000, d=8, seed=i))
    r = subprocess.run([sys.executable, "-c", SHRINK, str(folder), str(keep)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr[-500:])
    assert "d1.npy" in r.stderr and "shrank" in r.stderr and "Traceback" not in r.stderr


# 7. embed and sample ----------------------------------------------------------------------------------
def _ns(path):
    make_model("ns", "mlp", (4,), 1, z_dim=2, c_dim=2, hidden=8, decoder_hidden=8).save(path)
    return path


@pytest.mark.parametrize("case", ["metavae without --context", "query an npz of two arrays", "query a text file",
                                  "query of another shape", "context of another shape", "refine on NS",
                                  "refine without --dist", "query missing", "query 1-D", "query complex"])
def test_embed_misuse_is_one_line(case, guarded, capsys):
    q = guarded / "q.npy"
    np.save(q, np.zeros((3, 4), np.float32))
    model = _metavae(guarded / "m.pt")
    argv = ["embed", "--model", model, "--query", q, "--context", q, "--out", guarded / "z.npy"]
    if case == "metavae without --context":
        argv = ["embed", "--model", model, "--query", q, "--out", guarded / "z.npy"]
    elif case == "query an npz of two arrays":
        np.savez(guarded / "x.npz", a=np.zeros((3, 4)), b=np.zeros((3, 4)))
        argv[4] = guarded / "x.npz"
    elif case == "query a text file":
        (guarded / "x.txt").write_text("1 2 3 4\n")
        argv[4] = guarded / "x.txt"
    elif case == "query of another shape":
        np.save(guarded / "x.npy", np.zeros((3, 5), np.float32))
        argv[4] = guarded / "x.npy"
    elif case == "context of another shape":
        np.save(guarded / "x.npy", np.zeros((3, 5), np.float32))
        argv[6] = guarded / "x.npy"
    elif case == "refine on NS":
        argv = ["embed", "--model", _ns(guarded / "ns.pt"), "--query", q, "--out", guarded / "z.npy",
                "--refine-steps", "3", "--dist", "0"]
    elif case == "refine without --dist":
        argv += ["--refine-steps", "3"]
    elif case == "query missing":
        argv[4] = guarded / "nope.npy"
    elif case == "query 1-D":
        np.save(guarded / "x.npy", np.zeros(4, np.float32))
        argv[4] = guarded / "x.npy"
    elif case == "query complex":
        np.save(guarded / "x.npy", np.zeros((3, 4), np.complex64))
        argv[4] = guarded / "x.npy"
    one_line_error(capsys, argv)
    assert not (guarded / "z.npy").exists()


def test_embed_reads_a_single_array_npz_and_big_endian_points(guarded, capsys):
    model = _metavae(guarded / "m.pt")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.save(guarded / "q.npy", x)
    np.save(guarded / "qbe.npy", x.astype(">f4"))
    np.savez(guarded / "q.npz", points=x)
    outs = []
    for q in ("q.npy", "qbe.npy", "q.npz"):
        assert cli(["embed", "--model", model, "--query", guarded / q, "--context", guarded / q, "--out",
                     guarded / f"z-{q}.npy"]) == 0
        outs.append(np.load(guarded / f"z-{q}.npy"))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


# 8. the Python API ------------------------------------------------------------------------------------
def test_tensors_that_require_grad_train_as_constants(tmp_path):
    g = torch.Generator().manual_seed(0)
    dists = [(torch.randn(60, 2, generator=g) + i).requires_grad_() for i in range(2)]
    data = MetaDataset(dists)
    model = build_mlp_metavae((2,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    Trainer(model, data, TrainConfig(epochs=1, batch_size=8, context_size=4, steps_per_epoch=3), progress=False).fit()
    assert dists[0].grad is None


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "tpu", "nonsense:0"])
def test_moving_data_to_a_device_the_machine_lacks_is_a_value_error(device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    data = MetaDataset([torch.randn(20, 2), torch.randn(20, 2)])
    with pytest.raises(ValueError, match="device|unknown"):
        data.to(device)


@pytest.mark.parametrize("kwargs", [dict(dist=True), dict(dist=1.0), dict(dist="0"), dict(n=3.5), dict(n=True)])
def test_sample_with_a_non_integer_is_a_type_error(kwargs):
    model = build_mlp_metavae((2,), 2, z_dim=2, hidden_widths=(8,), summary_widths=(8,))
    kwargs = {"n": 3, **kwargs}
    with pytest.raises(TypeError, match="integer"):
        model.sample(kwargs.pop("n"), **kwargs)


@pytest.mark.parametrize("dtype", [">f4", "float16", "int16"])
def test_metadataset_takes_numpy_arrays_of_any_real_dtype(dtype):
    data = MetaDataset([_typed(dtype, seed=i) for i in range(2)])
    assert data.sample(4, 3).x.dtype == torch.float32


# 9. wording ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("occupant", ["folder", "file's parent is a file"])
def test_an_occupied_out_names_out_not_a_temporary(occupant, guarded, capsys):
    model = _metavae(guarded / "m.pt")
    np.save(guarded / "q.npy", np.zeros((3, 4), np.float32))
    if occupant == "folder":
        out = guarded / "z.npy"
        out.mkdir()
    else:
        (guarded / "afile").write_text("mine")
        out = guarded / "afile" / "z.npy"
    line = one_line_error(capsys, ["embed", "--model", model, "--query", guarded / "q.npy", "--context",
                                   guarded / "q.npy", "--out", out], str(out))
    assert TMP_MARK not in line and ".tmp" not in line
    assert (guarded / "afile").read_text() == "mine" if occupant != "folder" else out.is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_names_out(guarded, capsys):
    model = _metavae(guarded / "m.pt")
    np.save(guarded / "q.npy", np.zeros((3, 4), np.float32))
    ro = guarded / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_line_error(capsys, ["embed", "--model", model, "--query", guarded / "q.npy", "--context",
                                       guarded / "q.npy", "--out", ro / "z.npy"], "z.npy")
        assert ".tmp" not in line and TMP_MARK not in line
    finally:
        ro.chmod(0o755)


def test_a_failed_write_names_the_target_even_when_the_os_names_the_temporary(tmp_path, monkeypatch):
    import errno

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".z.npy.abcdefgh.metavae-tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(b"x", tmp_path / "z.npy")
    assert e.value.filename == str(tmp_path / "z.npy")


# 10. metavae run mnist-* --data-dir on other data --------------------------------------------------------
def _idx(path: Path, array: np.ndarray) -> None:
    import struct

    magic = 0x00000803 if array.ndim == 3 else 0x00000801
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
                     + array.astype(np.uint8).tobytes())


def test_other_idx_data_is_never_labelled_mnist(guarded, capsys):
    from metavae.paper.mnist import data_label

    g = np.random.default_rng(0)
    folder = guarded / "fashion"
    folder.mkdir()
    for stem, n in (("train", 1200), ("t10k", 1000)):
        _idx(folder / f"{stem}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28)))
        _idx(folder / f"{stem}-labels-idx1-ubyte", g.integers(0, 10, n))
    out = guarded / "run"
    assert cli(["run", "mnist-rotate", "--data-dir", folder, "--out", out, "--quiet", "--set", "train_images=60",
                 "--set", "test_images=40", "--set", "epochs=1", "--set", "batch_size=20"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"] == "idx:fashion" and "MNIST" not in (out / "report.md").read_text().splitlines()[0]
    assert "not MNIST" in capsys.readouterr().err
    assert data_label(None, None, None) == "mnist"
    x = g.integers(0, 256, (1000, 28, 28)).astype(np.uint8)
    assert data_label(folder, x, x) == "idx:fashion"


def test_the_official_images_are_labelled_mnist(shared_mnist):
    from metavae.paper.data.mnist import load_mnist
    from metavae.paper.mnist import data_label

    tr, te = load_mnist(shared_mnist, "train")[0], load_mnist(shared_mnist, "test")[0]
    assert data_label(shared_mnist, tr, te) == "mnist"
    assert data_label(shared_mnist, tr, te.flip(0)) != "mnist"


def test_metrics_files_stay_valid_json_with_non_finite_values(tmp_path):
    """A NaN or -inf in metrics (a log-likelihood a model cannot score) becomes null, never NaN."""
    import json

    from metavae.io import write_json

    path = write_json({"log_likelihood": float("-inf"), "per": [float("nan"), 1.0], 3: 2.0}, tmp_path / "m.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"log_likelihood": None, "per": [None, 1.0], "3": 2.0}


@pytest.mark.parametrize("dtype", ["<f2", ">f4", "bool", "int16"])
def test_a_single_npy_is_read_as_a_training_folders_files_are(tmp_path, dtype):
    """One .npy file (what `train`, `embed --data` and `evaluate` may get) converts dtypes exactly as a
    folder of .npy files does: one reader, not two."""
    from metavae.data.files import read_family, read_npy

    a = (np.arange(40).reshape(20, 2) % 2).astype(dtype)
    np.save(tmp_path / "d0.npy", a)
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "d0.npy", a)
    one, many = read_npy(tmp_path / "d0.npy").points[0], read_family(folder).points[0]
    assert one.dtype == many.dtype and np.array_equal(one, many)
