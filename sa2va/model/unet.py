"""U-Net baseline (MONAI) behind the same interface as `Sa2VA`, for `model=unet`.

It plugs into the same data module, loss, metrics and sweeps: its processor gives the data
module the SAM2-style image view, and `forward(batch)` returns a `Sa2VAOutput` with
`lm_loss=None`, so the loss simply has no language term. The U-Net reads no prompt: it
predicts one class-agnostic foreground mask per frame and gives it to every prompted object
of the sample (OCT vessel data has one object, "blood vessel").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import UNet
from PIL import Image
from torch import Tensor, nn

from sa2va.model.processor import Sa2VAProcessor
from sa2va.model.sa2va import Sa2VAOutput
from sa2va.model.sam2 import upsample


class UNetProcessor:
    """Frames -> ImageNet-normalised ``g_pixel_values`` (Sa2VA's SAM2 view) + object count."""

    def __init__(self, image_size: int, mask_size: int | None = None) -> None:
        # Only the SAM2 view of Sa2VA's processor is used: it needs no tokenizer.
        self.view = Sa2VAProcessor(
            tokenizer=None,
            image_processor=None,
            image_seq_length=0,
            sam2_image_size=image_size,
            mask_size=mask_size,
        )
        self.mask_size = self.view.mask_size

    def __call__(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """One sample; prompts only count the objects (answers are ignored)."""
        return {
            "g_pixel_values": torch.stack([self.view.sam2_view(f) for f in frames]),
            "num_objects": len(prompts),
        }

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Per-sample lists (clips may differ in length), as Sa2VA's ``g_pixel_values``."""
        return {key: [sample[key] for sample in samples] for key in samples[0]}


class UNetBaseline(nn.Module):
    """``monai.networks.nets.UNet`` (2D, residual units) on 3-channel frames -> mask logits."""

    def __init__(
        self,
        image_size: int = 256,
        mask_size: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        dropout: float = 0.0,
        name: str = "unet",
    ) -> None:
        super().__init__()
        # kept verbatim (plain types) so a checkpoint can rebuild the same network
        self.config = copy.deepcopy(
            {
                "image_size": image_size,
                "mask_size": mask_size,
                "channels": list(channels),
                "strides": list(strides),
                "num_res_units": num_res_units,
                "dropout": dropout,
                "name": name,
            }
        )
        self.net = UNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
        )
        self.processor = UNetProcessor(image_size, mask_size)

    def forward(self, batch: Mapping[str, Any]) -> Sa2VAOutput:
        """Per sample (T, M, H, W) logits: the frame's one mask repeated for its M objects."""
        frames: list[Tensor] = batch["g_pixel_values"]
        counts = [int(m) for m in batch["num_objects"]]
        logits = self.net(torch.cat(frames))[:, 0]
        logits = upsample(logits, self.processor.mask_size)
        per_sample = logits.split([f.shape[0] for f in frames])
        masks = [
            chunk[:, None].expand(-1, m, -1, -1)
            for chunk, m in zip(per_sample, counts, strict=True)
        ]
        return Sa2VAOutput(lm_loss=None, pred_masks=masks, seg_counts=counts)
