"""Evaluation of a trained model on a split: per-frame predictions, per-video and pooled
metrics, the report and its figures."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from sa2va.data.annotations import FrameRecord
from sa2va.data.datamodule import OCTDataModule, conversation, load_rgb
from sa2va.evaluation.metrics import (
    METRIC_KEYS,
    aggregate,
    compute_image_metrics,
    temporal_consistency,
    tune_threshold,
)
from sa2va.evaluation.report import log_to_wandb, results_markdown, write_figures, write_tables
from sa2va.evaluation.statistics import video_cis
from sa2va.evaluation.video_metrics import add_tci, object_curves
from sa2va.inference.predict import (
    load_model,
    load_tuned_threshold,
    resolve_device,
    save_tuned_threshold,
)
from sa2va.inference.video import predict_frames
from sa2va.model.protocol import SegmentationModel
from sa2va.overrides import hydra_overrides
from sa2va.utils import (
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_record,
    git_sha,
    run_record,
    to_plain,
)

log = logging.getLogger(__name__)

TEMPORAL_KEYS = (
    "temporal_iou_diff",
    "iou_std",
    "max_iou_change",
    "fluctuation_ok",
    "success_rate",
    "tci",
)
# Data settings that decide which videos land in which split, and what the prompts say.
SPLIT_KEYS = (
    "root",
    "annotations_file",
    "synthetic",
    "split_ratios",
    "split_seed",
    "video_pattern",
    "category_names",
    "prompt_template",
    "answer_template",
)


# --------------------------------------------------------------------- data checks


def data_differences(trained: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Split-deciding data settings that differ between training and evaluation."""

    def norm(key: str, value: Any) -> str:
        value = to_plain(value)
        if key == "root" and value is not None:
            return str(Path(value).expanduser().resolve())
        return json.dumps(value, sort_keys=True, default=str)

    return {
        key: {"trained": to_plain(trained.get(key)), "eval": to_plain(current.get(key))}
        for key in SPLIT_KEYS
        if norm(key, trained.get(key)) != norm(key, current.get(key))
    }


def check_data(
    ckpt_path: str, trained: Mapping[str, Any] | None, current: Mapping[str, Any], strict: bool
) -> dict[str, Any]:
    """Refuse (``strict``) to evaluate on data split differently from the training run's."""
    if trained is None:
        log.warning("%s holds no data settings: cannot check the split against training", ckpt_path)
        return {"checked": False}
    diffs = data_differences(trained, current)
    if diffs and strict:
        lines = "; ".join(
            f"{k}: trained={v['trained']!r} eval={v['eval']!r}" for k, v in diffs.items()
        )
        raise ValueError(
            f"{ckpt_path}: the eval data settings differ from the training run's ({lines}), so "
            "its splits would not be the training splits. Pass the training data settings "
            "(e.g. data=oct data.root=...) or eval.check_data=false to evaluate on other data."
        )
    if diffs:
        log.warning("eval data differs from training data: %s", diffs)
    return {"checked": True, "differences": diffs}


# ---------------------------------------------------------------------- prediction


@dataclass
class VideoResult:
    """Probabilities and ground truth of one video, per frame (M objects, H, W)."""

    video_id: str
    records: list[FrameRecord]
    objects: list[str]
    probs: list[np.ndarray]
    gts: list[np.ndarray]
    missing: int  # (frame, object) pairs the model gave no mask for (generate mode)


def predict_videos(
    model: SegmentationModel, dm: OCTDataModule, split: str, ecfg: DictConfig
) -> Iterator[VideoResult]:
    """Run the model over every whole video of ``split`` (masks at each image's own size).

    A model prompted from the ground truth (``oracle_prompt``: MedSAM's box) is given it.
    """
    videos = dm.videos(split)
    if not videos:
        raise ValueError(f"split {split!r} has no videos")
    total = sum(len(v) for v in videos.values())
    with tqdm(total=total, desc=f"eval {split}", unit="frame") as bar:
        for video_id, records in videos.items():
            objects = list(dict.fromkeys(n for r in records for n in r.object_names))
            objects = objects or list(dm.category_names.values())
            prompts, answers = conversation(dm.prompt_template, dm.answer_template, objects)
            frames = [load_rgb(r.image_path) for r in records]
            gts = [
                np.stack([r.mask(n, (f.height, f.width)) for n in objects])
                for r, f in zip(records, frames, strict=True)
            ]
            # a model prompted from the ground truth (MedSAM's box) is given it
            prompt_masks = [torch.from_numpy(g) for g in gts] if model.oracle_prompt else None
            predicted = predict_frames(model, frames, prompts, answers, ecfg, prompt_masks)
            probs, missing = [], 0
            for frame, pred in zip(frames, predicted, strict=True):
                hw = (frame.height, frame.width)
                per_object = []
                for j in range(len(objects)):
                    if j in pred.owners:
                        per_object.append(pred.probs[pred.owners.index(j)])
                    else:
                        per_object.append(np.zeros(hw, np.float32))
                        missing += 1
                probs.append(np.stack(per_object))
            bar.update(len(records))
            yield VideoResult(video_id, records, objects, probs, gts, missing)


