"""U-Net baseline (MONAI), ``model=unet``: one of the baselines (:mod:`sa2va.model.baselines`).

It plugs into the same data module, loss, metrics and sweeps through the model protocol
(:class:`~sa2va.model.baselines.frame.FrameSegmenter`): no language model (the loss has no
language term), no prompt read, one foreground mask per frame.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet

from sa2va.model.baselines.frame import FrameSegmenter, recorded_config


class UNetBaseline(FrameSegmenter):
    """``monai.networks.nets.UNet`` (2D, residual units) on 3-channel frames -> mask logits."""

    def __init__(
        self,
        image_size: int = 256,
        mask_size: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        dropout: float = 0.0,
        name: str = "unet",
        load_pretrained: bool = True,
    ) -> None:
        """``load_pretrained``: unused (randomly initialised); part of the protocol."""
        super().__init__(recorded_config(locals()), image_size)
        self.net = UNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
        )
