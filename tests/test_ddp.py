"""Multi-process training (torchrun, 2 CPU processes, gloo) matches a single process, and resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(cmd, out: Path, epochs: int) -> dict:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + [str(WORKER), str(out), str(epochs)], capture_output=True, text=True, env=env,
                          timeout=300)
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
