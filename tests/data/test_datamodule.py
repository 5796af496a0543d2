"""OCTDataModule: video splits, clips, masks at the processor's size, loaders, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data_fixtures import TINY_SYNTH, FakeProcessor, square, write_dataset, write_image
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sa2va.data.annotations import AnnotationError
from sa2va.data.datamodule import OCTDataModule, load_rgb, split_videos

CONF = Path(__file__).resolve().parents[2] / "conf"


def data_config(option: str) -> DictConfig:
    """``conf/data/<option>.yaml`` as Hydra composes it (typed schema, ``${seed}`` resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"data={option}"]).data


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def synth_dm(cache: Path, **kwargs) -> OCTDataModule:
    kwargs = {"split_ratios": (0.5, 0.25, 0.25), "processor": FakeProcessor(), **kwargs}
    dm = OCTDataModule(synthetic=TINY_SYNTH, cache_dir=str(cache), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("n", [3, 4, 7, 12, 40])
def test_split_videos_is_disjoint_complete_seeded(n: int) -> None:
    ids = [f"v{i}" for i in range(n)]
    s = split_videos(ids[::-1], (0.9, 0.05, 0.05), seed=0)
    assert all(len(s[k]) >= 1 for k in ("train", "val", "test"))
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)
    assert s == split_videos(ids, (0.9, 0.05, 0.05), seed=0)  # input order does not matter
    if n >= 12:
        assert any(split_videos(ids, (0.6, 0.2, 0.2), seed=k) != s for k in range(1, 4))


def test_split_videos_proportions_and_small_cases() -> None:
    ids = [f"v{i:02d}" for i in range(20)]
    assert [len(v) for v in split_videos(ids, (0.7, 0.15, 0.15)).values()] == [14, 3, 3]
    assert [len(v) for v in split_videos(ids, (1, 0, 0)).values()] == [20, 0, 0]
    assert split_videos(["a", "b"], (0.8, 0.1, 0.1)) in (
        {"train": ["a"], "val": ["b"], "test": []},
        {"train": ["b"], "val": ["a"], "test": []},
    )
    assert split_videos(["a"]) == {"train": ["a"], "val": [], "test": []}
    with pytest.raises(ValueError):
        split_videos(ids, (0.5, 0.5))


def test_synthetic_default_splits_by_video(cache: Path) -> None:
    dm = synth_dm(cache)
    ids = {s: dm.video_ids(s) for s in ("train", "val", "test")}
    assert [len(v) for v in ids.values()] == [2, 1, 1]
    assert not set(ids["train"]) & (set(ids["val"]) | set(ids["test"]))
    for split, vids in ids.items():
        recs = dm.records(split)
        assert {r.video_id for r in recs} == set(vids) and len(recs) == 3 * len(vids)
    assert dm.data_root.parent == cache
    assert synth_dm(cache).video_ids("val") == ids["val"]  # stable, and from the cache


