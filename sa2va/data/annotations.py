"""``annotations.json`` in both record formats -> one internal record type, with validation.

Formats (a file is a JSON list of records; formats may even be mixed):

* the user's (COCO-style polygons):
  ``{"image", "mask": [{"segmentation": [[x1, y1, ...], ...], "category_id"}],
  "conversations"}`` -- all entries of one category form one object (union of polygons),
  named through ``category_names``.
* official Sa2VA: ``{"image", "text": [name, ...], "mask": [[poly, ...], ...]}``
  -- ``text[i]`` names object ``i`` whose polygons are ``mask[i]``.
* binary mask PNGs: a record field ``"mask_file"``, or (when a record has no polygons)
  ``masks/<stem>.png`` / ``masks/<stem>_mask.png`` next to ``images/``.

Every problem is reported as a :class:`BadRecord` so that a bad data set fails once with the
full list instead of one crash per run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from sa2va.data.raster import rasterize_polygons, read_binary_mask, resize_mask

log = logging.getLogger(__name__)

DEFAULT_VIDEO_PATTERN = r"^(?P<video>.+)_frame_(?P<frame>\d+)\.\w+$"
DEFAULT_CATEGORY_NAMES: dict[int, str] = {1: "blood vessel"}
BOUNDS_TOLERANCE_PX = 1.0
OnBadRecord = Literal["error", "skip"]
# Object names go into the chat prompt: these characters delimit the model's special tokens.
RESERVED_IN_NAMES = re.compile(r"[<>\[\]]")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
RESERVED_MESSAGE = "'<', '>', '[' and ']' are reserved for the model's tokens ([SEG], <img>, ...)"


class AnnotationError(ValueError):
    """The annotation file (or some of its records) cannot be used."""


@dataclass(frozen=True)
class BadRecord:
    """One problem with one record; ``index`` is the record's position in the JSON list."""

    file: str
    index: int
    problem: str
    image: str | None = None

    def __str__(self) -> str:
        """One line, whatever the record holds: control characters are shown escaped."""
        line = f"{self.file}: record {self.index} ({self.image or '?'}): {self.problem}"
        return CONTROL_CHARS.sub(lambda m: repr(m[0])[1:-1], line)


