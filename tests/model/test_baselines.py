"""Every baseline row: built from its own config, one forward/backward, the model protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.baselines import TINY_ROWS
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from sa2va.inference.video import segment_video
from sa2va.model.baselines.frame import FrameSegmenter, recorded_config
from sa2va.model.baselines.medsam_sam2 import mask_boxes
from sa2va.model.image_processor import ImageProcessor
from sa2va.model.protocol import SegmentationModel
from sa2va.training.freeze import module_family


def frames(n: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def two_clip_batch(model: nn.Module) -> dict:
    """A clip of 3 frames x 2 objects and one of 1 frame x 1 object, with training masks."""
    processor = model.processor
    answers = ["Sure, [SEG]."] * 2
    batch = processor.collate(
        [processor(frames(3), ["a", "b"], answers), processor(frames(1), ["a"], answers[:1])]
    )
    size = processor.mask_size
    batch["masks"] = [torch.rand(3, 2, size, size) > 0.7, torch.zeros(1, 1, size, size).bool()]
    return batch


@pytest.mark.parametrize("row", sorted(TINY_ROWS))
def test_row_builds_from_its_config_and_trains_what_its_freeze_policy_says(row, compose_cfg):
    cfg = compose_cfg(f"model={row}", *TINY_ROWS[row])
    model = instantiate(cfg.model)
    assert isinstance(model, SegmentationModel) and model.config["name"] == row
    instantiate(cfg.freeze).apply(model)
    out = model(two_clip_batch(model))
    size = model.processor.mask_size
    assert out.lm_loss is None and out.seg_counts == [2, 1]
    assert [tuple(m.shape) for m in out.pred_masks] == [(3, 2, size, size), (1, 1, size, size)]
    sum(m.sum() for m in out.pred_masks).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    if row == "medsam_sam2":  # MedSAM: the mask decoder trains, both encoders stay frozen
        assert {module_family(n) for n in trainable} == {"sam2_decoder"}
        assert all("sam_mask_decoder" in n for n in trainable)
        # single-mask output leaves the multimask, IoU and object-score heads unused
        assert any("output_upscaling" in n for n in reached) and reached <= trainable
    else:  # MONAI's TransformerBlock always builds a LayerNorm for cross-attention it lacks
        assert reached and all("norm_cross_attn" in n for n in trainable - reached)
    rebuilt = type(model)(**model.config, load_pretrained=False)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_image_processor_gives_one_mask_per_seg_of_the_conversation():
    processor = ImageProcessor(image_size=32)
    prompts = ["Segment the vessels.", "Segment the disc."]
    answers = ["Vessels [SEG] and capillaries [SEG].", "Sure, [SEG]."]
    assert processor(frames(1), prompts, answers)["num_objects"] == 3
    assert processor(frames(1), prompts, None)["num_objects"] == 2


def test_mask_boxes_are_tight_jittered_outward_only_and_whole_frame_when_empty():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 5:9, 10:21] = True  # rows 5-8, columns 10-20
    masks[1, 0:20, 28:30] = True  # touches the bottom and right edges
    torch.testing.assert_close(
        mask_boxes(masks),
        torch.tensor([[10.0, 5, 20, 8], [28, 0, 29, 19], [0, 0, 30, 20]]),
    )
    torch.manual_seed(0)
    jittered = torch.stack([mask_boxes(masks, shift=3) for _ in range(200)])
    tight = mask_boxes(masks)
    grow = (jittered - tight) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert grow.min() >= 0 and grow[:, 0].max() == 3  # each side moves out by 0..3 px
    assert (jittered[..., 2] <= 30).all() and (jittered[..., 3] <= 20).all()  # clipped
    assert (jittered[:, 2] == tight[2]).all()  # an empty mask keeps the whole frame


def test_medsam_prompts_with_the_exact_box_at_eval_and_jitters_only_in_training(compose_cfg):
    model = instantiate(compose_cfg("model=medsam_sam2", *TINY_ROWS["medsam_sam2"]).model)
    batch = two_clip_batch(model)
    counts, lengths = [2, 1], [3, 1]
    model.eval()
    exact = model.prompt_boxes(batch["masks"], lengths, counts)
    scale = model.sam2.image_size / model.processor.mask_size
    first = batch["masks"][0][0, 0]
    rows, cols = first.any(1).nonzero(), first.any(0).nonzero()
    expected = torch.tensor([cols.min(), rows.min(), cols.max(), rows.max()]).float() * scale
    torch.testing.assert_close(exact[0], expected)
    torch.testing.assert_close(model(batch).pred_masks[0], model(batch).pred_masks[0])
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.prompt_boxes(batch["masks"], lengths, counts), exact)
    whole = model.prompt_boxes(None, lengths, counts)  # no ground truth: the whole frame
    assert whole.shape == (7, 4) and (whole[:, 2:] == model.sam2.image_size).all()


class ConvBaseline(FrameSegmenter):
    """A new baseline in the way the docs describe: one class (+ one config)."""

    def __init__(self, image_size: int = 32, mask_size: int | None = None, name: str = "conv",
                 load_pretrained: bool = True) -> None:  # fmt: skip
        super().__init__(recorded_config(locals()), image_size)
        self.net = nn.Conv2d(3, 1, 3, padding=1)

    def frame_logits(self, images: Tensor) -> Tensor:
        return self.net(images)[:, 0]


def test_a_new_baseline_is_one_class_and_gets_inference_from_the_protocol():
    model = ConvBaseline(mask_size=16).eval()
    assert isinstance(model, SegmentationModel)
    pred = segment_video(model, frames(3), ["a", "b"], batch_size=2)
    assert [tuple(t.shape) for t in pred.logits] == [(2, 16, 16)] * 3
    with pytest.raises(ValueError, match="no language model"):
        model.predict_forward(frames(1), ["a"], mode="generate")
    with pytest.raises(ValueError, match="propagate prompts SAM2's memory"):
        segment_video(model, frames(2), ["a"], video_mode="propagate")


def test_experiment_baselines_trains_every_row_on_the_same_data_loss_and_trainer(compose_cfg):
    sweep = compose_cfg("experiment=baselines")
    assert sweep.hydra.mode.name == "MULTIRUN"
    rows = str(sweep.hydra.sweeper.params.model).split(",")
    assert set(rows) == {"sa2va_tiny", *TINY_ROWS}
    shared = set()
    for row in rows:
        cfg = compose_cfg("experiment=baselines", f"model={row}")
        assert cfg.model.name == row and cfg.optim.name == "scratch"
        same = {key: OmegaConf.to_container(cfg[key]) for key in ("data", "loss", "trainer")}
        shared.add(json.dumps(same, sort_keys=True, default=str))
    assert len(shared) == 1
