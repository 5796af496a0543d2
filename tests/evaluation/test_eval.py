"""Evaluation end to end on a checkpoint of a real tiny training run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import FAST_DATA
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from hydra.utils import instantiate

import sa2va.evaluation.evaluate as ev
import sa2va.evaluation.report as report
from sa2va.inference.predict import threshold_path


def eval_cfg(compose_cfg, ckpt: Path, *overrides: str):
    return compose_cfg(
        f"ckpt_path={ckpt}", *FAST_DATA, "eval.n_boot=50", *overrides, config_name="eval"
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_outputs_exist_and_agree(trained, compose_cfg):  # noqa: F811
    cfg = eval_cfg(compose_cfg, trained.ckpt, "eval.num_figures=1")
    summary = ev.evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    dm = instantiate(cfg.data)
    test_frames, test_videos = dm.records("test"), dm.videos("test")

    written = json.loads((out / "metrics.json").read_text())
    assert written["status"] == "completed" and written["data_check"]["differences"] == {}
    assert set(written["results"]) == {"default"}  # nothing tuned for this checkpoint
    result = written["results"]["default"]
    assert result["threshold"] == 0.5 and written["n_images"] == len(test_frames)

    rows = read_csv(out / "per_image.csv")
    assert len(rows) == len(test_frames)
    assert {(r["video_id"], int(r["frame_index"])) for r in rows} == {
        (f.video_id, f.frame_index) for f in test_frames
    }
    for key in ("dice", "iou", "recall"):
        mean = np.mean([float(r[key]) for r in rows])
        assert mean == pytest.approx(result["per_image"][key]["mean"], abs=1e-12)
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    assert result["pooled"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))

    videos = read_csv(out / "per_video.csv")
    assert [v["video_id"] for v in videos] == list(test_videos)
    assert result["temporal"]["success_rate"]["n"] == len(test_videos)
    assert result["temporal"]["tci"]["n"] == len(test_videos)  # TCI beside the fluctuation
    tci = [float(v["tci"]) for v in videos]
    assert result["temporal"]["tci"]["mean"] == pytest.approx(np.mean(tci))
    assert all(
        0 <= n <= len(test_videos[v["video_id"]]) - 2 for n, v in zip(tci, videos, strict=True)
    )

    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "contact_sheet.png" in figures and len(figures) == 4  # best, median, worst, sheet
    table = (out / "results.md").read_text()
    assert f"{result['per_image']['dice']['mean']:.4f}" in table
    assert summary["results"] == written["results"]
    assert not threshold_path(trained.ckpt).exists()


def test_threshold_is_tuned_on_val_only_and_reused(trained, compose_cfg, tmp_path, monkeypatch):  # noqa: F811
    ckpt = Path(shutil.copy(trained.ckpt, tmp_path / "model.ckpt"))
    splits_read, tuned_on = [], []
    predict_videos, tune_threshold = ev.predict_videos, ev.tune_threshold

    def spy_predict(model, dm, split, ecfg):
        splits_read.append(split)
        return predict_videos(model, dm, split, ecfg)

    def spy_tune(probs, gts, *args, **kwargs):
        tuned_on.append(len(probs))
        return tune_threshold(probs, gts, *args, **kwargs)

    monkeypatch.setattr(ev, "predict_videos", spy_predict)
    monkeypatch.setattr(ev, "tune_threshold", spy_tune)
    cfg = eval_cfg(
        compose_cfg,
        ckpt,
        "eval.tune_threshold=true",
        "eval.video_mode=propagate",  # tuned for the mode it is used with
        "eval.num_figures=0",
    )
    summary = ev.evaluate(cfg)
    dm = instantiate(cfg.data)
    assert splits_read == ["val", "test"]
    assert tuned_on == [len(dm.records("val"))]

    saved = json.loads(threshold_path(ckpt).read_text())
    assert saved["split"] == "val" and saved["video_mode"] == "propagate"
    assert len(saved["table"]) == 19
    best = max(saved["table"], key=lambda row: row["dice"])
    assert saved["threshold"] == pytest.approx(best["threshold"])
    results = summary["results"]
    assert results["default"]["threshold"] == 0.5
    assert results["tuned"]["threshold"] == saved["threshold"]
    out = Path(cfg.paths.output_dir)
    assert len(read_csv(out / "per_image_tuned.csv")) == len(dm.records("test"))

    # A later evaluation reuses the saved threshold without touching val ...
    splits_read.clear()
    again = ev.evaluate(eval_cfg(compose_cfg, ckpt, "eval.num_figures=0"))
    assert splits_read == ["test"] and again["results"]["tuned"]["threshold"] == saved["threshold"]
    # ... unless the checkpoint was re-written since.
    os.utime(ckpt, ns=(0, 0))
    stale = ev.evaluate(eval_cfg(compose_cfg, ckpt, "eval.num_figures=0"))
    assert set(stale["results"]) == {"default"}


def test_refuses_data_split_differently_from_training(trained, compose_cfg):  # noqa: F811
    cfg = eval_cfg(compose_cfg, trained.ckpt, "data.split_seed=1")
    with pytest.raises(ValueError, match="split_seed: trained=0 eval=1"):
        ev.evaluate(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "failed" and "eval.check_data=false" in written["error"]


def test_data_from_checkpoint_rebuilds_the_training_data(trained, compose_cfg):  # noqa: F811
    # the config's data settings would split differently; the checkpoint's win
    cfg = eval_cfg(compose_cfg, trained.ckpt, "data.split_seed=1", "eval.data_from_checkpoint=true")
    _, meta = ev.load_model(cfg.ckpt_path, "cpu")
    dm = ev.eval_data(cfg, meta["datamodule"])
    assert ev.data_differences(meta["datamodule"], dm.hparams) == {}
    assert (
        dm.videos("test").keys()
        == instantiate(eval_cfg(compose_cfg, trained.ckpt).data).videos("test").keys()
    )
    with pytest.raises(ValueError, match="holds no data settings .* pass the data settings"):
        ev.eval_data(cfg, None)  # an export: no data settings recorded


def test_data_differences_ignore_spelling_but_not_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained_data = {
        "root": str(tmp_path / "data"),
        "split_ratios": [0.9, 0.05, 0.05],
        "category_names": {1: "blood vessel"},
        "split_seed": 0,
    }
    same = {
        "root": "data",
        "split_ratios": (0.9, 0.05, 0.05),
        "category_names": {"1": "blood vessel"},
        "split_seed": 0,
    }
    assert ev.data_differences(trained_data, same) == {}
    assert set(ev.data_differences(trained_data, {**same, "root": "other"})) == {"root"}


def test_select_cases_skips_empty_ground_truth_and_repeats():
    dice = [0.9, 0.1, 0.5, 1.0, 0.3]
    rows = [{"dice": d, "tp": 1, "fn": 0} for d in dice]
    rows[3] = {"dice": 1.0, "tp": 0, "fn": 0}  # empty GT, empty prediction
    cases = report.select_cases(rows, 1)
    assert cases == [("best", 0), ("median", 4), ("worst", 1)]
    assert len(report.select_cases(rows[:2], 2)) == 2  # fewer frames than cases: no repeats


def test_logs_scalars_and_figures_to_an_active_wandb_run(tmp_path, monkeypatch, compose_cfg):
    logged = {}
    fake = types.SimpleNamespace(
        run=types.SimpleNamespace(log=logged.update), Image=lambda path: ("image", path)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    stats = {"mean": 0.8, "std": 0.1, "ci_low": 0.7, "ci_high": 0.9, "n": 3}
    summary = {
        "split": "test",
        "results": {"default": {"threshold": 0.5, "per_image": {"dice": stats}}},
    }
    figure = tmp_path / "figures" / "contact_sheet.png"
    report.log_to_wandb(compose_cfg(config_name="eval"), summary, [figure])
    assert logged == {
        "eval/test/default/dice": 0.8,
        "eval/test/default/threshold": 0.5,
        "eval/test/figures/contact_sheet": ("image", str(figure)),
    }
