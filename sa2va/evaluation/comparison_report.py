"""The comparison report: ``comparison.md``, ``comparison.csv`` (per arm), ``runs.csv`` (per
job) and figures (bars per metric, training curves, paired differences to the reference)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sa2va.evaluation.comparison import Comparison
from sa2va.evaluation.runs import CURVES, PAIRED
from sa2va.utils import atomic_write_bytes


def csv_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def bar_figure(comparison: Comparison):
    """One panel per metric: a bar per group, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = comparison.metrics
    n = len(comparison.groups)
    fig = Figure(figsize=(max(6.0, 0.6 * n * len(metrics)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = [comparison.label(g) for g in comparison.groups]
    for ax, metric in zip(axes, metrics, strict=True):
        stats = [g.stats(metric) for g in comparison.groups]
        means = [s[0] for s in stats]
        errors = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
        ax.bar(range(n), means, yerr=errors, capsize=3, color="#0072B2")
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(0, 1.05 if all(m <= 1 for m in means if not math.isnan(m)) else None)
    fig.suptitle(f"mean ± std over seeds ({comparison.source})", fontsize=9)
    return fig


def curve_figure(comparison: Comparison):
    """Training curves per group from the CSV logs: mean over seeds, band = ± std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0 * len(CURVES), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(CURVES), squeeze=False)[0]
    for ax, metric in zip(axes, CURVES, strict=True):
        for group in comparison.groups:
            by_step: dict[int, list[float]] = {}
            for job in group.jobs:
                for step, value in job.curves.get(metric, []):
                    by_step.setdefault(step, []).append(value)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            (line,) = ax.plot(steps, mean, label=comparison.label(group), linewidth=1.2)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(metric, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return fig


def delta_figure(comparison: Comparison):
    """Paired Δ per arm against the reference: point and CI (a bare point where none)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g in comparison.groups if g.values in comparison.tests]
    fig = Figure(figsize=(6.0, 1.0 + 0.45 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for row, group in enumerate(groups):
        d = comparison.tests[group.values].delta
        if d.has_ci:
            ax.plot([d.low, d.high], [row, row], color="#0072B2", linewidth=2)
        ax.plot(d.estimate, row, "o", color="#D55E00")
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(groups)), [comparison.label(g) for g in groups], fontsize=7)
    ax.invert_yaxis()  # rows in table order, top down
    ax.set_xlabel(f"Δ {PAIRED} vs {comparison.label(comparison.reference)} (per image)")
    ax.set_title("mean paired difference, 95% cluster-bootstrap CI over videos", fontsize=9)
    return fig


def write_report(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """comparison.md / .csv (per group), runs.csv (per job) and PNG figures, atomically: the
    training curves when jobs logged any, the paired differences when arms were tested."""
    from sa2va.figures import save_figure

    out = Path(out_dir)
    outputs = {
        out / "comparison.md": comparison.markdown().encode(),
        out / "comparison.csv": csv_bytes(comparison.rows()),
        out / "runs.csv": csv_bytes(comparison.job_rows()),
    }
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    figures = [save_figure(bar_figure(comparison), out / "comparison_bars.png")]
    if any(j.curves for j in comparison.jobs):
        figures.append(save_figure(curve_figure(comparison), out / "training_curves.png"))
    if comparison.tests:
        figures.append(save_figure(delta_figure(comparison), out / "paired_differences.png"))
    return [*outputs, *figures]
