"""Hand-made model inputs for tests that need a batch without the data module."""

from __future__ import annotations

import torch


def synthetic_batch(model, num_samples: int = 2):
    """A processed batch of random frames with one vessel-like mask each."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    samples = []
    size = model.processor.mask_size
    for _ in range(num_samples):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        sample = model.processor(
            [Image.fromarray(pixels)],
            ["<image>\nPlease segment the blood vessel."],
            ["Sure, [SEG]."],
        )
        mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
        mask[..., size // 3 : size // 2, :] = True
        sample["masks"] = mask
        samples.append(sample)
    return model.processor.collate(samples)
