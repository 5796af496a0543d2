"""Tests for sa2va.metrics against hand-computed cases and independent library references.

References: torchmetrics (binary Jaccard/F1/precision/recall, average precision), MONAI
(HD95, surface Dice). Library empty-mask conventions differ from ours (``sa2va.metrics``), so
those cases are checked by hand only.
"""

from __future__ import annotations

import math
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage
from torchmetrics.functional.classification import (
    binary_average_precision,
    binary_f1_score,
    binary_jaccard_index,
    binary_precision,
    binary_recall,
)

from sa2va.evaluation.metrics import (
    SegmentationMetrics,
    aggregate,
    auprc,
    cldice,
    compute_image_metrics,
    dice,
    hd95,
    iou,
    precision,
    recall,
    shape_attributes,
    surface_dice,
    tci_thresholds,
    temporal_consistency,
    temporal_consistency_index,
    tune_threshold,
)
from sa2va.evaluation.video_metrics import ClipMetrics, add_tci, object_curves

BOUNDED = {"iou": iou, "dice": dice, "precision": precision, "recall": recall, "cldice": cldice}
BOUNDED["nsd"] = surface_dice


def blob(rng: np.random.Generator, shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    """Random smooth vessel-like blobs (several components, some touching the border)."""
    return ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.53


def line(
    shape: tuple[int, int] = (32, 32), row: int = 16, cols: slice = slice(4, 28)
) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[row, cols] = True
    return m


def monai_hd95_nsd(p: np.ndarray, g: np.ndarray, tol: float) -> tuple[float, float]:
    yp, yg = (torch.from_numpy(x)[None, None].float() for x in (p, g))
    hd = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95).item()
    nsd = compute_surface_dice(yp, yg, [tol], include_background=True).item()
    return hd, nsd


# ------------------------------------------------------------------ per-image, by hand


def test_overlap_hand_computed() -> None:
    pred = np.zeros((4, 4), dtype=bool)
    pred[0:2, 0:2] = True  # 4 px
    gt = np.zeros((4, 4), dtype=int)
    gt[0:2, 1:4] = 1  # 6 px; TP 2, FP 2, FN 4
    assert iou(pred, gt) == pytest.approx(2 / 8)
    assert dice(pred, gt) == pytest.approx(4 / 10)
    assert precision(pred, gt) == pytest.approx(2 / 4)
    assert recall(pred, gt) == pytest.approx(2 / 6)


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_empty_policy_bounded(name: str) -> None:
    fn = BOUNDED[name]
    empty, vessel = np.zeros((16, 16), dtype=bool), np.zeros((16, 16), dtype=bool)
    vessel[4:12, 7:9] = True
    assert fn(empty, empty) == 1.0  # correct "no vessel"
    assert fn(vessel, empty) == 0.0  # false positive on a vessel-free frame is punished
    assert fn(empty, vessel) == 0.0  # missed vessel


def test_empty_policy_unbounded() -> None:
    empty, vessel = np.zeros((16, 16), dtype=bool), np.zeros((16, 16), dtype=bool)
    vessel[4:12, 7:9] = True
    for p, g in [(empty, empty), (vessel, empty), (empty, vessel)]:
        assert math.isnan(hd95(p, g))
    assert math.isnan(auprc(np.full((16, 16), 0.7), empty))
    assert hd95(vessel, vessel) == 0.0