def test_train_batch_contract(cache: Path) -> None:
    dm = synth_dm(cache, batch_size=2, clip_len=2)
    ds = dm.dataset("train")
    assert len(ds) == 2 * 2  # 2 train videos x (3 - 2 + 1) windows
    sample = ds[1]
    rec = dm.videos("train")[dm.video_ids("train")[0]]
    assert sample["video_id"] == rec[0].video_id and sample["frame_indices"] == [2, 3]
    assert sample["image_paths"] == [str(r.image_path) for r in rec[1:3]]
    masks = sample["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 1, 16, 16)
    expected = np.stack([[r.mask("blood vessel", (16, 16))] for r in rec[1:3]])
    assert (masks.numpy() == expected).all() and masks.any()
    assert sample["g_pixel_values"].shape == (2, 3, 24, 24)
    assert dm.processor.calls[-1] == (
        2,
        ["<image>\nPlease segment the blood vessel."],
        ["Sure, [SEG]."],
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["masks"].shape == (2, 2, 1, 16, 16) and len(batch["video_id"]) == 2


def test_eval_covers_every_frame_once(cache: Path) -> None:
    dm = synth_dm(cache, eval_batch_size=1)
    (batch,) = list(dm.val_dataloader())
    assert batch["masks"].shape == (1, 3, 1, 16, 16) and batch["frame_indices"] == [[1, 2, 3]]
    dm = synth_dm(cache, max_eval_clip_len=2)
    frames = [s["frame_indices"] for s in dm.dataset("test")]
    assert frames == [[1, 2], [3]]
    dm = synth_dm(cache, eval_clip_len=1, predict_split="val")
    assert [s["frame_indices"] for s in dm.dataset("val")] == [[1], [2], [3]]
    assert len(list(dm.predict_dataloader())) == 3


def test_hflip_flips_frames_and_masks_together(cache: Path) -> None:
    plain = synth_dm(cache).dataset("train")[0]
    flipped = synth_dm(cache, hflip_prob=1.0).dataset("train")[0]
    assert (flipped["masks"] == plain["masks"].flip(-1)).all()
    assert not (flipped["masks"] == plain["masks"]).all()
    assert torch.allclose(flipped["g_pixel_values"], plain["g_pixel_values"].flip(-1))
    val_plain = synth_dm(cache).dataset("val")[0]["masks"]
    val_flip_cfg = synth_dm(cache, hflip_prob=1.0).dataset("val")[0]["masks"]
    assert (val_flip_cfg == val_plain).all()  # evaluation is never augmented


def test_processor_is_required_for_loaders(cache: Path) -> None:
    dm = synth_dm(cache, processor=None)
    with pytest.raises(RuntimeError, match="processor"):
        dm.train_dataloader()
    raw = dm.dataset("train")[0]  # raw samples still work, masks at image size
    assert raw["frames"][0].mode == "RGB" and raw["masks"].shape == (1, 1, 64, 64)


def test_workers_can_load(cache: Path) -> None:
    dm = synth_dm(cache, num_workers=1, batch_size=4)
    assert next(iter(dm.train_dataloader()))["masks"].shape == (4, 1, 1, 16, 16)


def test_real_folder_objects_consistent_across_clip(tmp_path: Path) -> None:
    recs = [
        {
            "image": "eye_frame_000001.jpg",
            "text": ["blood vessel", "artery"],
            "mask": [[square(2, 2, 10, 10)], [square(20, 20, 28, 28)]],
        },
        {"image": "eye_frame_000002.jpg", "text": ["blood vessel"], "mask": [[square(3, 3, 9, 9)]]},
        {"image": "eye_frame_000003.jpg", "text": ["blood vessel"], "mask": [[[1, 2]]]},  # bad
    ]
    write_dataset(tmp_path, recs)
    kw = {"root": str(tmp_path), "clip_len": 2, "split_ratios": (1, 0, 0)}
    with pytest.raises(AnnotationError, match="record 2"):
        OCTDataModule(**kw).setup()
    dm = OCTDataModule(**kw, on_bad_record="skip", processor=FakeProcessor(mask_size=32))
    dm.setup()
    assert len(dm.bad_records) == 1 and dm.video_ids("train") == ["eye"]
    sample = dm.dataset("train")[0]
    assert dm.processor.calls[-1][1] == [
        "<image>\nPlease segment the blood vessel.",
        "<image>\nPlease segment the artery.",
    ]
    masks = sample["masks"]
    assert masks.shape == (2, 2, 32, 32)
    assert masks[0, 1].any() and not masks[1, 1].any()  # frame 2 lacks the artery
    assert masks[1, 0, 6, 6] and not masks[1, 0, 2, 2]


@pytest.mark.parametrize(
    ("mode", "dtype", "values"),
    [
        ("I;16", np.uint16, (1000, 3000)),
        ("L", np.uint8, (10, 200)),
        ("RGBA", np.uint8, (0, 255)),
        ("P", np.uint8, (3, 7)),
        ("F", np.float32, (-1.0, 1.0)),
    ],
)
def test_load_rgb_makes_8bit_rgb(tmp_path: Path, mode: str, dtype, values) -> None:
    arr = np.full((8, 8), values[0], dtype=dtype)
    arr[:, 4:] = values[1]
    if mode == "RGBA":
        img = Image.fromarray(np.stack([arr] * 4, axis=-1), "RGBA")
    elif mode == "P":
        img = Image.fromarray(arr, "L").convert("P")
    else:
        img = Image.fromarray(arr)
    path = tmp_path / ("x.tiff" if mode == "F" else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    px = np.asarray(out)
    assert px[0, 0, 0] < px[0, 7, 0]  # contrast kept, not clipped to white
    if mode == "I;16":
        assert (px[0, 0, 0], px[0, 7, 0]) == (0, 255)


def test_hydra_configs_instantiate(tmp_path: Path, cache: Path) -> None:
    cfg = data_config("synthetic_oct")
    cfg.cache_dir = str(cache)
    cfg.synthetic = OmegaConf.merge(cfg.synthetic, TINY_SYNTH)  # typed: merge, not assign
    dm = instantiate(cfg)
    assert isinstance(dm, OCTDataModule)
    assert dm.prompt_template == "<image>\nPlease segment the {name}."
    dm.setup()
    assert sum(len(dm.video_ids(s)) for s in ("train", "val", "test")) == 4

    real = data_config("oct")
    assert OmegaConf.is_missing(real, "root")
    write_image(tmp_path / "images" / "a.jpg")
    write_dataset(tmp_path, [{"image": "a.jpg", "mask": [{"segmentation": [square(1, 1, 9, 9)]}]}])
    real.root = str(tmp_path)
    dm = instantiate(real)
    assert [r.object_names for r in dm.records("train")] == [["blood vessel"]]
