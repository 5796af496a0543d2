"""Comparison of finished runs (local run folders or W&B): groups by swept overrides,
statistics, tables and figures.

Training jobs compare by their final validation metrics. Evaluation jobs (``sa2va.eval``,
``sa2va.nnunet``: a ``metrics.json`` with ``results``) compare by their test metrics, and
each arm is also tested against a reference arm on the same test images (paired Δ Dice,
cluster bootstrap CI over videos, Wilcoxon p, Holm across the table: :mod:`.statistics`).
An evaluation job takes its arm (overrides, seed) from the training run of its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sa2va.evaluation.runs import (
    BEST,
    CLIP_METRICS,
    EVAL_KEYS,
    METRICS,
    PAIRED,
    STATUSES,
    TEST_METRICS,
    ImageKey,
    Job,
)
from sa2va.evaluation.statistics import (
    MIN_UNITS,
    Interval,
    PairedTest,
    holm,
    paired_test,
    seed_interval,
)

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

    def seed_interval(self, metric: str) -> Interval:
        """Student-t interval of the mean over the group's completed jobs (its seeds)."""
        values = [j.metrics.get(metric, math.nan) for j in self.jobs if j.status == "completed"]
        return seed_interval(values)[2]

    def images(self) -> dict[ImageKey, float]:
        """Per-image PAIRED score averaged over the completed jobs (seeds) of the group."""
        jobs = [j for j in self.jobs if j.status == "completed" and j.images]
        if not jobs:
            return {}
        for job in jobs[1:]:
            if job.images.keys() != jobs[0].images.keys():
                raise ValueError(
                    f"{job.source} and {jobs[0].source}: different test images in one arm"
                )
        return {k: float(np.mean([j.images[k] for j in jobs])) for k in jobs[0].images}

    def detail(self, key: str) -> str:
        """An ablation key's (or else a setting's) value shared by the group's jobs that record
        it ("mixed" when they differ, "-" when none does, e.g. no LoRA, no metrics.json yet)."""
        values = {
            str(j.ablation[key]) if key in j.ablation else j.setting(key) for j in self.jobs
        } - {"-"}
        return (values.pop() if len(values) == 1 else "mixed") if values else "-"


