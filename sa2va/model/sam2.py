"""SAM2 as a language-prompted mask decoder, prompted the way the official Sa2VA prompts it.

The projected [SEG] embedding is one more sparse prompt token. Official Sa2VA (its edited
copy of SAM 2's ``_forward_sam_heads``) builds the sparse prompt as SAM2 does for a frame
without clicks: one empty point (label -1) that the prompt encoder pads with a second one,
i.e. two ``not_a_point`` tokens, and appends the [SEG] embedding after them (3 tokens). The
mask decoder then runs with SAM2's multimask rule (``_use_multimask``: on with 0 points),
the mask with the highest predicted IoU is kept, and the object score does NOT blank the
mask (official comments that out). Training and inference share this path.
:class:`LanguagePromptedSAM2` adds it to ``SAM2Base`` by subclassing, together with the
official video propagation (conditioning frames prompted by [SEG], then SAM2 memory).

The `sam2` package is imported through :func:`import_sam2`: at import time it calls Hydra's
`initialize_config_module("sam2")` whenever GlobalHydra is not initialised, which would
break this project's own `@hydra.main` apps and `hydra.compose` in tests. SAM2 is built
from this repo's `conf/model/sam2/*.yaml` (SAM 2.0 ``hiera_*``, as every official Sa2VA;
SAM 2.1 ``hiera_*_v2_1``) with `hydra.utils.instantiate` instead of
`sam2.build_sam.build_sam2`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def import_sam2() -> None:
    """Import `sam2` without leaving its Hydra config module initialised."""
    from hydra.core.global_hydra import GlobalHydra

    was_initialized = GlobalHydra.instance().is_initialized()
    import sam2  # noqa: F401

    if not was_initialized:
        GlobalHydra.instance().clear()


import_sam2()
from sam2.modeling.sam2_base import SAM2Base  # noqa: E402  (after the Hydra-safe import)

NOT_A_POINT = -1  # SAM2's label for "no point here" (a padding point)
# SAM2's flattened per-level features: (HW, B, C) maps, position encodings, (H, W) sizes
FlatFeatures = tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]
# A temporal module over the (N, C, h, w) last-level image features (sa2va.model.temporal)
TemporalFn = Callable[[Tensor], Tensor]


def with_temporal(backbone_out: dict[str, Any], temporal: TemporalFn | None) -> dict[str, Any]:
    """SAM2's image-encoder output with ``temporal`` applied to its last (lowest-resolution)
    level, the features the mask decoder cross-attends to and memory is encoded from."""
    if temporal is None:
        return backbone_out
    last = temporal(backbone_out["backbone_fpn"][-1])
    return backbone_out | {
        "backbone_fpn": [*backbone_out["backbone_fpn"][:-1], last],
        "vision_features": last,
    }


@dataclass
class ImageFeatures:
    """SAM2 image-encoder output for N frames, ready for the mask decoder."""

    image_embed: Tensor  # (N, C, h, w), no-memory embedding already added
    high_res: list[Tensor]  # [(N, C/8, 4h, 4w), (N, C/4, 2h, 2w)] or []

    def index_select(self, index: Tensor) -> ImageFeatures:
        return ImageFeatures(
            self.image_embed.index_select(0, index),
            [f.index_select(0, index) for f in self.high_res],
        )


@dataclass
class MaskDecoding:
    """SAM2 mask-decoder output for N prompts, the best mask already chosen.

    ``low_res_masks`` are logits at SAM2's image_size/4; ``token`` is the decoder output
    token of the chosen mask (SAM2 turns it into the object pointer).
    """

    sparse_embeddings: Tensor  # (N, P, C): 2 not_a_point tokens (+ the [SEG] embedding)
    low_res_multimasks: Tensor  # (N, M, h, w), M = 3 with multimask output, else 1
    ious: Tensor  # (N, M) predicted IoU
    best_iou_inds: Tensor  # (N,) index of the kept mask
    low_res_masks: Tensor  # (N, 1, h, w)
    token: Tensor  # (N, C)
    object_score_logits: Tensor  # (N, 1)


def decode_masks(
    heads: Any, features: ImageFeatures, prompts: Tensor | None, multimask_output: bool
) -> MaskDecoding:
    """Prompt encoder + mask decoder for N frames, each with one [SEG] embedding or none.

    ``heads`` needs only ``sam_prompt_encoder`` and ``sam_mask_decoder`` (the planner passes
    just those). ``prompts`` (N, C) are appended after the empty point prompt's two
    ``not_a_point`` tokens; ``None`` (a memory-tracked frame) leaves those two alone. With
    ``multimask_output`` the mask with the highest predicted IoU among the 3 is kept.
    Masks are never blanked by the object score (as the official Sa2VA).
    """
    embed = features.image_embed
    n = embed.shape[0]
    coords = torch.zeros(n, 1, 2, device=embed.device)
    labels = torch.full((n, 1), NOT_A_POINT, dtype=torch.int32, device=embed.device)
    sparse, dense = heads.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    if prompts is not None:
        sparse = torch.cat([sparse, prompts.unsqueeze(1).to(sparse.dtype)], dim=1)
    multimasks, ious, tokens, object_scores = heads.sam_mask_decoder(
        image_embeddings=embed,
        image_pe=heads.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=False,
        high_res_features=features.high_res or None,
    )
    multimasks = multimasks.float()  # as SAM2: masks leave the head in float32
    rows = torch.arange(n, device=embed.device)
    best = ious.argmax(-1) if multimask_output else torch.zeros_like(rows)
    # SAM2 keeps only token 0 unless the multimask tokens also make the object pointer
    token = tokens[rows, best] if tokens.shape[1] > 1 else tokens[:, 0]
    return MaskDecoding(
        sparse_embeddings=sparse,
        low_res_multimasks=multimasks,
        ious=ious,
        best_iou_inds=best,
        low_res_masks=multimasks[rows, best].unsqueeze(1),
        token=token,
        object_score_logits=object_scores,
    )


@dataclass
class FrameDecoding:
    """One frame of N objects: the mask decoding plus SAM2's object pointer."""

    masks: MaskDecoding
    obj_ptr: Tensor  # (N, C)

    @property
    def low_res_masks(self) -> Tensor:
        return self.masks.low_res_masks


