"""Helpers shared by the data tests (plain functions; each test file wraps them in fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TINY_SYNTH = {"num_videos": 4, "frames_per_video": 3, "image_size": 64, "seed": 7}


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Flat polygon of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_image(path: Path, size: tuple[int, int] = (32, 32), mode: str = "L") -> Path:
    """A small deterministic image (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = (np.arange(w * h).reshape(h, w) % 251).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_dataset(
    root: Path, records: list[dict[str, Any]], size: tuple[int, int] = (32, 32)
) -> Path:
    """Write ``records`` as annotations.json and create every referenced image in images/."""
    root.mkdir(parents=True, exist_ok=True)
    for rec in records:
        image = rec.get("image") if isinstance(rec, dict) else None
        if isinstance(image, str) and not (root / image).exists():
            write_image(root / "images" / Path(image).name, size)
    path = root / "annotations.json"
    path.write_text(json.dumps(records))
    return path


class FakeProcessor:
    """Stands in for the model's processor: frames -> (T, 3, S, S) float tensor."""

    def __init__(self, mask_size: int = 16, image_size: int = 24) -> None:
        self.mask_size = mask_size
        self.image_size = image_size
        self.calls: list[tuple[int, list[str], list[str]]] = []

    def __call__(self, frames: list[Image.Image], prompts: list[str], answers: list[str]):
        self.calls.append((len(frames), list(prompts), list(answers)))
        assert all(f.mode == "RGB" for f in frames)
        size = (self.image_size, self.image_size)
        arr = np.stack([np.asarray(f.resize(size), dtype=np.float32) / 255 for f in frames])
        return {"g_pixel_values": torch.from_numpy(arr).permute(0, 3, 1, 2)}

    def collate(self, samples: list[dict]) -> dict:
        out: dict[str, Any] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return out