def test_rejects_probabilities_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="binary"):
        iou(np.full((4, 4), 0.7), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        dice(np.ones((4, 4), dtype=bool), np.ones((4, 5), dtype=bool))


# ------------------------------------------------------------ vs torchmetrics / MONAI


@pytest.mark.parametrize("seed", range(4))
def test_overlap_matches_torchmetrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, g = blob(rng), blob(rng)
    assert p.any() and g.any()
    tp, tg = torch.from_numpy(p).long(), torch.from_numpy(g).long()
    assert iou(p, g) == pytest.approx(binary_jaccard_index(tp, tg).item(), abs=1e-6)
    assert dice(p, g) == pytest.approx(binary_f1_score(tp, tg).item(), abs=1e-6)
    assert precision(p, g) == pytest.approx(binary_precision(tp, tg).item(), abs=1e-6)
    assert recall(p, g) == pytest.approx(binary_recall(tp, tg).item(), abs=1e-6)
    # torch input gives the same numbers as numpy input
    assert iou(torch.from_numpy(p), torch.from_numpy(g)) == iou(p, g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tol", [0.0, 1.0, 2.0, 3.5])
def test_hd95_nsd_match_monai(seed: int, tol: float) -> None:
    rng = np.random.default_rng(100 + seed)
    p, g = blob(rng), blob(rng)
    ref_hd, ref_nsd = monai_hd95_nsd(p, g, tol)
    assert hd95(p, g) == pytest.approx(ref_hd, rel=1e-5)
    assert surface_dice(p, g, tol) == pytest.approx(ref_nsd, abs=1e-6)


def test_one_pixel_vessel() -> None:
    """1-px vessel shifted by one row: zero overlap, but boundary metrics see 1 px error."""
    g = line()
    shifted = line(row=17)
    assert iou(shifted, g) == 0.0 and dice(shifted, g) == 0.0 and cldice(shifted, g) == 0.0
    assert hd95(shifted, g) == pytest.approx(1.0)
    assert surface_dice(shifted, g, tolerance=2) == 1.0
    assert surface_dice(shifted, g, tolerance=0.5) == 0.0
    far = line(row=19)
    assert hd95(far, g) == pytest.approx(3.0)
    for p in (g, shifted, far):  # and MONAI agrees
        ref_hd, ref_nsd = monai_hd95_nsd(p, g, 2.0)
        assert hd95(p, g) == pytest.approx(ref_hd) and surface_dice(p, g, 2) == ref_nsd
    # exact prediction of a 1-px vessel is perfect on every metric
    assert iou(g, g) == dice(g, g) == cldice(g, g) == surface_dice(g, g) == 1.0


def test_single_pixels_hd95_by_hand() -> None:
    p, g = np.zeros((16, 16), dtype=bool), np.zeros((16, 16), dtype=bool)
    p[5, 5], g[8, 9] = True, True  # distance sqrt(3^2 + 4^2) = 5
    assert hd95(p, g) == pytest.approx(5.0)
    assert surface_dice(p, g, tolerance=4.9) == 0.0 and surface_dice(p, g, tolerance=5) == 1.0


def test_cldice_hand_computed() -> None:
    g = line()  # 24 px centerline; its skeleton is itself
    # 3-px-wide vessel with tapered ends (a square-ended one grows a 1-px skeleton spur)
    band = line(row=15, cols=slice(5, 27)) | line(row=17, cols=slice(5, 27)) | g
    # skeleton of the band lies on the centerline -> tprec 1; S(G) inside band -> tsens 1
    assert cldice(band, g) == pytest.approx(1.0)
    assert dice(band, g) == pytest.approx(2 * 24 / (24 + 68))  # pixel overlap punishes width
    half = line(cols=slice(4, 16))  # tprec 1, tsens 12/24 -> 2 * 0.5 / 1.5
    assert cldice(half, g) == pytest.approx(2 / 3)
    off = line(row=3)  # disjoint
    assert cldice(off, g) == 0.0


def test_auprc_hand_and_torchmetrics() -> None:
    s = np.array([[0.9, 0.8], [0.7, 0.6]])
    y = np.array([[1, 0], [1, 0]], dtype=bool)
    assert auprc(s, y) == pytest.approx(1.0 * 0.5 + (2 / 3) * 0.5)
    rng = np.random.default_rng(7)
    g = blob(rng)
    noisy = np.clip(g * 0.4 + rng.random(g.shape) * 0.6, 0, 1)
    for scores in (noisy, np.round(noisy, 1)):  # continuous and heavily tied
        ref = binary_average_precision(
            torch.from_numpy(scores).flatten(), torch.from_numpy(g).long().flatten()
        )
        assert auprc(scores, g) == pytest.approx(ref.item(), abs=1e-6)
        assert auprc(torch.from_numpy(scores), torch.from_numpy(g)) == pytest.approx(
            auprc(scores, g)
        )


def test_compute_image_metrics() -> None:
    rng = np.random.default_rng(3)
    g = blob(rng)
    prob = np.where(g, 0.8, 0.2)
    prob[0, 0] = 0.5  # exactly at threshold: not vessel (strict >)
    out = compute_image_metrics(prob, g, threshold=0.5, tolerance=2)
    for k in ("iou", "dice", "precision", "recall", "cldice", "nsd", "auprc"):
        assert out[k] == pytest.approx(1.0), k
    assert out["hd95"] == 0.0
    assert out["tp"] + out["fp"] + out["fn"] + out["tn"] == g.size and out["fp"] == 0
    low = compute_image_metrics(torch.from_numpy(prob).to(torch.bfloat16), torch.from_numpy(g), 0.1)
    assert low["precision"] == pytest.approx(g.sum() / g.size) and low["recall"] == 1.0


# --------------------------------------------------------------------- aggregation


def _rows() -> list[dict]:
    return [
        {"video_id": "A", "iou": 1.0, "hd95": math.nan, "tp": 10, "fp": 0, "fn": 0, "tn": 90},
        {"video_id": "A", "iou": 0.0, "hd95": 2.0, "tp": 0, "fp": 5, "fn": 5, "tn": 90},
        {"video_id": "A", "iou": 0.5, "hd95": 4.0, "tp": 5, "fp": 5, "fn": 0, "tn": 90},
        {"video_id": "B", "iou": 0.2, "hd95": math.nan, "tp": 1, "fp": 2, "fn": 2, "tn": 95},
    ]


def test_aggregate_hand_computed() -> None:
    out = aggregate(_rows(), n_boot=200)
    assert out["n_images"] == 4 and out["n_videos"] == 2
    assert set(out["per_image"]) == {"iou", "hd95"}
    pi, pv = out["per_image"]["iou"], out["per_video"]["iou"]
    assert pi["mean"] == pytest.approx(1.7 / 4) and pi["n"] == 4
    assert pi["std"] == pytest.approx(np.std([1.0, 0.0, 0.5, 0.2], ddof=1))
    assert pv["mean"] == pytest.approx((0.5 + 0.2) / 2) and pv["n"] == 2
    # NaNs are excluded, with the count of valid values; video B has no valid hd95
    assert out["per_image"]["hd95"]["mean"] == 3.0 and out["per_image"]["hd95"]["n"] == 2
    assert out["per_video"]["hd95"]["mean"] == 3.0 and out["per_video"]["hd95"]["n"] == 1
    pooled = out["pooled"]  # tp 16, fp 12, fn 7
    assert pooled["iou"] == pytest.approx(16 / 35) and pooled["dice"] == pytest.approx(32 / 51)
    assert pooled["precision"] == pytest.approx(16 / 28) and pooled["recall"] == pytest.approx(
        16 / 23
    )
    assert pi["ci_low"] <= pi["mean"] <= pi["ci_high"]


def test_aggregate_pooled_needs_counts() -> None:
    rows = [{k: v for k, v in r.items() if k != "tn"} for r in _rows()]
    assert "pooled" not in aggregate(rows, n_boot=10)


def test_bootstrap_ci_is_seeded_and_calibrated() -> None:
    rng = np.random.default_rng(11)
    rows = [{"video_id": i, "iou": float(v)} for i, v in enumerate(rng.normal(0.6, 0.1, 400))]
    a = aggregate(rows, n_boot=2000, seed=1)["per_image"]["iou"]
    assert a == aggregate(rows, n_boot=2000, seed=1)["per_image"]["iou"]
    assert a != aggregate(rows, n_boot=2000, seed=2)["per_image"]["iou"]
    # percentile-bootstrap CI of a mean ~ mean +- 1.96 * s / sqrt(n)
    half = 1.96 * a["std"] / math.sqrt(400)
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * half, rel=0.15)
    assert (a["ci_low"] + a["ci_high"]) / 2 == pytest.approx(a["mean"], abs=0.2 * half)


# ------------------------------------------------------------------------ temporal


def _square(shape: tuple[int, int] = (12, 12), r: int = 2, c: int = 2) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r : r + 4, c : c + 4] = True
    return m