@dataclass
class Comparison:
    source: str
    axes: list[str]
    fixed: dict[str, str]
    details: list[str]  # flat ablation keys that differ between groups (e.g. loss weights)
    groups: list[Group]
    metrics: tuple[str, ...] = (*METRICS, *CLIP_METRICS, BEST, *TEST_METRICS)
    reference: Group | None = None  # the arm every other one is tested against
    tests: dict[tuple[str, ...], PairedTest] = field(default_factory=dict)  # by group values
    holm: dict[tuple[str, ...], float] = field(default_factory=dict)  # adjusted p by values
    min_units: int = MIN_UNITS  # fewest videos a Δ CI is given for

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
                t = group.seed_interval(metric)
                row |= {f"{metric} mean": mean, f"{metric} std": std, f"{metric} n": n}
                row |= {f"{metric} t_low": t.low, f"{metric} t_high": t.high}
            test = self.tests.get(group.values)
            if test is not None:
                row |= {
                    f"delta {PAIRED}": test.delta.estimate,
                    f"delta {PAIRED} ci_low": test.delta.low,
                    f"delta {PAIRED} ci_high": test.delta.high,
                    "delta videos": test.delta.units,
                    "pairs": test.pairs,
                    "p wilcoxon": test.p,
                    "p holm": self.holm[group.values],
                }
            rows.append(row)
        return rows

    def delta_header(self) -> str:
        ref = self.label(self.reference) if self.reference else ""
        return f"vs {ref}: Δ {PAIRED.capitalize()} [95% CI], p"

    def delta_cell(self, group: Group) -> str:
        """``Δ [low, high], p`` (Holm-adjusted p); n videos instead of a CI below MIN_UNITS."""
        if group is self.reference:
            return "reference"
        test = self.tests.get(group.values)
        if test is None or not test.pairs:
            return "-"
        d = test.delta
        ci = f"[{d.low:+.4f}, {d.high:+.4f}]" if d.has_ci else f"(n={d.units} videos, no CI)"
        return f"{d.estimate:+.4f} {ci}, p={self.holm[group.values]:.3g}"

    def delta_notes(self) -> list[str]:
        pairs = max((t.pairs for t in self.tests.values()), default=0)
        return [
            "",
            f"Δ: mean over the {pairs} shared test images of (arm - reference) per-image "
            f"{PAIRED}, each image's score averaged over the arm's seeds. CI: cluster bootstrap "
            f"over videos (whole videos resampled, as frames of one video are correlated), left "
            f"out below {self.min_units} videos. p: two-sided Wilcoxon signed-rank over the "
            f"images, Holm-adjusted across the {len(self.tests)} rows; it treats frames as "
            "independent, so read it with the CI.",
        ]

    def seed_lines(self) -> list[str]:
        """95% Student-t intervals over seeds, for groups with at least two completed jobs."""
        groups = [g for g in self.groups if g.count("completed") > 1]
        if not groups:
            return []
        lines = ["", "## 95% t-intervals of the mean over seeds", ""]
        lines += ["| group | " + " | ".join(self.metrics) + " |"]
        lines += ["|" + "---|" * (len(self.metrics) + 1)]
        for group in groups:
            cells = []
            for metric in self.metrics:
                t = group.seed_interval(metric)
                cells.append(f"[{t.low:.4f}, {t.high:.4f}] (n={t.units})" if t.units > 1 else "-")
            lines.append(f"| {self.label(group)} | " + " | ".join(cells) + " |")
        return lines

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
            " completed jobs (its seeds): "
            + (
                "per-image means of each evaluation at its default threshold (eval.threshold)."
                if self.tests or any(j.images for j in self.jobs)
                else "final validation metrics, each run's best validation Dice, and test metrics"
                " of its best-validation checkpoint."
            ),
            "",
        ]
        if self.fixed:
            fixed = ", ".join(f"`{k}={v}`" for k, v in sorted(self.fixed.items()))
            lines += [f"Same in every job: {fixed}", ""]
        header = [*self.axes, *self.details, *STATUSES, *self.metrics]
        header += [self.delta_header()] if self.reference else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in self.groups:
            cells = [*group.values, *(group.detail(k) for k in self.details)]
            cells += [str(group.count(s)) for s in STATUSES]
            done = group.count("completed")
            cells += [format_stat(*group.stats(m), expected=done) for m in self.metrics]
            cells += [self.delta_cell(group)] if self.reference else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += self.delta_notes() if self.reference else []
        lines += self.seed_lines()
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


