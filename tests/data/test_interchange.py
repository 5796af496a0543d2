"""Annotation interchange: masks -> polygons -> masks on thin vessels, and every format
(COCO polygons and RLE, LabelMe, CVAT polygons and brush masks) imports to the same masks."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from skimage.draw import disk, line

from sa2va.data.annotations import AnnotationError, load_annotations
from sa2va.data.interchange import (
    AnnotatedImage,
    InterchangeError,
    iou,
    main,
    mask_to_polygons,
    read_annotations,
    write_annotations,
    write_exports,
)
from sa2va.data.raster import rasterize_polygons

HW = (96, 128)


def thin_vessels(seed: int) -> np.ndarray:
    """1-2 px wide straight and crossing vessels plus a thin ring (a vessel loop with a hole)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(HW, dtype=bool)
    for _ in range(6):
        r0, r1 = rng.integers(0, HW[0], 2)
        c0, c1 = rng.integers(0, HW[1], 2)
        rr, cc = line(r0, c0, r1, c1)
        mask[rr, cc] = True
        if rng.random() < 0.5:  # 2 px wide
            mask[np.clip(rr + 1, 0, HW[0] - 1), cc] = True
    ring = np.zeros(HW, dtype=bool)
    ring[disk((48, 64), 9, shape=HW)] = True
    ring[disk((48, 64), 7, shape=HW)] = False
    return mask | ring


def dataset(root: Path, n: int = 3) -> list[AnnotatedImage]:
    """Images on disk and their annotations: 'blood vessel' and a second object per frame."""
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(n):
        name = f"scan_frame_{i:06d}.png"
        Image.fromarray(np.full(HW, 40 * i, np.uint8)).save(root / "images" / name)
        disc = np.zeros(HW, dtype=bool)
        disc[disk((20, 20 + 10 * i), 6, shape=HW)] = True
        instances = [
            ("blood vessel", mask_to_polygons(thin_vessels(i))),
            ("optic disc", mask_to_polygons(disc)),
        ]
        images.append(AnnotatedImage(name, HW, instances))
    return images


def imported_masks(root: Path, name: str) -> dict[tuple[str, str], np.ndarray]:
    records, _ = load_annotations(root / name, root)
    return {(Path(r.image).name, o): r.mask(o, HW) for r in records for o in r.object_names}


def expected_masks(images: list[AnnotatedImage]) -> dict[tuple[str, str], np.ndarray]:
    return {(im.image, n): im.mask(n) for im in images for n in dict(im.instances)}


@pytest.mark.parametrize("seed", range(4))
def test_thin_vessel_masks_survive_polygons(seed):
    mask = thin_vessels(seed)
    polygons = mask_to_polygons(mask)
    assert iou(rasterize_polygons(polygons, HW, HW), mask) >= 0.98
    exact = mask_to_polygons(mask, tolerance=0.0)
    assert np.array_equal(rasterize_polygons(exact, HW, HW), mask)


def test_wide_vessels_are_simplified():
    mask = np.zeros(HW, dtype=bool)
    for r in range(40, 50):  # a 10 px wide, slanted vessel: a staircase outline
        rr, cc = line(r, 5, r + 30, 120)
        mask[rr, cc] = True
    polygons, exact = mask_to_polygons(mask), mask_to_polygons(mask, tolerance=0.0)
    assert iou(rasterize_polygons(polygons, HW, HW), mask) >= 0.98
    assert sum(map(len, polygons)) < 0.8 * sum(map(len, exact))  # 88 vs 124 vertices


def test_a_single_pixel_and_a_hole_become_valid_polygons():
    mask = np.zeros((9, 9), dtype=bool)
    mask[1, 1] = True
    mask[3:8, 3:8] = True
    mask[5, 5] = False
    polygons = mask_to_polygons(mask)
    assert all(len(p) >= 3 for p in polygons)
    assert np.array_equal(rasterize_polygons(polygons, mask.shape, mask.shape), mask)


