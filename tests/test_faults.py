"""The fault suite: each case a hostile but realistic user hits, and the outcome it must get
(a clear one-line error and a non-zero exit, or the right result). Offline, seconds."""
import gzip
import http.client
import json
import os
import struct

import numpy as np
import pytest
import torch

from metavae import Gaussian, MetaDataset, TrainConfig, Trainer, build_mlp_metavae
from metavae.cli import main
from metavae.paper.data import mnist
from metavae.paper.data.norb import read_matrix
from metavae.paper import get_experiment
from metavae.settings import resolve_preset
from metavae.io import RunFolder, RunLocked, atomic_save, cache_root

TINY_MOG = ["--quiet", "--set", "epochs=1", "--set", "steps_per_epoch=3", "--set", "test_mixtures=5",
            "--set", "train_mixtures=[2]", "--set", "points_per_mixture=100", "--set", "test_points=50",
            "--set", "context_size=8", "--set", "batch_size=8"]


def _data(k=2):
    g = torch.Generator().manual_seed(0)
    return MetaDataset([torch.randn(60, 2, generator=g) + i for i in range(k)])


def _model(k=2):
    return build_mlp_metavae((2,), n_decoders=k, z_dim=2, likelihood=Gaussian(1.0), hidden_widths=(8,), summary_widths=(8,))


def _cfg(epochs=1):
    return TrainConfig(epochs=epochs, batch_size=8, context_size=4, steps_per_epoch=3)


# 1. code execution from a checkpoint -------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="refused unread"):
        Trainer(_model(), _data(), _cfg(), out_dir=tmp_path, progress=False).fit()
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    Trainer(_model(), _data(), _cfg(), out_dir=tmp_path, progress=False).fit()
    for name in ("last.pt", "best.pt"):
        torch.load(tmp_path / name, weights_only=True)  # raises if anything but tensors and plain data


# 2. resume knows what it resumes -----------------------------------------------------------
def test_resume_into_another_runs_folder_is_refused(tmp_path):
    Trainer(_model(), _data(), _cfg(), out_dir=tmp_path, progress=False,
            run_info={"experiment": "mnist-rotate", "data": {"train_images": 1000}}).fit()
    with pytest.raises(ValueError, match="belongs to another run.*experiment: checkpoint 'mnist-rotate', now "
                                         "'mnist-shear'"):
        Trainer(_model(), _data(), _cfg(2), out_dir=tmp_path, progress=False,
                run_info={"experiment": "mnist-shear", "data": {"train_images": 1000}}).fit()
    with pytest.raises(ValueError, match="data"):
        Trainer(_model(), _data(), _cfg(2), out_dir=tmp_path, progress=False,
                run_info={"experiment": "mnist-rotate", "data": {"train_images": 500}}).fit()


def test_fewer_epochs_than_trained_reports_what_was_trained(tmp_path):
    out = tmp_path / "mog"
    assert main(["run", "mog", "--out", str(out)] + TINY_MOG + ["--set", "epochs=2"]) == 0  # the last --set wins
    assert main(["run", "mog", "--out", str(out)] + TINY_MOG) == 0  # epochs=1 on a 2-epoch checkpoint
    lines = (out / "checkpoints" / "vae" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


# 3. settings checked by type and range ------------------------------------------------------
@pytest.mark.parametrize("experiment,setting,message", [
    ("mog", "grad_clip=-1", "must be positive"),
    ("mog", "epochs=true", "expects an int"),
    ("mog", "hidden=[-5]", "positive integers"),
    ("mog", "train_mixtures=[]", "must not be empty"),
    ("mog", "lr=nan", "expects a float"),
    ("mnist-rotate", "train_images=-1", "must be positive"),
    ("mnist-rotate", "context_pool=0", "must be positive"),
    ("mnist-rotate", "context_pool=abc", "expects an int or null"),
    ("mnist-rotate", "embed_chunk=0", "must be positive"),
    ("mnist-rotate", "init=kaiming", "one of default, xavier"),
    ("mnist-rotate", "epochs=null", "cannot be null"),
])
def test_bad_settings_are_refused_before_any_data_loads(experiment, setting, message, capsys, tmp_path):
    args = ["run", experiment, "--out", str(tmp_path / "o"), "--set", setting, "--data-dir", str(tmp_path / "none")]
    if experiment == "mog":
        args = args[:-2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "nowhere" not in err


def test_null_and_off_settings_that_should_pass():
    assert resolve_preset(get_experiment("mnist-rotate").presets, "quick", {"train_images": "null"}).train_images is None
    assert resolve_preset(get_experiment("mog").presets, None, {"grad_clip": "null"}).grad_clip is None
    with pytest.raises(ValueError, match="grad_clip' must be positive"):
        TrainConfig(grad_clip=-1.0)


# 4. bad data ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_points_are_named(bad):
    dists = [torch.randn(50, 2), torch.randn(50, 2)]
    dists[1][7, 1] = bad
    with pytest.raises(ValueError, match="distribution 1: point 7 holds a non-finite value"):
        MetaDataset.from_parts(train=dists)


def test_float64_is_cast_and_trains():
    data = MetaDataset([np.random.default_rng(0).normal(size=(60, 2)) for _ in range(2)])
    assert data.part("train").data.dtype == torch.float32
    Trainer(_model(), data, _cfg(), progress=False).fit()


def _idx(path, magic, shape, payload: bytes):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
    path.write_bytes(gzip.compress(header + payload))


def test_mnist_labels_out_of_range_are_refused(tmp_path):
    _idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803, (3, 28, 28), bytes(3 * 784))
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, (3,), bytes([1, 200, 3]))
    with pytest.raises(ValueError, match="label 200 at index 1 is not a digit"):
        mnist.load_mnist(tmp_path, "train")


