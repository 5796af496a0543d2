"""Polygons and mask files -> boolean masks at any resolution.

Masks are rasterised directly at the resolution the model needs instead of rasterising at the
image resolution and resizing: resizing a 512 px mask to 256 px breaks 1-2 px vessels into
dashes, while scaling the coordinates and drawing the outline keeps them connected.

Coordinate convention: a polygon vertex ``(x, y)`` is in pixel-index units of the source image
(pixel centres at integers, as produced by contour tracing), so scaling maps pixel centres onto
pixel centres: ``x' = (x + 0.5) * W'/W - 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import line, polygon
from skimage.measure import points_in_poly
from skimage.morphology import skeletonize

HW = tuple[int, int]


def scale_points(points: np.ndarray, src_hw: HW, out_hw: HW) -> np.ndarray:
    """Map (K, 2) ``(x, y)`` pixel-index coordinates from ``src_hw`` to ``out_hw``."""
    sy, sx = out_hw[0] / src_hw[0], out_hw[1] / src_hw[1]
    pts = np.asarray(points, dtype=np.float64)
    return np.stack([(pts[:, 0] + 0.5) * sx - 0.5, (pts[:, 1] + 0.5) * sy - 0.5], axis=1)


def _fill(pts: np.ndarray, hw: HW) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    rr, cc = polygon(pts[:, 1], pts[:, 0], shape=hw)
    mask[rr, cc] = True
    return mask


def _outline(pts: np.ndarray, hw: HW) -> np.ndarray:
    """Closed outline, so polygons thinner than a pixel still leave a connected trace."""
    mask = np.zeros(hw, dtype=bool)
    ij = np.rint(pts[:, ::-1]).astype(np.int64)  # (row, col)
    for (r0, c0), (r1, c1) in zip(ij, np.roll(ij, -1, axis=0), strict=True):
        rr, cc = line(r0, c0, r1, c1)
        keep = (rr >= 0) & (rr < hw[0]) & (cc >= 0) & (cc < hw[1])
        mask[rr[keep], cc[keep]] = True
    return mask


def nesting_depths(polygons: Sequence[np.ndarray]) -> list[int]:
    """How many other polygons fully contain each polygon (odd depth = hole)."""
    lo = [p.min(axis=0) for p in polygons]
    hi = [p.max(axis=0) for p in polygons]
    depths = []
    for i, inner in enumerate(polygons):
        depth = 0
        for j, outer in enumerate(polygons):
            if i == j or len(outer) < 3 or (lo[i] < lo[j]).any() or (hi[i] > hi[j]).any():
                continue  # bounding boxes first: most pairs of vessel pieces end here
            if not points_in_poly(inner, outer).all():
                continue
            # Identical polygons contain each other: only the earlier one counts as outer.
            depth += not (j > i and points_in_poly(outer, inner).all())
        depths.append(depth)
    return depths


def rasterize_polygons(polygons: Sequence[np.ndarray], src_hw: HW, out_hw: HW) -> np.ndarray:
    """Rasterise (K, 2) ``(x, y)`` polygons given in ``src_hw`` pixels at ``out_hw``.

    Even-odd by nesting: a polygon lying inside an odd number of others cuts a hole, while
    polygons that merely overlap (vessel branches meeting at a junction) are united. Edges are
    always drawn, so thin vessels stay connected after downscaling.
    """
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    mask = np.zeros(out_hw, dtype=bool)
    polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    polys = [p for p in polys if len(p) >= 1]
    if not polys:
        return mask
    scaled = [scale_points(p, src_hw, out_hw) for p in polys]
    depths = nesting_depths(scaled)
    for depth, pts in sorted(zip(depths, scaled, strict=True), key=lambda t: t[0]):
        outline = _outline(pts, out_hw)
        if depth % 2 == 0:
            mask |= _fill(pts, out_hw) | outline
        else:  # a hole's rim traces object pixels, so it stays foreground
            mask &= ~(_fill(pts, out_hw) & ~outline)
    return mask


def read_binary_mask(path: str | Path) -> np.ndarray:
    """Read a mask PNG as (H, W) bool: any non-zero pixel is foreground (0/1 or 0/255 masks).

    Colour masks use their colour channels; a mask drawn only in the alpha channel (black
    colour, as some annotation tools export) uses the alpha channel.
    """
    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        colour, alpha = arr[..., :3], arr[..., 3] if arr.shape[2] == 4 else None
        arr = alpha if alpha is not None and not colour.any() else colour.max(axis=2)
    return arr > 0


def resize_mask(mask: np.ndarray, out_hw: HW) -> np.ndarray:
    """Resize a binary mask, keeping thin structures when shrinking.

    Pixels at least half covered are foreground; the source skeleton is added on top so a
    1 px vessel in a 512 px mask survives at 128 px (mask PNGs cannot be rasterised afresh).
    """
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    if mask.shape == out_hw:
        return mask.astype(bool, copy=True)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    size = (out_hw[1], out_hw[0])
    if out_hw[0] >= mask.shape[0] and out_hw[1] >= mask.shape[1]:
        return np.asarray(img.resize(size, Image.Resampling.NEAREST)) > 127
    out = np.asarray(img.resize(size, Image.Resampling.BOX)) >= 128
    rr, cc = np.nonzero(skeletonize(mask.astype(bool)))
    pts = scale_points(np.stack([cc, rr], axis=1), mask.shape, out_hw)
    r = np.clip(np.rint(pts[:, 1]).astype(np.int64), 0, out_hw[0] - 1)
    c = np.clip(np.rint(pts[:, 0]).astype(np.int64), 0, out_hw[1] - 1)
    out = out.copy()
    out[r, c] = True
    return out
