"""The training order of an epoch, resumable mid-epoch: a permutation fixed by ``seed + epoch``
whose sampler hands the dataset ``(epoch, index)`` pairs, so a sample's randomness can be a
pure function of (seed, epoch, index) in any worker and after any resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` order (a permutation seeded by ``seed + epoch``, split over
    ranks) that can leave out the first ``skip`` indices of one pass.

    Yields ``(epoch, index)`` pairs: the dataset then knows the epoch in any worker process
    (a worker's copy of the dataset never sees ``set_epoch``).
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter([(self.epoch, i) for i in indices])


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
