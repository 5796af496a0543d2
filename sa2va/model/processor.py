"""Frames + prompts -> model inputs: InternVL tiles, SAM2 view, chat tokens with labels.

One processor belongs to one model (its tokenizer, chat template, tile size and SAM2
resolution); the data module calls it in its workers so batches arrive ready for the model.
The text follows the official Sa2VA (training encoding and `predict_forward`): the model's
chat template, its tokenizer's BOS if any, frames' `<img>...</img>` blocks joined by `\n`,
and answers supervised up to and including the template's end-of-turn suffix, not the
separator after it. A single image is tiled dynamically (InternVL's rule, up to `max_tiles`
tiles plus a thumbnail); each frame of a video is one tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from sa2va.model.image_processor import ImageProcessor, zscore_pixels
from sa2va.model.mllm import (
    CHAT_TEMPLATES,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    ChatTemplate,
    bos_ids,
)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


def key_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Evenly spaced frames shown to the MLLM (the official model shows 5 per clip)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max_frames).round().astype(int).tolist()


class Sa2VAProcessor:
    """Turns a clip and its per-object prompts into tensors for `Sa2VA`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        image_seq_length: int,
        sam2_image_size: int,
        mask_size: int | None = None,
        mllm_frames: int = 5,
        system_prompt: str | None = None,
        template: ChatTemplate = CHAT_TEMPLATES["qwen_chat"],
        sam2_bf16_norm: bool = False,
        intensity_norm: str = "fixed",
    ) -> None:
        """``intensity_norm``: ``fixed`` (ImageNet mean/std, as official) or ``zscore`` (each
        image z-scored first, then the fixed normalisation), for both views.

        ``sam2_bf16_norm``: round the SAM2 view's ImageNet mean/std to bfloat16 as the
        official HF inference does (to reproduce its outputs exactly). Off by default: the
        official training, and SAM2 itself, use the exact constants, and this processor
        serves training and inference alike, which must see the same normalisation."""
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor = image_processor
        self.image_seq_length = image_seq_length
        self.sam2_image_size = sam2_image_size
        self.mask_size = mask_size or sam2_image_size
        self.mllm_frames = mllm_frames
        self.system_prompt = system_prompt
        norm_dtype = torch.bfloat16 if sam2_bf16_norm else torch.float32
        self.sam2_images = ImageProcessor(sam2_image_size, mask_size, norm_dtype, intensity_norm)
        self.intensity_norm = intensity_norm

    def sam2_view(self, frame: Image.Image) -> Tensor:
        """Resize + ImageNet-normalise for SAM2 (its own transforms need torchvision).

        PIL BICUBIC, as the official ``DirectResize`` (PIL's default ``resize``). With
        ``sam2_bf16_norm`` the mean/std are rounded to bfloat16 first, as the official HF
        inference does (``preprocess_image``'s default dtype), e.g. 0.485 -> 0.484375.
        """
        return self.sam2_images.view(frame)

    def image_text(self, tiles_per_frame: Sequence[int]) -> str:
        """`<img>` + context tokens + `</img>` per frame, joined by `\n` (no frame labels)."""
        context = IMG_CONTEXT_TOKEN * self.image_seq_length
        return "\n".join(f"{IMG_START_TOKEN}{context * n}{IMG_END_TOKEN}" for n in tiles_per_frame)

    def vision_inputs(self, frames: Sequence[Image.Image]) -> dict[str, Tensor]:
        """InternVL tiles: one image is tiled dynamically, each video frame is one tile."""
        tile = len(frames) == 1 and self.image_processor.max_patches > 1
        out = self.image_processor(
            images=[f.convert("RGB") for f in frames],
            crop_to_patches=tile,
            return_tensors="pt",
        )
        if self.intensity_norm == "zscore":  # undo the fixed normalisation, z-score, redo it
            mean = torch.tensor(self.image_processor.image_mean).view(3, 1, 1)
            std = torch.tensor(self.image_processor.image_std).view(3, 1, 1)
            out["pixel_values"] = (zscore_pixels(out["pixel_values"] * std + mean) - mean) / std
        return out

    def encode(
        self, prompts: Sequence[str], answers: Sequence[str], image_text: str
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation; with one answer fewer than prompts the
        last turn is left open for generation (ends with the assistant header)."""
        if len(answers) not in (len(prompts), len(prompts) - 1):
            raise ValueError(f"{len(prompts)} prompts need as many answers (or one fewer)")
        template = self.template
        bos = bos_ids(self.tokenizer)
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)

        def add(text: str, supervised: bool) -> None:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

        system = template.system.format(system=self.system_prompt) if self.system_prompt else ""
        for turn, prompt in enumerate(prompts):
            if turn == 0:
                prompt = (
                    prompt.replace(IMAGE_PLACEHOLDER, image_text, 1)
                    if IMAGE_PLACEHOLDER in prompt
                    else f"{image_text}\n{prompt}"
                )
            text = template.instruction.format(input=prompt.replace(IMAGE_PLACEHOLDER, ""))
            add(system + text if turn == 0 else text, False)
            if turn < len(answers):
                add(answers[turn] + template.suffix, True)
                add(template.sep, False)
        return ids, labels

    def __call__(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str] | None,
    ) -> dict[str, Tensor]:
        """Encode one sample; `answers` one shorter than `prompts` (or None for one prompt)
        leaves the last assistant turn open (generation)."""
        keys = key_frame_indices(len(frames), self.mllm_frames)
        vision = self.vision_inputs([frames[k] for k in keys])
        image_text = self.image_text(vision["num_patches"].tolist())
        ids, labels = self.encode(prompts, answers or [], image_text)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": vision["pixel_values"],
            "g_pixel_values": torch.stack([self.sam2_view(f) for f in frames]),
        }

    def collate(self, samples: list[dict[str, Any]], padding_side: str = "right") -> dict:
        """Pad token sequences; concatenate tiles; keep per-sample tensors as lists."""
        length = max(len(s["input_ids"]) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = sample["input_ids"]
            labels[row, span] = sample["labels"]
            attention_mask[row, span] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "g_pixel_values": [s["g_pixel_values"] for s in samples],
        }
        tensor_keys = {"input_ids", "labels", "pixel_values", "g_pixel_values"}
        for key in samples[0]:
            if key not in tensor_keys:
                batch[key] = [s[key] for s in samples]
        return batch
