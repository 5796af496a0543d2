"""Synthetic OCT-like vessel videos in the real on-disk format (the embedded default data set).

Each video is a vessel tree (a wide trunk plus thinner branches, 4-14 px at 256 px) over
layered retina-like bands, with multiplicative gamma speckle and low contrast. The tree drifts
and rotates a little from frame to frame, so clips and temporal metrics are meaningful. Labels
are the official-format polygons (each branch's tube outline) and the image is drawn from the
very same polygons, so a model can learn them exactly.

The speckle is drawn anew for every frame while the vessels move smoothly, so neighbouring
frames carry independent evidence about the same vessels. ``low_contrast_frames`` (0 by
default, which leaves the data set byte for byte as before) additionally fades the vessels of
that share of frames to ``low_contrast_factor`` of their contrast, as a frame with dropped
signal: such a frame is hard alone and easy with its neighbours, so a temporal module can
help, and whether it does is measured (``experiment=ablate_temporal``).

    python -m sa2va.data.synth out=DIR num_videos=12 frames_per_video=8 image_size=256 seed=0
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from sa2va.data.raster import rasterize_polygons
from sa2va.utils import atomic_dir

GENERATOR_VERSION = 1  # bump when the output changes, so cached data sets are regenerated
OBJECT_NAME = "blood vessel"
DEFAULTS: dict[str, Any] = {
    "num_videos": 12,
    "frames_per_video": 8,
    "image_size": 256,
    "seed": 0,
    "speckle_looks": 4.0,  # gamma shape of the speckle: lower is noisier
    "contrast": 0.25,  # vessel brightness above the local background (image in [0, 1])
    "low_contrast_frames": 0.0,  # share of frames whose vessels fade (0: none, as before)
    "low_contrast_factor": 0.2,  # those frames' vessel contrast, relative to the others
}
# Options that change nothing at their default: left out of the cache key there, so the
# default data set keeps its cache folder.
NO_OP_DEFAULTS = ("low_contrast_frames", "low_contrast_factor")


def _curve(start: np.ndarray, direction: np.ndarray, length: float, wobble: float, phase: float):
    """A gently curving centreline: a straight segment plus a half-wave or so of sine."""
    t = np.linspace(0.0, 1.0, max(8, int(length / 4)))[:, None]
    normal = np.array([-direction[1], direction[0]])
    bend = wobble * np.sin(np.pi * 1.3 * t + phase) - wobble * np.sin(phase)
    return start + t * length * direction + bend * normal


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _vessel_tree(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centrelines (N, 2) and widths (N,) of a trunk crossing the image plus its branches."""
    k = size / 256
    vessels = []
    for _ in range(rng.integers(1, 3)):
        centre = size / 2 + rng.uniform(-0.2, 0.2, 2) * size
        angle = rng.uniform(0, np.pi)
        d = _unit(angle)
        trunk = _curve(centre - 0.9 * size * d, d, 1.8 * size, rng.uniform(-0.1, 0.1) * size, 0.0)
        w0 = rng.uniform(8, 14) * k
        vessels.append((trunk, np.linspace(w0, 0.75 * w0, len(trunk))))
        parents = [(trunk, angle)]
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(len(parents)))
            parent, pangle = parents[i]
            t = rng.uniform(0.35, 0.65) if i == 0 else rng.uniform(0.2, 0.6)  # trunk: in view
            start = parent[int(t * (len(parent) - 1))]
            bangle = pangle + rng.choice([-1, 1]) * rng.uniform(np.pi / 7, np.pi / 3)
            length = rng.uniform(0.3, 0.6) * size
            branch = _curve(start, _unit(bangle), length, rng.uniform(-0.06, 0.06) * size, 0.0)
            wb = rng.uniform(4, 8) * k
            vessels.append((branch, np.linspace(wb, 0.7 * wb, len(branch))))
            parents.append((branch, bangle))
    return vessels


