"""Ablation sweeps: the experiment configs compose the intended jobs, launchers compose, and
real sweeps (subprocess, tiny model, W&B offline) go on past failed jobs, log one W&B run per
job in one group, and give sa2va.compare a full table."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import FAST_TRAIN
from helpers.wandb_runs import read_run
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from sa2va.evaluation.comparison import Comparison, compare_jobs
from sa2va.evaluation.runs import METRICS, load_jobs
from sa2va.utils import REPO_ROOT, safe_dirname


def sweep_jobs(params: dict) -> list[list[str]]:
    """Expand `hydra.sweeper.params` as Hydra's basic sweeper does (cartesian product)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def test_ablate_loss_sweeps_the_seed_001_weight_table(compose_cfg):
    sweep = compose_cfg("experiment=ablate_loss")
    assert sweep.hydra.mode.name == "MULTIRUN"
    jobs = sweep_jobs(sweep.hydra.sweeper.params)
    weights = set()
    for job in jobs:
        cfg = compose_cfg("experiment=ablate_loss", *job)
        weights.add(tuple(cfg.loss.weights[term] for term in ("bce", "dice", "lang")))
        assert cfg.model.name == "sa2va_tiny" and cfg.freeze.name == "full"
    assert weights == {(1.0, 0.0, 0.5), (0.0, 1.0, 0.5), (1.0, 1.0, 0.0), (1.0, 1.0, 0.5)}
    assert len(jobs) == 12 and {j[1] for j in jobs} == {"seed=0", "seed=1", "seed=2"}


def test_ablate_temporal_differs_only_in_the_module(compose_cfg):
    sweep = compose_cfg("experiment=ablate_temporal")
    jobs = sweep_jobs(sweep.hydra.sweeper.params)
    assert len(jobs) == 12
    arms = set()
    for job in jobs:
        cfg = compose_cfg("experiment=ablate_temporal", *job)
        arms.add(cfg.model.temporal)
        assert (cfg.data.clip_len, cfg.model.temporal_window) == (2, 2)
        assert cfg.data.synthetic.low_contrast_frames == 0.3
    assert arms == {"none", "adapter", "attention", "tra"}


def test_ablate_freeze_arms_override_the_tiny_models_freeze_preset(compose_cfg):
    sweep = compose_cfg("experiment=ablate_freeze")
    jobs = sweep_jobs(sweep.hydra.sweeper.params)
    assert len(jobs) == 4 * 2 * 3
    arms = {}
    for job in jobs:
        cfg = compose_cfg("experiment=ablate_freeze", *job)
        arm = job[0].split("=")[1]
        projector = OmegaConf.to_container(cfg.optim.lr_mult).get("text_hidden_fcs", 1.0)
        arms[(arm, cfg.model.lora.r)] = (cfg.freeze.name, projector)
        assert cfg.model.name == "sa2va_tiny"
    assert arms == {
        (arm, r): (freeze, 10.0 if arm == "sam2_full_projector" else 1.0)
        for arm, freeze in [
            ("sam2_frozen", "sam2_frozen"),
            ("sam2_decoder", "sam2_decoder"),
            ("sam2_full", "sam2_full"),
            ("sam2_full_projector", "sam2_full"),
        ]
        for r in (64, 128)
    }


