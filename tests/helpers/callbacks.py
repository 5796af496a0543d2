"""Callbacks that interrupt a training run, named by `_target_` in test runs (also in
subprocesses started from the repository root: this module imports only sa2va and Lightning)."""

from __future__ import annotations

import os
import signal

import lightning as L

from sa2va.training.checkpointing import Preemption


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


class CrashAt(L.Callback):
    """Die after optimiser step ``step``: raise, or SIGKILL the process (as the OOM killer or a
    lost node: no handler runs). Checkpoint callbacks run after this one, so the newest
    checkpoint is the previous step's."""

    def __init__(self, step: int, sigkill: bool = False) -> None:
        self.step, self.sigkill = step, sigkill

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            if self.sigkill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"simulated crash after step {self.step}")
