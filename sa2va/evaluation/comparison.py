"""Comparison of finished runs (local run folders or W&B): groups by swept overrides,
statistics, tables and figures."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sa2va.overrides import parse_overrides
from sa2va.utils import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS = ("val/dice", "val/iou", "val/precision", "val/recall")
# the test split scored with the best-val checkpoint at the end of each run (sa2va.training.run)
TEST_METRICS = ("test/dice", "test/iou", "test/precision", "test/recall")
BEST = "val/dice (best)"  # ModelCheckpoint's best score (max val/dice over validations)
CURVES = ("val/dice", "train/loss")
STATUSES = ("completed", "failed", "missing")
# W&B run states -> job status; a run without our own "status" summary falls back to these.
WANDB_STATES = {
    "finished": "completed",
    "failed": "failed",
    "crashed": "failed",
    "killed": "failed",
}


# ------------------------------------------------------------------------------ overrides


# ----------------------------------------------------------------------------------- jobs


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


def load_job(run_dir: Path) -> Job:
    """One run dir: ``.hydra/{config,hydra,overrides}.yaml``, and ``metrics.json`` once it ended."""
    hydra_dir = run_dir / ".hydra"
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml").hydra
    overrides = parse_overrides(_load_yaml(hydra_dir / "overrides.yaml"))
    metrics_path = run_dir / "metrics.json"
    summary: dict[str, Any] = {"status": "missing"}
    if metrics_path.is_file():
        try:
            summary = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics_path}: not valid JSON ({error})") from error
    recorded = (summary.get("metrics") or {}).items()
    metrics = {k: float(v) for k, v in recorded if k in METRICS + TEST_METRICS}
    if summary.get("best_score") is not None:
        metrics[BEST] = float(summary["best_score"])
    csv_files = sorted(p for p in run_dir.rglob("metrics.csv") if "wandb" not in p.parts)
    return Job(
        source=str(run_dir),
        status=summary["status"] if summary["status"] in STATUSES else "missing",
        overrides=overrides,
        choices=dict(hydra_cfg.runtime.choices),
        config=_load_yaml(hydra_dir / "config.yaml"),
        metrics=metrics,
        ablation=summary.get("ablation") or {},
        curves=read_curves(csv_files[0] if csv_files else None),
        error=summary.get("error"),
        order=(str(run_dir.parent), int(hydra_cfg.job.get("num") or 0), str(run_dir)),
    )


def load_jobs(root: str | Path, task: str = "train") -> list[Job]:
    """Every ``task`` run dir at or below ``root`` (a run, a sweep, or a whole outputs/)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    jobs = [load_job(path.parent.parent) for path in root.rglob(".hydra/config.yaml")]
    return sorted((j for j in jobs if j.config.get("task_name") == task), key=lambda j: j.order)


def load_wandb_jobs(project: str, group: str | None = None) -> list[Job]:
    """The runs of a W&B project (``entity/project``), optionally one group (one sweep).

    Needs the network and a W&B login; the tests have neither, so this path is untested.
    """
    import wandb

    runs = wandb.Api().runs(project, filters={"group": group} if group else None)
    jobs = []
    for index, run in enumerate(runs):
        config = dict(run.config)
        meta = config.get("hydra") or {}
        summary = dict(run.summary)
        curves: dict[str, list[tuple[int, float]]] = {}
        for metric in CURVES:
            rows = run.scan_history(keys=["trainer/global_step", metric])
            curves[metric] = [(int(r["trainer/global_step"]), float(r[metric])) for r in rows]
        metrics = {k: float(summary[k]) for k in METRICS if isinstance(summary.get(k), int | float)}
        if curves.get("val/dice"):
            metrics[BEST] = max(v for _, v in curves["val/dice"])
        status = summary.get("status") or WANDB_STATES.get(run.state, "missing")
        jobs.append(
            Job(
                source="/".join(run.path),
                status=status,
                overrides=parse_overrides(meta.get("overrides") or []),
                choices=dict(meta.get("choices") or {}),
                config=OmegaConf.create(config.get("cfg") or {}),
                metrics=metrics,
                ablation={k: v for k, v in config.items() if "." in k or k == "seed"},
                curves={m: p for m, p in curves.items() if p},
                error=summary.get("error"),
                order=(run.group or "", index),
            )
        )
    return jobs


# ------------------------------------------------------------------------------- grouping