def test_projector_arm_gives_the_projector_ten_times_the_learning_rate(compose_cfg):
    cfg = compose_cfg("+experiment/freeze_arm=sam2_full_projector", "model.lora.r=8")
    model = instantiate(cfg.model)
    instantiate(cfg.freeze).apply(model)
    groups = instantiate(cfg.optim).param_groups(model.named_parameters())
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    projector = {lr for name, lr in lr_of.items() if name.startswith("text_hidden_fcs.")}
    sam2 = {lr for name, lr in lr_of.items() if name.startswith("sam2.")}
    assert projector == {10 * cfg.optim.lr} and sam2 == {cfg.optim.lr}
    assert any("lora_" in name for name in lr_of)


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("local", "LocalLauncher"), ("slurm", "SlurmLauncher")],
)
def test_launcher_configs_compose_with_typed_keys(compose_cfg, launcher, target):
    cfg = compose_cfg(f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=30")
    settings = cfg.hydra.launcher
    assert settings._target_.endswith(target) and get_class(settings._target_)
    assert settings.timeout_min == 30 and settings.nodes == 1
    if launcher == "slurm":
        assert settings.gpus_per_node == 1 and settings.cpus_per_task == 8
        assert "partition" in settings
    with pytest.raises(Exception, match="gpus_per_node"):
        compose_cfg(f"hydra/launcher={launcher}", "hydra.launcher.gpus_per_node=two")


def test_safe_dirname_keeps_names_short_flat_and_distinct():
    assert safe_dirname("data.root=/a/b,seed=1") == "data.root=_a_b,seed=1"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(safe_dirname(long_a).encode()) == 200
    assert safe_dirname(long_a) != safe_dirname(long_b)


def run_sweep(tmp_path: Path, cache_dir: Path, *overrides: str) -> Path:
    """`python -m sa2va.train -m ...` on the tiny model for 2 steps, W&B offline, no network;
    returns the sweep dir."""
    env = os.environ | {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    env.pop("WANDB_API_KEY", None)
    fast = [o for o in FAST_TRAIN if not o.startswith("trainer.max_steps=")]
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "sa2va.train", "-m", *overrides, *fast]
    command += ["trainer.max_steps=2", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def check_wandb_runs(sweep: Path, names: set[str]) -> None:
    """One offline W&B run per completed job: one group, named by the swept overrides,
    flat ablation keys and the resolved config, mask overlay images, exit code 0."""
    runs = {}
    for summary_path in sweep.glob("*/metrics.json"):
        if json.loads(summary_path.read_text())["status"] == "completed":
            (run_dir,) = summary_path.parent.glob("wandb/offline-run-*")
            assert list(run_dir.glob("files/media/images/val/overlays_*.png")), run_dir
            runs[run_dir] = read_run(run_dir)
    assert {r["group"] for r in runs.values()} == {f"train-{sweep.name}"}
    assert {r["name"] for r in runs.values()} == names
    for run in runs.values():
        config = run["config"]
        assert run["exit_code"] == 0 and run["job_type"] == run["name"].split(",seed=")[0]
        lang = {"bce_dice": 0.0, "bce_dice_lang": 0.5}[config["loss.name"]]
        assert config["loss.weights.lang"] == lang
        assert (config["model.name"], config["freeze.name"], config["seed"]) == (
            "sa2va_tiny",
            "full",
            config["cfg"]["seed"],
        )
        assert f"loss={config['loss.name']}" in config["hydra"]["overrides"]


def check_table(sweep: Path, axes: list[str], completed: dict[tuple, int]) -> Comparison:
    """sa2va.compare's table: one row per arm, every metric cell filled for completed arms."""
    comparison = compare_jobs(load_jobs(sweep), str(sweep))
    assert comparison.axes == axes
    rows = {tuple(row[a] for a in axes): row for row in comparison.rows()}
    assert {key: row["completed"] for key, row in rows.items()} == completed
    for key, row in rows.items():
        for metric in METRICS:
            assert row[f"{metric} n"] == completed[key]
            if completed[key]:
                assert 0 <= row[f"{metric} mean"] <= 1
            assert math.isfinite(row[f"{metric} std"]) == (completed[key] > 1)
    return comparison


def test_a_sweep_goes_on_past_a_failed_job_and_reports_it(tmp_path, cache_dir):
    # freeze.llm_last_n=99 fails while the model is built (the tiny LLM has 2 layers)
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        "loss=bce_dice,bce_dice_lang",
        "freeze.llm_last_n=99,null",
        "logger=wandb",
    )
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name.split("_")[0] for p in runs] == ["0", "1", "2", "3"]  # a dir per job
    summaries = [json.loads((p / "metrics.json").read_text()) for p in runs]
    assert [s["status"] for s in summaries] == ["failed", "completed"] * 2
    for summary in summaries:
        assert summary["git_sha"] and summary["seed"] == 0
        assert any(o.startswith("loss=") for o in summary["overrides"])
        assert summary["ablation"]["loss.name"] in ("bce_dice", "bce_dice_lang")
        if summary["status"] == "failed":
            assert "llm_last_n" in summary["error"] and "metrics" not in summary
        else:
            assert summary["metrics"]["val/dice"] >= 0 and "best_score" in summary
    check_wandb_runs(
        sweep, {f"freeze.llm_last_n=null,loss={x}" for x in ("bce_dice", "bce_dice_lang")}
    )
    comparison = check_table(
        sweep,
        ["freeze.llm_last_n", "loss"],
        {
            (n, loss): int(n == "null")
            for n in ("99", "null")
            for loss in ("bce_dice", "bce_dice_lang")
        },
    )
    assert [g.count("failed") for g in comparison.groups] == [1, 0, 1, 0]
    assert comparison.markdown().count("llm_last_n") >= 2  # the failed jobs' errors


@pytest.mark.slow
def test_two_by_two_sweep_with_wandb_then_compare(tmp_path, cache_dir):
    sweep = run_sweep(
        tmp_path, cache_dir, "loss=bce_dice,bce_dice_lang", "seed=0,1", "logger=wandb"
    )
    losses = ("bce_dice", "bce_dice_lang")
    check_wandb_runs(sweep, {f"loss={loss},seed={seed}" for loss in losses for seed in (0, 1)})
    comparison = check_table(sweep, ["loss"], {(loss,): 2 for loss in losses})
    assert all(job.curves.get("val/dice") for job in comparison.jobs)
    assert all(job.curves.get("train/loss") for job in comparison.jobs)


def test_baselines_sweep_evaluates_each_job_and_compare_pairs_the_rows(tmp_path, cache_dir):
    """The one-command table: each job scores its best checkpoint with sa2va.eval on the test
    split of its own data, and compare tests the rows against Sa2VA on the same images."""
    sweep = run_sweep(
        tmp_path,
        cache_dir,
        "experiment=baselines",
        "model=sa2va_tiny,unet",
        "seed=0",
        "eval_after_fit=['eval.n_boot=20','eval.num_figures=0']",
    )
    for job in sorted(sweep.glob("*_model=*")):
        summary = json.loads((job / "metrics.json").read_text())
        assert summary["status"] == "completed" and summary["evaluation"] == str(job / "eval")
        evaluation = json.loads((job / "eval" / "metrics.json").read_text())
        assert evaluation["status"] == "completed" and evaluation["split"] == "test"
        assert evaluation["checkpoint"] == summary["best_checkpoint"]
        assert evaluation["data_check"]["differences"] == {}  # the job's own (tiny) data
    comparison = compare_jobs(load_jobs(sweep, "eval"), str(sweep), n_boot=50)
    assert comparison.axes == ["model"] and comparison.label(comparison.reference) == (
        "model=sa2va_tiny"
    )
    (test,) = comparison.tests.values()
    assert test.pairs == 3  # the one test video's 3 frames, paired
    assert "vs model=sa2va_tiny: Δ Dice" in comparison.markdown()
