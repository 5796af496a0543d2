"""Compare the jobs of ablation sweeps: tables (Markdown, CSV) and plots.

    python -m sa2va.compare outputs/train/multiruns/<sweep>     # one sweep
    python -m sa2va.compare outputs/ --out reports/ablations    # every training job below
    python -m sa2va.compare SWEEP_A SWEEP_B --out DIR           # several sweeps in one table
    python -m sa2va.compare --wandb-project me/sa2va-oct --wandb-group <group> --out DIR
    python -m sa2va.compare outputs/ --task eval,nnunet --out reports/baselines  # test metrics

Jobs are read from their run dirs (``metrics.json`` and ``.hydra/``) or from W&B runs logged
by ``logger=wandb`` (same records: the run config holds the overrides and choices). Jobs are
grouped by the ablation axes: the override keys whose values differ between jobs, ``seed``
excluded, so the seeds of one arm form one group (mean ± sample std over them). A key one job
overrides and another leaves at its default is filled from that job's config, so a
``model=unet`` sweep compares cleanly with a default ``sa2va_tiny`` one.

Evaluation runs (``--task eval``, ``sa2va.eval``; ``nnunet``, ``sa2va.nnunet``) compare by their
test metrics, and each arm is tested against a reference arm (``--reference model=sa2va_tiny``;
default: the Sa2VA model) on the same test images: Δ Dice with a cluster (per-video) bootstrap
CI, a Wilcoxon signed-rank p and Holm's correction across the table (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sa2va.evaluation.comparison import compare_jobs
from sa2va.evaluation.comparison_report import write_report
from sa2va.evaluation.runs import load_jobs
from sa2va.evaluation.statistics import MIN_UNITS
from sa2va.evaluation.wandb_jobs import load_wandb_jobs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sa2va.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("roots", nargs="*", help="run dirs, sweep dirs or outputs/")
    parser.add_argument("--out", help="report folder (default: the one ROOT)")
    parser.add_argument(
        "--task", default="train", help="task_name(s) of the jobs to read, comma-separated"
    )
    parser.add_argument("--reference", help="arm the others are tested against, e.g. model=unet")
    parser.add_argument(
        "--min-units", type=int, default=MIN_UNITS, help="fewest videos a Δ CI is given for"
    )
    parser.add_argument("--wandb-project", help="read W&B runs of ENTITY/PROJECT instead (online)")
    parser.add_argument("--wandb-group", help="only this W&B group (one sweep)")
    args = parser.parse_args(argv)
    if bool(args.roots) == bool(args.wandb_project):
        parser.error("give either ROOT(s) or --wandb-project")
    if not args.out and len(args.roots) != 1:
        parser.error("--out is needed unless there is exactly one ROOT")
    if args.wandb_project:
        source = f"wandb:{args.wandb_project}:{args.wandb_group or 'all groups'}"
        jobs = load_wandb_jobs(args.wandb_project, args.wandb_group)
    else:
        source = ", ".join(args.roots)
        tasks = args.task.split(",")
        jobs = [job for root in args.roots for job in load_jobs(root, tasks)]
    comparison = compare_jobs(jobs, source, args.reference, min_units=args.min_units)
    paths = write_report(comparison, args.out or args.roots[0])
    print(comparison.markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
