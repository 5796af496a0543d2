"""Image-only processor: frames -> ImageNet-normalised square views; the text only counts masks.

Models that read no text (the U-Net and the other baselines of :mod:`sa2va.model.baselines`)
take this instead of Sa2VA's processor; Sa2VA's processor uses the same view for SAM2, so
every model sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sa2va.model.mllm import IMAGENET_MEAN, IMAGENET_STD, SEG_TOKEN

INTENSITY_NORMS = ("fixed", "zscore")


def zscore_pixels(pixels: Tensor) -> Tensor:
    """Each image of (..., C, H, W) [0, 1] pixels to zero mean and unit std over its own
    pixels: OCT brightness varies by device and depth, which a fixed mean/std keeps."""
    dims = (-3, -2, -1)
    std = pixels.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (pixels - pixels.mean(dim=dims, keepdim=True)) / std


class ImageProcessor:
    """One clip -> ``g_pixel_values`` (T, 3, S, S) + ``num_objects`` (masks to predict)."""

    def __init__(
        self,
        image_size: int,
        mask_size: int | None = None,
        norm_dtype: torch.dtype = torch.float32,
        intensity_norm: str = "fixed",
    ) -> None:
        """``norm_dtype``: the dtype the ImageNet mean/std are rounded through (bfloat16
        reproduces the official Sa2VA HF inference, see :class:`Sa2VAProcessor`).
        ``intensity_norm``: ``fixed`` (ImageNet mean/std, as official) or ``zscore`` (each
        image z-scored first, then the fixed normalisation)."""
        if intensity_norm not in INTENSITY_NORMS:
            raise ValueError(
                f"intensity_norm must be one of {INTENSITY_NORMS}, got {intensity_norm!r}"
            )
        self.intensity_norm = intensity_norm
        self.image_size = image_size
        self.mask_size = mask_size or image_size
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=norm_dtype).float().view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=norm_dtype).float().view(3, 1, 1)

    def view(self, frame: Image.Image) -> Tensor:
        """Resize (PIL BICUBIC, as SAM2's official ``DirectResize``) + ImageNet-normalise.

        Written with PIL because SAM2's own transforms need torchvision.
        """
        size = self.image_size
        resized = frame.convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.intensity_norm == "zscore":
            pixels = zscore_pixels(pixels)
        return (pixels - self._mean) / self._std

    def __call__(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """One sample with one mask per ``[SEG]`` of the conversation, as Sa2VA gives (one
        per prompt without answers); the words themselves are not read."""
        if answers is None:
            masks = len(prompts)
        else:
            turns = zip(prompts, answers, strict=True)
            masks = sum(p.count(SEG_TOKEN) + a.count(SEG_TOKEN) for p, a in turns)
        return {"g_pixel_values": torch.stack([self.view(f) for f in frames]), "num_objects": masks}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Per-sample lists (clips may differ in length), as Sa2VA's ``g_pixel_values``."""
        return {key: [sample[key] for sample in samples] for key in samples[0]}
