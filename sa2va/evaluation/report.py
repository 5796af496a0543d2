"""The evaluation report: results.md, per-image/per-video CSVs, the worst-case figures and
the W&B summary of one `sa2va.eval` run."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from sa2va.data.annotations import FrameRecord
from sa2va.data.datamodule import load_rgb
from sa2va.evaluation.statistics import MIN_UNITS
from sa2va.figures import Case, case_figure, contact_sheet, save_figure
from sa2va.utils import atomic_write_bytes

METRIC_LABELS = {
    "iou": "IoU",
    "dice": "Dice",
    "precision": "Precision",
    "recall": "Recall",
    "cldice": "clDice",
    "hd95": "HD95 (px)",
    "nsd": "NSD",
    "auprc": "AUPRC",
    "temporal_iou_diff": "mean abs(IoU(P_t,P_t+1) - IoU(G_t,G_t+1))",
    "iou_std": "std of per-frame IoU",
    "max_iou_change": "max abs(IoU_t+1 - IoU_t)",
    "fluctuation_ok": "share of videos with max change below the limit",
    "success_rate": "share of frames with a non-empty mask",
    "tci": "TCI: temporally inconsistent frames per video (Painchaud et al. 2022)",
}


def csv_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_tables(
    out_dir: Path,
    image_rows: Sequence[Mapping[str, Any]],
    video_rows: Sequence[Mapping[str, Any]],
    suffix: str = "",
) -> None:
    """``per_image<suffix>.csv`` and ``per_video<suffix>.csv``: what compare pairs arms on."""
    atomic_write_bytes(out_dir / f"per_image{suffix}.csv", csv_bytes(image_rows))
    atomic_write_bytes(out_dir / f"per_video{suffix}.csv", csv_bytes(video_rows))


def format_stat(s: Mapping[str, float], videos: int) -> str:
    """``mean ± std [CI]``, or why there is no CI (too few videos: see ``statistics``)."""
    if not s["n"]:
        return "n/a"
    text = f"{s['mean']:.4f} ± {s['std']:.4f}"
    if s["ci_low"] is None:
        return f"{text} (no CI: {videos} videos)"
    return f"{text} [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"


def results_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown tables of a finished evaluation (what goes into a paper's results section)."""
    lines = [
        f"# Evaluation of `{Path(summary['checkpoint']).name}` on the {summary['split']} split",
        "",
        f"- checkpoint: `{summary['checkpoint']}`",
        f"- images (frame x object): {summary['n_images']}, videos: {summary['n_videos']}",
        f"- video mode: {summary['video_mode']}, answer mode: {summary['mode']}",
        f"- git: {summary['git_sha']}",
    ]
    if summary.get("oracle_prompt"):
        lines.append(
            "- prompt: the ground-truth mask's bounding box (an oracle prompt: an upper "
            "reference, not a result a user without the ground truth could get)"
        )
    tuning = summary.get("threshold_tuning")
    if tuning:
        lines.append(
            f"- threshold tuned on {tuning['split']} ({tuning['n_images']} images, max mean "
            f"per-image {tuning['metric']}): {tuning['threshold']:g}"
        )
    ci = int(round(100 * summary["ci"]))
    for name, result in summary["results"].items():
        lines += [
            "",
            f"## Segmentation, threshold {result['threshold']:g} ({name})",
            "",
            f"| metric | per image: mean ± std [{ci}% CI] | per video: mean ± std [{ci}% CI] "
            "| pooled pixels |",
            "|---|---|---|---|",
        ]
        videos = result["n_videos"]
        for key, stats in result["per_image"].items():
            pooled = result.get("pooled", {}).get(key)
            pooled_text = f"{pooled:.4f}" if pooled is not None else ""
            label = f"{METRIC_LABELS[key]} (n={stats['n']})"
            per_video = format_stat(result["per_video"][key], videos)
            lines.append(
                f"| {label} | {format_stat(stats, videos)} | {per_video} | {pooled_text} |"
            )
        lines += [
            "",
            f"Temporal consistency per video ({result['success_rate']:.1%} of frames have a mask):",
            "",
            f"| metric | mean ± std [{ci}% CI] over videos |",
            "|---|---|",
        ]
        temporal = result["temporal"].items()
        lines += [f"| {METRIC_LABELS[k]} | {format_stat(s, videos)} |" for k, s in temporal]
    lines += [
        "",
        "Per image is the primary aggregation; per video averages each video first; pooled "
        "pixels sums TP/FP/FN over all images (weights frames by vessel area). Empty-mask "
        "policy and metric definitions: `sa2va/evaluation/metrics.py`.",
        "",
        "CIs are percentile bootstraps over videos, the units that are independent: the "
        "per-image mean's CI resamples whole videos with all their frames. Below "
        f"{MIN_UNITS} videos no CI is given (docs/evaluation.md).",
    ]
    return "\n".join(lines) + "\n"


