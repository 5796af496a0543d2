"""Annotation tools in and out: COCO, LabelMe and CVAT -> ``annotations.json``; masks ->
COCO and LabelMe polygons, so predictions can be corrected in the tool and imported again.

    python -m sa2va.data.interchange format=coco path=instances.json root=DATASET
    python -m sa2va.data.interchange format=labelme path=labelme_dir/ root=DATASET
    python -m sa2va.data.interchange format=cvat path=annotations.xml root=DATASET

Coordinates pass through unchanged: as everywhere in this project, a vertex ``(x, y)`` is in
pixel-index units with pixel centres at integers (:mod:`sa2va.data.raster`). Polygons of one
object name become one object of the frame (their union, holes by nesting). COCO RLE and CVAT
brush masks are traced into polygons without simplification, so they import exactly.

Masks -> polygons: contours traced through the centres of the mask's boundary pixels (holes
trace their rim; this trace redraws the mask exactly), then each polygon simplified with
skimage's Douglas-Peucker at ``tolerance`` px, halved while the simplified polygon no longer
redraws its own pixels at ``min_iou``: wide vessels lose most vertices, 1-2 px vessels keep
the ones they need.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import approximate_polygon, find_contours

from sa2va.data.annotations import AnnotationError, parse_annotations
from sa2va.data.raster import rasterize_polygons
from sa2va.data.synth import parse_kv_args

FORMATS = ("coco", "labelme", "cvat")
EXPORT_FORMATS = ("coco", "labelme")
LABELME_VERSION = "5.5.0"


class InterchangeError(ValueError):
    """An annotation file that cannot be imported; the message names the file and why."""


@dataclass
class AnnotatedImage:
    """One image and its object instances: (name, polygons as (K, 2) ``(x, y)`` arrays)."""

    image: str  # path relative to the data set root (or bare name under images/)
    hw: tuple[int, int]
    instances: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)

    def mask(self, name: str) -> np.ndarray:
        """Union of the instances called ``name``, drawn as the data pipeline draws them."""
        polys = [p for n, ps in self.instances if n == name for p in ps]
        return rasterize_polygons(polys, self.hw, self.hw)


# -------------------------------------------------------------------- mask -> polygons


def _inside_vertices(contour: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """Move each contour vertex (on the edge between an inside and an outside pixel, at a
    half-integer) onto the inside pixel's centre, so the outline traces mask pixels only."""
    frac = np.abs(contour - np.rint(contour)) > 0.25
    low = np.where(frac, np.floor(contour), np.rint(contour)).astype(np.int64)
    high = np.where(frac, np.ceil(contour), np.rint(contour)).astype(np.int64)
    use_low = padded[low[:, 0], low[:, 1]]
    return np.where(use_low[:, None], low, high)


def _drop_straight_runs(rc: np.ndarray) -> np.ndarray:
    """Vertices inside straight runs carry nothing; dropping them first (vectorised) keeps
    skimage's Douglas-Peucker, a Python loop, fast on long pixel traces."""
    before, after = rc - np.roll(rc, 1, axis=0), np.roll(rc, -1, axis=0) - rc
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = (cross != 0) | ((before * after).sum(axis=1) <= 0)
    return rc[keep] if keep.sum() >= 3 else rc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _simplified(rc: np.ndarray, tolerance: float, min_iou: float) -> np.ndarray:
    """Douglas-Peucker at ``tolerance``, halved while the polygon no longer redraws its own
    pixels at ``min_iou`` (a 1 px vessel's outline keeps every vertex it needs). Drawn in
    the polygon's own box (+1 px), which is all it can cover."""
    origin = rc.min(axis=0) - 1
    hw = tuple(int(n) for n in rc.max(axis=0) - origin + 2)
    exact = rasterize_polygons([(rc - origin)[:, ::-1]], hw, hw)
    while tolerance >= 0.1 and len(rc) > 3:
        simple = approximate_polygon(np.concatenate([rc, rc[:1]]), tolerance)[:-1]
        redrawn = rasterize_polygons([(simple - origin)[:, ::-1]], hw, hw)
        if len(simple) >= 3 and iou(redrawn, exact) >= min_iou:
            return simple
        tolerance /= 2
    return rc


