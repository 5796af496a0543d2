"""Synthetic OCT videos: format, determinism, realism checks, caching, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers.data_fixtures import TINY_SYNTH
from PIL import Image
from scipy.ndimage import distance_transform_edt
from skimage.morphology import skeletonize

from sa2va.data import synth
from sa2va.data.annotations import DEFAULT_VIDEO_PATTERN, group_videos, load_annotations


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate_synthetic_dataset(tmp_path_factory.mktemp("s") / "d", **TINY_SYNTH)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = {"num_videos": 3, "frames_per_video": 4, "image_size": 256, "seed": 1}
    return synth.generate_synthetic_dataset(tmp_path_factory.mktemp("s") / "d", **params)


def test_format_and_video_structure(tiny: Path) -> None:
    recs = json.loads((tiny / "annotations.json").read_text())
    assert len(recs) == 4 * 3
    assert set(recs[0]) == {"image", "text", "mask"} and recs[0]["text"] == ["blood vessel"]
    assert all(re.match(DEFAULT_VIDEO_PATTERN, r["image"]) for r in recs)
    assert recs[0]["image"] == "synthetic_000_frame_000001.jpg"
    records, bad = load_annotations(tiny / "annotations.json")
    assert bad == []  # every polygon in bounds, every mask non-empty
    videos = group_videos(records)
    assert len(videos) == 4 and all(len(v) == 3 for v in videos.values())
    with Image.open(records[0].image_path) as img:
        assert img.size == (64, 64) and img.format == "JPEG"


def test_same_seed_is_byte_identical(tiny: Path, tmp_path: Path) -> None:
    again = synth.generate_synthetic_dataset(tmp_path / "again", **TINY_SYNTH)
    assert (again / "annotations.json").read_bytes() == (tiny / "annotations.json").read_bytes()
    for img in sorted((tiny / "images").iterdir()):
        assert (again / "images" / img.name).read_bytes() == img.read_bytes()
    other = synth.generate_synthetic_dataset(tmp_path / "other", **{**TINY_SYNTH, "seed": 8})
    assert (other / "annotations.json").read_bytes() != (tiny / "annotations.json").read_bytes()


def test_vessels_are_visible_tubes_of_the_promised_width(full_size: Path) -> None:
    records, _ = load_annotations(full_size / "annotations.json")
    for r in records:
        mask = r.mask("blood vessel", (256, 256))
        img = np.asarray(Image.open(r.image_path), dtype=np.float64)
        inside, outside = img[mask].mean(), img[~mask].mean()
        assert inside > outside + 10  # the drawn vessels are where the polygons say
        assert inside < outside + 100  # ... but low contrast
        assert img[~mask].std() > 10  # speckle
        widths = 2 * distance_transform_edt(mask)[skeletonize(mask)]
        assert 3 <= np.median(widths) <= 14 and widths.max() <= 16
        assert 0.02 < mask.mean() < 0.4


def test_frames_move_smoothly(full_size: Path) -> None:
    records, _ = load_annotations(full_size / "annotations.json")
    videos = group_videos(records)

    def iou(a, b) -> float:
        return (a & b).sum() / (a | b).sum()

    masks = {v: [r.mask("blood vessel", (256, 256)) for r in f] for v, f in videos.items()}
    for seq in masks.values():
        steps = [iou(a, b) for a, b in zip(seq, seq[1:], strict=False)]
        assert all(0.3 < s < 0.99 for s in steps), steps  # moves, but not jumps
    a, b = list(masks.values())[:2]
    assert iou(a[0], b[0]) < 0.3  # different videos are different trees


def test_ensure_caches_by_params_and_is_atomic(tmp_path: Path, monkeypatch) -> None:
    small = {**TINY_SYNTH, "num_videos": 1, "frames_per_video": 2}
    first = synth.ensure_synthetic_dataset(tmp_path, **small)
    assert (first / "annotations.json").is_file()
    assert synth.ensure_synthetic_dataset(tmp_path, **small) == first  # cached
    assert synth.ensure_synthetic_dataset(tmp_path, **{**small, "seed": 3}) != first
    assert not list(tmp_path.glob(".tmp-*"))  # no leftovers
    with pytest.raises(TypeError, match="unknown"):
        synth.ensure_synthetic_dataset(tmp_path, nonsense=1)

    def crash(out, **params):
        (Path(out) / "images").mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synth, "generate_synthetic_dataset", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        synth.ensure_synthetic_dataset(tmp_path, **{**small, "seed": 4})
    assert not (tmp_path / f"synthetic_oct-{synth.dataset_key(**{**small, 'seed': 4})}").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert synth.ensure_synthetic_dataset(tmp_path, **small) == first  # still served


def test_key_covers_defaults() -> None:
    assert synth.dataset_key() == synth.dataset_key(seed=0)
    assert synth.dataset_key() != synth.dataset_key(seed=1)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [f"out={out}", "num_videos=2", "frames_per_video=2", "image_size=48", "seed=5"]
    assert synth.main(args) == 0
    assert "wrote 4 frames" in capsys.readouterr().out
    assert len(list((out / "images").glob("*.jpg"))) == 4
    assert synth.main(args) == 1  # refuses to overwrite
    assert synth.main([]) == 2


def test_low_contrast_frames_option(full_size: Path, tmp_path: Path) -> None:
    """Off by default (same bytes, same cache key); on, some frames' vessels fade while the
    polygons and every other frame stay as they were."""
    params = {"num_videos": 3, "frames_per_video": 4, "image_size": 256, "seed": 1}
    assert synth.dataset_key(**params) == synth.dataset_key(**params, low_contrast_frames=0.0)
    faded = synth.generate_synthetic_dataset(
        tmp_path / "faded", **params, low_contrast_frames=0.5, low_contrast_factor=0.0
    )
    assert (faded / "annotations.json").read_bytes() == (
        full_size / "annotations.json"
    ).read_bytes()
    records, _ = load_annotations(full_size / "annotations.json")
    contrast = {True: [], False: []}
    for r in records:
        mask = r.mask("blood vessel", (256, 256))
        before = np.asarray(Image.open(r.image_path), dtype=np.float64)
        after = np.asarray(Image.open(faded / "images" / r.image_path.name), dtype=np.float64)
        changed = not np.array_equal(before, after)
        contrast[changed].append(after[mask].mean() - after[~mask].mean())
    assert contrast[True] and contrast[False]  # some frames faded, some not
    assert max(contrast[True]) < 5 < min(contrast[False])
