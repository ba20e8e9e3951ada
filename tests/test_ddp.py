"""Multi-process training (torchrun, 2 CPU processes, gloo) matches a single process, and resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd, out: Path, epochs: int, *extra: str) -> dict:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + [str(WORKER), str(out), str(epochs), *extra], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_process_ddp_matches_single_process_and_resumes(tmp_path):
    single = _run([sys.executable], tmp_path / "single", epochs=3)
    _run(TORCHRUN, tmp_path / "ddp", epochs=2)  # stops after 2 epochs...
    ddp = _run(TORCHRUN, tmp_path / "ddp", epochs=3)  # ...and a new launch resumes for the third
    assert len(ddp["train_loss"]) == 3
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert ddp["weights"] == pytest.approx(single["weights"], rel=1e-3, abs=1e-4)
    assert not list((tmp_path / "ddp" / "ckpt").glob(".*tmp*"))  # one writer, atomic files


def test_distributions_per_step_under_ddp_matches_single_process(tmp_path):
    """Under torchrun the decoder rows' gradients are dense (DDP all-reduces dense tensors only) and
    `RowAdam` is told the step's rows: the same trajectory as one process's sparse-gradient run."""
    single = _run([sys.executable], tmp_path / "single", 2, "2")
    ddp = _run(TORCHRUN, tmp_path / "ddp", 2, "2")
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert ddp["weights"] == pytest.approx(single["weights"], rel=1e-3, abs=1e-4)
    full = _run([sys.executable], tmp_path / "full", 2)
    assert full["weights"] != pytest.approx(single["weights"], rel=1e-3, abs=1e-4)  # the subset did change training
