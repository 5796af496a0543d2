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
from skimage.measure import points_in_poly
from skimage.morphology import skeletonize

HW = tuple[int, int]
# A crossing or vertex this close to a pixel centre is left to skimage's exact test.
_TIE = 1e-6


def scale_points(points: np.ndarray, src_hw: HW, out_hw: HW) -> np.ndarray:
    """Map (K, 2) ``(x, y)`` pixel-index coordinates from ``src_hw`` to ``out_hw``."""
    sy, sx = out_hw[0] / src_hw[0], out_hw[1] / src_hw[1]
    pts = np.asarray(points, dtype=np.float64)
    return np.stack([(pts[:, 0] + 0.5) * sx - 0.5, (pts[:, 1] + 0.5) * sy - 0.5], axis=1)


def _runs(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of ``lengths``: each element's run number and its offset within the run."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _fill(pts: np.ndarray, hw: HW) -> np.ndarray:
    """Pixel centres inside or on the polygon: the pixels of ``skimage.draw.polygon``.

    skimage tests every pixel of the bounding box against every edge, which costs O(box x
    vertices) and made rasterisation the data loader's bottleneck; long diagonal vessel
    tubes have large boxes. This scanline fill finds each row's edge crossings once and
    fills between them (crossing-number parity, skimage's rule). Pixel centres that may lie
    on the outline, where rounding could decide, are left to skimage's own point-in-polygon
    test, so the masks stay identical to skimage's.
    """
    mask = np.zeros(hw, dtype=bool)
    x, y = pts[:, 0], pts[:, 1]
    r0, r1 = int(max(0.0, y.min())), min(hw[0] - 1, int(np.ceil(y.max())))
    c0, c1 = int(max(0.0, x.min())), min(hw[1] - 1, int(np.ceil(x.max())))
    if r1 < r0 or c1 < c0:
        return mask
    xa, ya, xb, yb = x, y, np.roll(x, 1), np.roll(y, 1)
    # an edge crosses the rows min(ya, yb) <= r < max(ya, yb): half-open, as skimage, so
    # a row through a vertex counts it once
    first = np.maximum(np.ceil(np.minimum(ya, yb)), r0).astype(np.int64)
    last = np.minimum(np.ceil(np.maximum(ya, yb)) - 1, r1).astype(np.int64)
    edge, offset = _runs(np.maximum(last - first + 1, 0))
    row = first[edge] + offset
    xc = xa[edge] + (row - ya[edge]) * (xb[edge] - xa[edge]) / (yb[edge] - ya[edge])
    # each row's crossings in order pair up into runs: the centres strictly right of the
    # first crossing up to the second (a crossing on a centre is a tie, decided below)
    order = np.lexsort((xc, row))
    row, xc = row[order], xc[order]
    width = c1 - c0 + 1
    start = np.clip(np.floor(xc[0::2]).astype(np.int64) + 1 - c0, 0, width)
    stop = np.clip(np.floor(xc[1::2]).astype(np.int64) + 1 - c0, 0, width)
    run, offset = _runs(np.maximum(stop - start, 0))
    inside = np.zeros((r1 - r0 + 1, width), dtype=bool)
    inside[row[0::2][run] - r0, start[run] + offset] = True
    # ties, the centres that may lie on the outline: crossings (nearly) through a centre,
    # vertices, and horizontal edges along a row of centres
    near = np.abs(xc - np.rint(xc)) < _TIE
    flat = (np.abs(ya - yb) < _TIE) & (np.abs(ya - np.rint(ya)) < _TIE)
    lo, hi = np.floor(np.minimum(xa, xb)[flat]), np.ceil(np.maximum(xa, xb)[flat])
    seg, offset = _runs((hi - lo + 1).astype(np.int64))
    tie_r = np.concatenate([row[near], np.rint(y), np.rint(ya[flat])[seg]]).astype(np.int64)
    tie_c = np.concatenate([np.rint(xc[near]), np.rint(x), lo[seg] + offset]).astype(np.int64)
    keep = (tie_r >= r0) & (tie_r <= r1) & (tie_c >= c0) & (tie_c <= c1)
    tie_r, tie_c = tie_r[keep], tie_c[keep]
    if len(tie_r):
        centres = np.stack([tie_c, tie_r], axis=1).astype(np.float64)
        inside[tie_r - r0, tie_c - c0] = points_in_poly(centres, pts)
    mask[r0 : r1 + 1, c0 : c1 + 1] = inside
    return mask


def _bresenham(ij0: np.ndarray, ij1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of ``skimage.draw.line`` for many integer segments at once.

    One call per segment cost more than the whole fill (a polygon has hundreds of edges).
    Along the major axis, step ``i`` of ``n`` lies ``floor((2 i m + n) / (2 n))`` pixels off
    on the minor axis (``m`` its length): the closed form of skimage's error accumulator.
    """
    d = ij1 - ij0
    steep = np.abs(d[:, 0]) > np.abs(d[:, 1])
    major = np.where(steep, np.abs(d[:, 0]), np.abs(d[:, 1]))
    minor = np.where(steep, np.abs(d[:, 1]), np.abs(d[:, 0]))
    seg, i = _runs(major + 1)
    n, m = major[seg], minor[seg]
    off_minor = (2 * i * m + n) // np.maximum(2 * n, 1)
    sign = np.where(d > 0, 1, -1)[seg]
    dr = np.where(steep[seg], i, off_minor) * sign[:, 0]
    dc = np.where(steep[seg], off_minor, i) * sign[:, 1]
    return ij0[seg, 0] + dr, ij0[seg, 1] + dc


def _outline(pts: np.ndarray, hw: HW) -> np.ndarray:
    """Closed outline, so polygons thinner than a pixel still leave a connected trace."""
    mask = np.zeros(hw, dtype=bool)
    ij = np.rint(pts[:, ::-1]).astype(np.int64)  # (row, col)
    rr, cc = _bresenham(ij, np.roll(ij, -1, axis=0))
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
