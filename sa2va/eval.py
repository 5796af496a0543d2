"""Evaluation entry point: `python -m sa2va.eval ckpt_path=CKPT [eval.split=test] [...]`.

Runs a trained checkpoint over whole videos of one split and writes, in the run dir:
``metrics.json`` (summary), ``per_image.csv`` and ``per_video.csv`` (plus ``*_tuned.csv``
when a tuned threshold exists), ``results.md`` (Markdown tables), and ``figures/`` (best,
median and worst cases by Dice, and a contact sheet). Metric definitions and the empty-mask
policy are those of :mod:`sa2va.metrics`.

Thresholds: every result is reported at ``eval.threshold`` (0.5) and, when one exists, at
the threshold tuned on the *validation* split (``eval.tune_threshold=true`` tunes it now and
saves ``<ckpt>.threshold.json``; a saved one for the same checkpoint is reused).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.evaluation.evaluate import (
    evaluate,
)
from sa2va.summary import eval_summary
from sa2va.training.config import register_schemas
from sa2va.utils import CONF_DIR

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float:
    OmegaConf.resolve(cfg)
    summary = evaluate(cfg)
    print(eval_summary(summary))
    return summary["results"]["default"]["per_image"]["dice"]["mean"]


if __name__ == "__main__":
    main()
