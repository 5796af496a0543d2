"""Import sequence files (DICOM, video, vendor OCT exports) as a data set of this project.

    python -m sa2va.data.import_frames input=scan.dcm out=DATASET
    python -m sa2va.data.import_frames input=exports/ out=DATASET \\
        annotations=instances.json format=coco     # coco | labelme | cvat

Writes ``DATASET/images/<file stem>_frame_<n>.png`` (one video per file, ``n`` from 0, the
names ``sa2va.predict`` gives the same frames), ``DATASET/frames.json`` (per video: source
file, format, frame count and size, pixel spacing in mm) and, with ``annotations=``, the
imported ``DATASET/annotations.json``, validated as ``sa2va.data.validate`` does. The
annotation tool's image names must be these frame names. ``out`` must not exist; it appears
only when everything succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from sa2va.data.annotations import AnnotationError
from sa2va.data.interchange import InterchangeError, read_annotations, write_annotations
from sa2va.data.readers import InputError, frame_name, is_sequence_file, read_sequence
from sa2va.data.synth import parse_kv_args

FRAMES_FILE = "frames.json"


def sequence_files(source: Path) -> list[Path]:
    """The file itself, or every sequence file of a folder (sorted by name)."""
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and is_sequence_file(p))
    if not files:
        raise InputError(f"{source}: no sequence files (video, DICOM, vendor OCT) in folder")
    return files


def write_frames(path: Path, images_dir: Path) -> dict[str, Any]:
    """Every frame of ``path`` as a PNG (grey frames stay 8-bit grey); its metadata."""
    sequence = read_sequence(path)
    for i, frame in enumerate(sequence.frames):
        Image.fromarray(frame).save(images_dir / f"{frame_name(path.stem, i)}.png")
    return sequence.metadata()


def import_frames(
    source: str | Path,
    out: str | Path,
    annotations: str | Path | None = None,
    format: str = "coco",
) -> dict[str, dict[str, Any]]:
    """Write the data set ``out`` (see the module doc); returns video id -> metadata."""
    final = Path(out).expanduser()
    if final.exists():
        raise FileExistsError(f"{final}: already exists; choose another out=")
    files = sequence_files(Path(source).expanduser())
    if len({f.stem for f in files}) < len(files):
        raise InputError(f"{source}: two sequence files share a name stem (one video each)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        (tmp / "images").mkdir()
        videos = {f.stem: write_frames(f, tmp / "images") for f in files}
        (tmp / FRAMES_FILE).write_text(json.dumps(videos, indent=2) + "\n")
        if annotations is not None:
            write_annotations(read_annotations(annotations, format), tmp, "annotations.json")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return videos


def main(argv: list[str] | None = None) -> int:
    args = parse_kv_args(sys.argv[1:] if argv is None else argv)
    if not {"input", "out"} <= set(args):
        print(__doc__.split("\n\n")[1])
        return 2
    try:
        videos = import_frames(
            str(args["input"]),
            str(args["out"]),
            args.get("annotations"),
            str(args.get("format", "coco")),
        )
    except (InputError, InterchangeError, AnnotationError, FileExistsError) as e:
        print(e)
        return 1
    n = sum(v["n_frames"] for v in videos.values())
    print(f"{args['out']}: {n} frames of {len(videos)} videos imported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
