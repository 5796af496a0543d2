"""InternVL's vision tower + light upsampling mask head, no SAM2, no LLM: ``model=internvl_only``.

The "Base (InternVL only)" row of the ablation: the same vision backbone Sa2VA uses (InternViT,
the ``vision_tower`` of :func:`sa2va.model.mllm.build_mllm`'s InternVL), its last-layer patch
tokens (CLS dropped, as InternVL's ``vision_feature_select_strategy="default"``) reshaped to a
grid, and a UNETR-style progressive upsampling head (MONAI ``UnetrPrUpBlock``) to mask logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.networks.blocks import UnetOutBlock, UnetrPrUpBlock
from torch import Tensor, nn
from transformers import InternVLVisionConfig, InternVLVisionModel

from sa2va.model.baselines.frame import FrameSegmenter, recorded_config
from sa2va.model.mllm import build_mllm


def vision_tower(mllm: Mapping[str, Any], load_pretrained: bool) -> nn.Module:
    """InternVL's vision tower: from the folder ``mllm.path`` (Sa2VA's loader, which reads the
    whole InternVL once), or randomly initialised from ``mllm.config.vision_config``."""
    if mllm.get("path") is not None:
        parts = build_mllm(**mllm, load_weights=load_pretrained)
        return parts.model.model.vision_tower
    if not (mllm.get("config") or {}).get("vision_config"):
        raise ValueError("model.mllm needs `path` (an InternVL folder) or `config.vision_config`")
    return InternVLVisionModel(InternVLVisionConfig(**mllm["config"]["vision_config"]))


class InternVLOnlyBaseline(FrameSegmenter):
    """InternViT patch tokens -> ``upsample_steps`` x2 upsamplings -> one mask per frame."""

    def __init__(
        self,
        mllm: Mapping[str, Any],
        image_size: int = 448,
        mask_size: int | None = None,
        head_channels: int = 64,
        upsample_steps: int = 2,
        name: str = "internvl_only",
        load_pretrained: bool = True,
    ) -> None:
        """``mllm``: as Sa2VA's ``model.mllm`` (``path`` or ``config.vision_config``);
        ``image_size`` must be the vision tower's own input size."""
        super().__init__(recorded_config(locals()), image_size)
        self.vision = vision_tower(self.config["mllm"], load_pretrained)
        vision = self.vision.config
        tower_size, patch = vision.image_size[0], vision.patch_size[0]
        if image_size != tower_size:
            raise ValueError(
                f"internvl_only: model.image_size={image_size} but the vision tower takes "
                f"{tower_size} px images; set model.image_size={tower_size}"
            )
        self.grid = image_size // patch
        self.head = nn.Sequential(
            UnetrPrUpBlock(
                spatial_dims=2,
                in_channels=vision.hidden_size,
                out_channels=head_channels,
                num_layer=upsample_steps - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name="instance",
                conv_block=True,
                res_block=True,
            ),
            UnetOutBlock(2, head_channels, 1),
        )

    def frame_logits(self, images: Tensor) -> Tensor:
        dtype = self.vision.embeddings.patch_embeddings.projection.weight.dtype
        tokens = self.vision(pixel_values=images.to(dtype)).last_hidden_state[:, 1:]
        grid = tokens.transpose(1, 2).reshape(len(images), -1, self.grid, self.grid)
        return self.head(grid.float())[:, 0]
