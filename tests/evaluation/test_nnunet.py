"""The nnU-Net v2 row: export of this repo's splits in nnU-Net's raw format (fast), and the
whole plan / train / predict / score run on CPU (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import FAST_DATA
from hydra.utils import instantiate
from PIL import Image

from sa2va.evaluation.comparison import compare_jobs
from sa2va.evaluation.nnunet import case_id, dataset_name, export_raw, write_splits
from sa2va.evaluation.runs import load_jobs
from sa2va.utils import REPO_ROOT


@pytest.fixture
def datamodule(compose_cfg):
    return instantiate(compose_cfg(*FAST_DATA, config_name="nnunet").data)


def test_export_writes_the_repo_split_in_nnunet_raw_format(datamodule, tmp_path: Path):
    raw = tmp_path / "raw" / dataset_name(501, "OCTVessels")
    cases = export_raw(datamodule, raw)
    for split in ("train", "val", "test"):
        assert cases[split] == [case_id(r) for r in datamodule.records(split)]
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "blood vessel": 1}
    assert dataset["numTraining"] == len(cases["train"]) + len(cases["val"])
    assert dataset["file_ending"] == ".png" and len(dataset["channel_names"]) == 3

    train = {p.name for p in (raw / "imagesTr").iterdir()}
    assert train == {f"{c}_0000.png" for c in cases["train"] + cases["val"]}
    assert {p.name for p in (raw / "imagesTs").iterdir()} == {
        f"{c}_0000.png" for c in cases["test"]
    }
    assert not (raw / "labelsTs").exists()  # test labels stay with this repo's scoring
    record = datamodule.records("train")[0]
    label = np.asarray(Image.open(raw / "labelsTr" / f"{case_id(record)}.png"))
    image = Image.open(raw / "imagesTr" / f"{case_id(record)}_0000.png")
    assert image.mode == "RGB" and label.shape == (image.height, image.width)
    assert np.array_equal(label, record.mask("blood vessel", label.shape).astype(np.uint8))
    assert label.any() and set(np.unique(label)) <= {0, 1}

    write_splits(tmp_path / "pre", cases)
    folds = json.loads((tmp_path / "pre" / "splits_final.json").read_text())
    assert folds == [{"train": cases["train"], "val": cases["val"]}]


def test_export_checks_its_input(datamodule, tmp_path: Path):
    datamodule.category_names = {1: "vessel", 2: "choroid"}
    with pytest.raises(ValueError, match="one object class; the data names 2"):
        export_raw(datamodule, tmp_path)
    with pytest.raises(ValueError, match="ids are 1..999"):
        dataset_name(1000, "x")


@pytest.mark.slow  # 400 s on 2 busy cores: nnU-Net's stages spawn worker processes
def test_nnunet_row_trains_predicts_and_compares(tmp_path: Path):
    pytest.importorskip("nnunetv2")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "sa2va.nnunet", *FAST_DATA, f"hydra.run.dir={run}"]
    command += [f"paths.cache_dir={tmp_path / 'cache'}", "eval.n_boot=50", "nnunet.device=cpu"]
    command += ["nnunet.epochs=1", "nnunet.iterations_per_epoch=2"]
    command += ["nnunet.val_iterations_per_epoch=1"]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed"
    assert Path(summary["checkpoint"]).is_file()
    assert str(summary["checkpoint"]).startswith(str(run / "nnunet" / "results"))
    result = summary["results"]["default"]
    assert set(result["per_image"]) == {"iou", "dice", "precision", "recall", "cldice", "hd95"} | {
        "nsd",
        "auprc",
    }
    job = load_jobs(tmp_path, "nnunet")[0]
    assert job.setting("model") == "nnunetv2_2d"
    assert job.metrics["test/dice"] == result["per_image"]["dice"]["mean"]
    assert compare_jobs([job]).groups[0].images() == job.images
