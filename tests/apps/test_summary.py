"""The block every run ends with: headline metrics, where the files are, and next commands
that run as printed (real paths, the training data settings, shell quoting)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from helpers.configs import FAST_DATA
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from sa2va.evaluation.evaluate import evaluate
from sa2va.evaluation.report import format_stat
from sa2va.inference.predict import predict
from sa2va.overrides import parse_overrides
from sa2va.summary import (
    eval_summary,
    export_summary,
    predict_summary,
    sweep_summary,
    train_summary,
)
from sa2va.training.export import export


def next_commands(text: str) -> dict[str, list[str]]:
    """``sa2va.<app>`` -> its arguments, for each command under ``next:``."""
    lines = text.split("\nnext:\n", 1)[1].splitlines()
    parsed = [shlex.split(line) for line in lines if not line.strip().startswith("#")]
    return {words[2]: words[3:] for words in parsed if words[:2] == ["python", "-m"]}


def table(text: str) -> dict[str, str]:
    """The metric table's rows: label -> value."""
    cells = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {label.strip(): value.strip() for label, value in cells}


def test_train_summary_points_at_the_best_checkpoint_with_the_data_settings(trained):  # noqa: F811
    record = json.loads((trained.run_dir / "metrics.json").read_text())
    record["overrides"] += ["data=oct", "data.root=/data/my scans", "model=sa2va_tiny"]
    text = train_summary(record)
    assert text.startswith("== train completed ==")
    assert table(text)["val/dice"] == f"{record['metrics']['val/dice']:.4f}"
    assert table(text)["steps"] == str(record["global_step"])
    assert f"best checkpoint: {record['best_checkpoint']}" in text
    assert f"run dir: {trained.run_dir}" in text
    commands = next_commands(text)
    assert "data.root=/data/my scans" in commands["sa2va.eval"]  # one shell word
    evaluate_args = parse_overrides(commands["sa2va.eval"])
    assert evaluate_args["ckpt_path"] == record["best_checkpoint"]
    assert evaluate_args["data"] == "oct"
    assert "model" not in evaluate_args and "trainer.max_steps" not in evaluate_args
    assert evaluate_args["data.synthetic.image_size"] == "64"  # FAST_DATA: the same splits
    assert parse_overrides(commands["sa2va.export"])["out"] == str(trained.run_dir / "export")
    assert commands["sa2va.compare"][0] == str(trained.run_dir.parent)


def test_eval_summary_shows_the_cis_and_offers_tuning(trained, compose_cfg, tmp_path):  # noqa: F811
    ckpt = shutil.copy(trained.ckpt, tmp_path / "model.ckpt")
    cfg = compose_cfg(f"ckpt_path={ckpt}", *FAST_DATA, "eval.n_boot=20", "eval.num_figures=0",
                      config_name="eval")  # fmt: skip
    record = evaluate(cfg)
    text = eval_summary(record)
    dice = record["results"]["default"]["per_image"]["dice"]
    ci = format_stat(dice, record["n_videos"])  # as results.md writes it
    assert table(text)["dice @ 0.5 (default, 95% CI)"] == ci
    assert f"results: {Path(cfg.paths.output_dir) / 'results.md'}" in text
    tune = next_commands(text)["sa2va.eval"]
    assert tune[-1] == "eval.tune_threshold=true"
    assert parse_overrides(tune)["ckpt_path"] == str(ckpt)
    assert parse_overrides(next_commands(text)["sa2va.predict"])["ckpt_path"] == str(ckpt)


def test_predict_and_export_summaries(trained, compose_cfg, tmp_path):  # noqa: F811
    image = tmp_path / "scan.png"
    Image.new("RGB", (64, 64), (90, 60, 30)).save(image)
    cfg = compose_cfg(f"ckpt_path={trained.ckpt}", f"input={image}", "predict.export=[coco]",
                      config_name="predict")  # fmt: skip
    record = predict(cfg)
    text = predict_summary(record)
    out = Path(record["output_dir"])
    assert table(text)["frames"] == "1" and f"masks: {out / 'masks'}" in text
    assert f"export coco.json: {out / 'coco.json'}" in text
    assert parse_overrides(next_commands(text)["sa2va.data.interchange"])["path"] == str(
        out / "coco.json"
    )

    manifest = export(trained.ckpt, tmp_path / "exported")
    text = export_summary(manifest, tmp_path / "exported")
    assert table(text)["parameters"] == f"{manifest['num_parameters']:,}"
    assert f"model card: {tmp_path / 'exported' / 'README.md'}" in text
    upload = f"hf upload '<user>/exported' {tmp_path / 'exported'} . --repo-type model"
    assert upload in text


def test_sweep_summary_lists_every_job_and_the_compare_command(tmp_path, capsys, compose_cfg):
    for name, record in {
        "0_loss=bce_dice": {"status": "completed", "metrics": {"val/dice": 0.61234}},
        "1_loss=bce_lang": {"status": "failed", "error": "boom"},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    text = sweep_summary(tmp_path)
    assert table(text) == {
        "metric": "value",
        "0_loss=bce_dice val/dice": "0.6123",
        "1_loss=bce_lang val/dice": "failed",
    }
    assert next_commands(text)["sa2va.compare"] == [str(tmp_path)]
    # the Hydra callback that prints it at the end of every multirun
    callback = instantiate(compose_cfg().hydra.callbacks.sweep_summary)
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert capsys.readouterr().out.strip() == text