@dataclass
class ObjectAnnotation:
    """One named object of a frame: polygons ((K, 2) ``(x, y)`` arrays) or a mask PNG."""

    name: str
    polygons: list[np.ndarray] = field(default_factory=list)
    mask_path: Path | None = None

    def rasterize(self, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        """Boolean (H, W) mask at ``out_hw``; polygons are drawn at that size, never resized."""
        mask = rasterize_polygons(self.polygons, src_hw, out_hw)
        if self.mask_path is not None:
            mask |= resize_mask(read_binary_mask(self.mask_path), out_hw)
        return mask


@dataclass
class FrameRecord:
    """One annotated frame; ``image_hw`` is the source image size that polygons refer to."""

    image_path: Path
    video_id: str
    frame_index: int
    objects: list[ObjectAnnotation]
    record_index: int
    image_hw: tuple[int, int] = (0, 0)
    image: str = ""

    @property
    def object_names(self) -> list[str]:
        """Distinct object names in annotation order."""
        return list(dict.fromkeys(o.name for o in self.objects))

    def mask(self, name: str, out_hw: tuple[int, int]) -> np.ndarray:
        """Union of this frame's objects called ``name`` (all False when there is none)."""
        mask = np.zeros(out_hw, dtype=bool)
        for obj in self.objects:
            if obj.name == name:
                mask |= obj.rasterize(self.image_hw, out_hw)
        return mask


def read_annotation_list(path: str | Path) -> list[Any]:
    """Read the JSON list; parse errors name the file (and line/column)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise AnnotationError(f"{path}: annotation file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def resolve_image(root: Path, image: str) -> Path | None:
    """Image paths are relative to the data set root; bare names may live in ``images/``."""
    for cand in (root / image, root / "images" / image):
        if _is_file(cand):
            return cand
    return None


def _is_pair(p: Any) -> bool:
    return isinstance(p, list) and len(p) == 2


def _finite(c: Real) -> bool:
    try:
        return math.isfinite(c)
    except OverflowError:  # a JSON integer beyond the float range
        return False


def _coords(raw: Any, problems: list[str], where: str) -> np.ndarray | None:
    """Flat ``[x1, y1, ...]`` (or ``[[x, y], ...]``) -> (K, 2) float array, else a problem."""
    if isinstance(raw, list) and raw and all(_is_pair(p) for p in raw):
        raw = [c for p in raw for c in p]
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        problems.append(f"{where}: polygon must be a list of numbers, got {type(raw).__name__}")
        return None
    if not all(isinstance(c, Real) and not isinstance(c, bool) for c in raw):
        problems.append(f"{where}: non-numeric coordinate")
        return None
    if not all(_finite(c) for c in raw):
        problems.append(f"{where}: NaN, infinite or out-of-range coordinate")
        return None
    if len(raw) % 2:
        problems.append(f"{where}: odd number of coordinates ({len(raw)})")
        return None
    if len(raw) < 6:
        problems.append(f"{where}: polygon with fewer than 3 points ({len(raw) // 2})")
        return None
    return np.asarray(raw, dtype=np.float64).reshape(-1, 2)


def _polygon_list(raw: Any, problems: list[str], where: str) -> list[np.ndarray]:
    """An object's polygons: a list of polygons, or a single flat polygon."""
    if isinstance(raw, Mapping):
        problems.append(f"{where}: RLE/dict segmentation is not supported, use polygons")
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        problems.append(f"{where}: expected a list of polygons, got {type(raw).__name__}")
        return []
    if raw and all(isinstance(c, Real) for c in raw):  # a single flat polygon
        raw = [raw]
    polys = [_coords(p, problems, f"{where} polygon {k}") for k, p in enumerate(raw)]
    return [p for p in polys if p is not None]


def _official_objects(rec: Mapping, problems: list[str]) -> list[ObjectAnnotation]:
    names, masks = rec["text"], rec.get("mask")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        problems.append("'text' must be a list of non-empty strings")
        return []
    if reserved := [n for n in names if RESERVED_IN_NAMES.search(n)]:
        problems.append(f"object name {reserved[0]!r}: {RESERVED_MESSAGE}")
        return []
    if not isinstance(masks, list) or len(masks) != len(names):
        n = len(masks) if isinstance(masks, list) else type(masks).__name__
        problems.append(f"'text' names {len(names)} objects but 'mask' has {n}")
        return []
    return [
        ObjectAnnotation(name, _polygon_list(m, problems, f"object {i} ('{name}')"))
        for i, (name, m) in enumerate(zip(names, masks, strict=True))
    ]


def _coco_objects(
    masks: list, category_names: Mapping[int, str], problems: list[str]
) -> list[ObjectAnnotation]:
    by_category: dict[int, list[np.ndarray]] = defaultdict(list)
    for k, entry in enumerate(masks):
        if not isinstance(entry, Mapping) or "segmentation" not in entry:
            problems.append(f"mask entry {k}: expected an object with 'segmentation'")
            continue
        cat = entry.get("category_id", 1)
        if not isinstance(cat, int) or isinstance(cat, bool) or cat not in category_names:
            problems.append(
                f"mask entry {k}: unknown category_id {cat!r} (known: {dict(category_names)})"
            )
            continue
        by_category[cat] += _polygon_list(entry["segmentation"], problems, f"mask entry {k}")
    return [ObjectAnnotation(category_names[c], polys) for c, polys in by_category.items()]


def _mask_file_objects(
    rec: Mapping, root: Path, image: str, default_name: str, problems: list[str]
) -> list[ObjectAnnotation]:
    mask_file = rec.get("mask_file")
    if mask_file is not None and not isinstance(mask_file, str):
        problems.append("'mask_file' must be a string")
        return []
    stem = Path(image).stem
    cands = (
        [root / mask_file, root / "masks" / mask_file]
        if mask_file
        else [root / "masks" / f"{stem}.png", root / "masks" / f"{stem}_mask.png"]
    )
    path = next((c for c in cands if _is_file(c)), None)
    if path is None:
        if mask_file:
            problems.append(f"mask file not found: {mask_file}")
        else:
            problems.append("no annotation: no 'mask' polygons, 'mask_file' or masks/<stem>.png")
        return []
    text = rec.get("text")
    name = text[0] if isinstance(text, list) and len(text) == 1 else text
    if isinstance(name, str) and RESERVED_IN_NAMES.search(name):
        problems.append(f"object name {name!r}: {RESERVED_MESSAGE}")
        return []
    return [ObjectAnnotation(name if isinstance(name, str) and name else default_name, [], path)]


def _objects(
    rec: Mapping, root: Path, image: str, category_names: Mapping[int, str], problems: list[str]
) -> list[ObjectAnnotation]:
    masks = rec.get("mask")
    if masks and "text" in rec:
        return _official_objects(rec, problems)
    if masks and isinstance(masks, list) and isinstance(masks[0], Mapping):
        return _coco_objects(masks, category_names, problems)
    if masks:
        problems.append("'mask' is neither a list of {segmentation} entries nor paired with 'text'")
        return []
    default_name = next(iter(category_names.values()), "object")
    return _mask_file_objects(rec, root, image, default_name, problems)


def _check_image(path: Path, problems: list[str]) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncated files only fail here
            return img.height, img.width
    except Exception as e:  # PIL raises many types for corrupt files
        problems.append(f"unreadable image: {type(e).__name__}: {e}")
        return None


def _check_objects(objects: list[ObjectAnnotation], hw: tuple[int, int], problems: list[str]):
    h, w = hw
    tol = BOUNDS_TOLERANCE_PX
    for i, obj in enumerate(objects):
        where = f"object {i} ('{obj.name}')"
        for k, p in enumerate(obj.polygons):
            x, y = p[:, 0], p[:, 1]
            if x.min() < -tol or y.min() < -tol or x.max() > w - 1 + tol or y.max() > h - 1 + tol:
                problems.append(
                    f"{where} polygon {k}: coordinates outside the {w}x{h} image "
                    f"(x {x.min():.1f}..{x.max():.1f}, y {y.min():.1f}..{y.max():.1f})"
                )
        if obj.mask_path is not None:
            try:
                mhw = read_binary_mask(obj.mask_path).shape[:2]
            except Exception as e:
                problems.append(f"{where}: unreadable mask file {obj.mask_path.name}: {e}")
                continue
            if mhw != hw:
                problems.append(f"{where}: mask file is {mhw[1]}x{mhw[0]} but the image is {w}x{h}")
                continue
    if not problems and not objects:
        problems.append("no objects annotated")
    if not problems:
        for i, obj in enumerate(objects):
            if not obj.rasterize(hw, hw).any():
                problems.append(f"object {i} ('{obj.name}'): empty mask")


def _video_and_frame(
    rec: Mapping, image: str, pattern: re.Pattern, problems: list[str]
) -> tuple[str, int | None]:
    """Explicit ``video``/``video_id`` (+ ``frame_index``/``frame``), else the file name."""
    match = pattern.match(Path(image).name)
    video = rec.get("video_id", rec.get("video"))
    frame = rec.get("frame_index", rec.get("frame"))
    if video is not None and not isinstance(video, (str, int)):
        problems.append("'video_id' must be a string")
    if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool)):
        problems.append("'frame_index' must be an integer")
        frame = None
    if frame is None and match and "frame" in pattern.groupindex:
        frame = int(match["frame"])
    if video is None:
        if match and "video" in pattern.groupindex:
            video = match["video"]
        else:  # no video structure: a single-frame video named by the stem
            video, frame = Path(image).stem, 0 if frame is None else frame
    return str(video), frame


