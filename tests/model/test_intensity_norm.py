"""The processor's intensity normalisation option: ``fixed`` (official) or per-image z-score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va.model.mllm import imagenet_image_processor
from sa2va.model.processor import Sa2VAProcessor


def processor(norm: str) -> Sa2VAProcessor:
    image_processor = imagenet_image_processor(32)
    image_processor.max_patches = 1
    return Sa2VAProcessor(None, image_processor, 0, sam2_image_size=32, intensity_norm=norm)


def views(p: Sa2VAProcessor, frame: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    return p.sam2_view(frame), p.vision_inputs([frame])["pixel_values"]


def frames() -> tuple[Image.Image, Image.Image]:
    """An OCT-like frame and the same frame darker and with less contrast."""
    rng = np.random.default_rng(0)
    base = 2 * rng.integers(20, 100, (32, 32))  # even: the dim copy is exact in 8 bits
    dim = 0.5 * base + 20
    return (Image.fromarray(x.astype(np.uint8)).convert("RGB") for x in (base, dim))


def test_zscore_removes_brightness_and_contrast_the_fixed_one_keeps_them() -> None:
    base, dim = frames()
    for a, b in zip(views(processor("zscore"), base), views(processor("zscore"), dim), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    for a, b in zip(views(processor("fixed"), base), views(processor("fixed"), dim), strict=True):
        assert not torch.allclose(a, b, atol=0.1)


def test_fixed_is_the_default_and_unknown_options_are_refused() -> None:
    base, _ = frames()
    default = Sa2VAProcessor(None, imagenet_image_processor(32), 0, sam2_image_size=32)
    assert torch.equal(default.sam2_view(base), processor("fixed").sam2_view(base))
    with pytest.raises(ValueError, match="intensity_norm"):
        processor("minmax")


def test_the_model_config_sets_both_normalisation_options(compose_cfg):
    """``model.intensity_norm`` and ``model.sam2_bf16_norm`` are keys of every Sa2VA preset
    (declared in conf/model/base/sa2va.yaml), and reach the processor the model builds."""
    from hydra.utils import instantiate

    default = compose_cfg().model
    assert (default.intensity_norm, default.sam2_bf16_norm) == ("fixed", False)
    model = instantiate(
        compose_cfg("model.intensity_norm=zscore", "model.sam2_bf16_norm=true").model
    )
    assert model.processor.intensity_norm == "zscore"
    assert model.config["sam2_bf16_norm"] is True
