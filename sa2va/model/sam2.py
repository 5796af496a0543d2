"""SAM2 as a language-prompted mask decoder.

The `sam2` package is imported lazily: at import time it calls Hydra's
`initialize_config_module("sam2")` whenever GlobalHydra is not initialised, which would
break this project's own `@hydra.main` apps and `hydra.compose` in tests. SAM2 is built
from this repo's `conf/model/sam2/*.yaml` with `hydra.utils.instantiate` instead of
`sam2.build_sam.build_sam2`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


def import_sam2() -> None:
    """Import `sam2` without leaving its Hydra config module initialised."""
    from hydra.core.global_hydra import GlobalHydra

    was_initialized = GlobalHydra.instance().is_initialized()
    import sam2  # noqa: F401

    if not was_initialized:
        GlobalHydra.instance().clear()


def build_sam2(cfg: Mapping[str, Any]) -> SAM2Base:
    """Instantiate a `SAM2Base` from a config node mirroring the packaged sam2.1 yamls."""
    from hydra.utils import instantiate

    import_sam2()
    return instantiate(dict(cfg), _convert_="all")


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


def encode_images(sam2: SAM2Base, images: Tensor) -> ImageFeatures:
    """Run the SAM2 image encoder on (N, 3, S, S) normalised images.

    Mirrors `SAM2ImagePredictor.set_image_batch`: a frame with no memory gets
    `no_mem_embed` added to its lowest-resolution features.
    """
    backbone_out = sam2.forward_image(images)
    _, vision_feats, _, feat_sizes = sam2._prepare_backbone_features(backbone_out)
    if sam2.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam2.no_mem_embed
    n = images.shape[0]
    maps = [
        feat.permute(1, 2, 0).reshape(n, -1, *size)
        for feat, size in zip(vision_feats, feat_sizes, strict=True)
    ]
    return ImageFeatures(image_embed=maps[-1], high_res=maps[:-1])


def seg_prompt(sparse: Tensor, dense: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt-encoder output with no points/boxes -> one [SEG] embedding as the sparse prompt.

    `sparse` is the encoder's empty (1, 0, C) output, `dense` its no-mask embedding; both are
    repeated for the N (N, C) `prompts`. Shared by `decode_masks` and video propagation.
    """
    n = prompts.shape[0]
    sparse = torch.cat([sparse.expand(n, -1, -1), prompts.unsqueeze(1).to(sparse.dtype)], 1)
    return sparse, dense.expand(n, -1, -1, -1)


def decode_masks(sam2: SAM2Base, features: ImageFeatures, prompts: Tensor) -> Tensor:
    """Decode one mask per prompt embedding.

    `features` holds one entry per prompt (already gathered), `prompts` is (N, 256):
    the projected [SEG] embedding replaces SAM2's point/box sparse prompt. Returns
    low-resolution logits (N, 4h, 4w).
    """
    empty = sam2.sam_prompt_encoder(points=None, boxes=None, masks=None)
    sparse, dense = seg_prompt(*empty, prompts)
    low_res, _, _, _ = sam2.sam_mask_decoder(
        image_embeddings=features.image_embed,
        image_pe=sam2.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
        repeat_image=False,
        high_res_features=features.high_res or None,
    )
    return low_res[:, 0]


def upsample(logits: Tensor, size: int) -> Tensor:
    """Bilinear upsampling of (N, h, w) logits to (N, size, size)."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    return F.interpolate(logits.unsqueeze(1), (size, size), mode="bilinear").squeeze(1)
