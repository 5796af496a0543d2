"""Check a data set before training: every bad record, then a summary; exit 1 if any is bad.

python -m sa2va.data.validate path=DIR [annotations=annotations.json] [video_pattern=REGEX]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from sa2va.data.annotations import (
    DEFAULT_VIDEO_PATTERN,
    AnnotationError,
    group_videos,
    parse_annotations,
)
from sa2va.data.synth import parse_kv_args


def main(argv: list[str] | None = None) -> int:
    args = parse_kv_args(sys.argv[1:] if argv is None else argv)
    if "path" not in args:
        print(__doc__.strip())
        return 2
    root = Path(str(args.pop("path")))
    ann = root / str(args.pop("annotations", "annotations.json"))
    pattern = str(args.pop("video_pattern", DEFAULT_VIDEO_PATTERN))
    if args:
        print(f"unknown arguments: {sorted(args)}")
        return 2
    try:
        records, bad = parse_annotations(ann, root, video_pattern=pattern)
    except AnnotationError as e:
        print(e)
        return 1
    for b in bad:
        print(b)
    videos = group_videos(records)
    names = Counter(n for r in records for n in r.object_names)
    n_bad = len({b.index for b in bad})
    print(
        f"{ann}: {len(records) + n_bad} records, {len(records)} good, {n_bad} bad "
        f"({len(bad)} problems); {len(videos)} videos; objects: {dict(names)}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
