"""Training: build the model, data and trainer from a composed config, fit, record the run."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from sa2va.overrides import hydra_overrides, quoted
from sa2va.training.checkpointing import Preempted, preempted_checkpoint
from sa2va.training.config import validate_config
from sa2va.training.loggers import ablation_keys, log_run_config
from sa2va.utils import atomic_write_json, git_sha, run_record, to_float_dict

log = logging.getLogger(__name__)

# in a W&B run's files: what the run holds, readable without W&B (see _finish_wandb)
WANDB_RUN_FILE = "sa2va_run.json"


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Model, losses, freezing, optimiser -> module; a data module using the model's processor."""
    from sa2va.model.checkpoints import check_pretrained_files

    check_pretrained_files(cfg)  # a real-size model needs its local pretrained files
    model = instantiate(cfg.model)
    module = instantiate(
        cfg.module,
        model=model,
        loss=instantiate(cfg.loss),
        freeze=instantiate(cfg.freeze),
        optim=instantiate(cfg.optim),
    )
    datamodule = instantiate(cfg.data)
    datamodule.processor = model.processor
    return module, datamodule


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(output_dir)
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) one configuration; always leaves `metrics.json` behind."""
    output_dir = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {
        "status": "running",
        "overrides": hydra_overrides(),
        "seed": cfg.seed,
        "ablation": ablation_keys(cfg),
        "git_sha": git_sha(),
        "output_dir": str(output_dir),
    }
    # rank 0's summary: under DDP every rank gets here, and the train/* values it holds are
    # its own batches' (the last writer would win at random)
    write = rank_zero_only.rank == 0
    stops = {Preempted: "preempted"}
    with run_record(output_dir / "metrics.json", summary, write, _finish_wandb, stops):
        validate_config(cfg)
        L.seed_everything(cfg.seed, workers=True)
        module, datamodule = build(cfg)
        trainer = build_trainer(cfg, output_dir)
        log_run_config(trainer.loggers, cfg)
        # a preempted run restarted in its run dir resumes by itself
        preempted = preempted_checkpoint(trainer.callbacks)
        ckpt_path = cfg.get("ckpt_path") or preempted
        if ckpt_path is not None:
            log.info("resuming from %s", ckpt_path)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        summary["metrics"] = to_float_dict(trainer.callback_metrics)
        summary["metrics"].update(test_metrics(trainer, module, datamodule))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_path:
            summary["best_checkpoint"] = checkpoint.best_model_path
            summary["best_score"] = float(checkpoint.best_model_score)
        summary["skipped_steps"] = module.skipped_steps
        summary["global_step"] = trainer.global_step
        if cfg.eval_after_fit is not None and write:
            summary["evaluation"] = str(output_dir / "eval")
            evaluate_checkpoint(
                summary.get("best_checkpoint"), output_dir / "eval", cfg.eval_after_fit
            )
        summary["status"] = "completed"
        if preempted is not None:  # done: a later start in this run dir must not go back
            preempted.unlink(missing_ok=True)
    log.info("metrics: %s", summary["metrics"])
    return summary


def test_metrics(
    trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
) -> dict[str, float]:
    """``test/*``: the test split scored like validation (per-image means and pooled Dice/IoU
    of `sa2va.evaluation.metrics`, the definitions `sa2va.eval` uses) with the best-val
    checkpoint's weights (the last weights when no checkpoint was kept).

    Run as a validation pass on the test loader, with the loggers detached so that the val
    curves stay validation-only.
    """
    best = trainer.checkpoint_callback
    ckpt = best.best_model_path if best is not None and best.best_model_path else None
    loggers, trainer.loggers = trainer.loggers, []
    try:
        (scores,) = trainer.validate(
            module, dataloaders=datamodule.test_dataloader(), ckpt_path=ckpt, verbose=False
        )
    finally:
        trainer.loggers = loggers
    return {f"test/{k.removeprefix('val/')}": float(v) for k, v in scores.items()}


def evaluate_checkpoint(checkpoint: str | None, out_dir: Path, overrides: Sequence[str]) -> None:
    """``sa2va.eval`` on the best-val checkpoint into ``out_dir`` (``eval_after_fit``).

    Its own process and run dir, as if typed after the run: ``sa2va.compare --task eval``
    reads it like any evaluation and pairs the arms of a sweep on the same test images. The
    data settings are the checkpoint's, whatever overrides the sweep's jobs were given.
    """
    if checkpoint is None:
        raise RuntimeError(
            "eval_after_fit: the run kept no best checkpoint to evaluate "
            "(callbacks.model_checkpoint monitors val/dice)"
        )
    command = [
        sys.executable,
        "-m",
        "sa2va.eval",
        f"ckpt_path={quoted(checkpoint)}",
        f"hydra.run.dir={quoted(out_dir)}",
        "eval.data_from_checkpoint=true",
        *overrides,
    ]
    log.info("evaluating %s into %s", checkpoint, out_dir)
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RuntimeError(
            f"{out_dir}: sa2va.eval on {checkpoint} exited with {code} (its metrics.json and "
            "log say why); the checkpoint is kept"
        )


def _finish_wandb(summary: dict[str, Any]) -> None:
    """Lightning's WandbLogger never finishes its run; a sweep needs one run per job.

    A failed job's run is marked failed (exit code 1) with its error in the summary. What the
    run holds (name, group, job type, config, exit code) is also written as JSON into its
    files (``WANDB_RUN_FILE``): the SDK cannot read an offline run's binary log back.
    """
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        run = wandb.run
        exit_code = 0 if summary["status"] == "completed" else 1
        run.summary.update({"status": summary["status"], "error": summary.get("error")})
        record = {
            "id": run.id,
            "name": run.name,
            "group": run.group,
            "job_type": run.job_type,
            "config": run.config.as_dict(),
            "exit_code": exit_code,
        }
        atomic_write_json(Path(run.dir) / WANDB_RUN_FILE, record)
        wandb.finish(exit_code=exit_code)
