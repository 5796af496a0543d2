"""Metrics over whole clips and videos: the temporal consistency index (TCI) per video, and
in-loop HD95 per frame and TCI for validation.

Validation batches hold clips (whole videos, in order); :class:`ClipMetrics` keeps each
clip's shape-attribute curves and, at the end, counts temporally inconsistent frames against
thresholds taken from all ground-truth clips seen, as Painchaud et al. 2022 do over their
reference set (definitions: :mod:`sa2va.evaluation.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from sa2va.evaluation.metrics import (
    SHAPE_ATTRIBUTES,
    hd95,
    shape_attributes,
    tci_thresholds,
    temporal_consistency_index,
)


class ClipMetrics(Metric):
    """Mean per-frame HD95 (px, NaN frames left out) and TCI (inconsistent frames, summed
    over clips and objects) from per-sample (T, M, H, W) mask logits and targets."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logit_threshold = float(np.log(threshold / (1 - threshold)))
        for name in ("hd95", "pred_attributes", "gt_attributes", "lengths"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logits: list[Tensor], targets: list[Tensor]) -> None:
        for clip_logits, clip_target in zip(logits, targets, strict=True):
            pred = (clip_logits.detach() > self.logit_threshold).cpu().numpy()
            gt = clip_target.bool().cpu().numpy()
            for m in range(pred.shape[1]):  # each object is one sequence
                p, g = list(pred[:, m]), list(gt[:, m])
                self.hd95.append(torch.tensor([hd95(a, b) for a, b in zip(p, g, strict=True)]))
                self.pred_attributes.append(torch.from_numpy(shape_attributes(p)))
                self.gt_attributes.append(torch.from_numpy(shape_attributes(g)))
                self.lengths.append(torch.tensor([len(p)]))

    def compute(self) -> dict[str, Tensor]:
        if not self.lengths:
            nan = torch.tensor(float("nan"))
            return {"hd95": nan, "tci": nan}
        lengths = dim_zero_cat(self.lengths).tolist()
        width, cuts = len(SHAPE_ATTRIBUTES), np.cumsum(lengths)[:-1]
        preds = dim_zero_cat(self.pred_attributes).cpu().numpy().reshape(-1, width)
        gts = dim_zero_cat(self.gt_attributes).cpu().numpy().reshape(-1, width)
        pred_clips, gt_clips = np.split(preds, cuts), np.split(gts, cuts)
        thresholds = tci_thresholds(gt_clips)
        tci = sum(temporal_consistency_index(a, thresholds) for a in pred_clips)
        return {"hd95": dim_zero_cat(self.hd95).nanmean(), "tci": torch.tensor(float(tci))}


def object_curves(
    probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], threshold: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per object of a video (frames of (M, H, W) probabilities and ground truth): the
    shape-attribute curves of the prediction and of the ground truth, for TCI."""
    return [
        (
            shape_attributes([p[j] > threshold for p in probs]),
            shape_attributes([g[j] for g in gts]),
        )
        for j in range(len(probs[0]))
    ]


def add_tci(video_rows: list[dict], curves: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Each per-video row's TCI, against thresholds from every ground-truth video of the set
    (Painchaud et al. take them from their reference set)."""
    thresholds = tci_thresholds([gt for _, gt in curves])
    for row, (pred, _) in zip(video_rows, curves, strict=True):
        row["tci"] = float(temporal_consistency_index(pred, thresholds))