def test_temporal_consistency_flicker() -> None:
    g = [_square()] * 3
    p = [_square(), np.zeros((12, 12), dtype=bool), _square()]  # per-frame IoU 1, 0, 1
    out = temporal_consistency(p, g)
    assert out["mean_iou"] == pytest.approx(2 / 3)
    assert out["iou_std"] == pytest.approx(np.std([1, 0, 1]))
    assert out["max_iou_change"] == 1.0 and out["fluctuation_ok"] == 0.0
    assert out["temporal_iou_diff"] == 1.0  # IoU(P_t,P_t+1)=0 while IoU(G_t,G_t+1)=1
    assert out["success_rate"] == pytest.approx(2 / 3)


def test_temporal_consistency_tracks_moving_vessel() -> None:
    g = [_square(c=c) for c in (1, 2, 4)]  # the annotation moves
    out = temporal_consistency(g, g)  # a prediction that moves with it is perfectly stable
    assert out["temporal_iou_diff"] == 0.0 and out["iou_std"] == 0.0
    assert out["max_iou_change"] == 0.0 and out["fluctuation_ok"] == 1.0
    static = temporal_consistency([g[0]] * 3, g)  # one that stays put is not
    # IoU(P,P)=1 vs IoU(G0,G1)=12/20 and IoU(G1,G2)=8/24
    assert static["temporal_iou_diff"] == pytest.approx(((1 - 12 / 20) + (1 - 8 / 24)) / 2)
    single = temporal_consistency(g[:1], g[:1])
    assert math.isnan(single["temporal_iou_diff"]) and math.isnan(single["max_iou_change"])


