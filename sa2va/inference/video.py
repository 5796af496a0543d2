"""Video inference: the MLLM + SAM2 on every frame, or the official Sa2VA memory propagation.

* ``per_frame``: every frame is its own one-image sample (MLLM and SAM2), batched. Frames do
  not see each other; this is what a model trained on single frames (``clip_len=1``) learned.
* ``propagate``: the official Sa2VA video inference. The MLLM sees the first
  ``min(T, key_frames)`` frames once (``key_frames`` defaults to the model's
  ``mllm_frames``, 5, as official ``predict_forward``) and yields one [SEG] embedding per
  mask. Each of those frames is a SAM2 conditioning frame prompted by that embedding; every
  later frame is tracked in order by SAM2's memory
  (:meth:`sa2va.model.sam2.LanguagePromptedSAM2.propagate`). No mask is blanked by SAM2's
  object score. Logits come out at SAM2's image size (low-res -> image size, bilinear, as
  official); :func:`probabilities` then resizes them to the frame (bilinear again).

``per_frame`` returns logits at the model's ``mask_size``.

A model with a temporal module (``model.temporal``) sees each frame with its neighbours, as
it was trained: ``per_frame`` then segments windows of the training clip length
(``model.temporal_window``) instead of single frames, consecutive windows sharing
``window_overlap`` frames (default: half a window), and a frame covered by several windows
gets the mean of their logits. ``propagate`` runs the module over all frames' SAM2 features in
the same windows (:meth:`sa2va.model.sa2va.Sa2VA.temporal_fn`) before decoding and memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sa2va.model.mllm import SEG_TOKEN
from sa2va.model.protocol import (
    DEFAULT_ANSWER,
    SegmentationModel,
    batch_to_device,
    model_device,
)
from sa2va.model.sa2va import Sa2VA
from sa2va.model.sam2 import upsample
from sa2va.model.temporal import window_starts

VideoMode = Literal["per_frame", "propagate"]
VIDEO_MODES: tuple[VideoMode, ...] = ("per_frame", "propagate")
# the keywords of segment_video that the eval / predict config sections set
VIDEO_OPTIONS = ("mode", "video_mode", "key_frames", "batch_size", "max_new_tokens")


@dataclass
class VideoPrediction:
    """Per frame: mask logits (K, S, S), one per [SEG] in reading order, and the answers."""

    logits: list[Tensor]
    answers: list[list[str]]  # per frame, one answer per prompt


def seg_owners(prompts: Sequence[str], answers: Sequence[str]) -> list[int]:
    """Prompt index of every [SEG] token, in the order the model reads them.

    A turn's [SEG]s are those in its prompt, then those in its answer ("Segment vessels [SEG]
    and optic disc [SEG]"), so one prompt can own several masks or none.
    """
    return [
        i
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))
        for _ in range(prompt.count(SEG_TOKEN) + answer.count(SEG_TOKEN))
    ]


def _answer_list(answers: str | Sequence[str], n: int) -> list[str]:
    if isinstance(answers, str):
        return [answers] * n
    if len(answers) != n:
        raise ValueError(f"got {len(answers)} answers for {n} prompts")
    return list(answers)


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _fast_batch(
    model: SegmentationModel,
    clips: list[list[Image.Image]],
    prompts: Sequence[str],
    answers: list[str],
    prompt_masks: list[Tensor] | None = None,
) -> dict[str, Any]:
    """On-device batch of clips with the fixed (teacher-forced) answers, without labels.

    ``prompt_masks`` (per clip (T, M, H, W) ground truth) go in as ``masks`` for a model
    prompted from the ground truth (``oracle_prompt``).
    """
    samples = [model.processor(clip, prompts, answers) for clip in clips]
    batch = model.processor.collate(samples)
    if prompt_masks is not None:
        batch["masks"] = prompt_masks
    batch = batch_to_device(batch, model_device(model))
    batch.pop("labels", None)
    return batch


def _clip_prompts(
    model: Sa2VA,
    clip: list[Image.Image],
    prompts: Sequence[str],
    answers: list[str],
    mode: str,
    max_new_tokens: int,
) -> tuple[Tensor, list[str]]:
    """[SEG] embeddings (M, C) of one clip and its answers: fixed ones (fast), or generated
    ones with the states read from generation itself (no second pass)."""
    if mode == "generate":
        texts, embeddings = model.generate_seg_embeddings(clip, prompts, max_new_tokens)
        return embeddings, texts
    _, embeddings, _ = model.seg_embeddings(_fast_batch(model, [clip], prompts, answers))
    return embeddings, answers


@torch.no_grad()
def segment_video(
    model: SegmentationModel,
    frames: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: str | Sequence[str] = DEFAULT_ANSWER,
    mode: str = "fast",
    video_mode: VideoMode = "per_frame",
    key_frames: int | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    memory_dtype: str | None = "bfloat16",
    prompt_masks: Sequence[Tensor] | None = None,
    window_overlap: int | None = None,
) -> VideoPrediction:
    """Mask logits for every frame of a sequence (a single image is a one-frame sequence).

    ``answers`` (one, or one per prompt) is the teacher-forced answer in ``fast`` mode;
    ``generate`` decodes it instead (one frame per MLLM call). ``batch_size`` frames share
    one forward pass in ``per_frame`` mode and one SAM2 image-encoder pass in ``propagate``.
    ``propagate`` only: ``key_frames``, the first frames shown to the MLLM and prompted by
    [SEG] (None: the model's ``mllm_frames``, the official 5; at most that many), and
    ``memory_dtype``, the precision SAM2's memories are stored in (official: bfloat16;
    None keeps them exact). ``prompt_masks``: per frame (M, H, W) ground truth, which a
    model with ``oracle_prompt`` is prompted from (``per_frame`` only). ``window_overlap``:
    frames shared by consecutive windows of a model with a temporal module (None: half a
    window). Call on a model in eval mode.
    """
    if mode not in ("fast", "generate"):
        raise ValueError(f"mode must be 'fast' or 'generate', got {mode!r}")
    if video_mode not in VIDEO_MODES:
        raise ValueError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}")
    if not frames or not prompts:
        raise ValueError("need at least one frame and one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if video_mode == "propagate":
        _check_propagate(model, key_frames)
    if memory_dtype is not None and not isinstance(getattr(torch, memory_dtype, None), torch.dtype):
        raise ValueError(
            f"memory_dtype must name a torch dtype (bfloat16) or be None, got {memory_dtype!r}"
        )
    answer_list = _answer_list(answers, len(prompts))
    if video_mode == "propagate":
        return _propagate(
            model,
            frames,
            prompts,
            answer_list,
            mode,
            key_frames,
            batch_size,
            max_new_tokens,
            memory_dtype,
            window_overlap,
        )
    windows = _frame_windows(model, len(frames), window_overlap)
    totals: list[Tensor | None] = [None] * len(frames)
    counts = [0] * len(frames)
    texts: list[list[str]] = [[] for _ in frames]
    per_call = 1 if mode == "generate" else max(1, batch_size // len(windows[0]))
    for group in _chunks(windows, per_call):
        clips = [[frames[t] for t in window] for window in group]
        masks = None
        if prompt_masks is not None:
            masks = [torch.stack([prompt_masks[t] for t in window]) for window in group]
        group_masks, group_texts = _clip_masks(
            model, clips, prompts, answer_list, mode, max_new_tokens, masks
        )
        for window, clip_masks, answers in zip(group, group_masks, group_texts, strict=True):
            for i, t in enumerate(window):
                totals[t] = clip_masks[i] if totals[t] is None else totals[t] + clip_masks[i]
                counts[t] += 1
                texts[t] = texts[t] or answers  # the first window's answers
    logits = [total / count for total, count in zip(totals, counts, strict=True)]
    return VideoPrediction(logits=logits, answers=texts)


def _clip_masks(
    model: SegmentationModel,
    clips: list[list[Image.Image]],
    prompts: Sequence[str],
    answers: list[str],
    mode: str,
    max_new_tokens: int,
    prompt_masks: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[list[str]]]:
    """(T, M, S, S) mask logits and the answers of each clip: fixed answers in one batched
    pass (fast), or one clip whose answers and [SEG] states come from generation itself."""
    if mode == "generate":
        if len(clips) != 1:
            raise ValueError("generate mode decodes one clip at a time")
        out = model.predict_forward(clips[0], prompts, "generate", max_new_tokens=max_new_tokens)
        return [out["masks"]], [out["text"]]
    batch = _fast_batch(model, clips, prompts, answers, prompt_masks)
    return list(model(batch).pred_masks), [answers] * len(clips)


def _frame_windows(model: Sa2VA, num_frames: int, overlap: int | None) -> list[range]:
    """The frames each ``per_frame`` sample holds: one frame, or a window of the training clip
    length for a model with a temporal module (overlap default: half a window)."""
    window = model.temporal_window if getattr(model, "temporal", None) is not None else 1
    overlap = window // 2 if overlap is None else overlap
    starts = window_starts(num_frames, window, overlap)
    return [range(start, min(start + window, num_frames)) for start in starts]


def _check_propagate(model: SegmentationModel, key_frames: int | None) -> None:
    """Propagation is Sa2VA's ([SEG] prompts SAM2's memory tracker); key frames it can show."""
    if not isinstance(model, Sa2VA):
        raise ValueError(
            f"video_mode=propagate prompts SAM2's memory with Sa2VA's [SEG] embeddings; "
            f"{type(model).__name__} has none: use video_mode=per_frame"
        )
    mllm_frames = model.processor.mllm_frames
    if key_frames is not None and not 1 <= key_frames <= mllm_frames:
        raise ValueError(
            f"key_frames must be in [1, {mllm_frames}] (the frames the MLLM sees, "
            f"model.mllm_frames) or None, got {key_frames}"
        )


def _propagate(
    model: Sa2VA,
    frames: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: list[str],
    mode: str,
    key_frames: int | None,
    batch_size: int,
    max_new_tokens: int,
    memory_dtype: str | None,
    window_overlap: int | None,
) -> VideoPrediction:
    num_cond = min(len(frames), key_frames or model.processor.mllm_frames)
    embeddings, texts = _clip_prompts(
        model, list(frames[:num_cond]), prompts, answers, mode, max_new_tokens
    )
    size = model.sam2.image_size
    if embeddings.shape[0] == 0:  # no [SEG] in the answers: no masks
        empty = embeddings.new_zeros(0, size, size)
        return VideoPrediction(logits=[empty] * len(frames), answers=[texts] * len(frames))
    images = [model.processor.sam2_view(f) for f in frames]
    dtype = getattr(torch, memory_dtype) if memory_dtype else None
    temporal = model.temporal_fn([len(frames)], window_overlap)
    outputs = model.sam2.propagate(images, embeddings, num_cond, batch_size, dtype, temporal)
    logits = [upsample(out.low_res_masks[:, 0], size) for out in outputs]
    return VideoPrediction(logits=logits, answers=[texts] * len(frames))


def probabilities(logits: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """(K, S, S) mask logits -> (K, H, W) float32 probabilities at an image's own size.

    Bilinear (align_corners=False) on the logits, then sigmoid (as the official Sa2VA resizes
    to the original size).
    """
    logits = logits.float()
    if logits.shape[0] == 0:
        return logits.new_zeros(0, *size_hw)
    return upsample(logits, size_hw).sigmoid()


@dataclass
class FramePrediction:
    """One frame of :func:`predict_frames`."""

    probs: np.ndarray  # (K, H, W) float32 probabilities at the frame's own size
    answers: list[str]  # one per prompt
    owners: list[int]  # prompt index of each of the K masks (:func:`seg_owners`)


def predict_frames(
    model: Sa2VA,
    frames: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: str | Sequence[str],
    options: Mapping[str, Any],
    prompt_masks: Sequence[Tensor] | None = None,
) -> Iterator[FramePrediction]:
    """:func:`segment_video`, then each frame's probabilities at the frame's own size and the
    prompt that owns each mask: what evaluation scores and prediction writes. ``options`` is
    a config section (``eval``, ``predict``); its :data:`VIDEO_OPTIONS` go to
    :func:`segment_video`, and so do ``prompt_masks`` (for oracle-prompted models)."""
    chosen = {key: options[key] for key in VIDEO_OPTIONS if key in options}
    pred = segment_video(model, frames, prompts, answers, **chosen, prompt_masks=prompt_masks)
    for logits, texts, frame in zip(pred.logits, pred.answers, frames, strict=True):
        probs = probabilities(logits, (frame.height, frame.width)).cpu().numpy()
        yield FramePrediction(probs, texts, seg_owners(prompts, texts))