def select_cases(rows: Sequence[Mapping[str, Any]], k: int) -> list[tuple[str, int]]:
    """(category, row index) of the k best, median and worst rows by Dice, without repeats.

    Frames with an empty ground truth are left out when any other frame exists: they score
    1 for an empty prediction and would crowd out the informative cases.
    """
    if k <= 0 or not rows:
        return []
    indices = [i for i, r in enumerate(rows) if r["tp"] + r["fn"] > 0] or list(range(len(rows)))
    indices.sort(key=lambda i: rows[i]["dice"])
    start = max((len(indices) - k) // 2, 0)
    picks = [
        ("best", indices[::-1][:k]),
        ("median", indices[start : start + k]),
        ("worst", indices[:k]),
    ]
    chosen, seen = [], set()
    for category, group in picks:
        for i in group:
            if i not in seen:
                chosen.append((category, i))
                seen.add(i)
    return chosen


def write_figures(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    probs: Mapping[tuple[str, int, str], np.ndarray],
    videos: Mapping[str, list[FrameRecord]],
    k: int,
    threshold: float,
) -> list[Path]:
    """A four-panel figure for each selected case (see :func:`select_cases`) + a contact sheet."""
    paths, cases = [], []
    for index, (category, i) in enumerate(select_cases(rows, k)):
        row = rows[i]
        key = (row["video_id"], row["frame_index"], row["object"])
        record = next(r for r in videos[row["video_id"]] if r.frame_index == row["frame_index"])
        prob = probs[key].astype(np.float32)
        case = Case(
            image=np.asarray(load_rgb(record.image_path)),
            prob=prob,
            gt=record.mask(row["object"], prob.shape),
            threshold=threshold,
            title=f"{category}: {row['video_id']} frame {row['frame_index']}, "
            f"Dice {row['dice']:.3f}",
        )
        name = f"{index:02d}_{category}_{row['video_id']}_{row['frame_index']:06d}.png"
        paths.append(save_figure(case_figure(case), out_dir / name))
        cases.append(case)
    if cases:
        paths.append(save_figure(contact_sheet(cases), out_dir / "contact_sheet.png"))
    return paths


def log_to_wandb(cfg: DictConfig, summary: Mapping[str, Any], figures: Sequence[Path]) -> None:
    """Log summary scalars and figures to W&B: a ``logger=wandb`` config, or an active run."""
    configs = [c for c in (cfg.get("logger") or {}).values() if c is not None]
    wandb_configs = [c for c in configs if "Wandb" in str(c.get("_target_", ""))]
    wandb = sys.modules.get("wandb")
    if wandb_configs:
        import wandb

        run, owned = instantiate(wandb_configs[0]).experiment, True
    elif wandb is not None and wandb.run is not None:
        run, owned = wandb.run, False
    else:
        return
    prefix = f"eval/{summary['split']}"
    data: dict[str, Any] = {}
    for name, result in summary["results"].items():
        for key, stats in result["per_image"].items():
            data[f"{prefix}/{name}/{key}"] = stats["mean"]
        data[f"{prefix}/{name}/threshold"] = result["threshold"]
    data |= {f"{prefix}/figures/{p.stem}": wandb.Image(str(p)) for p in figures}
    run.log(data)
    if owned:
        wandb.finish()
