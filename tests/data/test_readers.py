"""Sequence files -> frames with pixel spacing: DICOM and mp4 written here with pydicom and av,
a raw Zeiss .img through oct-converter, the importer, and one clear line for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.sequence_files import write_dicom, write_mp4, write_zeiss_img
from PIL import Image

from sa2va.data.annotations import load_annotations
from sa2va.data.import_frames import import_frames, main
from sa2va.data.interchange import AnnotatedImage, mask_to_polygons, write_exports
from sa2va.data.readers import InputError, read_sequence


def frames(t: int = 3, h: int = 48, w: int = 64, dtype=np.uint8) -> np.ndarray:
    """Smooth gradients with a bright band that moves: content a lossy codec keeps."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.stack([(xx * 2 + yy + 40 * i) % 200 + 20 for i in range(t)]).astype(np.float64)
    for i in range(t):
        out[i, 10 + 5 * i : 16 + 5 * i] = 250
    return (out * (257 if dtype == np.uint16 else 1)).astype(dtype)


def test_enhanced_dicom_frames_and_spacing(tmp_path):
    data = frames()
    sequence = read_sequence(write_dicom(tmp_path / "oct.dcm", data))
    assert sequence.format == "dicom"
    assert np.array_equal(np.stack(sequence.frames), data)
    assert sequence.spacing == {"row_mm": 0.0039, "column_mm": 0.0117, "slice_mm": 0.12}
    assert sequence.metadata()["frame_hw"] == [48, 64]


def test_16_bit_plain_multiframe_dicom_is_scaled_over_the_volume(tmp_path):
    data = frames(dtype=np.uint16)
    path = write_dicom(tmp_path / "plain.dcm", data, (0.01, 0.02, 0.05), enhanced=False)
    sequence = read_sequence(path)
    got = np.stack(sequence.frames)
    assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255
    assert np.corrcoef(got.ravel(), data.ravel())[0, 1] > 0.999  # one scale for all frames
    assert sequence.spacing == {"row_mm": 0.01, "column_mm": 0.02, "slice_mm": 0.05}


def test_mp4_frames_come_back_in_order(tmp_path):
    data = frames(t=4)
    sequence = read_sequence(write_mp4(tmp_path / "clip.mp4", data))
    got = np.stack(sequence.frames)
    assert got.shape == (4, 48, 64, 3)
    errors = np.abs(got[..., 0].astype(float) - data).mean(axis=(1, 2))
    assert errors.max() < 4  # lossy, but each frame is its own (frames differ by far more)
    assert sequence.spacing == {"row_mm": None, "column_mm": None, "slice_mm": None}


def test_zeiss_img_goes_through_oct_converter(tmp_path):
    data = frames(t=2, h=1024, w=512)
    sequence = read_sequence(write_zeiss_img(tmp_path / "P1_Macular Cube.img", data))
    assert sequence.format == "img"
    assert np.array_equal(np.stack(sequence.frames), data)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cut.dcm", b"DICM", r"cut\.dcm: not a readable DICOM file"),
        ("noise.mp4", b"\x00\x01" * 64, r"noise\.mp4: cannot read video"),
        ("scan.vol", b"HSF-OCT-103" + b"\x00" * 40, r"scan\.vol: cannot read as Heidelberg"),
        ("scan.fds", b"\x00" * 64, r"scan\.fds: cannot read as Topcon FDS"),
        ("notes.txt", b"text", r"notes\.txt: unsupported file type '\.txt'"),
    ],
)
def test_bad_files_fail_with_one_line_naming_them(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        read_sequence(tmp_path / name)
    assert "\n" not in str(error.value)


def test_dicom_without_pixels_is_refused(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", frames(t=1))
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(InputError, match=r"x\.dcm: DICOM file without pixel data"):
        read_sequence(path)


def test_import_frames_builds_a_valid_dataset_with_annotations(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_dicom(scans / "eye1.dcm", frames(t=2))
    write_mp4(scans / "eye2.mp4", frames(t=2))
    square = np.zeros((48, 64), dtype=bool)
    square[5:20, 8:30] = True
    names = [f"{stem}_frame_{i:06d}.png" for stem in ("eye1", "eye2") for i in range(2)]
    labels = [AnnotatedImage(n, (48, 64), [("vessel", mask_to_polygons(square))]) for n in names]
    (coco,) = write_exports(labels, tmp_path, ["coco"])

    videos = import_frames(scans, tmp_path / "ds", coco, "coco")
    out = tmp_path / "ds"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(names)
    assert Image.open(out / "images" / names[0]).mode == "L"
    assert videos["eye1"]["spacing_mm"]["slice_mm"] == 0.12
    assert json.loads((out / "frames.json").read_text()) == videos
    records, _ = load_annotations(out / "annotations.json", out)
    assert {r.video_id for r in records} == {"eye1", "eye2"}
    assert all(np.array_equal(r.mask("vessel", (48, 64)), square) for r in records)


def test_import_frames_cli_reports_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")
    assert main([f"input={tmp_path / 'bad.dcm'}", f"out={tmp_path / 'ds'}"]) == 1
    assert capsys.readouterr().out.count("\n") == 1
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.glob(".ds*"))