def compare_jobs(
    jobs: Sequence[Job],
    source: str = "",
    reference: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_units: int = MIN_UNITS,
) -> Comparison:
    """Group jobs by the override keys whose values differ between them (seed excluded).

    Evaluation jobs are also tested against ``reference`` (a group label such as
    ``model=sa2va_tiny``; by default the arm whose model starts with ``sa2va``).
    """
    if not jobs:
        raise ValueError(f"{source or 'input'}: no training jobs found")
    jobs = sorted(jobs, key=lambda j: j.order)
    keys = sorted({k for j in jobs for k in j.overrides} - {"seed"})
    settings = [{k: j.setting(k) for k in keys} for j in jobs]
    axes = [k for k in keys if len({s[k] for s in settings}) > 1]
    fixed = {k: settings[0][k] for k in keys if k not in axes}
    # keys that only vary with the model (the nnU-Net row's schedule, a sweep's experiment
    # against a separate run) describe rows: columns, not arms
    by_model = [k for k in axes if k != "model" and "model" in axes and model_bound(k, settings)]
    axes = [k for k in axes if k not in by_model]
    groups: dict[tuple[str, ...], Group] = {}
    for job, setting in zip(jobs, settings, strict=True):
        values = tuple(setting[a] for a in axes)
        groups.setdefault(values, Group(values, [])).jobs.append(job)
    comparison = Comparison(source, axes, fixed, by_model, list(groups.values()))
    # flat ablation keys that tell the groups apart beyond the axes (e.g. the loss weights
    # behind loss=bce_lang), unless they only repeat an axis (loss.name)
    columns = [tuple(g.values[i] for g in comparison.groups) for i in range(len(axes))]
    for key in dict.fromkeys(k for j in jobs for k in j.ablation if k != "seed"):
        column = tuple(g.detail(key) for g in comparison.groups)
        if key not in axes and len(set(column)) > 1 and column not in columns:
            comparison.details.append(key)
    evaluations = [j for j in jobs if j.evaluation]
    if evaluations:  # sa2va.eval / nnU-Net runs: their per-image metrics, tested in pairs
        comparison.metrics = tuple(metric_order(evaluations))
        add_paired_tests(comparison, reference, n_boot, seed, min_units)
    return comparison


def model_bound(key: str, settings: Sequence[Mapping[str, str]]) -> bool:
    """Whether ``key`` has one value per model among the jobs' settings."""
    values: dict[str, set[str]] = {}
    for setting in settings:
        values.setdefault(setting["model"], set()).add(setting[key])
    return all(len(v) == 1 for v in values.values())


def metric_order(jobs: Sequence[Job]) -> list[str]:
    """The ``<split>/<key>`` evaluation metrics the jobs hold, in EVAL_KEYS order."""
    present = {m for j in jobs for m in j.metrics}
    splits = dict.fromkeys(m.split("/")[0] for m in sorted(present))
    return [f"{s}/{k}" for s in splits for k in EVAL_KEYS if f"{s}/{k}" in present]


def find_reference(comparison: Comparison, reference: str | None) -> Group | None:
    """The group labelled ``reference``, or by default the one whose model is a Sa2VA."""
    if reference is not None:
        for group in comparison.groups:
            if comparison.label(group) == reference:
                return group
        labels = ", ".join(repr(comparison.label(g)) for g in comparison.groups)
        raise ValueError(f"reference {reference!r} is none of the arms ({labels})")
    if "model" not in comparison.axes:
        return None
    column = comparison.axes.index("model")
    sa2va = [g for g in comparison.groups if g.values[column].startswith("sa2va")]
    return sa2va[0] if sa2va else None


def add_paired_tests(
    comparison: Comparison, reference: str | None, n_boot: int, seed: int, min_units: int
) -> None:
    """Test every arm against the reference on the same test images; Holm across the rows."""
    ref_group = find_reference(comparison, reference)
    if ref_group is None:
        return
    ref = ref_group.images()
    if not ref:
        return
    comparison.reference, comparison.min_units = ref_group, min_units
    for group in comparison.groups:
        scores = group.images()
        if group is ref_group or not scores:
            continue
        if scores.keys() != ref.keys():
            source = next(j.source for j in group.jobs if j.images)
            raise ValueError(
                f"{source}: evaluated on other images than the reference "
                f"{comparison.label(ref_group)!r} ({len(scores.keys() - ref.keys())} only here, "
                f"{len(ref.keys() - scores.keys())} only there): evaluate every arm on one split"
            )
        keys = sorted(ref)
        comparison.tests[group.values] = paired_test(
            [scores[k] for k in keys],
            [ref[k] for k in keys],
            [k[0] for k in keys],
            n_boot=n_boot,
            seed=seed,
            min_units=min_units,
        )
    adjusted = holm([t.p for t in comparison.tests.values()])
    comparison.holm = dict(zip(comparison.tests, adjusted, strict=True))
