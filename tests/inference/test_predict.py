"""Prediction: inputs, output layout, thresholds, and failures that leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import FAST_DATA
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from hydra.utils import instantiate
from PIL import Image

from sa2va.inference.predict import (
    InputError,
    _write_frame,
    discover_inputs,
    mask_labels,
    predict,
    read_frames,
    resolve_threshold,
    save_tuned_threshold,
)

PROMPTS = '["Please segment the blood vessel.","Segment the vessels."]'
ANSWERS = '["Sure, [SEG].","Vessels [SEG] and capillaries [SEG]."]'


def test_video_frames_get_one_mask_per_frame_per_seg(trained, compose_cfg, tmp_path):  # noqa: F811
    data_cfg = compose_cfg(*FAST_DATA).data
    video_id, records = next(iter(instantiate(data_cfg).videos("test").items()))
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for record in records:
        shutil.copy(record.image_path, frames_dir / record.image_path.name)
    cfg = compose_cfg(
        f"ckpt_path={trained.ckpt}",
        f"input={frames_dir}",
        f"prompt={PROMPTS}",
        f"predict.answer={ANSWERS}",
        "predict.video_mode=propagate",
        "predict.save_probs=png16",
        "predict.threshold=0.5",
        config_name="predict",
    )
    summary = predict(cfg)
    out = Path(summary["output_dir"])
    (sequence,) = summary["sequences"]  # the folder's <video>_frame_<n> names form one video
    assert sequence["name"] == video_id and len(sequence["frames"]) == len(records)
    masks = sorted(p.name for p in (out / "masks").iterdir())
    stems = [r.image_path.stem for r in records]
    assert masks == sorted(f"{s}_{label}.png" for s in stems for label in ("p0", "p1_0", "p1_1"))
    assert len(list((out / "overlays").iterdir())) == len(records)
    for name in masks:
        mask = np.asarray(Image.open(out / "masks" / name))
        prob = np.asarray(Image.open(out / "probs" / name)).astype(np.float64) / 65535
        assert mask.shape == prob.shape == records[0].image_hw
        assert set(np.unique(mask)) <= {0, 255}
        confident = np.abs(prob - 0.5) > 1e-4  # 16-bit rounding aside
        assert np.array_equal((mask == 255)[confident], (prob > 0.5)[confident])
    written = json.loads((out / "predictions.json").read_text())
    assert written["threshold_source"] == "predict.threshold"
    assert written["sequences"][0]["frames"][0]["masks"]["p1_1"].startswith("masks/")


def test_corrupt_image_fails_naming_it_and_leaves_no_output(trained, compose_cfg, tmp_path):  # noqa: F811
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (48, 40), (i * 90, 60, 30)).save(folder / f"a{i}.png")
    (folder / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = compose_cfg(
        f"ckpt_path={trained.ckpt}",
        f"input={folder}",
        "predict.sequence=false",
        config_name="predict",
    )
    with pytest.raises(InputError, match=r"z_broken\.png: cannot read image"):
        predict(cfg)
    output_dir = Path(cfg.predict.output_dir)
    assert not output_dir.exists()
    assert not list(output_dir.parent.glob(f".{output_dir.name}*"))  # no temp dir left over


def test_existing_output_dir_is_refused_before_any_work(compose_cfg, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    taken = tmp_path / "taken"
    taken.mkdir()
    cfg = compose_cfg(
        "ckpt_path=/nonexistent.ckpt",
        f"input={image}",
        f"predict.output_dir={taken}",
        config_name="predict",
    )
    with pytest.raises(FileExistsError, match="taken: already exists"):
        predict(cfg)


def test_video_file_without_a_reader_says_to_extract_frames(tmp_path, monkeypatch):
    monkeypatch.setattr("sa2va.data.readers.available", lambda package: False)
    video = tmp_path / "scan.mp4"
    video.write_bytes(b"\x00" * 16)
    (item,) = discover_inputs(video)
    with pytest.raises(InputError, match=r"scan\.mp4: reading video files needs.*ffmpeg -i"):
        read_frames(item)


def test_discover_inputs_groups_frames_in_natural_order(tmp_path):
    for name in ("p1_frame_10.png", "p1_frame_2.png", "p2_frame_1.jpg", "scan.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    auto = discover_inputs(tmp_path, "auto", r"^(?P<video>.+)_frame_(?P<frame>\d+)\.\w+$")
    assert [(i.name, [p.name for p in i.images]) for i in auto] == [
        ("p1", ["p1_frame_2.png", "p1_frame_10.png"]),
        ("p2", ["p2_frame_1.jpg"]),
        ("scan", ["scan.tif"]),
    ]
    (one,) = discover_inputs(tmp_path, True)
    assert one.name == tmp_path.name and len(one.images) == 4
    assert len(discover_inputs(tmp_path, False)) == 4
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type"):
        discover_inputs(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file or folder"):
        discover_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images"):
        discover_inputs(tmp_path / "empty")


def test_mask_labels_number_only_prompts_with_several_masks():
    assert mask_labels([0, 1, 1, 2]) == ["p0", "p1_0", "p1_1", "p2"]


def test_probabilities_as_npy_are_kept_exactly(tmp_path):
    probs = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    image = Image.new("RGB", (6, 5))
    files = _write_frame(tmp_path, "f", image, probs, ["p0", "p1"], 0.5, "npy", overlays=False)
    assert files == {"p0": "masks/f_p0.png", "p1": "masks/f_p1.png"}
    assert np.array_equal(np.load(tmp_path / "probs" / "f_p1.npy"), probs[1])
    assert not (tmp_path / "overlays").exists()


def test_threshold_precedence_and_stale_tuning(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"weights")
    meta = {"threshold": 0.5}
    assert resolve_threshold(None, ckpt, meta) == (0.5, "checkpoint")
    save_tuned_threshold(ckpt, {"threshold": 0.3, "split": "val"})
    value, source = resolve_threshold(None, ckpt, meta)
    assert value == 0.3 and source.endswith("m.ckpt.threshold.json")
    assert resolve_threshold(0.7, ckpt, meta) == (0.7, "predict.threshold")
    os.utime(ckpt, ns=(0, 0))  # the checkpoint changed after tuning
    assert resolve_threshold(None, ckpt, meta) == (0.5, "checkpoint")
