"""Paired statistics on hand-made cases, checked against hand computation and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sa2va.evaluation.metrics import aggregate
from sa2va.evaluation.report import results_markdown
from sa2va.evaluation.statistics import (
    cluster_bootstrap_ci,
    holm,
    paired_test,
    seed_interval,
    video_cis,
    wilcoxon_p,
)

VALUES = np.array([0.61, 0.72, 0.55, 0.80, 0.67, 0.74, 0.58, 0.69, 0.77, 0.63, 0.71, 0.66])


def scipy_percentile_ci(values: np.ndarray) -> tuple[float, float]:
    result = stats.bootstrap(
        (values,), np.mean, n_resamples=20000, method="percentile", random_state=1
    )
    return result.confidence_interval.low, result.confidence_interval.high


def test_one_image_per_video_is_the_ordinary_bootstrap_of_the_mean():
    ci = cluster_bootstrap_ci(VALUES, [f"v{i}" for i in range(VALUES.size)], n_boot=20000)
    low, high = scipy_percentile_ci(VALUES)
    assert ci.estimate == pytest.approx(VALUES.mean()) and ci.units == VALUES.size
    assert ci.low == pytest.approx(low, abs=4e-3) and ci.high == pytest.approx(high, abs=4e-3)


def test_cluster_bootstrap_resamples_whole_videos():
    # 6 videos of 3 identical frames: resampling videos = bootstrapping the 6 video values,
    # whereas resampling the 18 frames independently would give a narrower interval.
    video_values = VALUES[:6]
    frames = np.repeat(video_values, 3)
    clusters = np.repeat([f"video{i}" for i in range(6)], 3)
    ci = cluster_bootstrap_ci(frames, clusters, n_boot=20000)
    low, high = scipy_percentile_ci(video_values)
    assert ci.units == 6 and ci.estimate == pytest.approx(video_values.mean())
    assert ci.low == pytest.approx(low, abs=4e-3) and ci.high == pytest.approx(high, abs=4e-3)
    naive = cluster_bootstrap_ci(frames, np.arange(18), n_boot=20000)
    assert naive.high - naive.low < 0.8 * (ci.high - ci.low)


def test_no_interval_below_the_minimum_number_of_videos():
    ci = cluster_bootstrap_ci([0.5, 0.7, 0.9, np.nan], ["a", "a", "b", "c"], min_units=4)
    assert ci.estimate == pytest.approx(0.7) and ci.units == 2  # video c has no valid value
    assert not ci.has_ci and math.isnan(ci.high)
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        cluster_bootstrap_ci([0.1, 0.2, 0.3], ["a", "b"])


def test_wilcoxon_p_matches_the_exact_distribution_and_scipy():
    # 5 positive differences: the exact two-sided p is 2 * (1/2)^5.
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    mixed = [0.05, -0.02, 0.11, 0.0, 0.07, -0.04, 0.09, 0.13]
    assert wilcoxon_p([*mixed, np.nan]) == pytest.approx(stats.wilcoxon(mixed).pvalue)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([np.nan]))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.5, np.nan, 0.4])
    assert adjusted[0] == pytest.approx(0.8) and adjusted[2] == pytest.approx(0.8)
    assert math.isnan(adjusted[1])
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_seed_interval_is_students_t():
    mean, std, interval = seed_interval([0.7, 0.8, 0.9])
    assert (mean, std) == (pytest.approx(0.8), pytest.approx(0.1))
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert interval.low == pytest.approx(0.8 - half) and interval.high == pytest.approx(0.8 + half)
    assert interval.units == 3
    single = seed_interval([0.7, np.nan])
    assert single[0] == 0.7 and math.isnan(single[1]) and not single[2].has_ci
    assert seed_interval([0.5, 0.5])[2].high == 0.5


def test_paired_test_differences_arm_minus_reference():
    reference = VALUES[:8]
    arm = reference + np.array([0.05, -0.02, 0.11, 0.0, 0.07, -0.04, 0.09, 0.13])
    videos = ["a", "a", "b", "b", "c", "c", "d", "d"]
    test = paired_test(arm, reference, videos, n_boot=2000)
    assert test.pairs == 8 and test.delta.units == 4
    assert test.delta.estimate == pytest.approx(np.mean(arm - reference))
    assert test.p == pytest.approx(stats.wilcoxon(arm - reference).pvalue)
    assert test.delta.low < test.delta.estimate < test.delta.high
    with pytest.raises(ValueError, match="differ in length"):
        paired_test(arm[:3], reference, videos)


def eval_result(videos: int) -> tuple[dict, list[dict]]:
    """An evaluation result as `sa2va.eval` summarises one: 3 frames per video."""
    rows = [
        {"video_id": f"v{i // 3}", "dice": float(d), "iou": float(d) / 2}
        for i, d in enumerate(np.resize(VALUES, 3 * videos))
    ]
    result = aggregate(rows, n_boot=200)
    result["temporal"] = aggregate(rows[::3], metrics=["iou"], n_boot=200)["per_image"]
    return result, rows


def test_eval_cis_resample_videos_and_are_left_out_below_the_minimum():
    result, rows = eval_result(videos=5)
    video_cis(result, rows, n_boot=500, seed=3)
    expected = cluster_bootstrap_ci(
        [r["dice"] for r in rows], [r["video_id"] for r in rows], 500, seed=3
    )
    assert (result["per_image"]["dice"]["ci_low"], result["per_image"]["dice"]["ci_high"]) == (
        expected.low,
        expected.high,
    )
    assert result["per_video"]["dice"]["ci_low"] is not None
    assert result["ci_units"] == {"unit": "video", "min_units": 4}

    few, few_rows = eval_result(videos=2)
    video_cis(few, few_rows, n_boot=500, seed=3)
    tables = (few["per_image"], few["per_video"], few["temporal"])
    assert all(s["ci_low"] is None and s["ci_high"] is None for t in tables for s in t.values())
    few |= {"threshold": 0.5, "success_rate": 1.0}
    summary = {
        "checkpoint": "run/last.ckpt",
        "split": "test",
        "n_images": 6,
        "n_videos": 2,
        "video_mode": "per_frame",
        "mode": "fast",
        "git_sha": None,
        "ci": 0.95,
        "results": {"default": few},
    }
    dice = few["per_image"]["dice"]
    assert f"{dice['mean']:.4f} ± {dice['std']:.4f} (no CI: 2 videos)" in results_markdown(summary)
