"""Training augmentation of a whole clip: one spatial transform for every frame and mask, then
intensity changes on the frames, from MONAI transforms (``conf/augment/*.yaml``).

Why per clip and before the model views: the processor makes two views of each frame (InternVL
tiles and the SAM2 view) and the masks must stay aligned with both, and frames of a clip must
move together for temporal training. Why reproducible: the randomness of a sample is a pure
function of (seed, epoch, index), so neither the worker that loads it nor a resume changes it.

Thin vessels: masks are warped as floats with bilinear interpolation and kept where the result
reaches ``mask_threshold``; below 0.5 this keeps 1-2 px vessels connected after rotations and
zooms out, where nearest-neighbour sampling breaks them into dashes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
)

KEYS = ("image", "mask")


class RandSpeckled(RandomizableTransform, MapTransform):
    """Multiplicative gamma speckle (mean 1, shape ``looks``), the noise of OCT.

    Hand-written because MONAI's noise transforms are additive (Gaussian, Rician).
    """

    def __init__(self, keys: Sequence[str], prob: float, looks: tuple[float, float]) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.looks = looks

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        out = dict(data)
        looks = self.R.uniform(*self.looks)
        for key in self.keys:
            # one speckle field per frame, shared by its colour channels (T*C, H, W)
            image = torch.as_tensor(out[key])
            field = self.R.gamma(looks, 1.0 / looks, (image.shape[0] // 3, *image.shape[1:]))
            out[key] = image * torch.from_numpy(field.astype(np.float32)).repeat_interleave(3, 0)
        return out


class ClipAugment:
    """Random spatial + intensity augmentation of a clip; ``prob`` 0 switches a part off.

    Spatial sizes are fractions of the image side (``elastic_spacing``, ``elastic_magnitude``),
    so a recipe means the same at any resolution.
    """

    def __init__(
        self,
        flip_prob: float = 0.0,
        affine_prob: float = 0.0,
        rotate_deg: float = 0.0,
        scale: float = 0.0,
        elastic_prob: float = 0.0,
        elastic_spacing: float = 0.25,
        elastic_magnitude: tuple[float, float] = (0.0, 0.0),
        gamma_prob: float = 0.0,
        gamma: tuple[float, float] = (1.0, 1.0),
        brightness_prob: float = 0.0,
        brightness: float = 0.0,
        contrast_prob: float = 0.0,
        contrast: float = 0.0,
        noise_prob: float = 0.0,
        noise_std: float = 0.0,
        blur_prob: float = 0.0,
        blur_sigma: tuple[float, float] = (0.5, 1.0),
        speckle_prob: float = 0.0,
        speckle_looks: tuple[float, float] = (4.0, 8.0),
        band_prob: float = 0.0,
        band_coeff: tuple[float, float] = (0.0, 0.0),
        mask_threshold: float = 0.3,
    ) -> None:
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"augment.mask_threshold must be in (0, 1), got {mask_threshold}")
        self.options = dict(locals())
        del self.options["self"]
        self.probs = [v for k, v in self.options.items() if k.endswith("_prob")]
        self.mask_threshold = mask_threshold
        self._pipelines: dict[tuple[int, int], Compose] = {}

    @property
    def enabled(self) -> bool:
        """Whether any part can fire (``augment=none``: no)."""
        return any(p > 0 for p in self.probs)

    def pipeline(self, hw: tuple[int, int]) -> Compose:
        """The MONAI transforms for images of size ``hw`` (built once per size)."""
        if hw not in self._pipelines:
            self._pipelines[hw] = Compose(self._transforms(hw), lazy=False)
        return self._pipelines[hw]

    def _transforms(self, hw: tuple[int, int]) -> list:
        o, side = self.options, float(min(hw))
        spatial = [
            RandFlipd(KEYS, prob=o["flip_prob"], spatial_axis=1),
            RandAffined(
                KEYS,
                prob=o["affine_prob"],
                rotate_range=np.deg2rad(o["rotate_deg"]),
                scale_range=(o["scale"], o["scale"]),
                mode="bilinear",
                padding_mode="reflection",
            ),
            Rand2DElasticd(
                KEYS,
                spacing=max(2.0, o["elastic_spacing"] * side),
                magnitude_range=tuple(m * side for m in o["elastic_magnitude"]),
                prob=o["elastic_prob"],
                mode="bilinear",
                padding_mode="reflection",
            ),
        ]
        intensity = [
            RandBiasFieldd("image", prob=o["band_prob"], coeff_range=tuple(o["band_coeff"])),
            RandSpeckled(["image"], prob=o["speckle_prob"], looks=tuple(o["speckle_looks"])),
            RandAdjustContrastd("image", prob=o["gamma_prob"], gamma=tuple(o["gamma"])),
            RandScaleIntensityFixedMeand("image", prob=o["contrast_prob"], factors=o["contrast"]),
            RandShiftIntensityd("image", prob=o["brightness_prob"], offsets=o["brightness"]),
            RandGaussianSmoothd(
                "image",
                prob=o["blur_prob"],
                sigma_x=tuple(o["blur_sigma"]),
                sigma_y=tuple(o["blur_sigma"]),
            ),
            RandGaussianNoised("image", prob=o["noise_prob"], std=o["noise_std"]),
        ]
        return spatial + intensity

    def __call__(
        self, frames: np.ndarray, masks: np.ndarray, key: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment a clip: ``frames`` (T, H, W, 3) uint8 and ``masks`` (T, M, H, W) bool, the
        same size; ``key`` (seed, epoch, index) fixes every random draw."""
        t, h, w, _ = frames.shape
        if masks.shape[0] != t or masks.shape[2:] != (h, w):
            raise ValueError(f"frames {frames.shape} and masks {masks.shape} must match in T, H, W")
        pipeline = self.pipeline((h, w))
        pipeline.set_random_state(seed=int(np.random.default_rng(list(key)).integers(2**31)))
        image = torch.from_numpy(frames).permute(0, 3, 1, 2).reshape(t * 3, h, w).float() / 255
        mask = torch.from_numpy(masks).reshape(-1, h, w).float()
        out = pipeline({"image": image, "mask": mask})
        image = torch.as_tensor(out["image"]).clamp(0, 1).reshape(t, 3, h, w).permute(0, 2, 3, 1)
        mask = torch.as_tensor(out["mask"]).reshape(masks.shape) >= self.mask_threshold
        return (image * 255).round().to(torch.uint8).numpy(), mask.numpy()
