"""Statistics for comparing arms: paired per-image tests, cluster bootstrap CIs, Holm, seeds.

Test frames of one video are correlated, so a video (not a frame) is the unit a confidence
interval resamples: :func:`cluster_bootstrap_ci` draws whole videos with replacement. Below
``MIN_UNITS`` units a CI says little (a percentile bootstrap over 2 videos has 3 possible
outcomes), so callers leave it out and print the number of units instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

MIN_UNITS = 4  # fewest videos a bootstrap CI is computed from (seeds: t-interval from 2)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its CI (``low``/``high`` NaN when there were too few units)."""

    estimate: float
    low: float
    high: float
    units: int  # what the CI resamples over: videos (bootstrap) or seeds (t-interval)

    @property
    def has_ci(self) -> bool:
        return not math.isnan(self.low)


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence[object],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_units: int = MIN_UNITS,
) -> Interval:
    """Mean of per-image ``values`` with a percentile CI from resampling whole clusters.

    Each resample draws as many clusters as there are, with replacement, and takes the mean
    over all their images (so a resample weighs videos by length, as the per-image mean
    does). With one image per cluster this is the ordinary bootstrap of the mean. NaN
    values are left out; the CI is NaN below ``min_units`` clusters.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(clusters),):
        raise ValueError(f"{v.shape[0]} values but {len(clusters)} cluster labels")
    valid = ~np.isnan(v)
    labels, index = np.unique(
        np.asarray(clusters, dtype=object)[valid].astype(str), return_inverse=True
    )
    v = v[valid]
    if not v.size:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if labels.size < min_units:
        return Interval(mean, math.nan, math.nan, int(labels.size))
    sums = np.bincount(index, weights=v)
    counts = np.bincount(index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, labels.size, size=(n_boot, labels.size))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - ci) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), int(labels.size))


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences (NaNs left out, zeros dropped).

    All-zero differences give 1.0 without calling scipy, which returns the same after a
    divide-by-zero warning. NaN when there are no pairs.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if not d.size:
        return math.nan
    if not d.any():
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family = the non-NaN entries; NaN stays NaN).

    Hand-written: scipy has no Holm step-down (only ``false_discovery_control``), and
    statsmodels is not a dependency for these few lines. The i-th smallest of m p-values is
    scaled by (m - i), running maxima keep the order, and values are capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * (order.size - np.arange(order.size))
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out.tolist()


def seed_interval(values: Sequence[float], ci: float = 0.95) -> tuple[float, float, Interval]:
    """Mean ± sample std over seeds and a Student-t interval of the mean (from 2 seeds on).

    The t-interval, not a bootstrap, because seeds are few and each is one whole training
    run: t with n - 1 degrees of freedom widens honestly as n shrinks. Returns (mean, std,
    interval); std and the CI are NaN for a single seed.
    """
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not v.size:
        return math.nan, math.nan, Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, Interval(mean, math.nan, math.nan, 1)
    std = float(v.std(ddof=1))
    if std == 0.0:  # scipy returns NaN bounds for a zero scale; the interval is the point
        return mean, std, Interval(mean, mean, mean, int(v.size))
    low, high = stats.t.interval(ci, df=v.size - 1, loc=mean, scale=std / math.sqrt(v.size))
    return mean, std, Interval(mean, float(low), float(high), int(v.size))


@dataclass(frozen=True)
class PairedTest:
    """One arm against the reference on the same images: Δ = arm - reference."""

    delta: Interval  # mean per-image difference, cluster bootstrap CI over videos
    p: float  # Wilcoxon signed-rank, two-sided, per image
    pairs: int  # images in both arms


def paired_test(
    arm: Sequence[float],
    reference: Sequence[float],
    clusters: Sequence[object],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_units: int = MIN_UNITS,
) -> PairedTest:
    """Paired comparison of two arms' per-image scores (same order, same images)."""
    a, r = np.asarray(arm, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {r.size}")
    diff = a - r
    delta = cluster_bootstrap_ci(diff, clusters, n_boot, ci, seed, min_units)
    return PairedTest(delta, wilcoxon_p(diff), int((~np.isnan(diff)).sum()))


def video_cis(
    result: dict[str, Any],
    image_rows: Sequence[dict[str, Any]],
    n_boot: int,
    seed: int,
    min_units: int = MIN_UNITS,
) -> None:
    """Set an evaluation result's CIs over the units that support one: videos.

    Frames of one video are correlated, so the per-image mean's CI resamples whole videos
    (cluster bootstrap), and every CI (per image, per video, temporal) is left out (None)
    below ``min_units`` videos, where an interval would say little.
    """
    videos = [r["video_id"] for r in image_rows]
    for key, summary in result["per_image"].items():
        values = [float(r.get(key, np.nan)) for r in image_rows]
        ci = cluster_bootstrap_ci(values, videos, n_boot, seed=seed, min_units=min_units)
        summary["ci_low"], summary["ci_high"] = (ci.low, ci.high) if ci.has_ci else (None, None)
    for table in (result["per_video"], result["temporal"]):
        for summary in table.values():
            if summary["n"] < min_units:
                summary["ci_low"] = summary["ci_high"] = None
    result["ci_units"] = {"unit": "video", "min_units": min_units}
