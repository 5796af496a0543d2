"""Predict and eval on a multi-frame DICOM and an mp4 written here (issue 17): predict reads
the files directly and exports COCO / LabelMe; eval runs on the frames the importer wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from helpers.configs import FAST_DATA
from helpers.sequence_files import write_dicom, write_mp4
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from hydra.utils import instantiate
from PIL import Image

from sa2va.data.annotations import load_annotations
from sa2va.data.import_frames import import_frames
from sa2va.data.interchange import AnnotatedImage, iou, read_annotations, write_exports
from sa2va.data.readers import frame_name
from sa2va.evaluation.evaluate import evaluate
from sa2va.inference.predict import predict


def scans(compose_cfg, folder: Path) -> list[AnnotatedImage]:
    """A test video of the synthetic data as eye1.dcm and eye2.mp4; its ground truth."""
    records = next(iter(instantiate(compose_cfg(*FAST_DATA).data).videos("test").values()))
    grey = np.stack([np.asarray(Image.open(r.image_path).convert("L")) for r in records])
    folder.mkdir()
    write_dicom(folder / "eye1.dcm", grey)
    write_mp4(folder / "eye2.mp4", grey)
    return [
        AnnotatedImage(f"{frame_name(stem, i)}.png", r.image_hw, [("blood vessel", polygons)])
        for stem in ("eye1", "eye2")
        for i, r in enumerate(records)
        for polygons in [r.objects[0].polygons]
    ]


def test_predict_reads_dicom_and_mp4_and_exports_polygons(trained, compose_cfg, tmp_path):  # noqa: F811
    truth = scans(compose_cfg, tmp_path / "scans")
    cfg = compose_cfg(
        f"ckpt_path={trained.ckpt}",
        f"input={tmp_path / 'scans'}",
        "predict.threshold=0.3",
        "predict.export=[coco,labelme]",
        config_name="predict",
    )
    summary = predict(cfg)
    out = Path(summary["output_dir"])
    dicom, video = summary["sequences"]
    assert (dicom["name"], dicom["format"], video["name"], video["format"]) == (
        "eye1",
        "dicom",
        "eye2",
        "video",
    )
    assert dicom["spacing_mm"]["slice_mm"] == 0.12 and dicom["n_frames"] == len(truth) // 2
    frames = [f["frame"] for s in summary["sequences"] for f in s["frames"]]
    assert [f"{f}.png" for f in frames] == [t.image for t in truth]
    assert summary["exports"][0] == "coco.json"
    coco = read_annotations(out / "coco.json", "coco")
    labelme = read_annotations(out / "labelme", "labelme")
    for a, b in zip(coco, labelme, strict=True):
        assert a.image == b.image and a.instances
        assert np.array_equal(a.mask("blood vessel"), b.mask("blood vessel"))
        mask = np.asarray(Image.open(out / "masks" / f"{Path(a.image).stem}_p0.png")) > 0
        assert iou(mask, a.mask("blood vessel")) >= 0.98


def test_eval_runs_on_imported_dicom_and_mp4_frames(trained, compose_cfg, tmp_path):  # noqa: F811
    truth = scans(compose_cfg, tmp_path / "scans")
    (coco,) = write_exports(truth, tmp_path, ["coco"])
    import_frames(tmp_path / "scans", tmp_path / "ds", coco, "coco")
    records, _ = load_annotations(tmp_path / "ds" / "annotations.json", tmp_path / "ds")
    assert len(records) == len(truth)
    ckpt = shutil.copy(trained.ckpt, tmp_path / "model.ckpt")  # eval records itself beside it
    cfg = compose_cfg(
        f"ckpt_path={ckpt}",
        "data=oct",
        f"data.root={tmp_path / 'ds'}",
        "data.split_ratios=[1,0,0]",
        "data.num_workers=0",
        "eval.split=train",
        "eval.check_data=false",
        "eval.n_boot=20",
        "eval.num_figures=0",
        config_name="eval",
    )
    summary = evaluate(cfg)
    assert summary["status"] == "completed"
    assert summary["n_videos"] == 2 and summary["n_images"] == len(truth)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["results"]["default"]["per_image"]["dice"]["n"] == len(truth)
    pointer = json.loads((tmp_path / "model.ckpt.eval.json").read_text())
    assert pointer == {"metrics": str(Path(cfg.paths.output_dir) / "metrics.json")}
