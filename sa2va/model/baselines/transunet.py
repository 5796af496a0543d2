"""A TransUNet-style hybrid (CNN encoder + ViT bottleneck + U-Net decoder), ``model=transunet``.

Built from MONAI blocks in the shape of TransUNet (Chen et al. 2021, "R50-ViT" hybrid): a
residual CNN encoder downsamples by 2 per stage, a ViT with 1x1 patches runs on its deepest
feature map, and a cascaded upsampling decoder joins the CNN's skip connections. It is not
TransUNet itself: the CNN is a few MONAI residual stages instead of a ResNet-50, and nothing is
pretrained (the tables name it "TransUNet-style (MONAI)").
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock
from monai.networks.nets import ViT
from torch import Tensor, nn

from sa2va.model.baselines.frame import FrameSegmenter, recorded_config

NORM = "instance"


class TransUNetBaseline(FrameSegmenter):
    """CNN stages ``channels`` (stride 1, then 2 each) -> ViT on the last map -> decoder."""

    def __init__(
        self,
        image_size: int = 256,
        mask_size: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        hidden_size: int = 192,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 384,
        dropout: float = 0.0,
        name: str = "transunet",
        load_pretrained: bool = True,
    ) -> None:
        """``load_pretrained``: unused (randomly initialised); part of the protocol."""
        super().__init__(recorded_config(locals()), image_size)
        channels = list(channels)  # Hydra passes a ListConfig, which reverse slicing breaks
        grid = image_size // 2 ** (len(channels) - 1)
        if grid * 2 ** (len(channels) - 1) != image_size:
            raise ValueError(
                f"transunet: image_size={image_size} must be divisible by "
                f"2**{len(channels) - 1} (one halving per CNN stage after the first)"
            )
        strides = [1] + [2] * (len(channels) - 1)
        inputs = [3, *channels[:-1]]
        self.encoder = nn.ModuleList(
            UnetResBlock(2, c_in, c_out, kernel_size=3, stride=s, norm_name=NORM)
            for c_in, c_out, s in zip(inputs, channels, strides, strict=True)
        )
        self.vit = ViT(
            in_channels=channels[-1],
            img_size=(grid, grid),
            patch_size=(1, 1),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            dropout_rate=dropout,
            spatial_dims=2,
        )
        self.grid = grid
        self.bottleneck = UnetResBlock(
            2, hidden_size, channels[-1], kernel_size=3, stride=1, norm_name=NORM
        )
        self.decoder = nn.ModuleList(
            UnetrUpBlock(2, c_in, c_out, kernel_size=3, upsample_kernel_size=2, norm_name=NORM)
            for c_in, c_out in zip(channels[:0:-1], channels[-2::-1], strict=True)
        )
        self.head = UnetOutBlock(2, channels[0], 1)

    def frame_logits(self, images: Tensor) -> Tensor:
        skips = []
        x = images
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        tokens, _ = self.vit(x)  # (N, grid*grid, hidden)
        x = tokens.transpose(1, 2).reshape(len(images), -1, self.grid, self.grid)
        x = self.bottleneck(x)
        for block, skip in zip(self.decoder, skips[-2::-1], strict=True):
            x = block(x, skip)
        return self.head(x)[:, 0]
