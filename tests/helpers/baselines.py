"""The baseline rows at test size: each ``model=<row>`` with overrides that make it tiny."""

from __future__ import annotations

TINY_ROWS: dict[str, list[str]] = {
    "unet": ["model.image_size=64", "model.channels=[4,8]", "model.strides=[2]"],
    "attention_unet": ["model.image_size=64", "model.channels=[4,8]", "model.strides=[2]"],
    "transunet": [
        "model.image_size=64",
        "model.channels=[4,8]",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.mlp_dim=32",
    ],
    "internvl_only": ["model.mask_size=64", "model.head_channels=8"],
    "medsam_sam2": ["model.mask_size=64"],
}