def _tube_polygons(centre: np.ndarray, width: np.ndarray, size: int) -> list[np.ndarray]:
    """Tube outline (centreline offset by +-width/2), cut where it leaves the image.

    Only the runs of the centreline whose whole cross-section lies inside the image are kept,
    so every polygon is in bounds without clipping artefacts along the border.
    """
    tangent = np.gradient(centre, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) * (width[:, None] / 2)
    left, right = centre + normal, centre - normal
    inside = np.all((left >= 0) & (left <= size - 1) & (right >= 0) & (right <= size - 1), axis=1)
    polys = []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(int), [0]])))
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a >= 2:
            polys.append(np.round(np.concatenate([left[a:b], right[a:b][::-1]]), 2))
    return polys


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Band boundaries (depth, amplitude, wavelength, phase) and per-band intensities."""
    n = int(rng.integers(4, 7))
    depths = np.sort(rng.uniform(0.1, 0.95, n)) * size
    waves = np.stack(
        [
            depths,
            rng.uniform(2, 8, n) * size / 256,
            rng.uniform(0.5, 1.5, n) * size,
            rng.uniform(0, 6.3, n),
        ],
        axis=1,
    )
    levels = rng.uniform(0.25, 0.55, n + 1)
    return waves, levels


def _render_background(waves, levels, size: int, t: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.full((size, size), levels[0])
    for (depth, amp, lam, phase), level in zip(waves, levels[1:], strict=True):
        img = np.where(y > depth + amp * np.sin(2 * np.pi * x / lam + phase + 0.2 * t), level, img)
    return gaussian_filter(img, 1.5) * np.exp(-0.4 * y / size)  # soft edges, depth attenuation


def _transform(points: np.ndarray, size: int, angle: float, shift: np.ndarray) -> np.ndarray:
    c = size / 2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (points - c) @ rot.T + c + shift


def _faded_frames(p: dict[str, Any], video: int) -> np.ndarray:
    """Which frames of a video get dropped contrast, from a generator of their own (the
    rest of the video is drawn exactly as without the option)."""
    rng = np.random.default_rng([int(p["seed"]), video, 1])
    return rng.random(int(p["frames_per_video"])) < float(p["low_contrast_frames"])


def _render_video(rng: np.random.Generator, p: dict[str, Any], faded: np.ndarray):
    """Yield (uint8 image, polygons) per frame; ``faded`` frames get low vessel contrast."""
    size = int(p["image_size"])
    tree = _vessel_tree(rng, size)
    waves, levels = _background(rng, size)
    omega = rng.uniform(0.15, 0.35)  # rad per frame: smooth, bounded motion
    phase = rng.uniform(0, 2 * np.pi, 3)
    max_angle, max_shift = np.deg2rad(rng.uniform(2, 6)), rng.uniform(0.02, 0.06) * size
    contrast = float(p["contrast"]) * rng.uniform(0.8, 1.2)
    looks = float(p["speckle_looks"])
    for f in range(int(p["frames_per_video"])):
        angle = max_angle * np.sin(omega * f + phase[0])
        shift = max_shift * np.array([np.sin(omega * f + phase[1]), np.cos(omega * f + phase[2])])
        pulse = 1 + 0.05 * np.sin(2 * omega * f)
        polys = []
        for centre, width in tree:
            polys += _tube_polygons(_transform(centre, size, angle, shift), width * pulse, size)
        mask = rasterize_polygons(polys, (size, size), (size, size))
        frame_contrast = contrast * float(p["low_contrast_factor"]) if faded[f] else contrast
        img = _render_background(waves, levels, size, f) + frame_contrast * gaussian_filter(
            mask.astype(np.float64), 0.5
        )
        img *= rng.gamma(looks, 1 / looks, img.shape)  # multiplicative speckle
        img = gaussian_filter(img, 0.6)  # speckle grains span more than one pixel
        yield np.clip(30 + 200 * img, 0, 255).astype(np.uint8), polys


def generate_synthetic_dataset(out: str | Path, **params: Any) -> Path:
    """Write ``images/*.jpg`` + ``annotations.json`` into ``out`` (created if absent; it must
    hold no ``images/`` yet)."""
    p = _params(params)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=False)
    seeds = np.random.SeedSequence(int(p["seed"])).spawn(int(p["num_videos"]))
    records = []
    for v, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        for f, (img, polys) in enumerate(_render_video(rng, p, _faded_frames(p, v))):
            name = f"synthetic_{v:03d}_frame_{f + 1:06d}.jpg"
            Image.fromarray(img, mode="L").save(out / "images" / name, quality=92)
            flat = [[float(c) for c in poly.reshape(-1)] for poly in polys]
            records.append({"image": name, "text": [OBJECT_NAME], "mask": [flat]})
    (out / "annotations.json").write_text(json.dumps(records, separators=(",", ":")) + "\n")
    return out


def _params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic data parameters: {sorted(unknown)}")
    return {**DEFAULTS, **params}


def dataset_key(**params: Any) -> str:
    """Stable hash of the (defaulted) parameters and the generator version."""
    p = {**_params(params), "_version": GENERATOR_VERSION}
    p = {k: v for k, v in p.items() if k not in NO_OP_DEFAULTS or v != DEFAULTS[k]}
    return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$SA2VA_CACHE_DIR``, else ``.cache/`` of the source checkout, else ``~/.cache/sa2va``.

    Not relative to the working directory: Hydra may change it per run, which would
    regenerate the data set every time.
    """
    if os.environ.get("SA2VA_CACHE_DIR"):
        return Path(os.environ["SA2VA_CACHE_DIR"]).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "synthetic_oct"
    return Path.home() / ".cache" / "sa2va" / "synthetic_oct"


def ensure_synthetic_dataset(cache_dir: str | Path, **params: Any) -> Path:
    """Return the cached data set for ``params``, generating it on first use.

    Generation goes to a temporary folder renamed into place at the end: a folder with the
    final name is always complete, even after an interrupted run or a race between workers.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic_oct-{dataset_key(**params)}"
    if final.is_dir():
        return final
    with atomic_dir(final, taken_ok=True) as tmp:  # another worker's copy is identical
        generate_synthetic_dataset(tmp, **params)
    return final


def parse_kv_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments; values are parsed as JSON when possible (numbers, booleans)."""
    out: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected key=value, got {arg!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_kv_args(sys.argv[1:] if argv is None else argv)
    out = args.pop("out", None)
    if out is None:
        print(f"usage: python -m sa2va.data.synth out=DIR [{' '.join(DEFAULTS)}]=...")
        return 2
    if Path(out).exists():
        print(f"{out} already exists; choose a new folder")
        return 1
    path = generate_synthetic_dataset(out, **args)
    n = len(json.loads((path / "annotations.json").read_text()))
    print(f"wrote {n} frames to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
