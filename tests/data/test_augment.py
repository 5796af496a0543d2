"""Clip augmentation: frames and masks move together, every frame of a clip alike, the same
output for the same (seed, epoch, index) in any worker, thin vessels survive, and the feature
cache is off for augmented samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data_fixtures import TINY_SYNTH, FakeProcessor
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from skimage.measure import label

from sa2va.data.augment import ClipAugment
from sa2va.data.datamodule import OCTDataModule
from sa2va.data.raster import rasterize_polygons

CONF = Path(__file__).resolve().parents[2] / "conf"
# every spatial part always on, at the strong recipe's ranges
SPATIAL = {
    "flip_prob": 0.5,
    "affine_prob": 1.0,
    "rotate_deg": 20.0,
    "scale": 0.2,
    "elastic_prob": 1.0,
    "elastic_magnitude": (0.005, 0.015),
}


def augment_config(option: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"augment={option}"]).data.augment


def vessel_masks(width: float, size: int = 128) -> np.ndarray:
    """(1, 1, S, S) mask of one thin curved vessel in the middle of the image (clear of the
    borders, so that no zoom or rotation shows its mirror image from the padding)."""
    t = np.linspace(0, 1, 60)
    centre = np.stack([34 + 60 * t, 36 + 50 * t + 8 * np.sin(5 * t)], axis=1) * size / 128
    normal = np.array([-0.67, 0.74]) * width / 2
    poly = np.concatenate([centre + normal, (centre - normal)[::-1]])
    return rasterize_polygons([poly], (size, size), (size, size))[None, None]


def as_frames(masks: np.ndarray) -> np.ndarray:
    """A clip whose frames are the masks themselves (T, H, W, 3) uint8."""
    return np.repeat(masks[:, 0, :, :, None], 3, axis=3).astype(np.uint8) * 255


def test_frames_and_masks_move_together_and_every_frame_alike() -> None:
    masks = np.repeat(vessel_masks(6.0), 3, axis=0)  # a clip of three identical frames
    augment = ClipAugment(**SPATIAL)
    for index in range(5):
        frames, warped = augment(as_frames(masks), masks, (0, 0, index))
        assert not (warped == masks).all()  # it did move
        drawn = frames[..., 0] > 127
        overlap = (drawn & warped[:, 0]).sum() / (drawn | warped[:, 0]).sum()
        assert overlap > 0.9
        assert (warped == warped[:1]).all()  # one transform for the whole clip


@pytest.mark.parametrize("width", [1.0, 2.0])
def test_thin_vessels_stay_connected(width: float) -> None:
    masks = vessel_masks(width)
    assert label(masks[0, 0], connectivity=2).max() == 1
    augment = ClipAugment(**SPATIAL)
    for index in range(10):
        _, warped = augment(as_frames(masks), masks, (0, 0, index))
        assert label(warped[0, 0], connectivity=2).max() == 1, index


def test_nearest_sampling_would_break_them() -> None:
    """Why the masks are warped as floats with a threshold below 0.5."""
    masks = vessel_masks(1.0)
    augment = ClipAugment(**SPATIAL, mask_threshold=0.99)
    pieces = [
        label(augment(as_frames(masks), masks, (0, 0, i))[1][0, 0], connectivity=2).max()
        for i in range(10)
    ]
    assert max(pieces) > 1


def test_output_is_a_pure_function_of_seed_epoch_index() -> None:
    masks = vessel_masks(4.0)
    strong = instantiate(augment_config("strong"))
    first = strong(as_frames(masks), masks, (0, 1, 2))
    strong(as_frames(masks), masks, (0, 1, 3))  # other samples in between change nothing
    fresh = instantiate(augment_config("strong"))  # nor does a new copy (another worker)
    for again in (
        strong(as_frames(masks), masks, (0, 1, 2)),
        fresh(as_frames(masks), masks, (0, 1, 2)),
    ):
        assert all((x == y).all() for x, y in zip(first, again, strict=True))
    other_epoch = strong(as_frames(masks), masks, (0, 2, 2))
    assert not all((x == y).all() for x, y in zip(first, other_epoch, strict=True))


def synth_dm(cache: Path, **kwargs) -> OCTDataModule:
    kwargs = {"split_ratios": (0.5, 0.25, 0.25), "processor": FakeProcessor(64, 64), **kwargs}
    dm = OCTDataModule(synthetic=TINY_SYNTH, cache_dir=str(cache), **kwargs)
    dm.setup("fit")
    return dm


def train_batches(dm: OCTDataModule, epochs: int = 2) -> list[dict]:
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.extend(loader)
    return out


def test_same_batches_with_or_without_workers(tmp_path: Path) -> None:
    augment = instantiate(augment_config("strong"))
    plain = train_batches(synth_dm(tmp_path, augment=augment, num_workers=0, batch_size=2))
    workers = train_batches(synth_dm(tmp_path, augment=augment, num_workers=2, batch_size=2))
    assert len(plain) == len(workers) == 6  # 2 epochs of 6 clips in batches of 2
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["g_pixel_values"], b["g_pixel_values"])


def test_augmented_samples_change_and_turn_the_feature_cache_off(tmp_path: Path) -> None:
    none = synth_dm(tmp_path, augment=instantiate(augment_config("none")))
    light = synth_dm(tmp_path, augment=instantiate(augment_config("light")))
    assert not none.augment.enabled and light.augment.enabled
    plain, augmented = none.dataset("train"), light.dataset("train")
    assert plain[(0, 0)]["frame_keys"] is not None and augmented[(0, 0)]["frame_keys"] is None
    # (light leaves about 1 in 14 samples as they are: some of the first four change)
    changed = [
        not torch.equal(plain[(0, i)]["g_pixel_values"], augmented[(0, i)]["g_pixel_values"])
        for i in range(4)
    ]
    assert any(changed)
    # the same clip in another epoch gets other draws
    epochs = [augmented[(e, 0)]["g_pixel_values"] for e in range(3)]
    assert not (torch.equal(epochs[0], epochs[1]) and torch.equal(epochs[0], epochs[2]))
    # evaluation is never augmented, and keeps its cache keys
    val = light.dataset("val")[0]
    assert val["frame_keys"] is not None
    assert torch.equal(val["g_pixel_values"], none.dataset("val")[0]["g_pixel_values"])


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="must match"):
        ClipAugment(**SPATIAL)(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 1, 4, 4), bool), (0,))
    with pytest.raises(ValueError, match="mask_threshold"):
        ClipAugment(mask_threshold=1.0)