def mask_to_polygons(
    mask: np.ndarray, tolerance: float = 1.0, min_iou: float = 0.99
) -> list[np.ndarray]:
    """(K, 2) ``(x, y)`` polygons tracing ``mask``, each simplified as far as it still redraws
    its own pixels at IoU >= ``min_iou`` (``tolerance=0``: the exact trace; module doc)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask.astype(np.uint8), 1)
    polygons = []
    for contour in find_contours(padded, 0.5, fully_connected="high"):
        rc = _inside_vertices(contour, padded.astype(bool)) - 1
        rc = rc[np.r_[True, (np.diff(rc, axis=0) != 0).any(axis=1)]].astype(np.float64)
        if len(rc) > 1 and (rc[0] == rc[-1]).all():
            rc = rc[:-1]
        rc = _simplified(_drop_straight_runs(rc), tolerance, min_iou)
        rc = np.concatenate([rc, np.repeat(rc[-1:], max(0, 3 - len(rc)), axis=0)])
        polygons.append(rc[:, ::-1].copy())  # (row, col) -> (x, y)
    return polygons


def _flat(polygon: np.ndarray) -> list[float]:
    return [round(float(c), 2) for c in np.asarray(polygon).reshape(-1)]


def _pairs(flat: Sequence[float]) -> np.ndarray:
    return np.asarray(flat, dtype=np.float64).reshape(-1, 2)


# ------------------------------------------------------------------------- readers


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InterchangeError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InterchangeError(f"{path}: not valid JSON ({e})") from e


def _coco_segmentation(seg: Any, hw: tuple[int, int], where: str) -> list[np.ndarray]:
    """Polygons as they are; RLE (compressed or not) decoded by pycocotools and traced."""
    if isinstance(seg, list):
        return [_pairs(p) for p in seg]
    if isinstance(seg, Mapping) and "counts" in seg:
        from pycocotools import mask as coco_mask

        rle = coco_mask.frPyObjects(seg, *hw) if isinstance(seg["counts"], list) else seg
        return mask_to_polygons(coco_mask.decode(rle).astype(bool), tolerance=0.0)
    raise InterchangeError(f"{where}: segmentation is neither polygons nor RLE")


def read_coco(path: Path) -> list[AnnotatedImage]:
    data = _json(path)
    if not isinstance(data, Mapping) or not {"images", "annotations"} <= set(data):
        raise InterchangeError(f"{path}: not a COCO file (needs 'images' and 'annotations')")
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    images = {
        im["id"]: AnnotatedImage(im["file_name"], (int(im["height"]), int(im["width"])))
        for im in data["images"]
    }
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {k}"
        image = images.get(ann.get("image_id"))
        if image is None:
            raise InterchangeError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        name = names.get(ann.get("category_id"))
        if name is None:
            raise InterchangeError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        polygons = _coco_segmentation(ann.get("segmentation"), image.hw, where)
        image.instances.append((name, polygons))
    return list(images.values())


def _labelme_file(path: Path) -> AnnotatedImage:
    data = _json(path)
    if not isinstance(data, Mapping) or "shapes" not in data or "imagePath" not in data:
        raise InterchangeError(f"{path}: not a LabelMe file (needs 'shapes' and 'imagePath')")
    image = AnnotatedImage(
        Path(data["imagePath"]).name, (int(data["imageHeight"]), int(data["imageWidth"]))
    )
    for k, shape in enumerate(data["shapes"]):
        kind = shape.get("shape_type") or "polygon"
        if kind != "polygon":
            raise InterchangeError(f"{path}: shape {k} is a {kind}; only polygons are imported")
        image.instances.append((shape["label"], [np.asarray(shape["points"], dtype=np.float64)]))
    return image


def read_labelme(path: Path) -> list[AnnotatedImage]:
    """One LabelMe JSON file, or a folder of them (one per image)."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise InterchangeError(f"{path}: no LabelMe .json files in folder")
    return [_labelme_file(f) for f in files]


def _cvat_mask(element: ET.Element, hw: tuple[int, int]) -> np.ndarray:
    """CVAT's brush mask: run lengths over its box, row-major, starting with background."""
    left, top = int(float(element.get("left"))), int(float(element.get("top")))
    width, height = int(float(element.get("width"))), int(float(element.get("height")))
    counts = [int(c) for c in element.get("rle", "").split(",") if c.strip()]
    values = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    if values.size != width * height:
        raise ValueError(f"rle covers {values.size} pixels, the box {width}x{height}")
    mask = np.zeros(hw, dtype=bool)
    mask[top : top + height, left : left + width] = values.reshape(height, width)
    return mask


