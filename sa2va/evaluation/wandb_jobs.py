"""Jobs of a comparison read from W&B runs logged by ``logger=wandb`` (same records as a
run dir: the run config holds the overrides and choices)."""

from __future__ import annotations

from omegaconf import OmegaConf

from sa2va.evaluation.runs import BEST, CLIP_METRICS, CURVES, METRICS, Job
from sa2va.overrides import parse_overrides

# W&B run states -> job status; a run without our own "status" summary falls back to these.
WANDB_STATES = {
    "finished": "completed",
    "failed": "failed",
    "crashed": "failed",
    "killed": "failed",
}


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
        metrics = {
            k: float(summary[k])
            for k in (*METRICS, *CLIP_METRICS)
            if isinstance(summary.get(k), int | float)
        }
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