@dataclass
class Group:
    """The jobs of one arm (same axis values), usually one per seed."""

    values: tuple[str, ...]
    jobs: list[Job]

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    def stats(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample std (NaN for one value) and count over completed jobs."""
        values = [
            j.metrics[metric]
            for j in self.jobs
            if j.status == "completed" and math.isfinite(j.metrics.get(metric, math.nan))
        ]
        if not values:
            return math.nan, math.nan, 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return float(np.mean(values)), std, len(values)

    def detail(self, key: str) -> str:
        """An ablation key's value shared by the group's jobs that record it ("mixed" when they
        differ, "-" when none does, e.g. no LoRA, or no metrics.json yet)."""
        values = {str(j.ablation[key]) for j in self.jobs if key in j.ablation}
        return (values.pop() if len(values) == 1 else "mixed") if values else "-"


@dataclass
class Comparison:
    source: str
    axes: list[str]
    fixed: dict[str, str]
    details: list[str]  # flat ablation keys that differ between groups (e.g. loss weights)
    groups: list[Group]
    metrics: tuple[str, ...] = (*METRICS, BEST, *TEST_METRICS)

    @property
    def jobs(self) -> list[Job]:
        return [j for g in self.groups for j in g.jobs]

    def label(self, group: Group) -> str:
        return ", ".join(f"{a}={v}" for a, v in zip(self.axes, group.values, strict=True)) or "all"

    def rows(self) -> list[dict[str, Any]]:
        """One row per group: axes, details, status counts, mean/std/n per metric."""
        rows = []
        for group in self.groups:
            row: dict[str, Any] = dict(zip(self.axes, group.values, strict=True))
            row |= {key: group.detail(key) for key in self.details}
            row |= {status: group.count(status) for status in STATUSES}
            for metric in self.metrics:
                mean, std, n = group.stats(metric)
                row |= {f"{metric} mean": mean, f"{metric} std": std, f"{metric} n": n}
            rows.append(row)
        return rows

    def job_rows(self) -> list[dict[str, Any]]:
        """One row per job: its settings, status, metrics and error."""
        keys = sorted({k for j in self.jobs for k in j.overrides})
        return [
            {"source": j.source, "status": j.status}
            | {k: j.setting(k) for k in keys}
            | {m: j.metrics.get(m, math.nan) for m in self.metrics}
            | {"error": j.error or ""}
            for j in self.jobs
        ]

    def markdown(self) -> str:
        counts = {s: sum(j.status == s for j in self.jobs) for s in STATUSES}
        lines = [
            "# Ablation comparison",
            "",
            f"Source: `{self.source}`: {len(self.jobs)} jobs ("
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f") in {len(self.groups)} groups. Cells: mean ± sample std over a group's"
            " completed jobs (its seeds): final validation metrics, each run's best"
            " validation Dice, and test metrics of its best-validation checkpoint.",
            "",
        ]
        if self.fixed:
            fixed = ", ".join(f"`{k}={v}`" for k, v in sorted(self.fixed.items()))
            lines += [f"Same in every job: {fixed}", ""]
        header = [*self.axes, *self.details, *STATUSES, *self.metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in self.groups:
            cells = [*group.values, *(group.detail(k) for k in self.details)]
            cells += [str(group.count(s)) for s in STATUSES]
            done = group.count("completed")
            cells += [format_stat(*group.stats(m), expected=done) for m in self.metrics]
            lines.append("| " + " | ".join(cells) + " |")
        failed = [j for j in self.jobs if j.status == "failed"]
        if failed:
            lines += ["", "## Failed jobs", ""]
            lines += [f"- `{j.source}`: {j.error or 'no error recorded'}" for j in failed]
        missing = [j for j in self.jobs if j.status == "missing"]
        if missing:
            lines += ["", "## Jobs without metrics.json (killed, timed out or still running)", ""]
            lines += [f"- `{j.source}`" for j in missing]
        return "\n".join(lines) + "\n"


def format_stat(mean: float, std: float, n: int, expected: int) -> str:
    """``mean ± std``; the count is shown only when some completed job lacks the metric."""
    if not n:
        return "-"
    text = f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"
    return text if n == expected else f"{text} (n={n})"


def compare_jobs(jobs: Sequence[Job], source: str = "") -> Comparison:
    """Group jobs by the override keys whose values differ between them (seed excluded)."""
    if not jobs:
        raise ValueError(f"{source or 'input'}: no training jobs found")
    jobs = sorted(jobs, key=lambda j: j.order)
    keys = sorted({k for j in jobs for k in j.overrides} - {"seed"})
    settings = [{k: j.setting(k) for k in keys} for j in jobs]
    axes = [k for k in keys if len({s[k] for s in settings}) > 1]
    fixed = {k: settings[0][k] for k in keys if k not in axes}
    groups: dict[tuple[str, ...], Group] = {}
    for job, setting in zip(jobs, settings, strict=True):
        values = tuple(setting[a] for a in axes)
        groups.setdefault(values, Group(values, [])).jobs.append(job)
    comparison = Comparison(source, axes, fixed, [], list(groups.values()))
    # flat ablation keys that tell the groups apart beyond the axes (e.g. the loss weights
    # behind loss=bce_lang), unless they only repeat an axis (loss.name)
    columns = [tuple(g.values[i] for g in comparison.groups) for i in range(len(axes))]
    for key in dict.fromkeys(k for j in jobs for k in j.ablation if k != "seed"):
        column = tuple(g.detail(key) for g in comparison.groups)
        if key not in axes and len(set(column)) > 1 and column not in columns:
            comparison.details.append(key)
    return comparison


# -------------------------------------------------------------------------------- outputs


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


def write_report(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """comparison.md / .csv (per group), runs.csv (per job) and two PNG figures, atomically."""
    from sa2va.figures import save_figure

    out = Path(out_dir)
    outputs = {
        out / "comparison.md": comparison.markdown().encode(),
        out / "comparison.csv": csv_bytes(comparison.rows()),
        out / "runs.csv": csv_bytes(comparison.job_rows()),
    }
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    figures = [
        save_figure(bar_figure(comparison), out / "comparison_bars.png"),
        save_figure(curve_figure(comparison), out / "training_curves.png"),
    ]
    return [*outputs, *figures]
