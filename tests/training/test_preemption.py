"""Preemption: SIGUSR1 (SLURM's --signal) or SIGTERM -> a checkpoint at the next step
boundary and exit status 75; the same command again in the same run dir ends exactly where
an uninterrupted run ends. A second signal during that write changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from helpers.resume import RANDOM, RESUMABLE, assert_same_end, uninterrupted
from omegaconf import open_dict

from sa2va.training.checkpointing import REQUEUE_EXIT_CODE, Preempted, Preemption
from sa2va.training.run import train
from sa2va.utils import REPO_ROOT


class SignalAt(L.Callback):
    """Sends ``signum`` to this process after optimiser step ``step``."""

    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalDuringPreemptionSave(L.Callback):
    """Sends SIGTERM to this process while the preemption checkpoint is being written
    (Lightning calls ``on_save_checkpoint`` in the middle of the save)."""

    def on_save_checkpoint(self, trainer: L.Trainer, *args: object) -> None:
        (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        if preemption.received is not None:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_at_the_step_boundary_and_a_restart_resumes_exactly(
    compose_cfg, tmp_path
):
    expected_summary, expected = uninterrupted(compose_cfg, RANDOM)
    run_dir = tmp_path / "run"

    def run(*extra: str) -> dict:
        cfg = compose_cfg(*RESUMABLE, *RANDOM, *extra)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        return train(cfg)

    with pytest.raises(Preempted) as stop:
        run(
            "+callbacks.signal._target_=tests.training.test_preemption.SignalAt",
            "+callbacks.signal.step=3",
        )
    assert stop.value.code == REQUEUE_EXIT_CODE
    assert "SIGTERM" in str(stop.value) and "after step 4" in str(stop.value)
    preempted = run_dir / "checkpoints" / "preempted.ckpt"
    assert torch.load(preempted, weights_only=True)["global_step"] == 4  # the step under way
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["status"] == "preempted" and str(preempted) in written["error"]

    assert_same_end(run(), run_dir, expected_summary, expected)  # no ckpt_path
    assert not preempted.exists()  # finished: a later start begins no second resume


@pytest.mark.slow
def test_sigusr1_to_a_training_process_then_the_same_command_ends_exactly(
    compose_cfg, tmp_path, cache_dir
):
    """A real signal from outside, at whatever step the process has reached, and a second
    one (SIGTERM) while the checkpoint is being written."""
    expected_summary, expected = uninterrupted(compose_cfg, RANDOM)
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "sa2va.train",
        *RESUMABLE,
        *RANDOM,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        "+callbacks.second._target_=tests.training.test_preemption.SignalDuringPreemptionSave",
    ]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    step = torch.load(run_dir / "checkpoints" / "preempted.ckpt", weights_only=True)
    assert 1 <= step["global_step"] < 8

    restart = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert_same_end(summary, run_dir, expected_summary, expected)