@pytest.mark.parametrize("fmt", ["coco", "labelme"])
def test_exports_reimport_to_the_same_masks(tmp_path, fmt):
    images = dataset(tmp_path)
    (path,) = {p.parent if fmt == "labelme" else p for p in write_exports(images, tmp_path, [fmt])}
    write_annotations(read_annotations(path, fmt), tmp_path, "annotations.json")
    got, want = imported_masks(tmp_path, "annotations.json"), expected_masks(images)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_coco_rle_imports_exactly(tmp_path):
    images = dataset(tmp_path, n=2)
    want = expected_masks(images)
    annotations = []
    for i, image in enumerate(images):
        for j, name in enumerate(("blood vessel", "optic disc")):
            rle = coco_mask.encode(np.asfortranarray(want[(image.image, name)].astype(np.uint8)))
            if i == 0:  # compressed counts (a string) in frame 0, uncompressed in frame 1
                rle["counts"] = rle["counts"].decode()
            else:
                rle = {"size": list(HW), "counts": _uncompressed_counts(want[(image.image, name)])}
            ann = {"id": 2 * i + j, "image_id": i, "category_id": j + 1, "iscrowd": 1}
            annotations.append({**ann, "segmentation": rle})
    coco = {
        "images": [
            {"id": i, "file_name": im.image, "height": HW[0], "width": HW[1]}
            for i, im in enumerate(images)
        ],  # fmt: skip
        "annotations": annotations,
        "categories": [{"id": 1, "name": "blood vessel"}, {"id": 2, "name": "optic disc"}],
    }
    (tmp_path / "rle.json").write_text(json.dumps(coco))
    write_annotations(read_annotations(tmp_path / "rle.json", "coco"), tmp_path, "a.json")
    got = imported_masks(tmp_path, "a.json")
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: column-major run lengths, starting with background."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    return np.diff(np.r_[0, edges]).tolist()


def _cvat_rle(mask: np.ndarray) -> tuple[str, tuple[int, int, int, int]]:
    """CVAT brush mask: row-major run lengths over the mask's box, starting with background."""
    rows, cols = np.nonzero(mask)
    top, left = rows.min(), cols.min()
    box = mask[top : rows.max() + 1, left : cols.max() + 1]
    flat = box.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.r_[0, flat]))
    counts = np.diff(np.r_[0, edges, flat.size]).tolist()
    return ",".join(map(str, counts)), (left, top, box.shape[1], box.shape[0])


def test_cvat_polygons_and_brush_masks_import_to_the_same_masks(tmp_path):
    images = dataset(tmp_path, n=2)
    want = expected_masks(images)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    for image in images:
        node = ET.SubElement(root, "image", name=image.image, height=str(HW[0]), width=str(HW[1]))
        for polygon in dict(image.instances)["optic disc"]:
            points = ";".join(f"{x:.2f},{y:.2f}" for x, y in polygon)
            ET.SubElement(node, "polygon", label="optic disc", points=points)
        rle, (left, top, w, h) = _cvat_rle(want[(image.image, "blood vessel")])
        box = {"left": str(left), "top": str(top), "width": str(w), "height": str(h)}
        ET.SubElement(node, "mask", label="blood vessel", rle=rle, **box)
    ET.ElementTree(root).write(tmp_path / "cvat.xml")
    write_annotations(read_annotations(tmp_path / "cvat.xml", "cvat"), tmp_path, "a.json")
    got = imported_masks(tmp_path, "a.json")
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_bad_files_fail_with_one_line_naming_them(tmp_path, capsys):
    images = dataset(tmp_path, n=1)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InterchangeError, match=r"broken\.json: not valid JSON"):
        read_annotations(tmp_path / "broken.json", "coco")
    circle = {"label": "v", "points": [[0, 0], [2, 2]], "shape_type": "circle"}
    labelme = {"imagePath": "x.png", "imageHeight": 4, "imageWidth": 4, "shapes": [circle]}
    (tmp_path / "circle.json").write_text(json.dumps(labelme))
    with pytest.raises(InterchangeError, match=r"circle\.json: shape 0 is a circle"):
        read_annotations(tmp_path / "circle.json", "labelme")
    (tmp_path / "cvat.xml").write_text("<annotations><image name='a.png'")
    with pytest.raises(InterchangeError, match=r"cvat\.xml: not a readable CVAT XML"):
        read_annotations(tmp_path / "cvat.xml", "cvat")
    # polygons outside the image: the validation of sa2va.data.validate refuses them
    far = AnnotatedImage(images[0].image, HW, [("vessel", [np.array([[0, 0], [500, 0], [0, 5]])])])
    with pytest.raises(AnnotationError, match=r"record 0 .*outside the 128x96 image"):
        write_annotations([far], tmp_path, "bad.json")
    assert not (tmp_path / "bad.json").exists()
    assert main([f"path={tmp_path / 'broken.json'}", "format=coco", f"root={tmp_path}"]) == 1
    assert capsys.readouterr().out.strip().count("\n") == 0  # one line
