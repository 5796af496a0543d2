"""Finished runs as jobs: a run dir's (or W&B run's) overrides, config, metrics, curves and,
for evaluation runs, per-image scores; read by :mod:`.comparison`."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sa2va.overrides import parse_overrides

METRICS = ("val/dice", "val/iou", "val/precision", "val/recall")
# Per-image means an evaluation job reports (the method's comparison table plus clDice and HD95), as
# "<split>/<key>"; PAIRED is the per-image score the arms are tested on.
EVAL_KEYS = ("iou", "dice", "precision", "recall", "cldice", "hd95")
PAIRED = "dice"
ImageKey = tuple[str, int, str]  # (video_id, frame_index, object)
# over whole validation clips, unbounded: HD95 in pixels, TCI a count of inconsistent frames
CLIP_METRICS = ("val/hd95", "val/tci")
# the test split scored with the best-val checkpoint at the end of each run (sa2va.training.run)
TEST_METRICS = ("test/dice", "test/iou", "test/precision", "test/recall")
BEST = "val/dice (best)"  # ModelCheckpoint's best score (max val/dice over validations)
CURVES = ("val/dice", "train/loss")
STATUSES = ("completed", "failed", "missing")
# an evaluation's own overrides that say which checkpoint and data, not how it is evaluated
# (the bootstrap seed; data_from_checkpoint gives the data check_data would demand anyway)
NOT_ARM_KEYS = ("ckpt_path", "seed", "eval.data_from_checkpoint")


@dataclass
class Job:
    """One training run, from its run dir or from W&B."""

    source: str  # run dir or W&B run path
    status: str  # completed | failed | missing
    overrides: dict[str, str]
    choices: dict[str, str | None]  # config group -> option (hydra.runtime.choices)
    config: DictConfig
    metrics: dict[str, float]
    ablation: dict[str, Any] = field(default_factory=dict)  # flat keys from sa2va.training.loggers
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    error: str | None = None
    order: tuple = ()
    images: dict[ImageKey, float] = field(default_factory=dict)  # per-image PAIRED score
    evaluation: bool = False  # a sa2va.eval / nnU-Net run (per-image results), not training

    def setting(self, key: str) -> str:
        """The job's value for an override key, also when the job left it at its default."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        value = OmegaConf.select(self.config, key, throw_on_resolution_failure=False)
        return "-" if value is None else str(to_container(value))


def to_container(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def read_curves(path: Path | None) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSVLogger ``metrics.csv`` -> {metric: [(step, value), ...]} for CURVES."""
    if path is None:
        return {}
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in CURVES}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for metric in CURVES:
                if row.get(metric) not in (None, ""):
                    curves[metric].append((int(row["step"]), float(row[metric])))
    return {m: points for m, points in curves.items() if points}


def _load_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception as error:
        raise ValueError(f"{path}: unreadable ({error})") from error


def read_images(run_dir: Path) -> dict[ImageKey, float]:
    """An evaluation run's ``per_image.csv`` -> {(video, frame, object): PAIRED score}."""
    path = run_dir / "per_image.csv"
    if not path.is_file():
        raise ValueError(f"{path}: missing (metrics.json holds results, so the run wrote one)")
    with path.open(newline="") as f:
        try:
            return {
                (r["video_id"], int(r["frame_index"]), r["object"]): float(r[PAIRED])
                for r in csv.DictReader(f)
            }
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a sa2va.eval per-image table ({error!r})") from error


def eval_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``<split>/<key>``: the per-image means at the default threshold of an evaluation."""
    per_image = summary["results"]["default"]["per_image"]
    split = summary.get("split", "test")
    return {f"{split}/{k}": float(per_image[k]["mean"]) for k in EVAL_KEYS if k in per_image}


def training_run(checkpoint: str | None) -> Path | None:
    """The run dir of a Lightning checkpoint (``<run>/checkpoints/*.ckpt``), if it is there."""
    run = Path(checkpoint).parent.parent if checkpoint else None
    return run if run and (run / ".hydra" / "overrides.yaml").is_file() else None


def load_job(run_dir: Path) -> Job:
    """One run dir: ``.hydra/{config,hydra,overrides}.yaml``, and ``metrics.json`` once it ended.

    An evaluation run whose checkpoint's training run is at hand takes that run's arm
    (overrides, choices, config) plus its own overrides other than ``NOT_ARM_KEYS``, so the
    evaluations of one sweep group like its jobs.
    An evaluation's ``model`` always counts as an override (an arm key).
    """
    hydra_dir = run_dir / ".hydra"
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml").hydra
    overrides = parse_overrides(_load_yaml(hydra_dir / "overrides.yaml"))
    choices = dict(hydra_cfg.runtime.choices)
    config = _load_yaml(hydra_dir / "config.yaml")
    metrics_path = run_dir / "metrics.json"
    summary: dict[str, Any] = {"status": "missing"}
    if metrics_path.is_file():
        try:
            summary = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics_path}: not valid JSON ({error})") from error
    metrics = {
        k: float(v)
        for k, v in (summary.get("metrics") or {}).items()
        if k in (*METRICS, *CLIP_METRICS, *TEST_METRICS)
    }
    if summary.get("best_score") is not None:
        metrics[BEST] = float(summary["best_score"])
    images: dict[ImageKey, float] = {}
    if summary.get("results"):
        metrics |= eval_metrics(summary)
        images = read_images(run_dir)
        trained = training_run(summary.get("checkpoint"))
        if trained is not None:
            arm = load_job(trained)
            own = {k: v for k, v in overrides.items() if k not in NOT_ARM_KEYS}
            overrides, choices, config = arm.overrides | own, arm.choices | choices, arm.config
        # every evaluation names its model (a config choice, or the name nnunet.yaml gives),
        # so rows differ by model even where no sweep varied it
        model = choices.get("model") or config.get("model")
        if isinstance(model, str):
            overrides.setdefault("model", model)
    csv_files = sorted(p for p in run_dir.rglob("metrics.csv") if "wandb" not in p.parts)
    return Job(
        source=str(run_dir),
        status=summary["status"] if summary["status"] in STATUSES else "missing",
        overrides=overrides,
        choices=choices,
        config=config,
        metrics=metrics,
        ablation=summary.get("ablation") or {},
        curves=read_curves(csv_files[0] if csv_files else None),
        error=summary.get("error"),
        order=(str(run_dir.parent), int(hydra_cfg.job.get("num") or 0), str(run_dir)),
        images=images,
        evaluation=bool(summary.get("results")),
    )


def load_jobs(root: str | Path, task: str | Sequence[str] = "train") -> list[Job]:
    """Every run dir of ``task`` (one task_name or several) at or below ``root`` (a run, a
    sweep, or a whole outputs/)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    tasks = {task} if isinstance(task, str) else set(task)
    runs = [p.parent.parent for p in root.rglob(".hydra/config.yaml")]
    runs = [r for r in runs if _load_yaml(r / ".hydra" / "config.yaml").get("task_name") in tasks]
    return sorted((load_job(r) for r in runs), key=lambda j: j.order)
