"""The MedSAM protocol on this repo's SAM2: a box-prompted SAM2, ``model=medsam_sam2``.

MedSAM (Ma et al. 2024) fine-tunes SAM with one box prompt per object, the ground-truth mask's
bounding box, each side moved outward by a random 0-``box_shift`` px in training (its data set's
``bbox_shift=20``, on 256-px masks) and used as is at inference, with single-mask output. Here
the same prompt goes into SAM2 (:mod:`sa2va.model.sam2`), encoded as SAM2's image predictor
encodes a box (its two corners as points labelled 2 and 3). Which parts train is the freeze
policy's choice; ``conf/model/medsam_sam2.yaml`` trains the mask decoder only (image encoder and
prompt encoder frozen).

The box comes from the ground truth, so evaluation is an **oracle-prompted** upper reference
(``oracle_prompt``): it shows what a prompted SAM2 reaches without language, given where the
vessel is. Without a ground-truth mask (``sa2va.predict`` on new images) the box is the whole
frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from sa2va.model.baselines.frame import ImageSegmenter, recorded_config
from sa2va.model.protocol import SegmentationOutput, per_sample
from sa2va.model.sam2 import build_sam2, upsample

BOX_CORNER_LABELS = (2, 3)  # SAM2's point labels of a box's top-left and bottom-right corners


def _first_hit(hits: Tensor) -> Tensor:
    """(K, L) booleans -> (K,) index of the first True in each row."""
    return hits.float().argmax(1)


def _last_hit(hits: Tensor) -> Tensor:
    return hits.shape[1] - 1 - _first_hit(hits.flip(1))


def mask_boxes(masks: Tensor, shift: int = 0) -> Tensor:
    """(K, H, W) masks -> (K, 4) ``x_min, y_min, x_max, y_max`` boxes in pixels of the mask.

    Each side moves outward by a uniform integer in [0, ``shift``], clipped to the frame, as
    MedSAM's training boxes. An empty mask gets the whole frame.
    """
    k, height, width = masks.shape
    rows, cols = masks.bool().any(2), masks.bool().any(1)  # (K, H), (K, W): any foreground
    boxes = torch.stack(
        [_first_hit(cols), _first_hit(rows), _last_hit(cols), _last_hit(rows)], 1
    ).float()
    if shift:
        jitter = torch.randint(0, shift + 1, (k, 4), device=masks.device).float()
        boxes = boxes + jitter * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=masks.device)
    limits = torch.tensor([width, height, width, height], device=masks.device).float()
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    empty = ~rows.any(1)
    return torch.where(empty[:, None], torch.cat([limits.new_zeros(2), limits[:2]]), boxes)


class MedSAMBaseline(ImageSegmenter):
    """SAM2 image encoder -> box prompt (from ``batch["masks"]``) -> single-mask decoder."""

    oracle_prompt: ClassVar[bool] = True

    def __init__(
        self,
        sam2: Mapping[str, Any],
        sam2_ckpt: str | None = None,
        mask_size: int | None = None,
        box_shift: int = 20,
        name: str = "medsam_sam2",
        load_pretrained: bool = True,
    ) -> None:
        """``sam2``: a ``conf/model/sam2`` node; ``sam2_ckpt``: a SAM 2 release file (read
        only with ``load_pretrained``); ``box_shift``: MedSAM's training jitter, pixels of
        the ground-truth mask."""
        config = recorded_config(locals())
        super().__init__(config, int(config["sam2"]["image_size"]))
        self.sam2 = build_sam2(config["sam2"])
        if sam2_ckpt and load_pretrained:
            from sa2va.model.checkpoints import load_sam2_checkpoint

            load_sam2_checkpoint(self.sam2, sam2_ckpt)

    def prompt_boxes(
        self, masks: Sequence[Tensor] | None, lengths: Sequence[int], counts: Sequence[int]
    ) -> Tensor:
        """(K, 4) boxes in SAM2 input pixels, one per (frame, object), frames first."""
        size = self.sam2.image_size
        if masks is None:  # no ground truth: the whole frame
            total = sum(t * m for t, m in zip(lengths, counts, strict=True))
            return torch.tensor([[0.0, 0.0, size, size]]).repeat(total, 1)
        flat = torch.cat([m.flatten(0, 1) for m in masks])
        height, width = flat.shape[-2:]
        boxes = mask_boxes(flat, self.config["box_shift"] if self.training else 0)
        return boxes * torch.tensor([size / width, size / height] * 2, device=boxes.device)

    def forward(self, batch: Mapping[str, Any]) -> SegmentationOutput:
        """Per sample (T, M, S, S) logits, one box-prompted mask per (frame, object)."""
        frames: list[Tensor] = batch["g_pixel_values"]
        counts = [int(m) for m in batch["num_objects"]]
        lengths = [f.shape[0] for f in frames]
        images = torch.cat(frames)
        features = self.sam2.image_features(images)
        # the frame of each (frame, object) prompt, frames first (as per_sample reads them)
        objects_per_frame = torch.tensor(counts).repeat_interleave(torch.tensor(lengths))
        frame_index = torch.arange(len(images)).repeat_interleave(objects_per_frame)
        frame_index = frame_index.to(images.device)
        boxes = self.prompt_boxes(batch.get("masks"), lengths, counts).to(images.device)
        corners = boxes.view(-1, 2, 2)
        labels = torch.tensor([BOX_CORNER_LABELS], device=images.device).expand(len(boxes), -1)
        sparse, dense = self.sam2.sam_prompt_encoder(
            points=(corners, labels), boxes=None, masks=None
        )
        chosen = features.index_select(frame_index)
        low_res, _, _, _ = self.sam2.sam_mask_decoder(
            image_embeddings=chosen.image_embed,
            image_pe=self.sam2.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=chosen.high_res or None,
        )
        low_res = low_res[:, 0].float()  # as SAM2: masks leave the head in float32
        logits = upsample(low_res, self.processor.mask_size)
        return SegmentationOutput(
            pred_masks=per_sample(logits, lengths, counts),
            seg_counts=counts,
            low_res_masks=per_sample(low_res, lengths, counts),
        )
