"""annotations.json parsing (both formats, mask PNGs), video grouping, validation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.data_fixtures import square, write_dataset, write_image
from PIL import Image

from sa2va.data import validate
from sa2va.data.annotations import (
    AnnotationError,
    group_videos,
    load_annotations,
    parse_annotations,
)

SQ = square(4, 4, 12, 12)


def official(image: str, *objects: tuple[str, list]) -> dict:
    return {"image": image, "text": [n for n, _ in objects], "mask": [p for _, p in objects]}


def test_seed_002_format_unites_polygons_per_category(tmp_path: Path) -> None:
    rec = {
        "image": "images/pat_frame_000001.jpg",
        "mask": [
            {"segmentation": [SQ], "area": 64, "bbox": [4, 4, 8, 8], "category_id": 1},
            {"segmentation": [square(20, 20, 25, 25)], "category_id": 1},
            {"segmentation": [square(2, 20, 6, 28)], "category_id": 2},
        ],
        "conversations": [
            {"from": "human", "value": "<image>\nPlease segment the blood vessels."},
            {"from": "gpt", "value": "<p>blood vessels</p>[SEG]"},
        ],
    }
    path = write_dataset(tmp_path, [rec])
    (r,), bad = load_annotations(path, category_names={1: "blood vessel", 2: "artery"})
    assert bad == [] and r.object_names == ["blood vessel", "artery"]
    assert len(r.objects[0].polygons) == 2 and r.objects[0].polygons[0].shape == (4, 2)
    m = r.mask("blood vessel", (32, 32))
    assert m[8, 8] and m[22, 22] and not m[24, 4]
    assert r.mask("artery", (32, 32))[24, 4] and not r.mask("vein", (32, 32)).any()


def test_official_format_pairs_text_with_mask(tmp_path: Path) -> None:
    rec = official("image001.jpg", ("blood vessel", [SQ]), ("artery", [square(20, 2, 28, 9)]))
    (r,), _ = load_annotations(write_dataset(tmp_path, [rec]))
    assert r.image_path == tmp_path / "images" / "image001.jpg"
    assert [o.name for o in r.objects] == ["blood vessel", "artery"]
    assert r.mask("artery", (32, 32))[5, 24] and not r.mask("artery", (32, 32))[8, 8]
    assert r.image_hw == (32, 32) and r.record_index == 0


def test_image_path_relative_to_root_first(tmp_path: Path) -> None:
    write_image(tmp_path / "frames" / "x.jpg")
    rec = official("frames/x.jpg", ("blood vessel", [SQ]))
    (tmp_path / "annotations.json").write_text(json.dumps([rec]))
    (r,), _ = load_annotations(tmp_path / "annotations.json")
    assert r.image_path == tmp_path / "frames" / "x.jpg"


@pytest.mark.parametrize("mask_name", ["masks/v_frame_000003.png", "masks/v_frame_000003_mask.png"])
def test_mask_png_by_convention(tmp_path: Path, mask_name: str) -> None:
    write_dataset(tmp_path, [{"image": "images/v_frame_000003.jpg"}])
    arr = np.zeros((32, 32), np.uint8)
    arr[10:20, 5:8] = 1  # a 0/1 mask
    (tmp_path / "masks").mkdir()
    Image.fromarray(arr).save(tmp_path / mask_name)
    (r,), bad = load_annotations(tmp_path / "annotations.json")
    assert bad == [] and r.object_names == ["blood vessel"]
    assert (r.mask("blood vessel", (32, 32)) == arr.astype(bool)).all()
    assert r.mask("blood vessel", (16, 16)).sum() > 0
    assert (r.video_id, r.frame_index) == ("v", 3)


def test_mask_file_field(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.jpg")
    arr = np.zeros((32, 32), np.uint8)
    arr[1:5, 1:5] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(arr).save(tmp_path / "masks" / "weird_name.png")
    rec = {"image": "a.jpg", "text": ["artery"], "mask_file": "weird_name.png"}
    (tmp_path / "annotations.json").write_text(json.dumps([rec]))
    (r,), _ = load_annotations(tmp_path / "annotations.json")
    assert r.object_names == ["artery"] and r.mask("artery", (32, 32)).sum() == 16


def test_video_grouping(tmp_path: Path) -> None:
    recs = [
        official("p1_frame_000010.jpg", ("blood vessel", [SQ])),
        official("p1_frame_000002.jpg", ("blood vessel", [SQ])),
        official("p2_frame_000001.jpg", ("blood vessel", [SQ])),
        official("lonely.jpg", ("blood vessel", [SQ])),
        {**official("scan_a.jpg", ("blood vessel", [SQ])), "video_id": "eyeX"},
        {**official("scan_b.jpg", ("blood vessel", [SQ])), "video": "eyeX", "frame_index": 0},
    ]
    records, bad = load_annotations(write_dataset(tmp_path, recs))
    assert bad == []
    videos = group_videos(records)
    assert list(videos) == ["eyeX", "lonely", "p1", "p2"]
    assert [r.frame_index for r in videos["p1"]] == [2, 10]
    assert [r.image for r in videos["eyeX"]] == ["scan_b.jpg", "scan_a.jpg"]
    assert len(videos["lonely"]) == 1


def test_custom_video_pattern(tmp_path: Path) -> None:
    recs = [official(f"eye7-{i}.jpg", ("blood vessel", [SQ])) for i in (3, 1)]
    pattern = r"^(?P<video>[^-]+)-(?P<frame>\d+)\.jpg$"
    records, _ = load_annotations(write_dataset(tmp_path, recs), video_pattern=pattern)
    assert [(r.video_id, r.frame_index) for r in group_videos(records)["eye7"]] == [
        ("eye7", 1),
        ("eye7", 3),
    ]


GOOD = official("good.jpg", ("blood vessel", [SQ]))


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (official("missing.jpg", ("blood vessel", [SQ])), "image not found"),
        (official("corrupt.jpg", ("blood vessel", [SQ])), "unreadable image"),
        (official("truncated.jpg", ("blood vessel", [SQ])), "unreadable image"),
        (official("a.jpg", ("blood vessel", [[1, 1, 5, 5]])), "fewer than 3 points"),
        (official("a.jpg", ("blood vessel", [[1, 1, 5, 5, 9]])), "odd number of coordinates"),
        (official("a.jpg", ("blood vessel", [[1, 1, 5, "x", 9, 9]])), "non-numeric"),
        (official("a.jpg", ("blood vessel", [[1, 1, 5, float("nan"), 9, 9]])), "NaN"),
        (official("a.jpg", ("blood vessel", [square(4, 4, 40, 12)])), "outside the 32x32 image"),
        (official("a.jpg", ("blood vessel", [square(-2, 4, 12, 12)])), "outside"),
        (official("a.jpg", ("blood vessel", [])), "empty mask"),
        (official("a.jpg", ("blood vessel", "oops")), "expected a list of polygons"),
        ({"image": "a.jpg", "text": "blood vessel", "mask": [[SQ], [SQ]]}, "names 1 objects"),
        ({"image": "a.jpg", "text": [3], "mask": [[SQ]]}, "'text' must be a list"),
        ({"image": "a.jpg", "mask": [{"segmentation": [SQ], "category_id": 9}]}, "category_id 9"),
        ({"image": "a.jpg", "mask": [{"segmentation": {"counts": "x"}}]}, "RLE"),
        ({"image": "a.jpg", "mask": ["x"]}, "neither"),
        ({"image": "a.jpg"}, "no annotation"),
        ({"text": ["blood vessel"], "mask": [[SQ]]}, "missing field 'image'"),
        ({"image": 5, "text": ["blood vessel"], "mask": [[SQ]]}, "'image' must be"),
        ([1, 2], "record must be an object"),
        ({**official("v.jpg", ("blood vessel", [SQ])), "video_id": [1]}, "'video_id' must"),
        (GOOD, "duplicate image (also record 0)"),
    ],
)
def test_bad_records(tmp_path: Path, record, problem: str) -> None:
    path = write_dataset(tmp_path, [GOOD, record])
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    full = (tmp_path / "images" / "good.jpg").read_bytes()
    (tmp_path / "images" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "images" / "missing.jpg").unlink(missing_ok=True)

    records, bad = parse_annotations(path)
    assert [r.image for r in records] == ["good.jpg"]
    assert len(bad) == 1 and bad[0].index == 1 and problem in bad[0].problem, bad
    assert bad[0].file == str(path)

    skipped, skipped_bad = load_annotations(path, on_bad_record="skip")
    assert len(skipped) == 1 and skipped_bad == bad
    with pytest.raises(AnnotationError) as e:
        load_annotations(path, on_bad_record="error")
    image = record.get("image") if isinstance(record, dict) else None
    shown = image if isinstance(image, str) else "?"
    assert f"{path}: record 1 ({shown}): " in str(e.value) and problem in str(e.value)


def test_coordinates_within_tolerance_are_accepted(tmp_path: Path) -> None:
    recs = [official("a.jpg", ("blood vessel", [square(-1, -0.5, 32, 31.9)]))]
    records, bad = parse_annotations(write_dataset(tmp_path, recs))
    assert bad == [] and records[0].mask("blood vessel", (32, 32)).all()


def test_empty_mask_png_and_wrong_size_png(tmp_path: Path) -> None:
    write_dataset(tmp_path, [{"image": "a.jpg"}, {"image": "b.jpg"}])
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.ones((16, 16), np.uint8)).save(tmp_path / "masks" / "b.png")
    _, bad = parse_annotations(tmp_path / "annotations.json")
    assert [(b.index, "empty mask" in b.problem or "16x16" in b.problem) for b in bad] == [
        (0, True),
        (1, True),
    ]


def test_error_lists_every_bad_record(tmp_path: Path) -> None:
    recs = [
        official("a.jpg", ("blood vessel", [[1, 2, 3]])),
        GOOD,
        official("nope.jpg", ("blood vessel", [SQ])),
    ]
    path = write_dataset(tmp_path, recs)
    (tmp_path / "images" / "nope.jpg").unlink()
    with pytest.raises(AnnotationError) as e:
        load_annotations(path)
    msg = str(e.value)
    assert "2 bad record(s)" in msg
    assert f"{path}: record 0 (a.jpg): object 0 ('blood vessel') polygon 0: odd" in msg
    assert f"{path}: record 2 (nope.jpg): image not found" in msg


@pytest.mark.parametrize(
    ("text", "message"), [("[{", "not valid JSON"), ('{"image": 1}', "expected a JSON list")]
)
def test_unparseable_json_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "annotations.json"
    path.write_text(text)
    for mode in ("error", "skip"):
        with pytest.raises(AnnotationError, match=message) as e:
            load_annotations(path, on_bad_record=mode)
        assert str(path) in str(e.value)
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "nothing.json")


def test_validate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "ok", [GOOD])
    assert validate.main([f"path={tmp_path / 'ok'}"]) == 0
    assert "1 good, 0 bad" in capsys.readouterr().out

    write_dataset(tmp_path / "bad", [GOOD, official("x.jpg", ("blood vessel", [[1, 1]]))])
    (tmp_path / "bad" / "custom.json").write_text((tmp_path / "bad/annotations.json").read_text())
    assert validate.main([f"path={tmp_path / 'bad'}", "annotations=custom.json"]) == 1
    out = capsys.readouterr().out
    assert "custom.json: record 1 (x.jpg): " in out and "fewer than 3 points" in out
    assert "1 good, 1 bad" in out

    (tmp_path / "bad" / "annotations.json").write_text("nonsense")
    assert validate.main([f"path={tmp_path / 'bad'}"]) == 1
    assert "not valid JSON" in capsys.readouterr().out
    assert validate.main([]) == 2
