"""Reading what an offline W&B run recorded, for tests of the W&B logger and sweeps."""

from __future__ import annotations

import json
from pathlib import Path

from sa2va.training.run import WANDB_RUN_FILE


def read_run(run_dir: Path) -> dict:
    """Group, name, job type, final config and exit code of an offline run, as the finished
    run held them (``sa2va.training.run`` writes them into the run's files: wandb's SDK has
    no reader for its binary ``run-*.wandb`` log)."""
    return json.loads((run_dir / "files" / WANDB_RUN_FILE).read_text())