def round_memory(features: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Memory features as stored: rounded through ``dtype`` (None keeps them exact).

    The official video inference stores SAM2 memories in bfloat16 (to save GPU memory)
    and later concatenates them with float32 tensors, so the memory attention sees
    bf16-rounded values in the model's own dtype; this reproduces exactly that.
    """
    if dtype is None:
        return features
    return features.to(dtype).to(features.dtype)


class LanguagePromptedSAM2(SAM2Base):
    """``SAM2Base`` whose SAM head takes the projected [SEG] embedding, as official Sa2VA.

    Build it from ``conf/model/sam2/*.yaml`` (``_target_`` names this class). The public
    methods are the single-frame decode used in training (:meth:`image_features`,
    :meth:`decode_language`) and the official video propagation (:meth:`propagate`);
    everything else is SAM2's own code (its click-prompted ``track_step`` is left as is).
    """

    @property
    def language_multimask(self) -> bool:
        """SAM2's multimask rule for an initial conditioning frame without clicks."""
        return self._use_multimask(is_init_cond_frame=True, point_inputs=None)

    def image_features(
        self,
        images: Tensor,
        encode: Callable[[Tensor], dict[str, Any]] | None = None,
        temporal: TemporalFn | None = None,
    ) -> ImageFeatures:
        """Image encoder on (N, 3, S, S) normalised images, each a frame without memory.

        ``temporal`` (optional) mixes the frames' last-level features first. SAM2's own
        memory conditioning of an initial conditioning frame (adding ``no_mem_embed``, as
        ``directly_add_no_mem_embed`` asks) gives the embedding. ``encode`` stands in for the
        image encoder (see :meth:`forward_image`).
        """
        backbone_out = with_temporal(self.forward_image(images, encode), temporal)
        feats, pos, sizes = self._flat_features(backbone_out)
        embed = self._prepare_memory_conditioned_features(
            frame_idx=0,
            is_init_cond_frame=True,
            current_vision_feats=feats[-1:],
            current_vision_pos_embeds=pos[-1:],
            feat_sizes=sizes[-1:],
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=1,
        )
        return ImageFeatures(embed, _high_res_maps(feats, sizes))

    def forward_image(
        self, img_batch: Tensor, encode: Callable[[Tensor], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """``SAM2Base.forward_image`` (image encoder, then the mask decoder's high-resolution
        convs), restated so that ``encode`` can stand in for ``self.image_encoder``: a frozen
        encoder's cached outputs (:mod:`sa2va.model.feature_cache`) enter before the convs,
        which may be training."""
        backbone_out = (encode or self.image_encoder)(img_batch)
        if self.use_high_res_features_in_sam:
            fpn = backbone_out["backbone_fpn"]
            fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])
            fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])
        return backbone_out

    def decode_language(self, features: ImageFeatures, prompts: Tensor | None) -> FrameDecoding:
        """One mask per (N, C) [SEG] embedding on N frames, with its object pointer."""
        multimask = self._use_multimask(is_init_cond_frame=prompts is not None, point_inputs=None)
        masks = decode_masks(self, features, prompts, multimask)
        return FrameDecoding(masks, self._object_pointer(masks))

    def _object_pointer(self, masks: MaskDecoding) -> Tensor:
        """SAM2's object pointer: projected token, gated by the object score."""
        obj_ptr = self.obj_ptr_proj(masks.token)
        if not self.pred_obj_scores:
            return obj_ptr
        scores = masks.object_score_logits
        appearing = scores.sigmoid() if self.soft_no_obj_ptr else (scores > 0).float()
        if self.fixed_no_obj_ptr:
            obj_ptr = appearing * obj_ptr
        return obj_ptr + (1 - appearing) * self.no_obj_ptr

    def _flat_features(self, backbone_out: dict[str, Any]) -> FlatFeatures:
        """SAM2's (HW, B, C) features, position encodings and sizes, lowest level last."""
        _, feats, pos, sizes = self._prepare_backbone_features(backbone_out)
        return feats, pos, sizes

    # ---- video ------------------------------------------------------------------------
    @torch.no_grad()
    def propagate(
        self,
        images: Sequence[Tensor],
        prompts: Tensor,
        num_cond_frames: int,
        batch_size: int = 4,
        memory_dtype: torch.dtype | None = torch.bfloat16,
        temporal: TemporalFn | None = None,
    ) -> list[FrameDecoding]:
        """Official Sa2VA video inference for N objects over T frames; one output per frame.

        ``images``: T SAM2 views (3, S, S); ``prompts``: (N, C) projected [SEG] embeddings.
        Frames ``0 .. num_cond_frames-1`` (the frames the MLLM saw) are each an initial
        conditioning frame prompted by the [SEG] embedding, without memory. Their memories
        are encoded once all of them are decoded (from the chosen mask, as a prompted
        frame's: ``is_mask_from_pts``), then every later frame is tracked in order with
        SAM2's memory attention over the conditioning frames and the previous frames.
        Memories are stored rounded through ``memory_dtype`` (official: bfloat16).
        ``temporal`` (optional) mixes the last-level features of all T frames (T, C, h, w)
        before any frame is decoded, as in training.
        """
        num_frames = len(images)
        if not 1 <= num_cond_frames <= num_frames:
            raise ValueError(f"num_cond_frames must be in [1, {num_frames}], got {num_cond_frames}")
        memory: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        outputs: list[FrameDecoding] = []
        cond_feats = []
        encode = self._encoder(images, prompts.device, batch_size, temporal)
        for t, frame in self._frames(encode, range(num_cond_frames), prompts, batch_size):
            outputs.append(self._decode_frame(t, frame, memory, num_frames, prompts))
            cond_feats.append(frame)
        for t, (frame, out) in enumerate(zip(cond_feats, outputs, strict=True)):
            memory["cond_frame_outputs"][t] = self._memory_entry(frame, out, True, memory_dtype)
        later = range(num_cond_frames, num_frames)
        for t, frame in self._frames(encode, later, prompts, batch_size):
            out = self._decode_frame(t, frame, memory, num_frames, None)
            memory["non_cond_frame_outputs"][t] = self._memory_entry(
                frame, out, False, memory_dtype
            )
            outputs.append(out)
        return outputs

    def _encoder(
        self,
        images: Sequence[Tensor],
        device: torch.device,
        batch_size: int,
        temporal: TemporalFn | None,
    ) -> Callable[[range], dict[str, Any]]:
        """Image-encoder output for a range of frames: encoded when asked or, with a
        temporal module, every frame encoded first (in ``batch_size`` chunks) and mixed."""
        dtype = self.no_mem_embed.dtype

        def encode(chunk: range) -> dict[str, Any]:
            return self.forward_image(torch.stack([images[t] for t in chunk]).to(device, dtype))

        if temporal is None:
            return encode
        levels = ("backbone_fpn", "vision_pos_enc")
        parts = [encode(c) for c in _chunks(range(len(images)), batch_size)]
        whole = {
            key: [torch.cat(x) for x in zip(*(p[key] for p in parts), strict=True)]
            for key in levels
        }
        video = with_temporal(whole, temporal)
        return lambda chunk: {
            key: [x[chunk.start : chunk.stop] for x in video[key]] for key in levels
        }

    def _frames(
        self,
        encode: Callable[[range], dict[str, Any]],
        indices: range,
        prompts: Tensor,
        batch_size: int,
    ) -> Iterator[tuple[int, FlatFeatures]]:
        """Flattened features of each frame in ``indices``, repeated for each object."""
        n_obj = prompts.shape[0]
        for chunk in _chunks(indices, batch_size):
            backbone_out = encode(chunk)
            for index, t in enumerate(chunk):
                frame = {
                    key: [x[index : index + 1].expand(n_obj, -1, -1, -1) for x in backbone_out[key]]
                    for key in ("backbone_fpn", "vision_pos_enc")
                }
                yield t, self._flat_features(frame)

    def _decode_frame(
        self,
        frame_idx: int,
        frame: FlatFeatures,
        memory: dict[str, dict[int, Any]],
        num_frames: int,
        prompts: Tensor | None,
    ) -> FrameDecoding:
        """A [SEG]-prompted conditioning frame (no memory: SAM2 adds ``no_mem_embed``) or,
        with ``prompts=None``, a frame tracked by SAM2's memory attention."""
        feats, pos, sizes = frame
        embed = self._prepare_memory_conditioned_features(
            frame_idx=frame_idx,
            is_init_cond_frame=prompts is not None,
            current_vision_feats=feats[-1:],
            current_vision_pos_embeds=pos[-1:],
            feat_sizes=sizes[-1:],
            output_dict=memory,
            num_frames=num_frames,
        )
        return self.decode_language(ImageFeatures(embed, _high_res_maps(feats, sizes)), prompts)

    def _memory_entry(
        self,
        frame: FlatFeatures,
        out: FrameDecoding,
        prompted: bool,
        memory_dtype: torch.dtype | None,
    ) -> dict[str, Any]:
        """SAM2's memory encoder on the chosen mask at image size (bilinear, as SAM2)."""
        feats, _, sizes = frame
        high_res = upsample(out.low_res_masks[:, 0], self.image_size).unsqueeze(1)
        features, pos_enc = self._encode_new_memory(
            current_vision_feats=feats,
            feat_sizes=sizes,
            pred_masks_high_res=high_res,
            object_score_logits=out.masks.object_score_logits,
            is_mask_from_pts=prompted,
        )
        return {
            "maskmem_features": round_memory(features, memory_dtype),
            "maskmem_pos_enc": pos_enc,
            "pred_masks": out.low_res_masks,
            "obj_ptr": out.obj_ptr,
        }


def _chunks(indices: range, size: int) -> Iterator[range]:
    """``indices`` in consecutive pieces of at most ``size``."""
    for start in range(indices.start, indices.stop, size):
        yield range(start, min(start + size, indices.stop))


def _high_res_maps(feats: list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
    """SAM2's flattened (HW, B, C) high-resolution levels as (B, C, H, W) maps."""
    return [
        x.permute(1, 2, 0).reshape(x.shape[1], x.shape[2], *size)
        for x, size in zip(feats[:-1], sizes[:-1], strict=True)
    ]


# ---- checkpoints --------------------------------------------------------------------
# Keys only a SAM 2.1 model has (spatial no-object embedding, projected temporal encoding
# of object pointers); the SAM 2.0 of every official Sa2VA has neither.
SAM2_1_ONLY_KEYS = re.compile(r"^(no_obj_embed_spatial$|obj_ptr_tpos_proj\.)")
# Hiera trunk depth (blocks) -> this repo's config name of that size
HIERA_SIZES = {12: "t", 16: "s", 24: "b+", 48: "l"}


def rename_release_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Meta's names for the official HF release's: CXBlock's layer scale ``.g_weight``
    (the release converter renames Meta's ``.gamma``) back to ``.gamma``."""
    return {re.sub(r"\.g_weight$", ".gamma", key): value for key, value in state.items()}


def _hiera_size(keys: Sequence[str]) -> str:
    blocks = {k.split(".")[3] for k in keys if k.startswith("image_encoder.trunk.blocks.")}
    return HIERA_SIZES.get(len(blocks), "<size>")


def sam2_version_mismatch(model_keys: Sequence[str], file_keys: Sequence[str]) -> str | None:
    """Why a SAM2 checkpoint does not fit a model, when the cause is a SAM 2.0/2.1 mix-up.

    SAM 2.1 adds ``no_obj_embed_spatial`` and ``obj_ptr_tpos_proj.*``: present in the file
    but not the model means a 2.1 file given to a 2.0 config, and the reverse.
    """
    in_file = any(SAM2_1_ONLY_KEYS.match(k) for k in file_keys)
    in_model = any(SAM2_1_ONLY_KEYS.match(k) for k in model_keys)
    size = _hiera_size(file_keys)
    if in_file and not in_model:
        return f"SAM 2.1 checkpoint given to a SAM 2.0 config: use model/sam2=hiera_{size}_v2_1"
    if in_model and not in_file:
        return (
            "SAM 2.0 checkpoint (as in every official Sa2VA) given to a SAM 2.1 config: "
            f"use model/sam2=hiera_{size}"
        )
    return None


def build_sam2(cfg: Mapping[str, Any]) -> LanguagePromptedSAM2:
    """Instantiate SAM2 from a ``conf/model/sam2`` node (``_target_``: this module's class)."""
    from hydra.utils import instantiate

    model = instantiate(dict(cfg), _convert_="all")
    if not isinstance(model, LanguagePromptedSAM2):
        raise TypeError(
            f"SAM2 config _target_ {cfg.get('_target_')!r} builds {type(model).__name__}; "
            "Sa2VA needs sa2va.model.sam2.LanguagePromptedSAM2 (the [SEG]-prompted SAM head)"
        )
    return model


def upsample(logits: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False, as SAM2) resize of (N, h, w) logits to (N, *size)."""
    size_hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(logits.shape[-2:]) == size_hw:
        return logits
    return F.interpolate(
        logits.unsqueeze(1), size_hw, mode="bilinear", align_corners=False
    ).squeeze(1)