def test_tci_hand_computed() -> None:
    """Painchaud et al. 2022: |a_t - (a_t-1 + a_t+1)/2| against the reference's largest."""
    g = [_square(c=c) for c in (1, 2, 4, 5)]  # annotation: the square slides right
    attrs = shape_attributes(g)
    # area 16/144, centroid row (2 + 1.5)/12, centroid column (c + 1.5)/12
    np.testing.assert_allclose(attrs[:, 0], 16 / 144)
    np.testing.assert_allclose(attrs[:, 1], 3.5 / 12)
    np.testing.assert_allclose(attrs[:, 2], np.array([2.5, 3.5, 5.5, 6.5]) / 12)
    # column: |3.5 - (2.5 + 5.5)/2| = |5.5 - (3.5 + 6.5)/2| = 0.5 (/12); area, row: constant
    thresholds = tci_thresholds([attrs])
    np.testing.assert_allclose(thresholds, [0.0, 0.0, 0.5 / 12])
    tci = lambda masks: temporal_consistency_index(shape_attributes(masks), thresholds)  # noqa: E731
    assert tci(g) == 0  # the reference itself: never above its own largest change
    assert tci([_square(c=2)] * 4) == 0  # a constant mask: ideal
    empty = np.zeros((12, 12), dtype=bool)
    # the mask vanishes in frame 1: area deltas 16/144 (frame 1) and 8/144 (frame 2) > 0
    assert tci([_square(), empty, _square(), _square()]) == 2
    # jitter: columns 2.5, 5.5, 3.5, 6.5 -> deltas 2.5/12 at frames 1 and 2 > 0.5/12
    assert tci([_square(c=c) for c in (1, 4, 2, 5)]) == 2
    assert tci([_square(c=c) for c in (1, 4, 2)]) == 1  # both ends count as consistent
    np.testing.assert_allclose(tci_thresholds([]), 0.0)


def test_tci_per_video_and_in_loop_use_thresholds_of_all_references() -> None:
    """Video 1's annotation slides by 0.5 px/frame of jitter, video 2's stays put: the
    thresholds come from both, so video 2's prediction may jitter as much as video 1's."""
    g1 = [_square(c=c) for c in (1, 2, 4, 5)]
    g2 = [_square(c=2)] * 4
    p2 = [_square(c=c) for c in (2, 2, 3, 3)]  # deltas 0.5/12 at frames 1 and 2: allowed
    p1 = [_square(c=c) for c in (1, 4, 2, 5)]  # deltas 2.5/12: both inner frames flagged
    stack = lambda masks: [m[None].astype(np.float32) for m in masks]  # noqa: E731  (M=1)
    curves = object_curves(stack(p1), stack(g1), 0.5) + object_curves(stack(p2), stack(g2), 0.5)
    rows = [{}, {}]
    add_tci(rows, curves)
    assert [r["tci"] for r in rows] == [2.0, 0.0]
    # in the loop: the same two clips as (T, M=1, H, W) logits and targets
    metric = ClipMetrics(threshold=0.5)
    logits = [torch.from_numpy(np.stack(p)[:, None] * 20.0 - 10.0) for p in (p1, p2)]
    metric.update(logits, [torch.from_numpy(np.stack(g)[:, None]) for g in (g1, g2)])
    scores = metric.compute()
    assert scores["tci"].item() == 2.0
    expected_hd = np.nanmean([hd95(a, b) for a, b in zip(p1 + p2, g1 + g2, strict=True)])
    assert scores["hd95"].item() == pytest.approx(expected_hd)


# ---------------------------------------------------------------- threshold tuning


