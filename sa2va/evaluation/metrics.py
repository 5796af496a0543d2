"""Segmentation metrics for OCT vessel masks: per image, aggregated, temporal, and in-loop.

Conventions, fixed here once for training validation, eval and reports alike:

* Binarisation: a pixel is vessel when ``prob > threshold`` (strict, as the user specifies).
  Per-image functions take binary masks (bool, or 0/1 values) of shape (H, W).
* Empty-mask policy for the bounded scores (IoU, Dice, precision, recall, clDice, NSD):
  every ratio is ``num / den``; ``0/0`` resolves to **1 when prediction and ground truth
  are both empty** (a correct "no vessel" answer: union 0 -> IoU 1) and to **0
  otherwise**. So false positives on a vessel-free frame score 0 on every overlap metric
  (recall included), and an empty prediction on a vessel frame scores 0 (precision
  included). MONAI (NaN for empty GT) and torchmetrics (0 for both empty) differ.
* HD95 (pixels) is only defined between two non-empty boundaries: it is NaN when either
  mask is empty (those frames are already scored by the overlap metrics and NSD).
  AUPRC is NaN when the ground truth is empty (no positives, no curve).
  :func:`aggregate` leaves NaN values out of means and reports how many were valid.
* Aggregation: the per-image mean is primary, the per-video mean (mean of video means)
  second, pooled pixels (sum TP/FP/FN over all images) a labelled secondary figure: it
  weights frames by vessel area and is usually higher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)
Mask = np.ndarray | Tensor

METRIC_KEYS = ("iou", "dice", "precision", "recall", "cldice", "hd95", "nsd", "auprc")
COUNT_KEYS = ("tp", "fp", "fn", "tn")
OVERLAP_KEYS = ("iou", "dice", "precision", "recall")


# --------------------------------------------------------------------------- counts


def confusion_counts(pred: ArrayT, gt: ArrayT) -> tuple[ArrayT, ArrayT, ArrayT, ArrayT]:
    """TP, FP, FN, TN summed over the last two axes; numpy or torch, any leading batch dims.

    Works on-device for tensors (no host copy), so the in-loop metric can use it batched.
    """
    pred, gt = (
        x.astype(bool, copy=False) if isinstance(x, np.ndarray) else x.bool() for x in (pred, gt)
    )
    axes = (-2, -1)
    return (
        (pred & gt).sum(axes),
        (pred & ~gt).sum(axes),
        (~pred & gt).sum(axes),
        (~pred & ~gt).sum(axes),
    )


def _ratio(num: ArrayT, den: ArrayT, both_empty: ArrayT) -> ArrayT:
    # Hand-written so one expression serves numpy and torch: when den == 0 then num == 0 as
    # well (num <= den for every score here), so num / max(den, 1) is 0 and the empty
    # policy is added on top: 1 when both masks are empty, else the ratio (0 if undefined).
    return num / den.clip(min=1) + both_empty


def scores_from_counts(tp: ArrayT, fp: ArrayT, fn: ArrayT) -> dict[str, ArrayT]:
    """IoU, Dice, precision and recall from counts, with the module's empty-mask policy.

    The single place the policy lives: per-image functions, pooled aggregation, threshold
    tuning and :class:`SegmentationMetrics` all call it (elementwise; numpy, ints or torch).
    """
    if isinstance(tp, Tensor):
        tp, fp, fn = (x.to(torch.float32) for x in (tp, fp, fn))
    else:  # numpy arrays/scalars or Python ints
        tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    both_empty = ((tp + fp + fn) == 0) * 1.0
    return {
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


def _as_bool(mask: Mask) -> np.ndarray:
    """(H, W) bool numpy array; refuses non-binary input so probabilities never pass silently."""
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1); threshold probabilities first")
        mask = mask.astype(bool)
    return mask


def _overlap(pred: Mask, gt: Mask, key: str) -> float:
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs gt {g.shape}")
    tp, fp, fn, _ = confusion_counts(p, g)
    return float(scores_from_counts(tp, fp, fn)[key])


def iou(pred: Mask, gt: Mask) -> float:
    """|P∩G| / |P∪G|; 1 when both empty."""
    return _overlap(pred, gt, "iou")


def dice(pred: Mask, gt: Mask) -> float:
    """2|P∩G| / (|P|+|G|) (= F1 of the vessel class only); 1 when both empty."""
    return _overlap(pred, gt, "dice")


def precision(pred: Mask, gt: Mask) -> float:
    """TP / (TP+FP); 1 when both empty, 0 when only the prediction is empty."""
    return _overlap(pred, gt, "precision")


def recall(pred: Mask, gt: Mask) -> float:
    """TP / (TP+FN); 1 when both empty, 0 for any prediction on a vessel-free frame."""
    return _overlap(pred, gt, "recall")


# ---------------------------------------------------------------- topology / boundary


def cldice(pred: Mask, gt: Mask) -> float:
    """Centerline Dice (Shit et al. 2021): harmonic mean of topology precision and sensitivity.

    tprec = |S(P)∩G| / |S(P)|, tsens = |S(G)∩P| / |S(G)| with S = skimage skeletonize.
    Rewards connected centerlines over pixel overlap, but is noisy for 1-2 px vessels:
    read it next to a boundary metric (HD95 / NSD).
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    sp, sg = skeletonize(p), skeletonize(g)
    tprec = (sp & g).sum() / max(sp.sum(), 1)
    tsens = (sg & p).sum() / max(sg.sum(), 1)
    if tprec + tsens == 0:
        return 0.0
    return float(2 * tprec * tsens / (tprec + tsens))