def parse_annotations(
    path: str | Path,
    root: str | Path | None = None,
    *,
    category_names: Mapping[int, str] | None = None,
    video_pattern: str = DEFAULT_VIDEO_PATTERN,
) -> tuple[list[FrameRecord], list[BadRecord]]:
    """Parse and validate every record; returns the good records and every problem found."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    category_names = dict(category_names or DEFAULT_CATEGORY_NAMES)
    pattern = re.compile(video_pattern)
    records: list[FrameRecord] = []
    bad: list[BadRecord] = []
    seen: dict[Path, int] = {}
    unnumbered: list[FrameRecord] = []
    for index, rec in enumerate(read_annotation_list(path)):
        problems: list[str] = []  # all of a record's problems are reported together
        image = rec.get("image") if isinstance(rec, Mapping) else None
        if not isinstance(rec, Mapping):
            problems.append(f"record must be an object, got {type(rec).__name__}")
        elif image is None:
            problems.append("missing field 'image'")
        elif not isinstance(image, str) or not image:
            problems.append("'image' must be a non-empty string")
        else:
            record = _parse_record(rec, index, image, root, category_names, pattern, problems)
            if record is not None and record.image_path.resolve() in seen:
                first = seen[record.image_path.resolve()]
                problems.append(f"duplicate image (also record {first})")
            elif record is not None and not problems:
                seen[record.image_path.resolve()] = index
                records.append(record)
                if record.frame_index < 0:
                    unnumbered.append(record)
        shown = image if isinstance(image, str) else None
        bad += [BadRecord(str(path), index, p, shown) for p in problems]
    _number_frames(records, unnumbered)
    return records, bad


def _parse_record(
    rec: Mapping,
    index: int,
    image: str,
    root: Path,
    category_names: Mapping[int, str],
    pattern: re.Pattern,
    problems: list[str],
) -> FrameRecord | None:
    image_path = resolve_image(root, image)
    video, frame = _video_and_frame(rec, image, pattern, problems)
    objects = _objects(rec, root, image, category_names, problems)
    if image_path is None:
        problems.append(f"image not found (looked in {root} and {root / 'images'})")
        return None
    hw = _check_image(image_path, problems)
    if hw is None:
        return None
    if not problems:
        _check_objects(objects, hw, problems)
    frame_index = -1 if frame is None else frame
    return FrameRecord(image_path, video, frame_index, objects, index, hw, image)


def _number_frames(records: list[FrameRecord], unnumbered: list[FrameRecord]) -> None:
    """Frames without an index are numbered after their video's numbered frames, in file order."""
    last: dict[str, int] = defaultdict(lambda: -1)
    for r in records:
        if r.frame_index >= 0:
            last[r.video_id] = max(last[r.video_id], r.frame_index)
    for r in unnumbered:
        last[r.video_id] += 1
        r.frame_index = last[r.video_id]


