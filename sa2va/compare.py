"""Compare the jobs of ablation sweeps: tables (Markdown, CSV) and plots.

    python -m sa2va.compare outputs/train/multiruns/<sweep>     # one sweep
    python -m sa2va.compare outputs/ --out reports/ablations    # every training job below
    python -m sa2va.compare SWEEP_A SWEEP_B --out DIR           # several sweeps in one table
    python -m sa2va.compare --wandb-project me/sa2va-oct --wandb-group <group> --out DIR

Jobs are read from their run dirs (``metrics.json`` and ``.hydra/``) or from W&B runs logged
by ``logger=wandb`` (same records: the run config holds the overrides and choices). Jobs are
grouped by the ablation axes: the override keys whose values differ between jobs, ``seed``
excluded, so the seeds of one arm form one group (mean ± sample std over them). A key one job
overrides and another leaves at its default is filled from that job's config, so a
``model=unet`` sweep compares cleanly with a default ``sa2va_tiny`` one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sa2va.evaluation.comparison import compare_jobs, load_jobs, load_wandb_jobs, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sa2va.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("roots", nargs="*", help="run dirs, sweep dirs or outputs/")
    parser.add_argument("--out", help="report folder (default: the one ROOT)")
    parser.add_argument("--task", default="train", help="task_name of the jobs to read")
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
        jobs = [job for root in args.roots for job in load_jobs(root, args.task)]
    comparison = compare_jobs(jobs, source)
    paths = write_report(comparison, args.out or args.roots[0])
    print(comparison.markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