def read_cvat(path: Path) -> list[AnnotatedImage]:
    """CVAT for images 1.1 XML: ``polygon`` and brush ``mask`` elements per ``image``."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise InterchangeError(f"{path}: not a readable CVAT XML file ({e})") from e
    if root.find("track") is not None:
        raise InterchangeError(f"{path}: CVAT video tracks; export as 'CVAT for images 1.1'")
    images = []
    for element in root.iter("image"):
        hw = (int(element.get("height")), int(element.get("width")))
        image = AnnotatedImage(element.get("name"), hw)
        for shape in element:
            label = shape.get("label")
            try:
                if shape.tag == "polygon":
                    points = [p.split(",") for p in shape.get("points").split(";")]
                    image.instances.append((label, [np.asarray(points, dtype=np.float64)]))
                elif shape.tag == "mask":
                    polys = mask_to_polygons(_cvat_mask(shape, hw), tolerance=0.0)
                    image.instances.append((label, polys))
                elif shape.tag != "tag":
                    raise ValueError(f"{shape.tag} shapes are not imported (polygon, mask)")
            except (TypeError, ValueError) as e:
                raise InterchangeError(f"{path}: image {image.image!r}: {e}") from e
        images.append(image)
    if not images:
        raise InterchangeError(f"{path}: no <image> elements")
    return images


READERS = {"coco": read_coco, "labelme": read_labelme, "cvat": read_cvat}


def read_annotations(path: str | Path, format: str) -> list[AnnotatedImage]:
    """The images and instances of a COCO, LabelMe or CVAT annotation file (or folder)."""
    if format not in READERS:
        raise InterchangeError(f"format={format!r}: choose one of {FORMATS}")
    path = Path(path).expanduser()
    if not path.exists():
        raise InterchangeError(f"{path}: no such file or folder")
    try:
        return READERS[format](path)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InterchangeError):
            raise
        raise InterchangeError(f"{path}: malformed {format} file ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------- writers


def annotation_records(images: Iterable[AnnotatedImage]) -> list[dict[str, Any]]:
    """``annotations.json`` records (the official format): each name's polygons, unioned."""
    records = []
    for image in images:
        names = list(dict.fromkeys(name for name, _ in image.instances))
        masks = [[_flat(p) for n, ps in image.instances if n == name for p in ps] for name in names]
        records.append({"image": image.image, "text": names, "mask": masks})
    return records


def write_annotations(images: Sequence[AnnotatedImage], root: str | Path, name: str) -> Path:
    """Write ``root/name`` (which must not exist) once it validates as ``sa2va.data.validate``
    would validate it (the images must be in place)."""
    root = Path(root)
    path = root / name
    if path.exists():
        raise InterchangeError(f"{path}: already exists; choose another annotations file name")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(annotation_records(images), separators=(",", ":")) + "\n")
    try:
        _, bad = parse_annotations(tmp, root)
        if bad:
            raise AnnotationError(
                f"{path}: the imported records are invalid:\n"
                + "\n".join(f"record {b.index} ({b.image}): {b.problem}" for b in bad)
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_coco(images: Sequence[AnnotatedImage]) -> dict[str, Any]:
    """One COCO instances file: an annotation per instance, polygons as flat lists."""
    names = list(dict.fromkeys(n for im in images for n, _ in im.instances))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    out_images, annotations = [], []
    for i, image in enumerate(images):
        h, w = image.hw
        out_images.append({"id": i + 1, "file_name": image.image, "height": h, "width": w})
        for name, polygons in image.instances:
            points = np.concatenate(polygons)
            lo, hi = points.min(axis=0), points.max(axis=0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": names.index(name) + 1,
                    "segmentation": [_flat(p) for p in polygons],
                    "area": float(image.mask(name).sum()),
                    "bbox": [float(lo[0]), float(lo[1]), *(hi - lo + 1).tolist()],
                    "iscrowd": 0,
                }
            )
    return {"images": out_images, "annotations": annotations, "categories": categories}


def to_labelme(image: AnnotatedImage) -> dict[str, Any]:
    """One LabelMe file: a polygon shape per polygon, an instance's shapes share a group_id."""
    shapes = [
        {
            "label": name,
            "points": np.round(p, 2).tolist(),
            "group_id": k,
            "description": "",
            "shape_type": "polygon",
            "flags": {},
        }
        for k, (name, polygons) in enumerate(image.instances)
        for p in polygons
    ]
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image.image,
        "imageData": None,
        "imageHeight": image.hw[0],
        "imageWidth": image.hw[1],
    }


def write_exports(
    images: Sequence[AnnotatedImage], out: Path, formats: Iterable[str]
) -> list[Path]:
    """``coco.json`` and/or ``labelme/<image stem>.json`` under ``out``; returns the paths."""
    written = []
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format {fmt!r}: choose from {EXPORT_FORMATS}")
        if fmt == "coco":
            written.append(out / "coco.json")
            written[-1].write_text(json.dumps(to_coco(images)) + "\n")
            continue
        (out / "labelme").mkdir(parents=True, exist_ok=True)
        for image in images:
            written.append(out / "labelme" / f"{Path(image.image).stem}.json")
            written[-1].write_text(json.dumps(to_labelme(image), indent=1) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_kv_args(sys.argv[1:] if argv is None else argv)
    if not {"format", "path", "root"} <= set(args):
        print(__doc__.split("\n\n")[1])
        return 2
    name = str(args.get("annotations", "annotations.json"))
    try:
        images = read_annotations(args["path"], str(args["format"]))
        path = write_annotations(images, Path(str(args["root"])), name)
    except (InterchangeError, AnnotationError) as e:
        print(e)
        return 1
    print(f"{path}: {len(images)} images imported from {args['format']} {args['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
