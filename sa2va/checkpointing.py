"""Checkpoints that survive crashes, and training that resumes exactly where it stopped.

* :class:`AtomicCheckpointIO` (``trainer.plugins``): writes to a temp file in the target
  folder, fsyncs, then renames over the old file, so a crash mid-write leaves the previous
  checkpoint intact; on load it checks the archive's CRCs and refuses pickled code.
  Lightning's own writer stages through fsspec's temp file in the system temp folder and then
  *copies* it over the target when that folder is on another file system (cluster scratch vs
  local /tmp), keeping the whole checkpoint in memory twice on the way.
* :class:`ResumableSampler` + :class:`ResumableDataLoader`: the training order of an epoch is
  a permutation fixed by ``seed + epoch``; Lightning saves the loader's position in each
  checkpoint and a resumed run skips the batches the epoch already trained on.
* :class:`RNGState` (callback): python / NumPy / torch / CUDA generator states travel in the
  checkpoint, so dropout and random augmentation continue as if never interrupted.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sa2va.utils import atomic_open


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch archive whose CRCs
    match (a truncated file has no zip directory; flipped bytes fail their record's CRC)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path}: truncated or not a checkpoint ({e}); "
            "resume from an earlier checkpoint of the run"
        ) from e
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (CRC mismatch in {bad})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic, durable checkpoint writes; verified, ``weights_only`` loads (local paths).

    Remote URLs (``s3://``...) go through Lightning's fsspec path unchanged.
    """

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if _is_remote(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_open(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Always ``weights_only``: this project's checkpoints hold nothing that needs more."""
        if _is_remote(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path, map_location, verify=self.verify)


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", verify: bool = True
) -> dict[str, Any]:
    """A Lightning checkpoint file, CRC-checked, holding only tensors and plain containers
    (anything else would be code run by the unpickler); every failure names the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if verify:
        verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"{path}: cannot load checkpoint: it holds a pickled "
            f"{found[1] if found else 'Python object'}, which could run code when loaded; "
            "refused (only tensors and plain containers load)"
        ) from e
    except Exception as e:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CheckpointError(f"{path}: cannot load checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


# ------------------------------------------------------------------ resumable data order


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` order (a permutation seeded by ``seed + epoch``, split over
    ranks) that can leave out the first ``skip`` indices of one pass."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A training loader Lightning checkpoints (it saves ``state_dict()`` of any loader that
    has one): the epoch and the number of its batches already handed to the training loop.

    Batches are counted as this loader yields them; Lightning does not prefetch from loaders
    with a length, so the count at checkpoint time is the number of batches trained on.
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...)")
        self.batches_done = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: runs at the first batch, after Lightning's `set_epoch` (which comes
        # after `iter()` when a run resumes), so the sampler sees the right epoch.
        resume, self._resume = self._resume, None
        start = resume["batches"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.skip = start * (self.batch_size or 1)
        self.batches_done = start
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


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
    """Saves the generator states in each checkpoint and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict)