def _boundary_distances(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (px) from each boundary pixel of P to G's boundary, and of G to P's.

    Boundary = mask XOR its 4-connected erosion (pixels on the image edge count as
    boundary), the same convention as MONAI's ``get_mask_edges``; exact Euclidean EDT.
    """
    edge_p = p ^ ndimage.binary_erosion(p)
    edge_g = g ^ ndimage.binary_erosion(g)
    # distance_transform_edt measures the distance to the nearest zero, hence the negation.
    return ndimage.distance_transform_edt(~edge_g)[edge_p], ndimage.distance_transform_edt(~edge_p)[
        edge_g
    ]


def hd95(pred: Mask, gt: Mask) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, in pixels.

    max(q95(d(∂P→∂G)), q95(d(∂G→∂P))), as MONAI ``compute_hausdorff_distance(percentile=95)``.
    NaN when either mask is empty (undefined; :func:`aggregate` counts valid values).
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if not p.any() or not g.any():
        return float("nan")
    d_pg, d_gp = _boundary_distances(p, g)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def surface_dice(pred: Mask, gt: Mask, tolerance: float = 2.0) -> float:
    """Normalised surface Dice (Nikolov et al. 2021): share of boundary pixels within tolerance.

    (|d(∂P→∂G) <= tau| + |d(∂G→∂P) <= tau|) / (|∂P| + |∂G|). Forgives the 1-px shifts
    that zero the overlap of thin vessels. Empty policy: 1 if both empty, 0 if one is.
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    d_pg, d_gp = _boundary_distances(p, g)
    return float(((d_pg <= tolerance).sum() + (d_gp <= tolerance).sum()) / (d_pg.size + d_gp.size))


def auprc(prob: Mask, gt: Mask) -> float:
    """Average precision over all thresholds, AP = sum_n (R_n - R_{n-1}) P_n (no interpolation).

    Threshold-free, so it separates ranking quality from the choice of threshold. Same
    definition as torchmetrics ``BinaryAveragePrecision`` / sklearn (tied scores form one
    operating point); hand-written in numpy to avoid a copy to torch per image.
    NaN when the ground truth is empty.
    """
    s = (prob.detach().cpu().numpy() if isinstance(prob, Tensor) else np.asarray(prob)).ravel()
    y = _as_bool(gt).ravel()
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # one point per distinct score
    tps = np.cumsum(y)[last_of_tie]
    prec = tps / (last_of_tie + 1)
    rec = tps / n_pos
    return float(np.sum(np.diff(rec, prepend=0.0) * prec))


# ------------------------------------------------------------------------ one image


def _to_numpy(x: Mask) -> np.ndarray:
    if not isinstance(x, Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()


def compute_image_metrics(
    prob: Mask, gt: Mask, threshold: float = 0.5, tolerance: float = 2.0
) -> dict[str, float]:
    """All per-image metrics for one (H, W) probability map and binary GT, plus raw counts.

    The counts (tp/fp/fn/tn) let :func:`aggregate` compute pooled-pixel metrics.
    """
    prob_np, g = _to_numpy(prob), _as_bool(gt)
    if prob_np.shape != g.shape:
        raise ValueError(f"shape mismatch: prob {prob_np.shape} vs gt {g.shape}")
    p = prob_np > threshold
    tp, fp, fn, tn = (int(c) for c in confusion_counts(p, g))
    out = {k: float(v) for k, v in scores_from_counts(tp, fp, fn).items()}
    out |= {
        "cldice": cldice(p, g),
        "hd95": hd95(p, g),
        "nsd": surface_dice(p, g, tolerance),
        "auprc": auprc(prob_np, g),
    }
    return out | {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


# ---------------------------------------------------------------------- aggregation


def _summary(values: np.ndarray, rng: np.random.Generator, n_boot: int, ci: float) -> dict:
    """Mean, sample std and percentile-bootstrap CI of the mean over the non-NaN values."""
    v = values[~np.isnan(values)]
    n = v.size
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    # Vectorised bootstrap: one (n_boot, n) index draw, one mean per row.
    boot = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if n > 1 else 0.0,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": int(n),
    }


def aggregate(
    rows: Sequence[dict[str, Any]],
    group_key: str = "video_id",
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise per-image rows (from :func:`compute_image_metrics` plus a ``group_key``).

    Returns ``{"per_image": {m: stats}, "per_video": {m: stats}, "pooled": {...},
    "n_images", "n_videos"}`` where stats = mean/std/ci_low/ci_high/n (n = valid values;
    NaNs are left out). per_video averages each video first, then across videos, so long
    videos do not dominate. ``pooled`` (secondary) sums TP/FP/FN over all images; it is
    present only when every row carries counts. Bootstrap resamples images (per_image)
    or videos (per_video), seeded.
    """
    if not rows:
        raise ValueError("aggregate() needs at least one row")
    if metrics is None:
        metrics = [k for k in METRIC_KEYS if any(k in r for r in rows)]
    rng = np.random.default_rng(seed)
    table = {m: np.array([float(r.get(m, np.nan)) for r in rows]) for m in metrics}
    groups = [r.get(group_key) for r in rows]
    videos = list(dict.fromkeys(groups))
    out: dict[str, Any] = {"n_images": len(rows), "n_videos": len(videos)}
    out["per_image"] = {m: _summary(table[m], rng, n_boot, ci) for m in metrics}

    index = np.array([videos.index(g) for g in groups])
    per_video = {}
    for m in metrics:
        v = table[m]
        valid = ~np.isnan(v)
        # Per-video nan-mean via bincount; a video with no valid value becomes NaN (dropped).
        sums = np.bincount(index[valid], weights=v[valid], minlength=len(videos))
        counts = np.bincount(index[valid], minlength=len(videos))
        means = np.divide(sums, counts, out=np.full(len(videos), np.nan), where=counts > 0)
        per_video[m] = _summary(means, rng, n_boot, ci)
    out["per_video"] = per_video

    if all(all(k in r for k in COUNT_KEYS) for r in rows):
        tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in COUNT_KEYS)
        pooled = {k: float(v) for k, v in scores_from_counts(tp, fp, fn).items()}
        out["pooled"] = pooled | {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}
    return out


# ------------------------------------------------------------------------- temporal


def temporal_consistency(
    preds: Sequence[Mask], gts: Sequence[Mask], fluctuation_limit: float = 0.05
) -> dict[str, float]:
    """Frame-to-frame stability of one video (frames in temporal order).

    * ``temporal_iou_diff``: mean |IoU(P_t, P_t+1) - IoU(G_t, G_t+1)|, i.e. how much more
      (or less) the prediction changes between frames than the annotation does.
    * ``iou_std``: population std (ddof=0) of per-frame IoU within the video.
    * ``max_iou_change``: max |IoU_t+1 - IoU_t| of per-frame IoU, the seed-000 §3.3
      "fluctuation", with ``fluctuation_ok`` = 1.0 when it is below ``fluctuation_limit``.
    * ``success_rate``: fraction of frames with a non-empty predicted mask.
    Pairwise values are NaN for a single-frame video.
    """
    if len(preds) != len(gts) or not preds:
        raise ValueError("need equally many (>= 1) prediction and ground-truth frames")
    p = [_as_bool(x) for x in preds]
    g = [_as_bool(x) for x in gts]
    frame_iou = np.array([iou(a, b) for a, b in zip(p, g, strict=True)])
    pairs = range(len(p) - 1)
    diff = np.array([abs(iou(p[t], p[t + 1]) - iou(g[t], g[t + 1])) for t in pairs])
    change = np.abs(np.diff(frame_iou))
    max_change = float(change.max()) if change.size else float("nan")
    return {
        "n_frames": float(len(p)),
        "mean_iou": float(frame_iou.mean()),
        "temporal_iou_diff": float(diff.mean()) if diff.size else float("nan"),
        "iou_std": float(frame_iou.std()),
        "max_iou_change": max_change,
        "fluctuation_ok": float(max_change < fluctuation_limit),
        "success_rate": float(np.mean([x.any() for x in p])),
    }


# TCI: the temporal consistency of Painchaud et al., "Echocardiography segmentation with
# enforced temporal consistency", IEEE TMI 41(10), 2022 (the TCI column of the
# SAMUS-based echocardiography study whose temporal modules sa2va.model.temporal builds).
# Each frame's shape attributes a_t (here: vessel area, and the centroid's row and column, all
# as fractions of the image, i.e. min-max scaled by their possible range) are compared with the
# mean of the neighbouring frames': delta_t = a_t - (a_{t-1} + a_{t+1}) / 2 (0 at both ends).
# A frame is temporally inconsistent when |delta_t| of any attribute exceeds that attribute's
# threshold, the largest |delta| found in the reference (ground-truth) sequences; TCI counts
# the inconsistent frames (0 is ideal). An empty mask has no centroid: only its area counts.
SHAPE_ATTRIBUTES = ("area", "centroid_row", "centroid_col")


def shape_attributes(masks: Sequence[Mask]) -> np.ndarray:
    """(T, 3) area and centroid (row, col) per frame, fractions of the image; NaN centroid
    for an empty mask."""
    rows = []
    for mask in masks:
        m = _as_bool(mask)
        centroid = np.argwhere(m).mean(0) / m.shape if m.any() else np.full(2, np.nan)
        rows.append([m.mean(), *centroid])
    return np.array(rows, dtype=np.float64).reshape(-1, len(SHAPE_ATTRIBUTES))


def attribute_inconsistency(attributes: np.ndarray) -> np.ndarray:
    """|a_t - (a_{t-1} + a_{t+1}) / 2| per frame and attribute, (T, A); 0 at both ends."""
    delta = np.zeros_like(attributes)
    delta[1:-1] = np.abs(attributes[1:-1] - (attributes[:-2] + attributes[2:]) / 2)
    return delta


def tci_thresholds(reference_attributes: Sequence[np.ndarray]) -> np.ndarray:
    """Per attribute, the largest |delta| over the reference sequences (undefined deltas,
    around an empty mask, left out; 0 when there is none)."""
    width = len(SHAPE_ATTRIBUTES)
    deltas = [attribute_inconsistency(a.reshape(-1, width)) for a in reference_attributes]
    stacked = np.concatenate([np.zeros((0, width)), *deltas])
    return np.where(np.isfinite(stacked), stacked, 0.0).max(axis=0, initial=0.0)


def temporal_consistency_index(attributes: np.ndarray, thresholds: np.ndarray) -> int:
    """Number of temporally inconsistent frames of one sequence (its :func:`shape_attributes`)."""
    with np.errstate(invalid="ignore"):  # NaN (no centroid) never exceeds a threshold
        return int((attribute_inconsistency(attributes) > thresholds).any(axis=1).sum())


# ------------------------------------------------------------------ threshold tuning


def tune_threshold(
    probs_list: Sequence[Mask],
    gts_list: Sequence[Mask],
    thresholds: Sequence[float] | np.ndarray = np.linspace(0.05, 0.95, 19),  # noqa: B008
    metric: str = "dice",
) -> tuple[float, list[dict[str, float]]]:
    """Threshold maximising the mean per-image ``metric`` (iou/dice/precision/recall).

    Use on the validation split only, then report test at 0.5 and at the tuned value.
    Ties go to the lowest threshold. Returns (best, table) with one row per threshold
    holding all four mean scores.
    """
    if metric not in OVERLAP_KEYS:
        raise ValueError(f"metric must be one of {OVERLAP_KEYS}, got {metric!r}")
    thr = np.asarray(thresholds, dtype=np.float64)
    sums = {k: np.zeros(thr.size) for k in OVERLAP_KEYS}
    for prob, gt in zip(probs_list, gts_list, strict=True):
        g = _as_bool(gt)
        pred = _to_numpy(prob)[None] > thr[:, None, None]  # (T, H, W), all thresholds at once
        tp, fp, fn, _ = confusion_counts(pred, np.broadcast_to(g, pred.shape))
        for k, v in scores_from_counts(tp, fp, fn).items():
            sums[k] += v
    n = len(probs_list)
    table = [
        {"threshold": float(t)} | {k: float(sums[k][i] / n) for k in OVERLAP_KEYS}
        for i, t in enumerate(thr)
    ]
    best = int(np.argmax(sums[metric]))
    return float(thr[best]), table


# ------------------------------------------------------------------- in-loop metric


class SegmentationMetrics(Metric):
    """Per-image IoU/Dice/precision/recall means plus pooled Dice/IoU, DDP-safe.

    Per-image scores are computed batched on-device with :func:`scores_from_counts` (same
    empty policy as everything else) and gathered with ``cat``; pooled counts with ``sum``.
    Pass ``from_logits=True`` for raw mask logits: they are compared with logit(threshold),
    which equals sigmoid(x) > threshold without computing the sigmoid.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, from_logits: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.from_logits = from_logits
        for k in OVERLAP_KEYS:
            self.add_state(k, default=[], dist_reduce_fx="cat")
        for k in ("tp", "fp", "fn"):
            self.add_state(k, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits_or_probs: Tensor, target: Tensor) -> None:
        """Accumulate a batch: scores (N, H, W) and target (N, H, W) bool or 0/1."""
        if logits_or_probs.shape != target.shape or logits_or_probs.ndim != 3:
            raise ValueError(
                f"expected matching (N, H, W), got {logits_or_probs.shape} and {target.shape}"
            )
        x = logits_or_probs.detach()
        if self.from_logits:
            pred = x > torch.logit(torch.tensor(self.threshold, dtype=torch.float64)).item()
        else:
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError("scores outside [0, 1]: pass from_logits=True for logits")
            pred = x > self.threshold
        tp, fp, fn, _ = confusion_counts(pred, target.bool())
        for k, v in scores_from_counts(tp, fp, fn).items():
            getattr(self, k).append(v)
        self.tp += tp.sum()
        self.fp += fp.sum()
        self.fn += fn.sum()

    def _cat(self, state: list[Tensor] | Tensor) -> Tensor:
        # Empty before any update (mean -> NaN rather than torchmetrics' ValueError).
        if isinstance(state, Tensor) or state:
            return dim_zero_cat(state)
        return torch.empty(0, device=self.tp.device)

    def compute(self) -> dict[str, Tensor]:
        """Per-image means (primary) and pooled-pixel Dice/IoU (secondary)."""
        out = {k: self._cat(getattr(self, k)).mean() for k in OVERLAP_KEYS}
        pooled = scores_from_counts(self.tp, self.fp, self.fn)
        if out["iou"].isnan():  # no images seen: pooled is undefined too, not "both empty"
            pooled = {k: torch.full_like(v, float("nan")) for k, v in pooled.items()}
        return out | {"pooled_dice": pooled["dice"], "pooled_iou": pooled["iou"]}
