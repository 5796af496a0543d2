"""A checkpoint from a real (tiny, few-step) training run, trained once per test session.

Import the ``trained`` fixture into a test module. Each importing module gets its own
fixture definition, so the run itself is memoised here to train only once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from helpers.configs import FAST_TRAIN
from sa2va.training.run import train
from sa2va.utils import CONF_DIR


@dataclass(frozen=True)
class TrainedRun:
    ckpt: Path  # the best checkpoint of the run
    run_dir: Path


_RUNS: dict[str, TrainedRun] = {}


def _train_once(out_dir: Path, cache_dir: Path) -> TrainedRun:
    GlobalHydra.instance().clear()
    overrides = [*FAST_TRAIN, f"paths.output_dir={out_dir}", f"paths.cache_dir={cache_dir}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        summary = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return TrainedRun(ckpt=Path(summary["best_checkpoint"]), run_dir=out_dir)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> TrainedRun:
    """Read-only: copy the checkpoint before writing anything next to it."""
    if "run" not in _RUNS:
        _RUNS["run"] = _train_once(tmp_path_factory.mktemp("trained"), cache_dir)
    return _RUNS["run"]
