"""Video inference: the MLLM + SAM2 on every frame, or the MLLM on key frames + SAM2 memory.

* ``per_frame``: every frame is its own one-image sample (MLLM and SAM2), batched. Frames do
  not see each other; this is what a model trained on single frames (``clip_len=1``) learned.
* ``propagate``: the MLLM sees only the key frames (evenly spaced, always frame 0) once and
  yields one [SEG] embedding per mask. On the key frames that embedding is SAM2's prompt (the
  same sparse prompt as training, see :func:`sa2va.model.sam2.seg_prompt`); every other frame
  is tracked by SAM2's own memory machinery (``_prepare_memory_conditioned_features``,
  ``track_step``, ``_encode_new_memory``) from the key frames and the frames before it, as
  SAM 2's video predictor and the official Sa2VA video inference do. SAM2's object-score
  head applies (a mask judged absent becomes ``NO_OBJ_SCORE`` logits), key frames included.

Both return mask logits at the model's ``mask_size``; :func:`probabilities` resizes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sa2va.data.processor import key_frame_indices
from sa2va.model.mllm import SEG_TOKEN
from sa2va.model.sa2va import DEFAULT_ANSWER, Sa2VA, batch_to_device
from sa2va.model.sam2 import seg_prompt, upsample

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

VideoMode = Literal["per_frame", "propagate"]
VIDEO_MODES: tuple[VideoMode, ...] = ("per_frame", "propagate")


@dataclass
class VideoPrediction:
    """Per frame: mask logits (K, S, S), one per [SEG] in reading order, and the answers."""

    logits: list[Tensor]
    answers: list[list[str]]  # per frame, one answer per prompt


def seg_owners(prompts: Sequence[str], answers: Sequence[str]) -> list[int]:
    """Prompt index of every [SEG] token, in the order the model reads them.

    A turn's [SEG]s are those in its prompt, then those in its answer ("Segment vessels [SEG]
    and optic disc [SEG]", seed 000 §4.3), so one prompt can own several masks or none.
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


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _clip_batch(
    model: Sa2VA,
    clips: list[list[Image.Image]],
    prompts: Sequence[str],
    answers: list[str],
    mode: str,
    max_new_tokens: int,
) -> tuple[dict[str, Any], list[list[str]]]:
    """On-device batch of clips with fixed answers (fast), or of one clip with generated ones."""
    if mode == "generate":
        if len(clips) != 1:
            raise ValueError("generate mode decodes one clip at a time")
        batch, texts = model.prepare_inputs(
            clips[0], prompts, "generate", max_new_tokens=max_new_tokens
        )
        return batch, [texts]
    if mode != "fast":
        raise ValueError(f"mode must be 'fast' or 'generate', got {mode!r}")
    samples = [model.processor(clip, prompts, answers) for clip in clips]
    batch = batch_to_device(
        model.processor.collate(samples), model.text_hidden_fcs[0].weight.device
    )
    batch.pop("labels")
    return batch, [answers] * len(clips)


@torch.no_grad()
def segment_video(
    model: Sa2VA,
    frames: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: str | Sequence[str] = DEFAULT_ANSWER,
    mode: str = "fast",
    video_mode: VideoMode = "per_frame",
    key_frames: int = 1,
    batch_size: int = 4,
    max_new_tokens: int = 32,
) -> VideoPrediction:
    """Mask logits for every frame of a sequence (a single image is a one-frame sequence).

    ``answers`` (one, or one per prompt) is the teacher-forced answer in ``fast`` mode;
    ``generate`` decodes it instead (one frame per MLLM call). ``batch_size`` frames share
    one forward pass in ``per_frame`` mode and one SAM2 image-encoder pass in ``propagate``.
    Call on a model in eval mode.
    """
    if video_mode not in VIDEO_MODES:
        raise ValueError(f"video_mode must be one of {VIDEO_MODES}, got {video_mode!r}")
    if not frames or not prompts:
        raise ValueError("need at least one frame and one prompt")
    if batch_size < 1 or key_frames < 1:
        raise ValueError("batch_size and key_frames must be >= 1")
    answer_list = _answer_list(answers, len(prompts))
    if video_mode == "propagate":
        return _propagate(
            model, frames, prompts, answer_list, mode, key_frames, batch_size, max_new_tokens
        )
    logits: list[Tensor] = []
    texts: list[list[str]] = []
    step = 1 if mode == "generate" else batch_size
    for chunk in _chunks(range(len(frames)), step):
        clips = [[frames[t]] for t in chunk]
        batch, chunk_texts = _clip_batch(model, clips, prompts, answer_list, mode, max_new_tokens)
        logits += [masks[0] for masks in model(batch).pred_masks]
        texts += chunk_texts
    return VideoPrediction(logits=logits, answers=texts)


def _propagate(
    model: Sa2VA,
    frames: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: list[str],
    mode: str,
    key_frames: int,
    batch_size: int,
    max_new_tokens: int,
) -> VideoPrediction:
    keys = key_frame_indices(len(frames), key_frames)
    batch, texts = _clip_batch(
        model, [[frames[k] for k in keys]], prompts, answers, mode, max_new_tokens
    )
    _, embeddings, _ = model.seg_embeddings(batch)
    size = model.processor.mask_size
    if embeddings.shape[0] == 0:  # no [SEG] in the answers: no masks
        empty = embeddings.new_zeros(0, size, size)
        return VideoPrediction(logits=[empty] * len(frames), answers=texts * len(frames))
    images = [model.processor.sam2_view(f) for f in frames]
    low_res = propagate_masks(model.sam2, images, embeddings, keys, batch_size)
    logits = [upsample(m, size) for m in low_res]
    return VideoPrediction(logits=logits, answers=texts * len(frames))


