"""Attention U-Net baseline (MONAI ``AttentionUnet``, Oktay et al. 2018): ``model=attention_unet``.

Image only, one mask per frame (:class:`~sa2va.model.baselines.frame.FrameSegmenter`).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import AttentionUnet

from sa2va.model.baselines.frame import FrameSegmenter, recorded_config


class AttentionUNetBaseline(FrameSegmenter):
    """``monai.networks.nets.AttentionUnet`` (2D): attention gates on the skip connections."""

    def __init__(
        self,
        image_size: int = 256,
        mask_size: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        dropout: float = 0.0,
        name: str = "attention_unet",
        load_pretrained: bool = True,
    ) -> None:
        """``load_pretrained``: unused (randomly initialised); part of the protocol."""
        super().__init__(recorded_config(locals()), image_size)
        self.net = AttentionUnet(
            spatial_dims=2,
            in_channels=3,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            dropout=dropout,
        )
