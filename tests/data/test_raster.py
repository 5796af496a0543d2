"""Rasterisation: agreement with skimage (pixel for pixel), holes, thin vessels, both annotation
formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.data_fixtures import TINY_SYNTH, square, write_dataset
from PIL import Image
from scipy.ndimage import distance_transform_cdt
from skimage.draw import line as sk_line
from skimage.draw import polygon as sk_polygon
from skimage.measure import label
from skimage.segmentation import find_boundaries

from sa2va.data.annotations import load_annotations
from sa2va.data.raster import nesting_depths, rasterize_polygons, resize_mask, scale_points
from sa2va.data.synth import ensure_synthetic_dataset


def reference(poly: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(hw, dtype=bool)
    rr, cc = sk_polygon(poly[:, 1], poly[:, 0], shape=hw)
    mask[rr, cc] = True
    return mask


def skimage_outline(pts: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The closed outline drawn one ``skimage.draw.line`` per edge (the former code path)."""
    mask = np.zeros(hw, dtype=bool)
    ij = np.rint(pts[:, ::-1]).astype(np.int64)
    for (r0, c0), (r1, c1) in zip(ij, np.roll(ij, -1, axis=0), strict=True):
        rr, cc = sk_line(r0, c0, r1, c1)
        keep = (rr >= 0) & (rr < hw[0]) & (cc >= 0) & (cc < hw[1])
        mask[rr[keep], cc[keep]] = True
    return mask


def skimage_rasterize(polygons: list[np.ndarray], src_hw, out_hw) -> np.ndarray:
    """The same even-odd composition as ``rasterize_polygons``, drawn with skimage only."""
    mask = np.zeros(out_hw, dtype=bool)
    scaled = [scale_points(np.asarray(p, float).reshape(-1, 2), src_hw, out_hw) for p in polygons]
    for depth, pts in sorted(zip(nesting_depths(scaled), scaled, strict=True), key=lambda t: t[0]):
        outline = skimage_outline(pts, out_hw)
        fill = reference(pts, out_hw)
        mask = mask | fill | outline if depth % 2 == 0 else mask & ~(fill & ~outline)
    return mask


def blob(n: int = 40, r: float = 60.0, c: float = 100.0, seed: int = 0) -> np.ndarray:
    """An irregular star-shaped polygon around (c, c)."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    return np.stack([c + rad * np.cos(t), c + rad * np.sin(t)], axis=1)


def within_one_pixel_of_boundary(mask: np.ndarray, ref: np.ndarray) -> bool:
    """Every pixel where the masks differ lies within 1 px (8-neighbourhood) of the
    reference's boundary."""
    boundary = find_boundaries(ref, mode="inner") | find_boundaries(ref, mode="outer")
    dist = distance_transform_cdt(~boundary, metric="chessboard")
    return bool((dist[mask ^ ref] <= 1.0).all())


@pytest.mark.parametrize("out", [200, 128, 77, 512])
def test_matches_skimage_reference_within_one_pixel(out: int) -> None:
    poly = blob()
    mask = rasterize_polygons([poly], (200, 200), (out, out))
    ref = reference(scale_points(poly, (200, 200), (out, out)), (out, out))
    assert mask.sum() > 0.9 * ref.sum()
    assert within_one_pixel_of_boundary(mask, ref)
    assert (mask | ref).sum() - (mask & ref).sum() < 0.2 * ref.sum()


def test_scaling_maps_pixel_centres_and_non_square_sizes() -> None:
    poly = np.array(square(10, 20, 29, 39), dtype=float).reshape(-1, 2)
    mask = rasterize_polygons([poly], (40, 60), (80, 30))  # y x2, x /2
    rows, cols = np.nonzero(mask)
    # the polygon runs through boundary pixel centres: rows 40.5..78.5, cols 4.75..14.25
    assert (rows.min(), rows.max()) == (40, 78)
    assert (cols.min(), cols.max()) == (5, 14)


def test_inner_polygon_cuts_a_hole_overlapping_ones_unite() -> None:
    outer = np.array(square(10, 10, 50, 50), float).reshape(-1, 2)
    inner = np.array(square(20, 20, 40, 40), float).reshape(-1, 2)
    mask = rasterize_polygons([outer, inner], (64, 64), (64, 64))
    assert not mask[30, 30] and mask[15, 15] and mask[30, 12]
    assert mask[20, 20]  # the hole's rim traces object pixels
    # same result whatever the order of the polygons
    assert (rasterize_polygons([inner, outer], (64, 64), (64, 64)) == mask).all()
    # an island inside the hole is foreground again
    island = np.array(square(28, 28, 32, 32), float).reshape(-1, 2)
    assert rasterize_polygons([outer, inner, island], (64, 64), (64, 64))[30, 30]
    # two overlapping vessel branches: the overlap stays foreground
    a = np.array(square(10, 10, 40, 20), float).reshape(-1, 2)
    b = np.array(square(30, 5, 35, 50), float).reshape(-1, 2)
    both = rasterize_polygons([a, b], (64, 64), (64, 64))
    assert both[15, 32] and both[45, 32] and both[15, 12]


