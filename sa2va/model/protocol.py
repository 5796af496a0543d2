"""The segmentation-model protocol: what training, evaluation, prediction and export ask of a model.

Sa2VA (:class:`sa2va.model.sa2va.Sa2VA`) and every baseline (:mod:`sa2va.model.baselines`)
implement it, so the same LightningModule, ``sa2va.eval``, ``sa2va.predict`` and
``sa2va.export`` serve all of them. A model is

* **built from its config**: ``cls(**config, load_pretrained=True)`` from the Hydra node
  ``model`` (``_target_`` names the class); ``config`` is kept verbatim (plain types) and
  written into every checkpoint, so ``cls(**config, load_pretrained=False)`` rebuilds the same
  architecture without reading any pretrained file before the trained weights are loaded;
* **paired with its processor**: ``model.processor`` turns one clip (PIL frames) and one prompt
  (+ answer) per object into one sample of tensors, and collates samples into a batch. The data
  module calls it in its workers and adds ``masks`` (per sample (T, M, S, S), S =
  ``processor.mask_size``); the loss reads those;
* **a function of the batch**: ``forward(batch) -> SegmentationOutput`` gives per-sample
  (T, M, S, S) mask logits, one per (frame, object) the batch asks for, and the optional
  terms some losses need (a language-model loss, SAM2's low-resolution logits);
* **asked for masks at inference** through :meth:`SegmentationModel.prepare_inputs` (one clip
  -> an on-device batch without labels, plus the answer texts whose ``[SEG]`` tokens say which
  prompt owns which mask) and ``forward``; ``predict_forward`` does both for one clip.

A model that is prompted from the ground truth (MedSAM's box) says so with
``oracle_prompt = True``: evaluation then adds the ground-truth ``masks`` to its inference
batches and marks the result as an oracle-prompted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor, nn

DEFAULT_ANSWER = "Sure, [SEG]."


@dataclass
class SegmentationOutput:
    """What ``forward(batch)`` returns; the loss and the metrics read only this."""

    pred_masks: list[Tensor]  # per sample: (T, M, H, W) mask logits at processor.mask_size
    seg_counts: list[int]  # masks (objects) per sample: M
    lm_loss: Tensor | None = None  # language-model loss; None for models without one
    # per sample: (T, M, h, w) SAM2 low-resolution logits (image_size/4), for loss=official;
    # None for models without them
    low_res_masks: list[Tensor] | None = None


class SegmentationProcessor(Protocol):
    """One clip + one prompt (and answer) per object -> one sample; samples -> a batch.

    The same shape as :class:`sa2va.data.datamodule.Processor`, which states what the data
    module asks (data/ does not import model/).
    """

    mask_size: int  # side of the square masks the model predicts and is supervised at

    def __call__(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str] | None,
    ) -> dict[str, Any]: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]: ...


@runtime_checkable
class SegmentationModel(Protocol):
    """A mask model that trains, evaluates, predicts and exports through this project's apps."""

    config: dict[str, Any]  # the constructor's arguments, plain types (see the module doc)
    processor: SegmentationProcessor
    oracle_prompt: ClassVar[bool]  # prompted from the ground-truth mask (evaluation only)

    def forward(self, batch: Mapping[str, Any]) -> SegmentationOutput: ...

    def prepare_inputs(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> tuple[dict[str, Any], list[str]]:
        """One clip as an on-device batch without labels, and one answer text per prompt."""
        ...

    def predict_forward(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> dict[str, Any]:
        """``{"text": answers, "masks": (T, M, H, W) logits, "seg_count": M}`` for one clip."""
        ...

    def save_pretrained_files(self, folder: Path) -> None:
        """Write the non-weight files a rebuild reads into ``folder`` (Sa2VA: InternVL's
        config, tokenizer, image processor); nothing when the config is enough (baselines)."""
        ...


class ClipPredictor:
    """``predict_forward`` from a model's ``prepare_inputs`` and ``forward``: one clip's masks."""

    @torch.no_grad()
    def predict_forward(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> dict[str, Any]:
        """Answer texts and mask logits (T, M, H, W) for one clip (modes: ``prepare_inputs``)."""
        batch, texts = self.prepare_inputs(frames, prompts, mode, answer, max_new_tokens)
        out = self(batch)
        return {"text": texts, "masks": out.pred_masks[0], "seg_count": out.seg_counts[0]}


def per_sample(flat: Tensor, lengths: Sequence[int], counts: Sequence[int]) -> list[Tensor]:
    """(sum T*M, H, W) masks, frames first then objects -> per sample (T, M, H, W)."""
    sizes = [t * m for t, m in zip(lengths, counts, strict=True)]
    chunks = zip(flat.split(sizes), lengths, counts, strict=True)
    return [chunk.view(t, m, *chunk.shape[-2:]) for chunk, t, m in chunks]


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on (where its inference batches go)."""
    return next(model.parameters()).device


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
        return [v.to(device) for v in value]  # per-sample tensors (clips differ in length)
    return value


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch's tensors and per-sample tensor lists to ``device``."""
    return {key: _to_device(value, device) for key, value in batch.items()}
