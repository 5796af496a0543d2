"""A real two-process DDP run of the tiny model on CPU, through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.configs import FAST_TRAIN

from sa2va.utils import REPO_ROOT


@pytest.mark.slow
def test_two_process_cpu_ddp_run_completes(tmp_path, cache_dir):
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "sa2va.train",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *FAST_TRAIN,
        "logger=none", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert 0 <= summary["metrics"]["val/dice"] <= 1
    assert (run / "train_ddp_process_1.log").is_file()  # the second rank ran
    assert (run / "checkpoints" / "last.ckpt").is_file()