def thin_vessel(width: float) -> np.ndarray:
    """A 1-2 px wide diagonal-ish curved vessel across a 512 px image."""
    t = np.linspace(0, 1, 60)
    centre = np.stack([20 + 470 * t, 40 + 400 * t + 30 * np.sin(6 * t)], axis=1)
    normal = np.array([-0.65, 0.76]) * width / 2
    return np.concatenate([centre + normal, (centre - normal)[::-1]])


@pytest.mark.parametrize("width", [1.0, 2.0])
@pytest.mark.parametrize("out", [256, 128, 64])
def test_thin_vessel_stays_connected_when_downscaled(width: float, out: int) -> None:
    poly = thin_vessel(width)
    mask = rasterize_polygons([poly], (512, 512), (out, out))
    assert label(mask, connectivity=2).max() == 1


def test_resizing_a_full_resolution_mask_would_break_a_thin_vessel() -> None:
    """Why masks are rasterised at the target size: the naive route loses the vessel."""
    full = rasterize_polygons([thin_vessel(1.0)], (512, 512), (512, 512)).astype(np.uint8)
    naive = Image.fromarray(full * 255).resize((128, 128), Image.Resampling.BILINEAR)
    assert label(np.asarray(naive) > 127, connectivity=2).max() != 1


def test_resize_mask_keeps_thin_structures() -> None:
    full = rasterize_polygons([thin_vessel(1.0)], (512, 512), (512, 512))
    small = resize_mask(full, (128, 128))
    assert label(small, connectivity=2).max() == 1
    assert resize_mask(small, (256, 256)).shape == (256, 256)


def test_out_of_image_polygons_are_clipped() -> None:
    poly = np.array(square(-20, -20, 10, 10), float).reshape(-1, 2)
    mask = rasterize_polygons([poly], (32, 32), (32, 32))
    assert mask[:11, :11].all() and mask.sum() == 121
    assert not rasterize_polygons([], (32, 32), (16, 16)).any()


def test_both_annotation_formats_give_identical_masks(tmp_path) -> None:
    polys = [blob(r=10, c=16, seed=1).round(2), blob(r=4, c=8, seed=2).round(2)]
    flat = [p.reshape(-1).tolist() for p in polys]
    coco = [{"segmentation": [f], "area": 1, "bbox": [0, 0, 1, 1], "category_id": 1} for f in flat]
    seed002 = {"image": "images/a_frame_000001.jpg", "mask": coco}
    official = {"image": "a_frame_000001.jpg", "text": ["blood vessel"], "mask": [flat]}
    (a,), _ = load_annotations(write_dataset(tmp_path / "a", [seed002]))
    (b,), _ = load_annotations(write_dataset(tmp_path / "b", [official]))
    assert a.object_names == b.object_names == ["blood vessel"]
    for hw in [(32, 32), (20, 20), (100, 100)]:
        ma, mb = a.mask("blood vessel", hw), b.mask("blood vessel", hw)
        assert ma.any() and (ma == mb).all()


@pytest.mark.parametrize("grid", [None, 1.0, 0.5])
def test_fill_and_outline_equal_skimage_pixel_for_pixel(grid: float | None) -> None:
    """Random polygons, also with vertices on pixel centres (every tie case: crossings through
    centres, horizontal edges along rows, vertices on centres), partly outside the image."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        pts = rng.uniform(-5, 45, (int(rng.integers(1, 12)), 2))
        if grid is not None:
            pts = np.round(pts / grid) * grid
        hw = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        assert (rasterize_polygons([pts], hw, hw) == skimage_rasterize([pts], hw, hw)).all()


@pytest.mark.parametrize("out", [(64, 64), (32, 32), (100, 48), (256, 256)])
def test_synthetic_masks_equal_skimage_pixel_for_pixel(tmp_path: Path, out) -> None:
    root = ensure_synthetic_dataset(tmp_path, **TINY_SYNTH)
    size = TINY_SYNTH["image_size"]
    for record in json.loads((root / "annotations.json").read_text()):
        polys = [np.asarray(p).reshape(-1, 2) for p in record["mask"][0]]
        expected = skimage_rasterize(polys, (size, size), out)
        assert (rasterize_polygons(polys, (size, size), out) == expected).all()


@pytest.mark.parametrize("width", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("out", [512, 256, 64])
def test_thin_vessel_masks_equal_skimage_pixel_for_pixel(width: float, out: int) -> None:
    polys = [thin_vessel(width), thin_vessel(width)[::-1] + 3.0]
    expected = skimage_rasterize(polys, (512, 512), (out, out))
    assert (rasterize_polygons(polys, (512, 512), (out, out)) == expected).all()
