"""Training entry point: `python -m sa2va.train [overrides]` (Hydra app) or `train(cfg)`."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sa2va.summary import train_summary
from sa2va.training.config import register_schemas
from sa2va.training.run import train
from sa2va.utils import CONF_DIR

register_schemas()

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """In a sweep (-m) a failed job returns NaN instead of raising, so later jobs and batches
    still run (with any launcher or sweeper); its metrics.json says failed, with the error,
    and sa2va.compare lists it. A single run still raises (non-zero exit)."""
    OmegaConf.resolve(cfg)
    try:
        summary = train(cfg)
    except Exception:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        log.exception("job failed (recorded in metrics.json); the sweep goes on")
        return float("nan")
    print(train_summary(summary))
    return summary["metrics"].get(cfg.get("optimized_metric", "val/dice"))


if __name__ == "__main__":
    main()
