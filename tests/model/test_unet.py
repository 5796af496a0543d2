"""U-Net baseline: same batch contract as Sa2VA, trains through the same app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from helpers.configs import FAST_TRAIN
from hydra.utils import instantiate
from PIL import Image

from sa2va.model.image_processor import ImageProcessor
from sa2va.model.processor import Sa2VAProcessor
from sa2va.model.unet import UNetBaseline
from sa2va.training.run import train


def frames(n: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def test_processor_gives_sa2va_sam2_view_and_counts_objects():
    processor = ImageProcessor(image_size=32, mask_size=16)
    clip = frames(2)
    sample = processor(clip, ["segment the vessel", "segment the other"], None)
    reference = Sa2VAProcessor(None, None, 0, sam2_image_size=32).sam2_view(clip[1])
    assert sample["g_pixel_values"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(sample["g_pixel_values"][1], reference)
    assert sample["num_objects"] == 2 and processor.mask_size == 16
    batch = processor.collate([sample, processor(frames(1), ["p"], ["Sure, [SEG]."])])
    assert [t.shape[0] for t in batch["g_pixel_values"]] == [2, 1]
    assert batch["num_objects"] == [2, 1]


def test_forward_gives_one_mask_per_object_and_no_language_loss():
    model = UNetBaseline(image_size=32, mask_size=16, channels=(4, 8), strides=(2,))
    processor = model.processor
    batch = processor.collate(
        [processor(frames(3), ["a", "b"], None), processor(frames(1), ["a"], None)]
    )
    out = model(batch)
    assert out.lm_loss is None and out.seg_counts == [2, 1]
    assert [tuple(m.shape) for m in out.pred_masks] == [(3, 2, 16, 16), (1, 1, 16, 16)]
    torch.testing.assert_close(out.pred_masks[0][:, 0], out.pred_masks[0][:, 1])
    sum(m.sum() for m in out.pred_masks).backward()
    assert all(p.grad is not None for p in model.parameters())
    rebuilt = UNetBaseline(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_model_unet_trains_with_the_same_loss_and_metrics(compose_cfg):
    cfg = compose_cfg("model=unet", *FAST_TRAIN)
    assert cfg.freeze.name == "full" and cfg.optim.name == "scratch"
    assert instantiate(cfg.model).config["name"] == "unet"
    summary = train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "completed" and written["ablation"]["model.name"] == "unet"
    for key in ("val/dice", "val/iou", "val/precision", "val/recall", "train/loss_bce"):
        assert 0.0 <= summary["metrics"][key] < float("inf"), key
    assert "train/loss_lang" not in summary["metrics"]
