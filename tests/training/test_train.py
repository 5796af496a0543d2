"""The training entry point end to end on the tiny model and synthetic data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.configs import FAST_DATA, FAST_TRAIN
from hydra.utils import instantiate

from sa2va.training.run import build, train


def test_train_writes_metrics_and_checkpoints(compose_cfg):
    cfg = compose_cfg(*FAST_TRAIN)
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    written = json.loads((run / "metrics.json").read_text())
    assert written["status"] == "completed" and written["global_step"] == 4
    for key in ("val/dice", "val/iou", "val/precision", "val/recall", "train/loss_lang"):
        assert 0.0 <= written["metrics"][key] < float("inf"), key
    assert summary["metrics"] == written["metrics"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(written["best_checkpoint"]).is_file()
    assert (run / "csv" / "metrics.csv").is_file()


def test_run_reports_test_metrics_beside_val_and_keeps_val_curves_clean(compose_cfg):
    cfg = compose_cfg(*FAST_TRAIN)
    metrics = train(cfg)["metrics"]
    for key in ("test/dice", "test/iou", "test/precision", "test/recall", "test/pooled_dice"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # the test pass is not logged: the val curve has exactly the two validations
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/dice")]
    assert len(rows) == 2 and "test/dice" not in rows[0]


def test_a_failed_run_still_writes_metrics_json(compose_cfg):
    cfg = compose_cfg(*FAST_TRAIN, "freeze.llm_last_n=99", "freeze=llm_last_n")
    with pytest.raises(Exception, match="llm_last_n=99 but the LLM has 2 layers"):
        train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "failed" and "llm_last_n=99" in written["error"]


def test_training_without_any_logger(compose_cfg):
    assert train(compose_cfg(*FAST_TRAIN, "logger=none"))["status"] == "completed"


def test_loss_decreases_over_a_few_dozen_steps(compose_cfg):
    cfg = compose_cfg(*FAST_DATA)
    torch.manual_seed(0)
    module, datamodule = build(cfg)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    optimizer, _ = module.optim.build(module.model.named_parameters(), total_steps=40)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = module._losses(batch)[0]["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])


@pytest.mark.parametrize("preset", ["official", "user_guide", "sam2_full", "llm_last_n"])
def test_freeze_presets_compose_and_train_one_step(compose_cfg, preset):
    extra = ["freeze.llm_last_n=1"] if preset == "llm_last_n" else []
    cfg = compose_cfg(f"freeze={preset}", *extra, *FAST_DATA)
    module, datamodule = build(cfg)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    module._losses(batch)[0]["loss"].backward()
    assert any(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    assert instantiate(cfg.freeze).name == preset