def test_tune_threshold() -> None:
    rng = np.random.default_rng(5)
    gts, probs = [], []
    for _ in range(3):
        g = blob(rng)
        noise = ~g & (rng.random(g.shape) < 0.3)
        probs.append(np.where(g, 0.58, np.where(noise, 0.42, 0.1)))
        gts.append(g)
    best, table = tune_threshold(probs, gts, metric="dice")
    assert best == pytest.approx(0.45)  # every t in [0.45, 0.55] is perfect; lowest wins
    assert len(table) == 19
    for row in table:  # vectorised table == per-image functions, averaged
        t = row["threshold"]
        assert row["dice"] == pytest.approx(
            np.mean([dice(p > t, g) for p, g in zip(probs, gts, strict=True)])
        )
        assert row["recall"] == pytest.approx(
            np.mean([recall(p > t, g) for p, g in zip(probs, gts, strict=True)])
        )
    assert tune_threshold(probs, gts, metric="iou")[0] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        tune_threshold(probs, gts, metric="hd95")


# ------------------------------------------------------------ in-loop torchmetrics


def _batch(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    g = np.stack([blob(rng, (32, 32)) for _ in range(n)])
    prob = np.clip(g * 0.5 + rng.random(g.shape) * 0.6, 0, 1)
    g[0] = False  # empty GT (prediction has false positives)
    g[1], prob[1] = False, 0.1  # both empty
    prob[2] = 0.0  # empty prediction on a vessel frame
    return torch.from_numpy(prob).float(), torch.from_numpy(g)


def test_segmentation_metrics_matches_per_image_functions() -> None:
    batches = [_batch(0), _batch(1)]
    m = SegmentationMetrics(threshold=0.5)
    for prob, g in batches:
        m.update(prob, g)
    out = m.compute()
    assert set(out) == {"iou", "dice", "precision", "recall", "pooled_dice", "pooled_iou"}
    preds = [p > 0.5 for prob, _ in batches for p in prob]
    gts = [x for _, g in batches for x in g]
    for name, fn in (("iou", iou), ("dice", dice), ("precision", precision), ("recall", recall)):
        ref = np.mean([fn(p, g) for p, g in zip(preds, gts, strict=True)])
        assert out[name].item() == pytest.approx(ref, abs=1e-6), name
    flat_p, flat_g = torch.cat([p.flatten() for p in preds]), torch.cat([g.flatten() for g in gts])
    assert out["pooled_dice"].item() == pytest.approx(
        binary_f1_score(flat_p, flat_g).item(), abs=1e-6
    )
    assert out["pooled_iou"].item() == pytest.approx(
        binary_jaccard_index(flat_p, flat_g).item(), abs=1e-6
    )


def test_segmentation_metrics_logits_and_guard() -> None:
    prob, g = _batch(2)
    a = SegmentationMetrics(threshold=0.3)
    a.update(prob, g)
    b = SegmentationMetrics(threshold=0.3, from_logits=True)
    b.update(torch.logit(prob.double().clamp(1e-6, 1 - 1e-6)).float(), g)
    for k, v in a.compute().items():
        assert b.compute()[k].item() == pytest.approx(v.item()), k
    with pytest.raises(ValueError, match="from_logits"):
        SegmentationMetrics().update(
            torch.randn(2, 8, 8) * 5, torch.zeros(2, 8, 8, dtype=torch.bool)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns on compute() before update()
        assert all(v.isnan() for v in SegmentationMetrics().compute().values())


def test_segmentation_metrics_merge_state() -> None:
    """States reduce as under DDP (cat per-image scores, sum counts)."""
    (p1, g1), (p2, g2) = _batch(3), _batch(4, n=3)
    whole, m1, m2 = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    whole.update(torch.cat([p1, p2]), torch.cat([g1, g2]))
    m1.update(p1, g1)
    m2.update(p2, g2)
    m1.merge_state(m2)
    for k, v in whole.compute().items():
        assert m1.compute()[k].item() == pytest.approx(v.item(), abs=1e-6), k


def _ddp_worker(rank: int, port: int, world: int, q: mp.SimpleQueue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    m = SegmentationMetrics()
    m.update(*(_batch(3) if rank == 0 else _batch(4, n=3)))  # unequal per-rank image counts
    out = {k: v.item() for k, v in m.compute().items()}
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


@pytest.mark.slow  # ~13 s: two spawned processes re-import torch and torchmetrics
def test_segmentation_metrics_ddp_gloo() -> None:
    """Real 2-process gloo sync: per-image scores gathered, counts summed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(port, 2, q), nprocs=2, join=True, start_method="spawn")
    got = q.get()
    (p1, g1), (p2, g2) = _batch(3), _batch(4, n=3)
    ref = SegmentationMetrics()
    ref.update(torch.cat([p1, p2]), torch.cat([g1, g2]))
    for k, v in ref.compute().items():
        assert got[k] == pytest.approx(v.item(), abs=1e-6), k
