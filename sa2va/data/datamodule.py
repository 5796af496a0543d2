"""LightningDataModule for OCT vessel frames and clips.

Records are split by video (neighbouring frames are near-duplicates, so a frame-level split
leaks). Datasets yield raw frames, prompts and answers; the model's processor turns them into
tensors, and the dataset adds the ground-truth masks rasterised at ``processor.mask_size``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from sa2va.data.annotations import (
    DEFAULT_CATEGORY_NAMES,
    DEFAULT_VIDEO_PATTERN,
    BadRecord,
    FrameRecord,
    OnBadRecord,
    group_videos,
    load_annotations,
)
from sa2va.data.augment import ClipAugment
from sa2va.data.sampling import ResumableDataLoader, ResumableSampler
from sa2va.data.synth import default_cache_dir, ensure_synthetic_dataset

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class Processor(Protocol):
    """What the model supplies: frames + one prompt/answer per object -> tensors."""

    mask_size: int

    def __call__(
        self, frames: list[Image.Image], prompts: list[str], answers: list[str]
    ) -> dict[str, torch.Tensor]: ...

    def collate(self, samples: list[dict]) -> dict: ...


def split_videos(
    video_ids: Sequence[str], ratios: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0
) -> dict[str, list[str]]:
    """Assign whole videos to train/val/test with a seeded shuffle.

    Each split with a positive ratio gets at least one video when there are enough (three for
    all splits; with two videos val wins over test), and train always gets one.
    """
    ids = sorted(set(video_ids))
    n = len(ids)
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios}")
    r = r / r.sum()
    counts = [0, round(r[1] * n), round(r[2] * n)]
    for i in (1, 2):
        if r[i] > 0:
            counts[i] = max(counts[i], 1)
    while n - counts[1] - counts[2] < min(1, n):
        counts[2 if counts[2] else 1] -= 1
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    val, test = order[: counts[1]], order[counts[1] : counts[1] + counts[2]]
    train = order[counts[1] + counts[2] :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def sliding_clips(
    frames: Sequence[FrameRecord], clip_len: int, stride: int = 1
) -> list[list[FrameRecord]]:
    """Every ``clip_len`` window (step ``stride``); a shorter video is one shorter clip."""
    frames = list(frames)
    if len(frames) <= clip_len:
        return [frames]
    return [frames[s : s + clip_len] for s in range(0, len(frames) - clip_len + 1, stride)]


def chunk_clips(frames: Sequence[FrameRecord], length: int) -> list[list[FrameRecord]]:
    """Consecutive non-overlapping pieces covering every frame once (for evaluation)."""
    frames = list(frames)
    return [frames[s : s + length] for s in range(0, len(frames), length)]


def load_rgb(path: str | Path) -> Image.Image:
    """Any image file -> 8-bit RGB; 16-bit/float images are min-max scaled, not clipped."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            arr = np.asarray(img, dtype=np.float64)
            if arr.ndim == 3:
                arr = arr[..., 0]
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            return Image.fromarray(np.rint(arr).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def conversation(
    prompt_template: str, answer_template: str, names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """One prompt and one teacher-forced answer per object, ``{name}`` filled in: the text
    that training, evaluation and the benchmarks show the model."""
    prompts = [prompt_template.format(name=n) for n in names]
    return prompts, [answer_template.format(name=n) for n in names]


def frame_key(record: FrameRecord) -> str:
    """Path plus size and modification time, so a rewritten image file gets a new key."""
    stat = Path(record.image_path).stat()
    return f"{record.image_path}:{stat.st_size}:{stat.st_mtime_ns}"


def default_num_workers() -> int:
    """``min(4, cores - 1)``, at least 1: loading overlaps the model step, and one core is
    left to the main process (the cores this process may use, not the machine's)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


class OCTClipDataset(Dataset):
    """Clips of consecutive frames -> processor sample + masks (T, M, S, S).

    Objects are those of the clip's first frame, in order; a frame lacking one of them gets an
    empty mask for it, so every frame of a clip has the same M. Without a processor the raw
    ``frames``/``prompts``/``answers`` are returned and masks are at the image size.
    """

    def __init__(
        self,
        clips: Sequence[Sequence[FrameRecord]],
        processor: Processor | None = None,
        prompt_template: str = "<image>\nPlease segment the {name}.",
        answer_template: str = "Sure, [SEG].",
        hflip_prob: float = 0.0,
        augment_seed: int = 0,
        augment: ClipAugment | None = None,
    ) -> None:
        self.clips = [list(c) for c in clips]
        self.processor = processor
        self.prompt_template = prompt_template
        self.answer_template = answer_template
        self.hflip_prob = hflip_prob
        self.augment_seed = augment_seed
        self.augment = augment if augment is not None and augment.enabled else None

    def __len__(self) -> int:
        return len(self.clips)

    def flips(self, epoch: int, index: int) -> bool:
        """Whether sample ``index`` is flipped in ``epoch``: a pure function of (augment_seed,
        epoch, index), so neither the worker that loads it nor a resume can change it."""
        if self.hflip_prob <= 0:
            return False
        rng = np.random.default_rng([self.augment_seed, epoch, index])
        return bool(rng.random() < self.hflip_prob)

    def augmented(
        self, frames: list[Image.Image], masks: torch.Tensor, epoch: int, index: int
    ) -> tuple[list[Image.Image], torch.Tensor]:
        """The clip through ``augment``, its frames first brought to the masks' size so one
        warp serves both (the processor resizes frames for its views anyway)."""
        assert self.augment is not None
        height, width = masks.shape[-2:]
        pixels = np.stack([np.asarray(f.resize((width, height), Image.BILINEAR)) for f in frames])
        key = (self.augment_seed, epoch, index)
        pixels, warped = self.augment(pixels, masks.numpy(), key)
        return [Image.fromarray(p) for p in pixels], torch.from_numpy(warped)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key``: an index, or ``(epoch, index)`` from the training sampler (an index alone
        is epoch 0)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        clip = self.clips[index]
        names = clip[0].object_names
        frames = [load_rgb(r.image_path) for r in clip]
        if self.processor is not None:
            out_hw = (int(self.processor.mask_size),) * 2
        else:
            out_hw = clip[0].image_hw
        masks = torch.from_numpy(np.stack([[r.mask(n, out_hw) for n in names] for r in clip]))
        if self.flips(epoch, index):  # the same flip for the whole clip
            frames = [f.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for f in frames]
            masks = masks.flip(-1)
        if self.augment is not None:
            frames, masks = self.augmented(frames, masks, epoch, index)
        prompts, answers = conversation(self.prompt_template, self.answer_template, names)
        if self.processor is not None:
            sample = dict(self.processor(frames, prompts, answers))
        else:
            sample = {"frames": frames, "prompts": prompts, "answers": answers}
        sample["masks"] = masks
        sample["video_id"] = clip[0].video_id
        sample["frame_indices"] = [r.frame_index for r in clip]
        sample["image_paths"] = [str(r.image_path) for r in clip]
        # Names each frame's pixels for the model's frozen-encoder feature cache; left out
        # (None) while random augmentation makes them differ from the file's.
        randomised = self.hflip_prob > 0 or self.augment is not None
        sample["frame_keys"] = None if randomised else [frame_key(r) for r in clip]
        return sample


class OCTDataModule(L.LightningDataModule):
    """OCT vessel data: a real ``annotations.json`` folder, or the synthetic default.

    Set ``dm.processor = model.processor`` before asking for a dataloader.
    """

    def __init__(
        self,
        root: str | None = None,
        annotations_file: str = "annotations.json",
        synthetic: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        split_ratios: Sequence[float] = (0.9, 0.05, 0.05),
        split_seed: int = 0,
        shuffle_seed: int = 0,
        clip_len: int = 1,
        clip_stride: int = 1,
        eval_clip_len: int | None = None,
        max_eval_clip_len: int = 32,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int | None = None,
        on_bad_record: OnBadRecord = "error",
        video_pattern: str = DEFAULT_VIDEO_PATTERN,
        category_names: Mapping[int, str] | None = None,
        prompt_template: str = "<image>\nPlease segment the {name}.",
        answer_template: str = "Sure, [SEG].",
        hflip_prob: float = 0.0,
        augment: ClipAugment | None = None,
        predict_split: Split = "test",
        processor: Processor | None = None,
    ) -> None:
        super().__init__()
        if clip_len < 1 or clip_stride < 1 or max_eval_clip_len < 1:
            raise ValueError("clip_len, clip_stride and max_eval_clip_len must be >= 1")
        if eval_clip_len is not None and eval_clip_len < 1:
            raise ValueError("eval_clip_len must be >= 1 or None (whole videos)")
        # the augmentation is an object (its options are in the run's config)
        self.save_hyperparameters(ignore=["processor", "augment"])
        self.root = root
        self.annotations_file = annotations_file
        self.synthetic = dict(synthetic or {})
        self.cache_dir = cache_dir
        self.split_ratios = tuple(float(r) for r in split_ratios)
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.clip_len, self.clip_stride = clip_len, clip_stride
        self.eval_clip_len, self.max_eval_clip_len = eval_clip_len, max_eval_clip_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.on_bad_record = on_bad_record
        self.video_pattern = video_pattern
        names = category_names or DEFAULT_CATEGORY_NAMES
        self.category_names = {int(k): str(v) for k, v in names.items()}
        self.prompt_template, self.answer_template = prompt_template, answer_template
        self.hflip_prob = hflip_prob
        self.augment = augment
        self.predict_split = predict_split
        self.processor = processor
        self.bad_records: list[BadRecord] = []
        self._videos: dict[str, list[FrameRecord]] | None = None
        self._splits: dict[str, list[str]] | None = None

    # -- data ---------------------------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        """The folder holding ``annotations_file`` (generating the synthetic set if needed)."""
        if self.root is not None:
            return Path(self.root).expanduser()
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        return ensure_synthetic_dataset(cache, **self.synthetic)

    def prepare_data(self) -> None:
        """Generate the synthetic data set once (Lightning calls this on one process only)."""
        if self.root is None:
            _ = self.data_root

    def setup(self, stage: str | None = None) -> None:
        if self._videos is not None:
            return
        root = self.data_root
        records, self.bad_records = load_annotations(
            root / self.annotations_file,
            root,
            on_bad_record=self.on_bad_record,
            category_names=self.category_names,
            video_pattern=self.video_pattern,
        )
        if not records:
            raise ValueError(f"no usable records in {root / self.annotations_file}")
        self._videos = group_videos(records)
        self._splits = split_videos(list(self._videos), self.split_ratios, self.split_seed)
        sizes = {s: len(v) for s, v in self._splits.items()}
        log.info("OCT data %s: %d frames, videos per split %s", root, len(records), sizes)

    # -- accessors for evaluation code --------------------------------------------------------
    def video_ids(self, split: Split) -> list[str]:
        """Sorted video ids of ``split``."""
        self.setup()
        assert self._splits is not None
        return list(self._splits[split])

    def videos(self, split: Split) -> dict[str, list[FrameRecord]]:
        """Video id -> frames in order, for ``split``."""
        self.setup()
        assert self._videos is not None
        return {v: self._videos[v] for v in self.video_ids(split)}

    def records(self, split: Split) -> list[FrameRecord]:
        """All frames of ``split``, by video then frame."""
        return [r for frames in self.videos(split).values() for r in frames]

    # -- datasets and loaders -----------------------------------------------------------------
    def dataset(self, split: Split) -> OCTClipDataset:
        """Training: sliding ``clip_len`` clips; evaluation: whole videos in pieces of at most
        ``eval_clip_len`` (or ``max_eval_clip_len``) frames, each frame exactly once."""
        videos = self.videos(split).values()
        if split == "train":
            clips = [c for f in videos for c in sliding_clips(f, self.clip_len, self.clip_stride)]
        else:
            length = min(self.eval_clip_len or self.max_eval_clip_len, self.max_eval_clip_len)
            clips = [c for f in videos for c in chunk_clips(f, length)]
        return OCTClipDataset(
            clips,
            self.processor,
            self.prompt_template,
            self.answer_template,
            self.hflip_prob if split == "train" else 0.0,
            augment_seed=self.shuffle_seed,
            augment=self.augment if split == "train" else None,
        )

    def _loader(self, split: Split, batch_size: int, shuffle: bool) -> DataLoader:
        if self.processor is None:
            raise RuntimeError("OCTDataModule.processor is not set: dm.processor = model.processor")
        dataset = self.dataset(split)
        options = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self.processor.collate,
            "persistent_workers": self.num_workers > 0,
            # the loader draws its workers' base seed from this, not from the global
            # generator, so starting a loader never moves dropout's random stream
            "generator": torch.Generator().manual_seed(self.shuffle_seed),
        }
        if not shuffle:
            return DataLoader(dataset, **options)
        # Training order: a permutation per (shuffle_seed + epoch) that a resumed run continues
        # mid-epoch (sa2va.training.checkpointing); split over ranks under DDP.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(dataset, self.shuffle_seed, num_replicas=world, rank=rank)
        return ResumableDataLoader(dataset, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, self.eval_batch_size, shuffle=False)
