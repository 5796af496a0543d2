"""Figures for papers and reports: mask overlays, error overlays, case panels, contact sheets.

Matplotlib is used through its object API (``Figure`` + Agg canvas), never ``pyplot``, so no
global backend or window is involved and figures are freed when they go out of scope.
Error colours: true positive green, false positive red, false negative blue.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from sa2va.utils import atomic_write_bytes

# Distinct, colour-blind-tolerant hues (Okabe-Ito), one per mask of a frame.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
TP_COLOUR, FP_COLOUR, FN_COLOUR = (0, 200, 0), (230, 30, 30), (40, 90, 255)


def _tint(image: np.ndarray, mask: np.ndarray, colour: Sequence[int], alpha: float) -> None:
    image[mask] = (1 - alpha) * image[mask] + alpha * np.asarray(colour, dtype=np.float32)


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image with each (H, W) bool mask tinted in its own palette colour."""
    out = image.astype(np.float32)
    for index, mask in enumerate(masks):
        _tint(out, mask.astype(bool), PALETTE[index % len(PALETTE)], alpha)
    return out.round().astype(np.uint8)


def overlay_errors(
    image: np.ndarray, pred: np.ndarray, gt: np.ndarray, alpha: float = 0.6
) -> np.ndarray:
    """(H, W, 3) uint8 image with TP green, FP red and FN blue pixels."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    out = image.astype(np.float32)
    for mask, colour in ((pred & gt, TP_COLOUR), (pred & ~gt, FP_COLOUR), (~pred & gt, FN_COLOUR)):
        _tint(out, mask, colour, alpha)
    return out.round().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 (H, W) / (H, W, 3) array, or a uint16 (H, W) one (16-bit)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Case:
    """One evaluated frame for a figure: image, probability map, ground truth, threshold."""

    image: np.ndarray  # (H, W, 3) uint8
    prob: np.ndarray  # (H, W) float in [0, 1]
    gt: np.ndarray  # (H, W) bool
    threshold: float
    title: str


def case_figure(case: Case) -> Figure:
    """Four panels: image, ground truth, TP/FP/FN overlay at the threshold, probability."""
    pred = case.prob > case.threshold
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [
        (case.image, "image", None),
        (overlay_masks(case.image, [case.gt]), "ground truth", None),
        (overlay_errors(case.image, pred, case.gt), f"prediction > {case.threshold:g}", None),
        (case.prob, "probability", "magma"),
    ]
    for ax, (data, label, cmap) in zip(axes, panels, strict=True):
        shown = ax.imshow(
            data,
            cmap=cmap,
            vmin=0 if cmap else None,
            vmax=1 if cmap else None,
            interpolation="nearest",
        )
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[-1], fraction=0.046)
    fig.suptitle(case.title, fontsize=10)
    return fig


def contact_sheet(cases: Sequence[Case], ncols: int = 3) -> Figure:
    """A grid of TP/FP/FN overlays, one per case, captioned with the case title."""
    if not cases:
        raise ValueError("contact_sheet needs at least one case")
    ncols = min(ncols, len(cases))
    nrows = -(-len(cases) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, case in zip(axes, cases, strict=False):
        overlay = overlay_errors(case.image, case.prob > case.threshold, case.gt)
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(case.title, fontsize=8)
    fig.suptitle("green: true positive   red: false positive   blue: false negative", fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render to PNG in memory, then write atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