def test_norb_header_promising_2_to_31_rows_fails_before_allocating(tmp_path):
    path = tmp_path / "huge.mat"
    path.write_bytes(struct.pack("<ii4i", 0x1E3D4C55, 4, 2**31 - 1, 2, 96, 96) + bytes(64))
    with pytest.raises(ValueError, match="corrupt header.*file can hold at most"):
        read_matrix(path)


# 5. one line instead of a traceback -----------------------------------------------------------
def test_diverging_training_is_one_line(capsys, tmp_path):
    assert main(["run", "mog", "--out", str(tmp_path / "o"), "--set", "lr=1e30", "--set", "grad_clip=null"]
                + TINY_MOG) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "Traceback" not in err


def test_corrupt_checkpoint_is_one_line(capsys, tmp_path):
    out = tmp_path / "o"
    (out / "checkpoints" / "vae").mkdir(parents=True)
    (out / "checkpoints" / "vae" / "last.pt").write_bytes(b"garbage")
    assert main(["run", "mog", "--out", str(out)] + TINY_MOG) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_unwritable_out_is_found_before_training(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "mog", "--out", str(blocker / "run")] + TINY_MOG) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "is not writable" in err and len(err.strip().splitlines()) == 1


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    import metavae.io as mio

    real = mio.atomic_write

    def full(path, write, binary=True):
        if str(path).endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write, binary)

    monkeypatch.setattr(mio, "atomic_write", full)
    assert main(["run", "mog", "--out", str(tmp_path / "o")] + TINY_MOG) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


def test_download_retries_the_next_mirror_after_a_short_read(tmp_path, monkeypatch):
    payload = b"hello"
    import hashlib

    calls = []

    def fetch(url, dest):
        calls.append(url)
        if "first" in url:
            raise http.client.IncompleteRead(b"he", 3)
        open(dest, "wb").write(payload)

    got = mnist.fetch_verified("f.gz", tmp_path, ["http://first/", "http://second/"],
                               hashlib.md5(payload).hexdigest(), fetch)
    assert got.read_bytes() == payload and len(calls) == 2


def test_all_mirrors_failing_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path / "cache"))

    def fetch(url, dest):
        raise http.client.IncompleteRead(b"", 1)

    monkeypatch.setattr(mnist, "_fetch", fetch)
    assert main(["run", "mnist-rotate", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "IncompleteRead" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_cached_download_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path))
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"damaged")
    fetched = []
    monkeypatch.setattr(mnist, "_fetch", lambda url, dest: fetched.append(url) or open(dest, "wb").write(b"x"))
    with pytest.raises(mnist.DownloadError):  # our stub serves a wrong file too: md5 still refuses it
        mnist.load_mnist(None, "test")
    assert fetched and not (folder / "t10k-images-idx3-ubyte.gz").exists()


# 6. one run per folder, no litter, consistent logs ----------------------------------------------
def test_a_second_run_into_a_busy_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    with RunFolder(out):
        assert main(["run", "mog", "--out", str(out)] + TINY_MOG) == 2
        assert "in use by another metavae run" in capsys.readouterr().err
        with pytest.raises(RunLocked):
            RunFolder(out).__enter__()
    with RunFolder(out):  # released on exit
        pass


def test_temporaries_of_killed_runs_are_cleared_and_failed_writes_leave_none(tmp_path):
    stale = tmp_path / "checkpoints" / ".last.pt.abc12_yz.metavae-tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 100)
    with RunFolder(tmp_path):
        assert not stale.exists()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Boom()}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


def test_metrics_log_catches_up_after_a_kill_between_checkpoint_and_log(tmp_path):
    Trainer(_model(), _data(), _cfg(2), out_dir=tmp_path, progress=False).fit()
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text().splitlines()[0] + "\n")  # as if killed right after the rename
    Trainer(_model(), _data(), _cfg(2), out_dir=tmp_path, progress=False).fit()
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]


# 8. writes outside --out are documented and cleanable ---------------------------------------------
def test_cache_info_and_clear(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path))
    assert cache_root() == tmp_path
    (tmp_path / "mnist" / "transforms").mkdir(parents=True)
    (tmp_path / "mnist" / "transforms" / "a.pt").write_bytes(b"x" * 1000)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"y" * 10)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "mnist/transforms" in out and "derived, safe to clear" in out
    assert main(["cache", "clear"]) == 0
    assert not (tmp_path / "mnist" / "transforms").exists()
    assert (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").exists()  # downloads kept unless --downloads


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    Trainer(_model(), _data(), _cfg(), out_dir=tmp_path, progress=False, run_info={"settings": {"lr": 1}}).fit()
    later = {"settings": {"lr": 1, "free_bits": 0.0}}
    Trainer(_model(), _data(), _cfg(2), out_dir=tmp_path, progress=False, run_info=later,
            run_info_defaults={"settings.free_bits": 0.0}).fit()  # resumes
    with pytest.raises(ValueError, match="settings.free_bits: checkpoint 0.0, now 0.5"):  # the resume recorded it
        Trainer(_model(), _data(), _cfg(3), out_dir=tmp_path, progress=False,
                run_info={"settings": {"lr": 1, "free_bits": 0.5}}, run_info_defaults={"settings.free_bits": 0.0}).fit()


def test_torchrun_ranks_share_rank_zeros_lock(tmp_path, monkeypatch):
    with RunFolder(tmp_path):  # rank 0 holds the folder
        monkeypatch.setenv("RANK", "1")
        with RunFolder(tmp_path):  # another rank of the same run is not refused
            pass
