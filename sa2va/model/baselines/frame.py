"""The shared body of the image-only baselines: the model protocol without a language model.

:class:`ImageSegmenter` gives a model (:mod:`sa2va.model.protocol`) the image-only processor,
inference that ignores the prompt's words (one mask per ``[SEG]`` of the conversation) and
export; a :class:`FrameSegmenter` subclass supplies only its network
(:meth:`FrameSegmenter.frame_logits`): one class-agnostic mask per frame, handed to every
``[SEG]`` of the sample (OCT vessel data has one object, "blood vessel").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from sa2va.model.image_processor import ImageProcessor
from sa2va.model.protocol import (
    DEFAULT_ANSWER,
    ClipPredictor,
    SegmentationOutput,
    batch_to_device,
    model_device,
)
from sa2va.model.sam2 import upsample
from sa2va.utils import to_plain

# constructor arguments that are not architecture (never recorded in a checkpoint)
RUNTIME_ARGUMENTS = frozenset({"self", "__class__", "load_pretrained"})


def recorded_config(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's ``locals()`` as the plain config a checkpoint keeps (JSON types: a
    checkpoint loads with ``weights_only=True``, and an export writes it as JSON)."""
    kept = {k: v for k, v in arguments.items() if k not in RUNTIME_ARGUMENTS}
    return json.loads(json.dumps(kept, default=to_plain))  # OmegaConf nodes from Hydra


class ImageSegmenter(ClipPredictor, nn.Module):
    """The protocol's processor, inference and export for a model without a language model.

    A subclass defines ``forward(batch) -> SegmentationOutput`` on the image-only batch
    (``g_pixel_values``: per sample (T, 3, S, S); ``num_objects``: M per sample).
    """

    oracle_prompt: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any], image_size: int) -> None:
        """``config``: the subclass's :func:`recorded_config`; ``image_size``: the side of the
        frames it takes; masks at ``config["mask_size"]`` (None: at ``image_size``)."""
        super().__init__()
        self.config = config
        self.processor = ImageProcessor(image_size, config.get("mask_size"))

    @torch.no_grad()
    def prepare_inputs(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> tuple[dict[str, Any], list[str]]:
        """One clip as an on-device batch; the answers are ``answer`` (there is no language
        model to write one), so each prompt owns the one mask its ``[SEG]`` stands for."""
        if mode != "fast":
            raise ValueError(
                f"mode={mode!r}: {type(self).__name__} has no language model to generate an "
                "answer; use mode=fast"
            )
        answers = [answer] * len(prompts)
        sample = self.processor(frames, prompts, answers)
        return batch_to_device(self.processor.collate([sample]), model_device(self)), answers

    def save_pretrained_files(self, folder: Path) -> None:
        """Nothing to write: the recorded config rebuilds the whole architecture."""


class FrameSegmenter(ImageSegmenter):
    """An image-only model with one class-agnostic mask per frame: set ``self.net`` (one output
    channel) or define :meth:`frame_logits`."""

    def frame_logits(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) normalised frames -> (N, h, w) foreground logits at any h, w; by
        default those of ``self.net``, a network with one output channel."""
        return self.net(images)[:, 0]

    def forward(self, batch: Mapping[str, Any]) -> SegmentationOutput:
        """Per sample (T, M, S, S) logits: the frame's one mask repeated for its M objects."""
        frames: list[Tensor] = batch["g_pixel_values"]
        counts = [int(m) for m in batch["num_objects"]]
        logits = upsample(self.frame_logits(torch.cat(frames)), self.processor.mask_size)
        per_sample = logits.split([f.shape[0] for f in frames])
        masks = [
            chunk[:, None].expand(-1, m, -1, -1)
            for chunk, m in zip(per_sample, counts, strict=True)
        ]
        return SegmentationOutput(pred_masks=masks, seg_counts=counts)