def format_bad_records(bad: Sequence[BadRecord]) -> str:
    """One line per problem: ``<file>: record <i> (<image>): <problem>``."""
    return "\n".join(str(b) for b in bad)


def load_annotations(
    path: str | Path,
    root: str | Path | None = None,
    *,
    on_bad_record: OnBadRecord = "error",
    category_names: Mapping[int, str] | None = None,
    video_pattern: str = DEFAULT_VIDEO_PATTERN,
) -> tuple[list[FrameRecord], list[BadRecord]]:
    """Parse; ``"error"`` raises one :class:`AnnotationError` listing every bad record,
    ``"skip"`` drops bad records with a warning. Returns (good records, bad records)."""
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    records, bad = parse_annotations(
        path, root, category_names=category_names, video_pattern=video_pattern
    )
    if bad and on_bad_record == "error":
        n = len({b.index for b in bad})
        raise AnnotationError(
            f"{n} bad record(s) in {path} (set on_bad_record=skip to drop them):\n"
            + format_bad_records(bad)
        )
    if bad:
        n = len({b.index for b in bad})
        log.warning("Skipped %d bad record(s) in %s:\n%s", n, path, format_bad_records(bad[:20]))
    return records, bad


def group_videos(records: Sequence[FrameRecord]) -> dict[str, list[FrameRecord]]:
    """Video id -> frames ordered by frame index (videos sorted by id)."""
    videos: dict[str, list[FrameRecord]] = defaultdict(list)
    for r in records:
        videos[r.video_id].append(r)
    return {
        v: sorted(videos[v], key=lambda r: (r.frame_index, r.record_index)) for v in sorted(videos)
    }
