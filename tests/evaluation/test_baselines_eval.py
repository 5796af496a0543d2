"""Every row trains through ``train()``, then ``sa2va.eval`` and ``sa2va.predict`` run on its
checkpoint with the same metric definitions as on a Sa2VA checkpoint, and it exports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.baselines import TINY_ROWS
from helpers.configs import FAST_DATA, FAST_TRAIN
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from hydra.utils import instantiate
from omegaconf import open_dict

from sa2va.evaluation.evaluate import evaluate
from sa2va.inference.predict import predict
from sa2va.model.trained import MLLM_DIR, load_exported, load_trained
from sa2va.training.export import export
from sa2va.training.run import train


def key_tree(value: Any) -> Any:
    """The nested keys of a result (what must be identical between rows), not its numbers."""
    if isinstance(value, Mapping):
        return {k: key_tree(v) for k, v in value.items()}
    return None


def run_in(cfg, out_dir: Path):
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def eval_row(compose_cfg, ckpt: Path, out_dir: Path) -> dict:
    cfg = compose_cfg(
        f"ckpt_path={ckpt}", *FAST_DATA, "eval.n_boot=20", "eval.num_figures=0", config_name="eval"
    )
    evaluate(run_in(cfg, out_dir))
    return json.loads((out_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sa2va_result(trained, tmp_path_factory):  # noqa: F811
    """Sa2VA's evaluation, the reference every row's metric keys are compared with."""
    return {"ckpt": trained.ckpt, "out": tmp_path_factory.mktemp("sa2va_eval")}


@pytest.mark.parametrize("row", sorted(TINY_ROWS))
def test_row_trains_evaluates_predicts_and_exports_like_sa2va(
    row, compose_cfg, sa2va_result, tmp_path
):
    trained_cfg = compose_cfg(f"model={row}", *TINY_ROWS[row], *FAST_TRAIN)
    summary = train(run_in(trained_cfg, tmp_path / "train"))
    assert summary["status"] == "completed" and summary["ablation"]["model.name"] == row
    ckpt = Path(summary["best_checkpoint"])

    written = eval_row(compose_cfg, ckpt, tmp_path / "eval")
    assert written["status"] == "completed" and written["data_check"]["differences"] == {}
    assert written["model_class"].endswith(type(instantiate(trained_cfg.model)).__name__)
    assert written["oracle_prompt"] is (row == "medsam_sam2")
    oracle_line = "oracle prompt" in (tmp_path / "eval" / "results.md").read_text()
    assert oracle_line is written["oracle_prompt"]
    if not (sa2va_result["out"] / "metrics.json").exists():
        eval_row(compose_cfg, sa2va_result["ckpt"], sa2va_result["out"])
    reference = json.loads((sa2va_result["out"] / "metrics.json").read_text())
    assert key_tree(written["results"]) == key_tree(reference["results"])
    assert written["n_images"] == reference["n_images"]

    manifest = export(ckpt, tmp_path / "export")  # the project format, from config alone
    assert manifest["lora"] == "none" and not (tmp_path / "export" / MLLM_DIR).exists()
    exported, (from_ckpt, _) = load_exported(tmp_path / "export"), load_trained(ckpt)
    assert exported.state_dict().keys() == from_ckpt.state_dict().keys()
    assert all(torch.equal(v, from_ckpt.state_dict()[k]) for k, v in exported.state_dict().items())

    records = instantiate(compose_cfg(*FAST_DATA).data).records("test")[:2]
    frames = tmp_path / "frames"
    frames.mkdir()
    for record in records:
        shutil.copy(record.image_path, frames / record.image_path.name)
    cfg = compose_cfg(
        f"ckpt_path={ckpt}", f"input={frames}", "predict.threshold=0.5", config_name="predict"
    )
    predicted = predict(run_in(cfg, tmp_path / "predict"))
    assert predicted["n_frames"] == len(records)
    masks = sorted(p.name for p in (Path(predicted["output_dir"]) / "masks").iterdir())
    assert masks == sorted(f"{r.image_path.stem}_p0.png" for r in records)