@contextmanager
def _seg_prompted(sam2: SAM2Base, prompts: Tensor) -> Iterator[None]:
    """Within the block SAM2's prompt encoder returns the [SEG] embeddings as the sparse prompt.

    ``SAM2Base._forward_sam_heads`` takes only points and masks (the official Sa2VA edits
    SAM2's source to add a language argument). Swapping the encoder's output for one call
    keeps the rest of SAM2's head as it is: object pointer, object score, no-object handling.
    """
    encoder = sam2.sam_prompt_encoder
    original = encoder.forward

    def forward(points: Any, boxes: Any, masks: Any) -> tuple[Tensor, Tensor]:
        return seg_prompt(*original(points=None, boxes=boxes, masks=masks), prompts)

    encoder.forward = forward
    try:
        yield
    finally:
        del encoder.forward


def _frame_features(
    sam2: SAM2Base, backbone_out: dict[str, Any], index: int, n_obj: int
) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
    """One frame's flattened features, repeated for each object (as SAM2VideoPredictor does)."""
    frame = {
        key: [x[index : index + 1].expand(n_obj, -1, -1, -1) for x in backbone_out[key]]
        for key in ("backbone_fpn", "vision_pos_enc")
    }
    _, feats, pos, sizes = sam2._prepare_backbone_features(frame)
    return feats, pos, sizes


def _condition_frame(
    sam2: SAM2Base,
    frame_idx: int,
    feats: list[Tensor],
    pos: list[Tensor],
    sizes: list[tuple[int, int]],
    prompts: Tensor,
    output_dict: dict[str, dict[int, Any]],
    num_frames: int,
) -> dict[str, Any]:
    """A key frame: no memory, the [SEG] prompt, a single mask (as in training), new memory."""
    pix_feat = sam2._prepare_memory_conditioned_features(
        frame_idx=frame_idx,
        is_init_cond_frame=True,
        current_vision_feats=feats[-1:],
        current_vision_pos_embeds=pos[-1:],
        feat_sizes=sizes[-1:],
        output_dict=output_dict,
        num_frames=num_frames,
    )
    high_res = [
        x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s)
        for x, s in zip(feats[:-1], sizes[:-1], strict=True)
    ]
    with _seg_prompted(sam2, prompts):
        *_, low_res, high_res_masks, obj_ptr, object_score = sam2._forward_sam_heads(
            backbone_features=pix_feat,
            high_res_features=high_res or None,
            multimask_output=False,
        )
    maskmem, maskmem_pos = sam2._encode_new_memory(
        current_vision_feats=feats,
        feat_sizes=sizes,
        pred_masks_high_res=high_res_masks,
        object_score_logits=object_score,
        is_mask_from_pts=True,  # a prompted frame, as a clicked one is
    )
    return {
        "pred_masks": low_res,
        "obj_ptr": obj_ptr,
        "object_score_logits": object_score,
        "maskmem_features": maskmem,
        "maskmem_pos_enc": maskmem_pos,
    }


def propagate_masks(
    sam2: SAM2Base,
    images: Sequence[Tensor],
    prompts: Tensor,
    key_frames: Sequence[int],
    batch_size: int = 4,
) -> Tensor:
    """Track N prompted objects through T frames with SAM2's memory; (T, N, h, w) low-res logits.

    ``images`` are SAM2 views (3, S, S); ``prompts`` (N, C) projected [SEG] embeddings that
    prompt the ``key_frames`` (which must include frame 0: tracking runs forward). Key frames
    are decoded first, then the others in temporal order, each attending to the key frames'
    and the previous frames' memories.
    """
    num_frames, n_obj = len(images), prompts.shape[0]
    keys = sorted(set(key_frames))
    if not keys or keys[0] != 0 or keys[-1] >= num_frames:
        raise ValueError(f"key frames {list(key_frames)} must include 0 and be < {num_frames}")
    device, dtype = prompts.device, sam2.no_mem_embed.dtype
    output_dict: dict[str, dict[int, Any]] = {
        "cond_frame_outputs": {},
        "non_cond_frame_outputs": {},
    }
    order = keys + [t for t in range(num_frames) if t not in keys]
    for chunk in _chunks(order, batch_size):
        backbone_out = sam2.forward_image(torch.stack([images[t] for t in chunk]).to(device, dtype))
        for index, t in enumerate(chunk):
            feats, pos, sizes = _frame_features(sam2, backbone_out, index, n_obj)
            if t in keys:
                out = _condition_frame(sam2, t, feats, pos, sizes, prompts, output_dict, num_frames)
                output_dict["cond_frame_outputs"][t] = out
            else:
                out = sam2.track_step(
                    frame_idx=t,
                    is_init_cond_frame=False,
                    current_vision_feats=feats,
                    current_vision_pos_embeds=pos,
                    feat_sizes=sizes,
                    point_inputs=None,
                    mask_inputs=None,
                    output_dict=output_dict,
                    num_frames=num_frames,
                )
                output_dict["non_cond_frame_outputs"][t] = out
    outputs = output_dict["cond_frame_outputs"] | output_dict["non_cond_frame_outputs"]
    return torch.stack([outputs[t]["pred_masks"][:, 0] for t in range(num_frames)])


def probabilities(logits: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """(K, S, S) mask logits -> (K, H, W) float32 probabilities at an image's own size.

    Bilinear on the logits, then sigmoid (as the official Sa2VA resizes to the original size).
    """
    logits = logits.float()
    if logits.shape[0] == 0:
        return logits.new_zeros(0, *size_hw)
    if tuple(logits.shape[-2:]) != tuple(size_hw):
        logits = F.interpolate(logits.unsqueeze(0), size_hw, mode="bilinear").squeeze(0)
    return logits.sigmoid()
