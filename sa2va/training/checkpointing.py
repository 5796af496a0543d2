"""Checkpoints that survive crashes, and training that resumes exactly where it stopped.

* :class:`AtomicCheckpointIO` (``trainer.plugins``): writes to a temp file in the target
  folder, fsyncs, then renames over the old file, so a crash mid-write leaves the previous
  checkpoint intact; on load it checks the archive's CRCs and refuses pickled code.
  Lightning's own writer stages through fsspec's temp file in the system temp folder and then
  *copies* it over the target when that folder is on another file system (cluster scratch vs
  local /tmp), keeping the whole checkpoint in memory twice on the way.
* :class:`ResumableSampler` + :class:`ResumableDataLoader`: the training order of an epoch is
  a permutation fixed by ``seed + epoch``; Lightning saves the loader's position in each
  checkpoint and a resumed run skips the batches the epoch already trained on. The sampler
  hands the dataset ``(epoch, index)`` pairs, so a sample's augmentation can be a pure
  function of (seed, epoch, index), the same in any worker and after any resume.
* :class:`RNGState` (callback): python / NumPy / torch / CUDA generator states travel in the
  checkpoint and are put back just before the first training step after a resume (a
  restart draws from the global generators while it builds the model and the loaders), so
  dropout continues as if never interrupted. Validation leaves the states as it found them.
* :class:`Preemption` (callback): SIGUSR1 (SLURM's ``--signal``) or SIGTERM -> a checkpoint
  at the next optimiser-step boundary, then exit with :data:`REQUEUE_EXIT_CODE`; the next
  ``train()`` in the same run dir resumes from it with no arguments.
* A full disk (``ENOSPC``) while writing a checkpoint leaves the previous file as it was and
  raises :class:`DiskFullError` (one line: the file, the space needed and free);
  :class:`ResumeCheckpoint` logs it and training goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sa2va.model.trained import (
    DiskFullError,
    disk_full_error,
    is_remote,
    load_checkpoint,
    tensor_bytes,
)
from sa2va.utils import atomic_open

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic, durable checkpoint writes; verified, ``weights_only`` loads (local paths).

    Remote URLs (``s3://``...) go through Lightning's fsspec path unchanged.
    """

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if is_remote(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_open(path) as f:
                torch.save(checkpoint, f)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise disk_full_error(path, tensor_bytes(checkpoint), e) from e

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Always ``weights_only``: this project's checkpoints hold nothing that needs more."""
        if is_remote(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path, map_location, verify=self.verify)


# ------------------------------------------------------------------ resumable data order


# ------------------------------------------------------------------ RNG state


def rng_states() -> dict[str, Any]:
    """Every global generator's state as tensors and plain values.

    Hand-written because Lightning's `_collect_rng_states` is private and keeps NumPy's state
    as an ndarray, which `torch.load(weights_only=True)` refuses.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    numpy_state["state"] = {**numpy_state["state"], "key": key}
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGState(L.Callback):
    """Saves the generator states in each checkpoint and restores them at the step boundary.

    A checkpoint is written right after an optimiser step; nothing between that and the next
    training step draws from the global generators in an uninterrupted run (the loaders have
    their own generators, augmentation its own seeds, and validation is wrapped so it gives
    back the states it found). A resumed run, though, draws while it rebuilds the model and
    starts its loaders, so the saved states are set just before its first training batch.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's states (``ranks``: one entry per rank): only rank 0 writes the file,
        and under DDP each rank has its own generators. Lightning builds the checkpoint on
        every rank, so the gather has all ranks taking part."""
        states = rng_states()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return {"ranks": [states]}
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """This rank's states (rank 0's when the run had fewer ranks; a checkpoint from
        before per-rank states holds one set)."""
        ranks = state_dict.get("ranks", [state_dict])
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._pending = ranks[rank] if rank < len(ranks) else ranks[0]

    def on_train_batch_start(self, *args: Any) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_validation_start(self, *args: Any) -> None:
        self._before_validation = rng_states()

    def on_validation_end(self, *args: Any) -> None:
        if self._before_validation is not None:
            set_rng_states(self._before_validation)
            self._before_validation = None


# ------------------------------------------------------------------ full disk


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N steps that survives a full disk: the failed write is one error
    line and training goes on (the previous ``last.ckpt`` stays whole and loadable). A
    full disk is a reason to lose a few steps at a crash, not a whole run."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except DiskFullError as e:
            log.error("%s; training goes on", e)


# ------------------------------------------------------------------ preemption

# Exit status of a preempted run: EX_TEMPFAIL of sysexits.h ("temporary failure, try again").
REQUEUE_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str) -> None:
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Preemption(L.Callback):
    """SIGUSR1 / SIGTERM: finish the optimiser step under way, write ``dirpath/preempted.ckpt``
    and exit with :data:`REQUEUE_EXIT_CODE`.

    The signal handler only records the signal: the checkpoint is written between two
    optimiser steps (a write from inside the handler could catch an optimiser step half
    done), and a second signal while it is written changes nothing. ``requeue``: under SLURM
    (``SLURM_JOB_ID`` set) rank 0 then runs ``scontrol requeue`` (trainer=slurm). These
    handlers replace Lightning's for the two signals during ``fit``; Lightning puts back the
    previous handlers when ``fit`` ends.
    """

    FILENAME = "preempted.ckpt"

    def __init__(self, dirpath: str | Path, requeue: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.received: int | None = None
        self._step_at_batch_start = -1

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    def _record(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.received = None
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._record)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_at_batch_start:  # mid accumulation window
            return
        # every rank stops at the same step even when the signal reached them apart
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = signal.Signals(self.received).name if self.received else "another rank's signal"
        trainer.save_checkpoint(self.path)
        if self.requeue and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            self._requeue()
        raise Preempted(
            f"{name}: checkpoint {self.path} written after step {trainer.global_step}; "
            f"exiting with status {REQUEUE_EXIT_CODE} (restart in the same run dir to resume)"
        )

    @staticmethod
    def _requeue() -> None:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
        result = subprocess.run(["scontrol", "requeue", job], check=False)
        if result.returncode != 0:
            log.error("scontrol requeue %s failed (status %d)", job, result.returncode)


def preempted_checkpoint(callbacks: list[L.Callback]) -> Path | None:
    """The checkpoint a preempted run left in this run dir, if any (resume from it)."""
    for callback in callbacks:
        if isinstance(callback, Preemption) and callback.path.is_file():
            return callback.path
    return None