def tune_on_val(model: SegmentationModel, dm: OCTDataModule, ecfg: DictConfig) -> dict[str, Any]:
    """Threshold maximising the mean per-image ``eval.tune_metric`` on the validation split."""
    probs, gts = [], []
    for video in predict_videos(model, dm, "val", ecfg):
        for p, g in zip(video.probs, video.gts, strict=True):
            probs.extend(p)
            gts.extend(g)
    grid = np.linspace(ecfg.threshold_grid.start, ecfg.threshold_grid.stop, ecfg.threshold_grid.num)
    best, table = tune_threshold(probs, gts, grid, metric=ecfg.tune_metric)
    return {
        "threshold": best,
        "metric": ecfg.tune_metric,
        "split": "val",
        "n_images": len(probs),
        "video_mode": ecfg.video_mode,
        "mode": ecfg.mode,
        "table": table,
    }


# ------------------------------------------------------------------------- scoring


def _nanmean(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else float("nan")


def score_video(
    video: VideoResult, threshold: float, tolerance: float, fluctuation_limit: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-image rows (frame x object) and per-video rows (one per object) of one video."""
    image_rows, video_rows = [], []
    for j, name in enumerate(video.objects):
        rows = [
            {
                "video_id": video.video_id,
                "frame_index": record.frame_index,
                "image": str(record.image_path),
                "object": name,
                **compute_image_metrics(probs[j], gts[j], threshold, tolerance),
            }
            for record, probs, gts in zip(video.records, video.probs, video.gts, strict=True)
        ]
        temporal = temporal_consistency(
            [p[j] > threshold for p in video.probs], [g[j] for g in video.gts], fluctuation_limit
        )
        means = {k: _nanmean([r[k] for r in rows]) for k in METRIC_KEYS}
        video_rows.append({"video_id": video.video_id, "object": name, **means, **temporal})
        image_rows.extend(rows)
    return image_rows, video_rows


def summarise(
    image_rows: list[dict], video_rows: list[dict], threshold: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """Per image (primary), per video, pooled (secondary), and temporal consistency."""
    summary = {"threshold": threshold, **aggregate(image_rows, n_boot=n_boot, seed=seed)}
    # One row per video (and object): aggregate()'s row-level summary is the per-video one.
    temporal = aggregate(video_rows, metrics=TEMPORAL_KEYS, n_boot=n_boot, seed=seed)
    summary["temporal"] = temporal["per_image"]
    summary["success_rate"] = float(np.mean([r["tp"] + r["fp"] > 0 for r in image_rows]))
    video_cis(summary, image_rows, n_boot, seed)
    return summary


@dataclass
class Scores:
    """The rows of every video scored at one threshold, and their summary: one loop for
    ``sa2va.eval`` (a default and a tuned threshold) and the nnU-Net row."""

    threshold: float
    image_rows: list[dict[str, Any]] = field(default_factory=list)
    video_rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[Any] = field(default_factory=list)  # shape attributes per video row (TCI)

    def add(self, video: VideoResult, ecfg: DictConfig) -> None:
        rows, vrows = score_video(video, self.threshold, ecfg.tolerance, ecfg.fluctuation_limit)
        self.image_rows.extend(rows)
        self.video_rows.extend(vrows)
        self.curves.extend(object_curves(video.probs, video.gts, self.threshold))

    def summary(self, n_boot: int, seed: int) -> dict[str, Any]:
        add_tci(self.video_rows, self.curves)
        return summarise(self.image_rows, self.video_rows, self.threshold, n_boot, seed)


# ------------------------------------------------------------------------ pipeline


def eval_data(cfg: DictConfig, trained: Mapping[str, Any] | None) -> OCTDataModule:
    """The data module of ``cfg.data``, or (``eval.data_from_checkpoint``) the one the
    checkpoint was trained with, rebuilt from the settings it recorded."""
    if not cfg.eval.data_from_checkpoint:
        return instantiate(cfg.data)
    if trained is None:
        raise ValueError(
            f"{cfg.ckpt_path}: holds no data settings (an export or a release, not a Lightning "
            "checkpoint), so eval.data_from_checkpoint=true cannot rebuild its data: pass the "
            "data settings instead (e.g. data=oct data.root=...)"
        )
    return OCTDataModule(**trained)


def record_eval(ckpt_path: str | Path, out_dir: Path) -> None:
    """``<ckpt>.eval.json``: where the checkpoint's latest evaluation is (the export's model
    card reads its metrics from there). A read-only checkpoint folder only loses the link."""
    try:
        atomic_write_json(
            checkpoint_record(ckpt_path, "eval"), {"metrics": str(out_dir / "metrics.json")}
        )
    except OSError as error:
        log.warning(
            "%s: cannot record this evaluation beside the checkpoint (%s)", ckpt_path, error
        )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.eval.split``; always leaves ``metrics.json`` behind."""
    ecfg = cfg.eval
    out_dir = Path(cfg.paths.output_dir)
    summary: dict[str, Any] = {
        "status": "running",
        "checkpoint": str(cfg.ckpt_path),
        "split": ecfg.split,
        "video_mode": ecfg.video_mode,
        "mode": ecfg.mode,
        "ci": ecfg.ci,
        "overrides": hydra_overrides(),
        "git_sha": git_sha(),
        "output_dir": str(out_dir),
    }
    with run_record(out_dir / "metrics.json", summary):
        model, meta = load_model(cfg.ckpt_path, resolve_device(ecfg.device))
        summary["model_class"] = meta.get("model_class")
        summary["oracle_prompt"] = model.oracle_prompt  # prompted from the ground truth
        dm = eval_data(cfg, meta.get("datamodule"))
        dm.processor = model.processor
        summary["data_check"] = check_data(
            str(cfg.ckpt_path), meta.get("datamodule"), dm.hparams, ecfg.check_data
        )
        points = {"default": float(ecfg.threshold)}
        if ecfg.tune_threshold:
            if ecfg.split == "val":
                log.warning("tuning and reporting on val: the tuned result is optimistic")
            tuning = tune_on_val(model, dm, ecfg)
            save_tuned_threshold(cfg.ckpt_path, tuning)
        else:
            tuning = load_tuned_threshold(cfg.ckpt_path)
            if tuning and (tuning.get("video_mode"), tuning.get("mode")) != (
                ecfg.video_mode,
                ecfg.mode,
            ):
                log.warning(
                    "the saved threshold was tuned with video_mode=%s mode=%s",
                    tuning.get("video_mode"),
                    tuning.get("mode"),
                )
        if tuning is not None:
            points["tuned"] = float(tuning["threshold"])
            summary["threshold_tuning"] = {k: v for k, v in tuning.items() if k != "table"}

        scores = {name: Scores(threshold) for name, threshold in points.items()}
        kept_probs: dict[tuple[str, int, str], np.ndarray] = {}  # for the figures
        missing = 0
        for video in predict_videos(model, dm, ecfg.split, ecfg):
            missing += video.missing
            for score in scores.values():
                score.add(video, ecfg)
            for record, probs in zip(video.records, video.probs, strict=True):
                for name, prob in zip(video.objects, probs, strict=True):
                    kept_probs[(video.video_id, record.frame_index, name)] = prob.astype(np.float16)
        summary["missing_masks"] = missing
        summary["results"] = {
            name: score.summary(ecfg.n_boot, cfg.seed) for name, score in scores.items()
        }
        summary["n_images"] = summary["results"]["default"]["n_images"]
        summary["n_videos"] = summary["results"]["default"]["n_videos"]
        for name, score in scores.items():
            suffix = "" if name == "default" else f"_{name}"
            write_tables(out_dir, score.image_rows, score.video_rows, suffix)
        figures = write_figures(
            out_dir / "figures",
            scores["default"].image_rows,
            kept_probs,
            dm.videos(ecfg.split),
            ecfg.num_figures,
            points["default"],
        )
        summary["figures"] = [str(p) for p in figures]
        summary["status"] = "completed"
        atomic_write_bytes(out_dir / "results.md", results_markdown(summary).encode())
        record_eval(cfg.ckpt_path, out_dir)
    log_to_wandb(cfg, summary, figures)
    return summary
